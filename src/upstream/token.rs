//! Short-lived bearer tokens from a token endpoint (seeds 000 and 002; OAuth2 client
//! credentials has the same shape): fetched on first use, cached, refreshed ahead of
//! expiry and once after a 401, with one refresh shared by every concurrent request.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde_json::Value;

use crate::config::{TokenBody, TokenSource};
use crate::http::error::ApiError;

const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Cached {
    header: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
    generation: u64,
}

#[derive(Debug)]
pub struct TokenCache {
    source: TokenSource,
    client: reqwest::Client,
    cached: RwLock<Option<Cached>>,
    /// Held while fetching, so concurrent requests wait for one refresh.
    refreshing: tokio::sync::Mutex<()>,
}

/// A token to send, and its generation (to invalidate exactly that one after a 401).
#[derive(Debug, Clone)]
pub struct Token {
    pub header: HeaderValue,
    pub generation: u64,
}

impl TokenCache {
    pub fn new(source: TokenSource, client: reqwest::Client) -> Self {
        Self {
            source,
            client,
            cached: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self, now: Instant) -> Option<Cached> {
        let cached = self.cached.read().ok()?.clone()?;
        (now < cached.refresh_at).then_some(cached)
    }

    /// A valid token, fetching one if the cache has none fresh.
    pub async fn get(&self) -> Result<Token, ApiError> {
        if let Some(cached) = self.fresh(Instant::now()) {
            return Ok(Token {
                header: cached.header,
                generation: cached.generation,
            });
        }
        let _single_flight = self.refreshing.lock().await;
        // Another request may have refreshed while this one waited.
        if let Some(cached) = self.fresh(Instant::now()) {
            return Ok(Token {
                header: cached.header,
                generation: cached.generation,
            });
        }
        match self.fetch().await {
            Ok((header, lifetime)) => {
                let now = Instant::now();
                let refresh_in = lifetime
                    .saturating_sub(self.source.refresh_before)
                    .max(lifetime / 2);
                let generation = self
                    .cached
                    .read()
                    .ok()
                    .and_then(|c| c.as_ref().map(|c| c.generation))
                    .unwrap_or(0)
                    + 1;
                let cached = Cached {
                    header: header.clone(),
                    refresh_at: now + refresh_in,
                    expires_at: now + lifetime,
                    generation,
                };
                if let Ok(mut slot) = self.cached.write() {
                    *slot = Some(cached);
                }
                Ok(Token { header, generation })
            }
            Err(error) => {
                // A token that is due for refresh but not yet expired still works.
                let still_valid = self
                    .cached
                    .read()
                    .ok()
                    .and_then(|c| c.clone())
                    .filter(|c| Instant::now() < c.expires_at);
                match still_valid {
                    Some(cached) => {
                        tracing::warn!(
                            "token refresh failed, using the current token until it expires: {}",
                            error.message
                        );
                        Ok(Token {
                            header: cached.header,
                            generation: cached.generation,
                        })
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// Forgets the token of `generation` (the upstream refused it), so the next
    /// [`get`](Self::get) fetches a new one. A newer token is kept.
    pub fn invalidate(&self, generation: u64) {
        if let Ok(mut slot) = self.cached.write() {
            if slot.as_ref().is_some_and(|c| c.generation == generation) {
                if let Some(cached) = slot.as_mut() {
                    cached.refresh_at = Instant::now();
                    cached.expires_at = Instant::now();
                }
            }
        }
    }

    async fn fetch(&self) -> Result<(HeaderValue, Duration), ApiError> {
        let source = &self.source;
        let mut request = self
            .client
            .request(source.method.clone(), &source.url)
            .timeout(FETCH_TIMEOUT);
        for (name, value) in &source.headers {
            request = request.header(name.clone(), value.clone());
        }
        request = match &source.body {
            TokenBody::None => request,
            TokenBody::Json(value) => request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(value.to_string()),
            TokenBody::Form(fields) => request.form(fields),
        };
        let failed =
            |why: String| ApiError::bad_gateway(format!("the token endpoint failed: {why}"));
        let response = request
            .send()
            .await
            .map_err(|e| failed(e.without_url().to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!("it answered {status}")));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| failed(e.without_url().to_string()))?;
        let answer: Value =
            serde_json::from_slice(&bytes).map_err(|_| failed("its answer is not JSON".into()))?;
        let token = lookup(&answer, &source.token_path)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                failed(format!(
                    "its answer has no string at `{}`",
                    source.token_path
                ))
            })?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| failed("the token is not a valid header".into()))?;
        header.set_sensitive(true);
        let lifetime = lifetime(&answer, source.expires_in_path.as_deref()).unwrap_or(source.ttl);
        tracing::info!(lifetime = %humantime::format_duration(lifetime), "fetched a token");
        Ok((header, lifetime))
    }
}

/// Follows a dotted path (`data.token`, `items.0.value`) into a JSON value.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|s| !s.is_empty())
        .try_fold(value, |node, segment| match node {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
            _ => None,
        })
}

/// The token's lifetime in seconds at `path` of the endpoint's answer (a number or a
/// numeric string), if it gives a usable one. A lifetime too large for a `Duration` (an
/// endpoint's `1e300`) would panic in `from_secs_f64`; it counts as none given, like zero,
/// a negative number, NaN or infinity.
fn lifetime(answer: &Value, path: Option<&str>) -> Option<Duration> {
    let value = lookup(answer, path?)?;
    let seconds = value
        .as_f64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))?;
    if seconds <= 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(seconds).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifetime_too_large_or_not_a_number_counts_as_none_given() {
        let answer = serde_json::json!({"a": 3600, "b": "90.5", "huge": 1e300, "huge_text": "1e300",
            "zero": 0, "negative": -5, "nan": "NaN", "inf": "inf", "word": "soon"});
        assert_eq!(
            lifetime(&answer, Some("a")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            lifetime(&answer, Some("b")),
            Some(Duration::from_millis(90_500))
        );
        for path in [
            "huge",
            "huge_text",
            "zero",
            "negative",
            "nan",
            "inf",
            "word",
            "missing",
        ] {
            assert_eq!(lifetime(&answer, Some(path)), None, "{path}");
        }
        assert_eq!(lifetime(&answer, None), None);
    }

    #[test]
    fn dotted_paths() {
        let v = serde_json::json!({"data": {"token": "t", "list": [{"x": 1}]}});
        assert_eq!(lookup(&v, "data.token").unwrap(), "t");
        assert_eq!(lookup(&v, "data.list.0.x").unwrap(), 1);
        assert!(lookup(&v, "data.missing").is_none());
    }
}
