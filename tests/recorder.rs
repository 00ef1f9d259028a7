//! The request log and the accounting under load and store faults: a full queue, a
//! PostgreSQL outage, records the store refuses, client-chosen model names. (`kill -9`:
//! tests/crash.rs, alone in its binary so that its timing is not another test's load.)

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::clock::unix_now;
use sluice::mock::MockServer;
use sluice::pure::limits::{Period, key_scope};
use sluice::store::Store;

const ADMIN: &str = "Bearer admin-secret-0001";
const ALICE: &str = "Bearer fk-alice-0001";

fn config(mock: &MockServer, storage: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-key-0001], models: [gpt-4o, gpt-4o-mini]}}
  - {{name: spare, base_url: '{}', keys: [sk-upstream-key-0002], models: ['*'], model_map: {{house: gpt-4o}}}}
admin: {{key: admin-secret-0001}}
pricing:
  gpt-4o: {{input: 2.5, output: 10}}
{storage}",
        mock.url(),
        mock.url()
    )
}

async fn chat(gw: &TestGateway, model: &str) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(
            json!({"model": model, "messages": [{"role": "user", "content": "hello"}]}).to_string(),
        )
        .send()
        .await
        .unwrap()
}

async fn admin_get(base: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{base}{path}"))
        .header("authorization", ADMIN)
        .send()
        .await
        .unwrap()
}

async fn flush(gw: &TestGateway) {
    tokio::time::timeout(
        Duration::from_secs(20),
        gw.gateway.recorder.as_ref().expect("the log is on").flush(),
    )
    .await
    .expect("the log flushes");
}

/// Requests the store's counters hold for alice today.
fn persisted_requests(store: &dyn Store) -> u64 {
    let day = Period::Day.window(unix_now());
    store
        .counters(&[(Period::Day, day)])
        .unwrap()
        .iter()
        .find(|c| c.scope == key_scope("alice"))
        .map_or(0, |c| c.usage.requests)
}

fn log_figures(status: &Value) -> (u64, u64, u64) {
    let log = &status["log"];
    (
        log["written"].as_u64().unwrap(),
        log["shed"].as_u64().unwrap(),
        log["dropped"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_full_log_queue_sheds_rows_but_never_the_accounting() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let storage = format!(
        "storage: {{url: 'sqlite://{}', queue: 4, overflow: shed_rows}}\n",
        path.display()
    );
    let gw = gateway(&config(&mock, &storage)).await;
    // Another process holds the database's write lock: the writer stalls, its queue fills.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let total = 40;
    for _ in 0..total {
        let response = chat(&gw, "gpt-4o").await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    blocker.execute_batch("COMMIT").unwrap();
    flush(&gw).await;
    let recorder = gw.gateway.recorder.as_ref().unwrap();
    assert_eq!(
        persisted_requests(recorder.store.as_ref()),
        total,
        "every answered request is counted in the store, rows shed or not"
    );
    let status = json(admin_get(&gw.url(""), "/v1/status").await).await;
    let (written, shed, dropped) = log_figures(&status);
    assert!(shed > 0, "{status}");
    assert_eq!(written + shed, total, "{status}");
    assert_eq!(dropped, 0, "{status}");
    assert_eq!(
        recorder.store.list(&Default::default()).unwrap().total,
        Some(written)
    );
    let metrics = admin_get(&gw.url(""), "/metrics")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("sluice_log_shed_total {shed}")),
        "{metrics}"
    );
    // The key's tokens were settled for every request, shed or not.
    let tokens = status["keys"][0]["usage"]["day"]["tokens"]
        .as_u64()
        .unwrap();
    assert!(tokens >= total, "{status}");
    // After a restart the limits start from what was persisted.
    drop(gw);
    let again = gateway(&config(&mock, &storage)).await;
    let status = json(admin_get(&again.url(""), "/v1/status").await).await;
    assert_eq!(
        status["keys"][0]["usage"]["day"]["requests"], total,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_in_the_middle_of_a_load_writes_or_counts_every_record() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let storage = format!(
        "storage: {{url: 'sqlite://{}'}}\n",
        dir.path().join("log.db").display()
    );
    let gw = Arc::new(gateway(&config(&mock, &storage)).await);
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (gw, answered) = (gw.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..25 {
                let response = chat(&gw, "gpt-4o").await;
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // The log stops while records keep arriving: some queued in the accountant's inbox,
    // some handed over after it closed.
    while answered.load(Ordering::SeqCst) < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = gw.clone();
    tokio::task::spawn_blocking(move || stopping.gateway.shutdown())
        .await
        .unwrap();
    for client in clients {
        client.await.unwrap();
    }
    let total = answered.load(Ordering::SeqCst) as u64;
    assert_eq!(total, 400);
    let recorder = gw.gateway.recorder.as_ref().unwrap();
    let figures = || {
        let stats = &recorder.stats;
        (
            stats.written.load(Ordering::SeqCst),
            stats.dropped.load(Ordering::SeqCst),
            stats.shed.load(Ordering::SeqCst),
        )
    };
    // A record is handed over when its answer's body ends: the last ones just after.
    for _ in 0..200 {
        let (written, dropped, shed) = figures();
        if written + dropped + shed == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (written, dropped, shed) = figures();
    assert_eq!(
        written + dropped + shed,
        total,
        "every answered request is written or counted as lost: {written} written, {dropped} dropped, {shed} shed"
    );
    assert!(
        written >= 140,
        "what came before the stop is written: {written}"
    );
    // What the log wrote is what the store holds, rows and counters alike.
    assert_eq!(
        recorder.store.list(&Default::default()).unwrap().total,
        Some(written)
    );
    assert_eq!(persisted_requests(recorder.store.as_ref()), written);
}

#[tokio::test]
async fn shed_bodies_keeps_the_rows_without_their_bodies_first() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let storage = format!(
        "storage: {{url: 'sqlite://{}', queue: 20, overflow: shed_bodies}}\n",
        path.display()
    );
    let gw = gateway(&config(&mock, &storage)).await;
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let total = 30;
    for _ in 0..total {
        chat(&gw, "gpt-4o").await.bytes().await.unwrap();
    }
    blocker.execute_batch("COMMIT").unwrap();
    flush(&gw).await;
    let status = json(admin_get(&gw.url(""), "/v1/status").await).await;
    let (written, shed, _) = log_figures(&status);
    let trimmed = status["log"]["trimmed"].as_u64().unwrap();
    assert_eq!(written + shed, total, "{status}");
    assert!(
        trimmed >= 9,
        "past half the queue, rows lose their bodies: {status}"
    );
    assert!(shed > 0 && shed < total - 10, "{status}");
    let store = gw.gateway.recorder.as_ref().unwrap().store.clone();
    let page = store
        .list(&sluice::store::ListQuery {
            per_page: 100,
            ..Default::default()
        })
        .unwrap();
    let bare = page
        .data
        .iter()
        .filter(|row| {
            let id = row["id"].as_str().unwrap();
            store.get(id).unwrap().unwrap()["response_body"].is_null()
        })
        .count();
    assert!(bare >= 1, "some rows were kept without bodies");
    assert!(bare < page.data.len(), "the first rows kept theirs");
    assert_eq!(persisted_requests(store.as_ref()), total);
}

#[tokio::test]
async fn backpressure_makes_requests_wait_rather_than_shed() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let storage = format!(
        "storage: {{url: 'sqlite://{}', queue: 3, overflow: backpressure}}\n",
        path.display()
    );
    let gw = Arc::new(gateway(&config(&mock, &storage)).await);
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (gw, answered) = (gw.clone(), answered.clone());
        tokio::spawn(async move {
            for _ in 0..10 {
                chat(&gw, "gpt-4o").await.bytes().await.unwrap();
                answered.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let waiting_at = answered.load(Ordering::SeqCst);
    assert!(waiting_at < 10, "requests wait while the log is full");
    blocker.execute_batch("COMMIT").unwrap();
    tokio::time::timeout(Duration::from_secs(20), sender)
        .await
        .expect("requests go on once the log catches up")
        .unwrap();
    flush(&gw).await;
    let status = json(admin_get(&gw.url(""), "/v1/status").await).await;
    let (written, shed, dropped) = log_figures(&status);
    assert_eq!((written, shed, dropped), (10, 0, 0), "{status}");
}

/// A TCP relay to the local PostgreSQL that can be cut (every connection closed, new ones
/// refused) and restored: what a PostgreSQL restart looks like from sluice.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (flag, list) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            port,
            up,
            connections,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

// Opening the store blocks the test's thread; the relay runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_reconnects_and_writes_what_was_queued() {
    let mock = mock().await;
    let relay = Relay::start().await;
    let url = fresh_postgres_database()
        .await
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    let gw = gateway(&config(&mock, &format!("storage: {{url: '{url}'}}\n"))).await;
    for _ in 0..3 {
        chat(&gw, "gpt-4o").await.bytes().await.unwrap();
    }
    flush(&gw).await;
    relay.cut();
    for _ in 0..5 {
        let response = chat(&gw, "gpt-4o").await;
        assert_eq!(response.status(), 200, "requests go on without the store");
        response.bytes().await.unwrap();
    }
    let mut ready = client().get(gw.url("/ready")).send().await.unwrap();
    for _ in 0..50 {
        if ready.status() == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = client().get(gw.url("/ready")).send().await.unwrap();
    }
    let body = assert_error(ready, 503, "storage_unavailable").await;
    let message = body["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("reconnect"), "{body}");
    assert!(
        !message.contains("postgres://"),
        "no URL in the answer: {body}"
    );
    let listing = admin_get(&gw.url(""), "/api/requests").await;
    assert_error(listing, 503, "storage_unavailable").await;

    relay.restore();
    let mut back = false;
    for _ in 0..100 {
        if client()
            .get(gw.url("/ready"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "/ready is 200 again within 10 s");
    flush(&gw).await;
    let listing = admin_get(&gw.url(""), "/api/requests").await;
    assert_eq!(listing.status(), 200);
    let page = json(listing).await;
    assert_eq!(page["total"], 8, "the queued records were written: {page}");
    let store = gw.gateway.recorder.as_ref().unwrap().store.clone();
    assert_eq!(persisted_requests(store.as_ref()), 8);
    let status = json(admin_get(&gw.url(""), "/v1/status").await).await;
    assert_eq!(log_figures(&status), (8, 0, 0), "{status}");
}

#[tokio::test]
async fn a_record_the_store_refuses_costs_only_itself_and_is_counted() {
    // A store that refuses one record: PostgreSQL with a trigger that rejects a model name.
    // (NUL bytes, which PostgreSQL refuses in text, no longer get this far: model names are
    // checked at the edge, and the store sanitises the rest.)
    let mock = mock().await;
    let url = fresh_postgres_database().await;
    let gw = gateway(&config(&mock, &format!("storage: {{url: '{url}'}}\n"))).await;
    let (database, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    database
        .batch_execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN \
               IF NEW.model = 'poison' THEN RAISE EXCEPTION 'this record is refused'; END IF; \
               RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse_poison BEFORE INSERT ON requests \
               FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
        )
        .await
        .unwrap();
    let recorder = gw.gateway.recorder.as_ref().unwrap();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (url, model) = (
                gw.url("/v1/chat/completions"),
                if i == 15 { "poison" } else { "gpt-4o" },
            );
            let body = json!({"model": model, "messages": [{"role": "user", "content": format!("n{i}\u{0}")}]});
            tokio::spawn(async move {
                let response = client()
                    .post(url)
                    .header("authorization", ALICE)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    flush(&gw).await;
    assert_eq!(
        recorder.store.list(&Default::default()).unwrap().total,
        Some(29),
        "every record but the refused one is written"
    );
    assert_eq!(
        persisted_requests(recorder.store.as_ref()),
        30,
        "the refused record's counters are kept"
    );
    let status = json(admin_get(&gw.url(""), "/v1/status").await).await;
    assert_eq!(log_figures(&status), (29, 0, 1), "{status}");
}

/// A small tmpfs, unmounted on drop; `None` where mounting is not allowed (not root).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "sluice-test"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the test's gateway may still hold the file open.
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test]
async fn records_a_full_disk_cannot_take_are_counted_one_by_one() {
    let Some(disk) = Tmpfs::mount("640k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let mock = mock().await;
    let path = disk.0.path().join("log.db");
    let storage = format!("storage: {{url: 'sqlite://{}'}}\n", path.display());
    let gw = gateway(&config(&mock, &storage)).await;
    let total = 40;
    for _ in 0..total {
        let big = "x".repeat(30_000);
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", ALICE)
            .body(
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": big}]})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        flush(&gw).await;
    }
    let status = json(admin_get(&gw.url(""), "/v1/status").await).await;
    let (written, shed, dropped) = log_figures(&status);
    assert_eq!(written + dropped, total, "{status}");
    assert!(dropped >= 1, "the disk filled up: {status}");
    assert_eq!(shed, 0, "{status}");
    drop(gw);
}

#[tokio::test]
async fn metrics_and_rollups_name_only_configured_models() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    for model in ["gpt-4o", "gpt-4o-mini", "house", "made-up-1", "made-up-2"] {
        assert_eq!(chat(&gw, model).await.status(), 200, "{model}");
    }
    flush(&gw).await;
    let metrics = admin_get(&gw.url(""), "/metrics")
        .await
        .text()
        .await
        .unwrap();
    for shown in ["gpt-4o", "gpt-4o-mini", "house", "other"] {
        assert!(
            metrics.contains(&format!("model=\"{shown}\"")),
            "{shown} in {metrics}"
        );
    }
    assert!(!metrics.contains("made-up"), "{metrics}");
    let stats = json(admin_get(&gw.url(""), "/api/stats").await).await;
    let names: Vec<&str> = stats["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"other") && !names.iter().any(|n| n.starts_with("made-up")),
        "{names:?}"
    );
    let listing = json(admin_get(&gw.url(""), "/api/requests?model=made-up-1").await).await;
    assert_eq!(listing["total"], 1, "the row keeps the model as sent");

    // A reload that prices made-up-1 names it from then on; the recorder outlives it.
    let mut document = sluice::config::load::parse_document(&format!(
        "{}  made-up-1: {{input: 1, output: 1}}\nstorage: {{url: 'sqlite://{}'}}\n",
        config(&mock, ""),
        gw.dir.as_ref().unwrap().path().join("sluice.db").display()
    ))
    .unwrap();
    let env = sluice::config::EnvMap::from_pairs(std::iter::empty::<(&str, &str)>());
    sluice::config::load::apply_env_overrides(&mut document, &env).unwrap();
    let reloaded = sluice::config::load::resolve(&document, &env).unwrap();
    let next =
        Arc::new(sluice::gateway::Gateway::with_shared(reloaded, gw.gateway.shared()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sluice::http::server::serve(
        listener,
        next.clone(),
        std::future::pending(),
    ));
    let response = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(
            json!({"model": "made-up-1", "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    flush(&gw).await;
    let metrics = admin_get(&format!("http://{addr}"), "/metrics")
        .await
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("model=\"made-up-1\""), "{metrics}");
    assert!(!metrics.contains("made-up-2"), "{metrics}");
}

/// A record with every optional field filled or empty by turns, text in several scripts.
fn varied_record(i: usize, now_ms: i64) -> sluice::store::LogRecord {
    let some = |text: String| (i % 3 != 0).then_some(text);
    sluice::store::LogRecord {
        id: format!("chatcmpl-roundtrip-{i:05}"),
        ts: now_ms - i as i64,
        client_ip: format!("10.1.{}.{}", i % 200, i % 7),
        key_name: format!("key-{}", i % 4),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: some("gpt-4o".into()),
        user: (i % 5 == 0).then(|| format!("user-{i}")),
        upstream_model: some("gpt-4o-2024-08-06".into()),
        upstream: some("main".into()),
        upstream_key: some("sk-…0001".into()),
        status: if i % 11 == 0 { 502 } else { 200 },
        latency_ms: 0.125 + i as f64,
        ttfb_ms: some(String::new()).map(|_| 0.5 + i as f64),
        prompt_tokens: (i % 4 != 0).then_some(i as u64),
        completion_tokens: (i % 4 != 0).then_some(2 * i as u64),
        total_tokens: (i % 4 != 0).then_some(3 * i as u64),
        cost: (i % 4 != 0).then_some(i as f64 / 1000.0),
        usage_source: some("upstream".into()),
        stream: i % 2 == 0,
        error: (i % 11 == 0).then(|| format!("upstream said no to {i}")),
        tries: 1 + (i % 3) as u32,
        attempts: json!([{"upstream": "main", "status": 200, "ms": 1.5}]).to_string(),
        request_headers: json!({"content-type": "application/json"}).to_string(),
        response_headers: json!({"x-n": i.to_string()}).to_string(),
        request_body: some(format!(
            r#"{{"messages":[{{"content":"Grüße, Ünïcode ☃ question {i}"}}]}}"#
        )),
        response_body: some(format!(r#"{{"answer":"Lighthouse-{i}-Keeper says hi"}}"#)),
        upstream_response_body: (i % 6 == 1).then(|| format!("raw answer {i}")),
        reply_text: some(format!("Lighthouse-{i}-Keeper says hi")),
        reply_tool_calls: (i % 7 == 0).then(|| json!([{"id": format!("call_{i}")}]).to_string()),
        cache: (i % 8 == 0).then(|| "miss".to_string()),
        saved_cost: None,
        model_label: None,
    }
}

#[tokio::test]
async fn a_batch_written_in_one_statement_reads_back_field_for_field_and_is_found() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("log.db").display());
    let postgres = fresh_postgres_database().await;
    let now_ms = sluice::clock::unix_now_ms();
    let records: Vec<_> = (0..600).map(|i| varied_record(i, now_ms)).collect();
    for url in [sqlite, postgres] {
        let gw = gateway(&config(&mock, &format!("storage: {{url: '{url}'}}\n"))).await;
        let store = gw.gateway.recorder.as_ref().unwrap().store.clone();
        store.write(&records, &[]).unwrap();
        // A retried batch (its first try's outcome unknown) adds nothing.
        store.write(&records[..10], &[]).unwrap();
        let listing = json(admin_get(&gw.url(""), "/api/requests?per_page=1").await).await;
        assert_eq!(listing["total"], 600, "{url}: {listing}");
        for r in records.iter().step_by(7) {
            let got = json(admin_get(&gw.url(""), &format!("/api/requests/{}", r.id)).await).await;
            let expected = serde_json::to_value(r).unwrap();
            for field in [
                "id",
                "ts",
                "client_ip",
                "key_name",
                "method",
                "path",
                "model",
                "user",
                "upstream_model",
                "upstream",
                "upstream_key",
                "status",
                "latency_ms",
                "ttfb_ms",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "cost",
                "usage_source",
                "stream",
                "error",
                "tries",
                "request_body",
                "response_body",
                "upstream_response_body",
                "reply_text",
                "cache",
            ] {
                assert_eq!(got[field], expected[field], "{url}: {field} of {}", r.id);
            }
            let headers: Value = serde_json::from_str(&r.response_headers).unwrap();
            assert_eq!(
                got["response_headers"], headers,
                "{url}: headers of {}",
                r.id
            );
        }
        // Search finds a row by its answer's words, whatever their case, and by its
        // request's non-ASCII text.
        for (search, expected) in [
            ("lighthouse-301-keeper", Some("chatcmpl-roundtrip-00301")),
            ("ÜNÏCODE ☃ QUESTION 302", Some("chatcmpl-roundtrip-00302")),
            ("lighthouse-300-keeper", None),
        ] {
            let path = format!("/api/requests?search={}", urlencode(search));
            let found = json(admin_get(&gw.url(""), &path).await).await;
            let ids: Vec<&str> = found["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| row["id"].as_str().unwrap())
                .collect();
            assert_eq!(
                ids,
                expected.into_iter().collect::<Vec<_>>(),
                "{url}: {search}"
            );
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_log_from_before_migration_6_keeps_its_search_with_the_lighter_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let url = format!("sqlite://{}", path.display());
    let now_ms = sluice::clock::unix_now_ms();
    // More rows than a search looks through first: an old row is found through the index.
    let records: Vec<_> = (0..5_100).map(|i| varied_record(i, now_ms)).collect();
    sluice::store::open(&url)
        .unwrap()
        .write(&records, &[])
        .unwrap();
    // As a sluice before migration 6 left it: the index with positions, in the log's
    // file, version 5.
    let old = rusqlite::Connection::open(&path).unwrap();
    old.execute_batch(
        "CREATE VIRTUAL TABLE requests_search USING fts5(id UNINDEXED, text, tokenize = 'trigram');
         DROP TABLE search_epoch;
         PRAGMA user_version = 5;",
    )
    .unwrap();
    for record in &records {
        old.execute(
            "INSERT INTO requests_search (rowid, id, text) SELECT rowid, id, ?2 FROM requests WHERE id = ?1",
            rusqlite::params![record.id, sluice::store::search_text(record)],
        )
        .unwrap();
    }
    drop(old);
    let store = sluice::store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap();
    // Moved into the index's own file, lighter, whole: nothing left to index.
    let schema = |file: &str| -> Option<String> {
        rusqlite::Connection::open(file)
            .unwrap()
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'requests_search'",
                [],
                |row| row.get(0),
            )
            .ok()
    };
    assert_eq!(schema(path.to_str().unwrap()), None);
    let moved = schema(&sluice::store::sqlite::search_path(path.to_str().unwrap())).unwrap();
    assert!(moved.contains("detail = none"), "{moved}");
    assert_eq!(store.search_backlog().unwrap(), 0);
    for (search, id) in [
        ("LIGHTHOUSE-31-keeper", "chatcmpl-roundtrip-00031"),
        ("lighthouse-5098-KEEPER", "chatcmpl-roundtrip-05098"),
        ("ünïcode ☃ question 5096", "chatcmpl-roundtrip-05096"),
    ] {
        let found = store
            .list(&sluice::store::ListQuery {
                search: Some(search.into()),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = found
            .data
            .iter()
            .map(|row| row["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [id], "{search}");
    }
}
