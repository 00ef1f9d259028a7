//! The plan stage: where a request may go before any try is made. The upstreams serving
//! its model, narrowed to the home of an object it names, minus those at their own limits;
//! the session that pins it; what admitting its key reserves.

use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::clock::unix_now;
use crate::gateway::Gateway;
use crate::http::body::{Body, json_response};
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::read::{Inbound, MAX_MODEL_NAME, invalid_json};
use crate::protocol::{UpstreamKind, translate};
use crate::pure::limits::Reserve;
use crate::pure::routing::Choice;
use crate::pure::usage::count_prompt_tokens;

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

/// Narrows the candidates to the upstreams of one kind; `false` when none is left (the
/// candidates stay as they were).
pub fn keep_kind(x: &Exchange<'_>, plan: &mut Plan, kind: UpstreamKind) -> bool {
    let upstreams = &x.gateway.upstreams;
    let kept: Vec<usize> = plan
        .candidates
        .iter()
        .copied()
        .filter(|&i| UpstreamKind::of(&upstreams[i].config) == kind)
        .collect();
    if kept.is_empty() {
        return false;
    }
    plan.candidates = kept;
    plan.first_choice = plan
        .first_choice
        .filter(|c| plan.candidates.contains(&c.upstream));
    true
}

/// Answers Anthropic's `count_tokens` without an upstream: the prompt counted with the
/// tokenizer sluice prices with (`{"input_tokens": N}`).
pub fn count_tokens_here(
    x: &mut Exchange<'_>,
    inbound: &Inbound,
) -> Result<Response<Body>, ApiError> {
    let body = inbound.buffered.as_deref().unwrap_or_default();
    let value: Value = serde_json::from_slice(body).map_err(|e| invalid_json(&e))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body is not a JSON object",
        ));
    };
    let pivot = translate::anthropic::request_to_openai(object)
        .map_err(|e| ApiError::bad_request("untranslatable_field", e.to_string()))?;
    let model = inbound.model.as_deref().unwrap_or("");
    let tokens = count_prompt_tokens(model, &Value::Object(pivot));
    if let (Some(mut record), Some(recorder)) = (x.record.take(), x.gateway.recorder.as_ref()) {
        record.status = 200;
        record.latency = Some(record.started.elapsed());
        recorder.submit(*record);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({ "input_tokens": tokens }),
    ))
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
