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

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;

use crate::config::{Budget, BudgetPeriod, GatewayKey, Limits, Upstream};
use crate::http::error::ApiError;

/// Seconds since the Unix epoch, UTC.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch, UTC: the request log's timestamps.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

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

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    id: i64,
    usage: Usage,
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

    fn add(&mut self, period: Period, window: i64, delta: Usage) {
        let usage = self.windows.entry(period).or_default().at(window);
        usage.requests += delta.requests;
        usage.tokens += delta.tokens;
        usage.cost += delta.cost;
    }

    /// Adds a signed correction to every current window of `at`, never below zero.
    fn adjust(&mut self, at: i64, requests: i64, tokens: i64, cost: f64) {
        for period in Period::ALL {
            let usage = self
                .windows
                .entry(period)
                .or_default()
                .at(period.window(at));
            usage.requests = usage.requests.saturating_add_signed(requests);
            usage.tokens = usage.tokens.saturating_add_signed(tokens);
            usage.cost = (usage.cost + cost).max(0.0);
        }
    }
}

/// The scope name a key's counts are kept under.
pub fn key_scope(name: &str) -> String {
    format!("key:{name}")
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
            state.adjust(settlement.at, 0, settlement.tokens, settlement.cost);
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

/// A 429 in OpenAI shape with `Retry-After`.
pub fn limited(code: &'static str, message: String, retry_after: u64) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        code,
        message,
    );
    error.retry_after = Some(retry_after);
    error
}

/// The 429 for a gateway key at a rate limit or, with `budget`, out of budget; `what` names
/// the limit ("60 requests per minute", "the day budget"). Local and shared limits say
/// it alike.
pub fn key_refused(key: &str, what: &str, retry_after: u64, budget: bool) -> ApiError {
    if budget {
        limited(
            "budget_exceeded",
            format!("API key `{key}` used up {what}"),
            retry_after,
        )
    } else {
        limited(
            "rate_limit_exceeded",
            format!("API key `{key}` reached its limit of {what}"),
            retry_after,
        )
    }
}

/// The first limit `usage` breaks, as (what, retry-after seconds).
fn check_limits(limits: &Limits, state: Option<&ScopeState>, now: i64) -> Option<(String, u64)> {
    let usage = |period| state.map_or_else(Usage::default, |s| s.usage(period, now));
    let minute = usage(Period::Minute);
    let day = usage(Period::Day);
    if let Some(rpm) = limits.rpm {
        if minute.requests >= rpm {
            return Some((
                format!("{rpm} requests per minute"),
                Period::Minute.remaining(now),
            ));
        }
    }
    if let Some(rpd) = limits.rpd {
        if day.requests >= rpd {
            return Some((
                format!("{rpd} requests per day"),
                Period::Day.remaining(now),
            ));
        }
    }
    if let Some(tpm) = limits.tpm {
        if tpm == 0 || minute.tokens >= tpm {
            return Some((
                format!("{tpm} tokens per minute"),
                Period::Minute.remaining(now),
            ));
        }
    }
    None
}

fn check_budget(budget: &Budget, state: Option<&ScopeState>, now: i64) -> Option<(String, u64)> {
    let period = Period::from(budget.period);
    let used = state.map_or_else(Usage::default, |s| s.usage(period, now));
    let over_tokens = budget.tokens.is_some_and(|t| used.tokens >= t);
    let over_cost = budget.cost.is_some_and(|c| used.cost >= c);
    (over_tokens || over_cost).then(|| {
        (
            format!("the {} budget", period.name()),
            period.remaining(now),
        )
    })
}

impl Limiter {
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, State>> {
        let mut guard = self.state.lock().ok()?;
        guard.apply_settlements();
        Some(guard)
    }

    /// Admits one request of `key` at `now`, counting it and reserving `reserve`; or says
    /// which limit refuses it.
    pub fn admit_key(&self, key: &GatewayKey, now: i64, reserve: Reserve) -> Result<(), ApiError> {
        let mut guard = self
            .lock()
            .ok_or_else(|| ApiError::internal("limiter unavailable"))?;
        let scope = key_scope(&key.name);
        let state = guard.scopes.get(&scope);
        if let Some((what, retry)) = check_limits(&key.limits, state, now) {
            return Err(key_refused(&key.name, &what, retry, false));
        }
        if let Some((what, retry)) = key
            .budget
            .as_ref()
            .and_then(|b| check_budget(b, state, now))
        {
            return Err(key_refused(&key.name, &what, retry, true));
        }
        let state = guard.scopes.entry(scope).or_default();
        for period in Period::ALL {
            state.add(
                period,
                period.window(now),
                Usage {
                    requests: 1,
                    tokens: reserve.tokens,
                    cost: reserve.cost,
                },
            );
        }
        Ok(())
    }

    /// Takes back a request admitted at `at` by [`admit_key`](Self::admit_key) that never
    /// went out, with what it reserved.
    pub fn refund_key(&self, key: &GatewayKey, at: i64, reserve: Reserve) {
        let Some(mut guard) = self.lock() else { return };
        let Some(state) = guard.scopes.get_mut(&key_scope(&key.name)) else {
            return;
        };
        for period in Period::ALL {
            if let Some(window) = state.windows.get_mut(&period) {
                if window.id == period.window(at) {
                    let usage = &mut window.usage;
                    usage.requests = usage.requests.saturating_sub(1);
                    usage.tokens = usage.tokens.saturating_sub(reserve.tokens);
                    usage.cost = (usage.cost - reserve.cost).max(0.0);
                }
            }
        }
    }

    /// Whether `upstream` is under its limits now, and if not, seconds until it may be.
    pub fn upstream_wait(&self, upstream: &Upstream, now: i64) -> Option<u64> {
        if upstream.limits.is_unlimited() {
            return None;
        }
        let guard = self.lock()?;
        check_limits(
            &upstream.limits,
            guard.scopes.get(&upstream_scope(&upstream.name)),
            now,
        )
        .map(|(_, retry)| retry)
    }

    /// Counts one try at `upstream` if it is under its limits; `false` if it is not.
    pub fn take_upstream(&self, upstream: &Upstream, now: i64) -> bool {
        let Some(mut guard) = self.lock() else {
            return false;
        };
        let scope = upstream_scope(&upstream.name);
        if check_limits(&upstream.limits, guard.scopes.get(&scope), now).is_some() {
            return false;
        }
        let state = guard.scopes.entry(scope).or_default();
        for period in Period::ALL {
            state.add(
                period,
                period.window(now),
                Usage {
                    requests: 1,
                    ..Usage::default()
                },
            );
        }
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
        let Some(mut guard) = self.lock() else { return };
        guard
            .scopes
            .entry(scope.to_string())
            .or_default()
            .add(period, window, usage);
    }

    /// The usage of `scope` in the current window of `period`.
    pub fn usage(&self, scope: &str, period: Period, now: i64) -> Usage {
        self.lock()
            .and_then(|guard| guard.scopes.get(scope).map(|s| s.usage(period, now)))
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
        }
    }

    // 2026-11-25T20:00:00Z
    const T: i64 = 1_795_636_800;

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
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            refused.retry_after,
            Some(1),
            "one second left in the minute"
        );
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
            Some(1)
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
                .code,
            "rate_limit_exceeded"
        );
        assert!(
            limiter.admit_key(&k, T + 60, Reserve::default()).is_ok(),
            "tokens per minute reset"
        );
        limiter.settle(&key_scope("k"), T + 60, 10, 0.6);
        let over = limiter
            .admit_key(&k, T + 120, Reserve::default())
            .unwrap_err();
        assert_eq!(over.code, "budget_exceeded");
        assert_eq!(over.retry_after, Some(4 * 3600 - 120));
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
}
