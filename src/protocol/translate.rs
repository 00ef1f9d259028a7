//! Translation between the API a client speaks and the one its upstream speaks, when they
//! differ. OpenAI's Chat Completions JSON is the pivot: a request goes client → pivot →
//! upstream, an answer upstream → pivot → client, so each protocol knows only its own
//! shape and the pivot's ([`anthropic`], [`gemini`]), and an Anthropic client reaches a
//! Gemini upstream through the two.
//!
//! Streams are translated event by event as they arrive: [`Translator`] cuts the upstream's
//! bytes into SSE events, a decoder turns each into pivot pieces, an encoder writes them in
//! the client's protocol; nothing waits for the end of the stream. A request field the
//! target cannot express is refused ([`Untranslatable`], a 400 naming it), never dropped.
//!
//! Pure: no sockets, no clock (the answer's `created` comes in), no HTTP types.

pub mod anthropic;
pub mod gemini;
#[cfg(test)]
mod golden;

use std::borrow::Cow;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value, json};

use crate::pure::shape::{MAX_EVENT, first_event_end};

/// The largest non-streamed answer (or error) translated; past it the answer is cut.
const JSON_LIMIT: usize = 16 * 1024 * 1024;

/// A wire format: what one side of a translated exchange speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI Chat Completions (the pivot).
    OpenAiChat,
    AnthropicMessages,
    Gemini,
}

/// A request field the target protocol cannot express.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable {
    /// The field, as a path in the client's body (`messages[2].content[0].type`).
    pub field: String,
    pub why: String,
}

impl std::fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` cannot be translated: {}", self.field, self.why)
    }
}

pub(crate) fn untranslatable(field: impl Into<String>, why: impl Into<String>) -> Untranslatable {
    Untranslatable {
        field: field.into(),
        why: why.into(),
    }
}

/// A request body translated from `client` to `upstream` for the upstream's `model`.
/// Also returns whether the client asked for a stream.
pub fn request(
    client: Wire,
    upstream: Wire,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, bool), Untranslatable> {
    if (client, upstream) == (Wire::AnthropicMessages, Wire::OpenAiChat) {
        if let Some(out) = anthropic::request_to_openai_bytes(body, model) {
            return Ok(out);
        }
    }
    request_by_value(client, upstream, body, model)
}

/// [`request`] through `Value`s: every pair of APIs, every field, every refusal.
fn request_by_value(
    client: Wire,
    upstream: Wire,
    body: &[u8],
    model: &str,
) -> Result<(Vec<u8>, bool), Untranslatable> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| untranslatable("body", format!("not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(untranslatable("body", "not a JSON object"));
    };
    // Anthropic's thinking budget, kept exact for Gemini (the pivot has only an effort).
    let budget = object
        .get("thinking")
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("enabled"))
        .and_then(|t| t.get("budget_tokens"))
        .and_then(Value::as_u64)
        .filter(|_| client == Wire::AnthropicMessages);
    let pivot = match client {
        Wire::OpenAiChat => object,
        Wire::AnthropicMessages => anthropic::request_to_openai(object)?,
        Wire::Gemini => return Err(untranslatable("body", "Gemini is not a client protocol")),
    };
    let stream = pivot.get("stream").and_then(Value::as_bool) == Some(true);
    let out = match upstream {
        Wire::OpenAiChat => {
            let mut pivot = pivot;
            pivot.insert("model".into(), Value::String(model.to_string()));
            if stream && client != Wire::OpenAiChat {
                pivot.insert("stream_options".into(), json!({"include_usage": true}));
            }
            Value::Object(pivot)
        }
        Wire::AnthropicMessages => anthropic::request_from_openai(pivot, model)?,
        Wire::Gemini => {
            let mut out = gemini::request_from_openai(pivot)?;
            if let Some(budget) = budget {
                out["generationConfig"]["thinkingConfig"] =
                    json!({"thinkingBudget": budget, "includeThoughts": true});
            }
            out
        }
    };
    // Serialising a `Value` cannot fail.
    Ok((serde_json::to_vec(&out).unwrap_or_default(), stream))
}

/// Reads the OpenAI error a pivot piece or an upstream's error body carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFacts {
    pub kind: String,
    pub message: String,
    pub code: Option<String>,
}

/// The error in an upstream's error body, in whatever shape it has; a body that is not
/// one keeps its text as the message.
pub fn read_error(body: &[u8]) -> ErrorFacts {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    // Gemini sometimes wraps its error in a one-element array.
    let value = match value {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    let error = value.get("error").unwrap_or(&Value::Null);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let message = text(error.get("message")).unwrap_or_else(|| {
        let raw = String::from_utf8_lossy(body);
        raw.chars().take(1000).collect()
    });
    // OpenAI and Anthropic name a type; Gemini a status (`RESOURCE_EXHAUSTED`).
    let kind = text(error.get("type"))
        .or_else(|| text(error.get("status")).map(|s| s.to_ascii_lowercase()))
        .unwrap_or_else(|| "api_error".into());
    let code = text(error.get("code")).or_else(|| text(error.get("status")));
    ErrorFacts {
        kind,
        message,
        code,
    }
}

/// An upstream's error body written in the client's protocol (the status is relayed as
/// it is).
pub fn error_body(client: Wire, status: u16, body: &[u8]) -> Vec<u8> {
    let facts = read_error(body);
    let value = match client {
        Wire::AnthropicMessages => anthropic::error_value(status, &facts.message),
        _ => json!({"error": {
            "message": facts.message,
            "type": facts.kind,
            "param": null,
            "code": facts.code,
        }}),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// A non-streamed answer translated from `upstream` to `client`, with the client's model
/// name. An answer that cannot be read is relayed as it came.
pub fn response(client: Wire, upstream: Wire, body: &[u8], model: &str, created: i64) -> Vec<u8> {
    if (client, upstream) == (Wire::AnthropicMessages, Wire::OpenAiChat) {
        if let Some(out) = anthropic::answer_from_openai_bytes(body, model) {
            return out;
        }
    }
    response_by_value(client, upstream, body, model, created)
}

/// [`response`] through `Value`s: every pair of APIs, any shape of answer.
fn response_by_value(
    client: Wire,
    upstream: Wire,
    body: &[u8],
    model: &str,
    created: i64,
) -> Vec<u8> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return body.to_vec();
    };
    let mut pivot = match upstream {
        Wire::OpenAiChat => value,
        Wire::AnthropicMessages => anthropic::response_to_openai(&value, created),
        Wire::Gemini => gemini::response_to_openai(&value, created),
    };
    // An answer that is not an object is relayed as it is (indexing it would panic).
    let Some(object) = pivot.as_object_mut() else {
        return body.to_vec();
    };
    object.insert("model".into(), Value::String(model.to_string()));
    let out = match client {
        Wire::AnthropicMessages => anthropic::response_from_openai(&pivot),
        _ => pivot,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// One step of a stream in the pivot's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// An OpenAI `chat.completion.chunk`.
    Chunk(Value),
    /// The upstream reported an error mid-stream.
    Error { status: u16, message: String },
    /// The stream is complete.
    Done,
}

/// Builds an OpenAI chunk with one choice.
pub(crate) fn chunk(id: &str, model: &str, created: i64, delta: Value, finish: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

/// Turns an upstream's SSE events into pivot pieces.
#[derive(Debug)]
enum Decoder {
    OpenAi,
    Anthropic(anthropic::StreamDecoder),
    Gemini(gemini::StreamDecoder),
}

impl Decoder {
    fn event(&mut self, data: &str, out: &mut Vec<Piece>) {
        match self {
            Self::OpenAi => {
                if data == "[DONE]" {
                    out.push(Piece::Done);
                    return;
                }
                let Ok(value) = serde_json::from_str::<Value>(data) else {
                    return;
                };
                if let Some(error) = value.get("error") {
                    out.push(Piece::Error {
                        status: 500,
                        message: error
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("upstream error")
                            .to_string(),
                    });
                } else {
                    out.push(Piece::Chunk(value));
                }
            }
            Self::Anthropic(decoder) => decoder.event(data, out),
            Self::Gemini(decoder) => decoder.event(data, out),
        }
    }

    /// The upstream's body ended.
    fn finish(&mut self, out: &mut Vec<Piece>) {
        if let Self::Gemini(decoder) = self {
            decoder.finish(out);
        }
    }
}

/// Writes pivot pieces as the client's SSE events.
#[derive(Debug)]
enum Encoder {
    OpenAi(OpenAiEncoder),
    Anthropic(anthropic::StreamEncoder),
}

impl Encoder {
    fn piece(&mut self, piece: Piece, out: &mut BytesMut) {
        match self {
            Self::OpenAi(encoder) => encoder.piece(piece, out),
            Self::Anthropic(encoder) => encoder.piece(piece, out),
        }
    }

    /// The stream ended: whatever closes it in the client's protocol (a no-op after
    /// an end or an error).
    fn finish(&mut self, out: &mut BytesMut) {
        self.piece(Piece::Done, out);
    }
}

/// Writes pivot chunks as OpenAI's stream. A client that did not ask for the usage chunk
/// gets the usage on its last chunk instead (SDK code indexing `choices[0]` of every chunk
/// keeps working, and the log still reads the usage).
#[derive(Debug)]
struct OpenAiEncoder {
    model: String,
    usage_asked: bool,
    /// The finishing chunk, held until the usage arrives (when not asked for separately).
    held: Option<Value>,
    done: bool,
}

impl OpenAiEncoder {
    fn piece(&mut self, piece: Piece, out: &mut BytesMut) {
        if self.done {
            return;
        }
        match piece {
            Piece::Chunk(mut value) => {
                let Some(object) = value.as_object_mut() else {
                    return;
                };
                object.insert("model".into(), Value::String(self.model.clone()));
                let finishing = value
                    .pointer("/choices/0/finish_reason")
                    .is_some_and(|f| !f.is_null());
                let usage_only = value
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty);
                if self.usage_asked {
                    write_data(out, &value);
                } else if finishing {
                    if let Some(held) = self.held.take() {
                        write_data(out, &held);
                    }
                    self.held = Some(value);
                } else if usage_only {
                    if let Some(mut held) = self.held.take() {
                        held["usage"] = value.get("usage").cloned().unwrap_or(Value::Null);
                        write_data(out, &held);
                    }
                } else {
                    write_data(out, &value);
                }
            }
            Piece::Error { status, message } => {
                self.done = true;
                let value = json!({"error": {
                    "message": message,
                    "type": openai_error_type(status),
                    "param": null,
                    "code": null,
                }});
                write_data(out, &value);
            }
            Piece::Done => {
                self.done = true;
                if let Some(held) = self.held.take() {
                    write_data(out, &held);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
        }
    }
}

/// OpenAI's error type for a status.
pub fn openai_error_type(status: u16) -> &'static str {
    match status {
        400 | 404 | 408 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    }
}

fn write_data(out: &mut BytesMut, value: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&serde_json::to_vec(value).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
}

/// What a relayed body is turned into.
#[derive(Debug)]
enum Mode {
    /// A stream, event by event.
    Stream(Box<Stream>),
    /// A whole JSON answer, translated at its end.
    Answer,
    /// An upstream's error, rewritten in the client's shape at its end.
    Error { status: u16 },
}

/// A stream's translation under way.
#[derive(Debug)]
struct Stream {
    decoder: Decoder,
    encoder: Encoder,
    pieces: Vec<Piece>,
}

impl Stream {
    /// Translates one whole SSE event. An OpenAI upstream's common chunk goes straight to
    /// an Anthropic client's events; anything else through pivot pieces.
    fn event(&mut self, event: &[u8], out: &mut BytesMut) {
        let data = event_data(event);
        if data.is_empty() {
            return;
        }
        if let (Decoder::OpenAi, Encoder::Anthropic(encoder)) = (&self.decoder, &mut self.encoder) {
            if encoder.openai_chunk(&data, out) {
                return;
            }
        }
        self.decoder.event(&data, &mut self.pieces);
        self.encode(out);
    }

    /// Writes the pieces decoded so far.
    fn encode(&mut self, out: &mut BytesMut) {
        for piece in self.pieces.drain(..) {
            self.encoder.piece(piece, out);
        }
    }
}

/// An answer (or error) too large to translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream's answer is too large to translate")
    }
}

/// Translates an upstream's answer body into the client's protocol as it arrives.
#[derive(Debug)]
pub struct Translator {
    client: Wire,
    upstream: Wire,
    model: String,
    created: i64,
    mode: Mode,
    buffer: BytesMut,
}

/// How a translated answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Stream,
    Json,
    Error { status: u16 },
}

impl Translator {
    /// A translator for one answer: `model` is the client's name for it, `usage_asked`
    /// whether an OpenAI client asked for the usage chunk, `created` the time to stamp.
    pub fn new(
        client: Wire,
        upstream: Wire,
        kind: AnswerKind,
        model: &str,
        usage_asked: bool,
        created: i64,
    ) -> Self {
        let mode = match kind {
            AnswerKind::Stream => Mode::Stream(Box::new(Stream {
                decoder: match upstream {
                    Wire::OpenAiChat => Decoder::OpenAi,
                    Wire::AnthropicMessages => {
                        Decoder::Anthropic(anthropic::StreamDecoder::new(created))
                    }
                    Wire::Gemini => Decoder::Gemini(gemini::StreamDecoder::new(created)),
                },
                encoder: match client {
                    Wire::AnthropicMessages => {
                        Encoder::Anthropic(anthropic::StreamEncoder::new(model))
                    }
                    _ => Encoder::OpenAi(OpenAiEncoder {
                        model: model.to_string(),
                        usage_asked,
                        held: None,
                        done: false,
                    }),
                },
                pieces: Vec::new(),
            })),
            AnswerKind::Json => Mode::Answer,
            AnswerKind::Error { status } => Mode::Error { status },
        };
        Self {
            client,
            upstream,
            model: model.to_string(),
            created,
            mode,
            buffer: BytesMut::new(),
        }
    }

    /// Takes a chunk of the upstream's body; returns what the client gets now.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, TooLarge> {
        self.buffer.extend_from_slice(chunk);
        let Mode::Stream(stream) = &mut self.mode else {
            if self.buffer.len() > JSON_LIMIT {
                return Err(TooLarge);
            }
            return Ok(Bytes::new());
        };
        let mut out = BytesMut::new();
        let mut from = 0;
        while let Some(end) = first_event_end(&self.buffer[from..]) {
            stream.event(&self.buffer[from..from + end], &mut out);
            from += end;
        }
        let _ = self.buffer.split_to(from);
        if self.buffer.len() > MAX_EVENT {
            return Err(TooLarge);
        }
        Ok(out.freeze())
    }

    /// The upstream's body ended: the rest of the client's answer.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.buffer.split().freeze();
        match &mut self.mode {
            Mode::Stream(stream) => {
                let mut out = BytesMut::new();
                if !rest.is_empty() {
                    stream.event(&rest, &mut out);
                }
                stream.decoder.finish(&mut stream.pieces);
                stream.encode(&mut out);
                stream.encoder.finish(&mut out);
                out.freeze()
            }
            Mode::Answer => Bytes::from(response(
                self.client,
                self.upstream,
                &rest,
                &self.model,
                self.created,
            )),
            Mode::Error { status } => Bytes::from(error_body(self.client, *status, &rest)),
        }
    }
}

/// One SSE event's `data`, its lines joined and trimmed: borrowed from the event when it
/// has one `data:` line (the usual case), so no copy is made.
fn event_data(event: &[u8]) -> Cow<'_, str> {
    match String::from_utf8_lossy(event) {
        Cow::Borrowed(text) => {
            let mut lines = data_lines(text);
            match (lines.next(), lines.next()) {
                (None, _) => Cow::Borrowed(""),
                (Some(line), None) => Cow::Borrowed(line.trim()),
                _ => Cow::Owned(joined_data(text)),
            }
        }
        Cow::Owned(text) => Cow::Owned(joined_data(&text)),
    }
}

/// The values of an event's `data:` lines.
fn data_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|value| value.strip_prefix(' ').unwrap_or(value))
}

fn joined_data(text: &str) -> String {
    let mut data = String::new();
    for value in data_lines(text) {
        if !data.is_empty() {
            data.push('\n');
        }
        data.push_str(value);
    }
    data.trim().to_string()
}

/// A JSON object read as `T`. serde's derive also reads a struct from a list (field by
/// position), which the `Value` paths never do: typed fast paths read objects through this,
/// so anything else falls back to the `Value` path and keeps its meaning.
pub(crate) struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_map(Only(PhantomData)).map(Obj)
    }
}

/// Whether a field is there at all, `null` included (`Option` reads `null` as absent,
/// where `Value::get` finds it). For `#[serde(default, deserialize_with = "present")]`.
pub(crate) fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// Moves a field out of a request object.
pub(crate) fn take(object: &mut Map<String, Value>, key: &str) -> Option<Value> {
    object.remove(key).filter(|v| !v.is_null())
}

/// Refuses whatever is left of a request after every translatable field was taken.
pub(crate) fn refuse_rest(
    object: &Map<String, Value>,
    prefix: &str,
    target: &str,
) -> Result<(), Untranslatable> {
    match object.iter().find(|(_, v)| !v.is_null()) {
        Some((key, _)) => Err(untranslatable(
            format!("{prefix}{key}"),
            format!("{target} has no equivalent"),
        )),
        None => Ok(()),
    }
}

/// A `data:` URL's media type and base64 payload.
pub(crate) fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media = meta.strip_suffix(";base64")?;
    Some((media, data))
}

/// The text of an OpenAI message content (a string, or the text parts of an array).
pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_take_the_clients_shape() {
        let anthropic =
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let body: Value =
            serde_json::from_slice(&error_body(Wire::OpenAiChat, 429, anthropic)).unwrap();
        assert_eq!(body["error"]["message"], "slow down");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        let gemini = br#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#;
        let body: Value =
            serde_json::from_slice(&error_body(Wire::AnthropicMessages, 429, gemini)).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["message"], "quota");
        let body: Value =
            serde_json::from_slice(&error_body(Wire::AnthropicMessages, 502, b"<html>bad"))
                .unwrap();
        assert_eq!(body["error"]["message"], "<html>bad");
        assert_eq!(body["error"]["type"], "api_error");
    }

    #[test]
    fn answers_that_are_not_objects_do_not_panic() {
        for body in [&b"5"[..], b"[]", b"\"x\"", b"null"] {
            for upstream in [Wire::OpenAiChat, Wire::AnthropicMessages, Wire::Gemini] {
                for client in [Wire::OpenAiChat, Wire::AnthropicMessages] {
                    let _ = response(client, upstream, body, "m", 0);
                    let mut stream =
                        Translator::new(client, upstream, AnswerKind::Stream, "m", false, 0);
                    let mut sse = b"data: ".to_vec();
                    sse.extend_from_slice(body);
                    sse.extend_from_slice(b"\n\n");
                    let _ = stream.push(&sse);
                    let _ = stream.finish();
                }
            }
        }
    }

    #[test]
    fn data_urls_split() {
        assert_eq!(
            data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(data_url("https://x/y.png"), None);
    }

    #[test]
    fn usage_rides_on_the_last_chunk_when_not_asked_for() {
        let mut encoder = OpenAiEncoder {
            model: "alias".into(),
            usage_asked: false,
            held: None,
            done: false,
        };
        let mut out = BytesMut::new();
        encoder.piece(
            Piece::Chunk(chunk("c", "real", 1, json!({"content": "hi"}), Value::Null)),
            &mut out,
        );
        encoder.piece(
            Piece::Chunk(chunk("c", "real", 1, json!({}), json!("stop"))),
            &mut out,
        );
        encoder.piece(
            Piece::Chunk(json!({"choices": [], "usage": {"prompt_tokens": 1}})),
            &mut out,
        );
        encoder.piece(Piece::Done, &mut out);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{text}");
        assert!(events[0].contains("\"alias\""));
        assert!(events[1].contains("\"finish_reason\":\"stop\""));
        assert!(events[1].contains("\"prompt_tokens\":1"));
        assert_eq!(events[2], "data: [DONE]");
    }
}
