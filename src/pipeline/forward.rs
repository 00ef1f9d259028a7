//! Forwarding one request to an upstream and relaying its answer.
//!
//! The body is read only when something must look inside it (the model decides the route,
//! a rewrite applies, a retry may resend it); otherwise it streams through. Then up to
//! `1 + retries` tries go out, each to the upstream and key the router picks, until one
//! answers with something other than a retryable failure. Responses always stream: each
//! chunk is handed to the client as soon as the upstream sends it, so once the head is
//! relayed nothing is retried.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use crate::accounting::recorder::LogSink;
use crate::accounting::records::{Attempt, KeyTicket, Pending};
use crate::gateway::Gateway;
use crate::http::body::{Body, BodyTimeout, BoxError, TimedBody};
use crate::http::error::ApiError;
use crate::http::headers::{strip_hop_by_hop, upstream_request_headers};
use crate::http::multipart;
use crate::pipeline::access::Caller;
use crate::pure::limits::{Reserve, unix_now};
use crate::pure::rewrite;
use crate::pure::routing::{Choice, Tried};
use crate::pure::shape::{ModelRename, Shaper};
use crate::upstream::{InFlight, UpstreamRuntime};

/// The response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-sluice-upstream";
/// The response header counting the tries a request took.
pub const TRIES_HEADER: &str = "x-sluice-tries";
/// The request header that pins a conversation to one upstream and key.
pub const SESSION_HEADER: &str = "x-session-id";

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Only the fields routing needs; everything else is skipped (but still checked as JSON).
/// Public for the fuzz targets (`fuzz/`), which check the usage request against it.
#[derive(Deserialize)]
pub struct Peek<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub user: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `None` when absent; `Some(None)` when `null`, which the body still holds (so the
    /// usage request must replace it, not add a second key).
    #[serde(default, deserialize_with = "present")]
    pub stream_options: Option<Option<StreamOptionsPeek>>,
}

/// Deserialises a field that is there (even as `null`) as `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
pub struct StreamOptionsPeek {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

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
    let mut record = record;
    let mut tries = 0;
    let mut ticket = None;
    let exchange = Exchange {
        record: &mut record,
        tries: &mut tries,
        ticket: &mut ticket,
    };
    match forward_inner(gateway, &caller, parts, body, path, exchange).await {
        Ok(response) => response,
        Err(error) => {
            // Refused before anything went upstream: the request does not count.
            if let (0, Caller::Gateway(key), Some(ticket)) = (tries, &caller, ticket) {
                gateway.refund(key, ticket);
                if let Some(record) = record.as_mut() {
                    record.ticket = None;
                }
            }
            gateway.record_error(record, &error);
            error.into_response()
        }
    }
}

/// How one try ended.
enum Outcome {
    /// Relay this response to the client.
    Answer(reqwest::Response),
    /// A failure worth another try elsewhere; kept in case no other try is possible.
    Retryable(Failure),
    /// A failure to report as it is.
    Final(Failure),
    /// The token was refused: fetch a new one and try the same choice again.
    RefreshToken,
}

enum Failure {
    Response(reqwest::Response),
    Error(ApiError),
}

/// What [`forward`] learns of a request while it is forwarded: its log record, the tries
/// sent and where its key was counted.
struct Exchange<'a> {
    record: &'a mut Option<Box<Pending>>,
    tries: &'a mut usize,
    ticket: &'a mut Option<KeyTicket>,
}

async fn forward_inner(
    gateway: &Gateway,
    caller: &Caller,
    parts: Parts,
    body: Incoming,
    path: &str,
    exchange: Exchange<'_>,
) -> Result<Response<Body>, ApiError> {
    let Exchange {
        record,
        tries,
        ticket,
    } = exchange;
    let Inbound {
        buffered,
        json: buffered_json,
        mut streamed,
        model,
        user,
        strip_usage,
    } = read_inbound(gateway, caller, &parts, body, path, record).await?;
    authorise_model(
        caller,
        path,
        &parts,
        &model,
        buffered.as_ref(),
        buffered_json,
    )?;
    let reserve = match caller {
        Caller::Gateway(key) => gateway.estimate(
            key,
            model.as_deref(),
            buffered.as_ref().map_or(0, Bytes::len),
        ),
        _ => Reserve::default(),
    };
    let now = unix_now();
    let mut candidates = gateway.candidates(model.as_deref())?;
    // A request naming an object (a file, a previous response…) goes where it lives.
    let object_choice = gateway
        .object_choice(path, buffered.as_deref(), model.as_deref(), &mut candidates)
        .await;
    // Upstreams at their own limits are skipped while others can serve.
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
    if candidates.is_empty() {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "upstream_rate_limited",
            "every upstream that serves this request is at its rate limit",
        );
        error.retry_after = soonest_wait;
        return Err(error);
    }
    let session = parts
        .headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        // A session is a routing key held for its TTL: an end-user id, not a payload.
        .or(user.filter(|u| u.len() <= MAX_MODEL_NAME))
        .filter(|_| gateway.router.sessions_enabled());

    let mut base_headers = upstream_request_headers(parts.headers);
    if buffered.is_some() {
        // The body may be rewritten; the client sets its length for the bytes it sends.
        base_headers.remove(header::CONTENT_LENGTH);
    }
    let routing = &gateway.config.routing;
    let replayable = streamed.is_none();
    // Headers are copied per try only when a second try is possible (a lone upstream and
    // key is tried again too, after its back-off).
    let might_retry = replayable
        && (routing.retries > 0
            || candidates
                .iter()
                .any(|&i| gateway.upstreams[i].token.is_some()));
    let mut base_headers = Some(base_headers);
    let mut tried = Tried::default();
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut last_failure: Option<(Failure, Choice)> = None;
    let mut token_refreshed = false;
    // The next try's choice when it is decided ahead: an object's home, a token refresh.
    let mut retry_choice: Option<Choice> = object_choice;

    loop {
        let choice = match retry_choice.take() {
            Some(choice) => choice,
            None => match gateway
                .router
                .choose(
                    &gateway.upstreams,
                    &candidates,
                    &tried,
                    session.as_deref(),
                    crate::clock::now_ms(),
                )
                .or_else(|| {
                    // A retry with nothing untried left goes back to what was tried.
                    last_failure.as_ref().and_then(|_| {
                        let now = crate::clock::now_ms();
                        gateway
                            .router
                            .choose_again(&gateway.upstreams, &candidates, &tried, now)
                    })
                }) {
                Some(choice) => choice,
                None => break,
            },
        };
        let Some(upstream) = gateway.upstreams.get(choice.upstream) else {
            break;
        };
        // A passthrough caller's own key goes out, never one of the pool: none is named.
        let choice = match caller {
            Caller::Passthrough(_) => Choice {
                key: None,
                ..choice
            },
            _ => choice,
        };
        // The key is admitted with the first upstream it tries, in one round trip.
        let key_to_admit = match caller {
            Caller::Gateway(key) if ticket.is_none() => Some((key.as_ref(), reserve)),
            _ => None,
        };
        let (admitted, upstream_ok) = gateway.admit(key_to_admit, Some(&upstream.config)).await?;
        if let Some(admitted) = admitted {
            *ticket = Some(admitted);
            if let (Caller::Gateway(key), Some(record)) = (caller, record.as_mut()) {
                record.admitted(key, Some(admitted));
            }
        }
        if !upstream_ok {
            // It reached its limit since the candidates were listed.
            tried.exclude_limited(choice.upstream);
            continue;
        }
        *tries += 1;
        tried.sent(choice);
        let started = Instant::now();

        let mut headers = if might_retry {
            base_headers.clone().unwrap_or_default()
        } else {
            base_headers.take().unwrap_or_default()
        };
        let mut token_generation = None;
        match caller {
            Caller::Passthrough(value) => {
                headers.insert(header::AUTHORIZATION, value.clone());
            }
            Caller::Gateway(_) | Caller::Open => {
                if let Some(cache) = &upstream.token {
                    let token = cache.get().await?;
                    token_generation = Some(token.generation);
                    headers.insert(header::AUTHORIZATION, token.header);
                } else if let Some(value) = choice.key.and_then(|k| upstream.auth_header(k)) {
                    headers.insert(header::AUTHORIZATION, value.clone());
                } else if matches!(caller, Caller::Open) && gateway.config.access.passthrough {
                    // Passthrough makes client keys the credential; with none sent and none
                    // of the upstream's own to use, there is nothing to authenticate with.
                    return Err(ApiError::unauthorized(
                        "missing_api_key",
                        "You didn't provide an API key. Send it in an Authorization header: Bearer YOUR_KEY.",
                    ));
                }
            }
        }
        for (name, value) in &upstream.config.headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(trace) = record.as_ref().and_then(|r| r.trace.as_ref()) {
            headers.insert(TRACEPARENT, trace.traceparent());
        }

        let url = upstream.url(
            &upstream_path(&parts.method, path, &upstream.config),
            parts.uri.query(),
        );
        let mut request = upstream
            .client
            .request(parts.method.clone(), url)
            .headers(headers);
        if let Some(bytes) = buffered.as_ref().filter(|_| !buffered_json) {
            request = request.body(bytes.clone());
        } else if let Some(bytes) = &buffered {
            let rewritten = rewrite::request_body(bytes, model.as_deref(), &upstream.config)
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_json",
                        format!("the request body is not valid JSON: {e}"),
                    )
                })?;
            request = request.body(rewritten.unwrap_or_else(|| bytes.clone()));
        } else if let Some(body) = streamed.take() {
            request = request.body(body);
        }

        let in_flight = InFlight::new(upstream);
        let outcome = send(
            gateway,
            upstream,
            caller,
            choice,
            request,
            token_generation,
            token_refreshed,
        )
        .await;
        let elapsed = started.elapsed();
        let offset = record.as_ref().map_or(Duration::ZERO, |r| {
            started.into_std().saturating_duration_since(r.started)
        });
        let mut attempt = Attempt {
            upstream: upstream.config.name.clone(),
            key: choice.key.and_then(|k| upstream.masked_key(k)),
            status: None,
            error: None,
            offset,
            elapsed,
        };
        let failure = match outcome {
            Outcome::Answer(response) => {
                let response = gateway.learn_objects(&parts.method, path, response, choice, caller);
                attempt.status = Some(response.status().as_u16());
                attempts.push(attempt);
                if let Some(session) = &session {
                    gateway.remember_session(session, choice);
                }
                let log = take_record(
                    record,
                    attempts,
                    choice,
                    upstream,
                    model.as_deref(),
                    gateway,
                );
                let shaping = Shaping {
                    client_model: model.as_deref(),
                    strip_usage,
                };
                return Ok(relay(response, upstream, shaping, Some(in_flight), log));
            }
            Outcome::RefreshToken => {
                attempt.status = Some(401);
                attempts.push(attempt);
                token_refreshed = true;
                retry_choice = Some(choice);
                if !replayable {
                    return Err(ApiError::bad_gateway(
                        "the upstream refused its token and the request body cannot be resent",
                    ));
                }
                continue;
            }
            Outcome::Retryable(failure) => {
                note_failure(&mut attempt, &failure);
                attempts.push(attempt);
                failure
            }
            Outcome::Final(failure) => {
                note_failure(&mut attempt, &failure);
                attempts.push(attempt);
                let log = take_record(
                    record,
                    attempts,
                    choice,
                    upstream,
                    model.as_deref(),
                    gateway,
                );
                return Ok(answer_failure(
                    failure,
                    upstream,
                    model.as_deref(),
                    log,
                    gateway,
                ));
            }
        };
        drop(in_flight);
        let retries_used = attempts
            .len()
            .saturating_sub(1 + usize::from(token_refreshed));
        if !replayable || retries_used >= routing.retries as usize {
            let log = take_record(
                record,
                attempts,
                choice,
                upstream,
                model.as_deref(),
                gateway,
            );
            return Ok(answer_failure(
                failure,
                upstream,
                model.as_deref(),
                log,
                gateway,
            ));
        }
        tracing::debug!(upstream = %upstream.config.name, tries = attempts.len(), "trying another upstream or key");
        last_failure = Some((failure, choice));
        let exponent = u32::try_from(retries_used).unwrap_or(16).min(16);
        tokio::time::sleep(
            routing
                .backoff
                .saturating_mul(1 << exponent)
                .min(MAX_BACKOFF),
        )
        .await;
        if choice.key.is_some() && is_key_failure(last_failure.as_ref().map(|(f, _)| f)) {
            tried.exclude_key(choice.upstream, choice.key.unwrap_or_default());
        } else {
            tried.exclude_upstream(choice.upstream);
        }
    }
    // Nothing left to try: report the last failure as it happened.
    match last_failure {
        Some((failure, choice)) => match gateway.upstreams.get(choice.upstream) {
            Some(upstream) => {
                let log = take_record(
                    record,
                    attempts,
                    choice,
                    upstream,
                    model.as_deref(),
                    gateway,
                );
                Ok(answer_failure(
                    failure,
                    upstream,
                    model.as_deref(),
                    log,
                    gateway,
                ))
            }
            None => Err(ApiError::bad_gateway("no upstream could serve the request")),
        },
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            "no_upstream_available",
            "no upstream is available for this request",
        )),
    }
}

/// What the read stage learned of a request: its body (held, or to stream), its model and
/// end user, and whether the usage chunk was asked for on the client's behalf.
struct Inbound {
    buffered: Option<Bytes>,
    /// `buffered` is a JSON document (so it may be rewritten for an upstream).
    json: bool,
    streamed: Option<reqwest::Body>,
    model: Option<String>,
    user: Option<String>,
    strip_usage: bool,
}

/// Reads what must be read of a request to route, authorise and price it. Whether the
/// body is read never depends on what the client declares: any body a feature needs is
/// read and recognised by its content (JSON, or a form with a boundary); everything else
/// streams through under the body timeouts.
async fn read_inbound(
    gateway: &Gateway,
    caller: &Caller,
    parts: &Parts,
    body: Incoming,
    path: &str,
    record: &mut Option<Box<Pending>>,
) -> Result<Inbound, ApiError> {
    let server = &gateway.config.server;
    let limit = server.max_body;
    let declared_length = content_length(&parts.headers);
    if declared_length.is_some_and(|len| len > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let body = TimedBody::new(body, server.body_idle_timeout, server.body_timeout);
    let has_body = declared_length.is_some_and(|len| len > 0)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let form = content_type.and_then(multipart::boundary);
    let must_read = has_body
        && match form {
            Some(_) => caller.needs_known_model() || gateway.routes_by_model(),
            None => gateway.must_read_json(caller),
        };
    if !must_read {
        let streamed = has_body.then(|| {
            reqwest::Body::wrap(Limited::new(
                body,
                usize::try_from(limit).unwrap_or(usize::MAX),
            ))
        });
        let model = model_in_path(&parts.method, path).map(str::to_string);
        if let Some(model) = &model {
            check_model_name(model)?;
        }
        if let Some(record) = record.as_mut() {
            record.model = model.clone();
        }
        return Ok(Inbound {
            buffered: None,
            json: false,
            streamed,
            model,
            user: None,
            strip_usage: false,
        });
    }
    let mut bytes = read_body(body, limit).await?;
    if let Some(boundary) = form {
        // A form's model is read where it decides something; a form that cannot be read
        // then has no model sluice can vouch for.
        let model = boundary
            .and_then(|b| multipart::field(&bytes, b, "model"))
            .map_err(|e| {
                ApiError::bad_request("invalid_form", format!("cannot read the form: {e}"))
            })?;
        if let Some(model) = &model {
            check_model_name(model)?;
        }
        if let Some(record) = record.as_mut() {
            record.model = model.clone();
        }
        return Ok(Inbound {
            buffered: Some(bytes),
            json: false,
            streamed: None,
            model,
            user: None,
            strip_usage: false,
        });
    }
    let peek = if bytes.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Peek>(&bytes) {
            Ok(peek) => Some(peek),
            // Declared JSON that is not: the client's mistake, said plainly.
            Err(e) if content_type.is_some_and(is_json_type) => {
                return Err(ApiError::bad_request(
                    "invalid_json",
                    format!("the request body is not valid JSON: {e}"),
                ));
            }
            // Something else (text, binary): relayed as it is, with no model.
            Err(_) => None,
        }
    };
    let json = peek.is_some();
    let (model, user) = match &peek {
        Some(peek) => (
            peek.model.as_deref().map(str::to_string),
            peek.user.as_deref().map(str::to_string),
        ),
        None => (None, None),
    };
    if let Some(model) = &model {
        check_model_name(model)?;
    }
    if let Some(record) = record.as_mut() {
        record.model = model.clone();
        record.request_body = Some(Bytes::copy_from_slice(
            &bytes[..bytes.len().min(record_limit(gateway))],
        ));
    }
    // To count a stream's tokens, ask for its usage chunk and hide it from a client
    // that did not ask for it.
    let mut strip_usage = false;
    if let Some(peek) = &peek {
        let wants_usage = peek
            .stream_options
            .as_ref()
            .and_then(|o| o.as_ref())
            .and_then(|o| o.include_usage)
            == Some(true);
        if record.is_some()
            && peek.stream == Some(true)
            && !wants_usage
            && matches!(path, "/v1/chat/completions" | "/v1/completions")
        {
            if let Some(with_usage) =
                rewrite::with_usage_requested(&bytes, peek.stream_options.is_some())
            {
                bytes = with_usage;
                strip_usage = true;
            }
        }
    }
    Ok(Inbound {
        buffered: Some(bytes),
        json,
        streamed: None,
        model,
        user,
        strip_usage,
    })
}

/// The longest model name sluice accepts: real ones (fine-tunes included) are far shorter,
/// and every name becomes a log field, a search term and a routing key.
pub const MAX_MODEL_NAME: usize = 256;

/// Refuses model names no provider uses: over [`MAX_MODEL_NAME`] bytes, or with control
/// characters (NUL breaks stores, line breaks forge log lines).
fn check_model_name(model: &str) -> Result<(), ApiError> {
    if model.len() > MAX_MODEL_NAME {
        return Err(ApiError::bad_request(
            "invalid_model",
            format!("the model name is longer than {MAX_MODEL_NAME} bytes"),
        ));
    }
    if model.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_model",
            "the model name contains control characters",
        ));
    }
    Ok(())
}

/// Decides whether the caller may make this request with this model. For a key limited
/// to some models or paying from a budget, a request whose model cannot be told (a body
/// that is neither JSON nor a form, or no model where the endpoint uses one) is refused:
/// sluice never guesses in the caller's favour.
fn authorise_model(
    caller: &Caller,
    path: &str,
    parts: &Parts,
    model: &Option<String>,
    buffered: Option<&Bytes>,
    json: bool,
) -> Result<(), ApiError> {
    let forbidden = |model: &str| {
        ApiError::forbidden(
            "model_not_allowed",
            format!("this API key may not use the model `{model}`"),
        )
    };
    if let Some(model) = model {
        if !caller.may_use(model) {
            return Err(forbidden(model));
        }
    }
    if !caller.needs_known_model() {
        return Ok(());
    }
    // A model in the query string (`/v1/realtime?model=…`) is checked too.
    if let Some(query) = parts.uri.query() {
        for (name, value) in form_urlencoded_pairs(query) {
            if name == "model" && !caller.may_use(&value) {
                return Err(forbidden(&value));
            }
        }
    }
    let body = buffered.filter(|b| !b.is_empty());
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(multipart::boundary)
        .is_some();
    match (model, body) {
        (Some(_), _) | (None, None) => Ok(()),
        (None, Some(_)) if !json && !is_form => Err(ApiError::bad_request(
            "model_unknown",
            "this API key is limited to some models or a budget, and the model of this request \
             cannot be read: send a JSON body (or a form) with a `model` field",
        )),
        (None, Some(_)) if model_less(path) => Ok(()),
        (None, Some(_)) => Err(ApiError::bad_request(
            "model_required",
            "this API key is limited to some models or a budget: name the `model` in the request",
        )),
    }
}

/// Query pairs, percent-decoded.
fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

/// Endpoints whose requests use no model: objects (files, batches, stores, threads…) and
/// operations on something already made. Any other endpoint with a body and no `model`
/// may fall back to a default model upstream, which a limited key must not reach.
fn model_less(path: &str) -> bool {
    const FAMILIES: [&str; 7] = [
        "/v1/files",
        "/v1/uploads",
        "/v1/batches",
        "/v1/vector_stores",
        "/v1/conversations",
        "/v1/containers",
        "/v1/models",
    ];
    const ON_OBJECTS: [&str; 4] = [
        "/v1/chat/completions/",
        "/v1/responses/",
        "/v1/fine_tuning/jobs/",
        "/v1/assistants/",
    ];
    let in_family = |family: &str| {
        path.strip_prefix(family)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    FAMILIES.iter().any(|f| in_family(f))
        || (in_family("/v1/threads") && !path.contains("/runs"))
        || ON_OBJECTS.iter().any(|p| path.starts_with(p))
}

/// What the log keeps of each body.
fn record_limit(gateway: &Gateway) -> usize {
    gateway.recorder.as_ref().map_or(0, |r| r.sink.body_limit)
}

/// The log record with the exchange's upstream side filled in, and where to send it.
fn take_record(
    record: &mut Option<Box<Pending>>,
    attempts: Vec<Attempt>,
    choice: Choice,
    upstream: &UpstreamRuntime,
    model: Option<&str>,
    gateway: &Gateway,
) -> Log {
    let tries = attempts.len();
    let record = record.take().map(|mut record| {
        record.upstream = Some(upstream.config.name.clone());
        record.upstream_key = choice.key.and_then(|k| upstream.masked_key(k));
        record.upstream_model = model.map(|m| upstream.config.upstream_model(m).to_string());
        record.attempts = attempts;
        record
    });
    Log {
        record,
        sink: gateway.recorder.as_ref().map(|r| r.sink.clone()),
        tries,
    }
}

/// A request's log record on its way to the log, with the number of tries it took.
struct Log {
    record: Option<Box<Pending>>,
    sink: Option<LogSink>,
    tries: usize,
}

/// How a relayed body must be changed on its way to the client.
struct Shaping<'a> {
    client_model: Option<&'a str>,
    strip_usage: bool,
}

fn note_failure(attempt: &mut Attempt, failure: &Failure) {
    match failure {
        Failure::Response(response) => attempt.status = Some(response.status().as_u16()),
        Failure::Error(error) => attempt.error = Some(error.message.clone()),
    }
}

fn is_key_failure(failure: Option<&Failure>) -> bool {
    matches!(failure, Some(Failure::Response(r)) if matches!(r.status().as_u16(), 401 | 403 | 429))
}

/// Sends one try and judges the result: who is at fault, whether it rests, whether
/// another try may help.
async fn send(
    gateway: &Gateway,
    upstream: &UpstreamRuntime,
    caller: &Caller,
    choice: Choice,
    request: reqwest::RequestBuilder,
    token_generation: Option<u64>,
    token_refreshed: bool,
) -> Outcome {
    let routing = &gateway.config.routing;
    let timeouts = upstream.config.timeouts;
    let first_byte = timeouts
        .total
        .map_or(timeouts.first_byte, |total| timeouts.first_byte.min(total));
    let name = &upstream.config.name;
    let started = Instant::now();
    let response = match tokio::time::timeout(first_byte, request.send()).await {
        Err(_) => {
            gateway.rest_upstream(upstream, routing.cooldown);
            let error = ApiError::gateway_timeout(format!(
                "upstream `{name}` sent no response within {}",
                humantime::format_duration(first_byte)
            ));
            return if routing.retry_on.timeout {
                Outcome::Retryable(Failure::Error(error))
            } else {
                Outcome::Final(Failure::Error(error))
            };
        }
        Ok(Err(error)) => {
            let limit = gateway.config.server.max_body;
            let api_error = classify(&error, name, limit);
            // The client's fault (too big, too slow): the upstream is not to blame.
            if matches!(
                api_error.status,
                StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
            ) {
                return Outcome::Final(Failure::Error(api_error));
            }
            gateway.rest_upstream(upstream, routing.cooldown);
            let retry = if error.is_timeout() {
                routing.retry_on.timeout
            } else {
                routing.retry_on.connect
            };
            return if retry {
                Outcome::Retryable(Failure::Error(api_error))
            } else {
                Outcome::Final(Failure::Error(api_error))
            };
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status().as_u16();
    let pooled = !matches!(caller, Caller::Passthrough(_));
    if status == 401 && pooled && !token_refreshed {
        if let (Some(cache), Some(generation)) = (&upstream.token, token_generation) {
            cache.invalidate(generation);
            return Outcome::RefreshToken;
        }
    }
    let retry_listed = routing.retry_on.statuses.contains(&status);
    match status {
        401 | 403 | 429 if pooled && choice.key.is_some() => {
            let rest = retry_after(response.headers())
                .filter(|_| status == 429)
                .unwrap_or(routing.cooldown);
            if let Some(key) = choice.key {
                gateway.rest_key(upstream, key, rest);
                tracing::warn!(upstream = %name, key = %upstream.masked_key(key).unwrap_or_default(), status, "key rests for {}", humantime::format_duration(rest));
            }
            // Another key of the pool may well work where this one was refused.
            if retry_listed || status != 429 {
                Outcome::Retryable(Failure::Response(response))
            } else {
                Outcome::Final(Failure::Response(response))
            }
        }
        429 => {
            if let Some(rest) = retry_after(response.headers()).filter(|_| pooled) {
                gateway.rest_upstream(upstream, rest);
            }
            if retry_listed {
                Outcome::Retryable(Failure::Response(response))
            } else {
                Outcome::Final(Failure::Response(response))
            }
        }
        500..=599 => {
            let rest = retry_after(response.headers()).unwrap_or(routing.cooldown);
            gateway.rest_upstream(upstream, rest);
            if retry_listed {
                Outcome::Retryable(Failure::Response(response))
            } else {
                Outcome::Final(Failure::Response(response))
            }
        }
        _ => {
            upstream.record_success(started.elapsed());
            Outcome::Answer(response)
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))
}

fn answer_failure(
    failure: Failure,
    upstream: &Arc<UpstreamRuntime>,
    model: Option<&str>,
    log: Log,
    gateway: &Gateway,
) -> Response<Body> {
    match failure {
        Failure::Response(response) => {
            let shaping = Shaping {
                client_model: model,
                strip_usage: false,
            };
            relay(response, upstream, shaping, None, log)
        }
        Failure::Error(error) => {
            let tries = log.tries;
            gateway.record_error(log.record, &error);
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(UPSTREAM_HEADER, upstream.name_header.clone());
            response
                .headers_mut()
                .insert(TRIES_HEADER, HeaderValue::from(tries));
            response
        }
    }
}

/// Turns an upstream response into the client's: head relayed, body streamed.
fn relay(
    response: reqwest::Response,
    upstream: &Arc<UpstreamRuntime>,
    shaping: Shaping<'_>,
    in_flight: Option<InFlight>,
    log: Log,
) -> Response<Body> {
    let timeouts = upstream.config.timeouts;
    let deadline = timeouts.total.map(|total| Instant::now() + total);
    let (parts, upstream_body) = http::Response::<reqwest::Body>::from(response).into_parts();
    let status = parts.status;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let sse = is_event_stream(&headers);
    let rename = shaping
        .client_model
        .filter(|m| upstream.config.upstream_model(m) != *m)
        .filter(|_| sse || is_json(&headers))
        .map(|m| ModelRename { to: m.to_string() });
    let strip_usage = shaping.strip_usage && sse;
    if rename.is_some() || strip_usage {
        // The body changes length when it is reshaped.
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut record = log.record;
    if let Some(record) = record.as_mut() {
        record.status = status.as_u16();
        record.first_byte = Some(record.started.elapsed());
        record.stream = sse;
        record.response_content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        record.response_headers = headers.clone();
    }
    headers.insert(UPSTREAM_HEADER, upstream.name_header.clone());
    headers.insert(TRIES_HEADER, HeaderValue::from(log.tries));
    let shaper = (rename.is_some() || strip_usage).then(|| Shaper::new(sse, rename, strip_usage));
    // A body relayed unchanged with a declared length is complete when that many bytes
    // are handed over; hyper may drop it then without asking for its end.
    let remaining = shaper.is_none().then(|| content_length(&headers)).flatten();
    let relay = RelayBody {
        inner: upstream_body,
        remaining,
        idle: timeouts.idle,
        deadline,
        timer: Box::pin(tokio::time::sleep_until(RelayBody::next_wake(
            timeouts.idle,
            deadline,
        ))),
        sse,
        upstream: upstream.config.name.clone(),
        done: false,
        shaper,
        _in_flight: in_flight,
        record,
        sink: log.sink,
    };
    let mut out = Response::new(relay.boxed_unsync());
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_type)
}

fn is_json_type(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// `GET /v1/models/{id}` and `DELETE /v1/models/{id}` name their model in the path.
fn model_in_path<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    if *method != Method::GET && *method != Method::DELETE {
        return None;
    }
    path.strip_prefix("/v1/models/").filter(|id| !id.is_empty())
}

/// The path to send to `upstream`: a model named in the path (`/v1/models/{alias}`) gets
/// the upstream's own name for it.
fn upstream_path<'a>(
    method: &Method,
    path: &'a str,
    upstream: &crate::config::Upstream,
) -> Cow<'a, str> {
    match model_in_path(method, path) {
        Some(model) if upstream.upstream_model(model) != model => {
            Cow::Owned(format!("/v1/models/{}", upstream.upstream_model(model)))
        }
        _ => Cow::Borrowed(path),
    }
}

/// Reads a whole request body, refusing more than `limit` bytes (and, for a
/// [`TimedBody`], one that is too slow).
pub async fn read_body<B>(body: B, limit: u64) -> Result<Bytes, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(error) if error.is::<BodyTimeout>() => Err(ApiError::body_timeout()),
        Err(_) => Err(ApiError::bad_request(
            "body_read_error",
            "the request body could not be read",
        )),
    }
}

/// Maps a failed upstream exchange to the error the client gets. Messages name the upstream
/// and the cause, never a URL's credentials or a key.
fn classify(error: &reqwest::Error, upstream: &str, limit: u64) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut deepest = String::new();
    while let Some(cause) = source {
        if cause.is::<LengthLimitError>() {
            return ApiError::payload_too_large(limit);
        }
        if cause.is::<BodyTimeout>() {
            return ApiError::body_timeout();
        }
        deepest = cause.to_string();
        source = cause.source();
    }
    if error.is_timeout() {
        ApiError::gateway_timeout(format!("upstream `{upstream}` timed out: {deepest}"))
    } else if error.is_connect() {
        ApiError::bad_gateway(format!(
            "cannot connect to upstream `{upstream}`: {deepest}"
        ))
    } else {
        ApiError::bad_gateway(format!("upstream `{upstream}` failed: {deepest}"))
    }
}

/// Relays an upstream body chunk by chunk, ending it if the upstream goes quiet for longer
/// than the idle timeout or passes the total deadline. A broken SSE stream ends with an
/// OpenAI-shaped `data: {"error": …}` event, which the OpenAI SDKs raise as an error; any
/// other body is cut, so the client sees a truncated transfer rather than a short success.
struct RelayBody {
    inner: reqwest::Body,
    idle: Duration,
    deadline: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    sse: bool,
    upstream: String,
    done: bool,
    /// Bytes still to relay of a body with a declared length, when relayed unchanged.
    remaining: Option<u64>,
    shaper: Option<Shaper>,
    /// Keeps the upstream's in-flight count up until the body ends or the client leaves.
    _in_flight: Option<InFlight>,
    /// The log record, submitted when the body ends or is dropped.
    record: Option<Box<Pending>>,
    sink: Option<LogSink>,
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Every declared byte handed over (or nothing left to read) is a complete answer,
        // even if hyper never asked for the end of the body.
        if self.remaining == Some(0) || self.inner.is_end_stream() {
            self.finish(None);
        } else {
            self.finish(Some(
                "the client went away before the end of the response".into(),
            ));
        }
    }
}

impl RelayBody {
    fn next_wake(idle: Duration, deadline: Option<Instant>) -> Instant {
        let wake = Instant::now() + idle;
        deadline.map_or(wake, |d| d.min(wake))
    }

    /// Submits the log record: the exchange is over.
    fn finish(&mut self, error: Option<String>) {
        if let (Some(mut record), Some(sink)) = (self.record.take(), self.sink.as_ref()) {
            record.latency = Some(record.started.elapsed());
            record.error = error;
            sink.submit(*record);
        }
    }

    fn fail(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self._in_flight = None;
        self.finish(Some(error.message.clone()));
        if self.sse {
            let event = format!("data: {}\n\n", error.to_json());
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(Box::new(error))))
        }
    }
}

impl HttpBody for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let wake = Self::next_wake(this.idle, this.deadline);
                    this.timer.as_mut().reset(wake);
                    if let (Some(record), Some(data), Some(sink)) =
                        (this.record.as_mut(), frame.data_ref(), this.sink.as_ref())
                    {
                        record.response_body.push(data, sink.body_limit);
                    }
                    let Some(shaper) = this.shaper.as_mut() else {
                        if let (Some(remaining), Some(data)) =
                            (this.remaining.as_mut(), frame.data_ref())
                        {
                            *remaining = remaining.saturating_sub(data.len() as u64);
                            if *remaining == 0 {
                                this.done = true;
                                this._in_flight = None;
                                this.finish(None);
                            }
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    match frame.into_data() {
                        Ok(data) => match shaper.push(data) {
                            Ok(out) if out.is_empty() => {}
                            Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                            Err(too_large) => {
                                let message = format!("upstream `{}`: {too_large}", this.upstream);
                                tracing::warn!(upstream = %this.upstream, "{message}");
                                return this.fail(ApiError::bad_gateway(message));
                            }
                        },
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    let message = format!(
                        "upstream `{}` broke off the response: {error}",
                        this.upstream
                    );
                    tracing::warn!(upstream = %this.upstream, "{message}");
                    return this.fail(ApiError::bad_gateway(message));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this._in_flight = None;
                    this.finish(None);
                    let rest = this.shaper.as_mut().map(Shaper::finish).unwrap_or_default();
                    return if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    };
                }
                Poll::Pending => {
                    return match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            let message = if this.deadline.is_some_and(|d| Instant::now() >= d) {
                                format!("upstream `{}` exceeded the total timeout", this.upstream)
                            } else {
                                format!(
                                    "upstream `{}` sent nothing for {}",
                                    this.upstream,
                                    humantime::format_duration(this.idle)
                                )
                            };
                            tracing::warn!(upstream = %this.upstream, "{message}");
                            this.fail(ApiError::gateway_timeout(message))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.shaper.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse || self.shaper.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_read_from_model_paths_only() {
        assert_eq!(
            model_in_path(&Method::GET, "/v1/models/gpt-4o"),
            Some("gpt-4o")
        );
        assert_eq!(
            model_in_path(&Method::DELETE, "/v1/models/ft:x"),
            Some("ft:x")
        );
        assert_eq!(model_in_path(&Method::GET, "/v1/models/"), None);
        assert_eq!(model_in_path(&Method::POST, "/v1/models/x"), None);
        assert_eq!(model_in_path(&Method::GET, "/v1/files/x"), None);
    }

    #[test]
    fn a_null_stream_options_is_there() {
        let peek: Peek = serde_json::from_str(r#"{"stream_options": null}"#).unwrap();
        assert!(matches!(peek.stream_options, Some(None)));
        let peek: Peek = serde_json::from_str(r#"{}"#).unwrap();
        assert!(peek.stream_options.is_none());
        let peek: Peek =
            serde_json::from_str(r#"{"stream_options": {"include_usage": true}}"#).unwrap();
        assert!(matches!(
            peek.stream_options,
            Some(Some(StreamOptionsPeek {
                include_usage: Some(true)
            }))
        ));
    }

    #[test]
    fn content_types() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(is_json(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        assert!(is_event_stream(&headers));
        assert!(!is_json(&headers));
    }

    #[test]
    fn retry_after_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
