//! Translation through the real gateway: OpenAI and Anthropic clients against Anthropic,
//! Gemini and OpenAI upstreams (mocks speaking each API natively). What reached the
//! upstream (path, credential header, body in its shape), what the client got (in its own
//! shape, streamed event by event), errors on both sides, a stream cut midway, and the log.

mod common;

use common::*;
use serde_json::{Value, json};
use sluice::mock::{Fault, MockOptions, MockProtocol, MockServer};

const ADMIN: &str = "admin-secret-0001";
const KEY: &str = "fk-alice-0001";

async fn mocks() -> (MockServer, MockServer, MockServer) {
    let with = |protocol, key: &str| MockOptions {
        protocol,
        keys: vec![key.to_string()],
        chunks: 4,
        ..MockOptions::default()
    };
    (
        mock_with(with(MockProtocol::OpenAi, "sk-openai-0001")).await,
        mock_with(with(MockProtocol::Anthropic, "sk-ant-0001")).await,
        mock_with(with(MockProtocol::Gemini, "gm-key-0001")).await,
    )
}

fn config(openai: &MockServer, anthropic: &MockServer, gemini: &MockServer, extra: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: {KEY}}}
upstreams:
  - {{name: oai, base_url: '{}', keys: [sk-openai-0001], models: [gpt-4o]}}
  - {{name: claude, kind: anthropic, base_url: '{}', keys: [sk-ant-0001], models: [claude-sonnet], model_map: {{claude-sonnet: claude-sonnet-4-5}}}}
  - {{name: gem, kind: gemini, base_url: '{}', keys: [gm-key-0001], models: [gemini-flash]}}
admin: {{key: {ADMIN}}}
routing: {{retries: 0}}
server: {{max_body: 64KiB}}
pricing:
  claude-sonnet: {{input: 3, output: 15, cached_input: 0.3}}
  gemini-flash: {{input: 1, output: 2}}
  gpt-4o: {{input: 2.5, output: 10}}
{extra}",
        openai.url(),
        anthropic.url(),
        gemini.url()
    )
}

async fn post(
    gw: &TestGateway,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client()
        .post(gw.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn openai(gw: &TestGateway, body: Value) -> reqwest::Response {
    post(
        gw,
        "/v1/chat/completions",
        body,
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
}

async fn anthropic(gw: &TestGateway, body: Value) -> reqwest::Response {
    post(
        gw,
        "/v1/messages",
        body,
        &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
    )
    .await
}

/// The `data:` payloads of an SSE body, with their event names.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|event| {
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            let value = if data == "[DONE]" {
                json!("[DONE]")
            } else {
                serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))
            };
            Some((name, value))
        })
        .collect()
}

fn tools_openai() -> Value {
    json!([
        {"type": "function", "function": {"name": "weather", "description": "w", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}
    ])
}

fn tools_anthropic() -> Value {
    json!([
        {"name": "weather", "description": "w", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "time", "input_schema": {"type": "object"}}
    ])
}

async fn last_row(gw: &TestGateway) -> Value {
    flush(gw).await;
    let list = admin_json(gw, "/api/requests", ADMIN).await;
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    let detail = admin_json(gw, &format!("/api/requests/{id}"), ADMIN).await;
    json!({"row": list["data"][0], "detail": detail})
}

#[tokio::test]
async fn an_openai_client_reaches_an_anthropic_upstream() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    let image = "data:image/png;base64,iVBORw0KGgo=";
    let reply = openai(
        &gw,
        json!({"model": "claude-sonnet", "max_tokens": 50, "temperature": 0.5, "stop": "END",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": image}}]}
        ]}),
    )
    .await;
    assert_eq!(reply.status(), 200);
    let reply = json(reply).await;
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "claude-sonnet");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "word0 word1 word2 word3 "
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    let seen = a.last().unwrap();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-0001"));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen.header("authorization"), None);
    let body = seen.json().unwrap();
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["system"][0]["text"], "be brief");
    assert_eq!(body["max_tokens"], 50);
    assert_eq!(body["stop_sequences"], json!(["END"]));
    assert_eq!(
        body["messages"][0]["content"][1]["source"]["type"],
        "base64"
    );
    assert_eq!(
        body["messages"][0]["content"][1]["source"]["media_type"],
        "image/png"
    );
    let logged = last_row(&gw).await;
    assert_eq!(logged["row"]["upstream"], "claude");
    assert_eq!(
        logged["row"]["total_tokens"],
        reply["usage"]["total_tokens"]
    );
    assert!(logged["row"]["cost"].as_f64().unwrap() > 0.0);
    assert_eq!(logged["detail"]["reply_text"], "word0 word1 word2 word3 ");
}

#[tokio::test]
async fn parallel_tool_calls_stream_from_anthropic_to_an_openai_client() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    let response = openai(
        &gw,
        json!({"model": "claude-sonnet", "stream": true, "tools": tools_openai(),
            "tool_choice": "required", "messages": [{"role": "user", "content": "weather and time"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.unwrap();
    let chunks = events(&text);
    assert_eq!(chunks.last().unwrap().1, "[DONE]");
    let mut content = String::new();
    let mut arguments = vec![String::new(), String::new()];
    let mut names = vec![Value::Null, Value::Null];
    let mut finish = Value::Null;
    let mut usage = Value::Null;
    for (_, chunk) in &chunks[..chunks.len() - 1] {
        let delta = &chunk["choices"][0]["delta"];
        content.push_str(delta["content"].as_str().unwrap_or(""));
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = call["index"].as_u64().unwrap() as usize;
            if !call["function"]["name"].is_null() {
                names[i] = call["function"]["name"].clone();
            }
            arguments[i].push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
        if !chunk["choices"][0]["finish_reason"].is_null() {
            finish = chunk["choices"][0]["finish_reason"].clone();
            usage = chunk["usage"].clone();
        }
    }
    assert_eq!(content, "Let me look that up. ");
    assert_eq!(names, vec![json!("weather"), json!("time")]);
    assert_eq!(
        arguments,
        vec![r#"{"query":"mock"}"#, r#"{"query":"mock"}"#]
    );
    assert_eq!(finish, "tool_calls");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{text}");
    let body = a.last().unwrap().json().unwrap();
    assert_eq!(body["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        body["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    let logged = last_row(&gw).await;
    assert_eq!(
        logged["detail"]["reply_tool_calls"][1]["function"]["name"],
        "time"
    );
    assert_eq!(
        logged["detail"]["reply_tool_calls"][1]["function"]["arguments"],
        r#"{"query":"mock"}"#
    );
    assert_eq!(logged["row"]["usage_source"], "upstream");
}

#[tokio::test]
async fn an_openai_client_reaches_a_gemini_upstream() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    let reply = json(
        openai(
            &gw,
            json!({"model": "gemini-flash", "tools": tools_openai(), "response_format": {"type": "json_object"},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}),
        )
        .await,
    )
    .await;
    // Gemini ends with STOP while calling functions: an OpenAI client sees tool_calls,
    // and the text written before the calls is the content.
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Let me look that up. "
    );
    assert_eq!(
        reply["choices"][0]["message"]["tool_calls"][1]["function"]["name"],
        "time"
    );
    let seen = g.last().unwrap();
    assert_eq!(seen.path, "/v1beta/models/gemini-flash:generateContent");
    assert_eq!(seen.header("x-goog-api-key"), Some("gm-key-0001"));
    assert_eq!(seen.header("authorization"), None);
    let body = seen.json().unwrap();
    assert_eq!(
        body["generationConfig"]["responseMimeType"],
        "application/json"
    );
    assert_eq!(
        body["contents"][0]["parts"][1]["fileData"]["mimeType"],
        "image/png"
    );
    assert_eq!(
        body["tools"][0]["functionDeclarations"][0]["name"],
        "weather"
    );

    let text = openai(
        &gw,
        json!({"model": "gemini-flash", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .text()
    .await
    .unwrap();
    let seen = g.last().unwrap();
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-flash:streamGenerateContent"
    );
    assert_eq!(seen.query.as_deref(), Some("alt=sse"));
    let chunks = events(&text);
    let content: String = chunks
        .iter()
        .filter_map(|(_, c)| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "word0 word1 word2 word3 ");
    // Asked for: the usage chunk comes apart, with no choices.
    let usage = &chunks[chunks.len() - 2].1;
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    let logged = last_row(&gw).await;
    assert_eq!(logged["row"]["completion_tokens"], 4);
    assert_eq!(logged["detail"]["reply_text"], "word0 word1 word2 word3 ");
}

#[tokio::test]
async fn an_anthropic_client_reaches_openai_and_gemini_upstreams() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    for (model, mock) in [("gpt-4o", &o), ("gemini-flash", &g)] {
        let reply = anthropic(
            &gw,
            json!({"model": model, "max_tokens": 64, "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
                "metadata": {"user_id": "u-1"},
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
                        {"type": "text", "text": "and now?"}]}
                ]}),
        )
        .await;
        assert_eq!(reply.status(), 200, "{model}");
        let reply = json(reply).await;
        assert_eq!(reply["type"], "message");
        assert_eq!(reply["model"], model);
        assert_eq!(reply["content"][0]["text"], "word0 word1 word2 word3 ");
        assert_eq!(reply["stop_reason"], "end_turn");
        assert!(reply["usage"]["input_tokens"].as_u64().unwrap() > 0);
        let body = mock.last().unwrap().json().unwrap();
        if model == "gpt-4o" {
            assert_eq!(mock.last().unwrap().path, "/v1/chat/completions");
            assert_eq!(
                mock.last().unwrap().header("authorization"),
                Some("Bearer sk-openai-0001")
            );
            assert_eq!(
                body["messages"][0],
                json!({"role": "system", "content": "be brief"})
            );
            assert_eq!(
                body["messages"][2]["tool_calls"][0]["function"]["arguments"],
                r#"{"city":"Oslo"}"#
            );
            assert_eq!(
                body["messages"][3],
                json!({"role": "tool", "tool_call_id": "toolu_1", "content": "cold"})
            );
            assert_eq!(body["messages"][4]["content"], "and now?");
            assert_eq!(body["user"], "u-1");
        } else {
            assert_eq!(body["systemInstruction"]["parts"][0]["text"], "be brief");
            assert_eq!(
                body["contents"][1]["parts"][0]["functionCall"]["name"],
                "weather"
            );
            assert_eq!(
                body["contents"][2]["parts"][0]["functionResponse"]["name"],
                "weather"
            );
            assert_eq!(body["contents"][2]["parts"][1]["text"], "and now?");
        }

        let text = anthropic(
            &gw,
            json!({"model": model, "max_tokens": 64, "stream": true, "tools": tools_anthropic(),
                "messages": [{"role": "user", "content": "weather and time"}]}),
        )
        .await
        .text()
        .await
        .unwrap();
        let events = events(&text);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"), "{text}");
        assert_eq!(names.last(), Some(&"message_stop"), "{text}");
        let starts: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, v)| &v["content_block"])
            .collect();
        let tools: Vec<&Value> = starts
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .copied()
            .collect();
        assert_eq!(tools.len(), 2, "{text}");
        assert_eq!(tools[0]["name"], "weather");
        let json_of = |block: u64| -> String {
            events
                .iter()
                .filter(|(_, v)| v["index"] == block && v["delta"]["type"] == "input_json_delta")
                .map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap())
                .collect()
        };
        let first_tool = events
            .iter()
            .find(|(_, v)| v["content_block"]["type"] == "tool_use")
            .map(|(_, v)| v["index"].as_u64().unwrap())
            .unwrap();
        assert_eq!(json_of(first_tool), r#"{"query":"mock"}"#);
        assert_eq!(json_of(first_tool + 1), r#"{"query":"mock"}"#);
        let delta = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1;
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);
        let logged = last_row(&gw).await;
        assert_eq!(logged["row"]["path"], "/v1/messages");
        assert!(
            logged["row"]["prompt_tokens"].as_u64().unwrap() > 0,
            "{logged}"
        );
        assert!(logged["row"]["cost"].as_f64().unwrap() > 0.0, "{logged}");
        assert_eq!(
            logged["detail"]["reply_tool_calls"][1]["function"]["name"],
            "time"
        );
    }
}

#[tokio::test]
async fn anthropic_to_anthropic_passes_through_unharmed() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    // What Claude Code sends: beta headers, thinking, cache_control on tools, a stream.
    let body = json!({"model": "claude-sonnet", "max_tokens": 2048, "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "ls", "cache_control": {"type": "ephemeral"}}]}]});
    let text = post(
        &gw,
        "/v1/messages",
        body.clone(),
        &[
            ("authorization", "Bearer fk-alice-0001"),
            ("anthropic-version", "2023-06-01"),
            (
                "anthropic-beta",
                "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
            ),
        ],
    )
    .await
    .text()
    .await
    .unwrap();
    let seen = a.last().unwrap();
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14")
    );
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-0001"));
    let mut expected = body.clone();
    expected["model"] = json!("claude-sonnet-4-5");
    assert_eq!(seen.json().unwrap(), expected);
    let events = events(&text);
    assert_eq!(
        events[0].1["message"]["model"], "claude-sonnet",
        "the client's name is put back"
    );
    assert!(
        events
            .iter()
            .any(|(_, v)| v["delta"]["type"] == "thinking_delta")
    );
    assert!(
        events
            .iter()
            .any(|(_, v)| v["delta"]["type"] == "signature_delta")
    );
    let logged = last_row(&gw).await;
    // Cached input counts as input.
    assert_eq!(
        logged["row"]["prompt_tokens"],
        events[0].1["message"]["usage"]["input_tokens"]
            .as_u64()
            .unwrap()
            + 3
    );
    assert_eq!(logged["row"]["completion_tokens"], 4);
    // The 3 cached tokens at the cached price.
    let prompt = logged["row"]["prompt_tokens"].as_f64().unwrap();
    let expected = ((prompt - 3.0) * 3.0 + 3.0 * 0.3 + 4.0 * 15.0) / 1e6;
    assert!((logged["row"]["cost"].as_f64().unwrap() - expected).abs() < 1e-12);
}

#[tokio::test]
async fn errors_take_the_clients_shape() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    // sluice's own refusals, on Anthropic's paths, are Anthropic's.
    let bad_key = post(
        &gw,
        "/v1/messages",
        json!({"model": "gpt-4o"}),
        &[("x-api-key", "nope")],
    )
    .await;
    assert_eq!(bad_key.status(), 401);
    let body = json(bad_key).await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    let missing = anthropic(
        &gw,
        json!({"model": "nope", "max_tokens": 1, "messages": []}),
    )
    .await;
    assert_eq!(missing.status(), 404);
    assert_eq!(json(missing).await["error"]["type"], "not_found_error");
    // A field the target cannot express: 400 naming it, in the client's shape.
    let top_k = anthropic(&gw, json!({"model": "gpt-4o", "max_tokens": 1, "top_k": 3, "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(top_k.status(), 400);
    let body = json(top_k).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`top_k`"),
        "{body}"
    );
    let schema = openai(&gw, json!({"model": "claude-sonnet", "response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "x"}]})).await;
    let body = assert_error(schema, 400, "untranslatable_field").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`response_format`")
    );
    let embeddings = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "claude-sonnet", "input": "x"}),
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await;
    assert_error(embeddings, 400, "unsupported_endpoint").await;

    let huge = "x".repeat(70_000);
    let too_large = anthropic(&gw, json!({"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": huge}]})).await;
    assert_eq!(too_large.status(), 413);
    assert_eq!(json(too_large).await["error"]["type"], "request_too_large");
    let denied =
        gateway(&config(&o, &a, &g, "").replace("access:\n", "access:\n  ip_deny: [127.0.0.1]\n"))
            .await;
    let refused = anthropic(
        &denied,
        json!({"model": "gpt-4o", "max_tokens": 1, "messages": []}),
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert_eq!(json(refused).await["error"]["type"], "permission_error");
    let dots = post(
        &gw,
        "/v1/messages/batches%2Fx",
        json!({}),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(dots.status(), 400);
    assert_eq!(json(dots).await["type"], "error");

    // The upstream's errors, mapped: status and Retry-After kept.
    o.set_fault(Some(Fault::RateLimited { retry_after: 7 }));
    let limited = anthropic(
        &gw,
        json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    let body = json(limited).await;
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["message"], "mock upstream rate limit");
    a.set_fault(Some(Fault::ServerError));
    let failed = openai(
        &gw,
        json!({"model": "claude-sonnet", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(failed.status(), 500);
    let body = json(failed).await;
    assert_eq!(body["error"]["message"], "mock upstream failure");
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_stream_cut_midway_ends_with_the_clients_error_event() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    for mock in [&a, &o] {
        mock.configure(|options| {
            options.fault = Some(Fault::Cut);
            options.interval = std::time::Duration::from_millis(20);
        });
    }
    let text = openai(&gw, json!({"model": "claude-sonnet", "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .await
        .text()
        .await
        .unwrap();
    let events_seen = events(&text);
    let last = &events_seen
        .last()
        .unwrap_or_else(|| panic!("no events: {text:?}"))
        .1;
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("broke off")),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    let text = anthropic(&gw, json!({"model": "gpt-4o", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .await
        .text()
        .await
        .unwrap();
    let events_seen = events(&text);
    let (name, last) = events_seen.last().unwrap();
    assert_eq!(name, "error", "{text}");
    assert_eq!(last["type"], "error");
    assert!(!text.contains("message_stop"));
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    assert!(
        list["data"][0]["error"]
            .as_str()
            .unwrap()
            .contains("broke off")
    );
}

#[tokio::test]
async fn count_tokens_is_forwarded_to_anthropic_or_counted_here() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "")).await;
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hello there, how are you"}]});
    let counted = post(
        &gw,
        "/v1/messages/count_tokens",
        body("claude-sonnet"),
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(counted.status(), 200);
    assert!(json(counted).await["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(a.last().unwrap().path, "/v1/messages/count_tokens");
    let requests_before = o.requests().len() + g.requests().len();
    for model in ["gpt-4o", "gemini-flash"] {
        let counted = post(
            &gw,
            "/v1/messages/count_tokens",
            body(model),
            &[("x-api-key", KEY)],
        )
        .await;
        assert_eq!(counted.status(), 200);
        // 3 + (3 + 1 for the role + 7 for the text), as OpenAI counts a chat prompt.
        let tokens = json(counted).await["input_tokens"].as_u64().unwrap();
        assert!((8..=20).contains(&tokens), "{tokens}");
    }
    assert_eq!(o.requests().len() + g.requests().len(), requests_before);
}

#[tokio::test]
async fn limits_refuse_an_anthropic_client_in_its_shape() {
    let (o, a, g) = mocks().await;
    let yaml = config(&o, &a, &g, "").replace(
        &format!("{{name: alice, key: {KEY}}}"),
        &format!("{{name: alice, key: {KEY}, rpm: 1}}"),
    );
    let gw = gateway(&yaml).await;
    start_of_a_minute().await;
    let body = json!({"model": "claude-sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(anthropic(&gw, body.clone()).await.status(), 200);
    let refused = anthropic(&gw, body).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body = json(refused).await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_passthrough_callers_own_key_goes_in_the_upstreams_header() {
    let (o, a, g) = mocks().await;
    let yaml = config(&o, &a, &g, "").replace("access:\n", "access:\n  passthrough: true\n");
    let gw = gateway(&yaml).await;
    let body = json!({"model": "claude-sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    let own = post(&gw, "/v1/messages", body, &[("x-api-key", "sk-ant-0001")]).await;
    assert_eq!(own.status(), 200);
    let seen = a.last().unwrap();
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-0001"));
    assert_eq!(seen.header("authorization"), None);
    let body = json!({"model": "gemini-flash", "messages": [{"role": "user", "content": "x"}]});
    let own = post(
        &gw,
        "/v1/chat/completions",
        body,
        &[("authorization", "Bearer gm-key-0001")],
    )
    .await;
    assert_eq!(own.status(), 200);
    assert_eq!(
        g.last().unwrap().header("x-goog-api-key"),
        Some("gm-key-0001")
    );
}

#[tokio::test]
async fn hostile_bodies_on_anthropics_path_are_refused_in_its_shape() {
    let (o, a, g) = mocks().await;
    let gw = gateway(&config(&o, &a, &g, "routing: {default_upstream: oai}\n")).await;
    let bodies = [
        "not json".to_string(),
        "[]".to_string(),
        "{\"model\": \"gpt-4o\"}".to_string(),
        "{\"model\": \"gpt-4o\", \"messages\": \"x\"}".to_string(),
        "{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": 42}]}".to_string(),
        "{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}".to_string(),
        "{\"model\": \"gpt-4o\", \"messages\": [], \"tools\": {}}".to_string(),
        "{\"model\": \"gpt-4o\", \"messages\": [], \"system\": 7}".to_string(),
        "{\"model\": \"gemini-flash\", \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"source\": {\"type\": \"file\"}}]}]}".to_string(),
        format!("{{\"model\": \"gpt-4o\", \"messages\": {}}}", "[".repeat(200) + &"]".repeat(200)),
    ];
    for body in bodies {
        for content_type in ["application/json", "text/plain"] {
            let response = client()
                .post(gw.url("/v1/messages"))
                .header("x-api-key", KEY)
                .header("content-type", content_type)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            assert!((400..500).contains(&status), "{status} for {body}");
            let value = json(response).await;
            assert_eq!(value["type"], "error", "{body}: {value}");
            assert!(value["error"]["message"].is_string());
        }
    }
    // A model name that would climb out of Gemini's `models/` is refused.
    let yaml = config(&o, &a, &g, "").replace("models: [gemini-flash]", "models: ['*']");
    let gw = gateway(&yaml).await;
    let escape = openai(
        &gw,
        json!({"model": "x/../../admin", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_error(escape, 400, "invalid_model").await;
    assert!(g.requests().iter().all(|r| !r.path.contains("admin")));
}

#[tokio::test]
async fn a_failing_upstream_of_one_kind_fails_over_to_another_kind() {
    let (o, a, g) = mocks().await;
    a.set_fault(Some(Fault::ServerError));
    let yaml = format!(
        "access:
  keys:
    - {{name: alice, key: {KEY}}}
routing: {{strategy: round_robin, retries: 2, backoff: 1ms}}
upstreams:
  - {{name: claude, kind: anthropic, base_url: '{}', keys: [sk-ant-0001], models: [shared]}}
  - {{name: gem, kind: gemini, base_url: '{}', keys: [gm-key-0001], models: [shared]}}
  - {{name: oai, base_url: '{}', keys: [sk-openai-0001], models: [shared]}}
",
        a.url(),
        g.url(),
        o.url()
    );
    let gw = gateway(&yaml).await;
    for _ in 0..3 {
        let response = anthropic(
            &gw,
            json!({"model": "shared", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_ne!(served_by(&response), "claude");
        let text = response.text().await.unwrap();
        assert!(text.contains("event: message_stop"), "{text}");
        assert!(text.contains("word3"), "{text}");
    }
    // The failing Anthropic upstream was tried once, then rested.
    assert_eq!(a.requests().len(), 1);
}
