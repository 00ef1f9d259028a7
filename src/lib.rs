//! sluice: a fast, single-binary gateway for LLM APIs.
//!
//! # Layout
//! The folders follow a request, and say what may depend on what:
//! - [`http`]: the listener, one request's dispatch, and what every answer shares: bodies,
//!   headers, CORS, the OpenAI-shaped errors, forms.
//! - [`pipeline`]: the stages of a forwarded request (authenticate, read, plan, admit,
//!   send, relay), `GET /v1/models`, and object affinity.
//! - [`protocol`]: what differs between the APIs clients and upstreams speak (OpenAI's
//!   today): body fields, paths, usage, the error shape.
//! - [`pure`]: decisions and transforms without sockets: routing choice, limit windows,
//!   body rewrites, SSE shaping, usage extraction.
//! - [`upstream`]: an upstream's HTTP client, key pool, token cache and health figures.
//! - [`cache`]: the response cache: request keys, the in-memory LRU or Redis, stream and
//!   answer conversions.
//! - [`accounting`]: the request log and its writer, usage settlement, limits shared
//!   through Redis.
//! - [`store`]: the log's SQLite and PostgreSQL stores.
//! - [`observe`]: `/metrics` and OTLP traces.
//! - [`admin`]: `/api/*`, `/v1/status`, the dashboard and its sessions.
//! - [`config`]: the YAML file, `SLUICE_…` overrides and validation into a [`config::Config`].
//! - [`gateway`]: the run-time state built from a config, swapped whole by a reload.
//! - [`mock`]: the mock OpenAI upstream used by tests, benchmarks and the quick start.
//!
//! ARCHITECTURE.md at the repository root follows one request through these modules.

#![deny(unsafe_code)]

pub mod accounting;
pub mod admin;
pub mod cache;
pub mod clock;
pub mod config;
pub mod gateway;
pub mod http;
pub mod mock;
pub mod observe;
pub mod pipeline;
pub mod protocol;
pub mod pure;
pub mod store;
pub mod sys;
pub mod upstream;
