//! Which headers cross the gateway. Hop-by-hop headers (RFC 9110 §7.6.1) belong to one
//! connection and never pass; credentials are replaced, not forwarded.

use http::{HeaderMap, HeaderName, header};

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
}

/// Credentials a client may send sluice, in any provider's style or sluice's own: none
/// of them is the upstream's business. Cookies belong to the gateway's site (the dashboard
/// session among them), never to a provider.
const CLIENT_CREDENTIALS: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-goog-api-key"),
    HeaderName::from_static("x-admin-key"),
];

/// Prepares a client's request headers for an upstream: no hop-by-hop headers, no `Host`
/// (the upstream's is set from its URL) and no client credential.
pub fn upstream_request_headers(mut headers: HeaderMap) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    for name in &CLIENT_CREDENTIALS {
        headers.remove(name);
    }
    headers
}

/// Whether a header's value is a credential, shown masked wherever sluice shows headers.
/// Judged by the name's class, so a provider's new key header is covered before anyone
/// lists it: anything naming a key, token, secret, password, signature, session, cookie
/// or authorisation.
pub fn is_credential_header(name: &str) -> bool {
    const MARKS: [&str; 10] = [
        "auth",
        "key",
        "token",
        "secret",
        "passw",
        "signature",
        "session",
        "cookie",
        "credential",
        "jwt",
    ];
    let name = name.to_ascii_lowercase();
    MARKS.iter().any(|mark| name.contains(mark))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_credentials_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::HOST, "gateway".parse().unwrap());
        headers.insert(header::AUTHORIZATION, "Bearer fk".parse().unwrap());
        headers.insert("api-key", "fk".parse().unwrap());
        headers.insert("x-goog-api-key", "fk".parse().unwrap());
        headers.insert("x-admin-key", "admin".parse().unwrap());
        headers.insert(
            header::COOKIE,
            "sluice_session=abc; theme=dark".parse().unwrap(),
        );
        headers.insert(header::PROXY_AUTHORIZATION, "Basic eA==".parse().unwrap());
        headers.insert("openai-organization", "org-1".parse().unwrap());
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let out = upstream_request_headers(headers);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(out.contains_key("openai-organization"));
        assert!(out.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn credential_headers_are_known_by_their_class() {
        for name in [
            "authorization",
            "Proxy-Authorization",
            "x-api-key",
            "api-key",
            "x-goog-api-key",
            "x-admin-key",
            "cookie",
            "set-cookie",
            "x-amz-security-token",
            "x-client-secret",
            "x-signature",
        ] {
            assert!(is_credential_header(name), "{name}");
        }
        for name in [
            "content-type",
            "openai-organization",
            "x-request-id",
            "accept",
        ] {
            assert!(!is_credential_header(name), "{name}");
        }
    }
}
