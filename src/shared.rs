//! Limits shared by several sluice instances through Redis (`shared_state.redis`).
//!
//! Admission is one round trip: a Lua script reads the Redis server's clock, checks every
//! limit of the scope over the same fixed UTC windows as the local limiter, and counts the
//! request only if all pass, atomically. Tokens and cost are settled after the answer by a
//! second script from the log writer, off the hot path. When Redis does not answer within
//! `timeout`, `on_error: open` (the default) falls back to this instance's own limiter and
//! `closed` refuses with 503; the connection manager reconnects by itself when Redis is back.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::config::{Budget, BudgetPeriod, Limits};

/// Gregorian calendar helpers (Howard Hinnant's algorithms, as in `limits.rs`) shared by
/// both scripts, for the month window.
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
"#;

const ADMIT: &str = r#"
local prefix, scope = ARGV[1], ARGV[2]
local rpm, rpd, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local btok, bcost, bperiod = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local now = tonumber(redis.call('TIME')[1])
local y, m = civil(math.floor(now / 86400))
local function key(period, win) return prefix .. ':' .. scope .. ':' .. period .. ':' .. win end
local minute, day = key('minute', math.floor(now / 60)), key('day', math.floor(now / 86400))
local month, total = key('month', y * 12 + m - 1), key('total', 0)
local function get(k, f) return tonumber(redis.call('HGET', k, f) or '0') or 0 end
if rpm >= 0 and get(minute, 'requests') >= rpm then return {0, ARGV[3] .. ' requests per minute', 60 - now % 60} end
if rpd >= 0 and get(day, 'requests') >= rpd then return {0, ARGV[4] .. ' requests per day', 86400 - now % 86400} end
if tpm >= 0 and (tpm == 0 or get(minute, 'tokens') >= tpm) then return {0, ARGV[5] .. ' tokens per minute', 60 - now % 60} end
if bperiod ~= '' then
  local bk, retry = total, 315360000
  if bperiod == 'day' then bk, retry = day, 86400 - now % 86400 end
  if bperiod == 'month' then
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    bk, retry = month, days_from_civil(ny, nm) * 86400 - now
  end
  if (btok >= 0 and get(bk, 'tokens') >= btok) or (bcost >= 0 and tonumber(redis.call('HGET', bk, 'cost') or '0') >= bcost) then
    return {0, 'the ' .. bperiod .. ' budget', retry}
  end
end
redis.call('HINCRBY', minute, 'requests', 1)
redis.call('EXPIRE', minute, 120)
redis.call('HINCRBY', day, 'requests', 1)
redis.call('EXPIRE', day, 172800)
redis.call('HINCRBY', month, 'requests', 1)
redis.call('EXPIRE', month, 2764800)
redis.call('HINCRBY', total, 'requests', 1)
return {1, '', 0}
"#;

const SETTLE: &str = r#"
local prefix, scope, tokens, cost = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now = tonumber(redis.call('TIME')[1])
local days = math.floor(now / 86400)
local y, m = civil(days)
local windows = {{'minute', math.floor(now / 60), 120}, {'day', days, 172800}, {'month', y * 12 + m - 1, 2764800}, {'total', 0, 0}}
for _, w in ipairs(windows) do
  local k = prefix .. ':' .. scope .. ':' .. w[1] .. ':' .. w[2]
  redis.call('HINCRBY', k, 'tokens', tokens)
  redis.call('HINCRBYFLOAT', k, 'cost', cost)
  if w[3] > 0 then redis.call('EXPIRE', k, w[3]) end
end
return 1
"#;

/// The outcome of a shared admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Refused: which limit, and seconds until its window ends.
    Refuse {
        what: String,
        retry_after: u64,
    },
}

pub struct SharedLimits {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    pub fail_open: bool,
    admit: Script,
    settle: Script,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("prefix", &self.prefix)
            .field("fail_open", &self.fail_open)
            .finish()
    }
}

fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

impl SharedLimits {
    /// Prepares the client; the connection is made on first use (and remade after a loss).
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        fail_open: bool,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: OnceCell::new(),
            prefix: prefix.to_string(),
            timeout,
            fail_open,
            admit: Script::new(&format!("{CALENDAR}{ADMIT}")),
            settle: Script::new(&format!("{CALENDAR}{SETTLE}")),
        })
    }

    async fn connection(&self) -> anyhow::Result<ConnectionManager> {
        let manager = self
            .connection
            .get_or_try_init(|| async { ConnectionManager::new(self.client.clone()).await })
            .await?;
        Ok(manager.clone())
    }

    /// Checks and counts one request of `scope`; `Err` when Redis did not answer in time.
    pub async fn admit(
        &self,
        scope: &str,
        limits: &Limits,
        budget: Option<&Budget>,
    ) -> anyhow::Result<Verdict> {
        let call = async {
            let mut connection = self.connection().await?;
            let period = match budget.map(|b| b.period) {
                None => "",
                Some(BudgetPeriod::Day) => "day",
                Some(BudgetPeriod::Month) => "month",
                Some(BudgetPeriod::Total) => "total",
            };
            let (admitted, what, retry): (i64, String, i64) = self
                .admit
                .arg(&self.prefix)
                .arg(scope)
                .arg(limit_arg(limits.rpm))
                .arg(limit_arg(limits.rpd))
                .arg(limit_arg(limits.tpm))
                .arg(limit_arg(budget.and_then(|b| b.tokens)))
                .arg(budget.and_then(|b| b.cost).unwrap_or(-1.0))
                .arg(period)
                .invoke_async(&mut connection)
                .await?;
            anyhow::Ok(if admitted == 1 {
                Verdict::Admit
            } else {
                Verdict::Refuse {
                    what,
                    retry_after: u64::try_from(retry).unwrap_or(1).max(1),
                }
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer in time"))?
    }

    /// Adds an answer's tokens and cost to `scope`'s current windows.
    pub async fn settle(&self, scope: &str, tokens: u64, cost: f64) -> anyhow::Result<()> {
        let call = async {
            let mut connection = self.connection().await?;
            let _: i64 = self
                .settle
                .arg(&self.prefix)
                .arg(scope)
                .arg(i64::try_from(tokens).unwrap_or(i64::MAX))
                .arg(cost.to_string())
                .invoke_async(&mut connection)
                .await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(self.timeout * 10, call)
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer in time"))?
    }
}
