//! OpenAI's API, as a client speaks it and as an upstream answers it: the few body fields
//! the gateway reads ([`Peek`]), the endpoints that use no model or count tokens, the
//! usage chunk of a stream, model names in paths, and the error shape
//! `{"error": {"message", "type", "param", "code"}}` that its SDKs parse.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, header};
use serde::{Deserialize, Serialize};

use crate::config::Upstream;
use crate::http::body::{Body, full};
use crate::http::error::ApiError;
use crate::protocol::BodyFacts;
use crate::pure::rewrite;

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

/// The facts of a JSON request body.
pub fn peek(body: &[u8]) -> Result<BodyFacts<'_>, serde_json::Error> {
    let peek: Peek = serde_json::from_slice(body)?;
    let usage_asked = peek
        .stream_options
        .as_ref()
        .and_then(|o| o.as_ref())
        .and_then(|o| o.include_usage)
        == Some(true);
    Ok(BodyFacts {
        model: peek.model,
        user: peek.user,
        stream: peek.stream == Some(true),
        usage_asked,
        has_stream_options: peek.stream_options.is_some(),
    })
}

/// Paths whose answers carry token usage.
pub fn counts_tokens(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/responses"
    )
}

/// Paths whose streams send their usage only when asked (`stream_options.include_usage`).
fn usage_on_request(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/v1/completions")
}

/// To count a stream's tokens, its usage chunk is asked for (and hidden from a client
/// that did not ask for it).
pub fn with_usage_requested(path: &str, body: &Bytes, facts: &BodyFacts<'_>) -> Option<Bytes> {
    if !facts.stream || facts.usage_asked || !usage_on_request(path) {
        return None;
    }
    rewrite::with_usage_requested(body, facts.has_stream_options)
}

/// `GET /v1/models/{id}` and `DELETE /v1/models/{id}` name their model in the path.
pub fn model_in_path<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    if *method != Method::GET && *method != Method::DELETE {
        return None;
    }
    path.strip_prefix("/v1/models/").filter(|id| !id.is_empty())
}

/// The path to send `upstream`: a model named in the path (`/v1/models/{alias}`) gets
/// the upstream's own name for it.
pub fn upstream_path<'a>(method: &Method, path: &'a str, upstream: &Upstream) -> Cow<'a, str> {
    match model_in_path(method, path) {
        Some(model) if upstream.upstream_model(model) != model => {
            Cow::Owned(format!("/v1/models/{}", upstream.upstream_model(model)))
        }
        _ => Cow::Borrowed(path),
    }
}

/// The query to send `upstream`: a realtime session's `model` gets the upstream's own
/// name for it; any other query goes as it came.
pub fn upstream_query<'a>(
    path: &str,
    query: Option<&'a str>,
    model: Option<&str>,
    upstream: &Upstream,
) -> Option<Cow<'a, str>> {
    let query = query?;
    let mapped = model
        .filter(|_| path == "/v1/realtime")
        .map(|m| upstream.upstream_model(m))
        .filter(|to| Some(*to) != model);
    let Some(to) = mapped else {
        return Some(Cow::Borrowed(query));
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).ok()?;
    let pairs: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(name, value)| {
            let value = if name == "model" {
                to.to_string()
            } else {
                value
            };
            (name, value)
        })
        .collect();
    serde_urlencoded::to_string(pairs).ok().map(Cow::Owned)
}

/// Endpoints whose requests use no model: objects (files, batches, stores, threads…) and
/// operations on something already made. Any other endpoint with a body and no `model`
/// may fall back to a default model upstream, which a limited key must not reach.
pub fn model_less(path: &str) -> bool {
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

#[derive(Serialize)]
struct Envelope<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

/// The error's JSON body: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_json(error: &ApiError) -> String {
    let envelope = Envelope {
        error: Detail {
            message: &error.message,
            kind: error.kind,
            param: None,
            code: error.code,
        },
    };
    // Serialising plain strings into JSON cannot fail.
    serde_json::to_string(&envelope).unwrap_or_default()
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

/// The error as a stream's last event, `data: {"error": …}`, which the OpenAI SDKs raise.
pub fn error_event(error: &ApiError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", error_json(error)))
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
    fn usage_is_asked_for_only_where_a_stream_would_lack_it() {
        let ask = |path: &str, body: &'static str| {
            let bytes = Bytes::from_static(body.as_bytes());
            let facts = peek(&bytes).unwrap();
            with_usage_requested(path, &bytes, &facts).is_some()
        };
        assert!(ask("/v1/chat/completions", r#"{"stream": true}"#));
        assert!(ask(
            "/v1/completions",
            r#"{"stream": true, "stream_options": null}"#
        ));
        assert!(!ask("/v1/chat/completions", r#"{"stream": false}"#));
        assert!(!ask("/v1/embeddings", r#"{"stream": true}"#));
        assert!(!ask(
            "/v1/chat/completions",
            r#"{"stream": true, "stream_options": {"include_usage": true}}"#
        ));
    }
}
