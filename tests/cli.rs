//! The `sluice` binary as an operator runs it: `check`, and `serve` with no config file.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;

fn sluice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .env_remove("OPENAI_API_KEY")
        .env_remove("SLUICE_CONFIG")
        .env("SLUICE_LOG", "info");
    command
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sluice serve` and returns it with the address it announced.
fn serve(mut command: Command) -> (Running, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sluice starts");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("sluice announced its address")
            .expect("line");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split('/').next().unwrap_or_default().to_string();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (running, address)
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(
        &path,
        "upstreams: [{name: a, base_url: 'http://127.0.0.1:1', keys: [sk-good-key-123456]}]",
    )
    .unwrap();
    let output = sluice()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("OK (1 upstream(s)"), "{stdout}");
    assert!(!stdout.contains("sk-good-key"), "{stdout}");
}

#[test]
fn check_lists_every_problem_with_its_path_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "
server: {listen: 'not an address'}
access:
  keys:
    - {name: alice, key: 'fk alice has spaces'}
    - {name: bob, key: fk-bob-secret-99, colour: blue}
upstreams:
  - {name: a, base_url: 'http://ok', keys: [sk-secret-in-file-1]}
  - {name: b, base_url: 'ftp://bad', keys: ['sk-secret with space']}
",
    )
    .unwrap();
    let output = sluice().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "server.listen:",
        "access.keys[0].key:",
        "access.keys[1].colour: unknown field `colour`",
        "upstreams[1].base_url:",
        "upstreams[1].keys[0]:",
        "5 problem(s) found",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    for secret in ["fk alice", "fk-bob-secret", "sk-secret"] {
        assert!(
            !stdout.contains(secret),
            "secret {secret:?} shown in:\n{stdout}"
        );
    }
}

#[test]
fn check_refuses_fallbacks_to_unserved_models_loops_and_a_cache_cap_that_is_no_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fallbacks.yaml");
    std::fs::write(
        &path,
        "
upstreams:
  - {name: a, base_url: 'http://127.0.0.1:1', models: [big, small]}
routing:
  fallbacks: {big: [small, huge], small: [big]}
cache: {enabled: true, max_bytes: plenty}
",
    )
    .unwrap();
    let output = sluice().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "routing.fallbacks.big[1]: no upstream serves the model \"huge\"",
        "routing.fallbacks.big: the fallbacks loop: big → small → big",
        "routing.fallbacks.small: the fallbacks loop: small → big → small",
        "cache.max_bytes: \"plenty\" is not a size like 64MiB",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

#[test]
fn check_finds_shared_secrets_without_showing_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.yaml");
    std::fs::write(
        &path,
        "
access:
  keys:
    - {name: alice, key: fk-shared-secret-1}
    - {name: bob, key_env: BOB_KEY}
    - {name: carol, key: 98765432123}
    - {name: dave, key: adm-shared-secret-1}
upstreams:
  - {name: a, base_url: 'http://127.0.0.1:1', keys: [sk-good-key-123456]}
admin: {key: adm-shared-secret-1}
",
    )
    .unwrap();
    let output = sluice()
        .arg("check")
        .arg("-c")
        .arg(&path)
        .env("BOB_KEY", "fk-shared-secret-1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "access.keys[1].key_env: the same key is given to two names",
        "access.keys[2].key: invalid type: integer, expected a string",
        "admin.key: the admin key is also the gateway key `dave`",
        "3 problem(s) found",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    for secret in ["fk-shared-secret", "98765432123", "adm-shared-secret"] {
        assert!(
            !stdout.contains(secret),
            "secret {secret:?} shown in:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn with_no_config_file_it_forwards_with_keys_from_env_and_dotenv() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "OPENAI_BASE_URL={}/v1\nSLUICE_SERVER__LISTEN=127.0.0.1:0\n",
            mock.url()
        ),
    )
    .unwrap();
    let mut command = sluice();
    command
        .current_dir(dir.path())
        .arg("serve")
        .env("OPENAI_API_KEY", "sk-env-one-1111, sk-env-two-2222");
    let (_running, address) = serve(command);

    let client = client();
    for _ in 0..2 {
        let response = client
            .get(format!("http://{address}/v1/batches"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let keys: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(keys, ["Bearer sk-env-one-1111", "Bearer sk-env-two-2222"]);

    // A client's own key goes through as is, like openai-forward.
    let own = client
        .get(format!("http://{address}/v1/batches"))
        .header("authorization", "Bearer sk-client-own")
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(
        mock.last().unwrap().header("authorization"),
        Some("Bearer sk-client-own")
    );
}

#[tokio::test]
async fn with_no_config_and_no_key_a_request_without_a_key_gets_401() {
    let mock = mock().await;
    let mut command = sluice();
    let dir = tempfile::tempdir().unwrap();
    command
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OPENAI_BASE_URL", mock.url());
    let (_running, address) = serve(command);
    let response = client()
        .get(format!("http://{address}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "missing_api_key").await;
    assert!(mock.requests().is_empty());
}

#[test]
fn serve_refuses_a_bad_config_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "upstreams: []").unwrap();
    let output = sluice()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("upstreams: at least one upstream is required"),
        "{stderr}"
    );
}

#[tokio::test]
async fn counters_survive_kill_9_and_a_restart() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(
        &config,
        format!(
            "access: {{keys: [{{name: alice, key: fk-alice-0001, rpd: 5}}]}}
upstreams: [{{name: m, base_url: '{}'}}]
storage: {{url: 'sqlite://{}'}}
admin: {{key: admin-secret-0001}}
",
            mock.url(),
            dir.path().join("sluice.db").display()
        ),
    )
    .unwrap();
    let start = || {
        let mut command = sluice();
        command
            .current_dir(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config);
        serve(command)
    };
    let client = client();
    let send = |address: &str| {
        client
            .get(format!("http://{address}/v1/models/gpt-4o"))
            .header("authorization", "Bearer fk-alice-0001")
            .send()
    };
    let (mut running, address) = start();
    for _ in 0..3 {
        assert_eq!(send(&address).await.unwrap().status(), 200);
    }
    // Wait until the log has written them, then kill without any chance to flush.
    let mut written = 0;
    for _ in 0..200 {
        let response = client
            .get(format!("http://{address}/api/requests"))
            .header("authorization", "Bearer admin-secret-0001")
            .send()
            .await
            .unwrap();
        let list = json(response).await;
        written = list["total"].as_u64().unwrap_or(0);
        if written == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(written, 3);
    running.0.kill().unwrap();
    running.0.wait().unwrap();

    let (_running, address) = start();
    let response = client
        .get(format!("http://{address}/v1/status"))
        .header("authorization", "Bearer admin-secret-0001")
        .send()
        .await
        .unwrap();
    let status = json(response).await;
    assert_eq!(status["keys"][0]["usage"]["day"]["requests"], 3, "{status}");
    for _ in 0..2 {
        assert_eq!(send(&address).await.unwrap().status(), 200);
    }
    let refused = send(&address).await.unwrap();
    assert_error(refused, 429, "rate_limit_exceeded").await;
}

#[tokio::test]
async fn sigterm_finishes_open_streams_and_flushes_the_log() {
    use futures_util::StreamExt;
    let mock = mock_with(sluice::mock::MockOptions {
        chunks: 4,
        interval: std::time::Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sluice.db");
    let config = dir.path().join("sluice.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams: [{{name: m, base_url: '{}'}}]\nstorage: {{url: 'sqlite://{}'}}\n",
            mock.url(),
            db.display()
        ),
    )
    .unwrap();
    let mut command = sluice();
    command
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    let (mut running, address) = serve(command);
    let response = client()
        .post(format!("http://{address}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();

    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = String::new();
    while let Some(chunk) = stream.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        rest.contains("word3") && rest.ends_with("data: [DONE]\n\n"),
        "the open stream completed: {rest}"
    );
    let status = running.0.wait().unwrap();
    assert!(
        status.success(),
        "sluice exits cleanly after draining: {status:?}"
    );

    let store = sluice::store::sqlite::SqliteStore::open(db.to_str().unwrap()).unwrap();
    let page = sluice::store::Store::list(&store, &Default::default()).unwrap();
    assert_eq!(
        page.total,
        Some(1),
        "the streamed request was logged before exit"
    );
    assert_eq!(page.data[0]["stream"], true);
}

#[tokio::test]
async fn a_reload_applies_atomically_under_load_and_a_bad_config_is_refused() {
    use futures_util::StreamExt;
    let mock = mock_with(sluice::mock::MockOptions {
        chunks: 4,
        interval: std::time::Duration::from_millis(250),
        record: false,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    let base = format!(
        "upstreams: [{{name: m, base_url: '{}'}}]\nstorage: {{url: none}}\n",
        mock.url()
    );
    std::fs::write(
        &config,
        format!("access: {{keys: [{{name: alice, key: fk-alice-0001}}]}}\n{base}"),
    )
    .unwrap();
    let mut command = sluice();
    command
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    let (running, address) = serve(command);
    let pid = running.0.id().to_string();
    let url = format!("http://{address}/v1/models/gpt-4o");
    let with_key = |key: &'static str| {
        client()
            .get(&url)
            .header("authorization", format!("Bearer {key}"))
            .send()
    };

    // A stream opened before the reload, and steady traffic across it.
    let stream = client()
        .post(format!("http://{address}/v1/chat/completions"))
        .header("authorization", "Bearer fk-alice-0001")
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    let load = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = client();
            let mut statuses = Vec::new();
            for _ in 0..400 {
                let response = client
                    .get(&url)
                    .header("authorization", "Bearer fk-alice-0001")
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    assert_eq!(with_key("fk-bob-0000002").await.unwrap().status(), 401);
    std::fs::write(
        &config,
        format!("access: {{keys: [{{name: alice, key: fk-alice-0001}}, {{name: bob, key: fk-bob-0000002}}]}}\n{base}"),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut bob = 0;
    for _ in 0..100 {
        bob = with_key("fk-bob-0000002").await.unwrap().status().as_u16();
        if bob == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(bob, 200, "the new key works after the reload");

    // An invalid config is refused and the running one stays.
    std::fs::write(&config, format!("acess: {{}}\n{base}")).unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(with_key("fk-bob-0000002").await.unwrap().status(), 200);

    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "no request failed across the reloads: {statuses:?}"
    );
    let text: Vec<u8> = stream
        .bytes_stream()
        .map(|c| c.unwrap().to_vec())
        .collect::<Vec<_>>()
        .await
        .concat();
    assert!(
        String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"),
        "the open stream finished"
    );
    drop(running);
}
