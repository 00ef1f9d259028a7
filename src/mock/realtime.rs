//! The mock's Realtime API: `GET /v1/realtime` (and Azure's `/openai/realtime`) upgraded
//! to a WebSocket that plays a small session. It opens with `session.created`, answers
//! `session.update` and `conversation.item.create`, and a `response.create` with the
//! response's events, text deltas and a `response.done` carrying usage
//! ([`INPUT_TOKENS`] in, the mock's `chunks` out). Two events of its own let tests end a
//! session from the upstream's side: `mock.close` (a close frame) and `mock.drop` (the
//! connection dropped). Sessions opened and ended are counted for `/_mock/stats`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{MockProtocol, MockState, Recorded, error};
use crate::http::body::{Body, empty};

/// Input tokens each mock response reports.
pub const INPUT_TOKENS: u64 = 12;

/// Whether a request asks to open a realtime session.
pub(super) fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.uri().path().ends_with("/realtime")
        && request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Checks the handshake (key, Azure's query), records it, and upgrades.
pub(super) fn accept(state: &Arc<MockState>, request: &mut Request<Incoming>) -> Response<Body> {
    let options = state.options();
    let headers = request.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let query = request.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    if options.record {
        if let Ok(mut recorded) = state.recorded.lock() {
            if recorded.len() >= super::RECORD_LIMIT {
                recorded.pop_front();
            }
            recorded.push_back(Recorded {
                method: request.method().clone(),
                path: request.uri().path().to_string(),
                query: request.uri().query().map(str::to_string),
                headers: headers.clone(),
                body: bytes::Bytes::new(),
            });
        }
    }
    let presented = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("api-key").filter(|_| options.protocol == MockProtocol::Azure));
    if !options.keys.is_empty() && !presented.is_some_and(|p| options.keys.iter().any(|k| k == p)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided (mock).",
        );
    }
    let model = match options.protocol {
        MockProtocol::OpenAi | MockProtocol::Anthropic | MockProtocol::Gemini => param("model"),
        MockProtocol::Azure if request.uri().path() == "/openai/v1/realtime" => param("model"),
        MockProtocol::Azure => {
            if param("api-version").is_none() {
                return error(StatusCode::NOT_FOUND, "404", "Resource not found");
            }
            param("deployment")
        }
    };
    let Some(model) = model.map(str::to_string) else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_model",
            "the session needs a model",
        );
    };
    if options.protocol == MockProtocol::Azure && !options.models.contains(&model) {
        return error(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist.",
        );
    }
    let Some(accept) = header("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes())) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            "no Sec-WebSocket-Key",
        );
    };
    let offers_realtime = header("sec-websocket-protocol")
        .is_some_and(|p| p.split(',').any(|s| s.trim() == "realtime"));
    let upgrade = hyper::upgrade::on(request);
    let state = state.clone();
    let chunks = options.chunks;
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        state.realtime_opened.fetch_add(1, Ordering::SeqCst);
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        session(socket, &model, chunks).await;
        state.realtime_closed.fetch_add(1, Ordering::SeqCst);
    });
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    if offers_realtime {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
    }
    response
}

/// Plays one session until either side ends it.
async fn session<S>(mut socket: WebSocketStream<S>, model: &str, chunks: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut next = 0u64;
    let mut id = move |prefix: &str| {
        next += 1;
        format!("{prefix}_mock{next}")
    };
    let created = json!({"type": "session.created", "event_id": id("event"),
        "session": {"id": id("sess"), "object": "realtime.session", "model": model}});
    if send(&mut socket, &created).await.is_err() {
        return;
    }
    while let Some(Ok(message)) = socket.next().await {
        let event: Value = match message {
            Message::Text(text) => serde_json::from_str(text.as_str()).unwrap_or(Value::Null),
            Message::Close(_) => break,
            _ => continue,
        };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let replies = match kind {
            "session.update" => vec![json!({"type": "session.updated", "event_id": id("event"),
                "session": event.get("session").cloned().unwrap_or(json!({}))})],
            "conversation.item.create" => vec![json!({"type": "conversation.item.created",
                "event_id": id("event"), "item": event.get("item").cloned().unwrap_or(json!({}))})],
            "response.create" => response(&mut id, chunks),
            "mock.close" => {
                let _ = socket.close(None).await;
                return;
            }
            "mock.drop" => return,
            _ => vec![json!({"type": "error", "event_id": id("event"), "error": {
                "type": "invalid_request_error", "code": "unknown_event",
                "message": format!("unknown event type {kind:?} (mock)")}})],
        };
        for reply in &replies {
            if send(&mut socket, reply).await.is_err() {
                return;
            }
        }
    }
}

/// A response's events: created, a text delta per chunk, done with usage.
fn response(id: &mut impl FnMut(&str) -> String, chunks: usize) -> Vec<Value> {
    let response_id = id("resp");
    let mut events = vec![json!({"type": "response.created", "event_id": id("event"),
        "response": {"id": response_id, "object": "realtime.response", "status": "in_progress"}})];
    let mut text = String::new();
    for i in 0..chunks {
        let delta = format!("word{i} ");
        text.push_str(&delta);
        events.push(
            json!({"type": "response.output_text.delta", "event_id": id("event"),
            "response_id": response_id, "delta": delta}),
        );
    }
    let output = chunks as u64;
    events.push(json!({"type": "response.done", "event_id": id("event"), "response": {
        "id": response_id, "object": "realtime.response", "status": "completed",
        "output": [{"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text}]}],
        "usage": {"total_tokens": INPUT_TOKENS + output, "input_tokens": INPUT_TOKENS,
            "output_tokens": output,
            "input_token_details": {"text_tokens": INPUT_TOKENS, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": output, "audio_tokens": 0}}}}));
    events
}

async fn send<S>(socket: &mut WebSocketStream<S>, event: &Value) -> Result<(), ()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    socket
        .send(Message::text(event.to_string()))
        .await
        .map_err(|_| ())
}
