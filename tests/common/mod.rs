//! Shared test harness: a real gateway on an ephemeral port in front of in-process mocks.

#![allow(dead_code)]

use std::future::pending;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice::config::{EnvMap, load};
use sluice::gateway::Gateway;
use sluice::mock::{MockOptions, MockServer};
use tokio::net::TcpListener;

pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    /// Holds the SQLite file of the request log, when the test did not choose storage.
    pub dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Starts a gateway from YAML (with `{mock}`-style placeholders already filled in).
pub async fn gateway(yaml: &str) -> TestGateway {
    gateway_with_env(yaml, &[]).await
}

pub async fn gateway_with_env(yaml: &str, env: &[(&str, &str)]) -> TestGateway {
    let env = EnvMap::from_pairs(env.iter().copied());
    // Every test gateway logs to a store of its own unless the test says otherwise: a SQLite
    // file, or with SLUICE_TEST_STORAGE=postgres a fresh database on the local PostgreSQL.
    let (yaml, dir) = if yaml.contains("storage:") {
        (yaml.to_string(), None)
    } else if std::env::var("SLUICE_TEST_STORAGE").as_deref() == Ok("postgres") {
        let url = fresh_postgres_database().await;
        (format!("{yaml}\nstorage: {{url: '{url}'}}\n"), None)
    } else {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
        (format!("{yaml}\nstorage: {{url: '{url}'}}\n"), Some(dir))
    };
    let mut document = load::parse_document(&yaml).expect("test config is YAML");
    load::apply_env_overrides(&mut document, &env).expect("env overrides apply");
    let config = load::resolve(&document, &env)
        .unwrap_or_else(|problems| panic!("test config invalid: {problems:?}"));
    let gateway = Arc::new(Gateway::new(config).expect("gateway builds"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(sluice::http::server::serve(
        listener,
        gateway.clone(),
        pending(),
    ));
    TestGateway { addr, gateway, dir }
}

/// The PostgreSQL server the tests use (trust auth on this machine and in CI).
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// Creates an empty database for one test; fails the test if PostgreSQL is unreachable.
pub async fn fresh_postgres_database() -> String {
    let (client, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/test"), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (database test) is reachable");
    tokio::spawn(connection);
    let name = format!("sluice_test_{:016x}", fastrand::u64(..));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    format!("{POSTGRES}/{name}")
}

/// Everything the test gateway's store holds, as text: to look for secrets in it.
pub async fn stored_text(gw: &TestGateway) -> String {
    if let Some(dir) = &gw.dir {
        let mut text = String::new();
        for entry in std::fs::read_dir(dir.path()).expect("store dir") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("store file");
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
        return text;
    }
    let url = match &gw.gateway.config.storage.url {
        Some(url) if url.starts_with("postgres") => url.clone(),
        other => panic!("no store to read: {other:?}"),
    };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let mut text = String::new();
    for table in [
        "requests",
        "rollup_hourly",
        "rollup_latency",
        "usage_counters",
        "managed",
        "audit",
    ] {
        for row in client
            .query(&format!("SELECT CAST(t AS TEXT) FROM {table} t"), &[])
            .await
            .expect("dump")
        {
            text.push_str(&row.get::<_, String>(0));
            text.push('\n');
        }
    }
    text
}

pub async fn mock() -> MockServer {
    mock_with(MockOptions::default()).await
}

/// A mock upstream that names itself `name` (in `x-mock-upstream` and its replies),
/// answering with `fault` if given.
pub async fn named_mock(name: &str, fault: Option<sluice::mock::Fault>) -> MockServer {
    mock_with(MockOptions {
        name: name.into(),
        fault,
        ..MockOptions::default()
    })
    .await
}

/// The upstream that answered, from sluice's `x-sluice-upstream`.
pub fn served_by(response: &reqwest::Response) -> String {
    response.headers()["x-sluice-upstream"]
        .to_str()
        .unwrap()
        .to_string()
}

pub async fn mock_with(options: MockOptions) -> MockServer {
    MockServer::start(options).await.expect("mock starts")
}

/// A one-upstream config in front of `mock`, with gateway key `fk-alice-0001` and upstream
/// keys `sk-up-one-00001`, `sk-up-two-00002`.
pub fn simple_config(mock: &MockServer) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - name: main
    base_url: {}
    keys: [sk-up-one-00001, sk-up-two-00002]
",
        mock.url()
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

pub async fn json(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("body");
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// Asserts an OpenAI-shaped error with this status and code.
pub async fn assert_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "errors are JSON"
    );
    let body = json(response).await;
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string(), "{body}");
    body
}

/// Waits until `check` holds, for at most `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// Limits count in fixed minutes of the wall clock: a burst that must land in one minute
/// starts early in a minute rather than across a boundary.
pub async fn start_of_a_minute() {
    let second = sluice::clock::unix_now().rem_euclid(60);
    if second > 45 {
        tokio::time::sleep(std::time::Duration::from_secs(
            u64::try_from(61 - second).unwrap_or(1),
        ))
        .await;
    }
}

pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]}).to_string()
}

/// Waits until the test gateway's log has written everything queued so far.
pub async fn flush(gw: &TestGateway) {
    gw.gateway
        .recorder
        .as_ref()
        .expect("the log is on")
        .flush()
        .await;
}

/// `GET path` with an admin key; asserts 200 and answers the JSON.
pub async fn admin_json(gw: &TestGateway, path: &str, admin_key: &str) -> serde_json::Value {
    let response = client()
        .get(gw.url(path))
        .bearer_auth(admin_key)
        .send()
        .await
        .expect("admin request");
    assert_eq!(response.status(), 200, "{path}");
    json(response).await
}

/// This process's resident memory in KiB (the in-process gateway's included).
pub fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
