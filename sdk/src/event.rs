//! The event a plugin evaluates.
//!
//! In a rule call, [`Event`] reads the event through the host (ABI v2 `event_get` and
//! `event_number`): nothing is copied into the module until the plugin asks for it, and then
//! only the value asked for. An event built by hand ([`Event::new`]) or handed to a notifier
//! holds its values itself and answers the same questions the same way.
//!
//! Paths address the event map of ABI.md: `""` is the whole map, `type` or `occurred_at_ms` one
//! member, `payload.card.country` a value inside the payload, where a segment of digits indexes
//! an array.

use std::cell::RefCell;

use crate::host;
use crate::msgpack::Value;

/// One event. Timestamps are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event map, for an event that holds its values; `None` for the event of the call in
    /// progress, read through the host.
    local: Option<Box<Value>>,
}

thread_local! {
    /// `payload.` + a field path, built without allocating on each call.
    static PATH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The value at `path` in an event map.
fn lookup<'a>(map: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(map);
    }
    let mut v = map;
    for seg in path.split('.') {
        v = match v {
            Value::Map(_) => v.get(seg)?,
            Value::Array(items) if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) => {
                items.get(seg.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(v)
}

fn with_payload_path<R>(path: &str, f: impl FnOnce(&str) -> R) -> R {
    PATH.with(|p| {
        let mut p = p.borrow_mut();
        p.clear();
        p.push_str("payload.");
        p.push_str(path);
        f(&p)
    })
}

impl Event {
    /// The event of the rule call in progress.
    pub(crate) fn current() -> Event {
        Event { local: None }
    }

    /// An event map as the node encodes it (the `event` member of a notifier's input); `None`
    /// when a required member is missing or mistyped.
    pub(crate) fn from_value(v: &Value) -> Option<Event> {
        for key in ["id", "tenant_id", "type"] {
            v.get(key)?.as_str()?;
        }
        for key in ["occurred_at_ms", "received_at_ms"] {
            v.get(key)?.as_i64()?;
        }
        let mut map = v.clone();
        if map.get("payload").is_none() {
            if let Value::Map(entries) = &mut map {
                entries.push((Value::from("payload"), Value::Map(Vec::new())));
            }
        }
        Some(Event { local: Some(Box::new(map)) })
    }

    /// Builds an event by hand (for a plugin's own unit tests).
    pub fn new(event_type: &str, payload: Value) -> Event {
        let map = Value::map(vec![
            ("id", Value::from("test-event")),
            ("tenant_id", Value::from("test-tenant")),
            ("type", Value::from(event_type)),
            ("source", Value::Nil),
            ("user_id", Value::Nil),
            ("session_id", Value::Nil),
            ("occurred_at_ms", Value::Int(0)),
            ("received_at_ms", Value::Int(0)),
            ("payload", payload),
        ]);
        Event { local: Some(Box::new(map)) }
    }

    /// Sets the event time (for a plugin's own unit tests).
    pub fn at(mut self, occurred_at_ms: i64) -> Event {
        if let Some(Value::Map(entries)) = self.local.as_deref_mut() {
            for (k, v) in entries.iter_mut() {
                if matches!(k.as_str(), Some("occurred_at_ms") | Some("received_at_ms")) {
                    *v = Value::Int(occurred_at_ms);
                }
            }
        }
        self
    }

    /// The whole event map this event stands for (for the host emulation of unit tests).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn to_map(&self) -> Value {
        self.get("").unwrap_or(Value::Nil)
    }

    /// The value at a path of the event map, e.g. `get("type")` or
    /// `get("payload.card.country")`; `get("")` is the whole map.
    pub fn get(&self, path: &str) -> Option<Value> {
        match &self.local {
            Some(map) => lookup(map, path).cloned(),
            None => host::event_get(path),
        }
    }

    /// A number at a path of the event map (payload numbers and the two timestamps); `None`
    /// for anything else. Cheaper than [`get`](Event::get): nothing is decoded.
    pub fn get_number(&self, path: &str) -> Option<f64> {
        match &self.local {
            Some(map) => lookup(map, path).and_then(Value::as_f64),
            None => host::event_number(path),
        }
    }

    fn text(&self, path: &str) -> Option<String> {
        match self.get(path)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn millis(&self, path: &str) -> i64 {
        self.get_number(path).map_or(0, |n| n as i64)
    }

    pub fn id(&self) -> String {
        self.text("id").unwrap_or_default()
    }

    pub fn tenant_id(&self) -> String {
        self.text("tenant_id").unwrap_or_default()
    }

    /// The event type, e.g. `payment.failed`.
    pub fn event_type(&self) -> String {
        self.text("type").unwrap_or_default()
    }

    pub fn source(&self) -> Option<String> {
        self.text("source")
    }

    pub fn user_id(&self) -> Option<String> {
        self.text("user_id")
    }

    pub fn session_id(&self) -> Option<String> {
        self.text("session_id")
    }

    /// When the producer says the event happened.
    pub fn occurred_at_ms(&self) -> i64 {
        self.millis("occurred_at_ms")
    }

    /// When a SignalOps node accepted the event.
    pub fn received_at_ms(&self) -> i64 {
        self.millis("received_at_ms")
    }

    /// The event's payload (a map).
    pub fn payload(&self) -> Value {
        self.get("payload").unwrap_or(Value::Map(Vec::new()))
    }

    /// A payload field by dotted path, e.g. `field("card.country")`.
    pub fn field(&self, path: &str) -> Option<Value> {
        with_payload_path(path, |p| self.get(p))
    }

    /// Appends a payload field's key text (what [`Value::to_key`] gives: a string as it is,
    /// numbers and booleans as text) to `out`, without decoding it into a [`Value`] first;
    /// false, with `out` unchanged, when the field is missing or is something else. For
    /// building counter and state keys on every event.
    pub fn push_field_key(&self, path: &str, out: &mut String) -> bool {
        if self.local.is_some() {
            return match self.field(path) {
                Some(Value::Str(s)) => {
                    out.push_str(&s);
                    true
                }
                Some(v) => v.push_number_key(out),
                None => false,
            };
        }
        with_payload_path(path, |p| {
            host::event_get_with(p, |bytes| match crate::msgpack::as_encoded_str(bytes) {
                Some(s) => {
                    out.push_str(s);
                    true
                }
                None => crate::msgpack::decode(bytes).map_or(false, |v| v.push_number_key(out)),
            })
            .unwrap_or(false)
        })
    }

    /// A numeric payload field by dotted path, e.g. `number("amount")`; `None` when the field
    /// is missing or not a number. The cheapest way to read a number.
    pub fn number(&self, path: &str) -> Option<f64> {
        with_payload_path(path, |p| self.get_number(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing;
    use crate::Decision;

    fn payload() -> Value {
        Value::map(vec![
            ("card", Value::from("4242")),
            ("n", Value::Int(-7)),
            ("amount", Value::Float(2.5)),
            ("ok", Value::Bool(true)),
            ("items", Value::Array(vec![Value::map(vec![("sku", Value::from("a1"))])])),
            ("nested", Value::map(vec![("x", Value::Nil)])),
        ])
    }

    /// What a handler sees through the (emulated) host is what a hand-built event answers.
    fn check(event: &Event, _: &Value) -> Result<Decision, String> {
        let local = Event::new("payment.failed", payload()).at(1_000);
        for path in ["card", "n", "amount", "ok", "items.0.sku", "items.1", "nested", "nested.x", "missing"] {
            let (mut a, mut b) = (String::from("k="), String::from("k="));
            assert_eq!(event.push_field_key(path, &mut a), local.push_field_key(path, &mut b), "{path}");
            assert_eq!(a, b, "{path}");
            assert_eq!(event.field(path), local.field(path), "{path}");
            assert_eq!(event.number(path), local.number(path), "{path}");
        }
        assert_eq!(event.event_type(), "payment.failed");
        assert_eq!(event.occurred_at_ms(), 1_000);
        assert_eq!(event.source(), None);
        assert_eq!(event.get("").as_ref(), Some(&local.to_map()));
        Ok(Decision::skip())
    }

    #[test]
    fn the_host_view_and_a_hand_built_event_agree() {
        let ev = Event::new("payment.failed", payload()).at(1_000);
        let mut key = String::new();
        assert!(ev.push_field_key("card", &mut key) && key == "4242");
        key.clear();
        assert!(ev.push_field_key("amount", &mut key) && key == "2.5");
        key.clear();
        assert!(!ev.push_field_key("nested", &mut key) && key.is_empty(), "a map has no key text");
        assert_eq!(ev.number("items.0.sku"), None);
        assert_eq!(ev.field("items.0.sku"), Some(Value::from("a1")));
        testing::evaluate(check, &ev, &Value::Map(Vec::new())).unwrap();
    }
}
