//! Alerts to webhooks: a gateway key past 80% and 100% of its budget, an upstream cooled
//! down and recovered, the request log dropping rows.
//!
//! Each alert is sent once per condition: a budget threshold once per key and budget
//! window, an upstream's going down once until it recovers (and its recovery once), the
//! log's drops at most once per `alerts.interval` (with the count since the last one).
//! Raising an alert never blocks and never waits on the network: it goes into a bounded
//! queue (full: dropped and counted) that a task of its own delivers, POSTing to every
//! webhook with retries and back-off. A webhook gets sluice's JSON
//! (`{"alert", "text", …fields}`) or, with `format: slack`, Slack's `{"text": …}`.
//! Webhook URLs are secrets (a Slack URL is its own credential): never logged.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{Alerts as AlertsConfig, Webhook, WebhookFormat};

/// Alerts waiting for delivery.
const QUEUE: usize = 256;
/// Tries per webhook and alert, and the wait before the second (doubled each time).
const TRIES: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the log's drop counters are looked at.
const DROPS_EVERY: Duration = Duration::from_secs(1);

/// One alert: what it is about (a bounded name), a sentence, and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: &'static str,
    pub text: String,
    pub fields: Value,
}

impl Alert {
    /// The body a webhook of `format` gets.
    pub fn body(&self, format: WebhookFormat) -> Value {
        match format {
            WebhookFormat::Slack => json!({ "text": format!("sluice: {}", self.text) }),
            WebhookFormat::Json => {
                let mut body = json!({
                    "alert": self.kind,
                    "text": self.text,
                    "time_ms": crate::clock::unix_now_ms(),
                });
                if let (Some(body), Some(fields)) = (body.as_object_mut(), self.fields.as_object())
                {
                    for (name, value) in fields {
                        body.entry(name.clone()).or_insert_with(|| value.clone());
                    }
                }
                body
            }
        }
    }
}

/// Who holds a budget: its kind (`key`; a team, say) and its name.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub kind: &'static str,
    pub name: &'a str,
}

/// What has been said already, so each condition is said once.
#[derive(Debug, Default)]
struct Said {
    /// (`kind:name`, threshold percent, period, window) of budget alerts sent.
    budgets: HashSet<(String, u8, &'static str, i64)>,
    /// Upstreams said to be down and not yet said to be back.
    down: HashSet<String>,
}

/// The alerting side: raise an alert from anywhere, without waiting. Cheap to share.
#[derive(Debug)]
pub struct Alerts {
    sender: tokio::sync::mpsc::Sender<Alert>,
    said: Mutex<Said>,
    /// Alerts dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// The log's counters the alerts watch: rows dropped (lost) and shed.
pub trait DropCounts: Send + Sync {
    fn drops(&self) -> u64;
}

impl Alerts {
    /// Starts the delivery task on the current runtime, if any webhook is configured;
    /// `drops` is the log's, watched for rows it drops.
    pub fn start(
        config: &AlertsConfig,
        drops: Option<Arc<dyn DropCounts>>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        if config.webhooks.is_empty() {
            return Ok(None);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("alerts need the async runtime; none are sent");
            return Ok(None);
        };
        let client = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the alerts' HTTP client: {e}"))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(QUEUE);
        let alerts = Arc::new(Self {
            sender,
            said: Mutex::default(),
            dropped: AtomicU64::new(0),
        });
        let delivery = Delivery {
            client,
            webhooks: config.webhooks.clone(),
            interval: config.interval,
            drops,
            alerts: Arc::downgrade(&alerts),
        };
        runtime.spawn(delivery.run(receiver));
        Ok(Some(alerts))
    }

    /// Queues an alert; never blocks. A full queue drops it (counted).
    fn raise(&self, alert: Alert) {
        if self.sender.try_send(alert).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn said(&self) -> std::sync::MutexGuard<'_, Said> {
        self.said
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A budget holder's use (`holder` is what holds it: `key`, or another kind such as a
    /// team) in the current window, `used` of `limit`; raises the 80% and 100% alerts not
    /// yet raised in that window.
    pub fn budget(
        &self,
        holder: Holder<'_>,
        period: &'static str,
        window: i64,
        used: f64,
        limit: f64,
    ) {
        if limit <= 0.0 || !used.is_finite() {
            return;
        }
        let Holder { kind, name } = holder;
        let share = used / limit;
        for threshold in [80u8, 100] {
            if share < f64::from(threshold) / 100.0 {
                continue;
            }
            let new =
                self.said()
                    .budgets
                    .insert((format!("{kind}:{name}"), threshold, period, window));
            if !new {
                continue;
            }
            let mut fields = json!({"threshold": threshold, "period": period,
                "used": crate::pure::usage::round_cost(used), "limit": limit});
            fields[kind] = json!(name);
            self.raise(Alert {
                kind: if threshold == 100 {
                    "budget_exhausted"
                } else {
                    "budget_80"
                },
                text: format!(
                    "{kind} `{name}` has used {}% of its {period} budget{}",
                    (share * 100.0).floor(),
                    if threshold == 100 {
                        ": its requests are refused until the period ends"
                    } else {
                        ""
                    }
                ),
                fields,
            });
        }
    }

    /// An upstream rests after failing (`cause`); said once until it recovers.
    pub fn upstream_down(&self, upstream: &str, rest: Duration, cause: &str) {
        if !self.said().down.insert(upstream.to_string()) {
            return;
        }
        self.raise(Alert {
            kind: "upstream_down",
            text: format!(
                "upstream `{upstream}` is cooled down for {} after: {cause}",
                humantime::format_duration(rest)
            ),
            fields: json!({"upstream": upstream, "cause": cause, "rest_ms": rest.as_millis() as u64}),
        });
    }

    /// Whether an upstream was said to be down and not yet back.
    pub fn is_down(&self, upstream: &str) -> bool {
        self.said().down.contains(upstream)
    }

    /// An upstream answered again after resting; said once, if its going down was.
    pub fn upstream_recovered(&self, upstream: &str) {
        if !self.said().down.remove(upstream) {
            return;
        }
        self.raise(Alert {
            kind: "upstream_recovered",
            text: format!("upstream `{upstream}` has recovered: it answers again"),
            fields: json!({"upstream": upstream}),
        });
    }
}

/// The task that sends the queue's alerts and watches the log's drops.
struct Delivery {
    client: reqwest::Client,
    webhooks: Vec<Webhook>,
    interval: Duration,
    drops: Option<Arc<dyn DropCounts>>,
    alerts: std::sync::Weak<Alerts>,
}

impl Delivery {
    async fn run(self, mut receiver: tokio::sync::mpsc::Receiver<Alert>) {
        let mut seen = self.drops.as_ref().map_or(0, |d| d.drops());
        let mut last_said: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(DROPS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                alert = receiver.recv() => match alert {
                    Some(alert) => self.deliver(&alert).await,
                    None => return,
                },
                _ = tick.tick() => {
                    if self.alerts.strong_count() == 0 {
                        return;
                    }
                    let Some(drops) = &self.drops else { continue };
                    let now = drops.drops();
                    let due = last_said.is_none_or(|t| t.elapsed() >= self.interval);
                    if now > seen && due {
                        last_said = Some(tokio::time::Instant::now());
                        let count = now - seen;
                        seen = now;
                        self.deliver(&log_drops(count, self.interval)).await;
                    }
                }
            }
        }
    }

    /// Sends one alert to every webhook, each with retries and back-off.
    async fn deliver(&self, alert: &Alert) {
        tracing::info!(alert = alert.kind, "alert: {}", alert.text);
        for (index, webhook) in self.webhooks.iter().enumerate() {
            let body = alert.body(webhook.format).to_string();
            let mut wait = FIRST_RETRY;
            for attempt in 1..=TRIES {
                let sent = self
                    .client
                    .post(webhook.url.expose())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let failure = match sent {
                    Ok(response) if response.status().is_success() => break,
                    Ok(response) => format!("it answered {}", response.status().as_u16()),
                    Err(error) if error.is_timeout() => "it timed out".to_string(),
                    Err(_) => "it cannot be reached".to_string(),
                };
                if attempt == TRIES {
                    tracing::warn!(
                        webhook = index,
                        alert = alert.kind,
                        "alert not delivered to alerts.webhooks[{index}] after {TRIES} tries: {failure}"
                    );
                    break;
                }
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

fn log_drops(count: u64, interval: Duration) -> Alert {
    Alert {
        kind: "log_drops",
        text: format!(
            "the request log dropped {count} row(s) (the writer fell behind or the store refused \
             them); see dropped and shed in /v1/status; next such alert in {} at the soonest",
            humantime::format_duration(interval)
        ),
        fields: json!({"dropped": count}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_gets_text_and_json_gets_fields() {
        let alert = Alert {
            kind: "upstream_recovered",
            text: "upstream `a` has recovered".into(),
            fields: json!({"upstream": "a"}),
        };
        assert_eq!(
            alert.body(WebhookFormat::Slack),
            json!({"text": "sluice: upstream `a` has recovered"})
        );
        let body = alert.body(WebhookFormat::Json);
        assert_eq!(body["alert"], "upstream_recovered");
        assert_eq!(body["upstream"], "a");
        assert_eq!(body["text"], "upstream `a` has recovered");
    }
}
