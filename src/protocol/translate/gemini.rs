//! Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`) against the
//! pivot: OpenAI Chat requests as Gemini's, Gemini's answers and stream chunks as OpenAI's.
//!
//! Gemini sends a function call whole in one part and may end with `STOP` while calling
//! functions; such an answer finishes with `tool_calls`, and text written before the calls
//! stays the message's content. Gemini gives function calls no ids: calls get
//! `call_{responseId}_{n}`, and a tool result finds its function's name by the id of the
//! call it answers, earlier in the conversation.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::{
    Piece, Untranslatable, chunk, content_text, data_url, refuse_rest, take, untranslatable,
};

const TARGET: &str = "Gemini's API";

/// Whether a model name can stand in Gemini's path as one segment: letters, digits, `-`,
/// `_`, `.` (not a dot segment), so no client-chosen name climbs out of `models/`.
pub fn valid_model(model: &str) -> bool {
    let model = model.strip_prefix("models/").unwrap_or(model);
    !model.is_empty()
        && model != "."
        && model != ".."
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The upstream path of a `generateContent` call for `model`.
pub fn path(model: &str, stream: bool) -> String {
    let model = model.strip_prefix("models/").unwrap_or(model);
    if stream {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/models/{model}:generateContent")
    }
}

fn thinking_budget(effort: &str) -> Option<u64> {
    match effort {
        "minimal" => Some(0),
        "low" => Some(1024),
        "medium" => Some(8192),
        "high" => Some(24576),
        _ => None,
    }
}

/// An OpenAI Chat request as a Gemini `generateContent` body (the model goes in the path).
pub fn request_from_openai(mut body: Map<String, Value>) -> Result<Value, Untranslatable> {
    let mut out = Map::new();
    body.remove("model");
    body.remove("stream");
    body.remove("stream_options");
    // The end user is sluice's routing key; Gemini has no field for it.
    body.remove("user");
    let messages = take(&mut body, "messages")
        .ok_or_else(|| untranslatable("messages", "a chat request needs messages"))?;
    let (system, contents) = contents_from_openai(&messages)?;
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    out.insert("contents".into(), Value::Array(contents));
    let mut config = Map::new();
    if let Some(max) =
        take(&mut body, "max_completion_tokens").or_else(|| take(&mut body, "max_tokens"))
    {
        config.insert("maxOutputTokens".into(), max);
    }
    body.remove("max_tokens");
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("n", "candidateCount"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(value) = take(&mut body, from) {
            config.insert(to.into(), value);
        }
    }
    if let Some(stop) = take(&mut body, "stop") {
        let stops = match stop {
            Value::String(s) => vec![Value::String(s)],
            Value::Array(items) => items,
            _ => return Err(untranslatable("stop", "must be a string or a list")),
        };
        config.insert("stopSequences".into(), Value::Array(stops));
    }
    if let Some(format) = take(&mut body, "response_format") {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                config.insert("responseMimeType".into(), json!("application/json"));
                if let Some(schema) = format.pointer("/json_schema/schema") {
                    config.insert("responseJsonSchema".into(), schema.clone());
                }
            }
            _ => return Err(untranslatable("response_format.type", "unknown format")),
        }
    }
    if let Some(effort) = take(&mut body, "reasoning_effort") {
        let budget = effort
            .as_str()
            .and_then(thinking_budget)
            .ok_or_else(|| untranslatable("reasoning_effort", "unknown effort"))?;
        config.insert(
            "thinkingConfig".into(),
            json!({"thinkingBudget": budget, "includeThoughts": budget > 0}),
        );
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(tools) = take(&mut body, "tools") {
        out.insert("tools".into(), tools_from_openai(&tools)?);
    }
    if let Some(choice) = take(&mut body, "tool_choice") {
        let config = match &choice {
            Value::String(s) => match s.as_str() {
                "auto" => json!({"mode": "AUTO"}),
                "none" => json!({"mode": "NONE"}),
                "required" => json!({"mode": "ANY"}),
                _ => return Err(untranslatable("tool_choice", "unknown choice")),
            },
            _ => match choice.pointer("/function/name") {
                Some(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
                None => return Err(untranslatable("tool_choice", "names no function")),
            },
        };
        out.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": config }),
        );
    }
    if let Some(parallel) = take(&mut body, "parallel_tool_calls") {
        if parallel.as_bool() == Some(false) {
            return Err(untranslatable(
                "parallel_tool_calls",
                format!("{TARGET} cannot be kept from calling functions in parallel"),
            ));
        }
    }
    refuse_rest(&body, "", TARGET)?;
    Ok(Value::Object(out))
}

fn contents_from_openai(messages: &Value) -> Result<(Vec<Value>, Vec<Value>), Untranslatable> {
    let messages = messages
        .as_array()
        .ok_or_else(|| untranslatable("messages", "must be a list"))?;
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let text = content_text(content);
                if !text.is_empty() {
                    system.push(json!({ "text": text }));
                }
            }
            "user" => push_content(&mut contents, "user", user_parts(content, &at)?),
            "assistant" => {
                let mut parts = Vec::new();
                let text = content_text(content);
                if !text.is_empty() {
                    parts.push(json!({ "text": text }));
                }
                for (j, call) in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let name = call
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if let Some(id) = call.get("id").and_then(Value::as_str) {
                        names.insert(id.to_string(), name.to_string());
                    }
                    let arguments = call
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("{}");
                    let args: Value = if arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(arguments).map_err(|_| {
                            untranslatable(
                                format!("{at}.tool_calls[{j}].function.arguments"),
                                "not JSON",
                            )
                        })?
                    };
                    parts.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                push_content(&mut contents, "model", parts);
            }
            "tool" => {
                let id = message
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let name = names.get(id).cloned().ok_or_else(|| {
                    untranslatable(
                        format!("{at}.tool_call_id"),
                        "answers no tool call earlier in the conversation",
                    )
                })?;
                let text = content_text(content);
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(object)) => Value::Object(object),
                    _ => json!({ "result": text }),
                };
                push_content(
                    &mut contents,
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
            other => {
                return Err(untranslatable(
                    format!("{at}.role"),
                    format!("the role `{other}` has no equivalent in {TARGET}"),
                ));
            }
        }
    }
    Ok((system, contents))
}

fn push_content(contents: &mut Vec<Value>, role: &str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut() {
        if last["role"] == role {
            if let Some(existing) = last["parts"].as_array_mut() {
                existing.extend(parts);
                return;
            }
        }
    }
    contents.push(json!({"role": role, "parts": parts}));
}

fn user_parts(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Value::String(text) => Ok(vec![json!({ "text": text })]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| match part.get("type").and_then(Value::as_str) {
                Some("text") => Ok(json!({"text": part.get("text")})),
                Some("image_url") => {
                    let url = part
                        .pointer("/image_url/url")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    Ok(match data_url(url) {
                        Some((media, data)) => {
                            json!({"inlineData": {"mimeType": media, "data": data}})
                        }
                        None => json!({"fileData": {"mimeType": image_type(url), "fileUri": url}}),
                    })
                }
                other => Err(untranslatable(
                    format!("{at}.content[{j}].type"),
                    format!(
                        "the part `{}` has no equivalent in {TARGET}",
                        other.unwrap_or("?")
                    ),
                )),
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(untranslatable(
            format!("{at}.content"),
            "must be a string or a list",
        )),
    }
}

/// An image's media type guessed from its URL (Gemini wants one for a file URI).
fn image_type(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if path.ends_with(".png") {
        "image/png"
    } else if path.ends_with(".webp") {
        "image/webp"
    } else if path.ends_with(".gif") {
        "image/gif"
    } else {
        "image/jpeg"
    }
}

fn tools_from_openai(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools
        .as_array()
        .ok_or_else(|| untranslatable("tools", "must be a list"))?;
    let declarations = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(untranslatable(
                    format!("tools[{i}].type"),
                    format!("only function tools translate to {TARGET}"),
                ));
            }
            let function = tool.get("function").unwrap_or(&Value::Null);
            let mut out = json!({"name": function.get("name")});
            if let Some(description) = function.get("description") {
                out["description"] = description.clone();
            }
            if let Some(parameters) = function.get("parameters") {
                out["parametersJsonSchema"] = parameters.clone();
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!([{ "functionDeclarations": declarations }]))
}

// === answers ===

/// An id for a function call, which Gemini does not give: unique across the conversation
/// when the answer has an id (clients such as Claude Code key tool calls by id), else by
/// its place in the answer.
fn call_id(response: Option<&str>, index: usize) -> String {
    match response {
        Some(response) => format!("call_{response}_{index}"),
        None => format!("call_{index}"),
    }
}

fn finish_reason(reason: Option<&str>, called: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY",
        ) => "content_filter",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

fn usage_to_openai(usage: &Value) -> Value {
    let n = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
    let prompt = n("promptTokenCount");
    let thoughts = n("thoughtsTokenCount");
    let completion = n("candidatesTokenCount") + thoughts;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.get("totalTokenCount").and_then(Value::as_u64).unwrap_or(prompt + completion),
        "prompt_tokens_details": {"cached_tokens": n("cachedContentTokenCount")},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    })
}

/// A part's role in an OpenAI message.
enum Part<'a> {
    Text(&'a str),
    Thought(&'a str),
    Call { name: &'a Value, args: String },
}

fn part(value: &Value) -> Option<Part<'_>> {
    if let Some(call) = value.get("functionCall") {
        return Some(Part::Call {
            name: call.get("name").unwrap_or(&Value::Null),
            args: call.get("args").unwrap_or(&json!({})).to_string(),
        });
    }
    let text = value.get("text").and_then(Value::as_str)?;
    if value.get("thought").and_then(Value::as_bool) == Some(true) {
        Some(Part::Thought(text))
    } else {
        Some(Part::Text(text))
    }
}

/// A Gemini answer as an OpenAI chat completion.
pub fn response_to_openai(value: &Value, created: i64) -> Value {
    let mut calls_made = 0;
    let choices: Vec<Value> = value
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, candidate)| {
            let mut text = String::new();
            let mut thought = String::new();
            let mut calls = Vec::new();
            for p in candidate
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(part)
            {
                match p {
                    Part::Text(t) => text.push_str(t),
                    Part::Thought(t) => thought.push_str(t),
                    Part::Call { name, args } => {
                        calls.push(json!({
                            "id": call_id(value.get("responseId").and_then(Value::as_str), calls_made),
                            "type": "function",
                            "function": {"name": name, "arguments": args},
                        }));
                        calls_made += 1;
                    }
                }
            }
            let called = !calls.is_empty();
            let mut message = json!({
                "role": "assistant",
                "content": if text.is_empty() && called { Value::Null } else { Value::String(text) },
            });
            if called {
                message["tool_calls"] = Value::Array(calls);
            }
            if !thought.is_empty() {
                message["reasoning_content"] = Value::String(thought);
            }
            json!({
                "index": candidate.get("index").and_then(Value::as_u64).unwrap_or(i as u64),
                "message": message,
                "finish_reason": finish_reason(candidate.get("finishReason").and_then(Value::as_str), called),
            })
        })
        .collect();
    let choices = if choices.is_empty() {
        // A prompt blocked before any candidate.
        vec![json!({
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "finish_reason": "content_filter",
        })]
    } else {
        choices
    };
    json!({
        "id": value.get("responseId").cloned().unwrap_or_else(|| json!("gemini")),
        "object": "chat.completion",
        "created": created,
        "model": value.get("modelVersion"),
        "choices": choices,
        "usage": usage_to_openai(value.get("usageMetadata").unwrap_or(&Value::Null)),
    })
}

/// Gemini's stream chunks (each a partial answer) as pivot chunks. The stream has no end
/// marker: the finishing chunk and the usage are sent when the body ends.
#[derive(Debug)]
pub struct StreamDecoder {
    created: i64,
    id: String,
    model: String,
    started: bool,
    calls: usize,
    finish: Option<String>,
    usage: Value,
    ended: bool,
}

impl StreamDecoder {
    pub fn new(created: i64) -> Self {
        Self {
            created,
            id: String::new(),
            model: String::new(),
            started: false,
            calls: 0,
            finish: None,
            usage: Value::Null,
            ended: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Piece {
        Piece::Chunk(chunk(&self.id, &self.model, self.created, delta, finish))
    }

    pub fn event(&mut self, data: &str, out: &mut Vec<Piece>) {
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(error) = value.get("error") {
            self.ended = true;
            out.push(Piece::Error {
                status: error
                    .get("code")
                    .and_then(Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500),
                message: error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream error")
                    .to_string(),
            });
            return;
        }
        if !self.started {
            self.started = true;
            self.id = value
                .get("responseId")
                .and_then(Value::as_str)
                .unwrap_or("gemini")
                .to_string();
            self.model = value
                .get("modelVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        }
        if let Some(usage) = value.get("usageMetadata") {
            self.usage = usage.clone();
        }
        let Some(candidate) = value.pointer("/candidates/0") else {
            if value.pointer("/promptFeedback/blockReason").is_some() {
                self.finish = Some("content_filter".into());
            }
            return;
        };
        for p in candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(part)
        {
            let delta = match p {
                Part::Text("") | Part::Thought("") => continue,
                Part::Text(t) => json!({ "content": t }),
                Part::Thought(t) => json!({ "reasoning_content": t }),
                Part::Call { name, args } => {
                    let index = self.calls;
                    self.calls += 1;
                    json!({"tool_calls": [{
                        "index": index,
                        "id": call_id(Some(&self.id).filter(|id| id.as_str() != "gemini").map(String::as_str), index),
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }]})
                }
            };
            out.push(self.chunk(delta, Value::Null));
        }
        if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
            self.finish = Some(finish_reason(Some(reason), self.calls > 0).to_string());
        }
    }

    /// The body ended: the finishing chunk, the usage, the end.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        if self.ended || !self.started {
            return;
        }
        self.ended = true;
        let finish = match self.finish.as_deref() {
            Some("stop") | None if self.calls > 0 => "tool_calls",
            Some(reason) => reason,
            None => "stop",
        }
        .to_string();
        out.push(self.chunk(json!({}), json!(finish)));
        out.push(Piece::Chunk(json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [], "usage": usage_to_openai(&self.usage),
        })));
        out.push(Piece::Done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_stay_one_path_segment() {
        assert!(valid_model("gemini-2.5-flash"));
        assert!(valid_model("models/gemini-1.5-pro-002"));
        for bad in [
            "",
            "..",
            "a/../../x",
            "x?alt=json",
            "x#y",
            "x%2F",
            "a b",
            "x:streamGenerateContent",
        ] {
            assert!(!valid_model(bad), "{bad}");
        }
        assert_eq!(
            path("models/gemini-x", true),
            "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
        );
    }
}
