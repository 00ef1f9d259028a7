//! The gateway's run-time state, built once from a [`Config`]: the access guard, the
//! upstream runtimes and the router.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use crate::accounting::recorder::{RecordSink, Recorder};
use crate::accounting::records::{KeyTicket, Pending, TraceContext};
use crate::accounting::shared::{Event, EventKind, Scope, Settlement, SharedState};
use crate::cache::ResponseCache;
use crate::config::{ApiKind, Config, GatewayKey, Upstream};
use crate::http::error::ApiError;
use crate::observe::access::AccessLog;
use crate::observe::alerts::Alerts;
use crate::pipeline::access::{Caller, Guard};
use crate::pipeline::affinity::{self, Affinity, Learner};
use crate::pure::limits::{Limiter, Reserve};
use crate::pure::routing::Choice;
use crate::pure::routing::{Health, Router};
use crate::upstream::UpstreamRuntime;

#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub guard: Guard,
    pub upstreams: Vec<Arc<UpstreamRuntime>>,
    pub router: Router,
    pub limiter: Arc<Limiter>,
    /// The request log; `None` when storage is off.
    pub recorder: Option<Arc<Recorder>>,
    /// The access log, when it is on (`log.access`): records go there through the
    /// recorder's accountant, or straight there with storage off.
    pub access: Option<AccessLog>,
    /// Alerts to webhooks, when any is configured.
    pub alerts: Option<Arc<Alerts>>,
    /// Dashboard login sessions.
    pub sessions: Arc<crate::admin::dashboard::Sessions>,
    /// Failed admin authentication per client address.
    pub admin_auth: Arc<crate::admin::throttle::AuthThrottle>,
    pub metrics: Arc<crate::observe::metrics::Metrics>,
    pub shared_state: Option<Arc<SharedState>>,
    /// Sends request traces to a collector, when configured.
    pub traces: Option<Arc<crate::observe::traces::Exporter>>,
    /// Which upstream created which object (file, batch, response…).
    pub affinity: Arc<Affinity>,
    /// Keys, teams and admin accounts managed at run time.
    pub registry: Arc<crate::admin::registry::Registry>,
    /// The response cache, when `cache.enabled`.
    pub cache: Option<Arc<ResponseCache>>,
    /// Where requests without a model go, when `routing.default_upstream` says.
    default_upstream: Option<usize>,
    /// Whether requests naming objects look up where they live: object affinity is on and
    /// there is a choice to make (several upstreams, or a pool of keys).
    object_routing: bool,
    /// Whether JSON bodies must be read whatever the caller: the route depends on the model,
    /// a body is rewritten, a retry may resend it, or sessions read its `user`. With none
    /// of these, bodies stream straight through.
    read_json_always: bool,
    routes_by_model: bool,
    /// Model → every model to try after it, in order (each listed model's own fallbacks
    /// follow it), flattened once from `routing.fallbacks`.
    fallbacks: std::collections::HashMap<String, Vec<String>>,
}

/// The gateway in force. A reload swaps it whole; a request takes a handle when it starts
/// and keeps it to its end, so no request sees half of one config and half of another, and
/// open streams finish on the upstreams they started with.
#[derive(Debug)]
pub struct Current(std::sync::RwLock<Arc<Gateway>>);

impl Current {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self(std::sync::RwLock::new(gateway))
    }

    pub fn load(&self) -> Arc<Gateway> {
        match self.0.read() {
            Ok(gateway) => gateway.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn store(&self, gateway: Arc<Gateway>) {
        match self.0.write() {
            Ok(mut slot) => *slot = gateway,
            Err(poisoned) => *poisoned.into_inner() = gateway,
        }
    }
}

/// What outlives a config reload: counters, the request log, metrics, dashboard sessions,
/// the admin authentication throttle.
#[derive(Debug, Clone)]
pub struct Shared {
    pub limiter: Arc<Limiter>,
    pub affinity: Arc<Affinity>,
    pub metrics: Arc<crate::observe::metrics::Metrics>,
    pub recorder: Option<Arc<Recorder>>,
    pub access: Option<AccessLog>,
    pub alerts: Option<Arc<Alerts>>,
    pub sessions: Arc<crate::admin::dashboard::Sessions>,
    pub admin_auth: Arc<crate::admin::throttle::AuthThrottle>,
    pub shared_state: Option<Arc<SharedState>>,
    pub traces: Option<Arc<crate::observe::traces::Exporter>>,
    pub registry: Arc<crate::admin::registry::Registry>,
    /// Cached answers outlive a reload that keeps the cache's settings.
    pub cache: Option<Arc<ResponseCache>>,
}

impl Shared {
    /// Opens the store and starts the log writer, if storage is on.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        let limiter = Arc::new(Limiter::default());
        let metrics = Arc::new(crate::observe::metrics::Metrics::default());
        let shared_state = match &config.shared_state {
            Some(shared) => Some(Arc::new(
                SharedState::new(
                    &shared.redis,
                    &shared.prefix,
                    shared.timeout,
                    shared.fail_open,
                )
                .context("shared_state.redis")?,
            )),
            None => None,
        };
        let traces = match (&config.traces, &config.storage.url) {
            (Some(traces), Some(_)) => Some(crate::observe::traces::Exporter::start(traces)?),
            (Some(_), None) => {
                tracing::warn!(
                    "traces are built from the request log; with storage off none are sent"
                );
                None
            }
            (None, _) => None,
        };
        let access = if config.log.access {
            Some(AccessLog::start().context("cannot start the access log")?)
        } else {
            None
        };
        let recorder = match &config.storage.url {
            Some(url) => {
                let store = crate::store::open(url).with_context(|| format!("storage {url}"))?;
                // The accountant settles tokens into Redis too, through this runtime.
                let settle = shared_state.clone();
                Some(Arc::new(Recorder::start(
                    store,
                    config,
                    limiter.clone(),
                    metrics.clone(),
                    settle,
                    traces.clone(),
                    access.clone(),
                )?))
            }
            None => None,
        };
        let affinity = Arc::new(Affinity::new(
            shared_state.clone(),
            recorder.as_ref().map(|r| r.store.clone()),
        ));
        let drops = recorder
            .as_ref()
            .map(|r| r.stats.clone() as Arc<dyn crate::observe::alerts::DropCounts>);
        let alerts = Alerts::start(&config.alerts, drops)?;
        if let (Some(recorder), Some(alerts)) = (&recorder, &alerts) {
            recorder.set_alerts(alerts.clone());
        }
        let registry = Arc::new(crate::admin::registry::Registry::new(
            recorder.as_ref().map(|r| r.store.clone()),
        ));
        registry
            .reload()
            .context("cannot read managed keys, teams and admins from the store")?;
        registry.follow()?;
        Ok(Self {
            registry,
            limiter,
            affinity,
            metrics,
            recorder,
            access,
            alerts,
            sessions: Default::default(),
            admin_auth: Default::default(),
            shared_state,
            traces,
            cache: ResponseCache::start(config).context("cache")?,
        })
    }
}

impl Gateway {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let shared = Shared::start(&config)?;
        Self::with_shared(config, shared)
    }

    /// A gateway for `config` that keeps the counters, log and sessions of `shared`: what a
    /// reload builds.
    pub fn with_shared(config: Config, shared: Shared) -> anyhow::Result<Self> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| UpstreamRuntime::new(u.clone()).map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(alerts) = &shared.alerts {
            // An upstream said to be down before a reload is marked as having rested, so
            // its first answer after the reload is said to be its recovery.
            for upstream in &upstreams {
                if alerts.is_down(&upstream.config.name) {
                    upstream.cooldown_until.store(1, Ordering::Relaxed);
                }
            }
        }
        let routing = &config.routing;
        // An Azure upstream's path names the model's deployment.
        let routing_needs_model = upstreams.len() > 1
            || upstreams
                .iter()
                .any(|u| !u.config.models.any || u.config.kind == ApiKind::Azure);
        let rewrites = upstreams.iter().any(|u| u.config.rewrites_bodies());
        // Even a lone upstream and key is tried again after a failure.
        let can_retry = routing.retries > 0;
        let router = Router::new(routing.strategy, upstreams.len(), routing.session_ttl);
        // Sessions opened with another admin key end here.
        shared.sessions.bind(config.admin.key.as_ref());
        let object_routing = routing.affinity_ttl.is_some()
            && (upstreams.len() > 1 || upstreams.iter().any(|u| u.key_count() > 1));
        let default_upstream = routing
            .default_upstream
            .as_ref()
            .and_then(|name| upstreams.iter().position(|u| &u.config.name == name));
        if let Some(recorder) = &shared.recorder {
            // Model names and prices come with the config; the recorder outlives it.
            recorder.configure(&config);
        }
        let fallbacks = flatten_fallbacks(&routing.fallbacks);
        // A reload that changes the cache's settings starts it afresh.
        let cache = match &shared.cache {
            Some(cache) if cache.fits(&config) => Some(cache.clone()),
            _ => ResponseCache::start(&config).context("cache")?,
        };
        // The log wants each request's model and usage, so it reads JSON bodies too.
        let read_json_always = routing_needs_model
            || !fallbacks.is_empty()
            || cache.is_some()
            || rewrites
            || can_retry
            || router.sessions_enabled()
            || object_routing
            || shared.recorder.is_some()
            // A request is translated for an upstream of another API.
            || upstreams
                .iter()
                .any(|u| u.config.kind != crate::config::ApiKind::OpenAi);
        Ok(Self {
            guard: Guard::new(&config.access, shared.registry.clone()),
            registry: shared.registry,
            config,
            upstreams,
            router,
            limiter: shared.limiter,
            recorder: shared.recorder,
            access: shared.access,
            alerts: shared.alerts,
            sessions: shared.sessions,
            admin_auth: shared.admin_auth,
            shared_state: shared.shared_state,
            traces: shared.traces,
            metrics: shared.metrics,
            affinity: shared.affinity,
            cache,
            default_upstream,
            object_routing,
            read_json_always,
            routes_by_model: routing_needs_model,
            fallbacks,
        })
    }

    /// The parts a reloaded gateway takes over.
    pub fn shared(&self) -> Shared {
        Shared {
            limiter: self.limiter.clone(),
            affinity: self.affinity.clone(),
            metrics: self.metrics.clone(),
            recorder: self.recorder.clone(),
            access: self.access.clone(),
            alerts: self.alerts.clone(),
            sessions: self.sessions.clone(),
            admin_auth: self.admin_auth.clone(),
            shared_state: self.shared_state.clone(),
            traces: self.traces.clone(),
            registry: self.registry.clone(),
            cache: self.cache.clone(),
        }
    }

    /// Tells the other instances that keys, teams or admins changed in the store, so they
    /// reload at once rather than at their next poll.
    pub fn announce_managed_change(&self) {
        if let Some(shared) = &self.shared_state {
            shared.publish(
                EventKind::Managed {
                    version: self.registry.snapshot().version,
                },
                Duration::from_secs(5),
            );
        }
    }

    /// Where finished records go: the log, else the access log, else nowhere.
    pub fn record_sink(&self) -> Option<RecordSink> {
        match (&self.recorder, &self.access) {
            (Some(recorder), _) => Some(RecordSink::Log(recorder.sink.clone())),
            (None, Some(access)) => Some(RecordSink::Access(access.clone())),
            (None, None) => None,
        }
    }

    /// Hands a finished record to the log (or the access log); never blocks.
    pub fn submit_record(&self, pending: Box<Pending>) {
        if let Some(sink) = self.record_sink() {
            sink.submit(pending);
        }
    }

    /// A record for a request about to be handled, if the log or the access log is on.
    pub fn start_record(
        &self,
        client: std::net::IpAddr,
        parts: &http::request::Parts,
        path: &str,
    ) -> Option<Box<Pending>> {
        (self.recorder.is_some() || self.access.is_some()).then(|| {
            // Headers are kept only for the stored log; the access line never shows them.
            let headers = if self.recorder.is_some() {
                crate::accounting::records::detached(&parts.headers)
            } else {
                http::HeaderMap::new()
            };
            let mut pending = Box::new(Pending::new(client, parts.method.clone(), path, headers));
            if self.traces.is_some() {
                pending.trace = Some(TraceContext::from_headers(&parts.headers));
            }
            pending
        })
    }

    /// Logs a request that ended with an error sluice answered itself: its status, its
    /// message, and the answer as the client got it (body and `Retry-After`).
    pub fn record_error(&self, pending: Option<Box<Pending>>, error: &ApiError) {
        let (Some(sink), Some(mut pending)) = (self.record_sink(), pending) else {
            return;
        };
        pending.status = error.status.as_u16();
        pending.error = Some(error.message.clone());
        pending.latency = Some(pending.started.elapsed());
        let limit = sink.body_limit();
        if limit > 0 {
            // The answer a refusal gets is small, and only built when it is stored.
            let body = bytes::Bytes::from(error.to_json());
            pending.response_body = Default::default();
            pending.response_body.push(&body, limit);
            pending.response_content_type = Some("application/json".into());
            let headers = &mut pending.response_headers;
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            if let Some(seconds) = error.retry_after {
                headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
            }
        }
        sink.submit(pending);
    }

    /// Admits a request's next try: the first time, its gateway key (`key`, with the
    /// tokens and cost to reserve), and the limits of the upstream about to be tried. With
    /// shared state, every limited scope goes to Redis in one round trip; when Redis does
    /// not answer, this instance's own limiter decides (fail-open) or the request is
    /// refused. `Err` refuses the request; `Ok((ticket, false))` means the key is admitted
    /// (if it was asked) but the upstream is at its limit.
    pub async fn admit(
        &self,
        key: Option<(&GatewayKey, Reserve)>,
        upstream: Option<&Upstream>,
    ) -> Result<(Option<KeyTicket>, bool), ApiError> {
        let now = crate::clock::unix_now();
        let key_limited = key.filter(|(k, _)| k.is_limited());
        let upstream_limited = upstream.filter(|u| !u.limits.is_unlimited());
        let shared = self
            .shared_state
            .as_ref()
            .filter(|_| key_limited.is_some() || upstream_limited.is_some());
        let Some(shared) = shared else {
            return self.admit_locally(key, upstream, now);
        };
        let key_scope = key_limited.map(|(k, _)| crate::pure::limits::key_scope(&k.name));
        let team = key_limited.and_then(|(k, _)| k.team.as_deref());
        let team_scope = team.map(|t| crate::pure::limits::team_scope(&t.name));
        let upstream_scope = upstream_limited.map(|u| crate::pure::limits::upstream_scope(&u.name));
        let mut scopes = Vec::with_capacity(3);
        if let (Some((k, reserve)), Some(name)) = (key_limited, &key_scope) {
            scopes.push(Scope {
                name,
                required: true,
                limits: &k.limits,
                budget: k.budget.as_ref(),
                reserve,
            });
        }
        // The team's scope goes in the same script call: its keys on every instance meet
        // one count.
        if let (Some((_, reserve)), Some(team), Some(name)) = (key_limited, team, &team_scope) {
            scopes.push(Scope {
                name,
                required: true,
                limits: &team.limits,
                budget: team.budget.as_ref(),
                reserve,
            });
        }
        if let (Some(u), Some(name)) = (upstream_limited, &upstream_scope) {
            scopes.push(Scope {
                name,
                required: false,
                limits: &u.limits,
                budget: None,
                reserve: Reserve::default(),
            });
        }
        let admission = match shared.admit(&scopes).await {
            Ok(admission) => admission,
            Err(error) if shared.fail_open => {
                shared.report_outage(&error, "using this instance's own limits (on_error: open)");
                return self.admit_locally(key, upstream, now);
            }
            Err(error) => {
                shared.report_outage(&error, "refusing requests (on_error: closed)");
                return Err(ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "shared_state_unavailable",
                    "the shared limit store does not answer",
                ));
            }
        };
        let mut upstream_ok = true;
        if let Some(refusal) = admission.refused {
            match (key_limited, scopes.get(refusal.scope)) {
                (Some((k, _)), Some(scope)) if scope.required => {
                    let holder = match (&team_scope, &k.team) {
                        (Some(name), Some(team)) if name == scope.name => {
                            format!("team `{}`", team.name)
                        }
                        _ => format!("API key `{}`", k.name),
                    };
                    return Err(key_refused(
                        &holder,
                        &refusal.what,
                        refusal.retry_after,
                        refusal.budget,
                    ));
                }
                _ => upstream_ok = false,
            }
        }
        let ticket = match (key, key_limited) {
            (_, Some((_, reserve))) => Some(KeyTicket {
                at: admission.at,
                reserve,
                shared: true,
            }),
            // A key without limits is counted here, and in Redis when its answer settles.
            (Some(key), None) => self.admit_locally(Some(key), None, now)?.0,
            (None, _) => None,
        };
        Ok((ticket, upstream_ok))
    }

    fn admit_locally(
        &self,
        key: Option<(&GatewayKey, Reserve)>,
        upstream: Option<&Upstream>,
        now: i64,
    ) -> Result<(Option<KeyTicket>, bool), ApiError> {
        let ticket = match key {
            Some((key, reserve)) => {
                self.limiter
                    .admit_key(key, now, reserve)
                    .map_err(|refusal| {
                        let holder = match (&refusal.holder, &key.team) {
                            (crate::pure::limits::Holder::Team, Some(team)) => {
                                format!("team `{}`", team.name)
                            }
                            _ => format!("API key `{}`", key.name),
                        };
                        key_refused(
                            &holder,
                            &refusal.limit,
                            refusal.retry_after,
                            refusal.limit.is_budget(),
                        )
                    })?;
                Some(KeyTicket {
                    at: now,
                    reserve,
                    shared: false,
                })
            }
            None => None,
        };
        // A key admitted for an upstream at its limit stays admitted: the caller tries
        // another upstream, or refunds it.
        let upstream_ok = upstream.is_none_or(|u| self.limiter.take_upstream(u, now));
        Ok((ticket, upstream_ok))
    }

    /// Takes back a key's admission for a request that never went out.
    pub fn refund(&self, key: &GatewayKey, ticket: KeyTicket) {
        if ticket.shared {
            if let Some(shared) = &self.shared_state {
                let team = key
                    .team
                    .as_ref()
                    .map(|t| crate::pure::limits::team_scope(&t.name));
                let scopes = std::iter::once(crate::pure::limits::key_scope(&key.name)).chain(team);
                for scope in scopes {
                    shared.settle(Settlement {
                        scope,
                        at: Some(ticket.at),
                        requests: -1,
                        tokens: -i64::try_from(ticket.reserve.tokens).unwrap_or(i64::MAX),
                        cost: -ticket.reserve.cost,
                    });
                }
            }
        } else {
            self.limiter.refund_key(key, ticket.at, ticket.reserve);
        }
    }

    /// What to reserve for a request of `key` whose JSON body is `body_len` bytes: about
    /// four bytes a token, priced as input of `model`. Nothing when no limit counts
    /// tokens or cost, or when no log settles them.
    pub fn estimate(&self, key: &GatewayKey, model: Option<&str>, body_len: usize) -> Reserve {
        let counts_tokens = key.counts_tokens();
        if !counts_tokens || self.recorder.is_none() {
            return Reserve::default();
        }
        let tokens = u64::try_from(body_len / 4).unwrap_or(u64::MAX);
        let cost = model
            .and_then(|m| self.config.pricing.get(m))
            .map_or(0.0, |price| tokens as f64 * price.input / 1_000_000.0);
        Reserve { tokens, cost }
    }

    /// The models to try, in order, when `model` cannot answer (`routing.fallbacks`).
    pub fn fallbacks(&self, model: &str) -> &[String] {
        self.fallbacks.get(model).map_or(&[], Vec::as_slice)
    }

    /// Re-prices what a key's admission reserved for the model that will serve instead
    /// (a fallback): the difference goes to the counters it was taken from, so the key is
    /// still charged once, at the price of the model that serves.
    pub fn reprice(&self, key: &GatewayKey, ticket: KeyTicket, reserve: Reserve) -> KeyTicket {
        let tokens = i64::try_from(reserve.tokens).unwrap_or(i64::MAX)
            - i64::try_from(ticket.reserve.tokens).unwrap_or(i64::MAX);
        let cost = reserve.cost - ticket.reserve.cost;
        let scope = crate::pure::limits::key_scope(&key.name);
        if ticket.shared {
            if let Some(shared) = &self.shared_state {
                shared.settle(Settlement {
                    scope,
                    at: Some(ticket.at),
                    requests: 0,
                    tokens,
                    cost,
                });
            }
        } else {
            self.limiter.settle(&scope, ticket.at, tokens, cost);
        }
        KeyTicket { reserve, ..ticket }
    }

    /// Rests an upstream after it failed here, and tells the other instances (unless it
    /// already rests for most of that time, so a burst of failures is told once).
    pub fn rest_upstream(&self, upstream: &UpstreamRuntime, rest: Duration, cause: &str) {
        let already = upstream.cooldown_until.load(Ordering::Relaxed);
        upstream.record_failure(rest);
        if let Some(alerts) = &self.alerts {
            alerts.upstream_down(&upstream.config.name, rest, cause);
        }
        self.tell(already, &upstream.config.name, None, rest);
    }

    /// Rests one key of an upstream's pool after it was refused, and tells the others.
    pub fn rest_key(&self, upstream: &UpstreamRuntime, key: usize, rest: Duration) {
        let already = upstream.key_cooldown_until(key);
        upstream.cool_key(key, rest);
        self.tell(already, &upstream.config.name, Some(key), rest);
    }

    fn tell(&self, rested_until: u64, upstream: &str, key: Option<usize>, rest: Duration) {
        let Some(shared) = &self.shared_state else {
            return;
        };
        let half = u64::try_from(rest.as_millis() / 2).unwrap_or(u64::MAX);
        if rested_until > crate::clock::now_ms().saturating_add(half) {
            return;
        }
        let kind = EventKind::Cooldown {
            upstream: upstream.to_string(),
            key,
        };
        shared.publish(kind, rest);
    }

    /// Pins a session to what served it, and tells the other instances when needed.
    pub fn remember_session(&self, session: &str, choice: Choice) {
        let now = crate::clock::now_ms();
        if !self.router.remember(session, choice, now) {
            return;
        }
        let (Some(shared), Some(ttl)) = (&self.shared_state, self.config.routing.session_ttl)
        else {
            return;
        };
        let Some(upstream) = self.upstreams.get(choice.upstream) else {
            return;
        };
        let kind = EventKind::Session {
            session: session.to_string(),
            upstream: upstream.config.name.clone(),
            key: choice.key,
        };
        shared.publish(kind, ttl);
    }

    /// Applies a cooldown or session pin another instance announced. Upstreams are named;
    /// keys are their position in the upstream's pool (instances share one config).
    pub fn apply_shared_event(&self, event: Event) {
        let left = Duration::from_millis(event.ms);
        let find = |name: &str| self.upstreams.iter().position(|u| u.config.name == name);
        match event.kind {
            EventKind::Cooldown { upstream, key } => {
                let Some(runtime) = find(&upstream).and_then(|i| self.upstreams.get(i)) else {
                    return;
                };
                match key {
                    Some(key) => runtime.rest_key_at_least(key, left),
                    None => runtime.rest_at_least(left),
                }
            }
            EventKind::Managed { .. } => self.registry.nudge(),
            EventKind::Session {
                session,
                upstream,
                key,
            } => {
                if let Some(index) = find(&upstream) {
                    let choice = Choice {
                        upstream: index,
                        key: key.filter(|&k| k < self.upstreams[index].key_count()),
                    };
                    let now = crate::clock::now_ms();
                    self.router.adopt(&session, choice, left, now);
                }
            }
        }
    }

    /// Writes what the log has queued and stops its writer.
    pub fn shutdown(&self) {
        if let Some(recorder) = &self.recorder {
            recorder.shutdown();
        }
    }

    /// Whether a JSON request body from this caller must be read before forwarding.
    pub fn must_read_json(&self, caller: &Caller) -> bool {
        self.read_json_always || caller.needs_known_model()
    }

    /// Whether the upstream a request goes to depends on its model, so a form body
    /// (audio, images) is read for its `model` field too.
    pub fn routes_by_model(&self) -> bool {
        self.routes_by_model
    }

    /// Upstreams that can serve `model`; without a model, those serving anything (or all).
    pub fn candidates(&self, model: Option<&str>) -> Result<Vec<usize>, ApiError> {
        let indexes = 0..self.upstreams.len();
        match model {
            Some(model) => {
                let serving: Vec<usize> = indexes
                    .filter(|&i| self.upstreams[i].config.serves(model))
                    .collect();
                if serving.is_empty() {
                    Err(model_not_found(model))
                } else {
                    Ok(serving)
                }
            }
            None if self.default_upstream.is_some() => {
                Ok(self.default_upstream.into_iter().collect())
            }
            None => {
                let any: Vec<usize> = indexes
                    .clone()
                    .filter(|&i| self.upstreams[i].config.models.any)
                    .collect();
                Ok(if any.is_empty() {
                    indexes.collect()
                } else {
                    any
                })
            }
        }
    }
}

impl Gateway {
    /// Where a request that names objects (in `path` or its JSON `body`) must go: the
    /// upstream that created the first one known, and the key that did when it is still in
    /// the pool. `candidates` is narrowed to that upstream. Nothing when the request names
    /// no known object, when that upstream left the config, or when it does not serve the
    /// request's `model`.
    pub async fn object_choice(
        &self,
        path: &str,
        body: Option<&[u8]>,
        model: Option<&str>,
        candidates: &mut Vec<usize>,
    ) -> Option<Choice> {
        if !self.object_routing {
            return None;
        }
        let mut ids: Vec<String> = affinity::path_object(path)
            .map(str::to_string)
            .into_iter()
            .collect();
        if let Some(body) = body {
            ids.extend(affinity::body_objects(path, body));
        }
        if ids.is_empty() {
            return None;
        }
        let route = self.affinity.lookup(&ids).await?;
        let index = self
            .upstreams
            .iter()
            .position(|u| u.config.name == route.upstream)?;
        if model.is_some() && !candidates.contains(&index) {
            return None;
        }
        let upstream = &self.upstreams[index];
        let now = crate::clock::now_ms();
        let key = route.key.as_ref().and_then(|masked| {
            (0..upstream.key_count()).find(|&k| upstream.masked_key(k).as_ref() == Some(masked))
        });
        // A resting key gives way to another of the pool, if one is usable.
        let key = key
            .filter(|&k| !upstream.key_is_cooling(k, now))
            .or_else(|| upstream.pick_key(now, |_| false).flatten())
            .or(key)
            .or_else(|| upstream.soonest_key());
        *candidates = vec![index];
        Some(Choice {
            upstream: index,
            key,
        })
    }

    /// Learns, from an answer of `choice`, the objects it created (reading its body on the
    /// side as it streams), or forgets the one it deleted. A caller's own key is not
    /// remembered: its later requests carry it anyway.
    pub fn learn_objects(
        &self,
        method: &http::Method,
        path: &str,
        response: reqwest::Response,
        choice: Choice,
        caller: &Caller,
    ) -> reqwest::Response {
        let Some(ttl) = self.config.routing.affinity_ttl else {
            return response;
        };
        if !response.status().is_success() {
            return response;
        }
        if let Some(id) = affinity::deleted_object(method, path) {
            self.affinity.forget(id);
            return response;
        }
        if !affinity::learns(method, path) {
            return response;
        }
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim_start()
            .to_ascii_lowercase();
        let sse = content_type.starts_with("text/event-stream");
        if !sse && !content_type.starts_with("application/json") {
            return response;
        }
        if response
            .content_length()
            .is_some_and(|len| len > affinity::LEARN_LIMIT as u64)
        {
            return response;
        }
        let Some(upstream) = self.upstreams.get(choice.upstream) else {
            return response;
        };
        let route = affinity::Route {
            upstream: upstream.config.name.clone(),
            key: match caller {
                Caller::Passthrough(_) => None,
                _ => choice.key.and_then(|k| upstream.masked_key(k)),
            },
        };
        let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
        let learner = Learner::new(body, self.affinity.clone(), route, ttl, sse);
        reqwest::Response::from(http::Response::from_parts(
            parts,
            reqwest::Body::wrap(learner),
        ))
    }
}

/// Each model's fallbacks in the order they are tried: its own list, each listed model
/// followed by its own fallbacks, every model once. Validation refuses loops; a model
/// met again is skipped all the same.
fn flatten_fallbacks(
    fallbacks: &std::collections::HashMap<String, Vec<String>>,
) -> std::collections::HashMap<String, Vec<String>> {
    fn visit(
        fallbacks: &std::collections::HashMap<String, Vec<String>>,
        model: &str,
        out: &mut Vec<String>,
        start: &str,
    ) {
        for next in fallbacks.get(model).into_iter().flatten() {
            if next != start && !out.contains(next) {
                out.push(next.clone());
                visit(fallbacks, next, out, start);
            }
        }
    }
    fallbacks
        .keys()
        .map(|model| {
            let mut out = Vec::new();
            visit(fallbacks, model, &mut out, model);
            (model.clone(), out)
        })
        .collect()
}

pub fn model_not_found(model: &str) -> ApiError {
    ApiError::not_found(
        "model_not_found",
        format!("The model `{model}` does not exist or you do not have access to it."),
    )
}

/// The 429 for a gateway key (or its team: `holder` says which, "API key `alice`") at a
/// rate limit or, with `budget`, out of budget; `what` names the limit ("60 requests per
/// minute", "the day budget"). Local and shared limits say it alike.
fn key_refused(
    holder: &str,
    what: &dyn std::fmt::Display,
    retry_after: u64,
    budget: bool,
) -> ApiError {
    let (code, message) = if budget {
        ("budget_exceeded", format!("{holder} used up {what}"))
    } else {
        (
            "rate_limit_exceeded",
            format!("{holder} reached its limit of {what}"),
        )
    };
    let mut error = ApiError::new(
        http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        code,
        message,
    );
    error.retry_after = Some(retry_after);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_chains_follow_each_models_own_fallbacks_once() {
        let raw: std::collections::HashMap<String, Vec<String>> = [
            ("a", vec!["b", "c"]),
            ("b", vec!["d", "c"]),
            ("d", vec!["a"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        let flat = flatten_fallbacks(&raw);
        assert_eq!(
            flat["a"],
            ["b", "d", "c"],
            "b's own before c, a never again"
        );
        assert_eq!(flat["b"], ["d", "a", "c"]);
        assert_eq!(flat["d"], ["a", "b", "c"]);
    }
}
