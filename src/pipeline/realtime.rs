//! The Realtime API over WebSocket: `GET /v1/realtime?model=…` with an upgrade.
//!
//! The handshake goes through the same stages as any request: the caller is authenticated
//! (the gateway key in `Authorization: Bearer`, or for browsers in the
//! `openai-insecure-api-key.<key>` subprotocol, taken out before anything is logged or
//! forwarded), the model in the query is checked against the key's allow-list, and the
//! session is planned, admitted (it counts as one request) and sent like a request: the
//! upstream gets its own key and the handshake (`Connection: upgrade`), through its own
//! HTTP client (proxy, TLS, timeouts), with failover before it accepts. Once both sides
//! have switched protocols, a task of its own relays messages both ways, each direction
//! in order and without waiting on the other; when either side closes or breaks, the
//! other is closed. Frames and messages are bounded by `server.max_body`.
//!
//! The session's log record is submitted when it ends: its duration, the events each way,
//! and the usage of every `response.done` summed, as a small JSON document the accountant
//! reads like any answer's `usage` (so cost, budgets and `tpm` settle as usual).
//!
//! Why tokio-tungstenite: the maintained WebSocket codec of the tokio ecosystem, used here
//! with no default features (no TLS, no connector of its own): it only frames bytes over
//! the connections hyper (client side) and reqwest (upstream side) have already upgraded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::accounting::recorder::RecordSink;
use crate::accounting::records::Pending;
use crate::gateway::Gateway;
use crate::http::body::{Body, empty};
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::relay::{self, Shaping};
use crate::pipeline::try_loop::Settled;
use crate::pipeline::{plan, read, try_loop};
use crate::protocol::UpstreamKind;
use crate::pure::usage::{TokenUsage, parse_usage};
use crate::upstream::InFlight;

/// The gateway path of the Realtime API.
pub const PATH: &str = "/v1/realtime";

/// The subprotocol prefix browsers carry their key in (they cannot set headers).
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// How long closing a side may take once the other has gone.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What the connection a session came on holds, kept until the session ends: its
/// address's slot under `max_connections_per_ip`, and the server's drain, which a session
/// watches (shutdown closes it, and waits for it within the grace period).
#[derive(Clone)]
pub struct HeldConnection {
    pub slot: Option<Arc<dyn std::any::Any + Send + Sync>>,
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// Whether a request asks to open a realtime session.
pub fn is_upgrade(parts: &Parts, route: &str) -> bool {
    parts.method == Method::GET
        && route == PATH
        && parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Takes a key carried in the `openai-insecure-api-key.<key>` subprotocol out of the
/// offered subprotocols and, unless an `Authorization` header came too, makes it one: so
/// authentication reads it like any key, the log masks it like any credential, and it
/// never reaches the upstream. Called before the request's record is started.
pub fn key_from_subprotocol(headers: &mut HeaderMap) {
    let Some(offered) = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let mut key = None;
    let kept: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|p| match p.strip_prefix(KEY_PROTOCOL) {
            Some(k) => {
                key = Some(k);
                false
            }
            None => !p.is_empty(),
        })
        .collect();
    let Some(key) = key else {
        return;
    };
    let bearer = HeaderValue::from_str(&format!("Bearer {key}")).ok();
    let kept = HeaderValue::from_str(&kept.join(", ")).ok();
    if let Some(mut bearer) = bearer.filter(|_| !headers.contains_key(header::AUTHORIZATION)) {
        bearer.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, bearer);
    }
    match kept.filter(|v| !v.is_empty()) {
        Some(kept) => headers.insert(header::SEC_WEBSOCKET_PROTOCOL, kept),
        None => headers.remove(header::SEC_WEBSOCKET_PROTOCOL),
    };
}

/// Opens a realtime session for an authenticated caller: the handshake's stages, then the
/// relay on a task of its own.
pub async fn open(
    gateway: &Gateway,
    caller: Caller,
    mut parts: Parts,
    body: Incoming,
    path: &str,
    record: Option<Box<Pending>>,
) -> Response<Body> {
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    let held = parts.extensions.remove::<HeldConnection>();
    let mut exchange = Exchange::new(gateway, &caller, parts, path, record);
    exchange.websocket = true;
    match stages(&mut exchange, body, client_upgrade, held).await {
        Ok(response) => response,
        Err(error) => exchange.refuse(error),
    }
}

async fn stages(
    x: &mut Exchange<'_>,
    body: Incoming,
    client_upgrade: Option<OnUpgrade>,
    held: Option<HeldConnection>,
) -> Result<Response<Body>, ApiError> {
    let handshake = |message: &str| ApiError::bad_request("invalid_websocket_handshake", message);
    let accept = x
        .parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
        .ok_or_else(|| handshake("Sec-WebSocket-Key is missing"))?;
    if x.parts
        .headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(handshake("Sec-WebSocket-Version must be 13"));
    }
    let client_upgrade =
        client_upgrade.ok_or_else(|| handshake("the connection cannot switch protocols"))?;
    if query_models(x.parts.uri.query()) > 1 {
        // The upstream might read another one than the one checked and priced.
        return Err(ApiError::bad_request(
            "invalid_model",
            "the query names `model` more than once",
        ));
    }
    let model = query_model(x.parts.uri.query()).ok_or_else(|| {
        ApiError::bad_request(
            "missing_model",
            "a realtime session needs its model in the query: /v1/realtime?model=…",
        )
    })?;
    read::check_model_name(&model)?;
    // sluice relays messages whole; a compression extension would be the upstream's.
    x.parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    let mut inbound = read::read_inbound(x, body).await?;
    inbound.model = Some(model.clone());
    if let Some(record) = x.record.as_mut() {
        record.model = Some(model);
    }
    read::authorise_model(x, &inbound)?;
    let mut plan = plan::plan(x, &mut inbound).await?;
    let upstreams = &x.gateway.upstreams;
    plan.candidates
        .retain(|&i| UpstreamKind::of(&upstreams[i].config).speaks_realtime());
    if plan.candidates.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            "no upstream serving this model speaks the Realtime API",
        ));
    }
    let settled = try_loop::send_until_settled(x, &mut inbound, &plan).await?;
    let Settled::Answered {
        response,
        upstream,
        choice,
        in_flight,
    } = settled
    else {
        let shaping = Shaping {
            client_model: inbound.model.as_deref(),
            served_model: None,
            strip_usage: false,
            fill: None,
            usage_asked: false,
            route: None,
        };
        return Ok(relay::relay_settled(x, settled, shaping));
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The upstream's own answer (an error, say) is the client's.
        let settled = Settled::Answered {
            response,
            upstream,
            choice,
            in_flight,
        };
        let shaping = Shaping {
            client_model: inbound.model.as_deref(),
            served_model: None,
            strip_usage: false,
            fill: None,
            usage_asked: false,
            route: None,
        };
        return Ok(relay::relay_settled(x, settled, shaping));
    }
    // The client's key went upstream, so the upstream's accept must be the client's.
    if response
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_none_or(|v| v.as_bytes() != accept.as_bytes())
    {
        return Err(ApiError::bad_gateway(
            "the upstream answered the WebSocket handshake wrongly",
        ));
    }
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned();
    let upstream_io = response
        .upgrade()
        .await
        .map_err(|_| ApiError::bad_gateway("the upstream's WebSocket could not be opened"))?;
    let (record, sink) = relay::take_session_record(x, choice, upstream, inbound.model.as_deref());
    let limit = usize::try_from(x.gateway.config.server.max_body).unwrap_or(usize::MAX);
    let session = Session {
        config: WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit)),
        total: upstream.config.timeouts.total,
        record,
        sink,
        _in_flight: in_flight,
        held,
    };
    tokio::spawn(session.run(client_upgrade, upstream_io));

    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    headers.insert(relay::UPSTREAM_HEADER, upstream.name_header.clone());
    Ok(response)
}

/// The `model` parameter of a query string, decoded.
fn query_model(query: Option<&str>) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query?)
        .ok()?
        .into_iter()
        .find_map(|(name, value)| (name == "model" && !value.is_empty()).then_some(value))
}

/// How many `model` parameters a query string has.
fn query_models(query: Option<&str>) -> usize {
    query
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .map_or(0, |pairs| {
            pairs.iter().filter(|(name, _)| name == "model").count()
        })
}

/// One session's relay and what it leaves behind.
struct Session {
    config: WebSocketConfig,
    total: Option<Duration>,
    record: Option<Box<Pending>>,
    sink: Option<RecordSink>,
    /// The upstream counts the session in flight until it ends.
    _in_flight: InFlight,
    /// The client's address keeps its connection slot until it ends.
    held: Option<HeldConnection>,
}

/// What crossed a session, for its log record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    /// Messages from the client to the upstream, and back.
    from_client: u64,
    from_upstream: u64,
    /// `response.done` events seen.
    responses: u64,
    usage: Option<TokenUsage>,
}

impl Tally {
    /// Counts a message from the upstream; a `response.done` adds its usage.
    fn upstream_message(&mut self, message: &Message) {
        self.from_upstream += 1;
        let Message::Text(text) = message else {
            return;
        };
        // Only a response's last event is read (and only its usage is deserialised).
        if !text.as_str().contains("\"response.done\"") {
            return;
        }
        #[derive(Deserialize)]
        struct Done {
            r#type: String,
            response: Option<DoneResponse>,
        }
        #[derive(Deserialize)]
        struct DoneResponse {
            usage: Option<serde_json::Value>,
        }
        let Ok(done) = serde_json::from_str::<Done>(text.as_str()) else {
            return;
        };
        if done.r#type != "response.done" {
            return;
        }
        self.responses += 1;
        if let Some(usage) = done
            .response
            .and_then(|r| r.usage)
            .as_ref()
            .and_then(parse_usage)
        {
            let sum = self.usage.get_or_insert_with(TokenUsage::default);
            sum.prompt = sum.prompt.saturating_add(usage.prompt);
            sum.completion = sum.completion.saturating_add(usage.completion);
            sum.total = sum.total.saturating_add(usage.total);
            sum.cached = sum.cached.saturating_add(usage.cached);
        }
    }
}

/// Which side ended a session, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientClosed,
    UpstreamClosed,
    ClientBroke,
    UpstreamBroke,
    TimedOut,
    /// The gateway is shutting down.
    Shutdown,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::ClientClosed => "client",
            End::UpstreamClosed => "upstream",
            End::ClientBroke => "client_error",
            End::UpstreamBroke => "upstream_error",
            End::TimedOut => "timeout",
            End::Shutdown => "shutdown",
        }
    }
}

impl Session {
    async fn run(self, client_upgrade: OnUpgrade, upstream_io: reqwest::Upgraded) {
        let started = std::time::Instant::now();
        let Ok(client_io) = client_upgrade.await else {
            self.finish(Tally::default(), End::ClientBroke, started.elapsed());
            return;
        };
        let client = WebSocketStream::from_raw_socket(
            TokioIo::new(client_io),
            Role::Server,
            Some(self.config),
        )
        .await;
        let upstream =
            WebSocketStream::from_raw_socket(upstream_io, Role::Client, Some(self.config)).await;
        let draining = self.held.as_ref().map(|held| held.draining.clone());
        let (tally, end) = relay_both(client, upstream, self.total, draining).await;
        self.finish(tally, end, started.elapsed());
    }

    /// Submits the session's record: status 101, its duration, and a summary the
    /// accountant reads like an answer's (its `usage` is what `response.done` reported).
    fn finish(mut self, tally: Tally, end: End, lasted: Duration) {
        let (Some(mut record), Some(sink)) = (self.record.take(), self.sink.take()) else {
            return;
        };
        record.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
        record.latency = Some(record.started.elapsed());
        if matches!(end, End::ClientBroke | End::UpstreamBroke | End::TimedOut) {
            record.error = Some(format!("realtime session ended: {}", end.name()));
        }
        let mut summary = json!({
            "object": "realtime.session",
            "duration_ms": u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
            "events": {"client": tally.from_client, "upstream": tally.from_upstream},
            "responses": tally.responses,
            "closed_by": end.name(),
        });
        if let Some(usage) = tally.usage {
            summary["usage"] = json!({
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.total,
            });
        }
        let bytes = Bytes::from(summary.to_string());
        record.response_body.push(&bytes, bytes.len());
        record.response_content_type = Some("application/json".into());
        sink.submit(record);
    }
}

/// Relays messages both ways until either side closes or breaks (or `total` passes),
/// then closes the other. Each direction runs on its own, so a slow reader on one side
/// never holds up the other.
async fn relay_both<C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    total: Option<Duration>,
    draining: Option<tokio::sync::watch::Receiver<bool>>,
) -> (Tally, End)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let mut tally = Tally::default();
    let mut from_client = 0u64;
    let up = async {
        while let Some(message) = client_rx.next().await {
            let Ok(message) = message else {
                return End::ClientBroke;
            };
            match message {
                Message::Text(_) | Message::Binary(_) => {
                    from_client += 1;
                    if upstream_tx.send(message).await.is_err() {
                        return End::UpstreamBroke;
                    }
                }
                Message::Close(frame) => {
                    let _ = upstream_tx.send(Message::Close(frame)).await;
                    return End::ClientClosed;
                }
                // Pings are answered by the codec on each side; nothing else crosses.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        End::ClientBroke
    };
    let down = async {
        while let Some(message) = upstream_rx.next().await {
            let Ok(message) = message else {
                return End::UpstreamBroke;
            };
            match message {
                Message::Text(_) | Message::Binary(_) => {
                    tally.upstream_message(&message);
                    if client_tx.send(message).await.is_err() {
                        return End::ClientBroke;
                    }
                }
                Message::Close(frame) => {
                    let _ = client_tx.send(Message::Close(frame)).await;
                    return End::UpstreamClosed;
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        End::UpstreamBroke
    };
    let deadline = async {
        match total {
            Some(total) => tokio::time::sleep(total).await,
            None => std::future::pending().await,
        }
    };
    let shutdown = async {
        match draining {
            Some(mut draining) => drop(draining.wait_for(|draining| *draining).await),
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        end = up => end,
        end = down => end,
        () = deadline => End::TimedOut,
        () = shutdown => End::Shutdown,
    };
    tally.from_client = from_client;
    // The other side is closed too (a close frame where it can still take one).
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = upstream_tx.close().await;
        let _ = client_tx.close().await;
    })
    .await;
    (tally, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_the_subprotocols_becomes_the_authorization_and_leaves_them() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(
                "realtime, openai-insecure-api-key.fk-1, openai-beta.realtime-v1",
            ),
        );
        key_from_subprotocol(&mut headers);
        assert_eq!(headers[header::AUTHORIZATION], "Bearer fk-1");
        assert_eq!(
            headers[header::SEC_WEBSOCKET_PROTOCOL],
            "realtime, openai-beta.realtime-v1"
        );

        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mine"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-insecure-api-key.other"),
        );
        key_from_subprotocol(&mut headers);
        assert_eq!(
            headers[header::AUTHORIZATION],
            "Bearer mine",
            "a header wins"
        );
        assert!(!headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL));
    }

    #[test]
    fn usage_is_summed_from_response_done_only() {
        let mut tally = Tally::default();
        for text in [
            r#"{"type":"response.done","response":{"usage":{"input_tokens":10,"output_tokens":2,"total_tokens":12}}}"#,
            r#"{"type":"response.output_text.delta","delta":"\"response.done\""}"#,
            r#"{"type":"response.done","response":{"usage":{"input_tokens":5,"output_tokens":1,"total_tokens":6}}}"#,
            "not json",
        ] {
            tally.upstream_message(&Message::text(text));
        }
        assert_eq!(tally.from_upstream, 4);
        assert_eq!(tally.responses, 2);
        assert_eq!(
            tally.usage,
            Some(TokenUsage {
                prompt: 15,
                completion: 3,
                total: 18,
                cached: 0,
            })
        );
    }

    #[test]
    fn the_model_comes_from_the_query() {
        assert_eq!(
            query_model(Some("model=gpt-4o-realtime-preview&x=1")).as_deref(),
            Some("gpt-4o-realtime-preview")
        );
        assert_eq!(query_model(Some("model=a%20b")).as_deref(), Some("a b"));
        assert_eq!(query_model(Some("x=1")), None);
        assert_eq!(query_model(None), None);
        assert_eq!(query_models(Some("model=a&x=1&model=b")), 2);
    }
}
