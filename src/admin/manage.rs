//! The admin API for what is managed at run time: `/api/keys`, `/api/teams`,
//! `/api/admins` and `/api/audit`.
//!
//! Every change is checked field by field (unknown fields, negative limits, periods that
//! do not exist: 400 naming the field), written to the store with its audit entry in one
//! transaction, put in force here at once, and announced to the other instances. Reading
//! is open to every role; changing needs the `admin` role (a viewer gets 403), and admin
//! accounts are the admins' alone. A key's secret is in the answer that creates or rotates
//! it and nowhere else: not in a list, the audit log, an error or a log line.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use super::Principal;
use super::registry::{
    AdminRecord, BudgetRecord, Digest, KeyRecord, Previous, Role, Snapshot, TeamRecord,
};
use crate::config::Problem;
use crate::gateway::Gateway;
use crate::http::body::{Body, json_response};
use crate::http::error::ApiError;
use crate::pure::limits::{Period, key_scope, team_scope};
use crate::store::{AuditEntry, Managed, ManagedChange, Store};

/// The largest body a change may have.
const MAX_BODY: u64 = 64 * 1024;
/// The longest name of a key, team or admin.
const MAX_NAME: usize = 100;
/// The most a key's `metadata` may weigh, as JSON.
const MAX_METADATA: usize = 4096;
/// The longest grace a rotated-out secret may keep.
const MAX_GRACE: Duration = Duration::from_secs(30 * 86_400);
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;

/// Whether `route` is one of this module's.
pub fn owns(route: &str) -> bool {
    ["/api/keys", "/api/teams", "/api/admins", "/api/audit"]
        .iter()
        .any(|base| route == *base || route.starts_with(&format!("{base}/")))
}

/// Answers a request to one of this module's routes, for `who`, from `client`.
pub async fn handle(
    gateway: &Gateway,
    request: Request<Incoming>,
    route: &str,
    who: &Principal,
    client: IpAddr,
) -> Response<Body> {
    match route_request(gateway, request, route, who, client).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn route_request(
    gateway: &Gateway,
    request: Request<Incoming>,
    route: &str,
    who: &Principal,
    client: IpAddr,
) -> Result<Response<Body>, ApiError> {
    let Some(store) = gateway.registry.store().cloned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "storage_off",
            "keys, teams and admins are kept in the store, and storage is off (storage.url: none)",
        ));
    };
    let method = request.method().clone();
    let parts: Vec<&str> = route.trim_start_matches("/api/").split('/').collect();
    let admins_only = parts.first() == Some(&"admins");
    if (method != Method::GET || admins_only) && who.role != Role::Admin {
        return Err(ApiError::forbidden(
            "admin_role_required",
            "this needs an account with the admin role; a viewer reads only",
        ));
    }
    let audit = |action: &str, target: String, changes: Value| AuditEntry {
        id: 0,
        ts: crate::clock::unix_now_ms(),
        actor: who.actor.clone(),
        address: client.to_canonical().to_string(),
        action: action.to_string(),
        target,
        changes: changes.to_string(),
    };
    match (&method, parts.as_slice()) {
        (&Method::GET, ["audit"]) => {
            let query = super::query_map(&request);
            let before = match query.get("before").map(|b| b.trim()) {
                None | Some("") => None,
                Some(b) => Some(b.parse::<i64>().ok().filter(|b| *b > 0).ok_or_else(|| {
                    ApiError::bad_request("invalid_parameter", "`before` must be an audit entry id")
                })?),
            };
            let limit = super::number_param(&query, "limit", 100, 1000)?;
            let entries = blocking(move || store.audit(before, limit)).await?;
            let entries: Vec<Value> = entries
                .into_iter()
                .map(|e| {
                    let mut value = serde_json::to_value(&e).unwrap_or_default();
                    value["changes"] = serde_json::from_str(&e.changes).unwrap_or(Value::Null);
                    value
                })
                .collect();
            Ok(json_response(StatusCode::OK, &json!({"data": entries})))
        }
        (&Method::GET, ["keys"]) => {
            let snapshot = gateway.registry.snapshot();
            let mut data = Vec::new();
            for key in &gateway.config.access.keys {
                data.push(json!({
                    "id": format!("config:{}", key.name),
                    "name": key.name,
                    "source": "config",
                    "read_only": true,
                    "prefix": key.key.masked(),
                    "models": if key.models.any { json!(["*"]) } else { json!(key.models.names) },
                    "rpm": key.limits.rpm, "rpd": key.limits.rpd, "tpm": key.limits.tpm,
                    "budget": key.budget.map(BudgetRecord::from),
                    "state": "active",
                    "usage": scope_usage(gateway, key_scope(&key.name)).await,
                }));
            }
            // Usage comes from Redis with shared state: a few calls at a time, not one by one.
            let records: Vec<&KeyRecord> = snapshot.keys.values().collect();
            for chunk in records.chunks(64) {
                let views = chunk.iter().map(|record| key_view(gateway, record, true));
                data.extend(futures_util::future::join_all(views).await);
            }
            Ok(json_response(StatusCode::OK, &json!({"data": data})))
        }
        (&Method::POST, ["keys"]) => {
            let body = read_json(request).await?;
            let input = KeyInput::parse(&body, true, &gateway.registry.snapshot())?;
            let name = input.name.clone().unwrap_or_default();
            if gateway.guard.is_config_key(&name) {
                return Err(conflict(format!(
                    "`name`: a key named {name:?} is in the config file"
                )));
            }
            let secret = super::registry::new_secret()
                .ok_or_else(|| ApiError::internal("no randomness for a new key"))?;
            let id = super::registry::new_id("key")
                .ok_or_else(|| ApiError::internal("no randomness for a new key"))?;
            let now = crate::clock::unix_now_ms();
            let mut record = KeyRecord {
                id: id.clone(),
                name,
                prefix: super::registry::visible_prefix(&secret),
                hash: Digest::of(&secret).hex(),
                previous: None,
                models: vec!["*".into()],
                rpm: None,
                rpd: None,
                tpm: None,
                budget: None,
                expires_at: None,
                metadata: Map::new(),
                team: None,
                enabled: true,
                revoked_at: None,
                created_at: now,
                updated_at: now,
            };
            input.apply_to_key(&mut record);
            let entry = audit("key.create", format!("key:{id}"), input.changes());
            let row = managed("key", &record.id, &record.name, &record)?;
            change(gateway, store, ManagedChange::Insert(row), entry).await?;
            let mut view = key_view(gateway, &record, false).await;
            // The one answer that carries the secret.
            view["key"] = json!(secret);
            Ok(json_response(StatusCode::CREATED, &view))
        }
        (_, ["keys", id, rest @ ..]) => {
            let id = id.to_string();
            if let Some(name) = id.strip_prefix("config:") {
                if method != Method::GET {
                    return Err(ApiError::forbidden(
                        "config_key_read_only",
                        "keys from the config file are changed in the config file",
                    ));
                }
                let key = gateway
                    .config
                    .access
                    .keys
                    .iter()
                    .find(|k| k.name == name)
                    .ok_or_else(|| not_found("key"))?;
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({"id": id, "name": key.name, "source": "config", "read_only": true,
                            "prefix": key.key.masked(),
                            "usage": scope_usage(gateway, key_scope(&key.name)).await}),
                ));
            }
            let snapshot = gateway.registry.snapshot();
            let record = snapshot
                .keys
                .values()
                .find(|k| k.id == id)
                .cloned()
                .ok_or_else(|| not_found("key"))?;
            match (&method, rest) {
                (&Method::GET, []) => Ok(json_response(
                    StatusCode::OK,
                    &key_view(gateway, &record, true).await,
                )),
                (&Method::PATCH, []) => {
                    refuse_revoked(&record)?;
                    let body = read_json(request).await?;
                    let input = KeyInput::parse(&body, false, &snapshot)?;
                    let mut updated = record.clone();
                    input.apply_to_key(&mut updated);
                    updated.updated_at = crate::clock::unix_now_ms();
                    let entry = audit("key.update", format!("key:{id}"), input.changes());
                    let row = managed("key", &updated.id, &updated.name, &updated)?;
                    change(gateway, store, ManagedChange::Update(row), entry).await?;
                    Ok(json_response(
                        StatusCode::OK,
                        &key_view(gateway, &updated, true).await,
                    ))
                }
                (&Method::DELETE, []) => {
                    refuse_revoked(&record)?;
                    let now = crate::clock::unix_now_ms();
                    let mut revoked = record.clone();
                    revoked.hash = String::new();
                    revoked.previous = None;
                    revoked.enabled = false;
                    revoked.revoked_at = Some(now);
                    revoked.updated_at = now;
                    let entry = audit(
                        "key.revoke",
                        format!("key:{id}"),
                        json!({"name": record.name}),
                    );
                    let row = managed("key", &revoked.id, &revoked.name, &revoked)?;
                    change(gateway, store, ManagedChange::Update(row), entry).await?;
                    Ok(json_response(
                        StatusCode::OK,
                        &key_view(gateway, &revoked, false).await,
                    ))
                }
                (&Method::POST, ["rotate"]) => {
                    refuse_revoked(&record)?;
                    let body = read_json(request).await?;
                    let grace = rotate_grace(&body)?;
                    let secret = super::registry::new_secret()
                        .ok_or_else(|| ApiError::internal("no randomness for a new key"))?;
                    let now = crate::clock::unix_now_ms();
                    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
                    let mut rotated = record.clone();
                    rotated.previous = (grace_ms > 0).then(|| Previous {
                        hash: record.hash.clone(),
                        until_ms: now.saturating_add(grace_ms),
                    });
                    rotated.hash = Digest::of(&secret).hex();
                    rotated.prefix = super::registry::visible_prefix(&secret);
                    rotated.updated_at = now;
                    let entry = audit(
                        "key.rotate",
                        format!("key:{id}"),
                        json!({"grace": humantime::format_duration(grace).to_string()}),
                    );
                    let row = managed("key", &rotated.id, &rotated.name, &rotated)?;
                    change(gateway, store, ManagedChange::Update(row), entry).await?;
                    let mut view = key_view(gateway, &rotated, false).await;
                    view["key"] = json!(secret);
                    Ok(json_response(StatusCode::OK, &view))
                }
                _ => Err(no_route(route)),
            }
        }
        (&Method::GET, ["teams"]) => {
            let snapshot = gateway.registry.snapshot();
            let mut data = Vec::new();
            let teams: Vec<&TeamRecord> = snapshot.teams.values().collect();
            for chunk in teams.chunks(64) {
                let views = chunk.iter().map(|team| team_view(gateway, &snapshot, team));
                data.extend(futures_util::future::join_all(views).await);
            }
            Ok(json_response(StatusCode::OK, &json!({"data": data})))
        }
        (&Method::POST, ["teams"]) => {
            let body = read_json(request).await?;
            let input = TeamInput::parse(&body, true)?;
            let now = crate::clock::unix_now_ms();
            let mut team = TeamRecord {
                name: input.name.clone().unwrap_or_default(),
                rpm: None,
                rpd: None,
                tpm: None,
                budget: None,
                metadata: Map::new(),
                created_at: now,
                updated_at: now,
            };
            input.apply(&mut team);
            let entry = audit(
                "team.create",
                format!("team:{}", team.name),
                input.changes(),
            );
            let row = managed("team", &team.name, &team.name, &team)?;
            change(gateway, store, ManagedChange::Insert(row), entry).await?;
            let snapshot = gateway.registry.snapshot();
            Ok(json_response(
                StatusCode::CREATED,
                &team_view(gateway, &snapshot, &team).await,
            ))
        }
        (_, ["teams", name]) => {
            let snapshot = gateway.registry.snapshot();
            let team = snapshot
                .teams
                .get(*name)
                .cloned()
                .ok_or_else(|| not_found("team"))?;
            match method {
                Method::GET => Ok(json_response(
                    StatusCode::OK,
                    &team_view(gateway, &snapshot, &team).await,
                )),
                Method::PATCH => {
                    let body = read_json(request).await?;
                    let input = TeamInput::parse(&body, false)?;
                    let mut updated = team.clone();
                    input.apply(&mut updated);
                    updated.updated_at = crate::clock::unix_now_ms();
                    let entry = audit(
                        "team.update",
                        format!("team:{}", team.name),
                        input.changes(),
                    );
                    let row = managed("team", &team.name, &team.name, &updated)?;
                    change(gateway, store, ManagedChange::Update(row), entry).await?;
                    let snapshot = gateway.registry.snapshot();
                    Ok(json_response(
                        StatusCode::OK,
                        &team_view(gateway, &snapshot, &updated).await,
                    ))
                }
                Method::DELETE => {
                    let members = snapshot
                        .keys
                        .values()
                        .filter(|k| k.revoked_at.is_none() && k.team.as_deref() == Some(*name))
                        .count();
                    if members > 0 {
                        return Err(conflict(format!(
                            "team {name:?} still has {members} key(s); move or revoke them first"
                        )));
                    }
                    let entry = audit("team.delete", format!("team:{}", team.name), json!({}));
                    let change_ = ManagedChange::Delete {
                        kind: "team".into(),
                        id: team.name.clone(),
                    };
                    change(gateway, store, change_, entry).await?;
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({"deleted": team.name}),
                    ))
                }
                _ => Err(no_route(route)),
            }
        }
        (&Method::GET, ["admins"]) => {
            let snapshot = gateway.registry.snapshot();
            let data: Vec<Value> = snapshot.admins.values().map(admin_view).collect();
            Ok(json_response(StatusCode::OK, &json!({"data": data})))
        }
        (&Method::POST, ["admins"]) => {
            let body = read_json(request).await?;
            let input = AdminInput::parse(&body, true)?;
            let now = crate::clock::unix_now_ms();
            let password = input.password.clone().unwrap_or_default();
            let hash =
                tokio::task::spawn_blocking(move || super::registry::hash_password(&password))
                    .await
                    .map_err(|_| ApiError::internal("hashing the password was cancelled"))?
                    .map_err(|_| ApiError::internal("cannot hash the password"))?;
            let admin = AdminRecord {
                name: input.name.clone().unwrap_or_default(),
                role: input.role.unwrap_or(Role::Viewer),
                password_hash: hash,
                enabled: input.enabled.unwrap_or(true),
                epoch: 0,
                created_at: now,
                updated_at: now,
            };
            let entry = audit(
                "admin.create",
                format!("admin:{}", admin.name),
                input.changes(),
            );
            let row = managed("admin", &admin.name, &admin.name, &admin)?;
            change(gateway, store, ManagedChange::Insert(row), entry).await?;
            Ok(json_response(StatusCode::CREATED, &admin_view(&admin)))
        }
        (_, ["admins", name, rest @ ..]) => {
            let snapshot = gateway.registry.snapshot();
            let admin = snapshot
                .admins
                .get(*name)
                .cloned()
                .ok_or_else(|| not_found("admin"))?;
            match (&method, rest) {
                (&Method::GET, []) => Ok(json_response(StatusCode::OK, &admin_view(&admin))),
                (&Method::PATCH, []) => {
                    let body = read_json(request).await?;
                    let input = AdminInput::parse(&body, false)?;
                    let mut updated = admin.clone();
                    if let Some(password) = input.password.clone() {
                        updated.password_hash = tokio::task::spawn_blocking(move || {
                            super::registry::hash_password(&password)
                        })
                        .await
                        .map_err(|_| ApiError::internal("hashing the password was cancelled"))?
                        .map_err(|_| ApiError::internal("cannot hash the password"))?;
                    }
                    if let Some(role) = input.role {
                        updated.role = role;
                    }
                    if let Some(enabled) = input.enabled {
                        updated.enabled = enabled;
                    }
                    // A new password or a lost role ends the account's sessions.
                    if input.password.is_some() || updated.role != admin.role || !updated.enabled {
                        updated.epoch = updated.epoch.saturating_add(1);
                    }
                    updated.updated_at = crate::clock::unix_now_ms();
                    let entry = audit("admin.update", format!("admin:{name}"), input.changes());
                    let row = managed("admin", &admin.name, &admin.name, &updated)?;
                    change(gateway, store, ManagedChange::Update(row), entry).await?;
                    Ok(json_response(StatusCode::OK, &admin_view(&updated)))
                }
                (&Method::DELETE, []) => {
                    let entry = audit("admin.delete", format!("admin:{name}"), json!({}));
                    let change_ = ManagedChange::Delete {
                        kind: "admin".into(),
                        id: admin.name.clone(),
                    };
                    change(gateway, store, change_, entry).await?;
                    gateway.sessions.end_account(&admin.name);
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({"deleted": admin.name}),
                    ))
                }
                (&Method::POST, ["revoke-sessions"]) => {
                    let mut updated = admin.clone();
                    updated.epoch = updated.epoch.saturating_add(1);
                    updated.updated_at = crate::clock::unix_now_ms();
                    let entry = audit("admin.revoke_sessions", format!("admin:{name}"), json!({}));
                    let row = managed("admin", &admin.name, &admin.name, &updated)?;
                    change(gateway, store, ManagedChange::Update(row), entry).await?;
                    gateway.sessions.end_account(&admin.name);
                    Ok(json_response(StatusCode::OK, &admin_view(&updated)))
                }
                _ => Err(no_route(route)),
            }
        }
        _ => Err(no_route(route)),
    }
}

/// Runs a store call off the async threads, its errors turned into answers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(store_error(&error)),
        Err(_) => Err(ApiError::internal("the store call was cancelled")),
    }
}

fn store_error(error: &anyhow::Error) -> ApiError {
    if error.chain().any(|e| e.is::<crate::store::Conflict>()) {
        return conflict("`name`: the name is taken".to_string());
    }
    if error.chain().any(|e| e.is::<crate::store::NotFound>()) {
        return ApiError::not_found("not_found", "it was deleted meanwhile");
    }
    if let Some(unavailable) = crate::store::unavailable(error) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "storage_unavailable",
            format!("the store does not answer: {unavailable}"),
        );
    }
    tracing::error!("managed change failed: {error:#}");
    ApiError::internal("the store failed to answer")
}

/// Writes a change and its audit entry, puts the new set in force here, and tells the
/// other instances.
async fn change(
    gateway: &Gateway,
    store: Arc<dyn Store>,
    change: ManagedChange,
    audit: AuditEntry,
) -> Result<(), ApiError> {
    let registry = gateway.registry.clone();
    blocking(move || {
        store.change_managed(&change, &audit)?;
        registry.reload()
    })
    .await?;
    gateway.announce_managed_change();
    Ok(())
}

fn managed(
    kind: &str,
    id: &str,
    name: &str,
    body: &impl serde::Serialize,
) -> Result<Managed, ApiError> {
    Ok(Managed {
        kind: kind.into(),
        id: id.into(),
        name: name.into(),
        body: serde_json::to_string(body)
            .map_err(|_| ApiError::internal("cannot encode the entry"))?,
    })
}

async fn read_json(request: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let timed = crate::http::body::TimedBody::new(
        request.into_body(),
        Duration::from_secs(10),
        Duration::from_secs(30),
    );
    let body = crate::pipeline::read::read_body(timed, MAX_BODY).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        )),
        Err(error) => Err(ApiError::bad_request(
            "invalid_json",
            format!("the body is not JSON: {error}"),
        )),
    }
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_field", format!("`{field}`: {message}"))
}

fn conflict(message: String) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        "conflict",
        message,
    )
}

fn not_found(what: &str) -> ApiError {
    ApiError::not_found("not_found", format!("no such {what}"))
}

fn no_route(route: &str) -> ApiError {
    ApiError::not_found(
        "unknown_url",
        format!("Unknown admin URL or method: {route}"),
    )
}

fn refuse_revoked(record: &KeyRecord) -> Result<(), ApiError> {
    if record.revoked_at.is_some() {
        return Err(conflict("the key is revoked; create a new one".into()));
    }
    Ok(())
}

/// Refuses fields other than `allowed`, naming the first one.
fn known_fields(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    if let Some(field) = body.keys().find(|k| !allowed.contains(&k.as_str())) {
        // Named when it looks like a field name; anything else (a pasted secret, say) is
        // not echoed.
        let plain = !field.is_empty()
            && field.len() <= 40
            && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let shown = if plain { field.as_str() } else { "(unnamed)" };
        return Err(invalid(
            shown,
            format!("unknown field; expected one of {}", allowed.join(", ")),
        ));
    }
    Ok(())
}

fn first_problem(problems: Vec<Problem>) -> Result<(), ApiError> {
    match problems.into_iter().next() {
        Some(problem) => Err(invalid(&problem.path, problem.message)),
        None => Ok(()),
    }
}

fn name_field(body: &Map<String, Value>, required: bool) -> Result<Option<String>, ApiError> {
    match body.get("name") {
        None if required => Err(invalid("name", "is required")),
        None => Ok(None),
        Some(_) if !required => Err(invalid("name", "cannot be changed")),
        Some(Value::String(name)) => {
            let name = name.trim();
            if name.is_empty() || name.len() > MAX_NAME {
                return Err(invalid("name", format!("must be 1 to {MAX_NAME} bytes")));
            }
            if !name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
            {
                return Err(invalid("name", "may hold letters, digits and - _ . @ only"));
            }
            Ok(Some(name.to_string()))
        }
        Some(_) => Err(invalid("name", "must be a string")),
    }
}

/// A limit field: absent (`None`), removed (`Some(None)`, by `null` or -1) or set.
fn limit_field(body: &Map<String, Value>, field: &str) -> Result<Option<Option<u64>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(value) => {
            let Some(n) = value.as_i64() else {
                return Err(invalid(
                    field,
                    "must be a whole number (-1 or null: unlimited)",
                ));
            };
            let mut problems = Vec::new();
            let limit = crate::config::load::api_limit(Some(n), field, &mut problems);
            first_problem(problems)?;
            Ok(Some(limit))
        }
    }
}

fn budget_field(body: &Map<String, Value>) -> Result<Option<Option<BudgetRecord>>, ApiError> {
    match body.get("budget") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(value @ Value::Object(_)) => {
            let mut problems = Vec::new();
            let budget = crate::config::load::api_budget(value, "budget", &mut problems);
            first_problem(problems)?;
            Ok(Some(budget.map(BudgetRecord::from)))
        }
        Some(_) => Err(invalid(
            "budget",
            "must be an object {tokens, cost, period: day|month|total} or null",
        )),
    }
}

fn metadata_field(body: &Map<String, Value>) -> Result<Option<Map<String, Value>>, ApiError> {
    match body.get("metadata") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(Map::new())),
        Some(Value::Object(map)) => {
            if Value::Object(map.clone()).to_string().len() > MAX_METADATA {
                return Err(invalid(
                    "metadata",
                    format!("is larger than {MAX_METADATA} bytes"),
                ));
            }
            Ok(Some(map.clone()))
        }
        Some(_) => Err(invalid("metadata", "must be an object")),
    }
}

fn bool_field(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(field, "must be true or false")),
    }
}

/// What a create or patch of a key says, checked.
#[derive(Debug, Default)]
struct KeyInput {
    name: Option<String>,
    models: Option<Vec<String>>,
    rpm: Option<Option<u64>>,
    rpd: Option<Option<u64>>,
    tpm: Option<Option<u64>>,
    budget: Option<Option<BudgetRecord>>,
    expires_at: Option<Option<i64>>,
    metadata: Option<Map<String, Value>>,
    team: Option<Option<String>>,
    enabled: Option<bool>,
}

impl KeyInput {
    fn parse(
        body: &Map<String, Value>,
        create: bool,
        snapshot: &Snapshot,
    ) -> Result<Self, ApiError> {
        let allowed: &[&str] = if create {
            &[
                "name",
                "models",
                "rpm",
                "rpd",
                "tpm",
                "budget",
                "expires_at",
                "metadata",
                "team",
            ]
        } else {
            &[
                "models",
                "rpm",
                "rpd",
                "tpm",
                "budget",
                "expires_at",
                "metadata",
                "team",
                "enabled",
                "name",
            ]
        };
        known_fields(body, allowed)?;
        let models = match body.get("models") {
            None => None,
            Some(Value::Array(items)) => {
                let mut models = Vec::with_capacity(items.len());
                for item in items {
                    match item.as_str().map(str::trim) {
                        Some(m)
                            if !m.is_empty()
                                && m.len() <= 200
                                && !m.chars().any(char::is_control) =>
                        {
                            models.push(m.to_string());
                        }
                        _ => {
                            return Err(invalid(
                                "models",
                                "each must be a model name (1 to 200 bytes)",
                            ));
                        }
                    }
                }
                if models.is_empty() {
                    return Err(invalid(
                        "models",
                        "an empty list allows nothing; use [\"*\"] for every model",
                    ));
                }
                if models.len() > 1000 {
                    return Err(invalid("models", "at most 1000 names"));
                }
                Some(models)
            }
            Some(_) => return Err(invalid("models", "must be a list of model names")),
        };
        let expires_at = match body.get("expires_at") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(value) => Some(Some(time_value(value).ok_or_else(|| {
                invalid(
                    "expires_at",
                    "must be an RFC 3339 time or Unix milliseconds",
                )
            })?)),
        };
        let team = match body.get("team") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(Value::String(name)) if snapshot.teams.contains_key(name) => {
                Some(Some(name.clone()))
            }
            Some(Value::String(_)) => return Err(invalid("team", "no such team")),
            Some(_) => return Err(invalid("team", "must be a team's name or null")),
        };
        Ok(Self {
            name: name_field(body, create)?,
            models,
            rpm: limit_field(body, "rpm")?,
            rpd: limit_field(body, "rpd")?,
            tpm: limit_field(body, "tpm")?,
            budget: budget_field(body)?,
            expires_at,
            metadata: metadata_field(body)?,
            team,
            enabled: bool_field(body, "enabled")?,
        })
    }

    fn apply_to_key(&self, key: &mut KeyRecord) {
        if let Some(models) = &self.models {
            key.models.clone_from(models);
        }
        if let Some(rpm) = self.rpm {
            key.rpm = rpm;
        }
        if let Some(rpd) = self.rpd {
            key.rpd = rpd;
        }
        if let Some(tpm) = self.tpm {
            key.tpm = tpm;
        }
        if let Some(budget) = self.budget {
            key.budget = budget;
        }
        if let Some(expires_at) = self.expires_at {
            key.expires_at = expires_at;
        }
        if let Some(metadata) = &self.metadata {
            key.metadata.clone_from(metadata);
        }
        if let Some(team) = &self.team {
            key.team.clone_from(team);
        }
        if let Some(enabled) = self.enabled {
            key.enabled = enabled;
        }
    }

    /// What the audit log says changed: every field given, with its new value.
    fn changes(&self) -> Value {
        let mut changes = Map::new();
        let mut put = |field: &str, value: Value| {
            changes.insert(field.to_string(), value);
        };
        if let Some(name) = &self.name {
            put("name", json!(name));
        }
        if let Some(models) = &self.models {
            put("models", json!(models));
        }
        for (field, value) in [("rpm", self.rpm), ("rpd", self.rpd), ("tpm", self.tpm)] {
            if let Some(value) = value {
                put(field, json!(value));
            }
        }
        if let Some(budget) = &self.budget {
            put("budget", json!(budget));
        }
        if let Some(expires_at) = &self.expires_at {
            put("expires_at", json!(expires_at));
        }
        if let Some(metadata) = &self.metadata {
            put("metadata", json!(metadata));
        }
        if let Some(team) = &self.team {
            put("team", json!(team));
        }
        if let Some(enabled) = self.enabled {
            put("enabled", json!(enabled));
        }
        Value::Object(changes)
    }
}

/// What a create or patch of a team says, checked.
#[derive(Debug, Default)]
struct TeamInput {
    name: Option<String>,
    rpm: Option<Option<u64>>,
    rpd: Option<Option<u64>>,
    tpm: Option<Option<u64>>,
    budget: Option<Option<BudgetRecord>>,
    metadata: Option<Map<String, Value>>,
}

impl TeamInput {
    fn parse(body: &Map<String, Value>, create: bool) -> Result<Self, ApiError> {
        known_fields(body, &["name", "rpm", "rpd", "tpm", "budget", "metadata"])?;
        Ok(Self {
            name: name_field(body, create)?,
            rpm: limit_field(body, "rpm")?,
            rpd: limit_field(body, "rpd")?,
            tpm: limit_field(body, "tpm")?,
            budget: budget_field(body)?,
            metadata: metadata_field(body)?,
        })
    }

    fn apply(&self, team: &mut TeamRecord) {
        if let Some(rpm) = self.rpm {
            team.rpm = rpm;
        }
        if let Some(rpd) = self.rpd {
            team.rpd = rpd;
        }
        if let Some(tpm) = self.tpm {
            team.tpm = tpm;
        }
        if let Some(budget) = self.budget {
            team.budget = budget;
        }
        if let Some(metadata) = &self.metadata {
            team.metadata.clone_from(metadata);
        }
    }

    fn changes(&self) -> Value {
        let mut changes = Map::new();
        if let Some(name) = &self.name {
            changes.insert("name".into(), json!(name));
        }
        for (field, value) in [("rpm", self.rpm), ("rpd", self.rpd), ("tpm", self.tpm)] {
            if let Some(value) = value {
                changes.insert(field.into(), json!(value));
            }
        }
        if let Some(budget) = &self.budget {
            changes.insert("budget".into(), json!(budget));
        }
        if let Some(metadata) = &self.metadata {
            changes.insert("metadata".into(), json!(metadata));
        }
        Value::Object(changes)
    }
}

/// What a create or patch of an admin account says, checked.
#[derive(Debug, Default)]
struct AdminInput {
    name: Option<String>,
    password: Option<String>,
    role: Option<Role>,
    enabled: Option<bool>,
}

impl AdminInput {
    fn parse(body: &Map<String, Value>, create: bool) -> Result<Self, ApiError> {
        known_fields(body, &["name", "password", "role", "enabled"])?;
        let password = match body.get("password") {
            None if create => return Err(invalid("password", "is required")),
            None => None,
            Some(Value::String(p))
                if (MIN_PASSWORD..=MAX_PASSWORD).contains(&p.chars().count()) =>
            {
                Some(p.clone())
            }
            Some(_) => {
                return Err(invalid(
                    "password",
                    format!("must be a string of {MIN_PASSWORD} to {MAX_PASSWORD} characters"),
                ));
            }
        };
        let role = match body.get("role") {
            None => None,
            Some(Value::String(r)) => {
                Some(Role::parse(r).ok_or_else(|| invalid("role", "must be admin or viewer"))?)
            }
            Some(_) => return Err(invalid("role", "must be admin or viewer")),
        };
        Ok(Self {
            name: name_field(body, create)?,
            password,
            role,
            enabled: bool_field(body, "enabled")?,
        })
    }

    /// What changed, the password only as the fact that it did.
    fn changes(&self) -> Value {
        let mut changes = Map::new();
        if let Some(name) = &self.name {
            changes.insert("name".into(), json!(name));
        }
        if self.password.is_some() {
            changes.insert("password".into(), json!("changed"));
        }
        if let Some(role) = self.role {
            changes.insert("role".into(), json!(role.name()));
        }
        if let Some(enabled) = self.enabled {
            changes.insert("enabled".into(), json!(enabled));
        }
        Value::Object(changes)
    }
}

/// `grace` of a rotation: a duration ("10m"), zero by default, at most [`MAX_GRACE`].
fn rotate_grace(body: &Map<String, Value>) -> Result<Duration, ApiError> {
    known_fields(body, &["grace"])?;
    let grace = match body.get("grace") {
        None | Some(Value::Null) => Duration::ZERO,
        Some(Value::String(text)) => humantime::parse_duration(text.trim())
            .map_err(|_| invalid("grace", "must be a duration like \"10m\""))?,
        Some(_) => return Err(invalid("grace", "must be a duration like \"10m\"")),
    };
    if grace > MAX_GRACE {
        return Err(invalid("grace", "is at most 30 days"));
    }
    Ok(grace)
}

/// Unix milliseconds from an integer or an RFC 3339 string.
fn time_value(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .filter(|ms| (0..=253_402_300_799_999).contains(ms)),
        Value::String(text) => humantime::parse_rfc3339_weak(text.trim())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok()),
        _ => None,
    }
}

fn rfc3339(ms: i64) -> Value {
    u64::try_from(ms).map_or(Value::Null, |ms| {
        let time = std::time::UNIX_EPOCH + Duration::from_millis(ms);
        json!(humantime::format_rfc3339_millis(time).to_string())
    })
}

/// A scope's use in its current day, month and all time.
async fn scope_usage(gateway: &Gateway, scope: String) -> Value {
    let now = crate::clock::unix_now();
    let counts = super::scope_usage(gateway, scope, now).await;
    let usage = |p: Period| super::usage_json(counts.get(&p).copied().unwrap_or_default());
    json!({"minute": usage(Period::Minute), "day": usage(Period::Day), "month": usage(Period::Month), "total": usage(Period::Total)})
}

/// A key as the API shows it: never its secret or hash.
async fn key_view(gateway: &Gateway, record: &KeyRecord, with_usage: bool) -> Value {
    let now = crate::clock::unix_now_ms();
    let state = if record.revoked_at.is_some() {
        "revoked"
    } else if !record.enabled {
        "disabled"
    } else if record.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    let mut view = json!({
        "id": record.id,
        "name": record.name,
        "source": "api",
        "read_only": false,
        "prefix": format!("{}…", record.prefix),
        "models": record.models,
        "rpm": record.rpm,
        "rpd": record.rpd,
        "tpm": record.tpm,
        "budget": record.budget,
        "expires_at": record.expires_at.map_or(Value::Null, rfc3339),
        "metadata": record.metadata,
        "team": record.team,
        "enabled": record.enabled,
        "state": state,
        "previous_valid_until": record.previous.as_ref().filter(|p| p.until_ms > now).map(|p| rfc3339(p.until_ms)),
        "revoked_at": record.revoked_at.map(rfc3339),
        "created_at": rfc3339(record.created_at),
        "updated_at": rfc3339(record.updated_at),
    });
    if with_usage {
        view["usage"] = scope_usage(gateway, key_scope(&record.name)).await;
    }
    view
}

async fn team_view(gateway: &Gateway, snapshot: &Snapshot, team: &TeamRecord) -> Value {
    let keys: Vec<&str> = snapshot
        .keys
        .values()
        .filter(|k| k.revoked_at.is_none() && k.team.as_deref() == Some(team.name.as_str()))
        .map(|k| k.name.as_str())
        .collect();
    json!({
        "id": team.name,
        "name": team.name,
        "rpm": team.rpm,
        "rpd": team.rpd,
        "tpm": team.tpm,
        "budget": team.budget,
        "metadata": team.metadata,
        "keys": keys,
        "created_at": rfc3339(team.created_at),
        "updated_at": rfc3339(team.updated_at),
        "usage": scope_usage(gateway, team_scope(&team.name)).await,
    })
}

fn admin_view(admin: &AdminRecord) -> Value {
    json!({
        "name": admin.name,
        "role": admin.role.name(),
        "enabled": admin.enabled,
        "created_at": rfc3339(admin.created_at),
        "updated_at": rfc3339(admin.updated_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: Value) -> Map<String, Value> {
        json.as_object().unwrap().clone()
    }

    fn error(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        let error = result.unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        error.message
    }

    #[test]
    fn bad_key_fields_are_named() {
        let snapshot = Snapshot::default();
        let parse = |v: Value| KeyInput::parse(&body(v), true, &snapshot);
        assert!(
            error(parse(json!({"name": "a", "colour": 1}))).starts_with("`colour`: unknown field")
        );
        assert!(error(parse(json!({"name": "a", "rpm": -5}))).starts_with("`rpm`:"));
        assert!(
            error(parse(
                json!({"name": "a", "budget": {"cost": 1, "period": "week"}})
            ))
            .starts_with("`budget.period`:")
        );
        assert!(
            error(parse(json!({"name": "a", "budget": {"cost": -1}})))
                .starts_with("`budget.cost`:")
        );
        assert!(
            error(parse(
                json!({"name": "a", "budget": {"cost": 1, "every": "day"}})
            ))
            .starts_with("`budget")
        );
        assert!(error(parse(json!({"name": "a", "team": "nobody"}))).starts_with("`team`:"));
        assert!(error(parse(json!({"name": "a", "models": []}))).starts_with("`models`:"));
        assert!(
            error(parse(json!({"name": "a", "expires_at": "soon"}))).starts_with("`expires_at`:")
        );
        assert!(error(parse(json!({"rpm": 5}))).starts_with("`name`: is required"));
        let ok = parse(
            json!({"name": "a", "rpm": -1, "tpm": 10, "budget": {"cost": 2.5, "period": "day"},
                              "expires_at": "2030-01-01T00:00:00Z"}),
        )
        .unwrap();
        assert_eq!(ok.rpm, Some(None));
        assert_eq!(ok.tpm, Some(Some(10)));
        assert_eq!(ok.expires_at, Some(Some(1_893_456_000_000)));
        let patch = KeyInput::parse(&body(json!({"name": "b"})), false, &snapshot);
        assert!(error(patch).contains("cannot be changed"));
    }

    #[test]
    fn grace_and_passwords_are_checked() {
        assert_eq!(
            rotate_grace(&body(json!({"grace": "10m"}))).unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(rotate_grace(&Map::new()).unwrap(), Duration::ZERO);
        assert!(error(rotate_grace(&body(json!({"grace": "often"})))).starts_with("`grace`"));
        assert!(error(rotate_grace(&body(json!({"grace": "90d"})))).starts_with("`grace`"));
        assert!(
            error(AdminInput::parse(
                &body(json!({"name": "a", "password": "short"})),
                true
            ))
            .starts_with("`password`")
        );
        assert!(
            error(AdminInput::parse(
                &body(json!({"name": "a", "password": "long enough", "role": "root"})),
                true
            ))
            .starts_with("`role`")
        );
        let changes = AdminInput::parse(
            &body(json!({"name": "a", "password": "hunter2hunter2"})),
            true,
        )
        .unwrap()
        .changes();
        assert!(!changes.to_string().contains("hunter2"));
    }
}
