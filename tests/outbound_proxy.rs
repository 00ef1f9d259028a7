//! Outbound proxies per upstream, against real proxy servers from Debian's packages:
//! tinyproxy (HTTP) and microsocks (SOCKS5). `scripts/test.sh` installs both; these tests
//! fail, rather than skip, when they are missing.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "proxy on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(program: &str, args: &[&str], port: u16) -> Server {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} (scripts/test.sh installs it): {e}"));
    let server = Server(child);
    wait_for(port);
    server
}

fn tinyproxy(dir: &std::path::Path) -> (Server, u16) {
    let port = free_port();
    let config = dir.join("tinyproxy.conf");
    std::fs::write(
        &config,
        format!("Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nMaxClients 50\nLogLevel Critical\n"),
    )
    .unwrap();
    (
        start("tinyproxy", &["-d", "-c", config.to_str().unwrap()], port),
        port,
    )
}

fn microsocks() -> (Server, u16) {
    let port = free_port();
    let port_text = port.to_string();
    (
        start(
            "microsocks",
            &[
                "-i",
                "127.0.0.1",
                "-p",
                &port_text,
                "-u",
                "sluice",
                "-P",
                "s3cret",
            ],
            port,
        ),
        port,
    )
}

#[tokio::test]
async fn an_http_proxy_carries_the_upstream_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, port) = tinyproxy(dir.path());
    let mock = mock().await;
    let gw = gateway(&format!(
        "upstreams: [{{name: m, base_url: '{}', proxy: 'http://127.0.0.1:{port}'}}]",
        mock.url()
    ))
    .await;
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body("gpt-4o", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let via = mock
        .last()
        .unwrap()
        .header("via")
        .unwrap_or_default()
        .to_string();
    assert!(
        via.contains("tinyproxy"),
        "the request came through tinyproxy: via={via:?}"
    );
}

#[tokio::test]
async fn a_socks5_proxy_carries_the_upstream_traffic_and_its_credentials_matter() {
    let (_proxy, port) = microsocks();
    let mock = mock().await;
    for scheme in ["socks5", "socks5h"] {
        let gw = gateway(&format!(
            "upstreams: [{{name: m, base_url: '{}', proxy: '{scheme}://sluice:s3cret@127.0.0.1:{port}'}}]",
            mock.url()
        ))
        .await;
        let before = mock.requests().len();
        let response = client()
            .get(gw.url("/v1/models/gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
        assert_eq!(mock.requests().len(), before + 1);
    }
    let refused = gateway(&format!(
        "routing: {{retries: 0}}\nupstreams: [{{name: m, base_url: '{}', proxy: 'socks5://sluice:wrong@127.0.0.1:{port}'}}]",
        mock.url()
    ))
    .await;
    let response = client()
        .get(refused.url("/v1/models/gpt-4o"))
        .send()
        .await
        .unwrap();
    let body = assert_error(response, 502, "upstream_unreachable").await;
    assert!(
        !body.to_string().contains("wrong"),
        "the proxy password is not echoed: {body}"
    );
}
