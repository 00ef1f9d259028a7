//! Failed admin authentication, throttled per client address.
//!
//! Every admin route (`/api/*`, `/api/login`, `/metrics`, `/v1/status`) checks a presented
//! key through [`AuthThrottle::attempt`]. An address may fail [`FREE_FAILURES`] times; each
//! failure after that locks it out for twice as long as the one before, from one second
//! up to [`MAX_LOCKOUT`]. While locked out its keys are not even compared (the right one
//! is refused too), so guessing costs time whatever the parallelism: the check and the
//! count happen under one lock. A success forgets the address. IPv6 clients count per /64,
//! what one host usually holds. The table is bounded: past [`MAX_ENTRIES`] the
//! addresses quiet the longest are dropped. It lives in `gateway::Shared`, so a reload
//! keeps it. It never sees a key, only whether it matched.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Failures an address may make before it is locked out.
pub const FREE_FAILURES: u32 = 5;
/// The first lockout; each further failure doubles it.
pub const FIRST_LOCKOUT: Duration = Duration::from_secs(1);
/// The longest lockout, and how long an address must stay quiet to be forgotten.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most.
pub const MAX_ENTRIES: usize = 10_000;

/// What checking a presented credential found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The admin key: the address's failures are forgotten.
    Pass,
    /// Neither the admin key nor anything else the route accepts: counted.
    Fail,
    /// Not the admin key, but something the route accepts (a gateway key on
    /// `/v1/status`): not counted.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// Clock (ms) until which the address is locked out; 0 when it is not.
    locked_until: u64,
    last_failure: u64,
}

impl Entry {
    /// When the address may be forgotten: quiet for [`MAX_LOCKOUT`] after its last failure
    /// and its lockout.
    fn forgotten_at(&self) -> u64 {
        self.locked_until
            .max(self.last_failure)
            .saturating_add(ms(MAX_LOCKOUT))
    }
}

/// The failure table and its counters: per client address by default, or per admin
/// account name (`AuthThrottle<String>`) for password logins.
#[derive(Debug)]
pub struct AuthThrottle<K = IpAddr> {
    entries: Mutex<HashMap<K, Entry>>,
    failures: AtomicU64,
    lockouts: AtomicU64,
    refused: AtomicU64,
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The address failures are counted under: IPv4 as is, IPv6 by its /64.
fn counted_as(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

impl<K> Default for AuthThrottle<K> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            failures: AtomicU64::new(0),
            lockouts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }
}

impl AuthThrottle<IpAddr> {
    /// Runs `check` for a credential `client` presents, unless `client` is locked out:
    /// then `Err` with the seconds to wait. `now_ms` is a monotonic clock.
    pub fn attempt(
        &self,
        client: IpAddr,
        now_ms: u64,
        check: impl FnOnce() -> Verdict,
    ) -> Result<Verdict, u64> {
        self.attempt_as(counted_as(client), now_ms, check)
    }

    /// Seconds `client` is still locked out for, if it is.
    pub fn locked_ip(&self, client: IpAddr, now_ms: u64) -> Option<u64> {
        self.locked(&counted_as(client), now_ms)
    }
}

impl<K: std::hash::Hash + Eq + Clone + std::fmt::Display> AuthThrottle<K> {
    /// Seconds `who` is still locked out for, if it is: a check before slow work (a
    /// password hash), whose outcome [`attempt_as`](Self::attempt_as) then counts.
    pub fn locked(&self, who: &K, now_ms: u64) -> Option<u64> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(who)?;
        (entry.locked_until > now_ms).then(|| (entry.locked_until - now_ms).div_ceil(1000).max(1))
    }

    /// [`AuthThrottle::attempt`] for any kind of counted name.
    pub fn attempt_as(
        &self,
        address: K,
        now_ms: u64,
        check: impl FnOnce() -> Verdict,
    ) -> Result<Verdict, u64> {
        let client = address.clone();
        // The check runs under the lock: parallel guesses wait for each other's count.
        let Ok(mut entries) = self.entries.lock() else {
            return Err(1);
        };
        let entry = entries
            .get(&address)
            .copied()
            .filter(|e| e.forgotten_at() > now_ms);
        if let Some(entry) = entry.filter(|e| e.locked_until > now_ms) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err((entry.locked_until - now_ms).div_ceil(1000).max(1));
        }
        let verdict = check();
        match verdict {
            Verdict::Pass => {
                entries.remove(&address);
            }
            Verdict::Other => {}
            Verdict::Fail => {
                if entry.is_none() && entries.len() >= MAX_ENTRIES {
                    evict(&mut entries, now_ms);
                }
                let mut entry = entry.unwrap_or(Entry {
                    failures: 0,
                    locked_until: 0,
                    last_failure: now_ms,
                });
                entry.failures = entry.failures.saturating_add(1);
                entry.last_failure = now_ms;
                self.failures.fetch_add(1, Ordering::Relaxed);
                if entry.failures >= FREE_FAILURES {
                    let doublings = (entry.failures - FREE_FAILURES).min(30);
                    let lockout = ms(FIRST_LOCKOUT)
                        .saturating_mul(1 << doublings)
                        .min(ms(MAX_LOCKOUT));
                    entry.locked_until = now_ms.saturating_add(lockout);
                    self.lockouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        client = %client,
                        failures = entry.failures,
                        locked_for_s = lockout.div_ceil(1000),
                        "Admin authentication failed; the address is locked out."
                    );
                } else {
                    tracing::warn!(
                        client = %client,
                        failures = entry.failures,
                        "Admin authentication failed."
                    );
                }
                entries.insert(address, entry);
            }
        }
        Ok(verdict)
    }

    /// Failed admin authentications since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Lockouts since start (each failure past the free ones starts one).
    pub fn lockouts(&self) -> u64 {
        self.lockouts.load(Ordering::Relaxed)
    }

    /// Attempts refused unchecked because their address was locked out.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Addresses currently remembered.
    pub fn tracked(&self) -> usize {
        self.entries.lock().map_or(0, |entries| entries.len())
    }
}

/// Makes room in a full table: drops the forgotten, then the quietest quarter.
fn evict<K: std::hash::Hash + Eq + Clone>(entries: &mut HashMap<K, Entry>, now_ms: u64) {
    entries.retain(|_, e| e.forgotten_at() > now_ms);
    if entries.len() < MAX_ENTRIES {
        return;
    }
    let mut by_age: Vec<(u64, K)> = entries
        .iter()
        .map(|(ip, e)| (e.locked_until.max(e.last_failure), ip.clone()))
        .collect();
    let drop = by_age.len() / 4;
    by_age.select_nth_unstable_by_key(drop, |(age, _)| *age);
    for (_, ip) in &by_age[..drop] {
        entries.remove(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn fail(throttle: &AuthThrottle, client: &str, now: u64) -> Result<Verdict, u64> {
        throttle.attempt(ip(client), now, || Verdict::Fail)
    }

    #[test]
    fn lockouts_double_up_to_the_window_and_a_success_forgets() {
        let throttle = AuthThrottle::default();
        for _ in 0..4 {
            assert_eq!(fail(&throttle, "10.0.0.1", 1000), Ok(Verdict::Fail));
        }
        assert_eq!(throttle.lockouts(), 0);
        // The fifth failure locks for 1 s; the right key is not even checked meanwhile.
        assert_eq!(fail(&throttle, "10.0.0.1", 1000), Ok(Verdict::Fail));
        let mut checked = false;
        let locked = throttle.attempt(ip("10.0.0.1"), 1500, || {
            checked = true;
            Verdict::Pass
        });
        assert_eq!((locked, checked), (Err(1), false));
        // Each further failure doubles the lockout: 2 s, 4 s, … up to 15 min.
        let mut now = 2000;
        let mut waits = Vec::new();
        for _ in 0..12 {
            assert_eq!(fail(&throttle, "10.0.0.1", now), Ok(Verdict::Fail));
            let wait = fail(&throttle, "10.0.0.1", now).unwrap_err();
            waits.push(wait);
            now += wait * 1000;
        }
        assert_eq!(waits[..4], [2, 4, 8, 16]);
        assert_eq!(*waits.last().unwrap(), 900);
        assert_eq!(throttle.failures(), 17);
        // Others are not affected; a success forgets the address.
        assert_eq!(
            throttle.attempt(ip("10.0.0.2"), now, || Verdict::Pass),
            Ok(Verdict::Pass)
        );
        assert_eq!(
            throttle.attempt(ip("10.0.0.1"), now, || Verdict::Pass),
            Ok(Verdict::Pass)
        );
        assert_eq!(throttle.tracked(), 0);
    }

    #[test]
    fn a_quiet_address_is_forgotten_and_ipv6_counts_per_64() {
        let throttle = AuthThrottle::default();
        for i in 0..4 {
            // Four hosts of one /64 are one address.
            assert!(fail(&throttle, &format!("2001:db8::{i}"), 0).is_ok());
        }
        assert!(fail(&throttle, "2001:db8::ffff", 0).is_ok());
        assert!(fail(&throttle, "2001:db8::1", 10).is_err());
        assert!(fail(&throttle, "2001:db8:0:1::1", 10).is_ok());
        // Quiet for the whole window after the lockout: a fresh start.
        let later = 1000 + ms(MAX_LOCKOUT);
        for _ in 0..4 {
            assert!(fail(&throttle, "2001:db8::1", later).is_ok());
        }
    }

    #[test]
    fn the_table_stays_bounded() {
        let throttle = AuthThrottle::default();
        for i in 0..(MAX_ENTRIES as u32 * 3) {
            let client = IpAddr::from(std::net::Ipv4Addr::from(i));
            assert!(
                throttle
                    .attempt(client, u64::from(i), || Verdict::Fail)
                    .is_ok()
            );
        }
        assert!(throttle.tracked() <= MAX_ENTRIES);
        // The newest are kept.
        let newest = IpAddr::from(std::net::Ipv4Addr::from(MAX_ENTRIES as u32 * 3 - 1));
        for _ in 0..3 {
            assert!(throttle.attempt(newest, 30_000, || Verdict::Fail).is_ok());
        }
        assert!(throttle.attempt(newest, 30_000, || Verdict::Fail).is_ok());
        assert!(throttle.attempt(newest, 30_000, || Verdict::Fail).is_err());
    }
}
