//! The response cache: exact-match answers to deterministic-looking requests, kept for a
//! while so a repeat costs no upstream call.
//!
//! A request's [`Key`] is a SHA-256 of its scope (the key, team or everyone: nobody gets
//! another tenant's answer), its path and its normalised JSON body: keys sorted, and the
//! fields that do not change the answer (`user`, `stream_options`, `metadata`, and for
//! chat completions `stream`, since either form answers the other) left out. Entries live
//! in memory ([`memory::Lru`], under a byte cap) or, with `shared_state`, in Redis so every
//! instance shares them. Writes go through a queue to a task of their own, so storing an
//! answer never delays the client; a lookup is one map read or one Redis `GET` under the
//! shared-state timeout (a miss if Redis does not answer).
//!
//! This module knows no HTTP: the pipeline's `cached` stage looks up, replays and fills.

pub mod convert;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::aio::ConnectionManager;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, mpsc};

use crate::config::{self, Config};

/// The paths whose answers are cached.
const PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/moderations",
];
/// The path whose streamed and plain answers stand in for each other.
pub const CHAT: &str = "/v1/chat/completions";
/// Fields that do not change an answer.
const IGNORED: [&str; 3] = ["user", "stream_options", "metadata"];
/// Writes waiting for the writer task; more are dropped (a cache may forget).
const QUEUE: usize = 1024;
/// The largest answer cached, at most: bigger ones pass uncached.
const MAX_ENTRY: usize = 8 << 20;

/// Where a request's answer is cached: a SHA-256, so no two scopes or requests share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One cached answer, as the client got it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// A stream of server-sent events (else one JSON body).
    pub stream: bool,
    pub content_type: String,
    /// The model that served it, for `x-sluice-model`.
    pub model: Option<String>,
    pub body: Bytes,
}

impl Entry {
    /// Bytes it holds.
    pub fn size(&self) -> usize {
        self.body.len() + self.content_type.len() + self.model.as_ref().map_or(0, String::len)
    }

    /// The stored form: a flag byte, two length-prefixed strings, the body.
    fn encode(&self) -> Vec<u8> {
        let model = self.model.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(self.size() + 5);
        out.push(u8::from(self.stream));
        for text in [self.content_type.as_str(), model] {
            let len = u16::try_from(text.len()).unwrap_or(0);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
        }
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&flag, mut rest) = bytes.split_first()?;
        let mut text = || {
            let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
            let value = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_string();
            rest = &rest[2 + len..];
            Some(value)
        };
        let content_type = text()?;
        let model = text()?;
        Some(Self {
            stream: flag == 1,
            content_type,
            model: (!model.is_empty()).then_some(model),
            body: Bytes::copy_from_slice(rest),
        })
    }
}

/// What the cache makes of one request: where its answer lives and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub key: Key,
    pub ttl: Duration,
    /// The client asked for a stream.
    pub stream: bool,
    /// The client asked for the usage chunk of a stream.
    pub include_usage: bool,
}

/// The cache the gateway holds.
pub struct ResponseCache {
    pub config: config::Cache,
    /// The Redis it uses, as configured: a reload that changes it starts a new cache.
    pub shared_state: Option<config::SharedState>,
    memory: memory::Lru,
    redis: Option<Arc<Shared>>,
    writes: mpsc::Sender<(Key, Entry, Duration)>,
    /// Largest entry stored.
    pub max_entry: usize,
    /// Bytes held by answers being captured right now, all requests together: bounded by
    /// the cache's cap, so many large misses at once cannot hold unbounded memory.
    capturing: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("config", &self.config)
            .field("shared", &self.redis.is_some())
            .finish()
    }
}

/// The Redis side: entries under `{prefix}:cache:{key}` with their TTL.
struct Shared {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
}

impl Shared {
    async fn connection(&self) -> anyhow::Result<ConnectionManager> {
        let manager = self
            .connection
            .get_or_try_init(|| async { ConnectionManager::new(self.client.clone()).await })
            .await?;
        Ok(manager.clone())
    }

    fn key(&self, key: &Key) -> String {
        format!("{}:cache:{}", self.prefix, key.hex())
    }

    async fn get(&self, key: &Key) -> anyhow::Result<Option<Vec<u8>>> {
        let call = async {
            let mut connection = self.connection().await?;
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(self.key(key))
                .query_async(&mut connection)
                .await?;
            anyhow::Ok(value)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer in time"))?
    }

    async fn set(&self, key: &Key, value: Vec<u8>, ttl: Duration) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let () = redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .query_async(&mut connection)
            .await?;
        Ok(())
    }
}

impl ResponseCache {
    /// The most bytes answers being captured may hold together: the cache's own cap.
    fn max_capturing(&self) -> usize {
        usize::try_from(self.config.max_bytes).unwrap_or(usize::MAX)
    }

    /// The cache `config` asks for, if any, with its writer task started (in Redis when
    /// `shared_state` is on). Needs a Tokio runtime.
    pub fn start(config: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(cache) = &config.cache else {
            return Ok(None);
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("the response cache needs the Tokio runtime"))?;
        let redis = match &config.shared_state {
            Some(shared) => Some(Arc::new(Shared {
                client: redis::Client::open(shared.redis.as_str())?,
                connection: OnceCell::new(),
                prefix: shared.prefix.clone(),
                timeout: shared.timeout,
            })),
            None => None,
        };
        let cap = usize::try_from(cache.max_bytes).unwrap_or(usize::MAX);
        let (writes, queued) = mpsc::channel(QUEUE);
        let this = Arc::new(Self {
            config: cache.clone(),
            shared_state: config.shared_state.clone(),
            memory: memory::Lru::new(cap),
            redis,
            writes,
            max_entry: MAX_ENTRY.min(cap),
            capturing: std::sync::atomic::AtomicUsize::new(0),
        });
        runtime.spawn(write(Arc::downgrade(&this), queued));
        Ok(Some(this))
    }

    /// Whether this is the cache `config` asks for (same settings, same Redis), so a
    /// reload keeps it and what it holds.
    pub fn fits(&self, config: &Config) -> bool {
        Some(&self.config) == config.cache.as_ref() && self.shared_state == config.shared_state
    }

    /// What the cache makes of a request to `path` with this JSON `body` in `scope`:
    /// `None` when it is not cached (another path, not a JSON object, not deterministic
    /// when only those are, or its model's TTL is zero).
    pub fn request(&self, scope: &str, path: &str, body: &[u8]) -> Option<Request> {
        if !PATHS.contains(&path) {
            return None;
        }
        let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(body) else {
            return None;
        };
        let chat_like = path == CHAT || path == "/v1/completions";
        if chat_like && self.config.deterministic_only && !deterministic(&object) {
            return None;
        }
        let ttl = self
            .config
            .ttl_for(object.get("model").and_then(Value::as_str));
        if ttl.is_zero() {
            return None;
        }
        let stream = object.get("stream").and_then(Value::as_bool) == Some(true);
        let include_usage = object
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        for field in IGNORED {
            object.remove(field);
        }
        if path == CHAT {
            object.remove("stream");
        }
        let mut hasher = Sha256::new();
        hasher.update(scope.as_bytes());
        hasher.update([0]);
        hasher.update(path.as_bytes());
        hasher.update([0]);
        let mut canonical = Vec::with_capacity(body.len());
        write_canonical(&Value::Object(object), &mut canonical);
        hasher.update(&canonical);
        Some(Request {
            key: Key(hasher.finalize().into()),
            ttl,
            stream,
            include_usage,
        })
    }

    /// The entry under `key`, if any (a Redis that does not answer is a miss).
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let Some(redis) = &self.redis else {
            return self.memory.get(key, crate::clock::now_ms());
        };
        match redis.get(key).await {
            Ok(value) => value.as_deref().and_then(Entry::decode).map(Arc::new),
            Err(error) => {
                tracing::debug!("cache lookup failed ({error:#}); answered as a miss");
                None
            }
        }
    }

    /// Queues an answer to store; never waits (a full queue forgets it).
    pub fn put(&self, key: Key, entry: Entry, ttl: Duration) {
        if entry.size() > self.max_entry {
            return;
        }
        let _ = self.writes.try_send((key, entry, ttl));
    }

    /// Bytes the in-memory store holds (zero with Redis).
    pub fn memory_bytes(&self) -> usize {
        self.memory.bytes()
    }

    /// Answers the in-memory store holds (none with Redis).
    pub fn memory_len(&self) -> usize {
        self.memory.len()
    }

    fn store(&self, key: Key, entry: Entry, ttl: Duration) -> Option<(Arc<Shared>, Vec<u8>)> {
        match &self.redis {
            Some(redis) => Some((redis.clone(), entry.encode())),
            None => {
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                let expires = crate::clock::now_ms().saturating_add(ms);
                // A copy of exactly its length: the capture's buffer may have grown past
                // it, and the cap counts what is held.
                let entry = Entry {
                    body: Bytes::copy_from_slice(&entry.body),
                    ..entry
                };
                self.memory.insert(key, Arc::new(entry), expires);
                None
            }
        }
    }
}

/// The writer task: stores queued answers until the cache is dropped.
async fn write(
    cache: std::sync::Weak<ResponseCache>,
    mut queued: mpsc::Receiver<(Key, Entry, Duration)>,
) {
    while let Some((key, entry, ttl)) = queued.recv().await {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if let Some((redis, value)) = cache.store(key, entry, ttl) {
            drop(cache);
            if let Err(error) = redis.set(&key, value, ttl).await {
                tracing::debug!("cache store failed ({error:#})");
            }
        }
    }
}

/// Whether a completion request asks for the same answer every time: temperature 0, or a
/// `seed`.
fn deterministic(object: &serde_json::Map<String, Value>) -> bool {
    object
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0)
        || object.get("seed").is_some_and(|s| !s.is_null())
}

/// JSON with every object's keys sorted, so equal requests hash alike whatever their
/// field order.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(key.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// An answer being captured as it is relayed, to be stored when it ends whole.
#[derive(Debug)]
pub struct Fill {
    cache: Arc<ResponseCache>,
    key: Key,
    ttl: Duration,
    /// The model that served, for `x-sluice-model` on a hit.
    pub model: Option<String>,
    buffer: BytesMut,
    /// Set when the answer's head is relayed.
    pub content_type: String,
    pub stream: bool,
}

impl Fill {
    pub fn new(cache: Arc<ResponseCache>, request: &Request) -> Self {
        Self {
            cache,
            key: request.key,
            ttl: request.ttl,
            model: None,
            buffer: BytesMut::new(),
            content_type: String::new(),
            stream: false,
        }
    }

    /// Takes a copy of relayed bytes; `false` once the answer is too big to cache, or the
    /// answers being captured together would hold more than the cache's cap.
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.buffer.len() + chunk.len() > self.cache.max_entry {
            return false;
        }
        let held = self.cache.capturing.fetch_add(chunk.len(), Relaxed) + chunk.len();
        if held > self.cache.max_capturing() {
            self.cache.capturing.fetch_sub(chunk.len(), Relaxed);
            return false;
        }
        self.buffer.extend_from_slice(chunk);
        true
    }

    /// The answer ended whole: queue it for storing.
    pub fn complete(mut self) {
        let body = std::mem::take(&mut self.buffer).freeze();
        self.release(body.len());
        let entry = Entry {
            stream: self.stream,
            content_type: std::mem::take(&mut self.content_type),
            model: self.model.take(),
            body,
        };
        self.cache.put(self.key, entry, self.ttl);
    }

    fn release(&self, bytes: usize) {
        self.cache
            .capturing
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Fill {
    /// An answer given up on (too big, cut, an error) gives its bytes back.
    fn drop(&mut self) {
        self.release(self.buffer.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(deterministic_only: bool) -> ResponseCache {
        let (writes, _) = mpsc::channel(1);
        ResponseCache {
            config: config::Cache {
                ttl: Duration::from_secs(60),
                max_bytes: 1 << 20,
                scope: config::CacheScope::Key,
                models: [("never".to_string(), Duration::ZERO)].into(),
                deterministic_only,
                count_tokens: false,
            },
            shared_state: None,
            memory: memory::Lru::new(1 << 20),
            redis: None,
            writes,
            max_entry: 1 << 20,
            capturing: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn key(cache: &ResponseCache, scope: &str, path: &str, body: &str) -> Option<Key> {
        cache.request(scope, path, body.as_bytes()).map(|r| r.key)
    }

    #[test]
    fn equal_requests_share_a_key_whatever_their_order_and_ignored_fields() {
        let c = cache(true);
        let a = key(
            &c,
            "key:a",
            CHAT,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let b = key(
            &c,
            "key:a",
            CHAT,
            r#"{"messages":[{"content":"hi","role":"user"}],"user":"u1","stream":true,"stream_options":{"include_usage":true},"temperature":0,"model":"m","metadata":{"x":1}}"#,
        );
        assert!(a.is_some());
        assert_eq!(a, b);
        let other_scope = key(
            &c,
            "key:b",
            CHAT,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_ne!(a, other_scope);
        let other_content = key(
            &c,
            "key:a",
            CHAT,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"ho"}]}"#,
        );
        assert_ne!(a, other_content);
    }

    #[test]
    fn only_deterministic_requests_are_cached_unless_configured() {
        let c = cache(true);
        assert!(key(&c, "s", CHAT, r#"{"model":"m","messages":[]}"#).is_none());
        assert!(
            key(
                &c,
                "s",
                CHAT,
                r#"{"model":"m","temperature":0.7,"messages":[]}"#
            )
            .is_none()
        );
        assert!(key(&c, "s", CHAT, r#"{"model":"m","seed":7,"messages":[]}"#).is_some());
        assert!(key(&c, "s", "/v1/embeddings", r#"{"model":"m","input":"x"}"#).is_some());
        assert!(key(&c, "s", "/v1/files", r#"{"model":"m","seed":7}"#).is_none());
        assert!(key(&c, "s", CHAT, r#"{"model":"never","seed":7,"messages":[]}"#).is_none());
        assert!(key(&c, "s", CHAT, "[1,2]").is_none());
        let any = cache(false);
        assert!(key(&any, "s", CHAT, r#"{"model":"m","messages":[]}"#).is_some());
    }

    #[test]
    fn entries_survive_their_stored_form() {
        let entry = Entry {
            stream: true,
            content_type: "text/event-stream".into(),
            model: Some("gpt-4o".into()),
            body: Bytes::from_static(b"data: {}\n\ndata: [DONE]\n\n"),
        };
        assert_eq!(Entry::decode(&entry.encode()), Some(entry));
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(&[0, 0, 9]), None);
    }

    #[test]
    fn answers_captured_together_never_hold_more_than_the_cap() {
        let c = Arc::new(cache(false));
        let request = Request {
            key: Key([0; 32]),
            ttl: Duration::from_secs(60),
            stream: false,
            include_usage: false,
        };
        let chunk = vec![b'x'; 600 << 10];
        let mut first = Fill::new(c.clone(), &request);
        let mut second = Fill::new(c.clone(), &request);
        assert!(first.push(&chunk));
        // Both at once would hold 1.2 MiB of a 1 MiB cap: the second gives up.
        assert!(!second.push(&chunk));
        drop(first);
        let mut third = Fill::new(c.clone(), &request);
        assert!(third.push(&chunk), "the first's bytes were given back");
        drop(third);
        drop(second);
        assert_eq!(c.capturing.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
