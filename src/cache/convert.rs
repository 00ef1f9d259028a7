//! A cached chat completion in the other form: a stream's events folded into one
//! `chat.completion`, or one answer unfolded into `chat.completion.chunk` events ending
//! with `[DONE]`; and a stored stream cut back into its events, so a replay keeps their
//! boundaries. Only plain text answers convert (tool calls do not): those are answered
//! by the upstream instead.

use bytes::Bytes;
use serde_json::{Value, json};

/// The events of a stored SSE body, each with its blank line, in order.
pub fn events(body: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        let end = if body[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else if body[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else {
            None
        };
        match end {
            Some(end) => {
                out.push(body.slice(start..end));
                start = end;
                i = end;
            }
            None => i += 1,
        }
    }
    if start < body.len() {
        out.push(body.slice(start..));
    }
    out
}

/// The JSON of an event's `data:` lines, if it has any that parse.
fn data(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let joined: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&joined).ok()
}

/// Whether an event is the usage-only chunk (no choices, a usage).
pub fn is_usage_chunk(event: &[u8]) -> bool {
    data(event).is_some_and(|v| {
        v.get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && v.get("usage").is_some_and(|u| !u.is_null())
    })
}

/// A streamed chat completion folded into one `chat.completion`; `None` if it is not a
/// plain text answer.
pub fn stream_to_json(body: &Bytes) -> Option<Bytes> {
    let mut head: Option<Value> = None;
    // Per choice index: role, content, finish reason.
    let mut choices: Vec<(String, String, Value)> = Vec::new();
    let mut usage = Value::Null;
    for event in events(body) {
        let Some(chunk) = data(&event) else {
            continue;
        };
        if chunk.get("error").is_some() {
            return None;
        }
        if head.is_none() {
            head = Some(chunk.clone());
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = u.clone();
        }
        for choice in chunk.get("choices").and_then(Value::as_array)? {
            let index = usize::try_from(choice.get("index")?.as_u64()?).ok()?;
            if index >= 128 {
                return None;
            }
            if choices.len() <= index {
                choices.resize(index + 1, ("assistant".into(), String::new(), Value::Null));
            }
            let slot = &mut choices[index];
            let delta = choice.get("delta").cloned().unwrap_or(Value::Null);
            if delta.get("tool_calls").is_some() || delta.get("function_call").is_some() {
                return None;
            }
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                slot.0 = role.to_string();
            }
            if let Some(content) = delta.get("content").and_then(Value::as_str) {
                slot.1.push_str(content);
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                slot.2 = reason.clone();
            }
        }
    }
    let head = head?;
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(index, (role, content, finish))| {
            json!({"index": index, "message": {"role": role, "content": content},
                "logprobs": null, "finish_reason": finish})
        })
        .collect();
    let mut answer = json!({
        "id": head.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": head.get("created").cloned().unwrap_or(Value::Null),
        "model": head.get("model").cloned().unwrap_or(Value::Null),
        "choices": choices,
        "usage": usage,
    });
    if let Some(fingerprint) = head.get("system_fingerprint") {
        answer["system_fingerprint"] = fingerprint.clone();
    }
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

/// One `chat.completion` unfolded into the events of a stream: a chunk with each
/// choice's role and content, one with its finish reason, the usage chunk when asked
/// for, `[DONE]`. `None` if it is not a plain text answer.
pub fn json_to_stream(body: &Bytes, include_usage: bool) -> Option<Vec<Bytes>> {
    let answer: Value = serde_json::from_slice(body).ok()?;
    if answer.get("object").and_then(Value::as_str) != Some("chat.completion") {
        return None;
    }
    let chunk = |choices: Value| {
        let mut chunk = json!({
            "id": answer.get("id").cloned().unwrap_or(Value::Null),
            "object": "chat.completion.chunk",
            "created": answer.get("created").cloned().unwrap_or(Value::Null),
            "model": answer.get("model").cloned().unwrap_or(Value::Null),
            "choices": choices,
        });
        if let Some(fingerprint) = answer.get("system_fingerprint") {
            chunk["system_fingerprint"] = fingerprint.clone();
        }
        event(&chunk)
    };
    let mut out = Vec::new();
    let mut finishes = Vec::new();
    for choice in answer.get("choices").and_then(Value::as_array)? {
        let index = choice.get("index").cloned().unwrap_or(json!(0));
        let message = choice.get("message")?;
        if message.get("tool_calls").is_some_and(|t| !t.is_null())
            || message.get("function_call").is_some_and(|f| !f.is_null())
        {
            return None;
        }
        let role = message.get("role").cloned().unwrap_or(json!("assistant"));
        let content = message.get("content").cloned().unwrap_or(json!(""));
        out.push(chunk(
            json!([{"index": index, "delta": {"role": role, "content": content},
            "logprobs": null, "finish_reason": null}]),
        ));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        finishes
            .push(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}));
    }
    for finish in finishes {
        out.push(chunk(json!([finish])));
    }
    if include_usage {
        let mut usage = chunk(json!([]));
        if let Some(u) = answer.get("usage").filter(|u| !u.is_null()) {
            let mut value = data(&usage)?;
            value["usage"] = u.clone();
            usage = event(&value);
        }
        out.push(usage);
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Some(out)
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn a_stream_is_cut_at_its_event_boundaries() {
        let body = Bytes::from_static(STREAM.as_bytes());
        let events = events(&body);
        assert_eq!(events.len(), 6);
        assert_eq!(events.concat(), STREAM.as_bytes());
        assert!(events.iter().all(|e| e.ends_with(b"\n\n")));
        assert!(is_usage_chunk(&events[4]));
        assert!(!is_usage_chunk(&events[1]));
    }

    #[test]
    fn a_stream_folds_into_one_answer_and_back() {
        let body = Bytes::from_static(STREAM.as_bytes());
        let folded = stream_to_json(&body).unwrap();
        let answer: Value = serde_json::from_slice(&folded).unwrap();
        assert_eq!(answer["id"], "c1");
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        assert_eq!(answer["usage"]["total_tokens"], 5);
        let unfolded = json_to_stream(&folded, true).unwrap();
        assert_eq!(unfolded.last().unwrap().as_ref(), b"data: [DONE]\n\n");
        let again = stream_to_json(&Bytes::from(unfolded.concat())).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&again).unwrap(), answer);
        let without_usage = json_to_stream(&folded, false).unwrap();
        assert!(!without_usage.iter().any(|e| is_usage_chunk(e)));
    }

    #[test]
    fn tool_calls_do_not_convert() {
        let tools = Bytes::from_static(
            br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t"}]},"finish_reason":"tool_calls"}]}"#,
        );
        assert!(json_to_stream(&tools, false).is_none());
        let stream = Bytes::from_static(
            b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[]}}]}\n\n",
        );
        assert!(stream_to_json(&stream).is_none());
    }
}
