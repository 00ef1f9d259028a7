//! How a request picks its upstream and key.
//!
//! Candidates are the upstreams that serve the requested model (or, without a model, those
//! serving anything). A session (`X-Session-Id` or the body's `user`) sticks to the upstream
//! and key it used last while they are healthy. Otherwise the strategy picks among the
//! healthy candidates: not resting after a failure and with a usable key. A first try
//! never fails for want of a healthy upstream: it takes the one back soonest. Retries go
//! to healthy upstreams and keys not yet tried; when none is left, [`Router::choose_again`]
//! goes back to a candidate already tried (a lone upstream is retried, another key of its
//! pool first), so `retries` means tries, not other upstreams.
//!
//! The router reads upstreams through [`Health`], plain figures the runtime keeps in
//! atomics, and is handed `now` (milliseconds on the clock cooldowns are kept in): it
//! holds no client and reads no clock, so every choice can be tested with made-up figures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Strategy;

/// What routing needs to know of an upstream: plain figures, so a choice depends on
/// nothing else. Instants are milliseconds on the caller's clock (the `now` it passes).
pub trait Health {
    /// Requests sent and not yet finished.
    fn in_flight(&self) -> usize;
    /// Moving average of time to first byte in µs; 0 until the first answer.
    fn latency_us(&self) -> u64;
    /// When the upstream is back from resting after a failure; 0 when it never rested.
    fn rests_until(&self) -> u64;
    /// How many keys its pool has (0: no pool).
    fn key_count(&self) -> usize;
    /// When key `key` is back from resting; 0 when it never rested.
    fn key_rests_until(&self, key: usize) -> u64;
    /// Its share under the `weighted` strategy.
    fn weight(&self) -> u32;
    /// Where the next look for a key starts; each call moves it on, so keys take turns
    /// across every use of the pool (routing and sluice's own calls alike).
    fn key_turn(&self) -> usize;

    fn is_resting(&self, now: u64) -> bool {
        self.rests_until() > now
    }

    fn key_is_resting(&self, key: usize, now: u64) -> bool {
        self.key_rests_until(key) > now
    }

    /// The next usable key in turn, skipping resting keys and `excluded` ones. `None` if
    /// the upstream has keys and none is usable; `Some(None)` if it has no keys.
    fn pick_key(&self, now: u64, excluded: impl Fn(usize) -> bool) -> Option<Option<usize>> {
        let count = self.key_count();
        if count == 0 {
            return Some(None);
        }
        let start = self.key_turn();
        (0..count)
            .map(|offset| start.wrapping_add(offset) % count)
            .find(|&index| !excluded(index) && !self.key_is_resting(index, now))
            .map(Some)
    }

    /// When every key rests: the one back soonest.
    fn soonest_key(&self) -> Option<usize> {
        (0..self.key_count()).min_by_key(|&index| self.key_rests_until(index))
    }
}

impl<H: Health + ?Sized> Health for Arc<H> {
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn latency_us(&self) -> u64 {
        (**self).latency_us()
    }
    fn rests_until(&self) -> u64 {
        (**self).rests_until()
    }
    fn key_count(&self) -> usize {
        (**self).key_count()
    }
    fn key_rests_until(&self, key: usize) -> u64 {
        (**self).key_rests_until(key)
    }
    fn weight(&self) -> u32 {
        (**self).weight()
    }
    fn key_turn(&self) -> usize {
        (**self).key_turn()
    }
}

/// An upstream and the key to use there (`None` when it has no key pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub upstream: usize,
    pub key: Option<usize>,
}

/// What a request has already tried and must not try again.
#[derive(Debug, Default)]
pub struct Tried {
    upstreams: Vec<usize>,
    keys: Vec<(usize, usize)>,
    /// Upstreams at their own limits: not even a try again goes there.
    limited: Vec<usize>,
    /// Where each try went.
    sent: Vec<Choice>,
}

impl Tried {
    pub fn exclude_upstream(&mut self, upstream: usize) {
        self.upstreams.push(upstream);
    }

    /// Excludes an upstream at its own limits, for good.
    pub fn exclude_limited(&mut self, upstream: usize) {
        self.upstreams.push(upstream);
        self.limited.push(upstream);
    }

    /// Notes where a try went.
    pub fn sent(&mut self, choice: Choice) {
        self.sent.push(choice);
    }

    pub fn exclude_key(&mut self, upstream: usize, key: usize) {
        self.keys.push((upstream, key));
    }

    fn upstream_excluded(&self, upstream: usize) -> bool {
        self.upstreams.contains(&upstream)
    }

    fn key_excluded(&self, upstream: usize, key: usize) -> bool {
        self.keys.contains(&(upstream, key))
    }

    fn key_sent(&self, upstream: usize, key: usize) -> bool {
        self.sent
            .iter()
            .any(|c| c.upstream == upstream && c.key == Some(key))
    }

    fn is_empty(&self) -> bool {
        self.upstreams.is_empty() && self.keys.is_empty()
    }
}

const SESSION_LIMIT: usize = 100_000;

/// Where a session sticks, until when, and when other instances were last told
/// (milliseconds on the router's clock).
#[derive(Debug, Clone, Copy)]
struct Pin {
    choice: Choice,
    expires: u64,
    told: u64,
}

#[derive(Debug)]
pub struct Router {
    strategy: Strategy,
    turn: AtomicUsize,
    /// Smooth weighted round robin state, one entry per upstream.
    weights: Mutex<Vec<i64>>,
    /// How long a session sticks, in milliseconds; `None`: sessions are off.
    session_ttl: Option<u64>,
    sessions: Mutex<HashMap<String, Pin>>,
}

impl Router {
    pub fn new(strategy: Strategy, upstream_count: usize, session_ttl: Option<Duration>) -> Self {
        Self {
            strategy,
            turn: AtomicUsize::new(0),
            weights: Mutex::new(vec![0; upstream_count]),
            session_ttl: session_ttl.map(millis),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn sessions_enabled(&self) -> bool {
        self.session_ttl.is_some()
    }

    /// Picks the next upstream and key among `candidates` (indexes into `upstreams`) at
    /// `now`: the session's pin while it is healthy, else the strategy's pick among the
    /// healthy; on a first try with every candidate resting, the one back soonest.
    pub fn choose<H: Health>(
        &self,
        upstreams: &[H],
        candidates: &[usize],
        tried: &Tried,
        session: Option<&str>,
        now: u64,
    ) -> Option<Choice> {
        if let Some(choice) = session.and_then(|s| self.session_choice(s, now)) {
            if Self::pin_usable(upstreams, candidates, tried, choice, now) {
                return Some(choice);
            }
        }
        let mut healthy: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| {
                !tried.upstream_excluded(i) && upstreams.get(i).is_some_and(|u| !u.is_resting(now))
            })
            .collect();
        // Try in strategy order, falling to the next if a pick has no usable key.
        while !healthy.is_empty() {
            let position = self.pick(upstreams, &healthy);
            let index = healthy[position];
            let key = upstreams
                .get(index)
                .and_then(|u| u.pick_key(now, |key| tried.key_excluded(index, key)));
            if let Some(key) = key {
                return Some(Choice {
                    upstream: index,
                    key,
                });
            }
            healthy.remove(position);
        }
        if !tried.is_empty() {
            return None;
        }
        Self::back_soonest(upstreams, candidates, now)
    }

    /// Whether a session's pin can take this try: a candidate not tried, not resting, with
    /// its key neither resting nor refused here.
    fn pin_usable<H: Health>(
        upstreams: &[H],
        candidates: &[usize],
        tried: &Tried,
        choice: Choice,
        now: u64,
    ) -> bool {
        candidates.contains(&choice.upstream)
            && !tried.upstream_excluded(choice.upstream)
            && upstreams.get(choice.upstream).is_some_and(|u| {
                !u.is_resting(now)
                    && choice.key.is_none_or(|k| {
                        !u.key_is_resting(k, now) && !tried.key_excluded(choice.upstream, k)
                    })
            })
    }

    /// A first try with every candidate resting: the one back soonest (itself or, when all
    /// its keys rest, its soonest key), with a usable key if it has one.
    fn back_soonest<H: Health>(upstreams: &[H], candidates: &[usize], now: u64) -> Option<Choice> {
        let index = *candidates.iter().min_by_key(|&&i| {
            upstreams.get(i).map_or(u64::MAX, |u| {
                let key_back = u.soonest_key().map_or(0, |k| u.key_rests_until(k));
                u.rests_until().max(key_back)
            })
        })?;
        let upstream = upstreams.get(index)?;
        let key = match upstream.pick_key(now, |_| false) {
            Some(key) => key,
            None => upstream.soonest_key(),
        };
        Some(Choice {
            upstream: index,
            key,
        })
    }

    /// A retry when [`Router::choose`] has nothing left: a candidate tried already, the one
    /// back soonest (resting or not: the request asked for more tries, and waits its
    /// back-off), never one at its own limits. Its key is one this request has not used
    /// yet if it has one, else one not refused (401/403/429) here, the one back soonest;
    /// `None` when every key of the pool was refused.
    pub fn choose_again<H: Health>(
        &self,
        upstreams: &[H],
        candidates: &[usize],
        tried: &Tried,
        now: u64,
    ) -> Option<Choice> {
        let mut best: Option<(u64, Choice)> = None;
        for &index in candidates {
            if tried.limited.contains(&index) {
                continue;
            }
            let Some(upstream) = upstreams.get(index) else {
                continue;
            };
            let key = if upstream.key_count() == 0 {
                None
            } else {
                let refused = |k: usize| tried.key_excluded(index, k);
                let fresh = upstream
                    .pick_key(now, |k| refused(k) || tried.key_sent(index, k))
                    .flatten();
                let key = fresh.or_else(|| {
                    (0..upstream.key_count())
                        .filter(|&k| !refused(k))
                        .min_by_key(|&k| upstream.key_rests_until(k))
                });
                match key {
                    Some(key) => Some(key),
                    None => continue,
                }
            };
            let back = upstream.rests_until();
            if best.is_none_or(|(soonest, _)| back < soonest) {
                best = Some((
                    back,
                    Choice {
                        upstream: index,
                        key,
                    },
                ));
            }
        }
        best.map(|(_, choice)| choice)
    }

    /// A position in `healthy` (non-empty) by the configured strategy.
    fn pick<H: Health>(&self, upstreams: &[H], healthy: &[usize]) -> usize {
        let count = healthy.len();
        if count == 1 {
            return 0;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        // Ties go round robin, so equal upstreams share the load.
        let rotated = |score: &dyn Fn(&H) -> u64| {
            (0..count)
                .map(|offset| (turn + offset) % count)
                .min_by_key(|&position| upstreams.get(healthy[position]).map_or(u64::MAX, score))
                .unwrap_or(0)
        };
        match self.strategy {
            Strategy::RoundRobin => turn % count,
            Strategy::Random => fastrand::usize(..count),
            Strategy::LeastBusy => rotated(&|u| u.in_flight() as u64),
            Strategy::LowestLatency => rotated(&|u| u.latency_us()),
            Strategy::Weighted => self.weighted(upstreams, healthy).unwrap_or(turn % count),
        }
    }

    /// Smooth weighted round robin (as in nginx): exact proportions, evenly interleaved.
    fn weighted<H: Health>(&self, upstreams: &[H], healthy: &[usize]) -> Option<usize> {
        let mut current = self.weights.lock().ok()?;
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (position, &index) in healthy.iter().enumerate() {
            let weight = i64::from(upstreams.get(index)?.weight());
            if weight == 0 {
                continue;
            }
            let slot = current.get_mut(index)?;
            *slot += weight;
            total += weight;
            if best.is_none_or(|(_, value)| *slot > value) {
                best = Some((position, *slot));
            }
        }
        let (position, _) = best?;
        if let Some(slot) = current.get_mut(healthy[position]) {
            *slot -= total;
        }
        Some(position)
    }

    /// The pin kept for `session`, if any, whether or not it has expired: for status and
    /// tests. [`Router::choose`] follows only a pin still in force at its `now`.
    pub fn pinned(&self, session: &str) -> Option<Choice> {
        self.session_ttl?;
        let sessions = self.sessions.lock().ok()?;
        sessions.get(session).map(|pin| pin.choice)
    }

    fn session_choice(&self, session: &str, now: u64) -> Option<Choice> {
        self.session_ttl?;
        let sessions = self.sessions.lock().ok()?;
        let pin = sessions.get(session)?;
        (now < pin.expires).then_some(pin.choice)
    }

    /// Pins a session to the upstream and key that just served it, at `now`. Says whether
    /// other instances should hear of it: a new or moved pin, or one last told a while ago
    /// (so theirs does not expire while it is in use here).
    pub fn remember(&self, session: &str, choice: Choice, now: u64) -> bool {
        let Some(ttl) = self.session_ttl else {
            return false;
        };
        let Ok(mut sessions) = self.sessions.lock() else {
            return false;
        };
        let previous = sessions.get(session).copied();
        let tell = previous.is_none_or(|pin| {
            pin.choice != choice || pin.expires <= now || now.saturating_sub(pin.told) > ttl / 4
        });
        let told = previous.filter(|_| !tell).map_or(now, |pin| pin.told);
        let pin = Pin {
            choice,
            expires: now.saturating_add(ttl),
            told,
        };
        Self::insert(&mut sessions, session, pin, now);
        tell
    }

    /// Takes a pin another instance made, holding for `left` from `now`.
    pub fn adopt(&self, session: &str, choice: Choice, left: Duration, now: u64) {
        if self.session_ttl.is_none() {
            return;
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            let pin = Pin {
                choice,
                expires: now.saturating_add(millis(left)),
                told: now,
            };
            Self::insert(&mut sessions, session, pin, now);
        }
    }

    /// Sets a session's pin: in place when it has one (no new key on the hot path), else
    /// added, making room first when the map is full.
    fn insert(sessions: &mut HashMap<String, Pin>, session: &str, pin: Pin, now: u64) {
        if let Some(slot) = sessions.get_mut(session) {
            *slot = pin;
            return;
        }
        if sessions.len() >= SESSION_LIMIT {
            sessions.retain(|_, pin| pin.expires > now);
            if sessions.len() >= SESSION_LIMIT {
                sessions.clear();
            }
        }
        sessions.insert(session.to_string(), pin);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// An upstream's figures, made up: what routing sees of it.
    #[derive(Debug, Default)]
    struct Fake {
        in_flight: usize,
        latency_us: u64,
        rests_until: u64,
        keys_rest_until: Vec<u64>,
        weight: u32,
        turn: Cell<usize>,
    }

    impl Health for Fake {
        fn in_flight(&self) -> usize {
            self.in_flight
        }
        fn latency_us(&self) -> u64 {
            self.latency_us
        }
        fn rests_until(&self) -> u64 {
            self.rests_until
        }
        fn key_count(&self) -> usize {
            self.keys_rest_until.len()
        }
        fn key_rests_until(&self, key: usize) -> u64 {
            self.keys_rest_until.get(key).copied().unwrap_or(0)
        }
        fn weight(&self) -> u32 {
            self.weight
        }
        fn key_turn(&self) -> usize {
            let turn = self.turn.get();
            self.turn.set(turn + 1);
            turn
        }
    }

    const NOW: u64 = 1_000_000;

    fn upstreams(weights: &[u32], keys: usize) -> Vec<Fake> {
        weights
            .iter()
            .map(|&weight| Fake {
                weight,
                keys_rest_until: vec![0; keys],
                ..Fake::default()
            })
            .collect()
    }

    fn counts(router: &Router, ups: &[Fake], n: usize) -> Vec<usize> {
        let all: Vec<usize> = (0..ups.len()).collect();
        let mut counts = vec![0; ups.len()];
        for _ in 0..n {
            counts[router
                .choose(ups, &all, &Tried::default(), None, NOW)
                .unwrap()
                .upstream] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_is_even() {
        let ups = upstreams(&[1, 1, 1], 1);
        assert_eq!(
            counts(&Router::new(Strategy::RoundRobin, 3, None), &ups, 300),
            [100, 100, 100]
        );
    }

    #[test]
    fn weighted_is_exactly_proportional() {
        let ups = upstreams(&[5, 3, 2, 0], 1);
        assert_eq!(
            counts(&Router::new(Strategy::Weighted, 4, None), &ups, 100),
            [50, 30, 20, 0]
        );
    }

    #[test]
    fn random_reaches_everyone_roughly_evenly() {
        let ups = upstreams(&[1, 1], 1);
        let c = counts(&Router::new(Strategy::Random, 2, None), &ups, 2000);
        assert!(c.iter().all(|&n| n > 800), "{c:?}");
    }

    #[test]
    fn least_busy_and_lowest_latency_prefer_the_idle_and_the_fast() {
        let mut ups = upstreams(&[1, 1, 1], 1);
        ups[0].in_flight = 5;
        ups[2].in_flight = 1;
        assert_eq!(
            counts(&Router::new(Strategy::LeastBusy, 3, None), &ups, 10),
            [0, 10, 0]
        );
        ups[0].latency_us = 50_000;
        ups[1].latency_us = 5_000;
        ups[2].latency_us = 20_000;
        assert_eq!(
            counts(&Router::new(Strategy::LowestLatency, 3, None), &ups, 10),
            [0, 10, 0]
        );
    }

    #[test]
    fn equal_scores_share_the_load() {
        let ups = upstreams(&[1, 1], 1);
        assert_eq!(
            counts(&Router::new(Strategy::LeastBusy, 2, None), &ups, 10),
            [5, 5]
        );
    }

    #[test]
    fn resting_upstreams_are_skipped_but_a_first_try_never_fails() {
        let mut ups = upstreams(&[1, 1], 1);
        let router = Router::new(Strategy::RoundRobin, 2, None);
        ups[0].rests_until = NOW + 60_000;
        assert_eq!(counts(&router, &ups, 4), [0, 4]);
        ups[1].rests_until = NOW + 30_000;
        let choice = router
            .choose(&ups, &[0, 1], &Tried::default(), None, NOW)
            .unwrap();
        assert_eq!(choice.upstream, 1, "the one back soonest");
        let mut tried = Tried::default();
        tried.exclude_upstream(1);
        assert_eq!(
            router.choose(&ups, &[0, 1], &tried, None, NOW),
            None,
            "retries go only to healthy upstreams"
        );
    }

    #[test]
    fn rests_end_at_their_instant() {
        let mut ups = upstreams(&[1, 1], 0);
        ups[0].rests_until = NOW + 10;
        let router = Router::new(Strategy::RoundRobin, 2, None);
        let tried = Tried::default();
        let pick = |now| router.choose(&ups, &[0], &tried, None, now).unwrap();
        // Alone and resting: a first try still takes it.
        assert_eq!(pick(NOW + 9).upstream, 0);
        let mut excluded = Tried::default();
        excluded.exclude_key(1, 0);
        assert_eq!(router.choose(&ups, &[0], &excluded, None, NOW + 9), None);
        assert!(
            router
                .choose(&ups, &[0], &excluded, None, NOW + 10)
                .is_some()
        );
    }

    #[test]
    fn a_first_try_with_every_key_resting_takes_the_key_back_soonest() {
        let mut ups = upstreams(&[1, 1], 2);
        ups[0].keys_rest_until = vec![NOW + 50, NOW + 40];
        ups[1].keys_rest_until = vec![NOW + 30, NOW + 20];
        let router = Router::new(Strategy::RoundRobin, 2, None);
        assert_eq!(
            router.choose(&ups, &[0, 1], &Tried::default(), None, NOW),
            Some(Choice {
                upstream: 1,
                key: Some(1)
            })
        );
    }

    #[test]
    fn retries_move_to_another_key_of_the_same_upstream() {
        let ups = upstreams(&[1], 2);
        let router = Router::new(Strategy::RoundRobin, 1, None);
        let first = router
            .choose(&ups, &[0], &Tried::default(), None, NOW)
            .unwrap();
        let mut tried = Tried::default();
        tried.exclude_key(0, first.key.unwrap());
        let second = router.choose(&ups, &[0], &tried, None, NOW).unwrap();
        assert_ne!(first.key, second.key);
        tried.exclude_key(0, second.key.unwrap());
        assert_eq!(router.choose(&ups, &[0], &tried, None, NOW), None);
    }

    #[test]
    fn keys_take_turns_skipping_resting_ones() {
        let mut ups = upstreams(&[1], 3);
        let router = Router::new(Strategy::RoundRobin, 1, None);
        let key = |ups: &[Fake]| {
            router
                .choose(ups, &[0], &Tried::default(), None, NOW)
                .unwrap()
                .key
                .unwrap()
        };
        let used: Vec<usize> = (0..6).map(|_| key(&ups)).collect();
        assert_eq!(used, [0, 1, 2, 0, 1, 2]);
        ups[0].keys_rest_until[1] = NOW + 1;
        let used: Vec<usize> = (0..4).map(|_| key(&ups)).collect();
        assert!(!used.contains(&1), "{used:?}");
    }

    #[test]
    fn choose_again_goes_back_to_the_one_back_soonest_with_an_unused_key() {
        let mut ups = upstreams(&[1, 1], 2);
        ups[0].rests_until = NOW + 500;
        ups[1].rests_until = NOW + 100;
        let router = Router::new(Strategy::RoundRobin, 2, None);
        let mut tried = Tried::default();
        for upstream in [0, 1] {
            tried.exclude_upstream(upstream);
            tried.sent(Choice {
                upstream,
                key: Some(0),
            });
        }
        assert_eq!(router.choose(&ups, &[0, 1], &tried, None, NOW), None);
        assert_eq!(
            router.choose_again(&ups, &[0, 1], &tried, NOW),
            Some(Choice {
                upstream: 1,
                key: Some(1)
            })
        );
        // Every key of 1 used: a used one not refused, the one back soonest.
        tried.sent(Choice {
            upstream: 1,
            key: Some(1),
        });
        ups[1].keys_rest_until = vec![NOW + 9, NOW + 3];
        assert_eq!(
            router.choose_again(&ups, &[0, 1], &tried, NOW),
            Some(Choice {
                upstream: 1,
                key: Some(1)
            })
        );
        // Refused keys and upstreams at their limits are never gone back to.
        tried.exclude_key(1, 0);
        tried.exclude_key(1, 1);
        assert_eq!(
            router
                .choose_again(&ups, &[0, 1], &tried, NOW)
                .unwrap()
                .upstream,
            0
        );
        tried.exclude_limited(0);
        assert_eq!(router.choose_again(&ups, &[0, 1], &tried, NOW), None);
    }

    #[test]
    fn sessions_stick_while_healthy_and_move_on_failure() {
        let mut ups = upstreams(&[1, 1, 1], 2);
        let router = Router::new(Strategy::RoundRobin, 3, Some(Duration::from_secs(60)));
        let all = [0, 1, 2];
        let first = router
            .choose(&ups, &all, &Tried::default(), Some("s1"), NOW)
            .unwrap();
        router.remember("s1", first, NOW);
        for _ in 0..5 {
            assert_eq!(
                router
                    .choose(&ups, &all, &Tried::default(), Some("s1"), NOW)
                    .unwrap(),
                first
            );
        }
        ups[first.upstream].rests_until = NOW + 60_000;
        let moved = router
            .choose(&ups, &all, &Tried::default(), Some("s1"), NOW)
            .unwrap();
        assert_ne!(moved.upstream, first.upstream);
    }

    #[test]
    fn a_pin_expires_after_its_ttl_and_others_are_told_when_it_is_new_moved_or_old() {
        let ups = upstreams(&[1, 1], 0);
        let router = Router::new(Strategy::RoundRobin, 2, Some(Duration::from_secs(60)));
        let one = Choice {
            upstream: 1,
            key: None,
        };
        assert!(router.remember("s", one, NOW), "new");
        assert!(!router.remember("s", one, NOW + 1_000), "told lately");
        assert!(
            router.remember("s", one, NOW + 16_000),
            "told a quarter ago"
        );
        let pick = |now| {
            router
                .choose(&ups, &[0, 1], &Tried::default(), Some("s"), now)
                .unwrap()
        };
        assert_eq!(pick(NOW + 75_999), one);
        // Expired: the strategy decides (round robin starts at 0).
        assert_eq!(pick(NOW + 76_000).upstream, 0);
        assert_eq!(router.pinned("s"), Some(one), "kept until replaced");
        let zero = Choice {
            upstream: 0,
            key: None,
        };
        assert!(router.remember("s", zero, NOW + 76_000), "moved");
        router.adopt("t", one, Duration::from_millis(10), NOW);
        assert_eq!(
            router
                .choose(&ups, &[0, 1], &Tried::default(), Some("t"), NOW + 9)
                .unwrap(),
            one
        );
        let off = Router::new(Strategy::RoundRobin, 2, None);
        assert!(!off.remember("s", one, NOW));
        assert_eq!(off.pinned("s"), None);
    }
}
