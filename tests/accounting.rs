//! Usage accounting, limits that survive restarts, the request log and the admin API.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::mock::MockServer;

const ADMIN: &str = "Bearer admin-secret-0001";
const ALICE: &str = "Bearer fk-alice-0001";

fn config(mock: &MockServer, extra_key: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001{extra_key}}}
    - {{name: bob, key: fk-bob-0000002}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-key-0001]}}
admin: {{key: admin-secret-0001}}
pricing:
  gpt-4o: {{input: 2.5, output: 10}}
",
        mock.url()
    )
}

async fn admin_get(gw: &TestGateway, path: &str) -> Value {
    admin_json(gw, path, ADMIN.trim_start_matches("Bearer ")).await
}

async fn chat(gw: &TestGateway, key: &str, body: Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn messages() -> Value {
    json!([{"role": "user", "content": "tell me a story about a lighthouse"}])
}

#[tokio::test]
async fn every_request_is_logged_with_usage_cost_and_masked_secrets() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    let reply = json(
        chat(
            &gw,
            ALICE,
            json!({"model": "gpt-4o", "messages": messages()}),
        )
        .await,
    )
    .await;
    let unauthorised = chat(
        &gw,
        "Bearer fk-nobody",
        json!({"model": "gpt-4o", "messages": []}),
    )
    .await;
    assert_eq!(unauthorised.status(), 401);
    flush(&gw).await;

    let list = admin_get(&gw, "/api/requests").await;
    assert_eq!(list["total"], 2);
    let row = &list["data"][1];
    assert_eq!(row["key_name"], "alice");
    assert_eq!(row["path"], "/v1/chat/completions");
    assert_eq!(row["model"], "gpt-4o");
    assert_eq!(row["upstream"], "main");
    assert_eq!(row["upstream_key"], "sk-…0001");
    assert_eq!(row["status"], 200);
    assert_eq!(row["client_ip"], "127.0.0.1");
    assert_eq!(row["tries"], 1);
    assert_eq!(row["total_tokens"], reply["usage"]["total_tokens"]);
    assert_eq!(row["usage_source"], "upstream");
    let usage = &reply["usage"];
    let expected_cost = (usage["prompt_tokens"].as_f64().unwrap() * 2.5
        + usage["completion_tokens"].as_f64().unwrap() * 10.0)
        / 1e6;
    assert!((row["cost"].as_f64().unwrap() - expected_cost).abs() < 1e-12);
    assert!(row["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(row["ttfb_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(list["data"][0]["status"], 401);
    assert_eq!(list["data"][0]["key_name"], "-");

    let detail = admin_get(
        &gw,
        &format!("/api/requests/{}", row["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        detail["request_headers"]["authorization"],
        "Bearer fk-…0001"
    );
    assert!(
        detail["request_body"]
            .as_str()
            .unwrap()
            .contains("lighthouse")
    );
    assert!(detail["response_body"].as_str().unwrap().contains("word7"));
    assert_eq!(
        detail["reply_text"],
        reply["choices"][0]["message"]["content"]
    );
    assert_eq!(detail["attempts"][0]["upstream"], "main");
    assert_eq!(detail["attempts"][0]["key"], "sk-…0001");
}

#[tokio::test]
async fn a_streamed_request_counts_the_same_tokens_as_its_twin_and_hides_the_extra_chunk() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    let plain = json(
        chat(
            &gw,
            ALICE,
            json!({"model": "gpt-4o", "messages": messages()}),
        )
        .await,
    )
    .await;
    let streamed = chat(
        &gw,
        ALICE,
        json!({"model": "gpt-4o", "messages": messages(), "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        !streamed.contains("\"usage\":{"),
        "the client did not ask for usage: {streamed}"
    );
    assert!(streamed.ends_with("data: [DONE]\n\n"));
    let seen = mock.last().unwrap().json().unwrap();
    assert_eq!(
        seen["stream_options"]["include_usage"], true,
        "sluice asked the upstream for usage"
    );

    let asked = chat(
        &gw,
        ALICE,
        json!({"model": "gpt-4o", "messages": messages(), "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        asked.contains("\"usage\":{"),
        "a client that asked keeps its usage chunk"
    );

    flush(&gw).await;
    let list = admin_get(&gw, "/api/requests?path=/v1/chat/completions").await;
    let rows = list["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["total_tokens"], plain["usage"]["total_tokens"], "{row}");
        assert_eq!(row["usage_source"], "upstream");
    }
    assert_eq!(rows[1]["stream"], true);
    let detail = admin_get(
        &gw,
        &format!("/api/requests/{}", rows[1]["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        detail["reply_text"], plain["choices"][0]["message"]["content"],
        "the stream reassembled"
    );
}

#[tokio::test]
async fn streamed_tool_calls_are_reassembled_in_the_log() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {}}}]);
    let text = chat(
        &gw,
        ALICE,
        json!({"model": "gpt-4o", "messages": messages(), "tools": tools, "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(text.contains("lookup"));
    flush(&gw).await;
    let list = admin_get(&gw, "/api/requests").await;
    let detail = admin_get(
        &gw,
        &format!("/api/requests/{}", list["data"][0]["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(detail["reply_tool_calls"][0]["function"]["name"], "lookup");
    assert_eq!(
        detail["reply_tool_calls"][0]["function"]["arguments"],
        "{\"query\":\"mock\"}"
    );
}

#[tokio::test]
async fn without_upstream_usage_the_tokenizer_counts() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    for stream in [false, true] {
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", ALICE)
            .header("content-type", "application/json")
            .header("x-mock-usage", "none")
            .body(json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}], "stream": stream}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    flush(&gw).await;
    let list = admin_get(&gw, "/api/requests").await;
    for row in list["data"].as_array().unwrap() {
        assert_eq!(row["usage_source"], "tokenizer", "{row}");
        // 3 + (3 + "user" 1 + "hello world" 2) prompt tokens; "word0 … word7 " in o200k.
        assert_eq!(row["prompt_tokens"], 9, "{row}");
        let expected = sluice::pure::usage::count_tokens(
            "gpt-4o",
            &(0..8).map(|i| format!("word{i} ")).collect::<String>(),
        );
        assert_eq!(row["completion_tokens"], expected, "{row}");
    }
}

#[tokio::test]
async fn key_rpm_is_exact_under_concurrency() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ", rpm: 50")).await;
    start_of_a_minute().await;
    let requests = (0..200).map(|_| async {
        client()
            .get(gw.url("/v1/models/gpt-4o"))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap()
    });
    let responses = futures_util::future::join_all(requests).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 50);
    let refused: Vec<&reqwest::Response> = responses.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(refused.len(), 150);
    let retry: u64 = refused[0].headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(mock.requests().len(), 50);
    // Another key is not affected.
    let bob = client()
        .get(gw.url("/v1/models/gpt-4o"))
        .header("authorization", "Bearer fk-bob-0000002")
        .send()
        .await
        .unwrap();
    assert_eq!(bob.status(), 200);
    let last = responses.into_iter().find(|r| r.status() == 429).unwrap();
    let body = assert_error(last, 429, "rate_limit_exceeded").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("50 requests per minute")
    );
}

#[tokio::test]
async fn budgets_refuse_once_spent() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ", budget: {tokens: 10, period: day}")).await;
    assert_eq!(
        chat(
            &gw,
            ALICE,
            json!({"model": "gpt-4o", "messages": messages()})
        )
        .await
        .status(),
        200
    );
    flush(&gw).await;
    let refused = chat(
        &gw,
        ALICE,
        json!({"model": "gpt-4o", "messages": messages()}),
    )
    .await;
    assert!(refused.headers().contains_key("retry-after"));
    assert_error(refused, 429, "budget_exceeded").await;
}

#[tokio::test]
async fn an_upstream_at_its_limit_is_skipped_while_others_serve() {
    let a = mock_with(sluice::mock::MockOptions {
        name: "a".into(),
        ..Default::default()
    })
    .await;
    let b = mock_with(sluice::mock::MockOptions {
        name: "b".into(),
        ..Default::default()
    })
    .await;
    let yaml = format!(
        "upstreams:\n  - {{name: a, base_url: '{}', rpm: 2}}\n  - {{name: b, base_url: '{}', rpd: -1}}\n",
        a.url(),
        b.url()
    );
    let gw = gateway(&yaml).await;
    start_of_a_minute().await;
    for _ in 0..10 {
        assert_eq!(
            client()
                .get(gw.url("/v1/models/gpt-4o"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(a.requests().len(), 2);
    assert_eq!(b.requests().len(), 8);

    let only = gateway(&format!(
        "upstreams: [{{name: a, base_url: '{}', rpm: 0}}]",
        a.url()
    ))
    .await;
    let response = client()
        .get(only.url("/v1/models/gpt-4o"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    assert_error(response, 429, "upstream_rate_limited").await;
}

#[tokio::test]
async fn the_admin_api_searches_filters_pages_and_reports_stats() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    for i in 0..5 {
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("needle-{i}")}]});
        assert_eq!(chat(&gw, ALICE, body).await.status(), 200);
    }
    for _ in 0..3 {
        let response = client()
            .post(gw.url("/v1/embeddings"))
            .header("authorization", "Bearer fk-bob-0000002")
            .header("content-type", "application/json")
            .body(json!({"model": "text-embedding-3-small", "input": "haystack"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let failed = client()
        .get(gw.url("/v1/files"))
        .header("authorization", ALICE)
        .header("x-mock-fault", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    flush(&gw).await;

    assert_eq!(admin_get(&gw, "/api/requests").await["total"], 9);
    assert_eq!(
        admin_get(&gw, "/api/requests?search=needle-3").await["total"],
        1
    );
    assert_eq!(
        admin_get(&gw, "/api/requests?model=text-embedding-3-small").await["total"],
        3
    );
    assert_eq!(admin_get(&gw, "/api/requests?key=bob").await["total"], 3);
    assert_eq!(admin_get(&gw, "/api/requests?status=5xx").await["total"], 1);
    assert_eq!(admin_get(&gw, "/api/requests?status=200").await["total"], 8);
    assert_eq!(
        admin_get(&gw, "/api/requests?from=2999-01-01T00:00:00Z").await["total"],
        0
    );
    let page1 = admin_get(&gw, "/api/requests?per_page=4&page=1").await;
    let page3 = admin_get(&gw, "/api/requests?per_page=4&page=3").await;
    assert_eq!(page1["data"].as_array().unwrap().len(), 4);
    assert_eq!(page1["has_more"], true);
    assert_eq!(page3["data"].as_array().unwrap().len(), 1);
    assert_eq!(page3["has_more"], false);
    // The cursor pages the same rows as page numbers do.
    let cursor = page1["next_before"].as_str().unwrap();
    let page2 = admin_get(&gw, &format!("/api/requests?per_page=4&before={cursor}")).await;
    let numbered = admin_get(&gw, "/api/requests?per_page=4&page=2").await;
    assert_eq!(page2["data"], numbered["data"]);
    assert_eq!(page2["total"], 9);

    let stats = admin_get(&gw, "/api/stats").await;
    let totals = &stats["totals"];
    assert_eq!(totals["requests"], 9);
    assert_eq!(totals["errors"], 1);
    assert!((totals["success_rate"].as_f64().unwrap() - 8.0 / 9.0).abs() < 1e-9);
    assert!(totals["p95_latency_ms"].as_f64().unwrap() > 0.0);
    assert!(totals["total_tokens"].as_i64().unwrap() > 0);
    let by_model: Vec<(String, i64)> = stats["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(
        // A model the config does not name counts as `other` (clients choose names).
        by_model.contains(&("gpt-4o".into(), 5)) && by_model.contains(&("other".into(), 3)),
        "{by_model:?}"
    );
    let keys: i64 = stats["by_key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(keys, 9);
    let hourly: i64 = stats["hourly"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["requests"].as_i64().unwrap())
        .sum();
    let daily: i64 = stats["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["requests"].as_i64().unwrap())
        .sum();
    assert_eq!((hourly, daily), (9, 9));

    let missing = client()
        .get(gw.url("/api/requests/req_nope"))
        .header("authorization", ADMIN)
        .send()
        .await
        .unwrap();
    assert_error(missing, 404, "request_not_found").await;
    for path in ["/api/requests", "/api/stats"] {
        let response = client()
            .get(gw.url(path))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap();
        assert_error(response, 401, "invalid_admin_key").await;
    }
    let openapi = json(
        client()
            .get(gw.url("/api/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(openapi["paths"]["/api/requests"].is_object());
}

#[tokio::test]
async fn status_shows_limits_use_health_and_masked_keys() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ", rpm: 10, rpd: 100")).await;
    start_of_a_minute().await;
    for _ in 0..3 {
        assert_eq!(
            chat(
                &gw,
                ALICE,
                json!({"model": "gpt-4o", "messages": messages()})
            )
            .await
            .status(),
            200
        );
    }
    flush(&gw).await;
    let status = admin_get(&gw, "/v1/status").await;
    let alice = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .unwrap()
        .clone();
    assert_eq!(alice["key"], "fk-…0001");
    assert_eq!(alice["limits"]["rpm"], 10);
    assert_eq!(alice["usage"]["minute"]["requests"], 3);
    assert_eq!(alice["usage"]["day"]["requests"], 3);
    assert!(alice["usage"]["day"]["tokens"].as_u64().unwrap() > 0);
    let upstream = &status["upstreams"][0];
    assert_eq!(upstream["usage"]["day"]["requests"], 3);
    assert_eq!(upstream["keys"][0]["key"], "sk-…0001");
    assert_eq!(upstream["health"]["cooling_down"], false);
    let text = status.to_string();
    for secret in ["fk-alice-0001", "sk-upstream-key-0001", "admin-secret-0001"] {
        assert!(!text.contains(secret), "{secret} in /v1/status");
    }
    let own = json(
        client()
            .get(gw.url("/v1/status"))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(own["keys"].as_array().unwrap().len(), 1);
    assert!(own.get("upstreams").is_none());
    assert_error(
        client().get(gw.url("/v1/status")).send().await.unwrap(),
        401,
        "invalid_admin_key",
    )
    .await;
}

#[tokio::test]
async fn no_secret_reaches_the_database() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    assert_eq!(
        chat(
            &gw,
            ALICE,
            json!({"model": "gpt-4o", "messages": messages(), "stream": true})
        )
        .await
        .status(),
        200
    );
    let response = client()
        .get(gw.url("/v1/files"))
        .header("x-api-key", "fk-bob-0000002")
        .header("cookie", "session=admin-secret-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        chat(&gw, "Bearer admin-secret-0001", json!({"model": "gpt-4o"}))
            .await
            .status(),
        401
    );
    flush(&gw).await;
    let stored = stored_text(&gw).await;
    assert!(stored.contains("chat/completions"), "the store was read");
    for secret in [
        "fk-alice-0001",
        "fk-bob-0000002",
        "sk-upstream-key-0001",
        "admin-secret-0001",
    ] {
        assert!(!stored.contains(secret), "{secret} found in the store");
    }
}

#[tokio::test]
async fn retention_keeps_the_newest_rows() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("log.db").display());
    let first = gateway(&format!(
        "upstreams: [{{name: m, base_url: '{}'}}]\nstorage: {{url: '{url}'}}",
        mock.url()
    ))
    .await;
    for _ in 0..6 {
        assert_eq!(
            client()
                .get(first.url("/v1/models/gpt-4o"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    flush(&first).await;
    let second = gateway(&format!(
        "upstreams: [{{name: m, base_url: '{}'}}]\nstorage: {{url: '{url}', retention: {{max_rows: 3}}}}",
        mock.url()
    ))
    .await;
    flush(&second).await;
    let page = second
        .gateway
        .recorder
        .as_ref()
        .unwrap()
        .store
        .list(&Default::default())
        .unwrap();
    assert_eq!(page.total, Some(3));
    // The removed rows' search text goes with them (the search indexer removes it, at the
    // lowest priority, from the index's own file).
    let search_rows = || -> i64 {
        rusqlite::Connection::open(dir.path().join("log.db.search"))
            .unwrap()
            .query_row("SELECT count(*) FROM requests_search", [], |row| row.get(0))
            .unwrap()
    };
    let started = std::time::Instant::now();
    while search_rows() != 3 && started.elapsed() < std::time::Duration::from_secs(30) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(search_rows(), 3);
}

#[tokio::test]
async fn a_burst_of_ten_thousand_requests_is_logged_without_unbounded_memory() {
    let mock = mock_with(sluice::mock::MockOptions {
        record: false,
        ..Default::default()
    })
    .await;
    let gw = gateway(&config(&mock, "")).await;
    let rss_before = rss_kib();
    let total = 10_000;
    let concurrency = 50;
    let per_task = total / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let url = gw.url("/v1/chat/completions");
            tokio::spawn(async move {
                let client = client();
                for _ in 0..per_task {
                    let response = client
                        .post(&url)
                        .header("authorization", ALICE)
                        .header("content-type", "application/json")
                        .body(
                            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"burst"}]}"#,
                        )
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    response.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), flush(&gw))
        .await
        .expect("the writer keeps up");
    let recorder = gw.gateway.recorder.as_ref().unwrap();
    let written = recorder
        .stats
        .written
        .load(std::sync::atomic::Ordering::Relaxed);
    let dropped = recorder
        .stats
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(written + dropped, total as u64);
    assert_eq!(dropped, 0, "a queue of 10,000 holds a burst of 10,000");
    assert_eq!(
        recorder.store.list(&Default::default()).unwrap().total,
        Some(total as u64)
    );
    let growth_mib = (rss_kib() - rss_before) / 1024;
    assert!(growth_mib < 256, "resident memory grew by {growth_mib} MiB");
}

#[tokio::test]
async fn the_dashboard_can_live_on_its_own_listener() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "").replace(
        "admin: {key: admin-secret-0001}",
        "admin: {key: admin-secret-0001, listen: '127.0.0.1:0'}",
    ))
    .await;
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    let role = sluice::http::server::Role::Admin;
    tokio::spawn(sluice::http::server::serve_as(
        admin_listener,
        gw.gateway.clone(),
        role,
        std::future::pending(),
    ));
    // The API port no longer serves the dashboard or the admin API.
    assert_error(
        client().get(gw.url("/")).send().await.unwrap(),
        404,
        "unknown_url",
    )
    .await;
    let api = client()
        .get(gw.url("/api/requests"))
        .header("authorization", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404);
    // The admin port serves them, and nothing of the API.
    let page = client()
        .get(format!("http://{admin_addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.url().path(),
        "/login",
        "to the login page, with no data"
    );
    assert!(page.text().await.unwrap().contains("assets/app.js"));
    let api = client()
        .get(format!("http://{admin_addr}/api/requests"))
        .header("authorization", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);
    let chat = client()
        .get(format!("http://{admin_addr}/v1/models"))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 404);
}

#[tokio::test]
async fn login_sets_a_strict_http_only_session_cookie() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    let wrong = client()
        .post(gw.url("/api/login"))
        .body(r#"{"key": "nope"}"#)
        .send()
        .await
        .unwrap();
    assert_error(wrong, 401, "invalid_admin_key").await;
    let ok = client()
        .post(gw.url("/api/login"))
        .body(r#"{"key": "admin-secret-0001"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("admin-secret"));
    let session = cookie.split(';').next().unwrap().to_string();
    let with_cookie = client()
        .get(gw.url("/api/stats"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(with_cookie.status(), 200);
    let page = client()
        .get(gw.url("/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let logout = client()
        .post(gw.url("/api/logout"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 200);
    let after = client()
        .get(gw.url("/api/stats"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
}

#[tokio::test]
async fn without_an_admin_key_the_dashboard_is_off_unless_on_loopback() {
    let mock = mock().await;
    let yaml = format!("upstreams: [{{name: m, base_url: '{}'}}]", mock.url());
    let loopback = gateway(&yaml).await;
    assert_eq!(
        client()
            .get(loopback.url("/api/requests"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let wide = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = wide.local_addr().unwrap().port();
    tokio::spawn(sluice::http::server::serve(
        wide,
        loopback.gateway.clone(),
        std::future::pending(),
    ));
    let refused = client()
        .get(format!("http://127.0.0.1:{port}/api/requests"))
        .send()
        .await
        .unwrap();
    assert_error(refused, 403, "dashboard_off").await;
    let page = client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 403);
}

#[tokio::test]
async fn metrics_count_requests_latency_tokens_and_refusals_by_name_never_key() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ", rpm: 2")).await;
    start_of_a_minute().await;
    for _ in 0..3 {
        chat(
            &gw,
            ALICE,
            json!({"model": "gpt-4o", "messages": messages()}),
        )
        .await
        .bytes()
        .await
        .unwrap();
    }
    let failing = client()
        .get(gw.url("/v1/files"))
        .header("authorization", "Bearer fk-bob-0000002")
        .header("x-mock-fault", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failing.status(), 500);
    flush(&gw).await;
    assert_eq!(
        client()
            .get(gw.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let text = client()
        .get(gw.url("/metrics"))
        .header("authorization", ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"sluice_requests_total{model="gpt-4o",upstream="main",key="alice",status="200"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"sluice_refusals_total{key="alice",status="429"} 1"#),
        "{text}"
    );
    assert!(
        // The failing request's first try and its two retries (`retries: 2` by default).
        text.contains(r#"sluice_upstream_errors_total{upstream="main",kind="500"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"sluice_request_duration_seconds_count{model="gpt-4o",upstream="main",key="alice"} 2"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"sluice_tokens_total{model="gpt-4o",upstream="main",key="alice",kind="completion"} 16"#), "{text}");
    assert!(text.contains("sluice_log_queue_depth 0"));
    assert!(text.contains(r#"sluice_upstream_in_flight{upstream="main"} 0"#));
    for secret in ["fk-alice-0001", "sk-upstream-key-0001", "admin-secret-0001"] {
        assert!(!text.contains(secret));
    }
}

#[tokio::test]
async fn the_dashboard_api_tells_causes_apart_offers_filter_values_and_exports() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "")).await;
    for user in ["ann", "=bo, \"the\" builder"] {
        let body = json!({"model": "gpt-4o", "messages": messages(), "user": user});
        assert_eq!(chat(&gw, ALICE, body).await.status(), 200);
    }
    // Refused by sluice (no upstream asked), and failed at the upstream.
    let refused = chat(&gw, "Bearer fk-nobody", json!({"model": "gpt-4o"})).await;
    assert_eq!(refused.status(), 401);
    let failed = client()
        .get(gw.url("/v1/files"))
        .header("authorization", ALICE)
        .header("x-mock-fault", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    flush(&gw).await;

    let stats = admin_get(&gw, "/api/stats").await;
    let totals = &stats["totals"];
    assert_eq!(totals["requests"], 4);
    assert_eq!(totals["refused"], 1);
    assert_eq!(totals["upstream_errors"], 1);
    assert_eq!(totals["reached"], 3);
    assert!((totals["success_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    let users: Vec<&str> = stats["by_user"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(users.len(), 2);
    assert!(users.contains(&"ann"));
    assert!(totals["ttfb_p50_ms"].as_f64().unwrap() > 0.0);

    let values = admin_get(&gw, "/api/values").await;
    assert_eq!(values["statuses"], json!([200, 401, 500]));
    assert_eq!(values["users"], json!(["=bo, \"the\" builder", "ann"]));
    assert_eq!(values["upstreams"], json!(["main"]));
    assert_eq!(values["keys"], json!(["-", "alice"]));

    let ann = admin_get(&gw, "/api/requests?user=ann").await;
    assert_eq!(ann["total"], 1);
    assert_eq!(ann["data"][0]["user"], "ann");
    assert_eq!(ann["data"][0]["cause"], "ok");
    let errors = admin_get(&gw, "/api/requests?status=error").await;
    let mut causes: Vec<&str> = errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cause"].as_str().unwrap())
        .collect();
    causes.sort_unstable();
    assert_eq!(causes, ["refused", "upstream_error"]);

    let export = |query: &str| {
        client()
            .get(gw.url(&format!("/api/export?{query}")))
            .header("authorization", ADMIN)
            .send()
    };
    let csv = export("format=csv").await.unwrap();
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("sluice-requests.csv")
    );
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "a header and four rows: {text}");
    assert!(lines[0].starts_with("time,id,method,path,model,user,"));
    assert!(
        text.contains(r#","'=bo, ""the"" builder","#),
        "quoted, and no formula: {text}"
    );
    let jsonl = export("format=jsonl&status=error")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().any(|row| row["cause"] == "refused"));
    let limited = export("limit=3").await.unwrap().text().await.unwrap();
    assert_eq!(limited.lines().count(), 3);
    assert_error(export("format=xml").await.unwrap(), 400, "invalid_format").await;
    let anonymous = client().get(gw.url("/api/export")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    // The page: a redirect to the login page without a session; a favicon.
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = no_redirects.get(gw.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 302);
    assert_eq!(page.headers()["location"], "login");
    let login = client().get(gw.url("/login")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    assert!(login.text().await.unwrap().contains("assets/app.js"));
    let icon = client().get(gw.url("/favicon.ico")).send().await.unwrap();
    assert_eq!(icon.headers()["content-type"], "image/svg+xml");
}
