//! The listener: accepts connections, serves HTTP/1.1 and HTTP/2 on each (told apart by
//! the client's first bytes: h2c by prior knowledge, or h2 by ALPN under `server.tls`), and
//! dispatches a request to health, models or the proxy. Each connection is served by
//! hyper's builder for its protocol alone: a connection's task holds only that protocol's
//! state, so a held HTTP/1.1 stream does not carry room for HTTP/2's. Shutdown stops accepting and lets
//! open exchanges finish. Every connection gets the same guards whatever it speaks: the
//! per-address cap, a deadline for its first request, drain on shutdown; HTTP/2 adds a cap on
//! its streams and hyper's limits on header lists and reset floods.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::clock::now_us;

use crate::admin;
use crate::gateway::{Current, Gateway};
use crate::http::body::{Body, json_response};
use crate::http::error::ApiError;
use crate::http::tls::Tls;
use crate::pipeline::access::{Caller, client_ip};
use crate::pipeline::{forward, models, realtime};
use crate::protocol::ClientProtocol;
use crate::pure::limits::Reserve;

/// How long open exchanges may run on after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// An HTTP/1.1 request head must arrive within this; so must a connection's first request,
/// whatever it speaks (an HTTP/2 client that connects and sends nothing is closed).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP/2 header lists (decoded) past this are refused: HPACK lets a few bytes on the wire
/// stand for much more in memory.
const H2_MAX_HEADER_LIST: u32 = 64 << 10;
/// Streams a client may open and reset before sluice answers them, and streams sluice may
/// reset for a client's errors, before the connection is closed: the rapid-reset attack
/// (CVE-2023-44487) and its cousins cost the attacker the connection.
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_ERROR_RESETS: usize = 256;
/// Pings on an HTTP/2 connection, and how long one may go unanswered before the
/// connection is dropped: a client that vanished does not hold its streams.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Flow-control windows: what a client may send ahead of sluice reading it, per stream
/// and per connection. Bounded, so a client cannot make sluice buffer without end.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 4 << 20;

/// What a client speaking HTTP/2 by prior knowledge (h2c) sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The API; the dashboard and `/api/*` too unless `admin.listen` gives them their own.
    Gateway,
    /// Only the dashboard, `/api/*`, `/v1/status` and `/health` (`admin.listen`).
    Admin,
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains open
/// connections for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_as(listener, gateway, Role::Gateway, shutdown).await
}

/// [`serve`] for a listener of the given role.
pub async fn serve_as(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    role: Role,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_current(listener, Arc::new(Current::new(gateway)), role, shutdown).await
}

/// Serves whatever gateway `current` holds at each request, so a reload takes effect on
/// the next request without touching open ones. With `server.tls`, over TLS, its
/// certificate reloaded when its files change (see [`Tls::watch`]).
pub async fn serve_current(
    listener: TcpListener,
    current: Arc<Current>,
    role: Role,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let tls = current
        .load()
        .config
        .server
        .tls
        .as_ref()
        .map(Tls::new)
        .transpose()?;
    let watcher = tls.clone().map(|tls| tokio::spawn(tls.watch()));
    let served = serve_secured(listener, current, role, tls, shutdown).await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    served
}

/// [`serve_current`] with the TLS side given (`None`: plain HTTP), so listeners can share
/// one certificate and its watcher.
pub async fn serve_secured(
    listener: TcpListener,
    current: Arc<Current>,
    role: Role,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?.ip();
    // hyper-util's `GracefulShutdown` cannot watch a connection served with upgrades, so
    // draining is a watch channel of its own.
    let (drain, _) = tokio::sync::watch::channel(false);
    let busy_poll = BusyPoll::start(current.load().config.server.busy_poll);
    // Cooldowns and session pins other instances announce apply to whichever gateway is
    // in force when they arrive.
    let follower = match (role, current.load().shared_state.clone()) {
        (Role::Gateway, Some(shared)) => {
            let current = current.clone();
            Some(shared.follow(move |event| current.load().apply_shared_event(event)))
        }
        _ => None,
    };
    let per_ip = ConnectionsPerIp::default();
    let builders = Arc::new(EdgeBuilders::new(&current.load().config.server));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Running out of file descriptors must not spin or end the server.
                    tracing::warn!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = per_ip.admit(&current.load().config.server, peer.ip()) else {
            // Over TLS a plain-text answer would be noise: the connection is just closed.
            tokio::spawn(refuse_connection(stream, peer, tls.is_none()));
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
        let current = current.clone();
        let busy_poll = busy_poll.clone();
        // A realtime session outlives its connection's HTTP exchange: it takes a hold on
        // the address's slot with it, so the cap counts open sessions too, and watches
        // the drain, so shutdown closes it and waits for it.
        let slot = slot.map(Arc::new);
        let held = slot.clone();
        let session_drain = drain.subscribe();
        let first_request = Arc::new(AtomicBool::new(false));
        let asked = first_request.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            asked.store(true, Ordering::Relaxed);
            // Only HTTP/1.1 can switch protocols: HTTP/2 refuses the header.
            if request.headers().contains_key(http::header::UPGRADE) {
                request.extensions_mut().insert(realtime::HeldConnection {
                    slot: held
                        .clone()
                        .map(|slot| -> Arc<dyn std::any::Any + Send + Sync> { slot }),
                    draining: session_drain.clone(),
                });
            }
            let gateway = current.load();
            if let Some(busy_poll) = &busy_poll {
                busy_poll.touch();
            }
            // Boxed: hyper keeps a slot of the future's size for the connection's life, and
            // `handle`'s future is large; boxed, it is freed once the answer's head is out.
            Box::pin(async move {
                Ok::<_, Infallible>(handle(&gateway, peer, local, role, request).await)
            })
        });
        let connection = Connection {
            builders: builders.clone(),
            draining: drain.subscribe(),
            first_request,
            deadline: tokio::time::Instant::now() + HEADER_READ_TIMEOUT,
            peer,
        };
        match tls.clone() {
            // The plain connection's future is the task itself; the TLS one (rustls state,
            // a handshake) is boxed, so a plain connection's task is not sized for it.
            None => tokio::spawn(async move {
                connection.serve_plain(stream, service).await;
                drop(slot);
            }),
            Some(tls) => tokio::spawn(Box::pin(async move {
                match tls.accept(stream).await {
                    Ok(stream) => {
                        // ALPN chose the protocol; a client that offered none speaks HTTP/1.1
                        // (HTTP/2 over TLS needs ALPN, RFC 9113 §3.2).
                        let wire = match stream.get_ref().1.alpn_protocol() {
                            Some(b"h2") => Wire::Http2,
                            _ => Wire::Http1,
                        };
                        connection.serve(stream, wire, service).await;
                    }
                    Err(error) => tracing::debug!(%peer, "TLS handshake failed: {error}"),
                }
                drop(slot);
            })),
        };
    }
    drop(listener);
    if let Some(follower) = follower {
        follower.abort();
    }
    // Every connection is told to finish its exchange and close; each holds a receiver
    // until it has, so the sender is closed when the last one is.
    let _ = drain.send(true);
    tokio::select! {
        () = drain.closed() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; closing open connections"),
    }
    Ok(())
}

/// The two protocols a connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Http1,
    Http2,
}

/// hyper's connection builders for the edge, one per protocol, with the guards above.
struct EdgeBuilders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl EdgeBuilders {
    fn new(server: &crate::config::Server) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(server.http2_max_streams)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_ERROR_RESETS)
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_timeout(H2_KEEP_ALIVE)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW);
        Self { http1, http2 }
    }
}

/// What a plain connection speaks, by its first bytes, read without taking them: the
/// HTTP/2 preface, or anything else (HTTP/1.1, whose parser judges it). Waits for as many
/// bytes as it takes to tell; the caller's first-request deadline bounds the wait.
async fn sniff(stream: &TcpStream) -> std::io::Result<Wire> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let read = stream.peek(&mut first).await?;
        if read == 0 || first[..read] != H2_PREFACE[..read] {
            return Ok(Wire::Http1);
        }
        if read == H2_PREFACE.len() {
            return Ok(Wire::Http2);
        }
        // A part of the preface so far: the socket stays readable with those bytes, so
        // wait instead of peeking in a loop, longer each time (a client that stalls there
        // costs a few wake-ups a second until its deadline).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The service a connection hands each request to, as both protocols' builders need it.
trait EdgeService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> EdgeService for S where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// One accepted connection being served, TLS or not.
struct Connection {
    builders: Arc<EdgeBuilders>,
    /// Turns true when shutdown begins; held until the connection ends.
    draining: tokio::sync::watch::Receiver<bool>,
    /// Set by the service when a request arrives.
    first_request: Arc<AtomicBool>,
    /// A request must have come by then ([`HEADER_READ_TIMEOUT`] after the accept).
    deadline: tokio::time::Instant,
    peer: SocketAddr,
}

impl Connection {
    /// A plain connection: its protocol told by its first bytes, then served.
    async fn serve_plain(self, stream: TcpStream, service: impl EdgeService) {
        let mut draining = self.draining.clone();
        let told = tokio::select! {
            told = sniff(&stream) => told,
            () = async { drop(draining.wait_for(|draining| *draining).await) } => return,
            () = tokio::time::sleep_until(self.deadline) => {
                tracing::debug!(peer = %self.peer, "no request within {HEADER_READ_TIMEOUT:?}; closing");
                return;
            }
        };
        match told {
            Ok(wire) => self.serve(stream, wire, service).await,
            Err(error) => {
                tracing::debug!(peer = %self.peer, "connection ended with an error: {error}");
            }
        }
    }

    /// Serves the connection in `wire` until it ends. The HTTP/2 side is boxed, so the
    /// task of an HTTP/1.1 connection (most of them) is not sized for HTTP/2's state.
    async fn serve<IO>(self, io: IO, wire: Wire, service: impl EdgeService)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        match wire {
            Wire::Http1 => {
                // With upgrades, so a realtime session's connection can switch to WebSocket.
                let connection = self
                    .builders
                    .http1
                    .serve_connection(io, service)
                    .with_upgrades();
                self.drive(connection, http1::UpgradeableConnection::graceful_shutdown)
                    .await;
            }
            Wire::Http2 => {
                Box::pin(async {
                    let connection = self.builders.http2.serve_connection(io, service);
                    self.drive(connection, http2::Connection::graceful_shutdown)
                        .await;
                })
                .await;
            }
        }
    }

    /// Polls `connection` to its end: closed when no request came by the deadline
    /// ([`HEADER_READ_TIMEOUT`] after the accept), drained (HTTP/2: `GOAWAY`) when
    /// shutdown begins.
    async fn drive<C>(&self, connection: C, graceful_shutdown: fn(std::pin::Pin<&mut C>))
    where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        let mut draining = self.draining.clone();
        tokio::pin!(connection);
        let silent = async {
            tokio::time::sleep_until(self.deadline).await;
            if self.first_request.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = async { drop(draining.wait_for(|draining| *draining).await) } => {
                graceful_shutdown(connection.as_mut());
                connection.await
            }
            () = silent => {
                tracing::debug!(peer = %self.peer, "no request within {HEADER_READ_TIMEOUT:?}; closing");
                Ok(())
            }
        };
        if let Err(error) = ended {
            tracing::debug!(peer = %self.peer, "connection ended with an error: {error}");
        }
    }
}

/// Open connections per client address, so one address cannot take every file descriptor.
#[derive(Debug, Default, Clone)]
struct ConnectionsPerIp(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

/// One open connection of an address; closing it (dropping this) frees its place.
struct ConnectionSlot {
    counts: ConnectionsPerIp,
    ip: std::net::IpAddr,
}

impl ConnectionsPerIp {
    /// A place for a new connection from `ip` under `server`'s cap: `Ok(None)` when the
    /// cap does not apply (off, or a trusted proxy), `Err` when the address is at it.
    fn admit(
        &self,
        server: &crate::config::Server,
        ip: std::net::IpAddr,
    ) -> Result<Option<ConnectionSlot>, ()> {
        let cap = server.max_connections_per_ip;
        if cap == 0 || server.trusted_proxies.iter().any(|net| net.contains(&ip)) {
            return Ok(None);
        }
        self.open(ip, cap).map(Some).ok_or(())
    }

    /// A place for a new connection from `ip`, or `None` if it holds `cap` already.
    fn open(&self, ip: std::net::IpAddr, cap: usize) -> Option<ConnectionSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over its address's cap with a 429 and closes it (closes it alone
/// when `answer` is false: over TLS).
async fn refuse_connection(mut stream: tokio::net::TcpStream, peer: SocketAddr, answer: bool) {
    use tokio::io::AsyncWriteExt;
    static WARN: crate::clock::Throttle = crate::clock::Throttle::new(Duration::from_secs(10));
    if WARN.ready() {
        tracing::warn!(client = %peer.ip(), "too many open connections from one address; refusing more (server.max_connections_per_ip)");
    }
    if !answer {
        return;
    }
    let body = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "too_many_connections",
        "too many open connections from this address",
    )
    .to_json();
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Busy polling: after each request a task keeps the worker polling for `window` instead
/// of letting it sleep, so the next packet is seen without the wake-up latency of an idle
/// core (tens of microseconds in a VM). It costs CPU only while requests keep coming.
#[derive(Debug)]
struct BusyPoll {
    window_us: u64,
    last_us: AtomicU64,
    activity: Notify,
}

impl BusyPoll {
    fn start(window: Duration) -> Option<Arc<Self>> {
        if window.is_zero() {
            return None;
        }
        let busy = Arc::new(Self {
            window_us: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
            last_us: AtomicU64::new(0),
            activity: Notify::new(),
        });
        let spinner = busy.clone();
        tokio::spawn(async move {
            loop {
                spinner.activity.notified().await;
                while now_us().saturating_sub(spinner.last_us.load(Ordering::Relaxed))
                    < spinner.window_us
                {
                    // Yielding lets the runtime poll its I/O driver without parking.
                    tokio::task::yield_now().await;
                }
            }
        });
        Some(busy)
    }

    fn touch(&self) {
        self.last_us.store(now_us(), Ordering::Relaxed);
        self.activity.notify_one();
    }
}

/// Answers one request.
pub async fn handle(
    gateway: &Gateway,
    peer: SocketAddr,
    local: std::net::IpAddr,
    role: Role,
    request: Request<Incoming>,
) -> Response<Body> {
    // Browser clients (chat front ends calling the API directly) need CORS.
    let origin =
        crate::http::cors::allowed_origin(&gateway.config.server.cors_origins, request.headers());
    if let Some(origin) = &origin {
        if request.method() == Method::OPTIONS {
            return crate::http::cors::preflight(origin, request.headers());
        }
    }
    let mut response = respond(gateway, peer, local, role, request).await;
    if let Some(origin) = origin {
        crate::http::cors::decorate(&mut response, origin);
    }
    response
}

/// The accept stage: liveness, IP rules and path checks, then the route: dashboard and
/// admin API, `/metrics`, readiness and status, or an API request.
async fn respond(
    gateway: &Gateway,
    peer: SocketAddr,
    local: std::net::IpAddr,
    role: Role,
    request: Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path();
    // Liveness stays answerable for load balancers whatever the IP rules say.
    if path == "/health" {
        return health();
    }
    let client = client_ip(
        &gateway.config.server.trusted_proxies,
        peer.ip(),
        request.headers(),
    );
    if let Err(error) = gateway.guard.check_ip(client) {
        return ClientProtocol::of_path(api_route(gateway, path)).error_response(error);
    }
    if !is_plain_path(path) {
        return refuse_path(gateway, client, request);
    }
    let dashboard_here = role == Role::Admin || gateway.config.admin.listen.is_none();
    if dashboard_here
        && (path == "/"
            || path == "/login"
            || path == "/favicon.ico"
            || path.starts_with("/assets/")
            || path == "/api"
            || path.starts_with("/api/"))
    {
        return admin::handle(gateway, request, client, local).await;
    }
    if path == "/metrics" && request.method() == Method::GET {
        return metrics(gateway, &request, client, local);
    }
    if role == Role::Admin {
        return match (request.method(), path) {
            (&Method::GET, "/v1/status") => {
                admin::status(gateway, request.headers(), client, local).await
            }
            (method, _) => unknown_route(method, path),
        };
    }
    let prefix = gateway.config.server.route_prefix.as_str();
    let Some(route) = path
        .strip_prefix(prefix)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    else {
        return unknown_route(request.method(), path);
    };
    let route = route.to_string();
    match (request.method(), route.as_str()) {
        (&Method::GET, "/health") => health(),
        (&Method::GET, "/ready") => ready(gateway).await,
        (&Method::GET, "/v1/status") => {
            admin::status(gateway, request.headers(), client, local).await
        }
        (_, r) if r == "/v1" || r.starts_with("/v1/") => {
            let mut response = api(gateway, client, request, route).await;
            // With the cache on, every API answer says what it did (`skip` if nothing).
            if gateway.cache.is_some() {
                let headers = response.headers_mut();
                if !headers.contains_key(crate::pipeline::cached::CACHE_HEADER) {
                    headers.insert(
                        crate::pipeline::cached::CACHE_HEADER,
                        http::HeaderValue::from_static("skip"),
                    );
                }
            }
            response
        }
        (method, _) => unknown_route(method, path),
    }
}

/// Refuses a path with a dot segment, an encoded slash or an encoded control character:
/// `..` (plain or encoded) would lift a forwarded path above the upstream's base URL, where
/// other tenants' or admin endpoints may live, and no API path needs one. API requests so
/// refused are logged like every other.
fn refuse_path(
    gateway: &Gateway,
    client: std::net::IpAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let error = ApiError::bad_request(
        "invalid_path",
        "the path has a dot segment (`.` or `..`, plain or percent-encoded), an encoded \
         slash or an encoded control character; send the path without them",
    );
    let path = request.uri().path();
    let route = api_route(gateway, path);
    let protocol = ClientProtocol::of_path(route);
    if route == "/v1" || route.starts_with("/v1/") {
        let route = route.to_string();
        let (parts, _) = request.into_parts();
        gateway.record_error(gateway.start_record(client, &parts, &route), &error);
    }
    protocol.error_response(error)
}

/// The path without the route prefix (the path itself when it lacks the prefix).
fn api_route<'p>(gateway: &Gateway, path: &'p str) -> &'p str {
    path.strip_prefix(gateway.config.server.route_prefix.as_str())
        .unwrap_or(path)
}

/// `/metrics` for the admin: Prometheus text from the log's series and live gauges.
fn metrics(
    gateway: &Gateway,
    request: &Request<Incoming>,
    client: std::net::IpAddr,
    local: std::net::IpAddr,
) -> Response<Body> {
    match admin::authorize(gateway, request.headers(), client, local) {
        Ok(true) => {
            let mut response = Response::new(crate::http::body::full(
                crate::observe::metrics::render(&gateway.metrics, &metrics_gauges(gateway)),
            ));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Ok(false) => ApiError::unauthorized(
            "invalid_admin_key",
            "/metrics needs the admin key (Authorization: Bearer ADMIN_KEY)",
        )
        .into_response(),
        Err(error) => error.into_response(),
    }
}

/// The authenticate stage of an API request: room in the log (with back-pressure), its
/// record started, the caller's key turned into a [`Caller`]; then `GET /v1/models` is
/// answered from the config (the key admitted alone) and everything else is forwarded.
async fn api(
    gateway: &Gateway,
    client: std::net::IpAddr,
    request: Request<Incoming>,
    route: String,
) -> Response<Body> {
    if let Some(recorder) = &gateway.recorder {
        // Only with `storage.overflow: backpressure` does this ever wait.
        if let Err(error) = recorder.wait_for_room().await {
            return ClientProtocol::of_path(&route).error_response(error);
        }
    }
    let protocol = ClientProtocol::of_path(&route);
    let (mut parts, body) = request.into_parts();
    let realtime = realtime::is_upgrade(&parts, &route);
    if realtime {
        // Before the record copies the headers: a browser's key is in a subprotocol.
        realtime::key_from_subprotocol(&mut parts.headers);
    }
    let mut record = gateway.start_record(client, &parts, &route);
    let caller = match gateway.guard.authenticate(&parts.headers) {
        Ok(caller) => caller,
        Err(error) => {
            gateway.record_error(record, &error);
            return protocol.error_response(error);
        }
    };
    if let Some(record) = record.as_mut() {
        record.key_label = caller.label().to_string();
    }
    if realtime {
        return realtime::open(gateway, caller, parts, body, &route, record).await;
    }
    if parts.method != Method::GET || route != "/v1/models" {
        return forward::forward(gateway, caller, parts, body, &route, record).await;
    }
    // Answered here: the key is admitted alone. Forwarded requests admit it with the
    // upstream they try (one round trip when limits are shared).
    if let Caller::Gateway(key) = &caller {
        let ticket = match gateway.admit(Some((key, Reserve::default())), None).await {
            Ok((ticket, _)) => ticket,
            Err(error) => {
                gateway.record_error(record, &error);
                return error.into_response();
            }
        };
        if let Some(record) = record.as_mut() {
            record.admitted(key, ticket);
        }
    }
    models::list(gateway, caller, parts, body, &route, record).await
}

/// Ready when the config is loaded (it is, or sluice would not run) and storage answers.
async fn ready(gateway: &Gateway) -> Response<Body> {
    let Some(recorder) = &gateway.recorder else {
        return json_response(
            StatusCode::OK,
            &json!({"status": "ready", "storage": "off"}),
        );
    };
    let store = recorder.store.clone();
    let reason = match tokio::task::spawn_blocking(move || store.ping()).await {
        Ok(Ok(())) => {
            return json_response(StatusCode::OK, &json!({"status": "ready", "storage": "ok"}));
        }
        Ok(Err(error)) => match crate::store::unavailable(&error) {
            Some(unavailable) => format!("storage does not answer: {unavailable}"),
            None => "storage does not answer".to_string(),
        },
        Err(_) => "storage does not answer".to_string(),
    };
    let queued = recorder
        .stats
        .queued
        .load(std::sync::atomic::Ordering::Relaxed);
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "storage_unavailable",
        format!("{reason} ({queued} log records queued meanwhile)"),
    )
    .into_response()
}

/// Whether no segment of `path`, percent-decoded, is `.` or `..` or holds a slash, a
/// backslash or a control character (NUL among them): what reaches an upstream is always
/// below its base URL, and means the same to every server on the way.
pub fn is_plain_path(path: &str) -> bool {
    path.split('/').all(|segment| {
        if !segment.contains(['%', '.', '\\']) && !segment.chars().any(char::is_control) {
            return true;
        }
        let decoded = percent_decode(segment);
        decoded != b"."
            && decoded != b".."
            && !decoded
                .iter()
                .any(|b| matches!(b, b'/' | b'\\') || b.is_ascii_control())
    })
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(value).unwrap_or(b'%'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn health() -> Response<Body> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

fn unknown_route(method: &Method, path: &str) -> Response<Body> {
    ApiError::not_found(
        "unknown_url",
        format!("Unknown request URL: {method} {path}."),
    )
    .into_response()
}

/// The live figures `/metrics` shows beside its series, read from the gateway in force.
fn metrics_gauges(gateway: &Gateway) -> crate::observe::metrics::Gauges<'_> {
    use crate::observe::metrics::{Gauges, UpstreamGauge};
    let clock = crate::clock::now_ms();
    let upstreams = gateway
        .upstreams
        .iter()
        .map(|upstream| UpstreamGauge {
            name: &upstream.config.name,
            in_flight: upstream.in_flight.load(Ordering::Relaxed),
            resting: upstream.is_cooling(clock),
        })
        .collect();
    Gauges {
        upstreams,
        admin_auth_failures: gateway.admin_auth.failures(),
        admin_lockouts: gateway.admin_auth.lockouts(),
        admin_auth_refused: gateway.admin_auth.refused(),
        log: gateway.recorder.as_ref().map(|r| r.stats.gauges()),
        access_dropped: gateway
            .access
            .as_ref()
            .map(|a| a.dropped.load(Ordering::Relaxed)),
        alerts_dropped: gateway
            .alerts
            .as_ref()
            .map(|a| a.dropped.load(Ordering::Relaxed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `sniff` makes of a connection whose client writes `parts`, a pause between.
    async fn sniffed(parts: &[&'static [u8]]) -> Wire {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let parts = parts.to_vec();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            for part in parts {
                stream.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Then it leaves.
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        let wire = sniff(&server).await.unwrap();
        client.await.unwrap();
        wire
    }

    #[tokio::test]
    async fn the_h2_preface_is_told_apart_even_in_pieces_and_nothing_else_is_h2() {
        assert_eq!(sniffed(&[H2_PREFACE]).await, Wire::Http2);
        assert_eq!(
            sniffed(&[&H2_PREFACE[..5], &H2_PREFACE[5..11], &H2_PREFACE[11..]]).await,
            Wire::Http2
        );
        assert_eq!(
            sniffed(&[b"GET /health HTTP/1.1\r\n\r\n"]).await,
            Wire::Http1
        );
        assert_eq!(
            sniffed(&[b"PRI", b" * HTTP/1.1\r\n\r\n"]).await,
            Wire::Http1
        );
        assert_eq!(sniffed(&[b"POST"]).await, Wire::Http1);
        // A client that connects and leaves: HTTP/1.1's parser sees the end.
        assert_eq!(sniffed(&[]).await, Wire::Http1);
    }

    #[test]
    fn dot_segments_and_encoded_slashes_are_not_plain() {
        for path in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl/content",
            "/v1/models/ft:gpt-4o:org:x..y",
            "/v1/models/a%20b",
            "/",
        ] {
            assert!(is_plain_path(path), "{path}");
        }
        for path in [
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/%2e%2e/tenant-b/admin",
            "/v1/%2E%2e/x",
            "/v1/.%2e/x",
            "/v1/x/..",
            "/v1/a%2fb",
            "/v1/a%5C..%5Cb",
            "/v1/a\\b",
            "/v1/chat/completions%00",
            "/v1/files/file-abc%0a/content",
            "/v1/x%7f",
        ] {
            assert!(!is_plain_path(path), "{path}");
        }
    }
}
