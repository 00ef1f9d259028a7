//! The gateway's run-time state, built once from a [`Config`]: the access guard, the
//! upstream runtimes and the routing of a model name to an upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::access::Guard;
use crate::config::Config;
use crate::error::ApiError;
use crate::upstream::UpstreamRuntime;

#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub guard: Guard,
    pub upstreams: Vec<Arc<UpstreamRuntime>>,
    /// Whether picking an upstream depends on the request's model, so JSON bodies must be
    /// read. With one upstream that serves anything, bodies stream straight through.
    pub routing_needs_model: bool,
    next_upstream: AtomicUsize,
}

impl Gateway {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| UpstreamRuntime::new(u.clone()).map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let routing_needs_model =
            upstreams.len() > 1 || upstreams.iter().any(|u| !u.config.models.any);
        Ok(Self {
            guard: Guard::new(&config.access),
            config,
            upstreams,
            routing_needs_model,
            next_upstream: AtomicUsize::new(0),
        })
    }

    /// The upstream for a request: among those serving `model` (or, without a model, those
    /// serving anything, else all), taken in turn.
    pub fn route(&self, model: Option<&str>) -> Result<&Arc<UpstreamRuntime>, ApiError> {
        if let [only] = self.upstreams.as_slice() {
            return match model {
                Some(m) if !only.config.models.contains(m) => Err(model_not_found(m)),
                _ => Ok(only),
            };
        }
        let turn = self.next_upstream.fetch_add(1, Ordering::Relaxed);
        let pick = |serves: &dyn Fn(&UpstreamRuntime) -> bool| {
            let candidates: Vec<&Arc<UpstreamRuntime>> =
                self.upstreams.iter().filter(|u| serves(u)).collect();
            (!candidates.is_empty()).then(|| candidates[turn % candidates.len()])
        };
        match model {
            Some(m) => pick(&|u| u.config.models.contains(m)).ok_or_else(|| model_not_found(m)),
            None => pick(&|u| u.config.models.any)
                .or_else(|| pick(&|_| true))
                .ok_or_else(|| ApiError::internal("no upstream is configured")),
        }
    }
}

pub fn model_not_found(model: &str) -> ApiError {
    ApiError::not_found(
        "model_not_found",
        format!("The model `{model}` does not exist or you do not have access to it."),
    )
}
