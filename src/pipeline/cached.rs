//! The cache stage, between the read and the plan: a request the response cache takes is
//! looked up (unless `Cache-Control: no-cache`) and, on a hit, answered from the cache
//! without a plan or an upstream: its key is admitted for the request (rpm, rpd) with
//! nothing reserved, and the log records the hit. On a miss the relayed answer is captured
//! as it streams ([`Fill`], unless `no-store`) and stored when it ends whole. Every answer
//! says what the cache did in `x-sluice-cache`.

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use crate::accounting::records::CacheNote;
use crate::cache::{CHAT, Entry, Fill, Request, ResponseCache, convert};
use crate::config::CacheScope;
use crate::http::body::{Body, BoxError, full};
use crate::http::error::ApiError;
use crate::pipeline::access::Caller;
use crate::pipeline::exchange::Exchange;
use crate::pipeline::read::{BodyKind, Inbound};
use crate::pipeline::relay::MODEL_HEADER;
use crate::pure::limits::Reserve;

/// The response header saying what the cache did: `hit`, `miss` or `skip`.
pub const CACHE_HEADER: &str = "x-sluice-cache";

/// What the lookup decided.
pub enum Looked {
    /// Answered from the cache.
    Hit(Response<Body>),
    /// Goes upstream; its answer is captured for the cache when `Some`.
    Pass(Option<Fill>),
}

/// Looks the request up in the response cache, if the cache takes it.
pub async fn look_up(x: &mut Exchange<'_>, inbound: &Inbound) -> Result<Looked, ApiError> {
    let Some(cache) = x.gateway.cache.clone() else {
        return Ok(Looked::Pass(None));
    };
    let (no_cache, no_store) = cache_control(&x.parts.headers);
    let request = match (&inbound.buffered, inbound.kind) {
        (Some(body), BodyKind::Json) if x.parts.method == Method::POST => {
            scope(&cache, x.caller).and_then(|scope| cache.request(&scope, x.path, body))
        }
        _ => None,
    };
    let Some(mut request) = request else {
        note(x, CacheNote::Skip);
        return Ok(Looked::Pass(None));
    };
    // The usage chunk sluice asked for on the client's behalf is not the client's.
    request.include_usage &= !inbound.strip_usage;
    let fill = (!no_store).then(|| Fill::new(cache.clone(), &request));
    if no_cache {
        note(x, CacheNote::Skip);
        return Ok(Looked::Pass(fill));
    }
    let answer = match cache.get(&request.key).await {
        Some(entry) => replay(&entry, &request, x.path).map(|answer| (entry, answer)),
        None => None,
    };
    let Some((entry, answer)) = answer else {
        note(x, CacheNote::Miss);
        return Ok(Looked::Pass(fill));
    };
    note(x, CacheNote::Hit);
    if let Caller::Gateway(key) = x.caller {
        // A hit counts as a request of the key; its tokens are settled (or not) by the log.
        let (ticket, _) = x
            .gateway
            .admit(Some((key.as_ref(), Reserve::default())), None)
            .await?;
        x.ticket = ticket;
        if let Some(record) = x.record.as_mut() {
            record.admitted(key, ticket);
        }
    }
    record_hit(x, &entry, &answer, request.stream);
    Ok(Looked::Hit(respond(&entry, answer)))
}

/// Says in the exchange and its record what the cache did.
fn note(x: &mut Exchange<'_>, note: CacheNote) {
    x.cache = Some(note);
    if let Some(record) = x.record.as_mut() {
        record.cache = Some(note);
    }
}

/// `Cache-Control`'s `no-cache` (do not look up) and `no-store` (do not store).
fn cache_control(headers: &HeaderMap) -> (bool, bool) {
    let mut no_cache = false;
    let mut no_store = false;
    for value in headers.get_all(header::CACHE_CONTROL) {
        for directive in value.to_str().unwrap_or_default().split(',') {
            match directive.trim().to_ascii_lowercase().as_str() {
                "no-cache" => no_cache = true,
                "no-store" => no_store = true,
                _ => {}
            }
        }
    }
    (no_cache, no_store)
}

/// Whose answers a caller shares: its key's, its key's team's (a key without a team is its
/// own), or everyone's. `None`: not cached.
fn scope(cache: &ResponseCache, caller: &Caller) -> Option<String> {
    match (cache.config.scope, caller) {
        (CacheScope::Global, _) => Some("global".into()),
        (CacheScope::Team, Caller::Gateway(key)) => Some(match &key.team {
            Some(team) => format!("team:{}", team.name),
            None => format!("key:{}", key.name),
        }),
        (CacheScope::Key, Caller::Gateway(key)) => Some(format!("key:{}", key.name)),
        // The caller's own credential is its scope; it only enters the key's hash.
        (CacheScope::Key | CacheScope::Team, Caller::Passthrough(value)) => value
            .to_str()
            .ok()
            .map(|credential| format!("passthrough:{credential}")),
        (CacheScope::Key | CacheScope::Team, Caller::Open) => Some("open".into()),
    }
}

/// A cached answer in the form asked for.
enum Answer {
    Json(Bytes),
    Events(Vec<Bytes>),
}

/// The entry in the form the request asks for: as stored, or (chat completions only)
/// converted between a stream and one answer. `None` when it cannot be.
fn replay(entry: &Entry, request: &Request, path: &str) -> Option<Answer> {
    match (entry.stream, request.stream) {
        (true, true) => {
            let mut events = convert::events(&entry.body);
            if !request.include_usage {
                events.retain(|e| !convert::is_usage_chunk(e));
            }
            Some(Answer::Events(events))
        }
        (false, false) => Some(Answer::Json(entry.body.clone())),
        (true, false) if path == CHAT => convert::stream_to_json(&entry.body).map(Answer::Json),
        (false, true) if path == CHAT => {
            convert::json_to_stream(&entry.body, request.include_usage).map(Answer::Events)
        }
        _ => None,
    }
}

/// The hit's answer: a JSON body, or a stream sending each stored event as one frame.
fn respond(entry: &Entry, answer: Answer) -> Response<Body> {
    let (body, content_type) = match answer {
        Answer::Json(bytes) => {
            let content_type = if entry.stream {
                HeaderValue::from_static("application/json")
            } else {
                HeaderValue::from_str(&entry.content_type)
                    .unwrap_or(HeaderValue::from_static("application/json"))
            };
            (full(bytes), content_type)
        }
        Answer::Events(events) => {
            let frames = events
                .into_iter()
                .map(|event| Ok::<_, BoxError>(Frame::data(event)));
            let body = StreamBody::new(stream::iter(frames)).boxed_unsync();
            let content_type = if entry.stream {
                HeaderValue::from_str(&entry.content_type)
                    .unwrap_or(HeaderValue::from_static("text/event-stream"))
            } else {
                HeaderValue::from_static("text/event-stream; charset=utf-8")
            };
            (body, content_type)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Some(model) = entry
        .model
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        headers.insert(MODEL_HEADER, model);
    }
    response
}

/// Logs the hit: its answer (for the usage it saved), no upstream, no try.
fn record_hit(x: &mut Exchange<'_>, entry: &Entry, answer: &Answer, stream: bool) {
    let (Some(mut record), Some(recorder)) = (x.record.take(), x.gateway.recorder.as_ref()) else {
        return;
    };
    let limit = recorder.sink.body_limit;
    record.status = 200;
    record.stream = stream;
    record.first_byte = Some(record.started.elapsed());
    record.latency = record.first_byte;
    if entry.model != record.model {
        record.served_model.clone_from(&entry.model);
    }
    match answer {
        Answer::Json(bytes) => {
            record.response_content_type = Some("application/json".into());
            record.response_body.push(bytes, limit);
        }
        Answer::Events(events) => {
            record.response_content_type = Some("text/event-stream".into());
            for event in events {
                record.response_body.push(event, limit);
            }
        }
    }
    recorder.submit(*record);
}

/// Marks an answer with what the cache did.
pub fn mark(response: &mut Response<Body>, note: Option<CacheNote>) {
    if let Some(note) = note {
        response
            .headers_mut()
            .insert(CACHE_HEADER, HeaderValue::from_static(note.name()));
    }
}

/// The fill for an answer about to be relayed: only a success is stored.
pub fn fill_for(fill: Option<Fill>, model: Option<&str>) -> Option<Fill> {
    fill.map(|mut fill| {
        fill.model = model.map(str::to_string);
        fill
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_directives_are_read_in_any_case_and_list() {
        let mut headers = HeaderMap::new();
        assert_eq!(cache_control(&headers), (false, false));
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert_eq!(cache_control(&headers), (true, false));
        headers.append(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert_eq!(cache_control(&headers), (true, true));
    }
}
