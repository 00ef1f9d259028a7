//! sluice-bench: the measurements wrk cannot make. Latency at concurrency 1, an open-loop
//! rate sweep, and many concurrent streams checked frame by frame. Each prints one line of
//! `key=value` pairs for `bench/run.sh` to tabulate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

mod h2;
mod logwrite;
mod soak;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sequential requests over one keep-alive connection.
    Latency {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 5000)]
        requests: usize,
        #[arg(long, default_value_t = 500)]
        warmup: usize,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        body: String,
    },
    /// A fixed request rate spread over several connections for a while.
    Rate {
        #[arg(long)]
        url: String,
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        body: String,
        /// Also writes one line per request, `intended_us,late_us,latency_us` (times from
        /// the run's start), to this file: to see whether slow requests come together.
        #[arg(long)]
        dump: Option<String>,
    },
    /// Fills a request log with synthetic rows, then times the dashboard's queries.
    Log {
        /// A SQLite file, or a storage URL (`sqlite://PATH`, `postgres://…`).
        #[arg(long)]
        db: String,
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
    },
    /// Authentication alone, in process: a config key against a runtime key with `keys`
    /// runtime keys loaded (and an unknown key), nanoseconds per request.
    Auth {
        #[arg(long, default_value_t = 10_000)]
        keys: usize,
        #[arg(long, default_value_t = 1_000_000)]
        rounds: usize,
    },
    /// Translation alone, in process: an Anthropic client's request to OpenAI Chat and
    /// the OpenAI answer back (plain, and a 16-chunk stream), per request.
    Translate {
        #[arg(long, default_value_t = 200_000)]
        rounds: usize,
    },
    /// The request log's writer alone: rows per second into a store (`sqlite`, `postgres`
    /// or a storage URL), in batches as the writer takes them.
    Logwrite {
        #[arg(long, default_value = "sqlite")]
        store: String,
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        #[arg(long, default_value_t = 512)]
        batch: usize,
    },
    /// The listener over HTTP/1.1 or HTTP/2 (h2c, or ALPN with TLS): latency at c=1 and
    /// req/s at a fixed concurrency, one client for every protocol (bench/src/h2.rs).
    Http(h2::Options),
    /// Concurrent SSE streams, each on its own connection, checked frame by frame.
    Streams {
        #[arg(long)]
        url: String,
        #[arg(long)]
        count: usize,
        /// Content chunks each stream must deliver, in order.
        #[arg(long)]
        chunks: usize,
        /// Spread the stream openings over this many seconds.
        #[arg(long, default_value_t = 1.0)]
        ramp: f64,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        body: String,
    },
    /// The soak run's mixed load (plain, streams, upstream errors, cut and cancelled
    /// streams) at a fixed rate, with the gateway's memory and files each minute.
    Soak(soak::Soak),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Command::Log { db, rows } = &cli.command {
        return log_bench(db, *rows);
    }
    if let Command::Auth { keys, rounds } = &cli.command {
        return auth_bench(*keys, *rounds);
    }
    if let Command::Logwrite { store, rows, batch } = &cli.command {
        return logwrite::run(store, *rows, *batch);
    }
    if let Command::Translate { rounds } = &cli.command {
        return translate_bench(*rounds);
    }
    runtime.block_on(async {
        match cli.command {
            Command::Log { .. }
            | Command::Auth { .. }
            | Command::Translate { .. }
            | Command::Logwrite { .. } => Ok(()),
            Command::Latency {
                url,
                requests,
                warmup,
                key,
                body,
            } => latency(&url, requests, warmup, key, body).await,
            Command::Rate {
                url,
                rate,
                seconds,
                connections,
                key,
                body,
                dump,
            } => rate_run(&url, rate, seconds, connections, key, body, dump).await,
            Command::Streams {
                url,
                count,
                chunks,
                ramp,
                key,
                body,
            } => streams(&url, count, chunks, ramp, key, body).await,
            Command::Soak(soak) => soak::run(soak).await,
            Command::Http(options) => h2::run(options).await,
        }
    })
}

/// Times `Guard::authenticate` for a config key, a runtime key among `count` loaded, and an
/// unknown key: the request path's whole cost of telling who calls. Prints
/// `config_ns=… runtime_ns=… unknown_ns=…`.
fn auth_bench(count: usize, rounds: usize) -> anyhow::Result<()> {
    use sluice::admin::registry::{Digest, KeyRecord, Registry, Snapshot, visible_prefix};
    use sluice::config::{Access, GatewayKey, ModelSet, Secret};
    use sluice::pipeline::access::Guard;
    use sluice::store::Managed;

    let secrets: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "sk-sl-{:048x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834)
            )
        })
        .collect();
    let rows: Vec<Managed> = secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| {
            let record = KeyRecord {
                id: format!("key_{i:016x}"),
                name: format!("runtime-{i}"),
                prefix: visible_prefix(secret),
                hash: Digest::of(secret).hex(),
                previous: None,
                models: vec!["*".into()],
                rpm: Some(1000),
                rpd: None,
                tpm: None,
                budget: None,
                expires_at: Some(i64::MAX / 2),
                metadata: Default::default(),
                team: None,
                enabled: true,
                revoked_at: None,
                created_at: 0,
                updated_at: 0,
            };
            Managed {
                kind: "key".into(),
                id: record.id.clone(),
                name: record.name.clone(),
                body: serde_json::to_string(&record).unwrap_or_default(),
            }
        })
        .collect();
    let registry = Arc::new(Registry::default());
    registry.install(Snapshot::build(1, &rows));
    let access = Access {
        ip_allow: Vec::new(),
        ip_deny: Vec::new(),
        passthrough: false,
        keys: vec![GatewayKey {
            name: "bench".into(),
            key: Secret::new("fk-bench-key-0001"),
            models: ModelSet::any(),
            limits: Default::default(),
            budget: None,
            team: None,
        }],
    };
    let guard = Guard::new(&access, registry);
    let headers = |key: &str| -> anyhow::Result<http::HeaderMap> {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::AUTHORIZATION, format!("Bearer {key}").parse()?);
        Ok(headers)
    };
    let config = headers("fk-bench-key-0001")?;
    let runtime: Vec<http::HeaderMap> = secrets
        .iter()
        .step_by((count / 64).max(1))
        .map(|s| headers(s))
        .collect::<anyhow::Result<_>>()?;
    let unknown = headers("sk-sl-000000000000000000000000000000000000000000000000")?;
    if runtime.is_empty() || guard.authenticate(&runtime[0]).is_err() {
        bail!("a runtime key was not found");
    }
    let time = |pick: &[http::HeaderMap]| {
        let start = Instant::now();
        for i in 0..rounds {
            let headers = &pick[i % pick.len()];
            std::hint::black_box(guard.authenticate(std::hint::black_box(headers)).is_ok());
        }
        start.elapsed().as_nanos() as f64 / rounds as f64
    };
    let config = [config];
    let unknown = [unknown];
    // Warm up, then measure each kind twice; the lower of each pair is kept.
    time(&config);
    let config_ns = time(&config).min(time(&config));
    let runtime_ns = time(&runtime).min(time(&runtime));
    let unknown_ns = time(&unknown).min(time(&unknown));
    println!(
        "keys={count} config_ns={config_ns:.0} runtime_ns={runtime_ns:.0} unknown_ns={unknown_ns:.0}"
    );
    Ok(())
}

/// What translation itself costs, without the HTTP around it: the request an Anthropic
/// client sends turned into OpenAI Chat, and the upstream's answer turned back, plain and
/// streamed (16 content chunks and the usage chunk, cut at event boundaries as they come).
fn translate_bench(rounds: usize) -> anyhow::Result<()> {
    use sluice::protocol::translate::{self, AnswerKind, Translator, Wire};

    let request = br#"{"model":"gpt-4o-mini","max_tokens":256,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}"#;
    let answer = br#"{"id":"chatcmpl-mock-1","object":"chat.completion","created":1764547200,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"word0 word1 word2 word3 word4 word5 word6 word7"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;
    let mut events: Vec<Vec<u8>> = (0..16)
        .map(|i| {
            format!(
                "data: {{\"id\":\"chatcmpl-mock-1\",\"object\":\"chat.completion.chunk\",\"created\":1764547200,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}]}}\n\n"
            )
            .into_bytes()
        })
        .collect();
    events.push(b"data: {\"id\":\"chatcmpl-mock-1\",\"object\":\"chat.completion.chunk\",\"created\":1764547200,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".to_vec());
    events.push(b"data: {\"id\":\"chatcmpl-mock-1\",\"object\":\"chat.completion.chunk\",\"created\":1764547200,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":16,\"total_tokens\":28}}\n\ndata: [DONE]\n\n".to_vec());
    let (client, upstream) = (Wire::AnthropicMessages, Wire::OpenAiChat);
    if translate::request(client, upstream, request, "gpt-4o-mini").is_err() {
        bail!("the benchmark's request does not translate");
    }
    let time = |work: &dyn Fn()| {
        for _ in 0..rounds / 10 {
            work();
        }
        let start = Instant::now();
        for _ in 0..rounds {
            work();
        }
        start.elapsed().as_nanos() as f64 / rounds as f64
    };
    let request_ns = time(&|| {
        let out = translate::request(
            client,
            upstream,
            std::hint::black_box(request),
            "gpt-4o-mini",
        );
        std::hint::black_box(out.is_ok());
    });
    let answer_ns = time(&|| {
        let mut translator =
            Translator::new(client, upstream, AnswerKind::Json, "gpt-4o-mini", false, 0);
        let head = translator
            .push(std::hint::black_box(answer))
            .map(|b| b.len());
        std::hint::black_box((head.ok(), translator.finish().len()));
    });
    let stream_ns = time(&|| {
        let mut translator = Translator::new(
            client,
            upstream,
            AnswerKind::Stream,
            "gpt-4o-mini",
            false,
            0,
        );
        let mut sent = 0;
        for event in &events {
            sent += translator
                .push(std::hint::black_box(event))
                .map_or(0, |b| b.len());
        }
        std::hint::black_box(sent + translator.finish().len());
    });
    println!(
        "request_ns={request_ns:.0} answer_ns={answer_ns:.0} stream_ns={stream_ns:.0} plain_total_ns={:.0}",
        request_ns + answer_ns
    );
    Ok(())
}

struct Target {
    uri: Uri,
    authority: String,
    key: Option<String>,
    body: Bytes,
}

impl Target {
    fn new(url: &str, key: Option<String>, body: String) -> anyhow::Result<Arc<Self>> {
        let uri: Uri = url.parse().context("bad --url")?;
        let authority = uri
            .authority()
            .context("--url needs host:port")?
            .to_string();
        Ok(Arc::new(Self {
            uri,
            authority,
            key,
            body: Bytes::from(body),
        }))
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut builder = Request::post(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        builder
            .body(Full::new(self.body.clone()))
            .unwrap_or_default()
    }

    async fn connect(&self) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(&self.authority).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// Sends one request and reads its whole body; returns the status.
async fn exchange(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    target: &Target,
) -> anyhow::Result<u16> {
    sender.ready().await?;
    let response = sender.send_request(target.request()).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

async fn latency(
    url: &str,
    requests: usize,
    warmup: usize,
    key: Option<String>,
    body: String,
) -> anyhow::Result<()> {
    let target = Target::new(url, key, body)?;
    let mut sender = target.connect().await?;
    for _ in 0..warmup {
        exchange(&mut sender, &target).await?;
    }
    let mut samples = Vec::with_capacity(requests);
    let mut errors = 0;
    for _ in 0..requests {
        let started = Instant::now();
        if exchange(&mut sender, &target).await? != 200 {
            errors += 1;
        }
        samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    samples.sort_unstable();
    println!(
        "p50_us={:.1} p99_us={:.1} mean_us={:.1} errors={errors}",
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64 / 1000.0
    );
    Ok(())
}

/// One request of a rate run: when it was meant to go (from the run's start), how late the
/// client sent it, and how long the answer took from the send.
#[derive(Clone, Copy)]
struct Sent {
    intended_ns: u64,
    late_ns: u64,
    latency_ns: u64,
}

async fn rate_run(
    url: &str,
    rate: u64,
    seconds: f64,
    connections: usize,
    key: Option<String>,
    body: String,
    dump: Option<String>,
) -> anyhow::Result<()> {
    let target = Target::new(url, key, body)?;
    let total = (rate as f64 * seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now() + Duration::from_millis(50);
    let errors = Arc::new(AtomicU64::new(0));
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let mut tasks = Vec::new();
    for worker in 0..connections as u64 {
        let target = target.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = target.connect().await?;
            let mut samples = Vec::new();
            let mut i = worker;
            while i < total {
                let scheduled = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(scheduled.into()).await;
                let sent = Instant::now();
                match exchange(&mut sender, &target).await {
                    Ok(200) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                samples.push(Sent {
                    intended_ns: nanos(scheduled - start),
                    late_ns: nanos(sent.saturating_duration_since(scheduled)),
                    latency_ns: nanos(sent.elapsed()),
                });
                i += connections as u64;
            }
            anyhow::Ok(samples)
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(path) = dump {
        sent.sort_unstable_by_key(|s| s.intended_ns);
        let lines: String = sent
            .iter()
            .map(|s| {
                format!(
                    "{},{},{}\n",
                    s.intended_ns / 1000,
                    s.late_ns / 1000,
                    s.latency_ns / 1000
                )
            })
            .collect();
        std::fs::write(&path, lines).with_context(|| format!("cannot write {path}"))?;
    }
    let mut samples: Vec<u64> = sent.iter().map(|s| s.latency_ns).collect();
    samples.sort_unstable();
    let mut late: Vec<u64> = sent.iter().map(|s| s.late_ns).collect();
    late.sort_unstable();
    let slow = samples.iter().filter(|&&ns| ns > 1_000_000).count();
    println!(
        "target_rps={rate} achieved_rps={:.0} p50_us={:.1} p99_us={:.1} errors={} late_p99_us={:.1} over_1ms={slow}",
        samples.len() as f64 / elapsed,
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        errors.load(Ordering::Relaxed),
        percentile(&late, 99.0),
    );
    Ok(())
}

/// What one stream saw.
#[derive(Default)]
struct StreamReport {
    ttft_ns: Option<u64>,
    gaps_ns: Vec<u64>,
    received: usize,
    reordered: usize,
    done: bool,
    failed: bool,
}

/// Content chunk numbers in a piece of SSE text: OpenAI's `"content":"word17 "`, or
/// Anthropic's `"text":"word17 "` (a translated stream; one stream holds only one kind).
fn chunk_numbers(text: &str) -> impl Iterator<Item = usize> + '_ {
    ["\"content\":\"word", "\"text\":\"word"]
        .into_iter()
        .flat_map(move |needle| text.match_indices(needle))
        .filter_map(|(at, needle)| {
            let digits: String = text[at + needle.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
}

async fn one_stream(target: Arc<Target>) -> StreamReport {
    let mut report = StreamReport::default();
    let run = async {
        let mut sender = target.connect().await?;
        sender.ready().await?;
        let started = Instant::now();
        let response = sender.send_request(target.request()).await?;
        if response.status() != 200 {
            bail!("status {}", response.status());
        }
        let mut body = response.into_body();
        let mut last: Option<Instant> = None;
        let mut carry = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            carry.push_str(&String::from_utf8_lossy(data));
            let Some(end) = carry.rfind("\n\n") else {
                continue;
            };
            let complete: String = carry.drain(..end + 2).collect();
            let now = Instant::now();
            for number in chunk_numbers(&complete) {
                if number != report.received {
                    report.reordered += 1;
                }
                report.received += 1;
                match last {
                    None => {
                        report.ttft_ns =
                            Some(u64::try_from((now - started).as_nanos()).unwrap_or(u64::MAX))
                    }
                    Some(previous) => report
                        .gaps_ns
                        .push(u64::try_from((now - previous).as_nanos()).unwrap_or(u64::MAX)),
                }
                last = Some(now);
            }
            // OpenAI's end, or Anthropic's (`--anthropic` in bench/run.sh).
            if complete.contains("data: [DONE]") || complete.contains("event: message_stop") {
                report.done = true;
            }
        }
        anyhow::Ok(())
    };
    if run.await.is_err() {
        report.failed = true;
    }
    report
}

async fn streams(
    url: &str,
    count: usize,
    chunks: usize,
    ramp: f64,
    key: Option<String>,
    body: String,
) -> anyhow::Result<()> {
    let target = Target::new(url, key, body)?;
    let spacing = Duration::from_secs_f64(ramp / count.max(1) as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let target = target.clone();
        tokio::time::sleep_until((start + spacing.mul_f64(i as f64)).into()).await;
        tasks.push(tokio::spawn(one_stream(target)));
    }
    let mut ttft = Vec::new();
    let mut gaps = Vec::new();
    let (mut lost, mut reordered, mut failed, mut incomplete) = (0usize, 0usize, 0usize, 0usize);
    for task in tasks {
        let report = task.await?;
        lost += chunks.saturating_sub(report.received);
        reordered += report.reordered;
        failed += usize::from(report.failed);
        incomplete += usize::from(!report.done);
        ttft.extend(report.ttft_ns);
        gaps.extend(report.gaps_ns);
    }
    ttft.sort_unstable();
    gaps.sort_unstable();
    println!(
        "streams={count} failed={failed} incomplete={incomplete} lost_frames={lost} reordered_frames={reordered} \
         ttft_p50_us={:.1} ttft_p99_us={:.1} gap_mean_us={:.1} gap_p99_us={:.1}",
        percentile(&ttft, 50.0),
        percentile(&ttft, 99.0),
        gaps.iter().sum::<u64>() as f64 / gaps.len().max(1) as f64 / 1000.0,
        percentile(&gaps, 99.0),
    );
    Ok(())
}

/// Synthetic rows shaped like real traffic over the last 30 days.
fn synthetic(i: usize, now_ms: i64) -> sluice::store::LogRecord {
    const MODELS: [&str; 5] = [
        "gpt-4o",
        "gpt-4o-mini",
        "text-embedding-3-small",
        "claude-3-5-sonnet",
        "llama-3.1-70b",
    ];
    const UPSTREAMS: [&str; 3] = ["openai", "azure", "local"];
    let status = match fastrand::u32(..100) {
        0..=94 => 200,
        95..=97 => 429,
        _ => 500,
    };
    let prompt = fastrand::u64(10..2000);
    let completion = fastrand::u64(1..800);
    let model = MODELS[i % MODELS.len()];
    sluice::store::LogRecord {
        id: format!("req_{i:016x}{:08x}", fastrand::u32(..)),
        ts: now_ms - fastrand::i64(0..30 * 86_400_000),
        client_ip: format!("10.0.{}.{}", i % 250, i % 200),
        key_name: format!("key-{}", i % 10),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some(model.into()),
        user: Some(format!("user-{}", i % 50)),
        upstream_model: Some(model.into()),
        upstream: Some(UPSTREAMS[i % UPSTREAMS.len()].into()),
        upstream_key: Some("sk-…a1b2".into()),
        status,
        latency_ms: fastrand::f64() * 3000.0,
        ttfb_ms: Some(fastrand::f64() * 800.0),
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        total_tokens: Some(prompt + completion),
        cost: Some((prompt as f64 * 2.5 + completion as f64 * 10.0) / 1e6),
        usage_source: Some("upstream".into()),
        stream: i.is_multiple_of(2),
        error: (status != 200).then(|| "upstream said no".into()),
        tries: 1,
        attempts: "[]".into(),
        request_headers: r#"{"content-type":"application/json","authorization":"Bearer fk-…0001"}"#
            .into(),
        response_headers: r#"{"content-type":"application/json"}"#.into(),
        request_body: Some(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"question number {i} about lighthouses and harbours"}}]}}"#
        )),
        response_body: Some(format!(
            r#"{{"choices":[{{"message":{{"content":"answer number {i}: the keeper lights the lamp at dusk"}}}}]}}"#
        )),
        reply_text: Some(format!(
            "answer number {i}: the keeper lights the lamp at dusk"
        )),
        reply_tool_calls: None,
        upstream_response_body: None,
        cache: None,
        saved_cost: None,
        model_label: None,
    }
}

fn log_bench(db: &str, rows: usize) -> anyhow::Result<()> {
    use sluice::store::ListQuery;
    let url = if db.contains("://") {
        db.to_string()
    } else {
        format!("sqlite://{db}")
    };
    // A SQLite log is opened as itself too, to wait for its search index (which follows
    // the writer) before the searches are timed: they would scan the unindexed rows.
    let (store, sqlite) = logwrite::open_store(&url)?;
    if rows == 0 {
        // Only the schema was wanted.
        return Ok(());
    }
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    // The rollups count every row written (lists count only up to a limit).
    let existing = store.stats(0, now_ms, now_ms)?["totals"]["requests"]
        .as_u64()
        .unwrap_or(0) as usize;
    let started = Instant::now();
    let batch = 5_000;
    let mut written = existing;
    while written < rows {
        let records: Vec<_> = (written..(written + batch).min(rows))
            .map(|i| synthetic(i, now_ms))
            .collect();
        store.write(&records, &[])?;
        written += records.len();
    }
    if written > existing {
        println!(
            "filled {} rows in {:.1}s",
            written - existing,
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(sqlite) = &sqlite {
        let waited = Instant::now();
        let behind = sqlite.search_backlog()?;
        while sqlite.search_backlog()? > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "search index caught up with {behind} rows in {:.1}s",
            waited.elapsed().as_secs_f64()
        );
    }
    let time = |name: &str, run: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<()> {
        run()?;
        let mut samples = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            run()?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.1} ms, max {:.1} ms",
            samples[2], samples[4]
        );
        Ok(())
    };
    let store = store.as_ref();
    let page = |query: ListQuery| move || store.list(&query).map(|_| ());
    println!("rows={rows}");
    time(
        "list, page 1",
        &page(ListQuery {
            page: 1,
            per_page: 50,
            ..ListQuery::default()
        }),
    )?;
    time(
        "list, model filter",
        &page(ListQuery {
            model: Some("gpt-4o".into()),
            page: 1,
            per_page: 50,
            ..ListQuery::default()
        }),
    )?;
    time(
        "list, status 5xx",
        &page(ListQuery {
            status: Some("5xx".into()),
            page: 1,
            per_page: 50,
            ..ListQuery::default()
        }),
    )?;
    time(
        "list, key + last 24 h",
        &page(ListQuery {
            key: Some("key-3".into()),
            from_ms: Some(now_ms - 86_400_000),
            page: 1,
            per_page: 50,
            ..ListQuery::default()
        }),
    )?;
    time(
        "list, page 2,000 (offset 100,000)",
        &page(ListQuery {
            page: 2000,
            per_page: 50,
            ..ListQuery::default()
        }),
    )?;
    let deep = store.list(&ListQuery {
        page: 2000,
        per_page: 1,
        ..ListQuery::default()
    })?;
    if let Some(row) = deep.data.first() {
        let cursor = (
            row["ts"].as_i64().unwrap_or_default(),
            row["id"].as_str().unwrap_or_default().to_string(),
        );
        time(
            "list, cursor 2,000 rows deep",
            &page(ListQuery {
                before: Some(cursor),
                page: 1,
                per_page: 50,
                ..ListQuery::default()
            }),
        )?;
    }
    let deeper = store.list(&ListQuery {
        page: 100_000,
        per_page: 1,
        ..ListQuery::default()
    })?;
    if let Some(row) = deeper.data.first() {
        let cursor = (
            row["ts"].as_i64().unwrap_or_default(),
            row["id"].as_str().unwrap_or_default().to_string(),
        );
        time(
            "list, cursor 100,000 rows deep",
            &page(ListQuery {
                before: Some(cursor),
                page: 1,
                per_page: 50,
                ..ListQuery::default()
            }),
        )?;
    }
    time("stats, last 24 h", &|| {
        store.stats(now_ms - 86_400_000, now_ms, now_ms).map(|_| ())
    })?;
    time("stats, last 30 days", &|| {
        store
            .stats(now_ms - 30 * 86_400_000, now_ms, now_ms)
            .map(|_| ())
    })?;
    let id = store
        .list(&ListQuery {
            page: 1,
            per_page: 1,
            ..ListQuery::default()
        })?
        .data[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    time("detail", &|| store.get(&id).map(|_| ()))?;
    for (label, term) in [
        ("search, a rare phrase", "number 999999:"),
        ("search, a phrase in ~1 row of 10,000", "number 4242"),
        ("search, a phrase in ~1 row of 1,000", "number 424"),
        ("search, a phrase in ~1 row of 10", "number 42"),
        ("search, a word in every row", "lighthouses"),
    ] {
        time(
            label,
            &page(ListQuery {
                search: Some(term.into()),
                page: 1,
                per_page: 50,
                ..ListQuery::default()
            }),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_numbers_are_found_in_sse_text() {
        let text = "data: {\"delta\":{\"content\":\"word0 \"}}\n\ndata: {\"delta\":{\"content\":\"word12 \"}}\n\n";
        assert_eq!(chunk_numbers(text).collect::<Vec<_>>(), [0, 12]);
        let anthropic = "event: content_block_delta\ndata: {\"delta\":{\"type\":\"text_delta\",\"text\":\"word3 \"}}\n\n";
        assert_eq!(chunk_numbers(anthropic).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn percentiles_pick_the_ranked_sample() {
        let samples: Vec<u64> = (1..=100).map(|n| n * 1000).collect();
        assert_eq!(percentile(&samples, 50.0), 50.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
    }
}
