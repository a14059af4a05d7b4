//! The event a plugin evaluates.

use crate::msgpack::Value;

/// One event, as the node hands it to a plugin. Timestamps are milliseconds since the Unix
/// epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub(crate) id: String,
    pub(crate) tenant_id: String,
    pub(crate) event_type: String,
    pub(crate) source: Option<String>,
    pub(crate) user_id: Option<String>,
    pub(crate) session_id: Option<String>,
    pub(crate) occurred_at_ms: i64,
    pub(crate) received_at_ms: i64,
    pub(crate) payload: Value,
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

impl Event {
    /// Reads the `event` member of the input (see ABI.md).
    pub(crate) fn from_value(v: &Value) -> Option<Event> {
        Some(Event {
            id: v.get("id")?.as_str()?.to_string(),
            tenant_id: v.get("tenant_id")?.as_str()?.to_string(),
            event_type: v.get("type")?.as_str()?.to_string(),
            source: opt_str(v.get("source")),
            user_id: opt_str(v.get("user_id")),
            session_id: opt_str(v.get("session_id")),
            occurred_at_ms: v.get("occurred_at_ms")?.as_i64()?,
            received_at_ms: v.get("received_at_ms")?.as_i64()?,
            payload: v.get("payload").cloned().unwrap_or(Value::Map(Vec::new())),
        })
    }

    /// Builds an event by hand (for a plugin's own unit tests).
    pub fn new(event_type: &str, payload: Value) -> Event {
        Event {
            id: String::from("test-event"),
            tenant_id: String::from("test-tenant"),
            event_type: event_type.to_string(),
            source: None,
            user_id: None,
            session_id: None,
            occurred_at_ms: 0,
            received_at_ms: 0,
            payload,
        }
    }

    /// Sets the event time (for a plugin's own unit tests).
    pub fn at(mut self, occurred_at_ms: i64) -> Event {
        self.occurred_at_ms = occurred_at_ms;
        self.received_at_ms = occurred_at_ms;
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The event type, e.g. `payment.failed`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// When the producer says the event happened.
    pub fn occurred_at_ms(&self) -> i64 {
        self.occurred_at_ms
    }

    /// When a SignalOps node accepted the event.
    pub fn received_at_ms(&self) -> i64 {
        self.received_at_ms
    }

    /// The event's payload (a map).
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// A payload field by dotted path, e.g. `field("card.country")`.
    pub fn field(&self, path: &str) -> Option<&Value> {
        self.payload.path(path)
    }
}
