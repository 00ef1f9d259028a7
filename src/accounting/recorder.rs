//! The request log, off the hot path.
//!
//! A request builds a [`Pending`] record as it goes (cheap: clones of headers and copied
//! body chunks, no parsing) and hands it to [`Recorder::submit`], which never blocks.
//!
//! Two stages, each on a thread of its own at normal priority:
//! - the *accountant* takes every record, whatever the load: it works out usage, cost and
//!   reassembled streams, settles tokens into the limiter (and Redis), feeds metrics and
//!   traces, and merges the record's counter deltas into the backlog;
//! - the *writer* writes the backlog to the store in one transaction per batch (at most
//!   `BATCH_WAIT` after a record arrives): rows, rollups and every counter delta so far.
//!
//! Only rows (and their bodies) can be shed, by `storage.overflow`, when the rows waiting
//! pass `storage.queue`; a shed record is still accounted, and every shed one is counted.
//! A store that cannot be reached keeps the backlog (bounded) and is retried with back-off;
//! a record the store refuses is isolated (the batch is retried without it) and counted in
//! `dropped`. Shutdown writes what is queued.
//!
//! The stages, in order, each a function of its own: accept ([`LogSink::submit`]: the
//! overflow policy, the byte budget) → account (`Accountant::settle`: usage, cost,
//! settlements, counter deltas) → shape the row (`shape_row`) → write a batch
//! (`Writer::write`) → isolate refused records (`Writer::isolate`) → retention
//! (`Writer::retain`). The records themselves are plain data in
//! [`records`](crate::accounting::records).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Value, json};

use crate::accounting::inbox::{InboxReader, InboxSender, inbox};
use crate::accounting::records::{Attempt, CacheNote, Pending, TAIL};
use crate::accounting::shared::Settlement;
use crate::config::{Budget, Config, Overflow, Price, Storage, mask};
use crate::observe::access::{AccessLine, AccessLog};
use crate::observe::alerts::{Alerts, Holder};
use crate::observe::metrics::LogGauges;
use crate::pure::limits::{Limiter, Period, Usage, key_scope, team_scope, upstream_scope};
use crate::pure::shape::Shaper;
use crate::pure::usage::{self, Reply, TokenUsage, UsageSource};
use crate::store::QUIET_RELEASE;
use crate::store::{CounterDelta, LogRecord, Store};

/// Queued body bytes past which records keep only a tail of their bodies.
const BYTE_BUDGET: usize = 64 * 1024 * 1024;
/// Rows written in one transaction at most. A batch is also sized to take about
/// [`BATCH_TIME`] (from the time rows took lately), so that counter deltas, written with
/// every batch, reach the store within ~100 ms however far behind the rows are.
const BATCH: usize = 1024;
const BATCH_MIN: usize = 8;
const BATCH_TIME: Duration = Duration::from_millis(20);
/// What a row is assumed to take before any was written (seconds): a first batch of ~150.
const INITIAL_ROW_COST: f64 = 200e-6;
/// How long the writer lets a batch gather: what a `kill -9` can lose of the log.
const BATCH_WAIT: Duration = Duration::from_millis(10);
/// Records or rows waiting longer than this mean the log is behind: its threads leave the
/// idle class for the batch one and stop stepping aside until it has caught up
/// (`sys::log_behind`), so what a `kill -9` loses stays a moment's worth on a saturated
/// core. Past [`BATCH_WAIT`] with room for one batch's write.
const CATCH_UP_AFTER: Duration = Duration::from_millis(25);
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Back-off between tries while the store cannot be reached.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// With `overflow: backpressure`, how long a request waits for room in the log before it
/// is refused (503 `log_backlog`).
const ROOM_WAIT: Duration = Duration::from_secs(30);

/// Paths whose answers carry token usage: a fact of the client's protocol.
pub fn counts_tokens(path: &str) -> bool {
    crate::protocol::ClientProtocol::of_path(path).counts_tokens(path)
}

enum Message {
    Record(Box<Pending>),
    Flush(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// Figures for `/v1/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct RecorderStats {
    /// Rows waiting for the writer (being accounted, in the backlog, being written).
    pub queued: AtomicUsize,
    pub queued_bytes: AtomicUsize,
    /// Records waiting for the accountant (shed rows included).
    pub unaccounted: AtomicUsize,
    pub written: AtomicU64,
    /// Rows lost to the store: refused one by one, a full disk, or a backlog past its
    /// bound while the store was unreachable.
    pub dropped: AtomicU64,
    /// Rows not written because the writer was behind (`storage.overflow`); their
    /// accounting was not shed.
    pub shed: AtomicU64,
    /// Rows written without (all of) their bodies, to keep the queue's memory bounded.
    pub trimmed: AtomicU64,
    pub write_errors: AtomicU64,
    /// Whether the store could not be reached at the last try.
    pub store_down: AtomicBool,
}

impl crate::observe::alerts::DropCounts for RecorderStats {
    /// Rows the log lost or shed: what the log-drops alert watches.
    fn drops(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed) + self.shed.load(Ordering::Relaxed)
    }
}

impl RecorderStats {
    /// The figures `/metrics` shows, read now.
    pub fn gauges(&self) -> LogGauges {
        LogGauges {
            queued: self.queued.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            trimmed: self.trimmed.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            store_up: !self.store_down.load(Ordering::Relaxed),
        }
    }
}

/// The configured model names (the only ones metrics and rollups show; others count as
/// `other`) and prices. Swapped whole by a config reload; the recorder outlives reloads.
#[derive(Debug, Default)]
pub struct Catalog {
    pub models: HashSet<String>,
    pub pricing: HashMap<String, Price>,
    /// A response cache hit counts its tokens and cost against its key (`cache.count_tokens`).
    pub cache_hits_count: bool,
}

impl Catalog {
    /// Every model name the config mentions: upstreams' `models` and `model_map` (both
    /// sides), keys' `models`, `pricing`.
    pub fn of(config: &Config) -> Self {
        let mut models: HashSet<String> = config.pricing.keys().cloned().collect();
        for upstream in &config.upstreams {
            models.extend(upstream.models.names.iter().cloned());
            for (alias, target) in &upstream.model_map {
                models.insert(alias.clone());
                models.insert(target.clone());
            }
        }
        for key in &config.access.keys {
            models.extend(key.models.names.iter().cloned());
        }
        Self {
            models,
            pricing: config.pricing.clone(),
            cache_hits_count: config.cache.as_ref().is_some_and(|c| c.count_tokens),
        }
    }

    /// The name statistics use for `model`.
    pub fn label(&self, model: Option<&str>) -> String {
        match model {
            None => String::new(),
            Some(model) if self.models.contains(model) => model.to_string(),
            Some(_) => "other".to_string(),
        }
    }
}

/// Where a finished record goes: to the log (whose accountant also writes its access line)
/// or, with storage off, to the access log alone. Cheap to clone into each response body.
#[derive(Clone, Debug)]
pub enum RecordSink {
    Log(LogSink),
    Access(AccessLog),
}

impl RecordSink {
    /// Hands over a finished record; never blocks.
    pub fn submit(&self, pending: Box<Pending>) {
        match self {
            Self::Log(sink) => sink.submit(*pending),
            Self::Access(access) => access.submit(pending),
        }
    }

    /// Bytes kept of each body: none when no log stores them.
    pub fn body_limit(&self) -> usize {
        match self {
            Self::Log(sink) => sink.body_limit,
            Self::Access(_) => 0,
        }
    }
}

/// The sending side of the log, cheap to clone into each response body.
#[derive(Clone)]
pub struct LogSink {
    sender: InboxSender<Message>,
    pub stats: Arc<RecorderStats>,
    /// Bytes kept of each body.
    pub body_limit: usize,
    capacity: usize,
    overflow: Overflow,
    /// Woken when the writer takes rows (requests waiting for room, with backpressure).
    room: Arc<tokio::sync::Notify>,
    shed_warning: Arc<crate::clock::Throttle>,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink")
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

pub struct Recorder {
    pub sink: LogSink,
    pub stats: Arc<RecorderStats>,
    pub store: Arc<dyn Store>,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    /// Alerts, set once they are started (they watch the log's own figures).
    alerts: Arc<OnceLock<Arc<Alerts>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts the accountant and the writer for `store`, restoring persisted counters into
    /// `limiter`.
    pub fn start(
        store: Arc<dyn Store>,
        config: &Config,
        limiter: Arc<Limiter>,
        metrics: Arc<crate::observe::metrics::Metrics>,
        shared: Option<Arc<crate::accounting::shared::SharedState>>,
        traces: Option<Arc<crate::observe::traces::Exporter>>,
        access_log: Option<AccessLog>,
    ) -> anyhow::Result<Self> {
        let storage: &Storage = &config.storage;
        restore_counters(store.as_ref(), &limiter)?;
        let (sender, receiver) = inbox();
        let stats = Arc::new(RecorderStats::default());
        let catalog = Arc::new(RwLock::new(Arc::new(Catalog::of(config))));
        let room = Arc::new(tokio::sync::Notify::new());
        let backlog = Arc::new(Backlog::default());
        let alerts = Arc::new(OnceLock::new());
        let accountant = Accountant {
            alerts: alerts.clone(),
            limiter,
            metrics,
            shared,
            traces,
            catalog: catalog.clone(),
            stats: stats.clone(),
            log_bodies: storage.log_bodies,
            access_log,
            backlog: backlog.clone(),
        };
        let writer = Writer {
            store: store.clone(),
            limiter: accountant.limiter.clone(),
            stats: stats.clone(),
            backlog,
            room: room.clone(),
            capacity: storage.queue,
            retention: Duration::from_secs(u64::from(storage.retention_days) * 86_400),
            max_rows: storage.max_rows,
            refused_warning: crate::clock::Throttle::new(Duration::from_secs(1)),
            row_cost: std::cell::Cell::new(INITIAL_ROW_COST),
            unreleased_rows: std::cell::Cell::new(0),
        };
        let accountant = std::thread::Builder::new()
            .name("sluice-account".into())
            .spawn(move || accountant.run(receiver))?;
        let writer = std::thread::Builder::new()
            .name("sluice-log".into())
            .spawn(move || writer.run())?;
        Ok(Self {
            sink: LogSink {
                sender,
                stats: stats.clone(),
                body_limit: storage.body_limit,
                capacity: storage.queue,
                overflow: storage.overflow,
                room,
                shed_warning: Arc::new(crate::clock::Throttle::new(Duration::from_secs(1))),
            },
            stats,
            store,
            catalog,
            alerts,
            threads: Mutex::new(vec![accountant, writer]),
        })
    }

    /// Sends budget alerts from now on.
    pub fn set_alerts(&self, alerts: Arc<Alerts>) {
        let _ = self.alerts.set(alerts);
    }

    /// Takes the model names and prices of a (re)loaded config.
    pub fn configure(&self, config: &Config) {
        let catalog = Arc::new(Catalog::of(config));
        match self.catalog.write() {
            Ok(mut slot) => *slot = catalog,
            Err(poisoned) => *poisoned.into_inner() = catalog,
        }
    }

    /// Queues a finished request; never blocks.
    pub fn submit(&self, pending: Pending) {
        self.sink.submit(pending);
    }

    /// With `overflow: backpressure`, waits while the log's queue is full; `Err` when it
    /// stays full too long. Other policies never wait.
    pub async fn wait_for_room(&self) -> Result<(), crate::http::error::ApiError> {
        let sink = &self.sink;
        if sink.overflow != Overflow::Backpressure {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        while sink.stats.queued.load(Ordering::Relaxed) >= sink.capacity {
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::http::error::ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "log_backlog",
                    "the request log is behind; try again shortly",
                ));
            }
            let notified = sink.room.notified();
            if sink.stats.queued.load(Ordering::Relaxed) < sink.capacity {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
        Ok(())
    }

    /// Waits until everything queued so far is written (or given up).
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.sink.sender.send(Message::Flush(done), true).is_ok() {
            let _ = wait.await;
        }
    }

    /// Writes what is queued and stops both stages. Later submissions are dropped.
    pub fn shutdown(&self) {
        let _ = self.sink.sender.send(Message::Stop, true);
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => Vec::new(),
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl LogSink {
    /// Queues a finished request; never blocks. Past the byte budget a record keeps only
    /// the tail of its bodies; past the queue, `overflow` says what its row gives up.
    pub fn submit(&self, mut pending: Pending) {
        let queued = self.stats.queued.load(Ordering::Relaxed);
        self.apply_overflow(&mut pending, queued);
        if pending.keep_row {
            self.accept_row(pending);
        } else {
            self.accept_shed(pending, queued);
        }
    }

    /// Decides what a record gives up to a long queue: with `shed_bodies`, its bodies past
    /// half the queue; with either shedding policy, its row once the queue is full.
    fn apply_overflow(&self, pending: &mut Pending, queued: usize) {
        let full = queued >= self.capacity;
        match self.overflow {
            Overflow::ShedBodies | Overflow::ShedRows if full => pending.keep_row = false,
            Overflow::ShedBodies if queued >= self.capacity.div_ceil(2) => {
                pending.drop_bodies();
                self.stats.trimmed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Hands a shed record to the accountant, stripped to what accounting needs: it is
    /// counted as shed and unaccounted, never as queued.
    fn accept_shed(&self, mut pending: Pending, queued: usize) {
        let stats = &self.stats;
        pending.drop_bodies();
        pending.request_headers.clear();
        pending.response_headers.clear();
        stats.shed.fetch_add(1, Ordering::Relaxed);
        if self.shed_warning.ready() {
            tracing::warn!(
                queued,
                "the request log is behind: rows are shed (accounting is kept); see shed in /v1/status"
            );
        }
        stats.unaccounted.fetch_add(1, Ordering::Relaxed);
        if self
            .sender
            .send(Message::Record(Box::new(pending)), false)
            .is_err()
        {
            stats.unaccounted.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Hands a record that becomes a row to the accountant, its bodies cut to tails when
    /// they would pass the byte budget; it counts as queued until written or given up.
    fn accept_row(&self, mut pending: Pending) {
        let stats = &self.stats;
        if pending.keep_bodies
            && stats.queued_bytes.load(Ordering::Relaxed) + pending.body_bytes() > BYTE_BUDGET
        {
            pending.request_body = None;
            pending.response_body.keep_tail(TAIL);
            stats.trimmed.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = pending.body_bytes();
        stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        stats.queued.fetch_add(1, Ordering::Relaxed);
        stats.unaccounted.fetch_add(1, Ordering::Relaxed);
        if self
            .sender
            .send(Message::Record(Box::new(pending)), false)
            .is_err()
        {
            // The recorder has stopped (shutdown).
            stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            stats.unaccounted.fetch_sub(1, Ordering::Relaxed);
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Loads the counters of the current windows, so limits hold across a restart.
fn restore_counters(store: &dyn Store, limiter: &Limiter) -> anyhow::Result<()> {
    let now = crate::clock::unix_now();
    let windows: Vec<(Period, i64)> = Period::ALL.iter().map(|p| (*p, p.window(now))).collect();
    for delta in store.counters(&windows)? {
        limiter.restore(&delta.scope, delta.period, delta.window, delta.usage);
    }
    Ok(())
}

type Counters = HashMap<(String, Period, i64), Usage>;

/// What the accountant hands the writer: rows and counter deltas not yet written.
#[derive(Default)]
struct Backlog {
    state: Mutex<BacklogState>,
    ready: Condvar,
}

#[derive(Default)]
struct BacklogState {
    rows: VecDeque<(LogRecord, usize)>,
    counters: Counters,
    /// When the oldest unwritten item arrived.
    since: Option<Instant>,
    /// Rows handed over so far, in all, and flushes waiting for a count to be written.
    handed: u64,
    /// Batches taken by the writer so far: a flush is done only by a batch taken after it,
    /// which holds the counters of every record accounted before it (a shed record adds
    /// counters but no row, so rows alone cannot tell).
    taken: u64,
    flushes: Vec<(u64, u64, tokio::sync::oneshot::Sender<()>)>,
    /// No batch before this (after a store that took nothing), unless flushed or stopping.
    not_before: Option<Instant>,
    stopping: bool,
}

impl BacklogState {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.counters.is_empty()
    }
}

fn merge(into: &mut Counters, from: Counters) {
    for (key, usage) in from {
        let slot = into.entry(key).or_default();
        slot.requests += usage.requests;
        slot.tokens += usage.tokens;
        slot.cost += usage.cost;
    }
}

fn lock(backlog: &Backlog) -> std::sync::MutexGuard<'_, BacklogState> {
    backlog
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The first stage: every record, shed or not, is accounted here.
struct Accountant {
    limiter: Arc<Limiter>,
    metrics: Arc<crate::observe::metrics::Metrics>,
    /// Limits shared through Redis, settled from this thread through the gateway's runtime.
    shared: Option<Arc<crate::accounting::shared::SharedState>>,
    traces: Option<Arc<crate::observe::traces::Exporter>>,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    stats: Arc<RecorderStats>,
    log_bodies: bool,
    /// Where each record's access line goes (`log.access`).
    access_log: Option<AccessLog>,
    alerts: Arc<OnceLock<Arc<Alerts>>>,
    backlog: Arc<Backlog>,
}

impl Accountant {
    /// The accountant's loop: accounts every record as it arrives, passes flushes on to
    /// the writer, and at a stop accounts what was sent before it.
    fn run(self, mut inbox: InboxReader<Message>) {
        // Woken by requests: in the batch class, a wake never switches a request thread
        // out; the inbox wakes it about once a millisecond under load, not per record; and
        // it steps aside for requests between records (`sys::step_aside`).
        crate::sys::set_thread_batch();
        let mut taken = Vec::new();
        let mut stopped = false;
        while !stopped && inbox.take(&mut taken) {
            // Records that waited long mean it is behind: the log takes its ordinary share
            // until they wait no longer (`sys::log_behind`).
            crate::sys::log_behind(
                crate::sys::LogPart::Accountant,
                inbox.waited() >= CATCH_UP_AFTER,
            );
            let mut messages = taken.drain(..);
            while let Some(message) = messages.next() {
                match message {
                    Message::Record(pending) => {
                        self.account(*pending);
                        crate::sys::step_aside();
                    }
                    Message::Flush(done) => {
                        let mut state = lock(&self.backlog);
                        let (handed, taken) = (state.handed, state.taken);
                        state.flushes.push((handed, taken, done));
                        state.since.get_or_insert_with(Instant::now);
                        self.backlog.ready.notify_one();
                    }
                    Message::Stop => {
                        // Records sent before the inbox closed are accounted; later ones
                        // are refused to their senders (counted as dropped there).
                        let rest: Vec<Message> = messages.by_ref().collect();
                        for message in rest.into_iter().chain(inbox.close()) {
                            if let Message::Record(pending) = message {
                                self.account(*pending);
                            }
                        }
                        stopped = true;
                    }
                }
            }
        }
        self.stop();
    }

    /// Every record is accounted: the writer finishes what is queued and stops.
    fn stop(&self) {
        lock(&self.backlog).stopping = true;
        self.backlog.ready.notify_one();
    }

    fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(catalog) => catalog.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Accounts one record (settlements, metrics, traces, counter deltas) and hands its
    /// row and deltas to the writer.
    fn account(&self, mut pending: Pending) {
        let catalog = self.catalog();
        let bytes = pending.body_bytes();
        let reshape = pending.reshape.take();
        let (record, tokens, cost) = self.finish(&pending, &catalog, reshape);
        let counters = self.settle(&pending, tokens, cost);
        if let Some(access_log) = &self.access_log {
            access_log.write(AccessLine::of_record(&record));
        }
        self.metrics.observe(&record);
        if let (Some(traces), Some(trace)) = (&self.traces, &pending.trace) {
            traces.export(crate::observe::traces::spans(
                &record,
                trace,
                &pending.attempts,
            ));
        }
        let row = pending.keep_row.then_some((record, bytes));
        self.hand_over(row, counters);
    }

    /// Settles what the request used into the limiter (and Redis) for its key and its
    /// upstream, and returns the counter deltas the store must get: the key's request,
    /// tokens and cost, a request per try at each upstream, the answering upstream's tokens
    /// and cost.
    fn settle(&self, pending: &Pending, tokens: u64, cost: f64) -> Counters {
        let mut counters: Counters = HashMap::new();
        let at = pending.started_ms.div_euclid(1000);
        if let Some(key) = &pending.key {
            // A team's keys are counted in the team's scope too, alike.
            let team = key.team.as_ref().map(|t| team_scope(&t.name));
            for scope in std::iter::once(key_scope(&key.name)).chain(team) {
                self.settle_key(&scope, pending, at, tokens, cost);
                let requests = u64::from(pending.ticket.is_some());
                add_usage(
                    &mut counters,
                    scope,
                    at,
                    Usage {
                        requests,
                        tokens,
                        cost,
                    },
                );
            }
            let key_budget = key.budget.as_ref();
            let holder = Holder {
                kind: "key",
                name: &key.name,
            };
            self.check_budget(holder, key_budget, &key_scope(&key.name), at);
            if let Some(team) = &key.team {
                let team_budget = team.budget.as_ref();
                let holder = Holder {
                    kind: "team",
                    name: &team.name,
                };
                self.check_budget(holder, team_budget, &team_scope(&team.name), at);
            }
        }
        for attempt in &pending.attempts {
            let tried = Usage {
                requests: 1,
                tokens: 0,
                cost: 0.0,
            };
            add_usage(&mut counters, upstream_scope(&attempt.upstream), at, tried);
        }
        if let Some(upstream) = &pending.upstream {
            let scope = upstream_scope(upstream);
            self.settle_upstream(&scope, at, tokens, cost);
            let used = Usage {
                requests: 0,
                tokens,
                cost,
            };
            add_usage(&mut counters, scope, at, used);
        }
        counters.retain(|_, usage| usage.requests > 0 || usage.tokens > 0 || usage.cost > 0.0);
        counters
    }

    /// Raises a key's or a team's budget alerts (80%, 100%) its use has reached in the
    /// current window.
    fn check_budget(&self, holder: Holder<'_>, budget: Option<&Budget>, scope: &str, at: i64) {
        let (Some(alerts), Some(budget)) = (self.alerts.get(), budget) else {
            return;
        };
        let period = Period::from(budget.period);
        let usage = self.limiter.usage(scope, period, at);
        let window = period.window(at);
        if let Some(limit) = budget.tokens {
            alerts.budget(
                holder,
                period.name(),
                window,
                usage.tokens as f64,
                limit as f64,
            );
        }
        if let Some(limit) = budget.cost {
            alerts.budget(holder, period.name(), window, usage.cost, limit);
        }
    }

    /// Adds what the answering upstream used to its windows, here and in Redis.
    fn settle_upstream(&self, scope: &str, at: i64, tokens: u64, cost: f64) {
        let signed = i64::try_from(tokens).unwrap_or(i64::MAX);
        self.limiter.settle(scope, at, signed, cost);
        if let Some(shared) = &self.shared {
            shared.settle(Settlement {
                scope: scope.to_string(),
                at: None,
                requests: 0,
                tokens: signed,
                cost,
            });
        }
    }

    /// Puts a row (unless it was shed) and counter deltas in the backlog, waking the
    /// writer when a batch starts gathering or is full.
    fn hand_over(&self, row: Option<(LogRecord, usize)>, counters: Counters) {
        let mut state = lock(&self.backlog);
        merge(&mut state.counters, counters);
        if let Some(row) = row {
            state.rows.push_back(row);
            state.handed += 1;
        }
        self.stats.unaccounted.fetch_sub(1, Ordering::Relaxed);
        let behind = match state.since {
            None => {
                state.since = Some(Instant::now());
                self.backlog.ready.notify_one();
                false
            }
            Some(since) => {
                if state.rows.len() >= BATCH {
                    self.backlog.ready.notify_one();
                }
                since.elapsed() >= CATCH_UP_AFTER
            }
        };
        drop(state);
        if behind {
            crate::sys::log_behind(crate::sys::LogPart::Writer, true);
        }
    }

    /// Corrects the key's counts by the answer: what it used less what its admission
    /// reserved, in the windows of that admission. A request counted in Redis is counted
    /// here by its tokens only (this instance's fallback view); one counted here is added
    /// to Redis whole.
    fn settle_key(&self, scope: &str, pending: &Pending, at: i64, tokens: u64, cost: f64) {
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        let ticket = pending.ticket;
        let reserved = ticket.map(|t| t.reserve).unwrap_or_default();
        let reserved_tokens = i64::try_from(reserved.tokens).unwrap_or(i64::MAX);
        match ticket {
            Some(ticket) if ticket.shared => {
                self.limiter.settle(scope, at, tokens, cost);
                if let Some(shared) = &self.shared {
                    shared.settle(Settlement {
                        scope: scope.to_string(),
                        at: Some(ticket.at),
                        requests: 0,
                        tokens: tokens - reserved_tokens,
                        cost: cost - reserved.cost,
                    });
                }
            }
            _ => {
                let local_at = ticket.map_or(at, |t| t.at);
                self.limiter.settle(
                    scope,
                    local_at,
                    tokens - reserved_tokens,
                    cost - reserved.cost,
                );
                if let Some(shared) = &self.shared {
                    shared.settle(Settlement {
                        scope: scope.to_string(),
                        at: None,
                        requests: i64::from(ticket.is_some()),
                        tokens,
                        cost,
                    });
                }
            }
        }
    }

    /// Turns a pending record into its stored form; returns it with its tokens and cost.
    fn finish(
        &self,
        pending: &Pending,
        catalog: &Catalog,
        reshape: Option<Shaper>,
    ) -> (LogRecord, u64, f64) {
        let response = pending.response_body.bytes();
        let content_type = pending.response_content_type.as_deref().unwrap_or("");
        let reply = read_reply(pending, &response, content_type);
        let (token_usage, source) = token_usage(pending, &reply);
        let mut cost = match (price(pending, catalog), token_usage) {
            (Some(price), Some(u)) => Some(usage::cost(*price, u)),
            _ => None,
        };
        // A cache hit saved what the upstream would have charged; it costs the key
        // nothing unless hits are counted.
        let hit = pending.cache == Some(CacheNote::Hit);
        let saved_cost = cost.filter(|_| hit);
        let mut tokens = token_usage.map_or(0, |u| u.total);
        if hit && !catalog.cache_hits_count {
            cost = cost.map(|_| 0.0);
            tokens = 0;
        }
        let accounted = Accounted {
            usage: token_usage,
            source,
            cost,
            saved_cost,
        };
        let log_bodies = self.log_bodies && pending.keep_bodies;
        // What the client received, when it differs from the upstream's bytes.
        let received = if log_bodies {
            received(reshape, &response, pending.closing.as_ref())
        } else {
            None
        };
        let shown = Shown {
            log_bodies,
            response: &response,
            received: received.as_ref(),
            content_type,
            reply: &reply,
        };
        let mut record = shape_row(pending, catalog, &accounted, &shown);
        record.sanitise();
        (record, tokens, cost.unwrap_or(0.0))
    }
}

/// What the client received, when it differs from the upstream's bytes: those bytes
/// through the relay's shaper (a twin of it), then sluice's closing event if a stream
/// broke. `None` when nothing changed them, or when shaping gave up (an event past its
/// bound), as the relay did.
fn received(reshape: Option<Shaper>, upstream: &Bytes, closing: Option<&Bytes>) -> Option<Bytes> {
    if reshape.is_none() && closing.is_none() {
        return None;
    }
    let mut out = match reshape {
        Some(mut shaper) => {
            let mut out = shaper.push(upstream.clone()).ok()?.to_vec();
            out.extend_from_slice(&shaper.finish());
            out
        }
        None => upstream.to_vec(),
    };
    if let Some(closing) = closing {
        out.extend_from_slice(closing);
    }
    (out != upstream[..]).then(|| Bytes::from(out))
}

/// Adds `usage` to `scope`'s windows (every period) of the second `at`.
fn add_usage(counters: &mut Counters, scope: String, at: i64, usage: Usage) {
    for period in Period::ALL {
        let slot = counters
            .entry((scope.clone(), period, period.window(at)))
            .or_default();
        slot.requests += usage.requests;
        slot.tokens += usage.tokens;
        slot.cost += usage.cost;
    }
}

/// The answer as usage sees it: a reassembled stream, a JSON body, or nothing to read.
fn read_reply(pending: &Pending, response: &Bytes, content_type: &str) -> Reply {
    if pending.stream {
        usage::read_stream_reply(response)
    } else if content_type.contains("json") {
        usage::read_json_reply(response)
    } else {
        Reply::default()
    }
}

/// The tokens a request used: the upstream's count when it gave one, else the tokenizer's
/// estimate for a whole successful answer on a path that counts tokens, else none.
fn token_usage(pending: &Pending, reply: &Reply) -> (Option<TokenUsage>, Option<UsageSource>) {
    if let Some(counted) = reply.usage {
        return (Some(counted), Some(UsageSource::Upstream));
    }
    let succeeded = (200..300).contains(&pending.status);
    if !(succeeded && counts_tokens(&pending.path) && !pending.response_body.truncated()) {
        return (None, None);
    }
    let request_json: Option<Value> = pending
        .request_body
        .as_ref()
        .and_then(|b| serde_json::from_slice(b).ok());
    let model_for_tokens = pending
        .upstream_model
        .as_deref()
        .or(pending.model.as_deref())
        .unwrap_or("gpt-4o");
    (
        Some(usage::estimate(
            model_for_tokens,
            request_json.as_ref(),
            reply,
        )),
        Some(UsageSource::Tokenizer),
    )
}

/// The price of the model that served (the client's, or the fallback that answered for
/// it), else of the model the upstream was asked for.
fn price<'a>(pending: &Pending, catalog: &'a Catalog) -> Option<&'a Price> {
    pending
        .served_model
        .as_deref()
        .or(pending.model.as_deref())
        .and_then(|m| catalog.pricing.get(m))
        .or_else(|| {
            pending
                .upstream_model
                .as_deref()
                .and_then(|m| catalog.pricing.get(m))
        })
}

/// What accounting made of a record.
struct Accounted {
    usage: Option<TokenUsage>,
    source: Option<UsageSource>,
    cost: Option<f64>,
    /// What a cache hit saved.
    saved_cost: Option<f64>,
}

/// What a row may show of a record's bodies.
struct Shown<'a> {
    /// Whether bodies are logged at all (`storage.log_bodies`, and not shed).
    log_bodies: bool,
    /// The upstream's answer as captured.
    response: &'a Bytes,
    /// What the client received instead, when shaping changed it.
    received: Option<&'a Bytes>,
    /// The response's content type (`""` when it had none).
    content_type: &'a str,
    reply: &'a Reply,
}

impl Shown<'_> {
    /// A body as the row shows it: its text (marked when truncated), a placeholder for a
    /// binary one, or nothing when bodies are not logged.
    fn body_text(&self, bytes: &Bytes, textual: bool, truncated: bool) -> Option<String> {
        if !self.log_bodies || bytes.is_empty() {
            return None;
        }
        if !textual {
            return Some(format!(
                "<{} bytes of {}>",
                bytes.len(),
                if self.content_type.is_empty() {
                    "binary"
                } else {
                    self.content_type
                }
            ));
        }
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        if truncated {
            text.push_str("\n…[truncated]");
        }
        Some(text)
    }
}

/// The row a record becomes: its figures, its tries, masked headers, the bodies and the
/// reassembled reply when they are logged, and the model's statistics label.
fn shape_row(
    pending: &Pending,
    catalog: &Catalog,
    accounted: &Accounted,
    shown: &Shown<'_>,
) -> LogRecord {
    let content_type = shown.content_type;
    let textual = content_type.is_empty()
        || content_type.contains("json")
        || content_type.starts_with("text/");
    let request_textual = pending
        .request_headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.contains("json") || ct.starts_with("text/"));
    let token_usage = accounted.usage;
    let (log_bodies, reply) = (shown.log_bodies, shown.reply);
    let truncated = pending.response_body.truncated();
    LogRecord {
        id: pending.id.clone(),
        ts: pending.started_ms,
        client_ip: pending.client_ip.to_canonical().to_string(),
        key_name: pending.key_label.clone(),
        method: pending.method.to_string(),
        path: pending.path.clone(),
        model: pending.model.clone(),
        user: pending.user.as_deref().map(crate::store::clip_user),
        upstream_model: pending.upstream_model.clone(),
        upstream: pending.upstream.clone(),
        upstream_key: pending.upstream_key.clone(),
        status: pending.status,
        latency_ms: millis(pending.latency.unwrap_or_else(|| pending.started.elapsed())),
        ttfb_ms: pending.first_byte.map(millis),
        prompt_tokens: token_usage.map(|u| u.prompt),
        completion_tokens: token_usage.map(|u| u.completion),
        total_tokens: token_usage.map(|u| u.total),
        cost: accounted.cost,
        usage_source: accounted.source.map(|s| s.name().to_string()),
        stream: pending.stream,
        error: pending.error.clone(),
        tries: u32::try_from(pending.attempts.len()).unwrap_or(u32::MAX),
        attempts: attempts_json(&pending.attempts),
        request_headers: masked_headers(&pending.request_headers).to_string(),
        response_headers: masked_headers(&pending.response_headers).to_string(),
        request_body: pending
            .request_body
            .as_ref()
            .and_then(|b| shown.body_text(b, request_textual, false)),
        response_body: shown.body_text(
            shown.received.unwrap_or(shown.response),
            textual,
            truncated,
        ),
        upstream_response_body: shown
            .received
            .and_then(|_| shown.body_text(shown.response, textual, truncated)),
        reply_text: reply.text.clone().filter(|_| log_bodies),
        reply_tool_calls: (!reply.tool_calls.is_empty() && log_bodies)
            .then(|| Value::Array(reply.tool_calls.clone()).to_string()),
        model_label: Some(catalog.label(pending.model.as_deref())),
        cache: pending.cache.map(|note| note.name().to_string()),
        saved_cost: accounted.saved_cost,
    }
}

/// The tries as the row's JSON array: upstream, key, status, error, milliseconds.
fn attempts_json(attempts: &[Attempt]) -> String {
    let attempts: Vec<Value> = attempts
        .iter()
        .map(|a| {
            json!({"upstream": a.upstream, "model": a.model, "key": a.key, "status": a.status, "error": a.error,
                "ms": (a.elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0})
        })
        .collect();
    Value::Array(attempts).to_string()
}

/// One batch taken from the backlog.
struct Batch {
    rows: Vec<LogRecord>,
    /// Each row's queued body bytes.
    sizes: Vec<usize>,
    counters: Counters,
    /// The backlog's `handed` count this batch completes: flushes up to it are done once
    /// it is written (or given up).
    through: u64,
    /// Its number among the batches taken: it completes only flushes made before it.
    taken: u64,
    /// Whether it took every row waiting: the log has caught up.
    drained: bool,
}

/// The writer's view of a store it cannot reach: the next back-off, and since when.
struct Outage {
    retry: Duration,
    since: Option<Instant>,
}

/// The second stage: the backlog to the store, batch by batch.
struct Writer {
    store: Arc<dyn Store>,
    /// Its settlements queued by the accountant are applied when a burst is over.
    limiter: Arc<Limiter>,
    stats: Arc<RecorderStats>,
    backlog: Arc<Backlog>,
    room: Arc<tokio::sync::Notify>,
    /// Rows kept while the store cannot be reached; the oldest past it are dropped.
    capacity: usize,
    retention: Duration,
    max_rows: u64,
    refused_warning: crate::clock::Throttle,
    /// Seconds a row took to write lately (a moving average).
    row_cost: std::cell::Cell<f64>,
    /// Rows written since the store's caches were last released.
    unreleased_rows: std::cell::Cell<usize>,
}

impl Writer {
    /// Rows for the next batch: as many as fit in `BATCH_TIME` lately.
    fn batch_limit(&self) -> usize {
        let fit = BATCH_TIME.as_secs_f64() / self.row_cost.get().max(1e-7);
        (fit as usize).clamp(BATCH_MIN, BATCH)
    }

    /// The writer's loop: take a batch, write it (or wait out an outage), and apply
    /// retention every [`RETENTION_EVERY`]; ends once stopping with nothing left.
    fn run(self) {
        // Idle class while the log keeps up: a request waking on its core switches it out
        // at once, even inside a commit (the one long call, which cannot step aside); the
        // store steps aside between rows (`sys::step_aside`). Batch class while the log
        // is behind (the accountant says so, `CATCH_UP_AFTER`), so a saturated core still
        // gives it its share.
        let _class = crate::sys::idle_while_keeping_up();
        self.retain();
        let mut last_retention = Instant::now();
        let mut outage = Outage {
            retry: RETRY_FIRST,
            since: None,
        };
        while let Some(batch) = self.take() {
            if batch.drained {
                crate::sys::log_behind(crate::sys::LogPart::Writer, false);
            }
            let (through, taken) = (batch.through, batch.taken);
            let rows = batch.rows.len();
            match self.write(batch) {
                Ok(()) => {
                    self.unreleased_rows
                        .set(self.unreleased_rows.get().saturating_add(rows));
                    self.flushed(through, taken);
                    self.store_back(&mut outage);
                }
                Err(reason) => {
                    if !self.store_away(&mut outage, &reason) {
                        self.give_up();
                        return;
                    }
                }
            }
            if last_retention.elapsed() >= RETENTION_EVERY {
                last_retention = Instant::now();
                self.retain();
            }
        }
    }

    /// After a batch was written: the back-off starts over, and an outage, if there was
    /// one, is over.
    fn store_back(&self, outage: &mut Outage) {
        outage.retry = RETRY_FIRST;
        if let Some(since) = outage.since.take() {
            self.stats.store_down.store(false, Ordering::Relaxed);
            tracing::info!(
                "the log store is back after {:.1} s; queued records are written",
                since.elapsed().as_secs_f64()
            );
        }
    }

    /// After the store could not be reached: marks it down (saying so once per outage) and
    /// waits out the back-off; `false` when stopping and the back-off is spent, so what is
    /// left must be given up.
    fn store_away(&self, outage: &mut Outage, reason: &str) -> bool {
        self.stats.store_down.store(true, Ordering::Relaxed);
        if outage.since.is_none() {
            outage.since = Some(Instant::now());
            tracing::error!(
                "the log store cannot be reached ({reason}); up to {} records stay queued, retrying with back-off",
                self.capacity.max(BATCH)
            );
        }
        if lock(&self.backlog).stopping && outage.retry >= RETRY_MAX {
            return false;
        }
        std::thread::sleep(outage.retry);
        outage.retry = (outage.retry * 2).min(RETRY_MAX);
        true
    }

    /// Waits for rows or counter deltas and lets a batch gather for up to `BATCH_WAIT`;
    /// `None` when stopping with nothing left.
    fn take(&self) -> Option<Batch> {
        let mut state = lock(&self.backlog);
        loop {
            if state.is_empty() {
                // Everything handed so far was written or given up.
                for (_, _, done) in state.flushes.drain(..) {
                    let _ = done.send(());
                }
                state.since = None;
                if state.stopping {
                    return None;
                }
                let burst = self.unreleased_rows.get() >= crate::store::BURST_ROWS;
                state = self
                    .backlog
                    .ready
                    .wait_timeout(
                        state,
                        if burst {
                            QUIET_RELEASE
                        } else {
                            RETENTION_EVERY
                        },
                    )
                    .map_or_else(|e| e.into_inner().0, |(s, _)| s);
                if burst && state.is_empty() && !state.stopping {
                    // The queue grew to hold the burst's rows and kept its room.
                    state.rows.shrink_to_fit();
                    // Not under the backlog's lock: submitters never wait for it.
                    drop(state);
                    self.release_caches();
                    state = lock(&self.backlog);
                }
                continue;
            }
            let now = Instant::now();
            let limit = self.batch_limit();
            let mut due = state.since.map_or(now, |t| t + BATCH_WAIT);
            if state.rows.len() >= limit {
                due = now;
            }
            if let Some(not_before) = state.not_before {
                due = due.max(not_before);
            }
            if now < due && !state.stopping && state.flushes.is_empty() {
                state = self
                    .backlog
                    .ready
                    .wait_timeout(state, due - now)
                    .map_or_else(|e| e.into_inner().0, |(s, _)| s);
                continue;
            }
            state.not_before = None;
            let take = state.rows.len().min(limit);
            let (rows, sizes): (Vec<LogRecord>, Vec<usize>) = state.rows.drain(..take).unzip();
            let counters = std::mem::take(&mut state.counters);
            let through = state.handed - state.rows.len() as u64;
            state.since = (!state.rows.is_empty()).then(Instant::now);
            state.taken += 1;
            return Some(Batch {
                rows,
                sizes,
                counters,
                through,
                taken: state.taken,
                drained: state.rows.is_empty(),
            });
        }
    }

    /// The burst is over: the limiter's queued settlements are applied, and the store's
    /// caches and the heap they and the burst's records freed go back (a trim takes milliseconds; this is the writer's thread, not a worker).
    fn release_caches(&self) {
        self.unreleased_rows.set(0);
        self.limiter.apply_queued();
        self.store.release_caches();
        crate::sys::trim_heap();
    }

    /// Completes the flushes waiting for rows up to `through` that were made before the
    /// written batch (number `taken`) was taken.
    fn flushed(&self, through: u64, taken: u64) {
        let mut state = lock(&self.backlog);
        let (done, waiting): (Vec<_>, Vec<_>) = state
            .flushes
            .drain(..)
            .partition(|(at, after, _)| *at <= through && *after < taken);
        state.flushes = waiting;
        drop(state);
        for (_, _, done) in done {
            let _ = done.send(());
        }
    }

    /// Writes a batch; `Err` (with the reason) when the store cannot be reached, the batch
    /// then back in the backlog. A record the store refuses is isolated and dropped.
    fn write(&self, batch: Batch) -> Result<(), String> {
        let deltas = deltas(&batch.counters);
        let started = Instant::now();
        match self.store.write(&batch.rows, &deltas) {
            Ok(()) => {
                if !batch.rows.is_empty() {
                    let per_row = started.elapsed().as_secs_f64() / batch.rows.len() as f64;
                    let average = self.row_cost.get();
                    self.row_cost.set(if average == 0.0 {
                        per_row
                    } else {
                        0.7 * average + 0.3 * per_row
                    });
                }
                self.stats
                    .written
                    .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
            }
            Err(error) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(reason) = self.unreachable(&error) {
                    self.requeue(batch);
                    return Err(reason);
                }
                let count = batch.rows.len();
                self.isolate(batch.rows, &deltas, batch.counters, &error);
                self.release(count, batch.sizes.iter().sum());
                return Ok(());
            }
        }
        self.release(batch.rows.len(), batch.sizes.iter().sum());
        Ok(())
    }

    /// Why the store cannot be reached, if that is what `error` means.
    fn unreachable(&self, error: &anyhow::Error) -> Option<String> {
        if let Some(unavailable) = crate::store::unavailable(error) {
            return Some(unavailable.to_string());
        }
        match self.store.ping() {
            Ok(()) => None,
            Err(ping) => Some(format!("{ping:#}")),
        }
    }

    /// A batch the store refused while it answers: the counters alone, then the rows in
    /// halves until each refused record is found; those are dropped and counted.
    fn isolate(
        &self,
        rows: Vec<LogRecord>,
        deltas: &[CounterDelta],
        counters: Counters,
        error: &anyhow::Error,
    ) {
        if !deltas.is_empty() && self.store.write(&[], deltas).is_err() {
            // Nothing can be written (a full disk): the counters wait for a later try.
            let mut state = lock(&self.backlog);
            merge(&mut state.counters, counters);
            state.not_before = Some(Instant::now() + RETRY_MAX);
            drop(state);
            self.drop_rows(rows.len(), error);
            return;
        }
        let mut parts = vec![rows];
        while let Some(mut part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.store.write(&part, &[]) {
                Ok(()) => {
                    self.stats
                        .written
                        .fetch_add(part.len() as u64, Ordering::Relaxed);
                }
                Err(error) if part.len() == 1 => self.drop_rows(1, &error),
                Err(_) => {
                    let half = part.split_off(part.len() / 2);
                    parts.push(half);
                    parts.push(part);
                }
            }
        }
    }

    fn drop_rows(&self, count: usize, error: &anyhow::Error) {
        if count == 0 {
            return;
        }
        self.stats
            .dropped
            .fetch_add(count as u64, Ordering::Relaxed);
        if self.refused_warning.ready() {
            tracing::error!("the log store refused {count} record(s): {error:#}");
        }
    }

    /// Puts a batch back at the head of the backlog, keeping at most `capacity` rows (the
    /// oldest past it are dropped and counted).
    fn requeue(&self, batch: Batch) {
        let mut state = lock(&self.backlog);
        merge(&mut state.counters, batch.counters);
        for entry in batch.rows.into_iter().zip(batch.sizes).rev() {
            state.rows.push_front(entry);
        }
        let (mut lost, mut bytes) = (0, 0);
        while state.rows.len() > self.capacity.max(BATCH) {
            if let Some((_, size)) = state.rows.pop_front() {
                lost += 1;
                bytes += size;
            }
        }
        state.since.get_or_insert_with(Instant::now);
        drop(state);
        if lost > 0 {
            self.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            self.release(lost, bytes);
        }
    }

    /// Rows written, refused or given up leave the queue.
    fn release(&self, rows: usize, bytes: usize) {
        let stats = &self.stats;
        let _ = stats
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(rows))
            });
        let _ = stats
            .queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(bytes))
            });
        self.room.notify_waiters();
    }

    /// At shutdown with the store unreachable: what is left is lost, and counted.
    fn give_up(&self) {
        let mut state = lock(&self.backlog);
        let lost = state.rows.len();
        let bytes = state.rows.iter().map(|(_, size)| size).sum();
        state.rows.clear();
        state.counters.clear();
        for (_, _, done) in state.flushes.drain(..) {
            let _ = done.send(());
        }
        drop(state);
        self.release(lost, bytes);
        self.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        tracing::error!("stopping with the log store unreachable: {lost} queued records are lost");
    }

    /// Retention: removes rows older than `storage.retention_days` and the oldest past
    /// `storage.max_rows`.
    fn retain(&self) {
        let now_ms = crate::clock::unix_now_ms();
        let before = now_ms - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX / 2);
        match self.store.retain(before, self.max_rows) {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "log retention removed old requests"),
            Err(error) => tracing::warn!("log retention failed: {error:#}"),
        }
    }
}

fn deltas(counters: &Counters) -> Vec<CounterDelta> {
    counters
        .iter()
        .map(|((scope, period, window), usage)| CounterDelta {
            scope: scope.clone(),
            period: *period,
            window: *window,
            usage: *usage,
        })
        .collect()
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Headers as a JSON object, credentials masked (`Bearer fk-…a1b2`).
pub fn masked_headers(headers: &HeaderMap) -> Value {
    let mut object = serde_json::Map::new();
    for (name, value) in headers {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let shown =
            if crate::http::headers::is_credential_header(name.as_str()) || value.is_sensitive() {
                match text.split_once(' ') {
                    Some((scheme, secret))
                        if scheme.eq_ignore_ascii_case("bearer")
                            || scheme.eq_ignore_ascii_case("basic") =>
                    {
                        format!("{scheme} {}", mask(secret.trim()))
                    }
                    _ => mask(&text),
                }
            } else {
                text
            };
        object.insert(name.to_string(), Value::String(shown));
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::records::Captured;

    #[test]
    fn credentials_in_headers_are_masked() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            "Bearer fk-alice-secret-1234".parse().unwrap(),
        );
        headers.insert("x-api-key", "sk-another-secret-9999".parse().unwrap());
        headers.insert("x-admin-key", "admin-secret-4242".parse().unwrap());
        headers.insert(
            "cookie",
            "sluice_session=session-secret-77".parse().unwrap(),
        );
        headers.insert("content-type", "application/json".parse().unwrap());
        let shown = masked_headers(&headers).to_string();
        assert!(
            !shown.contains("alice-secret")
                && !shown.contains("another-secret")
                && !shown.contains("admin-secret")
                && !shown.contains("session-secret"),
            "{shown}"
        );
        assert!(shown.contains("Bearer fk-…1234"), "{shown}");
        assert!(shown.contains("application/json"));
    }

    #[test]
    fn statistics_name_configured_models_only() {
        let config = |yaml: &str| {
            let env = crate::config::EnvMap::from_pairs(std::iter::empty::<(&str, &str)>());
            let document = crate::config::load::parse_document(yaml).unwrap();
            crate::config::load::resolve(&document, &env).unwrap()
        };
        let mut config = config(
            "upstreams: [{name: a, base_url: 'http://127.0.0.1:9', models: [listed, allowed], model_map: {alias: target}}]
access: {keys: [{name: k, key: fk-key-00000001, models: [allowed]}]}
pricing: {priced: {input: 1, output: 1}}",
        );
        let catalog = Catalog::of(&config);
        for named in ["priced", "listed", "alias", "target", "allowed"] {
            assert_eq!(catalog.label(Some(named)), named);
        }
        assert_eq!(catalog.label(Some("chosen-by-a-client")), "other");
        assert_eq!(catalog.label(None), "");
        config.pricing.clear();
        assert_eq!(Catalog::of(&config).label(Some("priced")), "other");
    }

    #[test]
    fn captures_are_bounded_and_keep_tails() {
        let mut captured = Captured::default();
        captured.push(&Bytes::from_static(b"0123456789"), 6);
        captured.push(&Bytes::from_static(b"abc"), 6);
        assert_eq!(&captured.bytes()[..], b"012345");
        assert!(captured.truncated());
        captured.keep_tail(2);
        assert_eq!(&captured.bytes()[..], b"45");
    }
}
