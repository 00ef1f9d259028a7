//! The access log: one line per request on stdout, at info, with what an operator greps
//! for (method, path, model, key name, upstream, status, tries, tokens, cost, latency,
//! time to first byte, request id, the cause of a failure), never a secret: keys appear by
//! name, upstream keys not at all, and neither headers nor bodies are written.
//!
//! The line is written off the request path. With storage on, the accountant writes it once
//! it has worked out tokens and cost ([`AccessLine::of_record`]); with storage off, a
//! finished record goes through [`AccessLog`], a bounded queue read by a thread of its own
//! (a full queue drops the line and counts it, never making a request wait).
//! `SLUICE_LOG_FORMAT=json` makes it, like every other line, a JSON object with the fields
//! at the top level.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use crate::accounting::records::Pending;
use crate::store::LogRecord;

/// Lines waiting for the access log's thread, with storage off.
const QUEUE: usize = 4096;

/// Where the access log's lines come from: its target, for filtering (`SLUICE_LOG=access=off`).
pub const TARGET: &str = "access";

/// One request's line, borrowed from its record.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub id: &'a str,
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub model: Option<&'a str>,
    pub key: &'a str,
    pub upstream: Option<&'a str>,
    pub status: u16,
    pub tries: u32,
    pub stream: bool,
    pub tokens: Option<u64>,
    pub cost: Option<f64>,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    /// Why it failed, when it did: sluice's own error, or the upstream's status.
    pub error: Option<&'a str>,
}

impl<'a> AccessLine<'a> {
    /// The line of a record the accountant finished: with tokens and cost.
    pub fn of_record(record: &'a LogRecord) -> Self {
        Self {
            id: &record.id,
            client: &record.client_ip,
            method: &record.method,
            path: &record.path,
            model: record.model.as_deref(),
            key: &record.key_name,
            upstream: record.upstream.as_deref(),
            status: record.status,
            tries: record.tries,
            stream: record.stream,
            tokens: record.total_tokens,
            cost: record.cost,
            latency_ms: record.latency_ms,
            ttfb_ms: record.ttfb_ms,
            error: record.error.as_deref(),
        }
    }

    /// Writes the line (at info, target [`TARGET`]).
    pub fn emit(&self) {
        let cost = self.cost.map(crate::pure::usage::round_cost);
        let latency_ms = round_ms(self.latency_ms);
        let ttfb_ms = self.ttfb_ms.map(round_ms);
        tracing::info!(
            target: TARGET,
            request_id = self.id,
            client = self.client,
            method = self.method,
            path = self.path,
            model = self.model,
            key = self.key,
            upstream = self.upstream,
            status = self.status,
            tries = self.tries,
            stream = self.stream,
            tokens = self.tokens,
            cost_usd = cost,
            latency_ms,
            ttfb_ms,
            error = self.error,
            "request"
        );
    }
}

/// Milliseconds to the microsecond: what a latency means.
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// The access log's own queue and thread, used when storage is off (with storage on, the
/// accountant writes the lines). Cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLog {
    sender: SyncSender<Box<Pending>>,
    /// Lines dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
    warning: Arc<crate::clock::Throttle>,
}

impl AccessLog {
    /// Starts the thread that writes the lines.
    pub fn start() -> std::io::Result<Self> {
        let (sender, receiver) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("sluice-access".into())
            .spawn(move || run(&receiver))?;
        Ok(Self {
            sender,
            dropped: Arc::default(),
            warning: Arc::new(crate::clock::Throttle::new(Duration::from_secs(10))),
        })
    }

    /// Queues a finished request's line; never blocks. The record itself is handed over
    /// (no copy) and dropped by the log's thread.
    pub fn submit(&self, pending: Box<Pending>) {
        match self.sender.try_send(pending) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
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

fn run(receiver: &Receiver<Box<Pending>>) {
    while let Ok(pending) = receiver.recv() {
        let latency = pending.latency.unwrap_or_else(|| pending.started.elapsed());
        let client = pending.client_ip.to_canonical().to_string();
        let method = pending.method.to_string();
        AccessLine {
            id: &pending.id,
            client: &client,
            method: &method,
            path: &pending.path,
            model: pending.model.as_deref(),
            key: &pending.key_label,
            upstream: pending.upstream.as_deref(),
            status: pending.status,
            tries: u32::try_from(pending.attempts.len()).unwrap_or(u32::MAX),
            stream: pending.stream,
            tokens: None,
            cost: None,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ttfb_ms: pending.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            error: pending.error.as_deref(),
        }
        .emit();
    }
}
