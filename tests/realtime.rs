//! Realtime sessions over WebSocket through the real gateway to the mock's realtime
//! endpoint: authentication (header and browser subprotocol), the key's models and
//! limits, events both ways in order, either side's close reaching the other, Azure's
//! realtime path, and the session's log record.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice::mock::{MockOptions, MockProtocol, MockServer};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Socket = WebSocketStream<TcpStream>;

const ADMIN: &str = "admin-secret-0001";

fn config(mock: &MockServer, key_extra: &str, extra: &str) -> String {
    format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001{key_extra}}}
admin: {{key: {ADMIN}}}
server: {{max_body: 64KiB}}
upstreams:
  - name: main
    base_url: {}
    keys: [sk-up-one-00001]
{extra}",
        mock.url()
    )
}

/// Opens a session; `Err` carries the HTTP status of a refused handshake.
async fn connect(
    gw: &TestGateway,
    model: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Socket, http::HeaderMap), u16> {
    let url = format!("ws://{}/v1/realtime?model={model}", gw.addr);
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(http::HeaderName::from_static(name), value.parse().unwrap());
    }
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((socket, response)) => Ok((socket, response.headers().clone())),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(error) => panic!("handshake failed: {error}"),
    }
}

async fn next_event(socket: &mut Socket) -> Value {
    let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an event within 5 s")
        .expect("the session is open")
        .expect("a message");
    match message {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("not a text event: {other:?}"),
    }
}

async fn send(socket: &mut Socket, event: Value) {
    socket.send(Message::text(event.to_string())).await.unwrap();
}

/// Waits for the end of the session as the client sees it: a close frame or the end.
async fn closed(socket: &mut Socket) -> bool {
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    ended.is_ok()
}

/// The newest session's log record, once its session has ended and been logged (`seen`
/// counts the sessions logged before it).
async fn last_row(gw: &TestGateway, seen: usize) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        flush(gw).await;
        let list = admin_json(gw, "/api/requests?path=/v1/realtime", ADMIN).await;
        let rows = list["data"].as_array().map_or(0, Vec::len);
        if rows > seen {
            let id = list["data"][0]["id"].as_str().expect("an id");
            return admin_json(gw, &format!("/api/requests/{id}"), ADMIN).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session was logged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn events_cross_both_ways_in_order_and_the_session_is_logged_with_its_usage() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "")).await;
    let (mut socket, headers) = connect(
        &gw,
        "gpt-4o-realtime",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    assert_eq!(headers["x-sluice-upstream"], "main");
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    send(
        &mut socket,
        json!({"type": "session.update", "session": {"instructions": "be brief"}}),
    )
    .await;
    send(
        &mut socket,
        json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "hello"}]}}),
    )
    .await;
    send(&mut socket, json!({"type": "response.create"})).await;
    let updated = next_event(&mut socket).await;
    assert_eq!(updated["type"], "session.updated");
    assert_eq!(updated["session"]["instructions"], "be brief");
    assert_eq!(
        next_event(&mut socket).await["type"],
        "conversation.item.created"
    );
    assert_eq!(next_event(&mut socket).await["type"], "response.created");
    for i in 0..8 {
        let delta = next_event(&mut socket).await;
        assert_eq!(delta["type"], "response.output_text.delta");
        assert_eq!(delta["delta"], format!("word{i} "), "deltas in order");
    }
    let done = next_event(&mut socket).await;
    assert_eq!(done["type"], "response.done");
    send(&mut socket, json!({"type": "response.create"})).await;
    while next_event(&mut socket).await["type"] != "response.done" {}

    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/v1/realtime");
    assert_eq!(seen.query.as_deref(), Some("model=gpt-4o-realtime"));
    assert_eq!(seen.header("authorization"), Some("Bearer sk-up-one-00001"));

    socket.close(None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || mock
            .count(&mock.state.realtime_closed)
            == 1)
        .await,
        "the client's close closed the upstream session"
    );
    let row = last_row(&gw, 0).await;
    assert_eq!(row["status"], 101);
    assert_eq!(row["model"], "gpt-4o-realtime");
    assert_eq!(row["key_name"], "alice");
    assert_eq!(row["upstream"], "main");
    assert_eq!(row["prompt_tokens"], 24, "two responses of 12 input tokens");
    assert_eq!(row["completion_tokens"], 16);
    assert_eq!(row["total_tokens"], 40);
    let summary: Value = serde_json::from_str(row["response_body"].as_str().unwrap()).unwrap();
    assert_eq!(summary["events"]["client"], 4);
    assert_eq!(summary["events"]["upstream"], 1 + 2 + 10 + 10);
    assert_eq!(summary["responses"], 2);
    assert_eq!(summary["closed_by"], "client");
}

#[tokio::test]
async fn a_browser_key_in_the_subprotocol_is_used_and_goes_nowhere_else() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "")).await;
    let (mut socket, headers) = connect(
        &gw,
        "gpt-4o-realtime",
        &[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.fk-alice-0001, openai-beta.realtime-v1",
        )],
    )
    .await
    .unwrap();
    assert_eq!(headers["sec-websocket-protocol"], "realtime");
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    let seen = mock.last().unwrap();
    assert_eq!(
        seen.header("sec-websocket-protocol"),
        Some("realtime, openai-beta.realtime-v1")
    );
    assert_eq!(seen.header("authorization"), Some("Bearer sk-up-one-00001"));
    socket.close(None).await.unwrap();
    let row = last_row(&gw, 0).await;
    assert_eq!(row["key_name"], "alice");
    let stored = stored_text(&gw).await;
    assert!(
        !stored.contains("fk-alice-0001"),
        "the key is not stored in clear"
    );
}

#[tokio::test]
async fn a_bad_key_a_forbidden_model_and_a_session_over_the_rpm_are_refused() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, ", rpm: 1, models: [gpt-4o-realtime]", "")).await;
    assert_eq!(
        connect(
            &gw,
            "gpt-4o-realtime",
            &[("authorization", "Bearer fk-wrong-0001")]
        )
        .await
        .err(),
        Some(401)
    );
    assert_eq!(
        connect(
            &gw,
            "gpt-4o-mini-realtime",
            &[("authorization", "Bearer fk-alice-0001")]
        )
        .await
        .err(),
        Some(403)
    );
    start_of_a_minute().await;
    let (mut first, _) = connect(
        &gw,
        "gpt-4o-realtime",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut first).await["type"], "session.created");
    assert_eq!(
        connect(
            &gw,
            "gpt-4o-realtime",
            &[("authorization", "Bearer fk-alice-0001")]
        )
        .await
        .err(),
        Some(429),
        "a session counts as a request"
    );
    assert_eq!(mock.count(&mock.state.realtime_opened), 1);
}

#[tokio::test]
async fn the_upstream_closing_or_dropping_closes_the_client() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "")).await;
    for (seen, (event, closed_by)) in [("mock.close", "upstream"), ("mock.drop", "upstream_error")]
        .into_iter()
        .enumerate()
    {
        let (mut socket, _) = connect(
            &gw,
            "gpt-4o-realtime",
            &[("authorization", "Bearer fk-alice-0001")],
        )
        .await
        .unwrap();
        assert_eq!(next_event(&mut socket).await["type"], "session.created");
        send(&mut socket, json!({"type": event})).await;
        assert!(
            closed(&mut socket).await,
            "{event}: the client's side closed"
        );
        let row = last_row(&gw, seen).await;
        let summary: Value = serde_json::from_str(row["response_body"].as_str().unwrap()).unwrap();
        assert_eq!(summary["closed_by"], closed_by, "{event}");
    }
}

#[tokio::test]
async fn a_client_gone_without_a_close_frame_closes_the_upstream() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "")).await;
    let (mut socket, _) = connect(
        &gw,
        "gpt-4o-realtime",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    drop(socket);
    assert!(
        eventually(Duration::from_secs(5), || mock
            .count(&mock.state.realtime_closed)
            == 1)
        .await
    );
}

#[tokio::test]
async fn a_message_over_max_body_ends_the_session() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "")).await;
    let (mut socket, _) = connect(
        &gw,
        "gpt-4o-realtime",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    let big = "x".repeat(100 * 1024);
    let _ = socket
        .send(Message::text(
            json!({"type": "input_audio_buffer.append", "audio": big}).to_string(),
        ))
        .await;
    assert!(closed(&mut socket).await);
    assert!(
        eventually(Duration::from_secs(5), || mock
            .count(&mock.state.realtime_closed)
            == 1)
        .await
    );
    assert!(
        mock.requests().len() == 1,
        "the message never reached the upstream"
    );
}

#[tokio::test]
async fn an_azure_upstream_gets_its_realtime_path() {
    let mock = mock_with(MockOptions {
        protocol: MockProtocol::Azure,
        keys: vec!["az-key-one-0001".into()],
        models: vec!["rt-prod".into()],
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "access:
  keys:
    - {{name: alice, key: fk-alice-0001}}
upstreams:
  - name: az
    kind: azure
    base_url: {}
    api_version: '2024-10-01-preview'
    keys: [az-key-one-0001]
    deployments: {{gpt-4o-realtime: rt-prod}}
",
        mock.url()
    ))
    .await;
    let (mut socket, _) = connect(
        &gw,
        "gpt-4o-realtime",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    let created = next_event(&mut socket).await;
    assert_eq!(created["session"]["model"], "rt-prod");
    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/openai/realtime");
    assert_eq!(
        seen.query.as_deref(),
        Some("model=gpt-4o-realtime&api-version=2024-10-01-preview&deployment=rt-prod")
    );
    assert_eq!(seen.header("api-key"), Some("az-key-one-0001"));
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn open_sessions_count_against_the_per_address_connection_cap() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "").replace(
        "server: {max_body: 64KiB}",
        "server: {max_body: 64KiB, max_connections_per_ip: 2}",
    ))
    .await;
    let auth = [("authorization", "Bearer fk-alice-0001")];
    let (mut first, _) = connect(&gw, "gpt-4o-realtime", &auth).await.unwrap();
    let (mut second, _) = connect(&gw, "gpt-4o-realtime", &auth).await.unwrap();
    assert_eq!(next_event(&mut first).await["type"], "session.created");
    assert_eq!(next_event(&mut second).await["type"], "session.created");
    assert_eq!(
        connect(&gw, "gpt-4o-realtime", &auth).await.err(),
        Some(429),
        "two sessions hold both of the address's connections"
    );
    first.close(None).await.unwrap();
    assert!(closed(&mut first).await);
    let mut again = None;
    for _ in 0..100 {
        if let Ok(session) = connect(&gw, "gpt-4o-realtime", &auth).await {
            again = Some(session);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed session gives its slot back");
}

#[tokio::test]
async fn a_query_naming_two_models_is_refused() {
    let mock = mock().await;
    let gw = gateway(&config(&mock, "", "")).await;
    assert_eq!(
        connect(
            &gw,
            "gpt-4o-realtime&model=other",
            &[("authorization", "Bearer fk-alice-0001")]
        )
        .await
        .err(),
        Some(400)
    );
    assert_eq!(mock.requests().len(), 0);
}

#[tokio::test]
async fn shutdown_closes_open_sessions_and_waits_for_them() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}\nstorage: {{url: 'sqlite://{}'}}\n",
        config(&mock, "", ""),
        dir.path().join("sluice.db").display()
    );
    let document = sluice::config::load::parse_document(&yaml).unwrap();
    let config = sluice::config::load::resolve(&document, &Default::default()).unwrap();
    let gateway = std::sync::Arc::new(sluice::gateway::Gateway::new(config).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sluice::http::server::serve(
        listener,
        gateway.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let gw = TestGateway {
        addr,
        gateway,
        dir: None,
    };
    let (mut socket, _) = connect(
        &gw,
        "gpt-4o-realtime",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    stop.send(()).unwrap();
    assert!(closed(&mut socket).await, "the session was closed");
    let finished = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(
        finished.is_ok(),
        "the server waited for the session and then ended"
    );
    assert!(
        eventually(Duration::from_secs(5), || mock
            .count(&mock.state.realtime_closed)
            == 1)
        .await,
        "the upstream's side was closed too"
    );
}

#[tokio::test]
async fn a_mapped_model_reaches_the_upstream_under_its_own_name() {
    let mock = mock().await;
    let gw = gateway(&config(
        &mock,
        "",
        "    model_map: {my-voice: gpt-4o-realtime-preview}\n",
    ))
    .await;
    let (mut socket, _) = connect(
        &gw,
        "my-voice",
        &[("authorization", "Bearer fk-alice-0001")],
    )
    .await
    .unwrap();
    let created = next_event(&mut socket).await;
    assert_eq!(created["session"]["model"], "gpt-4o-realtime-preview");
    assert_eq!(
        mock.last().unwrap().query.as_deref(),
        Some("model=gpt-4o-realtime-preview")
    );
    socket.close(None).await.unwrap();
    let row = last_row(&gw, 0).await;
    assert_eq!(row["model"], "my-voice");
    assert_eq!(row["upstream_model"], "gpt-4o-realtime-preview");
}

#[tokio::test]
async fn an_azure_v1_upstream_gets_the_deployment_as_the_model() {
    let mock = mock_with(MockOptions {
        protocol: MockProtocol::Azure,
        models: vec!["rt-prod".into()],
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&format!(
        "upstreams:
  - name: az
    kind: azure
    base_url: {}
    api_version: v1
    keys: [az-key-one-0001]
    deployments: {{gpt-4o-realtime: rt-prod}}
",
        mock.url()
    ))
    .await;
    let (mut socket, _) = connect(&gw, "gpt-4o-realtime", &[]).await.unwrap();
    assert_eq!(next_event(&mut socket).await["session"]["model"], "rt-prod");
    let seen = mock.last().unwrap();
    assert_eq!(seen.path, "/openai/v1/realtime");
    assert_eq!(seen.query.as_deref(), Some("model=rt-prod"));
    socket.close(None).await.unwrap();
}
