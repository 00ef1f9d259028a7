//! What sluice guarantees whatever a client chooses to send: allow-lists and budgets that
//! no header, method or content type gets around, paths that stay below an upstream's base
//! URL, sluice's own credentials kept from upstreams and the log, bodies and connections
//! that cannot hold the gateway, bounded streams, and an honest log of complete answers.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice::mock::MockServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESTRICTED: &str = "Bearer fk-mini-only-0001";
const BUDGETED: &str = "Bearer fk-budget-00001";
const ADMIN_KEY: &str = "admin-secret-guards-01";

fn config(mock: &MockServer) -> String {
    format!(
        "access:
  keys:
    - {{name: mini, key: fk-mini-only-0001, models: [gpt-4o-mini, whisper-1]}}
    - {{name: payer, key: fk-budget-00001, budget: {{cost: 5.0, period: day}}}}
upstreams:
  - {{name: main, base_url: '{}/tenant-a', keys: [sk-upstream-key-0001]}}
admin: {{key: {ADMIN_KEY}}}
pricing:
  gpt-4o: {{input: 2.5, output: 10}}
  gpt-4o-mini: {{input: 0.15, output: 0.6}}
",
        mock.url()
    )
}

async fn admin_get(gw: &TestGateway, path: &str) -> Value {
    admin_json(gw, path, ADMIN_KEY).await
}

fn models_seen(mock: &MockServer) -> Vec<String> {
    mock.requests()
        .iter()
        .filter_map(|r| r.json())
        .filter_map(|v| v["model"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_restricted_key_never_reaches_another_model_whatever_it_declares() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let body = chat_body("gpt-4o", false);
    // The same forbidden request, dressed every way a client can choose.
    let dressed: Vec<(&str, Option<&str>)> = vec![
        ("POST", None),
        ("POST", Some("text/plain")),
        ("POST", Some("application/x-www-form-urlencoded")),
        ("POST", Some("application/octet-stream")),
        ("PUT", Some("application/json")),
        ("PATCH", None),
        ("DELETE", Some("text/plain")),
    ];
    for (method, content_type) in dressed {
        let mut request = client()
            .request(method.parse().unwrap(), gw.url("/v1/chat/completions"))
            .header("authorization", RESTRICTED)
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        assert!(
            status == 403 || status == 400,
            "{method} {content_type:?}: {status}"
        );
    }
    assert!(
        !models_seen(&mock).iter().any(|m| m == "gpt-4o"),
        "gpt-4o reached the upstream: {:?}",
        models_seen(&mock)
    );

    // A body that is no JSON at all, or JSON naming no model where the endpoint falls back
    // to a default one, cannot be vouched for.
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", RESTRICTED)
        .header("content-type", "text/plain")
        .body("model=gpt-4o")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "model_unknown").await;
    let response = client()
        .post(gw.url("/v1/images/generations"))
        .header("authorization", RESTRICTED)
        .header("content-type", "application/json")
        .body(r#"{"prompt": "a cat"}"#)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "model_required").await;
    // Ambiguity is refused rather than resolved in the caller's favour.
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", RESTRICTED)
        .header("content-type", "application/json")
        .body(r#"{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // The allowed model passes, declared or not; model-less objects stay usable.
    for content_type in [Some("application/json"), None, Some("text/plain")] {
        let mut request = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", RESTRICTED)
            .body(chat_body("gpt-4o-mini", false));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{content_type:?}");
    }
    let response = client()
        .get(gw.url("/v1/files"))
        .header("authorization", RESTRICTED)
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 403);
    assert_ne!(response.status(), 400);

    // Every row of the log names the model its request asked for.
    flush(&gw).await;
    let list = admin_get(&gw, "/api/requests?key=mini").await;
    for row in list["data"].as_array().unwrap() {
        if row["path"] == "/v1/chat/completions" && row["status"] == 200 {
            assert_eq!(row["model"], "gpt-4o-mini", "{row}");
        }
    }
}

#[tokio::test]
async fn forms_are_read_for_their_model() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let form = |model: &str| {
        format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF0000WAVE\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--XyZ--\r\n"
        )
    };
    let response = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .header("authorization", RESTRICTED)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(form("gpt-4o-transcribe"))
        .send()
        .await
        .unwrap();
    assert_error(response, 403, "model_not_allowed").await;
    let response = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .header("authorization", RESTRICTED)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(form("whisper-1"))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 403);
    // A form whose boundary is a lie cannot be read, so it is refused.
    let response = client()
        .post(gw.url("/v1/audio/transcriptions"))
        .header("authorization", RESTRICTED)
        .header("content-type", "multipart/form-data; boundary=nothing-like-it")
        .body("--other\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--other--\r\n")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_form").await;
    assert_eq!(
        mock.requests()
            .iter()
            .filter(|r| r.path.ends_with("/audio/transcriptions"))
            .count(),
        1,
        "only the allowed form went upstream"
    );
}

#[tokio::test]
async fn a_budget_is_never_charged_nothing_for_a_hidden_model() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let response = client()
        .put(gw.url("/v1/chat/completions"))
        .header("authorization", BUDGETED)
        .body("{\"model\": \"gpt-4o\", \"messages\": [], \"x\": \"") // not even JSON
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "model_unknown").await;
    // Declared or not, the model is known, so the answer is priced.
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", BUDGETED)
        .header("content-type", "text/plain")
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    flush(&gw).await;
    let list = admin_get(&gw, "/api/requests?key=payer&status=2xx").await;
    let row = &list["data"][0];
    assert_eq!(row["model"], "gpt-4o", "{row}");
    assert!(row["cost"].as_f64().is_some_and(|c| c > 0.0), "{row}");
}

#[tokio::test]
async fn model_names_are_bounded_and_printable() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    for model in ["x".repeat(300), "gpt-4o\u{0000}".into(), "gpt\n4o".into()] {
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer fk-alice-0001")
            .header("content-type", "application/json")
            .body(chat_body(&model, false))
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "invalid_model").await;
    }
    let response = client()
        .get(gw.url(&format!("/v1/models/{}", "m".repeat(1000))))
        .header("authorization", "Bearer fk-alice-0001")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_model").await;
    assert!(mock.requests().is_empty(), "none went upstream");
}

#[tokio::test]
async fn dot_segments_never_climb_above_the_base_url() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    for path in [
        "/v1/%2e%2e/%2e%2e/tenant-b/admin",
        "/v1/./x/../../../../etc",
        "/v1/%2E%2e/x",
        "/v1/.%2e/x",
        "/v1/files/a%2f..%2f..%2fx",
        "/v1/files/a%5c..%5cx",
    ] {
        // Sent as raw bytes: a client library would normalise the dots away.
        let answer = raw_request(
            gw.addr,
            &format!(
                "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer fk-budget-00001\r\nconnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_path"), "{path}: {answer}");
    }
    assert!(
        mock.requests().is_empty(),
        "reached the upstream: {:?}",
        mock.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    // Dots inside a name are not segments.
    let response = client()
        .get(gw.url("/v1/files/file-a..b.jsonl"))
        .header("authorization", BUDGETED)
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 400);
    assert!(
        mock.last()
            .is_some_and(|r| r.path == "/tenant-a/v1/files/file-a..b.jsonl")
    );
}

async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn sluice_credentials_stay_with_sluice() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", BUDGETED)
        .header("x-admin-key", ADMIN_KEY)
        .header("cookie", "sluice_session=session-secret-0042; theme=dark")
        .header("x-goog-api-key", "goog-secret-0043")
        .header("x-amz-security-token", "amz-secret-0044")
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.last().unwrap();
    for name in ["x-admin-key", "cookie", "x-goog-api-key"] {
        assert!(seen.header(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-upstream-key-0001")
    );
    flush(&gw).await;
    let stored = stored_text(&gw).await;
    for secret in [
        "admin-secret-guards",
        "session-secret-0042",
        "goog-secret-0043",
        "amz-secret-0044",
        "fk-budget-00001",
    ] {
        assert!(!stored.contains(secret), "{secret} is in the store");
    }
}

#[tokio::test]
async fn a_slow_body_is_cut_off_with_408() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "{}server: {{body_idle_timeout: 1s, body_timeout: 3s}}\n",
        config(&mock)
    ))
    .await;
    // Half a body, then silence: buffered (the key is restricted) and streamed alike.
    for (key, path) in [
        (RESTRICTED, "/v1/chat/completions"),
        ("Bearer fk-budget-00001", "/v1/files"),
    ] {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            raw_request(
                gw.addr,
                &format!(
                    "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: {key}\r\ncontent-type: application/octet-stream\r\ncontent-length: 100\r\n\r\n{{\"model\""
                ),
            ),
        )
        .await
        .expect("the gateway answers rather than waiting for ever");
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // A body that trickles in forever is cut at the total deadline.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer fk-mini-only-0001\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < Duration::from_secs(8) {
        if stream.write_all(b" ").await.is_err() {
            break;
        }
        let mut buffer = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await
        {
            answer.extend_from_slice(&buffer[..n]);
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "{}server: {{max_connections_per_ip: 4}}\n",
        simple_config(&mock)
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = raw_request(
        gw.addr,
        "GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    // Closing one frees its place.
    held.pop();
    assert!(
        eventually(Duration::from_secs(2), || true).await,
        "wait for the close to be seen"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = raw_request(
        gw.addr,
        "GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// An upstream whose stream opens an event and never ends it.
async fn endless_event_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                let _ = stream.read(&mut buffer).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![b'x'; 8192];
                let mut chunk = format!("{:x}\r\ndata: ", piece.len() + 6).into_bytes();
                chunk.extend_from_slice(&piece);
                chunk.extend_from_slice(b"\r\n");
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                for _ in 0..2000 {
                    let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                    chunk.extend_from_slice(&piece);
                    chunk.extend_from_slice(b"\r\n");
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_event_that_never_ends_ends_the_stream_with_an_error() {
    let upstream = endless_event_upstream().await;
    let gw = gateway(&format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - {{name: endless, base_url: 'http://{upstream}', keys: [sk-x-000001], model_map: {{gpt-4o: real-model}}}}
"
    ))
    .await;
    let started = std::time::Instant::now();
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer fk-alice-0001")
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(20), response.bytes())
        .await
        .expect("the stream ends")
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.starts_with("data: {\"error\""),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.contains("larger than"), "{text}");
    assert!(body.len() < 4096, "the oversized event is not relayed");
    // Scanning each byte once: 8 MiB in 8 KiB pieces takes well under a second of CPU.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn complete_answers_with_a_length_are_not_logged_as_disconnects() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "{}admin: {{key: {ADMIN_KEY}}}\n",
        simple_config(&mock)
    ))
    .await;
    for _ in 0..5 {
        let response = client()
            .get(gw.url("/v1/models/gpt-4o"))
            .header("authorization", "Bearer fk-alice-0001")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("content-length"));
        let _ = response.bytes().await.unwrap();
        let response = client()
            .post(gw.url("/v1/embeddings"))
            .header("authorization", "Bearer fk-alice-0001")
            .header("content-type", "application/json")
            .body(r#"{"model": "text-embedding-3-small", "input": "hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
    }
    flush(&gw).await;
    let list = admin_get(&gw, "/api/requests").await;
    let rows = list["data"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    for row in rows {
        assert!(row["error"].is_null(), "{row}");
    }
}
