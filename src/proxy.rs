//! Forwarding one request to an upstream and relaying its answer.
//!
//! The body is read only when something must look inside it (the model decides the route,
//! or the caller's key is limited to some models); otherwise it streams through. Responses
//! always stream: each chunk is handed to the client as soon as the upstream sends it.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Method, Response, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use crate::access::Caller;
use crate::body::{Body, BoxError};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::headers::{strip_hop_by_hop, upstream_request_headers};

/// The response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-sluice-upstream";

/// Only the field routing needs; everything else is skipped (but still checked as JSON).
#[derive(Deserialize)]
struct ModelPeek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// Forwards a request under `/v1/` (`path` is the path without the route prefix).
pub async fn forward(
    gateway: &Gateway,
    caller: Caller,
    parts: Parts,
    body: Incoming,
    path: &str,
) -> Response<Body> {
    match forward_inner(gateway, caller, parts, body, path).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_inner(
    gateway: &Gateway,
    caller: Caller,
    parts: Parts,
    body: Incoming,
    path: &str,
) -> Result<Response<Body>, ApiError> {
    let limit = gateway.config.server.max_body;
    let declared_length = content_length(&parts.headers);
    if declared_length.is_some_and(|len| len > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let has_body = declared_length.is_some_and(|len| len > 0)
        || parts.headers.contains_key(header::TRANSFER_ENCODING);

    let must_read = has_body
        && parts.method == Method::POST
        && is_json(&parts.headers)
        && (gateway.routing_needs_model || caller.restricts_models());
    let (upstream_body, model) = if must_read {
        let bytes = read_body(body, limit).await?;
        let peek: ModelPeek = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        let model = peek.model.map(Cow::into_owned);
        (Some(reqwest::Body::from(bytes)), model)
    } else {
        let streamed = has_body.then(|| {
            reqwest::Body::wrap(Limited::new(
                body,
                usize::try_from(limit).unwrap_or(usize::MAX),
            ))
        });
        (
            streamed,
            model_in_path(&parts.method, path).map(str::to_string),
        )
    };

    if let Some(model) = &model {
        if !caller.may_use(model) {
            return Err(ApiError::forbidden(
                "model_not_allowed",
                format!("this API key may not use the model `{model}`"),
            ));
        }
    }
    let upstream = gateway.route(model.as_deref())?;
    let timeouts = upstream.config.timeouts;
    let started = Instant::now();
    let deadline = timeouts.total.map(|total| started + total);

    let mut headers = upstream_request_headers(parts.headers);
    match &caller {
        Caller::Passthrough(value) => {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        Caller::Gateway(_) | Caller::Open => match upstream.next_key() {
            Some((_, value)) => {
                headers.insert(header::AUTHORIZATION, value.clone());
            }
            // Passthrough makes client keys the credential; with none sent and none of
            // the upstream's own to use, there is nothing to authenticate with.
            None if matches!(caller, Caller::Open) && gateway.config.access.passthrough => {
                return Err(ApiError::unauthorized(
                    "missing_api_key",
                    "You didn't provide an API key. Send it in an Authorization header: Bearer YOUR_KEY.",
                ));
            }
            None => {}
        },
    }
    for (name, value) in &upstream.config.headers {
        headers.insert(name.clone(), value.clone());
    }

    let url = upstream.url(path, parts.uri.query());
    let mut request = upstream.client.request(parts.method, url).headers(headers);
    if let Some(body) = upstream_body {
        request = request.body(body);
    }

    let first_byte = deadline.map_or(timeouts.first_byte, |d| {
        timeouts.first_byte.min(d - started)
    });
    let name = &upstream.config.name;
    let response = match tokio::time::timeout(first_byte, request.send()).await {
        Err(_) => {
            return Err(ApiError::gateway_timeout(format!(
                "upstream `{name}` sent no response within {}",
                humantime::format_duration(first_byte)
            )));
        }
        Ok(Err(error)) => return Err(classify(&error, name, limit)),
        Ok(Ok(response)) => response,
    };

    let status = response.status();
    let mut response_headers = response.headers().clone();
    strip_hop_by_hop(&mut response_headers);
    let is_sse = is_event_stream(&response_headers);
    response_headers.insert(UPSTREAM_HEADER, upstream.name_header.clone());
    let relay = RelayBody::new(
        reqwest::Body::from(response),
        timeouts.idle,
        deadline,
        is_sse,
        name,
    );
    let mut out = Response::new(relay.boxed_unsync());
    *out.status_mut() = status;
    *out.headers_mut() = response_headers;
    Ok(out)
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
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
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

/// Reads a whole request body, refusing more than `limit` bytes.
pub async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, ApiError> {
    match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
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
}

impl RelayBody {
    fn new(
        inner: reqwest::Body,
        idle: Duration,
        deadline: Option<Instant>,
        sse: bool,
        upstream: &str,
    ) -> Self {
        let first = Self::next_wake(idle, deadline);
        Self {
            inner,
            idle,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(first)),
            sse,
            upstream: upstream.to_string(),
            done: false,
        }
    }

    fn next_wake(idle: Duration, deadline: Option<Instant>) -> Instant {
        let wake = Instant::now() + idle;
        deadline.map_or(wake, |d| d.min(wake))
    }

    fn fail(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
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
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let wake = Self::next_wake(this.idle, this.deadline);
                this.timer.as_mut().reset(wake);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let message = format!(
                    "upstream `{}` broke off the response: {error}",
                    this.upstream
                );
                tracing::warn!(upstream = %this.upstream, "{message}");
                this.fail(ApiError::bad_gateway(message))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
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
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
}
