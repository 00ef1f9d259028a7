//! Forwarding one request to an upstream and relaying its answer: the stages in order,
//! and nothing else. Each stage is a module of its own:
//!
//! 1. accept and authenticate: done by the edge (`http::server`, with the pipeline's
//!    `access`), which hands over a [`Caller`];
//! 2. [`read`]: what must be read of the body, the model, whether
//!    the caller may use it; then [`cached`]: a response cache hit answers here;
//! 3. [`plan`]: the candidates, an object's home, upstream limits,
//!    the session;
//! 4. admit and send ([`try_loop`] over
//!    [`send`](super::send)): the caller's key and each upstream under their
//!    limits, tries until one answers or none is left; 3 and 4 again for each
//!    fallback model the outcome gives way to ([`fallback`]);
//! 5. relay and record ([`relay`]): the answer streamed to the
//!    client, the log record submitted when it ends.
//!
//! They share one per-request context, [`Exchange`]. A stage that refuses returns an
//! [`ApiError`]; [`Exchange::refuse`] is the one place that turns it into an answer.

use http::Response;
use http::request::Parts;
use hyper::body::Incoming;

use crate::accounting::records::Pending;
use crate::config::FallbackModelName;
use crate::gateway::Gateway;
use crate::http::body::Body;
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::cached::{self, Looked};
use crate::pipeline::exchange::Exchange;
use crate::pipeline::relay::{self, Shaping};
use crate::pipeline::{fallback, plan, read, try_loop};
use crate::protocol::{ClientProtocol, UpstreamKind, anthropic};

/// Forwards a request under `/v1/` (`path` is the path without the route prefix).
/// `record` is the request's log record, if the log is on; it is submitted when the
/// exchange ends (for a streamed answer, when its body ends or the client leaves).
pub async fn forward(
    gateway: &Gateway,
    caller: Caller,
    parts: Parts,
    body: Incoming,
    path: &str,
    record: Option<Box<Pending>>,
) -> Response<Body> {
    let mut exchange = Exchange::new(gateway, &caller, parts, path, record);
    let outcome = stages(&mut exchange, body).await;
    let note = exchange.cache;
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => exchange.refuse(error),
    };
    cached::mark(&mut response, note);
    response
}

/// The stages after authentication, in order; the first refusal ends the request. Plan
/// and tries run again for each fallback model the outcome gives way to.
async fn stages(x: &mut Exchange<'_>, body: Incoming) -> Result<Response<Body>, ApiError> {
    let mut inbound = read::read_inbound(x, body).await?;
    read::authorise_model(x, &inbound)?;
    let fill = match cached::look_up(x, &inbound).await? {
        Looked::Hit(response) => return Ok(response),
        Looked::Pass(fill) => fill,
    };
    if x.protocol == ClientProtocol::Anthropic && x.path == anthropic::COUNT_TOKENS {
        return count_tokens(x, &mut inbound).await;
    }
    let requested = inbound.model.clone();
    // Plan and tries, again for each fallback model the outcome gives way to.
    let (settled, served) = fallback::plan_and_try(x, &mut inbound).await?;
    let served = served.as_deref();
    let fell_back = served != requested.as_deref();
    let shaping = Shaping {
        client_model: match x.gateway.config.routing.fallback_model_name {
            FallbackModelName::Requested => requested.as_deref(),
            FallbackModelName::Served => served,
        },
        served_model: served.filter(|_| fell_back),
        strip_usage: inbound.strip_usage,
        fill: cached::fill_for(fill, served),
        usage_asked: inbound.usage_asked,
        route: None,
    };
    Ok(relay::relay_settled(x, settled, shaping))
}

/// `POST /v1/messages/count_tokens`: counted by an Anthropic upstream when one serves the
/// model, else here (no fallback, no cache: nothing is generated).
async fn count_tokens(
    x: &mut Exchange<'_>,
    inbound: &mut read::Inbound,
) -> Result<Response<Body>, ApiError> {
    let mut plan = plan::plan(x, inbound).await?;
    if !plan::keep_kind(x, &mut plan, UpstreamKind::Anthropic) {
        return plan::count_tokens_here(x, inbound);
    }
    let settled = try_loop::send_until_settled(x, inbound, &plan).await?;
    let shaping = Shaping {
        client_model: inbound.model.as_deref(),
        served_model: None,
        strip_usage: inbound.strip_usage,
        fill: None,
        usage_asked: inbound.usage_asked,
        route: None,
    };
    Ok(relay::relay_settled(x, settled, shaping))
}
