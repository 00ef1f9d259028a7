//! What operators watch: the access log on stdout, Prometheus `/metrics` and OTLP traces,
//! all fed from finished log records, and alerts sent to webhooks.

pub mod access;
pub mod alerts;
pub mod metrics;
pub mod traces;
