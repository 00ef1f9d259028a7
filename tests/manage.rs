//! Keys, teams and admin accounts managed at run time (issue 16): every route of
//! `/api/keys`, `/api/teams`, `/api/admins`, `/api/audit`, rotation grace, revocation,
//! expiry, team limits under concurrency, viewers, login throttles, and a change on one
//! instance enforced by another (PostgreSQL + Redis).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice::mock::MockServer;

const ADMIN: &str = "admin-secret-0016";

fn config(mock: &MockServer) -> String {
    format!(
        "server: {{trusted_proxies: [127.0.0.1]}}
access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-key-0001]}}
admin: {{key: {ADMIN}}}
",
        mock.url()
    )
}

/// An admin call with the admin key; answers status and JSON.
async fn call(gw: &TestGateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_as(gw, method, path, body, &format!("Bearer {ADMIN}")).await
}

/// An admin call with a credential: `Bearer …` or a `cookie` header (`sluice_session=…`).
async fn call_as(
    gw: &TestGateway,
    method: &str,
    path: &str,
    body: Option<Value>,
    credential: &str,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client().request(method, gw.url(path));
    request = if let Some(cookie) = credential.strip_prefix("cookie:") {
        request.header("cookie", cookie)
    } else {
        request.header("authorization", credential)
    };
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A chat completion with `key`; answers the status.
async fn chat(gw: &TestGateway, key: &str) -> u16 {
    chat_with(gw, key, "gpt-4o").await
}

async fn chat_with(gw: &TestGateway, key: &str, model: &str) -> u16 {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(chat_body(model, false))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn create_key(gw: &TestGateway, body: Value) -> (String, String) {
    let (status, key) = call(gw, "POST", "/api/keys", Some(body)).await;
    assert_eq!(status, 201, "{key}");
    (
        key["id"].as_str().unwrap().to_string(),
        key["key"].as_str().unwrap().to_string(),
    )
}

/// Logs an admin account in; answers its cookie (`sluice_session=…`).
async fn login(gw: &TestGateway, name: &str, password: &str, address: &str) -> (u16, String) {
    let response = client()
        .post(gw.url("/api/login"))
        .header("x-forwarded-for", address)
        .header("content-type", "application/json")
        .body(json!({"name": name, "password": password}).to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let cookie = response
        .headers()
        .get("set-cookie")
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string())
        .unwrap_or_default();
    (status, cookie)
}

#[tokio::test]
async fn a_key_lives_through_create_use_change_rotate_and_revoke() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let (id, secret) = create_key(
        &gw,
        json!({"name": "bob", "models": ["gpt-4o"], "rpm": 100, "metadata": {"owner": "ops"}}),
    )
    .await;
    assert!(
        secret.starts_with("sk-sl-") && secret.len() == 54,
        "{secret}"
    );
    assert_eq!(chat(&gw, &secret).await, 200);
    assert_eq!(
        chat_with(&gw, &secret, "gpt-4o-mini").await,
        403,
        "its models only"
    );

    // Listed and read with a prefix, never the secret; config keys listed read-only.
    let (status, list) = call(&gw, "GET", "/api/keys", None).await;
    assert_eq!(status, 200);
    assert!(!list.to_string().contains(&secret[10..]), "{list}");
    let keys = list["data"].as_array().unwrap();
    let alice = keys.iter().find(|k| k["name"] == "alice").unwrap();
    assert_eq!(alice["read_only"], true);
    let bob = keys.iter().find(|k| k["name"] == "bob").unwrap();
    assert_eq!(bob["prefix"], format!("{}…", &secret[..10]));
    assert_eq!(bob["usage"]["day"]["requests"], 1, "{bob}");
    let (status, one) = call(&gw, "GET", &format!("/api/keys/{id}"), None).await;
    assert_eq!(
        (status, one["metadata"]["owner"].as_str()),
        (200, Some("ops"))
    );
    let (status, _) = call(
        &gw,
        "PATCH",
        "/api/keys/config:alice",
        Some(json!({"rpm": 1})),
    )
    .await;
    assert_eq!(status, 403, "config keys are changed in the config file");

    // A change is in force at once.
    let (status, patched) = call(
        &gw,
        "PATCH",
        &format!("/api/keys/{id}"),
        Some(json!({"models": ["*"], "enabled": false})),
    )
    .await;
    assert_eq!((status, patched["state"].as_str()), (200, Some("disabled")));
    assert_eq!(chat(&gw, &secret).await, 401, "disabled");
    call(
        &gw,
        "PATCH",
        &format!("/api/keys/{id}"),
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(chat_with(&gw, &secret, "gpt-4o-mini").await, 200);

    // Rotation: the new secret works, the old one until its grace ends.
    let (status, rotated) = call(
        &gw,
        "POST",
        &format!("/api/keys/{id}/rotate"),
        Some(json!({"grace": "1s"})),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let new_secret = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    assert_eq!(chat(&gw, &new_secret).await, 200);
    assert_eq!(chat(&gw, &secret).await, 200, "within the grace");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat(&gw, &secret).await, 401, "after the grace");
    assert_eq!(chat(&gw, &new_secret).await, 200);

    // Revocation: refused from that moment.
    let (status, revoked) = call(&gw, "DELETE", &format!("/api/keys/{id}"), None).await;
    assert_eq!((status, revoked["state"].as_str()), (200, Some("revoked")));
    assert_eq!(chat(&gw, &new_secret).await, 401);
    let (status, _) = call(&gw, "POST", &format!("/api/keys/{id}/rotate"), None).await;
    assert_eq!(status, 409, "a revoked key stays revoked");

    // The audit log tells every change, who and from where, without a secret.
    let (status, audit) = call(&gw, "GET", "/api/audit", None).await;
    assert_eq!(status, 200);
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.revoke",
            "key.rotate",
            "key.update",
            "key.update",
            "key.create"
        ]
    );
    let first = &audit["data"][4];
    assert_eq!(first["actor"], "admin key");
    assert_eq!(first["address"], "127.0.0.1");
    assert_eq!(first["changes"]["rpm"], 100);
    let text = audit.to_string();
    assert!(!text.contains(&secret[10..]) && !text.contains(&new_secret[10..]));
    let (_, page) = call(&gw, "GET", "/api/audit?limit=2&before=3", None).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let cases = [
        (json!({"name": "x", "colour": "red"}), "`colour`"),
        (json!({"name": "x", "rpm": -5}), "`rpm`"),
        (json!({"name": "x", "tpm": "many"}), "`tpm`"),
        (
            json!({"name": "x", "budget": {"cost": 5, "period": "fortnight"}}),
            "`budget.period`",
        ),
        (
            json!({"name": "x", "budget": {"cost": -1}}),
            "`budget.cost`",
        ),
        (json!({"name": "x", "team": "nobody"}), "`team`"),
        (
            json!({"name": "x", "expires_at": "tomorrow"}),
            "`expires_at`",
        ),
        (json!({"name": "", "rpm": 1}), "`name`"),
        (json!({"rpm": 1}), "`name`"),
    ];
    for (body, field) in cases {
        let (status, answer) = call(&gw, "POST", "/api/keys", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    let (status, answer) = call(
        &gw,
        "POST",
        "/api/teams",
        Some(json!({"name": "t", "rpd": -2})),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_field"))
    );
    let (status, _) = call(&gw, "POST", "/api/keys", Some(json!({"name": "alice"}))).await;
    assert_eq!(status, 409, "a config key's name");
    create_key(&gw, json!({"name": "dup"})).await;
    let (status, _) = call(&gw, "POST", "/api/keys", Some(json!({"name": "dup"}))).await;
    assert_eq!(status, 409);
    let (status, _) = call(&gw, "GET", "/api/keys/key_nothing", None).await;
    assert_eq!(status, 404);
    let (status, answer) = call(
        &gw,
        "POST",
        "/api/keys",
        Some(json!(["not", "an", "object"])),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = call_as(&gw, "GET", "/api/keys", None, "Bearer wrong-admin-key").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let expires = sluice::clock::unix_now_ms() + 1500;
    let (id, secret) = create_key(&gw, json!({"name": "brief", "expires_at": expires})).await;
    assert_eq!(chat(&gw, &secret).await, 200);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(chat(&gw, &secret).await, 401);
    let (_, key) = call(&gw, "GET", &format!("/api/keys/{id}"), None).await;
    assert_eq!(key["state"], "expired");
    // Extending it brings it back.
    call(
        &gw,
        "PATCH",
        &format!("/api/keys/{id}"),
        Some(json!({"expires_at": null})),
    )
    .await;
    assert_eq!(chat(&gw, &secret).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_limit_is_exact_for_its_keys_under_200_concurrent_requests() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    let (status, team) = call(
        &gw,
        "POST",
        "/api/teams",
        Some(json!({"name": "research", "rpm": 100})),
    )
    .await;
    assert_eq!(status, 201, "{team}");
    let (_, a) = create_key(&gw, json!({"name": "r1", "team": "research"})).await;
    let (_, b) = create_key(&gw, json!({"name": "r2", "team": "research", "rpm": 1000})).await;
    start_of_a_minute().await;
    let requests = (0..200).map(|i| {
        let key = if i % 2 == 0 { a.clone() } else { b.clone() };
        let gw = &gw;
        async move { chat(gw, &key).await }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, limited), (100, 100), "{statuses:?}");
    let (_, team) = call(&gw, "GET", "/api/teams/research", None).await;
    assert_eq!(team["usage"]["minute"]["requests"], 100, "{team}");
    assert_eq!(team["keys"], json!(["r1", "r2"]));
    // A team with keys is not deleted; without, it is.
    let (status, _) = call(&gw, "DELETE", "/api/teams/research", None).await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn a_team_budget_stops_every_key_of_the_team() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    call(
        &gw,
        "POST",
        "/api/teams",
        Some(json!({"name": "small", "budget": {"tokens": 1, "period": "day"}})),
    )
    .await;
    let (_, a) = create_key(&gw, json!({"name": "s1", "team": "small"})).await;
    let (_, b) = create_key(&gw, json!({"name": "s2", "team": "small"})).await;
    assert_eq!(chat(&gw, &a).await, 200);
    flush(&gw).await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&b)
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    let body = assert_error(response, 429, "budget_exceeded").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("team `small`"),
        "{body}"
    );
    // Raising the team's budget lets them through again.
    let (status, _) = call(
        &gw,
        "PATCH",
        "/api/teams/small",
        Some(json!({"budget": null})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(chat(&gw, &b).await, 200);
}

#[tokio::test]
async fn viewers_read_but_change_nothing_and_see_no_bodies() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    for (name, role) in [("vera", "viewer"), ("adam", "admin")] {
        let (status, account) = call(
            &gw,
            "POST",
            "/api/admins",
            Some(json!({"name": name, "password": "correct horse battery", "role": role})),
        )
        .await;
        assert_eq!(status, 201, "{account}");
        assert!(!account.to_string().contains("horse"));
    }
    let (status, viewer) = login(&gw, "vera", "correct horse battery", "10.0.0.1").await;
    assert_eq!(status, 200);
    let viewer = format!("cookie:{viewer}");
    let (status, session) = call_as(&gw, "GET", "/api/session", None, &viewer).await;
    assert_eq!((status, session["role"].as_str()), (200, Some("viewer")));
    let (status, _) = call_as(&gw, "GET", "/api/keys", None, &viewer).await;
    assert_eq!(status, 200);
    let (status, refused) = call_as(
        &gw,
        "POST",
        "/api/keys",
        Some(json!({"name": "sneaky"})),
        &viewer,
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("admin_role_required"))
    );
    let (status, _) = call_as(&gw, "GET", "/api/admins", None, &viewer).await;
    assert_eq!(status, 403);

    // The log's bodies are hidden from a viewer (log_bodies_for_viewers: false).
    assert_eq!(chat(&gw, "fk-alice-0001").await, 200);
    flush(&gw).await;
    let (_, list) = call(&gw, "GET", "/api/requests", None).await;
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    let (_, full) = call(&gw, "GET", &format!("/api/requests/{id}"), None).await;
    assert!(full["request_body"].is_string());
    let (_, seen) = call_as(&gw, "GET", &format!("/api/requests/{id}"), None, &viewer).await;
    assert!(
        seen["request_body"].is_null() && seen["response_body"].is_null(),
        "{seen}"
    );

    // An admin account manages keys, and the audit log names it.
    let (_, adam) = login(&gw, "adam", "correct horse battery", "10.0.0.2").await;
    let adam = format!("cookie:{adam}");
    let (status, _) = call_as(
        &gw,
        "POST",
        "/api/keys",
        Some(json!({"name": "by-adam"})),
        &adam,
    )
    .await;
    assert_eq!(status, 201);
    let (_, audit) = call_as(&gw, "GET", "/api/audit", None, &viewer).await;
    assert_eq!(audit["data"][0]["actor"], "admin:adam");
    assert_eq!(audit["data"][0]["address"], "127.0.0.1");

    // Sessions are revocable: ending adam's sessions logs him out.
    let (status, _) = call(&gw, "POST", "/api/admins/adam/revoke-sessions", None).await;
    assert_eq!(status, 200);
    let (status, _) = call_as(&gw, "GET", "/api/keys", None, &adam).await;
    assert_eq!(status, 401);
    // Demoting vera ends hers too.
    call(
        &gw,
        "PATCH",
        "/api/admins/vera",
        Some(json!({"role": "admin"})),
    )
    .await;
    let (status, _) = call_as(&gw, "GET", "/api/keys", None, &viewer).await;
    assert_eq!(status, 401);
    let (status, _) = call(&gw, "DELETE", "/api/admins/vera", None).await;
    assert_eq!(status, 200);
    let (status, _) = login(&gw, "vera", "correct horse battery", "10.0.0.3").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn password_logins_are_throttled_per_account_and_per_address() {
    let mock = mock().await;
    let gw = gateway(&config(&mock)).await;
    call(
        &gw,
        "POST",
        "/api/admins",
        Some(json!({"name": "carol", "password": "right password", "role": "admin"})),
    )
    .await;
    // Five wrong passwords, each from another address: the account locks.
    for i in 0..5 {
        let (status, _) = login(&gw, "carol", "wrong password", &format!("10.1.0.{i}")).await;
        assert_eq!(status, 401);
    }
    let (status, _) = login(&gw, "carol", "right password", "10.1.0.99").await;
    assert_eq!(
        status, 429,
        "the account is locked out, whatever the address"
    );
    // One address guessing at many accounts locks that address.
    for i in 0..5 {
        let (status, _) = login(&gw, &format!("nobody{i}"), "guess guess", "10.2.0.1").await;
        assert_eq!(status, 401);
    }
    let (status, _) = login(&gw, "nobody9", "guess guess", "10.2.0.1").await;
    assert_eq!(status, 429);
}

/// Two instances on one PostgreSQL store and one Redis: a key created on one works on the
/// other, and a revocation on one is refused by the other within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_is_enforced_by_another_within_a_second() {
    let mock = mock().await;
    let url = fresh_postgres_database().await;
    let prefix = format!("sluice-test-{:016x}", fastrand::u64(..));
    let yaml = format!(
        "{}storage: {{url: '{url}'}}\nshared_state: {{redis: 'redis://127.0.0.1:6379', prefix: '{prefix}'}}\n",
        config(&mock)
    );
    let one = gateway(&yaml).await;
    let two = gateway(&yaml).await;
    let (id, secret) = create_key(&one, json!({"name": "roaming"})).await;
    assert!(
        eventually(Duration::from_secs(1), || {
            two.gateway.guard.key(&secret).is_some()
        })
        .await,
        "created on one, known to the other within a second"
    );
    assert_eq!(chat(&two, &secret).await, 200);
    let (status, _) = call(&one, "DELETE", &format!("/api/keys/{id}"), None).await;
    assert_eq!(status, 200);
    let revoked = tokio::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || {
            two.gateway.guard.key(&secret).is_none()
        })
        .await,
        "revoked on one, refused by the other within a second"
    );
    assert!(revoked.elapsed() < Duration::from_secs(1));
    assert_eq!(chat(&two, &secret).await, 401);
    // The team limits are shared through Redis: one script call counts key and team.
    call(
        &one,
        "POST",
        "/api/teams",
        Some(json!({"name": "shared", "rpm": 10})),
    )
    .await;
    let (_, a) = create_key(&one, json!({"name": "sh1", "team": "shared"})).await;
    assert!(
        eventually(Duration::from_secs(1), || two
            .gateway
            .guard
            .key(&a)
            .is_some())
        .await
    );
    start_of_a_minute().await;
    let requests = (0..30).map(|i| {
        let gw = if i % 2 == 0 { &one } else { &two };
        let a = a.clone();
        async move { chat(gw, &a).await }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
}

/// Without Redis, instances on one store still follow each other: each polls the store's
/// version of the managed set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_store_version_poll_carries_a_revocation_within_a_second() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}storage: {{url: 'sqlite://{}'}}\n",
        config(&mock),
        dir.path().join("shared.db").display()
    );
    let one = gateway(&yaml).await;
    let two = gateway(&yaml).await;
    let (id, secret) = create_key(&one, json!({"name": "polled"})).await;
    assert!(
        eventually(Duration::from_secs(1), || two
            .gateway
            .guard
            .key(&secret)
            .is_some())
        .await
    );
    call(&one, "DELETE", &format!("/api/keys/{id}"), None).await;
    assert!(
        eventually(Duration::from_secs(1), || two
            .gateway
            .guard
            .key(&secret)
            .is_none())
        .await,
        "revoked on one, refused by the other within a second"
    );
    assert_eq!(chat(&two, &secret).await, 401);
}

/// A team's token budget under 200 concurrent requests from two of its keys: each request
/// reserves its estimate (a quarter of its body's bytes) at admission, so with the upstream
/// answering only after every request was decided, exactly budget / estimate pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_budget_is_exact_under_200_concurrent_requests() {
    let mock = mock_with(sluice::mock::MockOptions {
        fault: Some(sluice::mock::Fault::SlowFirstByte(Duration::from_millis(
            1500,
        ))),
        record: false,
        ..Default::default()
    })
    .await;
    let gw = gateway(&config(&mock)).await;
    let estimate = chat_body("gpt-4o", false).len() / 4;
    let (status, _) = call(
        &gw,
        "POST",
        "/api/teams",
        Some(json!({"name": "metered", "budget": {"tokens": 100 * estimate, "period": "day"}})),
    )
    .await;
    assert_eq!(status, 201);
    let (_, a) = create_key(&gw, json!({"name": "m1", "team": "metered"})).await;
    let (_, b) = create_key(&gw, json!({"name": "m2", "team": "metered"})).await;
    let requests = (0..200).map(|i| {
        let key = if i % 2 == 0 { a.clone() } else { b.clone() };
        let gw = &gw;
        async move { chat(gw, &key).await }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, refused), (100, 100), "{statuses:?}");
}
