//! The admin API (`/api/*`) and the usage report (`/v1/status`).
//!
//! `/api/*` needs the admin key (`Authorization: Bearer …` or `x-admin-key`) or a dashboard
//! session cookie; with no admin key configured it answers loopback clients on a loopback
//! listener only. `/v1/status` shows everything to the
//! admin and, to a gateway key, that key's own limits and use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::clock::now_ms;
use crate::clock::unix_now;
use crate::config::{GatewayKey, Limits, Secret};
use crate::gateway::Gateway;
use crate::http::body::{Body, BoxError, json_response};
use crate::http::error::ApiError;
use crate::pipeline::access::{Caller, presented_key};
use crate::pure::limits::{Period, Usage, key_scope, upstream_scope};
use crate::store::ListQuery;

pub mod dashboard;
pub mod manage;
pub mod registry;
pub mod throttle;

use registry::Role;
use throttle::Verdict;

/// Who uses the admin side, and with which role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// As the audit log names it: `admin key`, `loopback` or `admin:<name>`.
    pub actor: String,
    pub role: Role,
}

impl Principal {
    fn admin(actor: &str) -> Self {
        Self {
            actor: actor.to_string(),
            role: Role::Admin,
        }
    }
}

/// What [`authorize_or`] found.
enum Found {
    /// No admin credential was presented.
    Nothing,
    Principal(Principal),
    /// Not an admin credential, but one the route accepts.
    Other,
}

/// The OpenAPI document of the admin API.
pub const OPENAPI: &str = include_str!("admin/openapi.json");

/// Whether a request is the admin side's (any role): see [`principal`].
pub fn authorize(
    gateway: &Gateway,
    headers: &HeaderMap,
    client: IpAddr,
    local: IpAddr,
) -> Result<bool, ApiError> {
    principal(gateway, headers, client, local).map(|found| found.is_some())
}

/// Who a request is on the admin side: a live session of an admin account (enabled, at
/// its record's epoch), a dashboard session opened with the admin key in force, or the
/// admin key; or, with neither an admin key nor accounts, a loopback client on a loopback
/// listener. `Ok(None)`: it presents no admin credential at all. `Err`: a wrong key (401,
/// counted against the client's address) or an address locked out for failing too often
/// (429 with `Retry-After`, the key not even compared).
pub fn principal(
    gateway: &Gateway,
    headers: &HeaderMap,
    client: IpAddr,
    local: IpAddr,
) -> Result<Option<Principal>, ApiError> {
    authorize_or(gateway, headers, client, local, |_| false).map(|found| match found {
        Found::Principal(principal) => Some(principal),
        _ => None,
    })
}

/// [`principal`] for a route that also accepts other keys (`accepts`): `Found::Other` for
/// such a key, which is not counted as a failure.
fn authorize_or(
    gateway: &Gateway,
    headers: &HeaderMap,
    client: IpAddr,
    local: IpAddr,
    accepts: impl FnOnce(&str) -> bool,
) -> Result<Found, ApiError> {
    let token = dashboard::session_token(headers);
    if let Some((name, epoch)) = token.and_then(|token| gateway.sessions.account(token)) {
        let snapshot = gateway.registry.snapshot();
        if let Some(account) = snapshot
            .admins
            .get(&name)
            .filter(|a| a.enabled && a.epoch == epoch)
        {
            return Ok(Found::Principal(Principal {
                actor: format!("admin:{name}"),
                role: account.role,
            }));
        }
    }
    let Some(key) = &gateway.config.admin.key else {
        let open = open_without_key(client, local) && gateway.registry.snapshot().admins.is_empty();
        return Ok(if open {
            Found::Principal(Principal::admin("loopback"))
        } else {
            Found::Nothing
        });
    };
    // A session already proved the key; it is no guess, so a lockout does not refuse it.
    if token.is_some_and(|token| gateway.sessions.is_valid(token, key)) {
        return Ok(Found::Principal(Principal::admin("admin key")));
    }
    let presented = headers
        .get("x-admin-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .or_else(|| presented_key(headers));
    let Some(presented) = presented else {
        return Ok(Found::Nothing);
    };
    match check_key(gateway, client, presented, key, accepts)? {
        Verdict::Fail => Err(wrong_key()),
        Verdict::Pass => Ok(Found::Principal(Principal::admin("admin key"))),
        Verdict::Other => Ok(Found::Other),
    }
}

/// Compares a presented key with the admin key through the client's throttle.
fn check_key(
    gateway: &Gateway,
    client: IpAddr,
    presented: &str,
    key: &Secret,
    accepts: impl FnOnce(&str) -> bool,
) -> Result<Verdict, ApiError> {
    gateway
        .admin_auth
        .attempt(client, now_ms(), || {
            if constant_time_eq(presented.as_bytes(), key.expose().as_bytes()) {
                Verdict::Pass
            } else if accepts(presented) {
                Verdict::Other
            } else {
                Verdict::Fail
            }
        })
        .map_err(locked_out)
}

fn locked_out(retry_after: u64) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "admin_auth_locked",
        "too many failed admin authentications from this address; try again later",
    );
    error.retry_after = Some(retry_after);
    error
}

/// Without an admin key, the admin side is open only on loopback, to loopback clients.
fn open_without_key(client: IpAddr, local: IpAddr) -> bool {
    client.to_canonical().is_loopback() && local.to_canonical().is_loopback()
}

/// The dashboard and the admin API: `/`, `/assets/*`, `/api/*`.
pub async fn handle(
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
    if gateway.config.admin.key.is_none()
        && !open_without_key(client, local)
        && gateway.registry.snapshot().admins.is_empty()
    {
        return ApiError::forbidden(
            "dashboard_off",
            "the dashboard and admin API need admin.key (or admin accounts) when not bound to loopback",
        )
        .into_response();
    }
    match (request.method(), path.as_str()) {
        // Without a session, the page is the login page, and the fragment (`#/requests`)
        // goes along: a browser keeps it through a redirect whose target has none.
        (&Method::GET, "/") => match authorize(gateway, request.headers(), client, local) {
            Ok(true) => dashboard::index(),
            _ => dashboard::to_login(),
        },
        (&Method::GET, "/login") => dashboard::index(),
        (&Method::GET, "/favicon.ico") => dashboard::favicon(),
        (&Method::POST, "/api/login") => login(gateway, request, client).await,
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
        (_, "/api/openapi.json") => {
            let mut response = Response::new(crate::http::body::full(OPENAPI));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => match principal(gateway, request.headers(), client, local) {
            Err(error) => error.into_response(),
            Ok(None) => unauthorized(),
            Ok(Some(who)) if path == "/api/session" && request.method() == Method::GET => {
                json_response(
                    StatusCode::OK,
                    &json!({"ok": true, "actor": who.actor, "role": who.role.name()}),
                )
            }
            Ok(Some(who)) if manage::owns(&path) => {
                manage::handle(gateway, request, &path, &who, client).await
            }
            Ok(Some(who)) => api(gateway, request, &path, &who).await,
        },
    }
}

/// `POST /api/login` with `{"key": "…"}` (the admin key) or `{"name": "…", "password":
/// "…"}` (an admin account), as JSON or a form: sets the session cookie.
async fn login(gateway: &Gateway, request: Request<Incoming>, client: IpAddr) -> Response<Body> {
    // A login is a few bytes: a client that trickles them holds nothing for long.
    let timed = crate::http::body::TimedBody::new(
        request.into_body(),
        Duration::from_secs(10),
        Duration::from_secs(10),
    );
    let body = match crate::pipeline::read::read_body(timed, 4096).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let mut fields: HashMap<String, String> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect(),
        _ => serde_urlencoded::from_bytes::<HashMap<String, String>>(&body).unwrap_or_default(),
    };
    if let Some(name) = fields.remove("name").filter(|n| !n.is_empty()) {
        let password = fields.remove("password").unwrap_or_default();
        return login_account(gateway, client, name, password).await;
    }
    let Some(admin_key) = &gateway.config.admin.key else {
        if gateway.registry.snapshot().admins.is_empty() {
            return json_response(
                StatusCode::OK,
                &json!({"ok": true, "note": "no admin key is configured"}),
            );
        }
        return unauthorized();
    };
    let presented = fields.remove("key").unwrap_or_default();
    match check_key(gateway, client, &presented, admin_key, |_| false) {
        Err(error) => return error.into_response(),
        Ok(Verdict::Pass) => {}
        Ok(_) => {
            // Counted already (parallel guesses meet the lockout); this only slows a
            // client that guesses one at a time.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            return unauthorized();
        }
    }
    let Some(token) = gateway.sessions.create(admin_key) else {
        return ApiError::internal("cannot create a session").into_response();
    };
    let mut response = json_response(
        StatusCode::OK,
        &json!({"ok": true, "actor": "admin key", "role": "admin"}),
    );
    response
        .headers_mut()
        .insert(http::header::SET_COOKIE, dashboard::cookie(Some(&token)));
    response
}

/// A password login of an admin account. Throttled per client address and per account
/// name; a locked-out one is refused before its password is hashed. At most two password
/// checks run at once (`Registry::verifying`), and an unknown name costs the same hash.
async fn login_account(
    gateway: &Gateway,
    client: IpAddr,
    name: String,
    password: String,
) -> Response<Body> {
    let registry = &gateway.registry;
    let name: String = name.chars().take(100).collect();
    let now = now_ms();
    if let Some(wait) = gateway
        .admin_auth
        .locked_ip(client, now)
        .or_else(|| registry.logins.locked(&name, now))
    {
        return locked_out(wait).into_response();
    }
    let Ok(permit) = registry.verifying.acquire().await else {
        return ApiError::internal("cannot check the password").into_response();
    };
    let account = registry.snapshot().admins.get(&name).cloned();
    let hash = account
        .as_ref()
        .map_or_else(|| dummy_hash().to_string(), |a| a.password_hash.clone());
    let matches = tokio::task::spawn_blocking(move || registry::verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    drop(permit);
    let account = account.filter(|a| matches && a.enabled);
    let verdict = if account.is_some() {
        Verdict::Pass
    } else {
        Verdict::Fail
    };
    let by_address = gateway.admin_auth.attempt(client, now_ms(), || verdict);
    let by_name = registry
        .logins
        .attempt_as(name.clone(), now_ms(), || verdict);
    if let Err(wait) = by_address.and(by_name) {
        return locked_out(wait).into_response();
    }
    let Some(account) = account else {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        return ApiError::unauthorized("invalid_login", "wrong name or password").into_response();
    };
    let Some(token) = gateway.sessions.create_for_account(&name, account.epoch) else {
        return ApiError::internal("cannot create a session").into_response();
    };
    let mut response = json_response(
        StatusCode::OK,
        &json!({"ok": true, "actor": format!("admin:{name}"), "role": account.role.name()}),
    );
    response
        .headers_mut()
        .insert(http::header::SET_COOKIE, dashboard::cookie(Some(&token)));
    response
}

/// A hash no password matches, checked for unknown names so they cost the same time.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| registry::hash_password("sluice: no such account").unwrap_or_default())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized() -> Response<Body> {
    wrong_key().into_response()
}

fn wrong_key() -> ApiError {
    ApiError::unauthorized(
        "invalid_admin_key",
        "this needs the admin key (Authorization: Bearer ADMIN_KEY)",
    )
}

/// The query string's parameters (invalid encoding reads as none).
fn query_map(request: &Request<Incoming>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
        .unwrap_or_default()
}

/// `/api/*` for the admin side; a viewer sees no bodies unless
/// `admin.log_bodies_for_viewers`.
async fn api(
    gateway: &Gateway,
    request: Request<Incoming>,
    route: &str,
    who: &Principal,
) -> Response<Body> {
    let hide_bodies = who.role == Role::Viewer && !gateway.config.admin.log_bodies_for_viewers;
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
    let query = query_map(&request);
    let store = recorder.store.clone();
    let result = match route {
        "/api/requests" => {
            let list = match list_query(&query) {
                Ok(list) => list,
                Err(error) => return error.into_response(),
            };
            if hide_bodies && list.search.is_some() {
                return search_refused();
            }
            tokio::task::spawn_blocking(move || {
                store
                    .list(&list)
                    .map(|page| serde_json::to_value(page).unwrap_or_default())
            })
            .await
        }
        "/api/stats" => {
            let now = crate::clock::unix_now_ms();
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
        "/api/values" => tokio::task::spawn_blocking(move || store.values()).await,
        "/api/export" => {
            if hide_bodies && query.get("search").is_some_and(|s| !s.trim().is_empty()) {
                return search_refused();
            }
            return export(store, &query).await;
        }
        _ => match route.strip_prefix("/api/requests/") {
            Some(id) if id.len() > MAX_TEXT => {
                return ApiError::bad_request(
                    "invalid_parameter",
                    format!("a request id is at most {MAX_TEXT} bytes"),
                )
                .into_response();
            }
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
                    other => other.map(|r| {
                        r.map(|found| {
                            let mut row = found.unwrap_or_default();
                            if hide_bodies {
                                hide_body_fields(&mut row);
                            }
                            row
                        })
                    }),
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
        Ok(Err(error)) => store_error(&error),
        Err(_) => ApiError::internal("the log query was cancelled").into_response(),
    }
}

/// The most rows one export holds, and its default.
const MAX_EXPORT: u64 = 100_000;
const DEFAULT_EXPORT: u64 = 10_000;
/// Rows read from the store at a time while exporting.
const EXPORT_PAGE: u64 = 500;

/// The columns of a CSV export, as the list's rows name them.
const CSV_COLUMNS: [&str; 20] = [
    "time",
    "id",
    "method",
    "path",
    "model",
    "user",
    "key_name",
    "upstream",
    "status",
    "cause",
    "error",
    "stream",
    "tries",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "latency_ms",
    "ttfb_ms",
    "client_ip",
];

#[derive(Clone, Copy)]
enum ExportFormat {
    Csv,
    JsonLines,
}

impl ExportFormat {
    /// The rows as the format writes them (CSV without its header line).
    fn rows(self, rows: &[Value]) -> bytes::Bytes {
        let mut out = String::new();
        for row in rows {
            match self {
                Self::JsonLines => out.push_str(&row.to_string()),
                Self::Csv => {
                    let cells: Vec<String> = CSV_COLUMNS
                        .iter()
                        .map(|c| csv_cell(row.get(*c).unwrap_or(&Value::Null)))
                        .collect();
                    out.push_str(&cells.join(","));
                }
            }
            out.push('\n');
        }
        out.into()
    }
}

/// One CSV cell: quoted when it holds a separator, quote or line break; text a
/// spreadsheet would run as a formula (`=`, `+`, `-`, `@` first; not a lone `-`, the key
/// name of a request without one) is prefixed with `'`.
fn csv_cell(value: &Value) -> String {
    let text = match value {
        Value::Null => return String::new(),
        Value::String(text) => {
            if text.starts_with(['=', '+', '-', '@', '\t', '\r']) && text != "-" {
                format!("'{text}")
            } else {
                text.clone()
            }
        }
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// `GET /api/export`: the rows the list's filters select, newest first, as CSV or JSON
/// lines (`format`), at most `limit` of them. Streamed as the store yields pages, so an
/// export holds one page in memory; the first page is read before the answer starts, so
/// a bad store answers with a status rather than a cut body.
async fn export(
    store: std::sync::Arc<dyn crate::store::Store>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let format = match query.get("format").map(|f| f.trim()) {
        None | Some("" | "jsonl") => ExportFormat::JsonLines,
        Some("csv") => ExportFormat::Csv,
        Some(_) => {
            return ApiError::bad_request("invalid_format", "`format` must be `csv` or `jsonl`")
                .into_response();
        }
    };
    let limit = match number_param(query, "limit", DEFAULT_EXPORT, MAX_EXPORT) {
        Ok(limit) => limit,
        Err(error) => return error.into_response(),
    };
    let mut list = match list_query(query) {
        Ok(list) => list,
        Err(error) => return error.into_response(),
    };
    list.skip_count = true;
    list.page = 1;
    list.per_page = EXPORT_PAGE.min(limit);
    let first = {
        let (store, list) = (store.clone(), list.clone());
        tokio::task::spawn_blocking(move || store.list(&list)).await
    };
    let first = match first {
        Ok(Ok(page)) => page,
        Ok(Err(error)) => return store_error(&error),
        Err(_) => return ApiError::internal("the export was cancelled").into_response(),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, BoxError>>(4);
    let mut head = match format {
        ExportFormat::Csv => format!("{}\n", CSV_COLUMNS.join(",")).into_bytes(),
        ExportFormat::JsonLines => Vec::new(),
    };
    head.extend_from_slice(&format.rows(&first.data));
    let mut sent = first.data.len() as u64;
    let mut next = first.next_before.filter(|_| sent < limit);
    // Owned by the channel: it ends when the rows do or the client goes away.
    tokio::task::spawn_blocking(move || {
        if sender.blocking_send(Ok(head.into())).is_err() {
            return;
        }
        while let Some(cursor) = next.take() {
            list.before = cursor
                .split_once('_')
                .and_then(|(ts, id)| Some((ts.parse().ok()?, id.to_string())));
            list.per_page = EXPORT_PAGE.min(limit - sent);
            let page = match store.list(&list) {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!("export cut short: the log store failed ({error:#})");
                    let _ = sender.blocking_send(Err(error.into()));
                    return;
                }
            };
            sent += page.data.len() as u64;
            if sender.blocking_send(Ok(format.rows(&page.data))).is_err() {
                return;
            }
            next = page.next_before.filter(|_| sent < limit);
        }
    });
    let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((chunk.map(http_body::Frame::data), receiver))
    });
    let (content_type, name) = match format {
        ExportFormat::Csv => ("text/csv; charset=utf-8", "sluice-requests.csv"),
        ExportFormat::JsonLines => ("application/x-ndjson", "sluice-requests.jsonl"),
    };
    let mut response = Response::new(http_body_util::BodyExt::boxed_unsync(
        http_body_util::StreamBody::new(frames),
    ));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    if let Ok(value) = http::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(http::header::CONTENT_DISPOSITION, value);
    }
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// A store's failure as the admin API answers it.
fn store_error(error: &anyhow::Error) -> Response<Body> {
    match crate::store::unavailable(error) {
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
    }
}

/// A text search looks into bodies: one who may not read them may not probe them, in the
/// list or in an export.
fn search_refused() -> Response<Body> {
    ApiError::forbidden(
        "search_needs_bodies",
        "`search` looks into request and response bodies, which viewers do not see (admin.log_bodies_for_viewers)",
    )
    .into_response()
}

/// Blanks what a request's row holds of its bodies, for a viewer.
fn hide_body_fields(row: &mut Value) {
    if let Some(row) = row.as_object_mut() {
        for field in [
            "request_body",
            "response_body",
            "upstream_response_body",
            "reply_text",
            "reply_tool_calls",
        ] {
            if row.contains_key(field) {
                row.insert(field.to_string(), Value::Null);
            }
        }
        row.insert("bodies_hidden".to_string(), Value::Bool(true));
    }
}

/// The longest text filter (`search`, `model`, …) and cursor id taken.
const MAX_TEXT: usize = 1000;
/// The deepest numbered page: deeper, the `before` cursor pages at the same cost.
const MAX_PAGE: u64 = 1_000_000;
const MAX_PER_PAGE: u64 = 500;
/// Time filters lie between the Unix epoch and the end of year 9999 (milliseconds).
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// A text parameter as given (trimmed), refused when it holds control characters (NUL
/// included, which PostgreSQL cannot even compare) or is longer than [`MAX_TEXT`].
fn text_param(query: &HashMap<String, String>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(text) = query.get(name).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("`{name}` must not contain control characters"),
        ));
    }
    if text.len() > MAX_TEXT {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("`{name}` is longer than {MAX_TEXT} bytes"),
        ));
    }
    Ok(Some(text.to_string()))
}

/// A whole number in `1..=max`, or `default` when absent.
fn number_param(
    query: &HashMap<String, String>,
    name: &str,
    default: u64,
    max: u64,
) -> Result<u64, ApiError> {
    let Some(text) = query.get(name).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    text.parse::<u64>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_number",
                format!("`{name}` must be a whole number from 1 to {max}"),
            )
        })
}

/// Parses a time filter: Unix milliseconds, or an RFC 3339 date-time, between the epoch
/// and the end of year 9999. Public for the fuzz targets (`fuzz/`).
pub fn time_param(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(text) = text_param(query, name)? else {
        return Ok(None);
    };
    let ms = match text.parse::<i64>() {
        Ok(ms) => Some(ms),
        Err(_) => humantime::parse_rfc3339_weak(&text)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok()),
    };
    ms.filter(|ms| (0..=MAX_TIME_MS).contains(ms))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_time",
                format!(
                    "`{name}` must be Unix milliseconds or RFC 3339, from 1970 to the year 9999"
                ),
            )
        })
}

/// `status`: an exact status (`429`), a class (`4xx`) or `error`.
fn status_param(query: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
    let Some(text) = text_param(query, "status")? else {
        return Ok(None);
    };
    let valid = match crate::store::StatusFilter::parse(&text) {
        crate::store::StatusFilter::Range(low, _) => {
            text == "error" || (100..=500).contains(&low) && text.len() == 3
        }
        crate::store::StatusFilter::Exact(code) => (100..=599).contains(&code),
        crate::store::StatusFilter::Nothing => false,
    };
    if !valid {
        return Err(ApiError::bad_request(
            "invalid_status",
            "`status` must be a status (429), a class (1xx to 5xx) or `error`",
        ));
    }
    Ok(Some(text))
}

/// `before`: a cursor from `next_before` (`{ts}_{id}`).
fn cursor_param(query: &HashMap<String, String>) -> Result<Option<(i64, String)>, ApiError> {
    let Some(cursor) = text_param(query, "before")? else {
        return Ok(None);
    };
    cursor
        .split_once('_')
        .and_then(|(ts, id)| {
            let ts = ts.parse::<i64>().ok()?;
            ((0..=MAX_TIME_MS).contains(&ts) && !id.is_empty()).then(|| (ts, id.to_string()))
        })
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "`before` must be a cursor from `next_before`",
            )
        })
}

/// The list filters of `/api/requests`, validated. Public for the fuzz targets (`fuzz/`).
pub fn list_query(query: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    Ok(ListQuery {
        search: text_param(query, "search")?,
        model: text_param(query, "model")?,
        key: text_param(query, "key")?,
        upstream: text_param(query, "upstream")?,
        user: text_param(query, "user")?,
        path: text_param(query, "path")?,
        status: status_param(query)?,
        from_ms: time_param(query, "from")?,
        to_ms: time_param(query, "to")?,
        before: cursor_param(query)?,
        page: number_param(query, "page", 1, MAX_PAGE)?,
        per_page: number_param(query, "per_page", 50, MAX_PER_PAGE)?,
        skip_count: false,
    })
}

fn usage_json(usage: Usage) -> Value {
    json!({"requests": usage.requests, "tokens": usage.tokens, "cost": crate::pure::usage::round_cost(usage.cost)})
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
    let own_key = || match gateway.guard.authenticate(headers) {
        Ok(Caller::Gateway(key)) => Some(key),
        _ => None,
    };
    // A gateway key reads its own use; anything else presented is an admin guess.
    match authorize_or(gateway, headers, client, local, |_| own_key().is_some()) {
        Err(error) => return error.into_response(),
        Ok(Found::Principal(_)) => {}
        Ok(_) => {
            return match own_key() {
                Some(key) => json_response(
                    StatusCode::OK,
                    &json!({"keys": [key_json(gateway, &key, now).await]}),
                ),
                None => unauthorized(),
            };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_cell(&json!("plain")), "plain");
        assert_eq!(csv_cell(&json!("a,b")), "\"a,b\"");
        assert_eq!(csv_cell(&json!("say \"hi\"\n")), "\"say \"\"hi\"\"\n\"");
        assert_eq!(csv_cell(&json!("=1+1")), "'=1+1");
        assert_eq!(csv_cell(&json!("@SUM(A1)")), "'@SUM(A1)");
        assert_eq!(
            csv_cell(&json!("-")),
            "-",
            "the key name of a keyless request"
        );
        assert_eq!(csv_cell(&json!(-1.5)), "-1.5", "numbers stay numbers");
        assert_eq!(csv_cell(&Value::Null), "");
        assert_eq!(csv_cell(&json!(true)), "true");
    }
}
