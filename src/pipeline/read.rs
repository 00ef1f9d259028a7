//! The read stage: what must be read of a request to route, authorise and price it, and
//! whether the caller may use the model it names.
//!
//! The body is read only when something must look inside it (the model decides the route,
//! a rewrite applies, a retry may resend it, the key is model-limited or budgeted);
//! otherwise it streams through under the body timeouts. Whether it is read never depends
//! on what the client declares: a body a feature needs is recognised by its content.

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::gateway::Gateway;
use crate::http::body::{BodyTimeout, BoxError, TimedBody};
use crate::http::error::ApiError;
use crate::http::multipart::{self, FormError};
use crate::pipeline::exchange::Exchange;
use crate::protocol::ClientProtocol;

/// The longest model name sluice accepts: real ones (fine-tunes included) are far shorter,
/// and every name becomes a log field, a search term and a routing key.
pub const MAX_MODEL_NAME: usize = 256;

/// What the read stage learned of a request: its body (held, or to stream), its model and
/// end user, and whether the usage chunk was asked for on the client's behalf.
pub struct Inbound {
    pub buffered: Option<Bytes>,
    /// What `buffered` was recognised as.
    pub kind: BodyKind,
    pub streamed: Option<reqwest::Body>,
    pub model: Option<String>,
    pub user: Option<String>,
    /// The usage chunk was asked for on the client's behalf, so it is hidden from it.
    pub strip_usage: bool,
    /// The client asked for its stream's usage itself.
    pub usage_asked: bool,
    /// What the log keeps of the body as the client sent it.
    logged: Option<Bytes>,
}

/// What a body read whole turned out to be, by its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// The protocol's JSON: it may be rewritten for an upstream.
    Json,
    /// A `multipart/form-data` form.
    Form,
    /// Streamed, empty, or neither: relayed as it is.
    Other,
}

/// Decides whether the body is read or streamed, and reads it: refused when its declared
/// length passes `max_body`; read (bounded) when a feature must look inside it, whatever
/// its method or content type; streamed through under the body timeouts otherwise.
pub async fn read_inbound(x: &mut Exchange<'_>, body: Incoming) -> Result<Inbound, ApiError> {
    let gateway = x.gateway;
    let server = &gateway.config.server;
    let limit = server.max_body;
    let headers = &x.parts.headers;
    let declared_length = content_length(headers);
    if declared_length.is_some_and(|len| len > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let body = TimedBody::new(body, server.body_idle_timeout, server.body_timeout);
    let has_body = declared_length.is_some_and(|len| len > 0)
        || headers.contains_key(header::TRANSFER_ENCODING);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let declared_json = content_type.is_some_and(is_json_type);
    let form = content_type.and_then(multipart::boundary);
    let must_read = has_body
        && match form {
            Some(_) => x.caller.needs_known_model() || gateway.routes_by_model(),
            // A client whose protocol an upstream may not speak is read to be translated.
            None => gateway.must_read_json(x.caller) || x.protocol != ClientProtocol::OpenAi,
        };
    let inbound = if must_read {
        let bytes = read_body(body, limit).await?;
        match form {
            Some(boundary) => form_inbound(bytes, boundary)?,
            None => json_inbound(x, bytes, declared_json)?,
        }
    } else {
        let streamed = has_body.then(|| {
            reqwest::Body::wrap(Limited::new(
                body,
                usize::try_from(limit).unwrap_or(usize::MAX),
            ))
        });
        streamed_inbound(x, streamed)
    };
    note_model(x, inbound)
}

/// Checks the model a request names and notes it in its log record.
fn note_model(x: &mut Exchange<'_>, mut inbound: Inbound) -> Result<Inbound, ApiError> {
    if let Some(model) = &inbound.model {
        check_model_name(model)?;
    }
    if let Some(record) = x.record.as_mut() {
        record.model = inbound.model.clone();
        record.user = inbound.user.clone();
        record.request_body = inbound.logged.take();
    }
    Ok(inbound)
}

/// A body that streams through: the model can only be in the path.
fn streamed_inbound(x: &Exchange<'_>, streamed: Option<reqwest::Body>) -> Inbound {
    let model = x
        .protocol
        .model_in_path(&x.parts.method, x.path)
        .map(str::to_string);
    Inbound {
        buffered: None,
        kind: BodyKind::Other,
        streamed,
        model,
        user: None,
        strip_usage: false,
        usage_asked: false,
        logged: None,
    }
}

/// A form: its `model` field is read where it decides something; a form that cannot be
/// read then has no model sluice can vouch for, and is refused.
fn form_inbound(bytes: Bytes, boundary: Result<&str, FormError>) -> Result<Inbound, ApiError> {
    let model = boundary
        .and_then(|b| multipart::field(&bytes, b, "model"))
        .map_err(|e| ApiError::bad_request("invalid_form", format!("cannot read the form: {e}")))?;
    Ok(Inbound {
        buffered: Some(bytes),
        kind: BodyKind::Form,
        streamed: None,
        model,
        user: None,
        strip_usage: false,
        usage_asked: false,
        logged: None,
    })
}

/// A body read whole: recognised as the protocol's JSON by its content (declared JSON that
/// is not is refused; anything else is relayed as it is, with no model), and, for a stream
/// whose tokens are counted, made to ask for the usage chunk.
fn json_inbound(
    x: &mut Exchange<'_>,
    bytes: Bytes,
    declared_json: bool,
) -> Result<Inbound, ApiError> {
    let facts = if bytes.is_empty() {
        None
    } else {
        match x.protocol.peek(&bytes) {
            Ok(facts) => Some(facts),
            Err(e) if declared_json => return Err(invalid_json(&e)),
            Err(_) => None,
        }
    };
    let json = facts.is_some();
    let model = facts
        .as_ref()
        .and_then(|f| f.model.as_deref())
        .map(str::to_string);
    let user = facts
        .as_ref()
        .and_then(|f| f.user.as_deref())
        .map(str::to_string);
    let logged = x
        .record
        .is_some()
        .then(|| Bytes::copy_from_slice(&bytes[..bytes.len().min(record_limit(x.gateway))]));
    let with_usage = facts
        .as_ref()
        .filter(|_| x.record.is_some())
        .and_then(|facts| x.protocol.with_usage_requested(x.path, &bytes, facts));
    let strip_usage = with_usage.is_some();
    let usage_asked = facts.as_ref().is_some_and(|f| f.usage_asked);
    Ok(Inbound {
        buffered: Some(with_usage.unwrap_or(bytes)),
        kind: if json {
            BodyKind::Json
        } else {
            BodyKind::Other
        },
        streamed: None,
        model,
        user,
        strip_usage,
        usage_asked,
        logged,
    })
}

/// The client's body is not the JSON it says it is.
pub fn invalid_json(error: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "invalid_json",
        format!("the request body is not valid JSON: {error}"),
    )
}

/// Refuses model names no provider uses: over [`MAX_MODEL_NAME`] bytes, or with control
/// characters (NUL breaks stores, line breaks forge log lines).
pub fn check_model_name(model: &str) -> Result<(), ApiError> {
    if model.len() > MAX_MODEL_NAME {
        return Err(ApiError::bad_request(
            "invalid_model",
            format!("the model name is longer than {MAX_MODEL_NAME} bytes"),
        ));
    }
    if model.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_model",
            "the model name contains control characters",
        ));
    }
    Ok(())
}

/// Decides whether the caller may make this request with this model. For a key limited
/// to some models or paying from a budget, a request whose model cannot be told (a body
/// that is neither JSON nor a form, or no model where the endpoint uses one) is refused:
/// sluice never guesses in the caller's favour.
pub fn authorise_model(x: &Exchange<'_>, inbound: &Inbound) -> Result<(), ApiError> {
    let caller = x.caller;
    let forbidden = |model: &str| {
        ApiError::forbidden(
            "model_not_allowed",
            format!("this API key may not use the model `{model}`"),
        )
    };
    if let Some(model) = &inbound.model {
        if !caller.may_use(model) {
            return Err(forbidden(model));
        }
    }
    if !caller.needs_known_model() {
        return Ok(());
    }
    // A model in the query string (`/v1/realtime?model=…`) is checked too.
    if let Some(query) = x.parts.uri.query() {
        for (name, value) in form_urlencoded_pairs(query) {
            if name == "model" && !caller.may_use(&value) {
                return Err(forbidden(&value));
            }
        }
    }
    let body = inbound.buffered.as_ref().filter(|b| !b.is_empty());
    match (&inbound.model, body) {
        (Some(_), _) | (None, None) => Ok(()),
        (None, Some(_)) if inbound.kind == BodyKind::Other => Err(ApiError::bad_request(
            "model_unknown",
            "this API key is limited to some models or a budget, and the model of this request \
             cannot be read: send a JSON body (or a form) with a `model` field",
        )),
        (None, Some(_)) if x.protocol.model_less(x.path) => Ok(()),
        (None, Some(_)) => Err(ApiError::bad_request(
            "model_required",
            "this API key is limited to some models or a budget: name the `model` in the request",
        )),
    }
}

/// Query pairs, percent-decoded.
fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

/// What the log keeps of each body.
fn record_limit(gateway: &Gateway) -> usize {
    gateway.recorder.as_ref().map_or(0, |r| r.sink.body_limit)
}

/// A message's declared length, if it declares a readable one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `application/json`, whatever its case and parameters.
pub fn is_json_type(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
}

/// Reads a whole request body, refusing more than `limit` bytes (and, for a
/// [`TimedBody`], one that is too slow).
pub async fn read_body<B>(body: B, limit: u64) -> Result<Bytes, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(error) if error.is::<BodyTimeout>() => Err(ApiError::body_timeout()),
        Err(_) => Err(ApiError::bad_request(
            "body_read_error",
            "the request body could not be read",
        )),
    }
}
