//! Model fallbacks (`routing.fallbacks`): when every upstream of a model failed in a way
//! another try could mend (connect, timeout, 429, 5xx, all at their limits), or the model
//! refused the request as too long for its context or filtered, the request is planned
//! again for the next model of its chain, with the body's `model` rewritten. Only before
//! a byte reached the client, and only for a body that was read (it is resent).
//!
//! The plan picks candidates by model and each try speaks its upstream's kind, so a
//! fallback to another provider's model is the same path as one within a provider.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::plan::{self, Plan};
use crate::pipeline::read::{BodyKind, Inbound};
use crate::pipeline::send::Failure;
use crate::pipeline::try_loop::{self, Settled};

/// The largest error answer read to see whether it names a context or content refusal;
/// a larger one is relayed as it is.
const ERROR_PEEK_LIMIT: usize = 64 * 1024;

/// Error codes by which a model refuses a request another model may take.
const FALLBACK_CODES: [&str; 3] = [
    "context_length_exceeded",
    "content_filter",
    "content_policy_violation",
];
/// What providers whose errors carry no such code say instead (lowercased): OpenAI's and
/// vLLM's "maximum context length", SGLang's "longer than the model's context length",
/// Anthropic's "prompt is too long", Gemini's token count over "the maximum number of
/// tokens", and servers that speak of a "context window".
const FALLBACK_MESSAGES: [&str; 5] = [
    "maximum context length",
    "longer than the model's context length",
    "prompt is too long",
    "exceeds the maximum number of tokens",
    "context window",
];

/// Plans the request and tries its upstreams, then, as long as the outcome gives way to
/// the next model of its chain, does so again for that model. Returns how the tries
/// settled and the model that settled them (the client-facing name).
pub async fn plan_and_try<'g>(
    x: &mut Exchange<'g>,
    inbound: &mut Inbound,
) -> Result<(Settled<'g>, Option<String>), ApiError> {
    let mut chain = Chain::of(x, inbound);
    // A model's outcome that gave way to the next, reported if that one cannot be tried.
    let mut last = None;
    loop {
        let tried = match plan::plan(x, inbound).await {
            Ok(plan) => {
                reprice(x, &plan);
                try_loop::send_until_settled(x, inbound, &plan).await
            }
            Err(error) => Err(error),
        };
        let settled = match tried {
            Ok(settled) => settled,
            // Nothing could be tried for this model (its upstreams at their limits).
            Err(error) => {
                if chain.takes_error(&error) && chain.next(x, inbound).is_some() {
                    continue;
                }
                return last.ok_or(error);
            }
        };
        let (settled, fall_back) = chain.judge(settled).await;
        let model = inbound.model.clone();
        if fall_back && chain.next(x, inbound).is_some() {
            last = Some((settled, model));
            continue;
        }
        return Ok((settled, model));
    }
}

/// What is left of a request's fallback chain, and what must be restored for each try.
struct Chain {
    /// The models still to try, in order.
    models: std::vec::IntoIter<String>,
    /// The request's headers as the client sent them, for the next model's tries.
    headers: Option<HeaderMap>,
}

impl Chain {
    /// The chain of the request's model; empty when it has none or its body cannot be
    /// resent (it streamed through, or is not JSON whose `model` can be rewritten).
    fn of(x: &Exchange<'_>, inbound: &Inbound) -> Self {
        let models = match (&inbound.model, inbound.kind, &inbound.buffered) {
            // A key never falls back to a model it may not use.
            (Some(model), BodyKind::Json, Some(_)) => x
                .gateway
                .fallbacks(model)
                .iter()
                .filter(|m| x.caller.may_use(m))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let headers = (!models.is_empty()).then(|| x.parts.headers.clone());
        Self {
            models: models.into_iter(),
            headers,
        }
    }

    /// Whether a plan or try loop that found nothing to try (`error`) should give way to
    /// the next model: every upstream of this one is at its own limits.
    fn takes_error(&self, error: &ApiError) -> bool {
        self.models.len() > 0
            && matches!(
                error.code,
                "upstream_rate_limited" | "no_upstream_available"
            )
    }

    /// Whether the tries' outcome gives way to the next model, reading an error answer's
    /// body (bounded) to tell a context or content refusal. Returns the outcome to relay
    /// (rebuilt when its body was read) and whether to fall back.
    async fn judge<'g>(&self, settled: Settled<'g>) -> (Settled<'g>, bool) {
        if self.models.len() == 0 {
            return (settled, false);
        }
        match settled {
            Settled::Failed {
                retryable: true, ..
            } => (settled, true),
            Settled::Answered {
                response,
                upstream,
                choice,
                in_flight,
            } if response.status() == http::StatusCode::BAD_REQUEST => {
                let (response, refused) = refusal(response).await;
                let settled = Settled::Answered {
                    response,
                    upstream,
                    choice,
                    in_flight,
                };
                (settled, refused)
            }
            Settled::Failed {
                failure: Failure::Response(response),
                upstream,
                choice,
                retryable: false,
            } if response.status() == http::StatusCode::BAD_REQUEST => {
                let (response, refused) = refusal(response).await;
                let settled = Settled::Failed {
                    failure: Failure::Response(response),
                    upstream,
                    choice,
                    retryable: false,
                };
                (settled, refused)
            }
            other => (other, false),
        }
    }

    /// Moves the request on to the next model: its body names it, the caller's headers
    /// are back for its tries, and the key's reservation is priced for it. `None` when the
    /// chain is spent.
    fn next(&mut self, x: &mut Exchange<'_>, inbound: &mut Inbound) -> Option<String> {
        let model = self.models.next()?;
        let body = inbound.buffered.as_ref()?;
        let rewritten = with_model(body, &model)?;
        tracing::debug!(model = %model, "falling back to the next model");
        inbound.buffered = Some(rewritten);
        inbound.model = Some(model.clone());
        if let Some(headers) = &self.headers {
            x.parts.headers = headers.clone();
        }
        Some(model)
    }
}

/// Prices the key's reservation for the model about to be tried, if it was admitted
/// for another.
fn reprice(x: &mut Exchange<'_>, plan: &Plan) {
    if let (Caller::Gateway(key), Some(ticket)) = (x.caller, x.ticket) {
        if ticket.reserve != plan.reserve {
            let ticket = x.gateway.reprice(key, ticket, plan.reserve);
            x.ticket = Some(ticket);
            if let Some(record) = x.record.as_mut() {
                record.ticket = Some(ticket);
            }
        }
    }
}

/// The JSON body with its `model` set to `model`; `None` if it is not a JSON object.
fn with_model(body: &Bytes, model: &str) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    object.insert("model".into(), Value::String(model.to_string()));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Reads a 400 answer (up to [`ERROR_PEEK_LIMIT`]) and says whether it refuses the
/// request for its length or content; the answer is rebuilt from what was read.
async fn refusal(response: reqwest::Response) -> (reqwest::Response, bool) {
    if response
        .content_length()
        .is_some_and(|len| len > ERROR_PEEK_LIMIT as u64)
    {
        return (response, false);
    }
    let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
    let limited = http_body_util::Limited::new(body, ERROR_PEEK_LIMIT);
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let refused = refusal_code(&bytes);
    let rebuilt = http::Response::from_parts(parts, reqwest::Body::from(bytes));
    (reqwest::Response::from(rebuilt), refused)
}

/// Whether an error body's code (or type) is one another model may not share.
fn refusal_code(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let error = value.get("error").unwrap_or(&value);
    let coded = ["code", "type", "status"].iter().any(|field| {
        error
            .get(field)
            .and_then(Value::as_str)
            .is_some_and(|code| FALLBACK_CODES.contains(&code))
    });
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    coded || FALLBACK_MESSAGES.iter().any(|m| message.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_by_their_code() {
        let context = br#"{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert!(refusal_code(context));
        let filtered = br#"{"error":{"message":"filtered","type":"invalid_request_error","code":"content_filter"}}"#;
        assert!(refusal_code(filtered));
        let other =
            br#"{"error":{"message":"bad","type":"invalid_request_error","code":"invalid_value"}}"#;
        assert!(!refusal_code(other));
        assert!(!refusal_code(b"not json"));
        let anthropic = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        assert!(refusal_code(anthropic));
    }

    #[test]
    fn the_body_names_the_next_model_and_keeps_the_rest() {
        let body = Bytes::from_static(br#"{"model":"a","messages":[],"temperature":0}"#);
        let out = with_model(&body, "b").unwrap();
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["model"], "b");
        assert_eq!(value["temperature"], 0);
        assert!(with_model(&Bytes::from_static(b"[1]"), "b").is_none());
    }
}
