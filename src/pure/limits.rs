//! Rate limits and budgets.
//!
//! Windows are **fixed and aligned to the UTC wall clock**: a minute window runs from
//! `hh:mm:00` to `hh:mm:59.999`, a day from 00:00 UTC, a month from the 1st at 00:00 UTC.
//! `rpm`/`rpd` count requests admitted in the current minute/day; `tpm` refuses a request
//! while the tokens counted in the current minute have reached the limit; budgets do the
//! same with the tokens and cost of the current day, month or all time. Tokens are known
//! only after an answer, so admission *reserves* an estimate (the prompt's size) that
//! requests in flight at the same time see, and the answer settles the difference. One
//! request may still overshoot a limit by its own answer. A refusal's `Retry-After` is the
//! time left in the window that refused.
//!
//! Every check and increment happens under one short lock, so limits are exact under any
//! concurrency. Counts are persisted with the request log (see `recorder`) and loaded at
//! start, so they survive a restart.
//!
//! Nothing here reads a clock or knows HTTP: every call is handed `now` (UTC seconds), and
//! a refusal is a plain [`Refusal`] that the gateway turns into its 429.

use std::collections::HashMap;
use std::fmt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::config::{Budget, BudgetPeriod, GatewayKey, Limits, Upstream};

/// The kinds of window a count is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Minute,
    Day,
    Month,
    Total,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Minute, Period::Day, Period::Month, Period::Total];

    pub fn name(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Day => "day",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    pub fn parse(name: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The window containing `secs`.
    pub fn window(self, secs: i64) -> i64 {
        match self {
            Period::Minute => secs.div_euclid(60),
            Period::Day => secs.div_euclid(86_400),
            Period::Month => {
                let (year, month, _) = civil_from_days(secs.div_euclid(86_400));
                year * 12 + i64::from(month) - 1
            }
            Period::Total => 0,
        }
    }

    /// Seconds from `secs` until its window ends (at least 1).
    pub fn remaining(self, secs: i64) -> u64 {
        let end = match self {
            Period::Minute => (secs.div_euclid(60) + 1) * 60,
            Period::Day => (secs.div_euclid(86_400) + 1) * 86_400,
            Period::Month => {
                let (year, month, _) = civil_from_days(secs.div_euclid(86_400));
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                days_from_civil(next_year, next_month, 1) * 86_400
            }
            Period::Total => return u64::MAX / 4,
        };
        u64::try_from(end - secs).unwrap_or(1).max(1)
    }
}

impl From<BudgetPeriod> for Period {
    fn from(period: BudgetPeriod) -> Self {
        match period {
            BudgetPeriod::Day => Period::Day,
            BudgetPeriod::Month => Period::Month,
            BudgetPeriod::Total => Period::Total,
        }
    }
}

/// Gregorian date of a day number (days since 1970-01-01); Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Requests, tokens and cost counted in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub requests: u64,
    pub tokens: u64,
    pub cost: f64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    id: i64,
    usage: Usage,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            id: i64::MIN,
            usage: Usage::default(),
        }
    }
}

impl Window {
    /// The usage of window `id`, resetting a stale one.
    fn at(&mut self, id: i64) -> &mut Usage {
        if self.id != id {
            *self = Window {
                id,
                usage: Usage::default(),
            };
        }
        &mut self.usage
    }

    /// The usage of window `id` unless a later window has started: a correction for a
    /// window already over (a late settlement, an old persisted count) must not wipe the
    /// counts of the current one.
    fn at_or_after(&mut self, id: i64) -> Option<&mut Usage> {
        (id >= self.id).then(|| self.at(id))
    }

    fn get(&self, id: i64) -> Usage {
        if self.id == id {
            self.usage
        } else {
            Usage::default()
        }
    }
}

#[derive(Debug, Default)]
struct ScopeState {
    windows: HashMap<Period, Window>,
}

impl ScopeState {
    fn usage(&self, period: Period, now: i64) -> Usage {
        self.windows
            .get(&period)
            .map_or_else(Usage::default, |w| w.get(period.window(now)))
    }

    /// Counts an admission in the windows of `now`.
    fn admit(&mut self, now: i64, delta: Usage) {
        for period in Period::ALL {
            let usage = self
                .windows
                .entry(period)
                .or_default()
                .at(period.window(now));
            add(usage, delta);
        }
    }

    /// Adds restored counts to `window` of `period`, unless a later window has started.
    fn restore(&mut self, period: Period, window: i64, delta: Usage) {
        if let Some(usage) = self.windows.entry(period).or_default().at_or_after(window) {
            add(usage, delta);
        }
    }

    /// Adds a signed correction to every window of `at` still current, never below zero.
    fn adjust(&mut self, at: i64, tokens: i64, cost: f64) {
        for period in Period::ALL {
            let window = self.windows.entry(period).or_default();
            if let Some(usage) = window.at_or_after(period.window(at)) {
                usage.tokens = usage.tokens.saturating_add_signed(tokens);
                usage.cost = (usage.cost + cost).max(0.0);
            }
        }
    }

    /// Takes back an admission at `at` (with what it reserved) from the windows of `at`
    /// still current, never below zero.
    fn refund(&mut self, at: i64, reserve: Reserve) {
        for period in Period::ALL {
            if let Some(window) = self.windows.get_mut(&period) {
                if window.id == period.window(at) {
                    let usage = &mut window.usage;
                    usage.requests = usage.requests.saturating_sub(1);
                    usage.tokens = usage.tokens.saturating_sub(reserve.tokens);
                    usage.cost = (usage.cost - reserve.cost).max(0.0);
                }
            }
        }
    }
}

/// Adds `delta` to `usage`, saturating: nothing under the limiter's lock can panic.
fn add(usage: &mut Usage, delta: Usage) {
    usage.requests = usage.requests.saturating_add(delta.requests);
    usage.tokens = usage.tokens.saturating_add(delta.tokens);
    usage.cost += delta.cost;
}

/// The scope name a key's counts are kept under.
pub fn key_scope(name: &str) -> String {
    format!("key:{name}")
}

/// The scope name a team's counts are kept under.
pub fn team_scope(name: &str) -> String {
    format!("team:{name}")
}

/// The scope name an upstream's counts are kept under.
pub fn upstream_scope(name: &str) -> String {
    format!("upstream:{name}")
}

/// Tokens and cost reserved for a request at admission: an estimate made before the call,
/// corrected by the settlement after it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reserve {
    pub tokens: u64,
    pub cost: f64,
}

/// Tokens and cost of an answered request (less what was reserved), waiting to be added
/// to its scope.
#[derive(Debug)]
struct Settlement {
    scope: String,
    at: i64,
    tokens: i64,
    cost: f64,
}

#[derive(Debug)]
struct State {
    scopes: HashMap<String, ScopeState>,
    /// Settlements from the log writer. They are queued rather than applied under the
    /// lock by the writer: a low-priority thread preempted while holding the lock would
    /// stall every request behind it (priority inversion).
    settlements: Receiver<Settlement>,
}

impl State {
    fn apply_settlements(&mut self) {
        while let Ok(settlement) = self.settlements.try_recv() {
            let state = self.scopes.entry(settlement.scope).or_default();
            state.adjust(settlement.at, settlement.tokens, settlement.cost);
        }
    }
}

#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    settle: Sender<Settlement>,
}

impl Default for Limiter {
    fn default() -> Self {
        let (settle, settlements) = channel();
        Self {
            state: Mutex::new(State {
                scopes: HashMap::new(),
                settlements,
            }),
            settle,
        }
    }
}

/// Which limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    RequestsPerMinute(u64),
    RequestsPerDay(u64),
    TokensPerMinute(u64),
    /// The tokens or cost budget of a period.
    Budget(Period),
}

impl Limit {
    /// Whether it is a budget (used up) rather than a rate (reached).
    pub fn is_budget(self) -> bool {
        matches!(self, Limit::Budget(_))
    }
}

/// As the refusal's message names it: "60 requests per minute", "the day budget".
impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::RequestsPerMinute(n) => write!(f, "{n} requests per minute"),
            Limit::RequestsPerDay(n) => write!(f, "{n} requests per day"),
            Limit::TokensPerMinute(n) => write!(f, "{n} tokens per minute"),
            Limit::Budget(period) => write!(f, "the {} budget", period.name()),
        }
    }
}

/// Whose limit it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Key,
    /// The team of the key: limits all its keys share.
    Team,
    Upstream,
}

/// Why a request may not pass now, as plain data: the caller names the key or upstream
/// and shapes the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub holder: Holder,
    pub limit: Limit,
    /// Seconds until the window that refused ends (at least 1).
    pub retry_after: u64,
}

/// The first rate limit `state` has reached at `now`, with the seconds left in its window.
fn check_limits(limits: &Limits, state: Option<&ScopeState>, now: i64) -> Option<(Limit, u64)> {
    let usage = |period| state.map_or_else(Usage::default, |s| s.usage(period, now));
    let minute = usage(Period::Minute);
    let day = usage(Period::Day);
    if let Some(rpm) = limits.rpm {
        if minute.requests >= rpm {
            return Some((Limit::RequestsPerMinute(rpm), Period::Minute.remaining(now)));
        }
    }
    if let Some(rpd) = limits.rpd {
        if day.requests >= rpd {
            return Some((Limit::RequestsPerDay(rpd), Period::Day.remaining(now)));
        }
    }
    if let Some(tpm) = limits.tpm {
        if tpm == 0 || minute.tokens >= tpm {
            return Some((Limit::TokensPerMinute(tpm), Period::Minute.remaining(now)));
        }
    }
    None
}

/// Whether `state` has used up `budget` at `now`, with the seconds left in its period.
fn check_budget(budget: &Budget, state: Option<&ScopeState>, now: i64) -> Option<(Limit, u64)> {
    let period = Period::from(budget.period);
    let used = state.map_or_else(Usage::default, |s| s.usage(period, now));
    let over_tokens = budget.tokens.is_some_and(|t| used.tokens >= t);
    let over_cost = budget.cost.is_some_and(|c| used.cost >= c);
    (over_tokens || over_cost).then(|| (Limit::Budget(period), period.remaining(now)))
}

impl Limiter {
    /// The state, with queued settlements applied. A panic elsewhere cannot leave it torn
    /// (every change under the lock is a saturating add), so a poisoned lock is taken as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        guard.apply_settlements();
        guard
    }

    /// Applies the settlements queued since the last request took the lock: after a burst
    /// of streams and no request since, they would hold their memory until the next one.
    pub fn apply_queued(&self) {
        drop(self.lock());
    }

    /// Admits one request of `key` at `now`, counting it and reserving `reserve` in its
    /// own scope and its team's; or says which limit (the key's or its team's) refuses it.
    /// Both are checked and counted under one lock, so a team's limits are exact however
    /// many of its keys call at once.
    pub fn admit_key(&self, key: &GatewayKey, now: i64, reserve: Reserve) -> Result<(), Refusal> {
        let mut guard = self.lock();
        let scope = key_scope(&key.name);
        let state = guard.scopes.get(&scope);
        let refused = check_limits(&key.limits, state, now).or_else(|| {
            key.budget
                .as_ref()
                .and_then(|b| check_budget(b, state, now))
        });
        if let Some((limit, retry_after)) = refused {
            return Err(Refusal {
                holder: Holder::Key,
                limit,
                retry_after,
            });
        }
        let team = key.team.as_ref().map(|team| (team, team_scope(&team.name)));
        if let Some((team, team_scope)) = &team {
            let state = guard.scopes.get(team_scope);
            let refused = check_limits(&team.limits, state, now).or_else(|| {
                team.budget
                    .as_ref()
                    .and_then(|b| check_budget(b, state, now))
            });
            if let Some((limit, retry_after)) = refused {
                return Err(Refusal {
                    holder: Holder::Team,
                    limit,
                    retry_after,
                });
            }
        }
        let delta = Usage {
            requests: 1,
            tokens: reserve.tokens,
            cost: reserve.cost,
        };
        guard.scopes.entry(scope).or_default().admit(now, delta);
        if let Some((_, team_scope)) = team {
            guard
                .scopes
                .entry(team_scope)
                .or_default()
                .admit(now, delta);
        }
        Ok(())
    }

    /// Takes back a request admitted at `at` by [`admit_key`](Self::admit_key) that never
    /// went out, with what it reserved, from the key and its team.
    pub fn refund_key(&self, key: &GatewayKey, at: i64, reserve: Reserve) {
        let mut guard = self.lock();
        if let Some(state) = guard.scopes.get_mut(&key_scope(&key.name)) {
            state.refund(at, reserve);
        }
        if let Some(team) = &key.team {
            if let Some(state) = guard.scopes.get_mut(&team_scope(&team.name)) {
                state.refund(at, reserve);
            }
        }
    }

    /// Which limit of `upstream` it has reached at `now`, if any.
    pub fn check_upstream(&self, upstream: &Upstream, now: i64) -> Option<Refusal> {
        if upstream.limits.is_unlimited() {
            return None;
        }
        let guard = self.lock();
        let scope = guard.scopes.get(&upstream_scope(&upstream.name));
        check_limits(&upstream.limits, scope, now).map(|(limit, retry_after)| Refusal {
            holder: Holder::Upstream,
            limit,
            retry_after,
        })
    }

    /// Whether `upstream` is under its limits now, and if not, seconds until it may be.
    pub fn upstream_wait(&self, upstream: &Upstream, now: i64) -> Option<u64> {
        self.check_upstream(upstream, now)
            .map(|refusal| refusal.retry_after)
    }

    /// Counts one try at `upstream` if it is under its limits; `false` if it is not.
    pub fn take_upstream(&self, upstream: &Upstream, now: i64) -> bool {
        let mut guard = self.lock();
        let scope = upstream_scope(&upstream.name);
        if check_limits(&upstream.limits, guard.scopes.get(&scope), now).is_some() {
            return false;
        }
        let requests = Usage {
            requests: 1,
            ..Usage::default()
        };
        guard.scopes.entry(scope).or_default().admit(now, requests);
        true
    }

    /// Adds an answered request's tokens and cost, less what its admission reserved, to the
    /// windows current at `at`. Never blocks: it is queued and applied by the next call
    /// that takes the lock.
    pub fn settle(&self, scope: &str, at: i64, tokens: i64, cost: f64) {
        if tokens == 0 && cost == 0.0 {
            return;
        }
        let _ = self.settle.send(Settlement {
            scope: scope.to_string(),
            at,
            tokens,
            cost,
        });
    }

    /// Restores persisted counts (only windows still current matter).
    pub fn restore(&self, scope: &str, period: Period, window: i64, usage: Usage) {
        self.lock()
            .scopes
            .entry(scope.to_string())
            .or_default()
            .restore(period, window, usage);
    }

    /// The usage of `scope` in the current window of `period`.
    pub fn usage(&self, scope: &str, period: Period, now: i64) -> Usage {
        self.lock()
            .scopes
            .get(scope)
            .map(|s| s.usage(period, now))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelSet, Secret};

    fn key(limits: Limits, budget: Option<Budget>) -> GatewayKey {
        GatewayKey {
            name: "k".into(),
            key: Secret::new("fk-test"),
            models: ModelSet::any(),
            limits,
            budget,
            team: None,
        }
    }

    // 2026-11-25T20:00:00Z
    const T: i64 = 1_795_636_800;

    #[test]
    fn a_team_limit_is_shared_by_its_keys() {
        let team = std::sync::Arc::new(crate::config::Team {
            name: "t".into(),
            limits: Limits {
                rpm: Some(3),
                ..Limits::default()
            },
            budget: None,
        });
        let member = |name: &str| GatewayKey {
            name: name.into(),
            team: Some(team.clone()),
            ..key(Limits::default(), None)
        };
        let (a, b) = (member("a"), member("b"));
        let limiter = Limiter::default();
        assert!(limiter.admit_key(&a, T, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&b, T, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&a, T, Reserve::default()).is_ok());
        let refusal = limiter.admit_key(&b, T, Reserve::default()).unwrap_err();
        assert_eq!(refusal.holder, Holder::Team);
        assert_eq!(limiter.usage("key:b", Period::Minute, T).requests, 1);
        limiter.refund_key(&a, T, Reserve::default());
        assert!(limiter.admit_key(&b, T, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&a, T + 60, Reserve::default()).is_ok());
    }

    #[test]
    fn calendar_windows() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(Period::Minute.remaining(T), 60);
        assert_eq!(Period::Minute.remaining(T + 59), 1);
        assert_eq!(Period::Day.remaining(T), 4 * 3600);
        // From 2026-11-25 20:00 to 2026-12-01 00:00: 5 days and 4 hours.
        assert_eq!(Period::Month.remaining(T), 5 * 86_400 + 4 * 3600);
        assert_ne!(
            Period::Month.window(T),
            Period::Month.window(T + 6 * 86_400)
        );
    }

    #[test]
    fn rpm_is_a_fixed_minute_window_on_the_wall_clock() {
        let limiter = Limiter::default();
        let k = key(
            Limits {
                rpm: Some(2),
                ..Limits::default()
            },
            None,
        );
        assert!(limiter.admit_key(&k, T + 58, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&k, T + 59, Reserve::default()).is_ok());
        let refused = limiter
            .admit_key(&k, T + 59, Reserve::default())
            .unwrap_err();
        assert_eq!(refused.holder, Holder::Key);
        assert_eq!(refused.limit, Limit::RequestsPerMinute(2));
        assert_eq!(refused.retry_after, 1, "one second left in the minute");
        // The next minute starts at T + 60 exactly.
        assert!(limiter.admit_key(&k, T + 60, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&k, T + 61, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&k, T + 119, Reserve::default()).is_err());
    }

    #[test]
    fn rpd_resets_at_midnight_utc() {
        let limiter = Limiter::default();
        let k = key(
            Limits {
                rpd: Some(1),
                ..Limits::default()
            },
            None,
        );
        let before_midnight = T + 4 * 3600 - 1;
        assert!(
            limiter
                .admit_key(&k, before_midnight, Reserve::default())
                .is_ok()
        );
        assert_eq!(
            limiter
                .admit_key(&k, before_midnight, Reserve::default())
                .unwrap_err()
                .retry_after,
            1
        );
        assert!(
            limiter
                .admit_key(&k, before_midnight + 1, Reserve::default())
                .is_ok()
        );
    }

    #[test]
    fn zero_admits_nothing_and_refunds_give_back() {
        let limiter = Limiter::default();
        assert!(
            limiter
                .admit_key(
                    &key(
                        Limits {
                            rpm: Some(0),
                            ..Limits::default()
                        },
                        None
                    ),
                    T,
                    Reserve::default()
                )
                .is_err()
        );
        let k = key(
            Limits {
                rpm: Some(1),
                ..Limits::default()
            },
            None,
        );
        assert!(limiter.admit_key(&k, T, Reserve::default()).is_ok());
        limiter.refund_key(&k, T, Reserve::default());
        assert!(limiter.admit_key(&k, T, Reserve::default()).is_ok());
    }

    #[test]
    fn tpm_and_budgets_use_settled_tokens_and_cost() {
        let limiter = Limiter::default();
        let k = key(
            Limits {
                tpm: Some(100),
                ..Limits::default()
            },
            Some(Budget {
                tokens: None,
                cost: Some(1.0),
                period: BudgetPeriod::Day,
            }),
        );
        assert!(limiter.admit_key(&k, T, Reserve::default()).is_ok());
        limiter.settle(&key_scope("k"), T, 100, 0.5);
        assert_eq!(
            limiter
                .admit_key(&k, T + 1, Reserve::default())
                .unwrap_err()
                .limit,
            Limit::TokensPerMinute(100)
        );
        assert!(
            limiter.admit_key(&k, T + 60, Reserve::default()).is_ok(),
            "tokens per minute reset"
        );
        limiter.settle(&key_scope("k"), T + 60, 10, 0.6);
        let over = limiter
            .admit_key(&k, T + 120, Reserve::default())
            .unwrap_err();
        assert_eq!(over.limit, Limit::Budget(Period::Day));
        assert!(over.limit.is_budget());
        assert_eq!(over.retry_after, 4 * 3600 - 120);
    }

    #[test]
    fn reservations_hold_tokens_until_the_answer_settles_them() {
        let limiter = Limiter::default();
        let k = key(
            Limits {
                tpm: Some(100),
                ..Limits::default()
            },
            None,
        );
        let reserve = Reserve {
            tokens: 100,
            cost: 0.0,
        };
        assert!(limiter.admit_key(&k, T, reserve).is_ok());
        assert!(
            limiter.admit_key(&k, T, Reserve::default()).is_err(),
            "a request in flight holds its estimate"
        );
        // The answer used 30 tokens: 70 go back.
        limiter.settle(&key_scope("k"), T, 30 - 100, 0.0);
        assert!(limiter.admit_key(&k, T, reserve).is_ok());
        assert_eq!(
            limiter.usage(&key_scope("k"), Period::Minute, T).tokens,
            130
        );
        limiter.refund_key(&k, T, reserve);
        assert_eq!(limiter.usage(&key_scope("k"), Period::Minute, T).tokens, 30);
        assert_eq!(
            limiter.usage(&key_scope("k"), Period::Minute, T).requests,
            1
        );
    }

    #[test]
    fn a_late_settlement_leaves_the_current_window_counted() {
        let limiter = Limiter::default();
        let k = key(
            Limits {
                rpm: Some(1),
                ..Limits::default()
            },
            None,
        );
        assert!(limiter.admit_key(&k, T + 59, Reserve::default()).is_ok());
        assert!(limiter.admit_key(&k, T + 60, Reserve::default()).is_ok());
        // The answer to the request of the minute before settles now.
        limiter.settle(&key_scope("k"), T + 59, 5, 0.0);
        assert!(
            limiter.admit_key(&k, T + 61, Reserve::default()).is_err(),
            "the minute's one request is still counted"
        );
        assert_eq!(
            limiter.usage(&key_scope("k"), Period::Minute, T + 61),
            Usage {
                requests: 1,
                tokens: 0,
                cost: 0.0
            }
        );
    }

    #[test]
    fn refusals_name_their_limit_and_holder() {
        assert_eq!(
            Limit::RequestsPerMinute(60).to_string(),
            "60 requests per minute"
        );
        assert_eq!(Limit::RequestsPerDay(5).to_string(), "5 requests per day");
        assert_eq!(Limit::TokensPerMinute(9).to_string(), "9 tokens per minute");
        assert_eq!(Limit::Budget(Period::Month).to_string(), "the month budget");
        let limiter = Limiter::default();
        let upstream = Upstream {
            name: "u".into(),
            kind: Default::default(),
            api_version: None,
            base_url: "http://h".into(),
            keys: Vec::new(),
            models: ModelSet::any(),
            headers: Vec::new(),
            proxy: None,
            timeouts: Default::default(),
            model_map: Default::default(),
            field_aliases: Vec::new(),
            paths: Default::default(),
            weight: 1,
            token: None,
            limits: Limits {
                rpd: Some(1),
                ..Limits::default()
            },
            http2: Default::default(),
            tls_ca: None,
            http2_streams: crate::config::Upstream::HTTP2_STREAMS,
            http2_idle: crate::config::Upstream::HTTP2_IDLE,
            idle_connections: 1024,
        };
        assert_eq!(limiter.check_upstream(&upstream, T), None);
        assert!(limiter.take_upstream(&upstream, T));
        assert!(!limiter.take_upstream(&upstream, T + 1));
        assert_eq!(
            limiter.check_upstream(&upstream, T),
            Some(Refusal {
                holder: Holder::Upstream,
                limit: Limit::RequestsPerDay(1),
                retry_after: 4 * 3600,
            })
        );
        assert_eq!(limiter.upstream_wait(&upstream, T), Some(4 * 3600));
    }
}

/// Property tests: arbitrary admissions, settlements and refunds at arbitrary (forward)
/// times, against a model that keeps every window's counts apart.
#[cfg(test)]
mod properties {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::config::{ModelSet, Secret};

    /// Five minutes before midnight UTC, 2026-11-25: runs cross minutes and a day.
    const START: i64 = 1_795_636_800 + 4 * 3600 - 300;

    #[derive(Debug, Clone)]
    enum Op {
        /// Time moves on by `wait` seconds, then a request reserving `tokens` asks in.
        Admit { wait: i64, tokens: u64 },
        /// An answer admitted `back` seconds ago settles.
        Settle { back: i64, tokens: i64, cost: f64 },
        /// An admitted request that never went out is refunded.
        Refund(Index),
        /// A refund with nothing admitted to take back.
        RefundStray,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0i64..90, 0u64..40).prop_map(|(wait, tokens)| Op::Admit { wait, tokens }),
            2 => (0i64..120, -60i64..60, -4i32..5).prop_map(|(back, tokens, cost)| {
                Op::Settle { back, tokens, cost: f64::from(cost) * 0.25 }
            }),
            1 => any::<Index>().prop_map(Op::Refund),
            1 => Just(Op::RefundStray),
        ]
    }

    /// The windows a model keeps apart: minute and day by their plain arithmetic.
    fn windows(at: i64) -> [(Period, i64); 3] {
        [
            (Period::Minute, at.div_euclid(60)),
            (Period::Day, at.div_euclid(86_400)),
            (Period::Total, 0),
        ]
    }

    #[derive(Default)]
    struct Model {
        windows: HashMap<(Period, i64), Usage>,
    }

    impl Model {
        fn at(&mut self, window: (Period, i64)) -> &mut Usage {
            self.windows.entry(window).or_default()
        }

        fn current(&self, period: Period, now: i64) -> Usage {
            let id = windows(now)
                .into_iter()
                .find(|(p, _)| *p == period)
                .map_or(0, |(_, id)| id);
            self.windows.get(&(period, id)).copied().unwrap_or_default()
        }

        /// The limit a request at `now` must be refused by, if any, in the limiter's order.
        fn refusal(&self, key: &GatewayKey, now: i64) -> Option<(Limit, u64)> {
            let minute = self.current(Period::Minute, now);
            let day = self.current(Period::Day, now);
            let limits = &key.limits;
            let to_minute = u64::try_from(60 - now.rem_euclid(60)).unwrap_or(1);
            let to_day = u64::try_from(86_400 - now.rem_euclid(86_400)).unwrap_or(1);
            if let Some(rpm) = limits.rpm.filter(|&rpm| minute.requests >= rpm) {
                return Some((Limit::RequestsPerMinute(rpm), to_minute));
            }
            if let Some(rpd) = limits.rpd.filter(|&rpd| day.requests >= rpd) {
                return Some((Limit::RequestsPerDay(rpd), to_day));
            }
            if let Some(tpm) = limits.tpm.filter(|&tpm| minute.tokens >= tpm) {
                return Some((Limit::TokensPerMinute(tpm), to_minute));
            }
            let budget = key.budget.as_ref()?;
            let over = budget.cost.is_some_and(|c| day.cost >= c)
                || budget.tokens.is_some_and(|t| day.tokens >= t);
            over.then_some((Limit::Budget(Period::Day), to_day))
        }
    }

    fn limited_key(rpm: u64, rpd: u64, tpm: Option<u64>, cost: Option<f64>) -> GatewayKey {
        GatewayKey {
            name: "p".into(),
            key: Secret::new("fk-prop"),
            models: ModelSet::any(),
            limits: Limits {
                rpm: Some(rpm),
                rpd: Some(rpd),
                tpm,
            },
            budget: cost.map(|cost| Budget {
                tokens: None,
                cost: Some(cost),
                period: BudgetPeriod::Day,
            }),
            team: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn windows_hold_their_limits_roll_over_and_never_go_below_zero(
            rpm in 1u64..6,
            rpd in 1u64..40,
            tpm in proptest::option::of(20u64..200),
            budget in proptest::option::of(1u32..8),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let key = limited_key(rpm, rpd, tpm, budget.map(|b| f64::from(b) * 0.5));
            let scope = key_scope(&key.name);
            let limiter = Limiter::default();
            let mut model = Model::default();
            let mut admitted: Vec<(i64, Reserve)> = Vec::new();
            let mut now = START;
            for op in ops {
                match op {
                    Op::Admit { wait, tokens } => {
                        now += wait;
                        let reserve = Reserve { tokens, cost: tokens as f64 * 0.01 };
                        let expected = model.refusal(&key, now);
                        let outcome = limiter.admit_key(&key, now, reserve);
                        match (outcome, expected) {
                            (Ok(()), None) => {
                                for window in windows(now) {
                                    add(model.at(window), Usage { requests: 1, tokens, cost: reserve.cost });
                                }
                                admitted.push((now, reserve));
                            }
                            (Err(refusal), Some((limit, retry_after))) => {
                                prop_assert_eq!(refusal, Refusal { holder: Holder::Key, limit, retry_after });
                            }
                            (outcome, expected) => {
                                prop_assert!(false, "at {now}: {outcome:?}, expected {expected:?}");
                            }
                        }
                    }
                    Op::Settle { back, tokens, cost } => {
                        let at = now - back;
                        limiter.settle(&scope, at, tokens, cost);
                        if tokens != 0 || cost != 0.0 {
                            for window in windows(at) {
                                let usage = model.at(window);
                                usage.tokens = usage.tokens.saturating_add_signed(tokens);
                                usage.cost = (usage.cost + cost).max(0.0);
                            }
                        }
                    }
                    Op::Refund(index) => {
                        if admitted.is_empty() {
                            continue;
                        }
                        let (at, reserve) = admitted.remove(index.index(admitted.len()));
                        limiter.refund_key(&key, at, reserve);
                        refund(&mut model, at, reserve);
                    }
                    Op::RefundStray => {
                        let reserve = Reserve { tokens: 7, cost: 0.5 };
                        limiter.refund_key(&key, now, reserve);
                        refund(&mut model, now, reserve);
                    }
                }
                for period in [Period::Minute, Period::Day, Period::Total] {
                    let real = limiter.usage(&scope, period, now);
                    prop_assert_eq!(real, model.current(period, now), "{:?} at {}", period, now);
                    prop_assert!(real.cost >= 0.0);
                }
                prop_assert!(limiter.usage(&scope, Period::Minute, now).requests <= rpm);
                prop_assert!(limiter.usage(&scope, Period::Day, now).requests <= rpd);
            }
        }
    }

    fn refund(model: &mut Model, at: i64, reserve: Reserve) {
        for window in windows(at) {
            let usage = model.at(window);
            usage.requests = usage.requests.saturating_sub(1);
            usage.tokens = usage.tokens.saturating_sub(reserve.tokens);
            usage.cost = (usage.cost - reserve.cost).max(0.0);
        }
    }
}
