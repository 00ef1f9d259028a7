//! Persistence behind one trait: the request log, its queries for the admin API, and the
//! usage counters that make limits survive a restart. SQLite is the embedded default; the
//! SQL is kept portable (no SQLite-only functions, `ON CONFLICT … DO UPDATE` upserts) so a
//! PostgreSQL backend can implement the same trait with the same behaviour.

pub mod postgres;
pub mod sqlite;

use serde::Serialize;
use serde_json::Value;

use crate::pure::limits::{Period, Usage};

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
    /// What the response cache did: `hit`, `miss`, `skip`; `None` with the cache off.
    pub cache: Option<String>,
    /// What a cache hit saved: the cost the upstream would have charged.
    pub saved_cost: Option<f64>,
    /// The model as statistics name it (a configured name, or `other`), so clients cannot
    /// grow the rollups with names of their own; `None`: the model as sent.
    #[serde(skip)]
    pub model_label: Option<String>,
}

impl LogRecord {
    /// Makes every text storable: PostgreSQL refuses NUL characters in text, so they
    /// become U+FFFD (in both stores, so they answer alike).
    pub fn sanitise(&mut self) {
        fn clean(text: &mut String) {
            if text.contains('\0') {
                *text = text.replace('\0', "\u{FFFD}");
            }
        }
        for text in [
            &mut self.id,
            &mut self.client_ip,
            &mut self.key_name,
            &mut self.method,
            &mut self.path,
            &mut self.attempts,
            &mut self.request_headers,
            &mut self.response_headers,
        ] {
            clean(text);
        }
        for text in [
            &mut self.model,
            &mut self.upstream_model,
            &mut self.upstream,
            &mut self.upstream_key,
            &mut self.usage_source,
            &mut self.error,
            &mut self.request_body,
            &mut self.response_body,
            &mut self.reply_text,
            &mut self.reply_tool_calls,
            &mut self.cache,
            &mut self.model_label,
        ]
        .into_iter()
        .flatten()
        {
            clean(text);
        }
    }
}

/// The store cannot be reached now (it is reconnecting): a state, not a bad request.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// The reason a store error says it is unavailable, if it does.
pub fn unavailable(error: &anyhow::Error) -> Option<&Unavailable> {
    error.chain().find_map(|e| e.downcast_ref::<Unavailable>())
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
    /// Keyset cursor (`ts`, `id`): rows older than this one. Pages through any number of
    /// rows at the same cost, where `page` costs more the deeper it goes.
    pub before: Option<(i64, String)>,
    /// 1-based.
    pub page: u64,
    pub per_page: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_cover_whole_hours_of_the_range_and_rank_busiest_first() {
        let now: i64 = 1_795_636_800_000 + 30 * 60_000; // 20:30 UTC
        let row = |hours_ago: i64, model: &str, requests: u64| HourRow {
            hour_ms: (now.div_euclid(HOUR_MS) - hours_ago) * HOUR_MS,
            model: model.into(),
            upstream: "u".into(),
            key_name: "k".into(),
            sums: RollupRow {
                requests,
                succeeded: requests - 1,
                latency_sum: 10.0 * requests as f64,
                ..RollupRow::default()
            },
        };
        let rows = [
            row(0, "b", 2),
            row(0, "a", 2),
            row(1, "c", 5),
            row(72, "old", 9),
        ];
        // The last 90 minutes: the current hour and the one before, not the old row.
        let answer = stats_answer(&rows, &[], now - 90 * 60_000, now, now);
        assert_eq!(answer["totals"]["requests"], 9);
        assert_eq!(answer["totals"]["errors"], 3);
        assert_eq!(answer["totals"]["avg_latency_ms"], 10.0);
        let names: Vec<&str> = answer["by_model"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["c", "a", "b"], "busiest first, ties by name");
        assert_eq!(answer["hourly"].as_array().unwrap().len(), 2);
        let daily: Vec<u64> = answer["daily"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["requests"].as_u64().unwrap())
            .collect();
        assert_eq!(
            daily,
            [9, 9],
            "three days ago (outside the range) and today"
        );
        assert_eq!(answer["hourly_by"]["model"].as_array().unwrap().len(), 3);
        let empty = stats_answer(&[], &[], now - HOUR_MS, now, now);
        assert_eq!(empty["totals"]["requests"], 0);
        assert!(empty["totals"]["avg_latency_ms"].is_null());
    }

    #[test]
    fn histogram_percentiles_are_within_five_percent() {
        for latency in [0.05, 0.3, 1.0, 12.5, 900.0] {
            let upper = bucket_upper_ms(latency_bucket(latency));
            assert!(
                upper >= latency && upper <= latency * 1.051,
                "{latency} -> {upper}"
            );
        }
        let buckets: Vec<(i64, i64)> = (1..=100).map(|ms| (latency_bucket(ms as f64), 1)).collect();
        let p95 = histogram_percentile(&buckets, 95.0).unwrap();
        assert!((95.0..=100.0).contains(&p95), "{p95}");
        assert_eq!(histogram_percentile(&[], 95.0), None);
    }
}

/// The rows a `status` filter selects, whatever the SQL dialect: `error` (≥ 400), a class
/// (`4xx`), or one status (`429`); anything else selects nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Range(i64, i64),
    Exact(i64),
    Nothing,
}

impl StatusFilter {
    pub fn parse(text: &str) -> Self {
        if text == "error" {
            return Self::Range(400, 1000);
        }
        if let Some(class) = text.strip_suffix("xx").and_then(|d| d.parse::<i64>().ok()) {
            return match class.checked_mul(100) {
                Some(low) if low < i64::MAX - 100 => Self::Range(low, low + 100),
                _ => Self::Nothing,
            };
        }
        text.parse().map_or(Self::Nothing, Self::Exact)
    }

    /// The SQL condition, with `placeholder` standing for the exact status.
    pub fn sql(self, placeholder: &str) -> String {
        match self {
            Self::Range(low, high) => format!("status >= {low} AND status < {high}"),
            Self::Exact(_) => format!("status = {placeholder}"),
            Self::Nothing => "1 = 0".into(),
        }
    }
}

impl ListQuery {
    /// (page, rows per page, rows to skip): a cursor page starts right after its cursor,
    /// a numbered one after the pages before it.
    pub fn window(&self) -> (u64, u64, u64) {
        let per_page = self.per_page.clamp(1, 500);
        let page = self.page.max(1);
        let offset = if self.before.is_some() {
            0
        } else {
            (page - 1).saturating_mul(per_page)
        };
        (page, per_page, offset)
    }
}

/// A list's total is counted up to this many matches: past it, counting costs more than
/// the page (hundreds of milliseconds at ten million rows) and says little more.
pub const COUNT_LIMIT: u64 = 100_000;

/// SQL counting the rows matching `clause`, at most [`COUNT_LIMIT`] + 1 of them.
pub fn capped_count_sql(clause: &str) -> String {
    format!(
        "SELECT COUNT(*) FROM (SELECT 1 FROM requests {clause} LIMIT {}) AS matched",
        COUNT_LIMIT + 1
    )
}

/// A search first looks through this many of the newest rows matching the other filters
/// (cheap: a common term fills a page there), and only if they hold too few matches asks
/// the search index (cheap for a rare term).
pub const SEARCH_RECENT_ROWS: i64 = 5_000;

impl Page {
    /// A page of search results (`query` asked for up to `per_page + 1` rows). Matches
    /// are not counted (counting a common term costs a scan of the log), so `total` is
    /// the rows up to and on this page: exact on the last page, a lower bound before it,
    /// and absent where the page does not know where it stands: after a cursor (the rows
    /// before it are unknown) or past the last page (where the last one ended is unknown).
    pub fn from_search_rows(data: Vec<Value>, query: &ListQuery) -> Self {
        let (number, per_page, offset) = query.window();
        let mut page = Self::from_rows(data, number, per_page, 0);
        let shown = offset + page.data.len() as u64;
        let placed = query.before.is_none() && (offset == 0 || !page.data.is_empty());
        page.total = placed.then_some(shown);
        page.total_exact = placed && !page.has_more;
        page
    }

    /// A page from up to `per_page + 1` rows (the extra one only says there are more);
    /// `counted` comes from [`capped_count_sql`].
    pub fn from_rows(mut data: Vec<Value>, page: u64, per_page: u64, counted: i64) -> Self {
        let has_more = data.len() as u64 > per_page;
        data.truncate(usize::try_from(per_page).unwrap_or(usize::MAX));
        let next_before = data
            .last()
            .and_then(|row| {
                Some(format!(
                    "{}_{}",
                    row.get("ts")?.as_i64()?,
                    row.get("id")?.as_str()?
                ))
            })
            .filter(|_| has_more);
        Self {
            data,
            page,
            per_page,
            total: Some(u64::try_from(counted).unwrap_or(0).min(COUNT_LIMIT)),
            total_exact: u64::try_from(counted).unwrap_or(0) <= COUNT_LIMIT,
            has_more,
            next_before,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub data: Vec<Value>,
    pub page: u64,
    pub per_page: u64,
    /// Matching rows, counted up to [`COUNT_LIMIT`]; for a search, the rows up to and on
    /// this page, or `None` where that is unknown (see [`Page::from_search_rows`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// `true` when `total` is every match; `false` when more match than `total`, or
    /// `total` is absent.
    pub total_exact: bool,
    pub has_more: bool,
    /// The cursor (`before`) for the next, older page.
    pub next_before: Option<String>,
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
    /// Totals and breakdowns over the hours overlapping `from_ms`..`to_ms` (read from hourly
    /// rollups, so the cost does not grow with the log); hourly for the 48 h and daily for
    /// the 30 days before `now_ms`, in all and per model, upstream and key.
    fn stats(&self, from_ms: i64, to_ms: i64, now_ms: i64) -> anyhow::Result<Value>;
    /// Whether the store answers.
    fn ping(&self) -> anyhow::Result<()>;
    /// Remembers (or, with `upstream` empty, forgets) which upstream created objects.
    fn write_objects(&self, routes: &[ObjectRoute]) -> anyhow::Result<()> {
        let _ = routes;
        Ok(())
    }
    /// Where the object `id` lives, unless unknown or expired at `now_ms`.
    fn object(&self, id: &str, now_ms: i64) -> anyhow::Result<Option<ObjectRoute>> {
        let _ = (id, now_ms);
        Ok(None)
    }
    /// Deletes the routes expired at `now_ms`.
    fn purge_objects(&self, now_ms: i64) -> anyhow::Result<u64> {
        let _ = now_ms;
        Ok(0)
    }
}

/// Which upstream (and key of its pool, masked) created an object, until when: what object
/// affinity keeps across restarts. An empty `upstream` in a write forgets the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRoute {
    pub id: String,
    pub upstream: String,
    pub key: Option<String>,
    /// Unix milliseconds.
    pub expires_ms: i64,
}

pub const HOUR_MS: i64 = 3_600_000;

/// Latency histogram buckets grow by 5%, from 1 µs: a percentile read from them is within
/// 5% of the exact one.
const BUCKET_BASE_MS: f64 = 0.001;
const BUCKET_RATIO: f64 = 1.05;

pub fn latency_bucket(latency_ms: f64) -> i64 {
    let ratio = (latency_ms.max(BUCKET_BASE_MS) / BUCKET_BASE_MS).ln() / BUCKET_RATIO.ln();
    ratio.floor().clamp(0.0, 1000.0) as i64
}

/// The upper bound of a bucket, in milliseconds.
pub fn bucket_upper_ms(bucket: i64) -> f64 {
    let exponent = i32::try_from(bucket + 1).unwrap_or(1001);
    (BUCKET_BASE_MS * BUCKET_RATIO.powi(exponent) * 1000.0).round() / 1000.0
}

/// A percentile of a histogram of (bucket, count) sorted by bucket.
pub fn histogram_percentile(buckets: &[(i64, i64)], percentile: f64) -> Option<f64> {
    let total: i64 = buckets.iter().map(|(_, count)| count).sum();
    if total == 0 {
        return None;
    }
    let rank = ((percentile / 100.0) * total as f64).ceil() as i64;
    let mut seen = 0;
    for (bucket, count) in buckets {
        seen += count;
        if seen >= rank {
            return Some(bucket_upper_ms(*bucket));
        }
    }
    buckets.last().map(|(bucket, _)| bucket_upper_ms(*bucket))
}

/// Per-hour aggregates of a batch of records, for the rollup tables that keep statistics
/// fast however many rows the log holds.
#[derive(Debug, Default)]
pub struct Rollup {
    /// (hour, model, upstream, key) → sums. Ordered, so every writer upserts rows in one
    /// order and concurrent instances cannot deadlock on them.
    pub hourly: std::collections::BTreeMap<(i64, String, String, String), RollupRow>,
    /// (hour, latency bucket) → count.
    pub latency: std::collections::BTreeMap<(i64, i64), u64>,
}

#[derive(Debug, Default, Clone)]
pub struct RollupRow {
    pub requests: u64,
    pub succeeded: u64,
    pub latency_sum: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost: f64,
    /// Requests answered from the response cache, and those it looked up.
    pub cache_hits: u64,
    pub cache_lookups: u64,
    /// What the hits saved.
    pub saved_cost: f64,
}

impl Rollup {
    pub fn of(records: &[LogRecord]) -> Self {
        let mut rollup = Self::default();
        for r in records {
            let hour = r.ts.div_euclid(HOUR_MS) * HOUR_MS;
            let key = (
                hour,
                r.model_label
                    .clone()
                    .or_else(|| r.model.clone())
                    .unwrap_or_default(),
                r.upstream.clone().unwrap_or_default(),
                r.key_name.clone(),
            );
            let row = rollup.hourly.entry(key).or_default();
            row.requests += 1;
            row.succeeded += u64::from((200..400).contains(&r.status));
            row.latency_sum += r.latency_ms;
            row.prompt_tokens += r.prompt_tokens.unwrap_or(0);
            row.completion_tokens += r.completion_tokens.unwrap_or(0);
            row.total_tokens += r.total_tokens.unwrap_or(0);
            row.cost += r.cost.unwrap_or(0.0);
            // A hit refused by its key's limits was not answered from the cache.
            let hit = r.cache.as_deref() == Some("hit") && (200..300).contains(&r.status);
            row.cache_hits += u64::from(hit);
            row.cache_lookups += u64::from(hit || r.cache.as_deref() == Some("miss"));
            row.saved_cost += r.saved_cost.unwrap_or(0.0);
            *rollup
                .latency
                .entry((hour, latency_bucket(r.latency_ms)))
                .or_default() += 1;
        }
        rollup
    }
}

impl RollupRow {
    fn add(&mut self, other: &RollupRow) {
        self.requests += other.requests;
        self.succeeded += other.succeeded;
        self.latency_sum += other.latency_sum;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.cost += other.cost;
        self.cache_hits += other.cache_hits;
        self.cache_lookups += other.cache_lookups;
        self.saved_cost += other.saved_cost;
    }

    /// The aggregate as the stats answer shows it, rates included.
    fn to_json(&self) -> Value {
        let errors = self.requests - self.succeeded.min(self.requests);
        serde_json::json!({
            "requests": self.requests,
            "succeeded": self.succeeded,
            "avg_latency_ms": (self.requests > 0).then(|| self.latency_sum / self.requests as f64),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": self.cost,
            "errors": errors,
            "success_rate": if self.requests > 0 { self.succeeded as f64 / self.requests as f64 } else { 0.0 },
            "cache_hits": self.cache_hits,
            "cache_lookups": self.cache_lookups,
            "cache_hit_rate": (self.cache_lookups > 0).then(|| self.cache_hits as f64 / self.cache_lookups as f64),
            "saved_cost": self.saved_cost,
        })
    }
}

/// The rollup columns a [`HourRow`] is read from, in its fields' order.
pub const HOUR_ROW_COLUMNS: &str = "hour_ms, model, upstream, key_name, requests, succeeded, \
    latency_sum, prompt_tokens, completion_tokens, total_tokens, cost, cache_hits, cache_lookups, saved_cost";

/// One row of the hourly rollup table, as both stores read it.
#[derive(Debug, Clone)]
pub struct HourRow {
    pub hour_ms: i64,
    pub model: String,
    pub upstream: String,
    pub key_name: String,
    pub sums: RollupRow,
}

/// The hours a stats answer covers: (first hour of `[from, to]`, the earliest hour any
/// part of the answer reads). Rows from the earliest hour on are what
/// [`stats_answer`] needs.
pub fn stats_span(from_ms: i64, now_ms: i64) -> (i64, i64) {
    let first = from_ms.div_euclid(HOUR_MS).saturating_mul(HOUR_MS);
    let (since_hour, since_day) = series_starts(now_ms);
    (first, first.min(since_hour).min(since_day))
}

/// Where the hourly (48 h) and daily (30 days) series start.
fn series_starts(now_ms: i64) -> (i64, i64) {
    let day = 24 * HOUR_MS;
    (
        (now_ms.div_euclid(HOUR_MS) - 47) * HOUR_MS,
        (now_ms.div_euclid(day) - 29) * day,
    )
}

/// `/api/stats` from the rollup rows since [`stats_span`]'s earliest hour and the latency
/// histogram of `[from, to]`: totals and breakdowns of `[from, to]` (whole hours), and
/// the hourly and daily series, overall and by model, upstream and key. Both stores read
/// the rows in one query each and share this, so they answer alike, in one order.
pub fn stats_answer(
    rows: &[HourRow],
    buckets: &[(i64, i64)],
    from_ms: i64,
    to_ms: i64,
    now_ms: i64,
) -> Value {
    use std::collections::BTreeMap;
    let (first, _) = stats_span(from_ms, now_ms);
    let (since_hour, since_day) = series_starts(now_ms);
    let day = 24 * HOUR_MS;
    let in_range: Vec<&HourRow> = rows
        .iter()
        .filter(|r| r.hour_ms >= first && r.hour_ms <= to_ms)
        .collect();
    let mut totals_sum = RollupRow::default();
    for row in &in_range {
        totals_sum.add(&row.sums);
    }
    let mut totals = totals_sum.to_json();
    totals["p95_latency_ms"] = serde_json::json!(histogram_percentile(buckets, 95.0));

    type Name = fn(&HourRow) -> &str;
    let dimensions: [(&str, &str, Name); 3] = [
        ("model", "by_model", |r| &r.model),
        ("upstream", "by_upstream", |r| &r.upstream),
        ("key", "by_key", |r| &r.key_name),
    ];
    let series = |bucket: i64, since: i64, name: Option<Name>| -> Vec<Value> {
        let mut groups: BTreeMap<(i64, &str), RollupRow> = BTreeMap::new();
        for row in rows.iter().filter(|r| r.hour_ms >= since) {
            let start = row.hour_ms.div_euclid(bucket) * bucket;
            let label = name.map_or("", |name| name(row));
            groups.entry((start, label)).or_default().add(&row.sums);
        }
        groups
            .into_iter()
            .map(|((start, label), sums)| {
                let mut value = sums.to_json();
                value["start_ms"] = serde_json::json!(start);
                if name.is_some() {
                    value["name"] = serde_json::json!(label);
                }
                value
            })
            .collect()
    };
    let mut answer = serde_json::json!({
        "from_ms": from_ms,
        "to_ms": to_ms,
        "totals": totals,
        "hourly": series(HOUR_MS, since_hour, None),
        "daily": series(day, since_day, None),
        "hourly_by": {},
        "daily_by": {},
    });
    for (label, breakdown, name) in dimensions {
        let mut groups: BTreeMap<&str, RollupRow> = BTreeMap::new();
        for row in &in_range {
            groups.entry(name(row)).or_default().add(&row.sums);
        }
        let mut ranked: Vec<(&str, RollupRow)> = groups.into_iter().collect();
        // Busiest first; ties by name (the map's order, kept by a stable sort).
        ranked.sort_by_key(|(_, sums)| std::cmp::Reverse(sums.requests));
        answer[breakdown] = ranked
            .into_iter()
            .map(|(label, sums)| {
                let mut value = sums.to_json();
                value["name"] = serde_json::json!(label);
                value
            })
            .collect();
        answer["hourly_by"][label] = series(HOUR_MS, since_hour, Some(name)).into();
        answer["daily_by"][label] = series(day, since_day, Some(name)).into();
    }
    answer
}

/// What text search looks through for one record.
pub fn search_text(r: &LogRecord) -> String {
    const BODY_LIMIT: usize = 64 * 1024;
    let clip = |text: &Option<String>| -> String {
        let text = text.as_deref().unwrap_or("");
        let mut end = text.len().min(BODY_LIMIT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    };
    [
        r.id.clone(),
        r.path.clone(),
        r.model.clone().unwrap_or_default(),
        r.upstream_model.clone().unwrap_or_default(),
        r.key_name.clone(),
        r.upstream.clone().unwrap_or_default(),
        r.error.clone().unwrap_or_default(),
        clip(&r.request_body),
        clip(&r.response_body),
        clip(&r.reply_text),
    ]
    .join("\n")
    .to_lowercase()
}

/// A search as a `LIKE` pattern (escape `\`) matching it as a substring of the lowercased
/// [`search_text`]: plain `LIKE` on lowercased text is several times cheaper than a
/// case-insensitive match. `None` for an empty search.
pub fn like_pattern(search: Option<&str>) -> Option<String> {
    let search = search.map(str::trim).filter(|s| !s.is_empty())?;
    let escaped = search
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    Some(format!("%{escaped}%"))
}

/// Opens the store a URL names.
pub fn open(url: &str) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        return Ok(std::sync::Arc::new(sqlite::SqliteStore::open(path)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(std::sync::Arc::new(postgres::PostgresStore::open(url)?));
    }
    anyhow::bail!("unsupported storage URL (expected sqlite://PATH or postgres://…)")
}
