//! The few operating-system calls std does not offer. The only `unsafe` in sluice.

/// Sets the calling thread's nice value (0 normal, 19 lowest), so background work such as
/// the log writer yields a little to request handling without being starved by it. Best
/// effort: on other systems, or if refused, nothing changes.
#[allow(unsafe_code)]
pub fn set_thread_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments. On Linux, PRIO_PROCESS with
        // who = 0 applies to the calling thread alone.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if result != 0 {
            tracing::debug!("cannot set a thread's nice value to {nice}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Puts the calling thread in the idle scheduling class (`SCHED_IDLE`): the least share of
/// the CPU there is, and the one class the kernel switches out at once for any ordinary
/// thread that wakes on its core (EEVDF preempts an idle-class thread unconditionally; a
/// batch-class one only when the woken thread is due its share). For background threads
/// whose work comes in calls too long to step aside in ([`step_aside`] runs between them):
/// the log writer's SQLite commit, the WAL checkpoint's copy, the search index's merge,
/// each up to milliseconds, during which a request thread waking on the same core would
/// otherwise wait. The price is the share: against a request thread that never sleeps (a
/// saturated core) it gets almost nothing: the search indexer may wait (searches scan
/// what it has not reached); the log writer and the checkpointer take the batch class
/// while the log is behind ([`idle_while_keeping_up`]). Once picked while a request thread
/// waits without having woken (EEVDF does not run a thread ahead of its share) it runs to its
/// next block or tick, hence [`step_aside`] as well. Entering the class needs no privilege;
/// leaving it needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20. Falls back to nice 19 where
/// the class is refused. Returns whether the class was taken.
pub fn set_thread_idle() -> bool {
    if set_thread_policy(SchedPolicy::Idle) {
        return true;
    }
    set_thread_nice(19);
    false
}

/// The scheduling classes sluice's threads take besides the ordinary one.
#[derive(Clone, Copy)]
enum SchedPolicy {
    Idle,
    Batch,
}

/// Puts the calling thread in `policy`; returns whether the kernel took it.
fn set_thread_policy(policy: SchedPolicy) -> bool {
    set_policy_of(0, policy)
}

/// Puts thread `tid` (0: the calling one) in `policy`; returns whether the kernel took it.
#[allow(unsafe_code)]
fn set_policy_of(tid: i32, policy: SchedPolicy) -> bool {
    #[cfg(target_os = "linux")]
    {
        let policy = match policy {
            SchedPolicy::Idle => libc::SCHED_IDLE,
            SchedPolicy::Batch => libc::SCHED_BATCH,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param`, a valid sched_param; a thread id of
        // this process (or 0, the calling thread) names the thread to change.
        unsafe { libc::sched_setscheduler(tid, policy, &raw const param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, policy);
        false
    }
}

/// The calling thread's id (0 where there is none to tell).
#[allow(unsafe_code)]
fn current_thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid takes no arguments and cannot fail.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Whether this process may take a thread out of the idle class again: the kernel allows
/// it with `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 or more (`ulimit -e 20`), not
/// otherwise. Asked once, of a thread started for the question.
fn idle_class_is_reversible() -> bool {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REVERSIBLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("sluice-probe".into())
            .spawn(|| set_thread_policy(SchedPolicy::Idle) && set_thread_policy(SchedPolicy::Batch))
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    })
}

/// Threads that run in the idle class while the log keeps up and in the batch class while
/// it is behind ([`idle_while_keeping_up`], [`log_behind`]).
struct CatchUp {
    members: std::sync::Mutex<CatchUpMembers>,
    /// `CatchUpMembers::behind`, read without the lock on every record.
    behind: std::sync::atomic::AtomicU8,
    /// When a part last said it was behind ([`stepping_clock`]'s nanoseconds).
    raised_at: std::sync::atomic::AtomicU64,
    /// How long after that the group stays in the batch class, caught up or not.
    hold: std::time::Duration,
}

struct CatchUpMembers {
    threads: Vec<i32>,
    /// Which parts of the log say they are behind ([`LogPart`] bits).
    behind: u8,
}

/// The parts of the log that each tell whether they are behind ([`log_behind`]).
#[derive(Clone, Copy)]
pub enum LogPart {
    /// Records wait for the accountant.
    Accountant = 1,
    /// Rows wait for the writer.
    Writer = 2,
}

/// How long the log stays in the batch class after a part last said it was behind: a
/// saturated core keeps it there rather than flipping it back to idle at every drain
/// (rows were shed). Short enough that a passing lag under moderate load costs the
/// requests little of the idle class's tail (1 s did, at 4,000 req/s).
pub const CATCH_UP_HOLD: std::time::Duration = std::time::Duration::from_millis(250);

impl CatchUp {
    const fn new(hold: std::time::Duration) -> Self {
        CatchUp {
            members: std::sync::Mutex::new(CatchUpMembers {
                threads: Vec::new(),
                behind: 0,
            }),
            behind: std::sync::atomic::AtomicU8::new(0),
            raised_at: std::sync::atomic::AtomicU64::new(0),
            hold,
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, CatchUpMembers> {
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn join(&'static self) -> CatchUpMember {
        if !idle_class_is_reversible() {
            set_thread_batch();
            return CatchUpMember {
                group: self,
                tid: None,
            };
        }
        let tid = current_thread_id();
        let mut members = self.members();
        members.threads.push(tid);
        set_thread_policy(if members.behind != 0 {
            SchedPolicy::Batch
        } else {
            SchedPolicy::Idle
        });
        CatchUpMember {
            group: self,
            tid: Some(tid),
        }
    }

    fn is_behind(&self) -> bool {
        self.behind.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    fn set_behind(&self, part: LogPart, behind: bool) {
        let bit = part as u8;
        if behind {
            self.raised_at
                .store(stepping_clock(), std::sync::atomic::Ordering::Relaxed);
        }
        let was = self.behind.load(std::sync::atomic::Ordering::Relaxed);
        if (was & bit != 0) == behind {
            return;
        }
        // Caught up only once nothing said behind for a while: on a saturated core the
        // log would otherwise fall back to the idle class each time it drains, starve,
        // and fall behind again, flipping class every few milliseconds.
        let since_raised = stepping_clock()
            .saturating_sub(self.raised_at.load(std::sync::atomic::Ordering::Relaxed));
        if !behind && u128::from(since_raised) < self.hold.as_nanos() {
            return;
        }
        let mut members = self.members();
        let before = members.behind;
        members.behind = if behind { before | bit } else { before & !bit };
        self.behind
            .store(members.behind, std::sync::atomic::Ordering::Relaxed);
        if (before != 0) == (members.behind != 0) {
            return;
        }
        let policy = if members.behind != 0 {
            SchedPolicy::Batch
        } else {
            SchedPolicy::Idle
        };
        for &tid in &members.threads {
            set_policy_of(tid, policy);
        }
    }
}

/// The log's writer and WAL checkpointer.
static LOG_CATCH_UP: CatchUp = CatchUp::new(CATCH_UP_HOLD);

/// Puts the calling thread (the log writer, the WAL checkpointer) in the idle class while
/// the log keeps up, so a request waking on its core switches it out at once even inside
/// a long call (a commit, a checkpoint's copy); and in the batch class, an ordinary share
/// of the CPU, while the log is behind ([`log_behind`]), so on a saturated core it still
/// writes and the counters a `kill -9` could lose stay a moment's worth. Where the idle
/// class cannot be left again (no `CAP_SYS_NICE`, no `RLIMIT_NICE` of 20: `ulimit -e 20`)
/// the thread stays in the batch class, as before. The thread leaves the group when the
/// returned guard is dropped (before it ends: its id may be reused).
pub fn idle_while_keeping_up() -> CatchUpMember {
    LOG_CATCH_UP.join()
}

/// A thread's place in the catch-up group ([`idle_while_keeping_up`]).
pub struct CatchUpMember {
    group: &'static CatchUp,
    tid: Option<i32>,
}

impl Drop for CatchUpMember {
    fn drop(&mut self) {
        if let Some(tid) = self.tid {
            self.group.members().threads.retain(|&member| member != tid);
        }
    }
}

/// Says whether a part of the log is behind (records waiting longer than it should let
/// them) or caught up again. While any part is behind, the group's threads are in the
/// batch class ([`idle_while_keeping_up`]) and no log thread steps aside for requests
/// ([`step_aside`]): on a saturated core the log takes its ordinary share, so what a
/// `kill -9` loses stays a moment's worth. Cheap when nothing changes: one atomic read.
pub fn log_behind(part: LogPart, behind: bool) {
    LOG_CATCH_UP.set_behind(part, behind);
}

/// The time slice request-handling threads ask for (see [`request_short_slices`]): the
/// shortest Linux accepts is 0.1 ms; a request costs sluice 30–40 µs of CPU, so a few fit.
pub const REQUEST_SLICE: std::time::Duration = std::time::Duration::from_micros(200);

/// Asks the kernel to give the calling thread short time slices (Linux 6.12+, EEVDF's
/// per-thread slice), and threads it starts the default ones. Why: a thread that wakes
/// with a shorter slice than the running one preempts it at once, where it would
/// otherwise wait out the running thread's slice (1.4 ms on a 2-core machine). So a
/// request no longer queues behind background work sharing its core (the log writer, other
/// processes). The thread gets no larger share of the CPU, only sooner. Best effort:
/// returns whether the kernel took it; older kernels keep their default slices.
#[allow(unsafe_code)]
pub fn request_short_slices(slice: std::time::Duration) -> bool {
    #[cfg(target_os = "linux")]
    {
        /// The kernel's `struct sched_attr` (first version, 56 bytes).
        #[repr(C)]
        #[derive(Default)]
        struct SchedAttr {
            size: u32,
            policy: u32,
            flags: u64,
            nice: i32,
            priority: u32,
            runtime: u64,
            deadline: u64,
            period: u64,
        }
        const SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;
        /// Children start with the default policy and slice.
        const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
        let mut attr = SchedAttr::default();
        // SAFETY: sched_getattr writes at most SIZE bytes into `attr`, a struct of exactly
        // that size and layout; pid 0 is the calling thread.
        let read = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &raw mut attr, SIZE, 0) };
        // Only ordinary threads: a real-time or idle policy is someone's explicit choice.
        if read != 0 || attr.policy != libc::SCHED_OTHER as u32 {
            return false;
        }
        attr.size = SIZE;
        attr.flags = SCHED_FLAG_RESET_ON_FORK;
        attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: sched_setattr reads `attr`, whose size field matches its layout; the
        // nice value read above is written back unchanged.
        let written = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
        written == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = slice;
        false
    }
}

/// Puts the calling thread in the batch scheduling class (`SCHED_BATCH`): its share of
/// the CPU is an ordinary thread's, but waking it never preempts the thread on its core.
/// For background threads woken by every request (the accountant, the access log; the log
/// writer and the checkpointer while the log is behind, [`idle_while_keeping_up`]): each
/// wake would otherwise switch a request thread out in the middle of its work, and leave
/// it waiting behind whatever the scheduler runs next. Unlike the idle class, a thread may
/// leave it again unprivileged. Returns whether the class was taken.
pub fn set_thread_batch() -> bool {
    set_thread_policy(SchedPolicy::Batch)
}

/// The request threads (the runtime's workers) by thread id, which background threads
/// step aside for ([`step_aside`]); its length tells a background thread its list is stale.
static REQUEST_THREADS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
static REQUEST_THREADS_COUNT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);
/// The core each request thread last woke on (by registration order; -1 unknown), so a
/// background thread reads the `/proc` stat of only those that share its core: with a
/// worker per core, reading them all at each look would cost a quantum on a large machine.
static REQUEST_CORES: [std::sync::atomic::AtomicI32; 256] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 256];

thread_local! {
    /// This request thread's place in [`REQUEST_CORES`].
    static REQUEST_SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// How long a background thread works before it looks whether a request thread waits for
/// its core: a request waits at most about this long behind background work.
pub const BACKGROUND_QUANTUM: std::time::Duration = std::time::Duration::from_micros(200);
/// One pause of a background thread that found a request thread waiting.
const STEP_ASIDE_PAUSE: std::time::Duration = std::time::Duration::from_micros(50);
/// The most a background thread pauses per quantum: under saturation the request threads
/// always wait, and the log must still get its share.
const STEP_ASIDE_MOST: std::time::Duration = std::time::Duration::from_millis(1);

/// Registers the calling thread as a request thread, which background threads step aside
/// for. Called once by each of the runtime's worker threads.
pub fn register_request_thread() {
    #[cfg(target_os = "linux")]
    {
        let tid = current_thread_id();
        let mut threads = REQUEST_THREADS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        REQUEST_SLOT.set(Some(threads.len()));
        threads.push(tid);
        REQUEST_THREADS_COUNT.store(threads.len(), std::sync::atomic::Ordering::Release);
    }
    note_request_core();
}

/// Notes the core the calling request thread runs on (a registered one; others: nothing).
/// Called each time a worker wakes: a `getcpu` and a store.
pub fn note_request_core() {
    if let Some(slot) = REQUEST_SLOT.get().and_then(|slot| REQUEST_CORES.get(slot)) {
        let core = current_core().and_then(|core| i32::try_from(core).ok());
        slot.store(core.unwrap_or(-1), std::sync::atomic::Ordering::Relaxed);
    }
}

/// A background thread's view of the request threads: their `/proc` stat files, open.
#[derive(Default)]
struct Courtesy {
    /// When the thread last looked (or paused).
    since: Option<std::time::Instant>,
    /// How many request threads `stats` covers.
    known: usize,
    /// Each request thread's `/proc` stat with its place in [`REQUEST_CORES`].
    stats: Vec<(usize, std::fs::File)>,
}

thread_local! {
    static COURTESY: std::cell::RefCell<Courtesy> = std::cell::RefCell::default();
}

/// Called by background threads between small pieces of work (a row written, a record
/// accounted): once per [`BACKGROUND_QUANTUM`] of work, if a request thread waits for this
/// thread's core, this thread sleeps until it got the core (at most 1 ms).
/// Why: on a busy core the scheduler lets a background thread run on to the next tick (4 ms
/// at 250 Hz) while a request thread that used its fair share waits, however low the
/// background thread's priority or class; a request arriving then waits milliseconds.
/// Sleeping is the one sure way to hand the core over. A thread that finds a request
/// waiting leaves a notice for its core, and the other background threads there make way
/// at their next call without a look of their own. Cheap between looks (a clock read and
/// the core's notice); a look reads each request thread's `/proc` stat (state and core).
pub fn step_aside() {
    COURTESY.with(|courtesy| {
        if let Ok(mut courtesy) = courtesy.try_borrow_mut() {
            courtesy.step();
        }
    });
}

/// Per core (modulo their number), until when background threads there make way without
/// looking (nanoseconds on [`stepping_clock`]): one that found a request thread waiting
/// says so, so the others do not each run a quantum before finding out themselves. The
/// scheduler picks among the background threads while the request thread is not eligible.
static STEPPING_ASIDE_UNTIL: [std::sync::atomic::AtomicU64; 64] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 64];

/// How long a notice in [`STEPPING_ASIDE_UNTIL`] holds (two pauses), unless renewed.
const STEPPING_ASIDE_NOTICE_NS: u64 = 100_000;

/// Nanoseconds since the first call: the clock of [`STEPPING_ASIDE_UNTIL`].
fn stepping_clock() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = EPOCH.get_or_init(std::time::Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// The calling thread's core, or `None` where it cannot tell.
#[allow(unsafe_code)]
fn current_core() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu takes no arguments; -1 on failure.
        usize::try_from(unsafe { libc::sched_getcpu() }).ok()
    }
    #[cfg(not(target_os = "linux"))]
    None
}

impl Courtesy {
    fn step(&mut self) {
        // Behind, the log takes its ordinary share: a saturated core always has a request
        // waiting, and making way for it would let the log fall further behind.
        if LOG_CATCH_UP.is_behind() {
            self.since = None;
            return;
        }
        let now = std::time::Instant::now();
        let Some(since) = self.since else {
            self.since = Some(now);
            return;
        };
        let core = current_core();
        let slot = core.map(|core| &STEPPING_ASIDE_UNTIL[core % STEPPING_ASIDE_UNTIL.len()]);
        let mut paused = std::time::Duration::ZERO;
        // Another background thread on this core found a request waiting: make way too.
        while paused < STEP_ASIDE_MOST
            && slot.is_some_and(|until| {
                stepping_clock() < until.load(std::sync::atomic::Ordering::Relaxed)
            })
        {
            std::thread::sleep(STEP_ASIDE_PAUSE);
            paused += STEP_ASIDE_PAUSE;
        }
        if paused.is_zero() && now.duration_since(since) < BACKGROUND_QUANTUM {
            return;
        }
        while paused < STEP_ASIDE_MOST && core.is_some_and(|core| self.request_thread_waits(core)) {
            if let Some(until) = slot {
                let until_then = stepping_clock().saturating_add(STEPPING_ASIDE_NOTICE_NS);
                until.fetch_max(until_then, std::sync::atomic::Ordering::Relaxed);
            }
            std::thread::sleep(STEP_ASIDE_PAUSE);
            paused += STEP_ASIDE_PAUSE;
        }
        self.since = Some(std::time::Instant::now());
    }

    /// Whether a request thread is runnable on `core`, this thread's (and so not running).
    fn request_thread_waits(&mut self, core: usize) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            let count = REQUEST_THREADS_COUNT.load(std::sync::atomic::Ordering::Acquire);
            if count != self.known {
                let threads = REQUEST_THREADS
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                self.stats = threads
                    .iter()
                    .enumerate()
                    .filter_map(|(slot, tid)| {
                        let stat = std::fs::File::open(format!("/proc/self/task/{tid}/stat"));
                        stat.ok().map(|stat| (slot, stat))
                    })
                    .collect();
                self.known = threads.len();
            }
            let Ok(core) = i32::try_from(core) else {
                return false;
            };
            let mut buffer = [0u8; 512];
            self.stats.iter().any(|(slot, stat)| {
                // A thread last seen on another core is not read (unknown: read).
                let seen = REQUEST_CORES
                    .get(*slot)
                    .map_or(-1, |seen| seen.load(std::sync::atomic::Ordering::Relaxed));
                (seen < 0 || seen == core)
                    && stat.read_at(&mut buffer, 0).is_ok_and(|read| {
                        runnable_on(buffer.get(..read).unwrap_or_default()) == Some(core)
                    })
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = core;
            false
        }
    }
}

/// The core a thread is runnable on, from its `/proc/…/stat` line, if its state is `R`
/// (running or waiting to run); `None` otherwise.
fn runnable_on(stat: &[u8]) -> Option<i32> {
    // The name (field 2) is in parentheses and may hold anything: fields are counted from
    // the last closing one. Field 3 is the state, field 39 the core.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    if fields.next()? != "R" {
        return None;
    }
    fields.nth(35)?.parse().ok()
}

/// Free heap below which trimming is skipped. Under steady traffic the allocator's free
/// memory is reused within milliseconds: handing it back would cost a pause of the worker
/// (a `madvise` per page, 1.5–2.8 ms measured every 10 s at 2,000 req/s) and a page fault
/// per page when it is reused, for nothing. After a burst of streams it is tens of MiB.
pub const TRIM_FREE_BYTES: usize = 8 << 20;

/// Whether a heap with `free_bytes` free is worth trimming (see [`TRIM_FREE_BYTES`]).
pub fn worth_trimming(free_bytes: usize) -> bool {
    free_bytes >= TRIM_FREE_BYTES
}

/// Bytes the allocator holds free (glibc's `mallinfo2`), or `None` where it cannot tell.
#[allow(unsafe_code)]
pub fn free_heap_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
        Some(unsafe { libc::mallinfo2() }.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Returns freed heap memory to the operating system when there is enough of it (glibc
/// keeps it otherwise, so a gateway's resident size would stay at its peak after a burst
/// of streams); returns whether it trimmed. Under steady load it leaves the heap alone.
/// "Enough" is read from glibc's heap (SQLite's caches); Rust's own, in mimalloc, goes
/// back as its threads free and collect it ([`collect_when_idle`]).
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if !free_heap_bytes().is_some_and(worth_trimming) {
            return false;
        }
        trim_heap()
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Hands all free heap memory back to the operating system now, however little (after a
/// burst of streams ended): the calling thread's and the shared arenas' free pages of
/// sluice's own allocator, and the C library's heap (SQLite's page caches); returns
/// whether the C library's could be trimmed.
#[allow(unsafe_code)]
pub fn trim_heap() -> bool {
    // SAFETY: mi_collect takes a flag and touches only the allocator's own state.
    unsafe { libmimalloc_sys::mi_collect(true) };
    // Each request thread's heap is collected by that thread, the next time it parks.
    COLLECT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes an integer and touches only the allocator's own state.
        unsafe {
            libc::malloc_trim(0);
        }
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Sets up sluice's allocator (mimalloc, the binary's global allocator) for a gateway's
/// pattern: request threads allocate every record and the log's threads free them.
/// Why mimalloc: with glibc's malloc, a thread freeing another's block takes that
/// thread's arena lock, so a request thread blocked on the lock a log thread held while
/// switched out (193 of its 256 futex sleeps in 6,000 requests); mimalloc hands
/// a foreign block back through a lock-free list its owner drains. Settings: memory is
/// committed as it is touched, not a whole arena at once (RSS at start as glibc's), and
/// without transparent huge pages, so freed memory goes back in 64 KiB pieces rather than
/// 2 MiB ones. Call it before anything allocates (the binary calls it from the loader's
/// constructors): mimalloc applies them to the arena it makes at the first allocation.
#[allow(unsafe_code)]
pub extern "C" fn configure_allocator() {
    // SAFETY: mi_option_set takes an option and a value and touches only the allocator's
    // settings.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
    }
}

/// mimalloc's option numbers (v3's `mi_option_t`), which the Rust binding leaves unnamed;
/// [`MI_OPTION_COUNT`] is checked against the binding's in a test, so a mimalloc with other
/// numbers fails it rather than setting the wrong option.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
#[cfg(test)]
const MI_OPTION_COUNT: libmimalloc_sys::mi_option_t = 47;

/// How often at most a request thread hands its freed pages back when it goes idle
/// ([`collect_when_idle`]).
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Bumped by [`trim_heap`] (a burst is over): each request thread collects its heap in full
/// the next time it parks.
static COLLECT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Called when a request thread runs out of work: at most every 100 ms, its
/// freed pages (and blocks other threads freed for it) go back to the system. mimalloc
/// purges a freed page only from a later call of its owning thread, and a worker idle
/// after a burst of streams makes none: the burst's memory would stay resident. Under
/// steady load the thread rarely parks long enough for this to matter; at saturation it
/// never parks.
#[allow(unsafe_code)]
pub fn collect_when_idle() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
        static SEEN_EPOCH: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let epoch = COLLECT_EPOCH.load(std::sync::atomic::Ordering::Relaxed);
    // After a burst, in full: what the thread keeps for reuse goes back too.
    let force = SEEN_EPOCH.replace(epoch) != epoch;
    LAST.with(|last| {
        let now = std::time::Instant::now();
        if !force
            && last
                .get()
                .is_some_and(|at| now.duration_since(at) < COLLECT_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // SAFETY: mi_collect takes a flag and touches only the allocator's own state.
        unsafe { libmimalloc_sys::mi_collect(force) };
    });
}

/// The size from which malloc gives a block a mapping of its own, which goes back to the
/// system when the block is freed: glibc's starting value, kept (see [`fix_mmap_threshold`]).
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Fixes the size from which glibc's malloc maps a block of its own, instead of letting
/// glibc move it. Why: glibc starts at 128 KiB but, whenever a mapped block larger than
/// the threshold is freed, raises the threshold to that block's size (up to 32 MiB) and
/// its trim threshold to twice that, for the rest of the process. sluice's accountant frees
/// blocks of up to 4.8 MB while it loads the tokenizer's tables (first request), so from
/// then on every block up to that size came out of the thread arenas, and freed ones stayed
/// there (no trim below 9.6 MB free at the top): an arena grew by what a load peak took
/// and kept it, the soak run's one-time step of +1.3 to +2.3 MiB resident (minute 9 or 15,
/// whenever the machine was busy). A fixed threshold turns that adjustment off (the trim
/// threshold stays at its default too): blocks of 128 KiB and more that find no free room
/// in their thread's arena are mapped and unmapped each time (none under steady traffic,
/// strace showed), and an arena keeps at most 128 KiB free at its top. Call it first thing.
/// Since Rust's allocations moved to mimalloc ([`configure_allocator`]) it governs only
/// what C code allocates through glibc (SQLite's caches), which can grow the same way.
/// Returns whether the allocator took it (`false` on other systems: nothing changes).
#[allow(unsafe_code)]
pub fn fix_mmap_threshold(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(bytes) = libc::c_int::try_from(bytes) else {
            return false;
        };
        // SAFETY: mallopt takes two integers and touches only the allocator's settings.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

/// Raises the soft limit on open files to the hard limit: each proxied stream holds two
/// sockets, and the usual soft limit (1024) would cap a gateway at a few hundred streams.
/// Returns the limit in force.
#[allow(unsafe_code)]
// `rlim_t` is not `u64` on every platform.
#[allow(clippy::useless_conversion)]
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write only the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        Some(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's EEVDF slice in nanoseconds, from `/proc`, where the kernel
    /// shows it (6.6+).
    fn slice_of_this_thread() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        text.lines()
            .find(|line| line.trim_start().starts_with("se.slice"))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_idle_thread_is_in_the_idle_class() {
        // On a thread of its own: the class stays with the thread that took it.
        let policy = std::thread::spawn(|| {
            let taken = set_thread_idle();
            // SAFETY: sched_getscheduler only reads its pid argument (0: this thread).
            #[allow(unsafe_code)]
            let policy = unsafe { libc::sched_getscheduler(0) };
            (taken, policy)
        })
        .join();
        // Any thread may enter the idle class, privileged or not.
        assert_eq!(policy.ok(), Some((true, libc::SCHED_IDLE)));
    }

    #[test]
    fn a_runnable_thread_is_found_on_its_core() {
        // A real line (a name with spaces and parentheses) with the core in field 39.
        let mut fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
        fields[39 - 4] = "1".into();
        let line = format!("4242 (tokio (rt) worker) R {}\n", fields.join(" "));
        assert_eq!(runnable_on(line.as_bytes()), Some(1));
        let sleeping = line.replace(") R ", ") S ");
        assert_eq!(runnable_on(sleeping.as_bytes()), None);
        assert_eq!(runnable_on(b"4242 (cut"), None);
        assert_eq!(runnable_on(b"4242 (x) R 1 2"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_running_thread_reads_as_runnable_in_its_real_stat_line() {
        let stat = std::fs::read("/proc/thread-self/stat").unwrap_or_default();
        assert!(runnable_on(&stat).is_some_and(|core| core >= 0));
    }

    /// Pins the calling thread to `core`; `false` where the system refuses.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn pin_to(core: usize) -> bool {
        // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity reads
        // it for the calling thread (pid 0).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) == 0
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_background_thread_steps_aside_while_a_request_thread_waits_for_its_core() {
        // A "request thread" that always wants the core, and this thread on the same core:
        // whenever this one runs, the other is runnable there and not running.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tid_sender, tid) = std::sync::mpsc::channel();
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _ = tid_sender.send((pin_to(0), current_thread_id()));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let Ok((pinned, tid)) = tid.recv() else {
            panic!("the spinning thread did not start");
        };
        if !pinned || !pin_to(0) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = spinner.join();
            eprintln!("skipped: threads cannot be pinned here");
            return;
        }
        let mut courtesy = Courtesy {
            since: Some(std::time::Instant::now()),
            known: REQUEST_THREADS_COUNT.load(std::sync::atomic::Ordering::Acquire),
            // A place past the registry's: its core is unknown, so it is always read.
            stats: std::fs::File::open(format!("/proc/self/task/{tid}/stat"))
                .into_iter()
                .map(|stat| (usize::MAX, stat))
                .collect(),
        };
        let waits = current_core().is_some_and(|core| courtesy.request_thread_waits(core));
        // A quantum of work done: the next step looks, finds the spinner waiting, and sleeps.
        courtesy.since = courtesy.since.map(|t| t - BACKGROUND_QUANTUM);
        let started = std::time::Instant::now();
        courtesy.step();
        let paused = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = spinner.join();
        assert!(waits, "the spinning thread reads as waiting for this core");
        assert!(paused >= STEP_ASIDE_PAUSE, "stepped aside for {paused:?}");
    }

    #[test]
    fn only_a_heap_with_megabytes_free_is_trimmed() {
        // Steady traffic leaves well under a MiB free between trims (159 pages measured).
        assert!(!worth_trimming(159 * 4096));
        assert!(!worth_trimming(TRIM_FREE_BYTES - 1));
        // What a burst of 1,000 streams leaves behind once they end.
        assert!(worth_trimming(TRIM_FREE_BYTES));
        assert!(worth_trimming(40 << 20));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_freed_in_small_pieces_shows_as_free_heap() {
        // The free heap is the whole process's, and other tests allocate and free beside
        // this one: a round they disturbed is tried again, up to three times.
        let grew = (0..3).map(|_| freed_heap_growth()).max().unwrap_or(0);
        assert!(grew >= 16 << 20, "only {grew} bytes more free heap");
    }

    fn freed_heap_growth() -> usize {
        // Run on a thread of its own so the allocations stay in one arena.
        std::thread::spawn(|| {
            let before = free_heap_bytes().unwrap_or(0);
            // Every other piece stays, so the freed ones cannot merge back into the top
            // of the heap (which glibc hands back by itself).
            let mut pieces: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 1000]).collect();
            let kept: Vec<Vec<u8>> = pieces.iter_mut().step_by(2).map(std::mem::take).collect();
            drop(pieces);
            let after = free_heap_bytes().unwrap_or(0);
            drop(kept);
            after.saturating_sub(before)
        })
        .join()
        .unwrap_or(0)
    }

    /// The scheduling policy of thread `tid`.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn policy_of(tid: i32) -> i32 {
        // SAFETY: sched_getscheduler takes a thread id and returns its policy.
        unsafe { libc::sched_getscheduler(tid) }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_log_threads_leave_the_idle_class_while_behind_and_return_once_caught_up() {
        const HOLD: std::time::Duration = std::time::Duration::from_millis(50);
        static GROUP: CatchUp = CatchUp::new(HOLD);
        let (ready, joined) = std::sync::mpsc::channel();
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let member = std::thread::spawn(move || {
            let membership = GROUP.join();
            let _ = ready.send(current_thread_id());
            let _ = finished.recv();
            drop(membership);
        });
        let Ok(tid) = joined.recv() else {
            panic!("the member did not start");
        };
        if idle_class_is_reversible() {
            assert_eq!(policy_of(tid), libc::SCHED_IDLE, "keeping up: idle class");
            GROUP.set_behind(LogPart::Writer, true);
            assert_eq!(policy_of(tid), libc::SCHED_BATCH, "behind: batch class");
            GROUP.set_behind(LogPart::Accountant, true);
            GROUP.set_behind(LogPart::Writer, false);
            assert_eq!(policy_of(tid), libc::SCHED_BATCH, "one part still behind");
            GROUP.set_behind(LogPart::Accountant, false);
            assert_eq!(
                policy_of(tid),
                libc::SCHED_BATCH,
                "caught up just now: held in the batch class"
            );
            std::thread::sleep(HOLD);
            GROUP.set_behind(LogPart::Writer, false);
            assert_eq!(
                policy_of(tid),
                libc::SCHED_BATCH,
                "the accountant still behind"
            );
            GROUP.set_behind(LogPart::Accountant, false);
            assert_eq!(
                policy_of(tid),
                libc::SCHED_IDLE,
                "caught up a while: idle again"
            );
        } else {
            // Unprivileged: the idle class could not be left, so it is never entered.
            assert_eq!(policy_of(tid), libc::SCHED_BATCH);
        }
        let _ = finish.send(());
        assert!(member.join().is_ok());
        assert!(
            GROUP.members().threads.is_empty(),
            "a thread leaves the group when done"
        );
    }

    #[allow(unsafe_code)]
    #[test]
    fn the_allocator_options_set_are_the_ones_meant() {
        // The numbers of `configure_allocator` are those of the mimalloc built here.
        assert_eq!(MI_OPTION_COUNT, libmimalloc_sys::_mi_option_last);
        configure_allocator();
        // SAFETY: mi_option_get reads an option's value.
        let (eager, thp) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP),
            )
        };
        assert_eq!((eager, thp), (0, 0));
    }

    /// The check itself, in a process of its own (the test below starts it): malloc
    /// serves a block from free room in the thread's arena before it looks at the
    /// threshold, and a test thread's arena, shared with other tests, may hold a free
    /// megabyte. In a fresh process it holds none.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    #[test]
    #[ignore = "run in a process of its own by a_large_block_freed_does_not_move_the_threshold_for_the_next"]
    fn mmap_threshold_probe() {
        assert!(fix_mmap_threshold(MMAP_THRESHOLD));
        // What glibc would otherwise learn from: a 4 MiB mapped block, freed (the
        // tokenizer's tables at start).
        drop(std::hint::black_box(vec![1_u8; 4 << 20]));
        // A later 1 MiB block is mapped still (glibc would have served it from the heap
        // and kept it there once freed). A mapped block's usable size is its whole pages
        // less the chunk header; an arena's is the request rounded up to 16 bytes.
        let block = std::hint::black_box(vec![1_u8; 1 << 20]);
        // SAFETY: the pointer is a live allocation of the system allocator (malloc).
        let usable = unsafe { libc::malloc_usable_size(block.as_ptr() as *mut libc::c_void) };
        assert!(
            usable >= (1 << 20) + 4096 - 64,
            "a 1 MiB block came from the heap (usable size {usable})"
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_large_block_freed_does_not_move_the_threshold_for_the_next() {
        let probe = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "sys::tests::mmap_threshold_probe"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&probe.stdout);
        assert!(said.contains("1 passed"), "{said}");
    }

    #[test]
    fn a_short_slice_is_taken_by_the_thread_and_not_passed_on() {
        let outcome = std::thread::spawn(|| {
            let default = slice_of_this_thread();
            let taken = request_short_slices(REQUEST_SLICE);
            let own = slice_of_this_thread();
            let child = std::thread::spawn(slice_of_this_thread)
                .join()
                .ok()
                .flatten();
            (default, taken, own, child)
        })
        .join();
        let Ok((default, taken, own, child)) = outcome else {
            panic!("the test thread panicked");
        };
        // Kernels before EEVDF's per-thread slices show no slice, or refuse the request.
        if default.is_none() || !taken {
            return;
        }
        assert_eq!(own, Some(REQUEST_SLICE.as_nanos() as u64));
        assert_eq!(
            child, default,
            "a thread started later keeps the default slice"
        );
    }
}
