//! The access log: one line per request on stdout, at info, with what an operator greps
//! for (method, path, model, key name, upstream, status, tries, tokens, cost, latency,
//! time to first byte, request id, the cause of a failure), never a secret: keys appear by
//! name, upstream keys not at all, and neither headers nor bodies are written.
//!
//! The line is written off the request path, by a thread of its own reading a bounded queue
//! ([`AccessLog`]; a full queue drops the line and counts it, never making a request or the
//! accountant wait on stdout). With storage on, the accountant queues the line once it has
//! worked out tokens and cost ([`AccessLine::of_record`]); with storage off, the finished
//! record itself is queued.
//! `SLUICE_LOG_FORMAT=json` makes it, like every other line, a JSON object with the fields
//! at the top level.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::accounting::inbox::{InboxReader, InboxSender, Refused, bounded_inbox};
use crate::accounting::records::Pending;
use crate::store::LogRecord;

/// Lines waiting for the access log's thread, with storage off.
const QUEUE: usize = 4096;

/// Where the access log's lines come from: its target, for filtering (`SLUICE_LOG=access=off`).
pub const TARGET: &str = "access";

/// One request's line.
#[derive(Debug, Clone)]
pub struct AccessLine {
    pub id: String,
    pub client: String,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    pub key: String,
    pub upstream: Option<String>,
    pub status: u16,
    pub tries: u32,
    pub stream: bool,
    pub tokens: Option<u64>,
    pub cost: Option<f64>,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    /// Why it failed, when sluice knows: its own error, or a broken or stalled stream.
    pub error: Option<String>,
}

impl AccessLine {
    /// The line of a record the accountant finished: with tokens and cost.
    pub fn of_record(record: &LogRecord) -> Self {
        Self {
            id: record.id.clone(),
            client: record.client_ip.clone(),
            method: record.method.clone(),
            path: record.path.clone(),
            model: record.model.clone(),
            key: record.key_name.clone(),
            upstream: record.upstream.clone(),
            status: record.status,
            tries: record.tries,
            stream: record.stream,
            tokens: record.total_tokens,
            cost: record.cost,
            latency_ms: record.latency_ms,
            ttfb_ms: record.ttfb_ms,
            error: record.error.clone(),
        }
    }

    /// The line of a record no accountant saw (storage off): no tokens, no cost.
    fn of_pending(pending: Pending) -> Self {
        let latency = pending.latency.unwrap_or_else(|| pending.started.elapsed());
        Self {
            id: pending.id,
            client: pending.client_ip.to_canonical().to_string(),
            method: pending.method.to_string(),
            path: pending.path,
            model: pending.model,
            key: pending.key_label,
            upstream: pending.upstream,
            status: pending.status,
            tries: u32::try_from(pending.attempts.len()).unwrap_or(u32::MAX),
            stream: pending.stream,
            tokens: None,
            cost: None,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ttfb_ms: pending.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            error: pending.error,
        }
    }

    /// Writes the line (at info, target [`TARGET`]).
    pub fn emit(&self) {
        let cost = self.cost.map(crate::pure::usage::round_cost);
        let latency_ms = round_ms(self.latency_ms);
        let ttfb_ms = self.ttfb_ms.map(round_ms);
        tracing::info!(
            target: TARGET,
            request_id = self.id.as_str(),
            client = self.client.as_str(),
            method = self.method.as_str(),
            path = self.path.as_str(),
            model = self.model.as_deref(),
            key = self.key.as_str(),
            upstream = self.upstream.as_deref(),
            status = self.status,
            tries = self.tries,
            stream = self.stream,
            tokens = self.tokens,
            cost_usd = cost,
            latency_ms,
            ttfb_ms,
            error = self.error.as_deref(),
            "request"
        );
    }
}

/// Milliseconds to the microsecond: what a latency means.
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// What the access log's thread is handed: a record no accountant will see (handed over
/// whole, no copy), or the line of one the accountant finished.
enum Entry {
    Pending(Box<Pending>),
    Line(Box<AccessLine>),
}

/// The access log's queue and the thread that writes it. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    sender: InboxSender<Entry>,
    /// Lines dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
    warning: Arc<crate::clock::Throttle>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Starts the thread that writes the lines.
    pub fn start() -> std::io::Result<Self> {
        let (sender, receiver) = bounded_inbox(QUEUE);
        std::thread::Builder::new()
            .name("sluice-access".into())
            .spawn(move || run(receiver))?;
        Ok(Self {
            sender,
            dropped: Arc::default(),
            warning: Arc::new(crate::clock::Throttle::new(Duration::from_secs(10))),
        })
    }

    /// Queues the line of a finished request no accountant will see; never blocks. The
    /// record itself is handed over and dropped by the log's thread.
    pub fn submit(&self, pending: Box<Pending>) {
        self.send(Entry::Pending(pending));
    }

    /// Queues a line the accountant made; never blocks.
    pub fn write(&self, line: AccessLine) {
        self.send(Entry::Line(Box::new(line)));
    }

    fn send(&self, entry: Entry) {
        match self.sender.send(entry, false) {
            Ok(()) | Err(Refused::Closed(_)) => {}
            Err(Refused::Full(_)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if self.warning.ready() {
                    tracing::warn!(
                        dropped,
                        "the access log is behind stdout; lines are dropped"
                    );
                }
            }
        }
    }
}

fn run(mut receiver: InboxReader<Entry>) {
    // Fed by requests: its wakes never preempt one (batch class), come about once a
    // millisecond under load (the inbox), and it steps aside for requests between lines.
    crate::sys::set_thread_batch();
    let mut entries = Vec::new();
    while receiver.take(&mut entries) {
        for entry in entries.drain(..) {
            match entry {
                Entry::Pending(pending) => AccessLine::of_pending(*pending).emit(),
                Entry::Line(line) => line.emit(),
            }
            crate::sys::step_aside();
        }
    }
}
