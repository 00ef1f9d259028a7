//! The dashboard: plain HTML, CSS and a small script embedded in the binary at build time
//! (no CDN, no Node.js), uPlot vendored for charts, and the login sessions behind it.
//!
//! Logging in trades the admin key for a random session token in an `HttpOnly`,
//! `SameSite=Strict` cookie, so the key never sits in a URL or in the page's script.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::body::{Body, full};

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const UPLOT_JS: &str = include_str!("dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("dashboard/vendor/uPlot.min.css");

pub const COOKIE: &str = "sluice_session";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const SESSION_LIMIT: usize = 10_000;

/// The dashboard page. Served with 401 to a visitor who is not logged in: the page then
/// shows only its login form, and every data call answers 401 as well.
pub fn index(authorized: bool) -> Response<Body> {
    let mut response = asset_response("text/html; charset=utf-8", INDEX);
    if !authorized {
        *response.status_mut() = StatusCode::UNAUTHORIZED;
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A static asset under `/assets/`.
pub fn asset(name: &str) -> Option<Response<Body>> {
    let (content_type, body) = match name {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        "uPlot.iife.min.js" => ("text/javascript; charset=utf-8", UPLOT_JS),
        "uPlot.min.css" => ("text/css; charset=utf-8", UPLOT_CSS),
        _ => return None,
    };
    Some(asset_response(content_type, body))
}

fn asset_response(content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        ),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    response
}

/// Logged-in sessions: token → expiry.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// A new session token (128 random bits from the operating system).
    pub fn create(&self) -> Option<String> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).ok()?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().ok()?;
        let now = Instant::now();
        if live.len() >= SESSION_LIMIT {
            live.retain(|_, expires| *expires > now);
        }
        live.insert(token.clone(), now + SESSION_TTL);
        Some(token)
    }

    pub fn is_valid(&self, token: &str) -> bool {
        self.live.lock().is_ok_and(|live| {
            live.get(token)
                .is_some_and(|expires| *expires > Instant::now())
        })
    }

    pub fn end(&self, token: &str) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(token);
        }
    }
}

/// The session token a request's cookie carries.
pub fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for a new session, or to end one (`token` = None).
pub fn cookie(token: Option<&str>) -> HeaderValue {
    let value = match token {
        Some(token) => format!(
            "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION_TTL.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    };
    HeaderValue::from_str(&value)
        .unwrap_or_else(|_| HeaderValue::from_static("sluice_session=; Max-Age=0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_random_and_end() {
        let sessions = Sessions::default();
        let a = sessions.create().unwrap();
        let b = sessions.create().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(sessions.is_valid(&a));
        sessions.end(&a);
        assert!(!sessions.is_valid(&a));
        assert!(!sessions.is_valid("forged"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "theme=dark; sluice_session=abc123; x=1".parse().unwrap(),
        );
        assert_eq!(session_token(&headers), Some("abc123"));
        let set = cookie(Some("abc123"));
        let text = set.to_str().unwrap();
        assert!(text.contains("HttpOnly") && text.contains("SameSite=Strict"));
    }

    #[test]
    fn assets_are_embedded() {
        assert!(asset("app.js").is_some());
        assert!(asset("uPlot.iife.min.js").is_some());
        assert!(asset("../secret").is_none());
        assert_eq!(index(false).status(), StatusCode::UNAUTHORIZED);
    }
}
