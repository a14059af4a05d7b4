//! Notification jobs (what the job stream carries) and delivery records (what the store keeps
//! of each job: its status and every attempt).
//!
//! A job is one alert transition (fired or resolved) for one action of the rule. Its delivery
//! id is derived from the alert id, the channel and the transition, so a partition owner that
//! replays its log after a crash produces the same ids: JetStream drops the repeated publish
//! (`Nats-Msg-Id`) and the worker skips a delivery already finished. The webhook id receivers
//! see is derived from the delivery id and stays the same across retries and replays.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::alert::{Alert, AlertKind, AlertState};
pub use crate::effects::Transition;
use crate::model::{format_ms, TenantId};

/// One delivery to do, as the job stream carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub delivery_id: Uuid,
    pub tenant_id: TenantId,
    /// The action's `channel_id` as the rule gives it.
    pub channel_id: String,
    pub transition: Transition,
    /// The alert as it was at the transition.
    pub alert: Alert,
    /// The action's template (`{"title", "body"}`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Value>,
    pub created_at_ms: i64,
    /// 0 for the first run; a replay re-queues the delivery with the next run number.
    #[serde(default)]
    pub run: u32,
}

/// Delivery ids are UUIDv8 whose first 48 bits are the transition time in ms (so they sort by
/// time) and whose rest hashes the alert, the channel and the transition.
pub fn delivery_id(at_ms: i64, alert: &Uuid, channel_id: &str, transition: Transition) -> Uuid {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(alert.as_bytes());
    h.update((channel_id.len() as u64).to_be_bytes());
    h.update(channel_id.as_bytes());
    h.update([transition as u8]);
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&(at_ms.max(0) as u64).to_be_bytes()[2..]);
    b[6..].copy_from_slice(&digest[..10]);
    Uuid::new_v8(b)
}

/// The `webhook-id` of a delivery: stable across its retries and replays.
pub fn webhook_id(delivery: &Uuid) -> String {
    format!("msg_{}", delivery.simple())
}

/// The jobs an alert transition makes: one per action with a channel, none for a silenced
/// alert, and none for the resolution of a per-event alert (it only marks the end of its
/// cooldown, which receivers have no use for).
pub fn jobs_for(alert: &Alert, transition: Transition, now_ms: i64) -> Vec<Job> {
    if alert.silence_id.is_some() {
        return Vec::new();
    }
    if transition == Transition::Resolved && matches!(alert.kind, AlertKind::Event | AlertKind::Plugin) {
        return Vec::new();
    }
    let at = match transition {
        Transition::Firing => alert.fired_at_ms,
        Transition::Resolved => alert.resolved_at_ms.unwrap_or(alert.fired_at_ms),
    };
    let mut shown = alert.clone();
    // The job names its own action; the rule's others are not the receiver's business.
    shown.actions = Vec::new();
    if transition == Transition::Firing {
        // An alert that fired and resolved within one batch is announced as it fired.
        shown.state = AlertState::Firing;
        shown.resolved_at_ms = None;
    }
    alert
        .actions
        .iter()
        .filter_map(|a| {
            let channel_id = a.get("channel_id")?.as_str()?.to_owned();
            Some(Job {
                delivery_id: delivery_id(at, &alert.id, &channel_id, transition),
                tenant_id: alert.tenant_id,
                channel_id,
                transition,
                alert: shown.clone(),
                template: a.get("template").filter(|t| !t.is_null()).cloned(),
                created_at_ms: now_ms,
                run: 0,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Queued, in flight or waiting for its next retry.
    Pending,
    /// A 2xx (or an SMTP acceptance) came back.
    Delivered,
    /// Every attempt failed, or the channel refused it (gone, disabled, deleted); the job is in
    /// the dead-letter stream and can be replayed.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// One try at delivering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: i64,
    /// HTTP status (or SMTP reply code) when the endpoint answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    /// The start of the response body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub run: u32,
}

/// Most attempts a record keeps (the oldest go first); `attempt_count` counts them all.
pub const MAX_KEPT_ATTEMPTS: usize = 50;
/// Longest error or response text an attempt keeps, bytes.
pub const MAX_ATTEMPT_TEXT_BYTES: usize = 1024;

/// Cuts a text to at most `max` bytes at a character boundary.
pub fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub job: Job,
    pub status: DeliveryStatus,
    pub attempts: Vec<Attempt>,
    pub attempt_count: u32,
    /// Attempts in the current run (what the retry schedule counts).
    pub run_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at_ms: i64,
}

impl DeliveryRecord {
    pub fn new(job: Job, now_ms: i64) -> DeliveryRecord {
        DeliveryRecord {
            job,
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            attempt_count: 0,
            run_attempts: 0,
            next_attempt_at_ms: None,
            last_error: None,
            updated_at_ms: now_ms,
        }
    }

    pub fn id(&self) -> Uuid {
        self.job.delivery_id
    }

    pub fn push_attempt(&mut self, mut a: Attempt) {
        a.error = a.error.map(|e| clip(e, MAX_ATTEMPT_TEXT_BYTES));
        a.response = a.response.map(|r| clip(r, MAX_ATTEMPT_TEXT_BYTES));
        if self.attempts.len() >= MAX_KEPT_ATTEMPTS {
            self.attempts.remove(0);
        }
        self.last_error = match (&a.error, a.status_code) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(code)) if !(200..300).contains(&code) => Some(format!("endpoint answered {code}")),
            _ => None,
        };
        self.updated_at_ms = a.at_ms;
        self.attempts.push(a);
        self.attempt_count += 1;
        self.run_attempts += 1;
    }

    /// The record as the API shows it.
    pub fn view(&self) -> Value {
        let attempts: Vec<Value> = self
            .attempts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "at": format_ms(a.at_ms),
                    "status_code": a.status_code,
                    "latency_ms": a.latency_ms,
                    "response": a.response,
                    "error": a.error,
                    "run": a.run,
                })
            })
            .collect();
        serde_json::json!({
            "id": self.id(),
            "channel_id": self.job.channel_id,
            "alert_id": self.job.alert.id,
            "rule_id": self.job.alert.rule_id,
            "type": self.job.transition.event_type(),
            "status": self.status.as_str(),
            "webhook_id": webhook_id(&self.id()),
            "attempt_count": self.attempt_count,
            "attempts": attempts,
            "next_attempt_at": self.next_attempt_at_ms.map(format_ms),
            "last_error": self.last_error,
            "replays": self.job.run,
            "created_at": format_ms(self.job.created_at_ms),
            "updated_at": format_ms(self.updated_at_ms),
        })
    }
}
