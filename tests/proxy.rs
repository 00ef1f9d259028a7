//! The gateway core end to end: what reached the upstream and what the client got.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use sluice::mock::{Fault, MockOptions};

const ALICE: &str = "Bearer fk-alice-0001";

#[tokio::test]
async fn chat_reaches_the_upstream_with_the_real_key_and_the_client_gets_its_headers() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let body = chat_body("gpt-4o", false);
    let response = client()
        .post(gw.url("/v1/chat/completions?trace=1"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .header("openai-organization", "org-42")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(
        headers["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_mock_")
    );
    assert_eq!(headers["x-ratelimit-remaining-requests"], "9999");
    assert_eq!(headers["x-sluice-upstream"], "main");
    assert_eq!(headers["content-type"], "application/json");
    let reply = json(response).await;
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "gpt-4o");

    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("trace=1"));
    assert_eq!(seen.header("authorization"), Some("Bearer sk-up-one-00001"));
    assert_eq!(seen.header("host"), Some(mock.addr.to_string().as_str()));
    assert_eq!(seen.header("openai-organization"), Some("org-42"));
    assert_eq!(
        &seen.body[..],
        body.as_bytes(),
        "the body arrives byte for byte"
    );
}

#[tokio::test]
async fn upstream_keys_are_used_in_turn() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    for _ in 0..4 {
        let response = client()
            .get(gw.url("/v1/files"))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let keys: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "Bearer sk-up-one-00001",
            "Bearer sk-up-two-00002",
            "Bearer sk-up-one-00001",
            "Bearer sk-up-two-00002"
        ]
    );
}

#[tokio::test]
async fn the_first_event_arrives_while_the_upstream_is_still_generating() {
    let mock = mock_with(MockOptions {
        chunks: 3,
        interval: Duration::from_millis(1500),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&simple_config(&mock)).await;
    let started = Instant::now();
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert_eq!(
        mock.count(&mock.state.streams_finished),
        0,
        "the upstream has not finished yet"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "first event came at {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    assert!(text.contains("word2 "), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_stream() {
    let mock = mock_with(MockOptions {
        fault: Some(Fault::Stall),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&simple_config(&mock)).await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(mock.count(&mock.state.streams_cancelled), 0);
    drop(stream);
    assert!(
        eventually(Duration::from_secs(3), || mock
            .count(&mock.state.streams_cancelled)
            == 1)
        .await,
        "the upstream stream was cancelled"
    );
}

#[tokio::test]
async fn every_openai_endpoint_is_forwarded() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let cases: [(&str, &str, serde_json::Value); 9] = [
        (
            "POST",
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}),
        ),
        (
            "POST",
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        ),
        (
            "POST",
            "/v1/images/generations",
            json!({"model": "dall-e-3", "prompt": "a cat"}),
        ),
        ("POST", "/v1/moderations", json!({"input": "hello"})),
        (
            "POST",
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "hi"}),
        ),
        (
            "POST",
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        ),
        ("GET", "/v1/batches?limit=2", json!(null)),
        ("GET", "/v1/models/gpt-4o", json!(null)),
        (
            "POST",
            "/v1/some/future/endpoint?x=1",
            json!({"anything": [1, 2]}),
        ),
    ];
    for (method, path, body) in cases {
        let mut request = client()
            .request(method.parse().unwrap(), gw.url(path))
            .header("authorization", ALICE);
        if !body.is_null() {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{method} {path}");
        let reply = json(response).await;
        let seen = mock.last().unwrap();
        let (want_path, want_query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        assert_eq!(seen.path, want_path);
        assert_eq!(seen.query.as_deref(), want_query);
        assert_eq!(seen.method.as_str(), method);
        if !body.is_null() {
            assert_eq!(
                seen.json().unwrap(),
                body,
                "{path}: body reached the upstream intact"
            );
        }
        if path.starts_with("/v1/some/future") {
            assert_eq!(reply["object"], "mock.echo");
            assert_eq!(reply["body"], body);
        }
    }
}

#[tokio::test]
async fn binary_responses_and_multipart_uploads_pass_byte_for_byte() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let speech = client()
        .post(gw.url("/v1/audio/speech"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(json!({"model": "tts-1", "input": "hi", "voice": "alloy"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(speech.status(), 200);
    assert_eq!(speech.headers()["content-type"], "audio/mpeg");
    assert_eq!(
        speech.bytes().await.unwrap().to_vec(),
        sluice::mock::speech_bytes()
    );

    let boundary = "sluiceboundary";
    let file: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let upload = client()
        .post(gw.url("/v1/files"))
        .header("authorization", ALICE)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let object = json(upload).await;
    assert_eq!(object["bytes"], file.len());
    assert_eq!(object["filename"], "in.jsonl");
    assert_eq!(object["purpose"], "batch");
    let seen = mock.last().unwrap();
    assert_eq!(seen.body.to_vec(), body);
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str()),
        "length kept while streaming"
    );

    let id = object["id"].as_str().unwrap();
    let content = client()
        .get(gw.url(&format!("/v1/files/{id}/content")))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(content.bytes().await.unwrap().to_vec(), file);
    let listed = json(
        client()
            .get(gw.url("/v1/files"))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed["data"][0]["id"], id);
    let deleted = client()
        .delete(gw.url(&format!("/v1/files/{id}")))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(json(deleted).await["deleted"], true);
    let gone = client()
        .get(gw.url(&format!("/v1/files/{id}")))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404, "upstream statuses pass through");
}

#[tokio::test]
async fn a_chunked_request_body_streams_through() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(b"{\"input\": ".to_vec()), Ok(b"\"streamed\"}".to_vec())];
    let response = client()
        .post(gw.url("/v1/moderations"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        mock.last().unwrap().json().unwrap(),
        json!({"input": "streamed"})
    );
}

#[tokio::test]
async fn passthrough_sends_a_clients_own_key_and_maps_gateway_keys() {
    let mock = mock().await;
    let yaml = simple_config(&mock).replace("access:\n", "access:\n  passthrough: true\n");
    let gw = gateway(&yaml).await;
    let send = |key: &'static str| {
        client()
            .get(gw.url("/v1/models/gpt-4o"))
            .header("authorization", format!("Bearer {key}"))
            .send()
    };
    assert_eq!(send("sk-client-own-key").await.unwrap().status(), 200);
    assert_eq!(
        mock.last().unwrap().header("authorization"),
        Some("Bearer sk-client-own-key")
    );
    assert_eq!(send("fk-alice-0001").await.unwrap().status(), 200);
    let used = mock
        .last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_string();
    assert!(
        used == "Bearer sk-up-one-00001" || used == "Bearer sk-up-two-00002",
        "{used}"
    );
}

#[tokio::test]
async fn missing_or_wrong_keys_get_401_and_reach_nothing() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let none = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    assert_error(none, 401, "missing_api_key").await;
    let wrong = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer sk-up-one-00001")
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    let body = assert_error(wrong, 401, "invalid_api_key").await;
    assert!(
        !body.to_string().contains("sk-up-one"),
        "the error does not echo the key"
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn without_gateway_keys_the_upstream_keys_serve_everyone() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "upstreams: [{{name: open, base_url: '{}', keys: [sk-default-key-1]}}]",
        mock.url()
    ))
    .await;
    let response = client()
        .get(gw.url("/v1/batches"))
        .header("authorization", "Bearer anything")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        mock.last().unwrap().header("authorization"),
        Some("Bearer sk-default-key-1")
    );
}

#[tokio::test]
async fn ip_rules_and_trusted_proxies() {
    let mock = mock().await;
    let base = simple_config(&mock);
    let denied = gateway(&base.replace("access:\n", "access:\n  ip_deny: [127.0.0.0/8]\n")).await;
    let response = client()
        .get(denied.url("/v1/batches"))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_error(response, 403, "ip_not_allowed").await;
    let health = client().get(denied.url("/health")).send().await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "liveness answers whatever the IP rules"
    );

    let lan_only = base.replace("access:\n", "access:\n  ip_allow: [10.0.0.0/8]\n");
    let allow_only_lan = gateway(&lan_only).await;
    let response = client()
        .get(allow_only_lan.url("/v1/batches"))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_error(response, 403, "ip_not_allowed").await;
    // X-Forwarded-For from an untrusted peer is not believed.
    let forged = client()
        .get(allow_only_lan.url("/v1/batches"))
        .header("authorization", ALICE)
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);

    let behind_proxy = gateway(&format!(
        "server: {{trusted_proxies: [127.0.0.1]}}\n{lan_only}"
    ))
    .await;
    let via_proxy = |xff: &'static str| {
        client()
            .get(behind_proxy.url("/v1/batches"))
            .header("authorization", ALICE)
            .header("x-forwarded-for", xff)
            .send()
    };
    assert_eq!(via_proxy("10.1.2.3").await.unwrap().status(), 200);
    assert_eq!(
        via_proxy("10.1.2.3, 192.0.2.7").await.unwrap().status(),
        403,
        "the rightmost untrusted hop counts"
    );
}

#[tokio::test]
async fn health_ready_route_prefix_and_unknown_routes() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "server: {{route_prefix: /openai}}\n{}",
        simple_config(&mock)
    ))
    .await;
    for path in ["/health", "/openai/health", "/openai/ready"] {
        assert_eq!(
            client().get(gw.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    let prefixed = client()
        .get(gw.url("/openai/v1/models/gpt-4o"))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(prefixed.status(), 200);
    assert_eq!(
        mock.last().unwrap().path,
        "/v1/models/gpt-4o",
        "the prefix is not sent upstream"
    );
    let unprefixed = client()
        .get(gw.url("/v1/models"))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_error(unprefixed, 404, "unknown_url").await;
    let unknown = client()
        .get(gw.url("/openai/v2/things"))
        .send()
        .await
        .unwrap();
    assert_error(unknown, 404, "unknown_url").await;
}

#[tokio::test]
async fn models_are_forwarded_from_an_any_upstream_and_listed_from_config_otherwise() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let list = json(
        client()
            .get(gw.url("/v1/models"))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"gpt-4o") && ids.contains(&"whisper-1"),
        "{ids:?}"
    );

    let other = common::mock().await;
    let yaml = format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
    - {{name: bob, key: fk-bob-00000002, models: [gpt-4o, local-llama]}}
upstreams:
  - {{name: a, base_url: '{}', models: ['*']}}
  - {{name: b, base_url: '{}', models: [local-llama, gpt-4o]}}
",
        mock.url(),
        other.url()
    );
    let gw = gateway(&yaml).await;
    let list = json(
        client()
            .get(gw.url("/v1/models"))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"local-llama") && ids.contains(&"whisper-1"),
        "{ids:?}"
    );
    assert_eq!(
        ids.iter().filter(|id| **id == "gpt-4o").count(),
        1,
        "each model once: {ids:?}"
    );
    let bob = json(
        client()
            .get(gw.url("/v1/models"))
            .header("authorization", "Bearer fk-bob-00000002")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let mut bob_ids: Vec<&str> = bob["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    bob_ids.sort_unstable();
    assert_eq!(
        bob_ids,
        ["gpt-4o", "local-llama"],
        "a key sees only its models"
    );
}

#[tokio::test]
async fn a_key_limited_to_some_models_cannot_use_others() {
    let mock = mock().await;
    let yaml = simple_config(&mock).replace(
        "key: fk-alice-0001}",
        "key: fk-alice-0001, models: [gpt-4o]}",
    );
    let gw = gateway(&yaml).await;
    let post = |model: &str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", ALICE)
            .header("content-type", "application/json")
            .body(chat_body(model, false))
            .send()
    };
    assert_eq!(post("gpt-4o").await.unwrap().status(), 200);
    assert_error(post("gpt-4o-mini").await.unwrap(), 403, "model_not_allowed").await;
    let bad = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4o\", ")
        .send()
        .await
        .unwrap();
    assert_error(bad, 400, "invalid_json").await;
    assert_eq!(
        mock.requests().len(),
        1,
        "refused requests never reach the upstream"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_with_or_without_a_length() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "server: {{max_body: 1KiB}}\n{}",
        simple_config(&mock)
    ))
    .await;
    let big = "x".repeat(4096);
    let declared = client()
        .post(gw.url("/v1/moderations"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(json!({"input": big}).to_string())
        .send()
        .await
        .unwrap();
    assert_error(declared, 413, "request_too_large").await;
    let chunks: Vec<Result<String, std::io::Error>> = (0..8).map(|_| Ok("y".repeat(512))).collect();
    let chunked = client()
        .post(gw.url("/v1/files"))
        .header("authorization", ALICE)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_error(chunked, 413, "request_too_large").await;
}

#[tokio::test]
async fn upstream_failures_become_openai_errors() {
    // Nothing listens on this port: bind one, learn it, and drop it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = gateway(&format!(
        "upstreams: [{{name: dead, base_url: 'http://{dead}'}}]"
    ))
    .await;
    let response = client().get(gw.url("/v1/models/x")).send().await.unwrap();
    let body = assert_error(response, 502, "upstream_unreachable").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("dead"));

    let slow = mock_with(MockOptions {
        fault: Some(Fault::SlowFirstByte(Duration::from_secs(5))),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "upstreams: [{{name: slow, base_url: '{}', timeouts: {{first_byte: 200ms}}}}]",
        slow.url()
    ))
    .await;
    let started = Instant::now();
    let response = client().get(gw.url("/v1/models/x")).send().await.unwrap();
    assert_error(response, 504, "upstream_timeout").await;
    assert!(started.elapsed() < Duration::from_secs(3));

    let dropping = mock_with(MockOptions {
        fault: Some(Fault::Drop),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "upstreams: [{{name: drops, base_url: '{}'}}]",
        dropping.url()
    ))
    .await;
    assert_error(
        client().get(gw.url("/v1/models/x")).send().await.unwrap(),
        502,
        "upstream_unreachable",
    )
    .await;

    let failing = mock().await;
    let gw = gateway(&format!(
        "upstreams: [{{name: f, base_url: '{}'}}]",
        failing.url()
    ))
    .await;
    let response = client()
        .get(gw.url("/v1/files"))
        .header("x-mock-fault", "429:7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "upstream statuses pass through");
    assert_eq!(response.headers()["retry-after"], "7");
    let response = client()
        .get(gw.url("/v1/files"))
        .header("x-mock-fault", "500")
        .send()
        .await
        .unwrap();
    assert_error(response, 500, "server_error").await;
}

#[tokio::test]
async fn a_stream_that_stalls_ends_with_an_sse_error_event() {
    let mock = mock_with(MockOptions {
        fault: Some(Fault::Stall),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "upstreams: [{{name: stalls, base_url: '{}', timeouts: {{idle: 300ms}}}}]",
        mock.url()
    ))
    .await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "upstream_timeout", "{text}");
    assert!(
        eventually(Duration::from_secs(2), || mock
            .count(&mock.state.streams_cancelled)
            == 1)
        .await
    );
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_cross() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let response = client()
        .get(gw.url("/v1/batches"))
        .header("authorization", ALICE)
        .header("connection", "x-secret-hop")
        .header("x-secret-hop", "1")
        .header("proxy-authorization", "Basic abc")
        .header("api-key", "fk-alice-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.last().unwrap();
    for header in ["x-secret-hop", "proxy-authorization", "api-key"] {
        assert!(
            seen.header(header).is_none(),
            "{header} reached the upstream"
        );
    }
    assert!(
        response.headers().get("transfer-encoding").is_none()
            || response.headers().get("content-length").is_none()
    );
}

#[tokio::test]
async fn upstream_extra_headers_are_added() {
    let mock = mock().await;
    let yaml = format!(
        "upstreams: [{{name: h, base_url: '{}', headers: {{X-Tenant: acme, X-Token: '${{TENANT_TOKEN}}'}}}}]",
        mock.url()
    );
    let gw = gateway_with_env(&yaml, &[("TENANT_TOKEN", "tt-123")]).await;
    assert_eq!(
        client()
            .get(gw.url("/v1/batches"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let seen = mock.last().unwrap();
    assert_eq!(seen.header("x-tenant"), Some("acme"));
    assert_eq!(seen.header("x-token"), Some("tt-123"));
}

#[tokio::test]
async fn browsers_get_cors_for_listed_origins_only() {
    let mock = mock().await;
    let gw = gateway(&format!(
        "server: {{cors_origins: ['https://chat.example']}}\n{}",
        simple_config(&mock)
    ))
    .await;
    let preflight = client()
        .request(reqwest::Method::OPTIONS, gw.url("/v1/chat/completions"))
        .header("origin", "https://chat.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    assert_eq!(
        preflight.headers()["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(
        mock.requests().is_empty(),
        "a preflight never reaches the upstream"
    );

    let post = client()
        .post(gw.url("/v1/chat/completions"))
        .header("origin", "https://chat.example")
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    assert_eq!(
        post.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    assert!(
        post.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("x-request-id")
    );
    let refused = client()
        .get(gw.url("/v1/models"))
        .header("origin", "https://chat.example")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(
        refused
            .headers()
            .contains_key("access-control-allow-origin"),
        "errors are readable by the page too"
    );

    let other = client()
        .get(gw.url("/v1/models"))
        .header("origin", "https://evil.example")
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn passthrough_log_rows_name_no_pool_key() {
    let mock = mock().await;
    let yaml = simple_config(&mock).replace("access:\n", "access:\n  passthrough: true\n");
    let gw = gateway(&yaml).await;
    for key in ["sk-client-own-key", "fk-alice-0001"] {
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(chat_body("gpt-4o", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let recorder = gw.gateway.recorder.as_ref().unwrap();
    recorder.flush().await;
    let list = recorder
        .store
        .list(&sluice::store::ListQuery {
            per_page: 10,
            ..Default::default()
        })
        .unwrap();
    let mut seen = Vec::new();
    for row in &list.data {
        let detail = recorder
            .store
            .get(row["id"].as_str().unwrap())
            .unwrap()
            .unwrap();
        let attempts = detail["attempts"].to_string();
        seen.push((
            detail["key_name"].as_str().unwrap().to_string(),
            detail["upstream_key"].clone(),
            attempts,
        ));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let [(alice, pool_key, _), (passthrough, own_key, own_attempts)] = &seen[..] else {
        panic!("{seen:?}");
    };
    assert_eq!(
        (alice.as_str(), passthrough.as_str()),
        ("alice", "passthrough")
    );
    assert!(
        pool_key.as_str().is_some_and(|k| k.starts_with("sk-…")),
        "{pool_key}"
    );
    // The caller's own key was sent: no pool key is named, in the row or its tries.
    assert!(own_key.is_null(), "{own_key}");
    assert!(!own_attempts.contains("sk-…"), "{own_attempts}");
}
