//! The event as a plugin sees it: the `event` map of ABI v1 inputs, and what the ABI v2 host
//! functions `event_get` and `event_number` read by path.
//!
//! A path addresses that map: `""` is the whole map, `type` or `occurred_at_ms` one member,
//! `payload.card.country` a value inside the payload (a segment of digits indexes an array).

use rmp::encode as w;
use serde_json::{Map, Value};

use signalops_core::model::{EventRecord, TenantId};

/// A value found at a path.
#[derive(Debug, Clone, Copy)]
pub enum Found<'a> {
    /// The whole event map.
    Event(&'a EventRecord),
    Payload(&'a Map<String, Value>),
    Tenant(TenantId),
    Str(&'a str),
    Nil,
    Int(i64),
    Json(&'a Value),
}

/// The value at `path` in the event; `None` when there is none. An attribute the event does
/// not have (`source`, `user_id`, `session_id`) is present as nil, like in the whole map.
pub fn lookup<'a>(ev: &'a EventRecord, path: &str) -> Option<Found<'a>> {
    if path.is_empty() {
        return Some(Found::Event(ev));
    }
    let (head, rest) = next_segment(path);
    let opt = |s: &'a Option<String>| s.as_deref().map_or(Found::Nil, Found::Str);
    let top = match head {
        "id" => Found::Str(&ev.id),
        "tenant_id" => Found::Tenant(ev.tenant_id),
        "type" => Found::Str(&ev.event_type),
        "source" => opt(&ev.source),
        "user_id" => opt(&ev.user_id),
        "session_id" => opt(&ev.session_id),
        "occurred_at_ms" => Found::Int(ev.occurred_at_ms),
        "received_at_ms" => Found::Int(ev.received_at_ms),
        "payload" => {
            let Some(rest) = rest else { return Some(Found::Payload(&ev.payload)) };
            let (first, more) = next_segment(rest);
            let mut cur = ev.payload.get(first)?;
            let Some(mut rest) = more else { return Some(Found::Json(cur)) };
            loop {
                let (seg, more) = next_segment(rest);
                cur = match cur {
                    Value::Object(m) => m.get(seg)?,
                    Value::Array(a) => a.get(parse_index(seg)?)?,
                    _ => return None,
                };
                match more {
                    Some(m) => rest = m,
                    None => return Some(Found::Json(cur)),
                }
            }
        }
        _ => return None,
    };
    rest.is_none().then_some(top)
}

/// The first segment of a dotted path, and the rest after its dot (if there is one).
fn next_segment(path: &str) -> (&str, Option<&str>) {
    match path.bytes().position(|b| b == b'.') {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

/// An array index: digits only (no sign, no leading `+`).
fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Found<'_> {
    /// The value as a float64: numbers and the timestamps; NaN for anything else (JSON has no
    /// NaN, so it cannot be mistaken for a payload number).
    pub fn number(&self) -> f64 {
        match self {
            Found::Int(i) => *i as f64,
            Found::Json(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            _ => f64::NAN,
        }
    }

    /// Appends the value's MessagePack encoding (JSON integers as ints, other numbers as
    /// float64, objects as maps).
    pub fn encode(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        match self {
            Found::Event(ev) => encode_event(out, ev),
            Found::Payload(m) => encode_map(out, m),
            Found::Tenant(t) => {
                let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
                let _ = w::write_str(out, t.hyphenated().encode_lower(&mut text));
            }
            Found::Str(s) => {
                let _ = w::write_str(out, s);
            }
            Found::Nil => {
                let _ = w::write_nil(out);
            }
            Found::Int(i) => {
                let _ = w::write_sint(out, *i);
            }
            Found::Json(v) => encode_json(out, v),
        }
    }
}

fn encode_map(out: &mut Vec<u8>, m: &Map<String, Value>) {
    let _ = w::write_map_len(out, m.len() as u32);
    for (k, v) in m {
        let _ = w::write_str(out, k);
        encode_json(out, v);
    }
}

fn encode_json(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => {
            let _ = w::write_nil(out);
        }
        Value::Bool(b) => {
            let _ = w::write_bool(out, *b);
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = w::write_sint(out, i);
            } else if let Some(u) = n.as_u64() {
                let _ = w::write_uint(out, u);
            } else {
                let _ = w::write_f64(out, n.as_f64().unwrap_or(f64::NAN));
            }
        }
        Value::String(s) => {
            let _ = w::write_str(out, s);
        }
        Value::Array(a) => {
            let _ = w::write_array_len(out, a.len() as u32);
            for v in a {
                encode_json(out, v);
            }
        }
        Value::Object(m) => encode_map(out, m),
    }
}

/// The `event` map (ABI.md, "Input"): nine members, absent attributes as nil.
pub fn encode_event(out: &mut Vec<u8>, ev: &EventRecord) {
    let _ = w::write_map_len(out, 9);
    for name in ["id", "tenant_id", "type", "source", "user_id", "session_id", "occurred_at_ms", "received_at_ms"] {
        let _ = w::write_str(out, name);
        if let Some(v) = lookup(ev, name) {
            v.encode(out);
        }
    }
    let _ = w::write_str(out, "payload");
    encode_map(out, &ev.payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> EventRecord {
        EventRecord {
            id: "e1".into(),
            tenant_id: uuid::Uuid::from_u128(7),
            event_type: "payment.failed".into(),
            payload: json!({"amount": 12.5, "n": 3, "card": {"country": "DE"}, "tags": ["a", "b"], "none": null})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            source: Some("web".into()),
            user_id: None,
            session_id: None,
            occurred_at_ms: 1_700_000_000_000,
            received_at_ms: 1_700_000_000_005,
            idempotency_key: None,
        }
    }

    fn get(ev: &EventRecord, path: &str) -> Option<Value> {
        let mut out = Vec::new();
        lookup(ev, path)?.encode(&mut out);
        Some(rmp_serde::from_slice(&out).unwrap())
    }

    #[test]
    fn paths_address_the_event_map() {
        let ev = event();
        let whole = get(&ev, "").unwrap();
        assert_eq!(whole.as_object().unwrap().len(), 9);
        let member = |k: &str| whole[k].clone();
        for k in ["id", "tenant_id", "type", "source", "user_id", "session_id", "occurred_at_ms", "payload"] {
            assert_eq!(get(&ev, k), Some(member(k)), "{k}");
        }
        assert_eq!(get(&ev, "tenant_id").unwrap().as_str(), Some("00000000-0000-0000-0000-000000000007"));
        assert_eq!(get(&ev, "user_id"), Some(Value::Null));
        assert_eq!(get(&ev, "payload.card.country").unwrap().as_str(), Some("DE"));
        assert_eq!(get(&ev, "payload.tags.1").unwrap().as_str(), Some("b"));
        assert_eq!(get(&ev, "payload.n"), Some(json!(3)));
        assert_eq!(get(&ev, "payload.none"), Some(Value::Null));
        for missing in ["payload.x", "payload.tags.2", "payload.tags.+1", "payload.n.x", "type.x", "nope", "payload."] {
            assert!(lookup(&ev, missing).is_none(), "{missing}");
        }
    }

    #[test]
    fn numbers_are_payload_numbers_and_timestamps() {
        let ev = event();
        let num = |p: &str| lookup(&ev, p).map_or(f64::NAN, |f| f.number());
        assert_eq!(num("payload.amount"), 12.5);
        assert_eq!(num("payload.n"), 3.0);
        assert_eq!(num("occurred_at_ms"), 1_700_000_000_000.0);
        assert!(num("payload.card").is_nan());
        assert!(num("type").is_nan());
        assert!(num("payload.missing").is_nan());
    }
}
