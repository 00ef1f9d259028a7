//! Token usage and cost of a request, worked out off the hot path from what the log
//! captured: the upstream's own `usage` where it gave one (JSON bodies, the usage chunk of a
//! stream, `response.completed` of the Responses API), else a count with the model's real
//! tokenizer (tiktoken). Streams are also reassembled into their final text and tool calls.

use std::sync::OnceLock;

use serde_json::{Value, json};
use tiktoken_rs::CoreBPE;

use crate::config::Price;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// Prompt tokens read from the provider's cache (part of `prompt`), priced apart.
    pub cached: u64,
}

/// Where a usage figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    Upstream,
    Tokenizer,
}

impl UsageSource {
    pub fn name(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Tokenizer => "tokenizer",
        }
    }
}

/// What a response said, once read whole.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub usage: Option<TokenUsage>,
    /// The assistant's text (choice 0), reassembled for streams.
    pub text: Option<String>,
    /// Tool calls (choice 0) as OpenAI's `[{id, type, function: {name, arguments}}]`.
    pub tool_calls: Vec<Value>,
}

/// More tokens than any request has used (a trillion); an upstream that claims more is
/// believed only this far, so sums and the log's signed columns never overflow.
pub const MAX_TOKENS: u64 = 1 << 40;

fn number(value: Option<&Value>) -> Option<u64> {
    value.and_then(Value::as_u64).map(|n| n.min(MAX_TOKENS))
}

/// Reads an OpenAI `usage` object (chat, completions, embeddings or Responses shape), or
/// Anthropic's, whose `input_tokens` leaves out the cached input it counts apart.
pub fn parse_usage(usage: &Value) -> Option<TokenUsage> {
    let cached = number(usage.get("cache_read_input_tokens"))
        .unwrap_or(0)
        .saturating_add(number(usage.get("cache_creation_input_tokens")).unwrap_or(0));
    let prompt = number(usage.get("prompt_tokens"))
        .or_else(|| number(usage.get("input_tokens")).map(|n| n.saturating_add(cached)))?;
    let completion = number(usage.get("completion_tokens"))
        .or_else(|| number(usage.get("output_tokens")))
        .unwrap_or(0);
    let total =
        number(usage.get("total_tokens")).unwrap_or_else(|| prompt.saturating_add(completion));
    // OpenAI's cached prompt tokens, or Anthropic's cache reads.
    let cached = number(usage.pointer("/prompt_tokens_details/cached_tokens"))
        .or_else(|| number(usage.pointer("/input_tokens_details/cached_tokens")))
        .or_else(|| number(usage.get("cache_read_input_tokens")))
        .unwrap_or(0)
        .min(prompt);
    Some(TokenUsage {
        prompt,
        completion,
        total,
        cached,
    })
}

/// Reads a whole JSON response.
pub fn read_json_reply(body: &[u8]) -> Reply {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Reply::default();
    };
    let mut reply = Reply {
        usage: value.get("usage").and_then(parse_usage),
        ..Reply::default()
    };
    if let Some(choice) = value.pointer("/choices/0") {
        reply.text = choice
            .pointer("/message/content")
            .and_then(Value::as_str)
            .or_else(|| choice.get("text").and_then(Value::as_str))
            .map(str::to_string);
        if let Some(calls) = choice
            .pointer("/message/tool_calls")
            .and_then(Value::as_array)
        {
            reply.tool_calls = calls.clone();
        }
    } else if let Some(output) = value.get("output").and_then(Value::as_array) {
        reply.text = Some(responses_output_text(output));
    } else if let Some(content) = value.get("content").and_then(Value::as_array) {
        // An Anthropic message.
        let mut text = String::new();
        for block in content {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => {
                    text.push_str(block.get("text").and_then(Value::as_str).unwrap_or(""))
                }
                Some("tool_use") => reply.tool_calls.push(json!({
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": block.get("input").map(Value::to_string).unwrap_or_default(),
                    },
                })),
                _ => {}
            }
        }
        reply.text = Some(text);
    }
    reply
}

/// Reads one event of an Anthropic stream into the reply under way: usage from
/// `message_start` and `message_delta`, text and tool uses from the content blocks.
fn anthropic_event(
    event: &Value,
    kind: &str,
    anthropic_usage: &mut serde_json::Map<String, Value>,
    content: &mut String,
    saw_content: &mut bool,
    blocks: &mut Vec<Option<usize>>,
    calls: &mut Vec<ToolCallParts>,
) {
    let index = usize::try_from(number(event.get("index")).unwrap_or(0))
        .unwrap_or(0)
        .min(128);
    let usage = match kind {
        "message_start" => event.pointer("/message/usage"),
        "message_delta" => event.get("usage"),
        _ => None,
    };
    for (key, value) in usage.and_then(Value::as_object).into_iter().flatten() {
        if value.is_u64() {
            anthropic_usage.insert(key.clone(), value.clone());
        }
    }
    match kind {
        "content_block_start" => {
            let block = event.get("content_block").unwrap_or(&Value::Null);
            if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                if blocks.len() <= index {
                    blocks.resize(index + 1, None);
                }
                blocks[index] = Some(calls.len());
                calls.push(ToolCallParts {
                    id: block.get("id").and_then(Value::as_str).unwrap_or("").into(),
                    name: block
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .into(),
                    arguments: String::new(),
                });
            }
        }
        "content_block_delta" => {
            let delta = event.get("delta").unwrap_or(&Value::Null);
            if let Some(text) = delta.get("text").and_then(Value::as_str) {
                content.push_str(text);
                *saw_content = true;
            }
            if let Some(partial) = delta.get("partial_json").and_then(Value::as_str) {
                if let Some(call) = blocks
                    .get(index)
                    .copied()
                    .flatten()
                    .and_then(|c| calls.get_mut(c))
                {
                    call.arguments.push_str(partial);
                }
            }
        }
        _ => {}
    }
}

fn responses_output_text(output: &[Value]) -> String {
    output
        .iter()
        .filter_map(|item| item.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|part| part.get("type").and_then(Value::as_str) == Some("output_text"))
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect()
}

#[derive(Default)]
struct ToolCallParts {
    id: String,
    name: String,
    arguments: String,
}

/// Reads a whole SSE stream: usage, and the reply put back together.
pub fn read_stream_reply(body: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(body);
    let mut reply = Reply::default();
    let mut content = String::new();
    let mut saw_content = false;
    let mut calls: Vec<ToolCallParts> = Vec::new();
    let mut anthropic_usage = serde_json::Map::new();
    let mut anthropic_blocks: Vec<Option<usize>> = Vec::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if !data.starts_with('{') {
            continue;
        }
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(usage) = event.get("usage").and_then(parse_usage) {
            reply.usage = Some(usage);
        }
        match event.get("type").and_then(Value::as_str) {
            Some(
                kind @ ("message_start"
                | "message_delta"
                | "content_block_start"
                | "content_block_delta"),
            ) => {
                anthropic_event(
                    &event,
                    kind,
                    &mut anthropic_usage,
                    &mut content,
                    &mut saw_content,
                    &mut anthropic_blocks,
                    &mut calls,
                );
                continue;
            }
            Some("response.output_text.delta") => {
                if let Some(delta) = event.get("delta").and_then(Value::as_str) {
                    content.push_str(delta);
                    saw_content = true;
                }
                continue;
            }
            Some("response.completed") => {
                if let Some(usage) = event.pointer("/response/usage").and_then(parse_usage) {
                    reply.usage = Some(usage);
                }
                continue;
            }
            _ => {}
        }
        let Some(choices) = event.get("choices").and_then(Value::as_array) else {
            continue;
        };
        for choice in choices
            .iter()
            .filter(|c| number(c.get("index")).unwrap_or(0) == 0)
        {
            let piece = choice
                .pointer("/delta/content")
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str);
            if let Some(piece) = piece {
                content.push_str(piece);
                saw_content = true;
            }
            for call in choice
                .pointer("/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = usize::try_from(number(call.get("index")).unwrap_or(0))
                    .unwrap_or(0)
                    .min(128);
                if calls.len() <= index {
                    calls.resize_with(index + 1, ToolCallParts::default);
                }
                let parts = &mut calls[index];
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    parts.id.push_str(id);
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    parts.name.push_str(name);
                }
                if let Some(arguments) = call.pointer("/function/arguments").and_then(Value::as_str)
                {
                    parts.arguments.push_str(arguments);
                }
            }
        }
    }
    if !anthropic_usage.is_empty() {
        reply.usage = parse_usage(&Value::Object(anthropic_usage));
    }
    if saw_content {
        reply.text = Some(content);
    }
    reply.tool_calls = calls
        .into_iter()
        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect();
    reply
}

fn encoder(model: &str) -> Option<&'static CoreBPE> {
    static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    let legacy = matches!(
        tiktoken_rs::tokenizer::get_tokenizer(model),
        Some(tiktoken_rs::tokenizer::Tokenizer::Cl100kBase)
    );
    if legacy {
        CL100K
            .get_or_init(|| tiktoken_rs::cl100k_base().ok())
            .as_ref()
    } else {
        O200K
            .get_or_init(|| tiktoken_rs::o200k_base().ok())
            .as_ref()
    }
}

/// Tokens in `text` for `model` (o200k for current models, cl100k for the GPT-4/3.5 family).
pub fn count_tokens(model: &str, text: &str) -> u64 {
    encoder(model).map_or((text.len() as u64).div_ceil(4), |bpe| {
        bpe.encode_with_special_tokens(text).len() as u64
    })
}

/// Prompt tokens of a request body: chat messages (with OpenAI's per-message overhead),
/// a completion prompt, embedding or Responses input.
pub fn count_prompt_tokens(model: &str, body: &Value) -> u64 {
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        let mut tokens = 3;
        for message in messages {
            tokens += 3;
            if let Some(object) = message.as_object() {
                for (field, value) in object {
                    let text = match value {
                        Value::String(s) => s.clone(),
                        Value::Array(parts) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join(""),
                        Value::Null => continue,
                        other => other.to_string(),
                    };
                    tokens += count_tokens(model, &text);
                    if field == "name" {
                        tokens += 1;
                    }
                }
            }
        }
        return tokens;
    }
    match body.get("prompt").or_else(|| body.get("input")) {
        Some(Value::String(text)) => count_tokens(model, text),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => count_tokens(model, text),
                Value::Number(_) => 1,
                other => count_tokens(model, &other.to_string()),
            })
            .sum(),
        Some(other) => count_tokens(model, &other.to_string()),
        None => 0,
    }
}

/// Counts a request's usage with the tokenizer, for answers that carried none.
pub fn estimate(model: &str, request: Option<&Value>, reply: &Reply) -> TokenUsage {
    let prompt = request.map_or(0, |body| count_prompt_tokens(model, body));
    let mut completion = reply
        .text
        .as_deref()
        .map_or(0, |text| count_tokens(model, text));
    for call in &reply.tool_calls {
        completion += call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .map_or(0, |n| count_tokens(model, n));
        completion += call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .map_or(0, |a| count_tokens(model, a));
    }
    TokenUsage {
        prompt,
        completion,
        total: prompt + completion,
        cached: 0,
    }
}

/// Cost in USD of `usage` at `price` (USD per million tokens).
pub fn cost(price: Price, usage: TokenUsage) -> f64 {
    let cached = usage.cached.min(usage.prompt);
    let fresh = usage.prompt - cached;
    (fresh as f64 * price.input
        + cached as f64 * price.cached_input.unwrap_or(price.input)
        + usage.completion as f64 * price.output)
        / 1_000_000.0
}

/// A cost as sluice prints or answers it: to the nano-dollar, so float sums show as what
/// they mean (`0.0004527`, not `0.0004526999999999999`).
pub fn round_cost(usd: f64) -> f64 {
    if usd.is_finite() {
        (usd * 1e9).round() / 1e9
    } else {
        usd
    }
}

/// Serialises an optional cost rounded by [`round_cost`] (serde's `serialize_with`).
pub fn serialize_cost<S: serde::Serializer>(
    cost: &Option<f64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match cost {
        Some(cost) => serializer.serialize_some(&round_cost(*cost)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_rounded_to_what_they_mean() {
        let sum = 0.0001 + 0.0002 + 0.0001527;
        assert_eq!(round_cost(sum).to_string(), "0.0004527");
        assert_eq!(round_cost(0.1 + 0.2).to_string(), "0.3");
        assert_eq!(round_cost(1.0 / 3.0).to_string(), "0.333333333");
    }

    #[test]
    fn usage_shapes() {
        let chat =
            parse_usage(&json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}))
                .unwrap();
        assert_eq!(
            chat,
            TokenUsage {
                prompt: 5,
                completion: 7,
                total: 12,
                cached: 0
            }
        );
        let responses =
            parse_usage(&json!({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}))
                .unwrap();
        assert_eq!(
            responses,
            TokenUsage {
                prompt: 3,
                completion: 4,
                total: 7,
                cached: 0
            }
        );
        let embeddings = parse_usage(&json!({"prompt_tokens": 9, "total_tokens": 9})).unwrap();
        assert_eq!(
            embeddings,
            TokenUsage {
                prompt: 9,
                completion: 0,
                total: 9,
                cached: 0
            }
        );
    }

    #[test]
    fn streams_are_reassembled_with_tool_calls_and_usage() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"other choice\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n",
            "data: [DONE]\n\n",
        );
        let reply = read_stream_reply(stream.as_bytes());
        assert_eq!(reply.text.as_deref(), Some("Hello"));
        assert_eq!(reply.tool_calls[0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(reply.tool_calls[0]["id"], "call_1");
        assert_eq!(reply.usage.unwrap().total, 6);
    }

    #[test]
    fn the_tokenizer_counts_real_tokens() {
        assert_eq!(count_tokens("gpt-4o", "hello world"), 2);
        assert_eq!(count_tokens("gpt-4", "hello world"), 2);
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(count_prompt_tokens("gpt-4o", &body), 3 + 3 + 1 + 2);
    }

    #[test]
    fn cost_per_million() {
        let usage = TokenUsage {
            prompt: 1_000_000,
            completion: 500_000,
            total: 1_500_000,
            cached: 0,
        };
        assert!(
            (cost(
                Price {
                    input: 2.5,
                    output: 10.0,
                    cached_input: None,
                },
                usage
            ) - 7.5)
                .abs()
                < 1e-9
        );
    }

    #[test]
    fn anthropic_answers_are_read_with_their_cached_input() {
        let body = br#"{"type":"message","content":[{"type":"text","text":"Hi"},{"type":"tool_use","id":"t1","name":"f","input":{"a":1}}],"usage":{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":4,"cache_creation_input_tokens":2}}"#;
        let reply = read_json_reply(body);
        assert_eq!(
            reply.usage,
            Some(TokenUsage {
                prompt: 16,
                completion: 5,
                total: 21,
                cached: 4
            })
        );
        assert_eq!(reply.text.as_deref(), Some("Hi"));
        assert_eq!(reply.tool_calls[0]["function"]["arguments"], "{\"a\":1}");
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1,\"cache_read_input_tokens\":3}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\n",
        );
        let reply = read_stream_reply(stream.as_bytes());
        assert_eq!(
            reply.usage,
            Some(TokenUsage {
                prompt: 10,
                completion: 9,
                total: 19,
                cached: 3
            })
        );
        assert_eq!(reply.text.as_deref(), Some("Hello"));
        assert_eq!(reply.tool_calls[0]["function"]["arguments"], "{\"a\":1}");
    }

    #[test]
    fn cached_prompt_tokens_have_a_price_of_their_own() {
        let usage = parse_usage(&json!({"prompt_tokens": 1_000_000, "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 400_000}}))
        .unwrap();
        assert_eq!(usage.cached, 400_000);
        let price = Price {
            input: 3.0,
            output: 15.0,
            cached_input: Some(0.3),
        };
        assert!((cost(price, usage) - (0.6 * 3.0 + 0.4 * 0.3)).abs() < 1e-9);
        let unpriced = Price {
            cached_input: None,
            ..price
        };
        assert!((cost(unpriced, usage) - 3.0).abs() < 1e-9);
    }
}
