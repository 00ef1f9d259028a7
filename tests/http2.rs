//! HTTP/2 at both ends: clients speaking h2c and h2 over TLS (ALPN) to sluice, and sluice
//! speaking h2c and h2 over TLS to its upstreams, where many streams share one connection;
//! cancels reset a stream, not its connection; the certificate reloads under open
//! connections, and a bad one keeps the old.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use http::Version;
use sluice::mock::{Fault, MockOptions, MockServer};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

/// The DER of the first certificate in a PEM fixture.
fn fixture_der(name: &str) -> Vec<u8> {
    use base64::Engine;
    let text = String::from_utf8(fixture_bytes(name)).expect("text");
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64")
}

/// A client speaking HTTP/2 with prior knowledge (h2c) on plain http.
fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

/// A client trusting the test CA; HTTP/2 by ALPN unless `http1`.
fn tls_client(http1: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&fixture_bytes("ca.pem")).expect("CA");
    let builder = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .tls_info(true);
    let builder = if http1 { builder.http1_only() } else { builder };
    builder.build().expect("client")
}

fn peer_certificate(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the TLS peer certificate")
        .to_vec()
}

/// One upstream in front of `mock`, spoken to with `http2` (and the test CA trusted).
fn config_for(base_url: &str, http2: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - name: main
    base_url: {base_url}
    http2: {http2}
    tls_ca: {ca}
    keys: [sk-up-one-00001]
",
        ca = fixture("ca.pem")
    )
}

async fn tls_mock(options: MockOptions) -> MockServer {
    let tls = sluice::http::tls::Tls::new(&sluice::config::TlsFiles {
        cert: fixture("a.pem").into(),
        key: fixture("a.key").into(),
    })
    .expect("fixture certificate loads");
    MockServer::start_tls(options, tls)
        .await
        .expect("mock starts")
}

async fn chat(client: &reqwest::Client, url: &str, stream: bool) -> reqwest::Response {
    client
        .post(url)
        .bearer_auth("fk-alice-0001")
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o-mini", stream))
        .send()
        .await
        .expect("request")
}

/// Reads an SSE answer to its end; the events' `data:` payloads.
async fn events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.expect("stream");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn an_h2c_client_gets_plain_and_streamed_answers_and_sends_big_bodies() {
    let mock = mock().await;
    let gw = gateway(&simple_config(&mock)).await;
    let h2 = h2c_client();
    let url = gw.url("/v1/chat/completions");

    let plain = chat(&h2, &url, false).await;
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.version(), Version::HTTP_2);
    let body = json(plain).await;
    assert_eq!(body["object"], "chat.completion", "{body}");

    let streamed = chat(&h2, &url, true).await;
    assert_eq!(streamed.status(), 200);
    assert_eq!(streamed.version(), Version::HTTP_2);
    let data = events(streamed).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    assert!(data.len() > 3, "{data:?}");

    // 6 MiB of prompt: many DATA frames, more than one flow-control window.
    let big = "x".repeat(6 << 20);
    let body =
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]})
            .to_string();
    let sent = body.len();
    let answer = h2
        .post(&url)
        .bearer_auth("fk-alice-0001")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("big request");
    assert_eq!(answer.status(), 200);
    assert_eq!(mock.last().expect("the mock got it").body.len(), sent);

    // The same port still speaks HTTP/1.1.
    let old = chat(&client(), &url, false).await;
    assert_eq!(old.status(), 200);
    assert_eq!(old.version(), Version::HTTP_11);
}

#[tokio::test]
async fn over_tls_clients_get_h2_by_alpn_or_http11() {
    let mock = mock().await;
    let yaml = format!(
        "{}server: {{tls: {{cert: '{}', key: '{}'}}}}\n",
        simple_config(&mock),
        fixture("a.pem"),
        fixture("a.key")
    );
    let gw = gateway(&yaml).await;
    let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());

    let h2 = chat(&tls_client(false), &url, true).await;
    assert_eq!(h2.status(), 200);
    assert_eq!(h2.version(), Version::HTTP_2);
    assert_eq!(peer_certificate(&h2), fixture_der("a.pem"));
    assert_eq!(events(h2).await.last().map(String::as_str), Some("[DONE]"));

    let h1 = chat(&tls_client(true), &url, false).await;
    assert_eq!(h1.status(), 200);
    assert_eq!(h1.version(), Version::HTTP_11);
    assert_eq!(json(h1).await["object"], "chat.completion");

    // Plain HTTP to a TLS port gets no answer, and no request reaches the upstream.
    let before = mock.requests().len();
    let plain = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("gpt-4o-mini", false))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(mock.requests().len(), before);
}

#[tokio::test]
async fn many_streams_to_an_h2c_upstream_share_one_connection() {
    let mock = mock_with(MockOptions {
        chunks: 5,
        interval: Duration::from_millis(20),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&config_for(&mock.url(), "h2c")).await;
    let url = gw.url("/v1/chat/completions");
    let client = client();
    let requests = (0..200).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = chat(&client, &url, true).await;
            assert_eq!(response.status(), 200);
            events(response).await
        }
    });
    for data in futures_util::future::join_all(requests).await {
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    }
    let seen = mock.requests();
    assert_eq!(mock.state.streams_finished.load(Ordering::SeqCst), 200);
    assert!(
        seen.iter()
            .all(|r| r.headers.get("authorization").is_some()),
        "every stream carried its key"
    );
    let connections = mock.state.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "200 streams took {connections} connections"
    );
}

#[tokio::test]
async fn many_streams_to_a_tls_upstream_negotiate_h2_and_share_one_connection() {
    let mock = tls_mock(MockOptions {
        chunks: 5,
        interval: Duration::from_millis(20),
        ..MockOptions::default()
    })
    .await;
    let base = format!("https://localhost:{}", mock.addr.port());
    let gw = gateway(&config_for(&base, "auto")).await;
    let url = gw.url("/v1/chat/completions");
    let client = client();
    // HTTP/2 is known only once ALPN has chosen it: a cold burst may race several
    // handshakes. After one request the connection is known to be HTTP/2 and shared.
    let warm = chat(&client, &url, false).await;
    assert_eq!(warm.status(), 200);
    assert_eq!(json(warm).await["object"], "chat.completion");
    let requests = (0..100).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move { events(chat(&client, &url, true).await).await }
    });
    for data in futures_util::future::join_all(requests).await {
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    }
    let connections = mock.state.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "100 streams took {connections} connections"
    );

    // With `http2: off`, the same upstream gets a connection per concurrent stream.
    let mock1 = tls_mock(MockOptions {
        chunks: 5,
        interval: Duration::from_millis(20),
        ..MockOptions::default()
    })
    .await;
    let base = format!("https://localhost:{}", mock1.addr.port());
    let gw1 = gateway(&config_for(&base, "'off'")).await;
    let url = gw1.url("/v1/chat/completions");
    let requests = (0..20).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = chat(&client, &url, true).await;
            assert_eq!(response.status(), 200);
            events(response).await
        }
    });
    for data in futures_util::future::join_all(requests).await {
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    }
    let connections = mock1.state.connections.load(Ordering::SeqCst);
    assert!(
        connections > 2,
        "HTTP/1.1: 20 streams took {connections} connections"
    );
}

/// A mock allowing `limit` streams per HTTP/2 connection whose streams send their first
/// chunk and then hold, and a gateway speaking h2c to it with `http2_streams: limit`.
async fn limited_upstream(limit: u32, idle: &str) -> (MockServer, TestGateway) {
    let mock = mock_with(MockOptions {
        fault: Some(Fault::Stall),
        max_streams: limit,
        ..MockOptions::default()
    })
    .await;
    let yaml = format!(
        "{}    http2_streams: {limit}\n    http2_idle: {idle}\n",
        config_for(&mock.url(), "h2c")
    );
    (mock, gateway(&yaml).await)
}

/// Starts `count` streams at once and returns their bodies once each sent its first chunk:
/// every one started, none waiting for another (none can end: they hold).
async fn held_streams(
    gw: &TestGateway,
    count: usize,
) -> Vec<impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>> {
    let client = client();
    let url = gw.url("/v1/chat/completions");
    let requests = (0..count).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = chat(&client, &url, true).await;
            assert_eq!(response.status(), 200);
            let mut body = response.bytes_stream();
            let first = body.next().await.expect("a first chunk").expect("chunk");
            assert!(!first.is_empty());
            body
        }
    });
    // A stream queued behind the held ones would never start: a deadline, not a speed.
    tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(requests),
    )
    .await
    .expect("every stream started while the others were held")
}

#[tokio::test]
async fn streams_past_an_upstreams_stream_limit_open_more_connections_instead_of_waiting() {
    let (mock, gw) = limited_upstream(4, "1m").await;
    let held = held_streams(&gw, 20).await;
    assert_eq!(mock.state.streams_started.load(Ordering::SeqCst), 20);
    assert_eq!(mock.state.streams_finished.load(Ordering::SeqCst), 0);
    // 20 streams at 4 per connection: 5 connections, not 1 (queued) and not 20.
    let connections = mock.state.connections.load(Ordering::SeqCst);
    assert_eq!(connections, 5, "20 streams took {connections} connections");
    assert_eq!(gw.gateway.upstreams[0].http2_load(), Some((5, 20)));
    drop(held);
}

#[tokio::test]
async fn over_tls_a_cold_burst_past_the_stream_limit_settles_on_one_connection_per_limit() {
    let mock = tls_mock(MockOptions {
        fault: Some(Fault::Stall),
        max_streams: 4,
        ..MockOptions::default()
    })
    .await;
    let base = format!("https://localhost:{}", mock.addr.port());
    let yaml = format!("{}    http2_streams: 4\n", config_for(&base, "auto"));
    let gw = gateway(&yaml).await;
    let held = held_streams(&gw, 20).await;
    assert_eq!(gw.gateway.upstreams[0].http2_load(), Some((5, 20)));
    // Handshakes raced before ALPN said h2 close as they end: 5 stay, one per 4 streams.
    assert!(
        eventually(Duration::from_secs(10), || {
            mock.state.connections_open.load(Ordering::SeqCst) == 5
        })
        .await,
        "{} connections open",
        mock.state.connections_open.load(Ordering::SeqCst)
    );
    drop(held);
}

#[tokio::test]
async fn a_bursts_extra_connections_close_when_idle_and_the_first_stays() {
    let (mock, gw) = limited_upstream(4, "200ms").await;
    let held = held_streams(&gw, 12).await;
    assert_eq!(mock.state.connections_open.load(Ordering::SeqCst), 3);
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || {
            mock.state.connections_open.load(Ordering::SeqCst) == 1
        })
        .await,
        "{} connections still open",
        mock.state.connections_open.load(Ordering::SeqCst)
    );
    assert_eq!(gw.gateway.upstreams[0].http2_load(), Some((1, 0)));
    // The connection kept serves the next request without a new one.
    mock.set_fault(None);
    let response = chat(&client(), &gw.url("/v1/chat/completions"), false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.state.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_client_gone_resets_its_upstream_stream_not_the_connection() {
    let mock = mock_with(MockOptions {
        chunks: 200,
        interval: Duration::from_millis(20),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&config_for(&mock.url(), "h2c")).await;
    let url = gw.url("/v1/chat/completions");
    let client = h2c_client();
    // A long stream that keeps going on the shared upstream connection.
    let kept = chat(&client, &url, true).await;
    let mut kept_body = kept.bytes_stream();
    assert!(kept_body.next().await.is_some());
    // Another, dropped after its first chunk: an h2 client resets its stream.
    let dropped = chat(&client, &url, true).await;
    let mut dropped_body = dropped.bytes_stream();
    assert!(dropped_body.next().await.is_some());
    drop(dropped_body);
    assert!(
        eventually(Duration::from_secs(5), || {
            mock.state.streams_cancelled.load(Ordering::SeqCst) == 1
        })
        .await,
        "the upstream saw the stream end"
    );
    // The other stream goes on, on the same connection.
    let before = mock.state.connections.load(Ordering::SeqCst);
    let mut more = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), kept_body.next())
        .await
        .expect("the kept stream goes on")
    {
        chunk.expect("chunk");
        more += 1;
        if more == 10 {
            break;
        }
    }
    assert_eq!(more, 10);
    assert_eq!(mock.state.streams_cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(mock.state.connections.load(Ordering::SeqCst), before);
    assert_eq!(mock.state.connections_open.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failover_and_timeouts_hold_over_h2c() {
    let broken = mock_with(MockOptions {
        name: "broken".into(),
        fault: Some(Fault::ServerError),
        ..MockOptions::default()
    })
    .await;
    let slow = mock_with(MockOptions {
        name: "slow".into(),
        fault: Some(Fault::SlowFirstByte(Duration::from_secs(5))),
        ..MockOptions::default()
    })
    .await;
    let good = named_mock("good", None).await;
    let yaml = format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
routing: {{strategy: round_robin, retries: 2}}
upstreams:
  - {{name: broken, base_url: {}, http2: h2c}}
  - {{name: slow, base_url: {}, http2: h2c, timeouts: {{first_byte: 300ms}}}}
  - {{name: good, base_url: {}, http2: h2c}}
",
        broken.url(),
        slow.url(),
        good.url()
    );
    let gw = gateway(&yaml).await;
    // In turn, each upstream is tried first once: a 500 and a first-byte timeout over h2c
    // fail over like over HTTP/1.1.
    for _ in 0..3 {
        let response = chat(&h2c_client(), &gw.url("/v1/chat/completions"), true).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "good");
        assert_eq!(
            events(response).await.last().map(String::as_str),
            Some("[DONE]")
        );
    }
    assert!(!broken.requests().is_empty());
    assert!(!slow.requests().is_empty());
}

/// Copies `pem` and `key` over the files the gateway serves.
fn install(dir: &std::path::Path, pem: &str, key: &str) {
    // Written beside and renamed, as a renewal tool does, so no half file is ever read.
    for (from, to) in [(pem, "cert.pem"), (key, "key.pem")] {
        let staging = dir.join(format!("{to}.new"));
        std::fs::write(&staging, fixture_bytes(from)).expect("write");
        std::fs::rename(&staging, dir.join(to)).expect("rename");
    }
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_dropping_connections_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    install(dir.path(), "a.pem", "a.key");
    let mock = mock().await;
    let yaml = format!(
        "{}server: {{tls: {{cert: '{}', key: '{}'}}}}\n",
        simple_config(&mock),
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let gw = gateway(&yaml).await;
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", gw.addr.port());
    let open = tls_client(false);
    let first = chat(&open, &url, false).await;
    assert_eq!(first.status(), 200);
    assert_eq!(peer_certificate(&first), fixture_der("a.pem"));

    install(dir.path(), "b.pem", "b.key");
    let mut served = Vec::new();
    for _ in 0..100 {
        let response = chat(&tls_client(false), &url, false).await;
        served = peer_certificate(&response);
        if served == fixture_der("b.pem") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served,
        fixture_der("b.pem"),
        "new connections get the new certificate"
    );
    // The connection opened before goes on with the certificate it was opened with.
    let again = chat(&open, &url, false).await;
    assert_eq!(again.status(), 200);
    assert_eq!(peer_certificate(&again), fixture_der("a.pem"));

    // A cert that does not match its key (a's cert with b's key) is refused: b stays.
    install(dir.path(), "a.pem", "b.key");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let response = chat(&tls_client(false), &url, false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(peer_certificate(&response), fixture_der("b.pem"));
    // Garbage too.
    std::fs::write(dir.path().join("cert.pem"), b"not a certificate").expect("write");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let response = chat(&tls_client(false), &url, false).await;
    assert_eq!(peer_certificate(&response), fixture_der("b.pem"));
}

#[tokio::test]
async fn the_connection_cap_counts_h2_connections_not_streams() {
    let mock = mock().await;
    let yaml = format!(
        "{}server: {{max_connections_per_ip: 1}}\n",
        simple_config(&mock)
    );
    let gw = gateway(&yaml).await;
    let client = h2c_client();
    let url = gw.url("/v1/chat/completions");
    // One h2 connection carries many streams under a cap of one connection.
    let requests = (0..20).map(|_| chat(&client, &url, false));
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
    }
    // A second connection from the same address is refused.
    let refused = h2c_client()
        .post(&url)
        .bearer_auth("fk-alice-0001")
        .body(chat_body("gpt-4o-mini", false))
        .send()
        .await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.status() == 429),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_realtime_session_to_an_h2c_upstream_goes_out_on_http11() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mock = mock().await;
    let gw = gateway(&config_for(&mock.url(), "h2c")).await;
    // Ordinary requests share an h2c connection first.
    let ok = chat(&client(), &gw.url("/v1/chat/completions"), false).await;
    assert_eq!(ok.status(), 200);
    let mut request = format!("ws://{}/v1/realtime?model=gpt-4o-realtime-preview", gw.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer fk-alice-0001".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("the handshake went through to the upstream");
    let first = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an event")
        .expect("open")
        .expect("a message");
    let Message::Text(text) = first else {
        panic!("not text: {first:?}");
    };
    let event: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
    assert_eq!(event["type"], "session.created", "{event}");
    socket
        .send(Message::text(
            serde_json::json!({"type": "response.create"}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(mock.state.realtime_opened.load(Ordering::SeqCst), 1);
    // The h2c connection and the handshake's own HTTP/1.1 connection.
    assert_eq!(mock.state.connections.load(Ordering::SeqCst), 2);
}
