//! Persistence behind one trait: the request log, its queries for the admin API, and the
//! usage counters that make limits survive a restart. SQLite is the embedded default; the
//! SQL is kept portable (no SQLite-only functions, `ON CONFLICT … DO UPDATE` upserts) so a
//! PostgreSQL backend can implement the same trait with the same behaviour.

pub mod postgres;
pub mod sqlite;

use serde::Serialize;
use serde_json::Value;

use crate::pure::limits::{Period, Usage};
use crate::pure::usage::round_cost;

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
    /// The request body's `user` (end-user attribution), cut to [`MAX_USER`] bytes.
    pub user: Option<String>,
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
    /// What the client received (the model name put back, a usage chunk it did not ask
    /// for taken out).
    pub response_body: Option<String>,
    /// The upstream's answer as it came, kept only when it differs from `response_body`.
    pub upstream_response_body: Option<String>,
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
            &mut self.user,
            &mut self.upstream_model,
            &mut self.upstream,
            &mut self.upstream_key,
            &mut self.usage_source,
            &mut self.error,
            &mut self.request_body,
            &mut self.response_body,
            &mut self.upstream_response_body,
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

/// The longest end-user name kept: the field is the client's to fill, so the log and the
/// per-user rollups keep at most this many bytes of it.
pub const MAX_USER: usize = 256;

/// `user` cut to [`MAX_USER`] bytes at a character boundary.
pub fn clip_user(user: &str) -> String {
    let mut end = user.len().min(MAX_USER);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    user[..end].to_string()
}

/// What became of a request, as operators tell failures apart: sluice's own refusals
/// (limits, keys, routes: no upstream was asked) are not the upstreams' failures, and an
/// upstream turning down the client's request (a 4xx) is neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Answered with a status from 200 to 399.
    Ok,
    /// sluice answered with an error itself, before any upstream was tried.
    Refused,
    /// An upstream failed: 5xx, 408, 429, or no answer (sluice's 502/504 after tries).
    Upstream,
    /// An upstream answered 4xx (other than 408 and 429): the request, judged by it.
    Rejected,
}

impl Cause {
    /// The cause of an answer with `status` after `tries` sends to upstreams.
    pub fn of(status: u16, tries: u32) -> Self {
        match status {
            200..400 => Self::Ok,
            _ if tries == 0 => Self::Refused,
            // Below 200: no answer was recorded (the exchange ended first).
            0..200 | 408 | 429 | 500.. => Self::Upstream,
            _ => Self::Rejected,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Upstream => "upstream_error",
            Self::Rejected => "rejected",
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
    /// The end user (`user` in the request body), exactly.
    pub user: Option<String>,
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
    /// Leaves the total uncounted (`Page::total` is `None`): an export pages through
    /// thousands of rows and needs no count at each page.
    pub skip_count: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_text_is_every_searched_field_lowercased_one_per_line() {
        let mut record = LogRecord {
            id: "Req-1".into(),
            path: "/v1/Chat".into(),
            model: Some("GPT-4o".into()),
            key_name: "Alice".into(),
            request_body: Some("Hello WORLD".into()),
            reply_text: Some("Bye".into()),
            ..Default::default()
        };
        assert_eq!(
            search_text(&record),
            "req-1\n/v1/chat\ngpt-4o\n\nalice\n\n\n\nhello world\n\nbye"
        );
        // Beyond ASCII, Unicode's lowercase (one character may change its length).
        record.request_body = Some("GRÜSSE İstanbul ☃".into());
        assert!(search_text(&record).contains("grüsse i\u{307}stanbul ☃"));
        // A body counts up to 64 KiB, cut at a character boundary.
        record.response_body = Some(format!("{}é", "x".repeat(64 * 1024 - 1)));
        let text = search_text(&record);
        assert!(text.contains(&format!("\n{}\n", "x".repeat(64 * 1024 - 1))));
        assert!(!text.contains('é'));
    }

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
                refused: 1,
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
        let rows = StatsRows {
            hours: rows.to_vec(),
            ..StatsRows::default()
        };
        let answer = stats_answer(&rows, now - 90 * 60_000, now, now);
        assert_eq!(answer["totals"]["requests"], 9);
        assert_eq!(answer["totals"]["errors"], 3);
        assert_eq!(answer["totals"]["refused"], 3);
        assert_eq!(answer["totals"]["reached"], 6);
        assert_eq!(
            answer["totals"]["success_rate"], 1.0,
            "refusals are not upstream failures"
        );
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
        let empty = stats_answer(&StatsRows::default(), now - HOUR_MS, now, now);
        assert_eq!(empty["totals"]["requests"], 0);
        assert!(empty["totals"]["avg_latency_ms"].is_null());
    }

    #[test]
    fn causes_tell_refusals_from_upstream_failures() {
        assert_eq!(Cause::of(200, 1), Cause::Ok);
        assert_eq!(Cause::of(429, 0), Cause::Refused);
        assert_eq!(Cause::of(401, 0), Cause::Refused);
        assert_eq!(Cause::of(429, 1), Cause::Upstream);
        assert_eq!(Cause::of(502, 3), Cause::Upstream);
        assert_eq!(Cause::of(400, 1), Cause::Rejected);
        assert_eq!(Cause::of(0, 1), Cause::Upstream, "no answer recorded");
        assert_eq!(clip_user(&"é".repeat(200)).len(), 256);
    }

    #[test]
    fn percentiles_over_time_and_users_by_cost() {
        let now: i64 = 1_795_636_800_000;
        let hour = now.div_euclid(HOUR_MS) * HOUR_MS;
        let user = |name: &str, cost: f64| {
            let sums = RollupRow {
                requests: 1,
                succeeded: 1,
                cost,
                total_tokens: 10,
                ..RollupRow::default()
            };
            (name.to_string(), sums)
        };
        let users = vec![
            user("cheap", 0.1),
            user("dear", 2.0),
            user("also-cheap", 0.1),
        ];
        assert_eq!(charted_users(&users), ["dear", "also-cheap", "cheap"]);
        let latency: Vec<(i64, i64, i64)> = (1..=100)
            .map(|ms| (hour, latency_bucket(ms as f64), 1))
            .collect();
        let ttfb = vec![(hour, latency_bucket(5.0), 4)];
        let histograms = |rows: &Vec<(i64, i64, i64)>| Histograms {
            hourly: rows.clone(),
            daily: rows.clone(),
            range: rows.clone(),
        };
        let rows = StatsRows {
            users,
            latency: histograms(&latency),
            ttfb: histograms(&ttfb),
            ..StatsRows::default()
        };
        let answer = stats_answer(&rows, now - HOUR_MS, now, now);
        let names: Vec<&str> = answer["by_user"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["dear", "also-cheap", "cheap"], "dearest first");
        let series = &answer["latency_hourly"][0];
        assert_eq!(series["start_ms"], hour);
        let p50 = series["p50_ms"].as_f64().unwrap();
        assert!((50.0..=53.0).contains(&p50), "{p50}");
        assert!(series["ttfb_p95_ms"].as_f64().unwrap() >= 5.0);
        assert_eq!(answer["totals"]["ttfb_p50_ms"], series["ttfb_p50_ms"]);
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
    /// The page without a total when the query asked for none ([`ListQuery::skip_count`]).
    pub fn uncounted_if(mut self, skip: bool) -> Self {
        if skip {
            self.total = None;
            self.total_exact = false;
        }
        self
    }

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
    /// the 30 days before `now_ms`, in all and per model, upstream, key and end user
    /// (see [`stats_answer`]).
    fn stats(&self, from_ms: i64, to_ms: i64, now_ms: i64) -> anyhow::Result<Value>;
    /// The distinct values the list's filters offer (see [`values_answer`]).
    fn values(&self) -> anyhow::Result<Value>;
    /// Whether the store answers.
    fn ping(&self) -> anyhow::Result<()>;
    /// The log went quiet after a burst of writes (at least [`BURST_ROWS`]): memory the
    /// writer's caches filled (pages of the log read back to update its indexes) goes back
    /// to the allocator. Without it a burst of streams leaves tens of MiB held until the
    /// process ends.
    fn release_caches(&self) {}
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
    /// Every key, team and admin account managed at run time, with the version of the set
    /// (bumped by every change).
    fn managed(&self) -> anyhow::Result<(i64, Vec<Managed>)>;
    /// The version of the managed set: cheap, polled to notice other instances' changes.
    fn managed_version(&self) -> anyhow::Result<i64>;
    /// Applies one change to the managed set and writes its audit entry, in one
    /// transaction. A name or id already taken fails with [`Conflict`], a change to
    /// nothing with [`NotFound`].
    fn change_managed(&self, change: &ManagedChange, audit: &AuditEntry) -> anyhow::Result<()>;
    /// The newest audit entries (older than the entry `before`, when given), newest first.
    fn audit(&self, before: Option<i64>, limit: u64) -> anyhow::Result<Vec<AuditEntry>>;
}

/// A key, team or admin account as the store keeps it: its kind (`key`, `team`, `admin`),
/// id, unique name and JSON body. Bodies hold hashes, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub kind: String,
    pub id: String,
    pub name: String,
    pub body: String,
}

/// One change to the managed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagedChange {
    /// A new one; its id and name must be free.
    Insert(Managed),
    /// A new body for an existing one (found by kind and id).
    Update(Managed),
    Delete {
        kind: String,
        id: String,
    },
}

/// Who changed what, when and from where: never a secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Assigned by the store.
    pub id: i64,
    /// Unix milliseconds.
    pub ts: i64,
    /// `admin key` or `admin:<name>`.
    pub actor: String,
    /// The client's address.
    pub address: String,
    /// `key.create`, `team.update`, `admin.delete`…
    pub action: String,
    /// The kind and id of what changed (`key:key_1a2b…`).
    pub target: String,
    /// What changed, as JSON text (fields and new values; secrets left out).
    pub changes: String,
}

/// The name or id of a new key, team or admin is taken.
#[derive(Debug)]
pub struct Conflict;

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the name is taken")
    }
}

impl std::error::Error for Conflict {}

/// The key, team or admin to change does not exist.
#[derive(Debug)]
pub struct NotFound;

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no such entry")
    }
}

impl std::error::Error for NotFound {}

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
    /// (hour, time-to-first-byte bucket) → count, for requests that had a first byte.
    pub ttfb: std::collections::BTreeMap<(i64, i64), u64>,
    /// (hour, end user) → sums, for requests that named a user.
    pub users: std::collections::BTreeMap<(i64, String), RollupRow>,
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
    /// Answered by sluice itself with an error ([`Cause::Refused`]).
    pub refused: u64,
    /// Failed at an upstream ([`Cause::Upstream`]).
    pub upstream_errors: u64,
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
            rollup.hourly.entry(key).or_default().count(r);
            if let Some(user) = &r.user {
                rollup
                    .users
                    .entry((hour, user.clone()))
                    .or_default()
                    .count(r);
            }
            *rollup
                .latency
                .entry((hour, latency_bucket(r.latency_ms)))
                .or_default() += 1;
            if let Some(ttfb) = r.ttfb_ms {
                *rollup.ttfb.entry((hour, latency_bucket(ttfb))).or_default() += 1;
            }
        }
        rollup
    }
}

/// The sums of a rollup row as both stores' tables hold them, in [`RollupRow`]'s order.
pub const ROLLUP_SUMS: &str = "requests, succeeded, latency_sum, prompt_tokens, \
    completion_tokens, total_tokens, cost, refused, upstream_errors, cache_hits, cache_lookups, \
    saved_cost";

impl RollupRow {
    fn count(&mut self, r: &LogRecord) {
        self.requests += 1;
        self.succeeded += u64::from((200..400).contains(&r.status));
        self.latency_sum += r.latency_ms;
        self.prompt_tokens += r.prompt_tokens.unwrap_or(0);
        self.completion_tokens += r.completion_tokens.unwrap_or(0);
        self.total_tokens += r.total_tokens.unwrap_or(0);
        self.cost += r.cost.unwrap_or(0.0);
        match Cause::of(r.status, r.tries) {
            Cause::Refused => self.refused += 1,
            Cause::Upstream => self.upstream_errors += 1,
            Cause::Ok | Cause::Rejected => {}
        }
        // A hit refused by its key's limits was not answered from the cache.
        let hit = r.cache.as_deref() == Some("hit") && (200..300).contains(&r.status);
        self.cache_hits += u64::from(hit);
        self.cache_lookups += u64::from(hit || r.cache.as_deref() == Some("miss"));
        self.saved_cost += r.saved_cost.unwrap_or(0.0);
    }

    fn add(&mut self, other: &RollupRow) {
        self.requests += other.requests;
        self.succeeded += other.succeeded;
        self.latency_sum += other.latency_sum;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.cost += other.cost;
        self.refused += other.refused;
        self.upstream_errors += other.upstream_errors;
        self.cache_hits += other.cache_hits;
        self.cache_lookups += other.cache_lookups;
        self.saved_cost += other.saved_cost;
    }

    /// The aggregate as the stats answer shows it, rates included. `success_rate` is of
    /// the requests that reached an upstream (`reached`): sluice's own refusals count
    /// apart (`refused`), so a burst of over-limit clients does not read as failing
    /// upstreams. `rejected`: upstreams' 4xx answers (the request, judged by them).
    fn to_json(&self) -> Value {
        let errors = self.requests - self.succeeded.min(self.requests);
        let refused = self.refused.min(errors);
        let upstream_errors = self.upstream_errors.min(errors - refused);
        let reached = self.requests - refused;
        serde_json::json!({
            "requests": self.requests,
            "succeeded": self.succeeded,
            "avg_latency_ms": (self.requests > 0).then(|| self.latency_sum / self.requests as f64),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": round_cost(self.cost),
            "errors": errors,
            "refused": refused,
            "upstream_errors": upstream_errors,
            "rejected": errors - refused - upstream_errors,
            "reached": reached,
            "success_rate": if reached > 0 { self.succeeded as f64 / reached as f64 } else { 0.0 },
                        "cache_hits": self.cache_hits,
            "cache_lookups": self.cache_lookups,
            "cache_hit_rate": (self.cache_lookups > 0).then(|| self.cache_hits as f64 / self.cache_lookups as f64),
            "saved_cost": round_cost(self.saved_cost),
        })
    }
}

/// The rollup columns a [`HourRow`] is read from, in its fields' order (the sums as in
/// [`ROLLUP_SUMS`]).
pub const HOUR_ROW_COLUMNS: &str = "hour_ms, model, upstream, key_name, requests, succeeded, \
    latency_sum, prompt_tokens, completion_tokens, total_tokens, cost, refused, upstream_errors, cache_hits, \
    cache_lookups, saved_cost";

/// The per-user rollup columns a [`UserRow`] is read from, in its fields' order.
pub const USER_ROW_COLUMNS: &str = "hour_ms, end_user, requests, succeeded, latency_sum, \
    prompt_tokens, completion_tokens, total_tokens, cost, refused, upstream_errors, cache_hits, \
    cache_lookups, saved_cost";

/// One row of the per-user rollup table.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub hour_ms: i64,
    pub user: String,
    pub sums: RollupRow,
}

/// What `/api/stats` is computed from, as both stores read it with [`StatsPlan`]'s
/// queries.
#[derive(Debug, Clone, Default)]
pub struct StatsRows {
    /// The hourly rollup rows from [`stats_span`]'s earliest hour on.
    pub hours: Vec<HourRow>,
    /// The dearest end users of the range ([`StatsPlan::users_sql`]).
    pub users: Vec<(String, RollupRow)>,
    /// How many end users the range has.
    pub users_in_range: u64,
    /// The charted users' ([`charted_users`]) hourly rows since the daily series start.
    pub user_hours: Vec<UserRow>,
    pub latency: Histograms,
    pub ttfb: Histograms,
}

/// A histogram's (period start, bucket, count) rows: per hour for the hourly series, per
/// day for the daily one, and over the whole range.
#[derive(Debug, Clone, Default)]
pub struct Histograms {
    pub hourly: Vec<(i64, i64, i64)>,
    pub daily: Vec<(i64, i64, i64)>,
    pub range: Vec<(i64, i64, i64)>,
}

/// Users shown in the breakdown (the dearest) and in the per-user series; the store reads
/// more than it shows, so sums that differ in their last bits between databases cannot
/// change who is shown.
const TOP_USERS: usize = 50;
const USERS_READ: usize = 200;
const SERIES_USERS: usize = 8;

/// The queries behind `/api/stats`, in SQL both stores run. Their bounds are numbers
/// sluice computes (never a client's text), written into the SQL; the only text, the
/// charted users' names, goes in as parameters. Each reads grouped rows, so a stats answer
/// costs what the hours, buckets and users it shows cost, not what the log holds.
#[derive(Debug, Clone, Copy)]
pub struct StatsPlan {
    first: i64,
    earliest: i64,
    to_ms: i64,
    since_hour: i64,
    since_day: i64,
}

impl StatsPlan {
    pub fn new(from_ms: i64, to_ms: i64, now_ms: i64) -> Self {
        let (first, earliest) = stats_span(from_ms, now_ms);
        let (since_hour, since_day) = series_starts(now_ms);
        Self {
            first,
            earliest,
            to_ms,
            since_hour,
            since_day,
        }
    }

    /// [`HourRow`]s since the earliest hour any part of the answer reads.
    pub fn hours_sql(&self) -> String {
        format!(
            "SELECT {HOUR_ROW_COLUMNS} FROM rollup_hourly WHERE hour_ms >= {}",
            self.earliest
        )
    }

    /// The dearest users of the range: `end_user`, then [`ROLLUP_SUMS`] summed.
    pub fn users_sql(&self) -> String {
        format!(
            "SELECT end_user, {} FROM rollup_users WHERE hour_ms >= {} AND hour_ms <= {} \
             GROUP BY end_user ORDER BY SUM(cost) DESC, end_user LIMIT {USERS_READ}",
            summed_sums(),
            self.first,
            self.to_ms
        )
    }

    /// How many users the range has (one number).
    pub fn users_count_sql(&self) -> String {
        format!(
            "SELECT COUNT(DISTINCT end_user) FROM rollup_users WHERE hour_ms >= {} AND hour_ms <= {}",
            self.first, self.to_ms
        )
    }

    /// [`UserRow`]s of `count` users (parameters `{mark}1`…) since the daily series start.
    pub fn user_hours_sql(&self, count: usize, mark: &str) -> String {
        let names: Vec<String> = (1..=count.max(1)).map(|n| format!("{mark}{n}")).collect();
        format!(
            "SELECT {USER_ROW_COLUMNS} FROM rollup_users WHERE hour_ms >= {} AND end_user IN ({})",
            self.since_day,
            names.join(", ")
        )
    }

    /// The histogram `table`'s rows as [`Histograms`] holds them: hourly, daily, range.
    pub fn histogram_sql(&self, table: &str) -> [String; 3] {
        let day = 24 * HOUR_MS;
        [
            format!(
                "SELECT hour_ms, bucket, count FROM {table} WHERE hour_ms >= {}",
                self.since_hour
            ),
            format!(
                "SELECT (hour_ms / {day}) * {day}, bucket, CAST(SUM(count) AS BIGINT) FROM {table} \
                 WHERE hour_ms >= {} GROUP BY (hour_ms / {day}) * {day}, bucket",
                self.since_day
            ),
            format!(
                "SELECT CAST({} AS BIGINT), bucket, CAST(SUM(count) AS BIGINT) FROM {table} \
                 WHERE hour_ms >= {} AND hour_ms <= {} GROUP BY bucket",
                self.first, self.first, self.to_ms
            ),
        ]
    }
}

/// [`ROLLUP_SUMS`] as aggregates, counts kept integers in both databases.
fn summed_sums() -> String {
    ROLLUP_SUMS
        .split(',')
        .map(str::trim)
        .map(|c| match c {
            "latency_sum" | "cost" | "saved_cost" => format!("SUM({c})"),
            _ => format!("CAST(SUM({c}) AS BIGINT)"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The users charted (the dearest few), in the order [`stats_answer`] ranks them.
pub fn charted_users(users: &[(String, RollupRow)]) -> Vec<String> {
    rank_users(users)
        .into_iter()
        .take(SERIES_USERS)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Dearest first (costs compared as [`round_cost`] shows them), ties by name.
fn rank_users(users: &[(String, RollupRow)]) -> Vec<(&str, &RollupRow)> {
    let mut ranked: Vec<(&str, &RollupRow)> = users.iter().map(|(n, s)| (n.as_str(), s)).collect();
    ranked.sort_by(|a, b| {
        round_cost(b.1.cost)
            .total_cmp(&round_cost(a.1.cost))
            .then_with(|| a.0.cmp(b.0))
    });
    ranked.truncate(TOP_USERS);
    ranked
}

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

/// `/api/stats` from [`StatsRows`]: totals and breakdowns of `[from, to]` (whole hours,
/// by model, upstream, key and end user), and the hourly (48 h) and daily (30 days)
/// series, overall and by dimension, with latency and time-to-first-byte percentiles.
/// Both stores read the rows in a few queries and share this, so they answer alike, in
/// one order.
pub fn stats_answer(rows: &StatsRows, from_ms: i64, to_ms: i64, now_ms: i64) -> Value {
    use std::collections::BTreeMap;
    let (first, _) = stats_span(from_ms, now_ms);
    let (since_hour, since_day) = series_starts(now_ms);
    let day = 24 * HOUR_MS;
    let in_range = |hour: i64| hour >= first && hour <= to_ms;
    let mut totals_sum = RollupRow::default();
    for row in rows.hours.iter().filter(|r| in_range(r.hour_ms)) {
        totals_sum.add(&row.sums);
    }
    let mut totals = totals_sum.to_json();
    let (latency, ttfb) = (
        histogram_of(&rows.latency.range),
        histogram_of(&rows.ttfb.range),
    );
    totals["p50_latency_ms"] = serde_json::json!(histogram_percentile(&latency, 50.0));
    totals["p95_latency_ms"] = serde_json::json!(histogram_percentile(&latency, 95.0));
    totals["ttfb_p50_ms"] = serde_json::json!(histogram_percentile(&ttfb, 50.0));
    totals["ttfb_p95_ms"] = serde_json::json!(histogram_percentile(&ttfb, 95.0));

    // Users: the dearest in the range, and the series of the dearest few.
    let by_user = rank_users(&rows.users);
    let charted: std::collections::BTreeSet<&str> =
        by_user.iter().take(SERIES_USERS).map(|(u, _)| *u).collect();
    let user_rows: Vec<HourRow> = rows
        .user_hours
        .iter()
        .filter(|r| charted.contains(r.user.as_str()))
        .map(|r| HourRow {
            hour_ms: r.hour_ms,
            model: String::new(),
            upstream: String::new(),
            key_name: r.user.clone(),
            sums: r.sums.clone(),
        })
        .collect();

    type Name = fn(&HourRow) -> &str;
    let series = |rows: &[HourRow], bucket: i64, since: i64, name: Option<Name>| -> Vec<Value> {
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
    let named = |(label, sums): (&str, &RollupRow)| {
        let mut value = sums.to_json();
        value["name"] = serde_json::json!(label);
        value
    };
    let mut answer = serde_json::json!({
        "from_ms": from_ms,
        "to_ms": to_ms,
        "totals": totals,
        "hourly": series(&rows.hours, HOUR_MS, since_hour, None),
        "daily": series(&rows.hours, day, since_day, None),
        "latency_hourly": percentile_series(&rows.latency.hourly, &rows.ttfb.hourly, HOUR_MS, since_hour),
        "latency_daily": percentile_series(&rows.latency.daily, &rows.ttfb.daily, day, since_day),
        "hourly_by": {},
        "daily_by": {},
        "by_user": by_user.into_iter().map(named).collect::<Vec<_>>(),
        "users_in_range": rows.users_in_range,
    });
    let dimensions: [(&str, &str, Name); 3] = [
        ("model", "by_model", |r| &r.model),
        ("upstream", "by_upstream", |r| &r.upstream),
        ("key", "by_key", |r| &r.key_name),
    ];
    for (label, breakdown, name) in dimensions {
        let mut groups: BTreeMap<&str, RollupRow> = BTreeMap::new();
        for row in rows.hours.iter().filter(|r| in_range(r.hour_ms)) {
            groups.entry(name(row)).or_default().add(&row.sums);
        }
        let mut ranked: Vec<(&str, RollupRow)> = groups.into_iter().collect();
        // Busiest first; ties by name (the map's order, kept by a stable sort).
        ranked.sort_by_key(|(_, sums)| std::cmp::Reverse(sums.requests));
        answer[breakdown] = ranked.iter().map(|(l, s)| named((l, s))).collect();
        answer["hourly_by"][label] = series(&rows.hours, HOUR_MS, since_hour, Some(name)).into();
        answer["daily_by"][label] = series(&rows.hours, day, since_day, Some(name)).into();
    }
    let by_user_name: Name = |r| &r.key_name;
    answer["hourly_by"]["user"] =
        series(&user_rows, HOUR_MS, since_hour, Some(by_user_name)).into();
    answer["daily_by"]["user"] = series(&user_rows, day, since_day, Some(by_user_name)).into();
    answer
}

/// The (bucket, count) histogram of `rows`, sorted by bucket.
fn histogram_of(rows: &[(i64, i64, i64)]) -> Vec<(i64, i64)> {
    let mut buckets: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    for &(_, bucket, count) in rows {
        *buckets.entry(bucket).or_default() += count;
    }
    buckets.into_iter().collect()
}

/// p50 and p95 of latency and time to first byte per `bucket_ms` since `since`: one entry
/// for each period with requests.
fn percentile_series(
    latency: &[(i64, i64, i64)],
    ttfb: &[(i64, i64, i64)],
    bucket_ms: i64,
    since: i64,
) -> Vec<Value> {
    use std::collections::BTreeMap;
    type Histograms = BTreeMap<i64, BTreeMap<i64, i64>>;
    let group = |rows: &[(i64, i64, i64)]| -> Histograms {
        let mut periods: Histograms = BTreeMap::new();
        for &(hour, bucket, count) in rows.iter().filter(|r| r.0 >= since) {
            let start = hour.div_euclid(bucket_ms) * bucket_ms;
            *periods.entry(start).or_default().entry(bucket).or_default() += count;
        }
        periods
    };
    let (latency, ttfb) = (group(latency), group(ttfb));
    let percentiles = |periods: &Histograms, start: i64| {
        let buckets: Vec<(i64, i64)> = periods
            .get(&start)
            .map(|b| b.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        (
            histogram_percentile(&buckets, 50.0),
            histogram_percentile(&buckets, 95.0),
        )
    };
    latency
        .keys()
        .map(|&start| {
            let (p50, p95) = percentiles(&latency, start);
            let (ttfb_p50, ttfb_p95) = percentiles(&ttfb, start);
            serde_json::json!({
                "start_ms": start,
                "p50_ms": p50,
                "p95_ms": p95,
                "ttfb_p50_ms": ttfb_p50,
                "ttfb_p95_ms": ttfb_p95,
            })
        })
        .collect()
}

/// The values the request list's filters offer: the distinct models, keys, upstreams,
/// end users and statuses in the log, at most [`VALUES_LIMIT`] of each.
pub const VALUES_LIMIT: usize = 200;

/// SQL listing the distinct values of an indexed `column` of `requests` by a loose index
/// scan (one index probe per value, however many rows share it), at most
/// [`VALUES_LIMIT`], as text. Portable: SQLite and PostgreSQL both run it.
pub fn distinct_sql(column: &str) -> String {
    format!(
        "WITH RECURSIVE seen(v, n) AS ( \
           SELECT MIN({column}), 1 FROM requests \
           UNION ALL \
           SELECT (SELECT MIN({column}) FROM requests WHERE {column} > seen.v), n + 1 \
           FROM seen WHERE seen.v IS NOT NULL AND n < {VALUES_LIMIT}) \
         SELECT CAST(v AS TEXT) FROM seen WHERE v IS NOT NULL"
    )
}

/// The columns [`distinct_sql`] lists, with the names `/api/values` gives them.
pub const VALUE_COLUMNS: [(&str, &str); 5] = [
    ("models", "model"),
    ("keys", "key_name"),
    ("upstreams", "upstream"),
    ("users", "end_user"),
    ("statuses", "status"),
];

/// The `/api/values` answer from each column's values (as [`VALUE_COLUMNS`] names them):
/// sorted, statuses as numbers.
pub fn values_answer(columns: Vec<(&str, Vec<String>)>) -> Value {
    let mut answer = serde_json::Map::new();
    for (name, mut values) in columns {
        let value = if name == "statuses" {
            let mut numbers: Vec<i64> = values.iter().filter_map(|v| v.parse().ok()).collect();
            numbers.sort_unstable();
            serde_json::json!(numbers)
        } else {
            values.sort();
            serde_json::json!(values)
        };
        answer.insert(name.to_string(), value);
    }
    Value::Object(answer)
}

/// The upsert adding a batch's sums to a rollup table keyed by `keys` (the key columns,
/// then [`ROLLUP_SUMS`], as numbered placeholders `?1` or `$1` after `mark`).
pub fn rollup_upsert_sql(table: &str, keys: &str, mark: &str) -> String {
    let columns: Vec<&str> = keys
        .split(',')
        .chain(ROLLUP_SUMS.split(','))
        .map(str::trim)
        .collect();
    let placeholders: Vec<String> = (1..=columns.len()).map(|n| format!("{mark}{n}")).collect();
    let sums: Vec<String> = ROLLUP_SUMS
        .split(',')
        .map(str::trim)
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({keys}) DO UPDATE SET {}",
        columns.join(", "),
        placeholders.join(", "),
        sums.join(", ")
    )
}

/// What text search looks through for one record: its names and bodies, one per line,
/// lowercased. Built into one string (the log writer makes one per row): ASCII text, the
/// usual case, is lowercased in place.
pub fn search_text(r: &LogRecord) -> String {
    search_text_of([
        r.id.as_str(),
        r.path.as_str(),
        r.model.as_deref().unwrap_or(""),
        r.upstream_model.as_deref().unwrap_or(""),
        r.key_name.as_str(),
        r.upstream.as_deref().unwrap_or(""),
        r.user.as_deref().unwrap_or(""),
        r.error.as_deref().unwrap_or(""),
        r.request_body.as_deref().unwrap_or(""),
        r.response_body.as_deref().unwrap_or(""),
        r.reply_text.as_deref().unwrap_or(""),
    ])
}

/// The fields [`search_text_of`] takes, in its order, as the SQL log's columns: a store
/// that builds the text from stored rows (SQLite's search indexer and its scan of the rows
/// not yet indexed) builds exactly what [`search_text`] builds from the record.
pub const SEARCH_TEXT_COLUMNS: [&str; 11] = [
    "id",
    "path",
    "model",
    "upstream_model",
    "key_name",
    "upstream",
    "end_user",
    "error",
    "request_body",
    "response_body",
    "reply_text",
];

/// [`search_text`] from the fields named in [`SEARCH_TEXT_COLUMNS`] (absent ones empty);
/// the last three (the bodies and the reply) are clipped to 64 KiB.
pub fn search_text_of(parts: [&str; 11]) -> String {
    const BODY_LIMIT: usize = 64 * 1024;
    fn clip(text: &str) -> &str {
        let mut end = text.len().min(BODY_LIMIT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }
    let mut text = String::with_capacity(parts.iter().map(|p| p.len().min(BODY_LIMIT) + 1).sum());
    for (n, part) in parts.into_iter().enumerate() {
        if n > 0 {
            text.push('\n');
        }
        text.push_str(if n >= 8 { clip(part) } else { part });
    }
    if text.is_ascii() {
        text.make_ascii_lowercase();
        text
    } else {
        text.to_lowercase()
    }
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

/// Rows written (or indexed) since the caches were last let go after which the log's
/// threads release them once quiet (`Store::release_caches`): a burst's worth, not a
/// trickle, whose pages the next batches would read back at once.
pub const BURST_ROWS: usize = 1_000;

/// How long the log's threads wait with no new row, after a burst of [`BURST_ROWS`], before
/// they let their caches go and trim the heap: the burst is over, and its pages would
/// otherwise stay in memory for good. Never under steady traffic: a trim locks each of the
/// allocator's arenas in turn (the request threads' too) while it walks them, ~1 ms.
pub const QUIET_RELEASE: std::time::Duration = std::time::Duration::from_millis(500);

/// The SQLite file a storage URL names (`sqlite://PATH` or `sqlite:PATH`), if it names one.
pub fn sqlite_path(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
}

/// Opens the store a URL names.
pub fn open(url: &str) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    if let Some(path) = sqlite_path(url) {
        return Ok(std::sync::Arc::new(sqlite::SqliteStore::open(path)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(std::sync::Arc::new(postgres::PostgresStore::open(url)?));
    }
    anyhow::bail!("unsupported storage URL (expected sqlite://PATH or postgres://…)")
}
