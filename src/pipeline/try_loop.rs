//! The admit and send stages together: up to `1 + retries` tries, each to the upstream and
//! key the router picks, until one answers with something other than a retryable failure.
//! The caller's key is admitted with the first try, each upstream with its own; a failed
//! try excludes its key or its upstream, after a back-off. Once an answer's head is taken,
//! nothing is retried.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode, header};
use tokio::time::Instant;

use crate::accounting::records::Attempt;
use crate::http::error::ApiError;
use crate::http::headers::upstream_request_headers;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::plan::Plan;
use crate::pipeline::read::Inbound;
use crate::pipeline::send::{self, Failure, Outcome, Sent};
use crate::pure::routing::{Choice, Tried};
use crate::upstream::{InFlight, UpstreamRuntime};

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How the tries ended: an answer to relay, or the failure to report.
pub enum Settled<'g> {
    Answered {
        response: reqwest::Response,
        upstream: &'g Arc<UpstreamRuntime>,
        choice: Choice,
        /// Keeps the upstream's in-flight count up while the answer streams.
        in_flight: InFlight,
    },
    Failed {
        failure: Failure,
        upstream: &'g Arc<UpstreamRuntime>,
        choice: Choice,
        /// Every try failed in a way another try could have mended (connect, timeout,
        /// 429, 5xx): a fallback model may be tried.
        retryable: bool,
    },
}

/// What the loop keeps from one try to the next.
struct Tries<'g> {
    tried: Tried,
    /// The next try's choice when it is decided ahead: an object's home, a token refresh.
    ahead: Option<Choice>,
    /// The last retryable failure, reported if no other try is possible.
    last_failure: Option<Settled<'g>>,
    token_refreshed: bool,
    /// The body can be sent again (it was read, not streamed).
    replayable: bool,
    /// Headers are copied per try only when a second try is possible (a lone upstream
    /// and key is tried again too, after its back-off).
    might_retry: bool,
    headers: Option<HeaderMap>,
    /// Tries made for earlier models (fallbacks) before this loop: its retries count
    /// from here.
    before: usize,
}

impl Tries<'_> {
    /// The request's headers for one try: a copy while another try may follow, else
    /// the headers themselves.
    fn headers_for_try(&mut self) -> HeaderMap {
        if self.might_retry {
            self.headers.clone().unwrap_or_default()
        } else {
            self.headers.take().unwrap_or_default()
        }
    }
}

/// Tries upstreams until one answers or no try is left, and says how it settled.
pub async fn send_until_settled<'g>(
    x: &mut Exchange<'g>,
    inbound: &mut Inbound,
    plan: &Plan,
) -> Result<Settled<'g>, ApiError> {
    let mut state = start(x, inbound, plan);
    while let Some((choice, upstream)) = choose(x, plan, &mut state) {
        if !admit(x, plan, upstream).await? {
            // It reached its limit since the candidates were listed.
            state.tried.exclude_limited(choice.upstream);
            continue;
        }
        x.tries += 1;
        state.tried.sent(choice);
        let started = Instant::now();
        let headers = state.headers_for_try();
        let mut outgoing = send::outgoing(x, inbound, headers, upstream, choice).await?;
        let sent = Sent {
            pooled: !matches!(x.caller, Caller::Passthrough(_)),
            with_key: choice.key.is_some(),
            // A 401 may be the token's expiry, once: not after a refresh.
            fresh_token_possible: !state.token_refreshed && outgoing.token_generation.is_some(),
        };
        let in_flight = InFlight::new(upstream, outgoing.stream.take());
        let outcome = send::send(x.gateway, upstream, choice, outgoing, sent).await;
        note_attempt(
            x,
            upstream,
            choice,
            started,
            &outcome,
            inbound.model.as_deref(),
        );
        match outcome {
            Outcome::Answer(response) => {
                return Ok(answered(x, plan, response, upstream, choice, in_flight));
            }
            Outcome::RefreshToken => {
                state.token_refreshed = true;
                state.ahead = Some(choice);
                let next = if state.replayable {
                    "refreshing the token and trying again"
                } else {
                    "the body was streamed and cannot be resent: the client gets a 502"
                };
                tracing::info!(upstream = %upstream.config.name, request_id = request_id(x), "upstream refused its token (401); {next}");
                if !state.replayable {
                    return Err(ApiError::bad_gateway(
                        "the upstream refused its token and the request body cannot be resent",
                    ));
                }
            }
            Outcome::Final(failure) => {
                log_failure(x, upstream, choice, &failure, "the client gets this answer");
                return Ok(Settled::Failed {
                    failure,
                    upstream,
                    choice,
                    retryable: false,
                });
            }
            Outcome::Retryable {
                failure,
                key_refused,
            } => {
                drop(in_flight);
                let Some(retries_used) = retries_left(x, &state) else {
                    let next = if state.replayable {
                        "no retry left (routing.retries): the client gets this failure, unless a fallback model answers"
                    } else {
                        "the body was streamed and cannot be resent: the client gets this failure, unless a fallback model answers"
                    };
                    log_failure(x, upstream, choice, &failure, next);
                    return Ok(Settled::Failed {
                        failure,
                        upstream,
                        choice,
                        retryable: true,
                    });
                };
                let wait = backoff(x, retries_used);
                let next = format!(
                    "trying again in {} ({} another key, else another upstream, else this one again)",
                    humantime::format_duration(wait),
                    if key_refused { "with" } else { "on" },
                );
                log_failure(x, upstream, choice, &failure, &next);
                state.last_failure = Some(Settled::Failed {
                    failure,
                    upstream,
                    choice,
                    retryable: true,
                });
                tokio::time::sleep(wait).await;
                if key_refused {
                    state
                        .tried
                        .exclude_key(choice.upstream, choice.key.unwrap_or_default());
                } else {
                    state.tried.exclude_upstream(choice.upstream);
                }
            }
        }
    }
    // Nothing left to try: report the last failure as it happened.
    if state.last_failure.is_some() {
        tracing::warn!(
            request_id = request_id(x),
            tries = x.attempts.len(),
            "no upstream or key is left to try: the client gets the last failure"
        );
    }
    state.last_failure.ok_or_else(no_upstream_available)
}

/// The request's id in the log, for lines about its tries (`-` when no record is kept).
fn request_id<'a>(x: &'a Exchange<'_>) -> &'a str {
    x.record.as_ref().map_or("-", |r| r.id.as_str())
}

/// Logs a failed try once, with its cause (the upstream's status, or why no answer came:
/// connect error, timeout) and what happens next.
fn log_failure(
    x: &Exchange<'_>,
    upstream: &UpstreamRuntime,
    choice: Choice,
    failure: &Failure,
    next: &str,
) {
    let key = choice.key.and_then(|k| upstream.masked_key(k));
    let key = key.as_deref().unwrap_or("-");
    let name = &upstream.config.name;
    let id = request_id(x);
    let tries = x.attempts.len();
    match failure {
        Failure::Response(response) => {
            let status = response.status().as_u16();
            tracing::warn!(upstream = %name, key, status, request_id = id, tries, "upstream answered {status}; {next}");
        }
        // The client's own failure (a body too large or too slow) is not the upstream's:
        // its access line says it.
        Failure::Error(error) if error.fault == crate::http::error::Fault::Client => {
            tracing::debug!(upstream = %name, request_id = id, tries, "{}; {next}", error.message);
        }
        Failure::Error(error) => {
            tracing::warn!(upstream = %name, key, request_id = id, tries, "{}; {next}", error.message);
        }
    }
}

/// Sets up the loop: the request's headers for upstreams, and whether a try can be
/// repeated at all.
fn start<'g>(x: &mut Exchange<'g>, inbound: &Inbound, plan: &Plan) -> Tries<'g> {
    let gateway = x.gateway;
    let mut headers = upstream_request_headers(std::mem::take(&mut x.parts.headers));
    if inbound.buffered.is_some() {
        // The body may be rewritten; the client sets its length for the bytes it sends.
        headers.remove(header::CONTENT_LENGTH);
    }
    let replayable = inbound.streamed.is_none();
    let might_retry = replayable
        && (gateway.config.routing.retries > 0
            || plan
                .candidates
                .iter()
                .any(|&i| gateway.upstreams[i].token.is_some()));
    Tries {
        tried: Tried::default(),
        ahead: plan.first_choice,
        last_failure: None,
        token_refreshed: false,
        replayable,
        might_retry,
        headers: Some(headers),
        before: x.attempts.len(),
    }
}

/// Decides the next try's upstream and key: the one decided ahead, else the router's
/// choice among what was not tried, else (after a failure) the one back soonest. A
/// passthrough caller's own key goes out, never one of the pool: none is named.
fn choose<'g>(
    x: &Exchange<'g>,
    plan: &Plan,
    state: &mut Tries<'g>,
) -> Option<(Choice, &'g Arc<UpstreamRuntime>)> {
    let gateway = x.gateway;
    let now = crate::clock::now_ms();
    let choice = match state.ahead.take() {
        Some(choice) => choice,
        None => gateway
            .router
            .choose(
                &gateway.upstreams,
                &plan.candidates,
                &state.tried,
                plan.session.as_deref(),
                now,
            )
            .or_else(|| {
                // A retry with nothing untried left goes back to what was tried.
                state.last_failure.as_ref().and_then(|_| {
                    gateway.router.choose_again(
                        &gateway.upstreams,
                        &plan.candidates,
                        &state.tried,
                        now,
                    )
                })
            })?,
    };
    let upstream = gateway.upstreams.get(choice.upstream)?;
    let choice = match x.caller {
        Caller::Passthrough(_) => Choice {
            key: None,
            ..choice
        },
        _ => choice,
    };
    Some((choice, upstream))
}

/// Decides whether this try may go out under the limits: the caller's key is admitted with
/// the first upstream it tries (refused: 429, ending the request), each upstream with every
/// try (`false`: at its limit, try another), in one round trip.
async fn admit(
    x: &mut Exchange<'_>,
    plan: &Plan,
    upstream: &UpstreamRuntime,
) -> Result<bool, ApiError> {
    let key_to_admit = match x.caller {
        Caller::Gateway(key) if x.ticket.is_none() => Some((key.as_ref(), plan.reserve)),
        _ => None,
    };
    let (admitted, upstream_ok) = x
        .gateway
        .admit(key_to_admit, Some(&upstream.config))
        .await?;
    if let Some(admitted) = admitted {
        x.ticket = Some(admitted);
        if let (Caller::Gateway(key), Some(record)) = (x.caller, x.record.as_mut()) {
            record.admitted(key, Some(admitted));
        }
    }
    Ok(upstream_ok)
}

/// Writes down one try for the log: where it went, how it ended, when and how long.
fn note_attempt(
    x: &mut Exchange<'_>,
    upstream: &UpstreamRuntime,
    choice: Choice,
    started: Instant,
    outcome: &Outcome,
    model: Option<&str>,
) {
    let offset = x.record.as_ref().map_or(Duration::ZERO, |r| {
        started.into_std().saturating_duration_since(r.started)
    });
    let mut attempt = Attempt {
        upstream: upstream.config.name.clone(),
        model: model.map(str::to_string),
        key: choice.key.and_then(|k| upstream.masked_key(k)),
        status: None,
        error: None,
        offset,
        elapsed: started.elapsed(),
    };
    match outcome {
        Outcome::Answer(response) => attempt.status = Some(response.status().as_u16()),
        Outcome::RefreshToken => attempt.status = Some(401),
        Outcome::Retryable { failure, .. } | Outcome::Final(failure) => match failure {
            Failure::Response(response) => attempt.status = Some(response.status().as_u16()),
            Failure::Error(error) => attempt.error = Some(error.message.clone()),
        },
    }
    x.attempts.push(attempt);
}

/// An answer taken: objects it creates are learned as it streams, and its session pinned.
fn answered<'g>(
    x: &Exchange<'g>,
    plan: &Plan,
    response: reqwest::Response,
    upstream: &'g Arc<UpstreamRuntime>,
    choice: Choice,
    in_flight: InFlight,
) -> Settled<'g> {
    let gateway = x.gateway;
    let response = gateway.learn_objects(&x.parts.method, x.path, response, choice, x.caller);
    if let Some(session) = &plan.session {
        gateway.remember_session(session, choice);
    }
    Settled::Answered {
        response,
        upstream,
        choice,
        in_flight,
    }
}

/// Decides whether a retryable failure gets another try: the body can be resent and
/// `routing.retries` is not spent (a token refresh is not a retry). Returns the retries
/// used so far.
fn retries_left(x: &Exchange<'_>, state: &Tries<'_>) -> Option<usize> {
    let retries_used = x
        .attempts
        .len()
        .saturating_sub(state.before + 1 + usize::from(state.token_refreshed));
    let allowed = x.gateway.config.routing.retries as usize;
    (state.replayable && retries_used < allowed).then_some(retries_used)
}

/// The wait before the next try: `routing.backoff`, doubled with each retry, at most
/// [`MAX_BACKOFF`].
fn backoff(x: &Exchange<'_>, retries_used: usize) -> Duration {
    let exponent = u32::try_from(retries_used).unwrap_or(16).min(16);
    let backoff = x.gateway.config.routing.backoff;
    backoff.saturating_mul(1 << exponent).min(MAX_BACKOFF)
}

/// No upstream could be tried at all.
fn no_upstream_available() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_error",
        "no_upstream_available",
        "no upstream is available for this request",
    )
}
