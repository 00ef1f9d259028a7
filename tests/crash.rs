//! `kill -9` of the `sluice` binary under load: what the log and the persisted counters
//! keep. These tests measure time, so they run one at a time, in a binary of their own.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sluice::mock::MockServer;
use sluice::store::Store;

const ALICE: &str = "Bearer fk-alice-0001";

/// One at a time: each loads both cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(mock: &MockServer, storage: &str) -> String {
    format!(
        "server: {{listen: '127.0.0.1:0'}}
access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-key-0001]}}
admin: {{key: admin-secret-0001}}
pricing:
  gpt-4o: {{input: 2.5, output: 10}}
{storage}",
        mock.url()
    )
}

async fn admin_get(base: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{base}{path}"))
        .header("authorization", "Bearer admin-secret-0001")
        .send()
        .await
        .unwrap()
}

/// `sluice serve` as a child process.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(config: &std::path::Path) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(config)
        .env("SLUICE_LOG", "warn,sluice=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines.next().expect("an address").expect("line");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split('/').next().unwrap_or_default().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (running, format!("http://{address}"))
}

/// What a `kill -9` under load left: (answered, answered more than 100 ms before the
/// kill, rows in the log, requests in the persisted counters after a restart).
async fn kill_under_load(tasks: usize, pause: Duration, kill_after: usize) -> (u64, u64, u64, u64) {
    let _serial = SERIAL.lock().await;
    let mock = mock_with(sluice::mock::MockOptions {
        record: false,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("log.db");
    let file = dir.path().join("sluice.yaml");
    let storage = format!("storage: {{url: 'sqlite://{}'}}\n", db.display());
    std::fs::write(&file, config(&mock, &storage)).unwrap();
    let (mut running, base) = serve(&file);
    let answers: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let limit = kill_after * 3;
    let load: Vec<_> = (0..tasks)
        .map(|_| {
            let (answers, stop, sent, base) =
                (answers.clone(), stop.clone(), sent.clone(), base.clone());
            tokio::spawn(async move {
                let client = client();
                while !stop.load(Ordering::SeqCst) && sent.fetch_add(1, Ordering::SeqCst) < limit {
                    let response = client
                        .post(format!("{base}/v1/chat/completions"))
                        .header("authorization", ALICE)
                        .header("content-type", "application/json")
                        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"kill"}]}"#)
                        .send()
                        .await;
                    let Ok(response) = response else { break };
                    if response.status() == 200 && response.bytes().await.is_ok() {
                        answers.lock().unwrap().push(Instant::now());
                    }
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || answers.lock().unwrap().len()
            >= kill_after)
        .await,
        "the load runs"
    );
    running.0.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    running.0.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for task in load {
        let _ = task.await;
    }
    let answers = answers.lock().unwrap().clone();
    let settled = answers
        .iter()
        .filter(|t| **t + Duration::from_millis(100) <= killed)
        .count() as u64;
    let answered = answers.len() as u64;

    let (_running, base) = serve(&file);
    let status = json(admin_get(&base, "/v1/status").await).await;
    let counted = status["keys"][0]["usage"]["day"]["requests"]
        .as_u64()
        .unwrap();
    let store = sluice::store::sqlite::SqliteStore::open(db.to_str().unwrap()).unwrap();
    let rows = store
        .list(&Default::default())
        .unwrap()
        .total
        .expect("an unfiltered list counts its rows");
    eprintln!(
        "answered {answered}, more than 100 ms before the kill {settled}, rows {rows}, counted {counted}"
    );
    assert!(rows <= answered + tasks as u64 && counted <= answered + tasks as u64);
    (answered, settled, rows, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_at_a_steady_load_only_the_last_100_ms_are_missing() {
    // About 200 requests a second: well under what this gateway serves.
    let (_, settled, rows, counted) = kill_under_load(8, Duration::from_millis(40), 400).await;
    assert!(
        rows >= settled,
        "rows {rows} < {settled} answered 100 ms before the kill"
    );
    assert!(counted >= settled, "counted {counted} < {settled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_at_saturation_the_counters_miss_only_the_last_100_ms() {
    // As fast as the gateway answers: rows may wait (or be shed), the accounting may not.
    let (_, settled, _, counted) = kill_under_load(32, Duration::ZERO, 1500).await;
    assert!(
        counted >= settled,
        "counted {counted} < {settled} answered 100 ms before the kill"
    );
}
