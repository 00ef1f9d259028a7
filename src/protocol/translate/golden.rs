//! Golden tests: the providers' documented wire examples (Anthropic's streamed tool use
//! and plain message, OpenAI's tool request and streamed tool call, Gemini's function
//! call and text stream) translated and compared field by field; and properties: any
//! cutting of a stream translates alike, and OpenAI → Anthropic → OpenAI keeps every
//! translatable field of a request.

use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;

/// Anthropic's documented stream of a tool use (text first, then `get_weather` with its
/// input in pieces).
const ANTHROPIC_TOOL_STREAM: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-opus-4-1-20250805","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", let's check the weather for San Francisco, CA:"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisc"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"o, CA\", \"unit\": \"fah"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"renheit\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

/// OpenAI's documented streamed tool call: the name first, the arguments in pieces.
const OPENAI_TOOL_STREAM: &str = r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]},"finish_reason":null}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"location"}}]},"finish_reason":null}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":\""}}]},"finish_reason":null}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"Paris, France"}}]},"finish_reason":null}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"}"}}]},"finish_reason":null}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}

data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":80,"completion_tokens":17,"total_tokens":97,"prompt_tokens_details":{"cached_tokens":64}}}

data: [DONE]

"#;

/// Gemini's documented streamed text (one part per chunk, usage and finish on the last).
const GEMINI_TEXT_STREAM: &str = r#"data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 9,"totalTokenCount": 9},"modelVersion": "gemini-2.0-flash"}

data: {"candidates": [{"content": {"parts": [{"text": " quick brown fox"}],"role": "model"},"index": 0}],"modelVersion": "gemini-2.0-flash"}

data: {"candidates": [{"content": {"parts": [{"text": " jumps."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 9,"candidatesTokenCount": 6,"totalTokenCount": 15,"cachedContentTokenCount": 4},"modelVersion": "gemini-2.0-flash"}

"#;

fn translate_stream(client: Wire, upstream: Wire, input: &str, cuts: &[usize]) -> String {
    let mut translator = Translator::new(client, upstream, AnswerKind::Stream, "alias", false, 7);
    let mut out = BytesMut::new();
    let bytes = input.as_bytes();
    let mut from = 0;
    for &cut in cuts {
        let cut = cut.min(bytes.len()).max(from);
        out.extend_from_slice(&translator.push(&bytes[from..cut]).unwrap());
        from = cut;
    }
    out.extend_from_slice(&translator.push(&bytes[from..]).unwrap());
    out.extend_from_slice(&translator.finish());
    String::from_utf8(out.to_vec()).unwrap()
}

fn data_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let value = serde_json::from_str(data).unwrap_or(Value::String(data.into()));
            (name, value)
        })
        .collect()
}

/// An OpenAI stream put back together as a client would: content, each call's name and
/// arguments, the finish reason, the usage.
fn assemble_openai(text: &str) -> Value {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = Value::Null;
    let mut usage = Value::Null;
    for (_, chunk) in data_events(text) {
        if chunk == "[DONE]" {
            continue;
        }
        assert_eq!(chunk["model"], "alias");
        if chunk["usage"].is_object() {
            usage = chunk["usage"].clone();
        }
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = call["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(name) = call["function"]["name"].as_str() {
                calls[i].1 = name.into();
            }
            calls[i].2 += call["function"]["arguments"].as_str().unwrap_or("");
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    json!({"content": content, "calls": calls, "finish": finish, "usage": usage})
}

/// An Anthropic stream put back together as its SDK does.
fn assemble_anthropic(text: &str) -> Value {
    let mut blocks: Vec<Value> = Vec::new();
    let mut message = Value::Null;
    for (name, event) in data_events(text) {
        assert_eq!(event["type"], name.as_str());
        match name.as_str() {
            "message_start" => message = event["message"].clone(),
            "content_block_start" => {
                assert_eq!(event["index"], blocks.len());
                let mut block = event["content_block"].clone();
                if block["type"] == "tool_use" {
                    block["partial"] = json!("");
                }
                blocks.push(block);
            }
            "content_block_delta" => {
                let block = &mut blocks[event["index"].as_u64().unwrap() as usize];
                let delta = &event["delta"];
                match delta["type"].as_str().unwrap() {
                    "text_delta" => {
                        block["text"] = json!(format!(
                            "{}{}",
                            block["text"].as_str().unwrap(),
                            delta["text"].as_str().unwrap()
                        ));
                    }
                    "input_json_delta" => {
                        block["partial"] = json!(format!(
                            "{}{}",
                            block["partial"].as_str().unwrap(),
                            delta["partial_json"].as_str().unwrap()
                        ));
                    }
                    other => panic!("{other}"),
                }
            }
            "message_delta" => {
                message["stop_reason"] = event["delta"]["stop_reason"].clone();
                message["usage"] = event["usage"].clone();
            }
            _ => {}
        }
    }
    for block in &mut blocks {
        if let Some(partial) = block.get("partial").and_then(Value::as_str) {
            block["input"] = serde_json::from_str(partial).unwrap();
            block.as_object_mut().unwrap().remove("partial");
        }
    }
    message["content"] = Value::Array(blocks);
    message
}

#[test]
fn anthropics_documented_tool_stream_reaches_an_openai_client() {
    let text = translate_stream(
        Wire::OpenAiChat,
        Wire::AnthropicMessages,
        ANTHROPIC_TOOL_STREAM,
        &[],
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    let reply = assemble_openai(&text);
    assert_eq!(
        reply["content"],
        "Okay, let's check the weather for San Francisco, CA:"
    );
    assert_eq!(reply["calls"][0][0], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(reply["calls"][0][1], "get_weather");
    let arguments: Value = serde_json::from_str(reply["calls"][0][2].as_str().unwrap()).unwrap();
    assert_eq!(
        arguments,
        json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
    );
    assert_eq!(reply["finish"], "tool_calls");
    assert_eq!(reply["usage"]["prompt_tokens"], 472);
    assert_eq!(reply["usage"]["completion_tokens"], 89);
}

#[test]
fn anthropics_documented_tool_stream_reaches_an_anthropic_client_through_the_pivot() {
    // Anthropic → pivot → Anthropic keeps what the SDK assembles.
    let text = translate_stream(
        Wire::AnthropicMessages,
        Wire::AnthropicMessages,
        ANTHROPIC_TOOL_STREAM,
        &[],
    );
    let message = assemble_anthropic(&text);
    assert_eq!(message["model"], "alias");
    assert_eq!(
        message["content"][0]["text"],
        "Okay, let's check the weather for San Francisco, CA:"
    );
    assert_eq!(message["content"][1]["name"], "get_weather");
    assert_eq!(message["content"][1]["input"]["unit"], "fahrenheit");
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(message["usage"]["output_tokens"], 89);
    assert_eq!(message["usage"]["input_tokens"], 472);
}

#[test]
fn openais_documented_tool_stream_reaches_an_anthropic_client() {
    let text = translate_stream(
        Wire::AnthropicMessages,
        Wire::OpenAiChat,
        OPENAI_TOOL_STREAM,
        &[],
    );
    let message = assemble_anthropic(&text);
    assert_eq!(message["content"].as_array().unwrap().len(), 1);
    let block = &message["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["id"], "call_DdmO9pD3xa9XTPNJ32zg2hcA");
    assert_eq!(block["input"], json!({"location": "Paris, France"}));
    assert_eq!(message["stop_reason"], "tool_use");
    // Cached input is Anthropic's cache read; `input_tokens` leaves it out.
    assert_eq!(message["usage"]["input_tokens"], 16);
    assert_eq!(message["usage"]["cache_read_input_tokens"], 64);
    assert_eq!(message["usage"]["output_tokens"], 17);
}

#[test]
fn geminis_documented_text_stream_reaches_both_clients() {
    let text = translate_stream(Wire::OpenAiChat, Wire::Gemini, GEMINI_TEXT_STREAM, &[]);
    let reply = assemble_openai(&text);
    assert_eq!(reply["content"], "The quick brown fox jumps.");
    assert_eq!(reply["finish"], "stop");
    assert_eq!(reply["usage"]["total_tokens"], 15);
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    let message = assemble_anthropic(&translate_stream(
        Wire::AnthropicMessages,
        Wire::Gemini,
        GEMINI_TEXT_STREAM,
        &[],
    ));
    assert_eq!(message["content"][0]["text"], "The quick brown fox jumps.");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["output_tokens"], 6);
}

#[test]
fn anthropics_documented_message_reaches_an_openai_client() {
    let message = br#"{"content":[{"text":"Hi! My name is Claude.","type":"text"}],"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","model":"claude-sonnet-4-5","role":"assistant","stop_reason":"end_turn","stop_sequence":null,"type":"message","usage":{"input_tokens":2095,"output_tokens":503,"cache_read_input_tokens":100,"cache_creation_input_tokens":5}}"#;
    let out: Value = serde_json::from_slice(&response(
        Wire::OpenAiChat,
        Wire::AnthropicMessages,
        message,
        "alias",
        9,
    ))
    .unwrap();
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["id"], "msg_013Zva2CMHLNnXjNJJKqJ2EF");
    assert_eq!(out["model"], "alias");
    assert_eq!(out["created"], 9);
    assert_eq!(
        out["choices"][0]["message"]["content"],
        "Hi! My name is Claude."
    );
    assert_eq!(out["choices"][0]["finish_reason"], "stop");
    assert_eq!(out["usage"]["prompt_tokens"], 2095 + 100 + 5);
    assert_eq!(out["usage"]["completion_tokens"], 503);
    assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
}

#[test]
fn geminis_documented_function_call_is_tool_calls() {
    let answer = br#"{"candidates":[{"content":{"parts":[{"text":"Let me find theaters."},{"functionCall":{"name":"find_theaters","args":{"location":"Mountain View, CA","movie":"Barbie"}}}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":12,"totalTokenCount":21},"modelVersion":"gemini-2.0-flash"}"#;
    let out: Value = serde_json::from_slice(&response(
        Wire::OpenAiChat,
        Wire::Gemini,
        answer,
        "alias",
        1,
    ))
    .unwrap();
    let choice = &out["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Let me find theaters.");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "find_theaters"
    );
    let args: Value = serde_json::from_str(
        choice["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        args,
        json!({"location": "Mountain View, CA", "movie": "Barbie"})
    );
    assert_eq!(out["usage"]["total_tokens"], 21);
    let out: Value = serde_json::from_slice(&response(
        Wire::AnthropicMessages,
        Wire::Gemini,
        answer,
        "alias",
        1,
    ))
    .unwrap();
    assert_eq!(out["stop_reason"], "tool_use");
    assert_eq!(out["content"][0]["text"], "Let me find theaters.");
    assert_eq!(out["content"][1]["input"]["movie"], "Barbie");
}

#[test]
fn openais_documented_tool_request_reaches_anthropic_and_gemini() {
    let documented = br#"{"model":"gpt-4o","messages":[{"role":"developer","content":"You are helpful."},{"role":"user","content":"What's the weather like in Boston today?"}],"tools":[{"type":"function","function":{"name":"get_current_weather","description":"Get the current weather in a given location","parameters":{"type":"object","properties":{"location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}},"required":["location"]}}}],"tool_choice":"auto","max_completion_tokens":300,"top_p":0.9}"#;
    let (body, stream) = request(
        Wire::OpenAiChat,
        Wire::AnthropicMessages,
        documented,
        "claude-x",
    )
    .unwrap();
    assert!(!stream);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["model"], "claude-x");
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": "You are helpful."}])
    );
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "What's the weather like in Boston today?"}]}])
    );
    assert_eq!(body["tools"][0]["name"], "get_current_weather");
    assert_eq!(
        body["tools"][0]["input_schema"]["required"],
        json!(["location"])
    );
    assert_eq!(body["tool_choice"], json!({"type": "auto"}));
    assert_eq!(body["max_tokens"], 300);
    assert_eq!(body["top_p"], 0.9);
    let (body, _) = request(Wire::OpenAiChat, Wire::Gemini, documented, "gemini-x").unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["systemInstruction"],
        json!({"parts": [{"text": "You are helpful."}]})
    );
    assert_eq!(body["contents"][0]["role"], "user");
    assert_eq!(
        body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"]["properties"]["unit"]["enum"],
        json!(["celsius", "fahrenheit"])
    );
    assert_eq!(body["toolConfig"]["functionCallingConfig"]["mode"], "AUTO");
    assert_eq!(
        body["generationConfig"],
        json!({"maxOutputTokens": 300, "topP": 0.9})
    );
    assert!(body.get("model").is_none());
}

#[test]
fn thinking_crosses_with_its_budget_where_the_target_has_one() {
    let anthropic = br#"{"model":"m","max_tokens":9000,"thinking":{"type":"enabled","budget_tokens":5000},"messages":[{"role":"user","content":"think"}]}"#;
    let (body, _) = request(Wire::AnthropicMessages, Wire::Gemini, anthropic, "g").unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["generationConfig"]["thinkingConfig"],
        json!({"thinkingBudget": 5000, "includeThoughts": true})
    );
    assert_eq!(body["generationConfig"]["maxOutputTokens"], 9000);
    let (body, _) = request(Wire::AnthropicMessages, Wire::OpenAiChat, anthropic, "o").unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["reasoning_effort"], "medium");
    let openai = br#"{"model":"m","reasoning_effort":"high","messages":[{"role":"user","content":"think"}]}"#;
    let (body, _) = request(Wire::OpenAiChat, Wire::AnthropicMessages, openai, "c").unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["thinking"],
        json!({"type": "enabled", "budget_tokens": 16384})
    );
    assert!(body["max_tokens"].as_u64().unwrap() > 16384);
    // Thinking in answers: Anthropic's blocks are OpenAI's reasoning_content, and back.
    let message = br#"{"id":"m","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"text","text":"42"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2}}"#;
    let out: Value = serde_json::from_slice(&response(
        Wire::OpenAiChat,
        Wire::AnthropicMessages,
        message,
        "a",
        0,
    ))
    .unwrap();
    assert_eq!(out["choices"][0]["message"]["reasoning_content"], "hmm");
    assert_eq!(out["choices"][0]["message"]["content"], "42");
    let gemini = br#"{"candidates":[{"content":{"parts":[{"text":"hmm","thought":true},{"text":"42"}]},"finishReason":"STOP"}]}"#;
    let out: Value = serde_json::from_slice(&response(
        Wire::AnthropicMessages,
        Wire::Gemini,
        gemini,
        "a",
        0,
    ))
    .unwrap();
    assert_eq!(
        out["content"][0],
        json!({"type": "thinking", "thinking": "hmm", "signature": ""})
    );
    assert_eq!(out["content"][1]["text"], "42");
}

#[test]
fn fields_without_an_equivalent_are_named() {
    let refused = |client, upstream, body: &str| {
        request(client, upstream, body.as_bytes(), "m")
            .unwrap_err()
            .field
    };
    let chat = |extra: &str| {
        format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#)
    };
    assert_eq!(
        refused(
            Wire::OpenAiChat,
            Wire::AnthropicMessages,
            &chat(r#","logprobs":true"#)
        ),
        "logprobs"
    );
    assert_eq!(
        refused(
            Wire::OpenAiChat,
            Wire::AnthropicMessages,
            &chat(r#","n":2"#)
        ),
        "n"
    );
    assert_eq!(
        refused(
            Wire::OpenAiChat,
            Wire::Gemini,
            &chat(r#","parallel_tool_calls":false"#)
        ),
        "parallel_tool_calls"
    );
    assert_eq!(
        refused(
            Wire::OpenAiChat,
            Wire::AnthropicMessages,
            r#"{"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}}]}]}"#
        ),
        "messages[0].content[0].type"
    );
    assert_eq!(
        refused(
            Wire::AnthropicMessages,
            Wire::OpenAiChat,
            r#"{"model":"m","max_tokens":1,"messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#
        ),
        "tools[0].type"
    );
    assert_eq!(
        refused(
            Wire::AnthropicMessages,
            Wire::Gemini,
            r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#
        ),
        "messages[0].content[0].type"
    );
}

proptest! {
    #[test]
    fn any_cutting_of_a_stream_translates_alike(cuts in proptest::collection::vec(0usize..3000, 0..12)) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        for (client, upstream, input) in [
            (Wire::OpenAiChat, Wire::AnthropicMessages, ANTHROPIC_TOOL_STREAM),
            (Wire::AnthropicMessages, Wire::OpenAiChat, OPENAI_TOOL_STREAM),
            (Wire::AnthropicMessages, Wire::Gemini, GEMINI_TEXT_STREAM),
        ] {
            prop_assert_eq!(
                translate_stream(client, upstream, input, &cuts),
                translate_stream(client, upstream, input, &[])
            );
        }
    }

    #[test]
    fn whatever_an_upstream_sends_the_client_gets_whole_events(
        events in proptest::collection::vec(hostile_event(), 0..12),
        cuts in proptest::collection::vec(0usize..2000, 0..8),
    ) {
        let input: String = events.concat();
        let mut cuts = cuts;
        cuts.sort_unstable();
        for (client, upstream) in [
            (Wire::OpenAiChat, Wire::AnthropicMessages),
            (Wire::OpenAiChat, Wire::Gemini),
            (Wire::AnthropicMessages, Wire::OpenAiChat),
            (Wire::AnthropicMessages, Wire::Gemini),
        ] {
            let text = translate_stream(client, upstream, &input, &cuts);
            prop_assert!(text.is_empty() || text.ends_with("\n\n"));
            for event in text.split("\n\n").filter(|e| !e.is_empty()) {
                let data = event.lines().find_map(|l| l.strip_prefix("data: "));
                prop_assert!(data.is_some_and(|d| d == "[DONE]" || serde_json::from_str::<Value>(d).is_ok()), "{}", event);
            }
        }
    }

    #[test]
    fn openai_to_anthropic_and_back_keeps_every_translatable_field(request in openai_request()) {
        let Value::Object(object) = request.clone() else { unreachable!() };
        let anthropic = anthropic::request_from_openai(object, "m").unwrap();
        let Value::Object(anthropic) = anthropic else { unreachable!() };
        let back = anthropic::request_to_openai(anthropic).unwrap();
        prop_assert_eq!(Value::Object(back), request);
    }
}

/// An SSE event an upstream might send, well-formed or not.
fn hostile_event() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just(r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":1}}}"#.to_string()),
        Just(r#"{"type":"content_block_start","index":3,"content_block":{"type":"tool_use","id":"t","name":"f"}}"#.to_string()),
        Just(r#"{"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{\"a"}}"#.to_string()),
        Just(r#"{"type":"content_block_delta","index":99999999999,"delta":{"type":"text_delta","text":"x"}}"#.to_string()),
        Just(r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":"bad"}"#.to_string()),
        Just(r#"{"type":"message_stop"}"#.to_string()),
        Just(r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#.to_string()),
        Just(r#"{"choices":[{"index":0,"delta":{"content":"hi","tool_calls":[{"index":70000,"id":"c","function":{"name":"f","arguments":"{"}}]},"finish_reason":null}]}"#.to_string()),
        Just(r#"{"choices":[{"delta":{"reasoning_content":"hm"},"finish_reason":"length"}],"usage":{"prompt_tokens":-1}}"#.to_string()),
        Just(r#"{"candidates":[{"content":{"parts":[{"text":"a","thought":true},{"functionCall":{"name":7}}]},"finishReason":"SAFETY"}]}"#.to_string()),
        Just(r#"{"error":{"code":503,"message":"down"}}"#.to_string()),
        Just("[DONE]".to_string()),
        "[ -~]{0,40}",
    ];
    (
        piece,
        prop_oneof![Just("data: "), Just("data:"), Just("event: x\ndata: ")],
        prop_oneof![Just("\n\n"), Just("\r\n\r\n"), Just("\n")],
    )
        .prop_map(|(data, prefix, end)| format!("{prefix}{data}{end}"))
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ,.!?]{1,20}"
}

/// A tool call and the result that answers it.
fn tool_turn() -> impl Strategy<Value = Vec<Value>> {
    (
        proptest::option::of(text()),
        proptest::collection::vec((text(), text()), 1..3),
    )
        .prop_map(|(said, calls)| {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, arg))| {
                    json!({"id": format!("call_{i}"), "type": "function",
                    "function": {"name": name, "arguments": json!({"a": arg, "n": i}).to_string()}})
                })
                .collect();
            let mut turn = vec![json!({"role": "assistant", "content": said, "tool_calls": calls})];
            for (i, call) in calls.iter().enumerate() {
                turn.push(json!({"role": "tool", "tool_call_id": format!("call_{i}"),
                "content": call["function"]["name"]}));
            }
            turn
        })
}

fn user_turn() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(|t| json!({"role": "user", "content": t})),
        (
            text(),
            prop_oneof![
                Just("https://example.com/a.png".to_string()),
                Just("data:image/jpeg;base64,/9j/4AAQ".to_string()),
            ]
        )
            .prop_map(|(t, url)| json!({"role": "user", "content": [
                {"type": "text", "text": t}, {"type": "image_url", "image_url": {"url": url}}]})),
    ]
}

fn openai_request() -> impl Strategy<Value = Value> {
    let turns = proptest::collection::vec(
        (
            user_turn(),
            prop_oneof![
                text().prop_map(|t| vec![json!({"role": "assistant", "content": t})]),
                tool_turn(),
            ],
        ),
        1..4,
    );
    (
        proptest::option::of(text()),
        turns,
        1u64..100_000,
        proptest::option::of(0.0f64..2.0),
        proptest::option::of(0.0f64..1.0),
        proptest::option::of(proptest::collection::vec(text(), 1..3)),
        proptest::option::of(any::<bool>()),
        proptest::option::of(text()),
        proptest::option::of(proptest::collection::vec(text(), 1..3)),
        proptest::option::of(0usize..4),
    )
        .prop_map(|(system, turns, max_tokens, temperature, top_p, stop, stream, user, tools, choice)| {
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(json!({"role": "system", "content": system}));
            }
            let last = turns.len() - 1;
            for (i, (user, reply)) in turns.into_iter().enumerate() {
                messages.push(user);
                // Turns alternate (Anthropic joins two user messages in a row, as the
                // model reads them anyway); the last one is the user's.
                if i < last {
                    messages.extend(reply);
                }
            }
            let mut request = Map::new();
            request.insert("model".into(), json!("m"));
            request.insert("messages".into(), Value::Array(messages));
            request.insert("max_tokens".into(), json!(max_tokens));
            let mut put = |key: &str, value: Option<Value>| {
                if let Some(value) = value {
                    request.insert(key.into(), value);
                }
            };
            put("temperature", temperature.map(|t| json!(t)));
            put("top_p", top_p.map(|t| json!(t)));
            put("stop", stop.map(|s| json!(s)));
            put("stream", stream.map(Value::Bool));
            put("user", user.map(Value::String));
            if let Some(tools) = &tools {
                put("tools", Some(Value::Array(tools.iter().map(|name| json!({"type": "function",
                    "function": {"name": name, "description": "d", "parameters": {"type": "object"}}})).collect())));
                put("tool_choice", choice.map(|c| match c {
                    0 => json!("auto"),
                    1 => json!("none"),
                    2 => json!("required"),
                    _ => json!({"type": "function", "function": {"name": tools[0]}}),
                }));
            }
            Value::Object(request)
        })
}

// === the typed paths agree with the `Value` paths ===

/// The `Value` path of an OpenAI answer to an Anthropic client, which the typed path
/// must match byte for byte whenever it takes an answer.
fn answer_by_value(body: &[u8]) -> Vec<u8> {
    response_by_value(Wire::AnthropicMessages, Wire::OpenAiChat, body, "alias", 0)
}

/// The pieces path of an OpenAI stream to an Anthropic client (no typed chunks).
fn stream_by_pieces(input: &str) -> String {
    let mut decoder = Decoder::OpenAi;
    let mut encoder = Encoder::Anthropic(anthropic::StreamEncoder::new("alias"));
    let mut pieces = Vec::new();
    let mut out = BytesMut::new();
    for event in input.split_inclusive("\n\n") {
        let data = event_data(event.as_bytes());
        if !data.is_empty() {
            decoder.event(&data, &mut pieces);
        }
        for piece in pieces.drain(..) {
            encoder.piece(piece, &mut out);
        }
    }
    encoder.finish(&mut out);
    String::from_utf8(out.to_vec()).unwrap()
}

/// The benchmark's answer and a documented tool-call answer take the typed path.
#[test]
fn common_answers_take_the_typed_path_and_agree() {
    let plain = br#"{"id":"chatcmpl-mock-1","object":"chat.completion","created":1764547200,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"word0 word1"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;
    let tools = br#"{"id":"chatcmpl-abc","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null,"reasoning_content":"hm","tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"location\": \"Paris\"}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":82,"completion_tokens":17,"total_tokens":99,"prompt_tokens_details":{"cached_tokens":64}}}"#;
    for body in [&plain[..], tools] {
        let typed = anthropic::answer_from_openai_bytes(body, "alias").expect("typed path");
        assert_eq!(
            String::from_utf8(typed).unwrap(),
            String::from_utf8(answer_by_value(body)).unwrap()
        );
    }
    let out: Value = serde_json::from_slice(&response(
        Wire::AnthropicMessages,
        Wire::OpenAiChat,
        tools,
        "alias",
        0,
    ))
    .unwrap();
    assert_eq!(out["content"][1]["input"]["location"], "Paris");
    assert_eq!(out["stop_reason"], "tool_use");
    assert_eq!(out["usage"]["input_tokens"], 18);
}

/// A text chunk after the first is written straight, and as the pieces path writes it.
#[test]
fn text_chunks_take_the_typed_path() {
    let mut encoder = anthropic::StreamEncoder::new("alias");
    let chunk = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"a \"b\"\n"},"finish_reason":null}],"usage":null}"#;
    let mut out = BytesMut::new();
    assert!(
        !encoder.openai_chunk(chunk, &mut out),
        "the first chunk starts the message"
    );
    let input = format!("data: {chunk}\n\ndata: {chunk}\n\ndata: [DONE]\n\n");
    let text = translate_stream(Wire::AnthropicMessages, Wire::OpenAiChat, &input, &[]);
    assert_eq!(text, stream_by_pieces(&input));
    assert!(text.contains(r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a \"b\"\n"}}"#));
}

/// A field's value: absent (`None`), `null`, or one of `values`.
fn field(values: Vec<Value>) -> impl Strategy<Value = Option<Value>> + Clone {
    let mut all = vec![None, Some(Value::Null)];
    all.extend(values.into_iter().map(Some));
    proptest::sample::select(all)
}

fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_string(), value?)))
            .collect(),
    )
}

/// Text fields, well-typed or not.
fn text_field() -> impl Strategy<Value = Option<Value>> + Clone {
    field(vec![
        json!(""),
        json!("hi \"there\"\n\u{e9}"),
        json!(5),
        json!([{"type": "text", "text": "a"}]),
    ])
}

fn usage_field() -> impl Strategy<Value = Option<Value>> + Clone {
    let tokens = || field(vec![json!(12), json!(-1), json!(1.5), json!("5")]);
    (
        tokens(),
        tokens(),
        field(vec![
            json!({"cached_tokens": 4}),
            json!({"cached_tokens": "x"}),
            json!(3),
        ]),
    )
        .prop_map(|(prompt, completion, details)| {
            Some(object(vec![
                ("prompt_tokens", prompt),
                ("completion_tokens", completion),
                ("prompt_tokens_details", details),
            ]))
        })
}

fn finish_field() -> impl Strategy<Value = Option<Value>> + Clone {
    field(vec![
        json!("stop"),
        json!("length"),
        json!("tool_calls"),
        json!(3),
    ])
}

/// An OpenAI answer, usual or odd in any field.
fn openai_answer() -> impl Strategy<Value = String> {
    let call = (
        field(vec![json!("call_1"), json!(5)]),
        field(vec![json!("f"), json!(5)]),
        field(vec![
            json!("{\"a\": [1, 2]}"),
            json!("not json"),
            json!(""),
            json!(5),
        ]),
        any::<bool>(),
    )
        .prop_map(|(id, name, arguments, listed)| {
            let function = object(vec![("name", name), ("arguments", arguments)]);
            let function = if listed { json!([function]) } else { function };
            object(vec![
                ("id", id),
                ("type", Some(json!("function"))),
                ("function", Some(function)),
            ])
        });
    let calls = prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        proptest::collection::vec(call, 1..3).prop_map(|c| Some(Value::Array(c))),
        Just(Some(json!("x"))),
    ];
    let message = (text_field(), text_field(), calls).prop_map(|(content, reasoning, calls)| {
        object(vec![
            ("role", Some(json!("assistant"))),
            ("content", content),
            ("reasoning_content", reasoning),
            ("tool_calls", calls),
        ])
    });
    let choice = (
        prop_oneof![4 => message.prop_map(Some), 1 => Just(Some(json!("x"))), 1 => Just(None)],
        finish_field(),
    )
        .prop_map(|(message, finish)| {
            object(vec![
                ("index", Some(json!(0))),
                ("message", message),
                ("finish_reason", finish),
            ])
        });
    let choices = prop_oneof![
        4 => choice.clone().prop_map(|c| Some(json!([c]))),
        1 => choice.prop_map(|c| Some(json!({"0": c}))),
        1 => Just(Some(json!([]))),
        1 => Just(None),
    ];
    (
        field(vec![json!("chatcmpl-1"), json!(5)]),
        choices,
        prop_oneof![3 => usage_field(), 1 => field(vec![json!([1])])],
        0..8u8,
    )
        .prop_map(|(id, choices, usage, shape)| {
            let answer = object(vec![
                ("id", id),
                ("object", Some(json!("chat.completion"))),
                ("choices", choices),
                ("usage", usage),
            ]);
            match shape {
                0 => json!([answer]).to_string(),
                1 => answer
                    .to_string()
                    .replacen('{', r#"{"id":"a","id":"b","#, 1),
                _ => answer.to_string(),
            }
        })
}

/// An OpenAI stream chunk, usual or odd in any field.
fn openai_chunk() -> impl Strategy<Value = String> {
    let delta = (
        text_field(),
        text_field(),
        field(vec![
            json!([{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}]),
        ]),
    )
        .prop_map(|(content, reasoning, calls)| {
            object(vec![
                ("content", content),
                ("reasoning_content", reasoning),
                ("tool_calls", calls),
            ])
        });
    let choice = (
        prop_oneof![4 => delta.prop_map(Some), 1 => Just(Some(json!("x"))), 1 => Just(None)],
        finish_field(),
    )
        .prop_map(|(delta, finish)| {
            object(vec![
                ("index", Some(json!(0))),
                ("delta", delta),
                ("finish_reason", finish),
            ])
        });
    let choices = prop_oneof![
        6 => choice.clone().prop_map(|c| Some(json!([c]))),
        1 => (choice.clone(), choice.clone()).prop_map(|(a, b)| Some(json!([a, b]))),
        1 => choice.prop_map(|c| Some(json!({"0": c}))),
        1 => Just(Some(json!([5]))),
        1 => Just(None),
    ];
    (
        choices,
        prop_oneof![3 => Just(None), 1 => field(vec![json!({"prompt_tokens": 3}), json!(7)])],
        prop_oneof![6 => Just(None), 1 => field(vec![json!({"message": "m"})])],
        0..8u8,
    )
        .prop_map(|(choices, usage, error, shape)| {
            let chunk = object(vec![
                ("id", Some(json!("c1"))),
                ("object", Some(json!("chat.completion.chunk"))),
                ("choices", choices),
                ("usage", usage),
                ("error", error),
            ]);
            match shape {
                0 => format!("data: [{chunk}]\n\n"),
                1 => "data: [DONE]\n\n".to_string(),
                _ => format!("data: {chunk}\n\n"),
            }
        })
}

proptest! {
    #[test]
    fn the_typed_answer_path_writes_what_the_value_path_writes(body in openai_answer()) {
        if let Some(typed) = anthropic::answer_from_openai_bytes(body.as_bytes(), "alias") {
            prop_assert_eq!(
                String::from_utf8(typed).unwrap(),
                String::from_utf8(answer_by_value(body.as_bytes())).unwrap()
            );
        }
        prop_assert_eq!(
            response(Wire::AnthropicMessages, Wire::OpenAiChat, body.as_bytes(), "alias", 0),
            answer_by_value(body.as_bytes())
        );
    }

    #[test]
    fn the_typed_chunk_path_writes_what_the_pieces_path_writes(
        events in proptest::collection::vec(openai_chunk(), 1..10),
    ) {
        let input: String = events.concat();
        prop_assert_eq!(
            translate_stream(Wire::AnthropicMessages, Wire::OpenAiChat, &input, &[]),
            stream_by_pieces(&input)
        );
    }
}

/// An Anthropic request, usual or odd in any field.
fn anthropic_request() -> impl Strategy<Value = String> {
    let block = (
        prop_oneof![4 => Just(json!("text")), 1 => Just(json!("image")), 1 => Just(json!(5))],
        text_field(),
        any::<bool>(),
    )
        .prop_map(|(kind, text, cached)| {
            let mut block = object(vec![("type", Some(kind)), ("text", text)]);
            if cached {
                block["cache_control"] = json!({"type": "ephemeral"});
            }
            block
        });
    let content = prop_oneof![
        4 => text_field(),
        2 => proptest::collection::vec(block, 0..3).prop_map(|b| Some(Value::Array(b))),
    ];
    let message = (
        field(vec![
            json!("user"),
            json!("assistant"),
            json!("system"),
            json!(1),
        ]),
        content,
    )
        .prop_map(|(role, content)| object(vec![("role", role), ("content", content)]));
    let messages = prop_oneof![
        6 => proptest::collection::vec(message, 0..4).prop_map(|m| Some(Value::Array(m))),
        1 => Just(None),
        1 => Just(Some(json!("x"))),
    ];
    (
        field(vec![json!("claude-x"), json!(5)]),
        text_field(),
        messages,
        field(vec![json!(256), json!("x")]),
        field(vec![json!(0.5)]),
        field(vec![json!(true), json!(false), json!("yes")]),
        field(vec![json!(["END"]), json!("END")]),
        prop_oneof![
            6 => Just(None),
            1 => Just(Some(("metadata", json!({"user_id": "u1"})))),
            1 => Just(Some(("tools", Value::Null))),
            1 => Just(Some(("thinking", json!({"type": "enabled", "budget_tokens": 2048})))),
            1 => Just(Some(("top_k", json!(3)))),
        ],
    )
        .prop_map(
            |(model, system, messages, max, temperature, stream, stop, extra)| {
                let mut request = object(vec![
                    ("model", model),
                    ("system", system),
                    ("messages", messages),
                    ("max_tokens", max),
                    ("temperature", temperature),
                    ("stream", stream),
                    ("stop_sequences", stop),
                ]);
                if let Some((key, value)) = extra {
                    request[key] = value;
                }
                request.to_string()
            },
        )
}

#[test]
fn the_benchmarks_request_takes_the_typed_path() {
    let body = br#"{"model":"claude-x","max_tokens":256,"stream":true,"system":"Be brief.","messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":[{"type":"text","text":"Hello"}]},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b","cache_control":{"type":"ephemeral"}}]}]}"#;
    let typed = anthropic::request_to_openai_bytes(body, "gpt-4o-mini").expect("typed path");
    let by_value = request_by_value(
        Wire::AnthropicMessages,
        Wire::OpenAiChat,
        body,
        "gpt-4o-mini",
    )
    .unwrap();
    assert_eq!(typed.1, by_value.1);
    assert_eq!(
        String::from_utf8(typed.0).unwrap(),
        String::from_utf8(by_value.0).unwrap()
    );
}

proptest! {
    #[test]
    fn the_typed_request_path_writes_what_the_value_path_writes(body in anthropic_request()) {
        let by_value = request_by_value(Wire::AnthropicMessages, Wire::OpenAiChat, body.as_bytes(), "m");
        if let Some(typed) = anthropic::request_to_openai_bytes(body.as_bytes(), "m") {
            let (bytes, stream) = by_value.clone().unwrap();
            prop_assert_eq!(String::from_utf8(typed.0).unwrap(), String::from_utf8(bytes).unwrap());
            prop_assert_eq!(typed.1, stream);
        }
        prop_assert_eq!(
            request(Wire::AnthropicMessages, Wire::OpenAiChat, body.as_bytes(), "m"),
            by_value
        );
    }
}
