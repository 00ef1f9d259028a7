//! Limits shared by several instances through a real Redis: the server on 127.0.0.1:6379
//! (started by the machine, or by `scripts/test.sh`), and for the outage test a
//! redis-server of the test's own.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use sluice::mock::{Fault, MockOptions, MockServer};

fn prefix() -> String {
    format!("sluice-test-{:016x}", fastrand::u64(..))
}

fn config(
    mock: &sluice::mock::MockServer,
    redis: &str,
    prefix: &str,
    rpm: u32,
    on_error: &str,
) -> String {
    format!(
        "access: {{keys: [{{name: alice, key: fk-alice-0001, rpm: {rpm}}}]}}
upstreams: [{{name: m, base_url: '{}'}}]
shared_state: {{redis: '{redis}', prefix: '{prefix}', on_error: {on_error}, timeout: 200ms}}
storage: {{url: none}}
",
        mock.url()
    )
}

async fn get(gw: &TestGateway) -> u16 {
    client()
        .get(gw.url("/v1/models/gpt-4o"))
        .header("authorization", "Bearer fk-alice-0001")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_admit_exactly_the_limit() {
    let mock = mock_with(MockOptions {
        record: false,
        ..Default::default()
    })
    .await;
    let prefix = prefix();
    let yaml = config(&mock, "redis://127.0.0.1:6379", &prefix, 100, "closed");
    let instances = [
        gateway(&yaml).await,
        gateway(&yaml).await,
        gateway(&yaml).await,
    ];
    start_of_a_minute().await;
    let requests = (0..300).map(|i| get(&instances[i % 3]));
    let statuses = futures_util::future::join_all(requests).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        100,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 200);

    // Any instance's status shows every instance's requests.
    let status = json(
        client()
            .get(instances[1].url("/v1/status"))
            .header("authorization", "Bearer fk-alice-0001")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status["keys"][0]["usage"]["minute"]["requests"], 100,
        "{status}"
    );

    // Every instance restarted: the counts live in Redis.
    drop(instances);
    let fresh = gateway(&yaml).await;
    assert_eq!(get(&fresh).await, 429);
}

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(port: u16) -> RedisServer {
    let port_text = port.to_string();
    let args = [
        "--port",
        port_text.as_str(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let server = RedisServer(
        Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed"),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start");
}

/// Requests `gw` in a few concurrent loops until `stop`, keeping every status.
fn load(
    gw: &TestGateway,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    let url = gw.url("/v1/models/gpt-4o");
    tokio::spawn(async move {
        let loops = (0..4).map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = client()
                        .get(&url)
                        .header("authorization", "Bearer fk-alice-0001")
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    statuses.push(status);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                statuses
            }
        });
        futures_util::future::join_all(loops).await.concat()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_stops_mid_load_fail_open_admits_fail_closed_refuses_and_both_recover() {
    let mock = mock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = format!("redis://127.0.0.1:{port}");
    let server = start_redis(port);
    let open = gateway(&config(&mock, &redis, &prefix(), 100_000, "open")).await;
    let closed = gateway(&config(&mock, &redis, &prefix(), 100_000, "closed")).await;
    assert_eq!(get(&open).await, 200);
    assert_eq!(get(&closed).await, 200);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let open_load = load(&open, stop.clone());
    let closed_load = load(&closed, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(server);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Mid-outage, fail-closed answers in OpenAI shape.
    let response = client()
        .get(closed.url("/v1/models/gpt-4o"))
        .header("authorization", "Bearer fk-alice-0001")
        .send()
        .await
        .unwrap();
    assert_error(response, 503, "shared_state_unavailable").await;

    let _server = start_redis(port);
    let mut recovered = false;
    for _ in 0..100 {
        if get(&closed).await == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "back to shared limits once Redis is back");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (open_statuses, closed_statuses) = (open_load.await.unwrap(), closed_load.await.unwrap());
    assert!(
        open_statuses.iter().all(|s| *s == 200),
        "fail-open admits every request on the instance's own limits: {open_statuses:?}"
    );
    assert!(
        closed_statuses.iter().all(|s| *s == 200 || *s == 503),
        "fail-closed answers 200 or 503, nothing else: {closed_statuses:?}"
    );
    assert!(closed_statuses.contains(&503), "{closed_statuses:?}");
    assert_eq!(
        closed_statuses.last(),
        Some(&200),
        "fail-closed admits again after the outage"
    );
}

fn two_upstreams(a: &MockServer, b: &MockServer, prefix: &str, extra: &str) -> String {
    format!(
        "routing: {{strategy: round_robin, retries: 0, cooldown: 1m, session_ttl: 10m}}
upstreams:
  - {{name: a, base_url: '{}'}}
  - {{name: b, base_url: '{}'}}
shared_state: {{redis: 'redis://127.0.0.1:6379', prefix: '{prefix}'}}
{extra}",
        a.url(),
        b.url()
    )
}

async fn chat(gw: &TestGateway, session: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", false));
    if let Some(session) = session {
        request = request.header("x-session-id", session);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_resting_on_one_instance_rests_on_all() {
    let (a, b) = (
        named_mock("a", Some(Fault::ServerError)).await,
        named_mock("b", None).await,
    );
    let yaml = two_upstreams(&a, &b, &prefix(), "");
    let (one, two) = (gateway(&yaml).await, gateway(&yaml).await);
    // The first pick of round robin is `a`, which fails on instance one and rests.
    let failed = chat(&one, None).await;
    assert_eq!(failed.status(), 500);
    assert_eq!(served_by(&failed), "a");
    let heard = eventually(Duration::from_secs(5), || {
        two.gateway.upstreams[0].is_cooling(sluice::clock::now_ms())
    })
    .await;
    assert!(heard, "instance two learns that `a` rests");
    for _ in 0..6 {
        let response = chat(&two, None).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            served_by(&response),
            "b",
            "instance two skips the resting `a`"
        );
    }
    let status = json(client().get(two.url("/v1/status")).send().await.unwrap()).await;
    assert_eq!(
        status["upstreams"][0]["health"]["cooling_down"], true,
        "{status}"
    );

    // An instance started later reads the cooldown from Redis.
    let three = gateway(&yaml).await;
    let caught_up = eventually(Duration::from_secs(5), || {
        three.gateway.upstreams[0].is_cooling(sluice::clock::now_ms())
    })
    .await;
    assert!(caught_up, "a new instance catches up with stored cooldowns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pinned_on_one_instance_sticks_on_another() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let yaml = two_upstreams(&a, &b, &prefix(), "");
    let (one, two) = (gateway(&yaml).await, gateway(&yaml).await);
    // Round robin on instance one: `a`, then the session's first request goes to `b`.
    assert_eq!(served_by(&chat(&one, None).await), "a");
    let pinned = served_by(&chat(&one, Some("conversation-7")).await);
    assert_eq!(pinned, "b");
    let heard = eventually(Duration::from_secs(5), || {
        two.gateway.router.pinned("conversation-7").is_some()
    })
    .await;
    assert!(heard, "instance two learns the pin");
    // Instance two's own round robin would start at `a`.
    for _ in 0..4 {
        assert_eq!(served_by(&chat(&two, Some("conversation-7")).await), pinned);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_limits_are_shared_and_checked_in_the_same_round_trip() {
    let mock = mock().await;
    let yaml = format!(
        "access: {{keys: [{{name: alice, key: fk-alice-0001, rpm: 1000}}]}}
upstreams: [{{name: m, base_url: '{}', rpm: 10}}]
shared_state: {{redis: 'redis://127.0.0.1:6379', prefix: '{}', on_error: closed}}
storage: {{url: none}}
",
        mock.url(),
        prefix()
    );
    let instances = [gateway(&yaml).await, gateway(&yaml).await];
    start_of_a_minute().await;
    let statuses = futures_util::future::join_all((0..30).map(|i| get(&instances[i % 2]))).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    let status = json(
        client()
            .get(instances[0].url("/v1/status"))
            .header("authorization", "Bearer fk-alice-0001")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status["keys"][0]["usage"]["minute"]["requests"], 10,
        "requests refused for want of an upstream are not counted against the key: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reserved_at_admission_hold_a_token_limit_across_instances() {
    // Each answer takes 400 ms; the prompt (~2 KB, ~500 tokens estimated) alone fills
    // `tpm: 100`, so while the first request is in flight every other one is refused.
    let mock = mock_with(MockOptions {
        fault: Some(Fault::SlowFirstByte(Duration::from_millis(400))),
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "access: {{keys: [{{name: bob, key: fk-bob-0001, tpm: 100}}]}}
upstreams: [{{name: m, base_url: '{}'}}]
shared_state: {{redis: 'redis://127.0.0.1:6379', prefix: '{}', on_error: closed}}
",
        mock.url(),
        prefix()
    );
    let instances = [gateway(&yaml).await, gateway(&yaml).await];
    start_of_a_minute().await;
    let long = "word ".repeat(400);
    let body =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": long}]})
            .to_string();
    let send = |gw: &TestGateway| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer fk-bob-0001")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    let responses = futures_util::future::join_all((0..6).map(|i| send(&instances[i % 2]))).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| r.as_ref().unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        5,
        "{statuses:?}"
    );
}
