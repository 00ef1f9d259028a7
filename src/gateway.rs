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
}

impl Shared {
    /// Opens the store and starts the log writer, if storage is on.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        let limiter = Arc::new(Limiter::default());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let recorder = match &config.storage.url {
            Some(url) => {
                let store = crate::store::open(url).with_context(|| format!("storage {url}"))?;
                let pricing = config.pricing.clone();
                Some(Arc::new(Recorder::start(
                    store,
                    &config.storage,
                    limiter.clone(),
                    metrics.clone(),
                    pricing,
                )?))
            }
            None => None,
        };
        Ok(Self {
            limiter,
            metrics,
            recorder,
            sessions: Default::default(),
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
