//! `sluice-bench logwrite`: the request log's writer alone, rows per second into a store.
//!
//! Issue 18 asks the log to keep up with the full configuration's saturation rate; this
//! separates what the store's `write` costs from everything else the gateway does. Rows
//! are shaped as the accountant shapes the benchmark's own request (`bench/run.sh`'s chat
//! body, the mock's answer, masked headers, one try), built before the clock starts, and
//! written in batches of the writer's size, each batch one `Store::write` (one
//! transaction with its rollups and counter deltas), as the log writer does.
//!
//! SQLite: the search index is written by its own thread behind the writer (see
//! `store/sqlite.rs`); the run also waits for it to catch up and reports its rate
//! (`indexed_rows_per_s`, rows over the time from the first write until nothing is left
//! to index) and what it had left when the writes ended (`index_backlog_at_end`).
//! `open_seconds` is opening the store, which migrates a log an earlier sluice wrote
//! (`--store sqlite:///path --rows 0` times just that).

use std::time::Instant;

use anyhow::{Context, bail};
use http::HeaderMap;
use sluice::pure::limits::{Period, Usage, key_scope, upstream_scope};
use sluice::store::{CounterDelta, LogRecord};

/// Where `--store postgres` writes: a database the run creates afresh.
const POSTGRES_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const POSTGRES_DATABASE: &str = "sluice_logwrite_bench";

/// The benchmark's request body (`bench/run.sh`).
const REQUEST_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}"#;

/// Writes `rows` rows in batches of `batch` into `store` (`sqlite`, `postgres` or a storage
/// URL) and prints `rows_per_s=… ms_per_batch=…` for `bench/run.sh` and BENCHMARKS.md.
pub fn run(store: &str, rows: usize, batch: usize) -> anyhow::Result<()> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let scratch = std::env::temp_dir().join(format!("sluice-logwrite-{}", std::process::id()));
    let url = match store {
        "sqlite" => {
            std::fs::create_dir_all(&scratch)?;
            format!("sqlite://{}", scratch.join("log.db").display())
        }
        "postgres" => {
            let status = std::process::Command::new("psql")
                .arg(format!("{POSTGRES_SERVER}/postgres"))
                .args([
                    "-qc",
                    &format!("DROP DATABASE IF EXISTS {POSTGRES_DATABASE}"),
                ])
                .args(["-qc", &format!("CREATE DATABASE {POSTGRES_DATABASE}")])
                .status()
                .context("psql creates the benchmark's database")?;
            if !status.success() {
                bail!("psql could not create {POSTGRES_DATABASE}");
            }
            format!("{POSTGRES_SERVER}/{POSTGRES_DATABASE}")
        }
        url => url.to_string(),
    };
    let result = write_rows(&url, rows, batch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// A store, and the same store as SQLite when it is one.
type Opened = (
    std::sync::Arc<dyn sluice::store::Store>,
    Option<std::sync::Arc<sluice::store::sqlite::SqliteStore>>,
);

/// The store a URL names, and a SQLite one also as itself: its search index follows the
/// writer, and a benchmark waits for it (`search_backlog`) before it reads.
pub fn open_store(url: &str) -> anyhow::Result<Opened> {
    Ok(match sluice::store::sqlite_path(url) {
        Some(path) => {
            let sqlite = std::sync::Arc::new(sluice::store::sqlite::SqliteStore::open(path)?);
            (sqlite.clone(), Some(sqlite))
        }
        None => (sluice::store::open(url)?, None),
    })
}

fn write_rows(url: &str, rows: usize, batch: usize) -> anyhow::Result<()> {
    let opening = Instant::now();
    let (store, sqlite) = open_store(url)?;
    let open_seconds = opening.elapsed().as_secs_f64();
    let now_ms = sluice::clock::unix_now_ms();
    let template = record(now_ms);
    let batches: Vec<Vec<LogRecord>> = (0..rows)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&i| {
                    let mut r = template.clone();
                    r.id = format!("chatcmpl-bench{i:012}");
                    r.ts = now_ms + i as i64 / 20;
                    r.latency_ms = 0.2 + (i % 97) as f64 / 100.0;
                    r.ttfb_ms = Some(r.latency_ms);
                    r
                })
                .collect()
        })
        .collect();
    let counters = counter_deltas(now_ms);
    let started = Instant::now();
    let mut slowest = 0.0f64;
    for records in &batches {
        let batch_started = Instant::now();
        store.write(records, &counters)?;
        slowest = slowest.max(batch_started.elapsed().as_secs_f64());
    }
    let seconds = started.elapsed().as_secs_f64();
    let index = match &sqlite {
        Some(sqlite) => {
            let backlog = sqlite.search_backlog()?;
            while sqlite.search_backlog()? > 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let indexed = started.elapsed().as_secs_f64();
            format!(
                " index_backlog_at_end={backlog} index_seconds={indexed:.2} indexed_rows_per_s={:.0}",
                rows as f64 / indexed
            )
        }
        None => String::new(),
    };
    let written = store.list(&Default::default())?.total.unwrap_or(0);
    println!(
        "store={} open_seconds={open_seconds:.2} rows={rows} batch={batch} seconds={seconds:.2} rows_per_s={:.0} ms_per_batch={:.2} slowest_batch_ms={:.1} listed={written}{index}",
        url.split("://").next().unwrap_or("?"),
        rows as f64 / seconds,
        seconds * 1000.0 / batches.len().max(1) as f64,
        slowest * 1000.0,
    );
    Ok(())
}

/// The row the accountant makes of `bench/run.sh`'s chat request through the full config.
fn record(now_ms: i64) -> LogRecord {
    let mut request_headers = HeaderMap::new();
    request_headers.insert("host", http::HeaderValue::from_static("127.0.0.1:18000"));
    request_headers.insert(
        "authorization",
        http::HeaderValue::from_static("Bearer fk-bench-key-0001"),
    );
    request_headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    request_headers.insert("content-length", http::HeaderValue::from_static("94"));
    let mut response_headers = HeaderMap::new();
    response_headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response_headers.insert("content-length", http::HeaderValue::from_static("363"));
    response_headers.insert(
        "date",
        http::HeaderValue::from_static("Tue, 01 Dec 2026 01:00:00 GMT"),
    );
    let reply = "Hello! This is the mock upstream answering the benchmark.";
    let response_body = serde_json::json!({
        "id": "chatcmpl-mock123456", "object": "chat.completion", "created": now_ms / 1000,
        "model": "gpt-4o-mini", "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
            "finish_reason": "stop", "logprobs": null}],
        "usage": {"prompt_tokens": 13, "completion_tokens": 12, "total_tokens": 25},
    });
    LogRecord {
        id: String::new(),
        ts: now_ms,
        client_ip: "127.0.0.1".into(),
        key_name: "bench".into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini".into()),
        user: None,
        upstream_model: Some("gpt-4o-mini".into()),
        upstream: Some("plain".into()),
        upstream_key: Some("sk-…am-1".into()),
        status: 200,
        latency_ms: 0.3,
        ttfb_ms: Some(0.3),
        prompt_tokens: Some(13),
        completion_tokens: Some(12),
        total_tokens: Some(25),
        cost: Some(0.000_009_15),
        usage_source: Some("upstream".into()),
        stream: false,
        error: None,
        tries: 1,
        attempts: serde_json::json!([{"upstream": "plain", "model": "gpt-4o-mini",
            "key": "sk-…am-1", "status": 200, "error": null, "ms": 0.21}])
        .to_string(),
        request_headers: sluice::accounting::recorder::masked_headers(&request_headers).to_string(),
        response_headers: sluice::accounting::recorder::masked_headers(&response_headers)
            .to_string(),
        request_body: Some(REQUEST_BODY.into()),
        response_body: Some(response_body.to_string()),
        upstream_response_body: None,
        reply_text: Some(reply.into()),
        reply_tool_calls: None,
        cache: None,
        saved_cost: None,
        model_label: Some("gpt-4o-mini".into()),
    }
}

/// The counter deltas a batch of the bench's requests carries: the key's and the
/// upstream's windows, every period.
fn counter_deltas(now_ms: i64) -> Vec<CounterDelta> {
    let at = now_ms / 1000;
    [key_scope("bench"), upstream_scope("plain")]
        .into_iter()
        .flat_map(|scope| {
            Period::ALL.into_iter().map(move |period| CounterDelta {
                scope: scope.clone(),
                period,
                window: period.window(at),
                usage: Usage {
                    requests: 512,
                    tokens: 12_800,
                    cost: 0.0047,
                },
            })
        })
        .collect()
}
