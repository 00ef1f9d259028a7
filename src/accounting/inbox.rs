//! The accountant's inbox: a queue whose reader is woken at most about once per
//! [`GATHER`] while records keep coming, instead of once per record.
//!
//! Why: every request hands its record over. With a plain channel each hand-over wakes the
//! accountant, a futex call on the request thread and a context switch per request, and the
//! accountant then handles one record at a time with cold caches. Here a request wakes the
//! reader only when it sleeps with nothing to do (the first record after a quiet spell), when
//! a batch is full, or for a message that cannot wait (a flush, a stop); otherwise the reader
//! comes back by itself within [`GATHER`] and takes everything queued at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long the reader lets records gather while they keep coming: what a record's
/// accounting may lag behind its request (limits reserve ahead, so none is passed).
pub const GATHER: Duration = Duration::from_millis(1);
/// Records queued that wake the reader without waiting for [`GATHER`].
pub const GATHER_MOST: usize = 256;
/// How often a reader with nothing to do looks whether every sender is gone.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// What the reader is doing, which tells a sender whether to wake it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// Handling what it took: it looks again when done.
    Busy,
    /// Asleep with a deadline [`GATHER`] away: woken only for a full batch or urgent news.
    Gathering,
    /// Asleep until woken: the first message wakes it.
    Parked,
}

struct State<T> {
    queue: Vec<T>,
    /// When the oldest message queued arrived.
    oldest: Option<Instant>,
    reader: Reader,
    /// No more messages are taken (the reader stopped).
    closed: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    senders: AtomicUsize,
    /// Messages queued at most: past it a send is refused.
    capacity: usize,
}

/// Why a message was not queued; it comes back with the answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The reader has stopped.
    Closed(T),
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic under this lock leaves a queue of whole messages: still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side; cheap to clone. The reader sees the inbox closed once all are dropped.
pub struct InboxSender<T> {
    shared: Arc<Shared<T>>,
}

/// The reading side (one thread).
pub struct InboxReader<T> {
    shared: Arc<Shared<T>>,
    /// Whether the last wait found messages: then the next one gathers rather than parks.
    traffic: bool,
    /// How long the oldest message of the last take had waited.
    waited: Duration,
}

/// A new inbox without a bound (its senders bound what they queue): its sender and reader.
pub fn inbox<T>() -> (InboxSender<T>, InboxReader<T>) {
    bounded_inbox(usize::MAX)
}

/// A new inbox holding at most `capacity` messages.
pub fn bounded_inbox<T>(capacity: usize) -> (InboxSender<T>, InboxReader<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: Vec::new(),
            oldest: None,
            reader: Reader::Busy,
            closed: false,
        }),
        ready: Condvar::new(),
        senders: AtomicUsize::new(1),
        capacity,
    });
    (
        InboxSender {
            shared: shared.clone(),
        },
        InboxReader {
            shared,
            traffic: false,
            waited: Duration::ZERO,
        },
    )
}

impl<T> Clone for InboxSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for InboxSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.ready.notify_one();
        }
    }
}

impl<T> InboxSender<T> {
    /// Queues `message`; never blocks beyond the queue's short lock. `urgent` wakes the
    /// reader at once. Gives the message back when the queue is full or the reader has
    /// stopped.
    pub fn send(&self, message: T, urgent: bool) -> Result<(), Refused<T>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(Refused::Closed(message));
        }
        if state.queue.len() >= self.shared.capacity {
            return Err(Refused::Full(message));
        }
        if state.queue.is_empty() {
            state.oldest = Some(Instant::now());
        }
        state.queue.push(message);
        let wake = match state.reader {
            Reader::Busy => false,
            Reader::Parked => true,
            Reader::Gathering => urgent || state.queue.len() >= GATHER_MOST,
        };
        if wake {
            state.reader = Reader::Busy;
            drop(state);
            self.shared.ready.notify_one();
        }
        Ok(())
    }
}

impl<T> InboxReader<T> {
    /// Waits for messages and moves all of them into `into` (emptied first); `false` once
    /// every sender is gone and nothing is left.
    pub fn take(&mut self, into: &mut Vec<T>) -> bool {
        into.clear();
        let mut state = self.shared.lock();
        loop {
            if !state.queue.is_empty() {
                std::mem::swap(&mut state.queue, into);
                self.waited = state
                    .oldest
                    .take()
                    .map_or(Duration::ZERO, |at| at.elapsed());
                state.reader = Reader::Busy;
                self.traffic = true;
                return true;
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return false;
            }
            let (reader, wait) = if self.traffic {
                (Reader::Gathering, GATHER)
            } else {
                (Reader::Parked, IDLE_LOOK)
            };
            state.reader = reader;
            let (next, timeout) = self
                .shared
                .ready
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner);
            state = next;
            state.reader = Reader::Busy;
            // A gathering wait that ran out with nothing queued: the traffic stopped.
            if timeout.timed_out() && state.queue.is_empty() {
                self.traffic = false;
            }
        }
    }

    /// How long the oldest message of the last [`take`](Self::take) had waited: how far
    /// behind the reader is.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Takes no more messages: later sends get theirs back. Returns what was still queued.
    pub fn close(&mut self) -> Vec<T> {
        let mut state = self.shared.lock();
        state.closed = true;
        std::mem::take(&mut state.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_tells_how_long_its_oldest_message_waited() {
        let (sender, mut reader) = inbox();
        assert!(sender.send(1, false).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        assert!(sender.send(2, false).is_ok());
        let mut taken = Vec::new();
        assert!(reader.take(&mut taken));
        assert_eq!(taken, vec![1, 2]);
        assert!(
            reader.waited() >= Duration::from_millis(30),
            "the first one's wait counts"
        );
        assert!(sender.send(3, false).is_ok());
        assert!(reader.take(&mut taken));
        assert!(
            reader.waited() < Duration::from_millis(30),
            "a fresh queue starts anew"
        );
    }

    #[test]
    fn messages_arrive_in_order_and_all_at_once() {
        let (sender, mut reader) = inbox();
        for i in 0..5 {
            assert!(sender.send(i, false).is_ok());
        }
        let mut taken = Vec::new();
        assert!(reader.take(&mut taken));
        assert_eq!(taken, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_parked_reader_is_woken_by_the_first_message() {
        let (sender, mut reader) = inbox();
        let handle = std::thread::spawn(move || {
            let mut taken = Vec::new();
            let started = std::time::Instant::now();
            let got = reader.take(&mut taken);
            (got, taken, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(sender.send(7, false).is_ok());
        let (got, taken, waited) = handle.join().unwrap_or_default();
        assert!(got);
        assert_eq!(taken, vec![7]);
        // Woken by the send, not by its one-second look.
        assert!(waited < IDLE_LOOK, "{waited:?}");
    }

    #[test]
    fn a_gathering_reader_takes_later_messages_without_a_wake() {
        let (sender, mut reader) = inbox();
        let mut taken = Vec::new();
        assert!(sender.send(1, false).is_ok());
        assert!(reader.take(&mut taken));
        // Traffic: the next wait gathers; a message sent meanwhile is taken within GATHER.
        let handle = std::thread::spawn(move || {
            let mut taken = Vec::new();
            let got = reader.take(&mut taken);
            (got, taken)
        });
        std::thread::sleep(Duration::from_millis(5));
        assert!(sender.send(2, false).is_ok());
        let (got, taken) = handle.join().unwrap_or_default();
        assert!(got);
        assert_eq!(taken, vec![2]);
    }

    #[test]
    fn the_reader_ends_when_every_sender_is_gone() {
        let (sender, mut reader) = inbox::<u8>();
        let second = sender.clone();
        drop(sender);
        assert!(second.send(1, true).is_ok());
        drop(second);
        let mut taken = Vec::new();
        assert!(reader.take(&mut taken));
        assert_eq!(taken, vec![1]);
        assert!(!reader.take(&mut taken));
    }

    #[test]
    fn a_closed_inbox_gives_messages_back() {
        let (sender, mut reader) = inbox();
        assert!(sender.send(1, false).is_ok());
        assert_eq!(reader.close(), vec![1]);
        assert_eq!(sender.send(2, true), Err(Refused::Closed(2)));
    }

    #[test]
    fn a_full_inbox_refuses_until_read() {
        let (sender, mut reader) = bounded_inbox(2);
        assert!(sender.send(1, false).is_ok());
        assert!(sender.send(2, false).is_ok());
        assert_eq!(sender.send(3, false), Err(Refused::Full(3)));
        let mut taken = Vec::new();
        assert!(reader.take(&mut taken));
        assert!(sender.send(3, false).is_ok());
    }
}
