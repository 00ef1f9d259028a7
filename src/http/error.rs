//! Errors sluice answers by itself, as data.
//!
//! Every answer sluice makes on its own (as opposed to bytes relayed from an upstream) that
//! is not a success goes through [`ApiError`]. It says what happened (status, a stable
//! `code`), who is at fault and whether another try may help, so the try loop reads those
//! facts instead of guessing them back from a status. How it is written on the wire is the
//! client protocol's business (the `protocol` module): OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` today.

use http::StatusCode;

/// An error answered to the client in its protocol's error shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, …
    pub kind: &'static str,
    /// OpenAI's `code`: a stable machine-readable reason.
    pub code: &'static str,
    pub message: String,
    /// Seconds the client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
    /// Who caused it: an upstream is rested only for its own faults.
    pub fault: Fault,
    /// Whether the same request may succeed elsewhere or later.
    pub retryable: bool,
}

/// Who an error is the fault of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request itself (too big, too slow, malformed, not allowed).
    Client,
    /// The upstream (unreachable, too slow, broke off).
    Upstream,
    /// sluice (a limit it keeps, a failure of its own).
    Gateway,
}

impl ApiError {
    /// An error whose fault follows from its status: 4xx the client's, anything else
    /// sluice's own; neither is worth another try.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        let fault = if status.is_client_error() {
            Fault::Client
        } else {
            Fault::Gateway
        };
        Self {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
            fault,
            retryable: false,
        }
    }

    /// The same error, blamed on an upstream whose failure another try may get round.
    fn upstream_fault(self) -> Self {
        Self {
            fault: Fault::Upstream,
            retryable: true,
            ..self
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            code,
            message,
        )
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body exceeds the gateway's limit of {limit} bytes"),
        )
    }

    /// The client did not send its body in time (`server.body_idle_timeout`,
    /// `server.body_timeout`).
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body did not arrive in time",
        )
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_unreachable",
            message,
        )
        .upstream_fault()
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
            message,
        )
        .upstream_fault()
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use http::header;

    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let err = ApiError::unauthorized("invalid_api_key", "bad \"key\"");
        let value: serde_json::Value = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(value["error"]["message"], "bad \"key\"");
        assert_eq!(value["error"]["type"], "authentication_error");
        assert_eq!(value["error"]["code"], "invalid_api_key");
        assert!(value["error"]["param"].is_null());
    }

    #[test]
    fn retry_after_becomes_a_header() {
        let mut err = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            "slow down",
        );
        err.retry_after = Some(7);
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
