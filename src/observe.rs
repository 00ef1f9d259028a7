//! What operators watch: Prometheus `/metrics` and OTLP traces, both fed from finished
//! log records.

pub mod metrics;
pub mod traces;
