//! The gateway's run-time state, built once from a [`Config`]: the access guard, the
//! upstream runtimes and the router.

use std::sync::Arc;

use anyhow::Context;

use crate::access::{Caller, Guard};
use crate::config::Config;
use crate::error::ApiError;
use crate::limits::Limiter;
use crate::recorder::{Pending, Recorder};
use crate::routing::Router;
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
    /// Dashboard login sessions.
    pub sessions: Arc<crate::dashboard::Sessions>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub shared_limits: Option<Arc<crate::shared::SharedLimits>>,
    /// Whether JSON bodies must be read whatever the caller: the route depends on the model,
    /// a body is rewritten, a retry may resend it, or sessions read its `user`. With none
    /// of these, bodies stream straight through.
    read_json_always: bool,
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

/// What outlives a config reload: counters, the request log, metrics, dashboard sessions.
#[derive(Debug, Clone)]
pub struct Shared {
    pub limiter: Arc<Limiter>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub recorder: Option<Arc<Recorder>>,
    pub sessions: Arc<crate::dashboard::Sessions>,
    pub shared_limits: Option<Arc<crate::shared::SharedLimits>>,
}

impl Shared {
    /// Opens the store and starts the log writer, if storage is on.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        let limiter = Arc::new(Limiter::default());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let shared_limits = match &config.shared_state {
            Some(shared) => Some(Arc::new(
                crate::shared::SharedLimits::new(
                    &shared.redis,
                    &shared.prefix,
                    shared.timeout,
                    shared.fail_open,
                )
                .context("shared_state.redis")?,
            )),
            None => None,
        };
        let recorder = match &config.storage.url {
            Some(url) => {
                let store = crate::store::open(url).with_context(|| format!("storage {url}"))?;
                let pricing = config.pricing.clone();
                // The writer settles tokens into Redis too, through this runtime.
                let settle = shared_limits
                    .clone()
                    .zip(tokio::runtime::Handle::try_current().ok());
                Some(Arc::new(Recorder::start(
                    store,
                    &config.storage,
                    limiter.clone(),
                    metrics.clone(),
                    pricing,
                    settle,
                )?))
            }
            None => None,
        };
        Ok(Self {
            limiter,
            metrics,
            recorder,
            sessions: Default::default(),
            shared_limits,
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
        let routing = &config.routing;
        let routing_needs_model =
            upstreams.len() > 1 || upstreams.iter().any(|u| !u.config.models.any);
        let rewrites = upstreams.iter().any(|u| u.config.rewrites_bodies());
        let can_retry = routing.retries > 0
            && (upstreams.len() > 1
                || upstreams
                    .iter()
                    .any(|u| u.key_count() > 1 || u.token.is_some()));
        let router = Router::new(routing.strategy, upstreams.len(), routing.session_ttl);
        // The log wants each request's model and usage, so it reads JSON bodies too.
        let read_json_always = routing_needs_model
            || rewrites
            || can_retry
            || router.sessions_enabled()
            || shared.recorder.is_some();
        Ok(Self {
            guard: Guard::new(&config.access),
            config,
            upstreams,
            router,
            limiter: shared.limiter,
            recorder: shared.recorder,
            sessions: shared.sessions,
            shared_limits: shared.shared_limits,
            metrics: shared.metrics,
            read_json_always,
        })
    }

    /// The parts a reloaded gateway takes over.
    pub fn shared(&self) -> Shared {
        Shared {
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            recorder: self.recorder.clone(),
            sessions: self.sessions.clone(),
            shared_limits: self.shared_limits.clone(),
        }
    }

    /// A record for a request about to be handled, if the log is on.
    pub fn start_record(
        &self,
        client: std::net::IpAddr,
        parts: &http::request::Parts,
        path: &str,
    ) -> Option<Box<Pending>> {
        self.recorder.as_ref().map(|_| {
            Box::new(Pending::new(
                client,
                parts.method.clone(),
                path,
                parts.headers.clone(),
            ))
        })
    }

    /// Logs a request that ended with an error sluice answered itself.
    pub fn record_error(&self, pending: Option<Box<Pending>>, error: &ApiError) {
        if let (Some(recorder), Some(mut pending)) = (&self.recorder, pending) {
            pending.status = error.status.as_u16();
            pending.error = Some(error.message.clone());
            pending.latency = Some(pending.started.elapsed());
            recorder.submit(*pending);
        }
    }

    /// Admits one request of a gateway key: through Redis when limits are shared (falling
    /// back to this instance's limiter, or refusing, when Redis does not answer), else locally.
    pub async fn admit_key(&self, key: &crate::config::GatewayKey) -> Result<(), ApiError> {
        let now = crate::limits::unix_now();
        let limited = !key.limits.is_unlimited() || key.budget.is_some();
        let Some(shared) = self.shared_limits.as_ref().filter(|_| limited) else {
            return self.limiter.admit_key(key, now);
        };
        let scope = crate::limits::key_scope(&key.name);
        let local = || self.limiter.admit_key(key, now);
        match self
            .shared_verdict(shared, &scope, &key.limits, key.budget.as_ref(), local)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                // Counted in Redis; counted here too so this instance's status shows it.
                self.limiter.count_key(key, now);
                Ok(())
            }
            Err(mut error) => {
                if error.code == "shared_limit" {
                    error.code = if error.message.contains("budget") {
                        "budget_exceeded"
                    } else {
                        "rate_limit_exceeded"
                    };
                    error.message = format!("API key `{}` {}", key.name, error.message);
                }
                Err(error)
            }
        }
    }

    /// Takes one try at an upstream with limits: through Redis when shared, else locally.
    pub async fn take_upstream(&self, upstream: &crate::config::Upstream) -> bool {
        let now = crate::limits::unix_now();
        match &self.shared_limits {
            Some(shared) if !upstream.limits.is_unlimited() => {
                let scope = crate::limits::upstream_scope(&upstream.name);
                self.shared_verdict(shared, &scope, &upstream.limits, None, || {
                    if self.limiter.take_upstream(upstream, now) {
                        Ok(())
                    } else {
                        Err(ApiError::internal("at its limit"))
                    }
                })
                .await
                .is_ok()
            }
            _ => self.limiter.take_upstream(upstream, now),
        }
    }

    /// Asks Redis; on no answer, `local` decides (fail-open) or the request is refused.
    /// `Ok(true)` when `local` counted the request, `Ok(false)` when Redis did.
    async fn shared_verdict(
        &self,
        shared: &crate::shared::SharedLimits,
        scope: &str,
        limits: &crate::config::Limits,
        budget: Option<&crate::config::Budget>,
        local: impl FnOnce() -> Result<(), ApiError>,
    ) -> Result<bool, ApiError> {
        match shared.admit(scope, limits, budget).await {
            Ok(crate::shared::Verdict::Admit) => Ok(false),
            Ok(crate::shared::Verdict::Refuse { what, retry_after }) => {
                Err(crate::limits::limited(
                    "shared_limit",
                    format!("reached its limit of {what}"),
                    retry_after,
                ))
            }
            Err(error) if shared.fail_open => {
                tracing::warn!("shared limits unavailable ({error:#}); using this instance's own");
                local().map(|()| true)
            }
            Err(error) => {
                tracing::warn!(
                    "shared limits unavailable ({error:#}); refusing (on_error: closed)"
                );
                Err(ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "shared_state_unavailable",
                    "the shared limit store does not answer",
                ))
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
        self.read_json_always || caller.restricts_models()
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

pub fn model_not_found(model: &str) -> ApiError {
    ApiError::not_found(
        "model_not_found",
        format!("The model `{model}` does not exist or you do not have access to it."),
    )
}
