//! sluice: a fast, single-binary gateway for OpenAI-compatible LLM APIs.
//!
//! # Layout
//! - [`config`]: the YAML file, `SLUICE_…` overrides and validation into a [`config::Config`].
//! - [`gateway`]: run-time state built from a config, and model → upstream routing.
//! - [`server`]: the listener and the dispatch of one request.
//! - [`access`]: client IP, allow/deny lists, gateway keys and passthrough.
//! - [`proxy`]: forwarding to an upstream and relaying its streamed answer.
//! - [`models`]: `GET /v1/models`.
//! - [`routing`]: strategies, health, cooldowns and sessions: which upstream and key.
//! - [`rewrite`], [`shape`]: request rewrites and response shaping (model aliases).
//! - [`multipart`]: the model field of a form body, for allow-lists and budgets.
//! - [`limits`], [`shared`]: rate limits and budgets over fixed UTC windows, locally or
//!   shared by several instances through Redis.
//! - [`recorder`], [`store`], [`usage`]: the request log off the hot path, its SQLite store,
//!   token usage and cost.
//! - [`admin`], [`dashboard`]: `/api/*`, `/v1/status`, and the embedded dashboard.
//! - [`metrics`]: `/metrics` for Prometheus.
//! - [`token`]: short-lived bearer tokens from a token endpoint.
//! - [`upstream`]: an upstream's HTTP client, credentials and health figures.
//! - [`mock`]: the mock OpenAI upstream used by tests, benchmarks and the quick start.
//!
//! ARCHITECTURE.md at the repository root follows one request through these modules.

#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub mod affinity;
pub mod body;
pub mod clock;
pub mod config;
pub mod cors;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod headers;
pub mod limits;
pub mod metrics;
pub mod mock;
pub mod models;
pub mod multipart;
pub mod proxy;
pub mod recorder;
pub mod rewrite;
pub mod routing;
pub mod server;
pub mod shape;
pub mod shared;
pub mod store;
pub mod sys;
pub mod token;
pub mod traces;
pub mod upstream;
pub mod usage;
