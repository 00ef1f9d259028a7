//! The soak run's client: a fixed, moderate rate of mixed requests for many minutes, and
//! each minute the gateway's resident memory, open files and log queue, so a slow leak
//! (memory, sockets, queued records) shows as growth after the warm-up.
//!
//! The mix, by request number modulo 20: 10 plain answers, 4 streams read to their end,
//! 2 upstream errors (a 500 from the upstream serving `gpt-4o`, which then rests, so sluice
//! answers the next ones itself), 1 error relayed from the upstream (400
//! `context_length_exceeded`), 1 stream the upstream breaks off half way, 2 streams the
//! client leaves after the first event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};

use crate::Target;

/// What a request of the mix asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Stream,
    /// The upstream answers 500 (and rests): an error either way.
    UpstreamError,
    /// The upstream answers 400 `context_length_exceeded`, relayed.
    Refused,
    /// The upstream drops the connection half way through the stream.
    Cut,
    /// The client reads the first event and goes away.
    Cancel,
}

impl Kind {
    fn of(i: u64) -> Self {
        match i % 20 {
            0..=9 => Self::Plain,
            10..=13 => Self::Stream,
            14 | 15 => Self::UpstreamError,
            16 => Self::Refused,
            17 => Self::Cut,
            _ => Self::Cancel,
        }
    }
}

/// Outcomes so far, shared by the workers and the minute reporter.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    /// Answered as the kind expects (a 200 read whole, an error status, a cut stream, a
    /// stream left on purpose).
    expected: AtomicU64,
    /// Anything else: a failed connection, a plain request that did not get its 200.
    unexpected: AtomicU64,
}

/// Options of one soak run, as its command line gives them.
#[derive(clap::Args)]
pub struct Soak {
    /// The gateway's base URL.
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// The gateway's process id (its memory and open files are read from /proc).
    #[arg(long)]
    pub pid: u32,
    /// Growth is measured from the end of this minute (the warm-up) to the end.
    #[arg(long, default_value_t = 5)]
    pub warmup_minutes: u64,
    /// Growth above this (KiB) fails the run.
    #[arg(long, default_value_t = 1024)]
    pub limit_kib: u64,
}

fn body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Say hello to the soak run."}}]}}"#
    )
}

/// Runs the mix for `soak.minutes` and prints one line a minute, then the verdict.
pub async fn run(soak: Soak) -> anyhow::Result<()> {
    let base = soak.url.trim_end_matches('/').to_string();
    let chat = format!("{base}/v1/chat/completions");
    let plain = Target::new(&chat, soak.key.clone(), body("gpt-4o-mini", false))?;
    let stream = Target::new(&chat, soak.key.clone(), body("gpt-4o-mini", true))?;
    let failing = Target::new(&chat, soak.key.clone(), body("gpt-4o", false))?;
    let counts = Arc::new(Counts::default());
    let total = soak.rate * soak.minutes * 60;
    let interval = Duration::from_secs_f64(1.0 / soak.rate.max(1) as f64);
    let start = Instant::now() + Duration::from_millis(50);
    let targets = Arc::new([plain, stream, failing]);
    let mut workers = Vec::new();
    for worker in 0..soak.connections as u64 {
        let targets = targets.clone();
        let counts = counts.clone();
        let connections = soak.connections as u64;
        workers.push(tokio::spawn(async move {
            let mut sender = None;
            let mut i = worker;
            while i < total {
                tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
                counts.sent.fetch_add(1, Ordering::Relaxed);
                let ok = one(Kind::of(i), &targets, &mut sender).await;
                let counter = if ok {
                    &counts.expected
                } else {
                    &counts.unexpected
                };
                counter.fetch_add(1, Ordering::Relaxed);
                i += connections;
            }
        }));
    }

    let status = Target::new(
        &format!("{base}/v1/status"),
        soak.key.clone(),
        String::new(),
    )?;
    let mut rss_at_warmup = None;
    let mut last_rss = 0;
    for minute in 1..=soak.minutes {
        tokio::time::sleep_until((start + Duration::from_secs(60 * minute)).into()).await;
        let rss = rss_kib(soak.pid).context("the gateway is gone")?;
        let files = open_files(soak.pid);
        let queued = log_queue(&status)
            .await
            .map_or_else(|| "-".to_string(), |q| q.to_string());
        // Heap (anonymous) apart from file pages (the binary, SQLite's shared WAL index).
        let anon = status_kib(soak.pid, "RssAnon:").unwrap_or(0);
        println!(
            "minute={minute} requests={} expected={} unexpected={} rss_mib={:.1} anon_mib={:.1} open_files={files} log_queue={queued}",
            counts.sent.load(Ordering::Relaxed),
            counts.expected.load(Ordering::Relaxed),
            counts.unexpected.load(Ordering::Relaxed),
            rss as f64 / 1024.0,
            anon as f64 / 1024.0,
        );
        if minute
            == soak
                .warmup_minutes
                .min(soak.minutes.saturating_sub(1))
                .max(1)
        {
            rss_at_warmup = Some(rss);
        }
        last_rss = rss;
    }
    for worker in workers {
        worker.await?;
    }
    let from = rss_at_warmup.unwrap_or(last_rss);
    let growth = last_rss.saturating_sub(from);
    let verdict = if growth < soak.limit_kib {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "soak: growth {growth} KiB after minute {} (target < {} KiB): {verdict}",
        soak.warmup_minutes
            .min(soak.minutes.saturating_sub(1))
            .max(1),
        soak.limit_kib
    );
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Sends one request of the mix; `true` when it ended as its kind should.
async fn one(kind: Kind, targets: &[Arc<Target>; 3], sender: &mut Option<Sender>) -> bool {
    let [plain, stream, failing] = targets;
    let outcome = match kind {
        Kind::Plain => keep_alive(plain, sender, None).await.map(|s| s == 200),
        Kind::Stream => keep_alive(stream, sender, None).await.map(|s| s == 200),
        Kind::UpstreamError => keep_alive(failing, sender, Some("500"))
            .await
            .map(|s| s >= 500),
        Kind::Refused => keep_alive(plain, sender, Some("context"))
            .await
            .map(|s| s == 400),
        // The answer starts 200 and breaks off: sluice ends it with an error event.
        Kind::Cut => keep_alive(stream, sender, Some("cut"))
            .await
            .map(|s| s == 200),
        Kind::Cancel => leave_early(stream).await.map(|()| true),
    };
    outcome.unwrap_or_else(|_| {
        // The connection is in doubt: the next request opens another.
        *sender = None;
        false
    })
}

/// One request over the worker's keep-alive connection, its body read whole; the status.
async fn keep_alive(
    target: &Target,
    sender: &mut Option<Sender>,
    fault: Option<&str>,
) -> anyhow::Result<u16> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(target.connect().await?);
    }
    let Some(open) = sender.as_mut() else {
        anyhow::bail!("no connection");
    };
    open.ready().await?;
    let mut request = target.request();
    if let Some(fault) = fault {
        request
            .headers_mut()
            .insert("x-mock-fault", http::HeaderValue::from_str(fault)?);
    }
    let response = open.send_request(request).await?;
    let status = response.status().as_u16();
    // A broken stream may end with an error event or a cut transfer; either is read out.
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// A stream on a connection of its own, left after its first event.
async fn leave_early(target: &Target) -> anyhow::Result<()> {
    let mut sender = target.connect().await?;
    sender.ready().await?;
    let response = sender.send_request(target.request()).await?;
    let mut body = response.into_body();
    let _first = body.frame().await;
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A figure of `/proc/PID/status` in KiB (`VmRSS:`, `RssAnon:`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Records waiting for the log writer, from `/v1/status`.
async fn log_queue(status: &Target) -> Option<u64> {
    let mut sender = status.connect().await.ok()?;
    sender.ready().await.ok()?;
    let mut builder = Request::get(status.uri.path())
        .header(header::HOST, &status.authority)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = &status.key {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    // The status request has no body; the sender's body type is `Full`.
    let request = builder.body(Full::new(Bytes::new())).ok()?;
    let response = sender.send_request(request).await.ok()?;
    let bytes = response.into_body().collect().await.ok()?.to_bytes();
    let text = std::str::from_utf8(&bytes).ok()?;
    let at = text.find("\"queued\":")? + "\"queued\":".len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}
