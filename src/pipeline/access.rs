//! Who is calling: the client's address (believing `X-Forwarded-For` only from trusted
//! proxies), the IP allow and deny lists, and which credential a request carries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, header};
use ipnet::IpNet;

use crate::admin::registry::{Digest, Registry};
use crate::config::{Access, Config, GatewayKey};
use crate::http::error::ApiError;

/// The client's address. `X-Forwarded-For` is walked from the right, skipping trusted
/// proxies, so a client cannot forge its address by prepending entries.
pub fn client_ip(trusted: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if trusted.is_empty() || !Config::ip_in(trusted, peer) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for hop in text.rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip;
            if !Config::ip_in(trusted, ip) {
                return client;
            }
        }
    }
    client
}

/// The access policy compiled for fast lookups.
#[derive(Debug)]
pub struct Guard {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    passthrough: bool,
    /// Config keys by the SHA-256 of their secret, as runtime keys are: a presented key is
    /// hashed once and looked up in both, digests compared in constant time.
    keys: HashMap<Digest, Arc<GatewayKey>>,
    /// Keys managed at run time.
    registry: Arc<Registry>,
}

/// The credential a request was admitted with.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A gateway key: the upstream gets its own key.
    Gateway(Arc<GatewayKey>),
    /// The client's own key, sent upstream as is (`passthrough`).
    Passthrough(HeaderValue),
    /// No gateway keys are configured: the upstream's keys are used.
    Open,
}

impl Caller {
    /// The name recorded in logs; never the key itself.
    pub fn label(&self) -> &str {
        match self {
            Caller::Gateway(key) => &key.name,
            Caller::Passthrough(_) => "passthrough",
            Caller::Open => "open",
        }
    }

    pub fn may_use(&self, model: &str) -> bool {
        match self {
            Caller::Gateway(key) => key.models.contains(model),
            _ => true,
        }
    }

    pub fn restricts_models(&self) -> bool {
        matches!(self, Caller::Gateway(key) if !key.models.any)
    }

    /// Whether a decision about this caller depends on the request's model: its key may
    /// use some models only, or pays from a cost budget priced by model. Such a request
    /// whose model cannot be told is refused, never waved through.
    pub fn needs_known_model(&self) -> bool {
        matches!(self, Caller::Gateway(key) if !key.models.any || key.has_budget())
    }
}

impl Guard {
    pub fn new(access: &Access, registry: Arc<Registry>) -> Self {
        Self {
            allow: access.ip_allow.clone(),
            deny: access.ip_deny.clone(),
            passthrough: access.passthrough,
            keys: access
                .keys
                .iter()
                .map(|k| (Digest::of(k.key.expose()), Arc::new(k.clone())))
                .collect(),
            registry,
        }
    }

    /// The gateway key `presented` is, config or runtime (valid now).
    pub fn key(&self, presented: &str) -> Option<Arc<GatewayKey>> {
        let digest = Digest::of(presented);
        if let Some(key) = self.keys.get(&digest) {
            return Some(key.clone());
        }
        self.registry.lookup(&digest, crate::clock::unix_now_ms())
    }

    /// Whether `name` is a config key's.
    pub fn is_config_key(&self, name: &str) -> bool {
        self.keys.values().any(|k| k.name == name)
    }

    /// Deny wins over allow; an empty allow list admits everyone.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        let ip = ip.to_canonical();
        if Config::ip_in(&self.deny, ip)
            || (!self.allow.is_empty() && !Config::ip_in(&self.allow, ip))
        {
            return Err(ApiError::forbidden(
                "ip_not_allowed",
                format!("requests from {ip} are not allowed"),
            ));
        }
        Ok(())
    }

    /// No gateway keys at all, in the config or managed at run time (a revoked one counts:
    /// revoking the last key does not open the gateway).
    pub fn is_open(&self) -> bool {
        self.keys.is_empty() && !self.registry.has_keys()
    }

    /// Admits a request by the key it presents.
    ///
    /// - a gateway key: admitted as that key;
    /// - another key with `passthrough`: sent upstream as is;
    /// - no gateway keys configured: admitted, the upstream's keys are used;
    /// - otherwise: 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let presented = presented_key(headers);
        if let Some(key) = presented {
            if let Some(gateway_key) = self.key(key) {
                return Ok(Caller::Gateway(gateway_key));
            }
            if self.passthrough {
                let value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    ApiError::unauthorized("invalid_api_key", "the API key has invalid characters")
                })?;
                return Ok(Caller::Passthrough(value));
            }
        }
        if self.is_open() {
            return Ok(Caller::Open);
        }
        Err(match presented {
            Some(_) => ApiError::unauthorized("invalid_api_key", "Incorrect API key provided."),
            None => ApiError::unauthorized(
                "missing_api_key",
                "You didn't provide an API key. Send it in an Authorization header: Bearer YOUR_KEY.",
            ),
        })
    }
}

/// The key a client presents: `Authorization: Bearer …`, or the `api-key` / `x-api-key`
/// headers some clients (Azure-style, Anthropic-style) use.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let value = value.trim();
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value)
            .trim();
        if !token.is_empty() {
            return Some(token);
        }
    }
    ["api-key", "x-api-key"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .map(str::trim)
        .find(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelSet, Secret};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        crate::config::parse_net(text).unwrap()
    }

    fn xff(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let trusted = [net("10.0.0.0/8")];
        assert_eq!(
            client_ip(&trusted, ip("203.0.113.9"), &xff("1.2.3.4")),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(&[], ip("10.0.0.1"), &xff("1.2.3.4")),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn forwarded_for_is_walked_from_the_right_through_trusted_hops() {
        let trusted = [net("10.0.0.0/8")];
        // A client forged "6.6.6.6"; the real client is the rightmost untrusted entry.
        assert_eq!(
            client_ip(&trusted, ip("10.0.0.1"), &xff("6.6.6.6, 1.2.3.4, 10.0.0.2")),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_ip(&trusted, ip("10.0.0.1"), &xff("garbage")),
            ip("10.0.0.1")
        );
    }

    fn guard(keys: &[(&str, &str)], passthrough: bool, allow: &[&str], deny: &[&str]) -> Guard {
        let registry = Arc::new(Registry::default());
        Guard::new(
            &Access {
                ip_allow: allow.iter().map(|s| net(s)).collect(),
                ip_deny: deny.iter().map(|s| net(s)).collect(),
                passthrough,
                keys: keys
                    .iter()
                    .map(|(name, key)| GatewayKey {
                        name: name.to_string(),
                        key: Secret::new(*key),
                        models: ModelSet::any(),
                        limits: Default::default(),
                        budget: None,
                        team: None,
                    })
                    .collect(),
            },
            registry,
        )
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn ip_lists() {
        let g = guard(&[], false, &["10.0.0.0/8"], &["10.9.0.0/16"]);
        assert!(g.check_ip(ip("10.1.1.1")).is_ok());
        assert!(g.check_ip(ip("10.9.1.1")).is_err());
        assert!(g.check_ip(ip("192.168.1.1")).is_err());
        assert!(
            g.check_ip(ip("::ffff:10.1.1.1")).is_ok(),
            "v4-mapped addresses match v4 rules"
        );
        assert!(guard(&[], false, &[], &[]).check_ip(ip("8.8.8.8")).is_ok());
    }

    #[test]
    fn authentication_rules() {
        let g = guard(&[("alice", "fk-alice")], false, &[], &[]);
        assert!(
            matches!(g.authenticate(&bearer("fk-alice")), Ok(Caller::Gateway(k)) if k.name == "alice")
        );
        assert_eq!(
            g.authenticate(&bearer("sk-other")).unwrap_err().code,
            "invalid_api_key"
        );
        assert_eq!(
            g.authenticate(&HeaderMap::new()).unwrap_err().code,
            "missing_api_key"
        );

        let pass = guard(&[("alice", "fk-alice")], true, &[], &[]);
        assert!(
            matches!(pass.authenticate(&bearer("sk-own")), Ok(Caller::Passthrough(v)) if v == "Bearer sk-own")
        );
        assert!(pass.authenticate(&HeaderMap::new()).is_err());

        let open = guard(&[], false, &[], &[]);
        assert!(matches!(
            open.authenticate(&HeaderMap::new()),
            Ok(Caller::Open)
        ));
        assert!(matches!(
            open.authenticate(&bearer("whatever")),
            Ok(Caller::Open)
        ));
    }

    #[test]
    fn api_key_headers_are_accepted() {
        let g = guard(&[("alice", "fk-alice")], false, &[], &[]);
        let mut headers = HeaderMap::new();
        headers.insert("api-key", "fk-alice".parse().unwrap());
        assert!(g.authenticate(&headers).is_ok());
    }
}
