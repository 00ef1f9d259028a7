//! `/metrics` in the Prometheus text format.
//!
//! Per-request series (requests, latency and time-to-first-byte histograms, tokens, upstream
//! errors, refusals, response cache outcomes) are fed by the log writer from finished
//! records, so the request path pays nothing for them; they are there when the request log
//! is on (the default). Gauges (requests in flight, cooldowns, the log queue) are read
//! live by the caller into a plain [`Gauges`] snapshot, so this module knows finished
//! records and numbers, never the gateway. Labels are model, upstream and gateway key
//! *name*, never a key.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::store::LogRecord;

/// Upper bounds in seconds, for request duration and time to first byte.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

type Labels = (String, String, String);

/// The figures read live when `/metrics` is asked for, taken by the caller from the
/// gateway in force.
#[derive(Debug, Default)]
pub struct Gauges<'a> {
    pub upstreams: Vec<UpstreamGauge<'a>>,
    /// Wrong admin keys presented.
    pub admin_auth_failures: u64,
    /// Client addresses locked out after failing admin authentication too often.
    pub admin_lockouts: u64,
    /// Admin authentications refused unchecked from a locked-out address.
    pub admin_auth_refused: u64,
    /// The request log's figures; `None` when storage is off.
    pub log: Option<LogGauges>,
    /// Access log lines dropped (its queue was full: stdout too slow); `None` when off.
    pub access_dropped: Option<u64>,
    /// Alerts dropped (their queue was full); `None` without webhooks.
    pub alerts_dropped: Option<u64>,
}

/// One upstream's live figures.
#[derive(Debug)]
pub struct UpstreamGauge<'a> {
    pub name: &'a str,
    pub in_flight: usize,
    /// Resting after failures.
    pub resting: bool,
}

/// The request log's queue and outcomes, as `/metrics` shows them.
#[derive(Debug, Default)]
pub struct LogGauges {
    pub queued: usize,
    pub written: u64,
    pub dropped: u64,
    pub shed: u64,
    pub trimmed: u64,
    pub write_errors: u64,
    /// Whether the store took the last write.
    pub store_up: bool,
}

#[derive(Debug, Default)]
struct Series {
    requests: HashMap<(String, String, String, u16), u64>,
    duration: HashMap<Labels, Histogram>,
    first_byte: HashMap<Labels, Histogram>,
    tokens: HashMap<(String, String, String, &'static str), u64>,
    /// USD by model and gateway key name.
    cost: HashMap<(String, String), f64>,
    upstream_errors: HashMap<(String, String), u64>,
    refusals: HashMap<(String, u16), u64>,
    /// Response cache outcomes by model: hit, miss, skip.
    cache: HashMap<(String, &'static str), u64>,
    /// USD the cache's hits saved.
    cache_saved: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<Series>,
}

impl Metrics {
    /// Counts a finished request (called by the log writer).
    pub fn observe(&self, record: &LogRecord) {
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        // Configured names only (set by the recorder), so clients cannot add series.
        let model = record
            .model_label
            .clone()
            .or_else(|| record.model.clone())
            .unwrap_or_default();
        let upstream = record.upstream.clone().unwrap_or_default();
        let key = record.key_name.clone();
        *series
            .requests
            .entry((model.clone(), upstream.clone(), key.clone(), record.status))
            .or_default() += 1;
        let labels = (model.clone(), upstream.clone(), key.clone());
        series
            .duration
            .entry(labels.clone())
            .or_default()
            .observe(record.latency_ms / 1000.0);
        if let Some(ttfb) = record.ttfb_ms {
            series
                .first_byte
                .entry(labels)
                .or_default()
                .observe(ttfb / 1000.0);
        }
        for (kind, count) in [
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
        ] {
            if let Some(count) = count.filter(|c| *c > 0) {
                *series
                    .tokens
                    .entry((model.clone(), upstream.clone(), key.clone(), kind))
                    .or_default() += count;
            }
        }
        if let Some(cost) = record.cost.filter(|c| *c > 0.0) {
            *series.cost.entry((model.clone(), key.clone())).or_default() += cost;
        }
        if let Ok(attempts) = serde_json::from_str::<Vec<serde_json::Value>>(&record.attempts) {
            for attempt in &attempts {
                let status = attempt.get("status").and_then(serde_json::Value::as_u64);
                let kind = match status {
                    None => "connect_or_timeout".to_string(),
                    Some(code) if code >= 500 || code == 429 => code.to_string(),
                    Some(_) => continue,
                };
                let name = attempt
                    .get("upstream")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                *series.upstream_errors.entry((name, kind)).or_default() += 1;
            }
        }
        // Refused by sluice itself: no upstream was tried.
        if record.upstream.is_none() && record.status >= 400 {
            *series.refusals.entry((key, record.status)).or_default() += 1;
        }
        // A hit refused by its key's limits was not answered from the cache.
        let outcome = match record.cache.as_deref() {
            Some("hit") if (200..300).contains(&record.status) => Some("hit"),
            Some("miss") => Some("miss"),
            Some("skip") => Some("skip"),
            _ => None,
        };
        if let Some(outcome) = outcome {
            *series.cache.entry((model, outcome)).or_default() += 1;
            series.cache_saved += record.saved_cost.unwrap_or(0.0);
        }
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, data: &HashMap<Labels, Histogram>) {
    for ((model, upstream, key), h) in data {
        let labels = format!(
            "model=\"{}\",upstream=\"{}\",key=\"{}\"",
            escape(model),
            escape(upstream),
            escape(key)
        );
        for (bound, count) in BUCKETS.iter().zip(h.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
    }
}

/// The exposition text: the series `metrics` gathered, then the `gauges`.
pub fn render(metrics: &Metrics, gauges: &Gauges<'_>) -> String {
    let mut out = String::with_capacity(4096);
    render_series(&mut out, metrics);
    render_gauges(&mut out, gauges);
    out
}

/// The per-request series, fed from finished records.
fn render_series(out: &mut String, metrics: &Metrics) {
    if let Ok(series) = metrics.series.lock() {
        out.push_str("# HELP sluice_requests_total Requests answered, by model, upstream, gateway key name and status.\n# TYPE sluice_requests_total counter\n");
        for ((model, upstream, key, status), count) in &series.requests {
            let _ = writeln!(
                out,
                "sluice_requests_total{{model=\"{}\",upstream=\"{}\",key=\"{}\",status=\"{status}\"}} {count}",
                escape(model),
                escape(upstream),
                escape(key)
            );
        }
        out.push_str("# HELP sluice_request_duration_seconds Time from request to the end of the response.\n# TYPE sluice_request_duration_seconds histogram\n");
        histogram(out, "sluice_request_duration_seconds", &series.duration);
        out.push_str("# HELP sluice_time_to_first_byte_seconds Time from request to the upstream's response head.\n# TYPE sluice_time_to_first_byte_seconds histogram\n");
        histogram(out, "sluice_time_to_first_byte_seconds", &series.first_byte);
        out.push_str("# HELP sluice_tokens_total Tokens used, by kind (prompt, completion).\n# TYPE sluice_tokens_total counter\n");
        for ((model, upstream, key, kind), count) in &series.tokens {
            let _ = writeln!(
                out,
                "sluice_tokens_total{{model=\"{}\",upstream=\"{}\",key=\"{}\",kind=\"{kind}\"}} {count}",
                escape(model),
                escape(upstream),
                escape(key)
            );
        }
        out.push_str("# HELP sluice_cost_usd_total What requests cost at the configured prices, in USD, by model and gateway key name.\n# TYPE sluice_cost_usd_total counter\n");
        for ((model, key), cost) in &series.cost {
            let _ = writeln!(
                out,
                "sluice_cost_usd_total{{model=\"{}\",key=\"{}\"}} {}",
                escape(model),
                escape(key),
                crate::pure::usage::round_cost(*cost)
            );
        }
        out.push_str("# HELP sluice_upstream_errors_total Failed tries at an upstream: 429, 5xx, or no response.\n# TYPE sluice_upstream_errors_total counter\n");
        for ((upstream, kind), count) in &series.upstream_errors {
            let _ = writeln!(
                out,
                "sluice_upstream_errors_total{{upstream=\"{}\",kind=\"{kind}\"}} {count}",
                escape(upstream)
            );
        }
        out.push_str("# HELP sluice_cache_requests_total Requests the response cache answered (hit), looked up in vain (miss) or did not look up (skip), by model.\n# TYPE sluice_cache_requests_total counter\n");
        for ((model, outcome), count) in &series.cache {
            let _ = writeln!(
                out,
                "sluice_cache_requests_total{{model=\"{}\",result=\"{outcome}\"}} {count}",
                escape(model)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_cache_saved_usd_total What the response cache's hits would have cost upstream, in USD.\n# TYPE sluice_cache_saved_usd_total counter\nsluice_cache_saved_usd_total {}",
            series.cache_saved
        );
        out.push_str("# HELP sluice_refusals_total Requests sluice refused itself (auth, limits, bad input), by key name and status.\n# TYPE sluice_refusals_total counter\n");
        for ((key, status), count) in &series.refusals {
            let _ = writeln!(
                out,
                "sluice_refusals_total{{key=\"{}\",status=\"{status}\"}} {count}",
                escape(key)
            );
        }
    }
}

/// The live figures: upstreams, admin authentication, the request log.
fn render_gauges(out: &mut String, gauges: &Gauges<'_>) {
    out.push_str("# HELP sluice_upstream_in_flight Requests in flight per upstream.\n# TYPE sluice_upstream_in_flight gauge\n");
    for upstream in &gauges.upstreams {
        let _ = writeln!(
            out,
            "sluice_upstream_in_flight{{upstream=\"{}\"}} {}",
            escape(upstream.name),
            upstream.in_flight
        );
    }
    out.push_str("# HELP sluice_upstream_resting Whether an upstream rests after failures (1) or not (0).\n# TYPE sluice_upstream_resting gauge\n");
    for upstream in &gauges.upstreams {
        let _ = writeln!(
            out,
            "sluice_upstream_resting{{upstream=\"{}\"}} {}",
            escape(upstream.name),
            u8::from(upstream.resting)
        );
    }
    let _ = write!(
        out,
        "# HELP sluice_admin_auth_failures_total Wrong admin keys presented (admin API, login, /metrics, /v1/status).\n# TYPE sluice_admin_auth_failures_total counter\nsluice_admin_auth_failures_total {}\n\
         # HELP sluice_admin_lockouts_total Client addresses locked out after failing admin authentication too often.\n# TYPE sluice_admin_lockouts_total counter\nsluice_admin_lockouts_total {}\n\
         # HELP sluice_admin_auth_refused_total Admin authentications refused unchecked from a locked-out address.\n# TYPE sluice_admin_auth_refused_total counter\nsluice_admin_auth_refused_total {}\n",
        gauges.admin_auth_failures, gauges.admin_lockouts, gauges.admin_auth_refused,
    );
    if let Some(dropped) = gauges.access_dropped {
        let _ = write!(
            out,
            "# HELP sluice_access_log_dropped_total Access log lines dropped because stdout fell behind.\n# TYPE sluice_access_log_dropped_total counter\nsluice_access_log_dropped_total {dropped}\n"
        );
    }
    if let Some(dropped) = gauges.alerts_dropped {
        let _ = write!(
            out,
            "# HELP sluice_alerts_dropped_total Alerts dropped because their queue was full.\n# TYPE sluice_alerts_dropped_total counter\nsluice_alerts_dropped_total {dropped}\n"
        );
    }
    if let Some(s) = &gauges.log {
        let _ = write!(
            out,
            "# HELP sluice_log_queue_depth Records waiting for the log writer.\n# TYPE sluice_log_queue_depth gauge\nsluice_log_queue_depth {}\n\
             # HELP sluice_log_written_total Records written to the log.\n# TYPE sluice_log_written_total counter\nsluice_log_written_total {}\n\
             # HELP sluice_log_dropped_total Records the store refused or lost (refused one by one, full disk, unreachable past the queue).\n# TYPE sluice_log_dropped_total counter\nsluice_log_dropped_total {}\n\
             # HELP sluice_log_shed_total Rows not written because the log writer was behind (storage.overflow); their accounting is kept.\n# TYPE sluice_log_shed_total counter\nsluice_log_shed_total {}\n\
             # HELP sluice_log_trimmed_total Rows written without all of their bodies, the writer being behind.\n# TYPE sluice_log_trimmed_total counter\nsluice_log_trimmed_total {}\n\
             # HELP sluice_log_write_errors_total Failed log writes.\n# TYPE sluice_log_write_errors_total counter\nsluice_log_write_errors_total {}\n\
             # HELP sluice_log_store_up Whether the log store took the last write (1) or could not be reached (0).\n# TYPE sluice_log_store_up gauge\nsluice_log_store_up {}\n",
            s.queued,
            s.written,
            s.dropped,
            s.shed,
            s.trimmed,
            s.write_errors,
            u8::from(s.store_up),
        );
    }
}
