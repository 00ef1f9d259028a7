//! The relay and record stages: an upstream's answer (or the failure to report) becomes
//! the client's. The head is relayed with hop-by-hop headers stripped and sluice's own
//! added; the body streams chunk by chunk through `RelayBody`, reshaped only where the
//! client's model name must be put back or a usage chunk it did not ask for hidden; the
//! log record is completed with the upstream side and submitted when the body ends.

use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use crate::accounting::recorder::RecordSink;
use crate::accounting::records::{Pending, detached};
use crate::cache::Fill;
use crate::clock::unix_now;
use crate::gateway::Gateway;
use crate::http::body::{Body, BoxError};
use crate::http::error::ApiError;
use crate::http::headers::strip_hop_by_hop;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::read::{content_length, is_json_type};
use crate::pipeline::send::Failure;
use crate::pipeline::try_loop::Settled;
use crate::protocol::translate::{AnswerKind, Translator};
use crate::protocol::{ClientProtocol, Route, UpstreamKind};
use crate::pure::routing::Choice;
use crate::pure::shape::Shaper;
use crate::upstream::{InFlight, UpstreamRuntime};

/// The response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-sluice-upstream";
/// The response header counting the tries a request took.
pub const TRIES_HEADER: &str = "x-sluice-tries";
/// The response header naming the model that served (a fallback's, when one did).
pub const MODEL_HEADER: &str = "x-sluice-model";

/// How a relayed body must be changed on its way to the client.
pub struct Shaping<'a> {
    /// The model name the answer shows.
    pub client_model: Option<&'a str>,
    /// The model that served (the client-facing name), when it is not `client_model`'s
    /// upstream name: a fallback's.
    pub served_model: Option<&'a str>,
    pub strip_usage: bool,
    /// Captures a successful answer for the response cache.
    pub fill: Option<Fill>,
    /// An OpenAI client asked for its stream's usage chunk itself.
    pub usage_asked: bool,
    /// What each side speaks, when the answering upstream's API is not the client's
    /// (set by [`relay_settled`], which knows the upstream).
    pub route: Option<Route>,
}

impl Shaping<'_> {
    /// The client-facing name of the model that served.
    fn served(&self) -> Option<&str> {
        self.served_model.or(self.client_model)
    }
}

/// Answers the client with how the tries settled: the answer relayed, or the failure
/// (an upstream's own answer relayed as it is, an error of sluice's in the protocol's shape).
pub fn relay_settled(
    x: &mut Exchange<'_>,
    settled: Settled<'_>,
    mut shaping: Shaping<'_>,
) -> Response<Body> {
    let (Settled::Answered { upstream, .. } | Settled::Failed { upstream, .. }) = &settled;
    shaping.route = UpstreamKind::of(&upstream.config)
        .route(x.protocol, x.path)
        .ok()
        .flatten();
    match settled {
        Settled::Answered {
            response,
            upstream,
            choice,
            in_flight,
        } => {
            let log = take_record(x, choice, upstream, shaping.served());
            relay(response, upstream, shaping, Some(in_flight), log)
        }
        Settled::Failed {
            failure,
            upstream,
            choice,
            ..
        } => {
            let log = take_record(x, choice, upstream, shaping.served());
            answer_failure(failure, upstream, shaping, log, x.gateway)
        }
    }
}

/// The log record with the exchange's upstream side filled in, and where to send it.
fn take_record(
    x: &mut Exchange<'_>,
    choice: Choice,
    upstream: &UpstreamRuntime,
    model: Option<&str>,
) -> Log {
    let attempts = mem::take(&mut x.attempts);
    let tries = attempts.len();
    let record = x.record.take().map(|mut record| {
        record.upstream = Some(upstream.config.name.clone());
        record.upstream_key = choice.key.and_then(|k| upstream.masked_key(k));
        record.upstream_model = model.map(|m| upstream.config.upstream_model(m).to_string());
        if model != record.model.as_deref() {
            record.served_model = model.map(str::to_string);
        }
        record.attempts = attempts;
        record
    });
    Log {
        record,
        sink: x.gateway.record_sink(),
        tries,
        protocol: x.protocol,
    }
}

/// The record of a realtime session and the log it goes to when the session ends: its
/// upstream side filled in as a relayed answer's is.
pub fn take_session_record(
    x: &mut Exchange<'_>,
    choice: Choice,
    upstream: &UpstreamRuntime,
    model: Option<&str>,
) -> (Option<Box<Pending>>, Option<RecordSink>) {
    let log = take_record(x, choice, upstream, model);
    let record = log.record.map(|mut record| {
        record.first_byte = Some(record.started.elapsed());
        record
    });
    (record, log.sink)
}

/// A request's log record on its way to the log, with the number of tries it took.
struct Log {
    record: Option<Box<Pending>>,
    sink: Option<RecordSink>,
    tries: usize,
    protocol: ClientProtocol,
}

/// The failure to report as it happened: an upstream's answer is relayed as it is (its
/// model name put back), an error of the exchange answered in the client's protocol.
fn answer_failure(
    failure: Failure,
    upstream: &Arc<UpstreamRuntime>,
    shaping: Shaping<'_>,
    log: Log,
    gateway: &Gateway,
) -> Response<Body> {
    match failure {
        Failure::Response(response) => {
            let shaping = Shaping {
                strip_usage: false,
                fill: None,
                usage_asked: false,
                ..shaping
            };
            relay(response, upstream, shaping, None, log)
        }
        Failure::Error(error) => {
            let tries = log.tries;
            gateway.record_error(log.record, &error);
            let mut response = log.protocol.error_response(error);
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
    let kind = UpstreamKind::of(&upstream.config);
    let served = shaping.served();
    let translator = shaping.route.map(|route| {
        let answer = if !status.is_success() {
            AnswerKind::Error {
                status: status.as_u16(),
            }
        } else if sse {
            AnswerKind::Stream
        } else {
            AnswerKind::Json
        };
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if answer == AnswerKind::Stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        headers.remove(header::CONTENT_ENCODING);
        Translator::new(
            route.client,
            route.upstream,
            answer,
            shaping.client_model.unwrap_or(""),
            shaping.usage_asked,
            unix_now(),
        )
    });
    let rename = shaping
        .client_model
        .filter(|m| kind.puts_model_back(&upstream.config, served.unwrap_or(m), m));
    // Read only when a name is to be put back (reading it costs a copy).
    let json = rename.is_some() && !sse && is_json(&headers);
    let shaper = if translator.is_some() {
        None
    } else {
        kind.shaper(sse, json, rename, shaping.strip_usage)
    };
    // A translated whole answer is complete once its declared bytes are in: it is
    // translated and handed over then, without waiting for the end of the upstream body.
    let translated_length = translator
        .as_ref()
        .filter(|_| !sse)
        .and_then(|_| content_length(&headers))
        .filter(|&length| length > 0);
    if shaper.is_some() || translator.is_some() {
        // The body changes length when it is reshaped.
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut record = log.record;
    if let Some(record) = record.as_mut() {
        record_head(record, status, sse, &headers);
        // The log stores what the client got: it reshapes its copy of the body itself.
        if shaper.is_some() && log.sink.as_ref().is_some_and(|s| s.body_limit() > 0) {
            record.reshape = kind.shaper(sse, json, rename, shaping.strip_usage);
        }
    }
    headers.insert(UPSTREAM_HEADER, upstream.name_header.clone());
    headers.insert(TRIES_HEADER, HeaderValue::from(log.tries));
    if let Some(value) = served.and_then(|m| HeaderValue::from_str(m).ok()) {
        headers.insert(MODEL_HEADER, value);
    }
    // A body relayed unchanged with a declared length is complete when that many bytes
    // are handed over; hyper may drop it then without asking for its end.
    let remaining = (shaper.is_none() && translator.is_none())
        .then(|| content_length(&headers))
        .flatten()
        .or(translated_length);
    let fill = shaping
        .fill
        .filter(|_| status == StatusCode::OK)
        .map(|mut fill| {
            fill.stream = sse;
            fill.content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            Box::new(fill)
        });
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
        translator,
        _in_flight: in_flight,
        record,
        sink: log.sink,
        protocol: log.protocol,
        fill,
    };
    let mut out = Response::new(relay.boxed_unsync());
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// Writes down the answer's head in the log record as the upstream sent it.
fn record_head(record: &mut Pending, status: StatusCode, sse: bool, headers: &HeaderMap) {
    record.status = status.as_u16();
    record.first_byte = Some(record.started.elapsed());
    record.stream = sse;
    record.response_content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    record.response_headers = detached(headers);
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_type)
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

/// Relays an upstream body chunk by chunk, ending it if the upstream goes quiet for longer
/// than the idle timeout or passes the total deadline. A broken SSE stream ends with the
/// client protocol's error event (OpenAI's `data: {"error": …}`), which the OpenAI SDKs raise as an error; any
/// other body is cut, so the client sees a truncated transfer rather than a short success.
struct RelayBody {
    inner: reqwest::Body,
    idle: Duration,
    deadline: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    sse: bool,
    upstream: String,
    done: bool,
    /// Bytes still to relay of a body with a declared length, when relayed unchanged
    /// (or still to read of a whole answer being translated).
    remaining: Option<u64>,
    shaper: Option<Shaper>,
    /// Turns the upstream's answer into the client's protocol, when they differ.
    translator: Option<Translator>,
    /// Keeps the upstream's in-flight count up until the body ends or the client leaves.
    _in_flight: Option<InFlight>,
    /// The log record, submitted when the body ends or is dropped.
    record: Option<Box<Pending>>,
    sink: Option<RecordSink>,
    /// How an error ending the stream is written.
    protocol: ClientProtocol,
    /// The answer as relayed, for the response cache; stored only if it ends whole.
    fill: Option<Box<Fill>>,
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

    /// Copies relayed bytes for the cache; an answer too big to cache is let go.
    fn fill_with(&mut self, data: &[u8]) {
        if let Some(fill) = self.fill.as_mut() {
            if !fill.push(data) {
                self.fill = None;
            }
        }
    }

    /// The answer ended whole: the cache may keep it (off the hot path).
    fn complete_fill(&mut self) {
        if let Some(fill) = self.fill.take() {
            fill.complete();
        }
    }

    /// Submits the log record: the exchange is over.
    fn finish(&mut self, error: Option<String>) {
        if let (Some(mut record), Some(sink)) = (self.record.take(), self.sink.as_ref()) {
            record.latency = Some(record.started.elapsed());
            record.error = error;
            sink.submit(record);
        }
    }

    /// Hands one frame of the upstream's on, reshaped if it must be; `None` when the
    /// shaper holds it back (an event not yet whole), so the next one is read.
    fn relay_frame(&mut self, frame: Frame<Bytes>) -> Option<Result<Frame<Bytes>, BoxError>> {
        let wake = Self::next_wake(self.idle, self.deadline);
        self.timer.as_mut().reset(wake);
        if let Some(translator) = self.translator.as_mut() {
            let data = frame.into_data().ok()?;
            let whole = self.remaining.as_mut().is_some_and(|remaining| {
                *remaining = remaining.saturating_sub(data.len() as u64);
                *remaining == 0
            });
            return match translator.push(&data) {
                Ok(out) if whole => {
                    self.record_body(&out);
                    let rest = self.end_translated();
                    let whole = if out.is_empty() {
                        rest
                    } else {
                        [out, rest].concat().into()
                    };
                    Some(Ok(Frame::data(whole)))
                }
                Ok(out) if out.is_empty() => None,
                Ok(out) => {
                    self.record_body(&out);
                    self.fill_with(&out);
                    Some(Ok(Frame::data(out)))
                }
                Err(too_large) => {
                    let message = format!("upstream `{}`: {too_large}", self.upstream);
                    tracing::warn!(upstream = %self.upstream, "{message}");
                    Some(self.last_frame(ApiError::bad_gateway(message)))
                }
            };
        }
        if let Some(data) = frame.data_ref() {
            self.record_body(data);
        }
        if self.shaper.is_none() {
            if let Some(data) = frame.data_ref() {
                self.fill_with(data);
            }
        }
        let Some(shaper) = self.shaper.as_mut() else {
            if let (Some(remaining), Some(data)) = (self.remaining.as_mut(), frame.data_ref()) {
                *remaining = remaining.saturating_sub(data.len() as u64);
                if *remaining == 0 {
                    self.done = true;
                    self._in_flight = None;
                    self.finish(None);
                    self.complete_fill();
                }
            }
            return Some(Ok(frame));
        };
        match frame.into_data() {
            Ok(data) => match shaper.push(data) {
                Ok(out) if out.is_empty() => None,
                Ok(out) => {
                    self.fill_with(&out);
                    Some(Ok(Frame::data(out)))
                }
                Err(too_large) => {
                    let message = format!("upstream `{}`: {too_large}", self.upstream);
                    tracing::warn!(upstream = %self.upstream, "{message}");
                    Some(self.last_frame(ApiError::bad_gateway(message)))
                }
            },
            Err(frame) => Some(Ok(frame)),
        }
    }

    /// The upstream's answer is all in: the rest of the translated one, the record
    /// submitted and the cache filled.
    fn end_translated(&mut self) -> Bytes {
        self.done = true;
        self._in_flight = None;
        let rest = self
            .translator
            .as_mut()
            .map(Translator::finish)
            .unwrap_or_default();
        self.record_body(&rest);
        self.finish(None);
        self.fill_with(&rest);
        self.complete_fill();
        rest
    }

    /// Keeps relayed bytes for the log: the upstream's as they came (the log reshapes its
    /// copy itself), or a translated answer as the client saw it, so its usage is read in
    /// the client's protocol.
    fn record_body(&mut self, data: &Bytes) {
        if let (Some(record), Some(sink)) = (self.record.as_mut(), self.sink.as_ref()) {
            record.response_body.push(data, sink.body_limit());
        }
    }

    /// The upstream has nothing yet: waits, unless it has been quiet too long or the
    /// total deadline has passed, which ends the body.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let message = if self.deadline.is_some_and(|d| Instant::now() >= d) {
                    format!("upstream `{}` exceeded the total timeout", self.upstream)
                } else {
                    format!(
                        "upstream `{}` sent nothing for {}",
                        self.upstream,
                        humantime::format_duration(self.idle)
                    )
                };
                tracing::warn!(upstream = %self.upstream, "{message}");
                self.fail(ApiError::gateway_timeout(message))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn fail(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(self.last_frame(error)))
    }

    /// Ends the body with an error: the protocol's error event for a stream, a cut
    /// transfer for anything else.
    fn last_frame(&mut self, error: ApiError) -> Result<Frame<Bytes>, BoxError> {
        self.fill = None;
        self.done = true;
        self._in_flight = None;
        if self.sse {
            let event = self.protocol.error_event(&error);
            if let Some(record) = self.record.as_mut() {
                // The client gets this event after the upstream's bytes: the log shows it.
                record.closing = Some(event.clone());
            }
            self.finish(Some(error.message.clone()));
            Ok(Frame::data(event))
        } else {
            self.finish(Some(error.message.clone()));
            Err(Box::new(error))
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
                    if let Some(out) = this.relay_frame(frame) {
                        return Poll::Ready(Some(out));
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
                    let rest = if this.translator.is_some() {
                        this.end_translated()
                    } else {
                        this.done = true;
                        this._in_flight = None;
                        let rest = this.shaper.as_mut().map(Shaper::finish).unwrap_or_default();
                        this.finish(None);
                        this.fill_with(&rest);
                        this.complete_fill();
                        rest
                    };
                    return if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    };
                }
                Poll::Pending => return this.poll_quiet(cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || (self.shaper.is_none() && self.translator.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse || self.shaper.is_some() || self.translator.is_some() {
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
