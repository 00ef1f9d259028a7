//! Layered loading: file (or built-in defaults) → `SLUICE_…` environment → CLI flags, then
//! section-by-section deserialisation and validation that collects every problem.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::raw::RawCache;
use super::raw::{
    RawAccess, RawAdmin, RawBudget, RawGatewayKey, RawPrice, RawRouting, RawServer, RawStorage,
    RawTimeouts, RawTls, RawToken, RawUpstream, Scalar,
};
use super::raw::{RawAlerts, RawLog, RawSharedState, RawTraces};
use super::{
    Access, Config, DEFAULT_LISTEN, DEFAULT_MAX_BODY, GatewayKey, ModelSet, Problem, RetryOn,
    Routing, Secret, Server, Strategy, Timeouts, TokenBody, TokenSource, Upstream, parse_duration,
    parse_net, parse_size,
};
use super::{Admin, ApiKind, Budget, BudgetPeriod, Limits, Price, SharedState, Storage, Traces};
use super::{Alerts, Log, LogFormat, Webhook, WebhookFormat};
use super::{Cache, CacheScope, FallbackModelName, Http2Mode, TlsFiles};

/// A snapshot of environment variables. Tests build one from a map instead of touching the
/// process environment.
#[derive(Debug, Clone, Default)]
pub struct EnvMap(pub BTreeMap<String, String>);

impl EnvMap {
    pub fn from_process() -> Self {
        Self(std::env::vars().collect())
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// What the CLI contributes.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub path: Option<PathBuf>,
    pub listen: Option<String>,
}

/// A loaded config and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file read, or `None` for the built-in no-file defaults.
    pub path: Option<PathBuf>,
}

/// Environment variables sluice reads itself rather than as config overrides.
const NOT_OVERRIDES: &[&str] = &["SLUICE_CONFIG", "SLUICE_LOG"];
const SECTIONS: &[&str] = &[
    "server",
    "access",
    "upstreams",
    "routing",
    "storage",
    "admin",
    "pricing",
    "shared_state",
    "traces",
    "log",
    "alerts",
    "cache",
];

/// Loads and checks the configuration. On failure, returns every problem found.
pub fn load(options: &LoadOptions, env: &EnvMap) -> Result<Loaded, Vec<Problem>> {
    let path = options
        .path
        .clone()
        .or_else(|| env.get("SLUICE_CONFIG").map(PathBuf::from))
        .or_else(|| {
            Path::new("sluice.yaml")
                .exists()
                .then(|| PathBuf::from("sluice.yaml"))
        });
    let from_variable = options.path.is_none() && env.get("SLUICE_CONFIG").is_some();
    let mut document = match &path {
        Some(path) => read_file(path).map_err(|problems| {
            // A file named by SLUICE_CONFIG: the operator must look at the variable.
            problems
                .into_iter()
                .map(|mut problem| {
                    if from_variable && problem.path.is_empty() {
                        problem.path = "SLUICE_CONFIG".into();
                    }
                    problem
                })
                .collect::<Vec<_>>()
        })?,
        None => defaults_without_file(env),
    };
    let config = configure(&mut document, env, options.listen.as_deref())?;
    Ok(Loaded { config, path })
}

/// A document (the file's, or the defaults) with the environment and the CLI's `--listen`
/// applied, resolved; a problem about what a variable set names the variable.
pub fn configure(
    document: &mut Value,
    env: &EnvMap,
    listen: Option<&str>,
) -> Result<Config, Vec<Problem>> {
    apply_env_overrides(document, env)?;
    if let Some(listen) = listen {
        set_path(
            document,
            &["server", "listen"],
            Value::String(listen.to_string()),
        )
        .map_err(|problem| vec![problem])?;
    }
    resolve(document, env).map_err(|problems| {
        let origins = env_origins(env);
        problems
            .into_iter()
            .map(|problem| blame_variable(problem, &origins))
            .collect()
    })
}

/// The config paths that `SLUICE_…` variables set, each with its variable's name:
/// `SLUICE_UPSTREAMS__0__BASE_URL` sets `upstreams[0].base_url`.
fn env_origins(env: &EnvMap) -> Vec<(Vec<String>, String)> {
    env.0
        .keys()
        .filter_map(|name| {
            let rest = name.strip_prefix("SLUICE_")?;
            if NOT_OVERRIDES.contains(&name.as_str()) || rest.is_empty() {
                return None;
            }
            let segments: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if segments.len() == 1 && !SECTIONS.contains(&segments[0].as_str()) {
                return None;
            }
            Some((segments, name.clone()))
        })
        .collect()
}

/// A problem's path as segments: `upstreams[0].base_url` → `upstreams`, `0`, `base_url`.
fn path_segments(path: &str) -> Vec<String> {
    path.replace('[', ".")
        .replace(']', "")
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Names the environment variable behind a problem, when a variable set what it is
/// about: the operator must look there, not in a file. A problem at or under the
/// variable's path is its own; one above it (an unknown section or field) is when its
/// message names a part of the variable's path.
fn blame_variable(problem: Problem, origins: &[(Vec<String>, String)]) -> Problem {
    let at = path_segments(&problem.path);
    if at.is_empty() {
        return problem;
    }
    let found = origins.iter().find(|(set, _)| {
        if at.len() >= set.len() {
            at[..set.len()] == set[..]
        } else {
            set[..at.len()] == at[..]
                && set[at.len() - 1..]
                    .iter()
                    .any(|segment| problem.message.contains(segment.as_str()))
        }
    });
    let Some((_, variable)) = found else {
        return problem;
    };
    let path = if problem.message.contains(problem.path.as_str()) {
        variable.clone()
    } else {
        format!("{variable} ({})", problem.path)
    };
    Problem::new(path, problem.message)
}

/// Parses a YAML document from text; used by `load` and by tests.
pub fn parse_document(text: &str) -> Result<Value, Problem> {
    let value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| Problem::new("", format!("not valid YAML: {e}")))?;
    Ok(if value.is_null() {
        Value::Object(Map::new())
    } else {
        value
    })
}

fn read_file(path: &Path) -> Result<Value, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )]
    })?;
    parse_document(&text).map_err(|p| vec![p])
}

/// With no config file sluice forwards to OpenAI (or `OPENAI_BASE_URL`) with the keys in
/// `OPENAI_API_KEY`, and lets a client's own key through, like openai-forward.
fn defaults_without_file(env: &EnvMap) -> Value {
    let base_url = env
        .get("OPENAI_BASE_URL")
        .unwrap_or("https://api.openai.com");
    let mut upstream = serde_json::json!({
        "name": "openai",
        "base_url": base_url.trim_end_matches("/v1").trim_end_matches('/'),
        "models": ["*"],
    });
    if env.get("OPENAI_API_KEY").is_some() {
        upstream["keys_env"] = Value::String("OPENAI_API_KEY".into());
    }
    serde_json::json!({ "access": { "passthrough": true }, "upstreams": [upstream] })
}

/// `SLUICE_SERVER__LISTEN=…` sets `server.listen`; `__` separates path segments, numeric
/// segments index lists (`SLUICE_UPSTREAMS__0__BASE_URL`), and values are read as YAML so
/// `[a, b]` is a list and `60` a number.
pub fn apply_env_overrides(document: &mut Value, env: &EnvMap) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    for (name, raw_value) in &env.0 {
        let Some(rest) = name.strip_prefix("SLUICE_") else {
            continue;
        };
        if NOT_OVERRIDES.contains(&name.as_str()) || rest.is_empty() {
            continue;
        }
        let segments: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        // `SLUICE_X` without `__` is an override only if X is a section; other such
        // variables belong to scripts and tools, not to the config.
        if segments.len() == 1 && !SECTIONS.contains(&segments[0].as_str()) {
            continue;
        }
        let segment_refs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let value = serde_yaml_ng::from_str::<Value>(raw_value)
            .unwrap_or_else(|_| Value::String(raw_value.clone()));
        if let Err(mut problem) = set_path(document, &segment_refs, value) {
            problem.path = format!("{name} ({})", problem.path);
            problems.push(problem);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn set_path(document: &mut Value, segments: &[&str], value: Value) -> Result<(), Problem> {
    let mut node = document;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let here = segments[..=i].join(".");
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
        node = match node {
            Value::Object(map) => {
                if last {
                    map.insert(segment.to_string(), value);
                    return Ok(());
                }
                map.entry(segment.to_string()).or_insert(Value::Null)
            }
            Value::Array(list) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| Problem::new(here.clone(), "expected a list index"))?;
                if index > list.len() {
                    return Err(Problem::new(
                        here,
                        format!("list has {} elements", list.len()),
                    ));
                }
                if index == list.len() {
                    list.push(Value::Null);
                }
                if last {
                    list[index] = value;
                    return Ok(());
                }
                &mut list[index]
            }
            _ => return Err(Problem::new(here, "cannot set a field inside a scalar")),
        };
    }
    Ok(())
}

/// Turns a merged document into a [`Config`], collecting every problem.
pub fn resolve(document: &Value, env: &EnvMap) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let Some(top) = document.as_object() else {
        return Err(vec![Problem::new(
            "",
            "the config must be a mapping of sections",
        )]);
    };
    for key in top.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            problems.push(Problem::new(
                key.clone(),
                format!(
                    "unknown section {key}, expected one of: {}",
                    SECTIONS.join(", ")
                ),
            ));
        }
    }

    let raw_server: RawServer =
        section(top.get("server"), "server", &mut problems).unwrap_or_default();
    let server = resolve_server(raw_server, &mut problems);

    let raw_access: RawAccess =
        section(top.get("access"), "access", &mut problems).unwrap_or_default();
    let access = resolve_access(raw_access, env, &mut problems);

    let upstreams = match top.get("upstreams") {
        None | Some(Value::Null) => {
            problems.push(Problem::new(
                "upstreams",
                "at least one upstream is required",
            ));
            Vec::new()
        }
        Some(Value::Array(list)) => {
            if list.is_empty() {
                problems.push(Problem::new(
                    "upstreams",
                    "at least one upstream is required",
                ));
            }
            let mut names = HashSet::new();
            list.iter()
                .enumerate()
                .filter_map(|(i, value)| {
                    let path = format!("upstreams[{i}]");
                    let raw: RawUpstream = section(Some(value), &path, &mut problems)?;
                    if !names.insert(raw.name.clone()) {
                        problems.push(Problem::new(
                            format!("{path}.name"),
                            format!("duplicate upstream name {:?}", raw.name),
                        ));
                    }
                    resolve_upstream(raw, &path, env, &mut problems)
                })
                .collect()
        }
        Some(_) => {
            problems.push(Problem::new("upstreams", "expected a list of upstreams"));
            Vec::new()
        }
    };

    let raw_routing: RawRouting =
        section(top.get("routing"), "routing", &mut problems).unwrap_or_default();
    let routing = resolve_routing(raw_routing, &mut problems);
    if let Some(name) = &routing.default_upstream {
        if !upstreams.iter().any(|u| &u.name == name) {
            problems.push(Problem::new(
                "routing.default_upstream",
                format!("no upstream is named {name:?}"),
            ));
        }
    }

    if !upstreams.is_empty() {
        check_fallbacks(&routing, &upstreams, &mut problems);
    }

    // A key's model that no upstream serves can never be used: almost surely a typo.
    if !upstreams.is_empty() {
        for (i, key) in access.keys.iter().enumerate() {
            for (j, model) in key.models.names.iter().enumerate() {
                if !upstreams.iter().any(|u| u.serves(model)) {
                    problems.push(Problem::new(
                        format!("access.keys[{i}].models[{j}]"),
                        format!("no upstream serves the model {model:?}"),
                    ));
                }
            }
        }
    }

    let raw_storage: RawStorage =
        section(top.get("storage"), "storage", &mut problems).unwrap_or_default();
    let storage = resolve_storage(raw_storage, &mut problems);
    let raw_admin: RawAdmin = section(top.get("admin"), "admin", &mut problems).unwrap_or_default();
    let admin = resolve_admin(&raw_admin, env, &mut problems);
    // A gateway key that is also the admin key would make its holder the admin.
    if let Some(admin_key) = &admin.key {
        if let Some(shared) = access
            .keys
            .iter()
            .find(|k| constant_time_eq(k.key.expose(), admin_key.expose()))
        {
            let path = if raw_admin.key.is_some() {
                "admin.key"
            } else {
                "admin.key_env"
            };
            problems.push(Problem::new(
                path,
                format!(
                    "the admin key is also the gateway key `{}`; give the admin a key of its own",
                    shared.name
                ),
            ));
        }
    }
    let raw_pricing: BTreeMap<String, RawPrice> =
        section(top.get("pricing"), "pricing", &mut problems).unwrap_or_default();
    let mut pricing = std::collections::HashMap::new();
    for (model, price) in raw_pricing {
        let valid = |n: f64| n.is_finite() && n >= 0.0;
        if !(valid(price.input) && valid(price.output) && price.cached_input.is_none_or(valid)) {
            problems.push(Problem::new(
                format!("pricing.{model}"),
                "prices must be non-negative numbers",
            ));
        }
        pricing.insert(
            model,
            Price {
                input: price.input,
                output: price.output,
                cached_input: price.cached_input,
            },
        );
    }

    let raw_shared: RawSharedState =
        section(top.get("shared_state"), "shared_state", &mut problems).unwrap_or_default();
    let shared_state = resolve_shared_state(raw_shared, &mut problems);
    let raw_traces: RawTraces =
        section(top.get("traces"), "traces", &mut problems).unwrap_or_default();
    let traces = resolve_traces(raw_traces, env, &mut problems);
    let raw_log: RawLog = section(top.get("log"), "log", &mut problems).unwrap_or_default();
    let log = resolve_log(&raw_log, &mut problems);
    let raw_alerts: RawAlerts =
        section(top.get("alerts"), "alerts", &mut problems).unwrap_or_default();
    let alerts = resolve_alerts(raw_alerts, env, &mut problems);
    let raw_cache: RawCache = section(top.get("cache"), "cache", &mut problems).unwrap_or_default();
    let cache = resolve_cache(raw_cache, &mut problems);

    if problems.is_empty() {
        Ok(Config {
            server,
            access,
            upstreams,
            routing,
            storage,
            admin,
            pricing,
            shared_state,
            traces,
            log,
            alerts,
            cache,
        })
    } else {
        Err(problems)
    }
}

/// Deserialises one section, recording its problem with the full path on failure.
fn section<T: DeserializeOwned>(
    value: Option<&Value>,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let value = match value {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v) => v.clone(),
    };
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            let inner = error.path().to_string();
            let full = if inner == "." || inner.is_empty() {
                path.to_string()
            } else if inner.starts_with('[') {
                format!("{path}{inner}")
            } else {
                format!("{path}.{inner}")
            };
            problems.push(Problem::new(
                full,
                redact_quoted(&error.into_inner().to_string()),
            ));
            None
        }
    }
}

/// serde quotes offending values in its messages (`invalid type: string "sk-…"`, or
/// ``integer `12345` `` for a key written as a number); such a value may be a secret, so
/// it is replaced before the message is shown.
fn redact_quoted(message: &str) -> String {
    let mut text = message.to_string();
    for (opening, closing, replacement) in [
        ("string \"", '"', "a string"),
        ("integer `", '`', "integer"),
        ("floating point `", '`', "floating point"),
    ] {
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(start) = rest.find(opening) {
            out.push_str(&rest[..start]);
            out.push_str(replacement);
            let after = &rest[start + opening.len()..];
            rest = match after.find(closing) {
                Some(end) => &after[end + 1..],
                None => "",
            };
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// Compares two secrets in time that does not depend on where they differ.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// An address to listen on: `0.0.0.0:8000`, `[::1]:8000`, or a host name and port
/// (`localhost:8000`), resolved once, an IPv4 address preferred.
fn listen_address(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address);
    }
    let (host, port) = text.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    let addresses: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
        .ok()?
        .collect();
    addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
}

/// A client that sends nothing of its body for this long is cut off (408).
const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole body must arrive within this (32 MiB at 1 Mbit/s takes under 5 minutes).
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(600);
/// Enough for one busy service holding thousands of streams, far below the open-files limit
/// sluice raises at start: one address cannot take every descriptor.
const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 4096;
/// hyper's own default is 200; a little more lets one client behind a load balancer keep
/// many streams on few connections.
const DEFAULT_HTTP2_MAX_STREAMS: u32 = 256;

fn resolve_server(raw: RawServer, problems: &mut Vec<Problem>) -> Server {
    let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = listen_address(&listen_text).unwrap_or_else(|| {
        problems.push(Problem::new(
            "server.listen",
            format!("{listen_text:?} is not an address like 0.0.0.0:8000 or localhost:8000"),
        ));
        SocketAddr::from(([0, 0, 0, 0], 8000))
    });
    let route_prefix = match raw.route_prefix.as_deref().map(str::trim) {
        None | Some("") | Some("/") => String::new(),
        Some(prefix) if prefix.starts_with('/') && !prefix.contains(['?', '#', ' ']) => {
            prefix.trim_end_matches('/').to_string()
        }
        Some(prefix) => {
            problems.push(Problem::new(
                "server.route_prefix",
                format!("{prefix:?} must start with '/'"),
            ));
            String::new()
        }
    };
    let max_body = match raw.max_body {
        None => DEFAULT_MAX_BODY,
        Some(value) => parse_size(&value.as_text()).unwrap_or_else(|| {
            problems.push(Problem::new(
                "server.max_body",
                format!("{:?} is not a size like 32MiB", value.as_text()),
            ));
            DEFAULT_MAX_BODY
        }),
    };
    let trusted_proxies = nets(&raw.trusted_proxies, "server.trusted_proxies", problems);
    let busy_poll = duration_field(
        raw.busy_poll.as_ref(),
        "server.busy_poll",
        "a duration up to 100ms",
        |d| d <= Duration::from_millis(100),
        problems,
    )
    .unwrap_or(Duration::ZERO);
    for (i, origin) in raw.cors_origins.iter().enumerate() {
        if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
            problems.push(Problem::new(
                format!("server.cors_origins[{i}]"),
                format!("{origin:?} is not an origin like https://chat.example or *"),
            ));
        }
    }
    let body_idle_timeout = duration_field(
        raw.body_idle_timeout.as_ref(),
        "server.body_idle_timeout",
        "a duration between 1s and 1h, like 30s",
        |d| d >= Duration::from_secs(1) && d <= Duration::from_secs(3600),
        problems,
    )
    .unwrap_or(DEFAULT_BODY_IDLE_TIMEOUT);
    let body_timeout = duration_field(
        raw.body_timeout.as_ref(),
        "server.body_timeout",
        "a duration between 1s and 24h, like 5m",
        |d| d >= Duration::from_secs(1) && d <= Duration::from_secs(86_400),
        problems,
    )
    .unwrap_or(DEFAULT_BODY_TIMEOUT);
    let http2_max_streams =
        stream_limit(raw.http2_max_streams, "server.http2_max_streams", problems)
            .unwrap_or(DEFAULT_HTTP2_MAX_STREAMS);
    let tls = raw.tls.as_ref().and_then(|tls| resolve_tls(tls, problems));
    Server {
        listen,
        route_prefix,
        max_body,
        trusted_proxies,
        busy_poll,
        cors_origins: raw.cors_origins,
        body_idle_timeout,
        body_timeout,
        max_connections_per_ip: raw
            .max_connections_per_ip
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
        http2_max_streams,
        tls,
    }
}

/// `server.tls`: both files must be there and hold PEM of the right kind; whether the key
/// matches the certificate is checked when the listener loads them (`http::tls`).
fn resolve_tls(raw: &RawTls, problems: &mut Vec<Problem>) -> Option<TlsFiles> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let before = problems.len();
    let mut read = |text: &str, field: &str| -> Option<Vec<u8>> {
        let path = format!("server.tls.{field}");
        if text.trim().is_empty() {
            problems.push(Problem::new(path, "must name a PEM file"));
            return None;
        }
        std::fs::read(text.trim())
            .map_err(|error| {
                problems.push(Problem::new(path, format!("cannot read {text}: {error}")))
            })
            .ok()
    };
    let (cert, key) = (read(&raw.cert, "cert"), read(&raw.key, "key"));
    if let Some(cert) = cert {
        let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&cert).collect();
        if !chain.is_ok_and(|chain| !chain.is_empty()) {
            problems.push(Problem::new(
                "server.tls.cert",
                format!(
                    "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    raw.cert
                ),
            ));
        }
    }
    if let Some(key) = key {
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            problems.push(Problem::new(
                "server.tls.key",
                format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    raw.key
                ),
            ));
        }
    }
    (problems.len() == before).then(|| TlsFiles {
        cert: PathBuf::from(raw.cert.trim()),
        key: PathBuf::from(raw.key.trim()),
    })
}

fn nets(list: &[String], path: &str, problems: &mut Vec<Problem>) -> Vec<ipnet::IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let net = parse_net(text);
            if net.is_none() {
                problems.push(Problem::new(
                    format!("{path}[{i}]"),
                    format!("{text:?} is not an address or CIDR"),
                ));
            }
            net
        })
        .collect()
}

fn resolve_access(raw: RawAccess, env: &EnvMap, problems: &mut Vec<Problem>) -> Access {
    let ip_allow = nets(&raw.ip_allow, "access.ip_allow", problems);
    let ip_deny = nets(&raw.ip_deny, "access.ip_deny", problems);
    let mut names = HashSet::new();
    let mut values = HashSet::new();
    let mut keys = Vec::new();
    for (i, value) in raw.keys.iter().enumerate() {
        let path = format!("access.keys[{i}]");
        let Some(raw_key): Option<RawGatewayKey> = section(Some(value), &path, problems) else {
            continue;
        };
        if raw_key.name.trim().is_empty() {
            problems.push(Problem::new(format!("{path}.name"), "must not be empty"));
        } else if !names.insert(raw_key.name.clone()) {
            problems.push(Problem::new(
                format!("{path}.name"),
                format!("duplicate key name {:?}", raw_key.name),
            ));
        }
        let secret = match (&raw_key.key, &raw_key.key_env) {
            (Some(_), Some(_)) => {
                problems.push(Problem::new(
                    path.clone(),
                    "set either key or key_env, not both",
                ));
                None
            }
            (None, None) => {
                problems.push(Problem::new(path.clone(), "needs key or key_env"));
                None
            }
            (Some(key), None) => Some((key.clone(), format!("{path}.key"))),
            (None, Some(var)) => match env.get(var) {
                Some(key) => Some((key.to_string(), format!("{path}.key_env"))),
                None => {
                    problems.push(Problem::new(
                        format!("{path}.key_env"),
                        format!("environment variable {var} is not set"),
                    ));
                    None
                }
            },
        };
        let Some((secret, secret_path)) = secret else {
            continue;
        };
        if let Some(problem) = check_credential(&secret, &secret_path) {
            problems.push(problem);
            continue;
        }
        if !values.insert(secret.clone()) {
            problems.push(Problem::new(
                secret_path,
                "the same key is given to two names",
            ));
            continue;
        }
        let models = raw_key.models.unwrap_or_else(|| vec!["*".to_string()]);
        if models.is_empty() {
            problems.push(Problem::new(
                format!("{path}.models"),
                "an empty list allows nothing; use [\"*\"] for every model",
            ));
        }
        let limits = Limits {
            rpm: limit(raw_key.rpm, &format!("{path}.rpm"), problems),
            rpd: limit(raw_key.rpd, &format!("{path}.rpd"), problems),
            tpm: limit(raw_key.tpm, &format!("{path}.tpm"), problems),
        };
        let budget = raw_key
            .budget
            .as_ref()
            .and_then(|b| resolve_budget(b, &format!("{path}.budget"), problems));
        keys.push(GatewayKey {
            name: raw_key.name,
            key: Secret::new(secret),
            models: ModelSet::from_list(&models),
            limits,
            budget,
            team: None,
        });
    }
    Access {
        ip_allow,
        ip_deny,
        passthrough: raw.passthrough,
        keys,
    }
}

/// A credential must fit in an HTTP header; never echo it.
fn check_credential(value: &str, path: &str) -> Option<Problem> {
    if value.trim().is_empty() {
        return Some(Problem::new(path, "must not be empty"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control())
        || HeaderValue::from_str(value).is_err()
    {
        return Some(Problem::new(
            path,
            "contains whitespace or characters not allowed in an HTTP header",
        ));
    }
    None
}

/// Splits a list of keys held in one variable: separated by commas and/or whitespace.
pub fn split_keys(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn resolve_upstream(
    raw: RawUpstream,
    path: &str,
    env: &EnvMap,
    problems: &mut Vec<Problem>,
) -> Option<Upstream> {
    let before = problems.len();
    if raw.name.trim().is_empty() {
        problems.push(Problem::new(format!("{path}.name"), "must not be empty"));
    }
    let base_url = raw.base_url.trim().trim_end_matches('/').to_string();
    match reqwest::Url::parse(&base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        _ => problems.push(Problem::new(
            format!("{path}.base_url"),
            format!("{base_url:?} is not an http:// or https:// URL"),
        )),
    }

    let mut keys = Vec::new();
    for (i, key) in raw.keys.iter().enumerate() {
        match check_credential(key, &format!("{path}.keys[{i}]")) {
            Some(problem) => problems.push(problem),
            None => keys.push(Secret::new(key.as_str())),
        }
    }
    if let Some(var) = &raw.keys_env {
        match env.get(var) {
            Some(text) => {
                for (i, key) in split_keys(text).iter().enumerate() {
                    match check_credential(key, &format!("{path}.keys_env ({var}, key {})", i + 1))
                    {
                        Some(problem) => problems.push(problem),
                        None => keys.push(Secret::new(key.as_str())),
                    }
                }
            }
            None => problems.push(Problem::new(
                format!("{path}.keys_env"),
                format!("environment variable {var} is not set"),
            )),
        }
    }

    let (kind, model_map) = resolve_kind(&raw, path, problems);
    let model_list = raw.models.unwrap_or_else(|| vec!["*".to_string()]);
    if model_list.is_empty() {
        problems.push(Problem::new(
            format!("{path}.models"),
            "an empty list serves nothing; use [\"*\"] for any model",
        ));
    }

    let headers = resolve_headers(&raw.headers, &format!("{path}.headers"), env, problems);

    if let Some(proxy) = &raw.proxy {
        match reqwest::Url::parse(proxy) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https" | "socks5" | "socks5h")
                    && url.host().is_some() => {}
            Ok(url) => problems.push(Problem::new(
                format!("{path}.proxy"),
                format!(
                    "scheme {:?} is not one of http, https, socks5, socks5h",
                    url.scheme()
                ),
            )),
            Err(_) => problems.push(Problem::new(
                format!("{path}.proxy"),
                "not a URL like socks5://127.0.0.1:1080",
            )),
        }
    }

    let http2 = match raw.http2.as_deref().map(str::trim) {
        None => Http2Mode::default(),
        Some(text) => Http2Mode::parse(text).unwrap_or_else(|| {
            problems.push(Problem::new(
                format!("{path}.http2"),
                format!("{text:?} is not one of {}", Http2Mode::NAMES.join(", ")),
            ));
            Http2Mode::Off
        }),
    };
    if http2 == Http2Mode::H2c && !base_url.starts_with("http://") {
        problems.push(Problem::new(
            format!("{path}.http2"),
            "h2c is HTTP/2 on plain http:// only; an https:// upstream speaks HTTP/2 by ALPN with auto",
        ));
    }
    if http2 == Http2Mode::H2c
        && raw
            .proxy
            .as_deref()
            .is_some_and(|proxy| proxy.starts_with("http://") || proxy.starts_with("https://"))
    {
        problems.push(Problem::new(
            format!("{path}.http2"),
            "h2c cannot pass an HTTP proxy, which forwards plain http as HTTP/1.1; use a socks5 proxy, or auto",
        ));
    }

    let http2_streams = stream_limit(
        raw.http2_streams,
        &format!("{path}.http2_streams"),
        problems,
    )
    .map_or(Upstream::HTTP2_STREAMS, |n| {
        usize::try_from(n).unwrap_or(usize::MAX)
    });
    let http2_idle = duration_field(
        raw.http2_idle.as_ref(),
        &format!("{path}.http2_idle"),
        "a duration like 30s",
        |d| !d.is_zero(),
        problems,
    )
    .unwrap_or(Upstream::HTTP2_IDLE);

    let tls_ca = raw
        .tls_ca
        .as_deref()
        .and_then(|file| read_ca(file, &format!("{path}.tls_ca"), problems));

    let timeouts = resolve_timeouts(&raw.timeouts, &format!("{path}.timeouts"), problems);
    let limits = Limits {
        rpm: limit(raw.rpm, &format!("{path}.rpm"), problems),
        rpd: limit(raw.rpd, &format!("{path}.rpd"), problems),
        tpm: limit(raw.tpm, &format!("{path}.tpm"), problems),
    };

    for (from, to) in &raw.model_map {
        if from.trim().is_empty() || to.trim().is_empty() {
            problems.push(Problem::new(
                format!("{path}.model_map"),
                "model names must not be empty",
            ));
        }
    }
    for (from, to) in &raw.field_aliases {
        if from.is_empty() || to.is_empty() {
            problems.push(Problem::new(
                format!("{path}.field_aliases"),
                "field names must not be empty",
            ));
        }
    }
    for (from, to) in &raw.paths {
        if !from.starts_with('/') || !to.starts_with('/') {
            problems.push(Problem::new(
                format!("{path}.paths.{from}"),
                "both the gateway path and the upstream path must start with '/'",
            ));
        }
    }
    let token = raw
        .token
        .as_ref()
        .and_then(|t| resolve_token(t, &format!("{path}.token"), env, problems));
    if raw.token.is_some() && !keys.is_empty() {
        problems.push(Problem::new(
            format!("{path}.token"),
            "use keys or a token endpoint, not both",
        ));
    }

    (problems.len() == before).then(|| Upstream {
        name: raw.name,
        kind,
        api_version: raw.api_version,
        base_url,
        keys,
        models: ModelSet::from_list(&model_list),
        headers,
        proxy: raw.proxy,
        timeouts,
        model_map,
        field_aliases: raw.field_aliases.into_iter().collect(),
        paths: raw.paths.into_iter().collect(),
        weight: raw.weight.unwrap_or(1),
        token,
        limits,
        http2,
        http2_streams,
        http2_idle,
        tls_ca,
        idle_connections: raw
            .idle_connections
            .map_or(Upstream::IDLE_CONNECTIONS, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
    })
}

/// The PEM bundle of an upstream's `tls_ca`, if it holds at least one certificate.
fn read_ca(file: &str, path: &str, problems: &mut Vec<Problem>) -> Option<Vec<u8>> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(file.trim())
        .map_err(|error| problems.push(Problem::new(path, format!("cannot read {file}: {error}"))))
        .ok()?;
    let certificates: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    if certificates.is_ok_and(|list| !list.is_empty()) {
        Some(pem)
    } else {
        problems.push(Problem::new(
            path,
            format!("{file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
        None
    }
}

fn resolve_log(raw: &RawLog, problems: &mut Vec<Problem>) -> Log {
    let defaults = Log::default();
    let format = match raw.format.as_deref() {
        None => defaults.format,
        Some(text) => LogFormat::parse(text).unwrap_or_else(|| {
            problems.push(Problem::new(
                "log.format",
                format!("{text:?} is not text or json"),
            ));
            defaults.format
        }),
    };
    Log {
        format,
        access: raw.access.unwrap_or(defaults.access),
    }
}

/// Alerts are repeated at most this often by default (the log dropping rows).
const DEFAULT_ALERT_INTERVAL: Duration = Duration::from_secs(300);

fn resolve_alerts(raw: RawAlerts, env: &EnvMap, problems: &mut Vec<Problem>) -> Alerts {
    let mut webhooks = Vec::new();
    for (i, hook) in raw.webhooks.iter().enumerate() {
        let path = format!("alerts.webhooks[{i}]");
        let url = match (&hook.url, &hook.url_env) {
            (Some(_), Some(_)) => {
                problems.push(Problem::new(&path, "set either url or url_env, not both"));
                continue;
            }
            (None, None) => {
                problems.push(Problem::new(&path, "needs url or url_env"));
                continue;
            }
            (Some(url), None) => (url.clone(), format!("{path}.url")),
            (None, Some(var)) => match env.get(var) {
                Some(url) => (url.to_string(), format!("{path}.url_env")),
                None => {
                    problems.push(Problem::new(
                        format!("{path}.url_env"),
                        format!("environment variable {var} is not set"),
                    ));
                    continue;
                }
            },
        };
        let (url, url_path) = url;
        // The URL is not quoted: a Slack webhook's URL is its credential.
        match reqwest::Url::parse(url.trim()) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => {
                problems.push(Problem::new(url_path, "not an http:// or https:// URL"));
                continue;
            }
        }
        let format = match hook.format.as_deref().unwrap_or("json") {
            "json" => WebhookFormat::Json,
            "slack" => WebhookFormat::Slack,
            other => {
                problems.push(Problem::new(
                    format!("{path}.format"),
                    format!("{other:?} is not json or slack"),
                ));
                continue;
            }
        };
        webhooks.push(Webhook {
            url: Secret::new(url.trim()),
            format,
        });
    }
    let interval = duration_field(
        raw.interval.as_ref(),
        "alerts.interval",
        "a duration like 5m",
        |d| !d.is_zero(),
        problems,
    )
    .unwrap_or(DEFAULT_ALERT_INTERVAL);
    Alerts { webhooks, interval }
}

/// The API an upstream speaks and its model map: Azure's `deployments` join `model_map`
/// (a deployment is the upstream's name for the client's model), and Azure needs its
/// `api-version`; neither means anything to another kind.
fn resolve_kind(
    raw: &RawUpstream,
    path: &str,
    problems: &mut Vec<Problem>,
) -> (ApiKind, HashMap<String, String>) {
    let kind = match raw.kind.as_deref().map(str::trim) {
        None => ApiKind::OpenAi,
        Some(text) => ApiKind::parse(text).unwrap_or_else(|| {
            problems.push(Problem::new(
                format!("{path}.kind"),
                format!("must be one of {}", ApiKind::NAMES.join(", ")),
            ));
            ApiKind::OpenAi
        }),
    };
    let mut model_map: HashMap<String, String> = raw
        .model_map
        .iter()
        .map(|(from, to)| (from.clone(), to.clone()))
        .collect();
    if kind != ApiKind::Azure {
        if raw.api_version.is_some() {
            problems.push(Problem::new(
                format!("{path}.api_version"),
                "only an upstream of kind azure takes an api_version",
            ));
        }
        if !raw.deployments.is_empty() {
            problems.push(Problem::new(
                format!("{path}.deployments"),
                "only an upstream of kind azure has deployments; use model_map",
            ));
        }
        return (kind, model_map);
    }
    match raw.api_version.as_deref().map(str::trim) {
        None | Some("") => problems.push(Problem::new(
            format!("{path}.api_version"),
            "an azure upstream needs its api-version (e.g. 2024-10-21, or v1 for the /openai/v1/ paths)",
        )),
        Some(version) if !version.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
            problems.push(Problem::new(
                format!("{path}.api_version"),
                "may hold only letters, digits and '-' (e.g. 2024-10-21)",
            ))
        }
        Some(_) => {}
    }
    for (model, deployment) in &raw.deployments {
        if model.trim().is_empty() || !crate::protocol::azure::is_deployment_name(deployment) {
            problems.push(Problem::new(
                format!("{path}.deployments.{model}"),
                "a deployment name is 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        } else if model_map
            .insert(model.clone(), deployment.clone())
            .is_some()
        {
            problems.push(Problem::new(
                format!("{path}.deployments.{model}"),
                "the model is in model_map too; name its deployment once",
            ));
        }
    }
    (kind, model_map)
}

fn resolve_shared_state(raw: RawSharedState, problems: &mut Vec<Problem>) -> Option<SharedState> {
    let url = raw.redis.filter(|u| !u.trim().is_empty())?;
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        problems.push(Problem::new(
            "shared_state.redis",
            "not a URL like redis://127.0.0.1:6379",
        ));
    }
    let fail_open = match raw.on_error.as_deref().unwrap_or("open") {
        "open" => true,
        "closed" => false,
        other => {
            problems.push(Problem::new(
                "shared_state.on_error",
                format!("{other:?} is not open or closed"),
            ));
            true
        }
    };
    let timeout = duration_field(
        raw.timeout.as_ref(),
        "shared_state.timeout",
        "a duration like 50ms",
        |d| !d.is_zero(),
        problems,
    )
    .unwrap_or(Duration::from_millis(50));
    Some(SharedState {
        redis: url,
        fail_open,
        timeout,
        prefix: raw.prefix.unwrap_or_else(|| "sluice".into()),
    })
}

fn resolve_traces(raw: RawTraces, env: &EnvMap, problems: &mut Vec<Problem>) -> Option<Traces> {
    let endpoint = raw.otlp_endpoint.filter(|u| !u.trim().is_empty())?;
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        problems.push(Problem::new(
            "traces.otlp_endpoint",
            "not a URL like http://collector:4318",
        ));
    }
    Some(Traces {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        service_name: raw.service_name.unwrap_or_else(|| "sluice".into()),
        headers: resolve_headers(&raw.headers, "traces.headers", env, problems),
    })
}

/// `-1` or absent is unlimited; `0` admits nothing; below `-1` is a mistake.
/// A limit given through the admin API, checked as the config file's are.
pub(crate) fn api_limit(
    value: Option<i64>,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<u64> {
    limit(value, path, problems)
}

/// A budget given through the admin API (`{tokens, cost, period}`), checked as the config
/// file's are: unknown fields, negative amounts and periods that do not exist are problems.
pub(crate) fn api_budget(value: &Value, path: &str, problems: &mut Vec<Problem>) -> Option<Budget> {
    let raw: RawBudget = section(Some(value), path, problems)?;
    let before = problems.len();
    let budget = resolve_budget(&raw, path, problems);
    (problems.len() == before).then_some(budget).flatten()
}

fn limit(value: Option<i64>, path: &str, problems: &mut Vec<Problem>) -> Option<u64> {
    match value {
        None | Some(-1) => None,
        Some(n) if n >= 0 => u64::try_from(n).ok(),
        Some(n) => {
            problems.push(Problem::new(
                path,
                format!("{n} is not a limit: use -1 for unlimited, 0 to refuse all"),
            ));
            None
        }
    }
}

fn resolve_budget(raw: &RawBudget, path: &str, problems: &mut Vec<Problem>) -> Option<Budget> {
    let period = match raw.period.as_deref().unwrap_or("month") {
        "day" => BudgetPeriod::Day,
        "month" => BudgetPeriod::Month,
        "total" => BudgetPeriod::Total,
        other => {
            problems.push(Problem::new(
                format!("{path}.period"),
                format!("{other:?} is not day, month or total"),
            ));
            BudgetPeriod::Month
        }
    };
    if raw.tokens.is_none() && raw.cost.is_none() {
        problems.push(Problem::new(path, "set tokens, cost or both"));
    }
    let tokens = limit(raw.tokens, &format!("{path}.tokens"), problems);
    if raw.cost.is_some_and(|c| !c.is_finite() || c < 0.0) {
        problems.push(Problem::new(
            format!("{path}.cost"),
            "must be a non-negative number",
        ));
    }
    Some(Budget {
        tokens,
        cost: raw.cost,
        period,
    })
}

fn resolve_storage(raw: RawStorage, problems: &mut Vec<Problem>) -> Storage {
    let defaults = Storage::default();
    let url = match raw.url.as_deref().map(str::trim) {
        None => defaults.url.clone(),
        Some("" | "none" | "off") => None,
        Some(url)
            if url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://") =>
        {
            Some(url.to_string())
        }
        Some(url) => {
            let scheme = url.split("://").next().unwrap_or(url);
            problems.push(Problem::new(
                "storage.url",
                format!(
                    "{scheme:?} storage is not supported; use sqlite://PATH, postgres://… or none"
                ),
            ));
            None
        }
    };
    let body_limit = match raw.body_limit {
        None => defaults.body_limit,
        Some(value) => parse_size(&value.as_text())
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| {
                problems.push(Problem::new(
                    "storage.body_limit",
                    format!("{:?} is not a size like 1MiB", value.as_text()),
                ));
                defaults.body_limit
            }),
    };
    let queue = raw.queue.unwrap_or(defaults.queue);
    if queue == 0 {
        problems.push(Problem::new("storage.queue", "must be at least 1"));
    }
    let overflow = match raw.overflow.as_deref().map(str::trim) {
        None => defaults.overflow,
        Some(text) => crate::config::Overflow::parse(text).unwrap_or_else(|| {
            problems.push(Problem::new(
                "storage.overflow",
                format!("{text:?} is not one of shed_bodies, shed_rows, backpressure"),
            ));
            defaults.overflow
        }),
    };
    Storage {
        url,
        log_bodies: raw.log_bodies.unwrap_or(defaults.log_bodies),
        body_limit,
        retention_days: raw.retention.days.unwrap_or(defaults.retention_days),
        max_rows: raw.retention.max_rows.unwrap_or(defaults.max_rows),
        queue: queue.max(1),
        overflow,
    }
}

fn resolve_admin(raw: &RawAdmin, env: &EnvMap, problems: &mut Vec<Problem>) -> Admin {
    let key = match (&raw.key, &raw.key_env) {
        (Some(_), Some(_)) => {
            problems.push(Problem::new("admin", "set either key or key_env, not both"));
            None
        }
        (Some(key), None) => Some((key.clone(), "admin.key")),
        (None, Some(var)) => match env.get(var) {
            Some(key) => Some((key.to_string(), "admin.key_env")),
            None => {
                problems.push(Problem::new(
                    "admin.key_env",
                    format!("environment variable {var} is not set"),
                ));
                None
            }
        },
        (None, None) => None,
    };
    let key = key.and_then(|(key, path)| match check_credential(&key, path) {
        Some(problem) => {
            problems.push(problem);
            None
        }
        None => Some(Secret::new(key)),
    });
    let listen = raw
        .listen
        .as_deref()
        .and_then(|text| match listen_address(text) {
            Some(address) => Some(address),
            None => {
                problems.push(Problem::new(
                    "admin.listen",
                    format!("{text:?} is not an address like 127.0.0.1:8001 or localhost:8001"),
                ));
                None
            }
        });
    Admin {
        key,
        listen,
        log_bodies_for_viewers: raw.log_bodies_for_viewers.unwrap_or(false),
    }
}

fn resolve_token(
    raw: &RawToken,
    path: &str,
    env: &EnvMap,
    problems: &mut Vec<Problem>,
) -> Option<TokenSource> {
    let before = problems.len();
    match reqwest::Url::parse(&raw.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => {}
        _ => problems.push(Problem::new(
            format!("{path}.url"),
            "not an http:// or https:// URL",
        )),
    }
    let method = match raw
        .method
        .as_deref()
        .unwrap_or("POST")
        .to_ascii_uppercase()
        .as_str()
    {
        "GET" => http::Method::GET,
        "POST" => http::Method::POST,
        "PUT" => http::Method::PUT,
        other => {
            problems.push(Problem::new(
                format!("{path}.method"),
                format!("{other:?} is not GET, POST or PUT"),
            ));
            http::Method::POST
        }
    };
    let body = match (&raw.body, &raw.form) {
        (Some(_), Some(_)) => {
            problems.push(Problem::new(
                path,
                "set either body (JSON) or form, not both",
            ));
            TokenBody::None
        }
        (Some(json), None) => match expand_json(json, env) {
            Ok(value) => TokenBody::Json(value),
            Err(var) => {
                problems.push(Problem::new(
                    format!("{path}.body"),
                    format!("environment variable {var} is not set"),
                ));
                TokenBody::None
            }
        },
        (None, Some(form)) => {
            let mut fields = Vec::new();
            for (name, value) in form {
                match expand_env(value, env) {
                    Ok(value) => fields.push((name.clone(), value)),
                    Err(var) => problems.push(Problem::new(
                        format!("{path}.form.{name}"),
                        format!("environment variable {var} is not set"),
                    )),
                }
            }
            TokenBody::Form(fields)
        }
        (None, None) => TokenBody::None,
    };
    let headers = resolve_headers(&raw.headers, &format!("{path}.headers"), env, problems);
    let token_path = raw
        .token_path
        .clone()
        .unwrap_or_else(|| "access_token".to_string());
    if token_path.trim().is_empty() {
        problems.push(Problem::new(
            format!("{path}.token_path"),
            "must not be empty",
        ));
    }
    let mut duration = |value: &Option<Scalar>, field: &str, default: Duration| {
        duration_field(
            value.as_ref(),
            &format!("{path}.{field}"),
            "a duration",
            |d| !d.is_zero(),
            problems,
        )
        .unwrap_or(default)
    };
    let ttl = duration(&raw.ttl, "ttl", std::time::Duration::from_secs(3600));
    let refresh_before = duration(
        &raw.refresh_before,
        "refresh_before",
        std::time::Duration::from_secs(60),
    );
    (problems.len() == before).then(|| TokenSource {
        url: raw.url.clone(),
        method,
        body,
        headers,
        token_path,
        expires_in_path: Some(
            raw.expires_in_path
                .clone()
                .unwrap_or_else(|| "expires_in".to_string()),
        ),
        ttl,
        refresh_before,
    })
}

/// Expands `${VAR}` in every string of a JSON value.
fn expand_json(value: &Value, env: &EnvMap) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(expand_env(s, env)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| expand_json(v, env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), expand_json(v, env)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn resolve_routing(raw: RawRouting, problems: &mut Vec<Problem>) -> Routing {
    let defaults = Routing::default();
    let strategy = match raw.strategy.as_deref() {
        None => defaults.strategy,
        Some(name) => Strategy::parse(name).unwrap_or_else(|| {
            problems.push(Problem::new(
                "routing.strategy",
                format!("{name:?} is not one of {}", Strategy::NAMES.join(", ")),
            ));
            defaults.strategy
        }),
    };
    let retry_on = match raw.retry_on {
        None => defaults.retry_on.clone(),
        Some(list) => {
            let mut retry_on = RetryOn {
                connect: false,
                timeout: false,
                statuses: Vec::new(),
            };
            for (i, item) in list.iter().enumerate() {
                match item.as_text().as_str() {
                    "connect" => retry_on.connect = true,
                    "timeout" => retry_on.timeout = true,
                    text => match text.parse::<u16>() {
                        Ok(code) if (400..600).contains(&code) => retry_on.statuses.push(code),
                        _ => problems.push(Problem::new(
                            format!("routing.retry_on[{i}]"),
                            format!("{text:?} is not connect, timeout or a status from 400 to 599"),
                        )),
                    },
                }
            }
            retry_on
        }
    };
    let mut duration = |value: &Option<Scalar>, field: &str| {
        duration_field(
            value.as_ref(),
            &format!("routing.{field}"),
            "a duration like 30s",
            |_| true,
            problems,
        )
    };
    Routing {
        strategy,
        retries: raw.retries.unwrap_or(defaults.retries),
        retry_on,
        cooldown: duration(&raw.cooldown, "cooldown").unwrap_or(defaults.cooldown),
        backoff: duration(&raw.backoff, "backoff").unwrap_or(defaults.backoff),
        session_ttl: duration(&raw.session_ttl, "session_ttl").filter(|d| !d.is_zero()),
        affinity_ttl: match &raw.affinity.ttl {
            None => defaults.affinity_ttl,
            Some(ttl) => duration(&Some(ttl.clone()), "affinity.ttl").filter(|d| !d.is_zero()),
        },
        default_upstream: raw.default_upstream,
        fallbacks: raw.fallbacks.into_iter().collect(),
        fallback_model_name: match raw.fallback_model_name.as_deref() {
            None | Some("served") => FallbackModelName::Served,
            Some("requested") => FallbackModelName::Requested,
            Some(other) => {
                problems.push(Problem::new(
                    "routing.fallback_model_name",
                    format!("{other:?} is not served or requested"),
                ));
                FallbackModelName::Served
            }
        },
    }
}

/// Refuses a fallback chain that names a model no upstream serves, or that leads back to
/// a model already on its way (a loop), each with its path.
fn check_fallbacks(routing: &Routing, upstreams: &[Upstream], problems: &mut Vec<Problem>) {
    let mut models: Vec<&String> = routing.fallbacks.keys().collect();
    models.sort();
    for model in models {
        let path = format!("routing.fallbacks.{model}");
        if !upstreams.iter().any(|u| u.serves(model)) {
            problems.push(Problem::new(
                path.clone(),
                format!("no upstream serves the model {model:?}"),
            ));
        }
        for (i, next) in routing.fallbacks[model].iter().enumerate() {
            if !upstreams.iter().any(|u| u.serves(next)) {
                problems.push(Problem::new(
                    format!("{path}[{i}]"),
                    format!("no upstream serves the model {next:?}"),
                ));
            }
        }
        if let Some(cycle) = fallback_loop(&routing.fallbacks, model) {
            problems.push(Problem::new(
                path,
                format!("the fallbacks loop: {}", cycle.join(" → ")),
            ));
        }
    }
}

/// The first path from `start` that comes back to a model already on it, if any.
fn fallback_loop(
    fallbacks: &std::collections::HashMap<String, Vec<String>>,
    start: &str,
) -> Option<Vec<String>> {
    fn walk(
        fallbacks: &std::collections::HashMap<String, Vec<String>>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        let last = path.last()?.clone();
        for next in fallbacks.get(&last).into_iter().flatten() {
            if path.contains(next) {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            path.push(next.clone());
            if let Some(cycle) = walk(fallbacks, path) {
                return Some(cycle);
            }
            path.pop();
        }
        None
    }
    walk(fallbacks, &mut vec![start.to_string()])
}

/// The `cache` section: `None` unless `enabled: true`. A cap that is not a size, a TTL
/// that is not a duration or a scope of another name is a problem at its path.
fn resolve_cache(raw: RawCache, problems: &mut Vec<Problem>) -> Option<Cache> {
    let ttl = duration_field(
        raw.ttl.as_ref(),
        "cache.ttl",
        "a duration like 10m",
        |d| !d.is_zero(),
        problems,
    );
    let max_bytes = raw.max_bytes.as_ref().and_then(|value| {
        let text = value.as_text();
        let parsed = parse_size(&text).filter(|&n| n > 0);
        if parsed.is_none() {
            problems.push(Problem::new(
                "cache.max_bytes",
                format!("{text:?} is not a size like 64MiB"),
            ));
        }
        parsed
    });
    let scope = match raw.scope.as_deref() {
        None | Some("key") => CacheScope::Key,
        Some("team") => CacheScope::Team,
        Some("global") => CacheScope::Global,
        Some(other) => {
            problems.push(Problem::new(
                "cache.scope",
                format!("{other:?} is not key, team or global"),
            ));
            CacheScope::Key
        }
    };
    let mut models = std::collections::HashMap::new();
    for (model, value) in &raw.models {
        if let Some(ttl) = duration_field(
            Some(value),
            &format!("cache.models.{model}"),
            "a duration like 1h (0s: never cached)",
            |_| true,
            problems,
        ) {
            models.insert(model.clone(), ttl);
        }
    }
    if raw.enabled != Some(true) {
        return None;
    }
    Some(Cache {
        ttl: ttl.unwrap_or(Duration::from_secs(3600)),
        max_bytes: max_bytes.unwrap_or(64 << 20),
        scope,
        models,
        deterministic_only: raw.deterministic_only.unwrap_or(true),
        count_tokens: raw.count_tokens.unwrap_or(false),
    })
}

fn resolve_headers(
    raw: &BTreeMap<String, String>,
    path: &str,
    env: &EnvMap,
    problems: &mut Vec<Problem>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for (name, value) in raw {
        let header_path = format!("{path}.{name}");
        let Ok(header_name) = HeaderName::from_bytes(name.as_bytes()) else {
            problems.push(Problem::new(header_path, "not a valid header name"));
            continue;
        };
        match expand_env(value, env) {
            Err(var) => problems.push(Problem::new(
                header_path,
                format!("environment variable {var} is not set"),
            )),
            Ok(expanded) => match HeaderValue::from_str(&expanded) {
                Ok(mut header_value) => {
                    header_value.set_sensitive(true);
                    headers.push((header_name, header_value));
                }
                Err(_) => problems.push(Problem::new(
                    header_path,
                    "value has characters not allowed in a header",
                )),
            },
        }
    }
    headers
}

/// A duration field: `None` when absent; when it does not read as a duration, or is not
/// one `accepted` takes, a problem at `path` ("… is not {expected}") and `None`.
/// What a duration may be written as, for problems.
const DURATION_UNITS: &str =
    "a number of seconds, or a number with a unit: ms, s, m, h or d (lowercase), like 30s or 1h30m";

/// An HTTP/2 stream limit (`server.http2_max_streams`, an upstream's `http2_streams`): 1
/// to 10,000. `None` when unset, or refused (the problem noted).
fn stream_limit(value: Option<u32>, path: &str, problems: &mut Vec<Problem>) -> Option<u32> {
    let n = value?;
    if (1..=10_000).contains(&n) {
        return Some(n);
    }
    problems.push(Problem::new(
        path,
        format!("{n} is not between 1 and 10000"),
    ));
    None
}

fn duration_field(
    value: Option<&Scalar>,
    path: &str,
    expected: &str,
    accepted: impl Fn(Duration) -> bool,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    let text = value?.as_text();
    let Some(duration) = parse_duration(&text) else {
        problems.push(Problem::new(
            path,
            format!("{text:?} is not {expected}: {DURATION_UNITS}"),
        ));
        return None;
    };
    if !accepted(duration) {
        problems.push(Problem::new(path, format!("{text:?} is not {expected}")));
        return None;
    }
    Some(duration)
}

fn resolve_timeouts(raw: &RawTimeouts, path: &str, problems: &mut Vec<Problem>) -> Timeouts {
    let defaults = Timeouts::default();
    let mut one = |value: &Option<Scalar>, field: &str| {
        duration_field(
            value.as_ref(),
            &format!("{path}.{field}"),
            "a duration like 30s",
            |d| !d.is_zero(),
            problems,
        )
    };
    Timeouts {
        connect: one(&raw.connect, "connect").unwrap_or(defaults.connect),
        first_byte: one(&raw.first_byte, "first_byte").unwrap_or(defaults.first_byte),
        idle: one(&raw.idle, "idle").unwrap_or(defaults.idle),
        total: one(&raw.total, "total"),
    }
}

/// Expands `${VAR}` references from the environment; returns the missing variable's name.
fn expand_env(text: &str, env: &EnvMap) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(env.get(name).ok_or_else(|| name.to_string())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str, env: &[(&str, &str)]) -> Result<Config, Vec<Problem>> {
        let env = EnvMap::from_pairs(env.iter().copied());
        let mut document = parse_document(yaml).map_err(|p| vec![p])?;
        apply_env_overrides(&mut document, &env)?;
        resolve(&document, &env)
    }

    /// Problems as `load` reports them, variables named.
    fn problems_with_env(yaml: &str, env: &[(&str, &str)]) -> Vec<String> {
        let env = EnvMap::from_pairs(env.iter().copied());
        let mut document = parse_document(yaml).unwrap();
        configure(&mut document, &env, None)
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const ONE_UPSTREAM: &str = "upstreams: [{name: a, base_url: 'http://127.0.0.1:9/'}]";

    #[test]
    fn a_problem_from_the_environment_names_the_variable() {
        assert_eq!(
            problems_with_env(ONE_UPSTREAM, &[("SLUICE_SERVR__LISTEN", "0.0.0.0:1")]),
            [format!(
                "SLUICE_SERVR__LISTEN: unknown section servr, expected one of: {}",
                SECTIONS.join(", ")
            )]
        );
        let found = problems_with_env(ONE_UPSTREAM, &[("SLUICE_SERVER__LISTN", "0.0.0.0:1")]);
        assert!(
            found.len() == 1
                && found[0]
                    .starts_with("SLUICE_SERVER__LISTN (server.listn): unknown field `listn`"),
            "{found:?}"
        );
        let found = problems_with_env(
            ONE_UPSTREAM,
            &[("SLUICE_UPSTREAMS__0__BASE_URL", "ftp://x")],
        );
        assert!(
            found.len() == 1
                && found[0].starts_with("SLUICE_UPSTREAMS__0__BASE_URL (upstreams[0].base_url): "),
            "{found:?}"
        );
        // A problem in the file itself keeps its path.
        let found = problems_with_env(
            "upstreams: [{name: a, base_url: 'ftp://x'}]",
            &[("SLUICE_SERVER__LISTEN", "0.0.0.0:1")],
        );
        assert!(
            found.len() == 1 && found[0].starts_with("upstreams[0].base_url: "),
            "{found:?}"
        );
    }

    #[test]
    fn a_missing_file_named_by_sluice_config_names_the_variable() {
        let env = EnvMap::from_pairs([("SLUICE_CONFIG", "/nonexistent/sluice.yaml")]);
        let problems = load(&LoadOptions::default(), &env).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .to_string()
                .starts_with("SLUICE_CONFIG: cannot read /nonexistent/sluice.yaml"),
            "{problems:?}"
        );
    }

    #[test]
    fn durations_are_seconds_when_bare_and_problems_name_the_units() {
        let config = check(
            &format!("{ONE_UPSTREAM}\nrouting: {{cooldown: 30, backoff: 1.5}}"),
            &[],
        )
        .unwrap();
        assert_eq!(config.routing.cooldown, Duration::from_secs(30));
        assert_eq!(config.routing.backoff, Duration::from_millis(1500));
        let found = problems_with_env(ONE_UPSTREAM, &[("SLUICE_ROUTING__COOLDOWN", "30S")]);
        assert_eq!(
            found,
            [format!(
                "SLUICE_ROUTING__COOLDOWN (routing.cooldown): \"30S\" is not a duration like 30s: {DURATION_UNITS}"
            )]
        );
        assert!(DURATION_UNITS.contains("ms, s, m, h or d"));
    }

    #[test]
    fn listen_takes_a_host_name() {
        let config = check(
            &format!("{ONE_UPSTREAM}\nserver: {{listen: 'localhost:8000'}}\nadmin: {{listen: 'localhost:8001'}}"),
            &[],
        )
        .unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(
            config.admin.listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:8001")
        );
        let found = problems(&format!("{ONE_UPSTREAM}\nserver: {{listen: 'localhost'}}"));
        assert!(
            found.len() == 1 && found[0].starts_with("server.listen: "),
            "{found:?}"
        );
    }

    #[test]
    fn log_and_alerts_sections() {
        let config = check(ONE_UPSTREAM, &[]).unwrap();
        assert_eq!(config.log.format, LogFormat::Text);
        assert!(config.log.access);
        assert!(config.alerts.webhooks.is_empty());
        let config = check(
            &format!(
                "{ONE_UPSTREAM}\nlog: {{format: json, access: false}}\nalerts: {{interval: 10m, webhooks: [{{url: 'https://hooks.example/T/secret'}}, {{url_env: HOOK, format: slack}}]}}"
            ),
            &[("HOOK", "http://127.0.0.1:9/hook")],
        )
        .unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(!config.log.access);
        assert_eq!(config.alerts.interval, Duration::from_secs(600));
        assert_eq!(config.alerts.webhooks[0].format, WebhookFormat::Json);
        assert_eq!(config.alerts.webhooks[1].format, WebhookFormat::Slack);
        let found = problems(&format!(
            "{ONE_UPSTREAM}\nlog: {{format: xml}}\nalerts: {{webhooks: [{{url: 'not a url sk-secret'}}, {{url: 'http://x', format: teams}}]}}"
        ));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|p| !p.contains("sk-secret")), "{found:?}");
    }

    fn problems(yaml: &str) -> Vec<String> {
        check(yaml, &[])
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn fallback_chains_name_served_models_and_never_loop() {
        let upstreams = "upstreams:
  - {name: a, base_url: 'http://127.0.0.1:9', models: [big, small, tiny]}
";
        let ok = check(
            &format!("{upstreams}routing: {{fallbacks: {{big: [small], small: [tiny]}}}}"),
            &[],
        )
        .unwrap();
        assert_eq!(ok.routing.fallbacks["big"], ["small"]);
        let found = problems(&format!(
            "{upstreams}routing: {{fallbacks: {{big: [small, huge], nope: [big]}}}}"
        ));
        assert!(
            found.contains(
                &"routing.fallbacks.big[1]: no upstream serves the model \"huge\"".to_string()
            ),
            "{found:?}"
        );
        assert!(
            found.contains(
                &"routing.fallbacks.nope: no upstream serves the model \"nope\"".to_string()
            ),
            "{found:?}"
        );
        let looped = problems(&format!(
            "{upstreams}routing: {{fallbacks: {{big: [small], small: [tiny], tiny: [big]}}}}"
        ));
        assert!(
            looped.contains(
                &"routing.fallbacks.big: the fallbacks loop: big → small → tiny → big".to_string()
            ),
            "{looped:?}"
        );
        let bad_name = problems(&format!(
            "{upstreams}routing: {{fallback_model_name: asked}}"
        ));
        assert_eq!(
            bad_name,
            ["routing.fallback_model_name: \"asked\" is not served or requested"]
        );
    }

    #[test]
    fn the_cache_section_is_checked_field_by_field() {
        let upstreams = "upstreams: [{name: a, base_url: 'http://127.0.0.1:9'}]\n";
        let off = check(upstreams, &[]).unwrap();
        assert!(off.cache.is_none());
        let on = check(
            &format!(
                "{upstreams}cache: {{enabled: true, ttl: 10m, max_bytes: 2MiB, scope: global, models: {{gpt-4o: 1h, gpt-4o-mini: 0s}}}}"
            ),
            &[],
        )
        .unwrap();
        let cache = on.cache.unwrap();
        assert_eq!(cache.max_bytes, 2 << 20);
        assert_eq!(cache.scope, crate::config::CacheScope::Global);
        assert_eq!(cache.ttl_for(Some("gpt-4o")), Duration::from_secs(3600));
        assert_eq!(cache.ttl_for(Some("gpt-4o-mini")), Duration::ZERO);
        assert_eq!(cache.ttl_for(Some("other")), Duration::from_secs(600));
        assert!(cache.deterministic_only);
        let found = problems(&format!(
            "{upstreams}cache: {{enabled: true, max_bytes: lots, scope: tenant, ttl: soon}}"
        ));
        let expected = [
            "cache.ttl: \"soon\" is not a duration like 10m",
            "cache.max_bytes: \"lots\" is not a size like 64MiB",
            "cache.scope: \"tenant\" is not key, team or global",
        ];
        assert_eq!(found.len(), expected.len(), "{found:?}");
        for (problem, prefix) in found.iter().zip(expected) {
            assert!(problem.starts_with(prefix), "{problem:?} is not {prefix:?}");
        }
    }

    #[test]
    fn idle_connections_are_read_with_a_default() {
        let config = check(
            "upstreams:
  - {name: a, base_url: 'http://127.0.0.1:9'}
  - {name: b, base_url: 'http://127.0.0.1:9', idle_connections: 0}
  - {name: c, base_url: 'http://127.0.0.1:9', idle_connections: 1024}",
            &[],
        )
        .unwrap();
        let pools: Vec<usize> = config
            .upstreams
            .iter()
            .map(|u| u.idle_connections)
            .collect();
        assert_eq!(pools, [Upstream::IDLE_CONNECTIONS, 0, 1024]);
    }

    #[test]
    fn http2_and_tls_options_are_checked() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
        let config = check(
            &format!(
                "server: {{tls: {{cert: '{fixtures}/a.pem', key: '{fixtures}/a.key'}}, http2_max_streams: 64}}
upstreams:
  - {{name: a, base_url: 'http://127.0.0.1:9', http2: h2c}}
  - {{name: b, base_url: 'https://127.0.0.1:9', tls_ca: '{fixtures}/ca.pem', http2: auto}}
  - {{name: d, base_url: 'https://127.0.0.1:9', http2_streams: 250, http2_idle: 5s}}
  - {{name: c, base_url: 'https://127.0.0.1:9', http2: 'off'}}"
            ),
            &[],
        )
        .unwrap();
        let tls = config.server.tls.as_ref().unwrap();
        assert!(tls.cert.ends_with("a.pem") && tls.key.ends_with("a.key"));
        assert_eq!(config.server.http2_max_streams, 64);
        let modes: Vec<Http2Mode> = config.upstreams.iter().map(|u| u.http2).collect();
        assert_eq!(
            modes,
            [
                Http2Mode::H2c,
                Http2Mode::Auto,
                Http2Mode::Auto,
                Http2Mode::Off
            ]
        );
        assert!(config.upstreams[1].tls_ca.is_some());
        let streams: Vec<(usize, Duration)> = config
            .upstreams
            .iter()
            .map(|u| (u.http2_streams, u.http2_idle))
            .collect();
        let defaults = (Upstream::HTTP2_STREAMS, Upstream::HTTP2_IDLE);
        assert_eq!(
            streams,
            [defaults, defaults, (250, Duration::from_secs(5)), defaults]
        );

        let found = problems(&format!(
            "server: {{tls: {{cert: '{fixtures}/a.key', key: '{fixtures}/missing.key'}}, http2_max_streams: 0}}
upstreams:
  - {{name: a, base_url: 'https://127.0.0.1:9', http2: h2c}}
  - {{name: b, base_url: 'http://127.0.0.1:9', http2: h3}}
  - {{name: c, base_url: 'http://127.0.0.1:9', http2: h2c, proxy: 'http://127.0.0.1:3128'}}
  - {{name: d, base_url: 'https://127.0.0.1:9', tls_ca: '{fixtures}/a.key'}}
  - {{name: e, base_url: 'https://127.0.0.1:9', http2_streams: 0, http2_idle: 0s}}
  - {{name: f, base_url: 'https://127.0.0.1:9', http2_streams: 10001, http2_idle: soon}}"
        ));
        let expected = [
            "server.http2_max_streams: 0 is not between 1 and 10000",
            "server.tls.cert: ",
            "server.tls.key: cannot read ",
            "upstreams[0].http2: h2c is HTTP/2 on plain http:// only",
            "upstreams[1].http2: \"h3\" is not one of auto, h2c, off",
            "upstreams[2].http2: h2c cannot pass an HTTP proxy",
            "upstreams[3].tls_ca: ",
            "upstreams[4].http2_streams: 0 is not between 1 and 10000",
            "upstreams[4].http2_idle: \"0s\" is not a duration like 30s",
            "upstreams[5].http2_streams: 10001 is not between 1 and 10000",
            "upstreams[5].http2_idle: \"soon\" is not a duration like 30s",
        ];
        for prefix in expected {
            assert!(
                found.iter().any(|problem| problem.starts_with(prefix)),
                "no {prefix:?} in {found:?}"
            );
        }
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("server.tls.cert: ")
                    && p.contains("holds no PEM certificate")),
            "{found:?}"
        );
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = check(
            "upstreams: [{name: a, base_url: 'http://127.0.0.1:9/'}]",
            &[],
        )
        .unwrap();
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.server.max_body, DEFAULT_MAX_BODY);
        assert_eq!(config.upstreams[0].base_url, "http://127.0.0.1:9");
        assert!(config.upstreams[0].models.any);
        assert!(!config.access.passthrough);
    }

    #[test]
    fn an_upstream_speaks_one_of_four_apis() {
        let yaml = |kind: &str| {
            let version = if kind == "azure" {
                ", api_version: v1"
            } else {
                ""
            };
            format!(
                "upstreams: [{{name: a, kind: {kind}{version}, base_url: 'http://127.0.0.1:9/'}}]\npricing: {{m: {{input: 1, output: 2, cached_input: 0.1}}}}"
            )
        };
        for (text, kind) in [
            ("openai", ApiKind::OpenAi),
            ("anthropic", ApiKind::Anthropic),
            ("gemini", ApiKind::Gemini),
            ("azure", ApiKind::Azure),
        ] {
            assert_eq!(check(&yaml(text), &[]).unwrap().upstreams[0].kind, kind);
        }
        let config = check(&yaml("openai"), &[]).unwrap();
        assert_eq!(config.pricing["m"].cached_input, Some(0.1));
        let found = problems(&yaml("claude"));
        assert!(
            found.iter().any(|p| p.starts_with("upstreams[0].kind:")),
            "{found:?}"
        );
        let found = problems(
            "upstreams: [{name: a, base_url: 'http://127.0.0.1:9/'}]\npricing: {m: {input: 1, output: 2, cached_input: -1}}",
        );
        assert!(
            found.iter().any(|p| p.starts_with("pricing.m")),
            "{found:?}"
        );
    }

    #[test]
    fn storage_overflow_is_one_of_three_policies() {
        let yaml = |overflow: &str| {
            format!(
                "upstreams: [{{name: a, base_url: 'http://127.0.0.1:9/'}}]\nstorage: {{overflow: {overflow}}}"
            )
        };
        let config = check(&yaml("backpressure"), &[]).unwrap();
        assert_eq!(
            config.storage.overflow,
            crate::config::Overflow::Backpressure
        );
        let default = check(
            "upstreams: [{name: a, base_url: 'http://127.0.0.1:9/'}]",
            &[],
        )
        .unwrap();
        assert_eq!(
            default.storage.overflow,
            crate::config::Overflow::ShedBodies
        );
        let found = problems(&yaml("drop_everything"));
        assert!(
            found.iter().any(|p| p.starts_with("storage.overflow:")),
            "{found:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let found = problems(
            "
server: {listen: nowhere, max_body: lots}
access:
  ip_allow: [10.0.0.0/8, not-an-ip]
  keys:
    - {name: a, key: fk-aaaaaaaaaaaa}
    - {name: a, key: 'has space'}
    - {name: b, key_env: MISSING_VAR}
upstreams:
  - {name: x, base_url: 'ftp://host'}
  - {name: y, base_url: 'http://h', proxy: 'gopher://p:1', timeouts: {connect: forever}}
",
        );
        let expected = [
            "server.listen:",
            "server.max_body:",
            "access.ip_allow[1]:",
            "access.keys[1].name: duplicate",
            "access.keys[1].key:",
            "access.keys[2].key_env: environment variable MISSING_VAR",
            "upstreams[0].base_url:",
            "upstreams[1].proxy: scheme \"gopher\"",
            "upstreams[1].timeouts.connect:",
        ];
        for prefix in expected {
            assert!(
                found.iter().any(|p| p.starts_with(prefix)),
                "missing {prefix:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), expected.len(), "{found:#?}");
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let found =
            problems("upstreams: [{name: a, base_url: 'http://h', modles: [x]}]\nsurprise: 1");
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("upstreams[0]") && p.contains("unknown field `modles`")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("surprise: unknown section")),
            "{found:?}"
        );
    }

    #[test]
    fn problems_never_show_secret_values() {
        let found = problems(
            "access: {keys: [{name: a, key: [fk-secret-value-1]}]}\nupstreams: [{name: a, base_url: 'http://h', keys: fk-secret-value-2}]",
        );
        assert!(!found.is_empty());
        for problem in &found {
            assert!(!problem.contains("fk-secret-value"), "{problem}");
        }
    }

    #[test]
    fn env_overrides_set_nested_fields_and_list_elements() {
        let config = check(
            "upstreams: [{name: a, base_url: 'http://h'}]",
            &[
                ("SLUICE_SERVER__LISTEN", "127.0.0.1:9999"),
                ("SLUICE_ACCESS__PASSTHROUGH", "true"),
                (
                    "SLUICE_UPSTREAMS__0__KEYS",
                    "[sk-one-111111111, sk-two-22222222]",
                ),
                ("SLUICE_ACCESS__KEYS", "[{name: alice, key_env: ALICE}]"),
                ("ALICE", "fk-alice-123"),
                ("SLUICE_TEST_HELPER", "not a config field"),
            ],
        )
        .unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9999");
        assert!(config.access.passthrough);
        assert_eq!(config.upstreams[0].keys.len(), 2);
        assert_eq!(config.access.keys[0].key.expose(), "fk-alice-123");
    }

    #[test]
    fn a_misspelt_env_override_is_an_error() {
        let found = check(
            "upstreams: [{name: a, base_url: 'http://h'}]",
            &[("SLUICE_SERVR__LISTEN", "x")],
        )
        .unwrap_err();
        assert!(
            found[0].to_string().contains("servr: unknown section"),
            "{found:?}"
        );
    }

    #[test]
    fn keys_env_holds_several_keys() {
        let config = check(
            "upstreams: [{name: a, base_url: 'http://h', keys_env: KEYS}]",
            &[("KEYS", "sk-1, sk-2 sk-3")],
        )
        .unwrap();
        let keys: Vec<&str> = config.upstreams[0]
            .keys
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(keys, ["sk-1", "sk-2", "sk-3"]);
    }

    #[test]
    fn header_values_expand_env() {
        let config = check(
            "upstreams: [{name: a, base_url: 'http://h', headers: {X-Token: 'Bearer ${TOKEN}'}}]",
            &[("TOKEN", "t0k")],
        )
        .unwrap();
        assert_eq!(config.upstreams[0].headers[0].1, "Bearer t0k");
        assert!(
            check(
                "upstreams: [{name: a, base_url: 'http://h', headers: {X-Token: '${NOPE}'}}]",
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn no_file_defaults_forward_to_openai_with_env_keys() {
        let env = EnvMap::from_pairs([("OPENAI_API_KEY", "sk-a sk-b")]);
        let config = resolve(&defaults_without_file(&env), &env).unwrap();
        assert_eq!(config.upstreams[0].base_url, "https://api.openai.com");
        assert_eq!(config.upstreams[0].keys.len(), 2);
        assert!(config.access.passthrough);
        let bare = EnvMap::default();
        assert!(
            resolve(&defaults_without_file(&bare), &bare)
                .unwrap()
                .upstreams[0]
                .keys
                .is_empty()
        );
    }

    #[test]
    fn route_prefix_is_normalised() {
        let config = check(
            "server: {route_prefix: /openai/}\nupstreams: [{name: a, base_url: 'http://h'}]",
            &[],
        )
        .unwrap();
        assert_eq!(config.server.route_prefix, "/openai");
    }
}
