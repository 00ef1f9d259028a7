//! The admin API (`/api/*`) and the usage report (`/v1/status`).
//!
//! `/api/*` needs the admin key (`Authorization: Bearer …` or `x-admin-key`) or a dashboard
//! session cookie; with no admin key configured it answers loopback clients on a loopback
//! listener only. `/v1/status` shows everything to the
//! admin and, to a gateway key, that key's own limits and use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::access::{Caller, presented_key};
use crate::body::{Body, json_response};
use crate::clock::now_ms;
use crate::config::{GatewayKey, Limits};
use crate::dashboard;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::limits::{Period, Usage, key_scope, unix_now, upstream_scope};
use crate::store::ListQuery;

/// The OpenAPI document of the admin API.
pub const OPENAPI: &str = include_str!("admin/openapi.json");

/// Whether a request is the admin's: it carries the admin key or a dashboard session; or,
/// with no admin key configured, it comes from loopback to a loopback listener.
pub fn is_admin(gateway: &Gateway, headers: &HeaderMap, client: IpAddr, local: IpAddr) -> bool {
    match &gateway.config.admin.key {
        Some(key) => {
            if dashboard::session_token(headers)
                .is_some_and(|token| gateway.sessions.is_valid(token))
            {
                return true;
            }
            let presented = headers
                .get("x-admin-key")
                .and_then(|v| v.to_str().ok())
                .or_else(|| presented_key(headers));
            presented.is_some_and(|p| constant_time_eq(p.as_bytes(), key.expose().as_bytes()))
        }
        None => open_without_key(client, local),
    }
}

/// Without an admin key, the admin side is open only on loopback, to loopback clients.
fn open_without_key(client: IpAddr, local: IpAddr) -> bool {
    client.to_canonical().is_loopback() && local.to_canonical().is_loopback()
}

/// The dashboard and the admin API: `/`, `/assets/*`, `/api/*`.
pub async fn dashboard(
    gateway: &Gateway,
    request: Request<Incoming>,
    client: IpAddr,
    local: IpAddr,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    if let Some(name) = path.strip_prefix("/assets/") {
        return dashboard::asset(name).unwrap_or_else(|| {
            ApiError::not_found("unknown_url", "no such asset").into_response()
        });
    }
    if gateway.config.admin.key.is_none() && !open_without_key(client, local) {
        return ApiError::forbidden(
            "dashboard_off",
            "the dashboard and admin API need admin.key when not bound to loopback",
        )
        .into_response();
    }
    let admin = is_admin(gateway, request.headers(), client, local);
    match (request.method(), path.as_str()) {
        (&Method::GET, "/") => dashboard::index(admin),
        (&Method::POST, "/api/login") => login(gateway, request).await,
        (&Method::POST, "/api/logout") => {
            if let Some(token) = dashboard::session_token(request.headers()) {
                gateway.sessions.end(token);
            }
            let mut response = json_response(StatusCode::OK, &json!({"ok": true}));
            response
                .headers_mut()
                .insert(http::header::SET_COOKIE, dashboard::cookie(None));
            response
        }
        (&Method::GET, "/api/session") if admin => {
            json_response(StatusCode::OK, &json!({"ok": true}))
        }
        (&Method::GET, "/api/session") => unauthorized(),
        _ => api(gateway, request, &path, admin).await,
    }
}

/// `POST /api/login` with `{"key": "…"}` (or a form field `key`): sets the session cookie.
async fn login(gateway: &Gateway, request: Request<Incoming>) -> Response<Body> {
    let Some(admin_key) = &gateway.config.admin.key else {
        return json_response(
            StatusCode::OK,
            &json!({"ok": true, "note": "no admin key is configured"}),
        );
    };
    let body = match crate::proxy::read_body(request.into_body(), 4096).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let presented = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("key").and_then(Value::as_str).map(str::to_string))
        .or_else(|| {
            serde_urlencoded::from_bytes::<HashMap<String, String>>(&body)
                .ok()
                .and_then(|mut form| form.remove("key"))
        })
        .unwrap_or_default();
    if !constant_time_eq(presented.as_bytes(), admin_key.expose().as_bytes()) {
        // Slows guessing without holding anything but this request.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        return unauthorized();
    }
    let Some(token) = gateway.sessions.create() else {
        return ApiError::internal("cannot create a session").into_response();
    };
    let mut response = json_response(StatusCode::OK, &json!({"ok": true}));
    response
        .headers_mut()
        .insert(http::header::SET_COOKIE, dashboard::cookie(Some(&token)));
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized() -> Response<Body> {
    ApiError::unauthorized(
        "invalid_admin_key",
        "this needs the admin key (Authorization: Bearer ADMIN_KEY)",
    )
    .into_response()
}

/// `/api/*`.
async fn api(
    gateway: &Gateway,
    request: Request<Incoming>,
    route: &str,
    admin: bool,
) -> Response<Body> {
    if route == "/api/openapi.json" {
        let mut response = Response::new(crate::body::full(OPENAPI));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return response;
    }
    if !admin {
        return unauthorized();
    }
    if request.method() != Method::GET {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "only GET is served here",
        )
        .into_response();
    }
    let Some(recorder) = &gateway.recorder else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "storage_off",
            "storage is off (storage.url: none)",
        )
        .into_response();
    };
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
        .unwrap_or_default();
    let store = recorder.store.clone();
    let result = match route {
        "/api/requests" => {
            let list = match list_query(&query) {
                Ok(list) => list,
                Err(error) => return error.into_response(),
            };
            tokio::task::spawn_blocking(move || {
                store
                    .list(&list)
                    .map(|page| serde_json::to_value(page).unwrap_or_default())
            })
            .await
        }
        "/api/stats" => {
            let now = crate::limits::unix_now_ms();
            let from = match time_param(&query, "from") {
                Ok(from) => from.unwrap_or(now - 30 * 86_400_000),
                Err(error) => return error.into_response(),
            };
            let to = match time_param(&query, "to") {
                Ok(to) => to.unwrap_or(now),
                Err(error) => return error.into_response(),
            };
            tokio::task::spawn_blocking(move || store.stats(from, to, now)).await
        }
        _ => match route.strip_prefix("/api/requests/") {
            Some(id) if !id.is_empty() && !id.contains('/') => {
                let id = id.to_string();
                let found = tokio::task::spawn_blocking(move || store.get(&id)).await;
                match found {
                    Ok(Ok(None)) => {
                        return ApiError::not_found(
                            "request_not_found",
                            "no such request in the log",
                        )
                        .into_response();
                    }
                    other => other.map(|r| r.map(Option::unwrap_or_default)),
                }
            }
            _ => {
                return ApiError::not_found("unknown_url", format!("Unknown admin URL: {route}"))
                    .into_response();
            }
        },
    };
    match result {
        Ok(Ok(value)) => json_response(StatusCode::OK, &value),
        Ok(Err(error)) => match crate::store::unavailable(&error) {
            Some(unavailable) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "storage_unavailable",
                format!("the log store does not answer: {unavailable}"),
            )
            .into_response(),
            None => {
                tracing::error!("admin query failed: {error:#}");
                ApiError::internal("the log store failed to answer").into_response()
            }
        },
        Err(_) => ApiError::internal("the log query was cancelled").into_response(),
    }
}

/// Parses a time filter: Unix milliseconds, or an RFC 3339 date-time.
fn time_param(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(text) = query.get(name).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(Some(ms));
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_time",
                format!("`{name}` must be Unix milliseconds or RFC 3339"),
            )
        })
}

fn list_query(query: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    let number = |name: &str, default: u64| -> Result<u64, ApiError> {
        query.get(name).map_or(Ok(default), |v| {
            v.trim().parse().map_err(|_| {
                ApiError::bad_request("invalid_number", format!("`{name}` must be a number"))
            })
        })
    };
    let text = |name: &str| {
        query
            .get(name)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    Ok(ListQuery {
        search: text("search"),
        model: text("model"),
        key: text("key"),
        upstream: text("upstream"),
        path: text("path"),
        status: text("status"),
        from_ms: time_param(query, "from")?,
        to_ms: time_param(query, "to")?,
        before: match query
            .get("before")
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(cursor) => Some(
                cursor
                    .split_once('_')
                    .and_then(|(ts, id)| Some((ts.parse::<i64>().ok()?, id.to_string())))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_cursor",
                            "`before` must be a cursor from `next_before`",
                        )
                    })?,
            ),
        },
        page: number("page", 1)?.max(1),
        per_page: number("per_page", 50)?.clamp(1, 500),
    })
}

fn usage_json(usage: Usage) -> Value {
    json!({"requests": usage.requests, "tokens": usage.tokens, "cost": usage.cost})
}

fn limits_json(limits: &Limits) -> Value {
    json!({"rpm": limits.rpm, "rpd": limits.rpd, "tpm": limits.tpm})
}

/// A scope's usage per window: from Redis when state is shared (every instance's
/// requests), else (or when Redis does not answer) this instance's own.
async fn scope_usage(gateway: &Gateway, scope: String, now: i64) -> HashMap<Period, Usage> {
    if let Some(shared) = &gateway.shared_state {
        match shared.usage(&scope).await {
            Ok(usage) => return usage.into_iter().collect(),
            Err(error) => {
                tracing::warn!("shared usage unavailable ({error:#}); showing this instance's")
            }
        }
    }
    Period::ALL
        .into_iter()
        .map(|p| (p, gateway.limiter.usage(&scope, p, now)))
        .collect()
}

async fn key_json(gateway: &Gateway, key: &GatewayKey, now: i64) -> Value {
    let counts = scope_usage(gateway, key_scope(&key.name), now).await;
    let usage = |p: Period| usage_json(counts.get(&p).copied().unwrap_or_default());
    json!({
        "name": key.name,
        "key": key.key.masked(),
        "models": if key.models.any { json!(["*"]) } else { json!(key.models.names) },
        "limits": limits_json(&key.limits),
        "budget": key.budget.map(|b| json!({"tokens": b.tokens, "cost": b.cost, "period": Period::from(b.period).name()})),
        "usage": {"minute": usage(Period::Minute), "day": usage(Period::Day), "month": usage(Period::Month), "total": usage(Period::Total)},
    })
}

/// `GET /v1/status`: limits, use, health and cooldowns. Keys masked.
pub async fn status(
    gateway: &Gateway,
    headers: &HeaderMap,
    client: IpAddr,
    local: IpAddr,
) -> Response<Body> {
    let now = unix_now();
    if !is_admin(gateway, headers, client, local) {
        return match gateway.guard.authenticate(headers) {
            Ok(Caller::Gateway(key)) => json_response(
                StatusCode::OK,
                &json!({"keys": [key_json(gateway, &key, now).await]}),
            ),
            _ => unauthorized(),
        };
    }
    let clock = now_ms();
    let upstream_counts = futures_util::future::join_all(
        gateway
            .upstreams
            .iter()
            .map(|u| scope_usage(gateway, upstream_scope(&u.config.name), now)),
    )
    .await;
    let upstreams: Vec<Value> = gateway
        .upstreams
        .iter()
        .zip(upstream_counts)
        .map(|(u, counts)| {
            let usage = |p: Period| usage_json(counts.get(&p).copied().unwrap_or_default());
            let cooldown_until = u.cooldown_until.load(Ordering::Relaxed);
            let keys: Vec<Value> = (0..u.key_count())
                .map(|k| {
                    let until = u.key_cooldown_until(k);
                    json!({
                        "key": u.masked_key(k),
                        "cooling_down": until > clock,
                        "cooldown_remaining_ms": until.saturating_sub(clock),
                    })
                })
                .collect();
            json!({
                "name": u.config.name,
                "base_url": u.config.base_url,
                "models": if u.config.models.any { json!(["*"]) } else { json!(u.config.models.names) },
                "aliases": u.config.model_map.keys().collect::<Vec<_>>(),
                "weight": u.config.weight,
                "limits": limits_json(&u.config.limits),
                "usage": {"minute": usage(Period::Minute), "day": usage(Period::Day)},
                "health": {
                    "in_flight": u.in_flight.load(Ordering::Relaxed),
                    "latency_ms": u.latency_us.load(Ordering::Relaxed) as f64 / 1000.0,
                    "failures_in_a_row": u.failures.load(Ordering::Relaxed),
                    "cooling_down": cooldown_until > clock,
                    "cooldown_remaining_ms": cooldown_until.saturating_sub(clock),
                },
                "credential": if u.token.is_some() { "token" } else if u.key_count() > 0 { "keys" } else { "none" },
                "keys": keys,
            })
        })
        .collect();
    let keys: Vec<Value> = futures_util::future::join_all(
        gateway
            .config
            .access
            .keys
            .iter()
            .map(|k| key_json(gateway, k, now)),
    )
    .await;
    let log = gateway.recorder.as_ref().map(|r| {
        let s = &r.stats;
        json!({
            "queued": s.queued.load(Ordering::Relaxed),
            "unaccounted": s.unaccounted.load(Ordering::Relaxed),
            "written": s.written.load(Ordering::Relaxed),
            "dropped": s.dropped.load(Ordering::Relaxed),
            "trimmed": s.trimmed.load(Ordering::Relaxed),
            "shed": s.shed.load(Ordering::Relaxed),
            "write_errors": s.write_errors.load(Ordering::Relaxed),
            "store_reachable": !s.store_down.load(Ordering::Relaxed),
        })
    });
    json_response(
        StatusCode::OK,
        &json!({
            "windows": "fixed, UTC wall clock: minute, day (00:00 UTC), month (1st 00:00 UTC)",
            "usage_source": if gateway.shared_state.is_some() { "shared (Redis): every instance" } else { "this instance" },
            "upstreams": upstreams,
            "keys": keys,
            "log": log,
        }),
    )
}
