//! The request log, off the hot path.
//!
//! A request builds a [`Pending`] record as it goes (cheap: clones of headers and
//! reference-counted body chunks, no parsing) and hands it to [`Recorder::submit`], which
//! never blocks: the queue is bounded in records and in bytes; past the byte budget a
//! record keeps only the tail of its bodies (where usage lives), and past the record bound
//! it is dropped and counted. A writer thread batches records into the store, working out
//! usage, cost and reassembled streams there, settles token counts into the limiter, and
//! keeps the retention rules. Shutdown flushes what is queued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method};
use serde_json::{Value, json};

use crate::config::{GatewayKey, Price, Storage, mask};
use crate::limits::{Limiter, Period, Usage, key_scope, upstream_scope};
use crate::proxy::Attempt;
use crate::shared::Settlement;
use crate::store::{CounterDelta, LogRecord, Store};
use crate::usage::{self, Reply, UsageSource};

/// Queued body bytes past which records keep only a tail of their bodies.
const BYTE_BUDGET: usize = 64 * 1024 * 1024;
/// What is kept of a body when the budget is spent: enough for a trailing usage chunk.
const TAIL: usize = 8 * 1024;
const BATCH: usize = 512;
const BATCH_WAIT: Duration = Duration::from_millis(20);
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Paths whose answers carry token usage.
pub fn counts_tokens(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/responses"
    )
}

/// A body as captured, up to a limit. Chunks are copied: a slice would keep the whole
/// network read buffer behind it alive until the writer is done.
#[derive(Debug, Default)]
pub struct Captured {
    buffer: BytesMut,
    /// Bytes seen in all, kept or not.
    pub seen: usize,
}

impl Captured {
    pub fn push(&mut self, chunk: &Bytes, limit: usize) {
        self.seen += chunk.len();
        if self.buffer.len() < limit {
            let take = chunk.len().min(limit - self.buffer.len());
            self.buffer.extend_from_slice(&chunk[..take]);
        }
    }

    pub fn truncated(&self) -> bool {
        self.seen > self.buffer.len()
    }

    fn len(&self) -> usize {
        self.buffer.len()
    }

    fn bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.buffer)
    }

    /// Keeps only the last `keep` bytes.
    fn keep_tail(&mut self, keep: usize) {
        let start = self.buffer.len().saturating_sub(keep);
        self.buffer = BytesMut::from(&self.buffer[start..]);
    }
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
    pub ticket: Option<crate::gateway::KeyTicket>,
    /// Its place in a trace, when traces are exported.
    pub trace: Option<crate::traces::TraceContext>,
    pub method: Method,
    pub path: String,
    pub model: Option<String>,
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
    pub response_body: Captured,
    pub response_content_type: Option<String>,
}

impl Pending {
    /// Marks the request as its gateway key's, counted as `ticket` says.
    pub fn admitted(&mut self, key: &Arc<GatewayKey>, ticket: Option<crate::gateway::KeyTicket>) {
        self.key = Some(key.clone());
        self.ticket = ticket;
    }

    pub fn new(client_ip: IpAddr, method: Method, path: &str, request_headers: HeaderMap) -> Self {
        let started_ms = crate::limits::unix_now_ms();
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
            response_content_type: None,
        }
    }

    fn body_bytes(&self) -> usize {
        self.request_body.as_ref().map_or(0, Bytes::len) + self.response_body.len()
    }
}

enum Message {
    Record(Box<Pending>),
    Flush(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// Figures for `/v1/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub queued: AtomicUsize,
    pub queued_bytes: AtomicUsize,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub trimmed: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The sending side of the log, cheap to clone into each response body.
#[derive(Clone)]
pub struct LogSink {
    sender: SyncSender<Message>,
    pub stats: Arc<RecorderStats>,
    /// Bytes kept of each body.
    pub body_limit: usize,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink")
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

pub struct Recorder {
    pub sink: LogSink,
    pub stats: Arc<RecorderStats>,
    pub store: Arc<dyn Store>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts the writer thread for `store`, restoring persisted counters into `limiter`.
    pub fn start(
        store: Arc<dyn Store>,
        storage: &Storage,
        limiter: Arc<Limiter>,
        metrics: Arc<crate::metrics::Metrics>,
        pricing: HashMap<String, Price>,
        shared: Option<Arc<crate::shared::SharedState>>,
        traces: Option<Arc<crate::traces::Exporter>>,
    ) -> anyhow::Result<Self> {
        restore_counters(store.as_ref(), &limiter)?;
        let (sender, receiver) = sync_channel(storage.queue);
        let stats = Arc::new(RecorderStats::default());
        let writer = Writer {
            store: store.clone(),
            limiter,
            metrics,
            shared,
            traces,
            pricing,
            stats: stats.clone(),
            log_bodies: storage.log_bodies,
            retention: Duration::from_secs(u64::from(storage.retention_days) * 86_400),
            queue_capacity: storage.queue,
            max_rows: storage.max_rows,
        };
        let thread = std::thread::Builder::new()
            .name("sluice-log".into())
            .spawn(move || writer.run(receiver))?;
        Ok(Self {
            sink: LogSink {
                sender,
                stats: stats.clone(),
                body_limit: storage.body_limit,
            },
            stats,
            store,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a finished request; never blocks.
    pub fn submit(&self, pending: Pending) {
        self.sink.submit(pending);
    }

    /// Waits until everything queued so far is written.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sender = self.sink.sender.clone();
        let sent =
            tokio::task::spawn_blocking(move || sender.send(Message::Flush(done)).is_ok()).await;
        if matches!(sent, Ok(true)) {
            let _ = wait.await;
        }
    }

    /// Writes what is queued and stops the writer. Later submissions are dropped.
    pub fn shutdown(&self) {
        let _ = self.sink.sender.send(Message::Stop);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

impl LogSink {
    /// Queues a finished request; never blocks.
    pub fn submit(&self, mut pending: Pending) {
        let stats = &self.stats;
        if stats.queued_bytes.load(Ordering::Relaxed) + pending.body_bytes() > BYTE_BUDGET {
            pending.request_body = None;
            pending.response_body.keep_tail(TAIL);
            stats.trimmed.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = pending.body_bytes();
        stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.sender.try_send(Message::Record(Box::new(pending))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Loads the counters of the current windows, so limits hold across a restart.
fn restore_counters(store: &dyn Store, limiter: &Limiter) -> anyhow::Result<()> {
    let now = crate::limits::unix_now();
    let windows: Vec<(Period, i64)> = Period::ALL.iter().map(|p| (*p, p.window(now))).collect();
    for delta in store.counters(&windows)? {
        limiter.restore(&delta.scope, delta.period, delta.window, delta.usage);
    }
    Ok(())
}

struct Writer {
    store: Arc<dyn Store>,
    limiter: Arc<Limiter>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Limits shared through Redis, settled from this thread through the gateway's runtime.
    shared: Option<Arc<crate::shared::SharedState>>,
    traces: Option<Arc<crate::traces::Exporter>>,
    pricing: HashMap<String, Price>,
    stats: Arc<RecorderStats>,
    log_bodies: bool,
    retention: Duration,
    max_rows: u64,
    queue_capacity: usize,
}

impl Writer {
    fn run(self, receiver: Receiver<Message>) {
        // The log must never compete with requests for a core: it runs when the core is
        // otherwise idle, and at the lowest normal priority only while its queue is more
        // than half full, so that a sustained load cannot starve it into dropping records.
        crate::sys::lower_thread_priority();
        crate::sys::set_idle_policy(true);
        let mut idle_policy = true;
        self.retain();
        let mut last_retention = Instant::now();
        let mut stopping = false;
        while !stopping {
            let mut batch: Vec<Pending> = Vec::new();
            let mut flushes = Vec::new();
            let deadline = Instant::now() + BATCH_WAIT;
            loop {
                let wait = if batch.is_empty() && flushes.is_empty() {
                    RETENTION_EVERY
                } else {
                    deadline.saturating_duration_since(Instant::now())
                };
                match receiver.recv_timeout(wait) {
                    Ok(Message::Record(pending)) => {
                        batch.push(*pending);
                        if batch.len() >= BATCH {
                            break;
                        }
                    }
                    Ok(Message::Flush(done)) => {
                        flushes.push(done);
                        // Everything sent before the flush is already received.
                        while let Ok(message) = receiver.try_recv() {
                            match message {
                                Message::Record(pending) => batch.push(*pending),
                                Message::Flush(done) => flushes.push(done),
                                Message::Stop => stopping = true,
                            }
                        }
                        break;
                    }
                    Ok(Message::Stop) => {
                        stopping = true;
                        while let Ok(Message::Record(pending)) = receiver.try_recv() {
                            batch.push(*pending);
                        }
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                }
            }
            let queued = self.stats.queued.load(Ordering::Relaxed);
            if idle_policy && queued > self.queue_capacity / 2 {
                crate::sys::set_idle_policy(false);
                idle_policy = false;
            } else if !idle_policy && queued < self.queue_capacity / 10 {
                crate::sys::set_idle_policy(true);
                idle_policy = true;
            }
            if !batch.is_empty() {
                self.write(batch);
            }
            for done in flushes {
                let _ = done.send(());
            }
            if last_retention.elapsed() >= RETENTION_EVERY {
                last_retention = Instant::now();
                self.retain();
            }
        }
    }

    fn write(&self, batch: Vec<Pending>) {
        let mut records = Vec::with_capacity(batch.len());
        let mut counters: HashMap<(String, Period, i64), Usage> = HashMap::new();
        for pending in batch {
            let bytes = pending.body_bytes();
            self.stats.queued_bytes.fetch_sub(
                bytes.min(self.stats.queued_bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let (record, tokens, cost) = self.finish(&pending);
            let at = pending.started_ms.div_euclid(1000);
            let mut add = |scope: String, usage: Usage| {
                for period in Period::ALL {
                    let slot = counters
                        .entry((scope.clone(), period, period.window(at)))
                        .or_default();
                    slot.requests += usage.requests;
                    slot.tokens += usage.tokens;
                    slot.cost += usage.cost;
                }
            };
            if let Some(key) = &pending.key {
                let scope = key_scope(&key.name);
                self.settle_key(&scope, &pending, at, tokens, cost);
                add(
                    scope,
                    Usage {
                        requests: u64::from(pending.ticket.is_some()),
                        tokens,
                        cost,
                    },
                );
            }
            for attempt in &pending.attempts {
                add(
                    upstream_scope(&attempt.upstream),
                    Usage {
                        requests: 1,
                        tokens: 0,
                        cost: 0.0,
                    },
                );
            }
            if let Some(upstream) = &pending.upstream {
                let scope = upstream_scope(upstream);
                let signed = i64::try_from(tokens).unwrap_or(i64::MAX);
                self.limiter.settle(&scope, at, signed, cost);
                if let Some(shared) = &self.shared {
                    shared.settle(Settlement {
                        scope: scope.clone(),
                        at: None,
                        requests: 0,
                        tokens: signed,
                        cost,
                    });
                }
                add(
                    scope,
                    Usage {
                        requests: 0,
                        tokens,
                        cost,
                    },
                );
            }
            self.metrics.observe(&record);
            if let (Some(traces), Some(trace)) = (&self.traces, &pending.trace) {
                traces.export(crate::traces::spans(&record, trace, &pending.attempts));
            }
            records.push(record);
        }
        let counters: Vec<CounterDelta> = counters
            .into_iter()
            .filter(|(_, usage)| usage.requests > 0 || usage.tokens > 0 || usage.cost > 0.0)
            .map(|((scope, period, window), usage)| CounterDelta {
                scope,
                period,
                window,
                usage,
            })
            .collect();
        match self.store.write(&records, &counters) {
            Ok(()) => {
                self.stats
                    .written
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
            }
            Err(error) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("cannot write {} log records: {error:#}", records.len());
            }
        }
    }

    /// Corrects the key's counts by the answer: what it used less what its admission
    /// reserved, in the windows of that admission. A request counted in Redis is counted
    /// here by its tokens only (this instance's fallback view); one counted here is added
    /// to Redis whole.
    fn settle_key(&self, scope: &str, pending: &Pending, at: i64, tokens: u64, cost: f64) {
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        let ticket = pending.ticket;
        let reserved = ticket.map(|t| t.reserve).unwrap_or_default();
        let reserved_tokens = i64::try_from(reserved.tokens).unwrap_or(i64::MAX);
        match ticket {
            Some(ticket) if ticket.shared => {
                self.limiter.settle(scope, at, tokens, cost);
                if let Some(shared) = &self.shared {
                    shared.settle(Settlement {
                        scope: scope.to_string(),
                        at: Some(ticket.at),
                        requests: 0,
                        tokens: tokens - reserved_tokens,
                        cost: cost - reserved.cost,
                    });
                }
            }
            _ => {
                let local_at = ticket.map_or(at, |t| t.at);
                self.limiter.settle(
                    scope,
                    local_at,
                    tokens - reserved_tokens,
                    cost - reserved.cost,
                );
                if let Some(shared) = &self.shared {
                    shared.settle(Settlement {
                        scope: scope.to_string(),
                        at: None,
                        requests: i64::from(ticket.is_some()),
                        tokens,
                        cost,
                    });
                }
            }
        }
    }

    fn retain(&self) {
        let now_ms = crate::limits::unix_now_ms();
        let before = now_ms - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX / 2);
        match self.store.retain(before, self.max_rows) {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "log retention removed old requests"),
            Err(error) => tracing::warn!("log retention failed: {error:#}"),
        }
    }

    /// Turns a pending record into its stored form; returns it with its tokens and cost.
    fn finish(&self, pending: &Pending) -> (LogRecord, u64, f64) {
        let request_json: Option<Value> = pending
            .request_body
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok());
        let response = pending.response_body.bytes();
        let content_type = pending.response_content_type.as_deref().unwrap_or("");
        let textual = content_type.is_empty()
            || content_type.contains("json")
            || content_type.starts_with("text/");
        let reply: Reply = if pending.stream {
            usage::read_stream_reply(&response)
        } else if content_type.contains("json") {
            usage::read_json_reply(&response)
        } else {
            Reply::default()
        };
        let succeeded = (200..300).contains(&pending.status);
        let model_for_tokens = pending
            .upstream_model
            .as_deref()
            .or(pending.model.as_deref())
            .unwrap_or("gpt-4o");
        let (token_usage, source) = match reply.usage {
            Some(u) => (Some(u), Some(UsageSource::Upstream)),
            None if succeeded
                && counts_tokens(&pending.path)
                && !pending.response_body.truncated() =>
            {
                (
                    Some(usage::estimate(
                        model_for_tokens,
                        request_json.as_ref(),
                        &reply,
                    )),
                    Some(UsageSource::Tokenizer),
                )
            }
            None => (None, None),
        };
        let price = pending
            .model
            .as_deref()
            .and_then(|m| self.pricing.get(m))
            .or_else(|| {
                pending
                    .upstream_model
                    .as_deref()
                    .and_then(|m| self.pricing.get(m))
            });
        let cost = match (price, token_usage) {
            (Some(price), Some(u)) => Some(usage::cost(*price, u)),
            _ => None,
        };
        let body_text = |bytes: &Bytes, textual: bool, truncated: bool| -> Option<String> {
            if !self.log_bodies || bytes.is_empty() {
                return None;
            }
            if !textual {
                return Some(format!(
                    "<{} bytes of {}>",
                    bytes.len(),
                    if content_type.is_empty() {
                        "binary"
                    } else {
                        content_type
                    }
                ));
            }
            let mut text = String::from_utf8_lossy(bytes).into_owned();
            if truncated {
                text.push_str("\n…[truncated]");
            }
            Some(text)
        };
        let request_textual = pending
            .request_headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| ct.contains("json") || ct.starts_with("text/"));
        let attempts: Vec<Value> = pending
            .attempts
            .iter()
            .map(|a| {
                json!({"upstream": a.upstream, "key": a.key, "status": a.status, "error": a.error,
                    "ms": (a.elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0})
            })
            .collect();
        let record = LogRecord {
            id: pending.id.clone(),
            ts: pending.started_ms,
            client_ip: pending.client_ip.to_canonical().to_string(),
            key_name: pending.key_label.clone(),
            method: pending.method.to_string(),
            path: pending.path.clone(),
            model: pending.model.clone(),
            upstream_model: pending.upstream_model.clone(),
            upstream: pending.upstream.clone(),
            upstream_key: pending.upstream_key.clone(),
            status: pending.status,
            latency_ms: millis(pending.latency.unwrap_or_else(|| pending.started.elapsed())),
            ttfb_ms: pending.first_byte.map(millis),
            prompt_tokens: token_usage.map(|u| u.prompt),
            completion_tokens: token_usage.map(|u| u.completion),
            total_tokens: token_usage.map(|u| u.total),
            cost,
            usage_source: source.map(|s| s.name().to_string()),
            stream: pending.stream,
            error: pending.error.clone(),
            tries: u32::try_from(pending.attempts.len()).unwrap_or(u32::MAX),
            attempts: Value::Array(attempts).to_string(),
            request_headers: masked_headers(&pending.request_headers).to_string(),
            response_headers: masked_headers(&pending.response_headers).to_string(),
            request_body: pending
                .request_body
                .as_ref()
                .and_then(|b| body_text(b, request_textual, false)),
            response_body: body_text(&response, textual, pending.response_body.truncated()),
            reply_text: reply.text.clone().filter(|_| self.log_bodies),
            reply_tool_calls: (!reply.tool_calls.is_empty() && self.log_bodies)
                .then(|| Value::Array(reply.tool_calls.clone()).to_string()),
        };
        (
            record,
            token_usage.map_or(0, |u| u.total),
            cost.unwrap_or(0.0),
        )
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Headers as a JSON object, credentials masked (`Bearer fk-…a1b2`).
pub fn masked_headers(headers: &HeaderMap) -> Value {
    let mut object = serde_json::Map::new();
    for (name, value) in headers {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let shown = if crate::headers::is_credential_header(name.as_str()) || value.is_sensitive() {
            match text.split_once(' ') {
                Some((scheme, secret))
                    if scheme.eq_ignore_ascii_case("bearer")
                        || scheme.eq_ignore_ascii_case("basic") =>
                {
                    format!("{scheme} {}", mask(secret.trim()))
                }
                _ => mask(&text),
            }
        } else {
            text
        };
        object.insert(name.to_string(), Value::String(shown));
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_headers_are_masked() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            "Bearer fk-alice-secret-1234".parse().unwrap(),
        );
        headers.insert("x-api-key", "sk-another-secret-9999".parse().unwrap());
        headers.insert("x-admin-key", "admin-secret-4242".parse().unwrap());
        headers.insert(
            "cookie",
            "sluice_session=session-secret-77".parse().unwrap(),
        );
        headers.insert("content-type", "application/json".parse().unwrap());
        let shown = masked_headers(&headers).to_string();
        assert!(
            !shown.contains("alice-secret")
                && !shown.contains("another-secret")
                && !shown.contains("admin-secret")
                && !shown.contains("session-secret"),
            "{shown}"
        );
        assert!(shown.contains("Bearer fk-…1234"), "{shown}");
        assert!(shown.contains("application/json"));
    }

    #[test]
    fn captures_are_bounded_and_keep_tails() {
        let mut captured = Captured::default();
        captured.push(&Bytes::from_static(b"0123456789"), 6);
        captured.push(&Bytes::from_static(b"abc"), 6);
        assert_eq!(&captured.bytes()[..], b"012345");
        assert!(captured.truncated());
        captured.keep_tail(2);
        assert_eq!(&captured.bytes()[..], b"45");
    }
}
