//! Forwarding one request to an upstream and relaying its answer: the stages in order,
//! and nothing else. Each stage is a module of its own:
//!
//! 1. accept and authenticate: done by the edge (`http::server`, with the pipeline's
//!    `access`), which hands over a [`Caller`];
//! 2. [`read`]: what must be read of the body, the model, whether
//!    the caller may use it;
//! 3. [`plan`]: the candidates, an object's home, upstream limits,
//!    the session;
//! 4. admit and send ([`try_loop`] over
//!    [`send`](super::send)): the caller's key and each upstream under their
//!    limits, tries until one answers or none is left;
//! 5. relay and record ([`relay`]): the answer streamed to the
//!    client, the log record submitted when it ends.
//!
//! They share one per-request context, [`Exchange`]. A stage that refuses returns an
//! [`ApiError`]; [`Exchange::refuse`] is the one place that turns it into an answer.

use http::Response;
use http::request::Parts;
use hyper::body::Incoming;

use crate::accounting::records::Pending;
use crate::gateway::Gateway;
use crate::http::body::Body;
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::relay::{self, Shaping};
use crate::pipeline::{plan, read, try_loop};
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
    match stages(&mut exchange, body).await {
        Ok(response) => response,
        Err(error) => exchange.refuse(error),
    }
}

/// The stages after authentication, in order; the first refusal ends the request.
async fn stages(x: &mut Exchange<'_>, body: Incoming) -> Result<Response<Body>, ApiError> {
    let mut inbound = read::read_inbound(x, body).await?;
    read::authorise_model(x, &inbound)?;
    let mut plan = plan::plan(x, &mut inbound).await?;
    if x.protocol == ClientProtocol::Anthropic && x.path == anthropic::COUNT_TOKENS {
        // Counted by an Anthropic upstream when one serves the model, else here.
        if !plan::keep_kind(x, &mut plan, UpstreamKind::Anthropic) {
            return plan::count_tokens_here(x, &inbound);
        }
    }
    let settled = try_loop::send_until_settled(x, &mut inbound, &plan).await?;
    let shaping = Shaping {
        client_model: inbound.model.as_deref(),
        strip_usage: inbound.strip_usage,
        usage_asked: inbound.usage_asked,
        route: None,
    };
    Ok(relay::relay_settled(x, settled, shaping))
}
