//! The embedded SQLite store: one file, WAL mode so the admin API reads while the writer
//! writes, a connection for each.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter, types::Value as SqlValue};
use serde_json::{Map, Value, json};

use super::{CounterDelta, ListQuery, LogRecord, Page, Store};
use crate::pure::limits::{Period, Usage};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    ts BIGINT NOT NULL,
    client_ip TEXT NOT NULL,
    key_name TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    model TEXT,
    upstream_model TEXT,
    upstream TEXT,
    upstream_key TEXT,
    status INTEGER NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    ttfb_ms DOUBLE PRECISION,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    total_tokens BIGINT,
    cost DOUBLE PRECISION,
    usage_source TEXT,
    stream INTEGER NOT NULL,
    error TEXT,
    tries INTEGER NOT NULL,
    attempts TEXT NOT NULL,
    request_headers TEXT NOT NULL,
    response_headers TEXT NOT NULL,
    request_body TEXT,
    response_body TEXT,
    reply_text TEXT,
    reply_tool_calls TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE INDEX IF NOT EXISTS requests_model_ts ON requests (model, ts);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests (key_name, ts);
CREATE INDEX IF NOT EXISTS requests_upstream_ts ON requests (upstream, ts);
CREATE INDEX IF NOT EXISTS requests_status_ts ON requests (status, ts);
CREATE VIRTUAL TABLE IF NOT EXISTS requests_search USING fts5(id UNINDEXED, text, tokenize = 'trigram');
CREATE TABLE IF NOT EXISTS rollup_hourly (
    hour_ms BIGINT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    key_name TEXT NOT NULL,
    requests BIGINT NOT NULL,
    succeeded BIGINT NOT NULL,
    latency_sum DOUBLE PRECISION NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL,
    cost DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour_ms, model, upstream, key_name)
);
CREATE TABLE IF NOT EXISTS rollup_latency (
    hour_ms BIGINT NOT NULL,
    bucket INTEGER NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (hour_ms, bucket)
);
CREATE TABLE IF NOT EXISTS usage_counters (
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    win BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    cost DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, period, win)
);
CREATE TABLE IF NOT EXISTS object_routes (
    id TEXT PRIMARY KEY,
    upstream TEXT NOT NULL,
    key_mask TEXT,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS object_routes_expires ON object_routes (expires_ms);
";

const SUMMARY_COLUMNS: &str = "id, ts, client_ip, key_name, method, path, model, upstream_model, upstream, \
    upstream_key, status, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, cost, usage_source, \
    stream, error, tries, cache, saved_cost";

pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Object routes, on a connection of their own: a lookup never waits behind a log
    /// batch or an admin query.
    objects: Mutex<Connection>,
    /// Tells the checkpointer thread to stop.
    stop: Arc<AtomicBool>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How often the write-ahead log is copied into the database, off the writer's thread.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the WAL from a connection of its own, so that a commit never waits for a
/// checkpoint (and its fsync): the writer's connection has automatic checkpoints off.
/// PASSIVE: it never blocks the writer or readers, and catches up at the next round.
fn checkpoint_in_background(path: &str, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let connection = connect(path)?;
    std::thread::Builder::new()
        .name("sluice-checkpoint".into())
        .spawn(move || {
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() < CHECKPOINT_EVERY {
                    continue;
                }
                last = Instant::now();
                if let Err(error) =
                    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::debug!("WAL checkpoint failed: {error}");
                }
            }
        })?;
    Ok(())
}

fn connect(path: &str) -> anyhow::Result<Connection> {
    let connection =
        Connection::open(path).with_context(|| format!("cannot open SQLite database {path}"))?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    // 64 MiB of page cache (negative: KiB): the indexes' hot pages stay in memory rather
    // than being read back from the file at each batch.
    connection.pragma_update(None, "cache_size", -65_536)?;
    Ok(connection)
}

impl SqliteStore {
    pub fn open(path: &str) -> anyhow::Result<Self> {
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let writer = connect(path)?;
        writer
            .execute_batch(SCHEMA)
            .context("cannot create the schema")?;
        migrate(&writer).context("cannot migrate the log")?;
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let reader = connect(path)?;
        let objects = connect(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        checkpoint_in_background(path, stop.clone())?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            objects: Mutex::new(objects),
            stop,
        })
    }

    fn objects(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Connection>> {
        Ok(self
            .objects
            .lock()
            // A panic under the lock rolled its transaction back; the connection is sound.
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn reader(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Connection>> {
        Ok(self
            .reader
            .lock()
            // A panic under the lock rolled its transaction back; the connection is sound.
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Changes to a log an earlier sluice wrote, in order; `PRAGMA user_version` counts those
/// applied. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: each search row shares its request's rowid (a search can then look through the
    // newest requests' text directly) and holds lowercased text.
    "DELETE FROM requests_search;
     INSERT INTO requests_search (rowid, id, text)
     SELECT rowid, id, lower(id || char(10) || path || char(10) || coalesce(model, '') || char(10)
         || coalesce(upstream_model, '') || char(10) || key_name || char(10) || coalesce(upstream, '')
         || char(10) || coalesce(error, '') || char(10) || substr(coalesce(request_body, ''), 1, 65536)
         || char(10) || substr(coalesce(response_body, ''), 1, 65536) || char(10)
         || substr(coalesce(reply_text, ''), 1, 65536))
     FROM requests;",
    // 2: what the response cache did for each request, and the hourly hits and savings.
    "ALTER TABLE requests ADD COLUMN cache TEXT;
     ALTER TABLE requests ADD COLUMN saved_cost DOUBLE PRECISION;
     ALTER TABLE rollup_hourly ADD COLUMN cache_hits BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_hourly ADD COLUMN cache_lookups BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_hourly ADD COLUMN saved_cost DOUBLE PRECISION NOT NULL DEFAULT 0;",
];

fn migrate(connection: &Connection) -> anyhow::Result<()> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let done = usize::try_from(version).unwrap_or(0);
    for (number, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        tracing::info!("applying log migration {}", number + 1);
        let transaction = connection.unchecked_transaction()?;
        // Statement by statement: SQLite has no `ADD COLUMN IF NOT EXISTS`, so a column
        // already there (a log whose version was set back) is not added twice.
        for statement in migration.split(';').filter(|s| !s.trim().is_empty()) {
            match transaction.execute_batch(statement) {
                Err(error)
                    if statement.contains("ADD COLUMN")
                        && error.to_string().contains("duplicate column name") => {}
                other => other?,
            }
        }
        transaction.pragma_update(None, "user_version", i64::try_from(number + 1)?)?;
        transaction.commit()?;
    }
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A search among the newest rows matching the other filters: the page when they hold
/// enough matches (a common term) or are all there is, else `None` (the trigram index
/// answers instead).
fn search_recent(
    connection: &Connection,
    query: &ListQuery,
    pattern: &str,
    limit: u64,
    offset: u64,
) -> anyhow::Result<Option<Vec<Value>>> {
    let (clause, mut values) = filters(&ListQuery {
        search: None,
        ..query.clone()
    });
    let recent = format!(
        "SELECT rowid AS rid, id, ts FROM requests {clause} ORDER BY ts DESC, id DESC LIMIT {}",
        super::SEARCH_RECENT_ROWS
    );
    let filter_values = values.clone();
    values.push(SqlValue::Text(pattern.to_string()));
    let sql = format!(
        "SELECT {} FROM ({recent}) AS recent JOIN requests_search ON requests_search.rowid = recent.rid \
         JOIN requests ON requests.rowid = recent.rid \
         WHERE requests_search.text LIKE ? ESCAPE '\\' \
         ORDER BY recent.ts DESC, recent.id DESC LIMIT {limit} OFFSET {offset}",
        SUMMARY_COLUMNS
            .split(',')
            .map(|c| format!("requests.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let data = query_values(connection, &sql, &values)?;
    if data.len() as u64 >= limit {
        return Ok(Some(data));
    }
    // Too few matches: complete only if the newest rows were all the rows there are.
    let scanned: i64 = connection.query_row(
        &format!("SELECT COUNT(*) FROM ({recent})"),
        params_from_iter(filter_values.iter()),
        |row| row.get(0),
    )?;
    Ok((scanned < super::SEARCH_RECENT_ROWS).then_some(data))
}

/// Builds the WHERE clause of a list query.
fn filters(query: &ListQuery) -> (String, Vec<SqlValue>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    let mut exact = |column: &str, value: &Option<String>, clauses: &mut Vec<String>| {
        if let Some(value) = value.as_ref().filter(|v| !v.is_empty()) {
            clauses.push(format!("{column} = ?"));
            values.push(SqlValue::Text(value.clone()));
        }
    };
    exact("model", &query.model, &mut clauses);
    exact("key_name", &query.key, &mut clauses);
    exact("upstream", &query.upstream, &mut clauses);
    exact("path", &query.path, &mut clauses);
    if let Some(status) = query
        .status
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let filter = super::StatusFilter::parse(status);
        clauses.push(filter.sql("?"));
        if let super::StatusFilter::Exact(code) = filter {
            values.push(SqlValue::Integer(code));
        }
    }
    if let Some(from) = query.from_ms {
        clauses.push("ts >= ?".into());
        values.push(SqlValue::Integer(from));
    }
    if let Some(to) = query.to_ms {
        clauses.push("ts <= ?".into());
        values.push(SqlValue::Integer(to));
    }
    if let Some(pattern) = super::like_pattern(query.search.as_deref()) {
        let search = query.search.as_deref().unwrap_or_default().trim();
        if search.chars().count() >= 3 {
            // The trigram index answers substring searches without scanning the log.
            clauses.push(
                "id IN (SELECT id FROM requests_search WHERE text LIKE ? ESCAPE '\\')".into(),
            );
            values.push(SqlValue::Text(pattern));
        } else {
            let columns = [
                "path",
                "model",
                "key_name",
                "upstream",
                "error",
                "request_body",
                "response_body",
                "reply_text",
                "id",
            ];
            let any: Vec<String> = columns
                .iter()
                .map(|c| format!("{c} LIKE ? ESCAPE '\\'"))
                .collect();
            clauses.push(format!("({})", any.join(" OR ")));
            values.extend(columns.iter().map(|_| SqlValue::Text(pattern.clone())));
        }
    }
    if let Some((ts, id)) = &query.before {
        // `ts <= ?` first, so the ts index bounds the scan.
        clauses.push("ts <= ? AND (ts < ? OR id < ?)".into());
        values.push(SqlValue::Integer(*ts));
        values.push(SqlValue::Integer(*ts));
        values.push(SqlValue::Text(id.clone()));
    }
    let clause = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    (clause, values)
}

fn row_to_json(row: &rusqlite::Row<'_>, names: &[String]) -> rusqlite::Result<Value> {
    let mut object = Map::new();
    for (i, name) in names.iter().enumerate() {
        let value = match row.get_ref(i)? {
            rusqlite::types::ValueRef::Null => Value::Null,
            rusqlite::types::ValueRef::Integer(n) => json!(n),
            rusqlite::types::ValueRef::Real(f) => json!(f),
            rusqlite::types::ValueRef::Text(t) => {
                Value::String(String::from_utf8_lossy(t).into_owned())
            }
            rusqlite::types::ValueRef::Blob(b) => {
                Value::String(String::from_utf8_lossy(b).into_owned())
            }
        };
        object.insert(name.clone(), value);
    }
    Ok(Value::Object(object))
}

/// Turns stored fields back into their JSON shapes for API answers.
pub(super) fn present(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        if let Some(stream) = object.get("stream").and_then(Value::as_i64) {
            object.insert("stream".into(), Value::Bool(stream != 0));
        }
        if let Some(ts) = object.get("ts").and_then(Value::as_i64) {
            let time = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(ts).unwrap_or(0));
            object.insert(
                "time".into(),
                Value::String(humantime::format_rfc3339_millis(time).to_string()),
            );
        }
        for field in [
            "attempts",
            "request_headers",
            "response_headers",
            "reply_tool_calls",
        ] {
            if let Some(text) = object.get(field).and_then(Value::as_str) {
                if let Ok(parsed) = serde_json::from_str::<Value>(text) {
                    object.insert(field.into(), parsed);
                }
            }
        }
    }
    value
}

fn query_values(
    connection: &Connection,
    sql: &str,
    values: &[SqlValue],
) -> anyhow::Result<Vec<Value>> {
    let mut statement = connection.prepare(sql)?;
    let names: Vec<String> = statement.column_names().map(str::to_string).collect();
    let rows = statement.query_map(params_from_iter(values.iter()), |row| {
        row_to_json(row, &names)
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

impl Store for SqliteStore {
    fn write_objects(&self, routes: &[super::ObjectRoute]) -> anyhow::Result<()> {
        let mut connection = self.objects()?;
        let transaction = connection.transaction()?;
        {
            let mut upsert = transaction.prepare_cached(
                "INSERT INTO object_routes (id, upstream, key_mask, expires_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET upstream = excluded.upstream, key_mask = excluded.key_mask, \
                 expires_ms = excluded.expires_ms",
            )?;
            let mut delete =
                transaction.prepare_cached("DELETE FROM object_routes WHERE id = ?1")?;
            for route in routes {
                if route.upstream.is_empty() {
                    delete.execute(params![route.id])?;
                } else {
                    upsert.execute(params![
                        route.id,
                        route.upstream,
                        route.key,
                        route.expires_ms
                    ])?;
                }
            }
        }
        transaction.commit()?;
        Ok(())
    }

    fn object(&self, id: &str, now_ms: i64) -> anyhow::Result<Option<super::ObjectRoute>> {
        let connection = self.objects()?;
        let mut select = connection.prepare_cached(
            "SELECT upstream, key_mask, expires_ms FROM object_routes WHERE id = ?1 AND expires_ms > ?2",
        )?;
        Ok(select
            .query_row(params![id, now_ms], |row| {
                Ok(super::ObjectRoute {
                    id: id.to_string(),
                    upstream: row.get(0)?,
                    key: row.get(1)?,
                    expires_ms: row.get(2)?,
                })
            })
            .optional()?)
    }

    fn purge_objects(&self, now_ms: i64) -> anyhow::Result<u64> {
        let connection = self.objects()?;
        let removed = connection.execute(
            "DELETE FROM object_routes WHERE expires_ms <= ?1",
            params![now_ms],
        )?;
        Ok(u64::try_from(removed).unwrap_or(0))
    }

    fn write(&self, records: &[LogRecord], counters: &[CounterDelta]) -> anyhow::Result<()> {
        let mut connection = self
            .writer
            .lock()
            // A panic under the lock rolled its transaction back; the connection is sound.
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let transaction = connection.transaction()?;
        {
            let mut insert = transaction.prepare_cached(
                "INSERT OR IGNORE INTO requests (id, ts, client_ip, key_name, method, path, model, upstream_model, upstream, \
                 upstream_key, status, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, cost, usage_source, \
                 stream, error, tries, attempts, request_headers, response_headers, request_body, response_body, reply_text, \
                 reply_tool_calls, cache, saved_cost) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
                 ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)",
            )?;
            // The search row takes its request's rowid (see `search`).
            let mut search = transaction.prepare_cached(
                "INSERT INTO requests_search (rowid, id, text) VALUES (?1, ?2, ?3)",
            )?;
            for r in records {
                let inserted = insert.execute(params![
                    r.id,
                    r.ts,
                    r.client_ip,
                    r.key_name,
                    r.method,
                    r.path,
                    r.model,
                    r.upstream_model,
                    r.upstream,
                    r.upstream_key,
                    r.status,
                    r.latency_ms,
                    r.ttfb_ms,
                    r.prompt_tokens.map(to_i64),
                    r.completion_tokens.map(to_i64),
                    r.total_tokens.map(to_i64),
                    r.cost,
                    r.usage_source,
                    r.stream,
                    r.error,
                    r.tries,
                    r.attempts,
                    r.request_headers,
                    r.response_headers,
                    r.request_body,
                    r.response_body,
                    r.reply_text,
                    r.reply_tool_calls,
                    r.cache,
                    r.saved_cost,
                ])?;
                // Not a second time for a record already written (a retried batch).
                if inserted > 0 {
                    let rowid = transaction.last_insert_rowid();
                    search.execute(params![rowid, r.id, super::search_text(r)])?;
                }
            }
            let rollup = super::Rollup::of(records);
            let mut hourly = transaction.prepare_cached(
                "INSERT INTO rollup_hourly (hour_ms, model, upstream, key_name, requests, succeeded, latency_sum, \
                 prompt_tokens, completion_tokens, total_tokens, cost, cache_hits, cache_lookups, saved_cost) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
                 ON CONFLICT (hour_ms, model, upstream, key_name) DO UPDATE SET \
                 requests = rollup_hourly.requests + excluded.requests, succeeded = rollup_hourly.succeeded + excluded.succeeded, \
                 latency_sum = rollup_hourly.latency_sum + excluded.latency_sum, \
                 prompt_tokens = rollup_hourly.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = rollup_hourly.completion_tokens + excluded.completion_tokens, \
                 total_tokens = rollup_hourly.total_tokens + excluded.total_tokens, cost = rollup_hourly.cost + excluded.cost, \
                 cache_hits = rollup_hourly.cache_hits + excluded.cache_hits, \
                 cache_lookups = rollup_hourly.cache_lookups + excluded.cache_lookups, \
                 saved_cost = rollup_hourly.saved_cost + excluded.saved_cost",
            )?;
            for ((hour, model, upstream, key), row) in &rollup.hourly {
                hourly.execute(params![
                    hour,
                    model,
                    upstream,
                    key,
                    to_i64(row.requests),
                    to_i64(row.succeeded),
                    row.latency_sum,
                    to_i64(row.prompt_tokens),
                    to_i64(row.completion_tokens),
                    to_i64(row.total_tokens),
                    row.cost,
                    to_i64(row.cache_hits),
                    to_i64(row.cache_lookups),
                    row.saved_cost
                ])?;
            }
            let mut latency = transaction.prepare_cached(
                "INSERT INTO rollup_latency (hour_ms, bucket, count) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (hour_ms, bucket) DO UPDATE SET count = rollup_latency.count + excluded.count",
            )?;
            for ((hour, bucket), count) in &rollup.latency {
                latency.execute(params![hour, bucket, to_i64(*count)])?;
            }
            let mut upsert = transaction.prepare_cached(
                "INSERT INTO usage_counters (scope, period, win, requests, tokens, cost) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (scope, period, win) DO UPDATE SET requests = usage_counters.requests + excluded.requests, \
                 tokens = usage_counters.tokens + excluded.tokens, cost = usage_counters.cost + excluded.cost",
            )?;
            for c in counters {
                upsert.execute(params![
                    c.scope,
                    c.period.name(),
                    c.window,
                    to_i64(c.usage.requests),
                    to_i64(c.usage.tokens),
                    c.usage.cost
                ])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    fn retain(&self, before_ms: i64, max_rows: u64) -> anyhow::Result<u64> {
        let connection = self
            .writer
            .lock()
            // A panic under the lock rolled its transaction back; the connection is sound.
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        connection.execute(
            "DELETE FROM requests_search WHERE id IN (SELECT id FROM requests WHERE ts < ?1)",
            params![before_ms],
        )?;
        let mut removed =
            connection.execute("DELETE FROM requests WHERE ts < ?1", params![before_ms])? as u64;
        let cutoff: Option<i64> = connection
            .query_row(
                "SELECT ts FROM requests ORDER BY ts DESC LIMIT 1 OFFSET ?1",
                params![to_i64(max_rows)],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(cutoff) = cutoff {
            connection.execute(
                "DELETE FROM requests_search WHERE id IN (SELECT id FROM requests WHERE ts <= ?1)",
                params![cutoff],
            )?;
            removed +=
                connection.execute("DELETE FROM requests WHERE ts <= ?1", params![cutoff])? as u64;
        }
        // Counter windows that can no longer be current.
        connection.execute(
            "DELETE FROM usage_counters WHERE period = 'minute' AND win < ?1",
            params![before_ms / 60_000],
        )?;
        Ok(removed)
    }

    fn counters(&self, windows: &[(Period, i64)]) -> anyhow::Result<Vec<CounterDelta>> {
        let connection = self.reader()?;
        let mut statement =
            connection.prepare("SELECT scope, requests, tokens, cost FROM usage_counters WHERE period = ?1 AND win = ?2")?;
        let mut out = Vec::new();
        for &(period, window) in windows {
            let rows = statement.query_map(params![period.name(), window], |row| {
                Ok(CounterDelta {
                    scope: row.get(0)?,
                    period,
                    window,
                    usage: Usage {
                        requests: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                        tokens: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        cost: row.get(3)?,
                    },
                })
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        Ok(out)
    }

    fn list(&self, query: &ListQuery) -> anyhow::Result<Page> {
        let connection = self.reader()?;
        let (page, per_page, offset) = query.window();
        let searching = query
            .search
            .as_deref()
            .is_some_and(|s| !s.trim().is_empty());
        // The total counts every match, wherever the cursor stands (searches: see
        // `Page::from_search_rows`).
        let total: i64 = if searching {
            0
        } else {
            let (count_clause, count_values) = filters(&ListQuery {
                before: None,
                ..query.clone()
            });
            connection.query_row(
                &super::capped_count_sql(&count_clause),
                params_from_iter(count_values.iter()),
                |row| row.get(0),
            )?
        };
        let recent = match super::like_pattern(query.search.as_deref()) {
            Some(pattern) => search_recent(&connection, query, &pattern, per_page + 1, offset)?,
            None => None,
        };
        let data: Vec<Value> = match recent {
            Some(data) => data,
            None => {
                let (clause, values) = filters(query);
                let sql = format!(
                    "SELECT {SUMMARY_COLUMNS} FROM requests {clause} ORDER BY ts DESC, id DESC LIMIT {} OFFSET {offset}",
                    per_page + 1
                );
                query_values(&connection, &sql, &values)?
            }
        }
        .into_iter()
        .map(present)
        .collect();
        Ok(if searching {
            Page::from_search_rows(data, query)
        } else {
            Page::from_rows(data, page, per_page, total)
        })
    }

    fn get(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let connection = self.reader()?;
        let rows = query_values(
            &connection,
            "SELECT * FROM requests WHERE id = ?",
            &[SqlValue::Text(id.to_string())],
        )?;
        Ok(rows.into_iter().next().map(present))
    }

    fn stats(&self, from_ms: i64, to_ms: i64, now_ms: i64) -> anyhow::Result<Value> {
        let connection = self.reader()?;
        let (first, earliest) = super::stats_span(from_ms, now_ms);
        let mut hours = connection.prepare_cached(&format!(
            "SELECT {} FROM rollup_hourly WHERE hour_ms >= ?1",
            super::HOUR_ROW_COLUMNS
        ))?;
        let count = |value: i64| u64::try_from(value).unwrap_or(0);
        let rows: Vec<super::HourRow> = hours
            .query_map(params![earliest], |row| {
                Ok(super::HourRow {
                    hour_ms: row.get(0)?,
                    model: row.get(1)?,
                    upstream: row.get(2)?,
                    key_name: row.get(3)?,
                    sums: super::RollupRow {
                        requests: count(row.get(4)?),
                        succeeded: count(row.get(5)?),
                        latency_sum: row.get(6)?,
                        prompt_tokens: count(row.get(7)?),
                        completion_tokens: count(row.get(8)?),
                        total_tokens: count(row.get(9)?),
                        cost: row.get(10)?,
                        cache_hits: count(row.get(11)?),
                        cache_lookups: count(row.get(12)?),
                        saved_cost: row.get(13)?,
                    },
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut histogram = connection.prepare_cached(
            "SELECT bucket, SUM(count) FROM rollup_latency WHERE hour_ms >= ?1 AND hour_ms <= ?2 GROUP BY bucket ORDER BY bucket",
        )?;
        let buckets: Vec<(i64, i64)> = histogram
            .query_map(params![first, to_ms], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(super::stats_answer(&rows, &buckets, from_ms, to_ms, now_ms))
    }

    fn ping(&self) -> anyhow::Result<()> {
        self.reader()?.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}
