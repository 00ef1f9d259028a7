//! CORS for browser clients that call the API directly (chat front ends in the browser).
//! Off unless `server.cors_origins` lists origins (or `"*"`).

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::http::body::{Body, empty};

/// Headers a browser client may read from an answer.
const EXPOSED: &str = "x-request-id, x-sluice-upstream, x-sluice-tries, retry-after, openai-processing-ms, \
    x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, \
    x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";

/// The `Origin` of a request if the config allows it.
pub fn allowed_origin(allowed: &[String], headers: &HeaderMap) -> Option<HeaderValue> {
    if allowed.is_empty() {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(text))
        .then(|| origin.clone())
}

/// The answer to a preflight `OPTIONS`.
pub fn preflight(origin: &HeaderValue, request: &HeaderMap) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    let asked = request
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

/// Adds the CORS headers to an answer for an allowed origin.
pub fn decorate(response: &mut Response<Body>, origin: HeaderValue) {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_are_allowed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://chat.example"),
        );
        assert!(allowed_origin(&[], &headers).is_none());
        assert!(allowed_origin(&["https://other.example".into()], &headers).is_none());
        assert_eq!(
            allowed_origin(&["https://chat.example".into()], &headers).unwrap(),
            "https://chat.example"
        );
        assert!(allowed_origin(&["*".into()], &headers).is_some());
        assert!(allowed_origin(&["*".into()], &HeaderMap::new()).is_none());
    }
}
