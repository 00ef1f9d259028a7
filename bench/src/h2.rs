//! The listener over HTTP/1.1 and HTTP/2, plain and with TLS: latency at concurrency 1 and
//! requests per second at a fixed concurrency, through one client (reqwest) whatever the
//! protocol, so the figures differ by the protocol alone. HTTP/1.1 uses a connection per
//! concurrent request; HTTP/2 puts them all on one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;

/// How a run speaks to the listener, as its command line gives it.
#[derive(clap::Args)]
pub struct Options {
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    #[arg(long, default_value_t = 300)]
    pub warmup: usize,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub body: String,
    /// `1` (HTTP/1.1) or `2` (h2c on http://, ALPN h2 on https://).
    #[arg(long, default_value_t = 2)]
    pub http: u8,
    /// A PEM CA to trust for an https:// URL.
    #[arg(long)]
    pub ca: Option<String>,
}

fn client(options: &Options) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(options.concurrency.max(1));
    builder = match (options.http, options.url.starts_with("https://")) {
        (1, _) => builder.http1_only(),
        (_, false) => builder.http2_prior_knowledge(),
        // ALPN offers h2 first; a server without it would answer HTTP/1.1.
        (_, true) => builder,
    };
    if let Some(ca) = &options.ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {ca}"))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

async fn one(client: &reqwest::Client, options: &Options) -> anyhow::Result<bool> {
    let mut request = client
        .post(&options.url)
        .header("content-type", "application/json")
        .body(options.body.clone());
    if let Some(key) = &options.key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await?;
    let ok = response.status() == 200;
    response.bytes().await?;
    Ok(ok)
}

/// Prints `version=… p50_us=… p99_us=… rps=… errors=…`: latency from sequential requests
/// on one connection, then `requests` more at `concurrency` for the rate.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let client = client(&options)?;
    for _ in 0..options.warmup {
        one(&client, &options).await?;
    }
    let probe = client.get(&options.url).send().await?;
    let version = format!("{:?}", probe.version());
    drop(probe);
    let mut samples = Vec::with_capacity(options.requests);
    let mut errors = 0usize;
    for _ in 0..options.requests {
        let started = Instant::now();
        if !one(&client, &options).await? {
            errors += 1;
        }
        samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    samples.sort_unstable();
    let options = Arc::new(options);
    let left = Arc::new(AtomicUsize::new(options.requests * 4));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let (client, options, left, failed) = (
                client.clone(),
                options.clone(),
                left.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    if !matches!(one(&client, &options).await, Ok(true)) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let rps = (options.requests * 4) as f64 / started.elapsed().as_secs_f64();
    println!(
        "version={version} p50_us={:.1} p99_us={:.1} rps={rps:.0} errors={}",
        crate::percentile(&samples, 50.0),
        crate::percentile(&samples, 99.0),
        errors + failed.load(Ordering::Relaxed)
    );
    Ok(())
}
