//! The dashboard: plain HTML, CSS and a small script embedded in the binary at build time
//! (no CDN, no Node.js), uPlot vendored for charts, and the login sessions behind it.
//!
//! Logging in trades the admin key for a random session token in an `HttpOnly`,
//! `SameSite=Strict` cookie, so the key never sits in a URL or in the page's script.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::config::Secret;
use crate::http::body::{Body, full};

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const MANAGE_JS: &str = include_str!("dashboard/manage.js");
const MANAGE_CSS: &str = include_str!("dashboard/manage.css");
const UPLOT_JS: &str = include_str!("dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("dashboard/vendor/uPlot.min.css");

pub const COOKIE: &str = "sluice_session";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const SESSION_LIMIT: usize = 10_000;

const FAVICON: &str = include_str!("dashboard/favicon.svg");

/// The dashboard page, at `/` for the admin and at `/login` for anyone: it holds no data
/// (every data call needs the session), and shows only its login form until there is one.
pub fn index() -> Response<Body> {
    let mut response = asset_response("text/html; charset=utf-8", INDEX);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /` without a session: to the login page. The target is relative (so a route
/// prefix in front of sluice is kept) and has no fragment (so the browser keeps the
/// deep link's).
pub fn to_login() -> Response<Body> {
    let mut response = Response::new(crate::http::body::empty());
    *response.status_mut() = StatusCode::FOUND;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("login"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `/favicon.ico`, which browsers ask for whatever the page links: the SVG icon.
pub fn favicon() -> Response<Body> {
    asset_response("image/svg+xml", FAVICON)
}

/// A static asset under `/assets/`.
pub fn asset(name: &str) -> Option<Response<Body>> {
    let (content_type, body) = match name {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        "manage.js" => ("text/javascript; charset=utf-8", MANAGE_JS),
        "manage.css" => ("text/css; charset=utf-8", MANAGE_CSS),
        "uPlot.iife.min.js" => ("text/javascript; charset=utf-8", UPLOT_JS),
        "uPlot.min.css" => ("text/css; charset=utf-8", UPLOT_CSS),
        "favicon.svg" => ("image/svg+xml", FAVICON),
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

/// Logged-in sessions: token → expiry and the admin key it was opened with.
///
/// A session is valid only under the admin key it was opened with, and binding a new key
/// (a reload that changes `admin.key`) ends every session, so changing the key locks out
/// whoever held the old one, and changing it back does not bring their sessions back.
#[derive(Debug, Default)]
pub struct Sessions {
    state: Mutex<SessionState>,
    /// Fingerprints admin keys: SipHash under keys random to this process, so the
    /// fingerprint says nothing of the key outside it.
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct SessionState {
    live: HashMap<String, Session>,
    /// The fingerprint of the admin key in force, once bound.
    key: Option<u64>,
}

#[derive(Debug, Clone)]
struct Session {
    expires: Instant,
    who: Opened,
}

/// What a session was opened with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Opened {
    /// The admin key (its fingerprint).
    Key(u64),
    /// An admin account, under the epoch its record had: a later epoch ends it.
    Account { name: String, epoch: u64 },
}

impl Sessions {
    fn fingerprint(&self, admin_key: &Secret) -> u64 {
        self.hasher.hash_one(admin_key.expose())
    }

    /// Makes `admin_key` the key in force; a different key from the one bound before ends
    /// every session.
    pub fn bind(&self, admin_key: Option<&Secret>) {
        let key = admin_key.map(|k| self.fingerprint(k));
        if let Ok(mut state) = self.state.lock() {
            if state.key != key {
                let before = state.live.len();
                // Accounts' sessions do not depend on the key.
                state
                    .live
                    .retain(|_, session| matches!(session.who, Opened::Account { .. }));
                if state.key.is_some() && before > state.live.len() {
                    tracing::info!(
                        ended = before - state.live.len(),
                        "The admin key changed; every session opened with it ends."
                    );
                }
                state.key = key;
            }
        }
    }

    /// A new session token (128 random bits from the operating system), opened with
    /// `admin_key`.
    pub fn create(&self, admin_key: &Secret) -> Option<String> {
        self.open(Opened::Key(self.fingerprint(admin_key)))
    }

    /// A new session for the admin account `name` at its record's `epoch`.
    pub fn create_for_account(&self, name: &str, epoch: u64) -> Option<String> {
        self.open(Opened::Account {
            name: name.to_string(),
            epoch,
        })
    }

    fn open(&self, who: Opened) -> Option<String> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).ok()?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut state = self.state.lock().ok()?;
        let now = Instant::now();
        if state.live.len() >= SESSION_LIMIT {
            state.live.retain(|_, session| session.expires > now);
        }
        state.live.insert(
            token.clone(),
            Session {
                expires: now + SESSION_TTL,
                who,
            },
        );
        Some(token)
    }

    /// The admin account and epoch a live session `token` was opened for, if it was.
    pub fn account(&self, token: &str) -> Option<(String, u64)> {
        let state = self.state.lock().ok()?;
        let session = state.live.get(token)?;
        match &session.who {
            Opened::Account { name, epoch } if session.expires > Instant::now() => {
                Some((name.clone(), *epoch))
            }
            _ => None,
        }
    }

    /// Ends every session of the account `name` on this instance.
    pub fn end_account(&self, name: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.live.retain(
                |_, session| !matches!(&session.who, Opened::Account { name: n, .. } if n == name),
            );
        }
    }

    /// Whether `token` is a live session opened with `admin_key`.
    pub fn is_valid(&self, token: &str, admin_key: &Secret) -> bool {
        let key = self.fingerprint(admin_key);
        self.state.lock().is_ok_and(|state| {
            state.key.is_none_or(|bound| bound == key)
                && state.live.get(token).is_some_and(|session| {
                    session.who == Opened::Key(key) && session.expires > Instant::now()
                })
        })
    }

    pub fn end(&self, token: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.live.remove(token);
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
        let key = Secret::new("admin-key-0001");
        let sessions = Sessions::default();
        sessions.bind(Some(&key));
        let a = sessions.create(&key).unwrap();
        let b = sessions.create(&key).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(sessions.is_valid(&a, &key));
        sessions.end(&a);
        assert!(!sessions.is_valid(&a, &key));
        assert!(!sessions.is_valid("forged", &key));
    }

    #[test]
    fn sessions_live_under_the_key_they_were_opened_with() {
        let (old, new) = (Secret::new("admin-key-0001"), Secret::new("admin-key-0002"));
        let sessions = Sessions::default();
        sessions.bind(Some(&old));
        let token = sessions.create(&old).unwrap();
        sessions.bind(Some(&old));
        assert!(
            sessions.is_valid(&token, &old),
            "the same key keeps sessions"
        );
        assert!(!sessions.is_valid(&token, &new));
        sessions.bind(Some(&new));
        sessions.bind(Some(&old));
        assert!(!sessions.is_valid(&token, &old), "a key change ended it");
    }

    #[test]
    fn account_sessions_outlive_an_admin_key_change_and_end_with_the_account() {
        let key = Secret::new("admin-key-0001");
        let sessions = Sessions::default();
        sessions.bind(Some(&key));
        let by_key = sessions.create(&key).unwrap();
        let by_account = sessions.create_for_account("olga", 3).unwrap();
        assert_eq!(sessions.account(&by_account), Some(("olga".into(), 3)));
        assert_eq!(sessions.account(&by_key), None);
        assert!(
            !sessions.is_valid(&by_account, &key),
            "not an admin-key session"
        );
        sessions.bind(Some(&Secret::new("admin-key-0002")));
        assert!(!sessions.is_valid(&by_key, &key));
        assert!(sessions.account(&by_account).is_some());
        sessions.end_account("olga");
        assert_eq!(sessions.account(&by_account), None);
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
        assert!(asset("favicon.svg").is_some());
        assert_eq!(index().status(), StatusCode::OK);
        let redirect = to_login();
        assert_eq!(redirect.status(), StatusCode::FOUND);
        assert_eq!(redirect.headers()[header::LOCATION], "login");
    }
}
