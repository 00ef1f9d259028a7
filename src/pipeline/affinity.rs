//! Object affinity: a file, upload, batch, vector store, response, fine-tuning job, thread,
//! assistant… lives on the upstream that created it, so a later request naming it goes
//! back to that upstream (and to the same key of its pool).
//!
//! **Learning.** The JSON answer of a create call (`POST /v1/files`, `/v1/batches`,
//! `/v1/responses`…, and the first event of a streamed response) is read on the side while
//! it streams to the client ([`Learner`], at most [`LEARN_LIMIT`] bytes): its `id`, and the
//! files it names (an upload's `file`, a batch's output files). What was learned is in
//! memory before the client has the answer's last byte; it is written to the store (table
//! `object_routes`) by a task of its own and, with `shared_state`, to Redis, both with the
//! expiry (`routing.affinity.ttl`), so a restart or another instance finds it.
//!
//! **Using.** A request names objects in its path (`/v1/files/{id}/content`,
//! `/v1/batches/{id}/cancel`) or in known body fields (`previous_response_id`, `file_id`,
//! `input_file_id`, `training_file`, `vector_store_ids`…, found by a byte scan before any
//! parse). Only such a request looks anything up: memory, then Redis, then the store; a
//! request that names nothing costs nothing. An ID nobody learned routes as if affinity
//! were off; so does one whose upstream left the config.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::accounting::shared::SharedState;
use crate::clock::unix_now_ms;
use crate::store::{ObjectRoute, Store};

/// Objects held in memory; past it, expired ones go, then an arbitrary quarter.
const MEMORY_LIMIT: usize = 100_000;
/// Answers read for IDs up to this size; a larger one is relayed without learning.
pub const LEARN_LIMIT: usize = 1024 * 1024;
/// A streamed answer is read for an ID in its first events, up to this size.
const SSE_LEARN_LIMIT: usize = 64 * 1024;
/// How long a request waits for the store to say where an object lives.
const STORE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Writes waiting for the store; more are dropped (the memory and Redis still have them).
const WRITE_QUEUE: usize = 65_536;
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Collections whose objects live on one upstream (`/v1/{collection}/{id}…`).
const COLLECTIONS: &[&str] = &[
    "files",
    "uploads",
    "batches",
    "vector_stores",
    "responses",
    "fine_tuning",
    "threads",
    "assistants",
    "containers",
    "conversations",
    "evals",
];
/// Path segments in an ID's place that are not IDs (`POST /v1/threads/runs`).
const NOT_IDS: &[&str] = &["runs", "input_tokens", "compact"];
/// Body fields holding one ID, and lists of IDs.
const ID_FIELDS: &[&str] = &[
    "previous_response_id",
    "file_id",
    "input_file_id",
    "training_file",
    "validation_file",
    "thread_id",
    "assistant_id",
    "vector_store_id",
];
const ID_LIST_FIELDS: &[&str] = &["vector_store_ids", "file_ids"];
/// At most this many IDs are taken from one body.
const MAX_BODY_IDS: usize = 8;

/// Where an object lives: an upstream by name, and the masked key of its pool that
/// created it (`None` for a caller's own key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub upstream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug)]
struct Entry {
    route: Route,
    /// Unix milliseconds.
    expires: i64,
}

enum Write {
    Route(ObjectRoute),
    Flush(oneshot::Sender<()>),
}

/// The object routes this instance knows, and where they are kept. Outlives reloads.
pub struct Affinity {
    memory: Mutex<HashMap<String, Entry>>,
    shared: Option<Arc<SharedState>>,
    store: Option<Arc<dyn Store>>,
    writes: Option<mpsc::Sender<Write>>,
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity")
            .field("store", &self.store.is_some())
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl Affinity {
    /// Keeps routes in memory, and in `store` and Redis (`shared`) when given; starts the
    /// task writing to the store (which needs a Tokio runtime; without one, nothing is
    /// written there).
    pub fn new(shared: Option<Arc<SharedState>>, store: Option<Arc<dyn Store>>) -> Self {
        let writes = store.as_ref().and_then(|store| {
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            let (writes, queued) = mpsc::channel(WRITE_QUEUE);
            runtime.spawn(write_routes(store.clone(), queued));
            Some(writes)
        });
        Self {
            memory: Mutex::new(HashMap::new()),
            shared,
            store,
            writes,
        }
    }

    /// Remembers that the objects `ids` live at `route`, for `ttl`.
    pub fn remember(&self, ids: &[String], route: &Route, ttl: Duration) {
        let expires =
            unix_now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        if let Ok(mut memory) = self.memory.lock() {
            for id in ids {
                insert(&mut memory, id, route.clone(), expires);
            }
        }
        let stored = serde_json::to_string(route).ok();
        for id in ids {
            if let Some(shared) = &self.shared {
                shared.object_route(id, stored.clone(), ttl);
            }
            self.write(ObjectRoute {
                id: id.clone(),
                upstream: route.upstream.clone(),
                key: route.key.clone(),
                expires_ms: expires,
            });
        }
    }

    /// Forgets an object (it was deleted).
    pub fn forget(&self, id: &str) {
        if let Ok(mut memory) = self.memory.lock() {
            memory.remove(id);
        }
        if let Some(shared) = &self.shared {
            shared.object_route(id, None, Duration::ZERO);
        }
        self.write(ObjectRoute {
            id: id.to_string(),
            upstream: String::new(),
            key: None,
            expires_ms: 0,
        });
    }

    fn write(&self, route: ObjectRoute) {
        if let Some(writes) = &self.writes {
            if writes.try_send(Write::Route(route)).is_err() {
                tracing::debug!("object route queue full; a route is kept in memory only");
            }
        }
    }

    /// Where the first of `ids` anyone knows lives: memory, then Redis, then the store.
    pub async fn lookup(&self, ids: &[String]) -> Option<Route> {
        let now = unix_now_ms();
        if let Ok(memory) = self.memory.lock() {
            let known = ids.iter().find_map(|id| {
                memory
                    .get(id)
                    .filter(|entry| entry.expires > now)
                    .map(|entry| entry.route.clone())
            });
            if known.is_some() {
                return known;
            }
        }
        for id in ids {
            if let Some((route, expires)) = self.look_further(id, now).await {
                if let Ok(mut memory) = self.memory.lock() {
                    insert(&mut memory, id, route.clone(), expires);
                }
                return Some(route);
            }
        }
        None
    }

    /// Asks Redis, then the store, where `id` lives, and until when.
    async fn look_further(&self, id: &str, now: i64) -> Option<(Route, i64)> {
        if let Some(shared) = &self.shared {
            match shared.object(id).await {
                Ok(Some(stored)) => {
                    if let Ok(route) = serde_json::from_str::<Route>(&stored) {
                        // Redis expires it; memory keeps it a minute at most.
                        return Some((route, now.saturating_add(60_000)));
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    shared.report_outage(&error, "object routes read from the store only")
                }
            }
        }
        let store = self.store.clone()?;
        let key = id.to_string();
        let found = tokio::time::timeout(
            STORE_LOOKUP_TIMEOUT,
            tokio::task::spawn_blocking(move || store.object(&key, now)),
        )
        .await;
        match found {
            Ok(Ok(Ok(Some(row)))) => Some((
                Route {
                    upstream: row.upstream,
                    key: row.key,
                },
                row.expires_ms,
            )),
            Ok(Ok(Ok(None))) => None,
            Ok(Ok(Err(error))) => {
                tracing::warn!("cannot read an object route from the store: {error:#}");
                None
            }
            Ok(Err(_)) => None,
            Err(_) => {
                tracing::warn!("the store did not say where an object lives in time");
                None
            }
        }
    }

    /// Waits (up to a few seconds) until the routes learned so far are in Redis and the
    /// store.
    pub async fn flush(&self) {
        if let Some(shared) = &self.shared {
            shared.flush().await;
        }
        if let Some(writes) = &self.writes {
            let (done, written) = oneshot::channel();
            if writes.send(Write::Flush(done)).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), written).await;
            }
        }
    }
}

/// Adds a route, making room first when memory is full.
fn insert(memory: &mut HashMap<String, Entry>, id: &str, route: Route, expires: i64) {
    if let Some(entry) = memory.get_mut(id) {
        *entry = Entry { route, expires };
        return;
    }
    if memory.len() >= MEMORY_LIMIT {
        let now = unix_now_ms();
        memory.retain(|_, entry| entry.expires > now);
        if memory.len() >= MEMORY_LIMIT {
            let drop: Vec<String> = memory.keys().take(MEMORY_LIMIT / 4).cloned().collect();
            for id in drop {
                memory.remove(&id);
            }
        }
    }
    memory.insert(id.to_string(), Entry { route, expires });
}

/// Writes queued routes to the store in batches, off the request path, and deletes
/// expired ones every hour.
async fn write_routes(store: Arc<dyn Store>, mut queued: mpsc::Receiver<Write>) {
    let mut purge = tokio::time::interval(PURGE_EVERY);
    loop {
        let first = tokio::select! {
            write = queued.recv() => match write {
                Some(write) => write,
                None => return,
            },
            _ = purge.tick() => {
                let store = store.clone();
                let purged =
                    tokio::task::spawn_blocking(move || store.purge_objects(unix_now_ms())).await;
                if let Ok(Err(error)) = purged {
                    tracing::warn!("cannot purge expired object routes: {error:#}");
                }
                continue;
            }
        };
        let mut routes = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(write) = next {
            match write {
                Write::Route(route) => routes.push(route),
                Write::Flush(done) => flushes.push(done),
            }
            next = if routes.len() < 1024 {
                queued.try_recv().ok()
            } else {
                None
            };
        }
        if !routes.is_empty() {
            let store = store.clone();
            let count = routes.len();
            let written = tokio::task::spawn_blocking(move || store.write_objects(&routes)).await;
            if let Ok(Err(error)) = written {
                tracing::warn!("cannot write {count} object routes to the store: {error:#}");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Whether `text` can be an upstream's object ID (and a Redis key part).
fn is_id(text: &str) -> bool {
    (1..=256).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The collection of a path under `/v1/` and the rest after it (`fine_tuning/jobs` is one).
fn collection(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v1/")?;
    let (name, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if !COLLECTIONS.contains(&name) {
        return None;
    }
    if name == "fine_tuning" {
        let rest = rest.strip_prefix("jobs")?;
        return match rest {
            "" => Some((name, "")),
            _ => rest.strip_prefix('/').map(|rest| (name, rest)),
        };
    }
    Some((name, rest))
}

/// The object a path names (`/v1/files/{id}/content` → `{id}`).
pub fn path_object(path: &str) -> Option<&str> {
    let (_, rest) = collection(path)?;
    let id = rest.split('/').next()?;
    (!NOT_IDS.contains(&id) && is_id(id)).then_some(id)
}

/// The object a successful request deletes: `DELETE /v1/{collection}/{id}`.
pub fn deleted_object<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    if *method != Method::DELETE {
        return None;
    }
    let (_, rest) = collection(path)?;
    path_object(path).filter(|id| *id == rest)
}

/// Whether the answer to this request names objects worth learning: a create call
/// (`POST /v1/files`), an upload's completion (its file), a batch's or a fine-tuning job's
/// state (their output files).
pub fn learns(method: &Method, path: &str) -> bool {
    let Some((name, rest)) = collection(path) else {
        return false;
    };
    let id = path_object(path);
    match *method {
        Method::POST => match id {
            None => true,
            Some(id) => name == "uploads" && rest == format!("{id}/complete"),
        },
        Method::GET => matches!(name, "batches" | "fine_tuning") && id.is_some_and(|id| id == rest),
        _ => false,
    }
}

/// The objects a JSON request body names in known fields, at any depth. A byte scan for the
/// field names comes first, so a body naming none is not parsed.
pub fn body_objects(path: &str, body: &[u8]) -> Vec<String> {
    const ALL: &[&str] = &[
        "response_id\"",
        "file_id\"",
        "_file\"",
        "thread_id\"",
        "assistant_id\"",
        "vector_store_id",
        "file_ids\"",
        "\"conversation\"",
    ];
    let needles: &[&str] = match path {
        "/v1/chat/completions" => &["file_id\""],
        "/v1/responses" => &[
            "response_id\"",
            "file_id\"",
            "vector_store_ids\"",
            "\"conversation\"",
        ],
        _ if collection(path).is_some() => ALL,
        _ => return Vec::new(),
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return Vec::new();
    };
    if !needles.iter().any(|needle| text.contains(needle)) {
        return Vec::new();
    }
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    collect_ids(&value, &mut ids);
    ids
}

fn collect_ids(value: &Value, ids: &mut Vec<String>) {
    let add = |id: &Value, ids: &mut Vec<String>| {
        if let Some(id) = id.as_str().filter(|id| is_id(id)) {
            if ids.len() < MAX_BODY_IDS && !ids.iter().any(|known| known == id) {
                ids.push(id.to_string());
            }
        }
    };
    match value {
        Value::Object(map) => {
            for (name, field) in map {
                if ID_FIELDS.contains(&name.as_str()) {
                    add(field, ids);
                } else if ID_LIST_FIELDS.contains(&name.as_str()) {
                    for id in field.as_array().into_iter().flatten() {
                        add(id, ids);
                    }
                } else if name == "conversation" {
                    add(field.get("id").unwrap_or(field), ids);
                } else {
                    collect_ids(field, ids);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_ids(item, ids);
            }
        }
        _ => {}
    }
}

/// The fields of an answer that name objects of the upstream that sent it.
#[derive(Deserialize)]
struct Created {
    #[serde(default)]
    id: Option<Value>,
    /// A completed upload's file.
    #[serde(default)]
    file: Option<Value>,
    #[serde(default)]
    output_file_id: Option<Value>,
    #[serde(default)]
    error_file_id: Option<Value>,
    #[serde(default)]
    result_files: Option<Value>,
    #[serde(default)]
    thread_id: Option<Value>,
    /// A streamed response's events carry it whole.
    #[serde(default)]
    response: Option<Value>,
}

/// The IDs an answer (or one streamed event) names.
pub fn answer_objects(json: &[u8]) -> Vec<String> {
    let Ok(created) = serde_json::from_slice::<Created>(json) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    let found = [
        created.id.as_ref(),
        created.file.as_ref().and_then(|f| f.get("id")),
        created.output_file_id.as_ref(),
        created.error_file_id.as_ref(),
        created.thread_id.as_ref(),
        created.response.as_ref().and_then(|r| r.get("id")),
    ];
    let files = created
        .result_files
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for id in found.into_iter().flatten().chain(files) {
        if let Some(id) = id.as_str().filter(|id| is_id(id)) {
            if !ids.iter().any(|known| known == id) {
                ids.push(id.to_string());
            }
        }
    }
    ids
}

/// An answer's body on its way to the client, read on the side for the IDs it names: a
/// JSON answer when its last byte passes, a stream in its first events. Every chunk is
/// handed on as it arrives.
pub struct Learner {
    inner: reqwest::Body,
    affinity: Arc<Affinity>,
    /// Where learned objects live; `None` once learned (or given up).
    route: Option<Route>,
    ttl: Duration,
    sse: bool,
    buffer: Vec<u8>,
}

impl Learner {
    pub fn new(
        inner: reqwest::Body,
        affinity: Arc<Affinity>,
        route: Route,
        ttl: Duration,
        sse: bool,
    ) -> Self {
        Self {
            inner,
            affinity,
            route: Some(route),
            ttl,
            sse,
            buffer: Vec::new(),
        }
    }

    fn take(&mut self, data: &Bytes) {
        if self.route.is_none() {
            return;
        }
        let limit = if self.sse {
            SSE_LEARN_LIMIT
        } else {
            LEARN_LIMIT
        };
        if self.buffer.len() + data.len() > limit {
            self.route = None;
            self.buffer = Vec::new();
            return;
        }
        self.buffer.extend_from_slice(data);
        if self.sse {
            // Complete `data:` lines, in order, until one names an object.
            while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let Some(data) = line.strip_prefix(b"data:") else {
                    continue;
                };
                let ids = answer_objects(data.trim_ascii());
                if !ids.is_empty() {
                    self.learn(&ids);
                    return;
                }
            }
        }
    }

    fn learn(&mut self, ids: &[String]) {
        if let Some(route) = self.route.take() {
            self.affinity.remember(ids, &route, self.ttl);
        }
        self.buffer = Vec::new();
    }

    /// A JSON answer is complete: learn what it names.
    fn finish(&mut self) {
        if self.sse || self.route.is_none() {
            return;
        }
        let ids = answer_objects(&self.buffer);
        if ids.is_empty() {
            self.route = None;
            self.buffer = Vec::new();
        } else {
            self.learn(&ids);
        }
    }
}

impl HttpBody for Learner {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, reqwest::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.take(data);
                }
                // Learned before the last byte is handed on, so the client's next request
                // finds it.
                // (What is left to come, once nothing is: not every body says it ended.)
                let complete =
                    this.inner.is_end_stream() || this.inner.size_hint().exact() == Some(0);
                if complete {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_by_paths_of_stateful_collections() {
        assert_eq!(path_object("/v1/files/file-abc/content"), Some("file-abc"));
        assert_eq!(path_object("/v1/batches/batch_1/cancel"), Some("batch_1"));
        assert_eq!(
            path_object("/v1/fine_tuning/jobs/ftjob-1/events"),
            Some("ftjob-1")
        );
        assert_eq!(path_object("/v1/threads/runs"), None);
        assert_eq!(path_object("/v1/files"), None);
        assert_eq!(path_object("/v1/chat/completions"), None);
        assert_eq!(path_object("/v1/files/bad%20id"), None);
        assert_eq!(
            deleted_object(&Method::DELETE, "/v1/files/file-1"),
            Some("file-1")
        );
        assert_eq!(
            deleted_object(&Method::DELETE, "/v1/vector_stores/vs_1/files/file-1"),
            None
        );
        assert!(learns(&Method::POST, "/v1/files"));
        assert!(learns(&Method::POST, "/v1/fine_tuning/jobs"));
        assert!(learns(&Method::POST, "/v1/uploads/upload_1/complete"));
        assert!(learns(&Method::GET, "/v1/batches/batch_1"));
        assert!(!learns(&Method::GET, "/v1/files/file-1/content"));
        assert!(!learns(&Method::GET, "/v1/files"));
        assert!(!learns(&Method::POST, "/v1/chat/completions"));
    }

    #[test]
    fn bodies_name_objects_in_known_fields_at_any_depth() {
        let body = br#"{"model": "m", "previous_response_id": "resp_1",
            "tools": [{"type": "file_search", "vector_store_ids": ["vs_1", "vs_2"]}],
            "input": [{"content": [{"type": "input_file", "file_id": "file-9"}]}]}"#;
        assert_eq!(
            body_objects("/v1/responses", body),
            ["resp_1", "vs_1", "vs_2", "file-9"]
        );
        let batch = br#"{"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}"#;
        assert_eq!(body_objects("/v1/batches", batch), ["file-1"]);
        let chat = br#"{"messages": [{"role": "tool", "tool_call_id": "call_1"}]}"#;
        assert!(body_objects("/v1/chat/completions", chat).is_empty());
        assert!(body_objects("/v1/embeddings", batch).is_empty());
    }

    #[test]
    fn answers_name_what_they_created() {
        let upload = br#"{"id": "upload_1", "object": "upload", "file": {"id": "file-7"}}"#;
        assert_eq!(answer_objects(upload), ["upload_1", "file-7"]);
        let batch = br#"{"id": "batch_1", "output_file_id": "file-8", "error_file_id": null}"#;
        assert_eq!(answer_objects(batch), ["batch_1", "file-8"]);
        let event = br#"{"type": "response.created", "response": {"id": "resp_5"}}"#;
        assert_eq!(answer_objects(event), ["resp_5"]);
        assert!(answer_objects(b"[1, 2]").is_empty());
    }
}
