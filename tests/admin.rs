//! The admin side under attack: key guessing, sessions across key changes, hostile query
//! parameters, and search totals. Clients are told apart by `X-Forwarded-For` from the
//! trusted loopback proxy, so one test plays several addresses.

mod common;

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::config::{EnvMap, load};
use sluice::gateway::{Current, Gateway};
use sluice::mock::MockServer;
use tokio::net::TcpListener;

const ADMIN: &str = "admin-secret-0001";

fn config(mock: &MockServer, admin_key: &str) -> String {
    format!(
        "server: {{trusted_proxies: [127.0.0.1]}}
access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-key-0001]}}
admin: {{key: {admin_key}}}
",
        mock.url()
    )
}

/// A GET on an admin route from `address` with `key` (as a bearer token).
async fn admin_get_as(
    gw_url: &str,
    address: &str,
    path: &str,
    key: Option<&str>,
) -> reqwest::Response {
    let mut request = client()
        .get(format!("{gw_url}{path}"))
        .header("x-forwarded-for", address);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.send().await.unwrap()
}

fn base(gw: &TestGateway) -> String {
    format!("http://{}", gw.addr)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn admin_key_guessing_is_throttled_per_address_on_every_admin_route() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ADMIN)).await;
    let url = base(&gw);
    // Five wrong guesses, spread over every admin route and both ways to send a key.
    for path in ["/api/requests", "/metrics", "/v1/status", "/api/stats"] {
        let response = admin_get_as(&url, "10.0.0.1", path, Some("guess-0001")).await;
        assert_error(response, 401, "invalid_admin_key").await;
    }
    let response = client()
        .get(gw.url("/api/session"))
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-admin-key", "guess-0002")
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "invalid_admin_key").await;
    // Now the address is locked out: refused without the key being tried, even the right one.
    for key in ["guess-0003", ADMIN] {
        for path in ["/api/requests", "/metrics", "/v1/status"] {
            let response = admin_get_as(&url, "10.0.0.1", path, Some(key)).await;
            let retry: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=900).contains(&retry), "{retry}");
            assert_error(response, 429, "admin_auth_locked").await;
        }
    }
    // Another address is not affected.
    let other = admin_get_as(&url, "10.0.0.2", "/api/requests", Some(ADMIN)).await;
    assert_eq!(other.status(), 200);
    let metrics = admin_get_as(&url, "10.0.0.2", "/metrics", Some(ADMIN)).await;
    let text = metrics.text().await.unwrap();
    assert_eq!(metric(&text, "sluice_admin_auth_failures_total"), 5);
    assert_eq!(metric(&text, "sluice_admin_lockouts_total"), 1);
    // The lockout ends after Retry-After; the right key then works and clears the count.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = admin_get_as(&url, "10.0.0.1", "/api/requests", Some(ADMIN)).await;
    assert_eq!(response.status(), 200);
    for _ in 0..4 {
        let response = admin_get_as(&url, "10.0.0.1", "/api/requests", Some("guess-0004")).await;
        assert_error(response, 401, "invalid_admin_key").await;
    }
    let response = admin_get_as(&url, "10.0.0.1", "/api/requests", Some(ADMIN)).await;
    assert_eq!(
        response.status(),
        200,
        "four failures after a success do not lock"
    );
}

#[tokio::test]
async fn a_gateway_key_on_v1_status_is_not_an_admin_failure() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ADMIN)).await;
    let url = base(&gw);
    for _ in 0..8 {
        let response = admin_get_as(&url, "10.0.0.3", "/v1/status", Some("fk-alice-0001")).await;
        assert_eq!(response.status(), 200);
    }
    let response = admin_get_as(&url, "10.0.0.3", "/api/requests", Some(ADMIN)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn parallel_logins_cannot_guess_past_the_throttle() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ADMIN)).await;
    let login = |key: String| {
        let url = gw.url("/api/login");
        async move {
            client()
                .post(url)
                .header("x-forwarded-for", "10.0.0.9")
                .header("content-type", "application/json")
                .body(json!({"key": key}).to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let statuses =
        futures_util::future::join_all((0..40).map(|i| login(format!("guess-{i:04}")))).await;
    let tried = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    // Five are compared; the fifth locks the address for a second, long enough for the
    // rest to be refused unchecked (a sixth only if a busy machine took over a second).
    assert!((5..=6).contains(&tried), "{statuses:?}");
    assert_eq!(tried + refused, 40, "{statuses:?}");
    assert_eq!(login(ADMIN.to_string()).await, 429);
}

/// A gateway served through a [`Current`], so the test can reload it as the binary does.
async fn reloadable(yaml: &str) -> (Arc<Current>, String) {
    let current = Arc::new(Current::new(Arc::new(
        Gateway::new(resolve(yaml)).expect("gateway builds"),
    )));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(sluice::http::server::serve_current(
        listener,
        current.clone(),
        sluice::http::server::Role::Gateway,
        pending(),
    ));
    (current, url)
}

fn resolve(yaml: &str) -> sluice::config::Config {
    let env = EnvMap::from_pairs(std::iter::empty::<(&str, &str)>());
    let document = load::parse_document(yaml).unwrap();
    load::resolve(&document, &env).unwrap()
}

fn reload(current: &Current, yaml: &str) {
    let running = current.load();
    let gateway = Gateway::with_shared(resolve(yaml), running.shared()).unwrap();
    current.store(Arc::new(gateway));
}

async fn login(url: &str, key: &str) -> String {
    let response = client()
        .post(format!("{url}/api/login"))
        .header("content-type", "application/json")
        .body(json!({"key": key}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_string()
}

async fn with_cookie(url: &str, cookie: &str) -> u16 {
    client()
        .get(format!("{url}/api/requests"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn changing_the_admin_key_ends_every_session() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let storage = format!(
        "storage: {{url: 'sqlite://{}'}}\n",
        dir.path().join("log.db").display()
    );
    let old = format!("{}{storage}", config(&mock, ADMIN));
    let (current, url) = reloadable(&old).await;
    let session = login(&url, ADMIN).await;
    assert_eq!(with_cookie(&url, &session).await, 200);
    // A reload that keeps the key keeps the session.
    reload(&current, &format!("{old}routing: {{retries: 1}}\n"));
    assert_eq!(with_cookie(&url, &session).await, 200);
    // A new key ends it.
    let new = format!("{}{storage}", config(&mock, "admin-secret-0002"));
    reload(&current, &new);
    assert_eq!(with_cookie(&url, &session).await, 401);
    let fresh = login(&url, "admin-secret-0002").await;
    assert_eq!(with_cookie(&url, &fresh).await, 200);
    // Going back to the old key does not bring the old session back.
    reload(&current, &old);
    assert_eq!(with_cookie(&url, &session).await, 401);
    assert_eq!(with_cookie(&url, &fresh).await, 401);
}

#[tokio::test]
async fn a_lockout_outlives_a_reload() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}storage: {{url: 'sqlite://{}'}}\n",
        config(&mock, ADMIN),
        dir.path().join("log.db").display()
    );
    let (current, url) = reloadable(&yaml).await;
    for _ in 0..5 {
        let response = admin_get_as(&url, "10.0.0.4", "/api/requests", Some("guess")).await;
        assert_eq!(response.status(), 401);
    }
    reload(&current, &format!("{yaml}routing: {{retries: 1}}\n"));
    let response = admin_get_as(&url, "10.0.0.4", "/api/requests", Some(ADMIN)).await;
    assert_error(response, 429, "admin_auth_locked").await;
}

/// Every query parameter of the admin API with hostile values: a 400 or a correct 200,
/// never a 500 (run on PostgreSQL too with SLUICE_TEST_STORAGE=postgres).
#[tokio::test]
async fn hostile_query_parameters_get_400_never_500() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ADMIN)).await;
    for i in 0..3 {
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer fk-alice-0001")
            .header("content-type", "application/json")
            .body(chat_body(&format!("gpt-4o-{i}"), false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    gw.gateway.recorder.as_ref().unwrap().flush().await;
    // Near the longest URI a client can send (the http crate stops at 64 KiB).
    let long = "a".repeat(60_000);
    let values = [
        "%00",
        "a%00b",
        "%01",
        "x%0Ay",
        "%7F",
        "9223372036854775807",
        "18446744073709551616",
        "-9223372036854775808",
        "-1",
        "0",
        "1e309",
        "NaN",
        "abc",
        "%FF%FE",
        "922337203685477580xx",
        "_",
        "1_",
        "9223372036854775807_%00",
        long.as_str(),
    ];
    let routes = [
        (
            "/api/requests",
            &[
                "search", "model", "key", "upstream", "user", "path", "status", "from", "to",
                "page", "per_page", "before",
            ][..],
        ),
        ("/api/stats", &["from", "to"][..]),
        (
            "/api/export",
            &[
                "format", "limit", "user", "search", "status", "from", "before",
            ][..],
        ),
    ];
    let mut bad = Vec::new();
    for (route, names) in routes {
        for name in names {
            for value in values {
                let response = client()
                    .get(format!("{}?{name}={value}", gw.url(route)))
                    .header("authorization", format!("Bearer {ADMIN}"))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = if route == "/api/export" && status == 200 {
                    response.text().await.unwrap();
                    Value::Null
                } else {
                    json(response).await
                };
                let shown = &value[..value.len().min(30)];
                match status {
                    200 => {
                        if route == "/api/requests" {
                            assert!(body["data"].is_array(), "{route}?{name}={shown}: {body}");
                        }
                    }
                    400 => {
                        assert!(body["error"]["code"].is_string(), "{body}");
                        assert!(body["error"]["message"].is_string(), "{body}");
                    }
                    _ => bad.push(format!("{route}?{name}={shown} -> {status}: {body}")),
                }
                // Control characters and absurd numbers are refused, not searched for.
                let refused = value.contains("%00")
                    || value.contains("%01")
                    || value.contains("%0A")
                    || value.contains("%7F")
                    || value.len() > 10_000
                    || (*name == "format" && !["jsonl", "csv"].contains(&value))
                    || (["page", "per_page", "limit"].contains(name)
                        && !["0", "-1"].contains(&value)
                        && value.parse::<u32>().is_err());
                if refused && status != 400 {
                    bad.push(format!("{route}?{name}={shown} -> {status}, not 400"));
                }
            }
        }
    }
    let response = client()
        .get(gw.url(&format!("/api/requests/{long}")))
        .header("authorization", format!("Bearer {ADMIN}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status != 400 && status != 404 {
        bad.push(format!("/api/requests/<100 KB> -> {status}"));
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[tokio::test]
async fn a_search_total_stays_right_or_is_absent_past_the_last_page() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ADMIN)).await;
    for i in 0..9 {
        let content = if i < 7 {
            format!("needle-{i}")
        } else {
            "hay".into()
        };
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]});
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer fk-alice-0001")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    gw.gateway.recorder.as_ref().unwrap().flush().await;
    let get = |query: String| {
        let url = gw.url(&format!("/api/requests?{query}"));
        async move {
            let response = client()
                .get(url)
                .header("authorization", format!("Bearer {ADMIN}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            json(response).await
        }
    };
    let check = |page: &Value, what: &str| {
        let rows = page["data"].as_array().unwrap().len();
        match page.get("total").and_then(Value::as_u64) {
            None => assert_eq!(page["total_exact"], false, "{what}: {page}"),
            Some(total) if page["total_exact"] == true => {
                assert_eq!(total, 7, "{what}: {page}")
            }
            // A lower bound: more match than `total`.
            Some(total) => assert!(total < 7 && total >= rows as u64, "{what}: {page}"),
        }
    };
    let mut seen = 0;
    for number in 1..=6 {
        let page = get(format!("search=needle&per_page=3&page={number}")).await;
        seen += page["data"].as_array().unwrap().len();
        check(&page, &format!("page {number}"));
    }
    assert_eq!(seen, 7);
    // Following cursors, as the dashboard does.
    let mut query = "search=needle&per_page=3".to_string();
    let mut seen = 0;
    for number in 1..=3 {
        let page = get(query.clone()).await;
        seen += page["data"].as_array().unwrap().len();
        check(&page, &format!("cursor page {number}"));
        let Some(cursor) = page["next_before"].as_str() else {
            break;
        };
        query = format!(
            "search=needle&per_page=3&page={}&before={cursor}",
            number + 1
        );
    }
    assert_eq!(seen, 7);
    // Without a search, the count is exact wherever the page stands.
    let past = get("per_page=3&page=9".into()).await;
    assert_eq!(past["total"], 9);
    assert_eq!(past["total_exact"], true);
}
