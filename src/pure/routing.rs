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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::now_ms;
use crate::config::Strategy;
use crate::upstream::UpstreamRuntime;

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

    fn is_empty(&self) -> bool {
        self.upstreams.is_empty() && self.keys.is_empty()
    }
}

const SESSION_LIMIT: usize = 100_000;

/// Where a session sticks, until when, and when other instances were last told.
#[derive(Debug, Clone, Copy)]
struct Pin {
    choice: Choice,
    expires: Instant,
    told: Instant,
}

#[derive(Debug)]
pub struct Router {
    strategy: Strategy,
    turn: AtomicUsize,
    /// Smooth weighted round robin state, one entry per upstream.
    weights: Mutex<Vec<i64>>,
    session_ttl: Option<Duration>,
    sessions: Mutex<HashMap<String, Pin>>,
}

impl Router {
    pub fn new(strategy: Strategy, upstream_count: usize, session_ttl: Option<Duration>) -> Self {
        Self {
            strategy,
            turn: AtomicUsize::new(0),
            weights: Mutex::new(vec![0; upstream_count]),
            session_ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn sessions_enabled(&self) -> bool {
        self.session_ttl.is_some()
    }

    /// Picks the next upstream and key among `candidates` (indexes into `upstreams`).
    pub fn choose(
        &self,
        upstreams: &[Arc<UpstreamRuntime>],
        candidates: &[usize],
        tried: &Tried,
        session: Option<&str>,
    ) -> Option<Choice> {
        let now = now_ms();
        let usable = |&index: &usize| !tried.upstream_excluded(index);
        let key_for = |index: usize| -> Option<Option<usize>> {
            let upstream = upstreams.get(index)?;
            if upstream.is_cooling(now) {
                return None;
            }
            upstream.pick_key(now, |key| tried.key_excluded(index, key))
        };

        if let Some(choice) = session.and_then(|s| self.session_choice(s)) {
            let healthy = candidates.contains(&choice.upstream)
                && usable(&choice.upstream)
                && upstreams.get(choice.upstream).is_some_and(|u| {
                    !u.is_cooling(now)
                        && choice.key.is_none_or(|k| {
                            !u.key_is_cooling(k, now) && !tried.key_excluded(choice.upstream, k)
                        })
                });
            if healthy {
                return Some(choice);
            }
        }

        let healthy: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| usable(i) && upstreams.get(*i).is_some_and(|u| !u.is_cooling(now)))
            .collect();
        // Try in strategy order, falling to the next if a pick has no usable key.
        let mut remaining = healthy;
        while !remaining.is_empty() {
            let position = self.pick(upstreams, &remaining);
            let index = remaining[position];
            if let Some(key) = key_for(index) {
                return Some(Choice {
                    upstream: index,
                    key,
                });
            }
            remaining.remove(position);
        }
        if !tried.is_empty() {
            return None;
        }
        // First try with every candidate resting: the one back soonest.
        let index = *candidates.iter().min_by_key(|&&i| {
            upstreams.get(i).map_or(u64::MAX, |u| {
                let key_back = u.soonest_key().map_or(0, |k| u.key_cooldown_until(k));
                u.cooldown_until.load(Ordering::Relaxed).max(key_back)
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
    pub fn choose_again(
        &self,
        upstreams: &[Arc<UpstreamRuntime>],
        candidates: &[usize],
        tried: &Tried,
    ) -> Option<Choice> {
        let now = now_ms();
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
                let unused = |k: usize| {
                    !refused(k)
                        && !tried
                            .sent
                            .iter()
                            .any(|c| c.upstream == index && c.key == Some(k))
                };
                let fresh = upstream.pick_key(now, |k| !unused(k)).flatten();
                let key = fresh.or_else(|| {
                    (0..upstream.key_count())
                        .filter(|&k| !refused(k))
                        .min_by_key(|&k| upstream.key_cooldown_until(k))
                });
                match key {
                    Some(key) => Some(key),
                    None => continue,
                }
            };
            let back = upstream.cooldown_until.load(Ordering::Relaxed);
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
    fn pick(&self, upstreams: &[Arc<UpstreamRuntime>], healthy: &[usize]) -> usize {
        let count = healthy.len();
        if count == 1 {
            return 0;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        // Ties go round robin, so equal upstreams share the load.
        let rotated = |score: &dyn Fn(&UpstreamRuntime) -> u64| {
            (0..count)
                .map(|offset| (turn + offset) % count)
                .min_by_key(|&position| {
                    upstreams
                        .get(healthy[position])
                        .map_or(u64::MAX, |u| score(u))
                })
                .unwrap_or(0)
        };
        match self.strategy {
            Strategy::RoundRobin => turn % count,
            Strategy::Random => fastrand::usize(..count),
            Strategy::LeastBusy => rotated(&|u| u.in_flight.load(Ordering::Relaxed) as u64),
            Strategy::LowestLatency => rotated(&|u| u.latency_us.load(Ordering::Relaxed)),
            Strategy::Weighted => self.weighted(upstreams, healthy).unwrap_or(turn % count),
        }
    }

    /// Smooth weighted round robin (as in nginx): exact proportions, evenly interleaved.
    fn weighted(&self, upstreams: &[Arc<UpstreamRuntime>], healthy: &[usize]) -> Option<usize> {
        let mut current = self.weights.lock().ok()?;
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (position, &index) in healthy.iter().enumerate() {
            let weight = i64::from(upstreams.get(index)?.config.weight);
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

    /// Where `session` sticks now, if anywhere.
    pub fn pinned(&self, session: &str) -> Option<Choice> {
        self.session_choice(session)
    }

    fn session_choice(&self, session: &str) -> Option<Choice> {
        self.session_ttl?;
        let sessions = self.sessions.lock().ok()?;
        let pin = sessions.get(session)?;
        (Instant::now() < pin.expires).then_some(pin.choice)
    }

    /// Pins a session to the upstream and key that just served it. Says whether other
    /// instances should hear of it: a new or moved pin, or one last told a while ago (so
    /// theirs does not expire while it is in use here).
    pub fn remember(&self, session: &str, choice: Choice) -> bool {
        let Some(ttl) = self.session_ttl else {
            return false;
        };
        let now = Instant::now();
        let Ok(mut sessions) = self.sessions.lock() else {
            return false;
        };
        let previous = sessions.get(session).copied();
        let tell = previous.is_none_or(|pin| {
            pin.choice != choice || pin.expires <= now || now.duration_since(pin.told) > ttl / 4
        });
        let told = previous.filter(|_| !tell).map_or(now, |pin| pin.told);
        Self::insert(
            &mut sessions,
            session,
            Pin {
                choice,
                expires: now + ttl,
                told,
            },
        );
        tell
    }

    /// Takes a pin another instance made, holding for `left`.
    pub fn adopt(&self, session: &str, choice: Choice, left: Duration) {
        if self.session_ttl.is_none() {
            return;
        }
        let now = Instant::now();
        if let Ok(mut sessions) = self.sessions.lock() {
            Self::insert(
                &mut sessions,
                session,
                Pin {
                    choice,
                    expires: now + left,
                    told: now,
                },
            );
        }
    }

    /// Sets a session's pin: in place when it has one (no new key on the hot path), else
    /// added, making room first when the map is full.
    fn insert(sessions: &mut HashMap<String, Pin>, session: &str, pin: Pin) {
        if let Some(slot) = sessions.get_mut(session) {
            *slot = pin;
            return;
        }
        if sessions.len() >= SESSION_LIMIT {
            let now = Instant::now();
            sessions.retain(|_, pin| pin.expires > now);
            if sessions.len() >= SESSION_LIMIT {
                sessions.clear();
            }
        }
        sessions.insert(session.to_string(), pin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelSet, Secret, Timeouts, Upstream};

    fn upstreams(weights: &[u32], keys: usize) -> Vec<Arc<UpstreamRuntime>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                Arc::new(
                    UpstreamRuntime::new(Upstream {
                        name: format!("u{i}"),
                        base_url: "http://h".into(),
                        keys: (0..keys).map(|k| Secret::new(format!("k{k}"))).collect(),
                        models: ModelSet::any(),
                        headers: Vec::new(),
                        proxy: None,
                        timeouts: Timeouts::default(),
                        model_map: Default::default(),
                        field_aliases: Vec::new(),
                        paths: Default::default(),
                        weight,
                        token: None,
                        limits: Default::default(),
                    })
                    .unwrap(),
                )
            })
            .collect()
    }

    fn counts(router: &Router, ups: &[Arc<UpstreamRuntime>], n: usize) -> Vec<usize> {
        let all: Vec<usize> = (0..ups.len()).collect();
        let mut counts = vec![0; ups.len()];
        for _ in 0..n {
            counts[router
                .choose(ups, &all, &Tried::default(), None)
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
        let ups = upstreams(&[1, 1, 1], 1);
        ups[0].in_flight.store(5, Ordering::Relaxed);
        ups[2].in_flight.store(1, Ordering::Relaxed);
        assert_eq!(
            counts(&Router::new(Strategy::LeastBusy, 3, None), &ups, 10),
            [0, 10, 0]
        );
        ups[0].record_success(Duration::from_millis(50));
        ups[1].record_success(Duration::from_millis(5));
        ups[2].record_success(Duration::from_millis(20));
        assert_eq!(
            counts(&Router::new(Strategy::LowestLatency, 3, None), &ups, 10),
            [0, 10, 0]
        );
    }

    #[test]
    fn resting_upstreams_are_skipped_but_a_first_try_never_fails() {
        let ups = upstreams(&[1, 1], 1);
        let router = Router::new(Strategy::RoundRobin, 2, None);
        ups[0].record_failure(Duration::from_secs(60));
        assert_eq!(counts(&router, &ups, 4), [0, 4]);
        ups[1].record_failure(Duration::from_secs(30));
        let choice = router
            .choose(&ups, &[0, 1], &Tried::default(), None)
            .unwrap();
        assert_eq!(choice.upstream, 1, "the one back soonest");
        let mut tried = Tried::default();
        tried.exclude_upstream(1);
        assert_eq!(
            router.choose(&ups, &[0, 1], &tried, None),
            None,
            "retries go only to healthy upstreams"
        );
    }

    #[test]
    fn retries_move_to_another_key_of_the_same_upstream() {
        let ups = upstreams(&[1], 2);
        let router = Router::new(Strategy::RoundRobin, 1, None);
        let first = router.choose(&ups, &[0], &Tried::default(), None).unwrap();
        let mut tried = Tried::default();
        tried.exclude_key(0, first.key.unwrap());
        let second = router.choose(&ups, &[0], &tried, None).unwrap();
        assert_ne!(first.key, second.key);
        tried.exclude_key(0, second.key.unwrap());
        assert_eq!(router.choose(&ups, &[0], &tried, None), None);
    }

    #[test]
    fn sessions_stick_while_healthy_and_move_on_failure() {
        let ups = upstreams(&[1, 1, 1], 2);
        let router = Router::new(Strategy::RoundRobin, 3, Some(Duration::from_secs(60)));
        let all = [0, 1, 2];
        let first = router
            .choose(&ups, &all, &Tried::default(), Some("s1"))
            .unwrap();
        router.remember("s1", first);
        for _ in 0..5 {
            assert_eq!(
                router
                    .choose(&ups, &all, &Tried::default(), Some("s1"))
                    .unwrap(),
                first
            );
        }
        ups[first.upstream].record_failure(Duration::from_secs(60));
        let moved = router
            .choose(&ups, &all, &Tried::default(), Some("s1"))
            .unwrap();
        assert_ne!(moved.upstream, first.upstream);
    }
}
