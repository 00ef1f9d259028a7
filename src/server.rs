//! The listener: accepts connections, serves HTTP/1.1 on each, and dispatches a request to
//! health, models or the proxy. Shutdown stops accepting and lets open exchanges finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::access::{Caller, client_ip};
use crate::body::{Body, json_response};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::limits::unix_now;
use crate::{admin, models, proxy};

/// How long open exchanges may run on after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves the gateway on `listener` until `shutdown` resolves, then drains open
/// connections for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
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
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
        let gateway = gateway.clone();
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok::<_, Infallible>(handle(&gateway, peer, request).await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, "connection ended with an error: {error}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; closing open connections"),
    }
    Ok(())
}

/// Answers one request.
pub async fn handle(
    gateway: &Gateway,
    peer: SocketAddr,
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
        return error.into_response();
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
        (&Method::GET, "/v1/status") => admin::status(gateway, request.headers(), client).await,
        (_, r) if r == "/v1" || r.starts_with("/v1/") => {
            let (parts, body) = request.into_parts();
            let mut record = gateway.start_record(client, &parts, &route);
            let caller = match gateway.guard.authenticate(&parts.headers) {
                Ok(caller) => caller,
                Err(error) => {
                    gateway.record_error(record, &error);
                    return error.into_response();
                }
            };
            if let Some(record) = record.as_mut() {
                record.key_label = caller.label().to_string();
            }
            if let Caller::Gateway(key) = &caller {
                if let Err(error) = gateway.limiter.admit_key(key, unix_now()) {
                    gateway.record_error(record, &error);
                    return error.into_response();
                }
                if let Some(record) = record.as_mut() {
                    record.key = Some(key.clone());
                    record.counted = true;
                }
            }
            if parts.method == Method::GET && route == "/v1/models" {
                models::list(gateway, caller, parts, body, &route, record).await
            } else {
                proxy::forward(gateway, caller, parts, body, &route, record).await
            }
        }
        (_, r) if r == "/api" || r.starts_with("/api/") => {
            admin::api(gateway, request, &route, client).await
        }
        (method, _) => unknown_route(method, path),
    }
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
    match tokio::task::spawn_blocking(move || store.ping()).await {
        Ok(Ok(())) => json_response(StatusCode::OK, &json!({"status": "ready", "storage": "ok"})),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "storage_unavailable",
            "storage does not answer",
        )
        .into_response(),
    }
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
