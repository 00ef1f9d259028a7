//! The in-memory store of the response cache: least recently used first out, under a byte
//! cap that is never exceeded (an entry counts its bytes and a fixed overhead for its
//! place in the maps). Entries expire at their own time; an expired one is dropped when
//! met. One lock, held for a map operation and never across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::{Entry, Key};

/// What an entry costs beyond its own bytes, rounded up: its key in both maps, the maps'
/// nodes and spare room, the slot, the shared `Entry` with its strings' headers.
pub const OVERHEAD: usize = 384;

/// The least-recently-used store.
#[derive(Debug)]
pub struct Lru {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Slot>,
    /// Use order: tick → key, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Slot {
    entry: Arc<Entry>,
    tick: u64,
    /// Monotonic milliseconds after which it is gone.
    expires: u64,
    size: usize,
}

impl Lru {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The entry under `key` if it has not expired at `now` (monotonic ms); it becomes
    /// the most recently used.
    pub fn get(&self, key: &Key, now: u64) -> Option<Arc<Entry>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let slot = inner.entries.get(key)?;
        if slot.expires <= now {
            inner.remove(key);
            return None;
        }
        inner.tick += 1;
        let tick = inner.tick;
        let slot = inner.entries.get_mut(key)?;
        inner.order.remove(&slot.tick);
        slot.tick = tick;
        inner.order.insert(tick, *key);
        Some(slot.entry.clone())
    }

    /// Stores `entry` until `expires` (monotonic ms), evicting the least recently used
    /// until it fits; an entry larger than the whole cap is not stored.
    pub fn insert(&self, key: Key, entry: Arc<Entry>, expires: u64) {
        let size = entry.size() + OVERHEAD;
        if size > self.cap {
            return;
        }
        let mut inner = self.lock();
        inner.remove(&key);
        while inner.bytes + size > self.cap {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.remove(&oldest);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, key);
        inner.bytes += size;
        inner.entries.insert(
            key,
            Slot {
                entry,
                tick,
                expires,
                size,
            },
        );
    }

    /// Bytes held, as counted against the cap.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.entries.remove(key) {
            self.order.remove(&slot.tick);
            self.bytes -= slot.size;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn entry(len: usize) -> Arc<Entry> {
        Arc::new(Entry {
            stream: false,
            content_type: "application/json".into(),
            model: None,
            body: Bytes::from(vec![b'x'; len]),
        })
    }

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    #[test]
    fn the_cap_is_never_exceeded_and_the_least_recent_goes_first() {
        let one = entry(100).size() + OVERHEAD;
        let lru = Lru::new(one * 3);
        lru.insert(key(1), entry(100), 1000);
        lru.insert(key(2), entry(100), 1000);
        lru.insert(key(3), entry(100), 1000);
        assert!(lru.get(&key(1), 0).is_some(), "1 is now the most recent");
        lru.insert(key(4), entry(100), 1000);
        assert!(lru.bytes() <= one * 3);
        assert!(lru.get(&key(2), 0).is_none(), "2 was the least recent");
        assert!(lru.get(&key(1), 0).is_some());
        assert!(lru.get(&key(4), 0).is_some());
        // Too big for the whole cap: not stored, nothing evicted.
        lru.insert(key(5), entry(one * 3), 1000);
        assert!(lru.get(&key(5), 0).is_none());
        assert_eq!(lru.len(), 3);
        // A big one evicts as many as it needs.
        lru.insert(key(6), entry(one * 2), 1000);
        assert!(lru.bytes() <= one * 3);
        assert_eq!(lru.len(), 1);
    }

    #[test]
    fn entries_expire() {
        let lru = Lru::new(10_000);
        lru.insert(key(1), entry(10), 50);
        assert!(lru.get(&key(1), 49).is_some());
        assert!(lru.get(&key(1), 50).is_none());
        assert_eq!(lru.bytes(), 0);
    }

    #[test]
    fn replacing_an_entry_counts_it_once() {
        let lru = Lru::new(10_000);
        lru.insert(key(1), entry(10), 50);
        lru.insert(key(1), entry(20), 50);
        assert_eq!(lru.bytes(), entry(20).size() + OVERHEAD);
    }
}
