//! What an operator sees (issue 19): the access log on stdout (JSON for shippers), the
//! start banner, config problems from the environment, what the log stores of an answer
//! (what the client received, the upstream's raw answer beside it, sluice's own refusals),
//! and alerts a webhook receives once each.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::mock::{Fault, MockOptions};

const ALICE: &str = "fk-alice-secret-000001";
const BOB: &str = "fk-bob-secret-0000002";
const UPSTREAM_KEYS: [&str; 2] = ["sk-upstream-secret-0001", "sk-upstream-secret-0002"];
const ADMIN: &str = "admin-secret-key-0003";

// === the binary ===

fn sluice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .env_remove("OPENAI_API_KEY")
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_LOG_FORMAT")
        .env("SLUICE_LOG", "info");
    command
}

/// `sluice serve` with its stdout gathered line by line.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    address: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice starts");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (announced, address) = std::sync::mpsc::channel();
        let gathered = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = announced.send(rest.split('/').next().unwrap_or_default().to_string());
                }
                gathered.lock().unwrap().push(line);
            }
        });
        let address = address
            .recv_timeout(Duration::from_secs(20))
            .expect("sluice announced its address");
        Self {
            child,
            lines,
            address,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until `count` lines hold `needle` (at most 10 s); answers the lines so far.
    async fn wait_for(&self, needle: &str, count: usize) -> Vec<String> {
        let lines = self.lines.clone();
        eventually(Duration::from_secs(10), || {
            lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
                >= count
        })
        .await;
        self.lines.lock().unwrap().clone()
    }
}

fn access_config(ok: &str, broken: &str, storage: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: {ALICE}}}
    - {{name: bob, key: {BOB}, rpm: 0}}
upstreams:
  - {{name: main, base_url: '{ok}', keys: [{}], models: [gpt-4o]}}
  - {{name: broken, base_url: '{broken}', keys: [{}], models: [broken-model]}}
routing: {{retries: 0}}
pricing: {{gpt-4o: {{input: 2.5, output: 10}}}}
storage: {storage}
",
        UPSTREAM_KEYS[0], UPSTREAM_KEYS[1]
    )
}

async fn chat_as(url: &str, key: &str, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(chat_body(model, stream))
        .send()
        .await
        .expect("request")
}

/// The access lines (JSON) among the output, by status.
fn access_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

fn line_with_status(lines: &[Value], status: u16) -> &Value {
    lines
        .iter()
        .find(|l| l["status"] == status)
        .unwrap_or_else(|| panic!("an access line with status {status}: {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_in_json_has_every_request_with_its_figures_and_no_secret() {
    let ok = mock().await;
    let broken = named_mock("broken", Some(Fault::ServerError)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    let storage = format!(
        "{{url: 'sqlite://{}'}}",
        dir.path().join("log.db").display()
    );
    std::fs::write(&path, access_config(&ok.url(), &broken.url(), &storage)).unwrap();
    let mut command = sluice();
    command
        .env("SLUICE_LOG_FORMAT", "json")
        .args(["serve", "--listen", "127.0.0.1:0", "-c"])
        .arg(&path);
    let running = Running::start(command);
    let url = running.url("");

    let plain = chat_as(&url, ALICE, "gpt-4o", false).await;
    assert_eq!(plain.status(), 200);
    plain.bytes().await.unwrap();
    let streamed = chat_as(&url, ALICE, "gpt-4o", true).await;
    assert_eq!(streamed.status(), 200);
    streamed.bytes().await.unwrap();
    let refused = chat_as(&url, BOB, "gpt-4o", false).await;
    assert_eq!(refused.status(), 429);
    let failed = chat_as(&url, ALICE, "broken-model", false).await;
    assert_eq!(failed.status(), 500);

    let lines = running.wait_for("\"target\":\"access\"", 4).await;
    let access = access_lines(&lines);
    assert_eq!(access.len(), 4, "{lines:#?}");
    // Every line of the log is JSON, not only the access lines.
    for line in &lines {
        assert!(serde_json::from_str::<Value>(line).is_ok(), "{line}");
    }
    let ok_lines: Vec<&Value> = access.iter().filter(|l| l["status"] == 200).collect();
    assert_eq!(ok_lines.len(), 2, "{access:?}");
    for line in &ok_lines {
        assert_eq!(line["message"], "request");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/v1/chat/completions");
        assert_eq!(line["model"], "gpt-4o");
        assert_eq!(line["key"], "alice");
        assert_eq!(line["upstream"], "main");
        assert_eq!(line["tries"], 1);
        assert_eq!(line["client"], "127.0.0.1");
        assert!(line["request_id"].as_str().unwrap().starts_with("req_"));
        assert!(line["tokens"].as_u64().unwrap() > 0, "{line}");
        let cost = line["cost_usd"].as_f64().unwrap();
        assert!(cost > 0.0, "{line}");
        assert!(
            ((cost * 1e9).round() - cost * 1e9).abs() < 1e-6,
            "cost rounded: {line}"
        );
        assert!(line["latency_ms"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["ttfb_ms"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line.get("error").is_none(), "{line}");
    }
    assert_eq!(
        ok_lines.iter().filter(|l| l["stream"] == true).count(),
        1,
        "{access:?}"
    );
    let refused = line_with_status(&access, 429);
    assert_eq!(refused["key"], "bob");
    assert_eq!(refused["tries"], 0);
    assert!(refused.get("upstream").is_none(), "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("per minute"),
        "{refused}"
    );
    let failed = line_with_status(&access, 500);
    assert_eq!(failed["upstream"], "broken");
    assert_eq!(failed["model"], "broken-model");
    assert_eq!(failed["tries"], 1);
    // The failed try is logged once, with its cause and what happened next.
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("upstream answered 500"))
        .collect();
    assert_eq!(warnings.len(), 1, "{lines:#?}");
    assert!(
        warnings[0].contains("the client gets this failure"),
        "{}",
        warnings[0]
    );
    assert!(warnings[0].contains(failed["request_id"].as_str().unwrap()));
    // /metrics counts the cost, by model and key, rounded as the log shows it.
    let metrics = client()
        .get(running.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let total: f64 = ok_lines
        .iter()
        .map(|l| l["cost_usd"].as_f64().unwrap())
        .sum();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sluice_cost_usd_total{model=\"gpt-4o\",key=\"alice\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let shown: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((shown - total).abs() < 1e-9, "{line} vs {total}");
    assert!(
        line.rsplit(' ').next().unwrap().len() <= 12,
        "rounded: {line}"
    );
    assert!(
        metrics.contains("sluice_access_log_dropped_total 0"),
        "{metrics}"
    );
    let output = running.output();
    for secret in [ALICE, BOB, UPSTREAM_KEYS[0], UPSTREAM_KEYS[1]] {
        assert!(!output.contains(secret), "a secret in the log: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_storage_off_the_access_log_still_has_every_request() {
    let ok = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, access_config(&ok.url(), &ok.url(), "{url: none}")).unwrap();
    let mut command = sluice();
    command
        .env("SLUICE_LOG_FORMAT", "json")
        .args(["serve", "--listen", "127.0.0.1:0", "-c"])
        .arg(&path);
    let running = Running::start(command);
    let url = running.url("");
    let plain = chat_as(&url, ALICE, "gpt-4o", false).await;
    assert_eq!(plain.status(), 200);
    plain.bytes().await.unwrap();
    let refused = chat_as(&url, "fk-nobody-at-all-0000", "gpt-4o", false).await;
    assert_eq!(refused.status(), 401);
    let lines = running.wait_for("\"target\":\"access\"", 2).await;
    let access = access_lines(&lines);
    let plain = line_with_status(&access, 200);
    assert_eq!(plain["key"], "alice");
    assert_eq!(plain["upstream"], "main");
    assert_eq!(plain["model"], "gpt-4o");
    assert!(plain["ttfb_ms"].as_f64().unwrap() > 0.0);
    let refused = line_with_status(&access, 401);
    assert_eq!(refused["key"], "-");
    assert!(!running.output().contains("fk-nobody-at-all"));
}

#[test]
fn the_text_log_is_on_by_default_and_the_banner_says_what_an_operator_needs() {
    let dir = tempfile::tempdir().unwrap();
    // No config file and no OPENAI_API_KEY; `localhost` is resolved.
    let mut command = sluice();
    command
        .current_dir(dir.path())
        .args(["serve", "--listen", "localhost:0"]);
    let running = Running::start(command);
    assert!(
        running.address.starts_with("127.0.0.1:"),
        "{}",
        running.address
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let lines = runtime.block_on(running.wait_for("only clients' own keys will work", 1));
    let text = lines.join("\n");
    let address = &running.address;
    assert!(
        text.contains(&format!(
            "dashboard: http://{address}/ (no admin key: open to this machine only)"
        )),
        "{text}"
    );
    let db = dir.path().canonicalize().unwrap().join("sluice.db");
    assert!(
        text.contains(&format!("storage: sqlite://{}", db.display())),
        "{text}"
    );
    assert!(
        text.contains("1 upstream(s) with 0 key(s); 0 gateway key(s); admin key not set"),
        "{text}"
    );
    assert!(text.contains("WARN"), "the hint is a warning: {text}");
    drop(running);

    // Exposed without an admin key: the dashboard is off, and the banner says why.
    let path = dir.path().join("sluice.yaml");
    std::fs::write(
        &path,
        "upstreams: [{name: a, base_url: 'http://127.0.0.1:9', keys: [sk-up-0000000001]}]\nstorage: {url: none}",
    )
    .unwrap();
    let mut command = sluice();
    command
        .current_dir(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0", "-c"])
        .arg(&path);
    let running = Running::start(command);
    let lines = runtime.block_on(running.wait_for("admin key", 1));
    let text = lines.join("\n");
    assert!(
        text.contains("dashboard: off: set admin.key_env (or admin.key)"),
        "{text}"
    );
    assert!(text.contains("storage: off"), "{text}");
    assert!(text.contains("1 upstream(s) with 1 key(s)"), "{text}");
    assert!(!text.contains("only clients' own keys"), "{text}");
    assert!(!text.contains("sk-up-0000000001"), "{text}");
}

#[test]
fn check_describes_its_options_and_names_the_variable_at_fault() {
    let help = sluice().args(["check", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("-c, --config"), "{help}");
    assert!(help.contains("Config file to check"), "{help}");

    let dir = tempfile::tempdir().unwrap();
    let output = sluice()
        .current_dir(dir.path())
        .arg("check")
        .env("SLUICE_SERVR__LISTEN", "0.0.0.0:8000")
        .env("SLUICE_ROUTING__COOLDOWN", "30S")
        .env("SLUICE_ROUTING__BACKOFF", "2")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("SLUICE_SERVR__LISTEN: unknown section servr"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SLUICE_ROUTING__COOLDOWN (routing.cooldown): \"30S\" is not a duration"),
        "{stdout}"
    );
    assert!(stdout.contains("ms, s, m, h or d"), "{stdout}");
    assert!(
        !stdout.contains("BACKOFF"),
        "a bare number is seconds: {stdout}"
    );
    assert!(stdout.contains("2 problem(s) found"), "{stdout}");
}

// === what the log stores ===

#[tokio::test]
async fn the_log_stores_what_the_client_received_and_the_upstream_answer_beside_it() {
    let mock = mock().await;
    // Breaks its streams off half way, once the head and some events are out.
    let cut = mock_with(MockOptions {
        name: "cut".into(),
        fault: Some(Fault::Cut),
        interval: Duration::from_millis(10),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "access:
  keys:
    - {{name: alice, key: {ALICE}}}
    - {{name: bob, key: {BOB}, rpm: 0}}
admin: {{key: {ADMIN}}}
upstreams:
  - {{name: main, base_url: '{}', keys: [{}], models: [alias, gpt-4o], model_map: {{alias: gpt-4o}}}}
  - {{name: cut, base_url: '{}', models: [cut-model]}}
",
        mock.url(),
        UPSTREAM_KEYS[0],
        cut.url(),
    ))
    .await;
    let url = gw.url("");
    let detail = |id: String| {
        let gw = &gw;
        async move { admin_json(gw, &format!("/api/requests/{id}"), ADMIN).await }
    };

    // A renamed model: the client got its own name back.
    let renamed = chat_as(&url, ALICE, "alias", false).await;
    assert_eq!(renamed.status(), 200);
    let reply = json(renamed).await;
    assert_eq!(reply["model"], "alias");
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    let row = detail(list["data"][0]["id"].as_str().unwrap().to_string()).await;
    let client_body: Value = serde_json::from_str(row["response_body"].as_str().unwrap()).unwrap();
    assert_eq!(client_body, reply, "the stored body is what the client got");
    let upstream_body: Value =
        serde_json::from_str(row["upstream_response_body"].as_str().unwrap()).unwrap();
    assert_eq!(upstream_body["model"], "gpt-4o");

    // A stream whose usage chunk sluice asked for: the client never saw it.
    let streamed = chat_as(&url, ALICE, "gpt-4o", true).await;
    let text = streamed.text().await.unwrap();
    assert!(!text.contains("prompt_tokens"), "{text}");
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    let row = detail(list["data"][0]["id"].as_str().unwrap().to_string()).await;
    assert_eq!(row["response_body"].as_str().unwrap(), text);
    assert!(
        row["upstream_response_body"]
            .as_str()
            .unwrap()
            .contains("prompt_tokens"),
        "{row}"
    );
    assert!(row["total_tokens"].as_u64().unwrap() > 0, "{row}");

    // Nothing changed on the way: one body, no second copy.
    let plain = chat_as(&url, ALICE, "gpt-4o", false).await;
    let plain_text = plain.text().await.unwrap();
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    let row = detail(list["data"][0]["id"].as_str().unwrap().to_string()).await;
    assert_eq!(row["response_body"].as_str().unwrap(), plain_text);
    assert!(row["upstream_response_body"].is_null(), "{row}");

    // A stream the upstream broke off: the client got sluice's error event after it.
    let broken = chat_as(&url, ALICE, "cut-model", true).await;
    let text = broken.text().await.unwrap();
    assert!(text.contains("\"error\""), "{text}");
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    let row = detail(list["data"][0]["id"].as_str().unwrap().to_string()).await;
    assert_eq!(row["response_body"].as_str().unwrap(), text);
    let upstream = row["upstream_response_body"]
        .as_str()
        .unwrap_or_else(|| panic!("{row}"));
    assert!(!upstream.contains("\"error\""), "{upstream}");
    assert!(text.starts_with(upstream), "{upstream}");
    assert!(
        row["error"].as_str().unwrap().contains("broke off"),
        "{row}"
    );

    // Refused by sluice itself: its own answer and its Retry-After are kept.
    let refused = chat_as(&url, BOB, "gpt-4o", false).await;
    assert_eq!(refused.status(), 429);
    let retry_after = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_string();
    let answer = json(refused).await;
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests?key=bob", ADMIN).await;
    let row = detail(list["data"][0]["id"].as_str().unwrap().to_string()).await;
    assert_eq!(row["status"], 429);
    let stored: Value = serde_json::from_str(row["response_body"].as_str().unwrap()).unwrap();
    assert_eq!(stored, answer);
    assert_eq!(row["response_headers"]["retry-after"], retry_after.as_str());
    assert_eq!(row["response_headers"]["content-type"], "application/json");
}

// === alerts ===

/// A webhook receiver: every JSON body POSTed to it, in order.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let bodies = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let bodies = bodies.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let bodies = bodies.clone();
                            async move {
                                let bytes = request.into_body().collect().await?.to_bytes();
                                let body: Value =
                                    serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                                bodies.lock().unwrap().push(body);
                                Ok::<_, hyper::Error>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Self { url, got }
    }

    fn alerts(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self, kind: &str) -> usize {
        self.alerts().iter().filter(|a| a["alert"] == kind).count()
    }
}

#[tokio::test]
async fn each_alert_reaches_the_webhooks_once() {
    let json_hook = Receiver::start().await;
    let slack_hook = Receiver::start().await;
    let healthy = mock().await;
    // Fails its first request, then answers.
    let flaky = mock_with(MockOptions {
        name: "flaky".into(),
        fault: Some(Fault::ServerError),
        fault_limit: Some(1),
        ..MockOptions::default()
    })
    .await;
    // What one request costs in tokens, asked of the upstream directly.
    let probe = json(
        client()
            .post(format!("{}/v1/chat/completions", healthy.url()))
            .header("content-type", "application/json")
            .body(chat_body("gpt-4o", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let tokens = probe["usage"]["total_tokens"].as_u64().unwrap();
    // One request takes it past 80%, the second past 100%.
    let budget = tokens + tokens / 5;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("log.db");
    let gw = gateway(&format!(
        "access:
  keys:
    - {{name: alice, key: {ALICE}}}
    - {{name: bob, key: {BOB}, budget: {{tokens: {budget}, period: day}}}}
admin: {{key: {ADMIN}}}
upstreams:
  - {{name: main, base_url: '{}', models: [gpt-4o]}}
  - {{name: flaky, base_url: '{}', models: [flaky-model]}}
routing: {{retries: 0, cooldown: 200ms}}
storage: {{url: 'sqlite://{}', queue: 4, overflow: shed_rows}}
alerts:
  webhooks:
    - {{url: '{}'}}
    - {{url: '{}', format: slack}}
",
        healthy.url(),
        flaky.url(),
        db.display(),
        json_hook.url,
        slack_hook.url,
    ))
    .await;
    let url = gw.url("");

    // Budget: 80% after the first request, 100% after the second, refused after that.
    for _ in 0..2 {
        let response = chat_as(&url, BOB, "gpt-4o", false).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        flush(&gw).await;
    }
    for _ in 0..2 {
        let response = chat_as(&url, BOB, "gpt-4o", false).await;
        assert_eq!(response.status(), 429);
        flush(&gw).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || json_hook
            .count("budget_exhausted")
            == 1)
        .await,
        "{:?}",
        json_hook.alerts()
    );

    // An upstream down (once, though it fails twice), then back (once).
    let failed = chat_as(&url, ALICE, "flaky-model", false).await;
    assert_eq!(failed.status(), 500);
    assert!(
        eventually(Duration::from_secs(10), || json_hook.count("upstream_down")
            == 1)
        .await,
        "{:?}",
        json_hook.alerts()
    );
    // Once its cooldown is over, it answers again.
    let mut answered = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = chat_as(&url, ALICE, "flaky-model", false).await;
        if response.status() == 200 {
            answered = true;
            break;
        }
    }
    assert!(answered, "the flaky upstream answers after its cooldown");
    for _ in 0..3 {
        let response = chat_as(&url, ALICE, "flaky-model", false).await;
        assert_eq!(response.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(10), || json_hook
            .count("upstream_recovered")
            == 1)
        .await,
        "{:?}",
        json_hook.alerts()
    );

    // The log drops rows: its writer is stalled (another process holds the database's
    // write lock) and its queue of 4 fills.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    for _ in 0..20 {
        let response = chat_as(&url, ALICE, "gpt-4o", false).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || json_hook.count("log_drops")
            == 1)
        .await,
        "{:?}",
        json_hook.alerts()
    );
    blocker.execute_batch("COMMIT").unwrap();
    flush(&gw).await;
    // More drops within alerts.interval (5 minutes by default) say nothing more.
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    for _ in 0..20 {
        let response = chat_as(&url, ALICE, "gpt-4o", false).await;
        response.bytes().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    blocker.execute_batch("COMMIT").unwrap();

    let alerts = json_hook.alerts();
    let kinds: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "budget_80",
            "budget_exhausted",
            "upstream_down",
            "upstream_recovered",
            "log_drops"
        ],
        "each alert once: {alerts:#?}"
    );
    let budget_80 = &alerts[0];
    assert_eq!(budget_80["key"], "bob");
    assert_eq!(budget_80["threshold"], 80);
    assert_eq!(budget_80["period"], "day");
    assert!(budget_80["text"].as_str().unwrap().contains("key `bob`"));
    let down = &alerts[2];
    assert_eq!(down["upstream"], "flaky");
    assert!(down["cause"].as_str().unwrap().contains("500"), "{down}");
    assert!(alerts[4]["dropped"].as_u64().unwrap() > 0);
    // Slack gets the same alerts, as text only.
    let slack = slack_hook.alerts();
    assert_eq!(slack.len(), 5, "{slack:#?}");
    for (message, alert) in slack.iter().zip(&alerts) {
        let object = message.as_object().unwrap();
        assert_eq!(object.len(), 1, "{message}");
        assert_eq!(
            message["text"],
            json!(format!("sluice: {}", alert["text"].as_str().unwrap()))
        );
    }
    for alert in alerts.iter().chain(&slack) {
        assert!(!alert.to_string().contains(BOB), "{alert}");
    }
}
