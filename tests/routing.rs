//! Many upstreams: model routing and aliases, request rewriting, load balancing, failover,
//! cooldowns, timeouts, token credentials and session affinity.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use sluice::mock::{Fault, MockOptions, MockServer};

async fn post_chat(gw: &TestGateway, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(model, stream))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn models_route_to_the_upstream_serving_them_and_aliases_rewrite_both_ways() {
    let a = named_mock("a", None).await;
    let b = named_mock("b", None).await;
    let yaml = format!(
        "upstreams:
  - {{name: a, base_url: '{}', models: [gpt-4o]}}
  - {{name: b, base_url: '{}', models: [llama-3], model_map: {{gpt-4: gpt-4o-2024-08-06}}}}
",
        a.url(),
        b.url()
    );
    let gw = gateway(&yaml).await;
    let response = post_chat(&gw, "gpt-4o", false).await;
    assert_eq!(served_by(&response), "a");
    let response = post_chat(&gw, "llama-3", false).await;
    assert_eq!(served_by(&response), "b");
    assert_eq!(json(response).await["model"], "llama-3");

    let response = post_chat(&gw, "gpt-4", false).await;
    assert_eq!(served_by(&response), "b");
    assert_eq!(
        json(response).await["model"],
        "gpt-4",
        "the client sees the name it asked for"
    );
    assert_eq!(
        b.last().unwrap().json().unwrap()["model"],
        "gpt-4o-2024-08-06",
        "the upstream gets its own name"
    );

    let stream = post_chat(&gw, "gpt-4", true).await.text().await.unwrap();
    let models: Vec<String> = stream
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| data.starts_with('{'))
        .map(|data| {
            serde_json::from_str::<serde_json::Value>(data).unwrap()["model"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(models.len() >= 10, "{stream}");
    assert!(models.iter().all(|m| m == "gpt-4"), "{models:?}");
    assert!(stream.ends_with("data: [DONE]\n\n"));

    assert_error(
        post_chat(&gw, "gpt-5-nonexistent", false).await,
        404,
        "model_not_found",
    )
    .await;

    let list = json(client().get(gw.url("/v1/models")).send().await.unwrap()).await;
    let mut ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["gpt-4", "gpt-4o", "llama-3"]);
}

#[tokio::test]
async fn field_aliases_rename_recursively_and_paths_map_to_upstream_paths() {
    let mock = mock().await;
    let yaml = format!(
        "upstreams:
  - name: soph
    base_url: '{}'
    field_aliases: {{model: model_id}}
    paths: {{/v1/chat/completions: /api/open-apis/projects/X/chat/completions}}
",
        mock.url()
    );
    let gw = gateway(&yaml).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi", "model": "nested"}], "tools": [{"model": 1}]});
    let response = client()
        .post(gw.url("/v1/chat/completions?x=1"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/api/open-apis/projects/X/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("x=1"));
    assert_eq!(
        seen.json().unwrap(),
        json!({"model_id": "m", "messages": [{"role": "user", "content": "hi", "model_id": "nested"}], "tools": [{"model_id": 1}]})
    );
}

async fn distribution(strategy: &str, weights: &[u32], requests: usize) -> Vec<usize> {
    let mut mocks = Vec::new();
    let mut yaml = format!("routing: {{strategy: {strategy}, retries: 0}}\nupstreams:\n");
    for (i, weight) in weights.iter().enumerate() {
        let mock = named_mock(&format!("u{i}"), None).await;
        yaml.push_str(&format!(
            "  - {{name: u{i}, base_url: '{}', weight: {weight}}}\n",
            mock.url()
        ));
        mocks.push(mock);
    }
    let gw = gateway(&yaml).await;
    for _ in 0..requests {
        assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    }
    mocks.iter().map(|m| m.requests().len()).collect()
}

#[tokio::test]
async fn round_robin_weighted_and_random_distributions() {
    assert_eq!(
        distribution("round_robin", &[1, 1, 1], 30).await,
        [10, 10, 10]
    );
    assert_eq!(distribution("weighted", &[3, 1], 40).await, [30, 10]);
    let random = distribution("random", &[1, 1], 200).await;
    assert!(random.iter().all(|&n| n >= 60), "{random:?}");
}

#[tokio::test]
async fn least_busy_avoids_an_upstream_holding_open_streams() {
    let busy = mock_with(MockOptions {
        name: "busy".into(),
        fault: Some(Fault::Stall),
        ..MockOptions::default()
    })
    .await;
    let idle = named_mock("idle", None).await;
    let yaml = format!(
        "routing: {{strategy: least_busy, retries: 0}}\nupstreams:\n  - {{name: busy, base_url: '{}'}}\n  - {{name: idle, base_url: '{}'}}\n",
        busy.url(),
        idle.url()
    );
    let gw = gateway(&yaml).await;
    // Two streams that stay open: the round-robin tie-break sends one to each upstream.
    let mut open = Vec::new();
    for _ in 0..2 {
        let response = post_chat(&gw, "gpt-4o", true).await;
        let mut stream = response.bytes_stream();
        stream.next().await.unwrap().unwrap();
        open.push(stream);
    }
    // `idle` finished its stream; `busy` still holds one, so everything goes to `idle`.
    idle.configure(|o| o.fault = None);
    for _ in 0..10 {
        let response = post_chat(&gw, "gpt-4o", false).await;
        assert_eq!(served_by(&response), "idle");
    }
    assert_eq!(busy.requests().len(), 1);
}

#[tokio::test]
async fn lowest_latency_prefers_the_fast_upstream() {
    let slow = mock_with(MockOptions {
        name: "slow".into(),
        fault: Some(Fault::SlowFirstByte(Duration::from_millis(150))),
        ..MockOptions::default()
    })
    .await;
    let fast = named_mock("fast", None).await;
    let yaml = format!(
        "routing: {{strategy: lowest_latency, retries: 0}}\nupstreams:\n  - {{name: slow, base_url: '{}'}}\n  - {{name: fast, base_url: '{}'}}\n",
        slow.url(),
        fast.url()
    );
    let gw = gateway(&yaml).await;
    for _ in 0..12 {
        assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    }
    assert!(
        slow.requests().len() <= 1,
        "slow served {}",
        slow.requests().len()
    );
    assert!(fast.requests().len() >= 11);
}

#[tokio::test]
async fn a_failing_upstream_is_failed_over_rests_and_comes_back() {
    let bad = mock_with(MockOptions {
        name: "bad".into(),
        fault: Some(Fault::ServerError),
        ..MockOptions::default()
    })
    .await;
    let good = named_mock("good", None).await;
    let yaml = format!(
        "routing: {{retries: 2, cooldown: 400ms, backoff: 1ms}}\nupstreams:\n  - {{name: bad, base_url: '{}'}}\n  - {{name: good, base_url: '{}'}}\n",
        bad.url(),
        good.url()
    );
    let gw = gateway(&yaml).await;
    let mut tried_bad = false;
    for _ in 0..2 {
        let response = post_chat(&gw, "gpt-4o", false).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "good");
        tried_bad |= response.headers()["x-sluice-tries"] == "2";
    }
    assert!(tried_bad, "one request went to `bad` first and was retried");
    assert_eq!(bad.requests().len(), 1);
    // While `bad` rests, nothing goes there.
    for _ in 0..4 {
        assert_eq!(served_by(&post_chat(&gw, "gpt-4o", false).await), "good");
    }
    assert_eq!(bad.requests().len(), 1);
    // After the cooldown it is tried again by itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bad.set_fault(None);
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(served_by(&post_chat(&gw, "gpt-4o", false).await));
    }
    assert!(served.contains(&"bad".to_string()), "{served:?}");
}

#[tokio::test]
async fn connect_errors_and_first_byte_timeouts_fail_over() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let slow = mock_with(MockOptions {
        name: "slow".into(),
        fault: Some(Fault::SlowFirstByte(Duration::from_secs(5))),
        ..MockOptions::default()
    })
    .await;
    let good = named_mock("good", None).await;
    let yaml = format!(
        "routing: {{strategy: round_robin, retries: 2, backoff: 1ms}}
upstreams:
  - {{name: dead, base_url: 'http://{dead}'}}
  - {{name: slow, base_url: '{}', timeouts: {{first_byte: 150ms}}}}
  - {{name: good, base_url: '{}'}}
",
        slow.url(),
        good.url()
    );
    let gw = gateway(&yaml).await;
    for _ in 0..3 {
        let response = post_chat(&gw, "gpt-4o", false).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "good");
    }
}

#[tokio::test]
async fn exhausted_retries_report_the_last_failure() {
    let a = mock_with(MockOptions {
        name: "a".into(),
        fault: Some(Fault::ServerError),
        ..MockOptions::default()
    })
    .await;
    let b = mock_with(MockOptions {
        name: "b".into(),
        fault: Some(Fault::ServerError),
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "routing: {{retries: 5, backoff: 1ms}}\nupstreams:\n  - {{name: a, base_url: '{}'}}\n  - {{name: b, base_url: '{}'}}\n",
        a.url(),
        b.url()
    );
    let gw = gateway(&yaml).await;
    let response = post_chat(&gw, "gpt-4o", false).await;
    assert_eq!(
        response.headers()["x-sluice-tries"],
        "6",
        "the first try and five retries, back to the tried upstreams once both failed"
    );
    assert_eq!(a.requests().len(), 3);
    assert_eq!(b.requests().len(), 3);
    assert_error(response, 500, "server_error").await;
}

/// One upstream whose first request (or every one, `limit: None`) fails with `fault`.
async fn lone_upstream(
    fault: Fault,
    limit: Option<usize>,
    keys: &str,
) -> (MockServer, TestGateway) {
    let mock = mock_with(MockOptions {
        name: "only".into(),
        fault: Some(fault),
        fault_limit: limit,
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "routing: {{retries: 2, backoff: 1ms}}\nupstreams:\n  - {{name: only, base_url: '{}', keys: [{keys}]}}\n",
        mock.url()
    );
    let gw = gateway(&yaml).await;
    (mock, gw)
}

fn keys_seen(mock: &MockServer) -> Vec<String> {
    mock.requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_lone_upstream_is_retried_on_its_other_key_after_a_500_or_a_dropped_connection() {
    for fault in [Fault::ServerError, Fault::Drop] {
        let (mock, gw) = lone_upstream(fault, Some(1), "sk-key-one-0001, sk-key-two-0002").await;
        let response = post_chat(&gw, "gpt-4o", false).await;
        assert_eq!(response.status(), 200, "{fault:?}");
        assert_eq!(response.headers()["x-sluice-tries"], "2", "{fault:?}");
        let keys = keys_seen(&mock);
        assert_eq!(keys.len(), 2, "{fault:?}");
        assert_ne!(
            keys[0], keys[1],
            "{fault:?}: the retry uses the pool's other key"
        );
        // The upstream rests after its failure, yet the next request is still served.
        assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    }
}

#[tokio::test]
async fn a_lone_upstream_and_key_is_retried_within_retries() {
    let (mock, gw) = lone_upstream(Fault::ServerError, Some(2), "sk-key-one-0001").await;
    let response = post_chat(&gw, "gpt-4o", false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-tries"], "3");
    assert_eq!(keys_seen(&mock), ["Bearer sk-key-one-0001"; 3]);

    let (mock, gw) = lone_upstream(Fault::ServerError, None, "sk-key-one-0001").await;
    let response = post_chat(&gw, "gpt-4o", false).await;
    assert_eq!(
        response.headers()["x-sluice-tries"],
        "3",
        "1 + retries, no more"
    );
    assert_error(response, 500, "server_error").await;
    assert_eq!(mock.requests().len(), 3);
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    let a = named_mock("a", None).await;
    let b = named_mock("b", None).await;
    let yaml = format!(
        "upstreams:\n  - {{name: a, base_url: '{}'}}\n  - {{name: b, base_url: '{}'}}\n",
        a.url(),
        b.url()
    );
    let gw = gateway(&yaml).await;
    let response = client()
        .post(gw.url("/v1/embeddings"))
        .header("content-type", "application/json")
        .body(json!({"model": "text-embedding-3-small"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-sluice-tries"], "1");
    assert_eq!(a.requests().len() + b.requests().len(), 1);
}

#[tokio::test]
async fn nothing_is_retried_once_a_byte_reached_the_client() {
    let cut = mock_with(MockOptions {
        name: "cut".into(),
        fault: Some(Fault::Cut),
        interval: Duration::from_millis(20),
        ..MockOptions::default()
    })
    .await;
    let other = named_mock("other", None).await;
    let yaml = format!(
        "routing: {{strategy: round_robin}}\nupstreams:\n  - {{name: cut, base_url: '{}'}}\n  - {{name: other, base_url: '{}'}}\n",
        cut.url(),
        other.url()
    );
    let gw = gateway(&yaml).await;
    let mut saw_cut = false;
    for _ in 0..2 {
        let response = post_chat(&gw, "gpt-4o", true).await;
        if served_by(&response) == "cut" {
            saw_cut = true;
            let text = response.text().await.unwrap();
            assert!(text.contains("word0"), "{text}");
            assert!(
                text.contains("\"upstream_unreachable\""),
                "the stream ends with an error event: {text}"
            );
        }
    }
    assert!(saw_cut);
    assert_eq!(other.requests().len(), 1, "only its own turn, no retry");
}

#[tokio::test]
async fn a_rate_limited_key_rests_for_retry_after_and_another_key_answers() {
    let mock = named_mock("m", None).await;
    let yaml = format!(
        "routing: {{backoff: 1ms}}\nupstreams:\n  - {{name: m, base_url: '{}', keys: [sk-key-one-0001, sk-key-two-0002]}}\n",
        mock.url()
    );
    let gw = gateway(&yaml).await;
    // The first try (key one) gets 429 Retry-After: 30; the retry uses key two.
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-mock-fault", "429:30")
        .body(chat_body("gpt-4o", false))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        429,
        "the mock refuses every try carrying the fault header"
    );
    let keys: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(keys, ["Bearer sk-key-one-0001", "Bearer sk-key-two-0002"]);
    assert_eq!(response.headers()["retry-after"], "30");
    // Both keys now rest for 30 s; a first try still goes out (to the key back soonest).
    assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
}

#[tokio::test]
async fn a_refused_key_of_a_pool_is_skipped_for_the_next_key() {
    let mock = mock_with(MockOptions {
        name: "m".into(),
        keys: vec!["sk-good-key-0002".into()],
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "routing: {{backoff: 1ms}}\nupstreams:\n  - {{name: m, base_url: '{}', keys: [sk-revoked-0001, sk-good-key-0002]}}\n",
        mock.url()
    );
    let gw = gateway(&yaml).await;
    for _ in 0..4 {
        assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    }
    let refused = mock
        .requests()
        .iter()
        .filter(|r| r.header("authorization") == Some("Bearer sk-revoked-0001"))
        .count();
    assert_eq!(refused, 1, "the revoked key rests after its 401");
}

#[tokio::test]
async fn tokens_are_fetched_once_cached_shared_and_refreshed_after_a_401() {
    let mock = mock_with(MockOptions {
        require_token: true,
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "upstreams:
  - name: tok
    base_url: '{0}'
    token: {{url: '{0}/_mock/token', method: POST, body: {{client: sluice}}, token_path: data.token, expires_in_path: data.expires_in}}
",
        mock.url()
    );
    let gw = gateway(&yaml).await;
    let requests = (0..20).map(|_| post_chat(&gw, "gpt-4o", false));
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        mock.count(&mock.state.tokens_issued),
        1,
        "one fetch shared by 20 concurrent requests"
    );
    assert_eq!(
        mock.last().unwrap().header("authorization"),
        Some("Bearer tok-mock-1")
    );

    client()
        .post(format!("{}/_mock/revoke", mock.url()))
        .send()
        .await
        .unwrap();
    let response = post_chat(&gw, "gpt-4o", false).await;
    assert_eq!(
        response.status(),
        200,
        "a 401 refreshes the token once and retries"
    );
    assert_eq!(mock.count(&mock.state.tokens_issued), 2);
    assert_eq!(
        mock.last().unwrap().header("authorization"),
        Some("Bearer tok-mock-2")
    );
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    let mock = mock_with(MockOptions {
        require_token: true,
        token_ttl: 2,
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "upstreams:\n  - {{name: tok, base_url: '{0}', token: {{url: '{0}/_mock/token', token_path: data.token, expires_in_path: data.expires_in, refresh_before: 1500ms}}}}\n",
        mock.url()
    );
    let gw = gateway(&yaml).await;
    assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    assert_eq!(mock.count(&mock.state.tokens_issued), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post_chat(&gw, "gpt-4o", false).await.status(), 200);
    assert_eq!(
        mock.count(&mock.state.tokens_issued),
        2,
        "refreshed ahead of expiry"
    );
}

#[tokio::test]
async fn sessions_stick_to_one_upstream_and_move_when_it_fails() {
    let mocks = [
        named_mock("a", None).await,
        named_mock("b", None).await,
        named_mock("c", None).await,
    ];
    let yaml = format!(
        "routing: {{session_ttl: 10m, backoff: 1ms, cooldown: 1m}}\nupstreams:\n{}",
        mocks
            .iter()
            .map(|m| format!(
                "  - {{name: {}, base_url: '{}'}}\n",
                m.state.options.lock().unwrap().name,
                m.url()
            ))
            .collect::<String>()
    );
    let gw = gateway(&yaml).await;
    let send = |session: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-session-id", session)
            .body(chat_body("gpt-4o", false))
            .send()
    };
    let first = served_by(&send("conv-1").await.unwrap());
    for _ in 0..5 {
        assert_eq!(served_by(&send("conv-1").await.unwrap()), first);
    }
    // The `user` field is a session too.
    let by_user = |user: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(json!({"model": "gpt-4o", "user": user, "messages": []}).to_string())
            .send()
    };
    let user_home = served_by(&by_user("u-42").await.unwrap());
    for _ in 0..4 {
        assert_eq!(served_by(&by_user("u-42").await.unwrap()), user_home);
    }
    // Its upstream fails: the session moves and stays on its new home.
    let home = mocks
        .iter()
        .find(|m| m.state.options.lock().unwrap().name == first)
        .unwrap();
    home.set_fault(Some(Fault::ServerError));
    let moved = served_by(&send("conv-1").await.unwrap());
    assert_ne!(moved, first);
    for _ in 0..3 {
        assert_eq!(served_by(&send("conv-1").await.unwrap()), moved);
    }
}

#[tokio::test]
async fn a_total_timeout_ends_a_long_stream() {
    let mock = mock_with(MockOptions {
        chunks: 50,
        interval: Duration::from_millis(50),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "upstreams: [{{name: m, base_url: '{}', timeouts: {{total: 400ms}}}}]",
        mock.url()
    ))
    .await;
    let text = post_chat(&gw, "gpt-4o", true).await.text().await.unwrap();
    assert!(text.contains("word1"));
    assert!(text.contains("exceeded the total timeout"), "{text}");
    assert!(!text.contains("word49"));
}

#[test]
fn bad_routing_configs_are_caught_with_their_paths() {
    let yaml = "
routing: {strategy: round_robn, retry_on: [connect, 200], affinity: {ttl: soon}}
access:
  keys: [{name: a, key: fk-aaaaaaaaaaaa, models: [gpt-4o, gpt-9]}]
upstreams:
  - {name: a, base_url: 'http://h', models: [gpt-4o]}
";
    let proxy = "upstreams: [{name: a, base_url: 'http://h', proxy: 'ftp://p:1'}]";
    let env = sluice::config::EnvMap::default();
    let problems: Vec<String> = [yaml, proxy]
        .iter()
        .flat_map(|text| {
            let document = sluice::config::load::parse_document(text).unwrap();
            sluice::config::load::resolve(&document, &env).unwrap_err()
        })
        .map(|p| p.to_string())
        .collect();
    for expected in [
        "routing.strategy: \"round_robn\" is not one of",
        "routing.retry_on[1]:",
        "routing.affinity.ttl: \"soon\" is not a duration",
        "access.keys[0].models[1]: no upstream serves the model \"gpt-9\"",
        "upstreams[0].proxy: scheme \"ftp\"",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "missing {expected:?} in {problems:#?}"
        );
    }
}

#[tokio::test]
async fn a_model_alias_is_retrieved_by_its_upstream_name_and_answered_as_the_alias() {
    let a = named_mock("a", None).await;
    let b = named_mock("b", None).await;
    let yaml = format!(
        "upstreams:
  - {{name: a, base_url: '{}', models: [gpt-4o]}}
  - {{name: b, base_url: '{}', models: [llama-3], model_map: {{gpt-4: gpt-4o-2024-08-06}}}}
",
        a.url(),
        b.url()
    );
    let gw = gateway(&yaml).await;
    let response = client()
        .get(gw.url("/v1/models/gpt-4"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b");
    let model = json(response).await;
    assert_eq!(model["id"], "gpt-4", "{model}");
    assert_eq!(model["object"], "model");
    assert_eq!(b.last().unwrap().path, "/v1/models/gpt-4o-2024-08-06");

    let response = client()
        .get(gw.url("/v1/models/gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(json(response).await["id"], "gpt-4o");
    assert_eq!(a.last().unwrap().path, "/v1/models/gpt-4o");
}
