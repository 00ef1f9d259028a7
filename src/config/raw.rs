//! The config file's shape, exactly as written: every section rejects unknown fields so a
//! typo is an error rather than a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A number or a string with a unit (`32MiB`, `5s`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Number(f64),
    Text(String),
}

impl Scalar {
    pub fn as_text(&self) -> String {
        match self {
            Scalar::Number(n) if n.fract() == 0.0 && *n >= 0.0 => format!("{}", *n as u64),
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Option<String>,
    pub route_prefix: Option<String>,
    pub max_body: Option<Scalar>,
    pub trusted_proxies: Vec<String>,
    pub busy_poll: Option<Scalar>,
    pub cors_origins: Vec<String>,
    pub body_idle_timeout: Option<Scalar>,
    pub body_timeout: Option<Scalar>,
    pub max_connections_per_ip: Option<usize>,
    pub http2_max_streams: Option<u32>,
    pub tls: Option<RawTls>,
}

/// `server.tls`: PEM files of the certificate chain and its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccess {
    pub ip_allow: Vec<String>,
    pub ip_deny: Vec<String>,
    pub passthrough: bool,
    /// Each element is deserialised on its own, so one bad key does not hide the others.
    pub keys: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGatewayKey {
    pub name: String,
    pub key: Option<String>,
    pub key_env: Option<String>,
    pub models: Option<Vec<String>>,
    pub rpm: Option<i64>,
    pub rpd: Option<i64>,
    pub tpm: Option<i64>,
    pub budget: Option<RawBudget>,
}

/// A token and/or cost allowance per period.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub tokens: Option<i64>,
    pub cost: Option<f64>,
    pub period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    pub url: Option<String>,
    pub log_bodies: Option<bool>,
    pub body_limit: Option<Scalar>,
    pub retention: RawRetention,
    pub queue: Option<usize>,
    pub overflow: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetention {
    pub days: Option<u32>,
    pub max_rows: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub key: Option<String>,
    pub key_env: Option<String>,
    pub listen: Option<String>,
    pub log_bodies_for_viewers: Option<bool>,
}

/// Price of a model in USD per million tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub output: f64,
    /// Cached prompt tokens (cache reads); unset: priced as input.
    pub cached_input: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    /// The API it speaks: `openai` (the default), `anthropic`, `gemini`, `azure`.
    pub kind: Option<String>,
    pub base_url: String,
    /// Azure OpenAI's `api-version` (`2024-10-21`, or `v1` for the `/openai/v1/` paths).
    pub api_version: Option<String>,
    /// Azure OpenAI: client model name → deployment name.
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
    #[serde(default)]
    pub keys: Vec<String>,
    pub keys_env: Option<String>,
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub proxy: Option<String>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    #[serde(default)]
    pub field_aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub paths: BTreeMap<String, String>,
    pub weight: Option<u32>,
    /// `auto` (ALPN on https), `h2c` (prior knowledge on http) or `off`.
    pub http2: Option<String>,
    /// Streams sluice opens at once on one HTTP/2 connection to it; past that, another
    /// connection.
    pub http2_streams: Option<u32>,
    /// How long a further HTTP/2 connection stays open without a stream.
    pub http2_idle: Option<Scalar>,
    /// A PEM file of CA certificates trusted for this upstream besides the public roots.
    pub tls_ca: Option<String>,
    /// Idle connections kept open for reuse (HTTP/1.1 keep-alive); 0 keeps none.
    pub idle_connections: Option<u32>,
    pub token: Option<RawToken>,
    pub rpm: Option<i64>,
    pub rpd: Option<i64>,
    pub tpm: Option<i64>,
}

/// Where an upstream's short-lived bearer token comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub url: String,
    pub method: Option<String>,
    /// Sent as JSON.
    pub body: Option<serde_json::Value>,
    /// Sent as `application/x-www-form-urlencoded` (OAuth2 client credentials).
    pub form: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub token_path: Option<String>,
    pub expires_in_path: Option<String>,
    pub ttl: Option<Scalar>,
    pub refresh_before: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouting {
    pub strategy: Option<String>,
    pub retries: Option<u32>,
    pub retry_on: Option<Vec<Scalar>>,
    pub cooldown: Option<Scalar>,
    pub backoff: Option<Scalar>,
    pub session_ttl: Option<Scalar>,
    pub default_upstream: Option<String>,
    pub affinity: RawAffinity,
    /// Model (or alias) → the models to try, in order, when it cannot answer.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    pub fallback_model_name: Option<String>,
}

/// The response cache (`cache:`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: Option<bool>,
    pub ttl: Option<Scalar>,
    pub max_bytes: Option<Scalar>,
    pub scope: Option<String>,
    /// Model → its own TTL (`0s`: never cached).
    pub models: BTreeMap<String, Scalar>,
    pub deterministic_only: Option<bool>,
    pub count_tokens: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAffinity {
    pub ttl: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    pub connect: Option<Scalar>,
    pub first_byte: Option<Scalar>,
    pub idle: Option<Scalar>,
    pub total: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSharedState {
    pub redis: Option<String>,
    pub on_error: Option<String>,
    pub timeout: Option<Scalar>,
    pub prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTraces {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: Option<String>,
    pub access: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlerts {
    pub webhooks: Vec<RawWebhook>,
    pub interval: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: Option<String>,
    pub url_env: Option<String>,
    pub format: Option<String>,
}
