//! The mock's canned answers, endpoint by endpoint, shaped like OpenAI's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::stream;
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};

use super::{DropConnection, Fault, MockState, Plan, StoredFile, bytes_response, error, native};
use crate::http::body::{Body, BoxError, json_response};
use crate::http::multipart;

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The words of a reply: a streamed reply sends one per chunk, a plain one all of them.
pub(super) fn piece(i: usize) -> String {
    format!("word{i} ")
}

pub(super) fn reply_text(chunks: usize) -> String {
    (0..chunks).map(piece).collect()
}

/// A rough prompt size, so usage numbers move with the input.
pub(super) fn prompt_tokens(body: &Value) -> u64 {
    let text = body
        .get("messages")
        .or_else(|| body.get("contents"))
        .or_else(|| body.get("prompt"))
        .or_else(|| body.get("input"));
    text.map_or(1, |v| (v.to_string().len() as u64 / 4).max(1))
}

pub(super) fn route(
    state: &Arc<MockState>,
    plan: &Plan,
    parts: &Parts,
    body: Bytes,
) -> Response<Body> {
    let path = parts.uri.path();
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let method = &parts.method;
    if let Some(call) = path.strip_prefix("/v1beta/models/") {
        return native::gemini(state, plan, call, &json_body);
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let tail = path.rsplit_once("/v1").map_or(path, |(_, rest)| rest);
    let segments: Vec<&str> = tail.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["chat", "completions"]) => chat(state, plan, &json_body),
        (&Method::POST, ["messages"]) => native::messages(state, plan, &json_body),
        (&Method::POST, ["messages", "count_tokens"]) => json_response(
            StatusCode::OK,
            &json!({"input_tokens": prompt_tokens(&json_body)}),
        ),
        (&Method::POST, ["completions"]) => completion(state, plan, &json_body),
        (&Method::POST, ["embeddings"]) => embeddings(&json_body),
        (&Method::POST, ["responses"]) => responses(state, plan, &json_body),
        (&Method::POST, ["moderations"]) => moderations(&json_body),
        (&Method::POST, ["images", "generations"]) => images(&json_body),
        (&Method::POST, ["audio", "speech"]) => speech(),
        (&Method::POST, ["audio", "transcriptions" | "translations"]) => {
            transcription(content_type, &body)
        }
        (&Method::GET, ["models"]) => models(plan, state),
        (&Method::GET, ["models", id]) => {
            json_response(StatusCode::OK, &model_object(id, &plan.name))
        }
        (&Method::POST, ["files"]) => upload(state, content_type, &body),
        (&Method::GET, ["files"]) => list_files(state),
        (&Method::GET, ["files", id]) => file_object(state, id),
        (&Method::DELETE, ["files", id]) => delete_file(state, id),
        (&Method::GET, ["files", id, "content"]) => file_content(state, id),
        (&Method::POST, ["batches"]) => create_batch(state, &json_body),
        (&Method::GET, ["batches"]) => list_batches(state),
        (&Method::GET, ["batches", id]) => batch(state, id, false),
        (&Method::POST, ["batches", id, "cancel"]) => batch(state, id, true),
        _ => json_response(
            StatusCode::OK,
            &json!({
                "object": "mock.echo",
                "method": method.as_str(),
                "path": path,
                "query": parts.uri.query(),
                "body": json_body,
            }),
        ),
    }
}

fn model_object(id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": owner})
}

fn models(plan: &Plan, state: &MockState) -> Response<Body> {
    let names = state.options().models;
    let data: Vec<Value> = names.iter().map(|m| model_object(m, &plan.name)).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn model_of(body: &Value) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string()
}

/// The functions a request offers, when it wants tool calls: the mock calls every one
/// (in parallel when there are several, up to four), or only the first when the request
/// says `parallel_tool_calls: false`.
fn wanted_tools(body: &Value) -> Vec<String> {
    if body.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return Vec::new();
    }
    let parallel = body.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
    body.get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .take(if parallel { 4 } else { 1 })
        .map(str::to_string)
        .collect()
}

pub(super) const TOOL_ARGUMENTS: &str = r#"{"query":"mock"}"#;
/// `TOOL_ARGUMENTS` in the two pieces a stream sends it in.
pub(super) const TOOL_ARGUMENT_PIECES: [&str; 2] = [r#"{"query":"#, r#""mock"}"#];

fn chat(state: &Arc<MockState>, plan: &Plan, body: &Value) -> Response<Body> {
    let model = model_of(body);
    let n = body
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 16) as usize;
    let id = format!("chatcmpl-mock{}", state.next_id());
    let created = now();
    let tools = wanted_tools(body);
    let tool = tools.first().cloned();
    let prompt = prompt_tokens(body);
    let completion = plan.chunks as u64 * n as u64;
    let usage = if plan.usage {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    } else {
        Value::Null
    };

    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = plan.usage
            && body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
        let chunk = |choices: Value, usage: Value| {
            let mut object = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_mock", "choices": choices,
            });
            if include_usage {
                object["usage"] = usage;
            }
            sse_data(&object)
        };
        let mut events = Vec::with_capacity(plan.chunks + 4);
        for index in 0..n {
            let delta = match &tool {
                Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [{
                    "index": 0, "id": format!("call_mock_{index}"), "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None => json!({"role": "assistant", "content": ""}),
            };
            events.push(chunk(
                json!([{"index": index, "delta": delta, "finish_reason": null, "logprobs": null}]),
                Value::Null,
            ));
        }
        match &tool {
            Some(_) => {
                for index in 0..n {
                    for (k, name) in tools.iter().enumerate() {
                        if k > 0 {
                            let delta = json!({"tool_calls": [{"index": k,
                                "id": format!("call_mock_{index}_{k}"), "type": "function",
                                "function": {"name": name, "arguments": ""}}]});
                            events.push(chunk(
                                json!([{"index": index, "delta": delta, "finish_reason": null}]),
                                Value::Null,
                            ));
                        }
                        for piece in TOOL_ARGUMENT_PIECES {
                            let delta = json!({"tool_calls": [{"index": k, "function": {"arguments": piece}}]});
                            events.push(chunk(
                                json!([{"index": index, "delta": delta, "finish_reason": null}]),
                                Value::Null,
                            ));
                        }
                    }
                }
            }
            None => {
                for i in 0..plan.chunks {
                    for index in 0..n {
                        let delta = json!({"content": piece(i)});
                        events.push(chunk(
                            json!([{"index": index, "delta": delta, "finish_reason": null}]),
                            Value::Null,
                        ));
                    }
                }
            }
        }
        let finish = if tool.is_some() { "tool_calls" } else { "stop" };
        for index in 0..n {
            events.push(chunk(
                json!([{"index": index, "delta": {}, "finish_reason": finish}]),
                Value::Null,
            ));
        }
        if include_usage {
            events.push(chunk(json!([]), usage));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        return sse(state, plan, events);
    }

    let choices: Vec<Value> = (0..n)
        .map(|index| {
            let message = match &tool {
                Some(_) => {
                    let calls: Vec<Value> = tools
                        .iter()
                        .enumerate()
                        .map(|(k, name)| {
                            let id = if k == 0 {
                                format!("call_mock_{index}")
                            } else {
                                format!("call_mock_{index}_{k}")
                            };
                            json!({"id": id, "type": "function",
                                "function": {"name": name, "arguments": TOOL_ARGUMENTS}})
                        })
                        .collect();
                    json!({"role": "assistant", "content": null, "tool_calls": calls})
                }
                None => json!({"role": "assistant", "content": reply_text(plan.chunks)}),
            };
            let finish = if tool.is_some() { "tool_calls" } else { "stop" };
            json!({"index": index, "message": message, "finish_reason": finish, "logprobs": null})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "fp_mock", "choices": choices, "usage": usage,
        }),
    )
}

fn completion(state: &Arc<MockState>, plan: &Plan, body: &Value) -> Response<Body> {
    let model = model_of(body);
    let id = format!("cmpl-mock{}", state.next_id());
    let created = now();
    let prompt = prompt_tokens(body);
    let usage = if plan.usage {
        json!({"prompt_tokens": prompt, "completion_tokens": plan.chunks, "total_tokens": prompt + plan.chunks as u64})
    } else {
        Value::Null
    };
    let include_usage = plan.usage
        && body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut events: Vec<Bytes> = (0..plan.chunks)
            .map(|i| {
                sse_data(&json!({"id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": piece(i), "index": 0, "logprobs": null, "finish_reason": null}]}))
            })
            .collect();
        events.push(sse_data(
            &json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}]}),
        ));
        if include_usage {
            events.push(sse_data(
                &json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [], "usage": usage}),
            ));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        return sse(state, plan, events);
    }
    json_response(
        StatusCode::OK,
        &json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": reply_text(plan.chunks), "index": 0, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage}),
    )
}

fn embeddings(body: &Value) -> Response<Body> {
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "input is required",
            );
        }
    };
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 4096) as usize;
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let seed = text
                .bytes()
                .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            let vector: Vec<f32> = (0..dimensions)
                .map(|d| {
                    ((seed.wrapping_add((d as u32).wrapping_mul(2_654_435_761)) % 2000) as f32
                        / 1000.0)
                        - 1.0
                })
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|t| (t.len() as u64 / 4).max(1)).sum();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model_of(body),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

fn responses(state: &Arc<MockState>, plan: &Plan, body: &Value) -> Response<Body> {
    let model = model_of(body);
    let id = format!("resp_mock{}", state.next_id());
    let item_id = format!("msg_mock{}", state.next_id());
    let created = now();
    let input = prompt_tokens(body);
    let text = reply_text(plan.chunks);
    let usage = json!({"input_tokens": input, "output_tokens": plan.chunks, "total_tokens": input + plan.chunks as u64,
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let item = |status: &str, content: Value| json!({"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": usage, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
            "error": null, "incomplete_details": null, "instructions": null, "metadata": {}, "temperature": 1.0,
            "top_p": 1.0, "text": {"format": {"type": "text"}}})
    };
    let done = response(
        "completed",
        json!([item("completed", json!([part(&text)]))]),
        usage,
    );
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(StatusCode::OK, &done);
    }
    let mut sequence = 0u64;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    };
    let mut events = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.in_progress",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": item("in_progress", json!([]))}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part("")}),
        ),
    ];
    for i in 0..plan.chunks {
        events.push(event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece(i), "logprobs": []}),
        ));
    }
    events.push(event(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    ));
    events.push(event(
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part(&text)}),
    ));
    events.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": item("completed", json!([part(&text)]))}),
    ));
    events.push(event("response.completed", json!({"response": done})));
    sse(state, plan, events)
}

fn moderations(body: &Value) -> Response<Body> {
    let categories = ["harassment", "hate", "self-harm", "sexual", "violence"];
    let flags: serde_json::Map<String, Value> = categories
        .iter()
        .map(|c| (c.to_string(), json!(false)))
        .collect();
    let scores: serde_json::Map<String, Value> = categories
        .iter()
        .map(|c| (c.to_string(), json!(0.001)))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"id": "modr-mock", "model": body.get("model").and_then(Value::as_str).unwrap_or("omni-moderation-latest"),
            "results": [{"flagged": false, "categories": flags, "category_scores": scores}]}),
    )
}

/// A 1×1 transparent PNG.
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn images(body: &Value) -> Response<Body> {
    let n = body
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let b64 = body.get("response_format").and_then(Value::as_str) == Some("b64_json");
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if b64 {
                json!({"b64_json": PNG_1X1, "revised_prompt": prompt})
            } else {
                json!({"url": format!("https://images.mock.invalid/{i}.png"), "revised_prompt": prompt})
            }
        })
        .collect();
    json_response(StatusCode::OK, &json!({"created": now(), "data": data}))
}

/// Bytes shaped like an MP3 file: an ID3 header, then a deterministic pattern with every
/// byte value, so a test can tell a corrupted binary relay from a faithful one.
pub fn speech_bytes() -> Vec<u8> {
    let mut bytes = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    bytes.extend((0..32 * 1024).map(|i: u32| (i.wrapping_mul(7) % 256) as u8));
    bytes
}

fn speech() -> Response<Body> {
    bytes_response("audio/mpeg", speech_bytes())
}

fn transcription(content_type: &str, body: &Bytes) -> Response<Body> {
    let Some(Ok(boundary)) = multipart::boundary(content_type) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected multipart/form-data",
        );
    };
    let Ok(parts) = multipart::parts(body, boundary) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the form is malformed",
        );
    };
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the file part is missing",
        );
    };
    let field = |name: &str| {
        parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
    };
    let text = format!(
        "mock transcription of {} ({} bytes)",
        file.filename.as_deref().unwrap_or("audio"),
        file.data.len()
    );
    match field("response_format").as_deref() {
        Some("text") => bytes_response("text/plain; charset=utf-8", text),
        _ => json_response(StatusCode::OK, &json!({"text": text})),
    }
}

fn upload(state: &MockState, content_type: &str, body: &Bytes) -> Response<Body> {
    let Some(Ok(boundary)) = multipart::boundary(content_type) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected multipart/form-data",
        );
    };
    let Ok(parts) = multipart::parts(body, boundary) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the form is malformed",
        );
    };
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the file part is missing",
        );
    };
    let purpose = parts.iter().find(|p| p.name == "purpose").map_or_else(
        || "assistants".to_string(),
        |p| String::from_utf8_lossy(&p.data).into_owned(),
    );
    let id = format!("file-mock{}", state.next_id());
    let object = json!({"id": id, "object": "file", "bytes": file.data.len(), "created_at": now(),
        "filename": file.filename.clone().unwrap_or_else(|| "upload".into()), "purpose": purpose, "status": "processed"});
    if let Ok(mut files) = state.files.lock() {
        files.insert(
            id,
            StoredFile {
                object: object.clone(),
                content: file.data.clone(),
            },
        );
    }
    json_response(StatusCode::OK, &object)
}

fn list_files(state: &MockState) -> Response<Body> {
    let data: Vec<Value> = state
        .files
        .lock()
        .map(|f| f.values().map(|s| s.object.clone()).collect())
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "has_more": false}),
    )
}

fn stored(state: &MockState, id: &str) -> Option<StoredFile> {
    state.files.lock().ok()?.get(id).cloned()
}

fn no_such(kind: &str, id: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("No such {kind}: {id}"),
    )
}

fn file_object(state: &MockState, id: &str) -> Response<Body> {
    match stored(state, id) {
        Some(file) => json_response(StatusCode::OK, &file.object),
        None => no_such("File", id),
    }
}

fn delete_file(state: &MockState, id: &str) -> Response<Body> {
    let removed = state.files.lock().ok().and_then(|mut f| f.remove(id));
    match removed {
        Some(_) => json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "file", "deleted": true}),
        ),
        None => no_such("File", id),
    }
}

fn file_content(state: &MockState, id: &str) -> Response<Body> {
    match stored(state, id) {
        Some(file) => bytes_response("application/octet-stream", file.content),
        None => no_such("File", id),
    }
}

fn create_batch(state: &MockState, body: &Value) -> Response<Body> {
    let id = format!("batch_mock{}", state.next_id());
    let batch = json!({"id": id, "object": "batch", "endpoint": body.get("endpoint"),
        "input_file_id": body.get("input_file_id"), "completion_window": body.get("completion_window"),
        "status": "validating", "created_at": now(), "metadata": body.get("metadata"),
        "request_counts": {"total": 0, "completed": 0, "failed": 0}});
    if let Ok(mut batches) = state.batches.lock() {
        batches.insert(id, batch.clone());
    }
    json_response(StatusCode::OK, &batch)
}

fn list_batches(state: &MockState) -> Response<Body> {
    let data: Vec<Value> = state
        .batches
        .lock()
        .map(|b| b.values().cloned().collect())
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "has_more": false}),
    )
}

fn batch(state: &MockState, id: &str, cancel: bool) -> Response<Body> {
    let Ok(mut batches) = state.batches.lock() else {
        return no_such("batch", id);
    };
    match batches.get_mut(id) {
        Some(batch) => {
            if cancel {
                batch["status"] = json!("cancelling");
            }
            json_response(StatusCode::OK, batch)
        }
        None => no_such("batch", id),
    }
}

pub(super) fn sse_data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Counts a stream as cancelled if it is dropped before its last event.
struct StreamGuard {
    state: Arc<MockState>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.state.streams_finished
        } else {
            &self.state.streams_cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// A `text/event-stream` response sending `events` one frame each, `plan.interval` apart.
pub(super) fn sse(state: &Arc<MockState>, plan: &Plan, events: Vec<Bytes>) -> Response<Body> {
    state.streams_started.fetch_add(1, Ordering::SeqCst);
    let guard = StreamGuard {
        state: state.clone(),
        finished: false,
    };
    let total = events.len();
    let interval = plan.interval;
    let fault = plan.fault;
    let frames = stream::unfold(
        (events.into_iter().enumerate(), guard),
        move |(mut events, mut guard)| async move {
            let Some((i, event)) = events.next() else {
                guard.finished = true;
                drop(guard);
                return None;
            };
            if i > 0 {
                match fault {
                    Some(Fault::Stall) => std::future::pending::<()>().await,
                    Some(Fault::Cut) if i >= total / 2 => {
                        let error: BoxError = Box::new(DropConnection);
                        return Some((Err(error), (events, guard)));
                    }
                    _ => {}
                }
                if interval > Duration::ZERO {
                    tokio::time::sleep(interval).await;
                }
            }
            Some((Ok(Frame::data(event)), (events, guard)))
        },
    );
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
