//! What a request leaves behind, as plain data: its log record while under way
//! ([`Pending`], with its captured body and its tries), where its gateway key was counted
//! ([`KeyTicket`]) and its place in a trace ([`TraceContext`]).
//!
//! These types live apart so that the proxy, which fills them, and the log writer, the
//! metrics and the trace exporter, which read them, all depend on this module and none on
//! another: no import cycle runs through the request log. Nothing here does I/O or knows
//! the gateway.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method};

use crate::clock::unix_now_ms;
use crate::config::GatewayKey;
use crate::pure::limits::Reserve;
use crate::pure::shape::Shaper;

/// What is kept of a body when the log sheds it: enough for a trailing usage chunk.
pub const TAIL: usize = 8 * 1024;

/// A body as captured, up to a limit. Chunks are copied: a slice would keep the whole
/// network read buffer behind it alive until the writer is done. The copy grows by a
/// quarter at a time rather than doubling: a held stream keeps its capture for minutes,
/// and a doubled buffer leaves up to half of it unused meanwhile.
#[derive(Debug, Default)]
pub struct Captured {
    buffer: Vec<u8>,
    /// Bytes seen in all, kept or not.
    pub seen: usize,
}

impl Captured {
    pub fn push(&mut self, chunk: &Bytes, limit: usize) {
        self.seen += chunk.len();
        if self.buffer.len() < limit {
            let take = chunk.len().min(limit - self.buffer.len());
            let needed = self.buffer.len() + take;
            if needed > self.buffer.capacity() {
                let room = (needed + needed / 4).min(limit).max(needed);
                self.buffer.reserve_exact(room - self.buffer.len());
            }
            self.buffer.extend_from_slice(&chunk[..take]);
        }
    }

    pub fn truncated(&self) -> bool {
        self.seen > self.buffer.len()
    }

    fn len(&self) -> usize {
        self.buffer.len()
    }

    /// A copy of what was kept.
    pub fn bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.buffer)
    }

    /// Keeps only the last `keep` bytes.
    pub fn keep_tail(&mut self, keep: usize) {
        let start = self.buffer.len().saturating_sub(keep);
        self.buffer = self.buffer[start..].to_vec();
    }
}

/// A copy of `headers` whose values share one allocation of their own. hyper's header
/// values are slices of the connection's read buffer: a record holding them keeps that
/// 8 KiB buffer alive for the whole exchange (a stream's minutes), and hyper allocates
/// another for its next read, on both the client's connection and the upstream's.
pub fn detached(headers: &HeaderMap) -> HeaderMap {
    let total = headers.iter().map(|(_, value)| value.len()).sum();
    let mut buffer = BytesMut::with_capacity(total);
    for (_, value) in headers {
        buffer.extend_from_slice(value.as_bytes());
    }
    let buffer = buffer.freeze();
    let mut copy = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, value) in headers {
        let end = at + value.len();
        // The bytes are this value's own, so they are valid; the fallback never runs.
        let mut own =
            HeaderValue::from_maybe_shared(buffer.slice(at..end)).unwrap_or_else(|_| value.clone());
        own.set_sensitive(value.is_sensitive());
        copy.append(name.clone(), own);
        at = end;
    }
    copy
}

/// A request's record while it is under way.
#[derive(Debug)]
pub struct Pending {
    pub id: String,
    pub started_ms: i64,
    pub started: Instant,
    pub client_ip: IpAddr,
    pub key: Option<Arc<GatewayKey>>,
    pub key_label: String,
    /// Where the key's counters counted this request and what it reserved, which the
    /// settlement corrects; `None` when the request was not counted (refused or refunded).
    pub ticket: Option<KeyTicket>,
    /// Its place in a trace, when traces are exported.
    pub trace: Option<TraceContext>,
    pub method: Method,
    pub path: String,
    pub model: Option<String>,
    /// The body's `user` (end-user attribution), when the body was read.
    pub user: Option<String>,
    /// The model that answered, when a fallback did (it prices the request).
    pub served_model: Option<String>,
    /// What the response cache made of the request, when it is on.
    pub cache: Option<CacheNote>,
    pub upstream_model: Option<String>,
    pub upstream: Option<String>,
    pub upstream_key: Option<String>,
    pub status: u16,
    pub first_byte: Option<Duration>,
    pub latency: Option<Duration>,
    pub error: Option<String>,
    pub attempts: Vec<Attempt>,
    pub stream: bool,
    pub request_headers: HeaderMap,
    pub response_headers: HeaderMap,
    pub request_body: Option<Bytes>,
    /// The body as the upstream sent it (what accounting reads: usage lives there).
    pub response_body: Captured,
    /// How the answer was changed on its way to the client, as a fresh twin of the
    /// relay's shaper: the log applies it to the captured body, off the request path, to
    /// store what the client received. `None`: the client got the upstream's bytes.
    pub reshape: Option<Shaper>,
    /// sluice's own last event, sent after the upstream's bytes when a stream broke.
    pub closing: Option<Bytes>,
    pub response_content_type: Option<String>,
    /// Whether the row keeps its bodies (`false` once the log sheds bodies).
    pub keep_bodies: bool,
    /// Whether the record becomes a row (`false`: shed, accounted only).
    pub keep_row: bool,
}

impl Pending {
    /// Marks the request as its gateway key's, counted as `ticket` says.
    pub fn admitted(&mut self, key: &Arc<GatewayKey>, ticket: Option<KeyTicket>) {
        self.key = Some(key.clone());
        self.ticket = ticket;
    }

    pub fn new(client_ip: IpAddr, method: Method, path: &str, request_headers: HeaderMap) -> Self {
        let started_ms = unix_now_ms();
        Self {
            id: format!("req_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..)),
            started_ms,
            started: Instant::now(),
            client_ip,
            key: None,
            key_label: "-".into(),
            ticket: None,
            trace: None,
            method,
            path: path.to_string(),
            model: None,
            user: None,
            served_model: None,
            cache: None,
            upstream_model: None,
            upstream: None,
            upstream_key: None,
            status: 0,
            first_byte: None,
            latency: None,
            error: None,
            attempts: Vec::new(),
            stream: false,
            request_headers,
            response_headers: HeaderMap::new(),
            request_body: None,
            response_body: Captured::default(),
            reshape: None,
            closing: None,
            response_content_type: None,
            keep_bodies: true,
            keep_row: true,
        }
    }

    /// Body bytes the record holds, counted against the log's byte budget.
    pub fn body_bytes(&self) -> usize {
        self.request_body.as_ref().map_or(0, Bytes::len) + self.response_body.len()
    }

    /// Keeps what accounting needs: the tail of the response (where usage lives) and a
    /// small request (the tokenizer's estimate reads it).
    pub fn drop_bodies(&mut self) {
        if self.request_body.as_ref().is_some_and(|b| b.len() > TAIL) {
            self.request_body = None;
        }
        self.response_body.keep_tail(TAIL);
        self.keep_bodies = false;
    }
}

/// One try at an upstream, as the request log records it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub upstream: String,
    /// The model asked of it (a fallback's, after the first model failed).
    pub model: Option<String>,
    pub key: Option<String>,
    /// The upstream's status, or `None` if no response came.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// When it started, from the start of the request.
    pub offset: Duration,
    pub elapsed: Duration,
}

/// What the response cache did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheNote {
    /// Answered from the cache: no upstream was asked.
    Hit,
    /// Looked up and not found: the answer may be stored.
    Miss,
    /// Not looked up (not cacheable, or `Cache-Control: no-cache`).
    Skip,
}

impl CacheNote {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Skip => "skip",
        }
    }
}

/// Where and when a request's key was counted, and what it reserved: what its settlement
/// (or refund) must correct.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyTicket {
    /// The clock of the store that counted it (Redis's or this instance's), in seconds.
    pub at: i64,
    pub reserve: Reserve,
    /// Counted in Redis rather than by this instance's limiter.
    pub shared: bool,
}

/// Where a request sits in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// sluice's span for the request.
    pub span_id: u64,
    /// The caller's span, when it sent one.
    pub parent: Option<u64>,
}

impl TraceContext {
    /// Continues the trace of a valid `traceparent` (`00-<trace>-<span>-<flags>`), or
    /// starts a new one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        Self {
            trace_id: parent.map_or_else(|| fastrand::u128(1..), |(trace, _)| trace),
            span_id: fastrand::u64(1..),
            parent: parent.map(|(_, span)| span),
        }
    }

    /// The `traceparent` an upstream gets: this trace, sluice's span as the parent, sampled.
    pub fn traceparent(&self) -> HeaderValue {
        let text = format!("00-{:032x}-{:016x}-01", self.trace_id, self.span_id);
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn parse_traceparent(text: &str) -> Option<(u128, u64)> {
    let mut parts = text.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = version.len() == 2
        && version != "ff"
        && trace.len() == 32
        && span.len() == 16
        && flags.len() == 2;
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let span = u64::from_str_radix(span, 16).ok()?;
    (well_formed && trace != 0 && span != 0).then_some((trace, span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_keeps_every_byte_up_to_its_limit_with_little_room_unused() {
        let chunk = Bytes::from(vec![b'x'; 300]);
        let mut captured = Captured::default();
        for _ in 0..16 {
            captured.push(&chunk, 1 << 20);
            // A quarter at most unused, where doubling would leave up to half.
            assert!(captured.buffer.capacity() <= captured.len() * 5 / 4 + 300);
        }
        assert_eq!(captured.len(), 16 * 300);
        assert!(!captured.truncated());
        assert_eq!(captured.bytes(), Bytes::from(vec![b'x'; 16 * 300]));

        let mut capped = Captured::default();
        for _ in 0..4 {
            capped.push(&chunk, 1000);
        }
        assert_eq!(capped.len(), 1000);
        assert!(capped.buffer.capacity() <= 1000, "never past the limit");
        assert_eq!(capped.seen, 1200);
        assert!(capped.truncated());
        capped.keep_tail(10);
        assert_eq!(capped.bytes(), Bytes::from(vec![b'x'; 10]));
    }

    #[test]
    fn detached_headers_are_equal_and_share_nothing_with_the_read_buffer() {
        // As hyper parses them: every value a slice of the connection's read buffer.
        let read_buffer = Bytes::from_static(b"Bearer sk-secret-1application/jsonone two");
        let value = |range: std::ops::Range<usize>| {
            HeaderValue::from_maybe_shared(read_buffer.slice(range)).expect("a valid header value")
        };
        let mut headers = HeaderMap::new();
        let mut key = value(0..18);
        key.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, key);
        headers.insert(http::header::CONTENT_TYPE, value(18..34));
        headers.append("x-tag", value(34..37));
        headers.append("x-tag", value(38..41));

        let copy = detached(&headers);

        assert_eq!(copy, headers);
        assert!(copy[http::header::AUTHORIZATION].is_sensitive());
        let buffer = read_buffer.as_ptr_range();
        for (_, value) in &copy {
            assert!(!buffer.contains(&value.as_bytes().as_ptr()));
        }
    }
}
