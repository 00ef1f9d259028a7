//! The response cache (issue 17): hits and misses, scopes kept apart, TTL expiry, the
//! byte cap, streams replayed event by event (and answered in the other form),
//! `Cache-Control`, hits shared through Redis by two instances, what a hit costs and how
//! it is logged.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sluice::mock::MockServer;

const ADMIN: &str = "admin-secret-0001";
const ALICE: &str = "Bearer fk-alice-0001";
const BOB: &str = "Bearer fk-bob-00000002";

fn config(mock: &MockServer, cache: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001, rpm: 3}}
    - {{name: bob, key: fk-bob-00000002}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-0001]}}
cache: {{enabled: true, {cache}}}
admin: {{key: {ADMIN}}}
pricing:
  gpt-4o: {{input: 2.5, output: 10}}
",
        mock.url()
    )
}

fn ask(content: &str, stream: bool) -> Value {
    json!({"model": "gpt-4o", "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": content}]})
}

async fn send(
    gw: &TestGateway,
    key: &str,
    body: &Value,
    cache_control: Option<&str>,
) -> reqwest::Response {
    let mut request = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", key)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(value) = cache_control {
        request = request.header("cache-control", value);
    }
    request.send().await.expect("request")
}

fn cache_header(response: &reqwest::Response) -> String {
    response.headers()["x-sluice-cache"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Waits until the in-memory cache holds `entries` answers (stores are queued).
async fn stored(gw: &TestGateway, entries: usize) {
    assert!(
        eventually(Duration::from_secs(5), || {
            gw.gateway
                .cache
                .as_ref()
                .is_some_and(|c| c.memory_len() >= entries)
        })
        .await,
        "the answer was stored"
    );
}

#[tokio::test]
async fn a_repeat_is_answered_from_the_cache_exactly_as_first_answered() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    let first = send(&gw, ALICE, &ask("hello", false), None).await;
    assert_eq!(first.status(), 200);
    assert_eq!(cache_header(&first), "miss");
    let first_body = first.bytes().await.unwrap();
    stored(&gw, 1).await;
    let second = send(&gw, ALICE, &ask("hello", false), None).await;
    assert_eq!(second.status(), 200);
    assert_eq!(cache_header(&second), "hit");
    assert!(second.headers().get("x-sluice-upstream").is_none());
    assert_eq!(
        second.bytes().await.unwrap(),
        first_body,
        "same body, id included"
    );
    assert_eq!(mock.requests().len(), 1, "the hit cost no upstream call");
    // Another question is a miss.
    let other = send(&gw, ALICE, &ask("something else", false), None).await;
    assert_eq!(cache_header(&other), "miss");
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn only_deterministic_requests_are_looked_up_and_every_answer_says_so() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    let mut body = ask("hello", false);
    body.as_object_mut().unwrap().remove("temperature");
    for _ in 0..2 {
        let response = send(&gw, ALICE, &body, None).await;
        assert_eq!(response.status(), 200);
        assert_eq!(cache_header(&response), "skip");
    }
    assert_eq!(mock.requests().len(), 2);
    // An error sluice answers itself says it too, and so does an answer it makes.
    let refused = send(&gw, "Bearer fk-nobody", &body, None).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(cache_header(&refused), "skip");
    for path in ["/v1/embeddings", "/v1/models"] {
        let response = client()
            .get(gw.url(path))
            .header("authorization", ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(cache_header(&response), "skip", "{path}");
    }
}

#[tokio::test]
async fn two_keys_never_share_answers_unless_the_scope_is_global() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    assert_eq!(
        cache_header(&send(&gw, ALICE, &ask("hi", false), None).await),
        "miss"
    );
    stored(&gw, 1).await;
    assert_eq!(
        cache_header(&send(&gw, BOB, &ask("hi", false), None).await),
        "miss"
    );
    assert_eq!(
        cache_header(&send(&gw, ALICE, &ask("hi", false), None).await),
        "hit"
    );
    assert_eq!(mock.requests().len(), 2);

    let shared_mock = self::mock().await;
    let global = gateway(&config(&shared_mock, "ttl: 1m, scope: global")).await;
    assert_eq!(
        cache_header(&send(&global, ALICE, &ask("hi", false), None).await),
        "miss"
    );
    stored(&global, 1).await;
    assert_eq!(
        cache_header(&send(&global, BOB, &ask("hi", false), None).await),
        "hit"
    );
    assert_eq!(shared_mock.requests().len(), 1);
}

#[tokio::test]
async fn answers_expire_after_their_models_ttl() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1h, models: {gpt-4o: 300ms}")).await;
    assert_eq!(
        cache_header(&send(&gw, ALICE, &ask("hi", false), None).await),
        "miss"
    );
    stored(&gw, 1).await;
    assert_eq!(
        cache_header(&send(&gw, ALICE, &ask("hi", false), None).await),
        "hit"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        cache_header(&send(&gw, BOB, &ask("hi", false), None).await),
        "miss"
    );
    assert_eq!(
        cache_header(&send(&gw, ALICE, &ask("hi", false), None).await),
        "miss"
    );
    assert_eq!(mock.requests().len(), 3);
}

#[tokio::test]
async fn the_byte_cap_is_never_exceeded_and_the_least_recent_answer_goes() {
    let mock = mock().await;
    // Each answer takes about 900 bytes with its overhead: three fit in 3000, not four.
    let gw = gateway(&config(&mock, "ttl: 1h, max_bytes: 3000")).await;
    let cache = gw.gateway.cache.clone().unwrap();
    for i in 0..6 {
        let response = send(&gw, BOB, &ask(&format!("question {i}"), false), None).await;
        assert_eq!(cache_header(&response), "miss");
        response.bytes().await.unwrap();
        assert!(
            eventually(Duration::from_secs(5), || cache.memory_len()
                >= (i + 1).min(3))
            .await
        );
        assert!(cache.memory_bytes() <= 3000, "{}", cache.memory_bytes());
    }
    assert!(cache.memory_len() < 6);
    assert_eq!(
        cache_header(&send(&gw, BOB, &ask("question 0", false), None).await),
        "miss",
        "the oldest was evicted"
    );
    assert_eq!(
        cache_header(&send(&gw, BOB, &ask("question 5", false), None).await),
        "hit"
    );
}

/// The body of a streamed answer as received, chunk by chunk.
async fn chunks(response: reqwest::Response) -> Vec<bytes::Bytes> {
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.push(chunk.unwrap());
    }
    out
}

fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_stream_is_replayed_event_by_event_with_its_done() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    let first = send(&gw, ALICE, &ask("stream me", true), None).await;
    assert_eq!(cache_header(&first), "miss");
    let original = chunks(first).await.concat();
    stored(&gw, 1).await;
    let replay = send(&gw, ALICE, &ask("stream me", true), None).await;
    assert_eq!(cache_header(&replay), "hit");
    assert!(
        replay.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let replayed = chunks(replay).await;
    // Every frame ends at an event's end: no event is cut or merged into another's frame.
    assert!(replayed.iter().all(|c| c.ends_with(b"\n\n")));
    let replayed = replayed.concat();
    assert_eq!(events(&replayed), events(&original));
    assert_eq!(events(&replayed).last().unwrap(), "data: [DONE]");
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_answers_a_plain_request_and_a_plain_answer_a_stream() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    // Streamed first, then asked plainly.
    let streamed = chunks(send(&gw, BOB, &ask("one", true), None).await)
        .await
        .concat();
    stored(&gw, 1).await;
    let plain = send(&gw, BOB, &ask("one", false), None).await;
    assert_eq!(cache_header(&plain), "hit");
    let answer = json(plain).await;
    let text: String = events(&streamed)
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], text);
    // Plain first, then streamed.
    let first = json(send(&gw, BOB, &ask("two", false), None).await).await;
    stored(&gw, 2).await;
    let stream = send(&gw, BOB, &ask("two", true), None).await;
    assert_eq!(cache_header(&stream), "hit");
    let body = chunks(stream).await.concat();
    let text: String = events(&body)
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        first["choices"][0]["message"]["content"],
        text,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(events(&body).last().unwrap(), "data: [DONE]");
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn no_cache_skips_the_lookup_and_no_store_keeps_the_answer_out() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    let cache = gw.gateway.cache.clone().unwrap();
    let kept_out = send(&gw, ALICE, &ask("secret", false), Some("no-store")).await;
    assert_eq!(cache_header(&kept_out), "miss");
    kept_out.bytes().await.unwrap();
    let again = send(&gw, ALICE, &ask("secret", false), None).await;
    assert_eq!(cache_header(&again), "miss", "no-store stored nothing");
    again.bytes().await.unwrap();
    stored(&gw, 1).await;
    assert_eq!(cache.memory_len(), 1);
    let fresh = send(&gw, ALICE, &ask("secret", false), Some("no-cache")).await;
    assert_eq!(cache_header(&fresh), "skip");
    assert_eq!(mock.requests().len(), 3);
    assert_eq!(
        cache_header(&send(&gw, BOB, &ask("x", false), None).await),
        "miss"
    );
}

#[tokio::test]
async fn a_hit_counts_against_rpm_costs_nothing_and_is_logged_with_what_it_saved() {
    start_of_a_minute().await;
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    let miss = json(send(&gw, ALICE, &ask("price me", false), None).await).await;
    stored(&gw, 1).await;
    let hit = send(&gw, ALICE, &ask("price me", false), None).await;
    assert_eq!(cache_header(&hit), "hit");
    hit.bytes().await.unwrap();
    let hit2 = send(&gw, ALICE, &ask("price me", false), None).await;
    assert_eq!(cache_header(&hit2), "hit");
    // rpm 3: the miss and two hits used it up.
    let refused = send(&gw, ALICE, &ask("price me", false), None).await;
    assert_eq!(cache_header(&refused), "hit");
    assert_error(refused, 429, "rate_limit_exceeded").await;
    assert_eq!(mock.requests().len(), 1);
    flush(&gw).await;
    let list = admin_json(&gw, "/api/requests", ADMIN).await;
    let rows = list["data"].as_array().unwrap();
    let hits: Vec<&Value> = rows
        .iter()
        .filter(|r| r["cache"] == "hit" && r["status"] == 200)
        .collect();
    assert_eq!(hits.len(), 2, "{rows:?}");
    let usage = &miss["usage"];
    let full_cost = (usage["prompt_tokens"].as_f64().unwrap() * 2.5
        + usage["completion_tokens"].as_f64().unwrap() * 10.0)
        / 1e6;
    for row in &hits {
        assert_eq!(row["cost"].as_f64().unwrap(), 0.0);
        assert!(
            (row["saved_cost"].as_f64().unwrap() - full_cost).abs() < 1e-12,
            "{row}"
        );
        assert!(row["upstream"].is_null());
    }
    let missed = rows.iter().find(|r| r["cache"] == "miss").unwrap();
    assert!((missed["cost"].as_f64().unwrap() - full_cost).abs() < 1e-12);
    let metrics = client()
        .get(gw.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sluice_cache_requests_total{model=\"gpt-4o\",result=\"hit\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_cache_requests_total{model=\"gpt-4o\",result=\"miss\"} 1"));
    assert!(metrics.contains("sluice_cache_saved_usd_total "));
    let stats = admin_json(&gw, "/api/stats", ADMIN).await;
    assert_eq!(stats["totals"]["cache_hits"], 2);
    assert_eq!(stats["totals"]["cache_lookups"], 3, "{}", stats["totals"]);
    assert!((stats["totals"]["saved_cost"].as_f64().unwrap() - 2.0 * full_cost).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_hits_through_redis() {
    let mock = mock().await;
    let prefix = format!("sluice-cache-test-{:016x}", fastrand::u64(..));
    let yaml = format!(
        "{}shared_state: {{redis: 'redis://127.0.0.1:6379', prefix: '{prefix}', timeout: 500ms}}\n",
        config(&mock, "ttl: 1m")
    );
    let one = gateway(&yaml).await;
    let two = gateway(&yaml).await;
    let first = send(&one, ALICE, &ask("shared", true), None).await;
    assert_eq!(cache_header(&first), "miss");
    let original = chunks(first).await.concat();
    let mut hit = None;
    for _ in 0..100 {
        // no-store: only the first instance's answer can be found.
        let response = send(&two, ALICE, &ask("shared", true), Some("no-store")).await;
        if cache_header(&response) == "hit" {
            hit = Some(chunks(response).await.concat());
            break;
        }
        response.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hit = hit.expect("the other instance's answer was found in Redis");
    assert_eq!(events(&hit), events(&original));
    assert_eq!(
        two.gateway.cache.as_ref().unwrap().memory_len(),
        0,
        "in Redis, not in memory"
    );
}

/// A key whose token budget holds one answer and a half: hits leave it alone unless
/// `count_tokens` says they count.
async fn hits_against_a_token_budget(count_tokens: bool) -> Vec<u16> {
    let mock = mock().await;
    // What one answer costs in tokens, asked of the mock directly.
    let direct = client()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("content-type", "application/json")
        .body(ask("budget", false).to_string())
        .send()
        .await
        .unwrap();
    let tokens = json(direct).await["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    let yaml = format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001, budget: {{tokens: {}, period: day}}}}
upstreams:
  - {{name: main, base_url: '{}', keys: [sk-upstream-0001], rpm: 1}}
cache: {{enabled: true, ttl: 1m, count_tokens: {count_tokens}}}
",
        tokens + tokens / 2,
        mock.url()
    );
    let gw = gateway(&yaml).await;
    let mut statuses = Vec::new();
    let miss = send(&gw, ALICE, &ask("budget", false), None).await;
    statuses.push(miss.status().as_u16());
    miss.bytes().await.unwrap();
    stored(&gw, 1).await;
    for _ in 0..3 {
        flush(&gw).await;
        let response = send(&gw, ALICE, &ask("budget", false), None).await;
        assert_eq!(cache_header(&response), "hit");
        statuses.push(response.status().as_u16());
        response.bytes().await.unwrap();
    }
    statuses
}

#[tokio::test]
async fn hits_use_no_upstream_quota_nor_the_keys_tokens_unless_configured() {
    // The upstream's rpm of 1 went to the miss: hits never ask it.
    assert_eq!(
        hits_against_a_token_budget(false).await,
        [200, 200, 200, 200]
    );
    assert_eq!(
        hits_against_a_token_budget(true).await,
        [200, 200, 429, 429]
    );
}

#[tokio::test]
async fn a_reload_keeps_the_cache_unless_its_settings_change() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "ttl: 1m")).await;
    assert_eq!(
        cache_header(&send(&gw, BOB, &ask("kept", false), None).await),
        "miss"
    );
    stored(&gw, 1).await;
    let reload = |cache: &str| {
        // The same log as the running gateway (SQLite here, PostgreSQL in that pass).
        let yaml = format!(
            "{}storage: {{url: '{}'}}\n",
            config(&mock, cache),
            gw.gateway.config.storage.url.as_deref().unwrap()
        );
        let env = sluice::config::EnvMap::from_pairs(std::iter::empty::<(&str, &str)>());
        let document = sluice::config::load::parse_document(&yaml).unwrap();
        let config = sluice::config::load::resolve(&document, &env).unwrap();
        sluice::gateway::Gateway::with_shared(config, gw.gateway.shared()).unwrap()
    };
    let same = reload("ttl: 1m");
    assert_eq!(
        same.cache.as_ref().unwrap().memory_len(),
        1,
        "what it held is kept"
    );
    let changed = reload("ttl: 2m");
    assert_eq!(
        changed.cache.as_ref().unwrap().memory_len(),
        0,
        "new settings, new cache"
    );
    assert!(reload("ttl: 1m").cache.is_some());
}
