//! Object affinity and model-less routing: a file, batch or response created through one
//! upstream of a pool is found there again (same upstream, same key), across a restart and
//! across instances; requests without a model go to `routing.default_upstream`.

mod common;

use common::*;
use serde_json::json;
use sluice::mock::MockServer;

const A_KEYS: [&str; 2] = ["sk-a-one-000000001", "sk-a-two-000000002"];
const B_KEYS: [&str; 2] = ["sk-b-one-000000001", "sk-b-two-000000002"];

/// Two upstreams serving anything, two keys each, round robin: without affinity, requests
/// alternate between them.
fn pool(a: &MockServer, b: &MockServer, extra: &str) -> String {
    format!(
        "routing: {{strategy: round_robin, retries: 0}}
upstreams:
  - {{name: a, base_url: '{}', keys: [{}, {}]}}
  - {{name: b, base_url: '{}', keys: [{}, {}]}}
{extra}",
        a.url(),
        A_KEYS[0],
        A_KEYS[1],
        b.url(),
        B_KEYS[0],
        B_KEYS[1],
    )
}

async fn upload(gw: &TestGateway, auth: Option<&str>) -> (String, String) {
    let boundary = "affinityboundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{{\"custom_id\": \"1\"}}\r\n--{boundary}--\r\n"
    );
    let mut request = client()
        .post(gw.url("/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let upstream = served_by(&response);
    let id = json(response).await["id"].as_str().unwrap().to_string();
    (id, upstream)
}

fn mock_named<'a>(name: &str, a: &'a MockServer, b: &'a MockServer) -> &'a MockServer {
    if name == "a" { a } else { b }
}

/// The key the upstream saw on its last request.
fn last_key(mock: &MockServer) -> String {
    mock.last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_string()
}

async fn get(gw: &TestGateway, path: &str) -> reqwest::Response {
    client().get(gw.url(path)).send().await.unwrap()
}

#[tokio::test]
async fn a_file_is_read_used_and_deleted_where_it_was_uploaded_with_the_same_key() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let gw = gateway(&pool(&a, &b, "")).await;
    let (id, home) = upload(&gw, None).await;
    let mock = mock_named(&home, &a, &b);
    let key = last_key(mock);
    for _ in 0..3 {
        let response = get(&gw, &format!("/v1/files/{id}")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), home);
        assert_eq!(last_key(mock), key, "the key that uploaded it");
        let content = get(&gw, &format!("/v1/files/{id}/content")).await;
        assert_eq!(content.status(), 200);
        assert_eq!(served_by(&content), home);
        assert_eq!(content.text().await.unwrap(), "{\"custom_id\": \"1\"}");
    }

    // A batch over that file is created where the file is, and stays there.
    let batch = client()
        .post(gw.url("/v1/batches"))
        .header("content-type", "application/json")
        .body(json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&batch), home);
    let batch_id = json(batch).await["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let response = get(&gw, &format!("/v1/batches/{batch_id}")).await;
        assert_eq!(served_by(&response), home);
        assert_eq!(json(response).await["input_file_id"], id.as_str());
        let cancel = client()
            .post(gw.url(&format!("/v1/batches/{batch_id}/cancel")))
            .send()
            .await
            .unwrap();
        assert_eq!(served_by(&cancel), home);
        assert_eq!(cancel.status(), 200);
    }

    let deleted = client()
        .delete(gw.url(&format!("/v1/files/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&deleted), home);
    assert_eq!(json(deleted).await["deleted"], true);
}

#[tokio::test]
async fn a_response_is_continued_where_it_was_created_streamed_or_not() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let gw = gateway(&pool(&a, &b, "")).await;
    for stream in [false, true] {
        let created = client()
            .post(gw.url("/v1/responses"))
            .header("content-type", "application/json")
            .body(json!({"model": "gpt-4o", "input": "hi", "stream": stream}).to_string())
            .send()
            .await
            .unwrap();
        let home = served_by(&created);
        let text = created.text().await.unwrap();
        let id = text
            .split("\"id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_string();
        assert!(id.starts_with("resp_"), "{text}");
        for _ in 0..3 {
            let next = client()
                .post(gw.url("/v1/responses"))
                .header("content-type", "application/json")
                .body(
                    json!({"model": "gpt-4o", "input": "more", "previous_response_id": id})
                        .to_string(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(served_by(&next), home, "stream: {stream}");
        }
    }
}

#[tokio::test]
async fn a_callers_own_key_follows_its_file_to_the_same_upstream() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let yaml = format!(
        "access: {{passthrough: true}}
routing: {{strategy: round_robin, retries: 0}}
upstreams:
  - {{name: a, base_url: '{}'}}
  - {{name: b, base_url: '{}'}}
",
        a.url(),
        b.url()
    );
    let gw = gateway(&yaml).await;
    let own = "Bearer sk-my-own-key-000001";
    let (id, home) = upload(&gw, Some(own)).await;
    for _ in 0..3 {
        let response = client()
            .get(gw.url(&format!("/v1/files/{id}/content")))
            .header("authorization", own)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), home);
        assert_eq!(last_key(mock_named(&home, &a, &b)), own);
    }
}

#[tokio::test]
async fn requests_without_a_model_go_to_the_default_upstream() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let gw = gateway(&pool(&a, &b, "")).await;
    // Both upstreams serve anything, so a listing alternates without a default ...
    let mut served: Vec<String> = Vec::new();
    for _ in 0..2 {
        served.push(served_by(&get(&gw, "/v1/files").await));
    }
    served.sort();
    assert_eq!(served, ["a", "b"]);

    let yaml = pool(&a, &b, "").replace(
        "routing: {strategy: round_robin, retries: 0}",
        "routing: {strategy: round_robin, retries: 0, default_upstream: b}",
    );
    let gw = gateway(&yaml).await;
    for _ in 0..4 {
        assert_eq!(served_by(&get(&gw, "/v1/files").await), "b");
        assert_eq!(served_by(&get(&gw, "/v1/batches").await), "b");
    }
    // ... and requests with a model are still spread.
    let mut served: Vec<String> = Vec::new();
    for _ in 0..2 {
        let response = client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat_body("gpt-4o", false))
            .send()
            .await
            .unwrap();
        served.push(served_by(&response));
    }
    served.sort();
    assert_eq!(served, ["a", "b"]);

    let problems = sluice::config::load::resolve(
        &sluice::config::load::parse_document(
            &yaml.replace("default_upstream: b", "default_upstream: c"),
        )
        .unwrap(),
        &sluice::config::EnvMap::default(),
    )
    .unwrap_err();
    assert!(
        problems.iter().any(|p| p
            .to_string()
            .starts_with("routing.default_upstream: no upstream is named \"c\"")),
        "{problems:?}"
    );
}

/// A store both gateways share: the same SQLite file, or the same PostgreSQL database.
async fn shared_store() -> (String, Option<tempfile::TempDir>) {
    if std::env::var("SLUICE_TEST_STORAGE").as_deref() == Ok("postgres") {
        (fresh_postgres_database().await, None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
        (url, Some(dir))
    }
}

#[tokio::test]
async fn a_file_is_found_after_a_restart_and_forgotten_when_its_upstream_leaves() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let (url, _dir) = shared_store().await;
    let storage = format!("storage: {{url: '{url}'}}\n");
    let first = gateway(&pool(&a, &b, &storage)).await;
    let (id, home) = upload(&first, None).await;
    let key = last_key(mock_named(&home, &a, &b));
    first.gateway.affinity.flush().await;

    let restarted = gateway(&pool(&a, &b, &storage)).await;
    for _ in 0..3 {
        let response = get(&restarted, &format!("/v1/files/{id}/content")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), home);
        assert_eq!(last_key(mock_named(&home, &a, &b)), key);
    }

    // Its upstream gone from the config, the file's requests route as any other.
    let other = if home == "a" { &b } else { &a };
    let yaml = format!(
        "upstreams:\n  - {{name: other, base_url: '{}'}}\n  - {{name: third, base_url: '{}'}}\n{storage}",
        other.url(),
        other.url()
    );
    let without = gateway(&yaml).await;
    let response = get(&without, &format!("/v1/files/{id}")).await;
    assert_eq!(
        response.status(),
        404,
        "the other upstream does not have it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_through_one_instance_is_found_through_another() {
    let (a, b) = (named_mock("a", None).await, named_mock("b", None).await);
    let prefix = format!("sluice-test-{:016x}", fastrand::u64(..));
    let shared = format!("shared_state: {{redis: 'redis://127.0.0.1:6379', prefix: '{prefix}'}}\n");
    // Each instance has a log of its own: only Redis is shared.
    let (one, two) = (
        gateway(&pool(&a, &b, &shared)).await,
        gateway(&pool(&a, &b, &shared)).await,
    );
    let (id, home) = upload(&one, None).await;
    let key = last_key(mock_named(&home, &a, &b));
    one.gateway.affinity.flush().await;
    for _ in 0..3 {
        let response = get(&two, &format!("/v1/files/{id}/content")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), home);
        assert_eq!(last_key(mock_named(&home, &a, &b)), key);
    }
}
