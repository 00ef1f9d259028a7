//! Several HTTP/2 connections to one upstream. hyper's pool (inside reqwest) keeps one
//! HTTP/2 connection per host and queues every stream past the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` behind the ones open: thousands of long streams to
//! one provider would wait for each other. Here each connection is a client of its own
//! (a client's pool holds one HTTP/2 connection), a *shard*, carrying at most
//! `http2_streams` exchanges; an exchange takes the first shard with a stream free, and
//! when every shard is full a new one is opened. Shards beyond the first that stay
//! without a stream for `http2_idle` are dropped, and their connections with them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use crate::clock::now_ms;
use crate::config::Upstream;

/// The clients of one HTTP/2 upstream, one connection each.
#[derive(Debug)]
pub struct Http2Pool {
    /// Builds a shard's client (the upstream's settings, HTTP/2 as configured).
    config: Upstream,
    /// Exchanges one shard carries at once.
    streams: usize,
    /// How long a shard beyond the first is kept with no exchange.
    idle: Duration,
    /// The first shard, never dropped (its connection closes after hyper's pool idle
    /// timeout when unused).
    first: Arc<Shard>,
    /// The shards opened when every one before was full, oldest first: filling the oldest
    /// first leaves a burst's newest ones to empty and close. Read (never across an await)
    /// to choose; written only to add or drop a shard.
    more: RwLock<Vec<Arc<Shard>>>,
    /// Whether a task is dropping idle shards (one runs while there is more than one).
    reaping: AtomicBool,
}

/// One client and so one connection, with the exchanges it carries.
#[derive(Debug)]
struct Shard {
    client: reqwest::Client,
    exchanges: AtomicUsize,
    /// [`now_ms`] when its last exchange ended.
    idle_since: AtomicU64,
}

impl Shard {
    fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            exchanges: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now_ms()),
        }
    }

    /// Takes a stream on this shard if it has one free.
    fn claim(&self, limit: usize) -> bool {
        self.exchanges
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn is_idle_since(&self, before: u64) -> bool {
        self.exchanges.load(Ordering::Acquire) == 0
            && self.idle_since.load(Ordering::Relaxed) <= before
    }
}

/// One exchange's stream on a shard, counted until dropped: kept with the request in
/// flight (`InFlight`), so a streamed answer holds it until its body ends.
#[derive(Debug)]
pub struct StreamSlot(Arc<Shard>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // Stamped before the count falls, so a reaper that sees no exchange sees when.
        self.0.idle_since.store(now_ms(), Ordering::Relaxed);
        self.0.exchanges.fetch_sub(1, Ordering::Release);
    }
}

impl Http2Pool {
    /// A pool with its first shard built (a bad setting fails here, with the config).
    pub fn new(config: Upstream) -> anyhow::Result<Self> {
        let first = super::build_client(&config, config.http2)?;
        Ok(Self {
            streams: config.http2_streams.max(1),
            idle: config.http2_idle,
            config,
            first: Arc::new(Shard::new(first)),
            more: RwLock::new(Vec::new()),
            reaping: AtomicBool::new(false),
        })
    }

    /// A client for one exchange and the stream it takes: the oldest shard with a stream
    /// free, else a new shard. Atomics and a read lock unless every shard is full.
    pub fn lease(self: &Arc<Self>) -> (reqwest::Client, StreamSlot) {
        if self.first.claim(self.streams) {
            return self.slot(&self.first);
        }
        if let Some(shard) = self.first_free(&self.read()) {
            return self.slot(&shard);
        }
        let mut more = self.more.write().unwrap_or_else(PoisonError::into_inner);
        // Another exchange may have opened one, or ended, while this waited for the lock.
        if self.first.claim(self.streams) {
            drop(more);
            return self.slot(&self.first);
        }
        if let Some(shard) = self.first_free(&more) {
            drop(more);
            return self.slot(&shard);
        }
        // Built under the lock, so a burst opens one shard at a time, not one per exchange.
        let shard = match super::build_client(&self.config, self.config.http2) {
            Ok(client) => {
                let shard = Arc::new(Shard::new(client));
                shard.exchanges.fetch_add(1, Ordering::AcqRel);
                more.push(shard.clone());
                shard
            }
            Err(error) => {
                tracing::warn!(upstream = %self.config.name, "cannot open another HTTP/2 client; the stream waits on a full connection: {error:#}");
                let shard = more
                    .iter()
                    .chain([&self.first])
                    .min_by_key(|s| s.exchanges.load(Ordering::Relaxed))
                    .unwrap_or(&self.first)
                    .clone();
                shard.exchanges.fetch_add(1, Ordering::AcqRel);
                shard
            }
        };
        drop(more);
        self.start_reaping();
        self.slot(&shard)
    }

    /// Connections (shards) open, and exchanges they carry, for tests and status.
    pub fn load(&self) -> (usize, usize) {
        let more = self.read();
        let exchanges = more
            .iter()
            .chain([&self.first])
            .map(|s| s.exchanges.load(Ordering::Relaxed))
            .sum();
        (1 + more.len(), exchanges)
    }

    /// The client of a shard already claimed, and its slot.
    fn slot(&self, shard: &Arc<Shard>) -> (reqwest::Client, StreamSlot) {
        (shard.client.clone(), StreamSlot(shard.clone()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Shard>>> {
        self.more.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn first_free(&self, shards: &[Arc<Shard>]) -> Option<Arc<Shard>> {
        shards.iter().find(|s| s.claim(self.streams)).cloned()
    }

    /// Drops the shards beyond the first with no exchange since `before` (a [`now_ms`]
    /// instant). Returns whether any beyond the first are left.
    fn drop_idle(&self, before: u64) -> bool {
        let mut more = self.more.write().unwrap_or_else(PoisonError::into_inner);
        // A shard is claimed only under the read lock, so none is claimed meanwhile.
        more.retain(|shard| !shard.is_idle_since(before));
        let left = !more.is_empty();
        if !left {
            // Under the write lock: a shard added after this starts a reaper again.
            self.reaping.store(false, Ordering::Release);
        }
        left
    }

    /// Starts the task that drops idle shards, unless one runs (or there is no runtime:
    /// then the shards stay until one runs).
    fn start_reaping(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = (self.idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
        runtime.spawn(reap(pool, every));
    }
}

/// Drops idle shards every `every` while more than one is open and the pool lives.
async fn reap(pool: Weak<Http2Pool>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let idle_ms = u64::try_from(pool.idle.as_millis()).unwrap_or(u64::MAX);
        if !pool.drop_idle(now_ms().saturating_sub(idle_ms)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(streams: usize) -> Arc<Http2Pool> {
        let mut config = crate::upstream::tests::upstream_config("http://127.0.0.1:9", &[]);
        config.http2 = crate::config::Http2Mode::H2c;
        config.http2_streams = streams;
        Arc::new(Http2Pool::new(config).unwrap())
    }

    #[test]
    fn exchanges_fill_the_oldest_shard_first_and_open_one_when_all_are_full() {
        let pool = pool(2);
        let mut held: Vec<StreamSlot> = (0..5).map(|_| pool.lease().1).collect();
        assert_eq!(pool.load(), (3, 5), "2 + 2 + 1");
        let counts = |pool: &Http2Pool| -> Vec<usize> {
            [&pool.first]
                .into_iter()
                .chain(pool.read().iter())
                .map(|s| s.exchanges.load(Ordering::Relaxed))
                .collect()
        };
        assert_eq!(counts(&pool), [2, 2, 1]);
        // A stream freed on the second shard is taken again before the third's.
        let second = held.remove(2);
        assert!(Arc::ptr_eq(&second.0, &pool.read()[0]));
        drop(second);
        assert_eq!(counts(&pool), [2, 1, 1]);
        held.push(pool.lease().1);
        assert_eq!(counts(&pool), [2, 2, 1]);
        // Six at once take a fourth shard, never a fifth stream on a full one.
        held.push(pool.lease().1);
        held.push(pool.lease().1);
        assert_eq!(pool.load(), (4, 7));
    }

    #[test]
    fn idle_shards_beyond_the_first_are_dropped_and_busy_ones_kept() {
        let pool = pool(1);
        let held: Vec<StreamSlot> = (0..3).map(|_| pool.lease().1).collect();
        assert_eq!(pool.load(), (3, 3));
        assert!(pool.drop_idle(u64::MAX), "all busy: none dropped");
        assert_eq!(pool.load(), (3, 3));
        drop(held);
        assert_eq!(pool.load(), (3, 0));
        // Idle, but not for long enough.
        assert!(pool.drop_idle(0));
        assert_eq!(pool.load().0, 3);
        assert!(!pool.drop_idle(u64::MAX));
        assert_eq!(pool.load(), (1, 0), "the first shard stays");
        let (_client, again) = pool.lease();
        assert_eq!(pool.load(), (1, 1));
        drop(again);
    }
}
