//! Persistence behind one trait: the request log, its queries for the admin API, and the
//! usage counters that make limits survive a restart. SQLite is the embedded default; the
//! SQL is kept portable (no SQLite-only functions, `ON CONFLICT … DO UPDATE` upserts) so a
//! PostgreSQL backend can implement the same trait with the same behaviour.

pub mod sqlite;

use serde::Serialize;
use serde_json::Value;

use crate::limits::{Period, Usage};

/// One request as the log keeps it. Secrets in headers are already masked.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogRecord {
    pub id: String,
    /// Unix milliseconds.
    pub ts: i64,
    pub client_ip: String,
    pub key_name: String,
    pub method: String,
    pub path: String,
    pub model: Option<String>,
    pub upstream_model: Option<String>,
    pub upstream: Option<String>,
    pub upstream_key: Option<String>,
    pub status: u16,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub cost: Option<f64>,
    pub usage_source: Option<String>,
    pub stream: bool,
    pub error: Option<String>,
    pub tries: u32,
    /// JSON array of the tries: upstream, masked key, status or error, milliseconds.
    pub attempts: String,
    pub request_headers: String,
    pub response_headers: String,
    pub request_body: Option<String>,
    pub response_body: Option<String>,
    pub reply_text: Option<String>,
    pub reply_tool_calls: Option<String>,
}

/// A change to one persisted counter.
#[derive(Debug, Clone, PartialEq)]
pub struct CounterDelta {
    pub scope: String,
    pub period: Period,
    pub window: i64,
    pub usage: Usage,
}

/// Filters for `GET /api/requests`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Text searched in path, model, key, upstream, error and bodies.
    pub search: Option<String>,
    pub model: Option<String>,
    pub key: Option<String>,
    pub upstream: Option<String>,
    pub path: Option<String>,
    /// An exact status (`429`) or a class (`2xx`, `4xx`, `5xx`), or `error` for ≥ 400.
    pub status: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// 1-based.
    pub page: u64,
    pub per_page: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub data: Vec<Value>,
    pub page: u64,
    pub per_page: u64,
    pub total: u64,
    pub has_more: bool,
}

/// What the store can do. Calls block; the gateway makes them from its writer thread and
/// from `spawn_blocking`, never on the async runtime's workers.
pub trait Store: Send + Sync {
    /// Writes log records and counter changes in one transaction.
    fn write(&self, records: &[LogRecord], counters: &[CounterDelta]) -> anyhow::Result<()>;
    /// Deletes records older than `before_ms` and beyond the newest `max_rows`.
    fn retain(&self, before_ms: i64, max_rows: u64) -> anyhow::Result<u64>;
    /// The persisted counters of the given (period, window) pairs.
    fn counters(&self, windows: &[(Period, i64)]) -> anyhow::Result<Vec<CounterDelta>>;
    fn list(&self, query: &ListQuery) -> anyhow::Result<Page>;
    fn get(&self, id: &str) -> anyhow::Result<Option<Value>>;
    /// Totals and breakdowns between `from_ms` and `to_ms`; hourly for the 48 h and daily for
    /// the 30 days before `now_ms`.
    fn stats(&self, from_ms: i64, to_ms: i64, now_ms: i64) -> anyhow::Result<Value>;
    /// Whether the store answers.
    fn ping(&self) -> anyhow::Result<()>;
}

/// Opens the store a URL names.
pub fn open(url: &str) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        return Ok(std::sync::Arc::new(sqlite::SqliteStore::open(path)?));
    }
    anyhow::bail!("unsupported storage URL (expected sqlite://PATH)")
}
