//! The plan stage: where a request may go before any try is made. The upstreams serving
//! its model, narrowed to the home of an object it names, minus those at their own limits;
//! the session that pins it; what admitting its key reserves.

use http::StatusCode;

use crate::clock::unix_now;
use crate::gateway::Gateway;
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::read::{Inbound, MAX_MODEL_NAME};
use crate::pure::limits::Reserve;
use crate::pure::routing::Choice;

/// The request header that pins a conversation to one upstream and key.
pub const SESSION_HEADER: &str = "x-session-id";

/// Where a request may go, decided once before its first try.
pub struct Plan {
    /// Indexes of the upstreams that may serve it, none of them at its limits.
    pub candidates: Vec<usize>,
    /// The first try's choice when it is decided ahead: the home of an object it names.
    pub first_choice: Option<Choice>,
    /// The routing key that pins it (`x-session-id`, or the body's `user`).
    pub session: Option<String>,
    /// What admitting the caller's key reserves of its limits and budget.
    pub reserve: Reserve,
}

/// Decides the candidates: the upstreams serving the model (404 if
/// none; `routing.default_upstream` without a model), the home of a named object, not at
/// their limits (429 if none is left).
pub async fn plan(x: &Exchange<'_>, inbound: &mut Inbound) -> Result<Plan, ApiError> {
    let gateway = x.gateway;
    let model = inbound.model.as_deref();
    let reserve = match x.caller {
        Caller::Gateway(key) => {
            gateway.estimate(key, model, inbound.buffered.as_ref().map_or(0, |b| b.len()))
        }
        _ => Reserve::default(),
    };
    let now = unix_now();
    let mut candidates = gateway.candidates(model)?;
    // A request naming an object (a file, a previous response…) goes where it lives.
    let first_choice = gateway
        .object_choice(x.path, inbound.buffered.as_deref(), model, &mut candidates)
        .await;
    drop_limited(gateway, &mut candidates, now)?;
    Ok(Plan {
        candidates,
        first_choice,
        session: session_key(x, inbound.user.take()),
        reserve,
    })
}

/// Drops the upstreams at their own limits while others can serve; when none is left,
/// refuses with 429 and the soonest wait.
fn drop_limited(gateway: &Gateway, candidates: &mut Vec<usize>, now: i64) -> Result<(), ApiError> {
    let mut soonest_wait: Option<u64> = None;
    candidates.retain(|&i| {
        match gateway
            .limiter
            .upstream_wait(&gateway.upstreams[i].config, now)
        {
            None => true,
            Some(wait) => {
                soonest_wait = Some(soonest_wait.map_or(wait, |w| w.min(wait)));
                false
            }
        }
    });
    if !candidates.is_empty() {
        return Ok(());
    }
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "upstream_rate_limited",
        "every upstream that serves this request is at its rate limit",
    );
    error.retry_after = soonest_wait;
    Err(error)
}

/// Decides the session a request belongs to, when sessions are on: its `x-session-id`,
/// else its end user (a routing key held for its TTL: an end-user id, not a payload).
fn session_key(x: &Exchange<'_>, user: Option<String>) -> Option<String> {
    x.parts
        .headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(user.filter(|u| u.len() <= MAX_MODEL_NAME))
        .filter(|_| x.gateway.router.sessions_enabled())
}
