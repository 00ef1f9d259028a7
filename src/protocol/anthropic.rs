//! Anthropic's Messages API as a client speaks it to sluice (`/v1/messages`,
//! `/v1/messages/count_tokens`): the fields routing reads and the error shape
//! `{"type": "error", "error": {"type", "message"}}` (in a stream, `event: error`) that
//! its SDKs parse. Translation to and from other protocols lives in
//! [`translate::anthropic`](super::translate::anthropic).

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use serde::Deserialize;

use crate::http::body::{Body, full};
use crate::http::error::ApiError;
use crate::protocol::BodyFacts;
use crate::protocol::translate::anthropic::error_value;

/// The Messages endpoint.
pub const MESSAGES: &str = "/v1/messages";
/// Token counting, free of charge.
pub const COUNT_TOKENS: &str = "/v1/messages/count_tokens";
/// The version header an upstream gets when neither the client nor the config sets one.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// Whether a path is Anthropic's.
pub fn is_path(path: &str) -> bool {
    path == MESSAGES || path.starts_with("/v1/messages/")
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    metadata: Option<Metadata<'a>>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
}

/// The facts of a Messages request body; `metadata.user_id` is the end user.
pub fn peek(body: &[u8]) -> Result<BodyFacts<'_>, serde_json::Error> {
    let peek: Peek = serde_json::from_slice(body)?;
    Ok(BodyFacts {
        model: peek.model,
        user: peek.metadata.and_then(|m| m.user_id),
        stream: peek.stream == Some(true),
        usage_asked: true,
        has_stream_options: false,
    })
}

/// Message batches use no model of their own.
pub fn model_less(path: &str) -> bool {
    path.starts_with("/v1/messages/batches")
}

/// The error's JSON body.
pub fn error_json(error: &ApiError) -> String {
    serde_json::to_string(&error_value(error.status.as_u16(), &error.message)).unwrap_or_default()
}

/// The error as a whole answer, with `Retry-After` when it says when to come back.
pub fn error_response(error: ApiError) -> Response<Body> {
    let mut response = Response::new(full(error_json(&error)));
    *response.status_mut() = error.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = error.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The error as a stream's last event, which the Anthropic SDKs raise.
pub fn error_event(error: &ApiError) -> Bytes {
    Bytes::from(format!("event: error\ndata: {}\n\n", error_json(error)))
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use serde_json::Value;

    use super::*;

    #[test]
    fn errors_have_anthropics_shape() {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            "slow down",
        );
        error.retry_after = Some(3);
        let value: Value = serde_json::from_str(&error_json(&error)).unwrap();
        assert_eq!(value["type"], "error");
        assert_eq!(value["error"]["type"], "rate_limit_error");
        assert_eq!(value["error"]["message"], "slow down");
        let response = error_response(error.clone());
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let event = error_event(&error);
        assert!(event.starts_with(b"event: error\ndata: {"));
        let not_found = ApiError::not_found("model_not_found", "no such model");
        let value: Value = serde_json::from_str(&error_json(&not_found)).unwrap();
        assert_eq!(value["error"]["type"], "not_found_error");
    }

    #[test]
    fn the_end_user_is_metadata_user_id() {
        let facts =
            peek(br#"{"model":"claude","stream":true,"metadata":{"user_id":"u1"}}"#).unwrap();
        assert_eq!(facts.model.as_deref(), Some("claude"));
        assert_eq!(facts.user.as_deref(), Some("u1"));
        assert!(facts.stream);
    }
}
