//! The `sluice` command: `serve`, `check` and `mock-upstream`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::{self, EnvMap, LoadOptions, LogFormat};
use sluice::gateway::{Current, Gateway};
use sluice::mock::{self, Fault, MockOptions, MockProtocol};
use tokio::net::TcpListener;

/// mimalloc: a request thread never waits on a lock a log thread holds to free the
/// request's record (see `sys::configure_allocator`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator's settings, applied by the dynamic loader before `main` and before Rust's
/// runtime allocates anything: mimalloc reads them when it makes its first arena.
// SAFETY: the function placed in `.init_array` takes no arguments, touches no Rust runtime
// state and only sets allocator options.
#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = sluice::sys::configure_allocator;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A fast gateway for OpenAI-compatible LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default command).
    Serve {
        /// Config file; default: $SLUICE_CONFIG, else ./sluice.yaml if present, else built-in
        /// defaults forwarding to OpenAI with the keys in $OPENAI_API_KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on, overriding server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a config and print every problem with its path.
    Check {
        /// Config file to check; default: $SLUICE_CONFIG, else ./sluice.yaml if present, else
        /// the built-in defaults. SLUICE_… variables and .env apply as they would to `serve`.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a mock OpenAI upstream for trying sluice out, tests and benchmarks.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Content chunks per streamed reply (and words per plain reply).
        #[arg(long, default_value_t = 8)]
        chunks: usize,
        /// Pause between streamed chunks, e.g. 20ms.
        #[arg(long, default_value = "0ms")]
        interval: String,
        /// Fault for every request: 500, 429[:secs], slow[:2s], drop, stall, cut.
        #[arg(long)]
        fault: Option<String>,
        /// Accept only these keys (comma separated); default accepts any.
        #[arg(long, value_delimiter = ',')]
        keys: Vec<String>,
        /// Keep the last 1000 requests, listed at /_mock/requests.
        #[arg(long)]
        record: bool,
        /// Name reported in the x-mock-upstream header.
        #[arg(long, default_value = "mock")]
        name: String,
        /// The API its errors and key checks follow: openai, anthropic, gemini, or azure
        /// (deployment paths, api-version, api-key). Chat is answered in OpenAI's,
        /// Anthropic's and Gemini's protocol by path whatever this says.
        #[arg(long, default_value = "openai")]
        protocol: String,
        /// Worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// HTTP/2 streams one connection may carry at once (SETTINGS_MAX_CONCURRENT_STREAMS),
        /// to play a provider that caps them.
        #[arg(long, default_value_t = MockOptions::default().max_streams)]
        max_streams: u32,
    },
}

fn main() -> ExitCode {
    // Before anything allocates much: a block freed while the tokenizer loads would
    // otherwise set glibc's mapping threshold for the process's life (see the function).
    sluice::sys::fix_mmap_threshold(sluice::sys::MMAP_THRESHOLD);
    // A .env file in the working directory feeds the environment; real variables win.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        config: None,
        listen: None,
        workers: None,
    });
    let result = match command {
        Command::Check { config } => return check(config),
        Command::Serve {
            config,
            listen,
            workers,
        } => {
            let options = LoadOptions {
                path: config,
                listen,
            };
            match load_for_serve(&options) {
                Ok(loaded) => {
                    init_tracing(log_format(Some(&loaded.config)));
                    runtime(workers).and_then(|rt| rt.block_on(serve(options, loaded)))
                }
                Err(error) => Err(error),
            }
        }
        Command::MockUpstream {
            listen,
            chunks,
            interval,
            fault,
            keys,
            record,
            name,
            protocol,
            workers,
            max_streams,
        } => {
            init_tracing(log_format(None));
            let options = mock_options(chunks, &interval, fault.as_deref(), keys, record, name);
            let options = options.and_then(|options| {
                let protocol = MockProtocol::parse(&protocol).with_context(|| {
                    format!("--protocol {protocol:?}: expected openai, anthropic, gemini or azure")
                })?;
                Ok(MockOptions {
                    protocol,
                    max_streams,
                    ..options
                })
            });
            options.and_then(|options| {
                runtime(workers).and_then(|rt| rt.block_on(mock_upstream(&listen, options)))
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log's format: `SLUICE_LOG_FORMAT` (text or json) wins over `log.format`; another
/// value is ignored with a word on stderr (the log is not started yet).
fn log_format(config: Option<&config::Config>) -> LogFormat {
    let from_env = std::env::var("SLUICE_LOG_FORMAT")
        .ok()
        .filter(|text| !text.trim().is_empty())
        .and_then(|text| {
            let format = LogFormat::parse(&text);
            if format.is_none() {
                eprintln!("sluice: SLUICE_LOG_FORMAT={text:?} is not text or json; ignored");
            }
            format
        });
    from_env
        .or(config.map(|c| c.log.format))
        .unwrap_or_default()
}

/// Logs on stdout at `SLUICE_LOG` (default info): lines for people, or one JSON object a
/// line (fields at the top level) for log shippers.
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stdout().is_terminal())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(true)
            .init(),
    }
}

fn load_for_serve(options: &LoadOptions) -> anyhow::Result<config::Loaded> {
    config::load(options, &EnvMap::from_process()).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::anyhow!(
            "the config has problems (run `sluice check`):\n  {}",
            lines.join("\n  ")
        )
    })
}

fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Worker threads (the only ones that park; blocking threads do not) take short time
    // slices before they first wait for work, so a request waking one preempts whatever
    // background thread holds its core (see `sys::request_short_slices`).
    builder.on_thread_park(|| {
        thread_local!(static SHORT_SLICES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
        SHORT_SLICES.with(|asked| {
            if !asked.replace(true) {
                sluice::sys::request_short_slices(sluice::sys::REQUEST_SLICE);
                sluice::sys::register_request_thread();
            }
        });
        // A burst's memory goes back once the worker is idle (`sys::collect_when_idle`).
        sluice::sys::collect_when_idle();
    });
    // Where each worker wakes, so the log's threads look only at those sharing their core
    // (`sys::step_aside`).
    builder.on_thread_unpark(sluice::sys::note_request_core);
    if let Some(workers) = workers.filter(|w| *w > 0) {
        builder.worker_threads(workers);
    }
    builder.build().context("cannot start the async runtime")
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match config::load(&LoadOptions { path, listen: None }, &EnvMap::from_process()) {
        Ok(loaded) => {
            let source = loaded.path.as_ref().map_or_else(
                || "built-in defaults".to_string(),
                |p| p.display().to_string(),
            );
            let config = loaded.config;
            println!(
                "{source}: OK ({} upstream(s), {} gateway key(s), listening on {})",
                config.upstreams.len(),
                config.access.keys.len(),
                config.server.listen
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for problem in &problems {
                println!("{problem}");
            }
            println!("{} problem(s) found", problems.len());
            ExitCode::FAILURE
        }
    }
}

/// Hands memory freed after a burst of streams back to the system: at once (within
/// [`TRIM_CHECK`]) when many tasks (connections, streams) ended since the last trim, then
/// at each check for a few seconds while fewer keep ending (a burst's last streams), and
/// every [`TRIM_EVERY`] regardless. When a burst is mostly over (exchanges in flight to
/// the upstreams down to a quarter of the most seen), the upstreams' idle connections are
/// closed too (`shed_idle_connections`): the pool would keep up to 1,024 of them per
/// upstream for 90 s, each with hyper's buffers. Live tasks cannot tell that: the pool's
/// connections are tasks too. glibc keeps freed memory otherwise, so the resident size
/// would stay at the burst's peak. The trim runs on a blocking thread: on a large heap it
/// takes milliseconds, which a worker thread must not spend.
async fn release_memory_after_load(current: Arc<Current>) {
    /// How often the number of live tasks is looked at (an atomic read).
    const TRIM_CHECK: Duration = Duration::from_millis(500);
    /// The trim that runs whatever the load did.
    const TRIM_EVERY: Duration = Duration::from_secs(10);
    /// Tasks ended since the last trim that make the next check trim.
    const ENDED_TASKS: usize = 256;
    /// After a burst's trim, any task ended within this makes the next check trim too:
    /// the streams of a burst end over seconds, the last ones fewer than [`ENDED_TASKS`].
    const BURST_TAIL: Duration = Duration::from_secs(5);
    /// Pools are renewed at most this often, so a load that swings does not keep opening
    /// connections.
    const SHED_EVERY: Duration = Duration::from_secs(10);
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut every = tokio::time::interval(TRIM_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_trim = tokio::time::Instant::now();
    let mut last_burst: Option<tokio::time::Instant> = None;
    let mut last_shed: Option<tokio::time::Instant> = None;
    // The most exchanges in flight to the upstreams since the pools were last renewed.
    let mut peak = 0;
    let mut most_tasks = 0;
    let mut last_tasks = 0;
    loop {
        every.tick().await;
        let tasks = metrics.num_alive_tasks();
        most_tasks = most_tasks.max(tasks);
        let in_flight: usize = current
            .load()
            .upstreams
            .iter()
            .map(|upstream| {
                upstream
                    .in_flight
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        peak = peak.max(in_flight);
        let load_fell = most_tasks - tasks >= ENDED_TASKS;
        let burst_tail =
            tasks < last_tasks && last_burst.is_some_and(|at| at.elapsed() < BURST_TAIL);
        last_tasks = tasks;
        let burst_over = peak - in_flight >= ENDED_TASKS
            && in_flight <= peak / 4
            && last_shed.is_none_or(|at| at.elapsed() >= SHED_EVERY);
        if burst_over || load_fell || burst_tail || last_trim.elapsed() >= TRIM_EVERY {
            // After a burst ended, whatever is free goes back; the periodic check leaves a
            // small free heap alone (`sys::worth_trimming`), since steady traffic reuses it.
            if burst_over {
                last_shed = Some(tokio::time::Instant::now());
                peak = in_flight;
                let gateway = current.load();
                // A fresh client is built on a blocking thread (its TLS roots take a while).
                drop(
                    tokio::task::spawn_blocking(move || {
                        for upstream in &gateway.upstreams {
                            upstream.shed_idle_connections();
                        }
                    })
                    .await,
                );
            }
            let trim = if burst_over || load_fell || burst_tail {
                sluice::sys::trim_heap
            } else {
                sluice::sys::release_free_memory
            };
            drop(tokio::task::spawn_blocking(trim).await);
            last_trim = tokio::time::Instant::now();
            // The connections closed, and the streams still ending, free more in the
            // next seconds: those checks trim too.
            if burst_over || load_fell {
                last_burst = Some(last_trim);
            }
            most_tasks = tasks;
        }
    }
}

async fn serve(options: LoadOptions, loaded: config::Loaded) -> anyhow::Result<()> {
    let config = loaded.config.clone();
    let listen = config.server.listen;
    let gateway = Arc::new(Gateway::new(config)?);
    let current = Arc::new(Current::new(gateway.clone()));
    warn_if_open(&gateway);
    if let Some(limit) = sluice::sys::raise_open_files_limit() {
        tracing::info!("open files limit: {limit} (two per proxied stream)");
    }
    tokio::spawn(release_memory_after_load(current.clone()));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let source = loaded.path.as_ref().map_or_else(
        || "built-in defaults".to_string(),
        |p| p.display().to_string(),
    );
    let prefix = &gateway.config.server.route_prefix;
    let local = listener.local_addr()?;
    // One certificate for both listeners, reloaded by one watcher.
    let tls = match &gateway.config.server.tls {
        Some(files) => {
            let tls = sluice::http::tls::Tls::new(files)?;
            tokio::spawn(tls.clone().watch());
            Some(tls)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(config = %source, "sluice {} listening on {scheme}://{local}{prefix}/v1 (HTTP/1.1 and HTTP/2)", env!("CARGO_PKG_VERSION"));
    for upstream in &gateway.upstreams {
        tracing::info!(
            upstream = %upstream.config.name,
            base_url = %upstream.config.base_url,
            keys = upstream.config.keys.len(),
            "upstream ready"
        );
    }
    // One shutdown signal for every listener.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    if let Some(admin_listen) = gateway.config.admin.listen {
        let admin_listener = TcpListener::bind(admin_listen)
            .await
            .with_context(|| format!("cannot listen on {admin_listen} (admin.listen)"))?;
        let admin_local = admin_listener.local_addr()?;
        tracing::info!("dashboard and admin API listening on {scheme}://{admin_local}");
        banner(&gateway, &loaded, local, Some(admin_local));
        let (current, stopped, tls) = (current.clone(), stopped.clone(), tls.clone());
        tokio::spawn(async move {
            let role = sluice::http::server::Role::Admin;
            if let Err(error) = sluice::http::server::serve_secured(
                admin_listener,
                current,
                role,
                tls,
                until_stopped(stopped),
            )
            .await
            {
                tracing::error!("admin listener failed: {error:#}");
            }
        });
    }
    if gateway.config.admin.listen.is_none() {
        banner(&gateway, &loaded, local, None);
    }
    tokio::spawn(watch_config(options, loaded.path.clone(), current.clone()));
    let role = sluice::http::server::Role::Gateway;
    let served = sluice::http::server::serve_secured(
        listener,
        current.clone(),
        role,
        tls,
        until_stopped(stopped),
    )
    .await;
    // Whatever the log still holds is written before the process ends.
    let flushing = current.load();
    let shared_state = flushing.shared_state.clone();
    let traces = flushing.traces.clone();
    // Object routes learned last go to the store and Redis too.
    flushing.affinity.flush().await;
    let _ = tokio::task::spawn_blocking(move || flushing.shutdown()).await;
    // Usage settled by the last answers goes to Redis before the process ends.
    if let Some(shared_state) = shared_state {
        shared_state.flush().await;
    }
    if let Some(traces) = traces {
        traces.flush().await;
    }
    tracing::info!("request log flushed; bye");
    served
}

/// Reloads the config on SIGHUP and when its file changes (checked every 2 s). A valid
/// config replaces the running one for every new request; an invalid one is refused with
/// its problems logged, and the running config stays.
async fn watch_config(options: LoadOptions, path: Option<PathBuf>, current: Arc<Current>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let modified = |path: &Option<PathBuf>| {
        path.as_ref()
            .and_then(|p| std::fs::metadata(p).ok()?.modified().ok())
    };
    let mut seen = modified(&path);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let reason = tokio::select! {
            () = signalled => "SIGHUP",
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                "the config file changed"
            }
        };
        reload(&options, &current, reason);
    }
}

fn reload(options: &LoadOptions, current: &Current, reason: &str) {
    let loaded = match config::load(options, &EnvMap::from_process()) {
        Ok(loaded) => loaded,
        Err(problems) => {
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            tracing::error!(
                "config reload ({reason}) refused, the running config stays: {}",
                lines.join("; ")
            );
            return;
        }
    };
    let running = current.load();
    let (old, new) = (&running.config, &loaded.config);
    if old.server.listen != new.server.listen
        || old.server.tls != new.server.tls
        || old.server.http2_max_streams != new.server.http2_max_streams
        || old.admin.listen != new.admin.listen
        || old.storage.url != new.storage.url
        || old.log != new.log
        || old.alerts != new.alerts
    {
        tracing::warn!(
            "listen addresses, server.tls's files, server.http2_max_streams, storage.url, log and alerts change only on restart (the certificate itself reloads when its files change); the rest of the new config applies"
        );
    }
    match Gateway::with_shared(loaded.config, running.shared()) {
        Ok(gateway) => {
            current.store(Arc::new(gateway));
            tracing::info!("config reloaded ({reason})");
        }
        Err(error) => {
            tracing::error!("config reload ({reason}) refused, the running config stays: {error:#}")
        }
    }
}

/// What an operator needs at start: where the dashboard is (and why not), where the log
/// goes, what is configured, and what a client must bring when sluice has no key to spend.
fn banner(
    gateway: &Gateway,
    loaded: &config::Loaded,
    local: std::net::SocketAddr,
    admin_local: Option<std::net::SocketAddr>,
) {
    let config = &gateway.config;
    let admin_key = config.admin.key.is_some();
    let dashboard_at = admin_local.unwrap_or(local);
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let dashboard = if admin_key {
        format!("{scheme}://{dashboard_at}/ (log in with the admin key)")
    } else if dashboard_at.ip().is_loopback() {
        format!("{scheme}://{dashboard_at}/ (no admin key: open to this machine only)")
    } else {
        format!(
            "off: set admin.key_env (or admin.key) to open it at {scheme}://{dashboard_at}/, \
             or listen on loopback"
        )
    };
    tracing::info!("dashboard: {dashboard}");
    let storage = match &config.storage.url {
        Some(url) => display_url(url),
        None => "off (storage.url: none): no request log, dashboard data or persisted counters"
            .to_string(),
    };
    tracing::info!("storage: {storage}");
    let upstream_keys: usize = config.upstreams.iter().map(|u| u.keys.len()).sum();
    tracing::info!(
        "{} upstream(s) with {upstream_keys} key(s); {} gateway key(s); admin key {}; access log {}; {} alert webhook(s)",
        config.upstreams.len(),
        config.access.keys.len(),
        if admin_key { "set" } else { "not set" },
        if config.log.access { "on" } else { "off" },
        config.alerts.webhooks.len(),
    );
    let spends_own_keys = config
        .upstreams
        .iter()
        .any(|u| !u.keys.is_empty() || u.token.is_some());
    if loaded.path.is_none() && !spends_own_keys {
        tracing::warn!(
            "no config file and no OPENAI_API_KEY: only clients' own keys will work (each request \
             must carry its own Authorization: Bearer sk-…); set OPENAI_API_KEY or write a sluice.yaml"
        );
    } else if !spends_own_keys && config.access.passthrough {
        tracing::info!("no upstream has keys of its own: only clients' own keys will work");
    }
}

/// A storage URL without its password, an SQLite file with its full path.
fn display_url(url: &str) -> String {
    if let Some(file) = url.strip_prefix("sqlite://") {
        let path = std::path::Path::new(file);
        if path.is_relative() && !file.starts_with(':') {
            if let Ok(dir) = std::env::current_dir() {
                return format!("sqlite://{}", dir.join(path).display());
            }
        }
        return url.to_string();
    }
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// Warns when anyone who reaches the port would spend the upstream keys.
fn warn_if_open(gateway: &Gateway) {
    let exposed = !gateway.config.server.listen.ip().is_loopback();
    let spends_keys = gateway.upstreams.iter().any(|u| !u.config.keys.is_empty());
    if gateway.guard.is_open() && exposed && spends_keys {
        tracing::warn!(
            "no gateway keys (access.keys) are configured: anyone who can reach {} uses the upstream keys",
            gateway.config.server.listen
        );
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: no new connections, finishing open requests");
}

fn mock_options(
    chunks: usize,
    interval: &str,
    fault: Option<&str>,
    keys: Vec<String>,
    record: bool,
    name: String,
) -> anyhow::Result<MockOptions> {
    let interval: Duration = config::parse_duration(interval)
        .with_context(|| format!("--interval {interval:?} is not a duration"))?;
    let fault = match fault {
        Some(text) => Some(Fault::parse(text).with_context(|| {
            format!("--fault {text:?}: expected 500, 429[:secs], slow[:dur], drop, stall, cut or context")
        })?),
        None => None,
    };
    Ok(MockOptions {
        name,
        chunks,
        interval,
        fault,
        keys,
        record,
        ..MockOptions::default()
    })
}

async fn mock_upstream(listen: &str, options: MockOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        "mock upstream listening on http://{}",
        listener.local_addr()?
    );
    let state = mock::MockState::new(options);
    tokio::select! {
        () = mock::run(listener, state) => {}
        () = shutdown_signal() => {}
    }
    Ok(())
}
