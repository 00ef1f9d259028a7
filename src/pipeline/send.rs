//! The send stage: one try at one upstream. The request is built for it (credential,
//! configured headers, trace context, path and body in the upstream's terms), sent under
//! the first-byte timeout, and its outcome judged: answer it, try elsewhere, report it as
//! it is, or refresh the token. The judgement ([`judge`]) is a function over plain facts;
//! [`send`] carries out what it decides (resting a key or the upstream).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::LengthLimitError;
use tokio::time::Instant;

use crate::config::Routing;
use crate::gateway::Gateway;
use crate::http::body::BodyTimeout;
use crate::http::error::{ApiError, Fault};
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::read::{BodyKind, Inbound, invalid_json};
use crate::protocol::translate;
use crate::protocol::{UpstreamKind, anthropic};
use crate::pure::routing::Choice;
use crate::upstream::UpstreamRuntime;
use crate::upstream::http2::StreamSlot;

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const ANTHROPIC_VERSION: http::HeaderName = http::HeaderName::from_static("anthropic-version");

/// How one try ended.
pub enum Outcome {
    /// Relay this response to the client.
    Answer(reqwest::Response),
    /// A failure worth another try elsewhere; kept in case no other try is possible.
    Retryable {
        failure: Failure,
        /// The key was refused (so another key of the upstream may do), rather than the
        /// upstream failing.
        key_refused: bool,
    },
    /// A failure to report as it is.
    Final(Failure),
    /// The token was refused: fetch a new one and try the same choice again.
    RefreshToken,
}

/// A try that failed: the upstream's own answer, or an error of the exchange.
pub enum Failure {
    Response(reqwest::Response),
    Error(ApiError),
}

/// One try's request, ready to send.
pub struct Outgoing {
    pub request: reqwest::RequestBuilder,
    /// The generation of the token it carries, to invalidate it if refused.
    pub token_generation: Option<u64>,
    /// Its HTTP/2 stream, to keep as long as the exchange (see [`UpstreamRuntime::lease`]).
    pub stream: Option<StreamSlot>,
}

/// Builds the request for one try at `upstream`: the credential, the upstream's own
/// headers, the trace context, and the path and body in its terms.
pub async fn outgoing(
    x: &Exchange<'_>,
    inbound: &mut Inbound,
    mut headers: HeaderMap,
    upstream: &UpstreamRuntime,
    choice: Choice,
) -> Result<Outgoing, ApiError> {
    let token_generation = set_credential(x, upstream, choice, &mut headers).await?;
    let kind = UpstreamKind::of(&upstream.config);
    if kind == UpstreamKind::Anthropic && !headers.contains_key(ANTHROPIC_VERSION) {
        headers.insert(
            ANTHROPIC_VERSION,
            HeaderValue::from_static(anthropic::DEFAULT_VERSION),
        );
    }
    for (name, value) in &upstream.config.headers {
        headers.insert(name.clone(), value.clone());
    }
    if x.websocket {
        // Hop-by-hop, so taken off the client's headers; a handshake needs them again.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if let Some(trace) = x.record.as_ref().and_then(|r| r.trace.as_ref()) {
        headers.insert(TRACEPARENT, trace.traceparent());
    }
    let route = kind.route(x.protocol, x.path)?;
    let translated = match (route, &inbound.buffered) {
        (Some(route), Some(bytes)) if inbound.kind == BodyKind::Json => {
            let model = inbound
                .model
                .as_deref()
                .map_or("", |m| upstream.config.upstream_model(m));
            if route.upstream == translate::Wire::Gemini && !translate::gemini::valid_model(model) {
                return Err(ApiError::bad_request(
                    "invalid_model",
                    "a Gemini model name has only letters, digits, `-`, `_` and `.`",
                ));
            }
            let (body, stream) = translate::request(route.client, route.upstream, bytes, model)
                .map_err(|e| ApiError::bad_request("untranslatable_field", e.to_string()))?;
            // The answer is read to be translated: it must come plain.
            headers.remove(header::ACCEPT_ENCODING);
            Some((body, model.to_string(), stream))
        }
        (Some(_), _) => {
            return Err(ApiError::bad_request(
                "invalid_json",
                "this request is translated for its upstream and needs a JSON body",
            ));
        }
        (None, _) => None,
    };
    let (path, query) = kind.target(
        &x.parts.method,
        x.path,
        x.parts.uri.query(),
        inbound.model.as_deref(),
        &upstream.config,
        translated.as_ref().map(|(_, m, s)| (m.as_str(), *s)),
    )?;
    let url = upstream.url(&path, query.as_deref());
    // A handshake needs a connection of its own: HTTP/1.1, whatever the upstream's `http2`.
    let (client, stream) = if x.websocket {
        (upstream.upgrade_client(), None)
    } else {
        upstream.lease()
    };
    let mut request = client.request(x.parts.method.clone(), url).headers(headers);
    if let Some((body, _, _)) = translated {
        let body = Bytes::from(body);
        // Field aliases still apply, to the body the upstream reads.
        let rewritten = if upstream.config.field_aliases.is_empty() {
            None
        } else {
            kind.request_body(&body, None, &upstream.config)
                .map_err(|e| invalid_json(&e))?
        };
        request = request.body(rewritten.unwrap_or(body));
    } else if let Some(bytes) = inbound
        .buffered
        .as_ref()
        .filter(|_| inbound.kind != BodyKind::Json)
    {
        request = request.body(bytes.clone());
    } else if let Some(bytes) = &inbound.buffered {
        let rewritten = kind
            .request_body(bytes, inbound.model.as_deref(), &upstream.config)
            .map_err(|e| invalid_json(&e))?;
        request = request.body(rewritten.unwrap_or_else(|| bytes.clone()));
    } else if let Some(body) = inbound.streamed.take() {
        request = request.body(body);
    }
    Ok(Outgoing {
        request,
        token_generation,
        stream,
    })
}

/// Decides the credential that goes out: a passthrough caller's own, else the upstream's
/// token or the chosen key of its pool. Returns the token's generation, if one went.
async fn set_credential(
    x: &Exchange<'_>,
    upstream: &UpstreamRuntime,
    choice: Choice,
    headers: &mut HeaderMap,
) -> Result<Option<u64>, ApiError> {
    match x.caller {
        Caller::Passthrough(value) => {
            // The caller's own key, in the header the upstream's API reads it from.
            let value = match value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
                Some(key) if upstream.key_header != header::AUTHORIZATION => {
                    let mut bare = HeaderValue::from_str(key).unwrap_or_else(|_| value.clone());
                    bare.set_sensitive(true);
                    bare
                }
                _ => value.clone(),
            };
            headers.insert(upstream.key_header.clone(), value);
        }
        Caller::Gateway(_) | Caller::Open => {
            if let Some(cache) = &upstream.token {
                let token = cache.get().await?;
                headers.insert(header::AUTHORIZATION, token.header);
                return Ok(Some(token.generation));
            } else if let Some(value) = choice.key.and_then(|k| upstream.auth_header(k)) {
                headers.insert(upstream.key_header.clone(), value.clone());
            } else if matches!(x.caller, Caller::Open) && x.gateway.config.access.passthrough {
                // Passthrough makes client keys the credential; with none sent and none
                // of the upstream's own to use, there is nothing to authenticate with.
                return Err(ApiError::unauthorized(
                    "missing_api_key",
                    "You didn't provide an API key. Send it in an Authorization header: Bearer YOUR_KEY.",
                ));
            }
        }
    }
    Ok(None)
}

/// What one try came back with, as plain facts for [`judge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The exchange failed before a response head came.
    Failed {
        fault: Fault,
        retryable: bool,
        timed_out: bool,
    },
    /// The upstream answered with this status.
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
}

/// What the try was sent with that bears on judging it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// A key or token of sluice's went out (not the caller's own).
    pub pooled: bool,
    /// A key of the upstream's pool went out.
    pub with_key: bool,
    /// A token went out that was not just refreshed: a 401 may be its expiry.
    pub fresh_token_possible: bool,
}

/// The judgement of one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub rest: Rest,
    pub next: Next,
}

/// What rests after a try, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    Nothing,
    Upstream(Duration),
    Key(Duration),
}

/// What the try loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Answer,
    Retry,
    Final,
    RefreshToken,
}

/// Judges one try: who is at fault, what rests, whether another try may help. A failure
/// of the client's own (too big, too slow) rests nothing and is final; an upstream's is
/// retried as `retry_on` says; a refused key rests and another key may do.
pub fn judge(reply: Reply, sent: Sent, policy: &Routing) -> Verdict {
    let verdict = |rest, retry: bool| Verdict {
        rest,
        next: if retry { Next::Retry } else { Next::Final },
    };
    let (status, retry_after) = match reply {
        Reply::Failed {
            fault: Fault::Client,
            ..
        } => {
            return verdict(Rest::Nothing, false);
        }
        Reply::Failed {
            retryable,
            timed_out,
            ..
        } => {
            let allowed = if timed_out {
                policy.retry_on.timeout
            } else {
                policy.retry_on.connect
            };
            return verdict(Rest::Upstream(policy.cooldown), retryable && allowed);
        }
        Reply::Status {
            status,
            retry_after,
        } => (status, retry_after),
    };
    if status == 401 && sent.pooled && sent.fresh_token_possible {
        return Verdict {
            rest: Rest::Nothing,
            next: Next::RefreshToken,
        };
    }
    let listed = policy.retry_on.statuses.contains(&status);
    match status {
        401 | 403 | 429 if sent.pooled && sent.with_key => {
            let rest = retry_after
                .filter(|_| status == 429)
                .unwrap_or(policy.cooldown);
            // Another key of the pool may well work where this one was refused.
            verdict(Rest::Key(rest), listed || status != 429)
        }
        429 => {
            let rest = retry_after
                .filter(|_| sent.pooled)
                .map_or(Rest::Nothing, Rest::Upstream);
            verdict(rest, listed)
        }
        500..=599 => verdict(
            Rest::Upstream(retry_after.unwrap_or(policy.cooldown)),
            listed,
        ),
        _ => Verdict {
            rest: Rest::Nothing,
            next: Next::Answer,
        },
    }
}

/// Sends one try under the first-byte timeout and carries out the judgement: rests the
/// key or the upstream, counts a success, invalidates a refused token.
pub async fn send(
    gateway: &Gateway,
    upstream: &UpstreamRuntime,
    choice: Choice,
    outgoing: Outgoing,
    sent: Sent,
) -> Outcome {
    let timeouts = upstream.config.timeouts;
    let first_byte = timeouts
        .total
        .map_or(timeouts.first_byte, |total| timeouts.first_byte.min(total));
    let name = &upstream.config.name;
    let started = Instant::now();
    let (reply, failure) = match tokio::time::timeout(first_byte, outgoing.request.send()).await {
        Err(_) => {
            let error = ApiError::gateway_timeout(format!(
                "upstream `{name}` sent no response within {}",
                humantime::format_duration(first_byte)
            ));
            (failed(&error, true), Failure::Error(error))
        }
        Ok(Err(error)) => {
            let api_error = classify(&error, name, gateway.config.server.max_body);
            (
                failed(&api_error, error.is_timeout()),
                Failure::Error(api_error),
            )
        }
        Ok(Ok(response)) => {
            let reply = Reply::Status {
                status: response.status().as_u16(),
                retry_after: retry_after(response.headers()),
            };
            (reply, Failure::Response(response))
        }
    };
    let verdict = judge(reply, sent, &gateway.config.routing);
    match verdict.rest {
        Rest::Nothing => {}
        Rest::Upstream(rest) => {
            let cause = match (&reply, &failure) {
                (Reply::Status { status, .. }, _) => format!("it answered {status}"),
                (_, Failure::Error(error)) => error.message.clone(),
                _ => "it failed".to_string(),
            };
            gateway.rest_upstream(upstream, rest, &cause);
        }
        Rest::Key(rest) => {
            if let Some(key) = choice.key {
                gateway.rest_key(upstream, key, rest);
                let status = match reply {
                    Reply::Status { status, .. } => status,
                    Reply::Failed { .. } => 0,
                };
                tracing::warn!(upstream = %name, key = %upstream.masked_key(key).unwrap_or_default(), status, "key rests for {}", humantime::format_duration(rest));
            }
        }
    }
    match (verdict.next, failure) {
        (Next::Answer, Failure::Response(response)) => {
            if upstream.record_success(started.elapsed()) {
                if let Some(alerts) = &gateway.alerts {
                    alerts.upstream_recovered(name);
                }
            }
            Outcome::Answer(response)
        }
        (Next::RefreshToken, _) => {
            if let (Some(cache), Some(generation)) = (&upstream.token, outgoing.token_generation) {
                cache.invalidate(generation);
            }
            Outcome::RefreshToken
        }
        (Next::Retry, failure) => Outcome::Retryable {
            failure,
            key_refused: matches!(verdict.rest, Rest::Key(_)),
        },
        (Next::Answer | Next::Final, failure) => Outcome::Final(failure),
    }
}

/// The facts of an exchange that failed before a response head came.
fn failed(error: &ApiError, timed_out: bool) -> Reply {
    Reply::Failed {
        fault: error.fault,
        retryable: error.retryable,
        timed_out,
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

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

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

    fn status(status: u16, retry_after: Option<u64>) -> Reply {
        Reply::Status {
            status,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    const POOL_KEY: Sent = Sent {
        pooled: true,
        with_key: true,
        fresh_token_possible: false,
    };

    fn verdict(rest: Rest, next: Next) -> Verdict {
        Verdict { rest, next }
    }

    #[test]
    fn a_refused_key_rests_and_another_may_do() {
        let policy = Routing::default();
        let cooldown = policy.cooldown;
        assert_eq!(
            judge(status(401, None), POOL_KEY, &policy),
            verdict(Rest::Key(cooldown), Next::Retry)
        );
        assert_eq!(
            judge(status(429, Some(7)), POOL_KEY, &policy),
            verdict(Rest::Key(Duration::from_secs(7)), Next::Retry)
        );
        // A passthrough caller's key is its own: nothing of sluice's rests.
        let own = Sent {
            pooled: false,
            with_key: false,
            fresh_token_possible: false,
        };
        assert_eq!(
            judge(status(429, Some(7)), own, &policy),
            verdict(Rest::Nothing, Next::Retry)
        );
    }

    #[test]
    fn a_429_not_listed_is_final() {
        let mut policy = Routing::default();
        policy.retry_on.statuses.retain(|&s| s != 429);
        let upstream_only = Sent {
            with_key: false,
            ..POOL_KEY
        };
        assert_eq!(
            judge(status(429, Some(3)), POOL_KEY, &policy),
            verdict(Rest::Key(Duration::from_secs(3)), Next::Final)
        );
        assert_eq!(
            judge(status(429, Some(3)), upstream_only, &policy),
            verdict(Rest::Upstream(Duration::from_secs(3)), Next::Final)
        );
    }

    #[test]
    fn server_errors_rest_the_upstream() {
        let policy = Routing::default();
        let listed = policy.retry_on.statuses.contains(&503);
        let next = if listed { Next::Retry } else { Next::Final };
        assert_eq!(
            judge(status(503, Some(2)), POOL_KEY, &policy),
            verdict(Rest::Upstream(Duration::from_secs(2)), next)
        );
        assert_eq!(
            judge(status(200, None), POOL_KEY, &policy),
            verdict(Rest::Nothing, Next::Answer)
        );
        assert_eq!(
            judge(status(404, None), POOL_KEY, &policy),
            verdict(Rest::Nothing, Next::Answer)
        );
    }

    #[test]
    fn a_token_is_refreshed_once() {
        let policy = Routing::default();
        let token = Sent {
            pooled: true,
            with_key: false,
            fresh_token_possible: true,
        };
        assert_eq!(
            judge(status(401, None), token, &policy),
            verdict(Rest::Nothing, Next::RefreshToken)
        );
    }

    #[test]
    fn failures_follow_their_fault() {
        let mut policy = Routing::default();
        let client = failed(&ApiError::payload_too_large(10), false);
        assert_eq!(
            judge(client, POOL_KEY, &policy),
            verdict(Rest::Nothing, Next::Final)
        );
        let timeout = failed(&ApiError::gateway_timeout("slow"), true);
        let unreachable = failed(&ApiError::bad_gateway("down"), false);
        let cooldown = policy.cooldown;
        policy.retry_on.timeout = true;
        policy.retry_on.connect = false;
        assert_eq!(
            judge(timeout, POOL_KEY, &policy),
            verdict(Rest::Upstream(cooldown), Next::Retry)
        );
        assert_eq!(
            judge(unreachable, POOL_KEY, &policy),
            verdict(Rest::Upstream(cooldown), Next::Final)
        );
    }
}
