//! The mock's Anthropic Messages and Gemini `generateContent` answers, each in its API's
//! own shape: plain and streamed, text written before tool calls, every offered tool
//! called (in parallel when there are several; Anthropic's arguments streamed in pieces),
//! thinking when asked, usage with cached input when the prompt marks a cache point.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::responses::{
    TOOL_ARGUMENT_PIECES, TOOL_ARGUMENTS, piece, prompt_tokens, reply_text, sse, sse_data,
};
use super::{MockState, Plan};
use crate::http::body::{Body, json_response};

/// What a tool-calling answer says before its calls.
const PREAMBLE: &str = "Let me look that up. ";
/// Cached input tokens reported when the prompt has a `cache_control` mark.
const CACHED_TOKENS: u64 = 3;

fn anthropic_tools(body: &Value) -> Vec<String> {
    if body.pointer("/tool_choice/type").and_then(Value::as_str) == Some("none") {
        return Vec::new();
    }
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

fn named_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

/// `POST /v1/messages`.
pub(super) fn messages(state: &Arc<MockState>, plan: &Plan, body: &Value) -> Response<Body> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    let id = format!("msg_mock{}", state.next_id());
    let tools = anthropic_tools(body);
    let thinking = body.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled");
    let cached = if body.to_string().contains("cache_control") {
        CACHED_TOKENS
    } else {
        0
    };
    let input = prompt_tokens(body);
    let output = plan.chunks as u64;
    let stop = if tools.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    let usage = json!({
        "input_tokens": input,
        "output_tokens": if plan.usage { output } else { 0 },
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    });
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let mut content = Vec::new();
        if thinking {
            content
                .push(json!({"type": "thinking", "thinking": "mock thinking", "signature": "sig"}));
        }
        if tools.is_empty() {
            content.push(json!({"type": "text", "text": reply_text(plan.chunks)}));
        } else {
            content.push(json!({"type": "text", "text": PREAMBLE}));
            for (k, name) in tools.iter().enumerate() {
                content.push(json!({"type": "tool_use", "id": format!("toolu_mock_{k}"),
                    "name": name, "input": {"query": "mock"}}));
            }
        }
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage,
            }),
        );
    }
    let mut events = vec![named_event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1,
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0},
        }}),
    )];
    events.push(named_event("ping", &json!({"type": "ping"})));
    let mut index = 0;
    let mut block = |events: &mut Vec<Bytes>, start: Value, deltas: Vec<Value>| {
        events.push(named_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        for delta in deltas {
            events.push(named_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": delta}),
            ));
        }
        events.push(named_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    };
    if thinking {
        block(
            &mut events,
            json!({"type": "thinking", "thinking": "", "signature": ""}),
            vec![
                json!({"type": "thinking_delta", "thinking": "mock thinking"}),
                json!({"type": "signature_delta", "signature": "sig"}),
            ],
        );
    }
    if tools.is_empty() {
        let deltas = (0..plan.chunks)
            .map(|i| json!({"type": "text_delta", "text": piece(i)}))
            .collect();
        block(&mut events, json!({"type": "text", "text": ""}), deltas);
    } else {
        block(
            &mut events,
            json!({"type": "text", "text": ""}),
            vec![json!({"type": "text_delta", "text": PREAMBLE})],
        );
        for (k, name) in tools.iter().enumerate() {
            let deltas = TOOL_ARGUMENT_PIECES
                .iter()
                .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                .collect();
            block(
                &mut events,
                json!({"type": "tool_use", "id": format!("toolu_mock_{k}"), "name": name, "input": {}}),
                deltas,
            );
        }
    }
    events.push(named_event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {"output_tokens": if plan.usage { output } else { 0 }}}),
    ));
    events.push(named_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    sse(state, plan, events)
}

fn gemini_tools(body: &Value) -> Vec<String> {
    if body
        .pointer("/toolConfig/functionCallingConfig/mode")
        .and_then(Value::as_str)
        == Some("NONE")
    {
        return Vec::new();
    }
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("functionDeclarations").and_then(Value::as_array))
        .flatten()
        .filter_map(|f| f.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
pub(super) fn gemini(
    state: &Arc<MockState>,
    plan: &Plan,
    call: &str,
    body: &Value,
) -> Response<Body> {
    let Some((model, method)) = call.split_once(':') else {
        return plan.error(StatusCode::NOT_FOUND, "not_found", "unknown Gemini method");
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return plan.error(StatusCode::NOT_FOUND, "not_found", "unknown Gemini method"),
    };
    let tools = gemini_tools(body);
    let thoughts = body
        .pointer("/generationConfig/thinkingConfig/includeThoughts")
        .and_then(Value::as_bool)
        == Some(true);
    let input = prompt_tokens(body);
    let output = plan.chunks as u64;
    let usage = json!({
        "promptTokenCount": input,
        "candidatesTokenCount": output,
        "totalTokenCount": input + output + u64::from(thoughts) * 2,
        "thoughtsTokenCount": u64::from(thoughts) * 2,
    });
    let id = format!("gemini-mock{}", state.next_id());
    let calls: Vec<Value> = tools
        .iter()
        .map(|name| {
            json!({"functionCall": {"name": name,
                "args": serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap_or_default()}})
        })
        .collect();
    let answer = |parts: Vec<Value>, finish: Option<&str>, usage: Option<&Value>| {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        let mut value = json!({"candidates": [candidate], "modelVersion": model, "responseId": id});
        if let (Some(usage), true) = (usage, plan.usage) {
            value["usageMetadata"] = usage.clone();
        }
        value
    };
    if !stream {
        let mut parts = Vec::new();
        if thoughts {
            parts.push(json!({"text": "mock thinking", "thought": true}));
        }
        if tools.is_empty() {
            parts.push(json!({ "text": reply_text(plan.chunks) }));
        } else {
            parts.push(json!({ "text": PREAMBLE }));
            parts.extend(calls);
        }
        return json_response(StatusCode::OK, &answer(parts, Some("STOP"), Some(&usage)));
    }
    let mut events = Vec::new();
    if thoughts {
        events.push(sse_data(&answer(
            vec![json!({"text": "mock thinking", "thought": true})],
            None,
            None,
        )));
    }
    if tools.is_empty() {
        for i in 0..plan.chunks {
            let last = i + 1 == plan.chunks;
            events.push(sse_data(&answer(
                vec![json!({ "text": piece(i) })],
                last.then_some("STOP"),
                last.then_some(&usage),
            )));
        }
    } else {
        events.push(sse_data(&answer(
            vec![json!({ "text": PREAMBLE })],
            None,
            None,
        )));
        events.push(sse_data(&answer(calls, Some("STOP"), Some(&usage))));
    }
    sse(state, plan, events)
}
