//! The two stores give the same answers: the same records written to an embedded SQLite
//! file and to a fresh database on the local PostgreSQL, then every kind of list, search,
//! detail and stats query compared field by field.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice::store::{ListQuery, LogRecord, Store};

const HOUR_MS: i64 = 3_600_000;

/// More rows than a search looks through among the newest, so both of its paths run.
const ROWS: usize = 6_000;

fn record(i: usize, now_ms: i64) -> LogRecord {
    let models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"];
    let status = match i % 20 {
        0 => 500,
        1 => 429,
        _ => 200,
    };
    // The oldest rows carry a phrase no newer row has.
    let rare = if i < 3 { " Zeppelin-Harbour" } else { "" };
    // Some of the 429s are sluice's own refusals: no upstream was tried.
    let refused = i % 40 == 1;
    LogRecord {
        id: format!("req_{i:08}"),
        // Over the last two days, older for smaller `i`, two rows to each millisecond.
        ts: now_ms - 48 * HOUR_MS + (i as i64 / 2) * (48 * HOUR_MS / ROWS as i64),
        client_ip: "10.0.0.1".into(),
        key_name: format!("key-{}", i % 4),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some(models[i % 3].into()),
        user: (i % 3 != 0).then(|| format!("user-{}", i % 11)),
        upstream_model: Some(models[i % 3].into()),
        upstream: (!refused).then(|| ["openai", "azure"][i % 2].into()),
        upstream_key: Some("sk-…a1b2".into()),
        status,
        latency_ms: 10.0 + (i % 97) as f64,
        ttfb_ms: Some(5.0),
        prompt_tokens: Some(10 + (i % 7) as u64),
        completion_tokens: Some(3),
        total_tokens: Some(13 + (i % 7) as u64),
        cost: Some(0.001),
        usage_source: Some("upstream".into()),
        stream: i % 2 == 0,
        error: (status != 200).then(|| "upstream said no".into()),
        tries: u32::from(!refused),
        attempts: "[]".into(),
        request_headers: "{}".into(),
        response_headers: "{}".into(),
        request_body: Some(format!(
            r#"{{"messages":[{{"content":"Question {i} about LIGHTHOUSES{rare}"}}]}}"#
        )),
        response_body: Some(format!(r#"{{"answer":"reply {i}"}}"#)),
        reply_text: Some(format!("reply {i}")),
        reply_tool_calls: None,
        upstream_response_body: None,
        cache: None,
        saved_cost: None,
        model_label: None,
    }
}

fn query(edit: impl FnOnce(&mut ListQuery)) -> ListQuery {
    let mut query = ListQuery {
        page: 1,
        per_page: 50,
        ..ListQuery::default()
    };
    edit(&mut query);
    query
}

fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}", dir.path().join("log.db").display());
    let postgres_url = common::fresh_postgres_database().await;
    let now_ms = sluice::clock::unix_now_ms();
    let records: Vec<LogRecord> = (0..ROWS).map(|i| record(i, now_ms)).collect();
    let (sqlite, postgres) = tokio::task::spawn_blocking(move || {
        let sqlite = sluice::store::open(&sqlite_url).unwrap();
        let postgres = sluice::store::open(&postgres_url).unwrap();
        for store in [&sqlite, &postgres] {
            for batch in records.chunks(1000) {
                store.write(batch, &[]).unwrap();
            }
        }
        (sqlite, postgres)
    })
    .await
    .unwrap();

    let queries = [
        query(|_| {}),
        query(|q| q.page = 3),
        query(|q| q.model = Some("gpt-4o-mini".into())),
        query(|q| q.key = Some("key-2".into())),
        query(|q| q.status = Some("5xx".into())),
        query(|q| q.status = Some("429".into())),
        query(|q| q.status = Some("error".into())),
        query(|q| q.user = Some("user-4".into())),
        query(|q| {
            q.user = Some("user-5".into());
            q.skip_count = true;
        }),
        query(|q| q.from_ms = Some(now_ms - 24 * HOUR_MS)),
        query(|q| q.before = Some((now_ms - 47 * HOUR_MS, "req_00000100".into()))),
        // Common terms fill a page among the newest rows; case does not matter.
        query(|q| q.search = Some("lighthouses".into())),
        query(|q| q.search = Some("Question 59".into())),
        query(|q| {
            q.search = Some("lighthouses".into());
            q.page = 2;
        }),
        // Rare terms are found through the index, past the newest rows.
        query(|q| q.search = Some("zeppelin-harbour".into())),
        query(|q| q.search = Some("Question 123 ".into())),
        query(|q| q.search = Some("50%_off".into())),
    ];
    for list_query in queries {
        let answers = both(&sqlite, &postgres, move |store| {
            serde_json::to_value(store.list(&list_query).unwrap()).unwrap()
        })
        .await;
        let (a, b) = (&answers[0], &answers[1]);
        assert_eq!(ids(a), ids(b), "same rows");
        for field in ["total", "total_exact", "has_more", "next_before", "page"] {
            assert_eq!(a[field], b[field], "{field}");
        }
        assert_eq!(a["data"], b["data"], "same fields and values");
    }
    let searched = both(&sqlite, &postgres, |store| {
        serde_json::to_value(
            store
                .list(&query(|q| q.search = Some("ZEPPELIN-harbour".into())))
                .unwrap(),
        )
        .unwrap()
    })
    .await;
    assert_eq!(
        ids(&searched[0]),
        ["req_00000002", "req_00000001", "req_00000000"]
    );

    let details = both(&sqlite, &postgres, |store| {
        store.get("req_00000042").unwrap()
    })
    .await;
    assert_eq!(details[0], details[1]);
    assert!(details[0].is_some());

    let stats = both(&sqlite, &postgres, move |store| {
        store.stats(now_ms - 72 * HOUR_MS, now_ms, now_ms).unwrap()
    })
    .await;
    assert_eq!(stats[0]["totals"]["requests"], ROWS);
    let totals = &stats[0]["totals"];
    assert_eq!(totals["refused"], ROWS / 40, "sluice's refusals");
    assert_eq!(
        totals["upstream_errors"],
        ROWS / 20 * 2 - ROWS / 40,
        "upstream 500s and 429s"
    );
    assert_eq!(stats[0]["users_in_range"], 11);
    // The rows span the 24 hours from two days ago: an entry for each of those hours.
    let percentiles = stats[0]["latency_hourly"].as_array().unwrap();
    assert!(percentiles.len() >= 24, "{}", percentiles.len());
    assert!(
        percentiles
            .iter()
            .all(|p| p["p95_ms"].as_f64() >= p["p50_ms"].as_f64())
    );
    assert!(stats[0]["hourly_by"]["user"].as_array().unwrap().len() > 24);

    let values = both(&sqlite, &postgres, |store| store.values().unwrap()).await;
    assert_eq!(values[0], values[1]);
    assert_eq!(
        values[0]["models"],
        serde_json::json!(["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"])
    );
    assert_eq!(values[0]["statuses"], serde_json::json!([200, 429, 500]));
    assert_eq!(
        values[0]["upstreams"],
        serde_json::json!(["azure", "openai"])
    );
    assert_eq!(values[0]["users"].as_array().unwrap().len(), 11);
    for part in [
        "totals",
        "by_model",
        "by_upstream",
        "by_key",
        "hourly",
        "daily",
        "hourly_by",
        "daily_by",
        "by_user",
        "users_in_range",
        "latency_hourly",
        "latency_daily",
    ] {
        assert_eq!(
            round(&stats[0][part]),
            round(&stats[1][part]),
            "stats {part}"
        );
    }
}

/// The PostgreSQL writer leaves new rows' search text in a backlog that an indexer moves
/// into the trigram index later: a row just written is found before the indexer ran, and
/// the same rows after, by either path of a search (the newest rows, or the index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_row_is_found_by_search_before_and_after_the_indexer_moves_it() {
    use sluice::store::postgres::PostgresStore;
    let url = common::fresh_postgres_database().await;
    let now_ms = sluice::clock::unix_now_ms();
    let records: Vec<LogRecord> = (0..ROWS).map(|i| record(i, now_ms)).collect();
    let searches = [
        query(|q| q.search = Some("lighthouses".into())),
        query(|q| q.search = Some("Question 59".into())),
        query(|q| q.search = Some("ZEPPELIN-harbour".into())),
        query(|q| {
            q.search = Some("zeppelin-harbour".into());
            q.model = Some("gpt-4o-mini".into());
        }),
        query(|q| q.search = Some("Question 123 ".into())),
        query(|q| q.search = Some("req_00005999".into())),
        query(|q| q.search = Some("50%_off".into())),
    ];
    let (before, backlog, moved, after, left) = tokio::task::spawn_blocking(move || {
        let store = PostgresStore::open_without_indexer(&url).unwrap();
        for batch in records.chunks(1000) {
            store.write(batch, &[]).unwrap();
        }
        let answer = |store: &PostgresStore| -> Vec<Vec<String>> {
            searches
                .iter()
                .map(|q| ids(&serde_json::to_value(store.list(q).unwrap()).unwrap()))
                .collect()
        };
        let before = answer(&store);
        let backlog = store.backlog().unwrap();
        let moved = store.index_backlog().unwrap();
        let after = answer(&store);
        (before, backlog, moved, after, store.backlog().unwrap())
    })
    .await
    .unwrap();
    assert_eq!(
        backlog, ROWS as u64,
        "no row was indexed before the indexer ran"
    );
    assert_eq!(moved, ROWS as u64);
    assert_eq!(left, 0, "the indexer emptied the backlog");
    assert_eq!(before, after, "the same rows before and after indexing");
    assert_eq!(
        before[2],
        ["req_00000002", "req_00000001", "req_00000000"],
        "the oldest rows' rare phrase"
    );
    assert_eq!(before[3], ["req_00000001"], "with another filter");
    assert_eq!(before[5], ["req_00005999"], "the newest row");
    assert_eq!(before[0].len(), 50, "a page of a common term");
    assert!(before[6].is_empty());
}

/// Without being asked, the PostgreSQL store's indexer empties the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_search_indexer_catches_up_by_itself() {
    use sluice::store::postgres::PostgresStore;
    let url = common::fresh_postgres_database().await;
    let now_ms = sluice::clock::unix_now_ms();
    let left = tokio::task::spawn_blocking(move || {
        let store = PostgresStore::open(&url).unwrap();
        let records: Vec<LogRecord> = (0..3_000).map(|i| record(i, now_ms)).collect();
        store.write(&records, &[]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left = store.backlog().unwrap();
            if left == 0 || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert_eq!(left, 0, "rows still waiting for the indexer after 20 s");
}

/// When PostgreSQL drops every connection (a restart, say), the search indexer comes back
/// by itself, as the writer does, and indexes what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_search_indexer_heals_after_its_connection_is_cut() {
    use sluice::store::postgres::PostgresStore;
    use std::time::{Duration, Instant};
    let url = common::fresh_postgres_database().await;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let now_ms = sluice::clock::unix_now_ms();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || PostgresStore::open(&url).unwrap())
            .await
            .unwrap(),
    );
    // Retries while the store reconnects; `None` after 20 s.
    async fn until<T: Send + 'static>(
        store: &Arc<PostgresStore>,
        ask: impl Fn(&PostgresStore) -> anyhow::Result<Option<T>> + Send + Sync + 'static,
    ) -> Option<T> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(done)) = ask(&store) {
                    return Some(done);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        })
        .await
        .unwrap()
    }
    let written = |from: usize| {
        move |store: &PostgresStore| {
            let records: Vec<LogRecord> = (from..from + 1_000).map(|i| record(i, now_ms)).collect();
            store.write(&records, &[]).map(Some)
        }
    };
    let indexed = |store: &PostgresStore| Ok(store.backlog()?.eq(&0).then_some(()));
    assert!(until(&store, written(0)).await.is_some());
    assert!(until(&store, indexed).await.is_some(), "indexed at first");

    let cut: i64 = admin
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cut, 2, "the writer's and the indexer's connections");
    assert!(
        until(&store, written(1_000)).await.is_some(),
        "the writer came back"
    );
    assert!(
        until(&store, indexed).await.is_some(),
        "the indexer came back and indexed the rows written since"
    );
    let unindexed: i64 = admin
        .query_one("SELECT COUNT(*) FROM requests WHERE search_text = ''", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unindexed, 0);
}

/// Runs `ask` on both stores (off the runtime: the stores are synchronous).
async fn both<T: Send + 'static>(
    sqlite: &Arc<dyn Store>,
    postgres: &Arc<dyn Store>,
    ask: impl Fn(&dyn Store) -> T + Send + Sync + Clone + 'static,
) -> [T; 2] {
    let (a, b) = (sqlite.clone(), postgres.clone());
    tokio::task::spawn_blocking(move || [ask(a.as_ref()), ask(b.as_ref())])
        .await
        .unwrap()
}

/// Sums of floats may differ in the last bits between the two databases.
fn round(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => {
            serde_json::json!((n.as_f64().unwrap() * 1e6).round() / 1e6)
        }
        Value::Array(items) => Value::Array(items.iter().map(round).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), round(v))).collect())
        }
        other => other.clone(),
    }
}

/// What migration 2 added (the end user, the causes, the TTFB and user rollups), taken
/// away again, in both dialects: a log as the version before it wrote it.
const UNDO_MIGRATION_2: &str = "DROP INDEX requests_user_ts;
    ALTER TABLE requests DROP COLUMN end_user;
    ALTER TABLE rollup_hourly DROP COLUMN refused;
    ALTER TABLE rollup_hourly DROP COLUMN upstream_errors;
    DROP TABLE rollup_ttfb;
    DROP TABLE rollup_users;";

/// A log batch PostgreSQL refuses is rolled back, and an admin change made at the same
/// time on the store's connection stays: each transaction is its caller's alone. (Jobs ran
/// side by side on the one connection, so a change's statements could land inside a
/// batch's `BEGIN` … `ROLLBACK` and vanish while the change was answered as done.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_postgres_batch_never_takes_a_change_beside_it_down_with_it() {
    use sluice::store::{AuditEntry, Managed, ManagedChange};
    const CHANGES: usize = 150;
    let url = common::fresh_postgres_database().await;
    let now_ms = sluice::clock::unix_now_ms();
    let (managed, audited) = tokio::task::spawn_blocking(move || {
        let store = sluice::store::open(&url).unwrap();
        // PostgreSQL text holds no NUL byte: every batch with this row is refused.
        let mut refused = record(0, now_ms);
        refused.reply_text = Some("a NUL \0 in the reply".into());
        let refusing = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..(CHANGES * 2) {
                    assert!(store.write(std::slice::from_ref(&refused), &[]).is_err());
                }
            })
        };
        for i in 0..CHANGES {
            let change = ManagedChange::Insert(Managed {
                kind: "team".into(),
                id: format!("team_{i}"),
                name: format!("team {i}"),
                body: "{}".into(),
            });
            let audit = AuditEntry {
                ts: now_ms,
                actor: "admin key".into(),
                action: "team.create".into(),
                target: format!("team:team_{i}"),
                changes: "{}".into(),
                ..Default::default()
            };
            store.change_managed(&change, &audit).unwrap();
        }
        refusing.join().unwrap();
        (
            store.managed().unwrap().1.len(),
            store.audit(None, 1_000).unwrap().len(),
        )
    })
    .await
    .unwrap();
    assert_eq!(managed, CHANGES, "teams the store said it created");
    assert_eq!(audited, CHANGES, "their audit entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_log_from_an_earlier_version_is_migrated_at_start() {
    let url = common::fresh_postgres_database().await;
    let now_ms = sluice::clock::unix_now_ms();
    let opened = url.clone();
    tokio::task::spawn_blocking(move || {
        let store = sluice::store::open(&opened).unwrap();
        store.write(&[record(7, now_ms)], &[]).unwrap();
    })
    .await
    .unwrap();
    // As the version before migration 1 wrote it: search text in its original case.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "UPDATE requests SET search_text = search_text || ' MixedCase-Marker';
                 UPDATE sluice_schema SET version = 0; {UNDO_MIGRATION_2}"
        ))
        .await
        .unwrap();

    let found = tokio::task::spawn_blocking(move || {
        let store = sluice::store::open(&url).unwrap();
        store
            .list(&query(|q| q.search = Some("mixedcase-MARKER".into())))
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        found.data.len(),
        1,
        "the old row is found case-insensitively"
    );
    let version: i32 = client
        .query_one("SELECT version FROM sluice_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version >= 1);
}

#[tokio::test]
async fn a_sqlite_log_from_an_earlier_version_is_migrated_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let url = format!("sqlite://{}", path.display());
    let now_ms = sluice::clock::unix_now_ms();
    let records: Vec<LogRecord> = (0..3).map(|i| record(i, now_ms)).collect();
    sluice::store::open(&url)
        .unwrap()
        .write(&records, &[])
        .unwrap();
    // As the version before migration 1 wrote it: the index in the log's own file, search
    // rows numbered on their own, in their original case.
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute_batch(
            "UPDATE requests SET request_body = request_body || ' MixedCase-Marker' WHERE id = 'req_00000001';
             CREATE VIRTUAL TABLE requests_search USING fts5(id UNINDEXED, text, tokenize = 'trigram');
             INSERT INTO requests_search (rowid, id, text)
                 SELECT 100 + rowid, id, id || request_body FROM requests ORDER BY rowid DESC;
             PRAGMA user_version = 0;",
        )
        .unwrap();
    connection.execute_batch(UNDO_MIGRATION_2).unwrap();
    drop(connection);

    let store = sluice::store::open(&url).unwrap();
    let found = store
        .list(&query(|q| q.search = Some("mixedcase-MARKER".into())))
        .unwrap();
    assert_eq!(
        found
            .data
            .iter()
            .map(|r| r["id"].clone())
            .collect::<Vec<_>>(),
        ["req_00000001"]
    );
}

/// How long the search indexer (at the lowest priority, on a machine other tests keep busy)
/// is given to catch up.
const INDEXER_PATIENCE: Duration = Duration::from_secs(60);

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < INDEXER_PATIENCE,
            "{what}: not within {INDEXER_PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn search_ids(store: &dyn Store, search: &str) -> Vec<String> {
    let page = store
        .list(&query(|q| q.search = Some(search.into())))
        .unwrap();
    page.data
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_string())
        .collect()
}

fn index_rows(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(sluice::store::sqlite::search_path(path.to_str().unwrap()))
        .unwrap()
        .query_row("SELECT count(*) FROM requests_search", [], |row| row.get(0))
        .unwrap()
}

#[test]
fn a_sqlite_row_is_found_the_moment_it_is_written_and_the_writer_never_waits_for_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let store = sluice::store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap();
    let now_ms = sluice::clock::unix_now_ms();
    // More rows than a search looks through among the newest: the rare phrase (in rows 0
    // to 2) is searched for through the index and the rows after it.
    let records: Vec<LogRecord> = (0..ROWS).map(|i| record(i, now_ms)).collect();
    for batch in records.chunks(1000) {
        store.write(batch, &[]).unwrap();
    }
    wait_until("the indexer catches up", || {
        store.search_backlog().unwrap() == 0
    });
    assert_eq!(index_rows(&path), ROWS as i64);

    // The index's file locked, as an indexer preempted mid-transaction would hold it.
    let blocker =
        rusqlite::Connection::open(sluice::store::sqlite::search_path(path.to_str().unwrap()))
            .unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let mut newer = record(ROWS, now_ms);
    newer.id = "req_late".into();
    newer.ts = now_ms - 2 * HOUR_MS;
    newer.request_body = Some(r#"{"messages":[{"content":"Zeppelin-Harbour again"}]}"#.into());
    store.write(&[newer], &[]).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the write waited {:?} for the index's lock",
        started.elapsed()
    );
    assert_eq!(store.search_backlog().unwrap(), 1);
    // Found though not indexed, beside the indexed ones, in the same order as ever.
    let expected = ["req_late", "req_00000002", "req_00000001", "req_00000000"];
    assert_eq!(search_ids(&store, "zeppelin-HARBOUR"), expected);
    // A `%` or `_` in the phrase is itself, not a wildcard.
    assert!(search_ids(&store, "zeppelin_harbour").is_empty());

    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    wait_until("the new row is indexed", || {
        store.search_backlog().unwrap() == 0
    });
    assert_eq!(search_ids(&store, "zeppelin-HARBOUR"), expected);

    // Retention: the index's rows of removed requests go too.
    let removed = store.retain(now_ms - 47 * HOUR_MS, u64::MAX).unwrap();
    assert!(removed > 0);
    assert!(search_ids(&store, "zeppelin-harbour") == ["req_late"]);
    let kept = store.list(&query(|_| {})).unwrap().total.unwrap() as i64;
    wait_until("the removed rows leave the index", || {
        index_rows(&path) == kept
    });
    assert_eq!(search_ids(&store, "zeppelin-harbour"), ["req_late"]);
}

#[test]
fn a_sqlite_index_that_outlived_its_rows_is_built_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let search_file = sluice::store::sqlite::search_path(path.to_str().unwrap());
    let store = sluice::store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap();
    let now_ms = sluice::clock::unix_now_ms();
    let old: Vec<LogRecord> = (0..ROWS)
        .map(|i| record(i, now_ms - 10 * HOUR_MS))
        .collect();
    store.write(&old, &[]).unwrap();
    wait_until("the indexer catches up", || {
        store.search_backlog().unwrap() == 0
    });
    // Every row removed: SQLite hands the same rowids out again, to other rows (more than a
    // search looks through among the newest, so the index is asked).
    assert_eq!(store.retain(now_ms, u64::MAX).unwrap(), ROWS as u64);
    let new: Vec<LogRecord> = (0..ROWS)
        .map(|i| {
            let mut r = record(i, now_ms);
            r.id = format!("new_{i:08}");
            r.request_body = Some(format!("Question {i} about beacons"));
            r
        })
        .collect();
    store.write(&new, &[]).unwrap();
    for _ in 0..2 {
        assert!(search_ids(&store, "zeppelin-harbour").is_empty());
        assert_eq!(search_ids(&store, "question 1 about"), ["new_00000001"]);
        wait_until("the index is rebuilt", || {
            store.search_backlog().unwrap() == 0 && index_rows(&path) == ROWS as i64
        });
    }

    // Its file lost: rebuilt at the next start, the log searchable meanwhile.
    drop(store);
    std::thread::sleep(Duration::from_millis(300));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{search_file}{suffix}"));
    }
    let store = sluice::store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap();
    assert_eq!(search_ids(&store, "question 1 about"), ["new_00000001"]);
    wait_until("the index is rebuilt", || {
        store.search_backlog().unwrap() == 0
    });
    assert_eq!(search_ids(&store, "question 1 about"), ["new_00000001"]);
    assert_eq!(index_rows(&path), ROWS as i64);
}

#[test]
fn a_sqlite_log_that_let_its_caches_go_after_a_burst_keeps_writing_and_finding_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let store = sluice::store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap();
    let now_ms = sluice::clock::unix_now_ms();
    // A burst: enough rows that the indexer, once caught up, lets its caches go too.
    let burst: Vec<LogRecord> = (0..ROWS).map(|i| record(i, now_ms)).collect();
    for batch in burst.chunks(1000) {
        store.write(batch, &[]).unwrap();
    }
    wait_until("the indexer catches up", || {
        store.search_backlog().unwrap() == 0
    });
    store.release_caches();

    let mut later = record(ROWS, now_ms);
    later.id = "req_after_release".into();
    later.request_body = Some(r#"{"messages":[{"content":"Quokka-Lighthouse"}]}"#.into());
    store.write(&[later], &[]).unwrap();
    assert_eq!(
        search_ids(&store, "quokka-lighthouse"),
        ["req_after_release"]
    );
    wait_until("the new row is indexed", || {
        store.search_backlog().unwrap() == 0
    });
    assert_eq!(index_rows(&path), ROWS as i64 + 1);
    assert_eq!(search_ids(&store, "zeppelin-harbour").len(), 3);
    assert_eq!(
        store.list(&query(|_| {})).unwrap().total.unwrap(),
        ROWS as u64 + 1
    );
}
