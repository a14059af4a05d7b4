//! Alerts (what rules produce, kept in the store), silences (control-plane state), and the
//! vocabulary alerts carry: severity, and the window aggregate and comparison that fired.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::model::{format_ms, TenantId};
use crate::named_enum;

named_enum! {
    /// How a window summarises its events. `sum`, `avg`, `min` and `max` use numeric values
    /// only; `distinct` counts distinct values of any kind.
    pub enum Aggregate {
        Count = "count",
        Sum = "sum",
        Avg = "avg",
        Min = "min",
        Max = "max",
        Distinct = "distinct",
    }
}

named_enum! {
    /// How a window's aggregate is compared with its threshold.
    pub enum CompareOp {
        Gt = "gt",
        Gte = "gte",
        Lt = "lt",
        Lte = "lte",
        Eq = "eq",
        Ne = "ne",
    }
}

impl CompareOp {
    /// True when `value op threshold` holds (`eq` and `ne` compare exactly).
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            CompareOp::Gt => value > threshold,
            CompareOp::Gte => value >= threshold,
            CompareOp::Lt => value < threshold,
            CompareOp::Lte => value <= threshold,
            CompareOp::Eq => value == threshold,
            CompareOp::Ne => value != threshold,
        }
    }
}

named_enum! {
    /// How urgent a rule's alerts are.
    #[derive(Default)]
    pub enum Severity {
        Critical = "critical",
        Error = "error",
        #[default]
        Warning = "warning",
        Info = "info",
    }
}

/// Lifecycle of an alert as the engine records it. `acknowledged` is an overlay kept apart
/// (an operator action, see [`AlertAck`]), so the engine and the API never write the same record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Resolved,
}

/// What kind of condition fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A matching event (rules without a window).
    Event,
    /// A window aggregate crossed its threshold.
    Window,
    /// No matching event for the absence period.
    Absence,
    /// A rule plugin decided to fire for a matching event.
    Plugin,
    /// Raised by the node about the tenant's setup (a channel it disabled); `rule_id` is nil.
    System,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub rule_id: Uuid,
    pub rule_version: u32,
    pub rule_name: String,
    pub kind: AlertKind,
    pub severity: Severity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Group-by field → value (empty for ungrouped rules).
    #[serde(default)]
    pub group: BTreeMap<String, Value>,
    /// The observed value: the window aggregate, the number of matching events (event rules)
    /// or the seconds without an event (absence rules).
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<CompareOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Aggregate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    pub state: AlertState,
    pub fired_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at_ms: Option<i64>,
    /// A sample of the triggering events (the newest ones, at most ten).
    #[serde(default)]
    pub event_ids: Vec<String>,
    /// Set when a silence matched at firing time: the alert is recorded but not notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence_id: Option<Uuid>,
    /// The rule's actions at firing time (delivered by the notification workers).
    #[serde(default)]
    pub actions: Vec<Value>,
    /// A plugin's title for the alert. Shared, like `details`: an open alert is copied out
    /// with every batch that updates it, and these never change once it fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<Arc<str>>,
    /// A plugin's detail fields for the alert.
    #[serde(default, skip_serializing_if = "no_details")]
    pub details: Arc<serde_json::Map<String, Value>>,
}

fn no_details(d: &Arc<serde_json::Map<String, Value>>) -> bool {
    d.is_empty()
}

/// An operator's acknowledgement of an alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertAck {
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The JSON shape of an alert in API responses.
#[derive(Debug, Serialize)]
pub struct AlertView<'a> {
    pub id: Uuid,
    pub rule_id: Uuid,
    pub rule_version: u32,
    pub rule_name: &'a str,
    pub kind: AlertKind,
    pub severity: Severity,
    pub labels: &'a BTreeMap<String, String>,
    pub group: &'a BTreeMap<String, Value>,
    pub value: f64,
    pub threshold: Option<f64>,
    pub op: Option<CompareOp>,
    pub aggregate: Option<Aggregate>,
    pub window_seconds: Option<u64>,
    /// `firing`, `acknowledged` (firing, acknowledged by an operator) or `resolved`.
    pub state: &'static str,
    pub silenced: bool,
    pub silence_id: Option<Uuid>,
    pub fired_at: String,
    pub resolved_at: Option<String>,
    pub acknowledged_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<&'a str>,
    pub event_ids: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<&'a str>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: &'a serde_json::Map<String, Value>,
}

impl Alert {
    /// The state the API shows, with the acknowledgement overlay.
    pub fn shown_state(&self, ack: Option<&AlertAck>) -> &'static str {
        match (self.state, ack) {
            (AlertState::Resolved, _) => "resolved",
            (AlertState::Firing, Some(_)) => "acknowledged",
            (AlertState::Firing, None) => "firing",
        }
    }

    pub fn view<'a>(&'a self, ack: Option<&'a AlertAck>) -> AlertView<'a> {
        AlertView {
            id: self.id,
            rule_id: self.rule_id,
            rule_version: self.rule_version,
            rule_name: &self.rule_name,
            kind: self.kind,
            severity: self.severity,
            labels: &self.labels,
            group: &self.group,
            value: self.value,
            threshold: self.threshold,
            op: self.op,
            aggregate: self.aggregate,
            window_seconds: self.window_seconds,
            state: self.shown_state(ack),
            silenced: self.silence_id.is_some(),
            silence_id: self.silence_id,
            fired_at: format_ms(self.fired_at_ms),
            resolved_at: self.resolved_at_ms.map(format_ms),
            acknowledged_at: ack.map(|a| format_ms(a.at_ms)),
            acknowledged_by: ack.and_then(|a| a.by.as_deref()),
            event_ids: &self.event_ids,
            title: self.title.as_deref(),
            details: &self.details,
        }
    }
}

/// Alert ids are UUIDv8 whose first 48 bits are the firing time in ms (so ids sort by time)
/// and whose rest is a hash of what fired: replaying the same events yields the same ids.
pub fn alert_id(fired_at_ms: i64, tenant: &TenantId, rule: &Uuid, group: &str, trigger: u64) -> Uuid {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update(rule.as_bytes());
    h.update((group.len() as u64).to_be_bytes());
    h.update(group.as_bytes());
    h.update(trigger.to_be_bytes());
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&(fired_at_ms.max(0) as u64).to_be_bytes()[2..]);
    b[6..].copy_from_slice(&digest[..10]);
    Uuid::new_v8(b)
}

/// The smallest alert id that can have fired at or after `ms` (for time-range scans).
pub fn alert_id_floor(ms: i64) -> Uuid {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&(ms.max(0) as u64).to_be_bytes()[2..]);
    Uuid::from_bytes(b)
}

/// What a silence matches: every given member must match.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SilenceMatchers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<Uuid>,
    /// Label → value the rule's labels must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Group-by field → value the alert's group must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub matchers: SilenceMatchers,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub created_at_ms: i64,
}

impl Silence {
    /// True when the silence is in effect at `at_ms` and its matchers match.
    pub fn matches(
        &self,
        at_ms: i64,
        rule_id: &Uuid,
        labels: &BTreeMap<String, String>,
        group: &BTreeMap<String, Value>,
    ) -> bool {
        at_ms >= self.starts_at_ms
            && at_ms < self.ends_at_ms
            && self.matchers.rule_id.is_none_or(|r| r == *rule_id)
            && self.matchers.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.matchers.group.iter().all(|(k, v)| group.get(k).is_some_and(|g| json_eq(g, v)))
    }
}

/// JSON equality where numbers compare by value (1 == 1.0).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}
