//! A mock OpenAI upstream for tests, benchmarks and newcomers (`sluice mock-upstream`).
//!
//! It answers every endpoint the gateway forwards with canned but well-formed OpenAI
//! responses, streams with a configurable chunk count and interval, and injects faults
//! (500, 429 with `Retry-After`, a slow first byte, a dropped connection, a stalled or cut
//! stream) either for every request or per request via `x-mock-*` headers. It records what
//! reached it so tests can assert on the path, headers, key and body an upstream saw.
//! It speaks HTTP/1.1 and HTTP/2 (h2c, or h2 by ALPN when started with TLS) on one port,
//! and counts the connections it accepted, so tests see how streams share them.

mod azure;
mod native;
mod realtime;
mod responses;

pub use azure::deployment_model;

pub use responses::speech_bytes;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::http::body::{Body, full, json_response};
use crate::http::tls::Tls;

/// A fault the mock injects instead of (or into) a normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 500 with an OpenAI error body.
    ServerError,
    /// 429 with `Retry-After` in seconds.
    RateLimited { retry_after: u64 },
    /// Waits this long before answering.
    SlowFirstByte(Duration),
    /// Closes the connection without answering.
    Drop,
    /// Streams send their first chunk and then nothing, holding the connection open.
    Stall,
    /// Streams break off half way by dropping the connection.
    Cut,
    /// 400 `context_length_exceeded`: the prompt is too long for the model.
    ContextLength,
}

impl Fault {
    /// Parses `500`, `429`, `429:7`, `slow`, `slow:250ms`, `drop`, `stall`, `cut`, `context`.
    pub fn parse(text: &str) -> Option<Fault> {
        let (kind, arg) = text
            .split_once(':')
            .map_or((text, None), |(k, a)| (k, Some(a)));
        Some(match kind.trim() {
            "500" => Fault::ServerError,
            "429" => Fault::RateLimited {
                retry_after: arg.map_or(Some(1), |a| a.trim().parse().ok())?,
            },
            "slow" => Fault::SlowFirstByte(
                arg.map_or(Some(Duration::from_secs(2)), crate::config::parse_duration)?,
            ),
            "drop" => Fault::Drop,
            "stall" => Fault::Stall,
            "cut" => Fault::Cut,
            "context" => Fault::ContextLength,
            _ => return None,
        })
    }
}

/// The API the mock speaks in its errors and key checks (`--protocol`). Its chat
/// endpoints answer in every protocol by path: `/v1/chat/completions`, `/v1/messages`,
/// `/v1beta/models/{model}:generateContent`; Azure's deployment paths with `azure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MockProtocol {
    #[default]
    OpenAi,
    Anthropic,
    Gemini,
    /// Azure OpenAI: deployment paths, `api-version`, the `api-key` header.
    Azure,
}

impl MockProtocol {
    /// Parses `openai`, `anthropic`, `gemini`, `azure`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            "gemini" => Some(Self::Gemini),
            "azure" => Some(Self::Azure),
            _ => None,
        }
    }
}

/// How the mock behaves when a request does not say otherwise.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// The API its errors and key checks follow (and, for Azure, its paths).
    pub protocol: MockProtocol,
    /// Name reported in `x-mock-upstream` and in replies, to tell mocks apart.
    pub name: String,
    /// Content chunks in a streamed reply (also the words of a plain reply).
    pub chunks: usize,
    /// Pause between streamed chunks.
    pub interval: Duration,
    pub fault: Option<Fault>,
    /// Inject `fault` into this many requests only, then answer normally (`None`: every one).
    pub fault_limit: Option<usize>,
    /// Keys the mock accepts; empty accepts any (or none).
    pub keys: Vec<String>,
    /// Keep the last requests for `/_mock/requests` and [`MockServer::requests`].
    pub record: bool,
    /// Accept only tokens issued by `POST /_mock/token` (and not revoked).
    pub require_token: bool,
    /// `expires_in` of issued tokens, in seconds.
    pub token_ttl: u64,
    pub models: Vec<String>,
    /// HTTP/2 streams one connection may carry at once (`SETTINGS_MAX_CONCURRENT_STREAMS`),
    /// read when the mock starts: a small limit plays a provider that caps its streams.
    pub max_streams: u32,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            protocol: MockProtocol::OpenAi,
            name: "mock".into(),
            chunks: 8,
            interval: Duration::ZERO,
            fault: None,
            fault_limit: None,
            keys: Vec::new(),
            record: true,
            require_token: false,
            token_ttl: 3600,
            models: [
                "gpt-4o-mini",
                "gpt-4o",
                "text-embedding-3-small",
                "whisper-1",
                "tts-1",
                "dall-e-3",
            ]
            .map(String::from)
            .to_vec(),
            max_streams: MAX_STREAMS,
        }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

const RECORD_LIMIT: usize = 1000;

/// Shared state of one mock server.
#[derive(Debug, Default)]
pub struct MockState {
    pub options: Mutex<MockOptions>,
    recorded: Mutex<VecDeque<Recorded>>,
    files: Mutex<HashMap<String, StoredFile>>,
    batches: Mutex<HashMap<String, Value>>,
    tokens: Mutex<std::collections::HashSet<String>>,
    /// Tokens issued by `POST /_mock/token`.
    pub tokens_issued: AtomicUsize,
    next_id: AtomicUsize,
    /// Faults injected so far, against `fault_limit`.
    faults: AtomicUsize,
    /// Requests answered (faults included).
    pub requests: AtomicUsize,
    pub streams_started: AtomicUsize,
    pub streams_finished: AtomicUsize,
    /// Streams whose reader went away before the end.
    pub streams_cancelled: AtomicUsize,
    /// Realtime sessions opened, and ended (by either side).
    pub realtime_opened: AtomicUsize,
    pub realtime_closed: AtomicUsize,
    /// Connections accepted (TLS handshakes included), and those still open.
    pub connections: AtomicUsize,
    pub connections_open: AtomicUsize,
}

#[derive(Debug, Clone)]
struct StoredFile {
    object: Value,
    content: Bytes,
}

impl MockState {
    pub fn new(options: MockOptions) -> Arc<Self> {
        Arc::new(Self {
            options: Mutex::new(options),
            // IDs differ between mocks, as an upstream's own objects do.
            next_id: AtomicUsize::new(fastrand::usize(..1 << 20) << 10),
            ..Self::default()
        })
    }

    fn options(&self) -> MockOptions {
        self.options.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn next_id(&self) -> usize {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// A mock running on its own task, for tests.
#[derive(Debug, Clone)]
pub struct MockServer {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
}

impl MockServer {
    /// Starts a mock on an ephemeral loopback port.
    pub async fn start(options: MockOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = MockState::new(options);
        tokio::spawn(run(listener, state.clone()));
        Ok(Self { addr, state })
    }

    /// Starts a mock speaking TLS (ALPN `h2, http/1.1`) on an ephemeral loopback port.
    pub async fn start_tls(options: MockOptions, tls: Tls) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = MockState::new(options);
        tokio::spawn(run_tls(listener, state.clone(), Some(tls)));
        Ok(Self { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests()
    }

    pub fn last(&self) -> Option<Recorded> {
        self.state.recorded.lock().ok()?.back().cloned()
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        if let Ok(mut options) = self.state.options.lock() {
            options.fault = fault;
        }
    }

    pub fn configure(&self, change: impl FnOnce(&mut MockOptions)) {
        if let Ok(mut options) = self.state.options.lock() {
            change(&mut options);
        }
    }

    pub fn count(&self, counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

/// Serves the mock on `listener` forever.
pub async fn run(listener: TcpListener, state: Arc<MockState>) {
    run_tls(listener, state, None).await;
}

/// Serves the mock on `listener` forever, over TLS when `tls` is given.
pub async fn run_tls(listener: TcpListener, state: Arc<MockState>, tls: Option<Tls>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(state.options().max_streams)
        .initial_connection_window_size(16 << 20);
    let builder = Arc::new(builder);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            state.connections.fetch_add(1, Ordering::SeqCst);
            state.connections_open.fetch_add(1, Ordering::SeqCst);
            let counted = state.clone();
            let service = service_fn(move |request| handle(state.clone(), request));
            match tls {
                None => {
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                }
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                }
            }
            counted.connections_open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Streams one HTTP/2 connection to the mock may carry at once unless told otherwise:
/// many, since a benchmark holds thousands on one.
const MAX_STREAMS: u32 = 100_000;

/// Returned as a service error so hyper drops the connection (the `drop` fault).
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock dropped the connection")
    }
}

impl std::error::Error for DropConnection {}

/// What one request asks of the mock, options merged with its `x-mock-*` headers.
struct Plan {
    name: String,
    chunks: usize,
    interval: Duration,
    fault: Option<Fault>,
    /// Report token usage (`x-mock-usage: none` plays an upstream that never does).
    usage: bool,
    protocol: MockProtocol,
}

async fn handle(
    state: Arc<MockState>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, DropConnection> {
    if realtime::is_upgrade(&request) {
        return Ok(realtime::accept(&state, &mut request));
    }
    let (mut parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Err(DropConnection),
    };
    let options = state.options();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let mut plan = Plan {
        name: options.name.clone(),
        chunks: header("x-mock-chunks")
            .and_then(|v| v.parse().ok())
            .unwrap_or(options.chunks),
        interval: header("x-mock-interval-ms")
            .and_then(|v| v.parse().ok())
            .map_or(options.interval, Duration::from_millis),
        fault: header("x-mock-fault").map_or(options.fault, Fault::parse),
        usage: header("x-mock-usage") != Some("none"),
        protocol: options.protocol,
    };
    let path = parts.uri.path().to_string();
    if path.starts_with("/_mock/") {
        return Ok(control(&state, &parts.method, &path));
    }
    if let (Some(limit), None) = (options.fault_limit, header("x-mock-fault")) {
        if plan.fault.is_some() && state.faults.fetch_add(1, Ordering::SeqCst) >= limit {
            plan.fault = None;
        }
    }
    state.requests.fetch_add(1, Ordering::Relaxed);
    if options.record {
        if let Ok(mut recorded) = state.recorded.lock() {
            if recorded.len() >= RECORD_LIMIT {
                recorded.pop_front();
            }
            recorded.push_back(Recorded {
                method: parts.method.clone(),
                path: path.clone(),
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
        }
    }

    match plan.fault {
        Some(Fault::ServerError) => {
            return Ok(finish(
                plan.error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "mock upstream failure",
                ),
                &plan,
                &state,
            ));
        }
        Some(Fault::RateLimited { retry_after }) => {
            let mut response = plan.error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "mock upstream rate limit",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return Ok(finish(response, &plan, &state));
        }
        Some(Fault::ContextLength) => {
            let response = error(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                "This model's maximum context length is 8 tokens (mock).",
            );
            return Ok(finish(response, &plan, &state));
        }
        Some(Fault::SlowFirstByte(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Drop) => return Err(DropConnection),
        _ => {}
    }

    // Each API's own key header; a bearer token works everywhere (OAuth, Vertex, Entra).
    let own = match options.protocol {
        MockProtocol::OpenAi => None,
        MockProtocol::Anthropic => header("x-api-key"),
        MockProtocol::Gemini => header("x-goog-api-key"),
        MockProtocol::Azure => header("api-key"),
    };
    let presented = own.or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")));
    let token_ok =
        || presented.is_some_and(|t| state.tokens.lock().is_ok_and(|tokens| tokens.contains(t)));
    let key_ok = || presented.is_some_and(|key| options.keys.iter().any(|k| k == key));
    let guarded = !options.keys.is_empty() || options.require_token;
    if guarded && !(key_ok() || (options.require_token && token_ok())) {
        return Ok(finish(
            plan.error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "Incorrect API key provided (mock).",
            ),
            &plan,
            &state,
        ));
    }

    let body = if options.protocol == MockProtocol::Azure {
        match azure::translate(&parts, &body, &options.models) {
            Ok(translated) => {
                parts.uri = translated.uri;
                translated.body
            }
            Err(response) => return Ok(finish(*response, &plan, &state)),
        }
    } else {
        body
    };
    let response = responses::route(&state, &plan, &parts, body);
    Ok(finish(response, &plan, &state))
}

/// Headers a real provider sends and clients read, so tests can see them pass through.
fn finish(mut response: Response<Body>, plan: &Plan, state: &MockState) -> Response<Body> {
    let id = state.next_id();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("req_mock_{id}")) {
        headers.insert("x-request-id", value);
    }
    if let Ok(value) = HeaderValue::from_str(&plan.name) {
        headers.insert("x-mock-upstream", value);
    }
    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
    headers.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from_static("10000"),
    );
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("9999"),
    );
    response
}

impl Plan {
    /// An error in the mock's protocol.
    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response<Body> {
        match self.protocol {
            MockProtocol::OpenAi | MockProtocol::Azure => error(status, code, message),
            MockProtocol::Anthropic => json_response(
                status,
                &crate::protocol::translate::anthropic::error_value(status.as_u16(), message),
            ),
            MockProtocol::Gemini => {
                let gemini_status = match status.as_u16() {
                    401 => "UNAUTHENTICATED",
                    429 => "RESOURCE_EXHAUSTED",
                    404 => "NOT_FOUND",
                    400 => "INVALID_ARGUMENT",
                    _ => "INTERNAL",
                };
                json_response(
                    status,
                    &json!({"error": {"code": status.as_u16(), "message": message, "status": gemini_status}}),
                )
            }
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let kind = match status.as_u16() {
        400 | 401 => "invalid_request_error",
        429 => "requests",
        _ => "server_error",
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

/// `/_mock/requests` lists what was recorded; `/_mock/reset` forgets it; `/_mock/stats`
/// reports the stream counters.
fn control(state: &MockState, method: &Method, path: &str) -> Response<Body> {
    match (method, path) {
        (&Method::GET, "/_mock/requests") => {
            let list: Vec<Value> = state
                .requests()
                .iter()
                .map(|r| {
                    let headers: serde_json::Map<String, Value> = r
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                            )
                        })
                        .collect();
                    json!({
                        "method": r.method.as_str(),
                        "path": r.path,
                        "query": r.query,
                        "headers": headers,
                        "body": String::from_utf8_lossy(&r.body),
                    })
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "requests": list }))
        }
        (&Method::POST, "/_mock/token") => {
            let ttl = state.options().token_ttl;
            let number = state.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
            let token = format!("tok-mock-{number}");
            if let Ok(mut tokens) = state.tokens.lock() {
                tokens.insert(token.clone());
            }
            json_response(
                StatusCode::OK,
                &json!({"data": {"token": token, "expires_in": ttl}}),
            )
        }
        (&Method::POST, "/_mock/revoke") => {
            if let Ok(mut tokens) = state.tokens.lock() {
                tokens.clear();
            }
            json_response(StatusCode::OK, &json!({"revoked": true}))
        }
        (&Method::POST, "/_mock/reset") => {
            if let Ok(mut recorded) = state.recorded.lock() {
                recorded.clear();
            }
            json_response(StatusCode::OK, &json!({"reset": true}))
        }
        (&Method::GET, "/_mock/stats") => json_response(
            StatusCode::OK,
            &json!({
                "requests": state.requests.load(Ordering::SeqCst),
                "streams_started": state.streams_started.load(Ordering::SeqCst),
                "streams_finished": state.streams_finished.load(Ordering::SeqCst),
                "streams_cancelled": state.streams_cancelled.load(Ordering::SeqCst),
                "realtime_opened": state.realtime_opened.load(Ordering::SeqCst),
                "realtime_closed": state.realtime_closed.load(Ordering::SeqCst),
                "connections": state.connections.load(Ordering::SeqCst),
                "connections_open": state.connections_open.load(Ordering::SeqCst),
            }),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "unknown_url",
            "unknown mock control path",
        ),
    }
}

/// A response with the given content type and bytes.
fn bytes_response(content_type: &'static str, bytes: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(bytes));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
