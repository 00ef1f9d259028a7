//! Hostile input on every route: huge and odd model names, NUL and control characters, dot
//! segments and encoded slashes, odd methods and content types, invalid, deep and truncated
//! JSON, and bad credentials, sent over a raw socket (an HTTP client would tidy the paths).
//!
//! One campaign runs once against a realistic gateway (two upstreams on mocks under a base
//! path, a model-limited key with a budget, the log, an admin key); each `#[test]` below
//! judges one class of defect from what the campaign saw, so a failure names its class.

mod common;

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use sluice::mock::Recorded;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN_KEY: &str = "admin-secret-hostile-0001";
const FULL_KEY: &str = "fk-full-hostile-0001";
const MINI_KEY: &str = "fk-mini-hostile-0001";
/// Every request the campaign sends carries its case number in this header.
const CASE_HEADER: &str = "x-hostile-case";
/// Base paths of the two upstreams: nothing may reach an upstream outside its own.
const BASE_A: &str = "/openai";
const BASE_B: &str = "/compat";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const MIB: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    None,
    Wrong,
    Full,
    /// Limited to `gpt-4o-mini`, with a budget.
    Mini,
    /// The admin key, as a bearer token.
    Admin,
}

#[derive(Debug, Clone)]
struct Case {
    method: String,
    /// The request target exactly as sent (path and query).
    target: String,
    key: Key,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send fewer bytes than `Content-Length` says, then close the sending side.
    truncated: bool,
    /// Whether a 2xx is a legitimate answer (the input is odd but actually fine).
    may_succeed: bool,
}

impl Case {
    fn new(method: &str, target: &str, key: Key) -> Self {
        Self {
            method: method.into(),
            target: target.into(),
            key,
            headers: Vec::new(),
            body: Vec::new(),
            truncated: false,
            may_succeed: false,
        }
    }

    fn json(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }

    fn body(mut self, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        if let Some(content_type) = content_type {
            self.headers
                .push(("content-type".into(), content_type.into()));
        }
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn ok(mut self) -> Self {
        self.may_succeed = true;
        self
    }

    fn truncated(mut self) -> Self {
        self.truncated = true;
        self
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// Whether the gateway logs this request (everything under `/v1` but `GET /v1/status`).
    fn logged(&self) -> bool {
        let path = self.path();
        (path == "/v1" || path.starts_with("/v1/"))
            && !(self.method == "GET" && path == "/v1/status")
    }

    fn describe(&self) -> String {
        let target: String = self.target.chars().take(80).collect();
        let body: String = String::from_utf8_lossy(&self.body[..self.body.len().min(60)])
            .chars()
            .map(|c| if c.is_control() { '·' } else { c })
            .collect();
        let content_type = self
            .headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map_or("none", |(_, v)| v.as_str());
        format!(
            "{} {target} key={:?} content-type={content_type} body[{}]={body:?}{}",
            self.method,
            self.key,
            self.body.len(),
            if self.truncated { " (truncated)" } else { "" }
        )
    }
}

/// What came back for one case.
#[derive(Debug)]
struct Outcome {
    case: usize,
    /// `None`: no answer within [`REQUEST_TIMEOUT`], or the connection failed.
    status: Option<u16>,
    content_type: String,
    body: Vec<u8>,
    failure: Option<String>,
}

#[derive(Debug)]
struct Report {
    cases: Vec<Case>,
    outcomes: Vec<Outcome>,
    /// Requests each mock upstream received, with the base path it should stay under.
    upstream: Vec<(&'static str, Recorded)>,
    rss_before_kib: i64,
    rss_after_kib: i64,
    held_by_test_kib: usize,
    logged_expected: u64,
    logged_total: Option<u64>,
}

/// One request over a fresh connection, `Connection: close`, read to the end.
async fn send_raw(
    addr: std::net::SocketAddr,
    case: &Case,
    case_no: usize,
    cookie: &str,
) -> Outcome {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n",
        case.method, case.target
    );
    match case.key {
        Key::None => {}
        Key::Wrong => head.push_str("authorization: Bearer fk-wrong-hostile-0000\r\n"),
        Key::Full => head.push_str(&format!("authorization: Bearer {FULL_KEY}\r\n")),
        Key::Mini => head.push_str(&format!("authorization: Bearer {MINI_KEY}\r\n")),
        Key::Admin => head.push_str(&format!("authorization: Bearer {ADMIN_KEY}\r\n")),
    }
    head.push_str(&format!("{CASE_HEADER}: {case_no}\r\n"));
    for (name, value) in &case.headers {
        let value = value.replace("{session}", cookie);
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let declared = if case.truncated {
        case.body.len() * 2
    } else {
        case.body.len()
    };
    if !case.body.is_empty() || case.method == "POST" {
        head.push_str(&format!("content-length: {declared}\r\n"));
    }
    head.push_str("\r\n");
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(head.as_bytes()).await?;
        // A refusal may come before the whole body is read, and the server may close then.
        let _ = stream.write_all(&case.body).await;
        if case.truncated {
            let _ = stream.shutdown().await;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        std::io::Result::Ok(answer)
    };
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Err(_) => return failed(case_no, format!("no answer within {REQUEST_TIMEOUT:?}")),
        Ok(Err(error)) => return failed(case_no, format!("connection failed: {error}")),
        Ok(Ok(answer)) => answer,
    };
    parse_response(case_no, &answer)
}

fn failed(case: usize, failure: String) -> Outcome {
    Outcome {
        case,
        status: None,
        content_type: String::new(),
        body: Vec::new(),
        failure: Some(failure),
    }
}

fn parse_response(case: usize, answer: &[u8]) -> Outcome {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return failed(
            case,
            format!(
                "no HTTP answer ({} bytes: {:?})",
                answer.len(),
                String::from_utf8_lossy(&answer[..answer.len().min(80)])
            ),
        );
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let mut content_type = String::new();
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-type" {
                content_type = value.trim().to_string();
            }
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let raw = &answer[end + 4..];
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Outcome {
        case,
        status,
        content_type,
        body,
        failure: None,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        raw = &raw[line_end + 2..];
        if size == 0 || raw.len() < size {
            out.extend_from_slice(&raw[..size.min(raw.len())]);
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
    out
}

fn chat(model: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

/// Every hostile variant, route by route.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let huge = "m".repeat(MIB);
    let nul_model = "gpt-4o-mini\u{0}gpt-4o";
    let odd_models = [
        huge.clone(),
        format!("gpt-4o{}", "\u{0}".repeat(1000)),
        nul_model.to_string(),
        "gpt-4o\r\nx-injected: 1".into(),
        "\u{202e}o4-tpg\u{200b}".into(),
        "../../../etc/passwd".into(),
        "gpt-4o%2f..%2f..".into(),
        "".into(),
        "GPT-4O".into(),
        " gpt-4o ".into(),
    ];
    let json_routes = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ];

    // Model names: huge, NUL, control characters, unicode, path-like; each key.
    for route in json_routes {
        for model in &odd_models {
            // Forwarded for the unrestricted key (upstream b serves any name), refused for
            // the key limited to gpt-4o-mini.
            cases.push(Case::new("POST", route, Key::Full).json(chat(model)).ok());
            cases.push(Case::new("POST", route, Key::Mini).json(chat(model)));
        }
        // The restricted key asking for gpt-4o in every way a body can say it.
        for body in [
            chat("gpt-4o"),
            br#"{"model":"gpt-4o-mini","model":"gpt-4o","messages":[]}"#.to_vec(),
            br#"{"model":"gpt-4o","model":"gpt-4o-mini","messages":[]}"#.to_vec(),
            br#"{"model":"gpt-4o\u0000","messages":[]}"#.to_vec(),
            br#"{"model":"gpt\u002d4o","messages":[]}"#.to_vec(),
            br#"["gpt-4o"]"#.to_vec(),
            br#"{"messages":[],"model":"gpt-4o"}"#.to_vec(),
            b"\xef\xbb\xbf{\"model\":\"gpt-4o\",\"messages\":[]}".to_vec(),
        ] {
            cases.push(Case::new("POST", route, Key::Mini).json(body.clone()));
            for content_type in [
                None,
                Some("text/plain"),
                Some("application/x-www-form-urlencoded"),
                Some("multipart/form-data; boundary=x"),
                Some("application/json; charset=utf-16"),
                Some("APPLICATION/JSON"),
                Some("application/vnd.api+json"),
            ] {
                cases.push(Case::new("POST", route, Key::Mini).body(content_type, body.clone()));
            }
            for method in ["PUT", "PATCH", "DELETE", "OPTIONS", "FROBNICATE"] {
                cases.push(Case::new(method, route, Key::Mini).json(body.clone()));
            }
        }
        cases.push(Case::new("POST", route, Key::Mini).body(
            Some("application/x-www-form-urlencoded"),
            "model=gpt-4o&input=hi",
        ));
        // Broken JSON: the route depends on the model, so the gateway reads every body and
        // must refuse these (deep but balanced nesting around a good model may pass).
        let deep_but_valid = format!(
            "{{\"model\":\"gpt-4o-mini\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        cases.push(
            Case::new("POST", route, Key::Mini)
                .json(deep_but_valid.clone())
                .ok(),
        );
        cases.push(
            Case::new("POST", route, Key::Full)
                .json(deep_but_valid)
                .ok(),
        );
        for body in [
            b"{".to_vec(),
            b"{\"model\":".to_vec(),
            b"not json at all".to_vec(),
            b"{\"model\":\"gpt-4o-mini\"".to_vec(),
            "[".repeat(100_000).into_bytes(),
            b"\x00\x01\x02\xff\xfe".to_vec(),
            b"null".to_vec(),
            b"{\"model\":5}".to_vec(),
        ] {
            cases.push(Case::new("POST", route, Key::Mini).json(body.clone()));
            cases.push(Case::new("POST", route, Key::Full).json(body.clone()));
        }
        // Truncated bodies.
        for key in [Key::Full, Key::Mini] {
            cases.push(
                Case::new("POST", route, key)
                    .json(chat("gpt-4o-mini"))
                    .truncated(),
            );
        }
        // Bad credentials.
        for key in [Key::None, Key::Wrong, Key::Admin] {
            cases.push(Case::new("POST", route, key).json(chat("gpt-4o-mini")));
        }
        // Admin credentials next to a valid gateway key must not travel upstream.
        cases.push(
            Case::new("POST", route, Key::Full)
                .json(chat("gpt-4o-mini"))
                .header("x-admin-key", ADMIN_KEY)
                .header("cookie", "sluice_session={session}; theme=dark")
                .ok(),
        );
    }

    // Multipart: audio transcriptions.
    let multipart = |model: &str| {
        format!(
            "--XB\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--XB\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\ncontent-type: audio/wav\r\n\r\nRIFF0000WAVE\r\n--XB--\r\n"
        )
    };
    let audio = "/v1/audio/transcriptions";
    for key in [Key::Full, Key::Mini] {
        cases.push(
            Case::new("POST", audio, key)
                .body(
                    Some("multipart/form-data; boundary=XB"),
                    multipart("whisper-1"),
                )
                .ok(),
        );
        cases.push(
            Case::new("POST", audio, key)
                .body(Some("multipart/form-data; boundary=XB"), multipart(&huge))
                .ok(),
        );
        cases.push(
            Case::new("POST", audio, key)
                .body(
                    Some("multipart/form-data; boundary=XB"),
                    multipart(nul_model),
                )
                .ok(),
        );
        cases.push(
            Case::new("POST", audio, key)
                .body(
                    Some("multipart/form-data; boundary=XB"),
                    b"--XB\r\ngarbage".to_vec(),
                )
                .ok(),
        );
        cases.push(
            Case::new("POST", audio, key)
                .body(Some("multipart/form-data"), multipart("whisper-1"))
                .ok(),
        );
        cases.push(Case::new("POST", audio, key).json(chat("whisper-1")).ok());
    }
    cases.push(Case::new("POST", audio, Key::Mini).body(
        Some("multipart/form-data; boundary=XB"),
        multipart("gpt-4o"),
    ));
    cases.push(Case::new("POST", audio, Key::None).body(
        Some("multipart/form-data; boundary=XB"),
        multipart("whisper-1"),
    ));

    // Models, files: GET routes with odd ids and queries.
    for key in [Key::Full, Key::Mini] {
        for target in [
            "/v1/models",
            "/v1/models?x=%00",
            "/v1/models/gpt-4o-mini",
            "/v1/models/gpt-4o",
            "/v1/models/gpt-4o%00",
            "/v1/models/%2e%2e",
            "/v1/models/..%2f..%2fadmin",
            "/v1/files",
            "/v1/files?purpose=%00&limit=99999999999999999999999",
            "/v1/files/file-abc/content",
            "/v1/files/%2e%2e%2f%2e%2e/content",
            "/v1/files/file-abc%00/content",
            "/v1/batches?after=%00",
        ] {
            let case = Case::new("GET", target, key);
            let gpt_4o = target.starts_with("/v1/models/gpt-4o") && !target.contains("mini");
            cases.push(if key == Key::Mini && gpt_4o {
                case
            } else {
                case.ok()
            });
        }
    }
    cases.push(
        Case::new(
            "GET",
            &format!("/v1/models/{}", "m".repeat(60_000)),
            Key::Full,
        )
        .ok(),
    );
    cases.push(
        Case::new("POST", "/v1/files", Key::Full)
            .body(
                Some("multipart/form-data; boundary=XB"),
                b"--XB--\r\n".to_vec(),
            )
            .ok(),
    );
    for key in [Key::None, Key::Wrong, Key::Admin] {
        cases.push(Case::new("GET", "/v1/models", key));
        cases.push(Case::new("GET", "/v1/files/file-abc/content", key));
    }
    for method in ["PUT", "PATCH", "DELETE", "OPTIONS", "FROBNICATE"] {
        cases.push(Case::new(method, "/v1/models", Key::Full).ok());
        cases.push(Case::new(method, "/v1/models", Key::None));
    }

    // Dot segments and encoded slashes: nothing may escape the upstream's base path.
    for target in [
        "/v1/%2e%2e/x",
        "/v1/%2E%2E/%2E%2E/x",
        "/v1/./x/../../y",
        "/v1/../../etc/passwd",
        "/v1/chat/completions/../../../admin",
        "/v1/%2f%2f/x",
        "/v1/..%2f..%2fx",
        "/v1/..%5c..%5cx",
        "/v1//chat/completions",
        "/v1/chat%2fcompletions",
        "/v1/chat/completions%00",
        "/v1/chat/completions;.css",
        "/v1/",
        "/v1",
    ] {
        cases.push(Case::new("GET", target, Key::Full).ok());
        cases.push(
            Case::new("POST", target, Key::Full)
                .json(chat("gpt-4o-mini"))
                .ok(),
        );
        cases.push(Case::new("POST", target, Key::Mini).json(chat("gpt-4o")));
    }

    // The admin API and the other gateway routes.
    for target in [
        "/api/requests",
        "/api/requests?page=99999999999999999999",
        "/api/requests?page=18446744073709551615",
        "/api/requests?page=9223372036854775807&per_page=500",
        "/api/requests?per_page=-1",
        "/api/requests?search=%00&model=%00",
        "/api/requests?search=%25%5f%5c",
        &format!("/api/requests?search={}", "a".repeat(100_000)),
        "/api/requests?before=x_y",
        "/api/requests?before=99999999999999999999_x",
        "/api/requests?from=%00&to=nope",
        "/api/requests?status=%00",
        "/api/requests?status=99999999999",
        "/api/requests/%00",
        "/api/requests/..%2f..%2f",
        &format!("/api/requests/{}", "x".repeat(60_000)),
        "/api/stats",
        "/api/stats?from=-9223372036854775808",
        "/api/stats?from=9223372036854775807&to=-9223372036854775808",
        "/api/stats?from=%00",
        "/api/nope",
        "/api/%2e%2e/metrics",
        "/api",
    ] {
        cases.push(Case::new("GET", target, Key::Admin).ok());
        cases.push(Case::new("GET", target, Key::Full));
        cases.push(Case::new("GET", target, Key::None));
    }
    for method in ["POST", "PUT", "DELETE", "FROBNICATE"] {
        cases.push(Case::new(method, "/api/requests", Key::Admin).json("{}"));
    }
    for (content_type, body) in [
        (Some("application/json"), "{\"key\":\"nope\"}".to_string()),
        (
            Some("application/json"),
            format!("{{\"key\":\"{}\"}}", "k".repeat(MIB)),
        ),
        (
            Some("application/x-www-form-urlencoded"),
            "key=%00".to_string(),
        ),
        (Some("text/plain"), "key".to_string()),
        (None, String::new()),
        (Some("application/json"), "[".repeat(100_000)),
    ] {
        cases.push(Case::new("POST", "/api/login", Key::None).body(content_type, body));
    }
    for method in ["GET", "PUT", "FROBNICATE"] {
        cases.push(Case::new(method, "/api/login", Key::None));
    }
    for key in [Key::Admin, Key::Full, Key::Mini, Key::None, Key::Wrong] {
        let ok = matches!(key, Key::Admin | Key::Full | Key::Mini);
        let status = Case::new("GET", "/v1/status", key);
        cases.push(if ok { status.ok() } else { status });
        let metrics = Case::new("GET", "/metrics", key);
        cases.push(if key == Key::Admin {
            metrics.ok()
        } else {
            metrics
        });
    }
    cases.push(Case::new("GET", "/v1/status?x=%00", Key::Admin).ok());
    cases.push(Case::new("GET", "/metrics?x=%00", Key::Admin).ok());
    cases.push(Case::new("POST", "/metrics", Key::Admin));
    cases.push(Case::new("POST", "/v1/status", Key::Admin).json("{}"));
    for target in ["/ready", "/health", "/", "/ready?x=%00", "/health?%00"] {
        // `/health` answers any method: a load balancer's probe is never refused.
        let health = target.starts_with("/health");
        cases.push(Case::new("GET", target, Key::None).ok());
        let odd = Case::new("FROBNICATE", target, Key::None);
        cases.push(if health { odd.ok() } else { odd });
        let post = Case::new("POST", target, Key::None).json("{");
        cases.push(if health { post.ok() } else { post });
    }
    cases.push(Case::new("DELETE", "/", Key::Admin));
    for target in [
        "/nope",
        "/v2/chat/completions",
        "/%00",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/assets/../Cargo.toml",
        "//v1/chat/completions",
        "/V1/chat/completions",
        &format!("/{}", "x".repeat(60_000)),
    ] {
        cases.push(Case::new("GET", target, Key::Full));
        cases.push(Case::new("POST", target, Key::Full).json(chat("gpt-4o-mini")));
    }
    cases
}

async fn campaign() -> Report {
    let mock_a = named_mock("a", None).await;
    let mock_b = named_mock("b", None).await;
    let config = format!(
        "access:
  keys:
    - {{name: full, key: {FULL_KEY}}}
    - {{name: mini, key: {MINI_KEY}, models: [gpt-4o-mini], budget: {{tokens: 1000000000, period: day}}}}
upstreams:
  - {{name: a, base_url: '{}{BASE_A}', keys: [sk-up-a-hostile-0001], models: [gpt-4o, gpt-4o-mini, whisper-1, text-embedding-3-small]}}
  - {{name: b, base_url: '{}{BASE_B}', keys: [sk-up-b-hostile-0001], models: ['*']}}
admin: {{key: {ADMIN_KEY}}}
",
        mock_a.url(),
        mock_b.url()
    );
    let gw = gateway(&config).await;
    let http = client();
    // A dashboard session, to check its cookie never travels upstream.
    let login = http
        .post(gw.url("/api/login"))
        .header("content-type", "application/json")
        .body(serde_json::json!({"key": ADMIN_KEY}).to_string())
        .send()
        .await
        .expect("login");
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .and_then(|v| v.strip_prefix("sluice_session="))
        .unwrap_or("no-session")
        .to_string();

    // Warm up what a first request allocates once (pools, tokenizer, store), then measure.
    for _ in 0..3 {
        let answer = http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(FULL_KEY)
            .header("content-type", "application/json")
            .body(chat("gpt-4o-mini"))
            .send()
            .await
            .expect("warm-up");
        assert_eq!(answer.status(), 200, "a plain request works");
        answer.bytes().await.expect("warm-up body");
    }
    let warm_up_logged = 3;
    flush(&gw).await;
    sluice::sys::release_free_memory();
    let rss_before_kib = rss_kib();

    let cases = cases();
    let mut outcomes = Vec::with_capacity(cases.len());
    // A few at a time: fast, and bounded.
    for (batch_no, batch) in cases.chunks(8).enumerate() {
        let sends = batch.iter().enumerate().map(|(i, case)| {
            let case_no = batch_no * 8 + i;
            send_raw(gw.addr, case, case_no, &cookie)
        });
        outcomes.extend(futures_util::future::join_all(sends).await);
    }

    let recorder = gw.gateway.recorder.as_ref().expect("the log is on");
    let flushed = tokio::time::timeout(Duration::from_secs(30), recorder.flush()).await;
    let logged_expected = warm_up_logged + cases.iter().filter(|c| c.logged()).count() as u64;
    // Counted through a store opened afresh on the same file, so a failure of the
    // gateway's own reader (checked elsewhere) does not hide what was written.
    let logged_total = match (flushed, &gw.dir) {
        (Ok(()), Some(dir)) => {
            let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
            let store = sluice::store::open(&url).expect("the log opens");
            tokio::task::spawn_blocking(move || store.list(&Default::default()).map(|p| p.total))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        }
        (Ok(()), None) => {
            let store = recorder.store.clone();
            tokio::task::spawn_blocking(move || store.list(&Default::default()).map(|p| p.total))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        }
        (Err(_), _) => None,
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    sluice::sys::release_free_memory();
    let rss_after_kib = rss_kib();

    let mut upstream = Vec::new();
    upstream.extend(mock_a.requests().into_iter().map(|r| (BASE_A, r)));
    upstream.extend(mock_b.requests().into_iter().map(|r| (BASE_B, r)));
    // What the test itself holds (cases, answers, the mocks' recordings) is not the
    // gateway's.
    let held_by_test_kib = (cases.iter().map(|c| c.body.len()).sum::<usize>()
        + outcomes.iter().map(|o| o.body.len()).sum::<usize>()
        + upstream.iter().map(|(_, r)| r.body.len()).sum::<usize>())
        / 1024;
    Report {
        cases,
        outcomes,
        upstream,
        rss_before_kib,
        rss_after_kib,
        held_by_test_kib,
        logged_expected,
        logged_total,
    }
}

/// The campaign runs once, on a runtime of its own; every check reads its report.
fn report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(campaign())
        })
        .join()
        .expect("the campaign ran")
    })
}

/// Lists the failures of one check (at most 15 shown) and fails if there are any.
#[track_caller]
fn judge(check: &str, failures: Vec<String>) {
    if failures.is_empty() {
        return;
    }
    let shown: Vec<&String> = failures.iter().take(15).collect();
    panic!(
        "{check}: {} of {} hostile requests\n{}",
        failures.len(),
        report().cases.len(),
        shown
            .iter()
            .map(|f| format!("  - {f}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn outcome_line(report: &Report, outcome: &Outcome) -> String {
    let body: String = String::from_utf8_lossy(&outcome.body[..outcome.body.len().min(160)]).into();
    format!(
        "{} -> {} {}",
        report.cases[outcome.case].describe(),
        outcome.status.map_or_else(
            || outcome.failure.clone().unwrap_or_default(),
            |s| s.to_string()
        ),
        body
    )
}

fn is_openai_error(outcome: &Outcome) -> bool {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&outcome.body) else {
        return false;
    };
    outcome.content_type.starts_with("application/json")
        && body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
        && body["error"]["type"].is_string()
}

#[test]
fn hostile_requests_never_get_a_server_error() {
    let report = report();
    judge(
        "5xx answers",
        report
            .outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| s >= 500))
            .map(|o| outcome_line(report, o))
            .collect(),
    );
}

#[test]
fn hostile_requests_never_hang_or_drop_the_connection() {
    let report = report();
    judge(
        "no answer",
        report
            .outcomes
            .iter()
            .filter(|o| o.status.is_none())
            .map(|o| outcome_line(report, o))
            .collect(),
    );
}

#[test]
fn hostile_requests_are_refused_in_the_openai_error_shape() {
    let report = report();
    judge(
        "4xx answers without an OpenAI error body (error.message, error.type)",
        report
            .outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| (400..500).contains(&s)) && !is_openai_error(o))
            // Two answers are not sluice's to shape: the HTTP layer's own 414 for a request
            // line over 64 KiB (hyper refuses it before any handler runs, with no body), and
            // the dashboard's login page, which is HTML for a browser.
            .filter(|o| !(o.status == Some(414) && o.body.is_empty()))
            .filter(|o| {
                let path = report.cases[o.case].path();
                !(path == "/" || path.starts_with("/assets/"))
            })
            .map(|o| outcome_line(report, o))
            .collect(),
    );
}

#[test]
fn hostile_requests_are_refused_not_served() {
    let report = report();
    judge(
        "answered 2xx/3xx where a refusal (4xx) was due",
        report
            .outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| s < 400) && !report.cases[o.case].may_succeed)
            .map(|o| outcome_line(report, o))
            .collect(),
    );
}

#[test]
fn memory_returns_near_where_it_started() {
    let report = report();
    let held_mib = i64::try_from(report.held_by_test_kib / 1024).unwrap_or(0);
    let growth_mib = (report.rss_after_kib - report.rss_before_kib) / 1024 - held_mib;
    assert!(
        growth_mib < 64,
        "resident memory grew by {growth_mib} MiB over {} hostile requests, not counting \
         {held_mib} MiB the test itself holds ({} -> {} KiB)",
        report.cases.len(),
        report.rss_before_kib,
        report.rss_after_kib
    );
}

#[test]
fn every_v1_request_is_logged() {
    let report = report();
    assert_eq!(
        report.logged_total,
        Some(report.logged_expected),
        "log rows after a flush (None: the flush or the query failed) vs /v1 requests sent"
    );
}

#[test]
fn the_restricted_key_never_reaches_gpt_4o() {
    let report = report();
    let mini_cases: HashSet<usize> = report
        .cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.key == Key::Mini)
        .map(|(i, _)| i)
        .collect();
    let mut failures = Vec::new();
    for (_, request) in &report.upstream {
        let Some(case) = request
            .header(CASE_HEADER)
            .and_then(|v| v.parse::<usize>().ok())
        else {
            continue;
        };
        if !mini_cases.contains(&case) {
            continue;
        }
        // Anything naming gpt-4o but not gpt-4o-mini, in the body or the path, decoded or not.
        let body = String::from_utf8_lossy(&request.body).replace("\\u002d", "-");
        let names_gpt_4o = |text: &str| {
            text.match_indices("gpt-4o")
                .any(|(at, _)| !text[at..].starts_with("gpt-4o-mini"))
        };
        if names_gpt_4o(&body) || names_gpt_4o(&request.path) {
            failures.push(format!(
                "{} reached upstream as {} {} body {:?}",
                report.cases[case].describe(),
                request.method,
                request.path,
                &body[..body.len().min(120)]
            ));
        }
    }
    judge("the gpt-4o-mini key got gpt-4o upstream", failures);
}

#[test]
fn nothing_reaches_an_upstream_outside_its_base_path() {
    let report = report();
    let mut failures = Vec::new();
    for (base, request) in &report.upstream {
        let path = &request.path;
        let lower = path.to_ascii_lowercase();
        let escapes = !path.starts_with(&format!("{base}/"))
            || path.split('/').any(|s| s == ".." || s == ".")
            || lower.contains("%2e%2e")
            || lower.contains("%2f")
            || lower.contains("%5c")
            || lower.contains("%00");
        if escapes {
            let case = request
                .header(CASE_HEADER)
                .and_then(|v| v.parse::<usize>().ok())
                .map_or_else(|| "?".to_string(), |c| report.cases[c].describe());
            failures.push(format!("{case} reached upstream {base} as {path}"));
        }
    }
    judge(
        "upstream paths outside the base path (or ambiguous)",
        failures,
    );
}

#[test]
fn admin_credentials_never_reach_an_upstream() {
    let report = report();
    let mut failures = Vec::new();
    for (base, request) in &report.upstream {
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            if name.as_str() == "x-admin-key"
                || value.contains(ADMIN_KEY)
                || value.contains("sluice_session")
            {
                failures.push(format!("upstream {base} got {name}: {value}"));
            }
        }
        if String::from_utf8_lossy(&request.body).contains(ADMIN_KEY) {
            failures.push(format!("upstream {base} got the admin key in a body"));
        }
    }
    judge("admin credentials forwarded upstream", failures);
}
