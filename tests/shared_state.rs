//! Limits shared by several instances through a real Redis: the server on 127.0.0.1:6379
//! (started by the machine, or by `scripts/test.sh`), and for the outage test a
//! redis-server of the test's own.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

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
    let mock = mock_with(sluice::mock::MockOptions {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_stops_fail_open_uses_local_limits_fail_closed_refuses_and_both_recover() {
    let mock = mock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = format!("redis://127.0.0.1:{port}");
    let server = start_redis(port);
    let open = gateway(&config(&mock, &redis, &prefix(), 1000, "open")).await;
    let closed = gateway(&config(&mock, &redis, &prefix(), 1000, "closed")).await;
    assert_eq!(get(&open).await, 200);
    assert_eq!(get(&closed).await, 200);

    drop(server);
    for _ in 0..5 {
        assert_eq!(
            get(&open).await,
            200,
            "fail-open admits on the instance's own limits"
        );
    }
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
}
