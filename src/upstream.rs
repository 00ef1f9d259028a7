//! One upstream at run time: its HTTP client (connection pool, connect timeout, outbound
//! proxy) and its key pool, used in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use http::HeaderValue;

use crate::config::{Secret, Upstream};

#[derive(Debug)]
pub struct UpstreamRuntime {
    pub config: Upstream,
    pub client: reqwest::Client,
    next_key: AtomicUsize,
    /// `Bearer <key>` for each key, built once so the hot path only clones a handle.
    auth_headers: Vec<HeaderValue>,
    /// The upstream's name as the `x-sluice-upstream` response header.
    pub name_header: HeaderValue,
    /// Whether `base_url` already ends in `/v1`, so `/v1/...` paths drop their own.
    base_has_version: bool,
}

impl UpstreamRuntime {
    pub fn new(config: Upstream) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            // A gateway relays redirects to the client instead of following them.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")));
        builder = match &config.proxy {
            Some(url) => builder.proxy(
                reqwest::Proxy::all(url.as_str())
                    .with_context(|| format!("upstream {}: bad proxy URL", config.name))?,
            ),
            // Only the configured proxy is used, never one picked up from the environment.
            None => builder.no_proxy(),
        };
        let client = builder
            .build()
            .with_context(|| format!("upstream {}: cannot build its HTTP client", config.name))?;
        let base_has_version = config.base_url.ends_with("/v1");
        let auth_headers = config
            .keys
            .iter()
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .with_context(|| {
                        format!(
                            "upstream {}: a key has characters not allowed in a header",
                            config.name
                        )
                    })?;
                value.set_sensitive(true);
                Ok(value)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name_header = HeaderValue::from_str(&config.name).with_context(|| {
            format!(
                "upstream {}: the name must be usable as a header value",
                config.name
            )
        })?;
        Ok(Self {
            config,
            client,
            next_key: AtomicUsize::new(0),
            auth_headers,
            name_header,
            base_has_version,
        })
    }

    /// The next key of the pool, round robin; `None` when the upstream needs no key.
    pub fn next_key(&self) -> Option<(&Secret, &HeaderValue)> {
        let keys = &self.config.keys;
        if keys.is_empty() {
            return None;
        }
        let index = self.next_key.fetch_add(1, Ordering::Relaxed) % keys.len();
        Some((keys.get(index)?, self.auth_headers.get(index)?))
    }

    /// The upstream URL for a gateway path (`/v1/...`) and optional query string.
    pub fn url(&self, path: &str, query: Option<&str>) -> String {
        let path = match path.strip_prefix("/v1") {
            Some(rest) if self.base_has_version && (rest.is_empty() || rest.starts_with('/')) => {
                rest
            }
            _ => path,
        };
        let mut url = String::with_capacity(
            self.config.base_url.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        url.push_str(&self.config.base_url);
        url.push_str(path);
        if let Some(query) = query {
            url.push('?');
            url.push_str(query);
        }
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelSet, Timeouts};

    fn upstream(base_url: &str, keys: &[&str]) -> UpstreamRuntime {
        UpstreamRuntime::new(Upstream {
            name: "u".into(),
            base_url: base_url.into(),
            keys: keys.iter().map(|k| Secret::new(*k)).collect(),
            models: ModelSet::any(),
            headers: Vec::new(),
            proxy: None,
            timeouts: Timeouts::default(),
        })
        .unwrap()
    }

    #[test]
    fn keys_are_used_in_turn() {
        let u = upstream("http://h", &["a", "b", "c"]);
        let used: Vec<&str> = (0..6).map(|_| u.next_key().unwrap().0.expose()).collect();
        assert_eq!(used, ["a", "b", "c", "a", "b", "c"]);
        assert_eq!(u.next_key().unwrap().1, "Bearer a");
        assert!(upstream("http://h", &[]).next_key().is_none());
    }

    #[test]
    fn urls_join_base_and_path_once() {
        assert_eq!(
            upstream("http://h", &[]).url("/v1/models", None),
            "http://h/v1/models"
        );
        assert_eq!(
            upstream("http://h/api", &[]).url("/v1/x", Some("a=1")),
            "http://h/api/v1/x?a=1"
        );
        assert_eq!(
            upstream("http://h/v1", &[]).url("/v1/chat/completions", None),
            "http://h/v1/chat/completions"
        );
        assert_eq!(
            upstream("http://h/v1", &[]).url("/v1beta/x", None),
            "http://h/v1/v1beta/x"
        );
    }
}
