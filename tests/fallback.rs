//! Model fallbacks (issue 17): when every upstream of the requested model fails in a
//! retryable way, or the model refuses the request as too long, the next model of
//! `routing.fallbacks` answers; never after the first byte; the key is charged once; the
//! log lists every try with its model.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::mock::{Fault, MockServer};

const ADMIN: &str = "admin-secret-0001";
const ALICE: &str = "Bearer fk-alice-0001";

/// `big` serves gpt-4o (two upstreams when `second_big`), `small` serves gpt-4o-mini;
/// gpt-4o falls back to gpt-4o-mini.
fn config(
    big: &MockServer,
    second_big: Option<&MockServer>,
    small: &MockServer,
    extra: &str,
) -> String {
    let second = second_big.map_or(String::new(), |m| {
        format!(
            "  - {{name: big2, base_url: '{}', keys: [sk-big2-00001], models: [gpt-4o]}}\n",
            m.url()
        )
    });
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001, rpm: 2}}
upstreams:
  - {{name: big, base_url: '{}', keys: [sk-big-000001], models: [gpt-4o], timeouts: {{first_byte: 300ms}}}}
{second}  - {{name: small, base_url: '{}', keys: [sk-small-00001], models: [gpt-4o-mini]}}
routing:
  retries: {}
  backoff: 1ms
  fallbacks: {{gpt-4o: [gpt-4o-mini]}}
{extra}
admin: {{key: {ADMIN}}}
pricing:
  gpt-4o: {{input: 1000, output: 1000}}
  gpt-4o-mini: {{input: 1, output: 1}}
",
        big.url(),
        small.url(),
        if second_big.is_some() { 1 } else { 0 },
    )
}

async fn chat(gw: &TestGateway, body: Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request")
}

fn hello(stream: bool) -> Value {
    json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
}

/// Sends one request to a gateway whose gpt-4o upstream fails with `fault`, and checks
/// that gpt-4o-mini answered it.
async fn falls_back_on(fault: Fault) {
    let big = named_mock("big", Some(fault)).await;
    let small = named_mock("small", None).await;
    let gw = gateway(&config(&big, None, &small, "")).await;
    let response = chat(&gw, hello(false)).await;
    assert_eq!(response.status(), 200, "{fault:?}");
    assert_eq!(served_by(&response), "small");
    assert_eq!(response.headers()["x-sluice-model"], "gpt-4o-mini");
    let body = json(response).await;
    assert_eq!(body["model"], "gpt-4o-mini", "the real model by default");
    assert_eq!(big.requests().len(), 1, "{fault:?}");
    let seen = small
        .last()
        .expect("the fallback was asked")
        .json()
        .unwrap();
    assert_eq!(seen["model"], "gpt-4o-mini");
    assert_eq!(seen["messages"][0]["content"], "hello");
}

#[tokio::test]
async fn falls_back_on_a_500() {
    falls_back_on(Fault::ServerError).await;
}

#[tokio::test]
async fn falls_back_on_a_timeout() {
    falls_back_on(Fault::SlowFirstByte(Duration::from_secs(3))).await;
}

#[tokio::test]
async fn falls_back_on_a_429() {
    falls_back_on(Fault::RateLimited { retry_after: 1 }).await;
}

#[tokio::test]
async fn falls_back_when_the_context_is_too_long() {
    falls_back_on(Fault::ContextLength).await;
}

#[tokio::test]
async fn without_a_chain_a_context_error_is_relayed_as_it_is() {
    let big = named_mock("big", Some(Fault::ContextLength)).await;
    let small = named_mock("small", None).await;
    let gw = gateway(&config(&big, None, &small, "")).await;
    let mut body = hello(false);
    body["model"] = json!("gpt-4o-mini");
    small.set_fault(Some(Fault::ContextLength));
    let response = chat(&gw, body).await;
    assert_eq!(response.status(), 400);
    let answer = json(response).await;
    assert_eq!(answer["error"]["code"], "context_length_exceeded");
    assert!(big.requests().is_empty());
}

#[tokio::test]
async fn falls_back_after_both_upstreams_of_the_model_fail_and_logs_every_try() {
    let big = named_mock("big", Some(Fault::ServerError)).await;
    let big2 = named_mock("big2", Some(Fault::ServerError)).await;
    let small = named_mock("small", None).await;
    let gw = gateway(&config(&big, Some(&big2), &small, "")).await;
    let response = chat(&gw, hello(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "small");
    assert_eq!(response.headers()["x-sluice-tries"], "3");
    let reply = json(response).await;
    assert_eq!(big.requests().len(), 1);
    assert_eq!(big2.requests().len(), 1);
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    let row = &list["data"][0];
    assert_eq!(row["model"], "gpt-4o", "the model asked for");
    assert_eq!(row["upstream"], "small");
    assert_eq!(row["tries"], 3);
    // Priced by the model that served: gpt-4o-mini at 1 USD per million tokens.
    let tokens = reply["usage"]["total_tokens"].as_f64().unwrap();
    let cost = row["cost"].as_f64().unwrap();
    assert!(
        (cost - tokens / 1e6).abs() < 1e-12,
        "{cost} for {tokens} tokens"
    );
    let detail = admin_json(
        &gw,
        &format!("/api/requests/{}", row["id"].as_str().unwrap()),
        ADMIN,
    )
    .await;
    let tries: Vec<(String, String, Value)> = detail["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["upstream"].as_str().unwrap().to_string(),
                a["model"].as_str().unwrap().to_string(),
                a["status"].clone(),
            )
        })
        .collect();
    let mut first_two: Vec<&str> = tries[..2].iter().map(|t| t.0.as_str()).collect();
    first_two.sort_unstable();
    assert_eq!(first_two, ["big", "big2"]);
    assert!(tries[..2].iter().all(|t| t.1 == "gpt-4o" && t.2 == 500));
    assert_eq!(
        tries[2],
        ("small".to_string(), "gpt-4o-mini".to_string(), json!(200))
    );
}

#[tokio::test]
async fn no_fallback_after_the_first_byte() {
    // Chunks 50 ms apart: the head is out well before the stream breaks.
    let big = mock_with(sluice::mock::MockOptions {
        name: "big".into(),
        fault: Some(Fault::Cut),
        interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let small = named_mock("small", None).await;
    let gw = gateway(&config(&big, None, &small, "")).await;
    let response = chat(&gw, hello(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "big");
    assert_eq!(response.headers()["x-sluice-model"], "gpt-4o");
    let text = response.text().await.unwrap_or_default();
    assert!(
        text.contains("\"error\""),
        "the cut stream ends with an error: {text}"
    );
    assert!(
        small.requests().is_empty(),
        "no model is tried once bytes went out"
    );
}

#[tokio::test]
async fn the_key_is_charged_once_per_request_whatever_the_models_tried() {
    start_of_a_minute().await;
    let big = named_mock("big", Some(Fault::ServerError)).await;
    let small = named_mock("small", None).await;
    let gw = gateway(&config(&big, None, &small, "")).await;
    // rpm 2: two requests falling back pass; were each model charged, the second would not.
    for _ in 0..2 {
        let response = chat(&gw, hello(false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "small");
    }
    assert_error(chat(&gw, hello(false)).await, 429, "rate_limit_exceeded").await;
    assert_eq!(big.requests().len(), 2);
    assert_eq!(small.requests().len(), 2);
}

#[tokio::test]
async fn the_requested_name_is_kept_when_configured() {
    let big = named_mock("big", Some(Fault::ServerError)).await;
    let small = named_mock("small", None).await;
    let gw = gateway(&config(
        &big,
        None,
        &small,
        "  fallback_model_name: requested",
    ))
    .await;
    let response = chat(&gw, hello(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-model"], "gpt-4o-mini");
    let text = response.text().await.unwrap();
    let models: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["model"].as_str().map(str::to_string))
        .collect();
    assert!(!models.is_empty(), "{text}");
    assert!(models.iter().all(|m| m == "gpt-4o"), "{models:?}");
}

#[tokio::test]
async fn each_upstream_counts_its_own_tries_and_a_fallback_at_its_limit_reports_the_first_failure()
{
    start_of_a_minute().await;
    let big = named_mock("big", Some(Fault::ServerError)).await;
    let small = named_mock("small", None).await;
    let yaml = config(&big, None, &small, "").replace(
        "keys: [sk-small-00001], models: [gpt-4o-mini]}",
        "keys: [sk-small-00001], models: [gpt-4o-mini], rpm: 1}",
    );
    let gw = gateway(&yaml).await;
    let first = chat(&gw, hello(false)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(served_by(&first), "small");
    // gpt-4o-mini's upstream spent its one request: the answer is gpt-4o's own failure.
    let second = chat(&gw, hello(false)).await;
    assert_eq!(second.status(), 500);
    assert_eq!(served_by(&second), "big");
    assert_eq!(second.headers()["x-sluice-model"], "gpt-4o");
    assert_eq!(json(second).await["error"]["code"], "server_error");
    assert_eq!(big.requests().len(), 2);
    assert_eq!(small.requests().len(), 1);
}

/// A GPT request falling back to Claude: the OpenAI client gets an OpenAI-shaped answer,
/// translated from the Anthropic upstream's, plain and streamed, and the log names both
/// models.
#[tokio::test]
async fn a_gpt_request_falls_back_to_claude_across_protocols() {
    use sluice::mock::{MockOptions, MockProtocol};

    let big = named_mock("big", Some(Fault::ServerError)).await;
    let claude = mock_with(MockOptions {
        name: "claude".into(),
        protocol: MockProtocol::Anthropic,
        keys: vec!["sk-ant-000001".into()],
        chunks: 4,
        ..MockOptions::default()
    })
    .await;
    let config = format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - {{name: big, base_url: '{}', keys: [sk-big-000001], models: [gpt-4o]}}
  - {{name: claude, kind: anthropic, base_url: '{}', keys: [sk-ant-000001], models: [claude-sonnet]}}
routing:
  retries: 0
  fallbacks: {{gpt-4o: [claude-sonnet]}}
admin: {{key: {ADMIN}}}
",
        big.url(),
        claude.url(),
    );
    let gw = gateway(&config).await;

    let response = chat(&gw, hello(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "claude");
    assert_eq!(response.headers()["x-sluice-model"], "claude-sonnet");
    let body = json(response).await;
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(body["model"], "claude-sonnet");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "{body}"
    );
    assert!(
        body["usage"]["total_tokens"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );
    let sent = claude.requests();
    let last = sent.last().expect("claude was asked");
    assert_eq!(
        last.path, "/v1/messages",
        "the Anthropic upstream got its own API"
    );

    let response = chat(&gw, hello(true)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("stream");
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        !text.contains("content_block_delta"),
        "Anthropic's events never reach an OpenAI client"
    );

    flush(&gw).await;
    let rows = admin_json(&gw, "/api/requests", ADMIN).await;
    let row = &rows["data"][0];
    let id = row["id"].as_str().expect("id");
    let detail = admin_json(&gw, &format!("/api/requests/{id}"), ADMIN).await;
    let models: Vec<&str> = detail["attempts"]
        .as_array()
        .expect("tries")
        .iter()
        .filter_map(|a| a["model"].as_str())
        .collect();
    assert_eq!(models, ["gpt-4o", "claude-sonnet"], "{detail}");
}
