//! The embedded SQLite store: one file, WAL mode so the admin API reads while the writer
//! writes, a connection for each; and beside it the search index, in a file of its own.
//!
//! **The search index lags behind the log, off the write path.** The FTS5 trigram index
//! was ~80% of the log writer's time, and the writer also carries the usage counters
//! (they must be on disk within ~100 ms, `tests/crash.rs`) at normal priority, sharing the
//! gateway's core. So the writer writes rows, rollups and counters only, and an indexer
//! thread in the idle scheduling class (`SCHED_IDLE`; nice 19 where refused) indexes the rows written since its watermark, a
//! few hundred per transaction.
//!
//! The index lives in `<log>.search`, not in the log's file, so the indexer never takes
//! the log's write lock. SQLite has one write lock per database file; an indexer holding
//! it while preempted in the idle class would make the writer, and with it the counters, wait
//! behind it (priority inversion). Here the indexer only *reads* the log (a WAL read never
//! blocks the writer, nor the writer it) and writes a file nothing else writes; the writer
//! never touches the index file (retention leaves the index's rows to the indexer).
//!
//! Search stays exact: rows past the watermark are scanned with the same `LIKE` over the
//! same text ([`super::search_text_of`], as the SQL function `sluice_search_text`), so a
//! row is searchable the moment it is written. The index is derived and rebuildable: its
//! state names the log it was built from (`search_epoch`, random per log, bumped when
//! retention takes the newest rows so that rowids could be handed out again); a missing,
//! foreign or outdated index is dropped and rebuilt from watermark 0, and until then
//! searches scan.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{
    Connection, OptionalExtension, ToSql, TransactionBehavior, params, params_from_iter,
    types::Value as SqlValue,
};
use serde_json::{Map, Value, json};

use super::{
    AuditEntry, Conflict, CounterDelta, ListQuery, LogRecord, Managed, ManagedChange, NotFound,
    Page, Store,
};
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

/// The search index as a log before migration 8 held it in its own file (migrations 1 and 6
/// rewrite it; 8 moves it out).
const LEGACY_SEARCH_TABLE: &str = "CREATE VIRTUAL TABLE IF NOT EXISTS requests_search USING fts5(id UNINDEXED, text, tokenize = 'trigram', detail = none);";

/// The search index's file (`<log>.search`): the index, and how far into which log it
/// reaches. Without positions (`detail = none`): a `LIKE` matches the rows holding every
/// trigram of the phrase and SQLite checks each one's text.
const SEARCH_SCHEMA: &str = "
CREATE VIRTUAL TABLE IF NOT EXISTS requests_search USING fts5(id UNINDEXED, text, tokenize = 'trigram', detail = none);
CREATE TABLE IF NOT EXISTS search_state (epoch INTEGER NOT NULL, indexed_through INTEGER NOT NULL);
INSERT INTO search_state SELECT 0, 0 WHERE NOT EXISTS (SELECT 1 FROM search_state);
";

/// Merging segments eight at a time: the index's writes cost less, its reads a little more.
const SEARCH_AUTOMERGE: &str =
    "INSERT INTO requests_search (requests_search, rank) VALUES ('automerge', 8);";

/// Rows the indexer takes per transaction: ~15 ms of its work, so a search or the log's
/// checkpoint never waits long for it. It steps aside for requests between rows; its
/// commit (FTS5 writing the batch's segment and merging) is one call that cannot, 0.5 to
/// 3 ms (64 rows at a time was no shorter, and cost a fifth more per row).
const INDEX_BATCH: usize = 256;

/// WAL pages after which the search index's commit checkpoints (see `open_search`).
const SEARCH_CHECKPOINT_PAGES: i64 = 100;

/// How often an idle indexer looks for new rows.
const INDEX_POLL: Duration = Duration::from_millis(100);

const SUMMARY_COLUMNS: &str = "id, ts, client_ip, key_name, method, path, model, upstream_model, upstream, \
    upstream_key, status, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, cost, usage_source, \
    stream, error, tries, end_user, cache, saved_cost";

pub struct SqliteStore {
    writer: Mutex<Connection>,
    /// Also has the search index attached (as `search`).
    reader: Mutex<Connection>,
    /// Object routes, on a connection of their own: a lookup never waits behind a log
    /// batch or an admin query.
    objects: Mutex<Connection>,
    /// Tells the checkpointer and indexer threads to stop.
    stop: Arc<AtomicBool>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How often the write-ahead log is copied into the database, off the writer's thread.
/// Often, so each copy is short: a checkpoint is one call that cannot step aside for
/// requests (`sys::step_aside`), and at 4,000 rows/s one every 500 ms held the core for
/// 2-3 ms (a request arriving then waited that long); every 100 ms, a fifth of that.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The write-ahead log's size past which a checkpoint waits for the writer instead of
/// working around it. A `PASSIVE` checkpoint never restarts the WAL from its beginning: the
/// writer does, at its next transaction, if the checkpoint had copied every frame by then.
/// A writer that never pauses (a backlog draining, a fill) always adds frames during the
/// checkpoint, so the WAL grew without bound: 13 GB for a million rows, with every read
/// going through its index. Past this size a `TRUNCATE` checkpoint holds the writer back
/// (at most [`TRUNCATE_PATIENCE`] for readers, then the copy of what `PASSIVE` left) and
/// empties the file; the writer's batches wait in its queue meanwhile.
const WAL_TRUNCATE_AT: i64 = if cfg!(test) { 256 << 10 } else { 64 << 20 };

/// How long a `TRUNCATE` checkpoint waits for the writer's transaction and for readers
/// before giving up until the next round (the writer waits at most this long for it).
const TRUNCATE_PATIENCE: Duration = Duration::from_secs(1);

/// Checkpoints the WAL from a connection of its own, so that a commit never waits for a
/// checkpoint (and its fsync): the writer's connection has automatic checkpoints off.
/// PASSIVE: it never blocks the writer or readers, and catches up at the next round; past
/// [`WAL_TRUNCATE_AT`], TRUNCATE.
fn checkpoint_in_background(path: &str, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let connection = connect(path)?;
    connection.busy_timeout(TRUNCATE_PATIENCE)?;
    let page_size: i64 = connection.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    let truncate_at_frames = WAL_TRUNCATE_AT / page_size.max(512);
    std::thread::Builder::new()
        .name("sluice-checkpoint".into())
        .spawn(move || {
            // Idle class while the log keeps up: a checkpoint copies up to a few MiB in one
            // call, which a request waking on this core must not wait out; batch class
            // while the log is behind, so the WAL does not grow on a saturated core
            // (`sys::idle_while_keeping_up`).
            let _class = crate::sys::idle_while_keeping_up();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(CHECKPOINT_EVERY);
                let frames = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    row.get::<_, i64>(1)
                });
                let outcome = match frames {
                    Ok(frames) if frames >= truncate_at_frames => {
                        connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    }
                    Ok(_) => Ok(()),
                    Err(error) => Err(error),
                };
                if let Err(error) = outcome {
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
    // A WAL grown by a burst goes back to this size when it restarts, not kept at its peak.
    connection.pragma_update(None, "journal_size_limit", WAL_TRUNCATE_AT)?;
    // 16 MiB of page cache at most per connection (negative: KiB): the indexes' hot pages
    // stay in memory rather than being read back from the file at each batch. Each of the
    // four connections fills its cache as the log grows and keeps it (64 MiB held 70 MiB of
    // a soak run's 117 MiB of heap after one minute), until the writer or the indexer lets
    // theirs go when a burst is over (`release_caches`, [`super::BURST_ROWS`]).
    connection.pragma_update(None, "cache_size", -16_384)?;
    Ok(connection)
}

/// Where the search index of the log at `log` lives: beside it, `<log>.search`.
pub fn search_path(log: &str) -> String {
    format!("{log}.search")
}

/// Opens (creating if need be) the search index's file. The index is derived data: a file
/// that cannot be opened as one is removed and started afresh (the indexer rebuilds it).
fn open_search(path: &str) -> anyhow::Result<Connection> {
    let open = || -> anyhow::Result<Connection> {
        let connection = connect(path)?;
        // Enough for the index's merges; the log's connections keep the large cache.
        connection.pragma_update(None, "cache_size", -16_384)?;
        // The indexer's commits checkpoint the index's WAL themselves, in one call that
        // cannot step aside for requests: at SQLite's default of 1,000 pages (4 MB) a copy
        // takes milliseconds (the indexer's commit held the core up to 3.4 ms); a tenth of
        // that, ten times as often, the same work in all.
        connection.pragma_update(None, "wal_autocheckpoint", SEARCH_CHECKPOINT_PAGES)?;
        connection.execute_batch(SEARCH_SCHEMA)?;
        connection.execute_batch(SEARCH_AUTOMERGE)?;
        Ok(connection)
    };
    open().or_else(|error| {
        tracing::warn!("starting the search index {path} afresh: {error:#}");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
        open()
    })
}

/// Copies the search index a log before migration 8 kept in its own file into the index's
/// file, before migration 8 drops it there. FTS5 keeps an index in five plain tables;
/// copied as they are, the index is the same without tokenizing any text again (seconds
/// per million rows, where rebuilding takes minutes). It was written with each row, so it
/// reaches the newest.
fn move_search_index(connection: &Connection, search: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    connection.execute("ATTACH DATABASE ?1 AS search", [search])?;
    let copy = || -> anyhow::Result<i64> {
        let transaction = connection.unchecked_transaction()?;
        for part in ["data", "idx", "content", "docsize", "config"] {
            transaction.execute_batch(&format!(
                "DELETE FROM search.requests_search_{part};
                 INSERT INTO search.requests_search_{part} SELECT * FROM main.requests_search_{part};"
            ))?;
        }
        transaction.execute(
            "UPDATE search.search_state SET epoch = (SELECT epoch FROM main.search_epoch), \
             indexed_through = (SELECT coalesce(max(rowid), 0) FROM main.requests)",
            [],
        )?;
        let rows = transaction.query_row(
            "SELECT count(*) FROM search.requests_search_docsize",
            [],
            |row| row.get(0),
        )?;
        transaction.commit()?;
        Ok(rows)
    };
    let copied = copy();
    connection.execute("DETACH DATABASE search", [])?;
    let rows = copied.context("cannot move the search index")?;
    tracing::info!(
        "moved the search index ({rows} rows) into {search} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A stored text field as [`super::search_text_of`] takes it: NULL (or a number) is empty.
fn text_of(value: rusqlite::types::ValueRef<'_>) -> std::borrow::Cow<'_, str> {
    match value {
        rusqlite::types::ValueRef::Text(text) => String::from_utf8_lossy(text),
        _ => std::borrow::Cow::Borrowed(""),
    }
}

/// `sluice_search_text(<SEARCH_TEXT_COLUMNS>)`: a stored row's search text, exactly as the
/// index holds it, for the rows a search scans (those not yet indexed, the newest).
fn add_search_text_function(connection: &Connection) -> anyhow::Result<()> {
    use rusqlite::functions::FunctionFlags;
    connection.create_scalar_function(
        "sluice_search_text",
        super::SEARCH_TEXT_COLUMNS.len() as i32,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |context| {
            let fields: Vec<_> = (0..super::SEARCH_TEXT_COLUMNS.len())
                .map(|i| text_of(context.get_raw(i)))
                .collect();
            Ok(super::search_text_of(std::array::from_fn(|i| {
                fields[i].as_ref()
            })))
        },
    )?;
    Ok(())
}

/// The SQL computing a row's search text from `table`'s columns.
fn search_text_sql(table: &str) -> String {
    let columns: Vec<String> = super::SEARCH_TEXT_COLUMNS
        .iter()
        .map(|c| format!("{table}.{c}"))
        .collect();
    format!("sluice_search_text({})", columns.join(", "))
}

/// How far the attached search index reaches into this log: every row up to this rowid is
/// indexed. `None` when the index is another log's or outdated (a search then scans).
fn indexed_through(connection: &Connection) -> anyhow::Result<Option<i64>> {
    Ok(connection
        .query_row(
            "SELECT s.indexed_through FROM search.search_state AS s \
             JOIN main.search_epoch AS e ON s.epoch = e.epoch",
            [],
            |row| row.get(0),
        )
        .optional()?)
}

/// Starts the search indexer (see the module's doc) on `search`, the index's file
/// ([`open_search`]), and a connection of its own to the log.
fn index_in_background(log: &str, search: Connection, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let log = connect(log)?;
    // It reads a few hundred rows at a time.
    log.pragma_update(None, "cache_size", -2_048)?;
    std::thread::Builder::new()
        .name("sluice-search".into())
        .spawn(move || {
            // Idle class: it takes only CPU time nothing else wants.
            crate::sys::set_thread_idle();
            let mut failing = false;
            // Rows indexed since the connections' caches were last let go, and when the
            // last of them was.
            let mut indexed = 0;
            let mut last_row = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match index_round(&log, &search) {
                    Ok(round) => {
                        failing = false;
                        indexed += round.rows;
                        if round.rows > 0 {
                            last_row = Instant::now();
                        }
                        if round.more {
                            continue;
                        }
                        // Caught up, and quiet, after a burst: the pages its rounds cached go
                        // back, so the gateway's memory returns to idle (see
                        // [`super::BURST_ROWS`]). Caught up alone is every round under steady
                        // traffic, where a trim would stall the request threads.
                        if indexed >= super::BURST_ROWS
                            && last_row.elapsed() >= super::QUIET_RELEASE
                        {
                            indexed = 0;
                            shrink(&log);
                            shrink(&search);
                            crate::sys::trim_heap();
                        }
                    }
                    Err(error) => {
                        // Searches stay exact meanwhile (they scan what is not indexed).
                        if !failing {
                            tracing::warn!("the search index cannot keep up: {error:#}");
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(INDEX_POLL);
            }
        })?;
    Ok(())
}

/// One round of the indexer: the next rows past its watermark indexed, or (for an index of
/// another log, or after rowids were handed out again) the index started afresh, or the
/// index rows of requests retention removed deleted; each in one short transaction on the
/// index's file.
fn index_round(log: &Connection, search: &Connection) -> anyhow::Result<Round> {
    let (epoch, through): (i64, i64) = search.query_row(
        "SELECT epoch, indexed_through FROM search_state",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    // One snapshot of the log: its identity, its oldest row and the rows to index agree.
    // Read, then let go before any indexing: a reader holds back the log's checkpoints.
    let read = log.unchecked_transaction()?;
    let log_epoch: i64 = read.query_row("SELECT epoch FROM search_epoch", [], |row| row.get(0))?;
    let rebuild = log_epoch != epoch;
    let from = if rebuild { 0 } else { through };
    let oldest: Option<i64> =
        read.query_row("SELECT min(rowid) FROM requests", [], |row| row.get(0))?;
    let rows: Vec<(i64, Vec<String>)> = {
        let mut select = read.prepare_cached(&format!(
            "SELECT rowid, {} FROM requests WHERE rowid > ?1 ORDER BY rowid LIMIT {INDEX_BATCH}",
            super::SEARCH_TEXT_COLUMNS.join(", ")
        ))?;
        select
            .query_map([from], |row| {
                let mut fields = Vec::with_capacity(super::SEARCH_TEXT_COLUMNS.len());
                for i in 0..super::SEARCH_TEXT_COLUMNS.len() {
                    fields.push(text_of(row.get_ref(i + 1)?).into_owned());
                }
                Ok((row.get(0)?, fields))
            })?
            .collect::<Result<_, _>>()?
    };
    read.commit()?;
    // Index rows below the log's oldest row: their requests are gone for good (a rowid
    // below the smallest is never handed out again). Until removed they match nothing, as a
    // search joins the index with the log.
    let stale = match oldest {
        Some(oldest) if !rebuild => search.query_row(
            "SELECT EXISTS (SELECT 1 FROM requests_search WHERE rowid < ?1)",
            [oldest],
            |row| row.get::<_, bool>(0),
        )?,
        _ => false,
    };
    if !rebuild && !stale && rows.is_empty() {
        return Ok(Round {
            rows: 0,
            more: false,
        });
    }
    // Immediate: the state is read again under the write lock, so an indexer of another
    // process sharing this log (two gateways on one file) never indexes a row twice.
    let write = rusqlite::Transaction::new_unchecked(search, TransactionBehavior::Immediate)?;
    let now: (i64, i64) = write.query_row(
        "SELECT epoch, indexed_through FROM search_state",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    if now != (epoch, through) {
        return Ok(Round {
            rows: 0,
            more: true,
        });
    }
    if rebuild {
        tracing::info!("building the search index afresh");
        write.execute_batch("DROP TABLE requests_search;")?;
        write.execute_batch(SEARCH_SCHEMA)?;
        write.execute_batch(SEARCH_AUTOMERGE)?;
    } else if let (Some(oldest), true) = (oldest, stale) {
        write.execute(
            &format!(
                "DELETE FROM requests_search WHERE rowid IN \
                 (SELECT rowid FROM requests_search WHERE rowid < ?1 ORDER BY rowid LIMIT {INDEX_BATCH})"
            ),
            [oldest],
        )?;
    }
    {
        let mut insert = write
            .prepare_cached("INSERT INTO requests_search (rowid, id, text) VALUES (?1, ?2, ?3)")?;
        for (rowid, fields) in &rows {
            crate::sys::step_aside();
            let text = super::search_text_of(std::array::from_fn(|i| fields[i].as_str()));
            insert.execute(params![rowid, fields[0], text])?;
        }
    }
    let through = rows.last().map_or(from, |(rowid, _)| *rowid);
    write.execute(
        "UPDATE search_state SET epoch = ?1, indexed_through = ?2",
        params![log_epoch, through],
    )?;
    write.commit()?;
    Ok(Round {
        rows: rows.len(),
        more: rebuild || stale || rows.len() == INDEX_BATCH,
    })
}

/// What one round of the indexer did.
struct Round {
    /// Rows it added to the index.
    rows: usize,
    /// Whether more is waiting.
    more: bool,
}

impl SqliteStore {
    /// Rows written but not yet in the search index (searches scan them): what the indexer
    /// has still to do. For tests and `sluice-bench logwrite`.
    pub fn search_backlog(&self) -> anyhow::Result<u64> {
        let connection = self.reader()?;
        let read = connection.unchecked_transaction()?;
        let through = indexed_through(&read)?.unwrap_or(0);
        let rows: i64 = read.query_row(
            "SELECT count(*) FROM requests WHERE rowid > ?1",
            [through],
            |row| row.get(0),
        )?;
        read.commit()?;
        Ok(u64::try_from(rows).unwrap_or(0))
    }

    pub fn open(path: &str) -> anyhow::Result<Self> {
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let search = search_path(path);
        // Before the log's migrations: migration 8 moves an existing index into this file.
        // The indexer keeps this connection.
        let index = open_search(&search)?;
        let writer = connect(path)?;
        writer
            .execute_batch(SCHEMA)
            .context("cannot create the schema")?;
        migrate(&writer, &search).context("cannot migrate the log")?;
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let reader = connect(path)?;
        reader
            .execute("ATTACH DATABASE ?1 AS search", [&search])
            .with_context(|| format!("cannot attach the search index {search}"))?;
        add_search_text_function(&reader)?;
        let objects = connect(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        checkpoint_in_background(path, stop.clone())?;
        index_in_background(path, index, stop.clone())?;
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
    // 2: the upstream's answer as it came, when it differs from what the client received.
    "ALTER TABLE requests ADD COLUMN upstream_response_body TEXT;",
    // 3: the end user (`user` in the body); refusals and upstream failures counted apart;
    // time to first byte and end users rolled up.
    "ALTER TABLE requests ADD COLUMN end_user TEXT;
     CREATE INDEX IF NOT EXISTS requests_user_ts ON requests (end_user, ts);
     ALTER TABLE rollup_hourly ADD COLUMN refused BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_hourly ADD COLUMN upstream_errors BIGINT NOT NULL DEFAULT 0;
     CREATE TABLE IF NOT EXISTS rollup_ttfb (
         hour_ms BIGINT NOT NULL, bucket INTEGER NOT NULL, count BIGINT NOT NULL,
         PRIMARY KEY (hour_ms, bucket));
     CREATE TABLE IF NOT EXISTS rollup_users (
         hour_ms BIGINT NOT NULL, end_user TEXT NOT NULL, requests BIGINT NOT NULL,
         succeeded BIGINT NOT NULL, latency_sum DOUBLE PRECISION NOT NULL,
         prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
         total_tokens BIGINT NOT NULL, cost DOUBLE PRECISION NOT NULL, refused BIGINT NOT NULL,
         upstream_errors BIGINT NOT NULL, PRIMARY KEY (hour_ms, end_user));",
    // 4: keys, teams and admin accounts managed at run time, the version of their set,
    // and the audit log of their changes.
    "CREATE TABLE IF NOT EXISTS managed (
         kind TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
         PRIMARY KEY (kind, id));
     CREATE UNIQUE INDEX IF NOT EXISTS managed_name ON managed (kind, name);
     CREATE TABLE IF NOT EXISTS managed_version (version BIGINT NOT NULL);
     INSERT INTO managed_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM managed_version);
     CREATE TABLE IF NOT EXISTS audit (
         id INTEGER PRIMARY KEY AUTOINCREMENT, ts BIGINT NOT NULL, actor TEXT NOT NULL,
         address TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
         changes TEXT NOT NULL);",
    // 5: what the response cache did for each request, and the hourly hits and savings.
    "ALTER TABLE requests ADD COLUMN cache TEXT;
     ALTER TABLE requests ADD COLUMN saved_cost DOUBLE PRECISION;
     ALTER TABLE rollup_hourly ADD COLUMN cache_hits BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_hourly ADD COLUMN cache_lookups BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_hourly ADD COLUMN saved_cost DOUBLE PRECISION NOT NULL DEFAULT 0;
     ALTER TABLE rollup_users ADD COLUMN cache_hits BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_users ADD COLUMN cache_lookups BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE rollup_users ADD COLUMN saved_cost DOUBLE PRECISION NOT NULL DEFAULT 0;",
    // 6: the search index without positions (`detail = none`) and merging segments eight
    // at a time: less than half the work per row. Substring search (`LIKE`) matches rows
    // holding every trigram of the phrase and checks each one's text, so it finds the same
    // rows. Rebuilt once from the stored text (by the index's write rate, about a minute
    // per million rows).
    "CREATE VIRTUAL TABLE requests_search_6 USING fts5(id UNINDEXED, text, tokenize = 'trigram', detail = none);
     INSERT INTO requests_search_6 (rowid, id, text) SELECT rowid, id, text FROM requests_search;
     DROP TABLE requests_search;
     ALTER TABLE requests_search_6 RENAME TO requests_search;
     INSERT INTO requests_search (requests_search, rank) VALUES ('automerge', 8);",
    // 7: the log's identity for its search index (random, so an index built from another
    // log is never taken for this one's; bumped when rowids could be handed out again).
    "CREATE TABLE IF NOT EXISTS search_epoch (epoch INTEGER NOT NULL);
     INSERT INTO search_epoch SELECT (random() & 4503599627370495) + 1
         WHERE NOT EXISTS (SELECT 1 FROM search_epoch);",
    // 8: the search index leaves the log's file (copied into `<log>.search` just before,
    // see `move_search_index`).
    "DROP TABLE IF EXISTS requests_search;",
];

/// The migration that drops the log's own search index, once `move_search_index` copied it.
const MOVE_SEARCH_MIGRATION: usize = 8;

fn migrate(connection: &Connection, search: &str) -> anyhow::Result<()> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let done = usize::try_from(version).unwrap_or(0);
    if done < MOVE_SEARCH_MIGRATION {
        // Migrations 1 and 6 rewrite the index where it was; a new log starts with it empty.
        connection.execute_batch(LEGACY_SEARCH_TABLE)?;
    }
    for (number, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        tracing::info!("applying log migration {}", number + 1);
        if number + 1 == MOVE_SEARCH_MIGRATION {
            move_search_index(connection, search)?;
        }
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

/// A rollup row's sums as query parameters, in [`super::ROLLUP_SUMS`]' order (one list for
/// the hourly and the per-user rollups, as `postgres::sums` is there).
fn rollup_sums(row: &super::RollupRow) -> [SqlValue; 12] {
    let count = |n: u64| SqlValue::Integer(to_i64(n));
    [
        count(row.requests),
        count(row.succeeded),
        SqlValue::Real(row.latency_sum),
        count(row.prompt_tokens),
        count(row.completion_tokens),
        count(row.total_tokens),
        SqlValue::Real(row.cost),
        count(row.refused),
        count(row.upstream_errors),
        count(row.cache_hits),
        count(row.cache_lookups),
        SqlValue::Real(row.saved_cost),
    ]
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
    let (clause, mut values) = filters(
        &ListQuery {
            search: None,
            ..query.clone()
        },
        None,
    );
    let recent = format!(
        "SELECT rowid AS rid, id, ts FROM requests {clause} ORDER BY ts DESC, id DESC LIMIT {}",
        super::SEARCH_RECENT_ROWS
    );
    let filter_values = values.clone();
    values.push(SqlValue::Text(pattern.to_string()));
    // The text from the row itself, not the index: the newest rows may not be indexed yet.
    let sql = format!(
        "SELECT {} FROM ({recent}) AS recent JOIN requests ON requests.rowid = recent.rid \
         WHERE {} LIKE ? ESCAPE '\\' \
         ORDER BY recent.ts DESC, recent.id DESC LIMIT {limit} OFFSET {offset}",
        SUMMARY_COLUMNS
            .split(',')
            .map(|c| format!("requests.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", "),
        search_text_sql("requests")
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

/// Builds the WHERE clause of a list query; a search of three characters or more asks the
/// search index for the rows up to `indexed_through` (see [`indexed_through`]) and scans
/// those after it, or scans all when `None`.
fn filters(query: &ListQuery, indexed_through: Option<i64>) -> (String, Vec<SqlValue>) {
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
    exact("end_user", &query.user, &mut clauses);
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
            let text = search_text_sql("requests");
            match indexed_through {
                // The trigram index answers substring searches without scanning the log.
                // SQLite hands FTS5 only a two-argument LIKE (with `ESCAPE` the index was
                // never used: every search read the whole index), so the index gets the
                // phrase unescaped (`%` and `_` in it match more, never less) and the
                // escaped pattern checks its candidates.
                Some(through) => {
                    clauses.push(format!(
                        "rowid IN (SELECT rowid FROM search.requests_search \
                         WHERE text LIKE ? AND text LIKE ? ESCAPE '\\' \
                         UNION ALL SELECT rowid FROM requests WHERE rowid > ? AND {text} LIKE ? ESCAPE '\\')"
                    ));
                    values.push(SqlValue::Text(format!("%{}%", search.to_lowercase())));
                    values.push(SqlValue::Text(pattern.clone()));
                    values.push(SqlValue::Integer(through));
                    values.push(SqlValue::Text(pattern));
                }
                None => {
                    clauses.push(format!("{text} LIKE ? ESCAPE '\\'"));
                    values.push(SqlValue::Text(pattern));
                }
            }
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

/// Turns stored fields back into their JSON shapes for API answers: `stream` a boolean,
/// `time` beside `ts`, `end_user` as `user`, the JSON columns parsed, and the answer's
/// `cause` ([`super::Cause`]).
pub(super) fn present(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        if let Some(user) = object.remove("end_user") {
            object.insert("user".into(), user);
        }
        let status = object.get("status").and_then(Value::as_u64);
        let tries = object.get("tries").and_then(Value::as_u64);
        if let (Some(status), Some(tries)) = (status, tries) {
            let cause = super::Cause::of(
                u16::try_from(status).unwrap_or(u16::MAX),
                u32::try_from(tries).unwrap_or(u32::MAX),
            );
            object.insert("cause".into(), Value::String(cause.name().into()));
        }
        if let Some(stream) = object.get("stream").and_then(Value::as_i64) {
            object.insert("stream".into(), Value::Bool(stream != 0));
        }
        if let Some(cost) = object.get("cost").and_then(Value::as_f64) {
            object.insert("cost".into(), json!(crate::pure::usage::round_cost(cost)));
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

    fn managed(&self) -> anyhow::Result<(i64, Vec<Managed>)> {
        let connection = self.reader()?;
        let transaction = connection.unchecked_transaction()?;
        let version: i64 =
            transaction.query_row("SELECT version FROM managed_version", [], |row| row.get(0))?;
        let rows = {
            let mut select = transaction
                .prepare("SELECT kind, id, name, body FROM managed ORDER BY kind, name")?;
            select
                .query_map([], |row| {
                    Ok(Managed {
                        kind: row.get(0)?,
                        id: row.get(1)?,
                        name: row.get(2)?,
                        body: row.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?
        };
        transaction.commit()?;
        Ok((version, rows))
    }

    fn managed_version(&self) -> anyhow::Result<i64> {
        // The reader, not the objects' connection: a poll never delays a request's lookup.
        let connection = self.reader()?;
        Ok(connection.query_row("SELECT version FROM managed_version", [], |row| row.get(0))?)
    }

    fn change_managed(&self, change: &ManagedChange, audit: &AuditEntry) -> anyhow::Result<()> {
        let mut connection = self
            .writer
            .lock()
            // A panic under the lock rolled its transaction back; the connection is sound.
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let transaction = connection.transaction()?;
        let changed = match change {
            ManagedChange::Insert(m) => {
                let taken: bool = transaction.query_row(
                    "SELECT EXISTS (SELECT 1 FROM managed WHERE kind = ?1 AND (id = ?2 OR name = ?3))",
                    params![m.kind, m.id, m.name],
                    |row| row.get(0),
                )?;
                if taken {
                    return Err(anyhow::Error::new(Conflict));
                }
                transaction.execute(
                    "INSERT INTO managed (kind, id, name, body) VALUES (?1, ?2, ?3, ?4)",
                    params![m.kind, m.id, m.name, m.body],
                )?
            }
            ManagedChange::Update(m) => transaction.execute(
                "UPDATE managed SET body = ?3 WHERE kind = ?1 AND id = ?2",
                params![m.kind, m.id, m.body],
            )?,
            ManagedChange::Delete { kind, id } => transaction.execute(
                "DELETE FROM managed WHERE kind = ?1 AND id = ?2",
                params![kind, id],
            )?,
        };
        if changed == 0 {
            return Err(anyhow::Error::new(NotFound));
        }
        transaction.execute("UPDATE managed_version SET version = version + 1", [])?;
        transaction.execute(
            "INSERT INTO audit (ts, actor, address, action, target, changes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![audit.ts, audit.actor, audit.address, audit.action, audit.target, audit.changes],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn audit(&self, before: Option<i64>, limit: u64) -> anyhow::Result<Vec<AuditEntry>> {
        let connection = self.reader()?;
        let mut select = connection.prepare_cached(
            "SELECT id, ts, actor, address, action, target, changes FROM audit \
             WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = select.query_map(params![before.unwrap_or(i64::MAX), to_i64(limit)], |row| {
            Ok(AuditEntry {
                id: row.get(0)?,
                ts: row.get(1)?,
                actor: row.get(2)?,
                address: row.get(3)?,
                action: row.get(4)?,
                target: row.get(5)?,
                changes: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
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
                 reply_tool_calls, upstream_response_body, end_user, cache, saved_cost) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, \
                 ?29, ?30, ?31, ?32)",
            )?;
            // Not the search index: the indexer thread adds these rows (module doc).
            for r in records {
                crate::sys::step_aside();
                insert.execute(params![
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
                    r.upstream_response_body,
                    r.user,
                    r.cache,
                    r.saved_cost,
                ])?;
            }
            let rollup = super::Rollup::of(records);
            let mut hourly = transaction.prepare_cached(&super::rollup_upsert_sql(
                "rollup_hourly",
                "hour_ms, model, upstream, key_name",
                "?",
            ))?;
            for ((hour, model, upstream, key), row) in &rollup.hourly {
                let sums = rollup_sums(row);
                let mut values: Vec<&dyn ToSql> = vec![hour, model, upstream, key];
                values.extend(sums.iter().map(|v| v as &dyn ToSql));
                hourly.execute(values.as_slice())?;
            }
            let mut users = transaction.prepare_cached(&super::rollup_upsert_sql(
                "rollup_users",
                "hour_ms, end_user",
                "?",
            ))?;
            for ((hour, user), row) in &rollup.users {
                let sums = rollup_sums(row);
                let mut values: Vec<&dyn ToSql> = vec![hour, user];
                values.extend(sums.iter().map(|v| v as &dyn ToSql));
                users.execute(values.as_slice())?;
            }
            for (table, histogram) in [
                ("rollup_latency", &rollup.latency),
                ("rollup_ttfb", &rollup.ttfb),
            ] {
                let mut upsert = transaction.prepare_cached(&format!(
                    "INSERT INTO {table} (hour_ms, bucket, count) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (hour_ms, bucket) DO UPDATE SET count = {table}.count + excluded.count"
                ))?;
                for ((hour, bucket), count) in histogram {
                    upsert.execute(params![hour, bucket, to_i64(*count)])?;
                }
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
        let mut connection = self
            .writer
            .lock()
            // A panic under the lock rolled its transaction back; the connection is sound.
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The search index's rows go later, by the indexer (it never waits on this file's
        // write lock, nor this on its).
        let transaction = connection.transaction()?;
        let newest = |t: &Connection| -> rusqlite::Result<Option<i64>> {
            t.query_row("SELECT max(rowid) FROM requests", [], |row| row.get(0))
        };
        let newest_before = newest(&transaction)?;
        let mut removed =
            transaction.execute("DELETE FROM requests WHERE ts < ?1", params![before_ms])? as u64;
        let cutoff: Option<i64> = transaction
            .query_row(
                "SELECT ts FROM requests ORDER BY ts DESC LIMIT 1 OFFSET ?1",
                params![to_i64(max_rows)],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(cutoff) = cutoff {
            removed +=
                transaction.execute("DELETE FROM requests WHERE ts <= ?1", params![cutoff])? as u64;
        }
        // The newest row gone: SQLite may hand its rowid (and those below) out again, which
        // the search index would take for rows it holds. A new epoch makes it start afresh.
        if removed > 0 && newest(&transaction)? < newest_before {
            transaction.execute("UPDATE search_epoch SET epoch = epoch + 1", [])?;
        }
        // Counter windows that can no longer be current.
        transaction.execute(
            "DELETE FROM usage_counters WHERE period = 'minute' AND win < ?1",
            params![before_ms / 60_000],
        )?;
        transaction.commit()?;
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
        // One snapshot of the log and one of the index for the whole answer: the watermark
        // read first holds for the queries after it.
        let read = connection.unchecked_transaction()?;
        let connection: &Connection = &read;
        let (page, per_page, offset) = query.window();
        let searching = query
            .search
            .as_deref()
            .is_some_and(|s| !s.trim().is_empty());
        // The total counts every match, wherever the cursor stands (searches: see
        // `Page::from_search_rows`).
        let total: i64 = if searching || query.skip_count {
            0
        } else {
            let (count_clause, count_values) = filters(
                &ListQuery {
                    before: None,
                    ..query.clone()
                },
                None,
            );
            connection.query_row(
                &super::capped_count_sql(&count_clause),
                params_from_iter(count_values.iter()),
                |row| row.get(0),
            )?
        };
        let recent = match super::like_pattern(query.search.as_deref()) {
            Some(pattern) => search_recent(connection, query, &pattern, per_page + 1, offset)?,
            None => None,
        };
        let data: Vec<Value> = match recent {
            Some(data) => data,
            None => {
                let (clause, values) = filters(query, indexed_through(connection)?);
                let sql = format!(
                    "SELECT {SUMMARY_COLUMNS} FROM requests {clause} ORDER BY ts DESC, id DESC LIMIT {} OFFSET {offset}",
                    per_page + 1
                );
                query_values(connection, &sql, &values)?
            }
        }
        .into_iter()
        .map(present)
        .collect();
        read.commit()?;
        let page = if searching {
            Page::from_search_rows(data, query)
        } else {
            Page::from_rows(data, page, per_page, total)
        };
        Ok(page.uncounted_if(query.skip_count))
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
        let plan = super::StatsPlan::new(from_ms, to_ms, now_ms);
        let count = |value: i64| u64::try_from(value).unwrap_or(0);
        // The sums of a rollup row, from column `at` on (in `super::ROLLUP_SUMS`' order).
        let sums = |row: &rusqlite::Row<'_>, at: usize| -> rusqlite::Result<super::RollupRow> {
            Ok(super::RollupRow {
                requests: count(row.get(at)?),
                succeeded: count(row.get(at + 1)?),
                latency_sum: row.get(at + 2)?,
                prompt_tokens: count(row.get(at + 3)?),
                completion_tokens: count(row.get(at + 4)?),
                total_tokens: count(row.get(at + 5)?),
                cost: row.get(at + 6)?,
                refused: count(row.get(at + 7)?),
                upstream_errors: count(row.get(at + 8)?),
                cache_hits: count(row.get(at + 9)?),
                cache_lookups: count(row.get(at + 10)?),
                saved_cost: row.get(at + 11)?,
            })
        };
        let hours: Vec<super::HourRow> = connection
            .prepare(&plan.hours_sql())?
            .query_map([], |row| {
                Ok(super::HourRow {
                    hour_ms: row.get(0)?,
                    model: row.get(1)?,
                    upstream: row.get(2)?,
                    key_name: row.get(3)?,
                    sums: sums(row, 4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let users: Vec<(String, super::RollupRow)> = connection
            .prepare(&plan.users_sql())?
            .query_map([], |row| Ok((row.get(0)?, sums(row, 1)?)))?
            .collect::<Result<_, _>>()?;
        let users_in_range: i64 =
            connection.query_row(&plan.users_count_sql(), [], |row| row.get(0))?;
        let charted = super::charted_users(&users);
        let user_hours: Vec<super::UserRow> = if charted.is_empty() {
            Vec::new()
        } else {
            connection
                .prepare(&plan.user_hours_sql(charted.len(), "?"))?
                .query_map(params_from_iter(charted.iter()), |row| {
                    Ok(super::UserRow {
                        hour_ms: row.get(0)?,
                        user: row.get(1)?,
                        sums: sums(row, 2)?,
                    })
                })?
                .collect::<Result<_, _>>()?
        };
        let histograms = |table: &str| -> anyhow::Result<super::Histograms> {
            let [hourly, daily, range] = plan.histogram_sql(table).map(|sql| {
                connection
                    .prepare(&sql)?
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()
            });
            Ok(super::Histograms {
                hourly: hourly?,
                daily: daily?,
                range: range?,
            })
        };
        let rows = super::StatsRows {
            hours,
            users,
            users_in_range: count(users_in_range),
            user_hours,
            latency: histograms("rollup_latency")?,
            ttfb: histograms("rollup_ttfb")?,
        };
        Ok(super::stats_answer(&rows, from_ms, to_ms, now_ms))
    }

    fn values(&self) -> anyhow::Result<Value> {
        let connection = self.reader()?;
        let mut columns = Vec::new();
        for (name, column) in super::VALUE_COLUMNS {
            let mut statement = connection.prepare_cached(&super::distinct_sql(column))?;
            let values: Vec<String> = statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            columns.push((name, values));
        }
        Ok(super::values_answer(columns))
    }

    fn ping(&self) -> anyhow::Result<()> {
        self.reader()?.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn release_caches(&self) {
        let connection = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shrink(&connection);
    }
}

/// Lets go of the pages `connection` keeps cached (up to `cache_size`); they are read back
/// from the file, mostly from the kernel's page cache, when needed again.
fn shrink(connection: &Connection) {
    if let Err(error) = connection.execute_batch("PRAGMA shrink_memory;") {
        tracing::debug!("cannot shrink SQLite's cache: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> LogRecord {
        LogRecord {
            id: format!("req_{i:09}"),
            ts: 1_700_000_000_000 + i as i64,
            client_ip: "10.0.0.1".into(),
            key_name: "key".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            attempts: "[]".into(),
            request_headers: "{}".into(),
            response_headers: "{}".into(),
            request_body: Some(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(4096))),
            ..LogRecord::default()
        }
    }

    /// A writer that never pauses (a backlog draining) used to grow the WAL without bound:
    /// PASSIVE checkpoints never got the chance to restart it.
    #[test]
    fn the_wal_is_emptied_under_a_writer_that_never_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let store = Arc::new(SqliteStore::open(path.to_str().unwrap()).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut next = 0;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<LogRecord> = (next..next + 20).map(record).collect();
                    store.write(&batch, &[]).unwrap();
                    next += 20;
                }
                next
            })
        };
        let wal = dir.path().join("log.db-wal");
        let size = || std::fs::metadata(&wal).map_or(0, |m| m.len() as i64);
        let started = Instant::now();
        let mut grown = false;
        let emptied = loop {
            let now = size();
            grown |= now >= WAL_TRUNCATE_AT;
            if grown && now < WAL_TRUNCATE_AT / 2 {
                break true;
            }
            if started.elapsed() > Duration::from_secs(60) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        assert!(
            emptied,
            "the WAL grew to {} bytes and was never emptied ({written} rows written)",
            size()
        );
    }
}
