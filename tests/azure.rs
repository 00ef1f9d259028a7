//! Azure OpenAI upstreams through the real gateway, against the mock speaking Azure
//! (`MockProtocol::Azure`): deployment paths, `api-version`, the `api-key` header, the
//! client's model name in the answer, and the gateway's features (key pools, failover,
//! limits, the log) on this kind.

mod common;

use common::*;
use serde_json::json;
use sluice::mock::{Fault, MockOptions, MockProtocol, MockServer, deployment_model};

const ALICE: &str = "Bearer fk-alice-0001";

async fn azure_mock(name: &str) -> MockServer {
    mock_with(MockOptions {
        protocol: MockProtocol::Azure,
        name: name.into(),
        keys: vec!["az-key-one-0001".into(), "az-key-two-0002".into()],
        models: ["prod-4o", "gpt-4o-mini", "emb-small", "whisper"]
            .map(String::from)
            .to_vec(),
        ..MockOptions::default()
    })
    .await
}

fn azure_upstream(name: &str, mock: &MockServer, version: &str) -> String {
    format!(
        "  - name: {name}
    kind: azure
    base_url: {}
    api_version: '{version}'
    keys: [az-key-one-0001, az-key-two-0002]
    deployments: {{gpt-4o: prod-4o, text-embedding-3-small: emb-small, whisper-1: whisper}}
",
        mock.url()
    )
}

fn config(upstreams: &str, extra: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
admin: {{key: admin-secret-0001}}
upstreams:
{upstreams}{extra}"
    )
}

async fn post(gw: &TestGateway, path: &str, body: serde_json::Value) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .header("authorization", ALICE)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn chat_goes_to_the_deployment_with_the_api_version_and_api_key() {
    let mock = azure_mock("az").await;
    let gw = gateway(&config(&azure_upstream("az", &mock, "2024-10-21"), "")).await;
    let response = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "az");
    let reply = json(response).await;
    assert_eq!(reply["model"], "gpt-4o", "the client's name, not Azure's");
    assert!(reply["choices"][0]["message"]["content"].is_string());

    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/openai/deployments/prod-4o/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(seen.header("api-key"), Some("az-key-one-0001"));
    assert_eq!(
        seen.header("authorization"),
        None,
        "no gateway key upstream"
    );

    // The next request uses the pool's next key.
    post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(
        mock.last().unwrap().header("api-key"),
        Some("az-key-two-0002")
    );
}

#[tokio::test]
async fn a_stream_keeps_the_clients_model_and_its_usage_is_logged() {
    let mock = azure_mock("az").await;
    let gw = gateway(&config(&azure_upstream("az", &mock, "2024-10-21"), "")).await;
    let text = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(text.contains(r#""model":"gpt-4o""#), "{text}");
    assert!(!text.contains(&deployment_model("prod-4o")), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert!(
        !text.contains(r#""usage":{"#),
        "the usage chunk sluice asked for is not shown: {text}"
    );
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", "admin-secret-0001").await;
    let row = &list["data"][0];
    assert_eq!(row["model"], "gpt-4o");
    assert_eq!(row["upstream_model"], "prod-4o");
    assert_eq!(row["upstream"], "az");
    assert!(row["total_tokens"].as_u64().unwrap() > 0, "{row}");
    assert_eq!(row["usage_source"], "upstream");
    let metrics = client()
        .get(gw.url("/metrics"))
        .bearer_auth("admin-secret-0001")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"sluice_requests_total{model="gpt-4o",upstream="az",key="alice",status="200"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn parallel_tool_calls_stream_through() {
    let mock = azure_mock("az").await;
    let gw = gateway(&config(&azure_upstream("az", &mock, "2024-10-21"), "")).await;
    let tools = json!([
        {"type": "function", "function": {"name": "lookup", "parameters": {}}},
        {"type": "function", "function": {"name": "weather", "parameters": {}}}
    ]);
    let reply = json(
        post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "tools": tools, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await,
    )
    .await;
    let calls = reply["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 2, "{reply}");
    assert_eq!(calls[1]["function"]["name"], "weather");
    let text = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "tools": tools, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(text.contains(r#""name":"weather""#), "{text}");
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", "admin-secret-0001").await;
    let id = list["data"][0]["id"].as_str().unwrap();
    let detail = admin_json(&gw, &format!("/api/requests/{id}"), "admin-secret-0001").await;
    assert_eq!(
        detail["reply_tool_calls"][1]["function"]["arguments"], "{\"query\":\"mock\"}",
        "{detail}"
    );
}

#[tokio::test]
async fn other_endpoints_and_the_v1_path_style() {
    let mock = azure_mock("az").await;
    let gw = gateway(&config(&azure_upstream("az", &mock, "2024-10-21"), "")).await;
    let response = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "text-embedding-3-small", "input": "hi"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["model"], "text-embedding-3-small");
    assert_eq!(
        mock.last().unwrap().path,
        "/openai/deployments/emb-small/embeddings"
    );
    // Files name no deployment.
    let response = client()
        .get(gw.url("/v1/files"))
        .header("authorization", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/openai/files");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));

    let mock = azure_mock("az1").await;
    let gw = gateway(&config(&azure_upstream("az1", &mock, "v1"), "")).await;
    let response = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/openai/v1/chat/completions");
    assert_eq!(seen.query, None);
    assert_eq!(seen.json().unwrap()["model"], "prod-4o");
}

#[tokio::test]
async fn an_unknown_deployment_is_azures_404_and_a_bad_model_name_is_refused() {
    let mock = azure_mock("az").await;
    let gw = gateway(&config(&azure_upstream("az", &mock, "2024-10-21"), "")).await;
    let response = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 404);
    assert_eq!(json(response).await["error"]["code"], "DeploymentNotFound");
    let before = mock.requests().len();
    let response = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "../../admin", "messages": []}),
    )
    .await;
    assert_error(response, 400, "invalid_model").await;
    assert_eq!(mock.requests().len(), before, "nothing went upstream");
}

#[tokio::test]
async fn a_failing_azure_upstream_fails_over_and_limits_apply() {
    let failing = azure_mock("bad").await;
    failing.set_fault(Some(Fault::ServerError));
    let good = azure_mock("good").await;
    let upstreams = format!(
        "{}{}",
        azure_upstream("bad", &failing, "2024-10-21"),
        azure_upstream("good", &good, "2024-10-21")
    );
    let gw = gateway(&config(
        &upstreams,
        "routing: {strategy: round_robin, retries: 2}\n",
    ))
    .await;
    for _ in 0..3 {
        let response = post(
            &gw,
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-upstream"], "good");
    }

    let mock = azure_mock("az").await;
    let limited = config(&azure_upstream("az", &mock, "2024-10-21"), "").replace(
        "{name: alice, key: fk-alice-0001}",
        "{name: alice, key: fk-alice-0001, rpm: 1}",
    );
    let gw = gateway(&limited).await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    start_of_a_minute().await;
    assert_eq!(
        post(&gw, "/v1/chat/completions", body.clone())
            .await
            .status(),
        200
    );
    assert_error(
        post(&gw, "/v1/chat/completions", body).await,
        429,
        "rate_limit_exceeded",
    )
    .await;
}

#[tokio::test]
async fn entra_id_tokens_go_as_bearer() {
    let mock = mock_with(MockOptions {
        protocol: MockProtocol::Azure,
        require_token: true,
        models: vec!["prod-4o".into()],
        ..MockOptions::default()
    })
    .await;
    let yaml = config(
        &format!(
            "  - name: az
    kind: azure
    base_url: {url}
    api_version: '2024-10-21'
    deployments: {{gpt-4o: prod-4o}}
    token: {{url: '{url}/_mock/token', method: POST, token_path: data.token}}
",
            url = mock.url()
        ),
        "",
    );
    let gw = gateway(&yaml).await;
    let response = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let seen = mock.last().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-mock-1"));
    assert_eq!(seen.header("api-key"), None);
}

#[tokio::test]
async fn check_names_what_an_azure_upstream_lacks() {
    let yaml = "upstreams:
  - name: az
    kind: azure
    base_url: https://res.openai.azure.com
    deployments: {gpt-4o: 'bad/name'}
  - name: plain
    base_url: https://api.openai.com
    api_version: '2024-10-21'
  - name: odd
    kind: bedrock
    base_url: https://x
";
    let document = sluice::config::load::parse_document(yaml).unwrap();
    let problems = sluice::config::load::resolve(&document, &Default::default()).unwrap_err();
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let text = text.join("\n");
    assert!(
        text.contains("upstreams[0].api_version: an azure upstream needs"),
        "{text}"
    );
    assert!(text.contains("upstreams[0].deployments.gpt-4o"), "{text}");
    assert!(
        text.contains("upstreams[1].api_version: only an upstream of kind azure"),
        "{text}"
    );
    assert!(
        text.contains("upstreams[2].kind: must be one of openai, anthropic, gemini, azure"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unquoted_api_version_reads_as_written() {
    let yaml = "upstreams:
  - name: az
    kind: azure
    base_url: https://res.openai.azure.com/
    api_version: 2024-10-21
    keys: [az-key-one-0001]
    deployments: {gpt-4o: prod-4o}
";
    let document = sluice::config::load::parse_document(yaml).unwrap();
    let config = sluice::config::load::resolve(&document, &Default::default()).unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.kind, sluice::config::ApiKind::Azure);
    assert_eq!(upstream.api_version.as_deref(), Some("2024-10-21"));
    assert_eq!(upstream.upstream_model("gpt-4o"), "prod-4o");
    assert!(upstream.serves("gpt-4o"));
}
