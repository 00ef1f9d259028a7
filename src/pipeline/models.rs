//! `GET /v1/models`: the models this gateway serves.
//!
//! Upstreams that declare their models contribute those names; an upstream that serves
//! anything (`"*"`) contributes its own list, fetched live. With a single upstream that
//! serves anything and a caller free to use any model, the request is simply forwarded.

use std::collections::HashSet;
use std::time::Duration;

use http::request::Parts;
use http::{Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::accounting::records::Pending;
use crate::gateway::Gateway;
use crate::http::body::{Body, json_response};
use crate::pipeline::access::Caller;
use crate::pipeline::forward;
use crate::upstream::UpstreamRuntime;

const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn list(
    gateway: &Gateway,
    caller: Caller,
    parts: Parts,
    body: Incoming,
    path: &str,
    record: Option<Box<Pending>>,
) -> Response<Body> {
    if let [only] = gateway.upstreams.as_slice() {
        if only.config.models.any && only.config.model_map.is_empty() && !caller.restricts_models()
        {
            return forward::forward(gateway, caller, parts, body, path, record).await;
        }
    }
    let mut seen = HashSet::new();
    let mut data = Vec::new();
    for upstream in &gateway.upstreams {
        let config = &upstream.config;
        let mut entries = if config.models.any {
            fetch(upstream, &caller).await
        } else {
            Vec::new()
        };
        // Declared names and aliases, in a stable order.
        let mut declared: Vec<&String> = config
            .models
            .names
            .iter()
            .chain(config.model_map.keys())
            .collect();
        declared.sort_unstable();
        entries.extend(
            declared.into_iter().map(
                |id| json!({"id": id, "object": "model", "created": 0, "owned_by": config.name}),
            ),
        );
        for entry in entries {
            let Some(id) = entry.get("id").and_then(Value::as_str) else {
                continue;
            };
            if caller.may_use(id) && seen.insert(id.to_string()) {
                data.push(entry);
            }
        }
    }
    if let Some(mut record) = record {
        record.status = 200;
        record.latency = Some(record.started.elapsed());
        gateway.submit_record(record);
    }
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// An upstream's own model list; on failure, nothing (the other upstreams still answer).
async fn fetch(upstream: &UpstreamRuntime, caller: &Caller) -> Vec<Value> {
    let kind = crate::protocol::UpstreamKind::of(&upstream.config);
    if matches!(
        kind,
        crate::protocol::UpstreamKind::Anthropic | crate::protocol::UpstreamKind::Gemini
    ) {
        // Other APIs list models in shapes of their own: their configured names stand.
        return Vec::new();
    }
    let url = match kind.target(
        &http::Method::GET,
        "/v1/models",
        None,
        None,
        &upstream.config,
        None,
    ) {
        Ok((path, query)) => upstream.url(&path, query.as_deref()),
        Err(_) => return Vec::new(),
    };
    // The stream is held until the list is read.
    let (client, _stream) = upstream.lease();
    let mut request = client.get(url);
    match caller {
        Caller::Passthrough(value) => {
            request = request.header(header::AUTHORIZATION, value.clone())
        }
        _ => match upstream.own_credential().await {
            Ok(Some((name, value))) => request = request.header(name, value),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(upstream = %upstream.config.name, "cannot list the upstream's models: {}", error.message);
                return Vec::new();
            }
        },
    }
    for (name, value) in &upstream.config.headers {
        request = request.header(name.clone(), value.clone());
    }
    let timeout = upstream.config.timeouts.first_byte.min(FETCH_TIMEOUT);
    let result = tokio::time::timeout(timeout, async {
        let response = request.send().await?.error_for_status()?;
        response.bytes().await
    })
    .await;
    match result {
        Ok(Ok(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(mut object)) => match object.remove("data") {
                Some(Value::Array(list)) => list,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        },
        Ok(Err(error)) => {
            tracing::warn!(upstream = %upstream.config.name, "cannot list the upstream's models: {}", error.without_url());
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(upstream = %upstream.config.name, "listing the upstream's models timed out");
            Vec::new()
        }
    }
}
