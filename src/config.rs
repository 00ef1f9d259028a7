//! Configuration: what the operator wrote, checked and resolved into what the gateway runs.
//!
//! Loading happens in layers (see [`mod@load`]): built-in defaults or the YAML file, then
//! `SLUICE_…` environment overrides (a `.env` file feeds the environment), then CLI flags.
//! The merged document is deserialised section by section so that `sluice check` can
//! report *every* problem with its path, not just the first one serde meets.
//!
//! Secrets (upstream keys, gateway keys) are held in [`Secret`], whose `Debug` never shows
//! the value, so a stray `{:?}` cannot leak one into a log.

pub mod load;
mod raw;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;

pub use load::{EnvMap, LoadOptions, Loaded, load};

/// One thing wrong with a config, located by its path (`upstreams[1].keys[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A credential. Its `Debug` shows only a masked form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The clear value, for the one place that needs it: the outgoing request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A form safe to log or show: `sk-…a1b2`. Short secrets are hidden entirely.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Masks a credential for display: the first three and last four characters of a long
/// one, nothing of a short one.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

/// The names a key may use or an upstream serves; `*` means any.
#[derive(Debug, Clone, Default)]
pub struct ModelSet {
    pub any: bool,
    pub names: Vec<String>,
}

impl ModelSet {
    pub fn from_list(list: &[String]) -> Self {
        Self {
            any: list.iter().any(|m| m == "*"),
            names: list.iter().filter(|m| *m != "*").cloned().collect(),
        }
    }

    pub fn any() -> Self {
        Self {
            any: true,
            names: Vec::new(),
        }
    }

    pub fn contains(&self, model: &str) -> bool {
        self.any || self.names.iter().any(|m| m == model)
    }
}

/// The resolved configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub access: Access,
    pub upstreams: Vec<Upstream>,
    pub routing: Routing,
    pub storage: Storage,
    pub admin: Admin,
    /// Model → price, for the cost of each request.
    pub pricing: HashMap<String, Price>,
    /// Limits shared with other instances through Redis.
    pub shared_state: Option<SharedState>,
    /// Where to send a trace of each request (OTLP over HTTP); `None` sends none.
    pub traces: Option<Traces>,
    /// What sluice writes to stdout.
    pub log: Log,
    /// Webhooks told when a budget runs low, an upstream goes down or the log drops rows.
    pub alerts: Alerts,
    /// The response cache; `None` when it is off.
    pub cache: Option<Cache>,
}

/// sluice's own log on stdout: its format, and whether each request gets a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// One line per request (the access log), at info.
    pub access: bool,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// Human-readable lines, or one JSON object a line for log shippers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Where alerts go and how often one may repeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alerts {
    pub webhooks: Vec<Webhook>,
    /// The least time between two alerts about the log dropping rows.
    pub interval: Duration,
}

/// One webhook. Its URL is a secret (a Slack webhook URL is its own credential).
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: Secret,
    pub format: WebhookFormat,
}

/// The body a webhook gets: sluice's JSON, or Slack's `{"text": …}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    Json,
    Slack,
}

/// The response cache: exact-match answers kept for a while, so a repeated deterministic
/// request costs no upstream call.
#[derive(Debug, Clone, PartialEq)]
pub struct Cache {
    /// How long an answer is kept, unless its model has a TTL of its own.
    pub ttl: Duration,
    /// Bytes the in-memory cache may hold (entries and their keys); never exceeded.
    pub max_bytes: u64,
    pub scope: CacheScope,
    /// Model → its own TTL; zero: that model's answers are never cached.
    pub models: HashMap<String, Duration>,
    /// Only requests that look deterministic (temperature 0 or a `seed`) are cached.
    pub deterministic_only: bool,
    /// A hit counts its tokens and cost against the key's limits and budget (its request
    /// counts against rpm whatever this says).
    pub count_tokens: bool,
}

impl Cache {
    /// How long an answer of `model` is kept; zero: not at all.
    pub fn ttl_for(&self, model: Option<&str>) -> Duration {
        model
            .and_then(|m| self.models.get(m))
            .copied()
            .unwrap_or(self.ttl)
    }
}

/// Who shares cached answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    /// Each gateway key has its own answers.
    Key,
    /// The keys of a team share their answers (a key without a team has its own).
    Team,
    /// Every caller shares every answer.
    Global,
}

/// Which model name an answer served by a fallback shows in its `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FallbackModelName {
    /// The model that served it.
    #[default]
    Served,
    /// The model the client asked for.
    Requested,
}

#[derive(Debug, Clone)]
pub struct Traces {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans go to
    /// `{endpoint}/v1/traces`.
    pub endpoint: String,
    pub service_name: String,
    /// Sent with every export (a vendor's API key, say); values are secret.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SharedState {
    pub redis: String,
    /// When Redis does not answer: admit on this instance's own limits (`true`) or refuse.
    pub fail_open: bool,
    pub timeout: Duration,
    /// Prefix of every Redis key, so several gateways can share one Redis.
    pub prefix: String,
}

/// Where the request log and the persisted counters live.
#[derive(Debug, Clone)]
pub struct Storage {
    /// `sqlite://path`; `None` turns the request log and persisted counters off.
    pub url: Option<String>,
    pub log_bodies: bool,
    /// Bytes kept of each request and response body in the log.
    pub body_limit: usize,
    pub retention_days: u32,
    pub max_rows: u64,
    /// Records waiting for the writer before `overflow` applies.
    pub queue: usize,
    /// What gives when the writer falls behind (the accounting never does).
    pub overflow: Overflow,
}

/// What the request log gives up when its writer falls behind. Whatever the choice, every
/// answered request is accounted (tokens, cost, persisted counters); only rows and bodies
/// can be shed, and each one shed is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Past half the queue new rows are written without bodies; past the whole queue
    /// they are shed.
    #[default]
    ShedBodies,
    /// Rows are written whole until the queue is full, then shed.
    ShedRows,
    /// Nothing is shed: while the queue is full, new requests wait for room.
    Backpressure,
}

impl Overflow {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "shed_bodies" => Some(Self::ShedBodies),
            "shed_rows" => Some(Self::ShedRows),
            "backpressure" => Some(Self::Backpressure),
            _ => None,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            url: Some("sqlite://sluice.db".into()),
            log_bodies: true,
            body_limit: 1024 * 1024,
            retention_days: 30,
            max_rows: 1_000_000,
            queue: 10_000,
            overflow: Overflow::default(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Admin {
    pub key: Option<Secret>,
    /// Whether `viewer` accounts see request and response bodies in the log.
    pub log_bodies_for_viewers: bool,
    /// A listener of its own for the dashboard and `/api/*` (e.g. on a private interface).
    pub listen: Option<SocketAddr>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Prompt tokens read from the provider's cache; `None` prices them as input.
    pub cached_input: Option<f64>,
}

/// Request and token limits over fixed windows. `None` = unlimited; `Some(0)` admits nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.rpd.is_none() && self.tpm.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub tokens: Option<u64>,
    pub cost: Option<f64>,
    pub period: BudgetPeriod,
}

/// How long an upstream's objects route back to it unless `routing.affinity.ttl` says.
pub const DEFAULT_AFFINITY_TTL: Duration = Duration::from_secs(30 * 86_400);

/// How a request picks its upstream and what happens when one fails.
#[derive(Debug, Clone)]
pub struct Routing {
    pub strategy: Strategy,
    /// Further tries after the first, on other keys or upstreams.
    pub retries: u32,
    pub retry_on: RetryOn,
    /// How long a failing upstream or key rests.
    pub cooldown: Duration,
    /// Pause before the n-th retry: `backoff * 2^(n-1)`, at most 2 s.
    pub backoff: Duration,
    /// Keep a session (`X-Session-Id` or the body's `user`) on one upstream and key.
    pub session_ttl: Option<Duration>,
    /// Where requests without a model go (by name; validated against `upstreams`).
    pub default_upstream: Option<String>,
    /// How long an object an upstream created (file, batch, response…) routes requests
    /// naming it back to that upstream and key; `None`: object affinity is off.
    pub affinity_ttl: Option<Duration>,
    /// Model (or alias) → the models to try next, in order, when every upstream of it
    /// failed in a retryable way or it refused the request as too long or filtered. Each
    /// listed model's own fallbacks follow it; loops are refused by validation.
    pub fallbacks: HashMap<String, Vec<String>>,
    pub fallback_model_name: FallbackModelName,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            strategy: Strategy::RoundRobin,
            retries: 2,
            retry_on: RetryOn::default(),
            cooldown: Duration::from_secs(30),
            backoff: Duration::from_millis(50),
            session_ttl: None,
            default_upstream: None,
            affinity_ttl: Some(DEFAULT_AFFINITY_TTL),
            fallbacks: HashMap::new(),
            fallback_model_name: FallbackModelName::Served,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    Random,
    Weighted,
    LeastBusy,
    LowestLatency,
}

impl Strategy {
    pub const NAMES: [&'static str; 5] = [
        "round_robin",
        "random",
        "weighted",
        "least_busy",
        "lowest_latency",
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "round_robin" => Self::RoundRobin,
            "random" => Self::Random,
            "weighted" => Self::Weighted,
            "least_busy" => Self::LeastBusy,
            "lowest_latency" => Self::LowestLatency,
            _ => return None,
        })
    }
}

/// Which failures are worth another try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    pub connect: bool,
    pub timeout: bool,
    pub statuses: Vec<u16>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect: true,
            timeout: true,
            statuses: vec![429, 500, 502, 503, 504],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    /// Normalised: empty, or `/segment` without a trailing slash.
    pub route_prefix: String,
    pub max_body: u64,
    pub trusted_proxies: Vec<IpNet>,
    /// Keep polling this long after a request instead of sleeping, to save the wake-up
    /// latency of an idle core; costs CPU while traffic flows. Zero = off.
    pub busy_poll: Duration,
    /// Origins browsers may call the API from (`"*"` for any); empty = no CORS.
    pub cors_origins: Vec<String>,
    /// Longest a client may go without sending a byte of its request body.
    pub body_idle_timeout: Duration,
    /// Longest a request body may take to arrive in all.
    pub body_timeout: Duration,
    /// Open connections one client address may hold (the TCP peer; trusted proxies are
    /// exempt). Zero = no cap.
    pub max_connections_per_ip: usize,
    /// Streams one HTTP/2 connection may have open at once: with the per-address
    /// connection cap, what bounds one address's requests in flight.
    pub http2_max_streams: u32,
    /// TLS termination (`server.tls`); `None` serves plain HTTP (and h2c).
    pub tls: Option<TlsFiles>,
}

/// The PEM files of the listeners' certificate: re-read when they change, so a renewed
/// certificate applies without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

#[derive(Debug, Clone)]
pub struct Access {
    pub ip_allow: Vec<IpNet>,
    pub ip_deny: Vec<IpNet>,
    pub passthrough: bool,
    pub keys: Vec<GatewayKey>,
}

/// A key handed to clients in place of a real upstream key.
#[derive(Debug, Clone)]
pub struct GatewayKey {
    pub name: String,
    pub key: Secret,
    pub models: ModelSet,
    pub limits: Limits,
    pub budget: Option<Budget>,
    /// The team whose limits and budget the key shares with its other keys (runtime keys
    /// only; see `admin::registry`).
    pub team: Option<Arc<Team>>,
}

impl GatewayKey {
    /// Whether admitting this key counts anything: it or its team has a limit or budget.
    pub fn is_limited(&self) -> bool {
        !self.limits.is_unlimited()
            || self.budget.is_some()
            || self.team.as_ref().is_some_and(|t| t.is_limited())
    }

    /// Whether tokens or cost must be reserved at admission (a `tpm` or a budget, its own
    /// or its team's).
    pub fn counts_tokens(&self) -> bool {
        self.limits.tpm.is_some()
            || self.budget.is_some()
            || self
                .team
                .as_ref()
                .is_some_and(|t| t.limits.tpm.is_some() || t.budget.is_some())
    }

    /// Whether a cost budget (its own or its team's) prices its requests by model.
    pub fn has_budget(&self) -> bool {
        self.budget.is_some() || self.team.as_ref().is_some_and(|t| t.budget.is_some())
    }
}

/// Limits and a budget shared by every key of a team, on top of each key's own.
#[derive(Debug, Clone, PartialEq)]
pub struct Team {
    pub name: String,
    pub limits: Limits,
    pub budget: Option<Budget>,
}

impl Team {
    pub fn is_limited(&self) -> bool {
        !self.limits.is_unlimited() || self.budget.is_some()
    }
}

/// The API an upstream speaks (`kind:`); requests are translated when it is not the
/// client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiKind {
    /// OpenAI's API, or one compatible with it.
    #[default]
    OpenAi,
    /// Anthropic's Messages API (`x-api-key`, `anthropic-version`).
    Anthropic,
    /// Gemini's `generateContent` (`x-goog-api-key`).
    Gemini,
    /// Azure OpenAI: deployments in the path, `api-version` in the query, `api-key`.
    Azure,
}

impl ApiKind {
    pub const NAMES: [&'static str; 4] = ["openai", "anthropic", "gemini", "azure"];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            "gemini" => Some(Self::Gemini),
            "azure" => Some(Self::Azure),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub kind: ApiKind,
    /// Azure's `api-version`; `Some("v1")` selects the `/openai/v1/` paths.
    pub api_version: Option<String>,
    /// Scheme, host and optional base path, without a trailing slash.
    pub base_url: String,
    pub keys: Vec<Secret>,
    pub models: ModelSet,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub proxy: Option<String>,
    pub timeouts: Timeouts,
    /// Client-facing model name → the upstream's name for it (for Azure, the deployment:
    /// `deployments` are merged in here).
    pub model_map: HashMap<String, String>,
    /// JSON field renames applied recursively to request bodies (`model` → `model_id`).
    pub field_aliases: Vec<(String, String)>,
    /// Gateway path → upstream path, replacing the path after `base_url`.
    pub paths: HashMap<String, String>,
    pub weight: u32,
    pub token: Option<TokenSource>,
    pub limits: Limits,
    /// Which HTTP version sluice speaks to it (`http2:`).
    pub http2: Http2Mode,
    /// Streams sluice opens at once on one HTTP/2 connection to it (`http2_streams:`,
    /// default [`Upstream::HTTP2_STREAMS`]); the next exchange opens another connection
    /// instead of waiting for a stream to end.
    pub http2_streams: usize,
    /// How long a connection beyond the first stays open with no stream (`http2_idle:`,
    /// default [`Upstream::HTTP2_IDLE`]), so a burst's connections go away after it.
    pub http2_idle: Duration,
    /// PEM certificates trusted for its TLS besides the public roots (`tls_ca:`), for an
    /// upstream behind a private CA; read when the config loads.
    pub tls_ca: Option<Vec<u8>>,
    /// Idle connections kept open for reuse (`idle_connections:`, default
    /// [`Upstream::IDLE_CONNECTIONS`]). Each holds tens of KiB (hyper's buffers): a larger
    /// pool keeps more of a burst's connections, and their memory, after it ends.
    pub idle_connections: usize,
}

/// How sluice speaks HTTP/2 to an upstream: many streams then share a few connections,
/// at most `http2_streams` on each (`upstream::Http2Pool` opens another past that, so
/// none waits for the server's `SETTINGS_MAX_CONCURRENT_STREAMS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http2Mode {
    /// HTTP/2 when a TLS upstream offers it by ALPN; HTTP/1.1 on plain `http://`. The
    /// default: public providers speak HTTP/2, and plain-http ones are left as they were.
    #[default]
    Auto,
    /// HTTP/2 with prior knowledge on plain `http://` (h2c), for upstreams known to speak it.
    H2c,
    /// HTTP/1.1 only: a connection per stream in flight.
    Off,
}

impl Http2Mode {
    pub const NAMES: [&'static str; 3] = ["auto", "h2c", "off"];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "auto" => Some(Self::Auto),
            "h2c" => Some(Self::H2c),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

impl Upstream {
    /// Idle connections kept per upstream unless `idle_connections` says otherwise: as
    /// many as a busy gateway's traffic leaves idle between requests. 32 made wrk's 64
    /// connections open 3,700–6,100 upstream connections in 5 s (bare, one worker): under
    /// saturation, answered connections wait in the pool while the worker is busy. A
    /// burst's surplus is closed when it ends (`UpstreamRuntime::shed_idle_connections`, in the upstream module).
    pub const IDLE_CONNECTIONS: usize = 1024;
    /// Streams per HTTP/2 connection unless `http2_streams` says otherwise: RFC 9113 asks
    /// servers to allow at least 100, so no stream waits on a server that follows it.
    pub const HTTP2_STREAMS: usize = 100;
    /// How long a burst's further HTTP/2 connections outlive their last stream unless
    /// `http2_idle` says otherwise: long enough for the next request of a steady load.
    pub const HTTP2_IDLE: Duration = Duration::from_secs(30);

    /// Whether this upstream serves a client-facing model name.
    pub fn serves(&self, model: &str) -> bool {
        self.models.contains(model) || self.model_map.contains_key(model)
    }

    /// The upstream's name for a client-facing model.
    pub fn upstream_model<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_map.get(model).map_or(model, String::as_str)
    }

    /// Whether request bodies must be rewritten for this upstream.
    pub fn rewrites_bodies(&self) -> bool {
        !self.model_map.is_empty() || !self.field_aliases.is_empty()
    }
}

/// A token endpoint: sluice fetches a short-lived bearer token, caches it and refreshes
/// it before it expires and once on a 401 (OAuth2 client credentials has this shape).
#[derive(Debug, Clone)]
pub struct TokenSource {
    pub url: String,
    pub method: http::Method,
    pub body: TokenBody,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Dotted path to the token in the JSON answer (`data.token`).
    pub token_path: String,
    /// Dotted path to a lifetime in seconds (`expires_in`), if the answer has one.
    pub expires_in_path: Option<String>,
    /// Lifetime when the answer gives none.
    pub ttl: Duration,
    /// Refresh this long before expiry.
    pub refresh_before: Duration,
}

#[derive(Debug, Clone)]
pub enum TokenBody {
    None,
    Json(serde_json::Value),
    Form(Vec<(String, String)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From sending the request to the response head. For a non-streamed completion this
    /// covers the whole generation, hence the generous default.
    pub first_byte: Duration,
    /// Longest gap between two chunks of a response body.
    pub idle: Duration,
    /// Whole exchange, if set.
    pub total: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(600),
            idle: Duration::from_secs(120),
            total: None,
        }
    }
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";
pub const DEFAULT_MAX_BODY: u64 = 32 * 1024 * 1024;

impl Config {
    /// Whether an address is inside any of the networks.
    pub fn ip_in(nets: &[IpNet], ip: IpAddr) -> bool {
        nets.iter().any(|net| net.contains(&ip))
    }

    /// Every gateway key name, to spot duplicates and for `/v1/status`.
    pub fn key_names(&self) -> HashSet<&str> {
        self.access.keys.iter().map(|k| k.name.as_str()).collect()
    }
}

/// Parses `32MiB`, `512KB`, `1048576` into bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Parses `5s`, `2m`, `1h 30m`, `250ms` (humantime), or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        // Not `from_secs_f64`: it panics on a number too large for a `Duration` (the
        // config fuzzer's `cooldown: 3015555…`); negative, NaN and infinite are refused too.
        return Duration::try_from_secs_f64(seconds).ok();
    }
    humantime::parse_duration(text).ok()
}

/// Parses `10.0.0.0/8` or a bare address (a /32 or /128 network).
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32MiB"), Some(32 * 1024 * 1024));
        assert_eq!(parse_size("10 KB"), Some(10_000));
        assert_eq!(parse_size("77"), Some(77));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        for refused in ["1e300", &"9".repeat(100), "-1", "NaN", "inf"] {
            assert_eq!(parse_duration(refused), None, "{refused}");
        }
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-1"), None);
    }

    #[test]
    fn nets() {
        assert!(
            parse_net("10.0.0.0/8")
                .unwrap()
                .contains(&"10.1.2.3".parse::<IpAddr>().unwrap())
        );
        assert!(
            parse_net("127.0.0.1")
                .unwrap()
                .contains(&"127.0.0.1".parse::<IpAddr>().unwrap())
        );
        assert!(parse_net("::1").is_some());
        assert!(parse_net("10.0.0.0/33").is_none());
    }

    #[test]
    fn masking_hides_short_secrets_and_keeps_ends_of_long_ones() {
        assert_eq!(mask("sk-abcdefghijklmnop1234"), "sk-…1234");
        assert_eq!(mask("short"), "…");
        assert_eq!(
            format!("{:?}", Secret::new("sk-abcdefghijklmnop1234")),
            "Secret(sk-…1234)"
        );
    }

    #[test]
    fn model_sets() {
        let set = ModelSet::from_list(&["gpt-4o".into()]);
        assert!(set.contains("gpt-4o"));
        assert!(!set.contains("gpt-4"));
        assert!(ModelSet::from_list(&["*".into()]).contains("anything"));
    }
}
