//! Anthropic's Messages API against the pivot (OpenAI Chat Completions): requests both
//! ways, answers both ways, and the two stream state machines (Anthropic events → pivot
//! chunks, pivot chunks → Anthropic events).
//!
//! Prompt-caching hints (`cache_control`) and earlier turns' thinking blocks have no
//! OpenAI equivalent and are left out (they change cost, never the answer); everything
//! else without one is refused by name.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    Obj, Piece, Untranslatable, chunk, content_text, data_url, present, refuse_rest, take,
    untranslatable,
};

const TARGET: &str = "Anthropic's Messages API";
const PIVOT: &str = "OpenAI's Chat Completions API";
/// `max_tokens` is required by Anthropic; an OpenAI request may leave it out.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Thinking budgets for OpenAI's reasoning efforts, and back.
fn budget_for_effort(effort: &str) -> Option<u64> {
    match effort {
        "minimal" | "low" => Some(1024),
        "medium" => Some(4096),
        "high" => Some(16384),
        _ => None,
    }
}

fn effort_for_budget(budget: u64) -> &'static str {
    match budget {
        0..=2048 => "low",
        2049..=8192 => "medium",
        _ => "high",
    }
}

// === requests ===

/// An OpenAI Chat request as an Anthropic Messages request for `model`.
pub fn request_from_openai(
    mut body: Map<String, Value>,
    model: &str,
) -> Result<Value, Untranslatable> {
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.to_string()));
    body.remove("model");
    let messages = take(&mut body, "messages")
        .ok_or_else(|| untranslatable("messages", "a chat request needs messages"))?;
    let (system, messages) = messages_from_openai(&messages)?;
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    let max_tokens =
        match take(&mut body, "max_completion_tokens").or_else(|| take(&mut body, "max_tokens")) {
            Some(value) => value
                .as_u64()
                .ok_or_else(|| untranslatable("max_tokens", "must be a positive integer"))?,
            None => DEFAULT_MAX_TOKENS,
        };
    body.remove("max_tokens");
    let mut max_tokens = max_tokens;
    for key in ["temperature", "top_p"] {
        if let Some(value) = take(&mut body, key) {
            out.insert(key.into(), value);
        }
    }
    if let Some(stop) = take(&mut body, "stop") {
        let stops = match stop {
            Value::String(s) => vec![Value::String(s)],
            Value::Array(items) => items,
            _ => return Err(untranslatable("stop", "must be a string or a list")),
        };
        out.insert("stop_sequences".into(), Value::Array(stops));
    }
    if let Some(stream) = take(&mut body, "stream") {
        out.insert("stream".into(), stream);
    }
    body.remove("stream_options");
    if let Some(user) = take(&mut body, "user") {
        out.insert("metadata".into(), json!({ "user_id": user }));
    }
    if let Some(tools) = take(&mut body, "tools") {
        out.insert("tools".into(), tools_from_openai(&tools)?);
    }
    let parallel = take(&mut body, "parallel_tool_calls").and_then(|v| v.as_bool());
    let mut choice = match take(&mut body, "tool_choice") {
        Some(choice) => Some(tool_choice_from_openai(&choice)?),
        None => None,
    };
    if parallel == Some(false) {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = Value::Bool(true);
    }
    if let Some(choice) = choice {
        out.insert("tool_choice".into(), choice);
    }
    if let Some(effort) = take(&mut body, "reasoning_effort") {
        let budget = effort
            .as_str()
            .and_then(budget_for_effort)
            .ok_or_else(|| untranslatable("reasoning_effort", "unknown effort"))?;
        // Anthropic's budget must stay under `max_tokens`.
        max_tokens = max_tokens.max(budget + 1024);
        out.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
    }
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(format) = take(&mut body, "response_format") {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(untranslatable(
                "response_format",
                format!("{TARGET} has no JSON mode or response schema"),
            ));
        }
    }
    if let Some(n) = take(&mut body, "n") {
        if n.as_u64() != Some(1) {
            return Err(untranslatable("n", format!("{TARGET} answers one choice")));
        }
    }
    refuse_rest(&body, "", TARGET)?;
    Ok(Value::Object(out))
}

/// OpenAI messages as Anthropic's system blocks and alternating messages.
fn messages_from_openai(messages: &Value) -> Result<(Vec<Value>, Vec<Value>), Untranslatable> {
    let messages = messages
        .as_array()
        .ok_or_else(|| untranslatable("messages", "must be a list"))?;
    let mut system = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let text = content_text(content);
                if !text.is_empty() {
                    system.push(json!({"type": "text", "text": text}));
                }
            }
            "user" => push_message(&mut out, "user", user_blocks(content, &at)?),
            "assistant" => {
                let mut blocks = Vec::new();
                let text = content_text(content);
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for (j, call) in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let arguments = call
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("{}");
                    let input: Value = if arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(arguments).map_err(|_| {
                            untranslatable(
                                format!("{at}.tool_calls[{j}].function.arguments"),
                                "not JSON",
                            )
                        })?
                    };
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": call.pointer("/function/name").cloned().unwrap_or(Value::Null),
                        "input": input,
                    }));
                }
                push_message(&mut out, "assistant", blocks);
            }
            "tool" => {
                let block = json!({
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id").cloned().unwrap_or(Value::Null),
                    "content": content_text(content),
                });
                push_message(&mut out, "user", vec![block]);
            }
            other => {
                return Err(untranslatable(
                    format!("{at}.role"),
                    format!("the role `{other}` has no equivalent in {TARGET}"),
                ));
            }
        }
    }
    Ok((system, out))
}

/// Adds blocks as a message, joined to the last one when it has the same role (Anthropic
/// wants roles to alternate; OpenAI's parallel tool results are several messages).
fn push_message(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(content) = last["content"].as_array_mut() {
                // Tool results come first in a user turn.
                let results = blocks
                    .iter()
                    .any(|b| b["type"] == "tool_result")
                    .then(|| content.iter().all(|b| b["type"] == "tool_result"));
                if results != Some(false) {
                    content.extend(blocks);
                    return;
                }
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

fn user_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Value::String(text) => Ok(vec![json!({"type": "text", "text": text})]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| match part.get("type").and_then(Value::as_str) {
                Some("text") => Ok(json!({"type": "text", "text": part.get("text")})),
                Some("image_url") => {
                    let url = part
                        .pointer("/image_url/url")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    Ok(match data_url(url) {
                        Some((media, data)) => json!({"type": "image", "source": {
                            "type": "base64", "media_type": media, "data": data}}),
                        None => json!({"type": "image", "source": {"type": "url", "url": url}}),
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

fn tools_from_openai(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools
        .as_array()
        .ok_or_else(|| untranslatable("tools", "must be a list"))?;
    tools
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
            let mut out = json!({
                "name": function.get("name").cloned().unwrap_or(Value::Null),
                "input_schema": function
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
            if let Some(description) = function.get("description") {
                out["description"] = description.clone();
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn tool_choice_from_openai(choice: &Value) -> Result<Value, Untranslatable> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({"type": "auto"})),
            "none" => Ok(json!({"type": "none"})),
            "required" => Ok(json!({"type": "any"})),
            _ => Err(untranslatable("tool_choice", "unknown choice")),
        },
        Value::Object(_) => match choice.pointer("/function/name") {
            Some(name) => Ok(json!({"type": "tool", "name": name})),
            None => Err(untranslatable("tool_choice", "names no function")),
        },
        _ => Err(untranslatable("tool_choice", "unknown choice")),
    }
}

/// An Anthropic Messages request's bytes as an OpenAI Chat request's for `model`, in one
/// typed, borrowing pass, for the common request: a system text, messages of text, and
/// the sampling fields. Also returns whether it streams (then asking for the usage chunk,
/// as [`super::request`] does). `None` for anything else (tools, thinking, images,
/// metadata, an unknown field, another type or shape): the `Value` path decides then,
/// translating or refusing by name, so both always agree.
pub fn request_to_openai_bytes(body: &[u8], model: &str) -> Option<(Vec<u8>, bool)> {
    let Obj(request) = serde_json::from_slice::<Obj<MessagesRequest>>(body).ok()?;
    request.model?;
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = request.system {
        messages.push(ChatMessage {
            role: "system",
            content: ChatContent::Text(system),
        });
    }
    for Obj(message) in request.messages {
        let role = match &*message.role {
            "user" => "user",
            "assistant" => "assistant",
            _ => return None,
        };
        let content = match message.content {
            InContent::Text(text) => ChatContent::Text(text),
            InContent::Blocks(blocks) => {
                if blocks.is_empty() || blocks.iter().any(|b| b.0.kind != "text") {
                    return None;
                }
                if blocks.len() == 1 || role == "assistant" {
                    let text: String = blocks.iter().map(|b| &*b.0.text).collect();
                    ChatContent::Text(Cow::Owned(text))
                } else {
                    ChatContent::Parts(
                        blocks
                            .into_iter()
                            .map(|Obj(b)| TextPart {
                                kind: "text",
                                text: b.text,
                            })
                            .collect(),
                    )
                }
            }
        };
        messages.push(ChatMessage { role, content });
    }
    let stream = request.stream.as_ref().and_then(Value::as_bool) == Some(true);
    let out = ChatRequest {
        model,
        messages,
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        stream: request.stream,
        stop: request.stop_sequences,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
    };
    Some((serde_json::to_vec(&out).ok()?, stream))
}

/// What [`request_to_openai_bytes`] takes of a Messages request: any other field sends it
/// to the `Value` path. `null` reads as absent, as `take` has it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesRequest<'a> {
    #[serde(default)]
    model: Option<IgnoredAny>,
    #[serde(borrow, default)]
    system: Option<Cow<'a, str>>,
    #[serde(borrow)]
    messages: Vec<Obj<InMessage<'a>>>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    temperature: Option<Value>,
    #[serde(default)]
    top_p: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<Value>,
}

#[derive(Deserialize)]
struct InMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow)]
    content: InContent<'a>,
}

/// A message's content: a string, or a list of blocks (only text ones are kept typed).
enum InContent<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Obj<TextBlock<'a>>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for InContent<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Either<'a> {
            type Value = InContent<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of blocks")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Borrowed(text)))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(InContent::Text(Cow::Owned(text.to_string())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut blocks = Vec::new();
                while let Some(block) = seq.next_element()? {
                    blocks.push(block);
                }
                Ok(InContent::Blocks(blocks))
            }
        }
        deserializer.deserialize_any(Either(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct TextBlock<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

/// The OpenAI request [`request_to_openai`] and [`super::request`] write, field for field
/// in the same order, so both paths give the same bytes.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: ChatContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatContent<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<TextPart<'a>>),
}

#[derive(Serialize)]
struct TextPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: Cow<'a, str>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// An Anthropic Messages request as an OpenAI Chat request (the model stays the
/// client's; the caller sets the upstream's).
pub fn request_to_openai(
    mut body: Map<String, Value>,
) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    if let Some(model) = take(&mut body, "model") {
        out.insert("model".into(), model);
    }
    let mut messages = Vec::new();
    if let Some(system) = take(&mut body, "system") {
        let text = match &system {
            Value::String(s) => s.clone(),
            Value::Array(blocks) => blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => return Err(untranslatable("system", "must be a string or a list")),
        };
        messages.push(json!({"role": "system", "content": text}));
    }
    let list = take(&mut body, "messages")
        .ok_or_else(|| untranslatable("messages", "a request needs messages"))?;
    for (i, message) in list
        .as_array()
        .ok_or_else(|| untranslatable("messages", "must be a list"))?
        .iter()
        .enumerate()
    {
        messages_to_openai(message, &format!("messages[{i}]"), &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(max) = take(&mut body, "max_tokens") {
        out.insert("max_tokens".into(), max);
    }
    for key in ["temperature", "top_p", "stream"] {
        if let Some(value) = take(&mut body, key) {
            out.insert(key.into(), value);
        }
    }
    if let Some(stops) = take(&mut body, "stop_sequences") {
        out.insert("stop".into(), stops);
    }
    if let Some(mut metadata) = take(&mut body, "metadata") {
        if let Some(user) = metadata.as_object_mut().and_then(|m| m.remove("user_id")) {
            out.insert("user".into(), user);
        }
        if let Some(rest) = metadata.as_object() {
            refuse_rest(rest, "metadata.", PIVOT)?;
        }
    }
    if let Some(tools) = take(&mut body, "tools") {
        out.insert("tools".into(), tools_to_openai(&tools)?);
    }
    if let Some(choice) = take(&mut body, "tool_choice") {
        let kind = choice.get("type").and_then(Value::as_str).unwrap_or("");
        let mapped = match kind {
            "auto" => json!("auto"),
            "any" => json!("required"),
            "none" => json!("none"),
            "tool" => json!({"type": "function", "function": {"name": choice.get("name")}}),
            _ => return Err(untranslatable("tool_choice.type", "unknown choice")),
        };
        out.insert("tool_choice".into(), mapped);
        if choice
            .get("disable_parallel_tool_use")
            .and_then(Value::as_bool)
            == Some(true)
        {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    if let Some(thinking) = take(&mut body, "thinking") {
        match thinking.get("type").and_then(Value::as_str) {
            Some("enabled") => {
                let budget = thinking
                    .get("budget_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(4096);
                out.insert("reasoning_effort".into(), json!(effort_for_budget(budget)));
            }
            Some("disabled") => {}
            _ => return Err(untranslatable("thinking.type", "unknown thinking mode")),
        }
    }
    refuse_rest(&body, "", PIVOT)?;
    Ok(out)
}

/// One Anthropic message as OpenAI messages: a user turn's tool results become `tool`
/// messages ahead of what else it says; an assistant turn's tool uses its `tool_calls`.
fn messages_to_openai(
    message: &Value,
    at: &str,
    out: &mut Vec<Value>,
) -> Result<(), Untranslatable> {
    let role = message.get("role").and_then(Value::as_str).unwrap_or("");
    if role != "user" && role != "assistant" {
        return Err(untranslatable(
            format!("{at}.role"),
            "a message's role is `user` or `assistant`",
        ));
    }
    let blocks = match message.get("content") {
        Some(Value::String(text)) => {
            out.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(untranslatable(
                format!("{at}.content"),
                "must be a string or a list",
            ));
        }
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let field = format!("{at}.content[{j}]");
        match (
            role,
            block.get("type").and_then(Value::as_str).unwrap_or(""),
        ) {
            (_, "text") => parts.push(json!({"type": "text", "text": block.get("text")})),
            ("user", "image") => parts.push(image_to_openai(block, &field)?),
            ("user", "tool_result") => {
                let content = match block.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(items)) => {
                        if items.iter().any(|b| b["type"] != "text") {
                            return Err(untranslatable(
                                format!("{field}.content"),
                                format!("only text tool results translate to {PIVOT}"),
                            ));
                        }
                        content_text(&Value::Array(items.clone()))
                    }
                    _ => String::new(),
                };
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id"),
                    "content": content,
                }));
            }
            ("assistant", "tool_use") => calls.push(json!({
                "id": block.get("id"),
                "type": "function",
                "function": {
                    "name": block.get("name"),
                    "arguments": block.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            // Earlier turns' thinking is not sent back to an OpenAI model.
            ("assistant", "thinking" | "redacted_thinking") => {}
            (_, kind) => {
                return Err(untranslatable(
                    format!("{field}.type"),
                    format!("the block `{kind}` has no equivalent in {PIVOT}"),
                ));
            }
        }
    }
    let all_text = parts.iter().all(|p| p["type"] == "text");
    let content = if parts.is_empty() {
        Value::Null
    } else if all_text && (parts.len() == 1 || role == "assistant") {
        Value::String(content_text(&Value::Array(parts)))
    } else {
        Value::Array(parts)
    };
    if role == "assistant" {
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        out.push(message);
    } else if !content.is_null() {
        out.push(json!({"role": role, "content": content}));
    }
    Ok(())
}

fn image_to_openai(block: &Value, field: &str) -> Result<Value, Untranslatable> {
    let source = block.get("source").unwrap_or(&Value::Null);
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or(""),
            source.get("data").and_then(Value::as_str).unwrap_or("")
        ),
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => {
            return Err(untranslatable(
                format!("{field}.source.type"),
                format!("only base64 and URL images translate to {PIVOT}"),
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tools_to_openai(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools
        .as_array()
        .ok_or_else(|| untranslatable("tools", "must be a list"))?;
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            match tool.get("type").and_then(Value::as_str) {
                None | Some("custom") => {}
                Some(kind) => {
                    return Err(untranslatable(
                        format!("tools[{i}].type"),
                        format!("the server tool `{kind}` has no equivalent in {PIVOT}"),
                    ));
                }
            }
            let mut function = json!({
                "name": tool.get("name"),
                "parameters": tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(description) = tool.get("description") {
                function["description"] = description.clone();
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

// === answers ===

fn finish_from_stop(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn stop_from_finish(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic usage as OpenAI's: Anthropic's `input_tokens` leaves out cached input.
fn usage_to_openai(usage: &Value) -> Value {
    let n = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("cache_read_input_tokens");
    let prompt = n("input_tokens") + cached + n("cache_creation_input_tokens");
    let completion = n("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn usage_from_openai(usage: &Value) -> Value {
    let n = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("/prompt_tokens_details/cached_tokens");
    json!({
        "input_tokens": n("/prompt_tokens").saturating_sub(cached),
        "output_tokens": n("/completion_tokens"),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    })
}

/// An Anthropic message as an OpenAI chat completion.
pub fn response_to_openai(value: &Value, created: i64) -> Value {
    let mut text = String::new();
    let mut thinking = String::new();
    let mut calls = Vec::new();
    for block in value
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("thinking") => {
                thinking.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""));
            }
            Some("tool_use") => calls.push(json!({
                "id": block.get("id"),
                "type": "function",
                "function": {
                    "name": block.get("name"),
                    "arguments": block.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    if !thinking.is_empty() {
        message["reasoning_content"] = Value::String(thinking);
    }
    json!({
        "id": value.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": value.get("model"),
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_from_stop(value.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": usage_to_openai(value.get("usage").unwrap_or(&Value::Null)),
    })
}

/// An OpenAI chat completion (choice 0) as an Anthropic message.
pub fn response_from_openai(value: &Value) -> Value {
    let message = value.pointer("/choices/0/message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    if let Some(thinking) = message.get("reasoning_content").and_then(Value::as_str) {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    let text = content_text(message.get("content").unwrap_or(&Value::Null));
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        content.push(json!({
            "type": "tool_use",
            "id": call.get("id"),
            "name": call.pointer("/function/name"),
            "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
        }));
    }
    let finish = value
        .pointer("/choices/0/finish_reason")
        .and_then(Value::as_str);
    json!({
        "id": value.get("id"),
        "type": "message",
        "role": "assistant",
        "model": value.get("model"),
        "content": content,
        "stop_reason": stop_from_finish(finish),
        "stop_sequence": null,
        "usage": usage_from_openai(value.get("usage").unwrap_or(&Value::Null)),
    })
}

/// An OpenAI chat completion's bytes as an Anthropic message's, in one typed, borrowing
/// pass: the common answer (text, thinking, tool calls) without building a `Value` tree.
/// `None` when the answer has any shape [`response_from_openai`] reads more leniently
/// (a field of another type, a list where an object goes, a repeated key): that path
/// decides then, so both always agree.
pub fn answer_from_openai_bytes(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let Obj(answer) = serde_json::from_slice::<Obj<ChatAnswer>>(body).ok()?;
    let choice = answer
        .choices
        .as_ref()
        .and_then(|c| c.first())
        .map(|c| &c.0);
    let message = choice.and_then(|c| c.message.as_ref()).map(|m| &m.0);
    let mut content = Vec::new();
    if let Some(message) = message {
        if let Some(thinking) = &message.reasoning_content {
            content.push(AnswerBlock::Thinking {
                thinking,
                signature: "",
            });
        }
        if let Some(text) = message.content.as_deref().filter(|t| !t.is_empty()) {
            content.push(AnswerBlock::Text { text });
        }
        for Obj(call) in message.tool_calls.iter().flatten() {
            let function = call.function.as_ref().map(|f| &f.0);
            let arguments = function.and_then(|f| f.arguments.as_deref());
            content.push(AnswerBlock::ToolUse {
                id: &call.id,
                name: function.map_or(&None, |f| &f.name),
                input: serde_json::from_str::<Value>(arguments.unwrap_or("{}"))
                    .unwrap_or_else(|_| json!({})),
            });
        }
    }
    let usage = answer.usage.map(|u| u.0).unwrap_or_default();
    let cached = usage
        .prompt_tokens_details
        .and_then(|d| d.0.cached_tokens)
        .unwrap_or(0);
    let out = AnthropicAnswer {
        id: &answer.id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: stop_from_finish(choice.and_then(|c| c.finish_reason.as_deref())),
        stop_sequence: None,
        usage: AnthropicUsage {
            input_tokens: usage.prompt_tokens.unwrap_or(0).saturating_sub(cached),
            output_tokens: usage.completion_tokens.unwrap_or(0),
            cache_read_input_tokens: cached,
            cache_creation_input_tokens: 0,
        },
    };
    serde_json::to_vec(&out).ok()
}

/// What [`answer_from_openai_bytes`] reads of an OpenAI chat completion.
#[derive(Deserialize)]
struct ChatAnswer<'a> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow, default)]
    choices: Option<Vec<Obj<AnswerChoice<'a>>>>,
    #[serde(default)]
    usage: Option<Obj<ChatUsage>>,
}

#[derive(Deserialize)]
struct AnswerChoice<'a> {
    #[serde(borrow, default)]
    message: Option<Obj<AnswerMessage<'a>>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AnswerMessage<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<Obj<AnswerCall<'a>>>>,
}

#[derive(Deserialize)]
struct AnswerCall<'a> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow, default)]
    function: Option<Obj<AnswerFunction<'a>>>,
}

#[derive(Deserialize)]
struct AnswerFunction<'a> {
    #[serde(default)]
    name: Option<Value>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct ChatUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Obj<TokenDetails>>,
}

#[derive(Deserialize)]
struct TokenDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// An Anthropic message as [`response_from_openai`] writes it, field for field in the
/// same order, so both paths give the same bytes.
#[derive(Serialize)]
struct AnthropicAnswer<'a> {
    id: &'a Option<Value>,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<AnswerBlock<'a>>,
    stop_reason: &'static str,
    stop_sequence: Option<()>,
    usage: AnthropicUsage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnswerBlock<'a> {
    Thinking {
        thinking: &'a str,
        signature: &'static str,
    },
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a Option<Value>,
        name: &'a Option<Value>,
        input: Value,
    },
}

#[derive(Serialize)]
struct AnthropicUsage {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation_input_tokens: u64,
}

/// Anthropic's error type for a status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type": "error", "error": {"type", "message"}}`.
pub fn error_value(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

// === streams ===

/// Anthropic's stream events as pivot chunks.
#[derive(Debug)]
pub struct StreamDecoder {
    created: i64,
    id: String,
    model: String,
    /// The OpenAI tool index of each content block that is a tool use.
    tools: Vec<Option<usize>>,
    next_tool: usize,
    usage: Map<String, Value>,
    stop: Option<String>,
    started: bool,
}

impl StreamDecoder {
    pub fn new(created: i64) -> Self {
        Self {
            created,
            id: String::new(),
            model: String::new(),
            tools: Vec::new(),
            next_tool: 0,
            usage: Map::new(),
            stop: None,
            started: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Piece {
        Piece::Chunk(chunk(&self.id, &self.model, self.created, delta, finish))
    }

    pub fn event(&mut self, data: &str, out: &mut Vec<Piece>) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let index = event
            .get("index")
            .and_then(Value::as_u64)
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(0)
            .min(4096);
        match event.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let message = event.get("message").unwrap_or(&Value::Null);
                self.id = message
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.model = message
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.merge_usage(message.get("usage"));
                self.started = true;
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
            }
            "content_block_start" => {
                let block = event.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        if self.tools.len() <= index {
                            self.tools.resize(index + 1, None);
                        }
                        let tool = self.next_tool;
                        self.next_tool += 1;
                        self.tools[index] = Some(tool);
                        out.push(self.chunk(
                            json!({"tool_calls": [{
                                "index": tool,
                                "id": block.get("id"),
                                "type": "function",
                                "function": {"name": block.get("name"), "arguments": ""},
                            }]}),
                            Value::Null,
                        ));
                    }
                    Some("text") => {
                        if let Some(text) = block
                            .get("text")
                            .and_then(Value::as_str)
                            .filter(|t| !t.is_empty())
                        {
                            out.push(self.chunk(json!({ "content": text }), Value::Null));
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                let text = |key: &str| delta.get(key).and_then(Value::as_str).unwrap_or("");
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        out.push(self.chunk(json!({"content": text("text")}), Value::Null));
                    }
                    Some("thinking_delta") => out.push(
                        self.chunk(json!({"reasoning_content": text("thinking")}), Value::Null),
                    ),
                    Some("input_json_delta") => {
                        let tool = self.tools.get(index).copied().flatten();
                        let partial = text("partial_json");
                        if let (Some(tool), false) = (tool, partial.is_empty()) {
                            out.push(self.chunk(
                                json!({"tool_calls": [{
                                    "index": tool,
                                    "function": {"arguments": partial},
                                }]}),
                                Value::Null,
                            ));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(stop) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop = Some(stop.to_string());
                }
                self.merge_usage(event.get("usage"));
            }
            "message_stop" => {
                out.push(self.chunk(json!({}), json!(finish_from_stop(self.stop.as_deref()))));
                let mut usage = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [],
                });
                usage["usage"] = usage_to_openai(&Value::Object(self.usage.clone()));
                out.push(Piece::Chunk(usage));
                out.push(Piece::Done);
            }
            "error" => {
                let kind = event
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                out.push(Piece::Error {
                    status: status_of_error_type(kind),
                    message: event
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("upstream error")
                        .to_string(),
                });
            }
            _ => {}
        }
    }

    fn merge_usage(&mut self, usage: Option<&Value>) {
        for (key, value) in usage.and_then(Value::as_object).into_iter().flatten() {
            if value.is_u64() {
                self.usage.insert(key.clone(), value.clone());
            }
        }
    }
}

fn status_of_error_type(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        _ => 500,
    }
}

/// What content block is open in the Anthropic stream being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text(usize),
    Thinking(usize),
    Tool(usize),
}

/// Pivot chunks as Anthropic's stream events: `message_start`, content blocks opened,
/// filled and closed one after another, `message_delta` with the stop reason and usage,
/// `message_stop`.
#[derive(Debug)]
pub struct StreamEncoder {
    model: String,
    started: bool,
    done: bool,
    open: Option<Open>,
    next_block: usize,
    /// The content block of each OpenAI tool index.
    tools: Vec<Option<usize>>,
    finish: Option<String>,
    usage: Value,
}

impl StreamEncoder {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            started: false,
            done: false,
            open: None,
            next_block: 0,
            tools: Vec::new(),
            finish: None,
            usage: Value::Null,
        }
    }

    pub fn piece(&mut self, piece: Piece, out: &mut BytesMut) {
        if self.done {
            return;
        }
        match piece {
            Piece::Chunk(chunk) => self.chunk(&chunk, out),
            Piece::Error { status, message } => {
                self.done = true;
                write_event(out, "error", &error_value(status, &message));
            }
            Piece::Done => {
                self.done = true;
                self.start(None, out);
                self.close(out);
                let usage = usage_from_openai(&self.usage);
                write_event(
                    out,
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": stop_from_finish(self.finish.as_deref()),
                            "stop_sequence": null,
                        },
                        "usage": usage,
                    }),
                );
                write_event(out, "message_stop", &json!({"type": "message_stop"}));
            }
        }
    }

    fn start(&mut self, id: Option<&Value>, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        write_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id.cloned().unwrap_or_else(|| json!("msg_sluice")),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        );
    }

    fn close(&mut self, out: &mut BytesMut) {
        if let Some(open) = self.open.take() {
            let (Open::Text(index) | Open::Thinking(index) | Open::Tool(index)) = open;
            write_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Opens a block of the given kind unless one is open; returns its index.
    fn open(&mut self, kind: fn(usize) -> Open, block: Value, out: &mut BytesMut) -> usize {
        let index = self.next_block;
        if let Some(open) = self.open {
            if std::mem::discriminant(&open) == std::mem::discriminant(&kind(0))
                && !matches!(open, Open::Tool(_))
            {
                let (Open::Text(i) | Open::Thinking(i) | Open::Tool(i)) = open;
                return i;
            }
        }
        self.close(out);
        self.next_block += 1;
        self.open = Some(kind(index));
        write_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    /// An OpenAI chunk's `data` written straight as Anthropic's events, for the common
    /// chunk once the message has started: text or thinking, maybe a finish reason, no
    /// tool calls, usage or error. Returns false, having written nothing, for any other
    /// (or any other shape): the `Value` path reads it then.
    pub fn openai_chunk(&mut self, data: &str, out: &mut BytesMut) -> bool {
        if !self.started || self.done {
            return false;
        }
        let Ok(Obj(chunk)) = serde_json::from_str::<Obj<ChatChunk>>(data) else {
            return false;
        };
        let Some(Obj(choice)) = chunk.choices.into_iter().next() else {
            return false;
        };
        let delta = choice.delta.map(|d| d.0);
        if chunk.error
            || chunk.usage.is_some()
            || delta.as_ref().is_some_and(|d| d.tool_calls.is_some())
        {
            return false;
        }
        if let Some(delta) = delta {
            if let Some(thinking) = delta.reasoning_content.filter(|t| !t.is_empty()) {
                let index = self.open(
                    Open::Thinking,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    out,
                );
                write_delta(out, index, "thinking_delta", "thinking", &thinking);
            }
            if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                let index = self.open(Open::Text, json!({"type": "text", "text": ""}), out);
                write_delta(out, index, "text_delta", "text", &text);
            }
        }
        if let Some(finish) = choice.finish_reason {
            self.finish = Some(finish.into_owned());
        }
        true
    }

    fn chunk(&mut self, chunk: &Value, out: &mut BytesMut) {
        self.start(chunk.get("id"), out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = usage.clone();
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return;
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(thinking) = delta
            .get("reasoning_content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            let index = self.open(
                Open::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            write_event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "thinking_delta", "thinking": thinking}}),
            );
        }
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            let index = self.open(Open::Text, json!({"type": "text", "text": ""}), out);
            write_event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tool = call
                .get("index")
                .and_then(Value::as_u64)
                .and_then(|i| usize::try_from(i).ok())
                .unwrap_or(0)
                .min(1024);
            if self.tools.len() <= tool {
                self.tools.resize(tool + 1, None);
            }
            let block = match self.tools[tool] {
                Some(block) => block,
                None => {
                    let block = self.open(
                        Open::Tool,
                        json!({
                            "type": "tool_use",
                            "id": call.get("id").cloned().unwrap_or_else(|| json!(format!("toolu_{tool}"))),
                            "name": call.pointer("/function/name"),
                            "input": {},
                        }),
                        out,
                    );
                    self.tools[tool] = Some(block);
                    block
                }
            };
            if let Some(arguments) = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                write_event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": block,
                        "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                );
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(finish.to_string());
        }
    }
}

/// What [`StreamEncoder::openai_chunk`] reads of an OpenAI chunk: `error` counts even when
/// `null` (the decoder reports any), `usage` unless `null`.
#[derive(Deserialize)]
struct ChatChunk<'a> {
    #[serde(default, deserialize_with = "present")]
    error: bool,
    #[serde(default)]
    usage: Option<IgnoredAny>,
    #[serde(borrow, default)]
    choices: Vec<Obj<ChunkChoice<'a>>>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<Obj<ChunkDelta<'a>>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
}

/// A `content_block_delta` event, the bytes `write_event` gives its `json!`, without it.
fn write_delta(out: &mut BytesMut, index: usize, kind: &str, key: &str, text: &str) {
    out.extend_from_slice(
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":",
    );
    out.extend_from_slice(index.to_string().as_bytes());
    out.extend_from_slice(b",\"delta\":{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    // Writing a string into memory cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), text);
    out.extend_from_slice(b"}}\n\n");
}

fn write_event(out: &mut BytesMut, name: &str, value: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&serde_json::to_vec(value).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
}
