//! State shared by several sluice instances through Redis (`shared_state.redis`): rate
//! limits, budgets and usage counters, upstream and key cooldowns, session affinity.
//!
//! **Limits** cost one round trip per request: a Lua script reads the Redis server's
//! clock, checks every limit of every scope the request touches (its gateway key and the
//! upstream it is about to try) over the same fixed UTC windows as the local limiter, and
//! counts the request, with an estimate of its tokens and cost, only where all pass,
//! atomically. After the answer the log writer queues a settlement (actual less estimate);
//! a worker task sends queued settlements in batches, off the hot path. When Redis does
//! not answer within `timeout`, `on_error: open` (the default) falls back to this
//! instance's own limiter and `closed` refuses with 503; the connection manager
//! reconnects by itself when Redis is back.
//!
//! **Cooldowns and session pins** cost no round trip: routing reads them locally. An
//! instance that rests an upstream or key, or pins a session, publishes it (stored with
//! its expiry, and announced on a pub/sub channel); every instance applies what it hears,
//! and one that (re)connects first reads what is stored. Another instance learns of a
//! cooldown within a message's latency; until then it may send one more request there.
//!
//! **Object routes** (which upstream created a file, batch, response…) are stored with
//! their expiry, queued like events; an instance that does not know an object asks Redis
//! once (only requests naming an object do).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, mpsc, oneshot};

use crate::config::{Budget, BudgetPeriod, Limits};
use crate::pure::limits::{Period, Reserve, Usage};

/// Gregorian calendar helpers (Howard Hinnant's algorithms, as in `limits.rs`) shared by
/// the scripts, for the month window.
const CALENDAR: &str = r#"
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y, m
end
local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
-- The four windows of a moment: name, id, seconds to keep (0: for ever).
local function windows(now)
  local y, m = civil(math.floor(now / 86400))
  return {{'minute', math.floor(now / 60), 120}, {'day', math.floor(now / 86400), 172800},
          {'month', y * 12 + m - 1, 2764800}, {'total', 0, 0}}, y, m
end
"#;

/// Checks every scope (10 arguments each after the prefix and the count); counts them all
/// only if no required scope refuses. Returns {status, what, retry, now, index}: status 1
/// all admitted, 0 a required scope refused (nothing counted), 2 an optional scope refused
/// (the others counted).
const ADMIT: &str = r#"
local prefix, n = ARGV[1], tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
local ws, y, m = windows(now)
local function get(k, f) return tonumber(redis.call('HGET', k, f) or '0') or 0 end
local function refusal(b)
  local scope = ARGV[b + 1]
  local rpm, rpd, tpm = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local btok, bcost, bperiod = tonumber(ARGV[b + 6]), tonumber(ARGV[b + 7]), ARGV[b + 8]
  local function key(w) return prefix .. ':' .. scope .. ':' .. w[1] .. ':' .. w[2] end
  local minute, day, month, total = key(ws[1]), key(ws[2]), key(ws[3]), key(ws[4])
  if rpm >= 0 and get(minute, 'requests') >= rpm then return ARGV[b + 3] .. ' requests per minute', 60 - now % 60 end
  if rpd >= 0 and get(day, 'requests') >= rpd then return ARGV[b + 4] .. ' requests per day', 86400 - now % 86400 end
  if tpm >= 0 and (tpm == 0 or get(minute, 'tokens') >= tpm) then return ARGV[b + 5] .. ' tokens per minute', 60 - now % 60 end
  if bperiod ~= '' then
    local bk, retry = total, 315360000
    if bperiod == 'day' then bk, retry = day, 86400 - now % 86400 end
    if bperiod == 'month' then
      local ny, nm = y, m + 1
      if nm == 13 then ny, nm = y + 1, 1 end
      bk, retry = month, days_from_civil(ny, nm) * 86400 - now
    end
    if (btok >= 0 and get(bk, 'tokens') >= btok) or (bcost >= 0 and tonumber(redis.call('HGET', bk, 'cost') or '0') >= bcost) then
      return 'the ' .. bperiod .. ' budget', retry
    end
  end
  return nil
end
local admitted, optional = {}, nil
for i = 1, n do
  local b = 2 + (i - 1) * 10
  local what, retry = refusal(b)
  if what then
    if ARGV[b + 2] == '1' then return {0, what, retry, now, i} end
    if not optional then optional = {what, retry, i} end
  else
    admitted[#admitted + 1] = b
  end
end
for _, b in ipairs(admitted) do
  local scope, tokens, cost = ARGV[b + 1], tonumber(ARGV[b + 9]), ARGV[b + 10]
  for _, w in ipairs(ws) do
    local k = prefix .. ':' .. scope .. ':' .. w[1] .. ':' .. w[2]
    redis.call('HINCRBY', k, 'requests', 1)
    if tokens ~= 0 then redis.call('HINCRBY', k, 'tokens', tokens) end
    if cost ~= '0' then redis.call('HINCRBYFLOAT', k, 'cost', cost) end
    if w[3] > 0 then redis.call('EXPIRE', k, w[3]) end
  end
end
if optional then return {2, optional[1], optional[2], now, optional[3]} end
return {1, '', 0, now, 0}
"#;

/// Adds signed corrections (5 arguments each: scope, moment or -1 for now, requests,
/// tokens, cost) to the windows of their moment.
const SETTLE: &str = r#"
local prefix = ARGV[1]
local now = tonumber(redis.call('TIME')[1])
for b = 1, #ARGV - 1, 5 do
  local scope, at = ARGV[b + 1], tonumber(ARGV[b + 2])
  local requests, tokens, cost = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5]
  if at < 0 then at = now end
  local ws = windows(at)
  for _, w in ipairs(ws) do
    local k = prefix .. ':' .. scope .. ':' .. w[1] .. ':' .. w[2]
    if requests ~= 0 then redis.call('HINCRBY', k, 'requests', requests) end
    if tokens ~= 0 then redis.call('HINCRBY', k, 'tokens', tokens) end
    if cost ~= '0' then redis.call('HINCRBYFLOAT', k, 'cost', cost) end
    if w[3] > 0 then redis.call('EXPIRE', k, w[3]) end
  end
end
return 1
"#;

/// The usage of one scope in its current minute, day, month and all time.
const USAGE: &str = r#"
local prefix, scope = ARGV[1], ARGV[2]
local now = tonumber(redis.call('TIME')[1])
local out = {}
for _, w in ipairs(windows(now)) do
  local k = prefix .. ':' .. scope .. ':' .. w[1] .. ':' .. w[2]
  local v = redis.call('HMGET', k, 'requests', 'tokens', 'cost')
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
  out[#out + 1] = v[3] or '0'
end
return out
"#;

/// Stores an event with its expiry and announces it.
const PUBLISH: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"#;

/// One scope a request touches, as the admission script checks it.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub name: &'a str,
    /// A required scope's refusal refuses the request; an optional one's only itself.
    pub required: bool,
    pub limits: &'a Limits,
    pub budget: Option<&'a Budget>,
    pub reserve: Reserve,
}

/// What the admission script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The Redis server's clock at admission, to settle in the same windows.
    pub at: i64,
    /// The first scope that refused, if any.
    pub refused: Option<Refusal>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Index into the scopes given.
    pub scope: usize,
    /// Which limit, and seconds until its window ends.
    pub what: String,
    pub retry_after: u64,
    /// A budget refused, rather than a rate limit.
    pub budget: bool,
}

/// A correction to a scope's counts, queued and sent in batches.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub scope: String,
    /// The Redis clock of the admission whose windows it corrects; `None` for now.
    pub at: Option<i64>,
    pub requests: i64,
    pub tokens: i64,
    pub cost: f64,
}

/// Routing state one instance tells the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(flatten)]
    pub kind: EventKind,
    /// Milliseconds it holds for.
    pub ms: u64,
    /// The instance that sent it, which ignores its own messages.
    #[serde(default)]
    pub origin: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// An upstream (or, with `key`, one key of its pool by position) rests.
    Cooldown {
        upstream: String,
        key: Option<usize>,
    },
    /// A session sticks to an upstream and key.
    Session {
        session: String,
        upstream: String,
        key: Option<usize>,
    },
    /// Keys, teams or admin accounts changed in the store (now at `version`): reload them.
    Managed { version: i64 },
}

enum Job {
    Settle(Settlement),
    Publish(Event),
    /// Stores an object's route for `ms` milliseconds, or with `None` deletes it.
    Object {
        id: String,
        route: Option<String>,
        ms: u64,
    },
    Flush(oneshot::Sender<()>),
}

/// The connection and scripts, shared by the request path and the worker.
struct Redis {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    admit: Script,
    settle: Script,
    usage: Script,
    publish: Script,
}

impl Redis {
    async fn connection(&self) -> anyhow::Result<ConnectionManager> {
        let manager = self
            .connection
            .get_or_try_init(|| async { ConnectionManager::new(self.client.clone()).await })
            .await?;
        Ok(manager.clone())
    }

    fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Where an event is stored until it expires.
    fn event_key(&self, kind: &EventKind) -> String {
        match kind {
            EventKind::Cooldown { upstream, key } => match key {
                Some(key) => format!("{}:cool:{upstream}:{key}", self.prefix),
                None => format!("{}:cool:{upstream}:-", self.prefix),
            },
            EventKind::Session { session, .. } => format!("{}:session:{session}", self.prefix),
            EventKind::Managed { .. } => format!("{}:managed", self.prefix),
        }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer in time"))?
    }

    async fn send_settlements(&self, settlements: &[Settlement]) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let mut invocation = self.settle.prepare_invoke();
        invocation.arg(&self.prefix);
        for s in settlements {
            invocation
                .arg(&s.scope)
                .arg(s.at.unwrap_or(-1))
                .arg(s.requests)
                .arg(s.tokens)
                .arg(cost_arg(s.cost));
        }
        let _: i64 = invocation.invoke_async(&mut connection).await?;
        Ok(())
    }

    fn object_key(&self, id: &str) -> String {
        format!("{}:object:{id}", self.prefix)
    }

    async fn send_objects(&self, objects: &[(String, Option<String>, u64)]) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let mut pipe = redis::pipe();
        for (id, route, ms) in objects {
            match route {
                Some(route) => pipe
                    .cmd("SET")
                    .arg(self.object_key(id))
                    .arg(route)
                    .arg("PX")
                    .arg((*ms).max(1))
                    .ignore(),
                None => pipe.cmd("DEL").arg(self.object_key(id)).ignore(),
            };
        }
        let () = pipe.query_async(&mut connection).await?;
        Ok(())
    }

    async fn send_events(&self, events: &[Event]) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let channel = self.channel();
        for event in events {
            let payload = serde_json::to_string(event)?;
            let stored = serde_json::to_string(&Event {
                origin: 0,
                ..event.clone()
            })?;
            let _: i64 = self
                .publish
                .key(self.event_key(&event.kind))
                .key(&channel)
                .arg(stored)
                .arg(event.ms.max(1))
                .arg(payload)
                .invoke_async(&mut connection)
                .await?;
        }
        Ok(())
    }

    /// Every stored event still in force, with what is left of it.
    async fn stored_events(&self) -> anyhow::Result<Vec<Event>> {
        let mut connection = self.connection().await?;
        let mut events = Vec::new();
        for pattern in [
            format!("{}:cool:*", self.prefix),
            format!("{}:session:*", self.prefix),
        ] {
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut connection)
                    .await?;
                if !keys.is_empty() {
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
                    }
                    let answers: Vec<(Option<String>, i64)> =
                        pipe.query_async(&mut connection).await?;
                    for (stored, left) in answers {
                        let Some(stored) = stored.filter(|_| left > 0) else {
                            continue;
                        };
                        if let Ok(mut event) = serde_json::from_str::<Event>(&stored) {
                            event.ms = left.unsigned_abs();
                            events.push(event);
                        }
                    }
                }
                cursor = next;
                if cursor == 0 || events.len() >= MAX_CATCH_UP {
                    break;
                }
            }
        }
        Ok(events)
    }
}

/// At most this many stored events are read when an instance (re)connects.
const MAX_CATCH_UP: usize = 100_000;

fn cost_arg(cost: f64) -> String {
    if cost == 0.0 {
        "0".to_string()
    } else {
        cost.to_string()
    }
}

fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// The handle the gateway holds: admission on the hot path, the rest queued.
pub struct SharedState {
    redis: Arc<Redis>,
    pub fail_open: bool,
    jobs: mpsc::Sender<Job>,
    /// Tells this instance's own events from the others'.
    origin: u64,
    /// Outages and a full queue are logged once a second, not once a request.
    outage_log: crate::clock::Throttle,
    queue_full_log: crate::clock::Throttle,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("prefix", &self.redis.prefix)
            .field("fail_open", &self.fail_open)
            .finish()
    }
}

/// Settlements and events wait at most this many in the queue; more are dropped (and said).
const QUEUE: usize = 65_536;

impl SharedState {
    /// Prepares the client and starts the worker that sends queued work; the connection
    /// is made on first use (and remade after a loss). Needs a Tokio runtime.
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        fail_open: bool,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("shared state needs the Tokio runtime"))?;
        let redis = Arc::new(Redis {
            client: redis::Client::open(url)?,
            connection: OnceCell::new(),
            prefix: prefix.to_string(),
            timeout,
            admit: Script::new(&format!("{CALENDAR}{ADMIT}")),
            settle: Script::new(&format!("{CALENDAR}{SETTLE}")),
            usage: Script::new(&format!("{CALENDAR}{USAGE}")),
            publish: Script::new(PUBLISH),
        });
        let (jobs, queued) = mpsc::channel(QUEUE);
        runtime.spawn(work(redis.clone(), queued));
        Ok(Self {
            redis,
            fail_open,
            jobs,
            origin: fastrand::u64(1..),
            outage_log: crate::clock::Throttle::new(Duration::from_secs(1)),
            queue_full_log: crate::clock::Throttle::new(Duration::from_secs(1)),
        })
    }

    /// Checks and counts one request over `scopes` in one round trip; `Err` when Redis
    /// did not answer in time.
    pub async fn admit(&self, scopes: &[Scope<'_>]) -> anyhow::Result<Admission> {
        let redis = &self.redis;
        let call = async {
            let mut connection = redis.connection().await?;
            let mut invocation = redis.admit.prepare_invoke();
            invocation.arg(&redis.prefix).arg(scopes.len());
            for scope in scopes {
                let budget = scope.budget;
                let period = match budget.map(|b| b.period) {
                    None => "",
                    Some(BudgetPeriod::Day) => "day",
                    Some(BudgetPeriod::Month) => "month",
                    Some(BudgetPeriod::Total) => "total",
                };
                invocation
                    .arg(scope.name)
                    .arg(if scope.required { "1" } else { "0" })
                    .arg(limit_arg(scope.limits.rpm))
                    .arg(limit_arg(scope.limits.rpd))
                    .arg(limit_arg(scope.limits.tpm))
                    .arg(limit_arg(budget.and_then(|b| b.tokens)))
                    .arg(budget.and_then(|b| b.cost).unwrap_or(-1.0))
                    .arg(period)
                    .arg(i64::try_from(scope.reserve.tokens).unwrap_or(i64::MAX))
                    .arg(cost_arg(scope.reserve.cost));
            }
            let (status, what, retry, at, index): (i64, String, i64, i64, i64) =
                invocation.invoke_async(&mut connection).await?;
            let refused = (status != 1).then(|| Refusal {
                scope: usize::try_from(index - 1).unwrap_or(0),
                // ADMIT names a budget refusal "the <period> budget".
                budget: what.ends_with(" budget"),
                what,
                retry_after: u64::try_from(retry).unwrap_or(1).max(1),
            });
            anyhow::Ok(Admission { at, refused })
        };
        redis.within(redis.timeout, call).await
    }

    /// Logs that Redis did not answer and what the gateway does instead, at most once a
    /// second.
    pub fn report_outage(&self, error: &anyhow::Error, instead: &str) {
        if self.outage_log.ready() {
            tracing::warn!("shared state unavailable ({error:#}); {instead}");
        }
    }

    /// Queues a correction of a scope's counts. Never blocks; callable from any thread.
    pub fn settle(&self, settlement: Settlement) {
        if settlement.requests == 0 && settlement.tokens == 0 && settlement.cost == 0.0 {
            return;
        }
        self.queue(Job::Settle(settlement));
    }

    /// Tells the other instances about a cooldown or a session pin.
    pub fn publish(&self, kind: EventKind, hold: Duration) {
        self.queue(Job::Publish(Event {
            kind,
            ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            origin: self.origin,
        }));
    }

    fn queue(&self, job: Job) {
        let full = matches!(
            self.jobs.try_send(job),
            Err(mpsc::error::TrySendError::Full(_))
        );
        if full && self.queue_full_log.ready() {
            tracing::warn!("shared state queue full; settlements or events are being dropped");
        }
    }

    /// Stores where an object lives (`route`, opaque here) for `hold`; `None` forgets it.
    pub fn object_route(&self, id: &str, route: Option<String>, hold: Duration) {
        self.queue(Job::Object {
            id: id.to_string(),
            route,
            ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
        });
    }

    /// Where an object lives, as stored by [`SharedState::object_route`]; `Err` when Redis
    /// did not answer in time.
    pub async fn object(&self, id: &str) -> anyhow::Result<Option<String>> {
        let redis = &self.redis;
        let call = async {
            let mut connection = redis.connection().await?;
            let route: Option<String> = redis::cmd("GET")
                .arg(redis.object_key(id))
                .query_async(&mut connection)
                .await?;
            anyhow::Ok(route)
        };
        redis.within(redis.timeout, call).await
    }

    /// Waits (up to a few seconds) until what is queued has been sent.
    pub async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.jobs.send(Job::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
        }
    }

    /// A scope's usage in its current minute, day, month and all time, on Redis's clock.
    pub async fn usage(&self, scope: &str) -> anyhow::Result<Vec<(Period, Usage)>> {
        let redis = &self.redis;
        let call = async {
            let mut connection = redis.connection().await?;
            let values: Vec<String> = redis
                .usage
                .arg(&redis.prefix)
                .arg(scope)
                .invoke_async(&mut connection)
                .await?;
            let number = |i: usize| values.get(i).and_then(|v| v.parse::<f64>().ok());
            anyhow::Ok(
                Period::ALL
                    .into_iter()
                    .enumerate()
                    .map(|(i, period)| {
                        let whole = |v: Option<f64>| v.unwrap_or(0.0).max(0.0) as u64;
                        let usage = Usage {
                            requests: whole(number(3 * i)),
                            tokens: whole(number(3 * i + 1)),
                            cost: number(3 * i + 2).unwrap_or(0.0).max(0.0),
                        };
                        (period, usage)
                    })
                    .collect(),
            )
        };
        redis.within(redis.timeout * 5, call).await
    }

    /// Applies every other instance's events with `apply`, for as long as the returned
    /// task runs: what is stored when it connects, then what is announced. Reconnects by
    /// itself after a loss.
    pub fn follow(
        &self,
        apply: impl Fn(Event) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let redis = self.redis.clone();
        let origin = self.origin;
        tokio::spawn(async move {
            loop {
                if let Err(error) = follow_once(&redis, origin, &apply).await {
                    tracing::warn!("shared routing state: {error:#}; retrying in 1 s");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }
}

async fn follow_once(
    redis: &Redis,
    origin: u64,
    apply: &(impl Fn(Event) + Send + Sync),
) -> anyhow::Result<()> {
    let mut pubsub = redis.client.get_async_pubsub().await?;
    pubsub.subscribe(redis.channel()).await?;
    // Subscribed first, so nothing announced while the store is read is missed.
    for event in redis.stored_events().await? {
        apply(event);
    }
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        match serde_json::from_slice::<Event>(message.get_payload_bytes()) {
            Ok(event) if event.origin != origin => apply(event),
            Ok(_) => {}
            Err(error) => tracing::debug!("ignoring a malformed shared event: {error}"),
        }
    }
    anyhow::bail!("the subscription ended")
}

/// Sends queued settlements (merged per scope and moment, one script per batch) and
/// events, and answers flushes once what came before them is sent.
async fn work(redis: Arc<Redis>, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::new();
    while let Some(job) = jobs.recv().await {
        batch.push(job);
        while batch.len() < 1024 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut merged: HashMap<(String, Option<i64>), Settlement> = HashMap::new();
        let mut events = Vec::new();
        let mut objects = Vec::new();
        let mut flushes = Vec::new();
        for job in batch.drain(..) {
            match job {
                Job::Settle(s) => {
                    let slot =
                        merged
                            .entry((s.scope.clone(), s.at))
                            .or_insert_with(|| Settlement {
                                requests: 0,
                                tokens: 0,
                                cost: 0.0,
                                ..s.clone()
                            });
                    slot.requests += s.requests;
                    slot.tokens += s.tokens;
                    slot.cost += s.cost;
                }
                Job::Publish(event) => events.push(event),
                Job::Object { id, route, ms } => objects.push((id, route, ms)),
                Job::Flush(done) => flushes.push(done),
            }
        }
        let settlements: Vec<Settlement> = merged.into_values().collect();
        if !settlements.is_empty() {
            let mut sent = false;
            for attempt in 0..3u64 {
                let limit = redis.timeout * 10;
                match redis
                    .within(limit, redis.send_settlements(&settlements))
                    .await
                {
                    Ok(()) => {
                        sent = true;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!("cannot settle usage in Redis: {error:#}");
                        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                    }
                }
            }
            if !sent {
                tracing::error!(
                    "{} usage settlements not written to Redis",
                    settlements.len()
                );
            }
        }
        if !events.is_empty() {
            if let Err(error) = redis
                .within(redis.timeout * 10, redis.send_events(&events))
                .await
            {
                tracing::warn!("cannot share {} routing events: {error:#}", events.len());
            }
        }
        if !objects.is_empty() {
            if let Err(error) = redis
                .within(redis.timeout * 10, redis.send_objects(&objects))
                .await
            {
                tracing::warn!("cannot share {} object routes: {error:#}", objects.len());
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json() {
        let event = Event {
            kind: EventKind::Session {
                session: "s|1".into(),
                upstream: "a".into(),
                key: Some(2),
            },
            ms: 1500,
            origin: 7,
        };
        let text = serde_json::to_string(&event).unwrap();
        assert!(text.contains(r#""kind":"session""#), "{text}");
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), event);
    }
}
