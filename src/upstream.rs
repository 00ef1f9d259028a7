//! One upstream at run time: its HTTP client (connection pool, connect timeout, outbound
//! proxy), its credentials (a key pool used in turn, or a token endpoint) and the health
//! figures routing reads (requests in flight, time to first byte, cooldowns), handed to the
//! router as plain numbers through [`Health`]. Over HTTP/2 (`http2:`) streams to an
//! upstream share a few connections, at most `http2_streams` on each ([`Http2Pool`]); a
//! WebSocket handshake, which needs a connection of its own, goes through an
//! HTTP/1.1-only client.

pub mod http2;
pub mod token;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use http::{HeaderName, HeaderValue};

use crate::clock::now_ms;
use crate::config::{Http2Mode, Upstream};
use crate::protocol::UpstreamKind;
use crate::pure::routing::Health;
use crate::upstream::http2::{Http2Pool, StreamSlot};
use crate::upstream::token::TokenCache;

#[derive(Debug)]
pub struct UpstreamRuntime {
    pub config: Upstream,
    /// The client speaking HTTP/1.1 and its pool: every exchange's when the upstream is
    /// not spoken to over HTTP/2, else WebSocket handshakes' only (an upgrade takes over
    /// its connection, which an HTTP/2 stream cannot). Replaced whole by
    /// [`Self::shed_idle_connections`]; read by cloning a handle, never held across an
    /// await.
    http1: RwLock<reqwest::Client>,
    /// The HTTP/2 connections, when `http2:` may speak HTTP/2 to it.
    http2: Option<Arc<Http2Pool>>,
    next_key: AtomicUsize,
    /// `Bearer <key>` for each key (the key alone for Azure's `api-key`), built once so
    /// the hot path only clones a handle.
    auth_headers: Vec<HeaderValue>,
    /// The header the keys go in (`Authorization`, or Azure's `api-key`).
    pub key_header: HeaderName,
    /// The upstream's name as the `x-sluice-upstream` response header.
    pub name_header: HeaderValue,
    /// Whether `base_url` already ends in `/v1`, so `/v1/...` paths drop their own.
    base_has_version: bool,
    pub token: Option<TokenCache>,
    /// Requests sent and not yet finished (for `least_busy`).
    pub in_flight: AtomicUsize,
    /// Moving average of time to first byte in µs; 0 until the first answer.
    pub latency_us: AtomicU64,
    /// The upstream rests until this [`now_ms`] instant; 0 = healthy.
    pub cooldown_until: AtomicU64,
    /// Failures in a row.
    pub failures: AtomicU64,
    /// Per key: rests until this instant.
    key_cooldown_until: Vec<AtomicU64>,
}

/// Counts a request in flight on an upstream until dropped, and holds its HTTP/2 stream
/// (if it took one) as long.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<UpstreamRuntime>,
    _stream: Option<StreamSlot>,
}

impl InFlight {
    /// Counts one exchange with `upstream`, holding `stream` (from
    /// [`UpstreamRuntime::lease`]) until it ends.
    pub fn new(upstream: &Arc<UpstreamRuntime>, stream: Option<StreamSlot>) -> Self {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            upstream: upstream.clone(),
            _stream: stream,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamRuntime {
    pub fn new(config: Upstream) -> anyhow::Result<Self> {
        let name = config.name.clone();
        let may_speak_h2 = match config.http2 {
            Http2Mode::Off => false,
            Http2Mode::H2c => true,
            Http2Mode::Auto => config.base_url.starts_with("https://"),
        };
        let http2 = if may_speak_h2 {
            Some(Arc::new(
                Http2Pool::new(config.clone()).with_context(|| format!("upstream {name}"))?,
            ))
        } else {
            None
        };
        // Plain `http://` under `auto` speaks HTTP/1.1 too.
        let http1 =
            build_client(&config, Http2Mode::Off).with_context(|| format!("upstream {name}"))?;
        let (key_header, bearer) = UpstreamKind::of(&config).key_header();
        let auth_headers = config
            .keys
            .iter()
            .map(|key| {
                let text = if bearer {
                    format!("Bearer {}", key.expose())
                } else {
                    key.expose().to_string()
                };
                let mut value = HeaderValue::from_str(&text).with_context(|| {
                    format!("upstream {name}: a key has characters not allowed in a header")
                })?;
                value.set_sensitive(true);
                Ok(value)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name_header = HeaderValue::from_str(&name).with_context(|| {
            format!("upstream {name}: the name must be usable as a header value")
        })?;
        // A client of its own: the upstream's is replaced after a burst, and a clone here
        // would keep the old pool, with the burst's idle connections, alive.
        let token = match config.token.clone() {
            Some(source) => Some(TokenCache::new(
                source,
                build_client(&config, config.http2).with_context(|| format!("upstream {name}"))?,
            )),
            None => None,
        };
        Ok(Self {
            base_has_version: config.base_url.ends_with("/v1"),
            key_cooldown_until: config.keys.iter().map(|_| AtomicU64::new(0)).collect(),
            config,
            http1: RwLock::new(http1),
            http2,
            next_key: AtomicUsize::new(0),
            auth_headers,
            key_header,
            name_header,
            token,
            in_flight: AtomicUsize::new(0),
            latency_us: AtomicU64::new(0),
            cooldown_until: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    pub fn key_count(&self) -> usize {
        self.auth_headers.len()
    }

    /// The client for one exchange with this upstream (a handle: cheap to clone) and,
    /// over HTTP/2, the stream it takes on that client's connection: keep it until the
    /// exchange ends (its answer's body included), so the connection counts it.
    pub fn lease(&self) -> (reqwest::Client, Option<StreamSlot>) {
        match &self.http2 {
            Some(pool) => {
                let (client, stream) = pool.lease();
                (client, Some(stream))
            }
            None => (self.http1_client(), None),
        }
    }

    /// The client for a request that asks to switch protocols (a WebSocket handshake):
    /// always HTTP/1.1.
    pub fn upgrade_client(&self) -> reqwest::Client {
        self.http1_client()
    }

    fn http1_client(&self) -> reqwest::Client {
        self.http1
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// HTTP/2 connections open to this upstream and the exchanges they carry; `None` when
    /// it is spoken to over HTTP/1.1.
    pub fn http2_load(&self) -> Option<(usize, usize)> {
        self.http2.as_ref().map(|pool| pool.load())
    }

    /// Closes the idle HTTP/1.1 connections kept for this upstream, after a burst of
    /// streams: a fresh client (an empty pool) takes the old one's place. Exchanges under
    /// way keep their connections, which close when they end, instead of waiting in the
    /// pool for its idle timeout with tens of KiB each (hyper's buffers). Steady traffic
    /// never gets here, so it keeps its connections. A burst's HTTP/2 connections close
    /// by themselves (`http2_idle`).
    pub fn shed_idle_connections(&self) {
        match build_client(&self.config, Http2Mode::Off) {
            Ok(client) => *self.http1.write().unwrap_or_else(PoisonError::into_inner) = client,
            Err(error) => {
                tracing::debug!(upstream = %self.config.name, "cannot renew the client: {error:#}")
            }
        }
    }

    /// The `Authorization` value of key `index`.
    pub fn auth_header(&self, index: usize) -> Option<&HeaderValue> {
        self.auth_headers.get(index)
    }

    /// The masked form of key `index`, for logs and status.
    pub fn masked_key(&self, index: usize) -> Option<String> {
        self.config
            .keys
            .get(index)
            .map(crate::config::Secret::masked)
    }

    pub fn is_cooling(&self, now: u64) -> bool {
        self.cooldown_until.load(Ordering::Relaxed) > now
    }

    pub fn key_is_cooling(&self, index: usize, now: u64) -> bool {
        self.key_cooldown_until
            .get(index)
            .is_some_and(|until| until.load(Ordering::Relaxed) > now)
    }

    pub fn key_cooldown_until(&self, index: usize) -> u64 {
        self.key_cooldown_until
            .get(index)
            .map_or(0, |until| until.load(Ordering::Relaxed))
    }

    /// The upstream's own credential for a request of sluice's making: its token, or its
    /// next usable key, with the header it goes in.
    pub async fn own_credential(
        &self,
    ) -> Result<Option<(HeaderName, HeaderValue)>, crate::http::error::ApiError> {
        if let Some(cache) = &self.token {
            return Ok(Some((
                http::header::AUTHORIZATION,
                cache.get().await?.header,
            )));
        }
        let key = self
            .pick_key(now_ms(), |_| false)
            .flatten()
            .or_else(|| self.soonest_key());
        Ok(key
            .and_then(|k| self.auth_header(k))
            .map(|value| (self.key_header.clone(), value.clone())))
    }

    pub fn cool_key(&self, index: usize, duration: Duration) {
        if let Some(until) = self.key_cooldown_until.get(index) {
            until.store(now_ms() + millis(duration), Ordering::Relaxed);
        }
    }

    /// Rests the upstream for at least `duration` from now, as another instance asked.
    pub fn rest_at_least(&self, duration: Duration) {
        self.cooldown_until
            .fetch_max(now_ms() + millis(duration), Ordering::Relaxed);
    }

    /// Rests one key for at least `duration` from now, as another instance asked.
    pub fn rest_key_at_least(&self, index: usize, duration: Duration) {
        if let Some(until) = self.key_cooldown_until.get(index) {
            until.fetch_max(now_ms() + millis(duration), Ordering::Relaxed);
        }
    }

    /// Records a failure of the upstream itself; it rests for `duration`.
    pub fn record_failure(&self, duration: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.cooldown_until
            .store(now_ms() + millis(duration), Ordering::Relaxed);
    }

    /// Records an answer: the upstream is healthy, and its first-byte time joins the average.
    /// `true` when it had been resting: it has recovered.
    pub fn record_success(&self, first_byte: Duration) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        let recovered = self.cooldown_until.load(Ordering::Relaxed) != 0
            && self.cooldown_until.swap(0, Ordering::Relaxed) != 0;
        let sample = u64::try_from(first_byte.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let old = self.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 4 + sample) / 5
        };
        self.latency_us.store(new, Ordering::Relaxed);
        recovered
    }

    /// The upstream URL for a gateway path (`/v1/...`) and optional query string.
    /// A path listed in `paths` is replaced whole; otherwise it is appended to `base_url`.
    pub fn url(&self, path: &str, query: Option<&str>) -> String {
        let path = match self.config.paths.get(path) {
            Some(mapped) => mapped.as_str(),
            None => match path.strip_prefix("/v1") {
                Some(rest)
                    if self.base_has_version && (rest.is_empty() || rest.starts_with('/')) =>
                {
                    rest
                }
                _ => path,
            },
        };
        let mut url = String::with_capacity(
            self.config.base_url.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        url.push_str(&self.config.base_url);
        url.push_str(path);
        if let Some(query) = query {
            url.push('?');
            url.push_str(query);
        }
        url
    }
}

/// The figures the router decides on, read from the atomics the request path updates.
impl Health for UpstreamRuntime {
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn latency_us(&self) -> u64 {
        self.latency_us.load(Ordering::Relaxed)
    }

    fn rests_until(&self) -> u64 {
        self.cooldown_until.load(Ordering::Relaxed)
    }

    fn key_count(&self) -> usize {
        UpstreamRuntime::key_count(self)
    }

    fn key_rests_until(&self, key: usize) -> u64 {
        self.key_cooldown_until(key)
    }

    fn weight(&self) -> u32 {
        self.config.weight
    }

    fn key_turn(&self) -> usize {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2)
}

/// How often an idle or busy HTTP/2 connection to an upstream is pinged, and how long a
/// ping may go unanswered before the connection is dropped as dead (its streams fail and
/// are retried like any connection error, instead of waiting for their timeouts).
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Flow-control windows: a stream may have 1 MiB in flight (an upload or a long answer
/// is not throttled by round trips), the connection 16 MiB across its streams; what is
/// buffered is bounded by these, whatever the upstream sends.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;
/// Larger frames than the 16 KiB default mean fewer frame headers for big bodies.
const H2_MAX_FRAME: u32 = 64 << 10;

fn build_client(config: &Upstream, http2: Http2Mode) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.timeouts.connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        // An HTTP/2 client keeps its one connection in the pool even with `idle_connections: 0`,
        // or each exchange would open one.
        .pool_max_idle_per_host(if http2 == Http2Mode::Off {
            config.idle_connections
        } else {
            config.idle_connections.max(1)
        })
        // A gateway relays redirects to the client instead of following them.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")));
    builder = match http2 {
        Http2Mode::Off => builder.http1_only(),
        Http2Mode::H2c => builder.http2_prior_knowledge(),
        // Offered by ALPN on https; plain http stays HTTP/1.1.
        Http2Mode::Auto => builder,
    };
    if http2 != Http2Mode::Off {
        builder = builder
            .http2_keep_alive_interval(H2_KEEP_ALIVE)
            .http2_keep_alive_timeout(H2_KEEP_ALIVE)
            .http2_keep_alive_while_idle(true)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_max_frame_size(H2_MAX_FRAME);
    }
    if let Some(pem) = &config.tls_ca {
        for certificate in reqwest::Certificate::from_pem_bundle(pem).context("bad tls_ca")? {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder = match &config.proxy {
        Some(url) => builder.proxy(reqwest::Proxy::all(url.as_str()).context("bad proxy URL")?),
        // Only the configured proxy is used, never one picked up from the environment.
        None => builder.no_proxy(),
    };
    builder.build().context("cannot build its HTTP client")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelSet, Secret, Timeouts};

    pub fn upstream_config(base_url: &str, keys: &[&str]) -> Upstream {
        Upstream {
            name: "u".into(),
            kind: Default::default(),
            api_version: None,
            base_url: base_url.into(),
            keys: keys.iter().map(|k| Secret::new(*k)).collect(),
            models: ModelSet::any(),
            headers: Vec::new(),
            proxy: None,
            timeouts: Timeouts::default(),
            model_map: Default::default(),
            field_aliases: Vec::new(),
            paths: Default::default(),
            weight: 1,
            token: None,
            limits: Default::default(),
            http2: Default::default(),
            tls_ca: None,
            http2_streams: crate::config::Upstream::HTTP2_STREAMS,
            http2_idle: crate::config::Upstream::HTTP2_IDLE,
            idle_connections: 1024,
        }
    }

    fn upstream(base_url: &str, keys: &[&str]) -> UpstreamRuntime {
        UpstreamRuntime::new(upstream_config(base_url, keys)).unwrap()
    }

    #[test]
    fn keys_are_used_in_turn_skipping_resting_ones() {
        let u = upstream("http://h", &["a", "b", "c"]);
        let now = now_ms();
        let used: Vec<usize> = (0..6)
            .map(|_| u.pick_key(now, |_| false).unwrap().unwrap())
            .collect();
        assert_eq!(used, [0, 1, 2, 0, 1, 2]);
        assert_eq!(u.auth_header(0).unwrap(), "Bearer a");
        u.cool_key(1, Duration::from_secs(60));
        let used: Vec<usize> = (0..4)
            .map(|_| u.pick_key(now_ms(), |_| false).unwrap().unwrap())
            .collect();
        assert!(!used.contains(&1), "{used:?}");
        assert_eq!(
            u.pick_key(now_ms(), |i| i != 1),
            None,
            "only the resting key is left"
        );
        assert_eq!(u.soonest_key(), Some(0));
        assert_eq!(
            upstream("http://h", &[]).pick_key(now, |_| false),
            Some(None)
        );
    }

    #[test]
    fn urls_join_base_and_path_once() {
        assert_eq!(
            upstream("http://h", &[]).url("/v1/models", None),
            "http://h/v1/models"
        );
        assert_eq!(
            upstream("http://h/api", &[]).url("/v1/x", Some("a=1")),
            "http://h/api/v1/x?a=1"
        );
        assert_eq!(
            upstream("http://h/v1", &[]).url("/v1/chat/completions", None),
            "http://h/v1/chat/completions"
        );
        assert_eq!(
            upstream("http://h/v1", &[]).url("/v1beta/x", None),
            "http://h/v1/v1beta/x"
        );
        let mut config = upstream_config("http://h", &[]);
        config
            .paths
            .insert("/v1/chat/completions".into(), "/api/projects/X/chat".into());
        let mapped = UpstreamRuntime::new(config).unwrap();
        assert_eq!(
            mapped.url("/v1/chat/completions", Some("q=1")),
            "http://h/api/projects/X/chat?q=1"
        );
    }

    #[test]
    fn latency_is_a_moving_average_and_success_clears_cooldown() {
        let u = upstream("http://h", &[]);
        u.record_failure(Duration::from_secs(60));
        assert!(u.is_cooling(now_ms()));
        u.record_success(Duration::from_micros(1000));
        assert!(!u.is_cooling(now_ms()));
        u.record_success(Duration::from_micros(2000));
        assert_eq!(u.latency_us.load(Ordering::Relaxed), 1200);
    }
}
