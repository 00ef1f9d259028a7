//! Body types shared by the server, the proxy and the mock upstream.
//!
//! Responses are boxed once so that relayed upstream streams, sluice's own JSON answers and
//! SSE error tails can share one type without copying bytes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of every handler.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding bytes already in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response with the given status.
pub fn json_response(
    status: http::StatusCode,
    value: &impl serde::Serialize,
) -> http::Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = http::Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A request body that must keep arriving: it fails with [`BodyTimeout`] when the client
/// sends nothing for `idle`, or has not finished by `deadline`. Without it a client that
/// trickles (or never finishes) a body holds a connection and its memory for ever.
pub struct TimedBody<B> {
    inner: B,
    idle: std::time::Duration,
    deadline: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// A request body was too slow; answered 408.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

impl<B> TimedBody<B> {
    pub fn new(inner: B, idle: std::time::Duration, total: std::time::Duration) -> Self {
        let now = tokio::time::Instant::now();
        let deadline = now + total;
        Self {
            inner,
            idle,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline.min(now + idle))),
        }
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let wake = this.deadline.min(tokio::time::Instant::now() + this.idle);
                this.timer.as_mut().reset(wake);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
