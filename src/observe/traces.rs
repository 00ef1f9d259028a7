//! Traces of requests for an OpenTelemetry collector (`traces.otlp_endpoint`).
//!
//! A request continues its caller's trace (W3C `traceparent`) or starts one; the upstream
//! gets a `traceparent` naming sluice's span, so a traced upstream (vLLM, say) nests under
//! it. Spans are built from the finished log record by the log writer, off the hot path:
//! one server span for the request and one client span per try at an upstream, with the
//! model, key name, upstream, tokens and cost as attributes. A task sends them in batches
//! as OTLP/HTTP JSON (`POST {endpoint}/v1/traces`); a full queue drops spans rather than
//! slowing requests. Traces therefore need the request log on (`storage`).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::accounting::records::{Attempt, TraceContext};
use crate::config::Traces;
use crate::store::LogRecord;

/// A span ID for a try, never zero.
fn random_span_id() -> u64 {
    fastrand::u64(1..)
}

fn text(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

fn int(key: &str, value: i64) -> Value {
    // OTLP/JSON writes 64-bit integers as strings.
    json!({"key": key, "value": {"intValue": value.to_string()}})
}

fn float(key: &str, value: f64) -> Value {
    json!({"key": key, "value": {"doubleValue": value}})
}

fn nanos(ms: f64) -> String {
    format!("{}", (ms * 1_000_000.0).round() as i64)
}

const SPAN_KIND_SERVER: u8 = 2;
const SPAN_KIND_CLIENT: u8 = 3;
const STATUS_UNSET: u8 = 0;
const STATUS_ERROR: u8 = 2;

/// The spans of one finished request: the request's, then one per try.
pub fn spans(record: &LogRecord, trace: &TraceContext, attempts: &[Attempt]) -> Vec<Value> {
    let trace_id = format!("{:032x}", trace.trace_id);
    let span_id = format!("{:016x}", trace.span_id);
    let start_ms = record.ts as f64;
    let mut attributes = vec![
        text("http.request.method", &record.method),
        text("url.path", &record.path),
        int("http.response.status_code", i64::from(record.status)),
        text("client.address", &record.client_ip),
        text("sluice.request_id", &record.id),
        text("sluice.key", &record.key_name),
        int("sluice.tries", i64::from(record.tries)),
    ];
    let optional_texts = [
        ("gen_ai.request.model", &record.model),
        ("gen_ai.response.model", &record.upstream_model),
        ("sluice.upstream", &record.upstream),
        ("error.message", &record.error),
    ];
    for (key, value) in optional_texts {
        if let Some(value) = value {
            attributes.push(text(key, value));
        }
    }
    let optional_ints = [
        ("gen_ai.usage.input_tokens", record.prompt_tokens),
        ("gen_ai.usage.output_tokens", record.completion_tokens),
    ];
    for (key, value) in optional_ints {
        if let Some(value) = value {
            attributes.push(int(key, i64::try_from(value).unwrap_or(i64::MAX)));
        }
    }
    if let Some(ttfb) = record.ttfb_ms {
        attributes.push(float("sluice.time_to_first_byte_ms", ttfb));
    }
    if let Some(cost) = record.cost {
        attributes.push(float("sluice.cost_usd", cost));
    }
    let failed = record.status >= 500 || (record.status == 0 && record.error.is_some());
    let mut request = json!({
        "traceId": trace_id,
        "spanId": span_id,
        "name": format!("{} {}", record.method, record.path),
        "kind": SPAN_KIND_SERVER,
        "startTimeUnixNano": nanos(start_ms),
        "endTimeUnixNano": nanos(start_ms + record.latency_ms),
        "attributes": attributes,
        "status": status(failed, record.error.as_deref()),
    });
    if let Some(parent) = trace.parent {
        request["parentSpanId"] = json!(format!("{parent:016x}"));
    }
    let mut spans = vec![request];
    for attempt in attempts {
        spans.push(try_span(&trace_id, &span_id, start_ms, attempt));
    }
    spans
}

/// The client span of one try, under the request's span `parent`.
fn try_span(trace_id: &str, parent: &str, start_ms: f64, attempt: &Attempt) -> Value {
    let begin = start_ms + attempt.offset.as_secs_f64() * 1000.0;
    let mut attributes = vec![text("sluice.upstream", &attempt.upstream)];
    if let Some(key) = &attempt.key {
        attributes.push(text("sluice.upstream_key", key));
    }
    if let Some(status) = attempt.status {
        attributes.push(int("http.response.status_code", i64::from(status)));
    }
    if let Some(error) = &attempt.error {
        attributes.push(text("error.message", error));
    }
    let failed = attempt.error.is_some() || attempt.status.is_some_and(|s| s >= 500);
    json!({
        "traceId": trace_id,
        "spanId": format!("{:016x}", random_span_id()),
        "parentSpanId": parent,
        "name": format!("upstream {}", attempt.upstream),
        "kind": SPAN_KIND_CLIENT,
        "startTimeUnixNano": nanos(begin),
        "endTimeUnixNano": nanos(begin + attempt.elapsed.as_secs_f64() * 1000.0),
        "attributes": attributes,
        "status": status(failed, attempt.error.as_deref()),
    })
}

fn status(failed: bool, message: Option<&str>) -> Value {
    if failed {
        json!({"code": STATUS_ERROR, "message": message.unwrap_or_default()})
    } else {
        json!({"code": STATUS_UNSET})
    }
}

enum Job {
    Spans(Vec<Value>),
    Flush(oneshot::Sender<()>),
}

/// Spans waiting to be sent; more are dropped.
const QUEUE: usize = 4096;
/// Spans per export request, and the longest a span waits for others to join it.
const BATCH: usize = 512;
const LINGER: Duration = Duration::from_millis(500);

/// Sends spans to the collector from a task of its own.
#[derive(Debug)]
pub struct Exporter {
    jobs: mpsc::Sender<Job>,
}

impl Exporter {
    /// Starts the export task on the current Tokio runtime.
    pub fn start(config: &Traces) -> anyhow::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("traces need the Tokio runtime"))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            headers.insert(name.clone(), value.clone());
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("{}/v1/traces", config.endpoint);
        let resource = json!({"attributes": [
            text("service.name", &config.service_name),
            text("service.version", env!("CARGO_PKG_VERSION")),
        ]});
        let (jobs, queued) = mpsc::channel(QUEUE);
        runtime.spawn(send(client, url, resource, queued));
        Ok(Arc::new(Self { jobs }))
    }

    /// Queues one request's spans; never blocks.
    pub fn export(&self, spans: Vec<Value>) {
        if self.jobs.try_send(Job::Spans(spans)).is_err() {
            tracing::debug!("trace queue full; spans dropped");
        }
    }

    /// Waits (a few seconds at most) until what is queued has been sent.
    pub async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.jobs.send(Job::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
        }
    }
}

async fn send(
    client: reqwest::Client,
    url: String,
    resource: Value,
    mut jobs: mpsc::Receiver<Job>,
) {
    let failure_log = crate::clock::Throttle::new(Duration::from_secs(10));
    while let Some(first) = jobs.recv().await {
        let mut spans = Vec::new();
        let mut flushes = Vec::new();
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Spans(more) => spans.extend(more),
                Job::Flush(done) => flushes.push(done),
            }
            if spans.len() >= BATCH || !flushes.is_empty() {
                break;
            }
            next = tokio::time::timeout_at(deadline, jobs.recv())
                .await
                .ok()
                .flatten();
        }
        if !spans.is_empty() {
            let body = json!({"resourceSpans": [{
                "resource": resource,
                "scopeSpans": [{"scope": {"name": "sluice", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
            }]});
            let outcome = client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let problem = match outcome {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("the collector answered {}", response.status())),
                Err(error) => Some(error.without_url().to_string()),
            };
            if let Some(problem) = problem {
                if failure_log.ready() {
                    tracing::warn!("cannot export traces: {problem}");
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn a_caller_trace_is_continued_and_a_bad_one_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let trace = TraceContext::from_headers(&headers);
        assert_eq!(trace.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(trace.parent, Some(0x00f067aa0ba902b7));
        let sent = trace.traceparent();
        let sent = sent.to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(
            !sent.contains("00f067aa0ba902b7"),
            "the upstream's parent is sluice's span"
        );

        for bad in [
            "",
            "00-0000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            headers.insert("traceparent", HeaderValue::from_static(bad));
            let fresh = TraceContext::from_headers(&headers);
            assert_eq!(fresh.parent, None, "{bad}");
            assert_ne!(fresh.trace_id, 0);
        }
    }
}
