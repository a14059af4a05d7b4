//! Events as producers send them, as the log carries them, and as the store returns them.
//!
//! Validation happens before anything is published: a batch with one bad event is rejected
//! whole, with the path of the field at fault (`events[3].type`).

use std::fmt::{self, Display};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;

/// Maximum nesting depth of an event payload (the payload object itself is depth 1).
pub const MAX_PAYLOAD_DEPTH: usize = 32;
/// Maximum length of an event type, an event id and an idempotency key.
pub const MAX_NAME_LEN: usize = 128;
/// Maximum length of `source`, `user_id` and `session_id`.
pub const MAX_ATTR_LEN: usize = 256;

/// A tenant's identity. Shown as a hyphenated UUID; carried in subjects without hyphens.
pub type TenantId = Uuid;

/// One event as accepted from a producer, validated and ready for the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: String,
    pub tenant_id: TenantId,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Event time, milliseconds since the Unix epoch.
    pub occurred_at_ms: i64,
    /// When the node accepted the event, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The idempotency key this event was accepted under (`id:<id>` or `key:<key>`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Where an event sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    pub partition: u32,
    pub sequence: u64,
}

/// An event as the store holds it: the record plus its log position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub record: EventRecord,
    pub position: LogPosition,
}

/// An event as it travels from the log to the store: the record's MessagePack bytes exactly
/// as the log holds them, plus the fields the store keys on. Partition owners decode only
/// those fields (the payload is skipped, not built), and the store keeps the bytes as they are.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    pub tenant_id: TenantId,
    pub id: String,
    pub event_type: String,
    pub occurred_at_ms: i64,
    pub received_at_ms: i64,
    pub idempotency_key: Option<String>,
    pub position: LogPosition,
    /// MessagePack [`EventRecord`].
    pub record: bytes::Bytes,
}

impl EncodedEvent {
    /// Reads the key fields of a log message body; the payload must be a map but is skipped,
    /// and the other attributes are left in the bytes.
    pub fn decode(record: bytes::Bytes, position: LogPosition) -> Result<Self, rmp_serde::decode::Error> {
        let head: RecordHead = rmp_serde::from_slice(&record)?;
        Ok(EncodedEvent {
            tenant_id: head.tenant_id,
            id: head.id,
            event_type: head.event_type,
            occurred_at_ms: head.occurred_at_ms,
            received_at_ms: head.received_at_ms,
            idempotency_key: head.idempotency_key,
            position,
            record,
        })
    }

    /// Encodes a record the way the log does.
    pub fn from_record(record: &EventRecord, position: LogPosition) -> Result<Self, rmp_serde::encode::Error> {
        let bytes = rmp_serde::to_vec_named(record)?;
        Ok(EncodedEvent {
            tenant_id: record.tenant_id,
            id: record.id.clone(),
            event_type: record.event_type.clone(),
            occurred_at_ms: record.occurred_at_ms,
            received_at_ms: record.received_at_ms,
            idempotency_key: record.idempotency_key.clone(),
            position,
            record: bytes.into(),
        })
    }
}

/// The fields of an [`EventRecord`] that [`EncodedEvent::decode`] reads.
#[derive(Deserialize)]
struct RecordHead {
    id: String,
    tenant_id: TenantId,
    #[serde(rename = "type")]
    event_type: String,
    #[allow(dead_code)]
    payload: SkippedMap,
    occurred_at_ms: i64,
    received_at_ms: i64,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// A map whose entries are skipped unread.
struct SkippedMap;

impl<'de> Deserialize<'de> for SkippedMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SkippedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<SkippedMap, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(SkippedMap)
            }
        }
        d.deserialize_map(V)
    }
}

/// The JSON shape of a stored event in API responses.
#[derive(Debug, Serialize)]
pub struct EventView<'a> {
    pub id: &'a str,
    pub tenant_id: TenantId,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub payload: &'a Map<String, Value>,
    pub source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    pub occurred_at: String,
    pub received_at: String,
    pub position: LogPosition,
}

impl StoredEvent {
    pub fn view(&self) -> EventView<'_> {
        let r = &self.record;
        EventView {
            id: &r.id,
            tenant_id: r.tenant_id,
            event_type: &r.event_type,
            payload: &r.payload,
            source: r.source.as_deref(),
            user_id: r.user_id.as_deref(),
            session_id: r.session_id.as_deref(),
            occurred_at: format_ms(r.occurred_at_ms),
            received_at: format_ms(r.received_at_ms),
            position: self.position,
        }
    }
}

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => ms.to_string(),
    }
}

/// Parses an RFC 3339 timestamp into epoch milliseconds.
pub fn parse_time(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// True when `s` is 1..=128 characters of `[A-Za-z0-9_.:-]` with no empty dot-separated token
/// (event types become NATS subject tokens).
pub fn valid_type(s: &str) -> bool {
    valid_name(s) && s.split('.').all(|t| !t.is_empty())
}

/// True when `s` is 1..=128 characters of `[A-Za-z0-9_.:-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The request body after decoding: one event or a batch.
pub struct ParsedBody {
    pub events: Vec<Map<String, Value>>,
    pub batch: bool,
}

/// Splits a decoded body into events. Field paths in errors follow the body's shape.
pub fn split_body(body: Value, max_events: usize) -> Result<ParsedBody, ApiError> {
    let Value::Object(mut obj) = body else {
        return Err(ApiError::bad_request("", "the body must be a JSON object: an event or {\"events\": [...]}"));
    };
    if let Some(events) = obj.remove("events") {
        if let Some(extra) = obj.keys().next() {
            return Err(ApiError::bad_request(extra.clone(), "a batch body has only the `events` member"));
        }
        let Value::Array(items) = events else {
            return Err(ApiError::bad_request("events", "`events` must be an array"));
        };
        check_batch_len(items.len(), max_events)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match item {
                Value::Object(m) => out.push(m),
                _ => return Err(ApiError::bad_request(format!("events[{i}]"), "each event must be an object")),
            }
        }
        Ok(ParsedBody { events: out, batch: true })
    } else {
        Ok(ParsedBody { events: vec![obj], batch: false })
    }
}

/// A batch holds 1 to `max_events` events.
pub fn check_batch_len(n: usize, max_events: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::bad_request("events", "`events` must hold at least one event"));
    }
    if n > max_events {
        return Err(ApiError::new(
            crate::error::ErrorKind::PayloadTooLarge,
            format!("a batch holds at most {max_events} events; this one has {n}"),
        )
        .with_field("events"));
    }
    Ok(())
}

fn opt_string(
    obj: &mut Map<String, Value>,
    name: &str,
    prefix: impl Display + Copy,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match obj.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(Some(s)),
        Some(Value::String(_)) => {
            Err(ApiError::bad_request(format!("{prefix}{name}"), format!("`{name}` must be 1 to {max} characters")))
        }
        Some(_) => Err(ApiError::bad_request(format!("{prefix}{name}"), format!("`{name}` must be a string"))),
    }
}

/// A server-made event id: a UUIDv7 whose timestamp is the event time, so ids sort by event
/// time and the store can find an event from its id alone (see `store::embedded`). Within one
/// millisecond, ids follow a process-wide 12-bit counter (arrival order, wrapping every 4,096
/// ids); the remaining 62 bits are random.
pub fn event_id(occurred_at_ms: i64) -> Uuid {
    static COUNTER: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes: [u8; 10] = rand::random();
    bytes[..2].copy_from_slice(&(n & 0x0fff).to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(occurred_at_ms.max(0) as u64, &bytes).into_uuid()
}

/// The millisecond timestamp of a UUIDv7 id given in its hyphenated form, if `id` is one.
pub fn id_time_ms(id: &str) -> Option<i64> {
    if id.len() != uuid::fmt::Hyphenated::LENGTH {
        return None;
    }
    let u = Uuid::try_parse(id).ok()?;
    if u.get_version_num() != 7 {
        return None;
    }
    let b = u.as_bytes();
    Some(i64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]))
}

/// Where an event sits in a request body, as error fields name it: `events[3].` in a batch,
/// nothing for a single event. Written out only when an error needs it.
#[derive(Debug, Clone, Copy)]
pub struct EventPath(pub Option<usize>);

impl Display for EventPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => write!(f, "events[{i}]."),
            None => Ok(()),
        }
    }
}

/// Validates one event and turns it into a record. `prefix` is `events[i].` in a batch (an
/// [`EventPath`], or any text).
pub fn validate_event(
    mut obj: Map<String, Value>,
    prefix: impl Display + Copy,
    tenant_id: TenantId,
    received_at_ms: i64,
) -> Result<EventRecord, ApiError> {
    let payload = obj.remove("payload");
    let fields = validate_fields(obj, prefix, received_at_ms)?;
    let payload = match payload {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => {
            let d = 1 + m.values().map(depth).max().unwrap_or(0);
            if d > MAX_PAYLOAD_DEPTH {
                return Err(too_deep(prefix, d));
            }
            m
        }
        Some(_) => return Err(not_an_object(prefix)),
    };
    Ok(EventRecord {
        id: fields.id,
        tenant_id,
        event_type: fields.event_type,
        payload,
        source: fields.source,
        user_id: fields.user_id,
        session_id: fields.session_id,
        occurred_at_ms: fields.occurred_at_ms,
        received_at_ms,
        idempotency_key: fields.idempotency_key,
    })
}

fn too_deep(prefix: impl Display + Copy, depth: usize) -> ApiError {
    ApiError::bad_request(
        format!("{prefix}payload"),
        format!("`payload` nests {depth} levels deep; the limit is {MAX_PAYLOAD_DEPTH}"),
    )
}

fn not_an_object(prefix: impl Display + Copy) -> ApiError {
    ApiError::bad_request(format!("{prefix}payload"), "`payload` must be an object")
}

/// An event's fields besides its payload, validated.
pub struct EventFields {
    pub id: String,
    pub event_type: String,
    pub source: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub occurred_at_ms: i64,
    /// `id:<id>` when the producer gave the id.
    pub idempotency_key: Option<String>,
}

/// Validates every field of an event but its payload (`obj` must not hold it).
pub fn validate_fields(
    mut obj: Map<String, Value>,
    prefix: impl Display + Copy,
    received_at_ms: i64,
) -> Result<EventFields, ApiError> {
    let event_type = match obj.remove("type") {
        Some(Value::String(t)) if valid_type(&t) => t,
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(
                format!("{prefix}type"),
                "`type` must be 1-128 characters of [A-Za-z0-9_.:-] with no empty dot-separated part",
            ))
        }
        Some(_) => return Err(ApiError::bad_request(format!("{prefix}type"), "`type` must be a string")),
        None => return Err(ApiError::bad_request(format!("{prefix}type"), "`type` is required")),
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_name(&s) => Some(s),
        Some(_) => {
            return Err(ApiError::bad_request(
                format!("{prefix}id"),
                "`id` must be 1-128 characters of [A-Za-z0-9_.:-]",
            ))
        }
    };
    let occurred_at_ms = match obj.remove("occurred_at") {
        None | Some(Value::Null) => received_at_ms,
        Some(Value::String(s)) => match parse_time(&s) {
            Some(ms) if (0..=253_402_300_799_999).contains(&ms) => ms,
            _ => {
                return Err(ApiError::bad_request(
                    format!("{prefix}occurred_at"),
                    "`occurred_at` must be an RFC 3339 timestamp between 1970 and 9999, e.g. 2026-01-31T12:00:00Z",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                format!("{prefix}occurred_at"),
                "`occurred_at` must be an RFC 3339 timestamp string",
            ))
        }
    };
    let source = opt_string(&mut obj, "source", prefix, MAX_ATTR_LEN)?;
    let user_id = opt_string(&mut obj, "user_id", prefix, MAX_ATTR_LEN)?;
    let session_id = opt_string(&mut obj, "session_id", prefix, MAX_ATTR_LEN)?;
    if let Some(unknown) = obj.keys().next() {
        return Err(ApiError::bad_request(
            format!("{prefix}{unknown}"),
            format!("unknown field `{unknown}`; event fields are type, payload, id, source, occurred_at, user_id, session_id"),
        ));
    }
    let (id, idempotency_key) = match id {
        Some(id) => (id.clone(), Some(format!("id:{id}"))),
        None => (event_id(occurred_at_ms).to_string(), None),
    };
    Ok(EventFields { id, event_type, source, user_id, session_id, occurred_at_ms, idempotency_key })
}

/// Checks a payload given as raw JSON text: an object (or `null`, an empty payload) nesting at
/// most [`MAX_PAYLOAD_DEPTH`] levels. The text must already be valid JSON.
pub fn check_json_payload(raw: &str, prefix: impl Display + Copy) -> Result<bool, ApiError> {
    let raw = raw.trim_start();
    if raw.starts_with("null") {
        return Ok(false);
    }
    if !raw.starts_with('{') {
        return Err(not_an_object(prefix));
    }
    let d = json_depth(raw.as_bytes());
    if d > MAX_PAYLOAD_DEPTH {
        return Err(too_deep(prefix, d));
    }
    Ok(true)
}

/// The deepest nesting of objects and arrays in valid JSON text (brackets inside strings,
/// escaped quotes included, do not count).
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// An accepted event on its way to the log: its MessagePack [`EventRecord`] and what the log
/// routes and deduplicates on.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub id: String,
    pub tenant_id: TenantId,
    pub event_type: String,
    pub idempotency_key: Option<String>,
    /// MessagePack [`EventRecord`].
    pub body: bytes::Bytes,
}

/// Serializes exactly as [`EventRecord`] does, with the payload given by anything
/// serializable: a decoded map, or JSON text transcoded straight into MessagePack.
#[derive(Serialize)]
struct RecordOut<'a, P> {
    id: &'a str,
    tenant_id: TenantId,
    #[serde(rename = "type")]
    event_type: &'a str,
    payload: P,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    occurred_at_ms: i64,
    received_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
}

impl OutgoingEvent {
    /// Encodes a record the way the log carries it.
    pub fn encode(record: EventRecord) -> Result<Self, rmp_serde::encode::Error> {
        let body = rmp_serde::to_vec_named(&record)?;
        Ok(OutgoingEvent {
            id: record.id,
            tenant_id: record.tenant_id,
            event_type: record.event_type,
            idempotency_key: record.idempotency_key,
            body: body.into(),
        })
    }

    /// Encodes an event whose payload is JSON text (checked by [`check_json_payload`];
    /// `None` for an empty payload), transcoding it into MessagePack without building it.
    pub fn encode_json(
        fields: EventFields,
        payload: Option<&str>,
        tenant_id: TenantId,
        received_at_ms: i64,
    ) -> Result<Self, rmp_serde::encode::Error> {
        let body = match payload {
            Some(json) => {
                let mut de = serde_json::Deserializer::from_str(json);
                encode_record(&fields, tenant_id, received_at_ms, serde_transcode::Transcoder::new(&mut de))?
            }
            None => encode_record(&fields, tenant_id, received_at_ms, Map::new())?,
        };
        Ok(OutgoingEvent {
            id: fields.id,
            tenant_id,
            event_type: fields.event_type,
            idempotency_key: fields.idempotency_key,
            body: body.into(),
        })
    }
}

fn encode_record<P: Serialize>(
    f: &EventFields,
    tenant_id: TenantId,
    received_at_ms: i64,
    payload: P,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(&RecordOut {
        id: &f.id,
        tenant_id,
        event_type: &f.event_type,
        payload,
        source: f.source.as_deref(),
        user_id: f.user_id.as_deref(),
        session_id: f.session_id.as_deref(),
        occurred_at_ms: f.occurred_at_ms,
        received_at_ms,
        idempotency_key: f.idempotency_key.as_deref(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn type_charset_and_length() {
        assert!(valid_type("payment.failed"));
        assert!(valid_type("a:b-c_d"));
        assert!(!valid_type(""));
        assert!(!valid_type("payment..failed"));
        assert!(!valid_type(".x"));
        assert!(!valid_type("has space"));
        assert!(!valid_type("wild.*"));
        assert!(valid_type(&"a".repeat(128)));
        assert!(!valid_type(&"a".repeat(129)));
    }

    #[test]
    fn validation_names_the_field() {
        let t = Uuid::now_v7();
        let e = validate_event(obj(json!({"payload": {}})), "events[2].", t, 0).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("events[2].type"));
        let e = validate_event(obj(json!({"type": "a", "payload": [1]})), "", t, 0).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("payload"));
        let e = validate_event(obj(json!({"type": "a", "occurred_at": "yesterday"})), "", t, 0).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("occurred_at"));
        let e = validate_event(obj(json!({"type": "a", "colour": 1})), "", t, 0).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("colour"));
    }

    #[test]
    fn nesting_limit_is_exact() {
        let t = Uuid::now_v7();
        let mut v = json!(1);
        for _ in 0..31 {
            v = json!({ "a": v });
        }
        // `v` is 31 levels of objects; the payload object around it makes 32: the limit.
        let ok = json!({"type": "a", "payload": {"a": v.clone()}});
        assert!(validate_event(obj(ok), "", t, 0).is_ok());
        let too_deep = json!({"type": "a", "payload": {"a": {"a": v}}});
        let e = validate_event(obj(too_deep), "", t, 0).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("payload"));
    }

    #[test]
    fn producer_id_becomes_idempotency_key() {
        let t = Uuid::now_v7();
        let r = validate_event(obj(json!({"type": "a", "id": "ord-1"})), "", t, 5).unwrap();
        assert_eq!(r.id, "ord-1");
        assert_eq!(r.idempotency_key.as_deref(), Some("id:ord-1"));
        assert_eq!(r.occurred_at_ms, 5);
        let r = validate_event(obj(json!({"type": "a", "occurred_at": "2026-01-02T03:04:05.678Z"})), "", t, 5).unwrap();
        assert_eq!(format_ms(r.occurred_at_ms), "2026-01-02T03:04:05.678Z");
        assert!(r.idempotency_key.is_none());
        assert_eq!(Uuid::parse_str(&r.id).map(|u| u.get_version_num()).ok(), Some(7));
        assert_eq!(id_time_ms(&r.id), Some(r.occurred_at_ms), "a server id carries the event time");
    }

    #[test]
    fn server_ids_sort_by_event_time_and_are_unique() {
        let t = Uuid::now_v7();
        let ids: Vec<String> = (0..500)
            .map(|i| validate_event(obj(json!({"type": "a"})), "", t, 1_700_000_000_000 + i / 100).unwrap().id)
            .collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.chunks(100).collect::<Vec<_>>().windows(2).all(|w| w[0].iter().max() < w[1].iter().min()));
        // Within a millisecond they follow arrival, except where the 12-bit counter wraps (at
        // most once in 500 ids).
        assert!(ids.windows(2).filter(|w| w[0] > w[1]).count() <= 1, "ids follow event time, then arrival");
        assert_eq!(id_time_ms(&ids[499]), Some(1_700_000_000_004));
        assert_eq!(id_time_ms("ord-1"), None);
        assert_eq!(id_time_ms(&Uuid::new_v4().to_string()), None);
    }

    #[test]
    fn log_bytes_yield_the_key_fields() {
        let t = Uuid::now_v7();
        let mut r =
            validate_event(obj(json!({"type": "a.b", "id": "e-1", "payload": {"deep": {"x": [1, 2]}}})), "", t, 7)
                .unwrap();
        r.source = Some("s".into());
        let pos = LogPosition { partition: 3, sequence: 9 };
        let enc = EncodedEvent::from_record(&r, pos).unwrap();
        let back = EncodedEvent::decode(enc.record.clone(), pos).unwrap();
        assert_eq!(back, enc);
        assert_eq!((back.id.as_str(), back.event_type.as_str(), back.tenant_id), ("e-1", "a.b", t));
        assert_eq!(back.idempotency_key.as_deref(), Some("id:e-1"));
        let decoded: EventRecord = rmp_serde::from_slice(&back.record).unwrap();
        assert_eq!(decoded, r);
        // Not an event: the payload must be a map, and the key fields must be there.
        let mut odd = serde_json::to_value(&r).unwrap();
        odd["payload"] = json!([1]);
        assert!(EncodedEvent::decode(rmp_serde::to_vec_named(&odd).unwrap().into(), pos).is_err());
        odd.as_object_mut().unwrap().remove("payload");
        assert!(EncodedEvent::decode(rmp_serde::to_vec_named(&odd).unwrap().into(), pos).is_err());
        assert!(EncodedEvent::decode(bytes::Bytes::from_static(b"\x01"), pos).is_err());
    }

    /// An event read as JSON text and one decoded into values reach the log as the same record.
    #[test]
    fn json_text_payloads_encode_as_decoded_ones_do() {
        let t = Uuid::now_v7();
        let payloads = [
            r#"{"z": 1, "a": {"deep": [1, -2, 3.5, "x\"]y", null, true]}, "big": 18446744073709551615}"#,
            r#"{"unicode": "caf\u00e9 \ud83d\ude00", "dup": 1, "dup": 2, "e": 1e3}"#,
            "{}",
        ];
        for p in payloads {
            let fields = json!({"type": "a.b", "id": "e-1", "source": "s", "occurred_at": "2026-01-02T03:04:05Z"});
            let value: Value = serde_json::from_str(p).unwrap();
            let mut with_payload = obj(fields.clone());
            with_payload.insert("payload".into(), value);
            let decoded = OutgoingEvent::encode(validate_event(with_payload, "", t, 9).unwrap()).unwrap();
            let f = validate_fields(obj(fields), "", 9).unwrap();
            let raw = check_json_payload(p, "").unwrap().then_some(p);
            let text = OutgoingEvent::encode_json(f, raw, t, 9).unwrap();
            let (a, b): (EventRecord, EventRecord) =
                (rmp_serde::from_slice(&decoded.body).unwrap(), rmp_serde::from_slice(&text.body).unwrap());
            assert_eq!(a, b, "{p}");
            assert_eq!((text.id.as_str(), text.idempotency_key.as_deref()), ("e-1", Some("id:e-1")));
        }
        let f = validate_fields(obj(json!({"type": "a"})), "", 9).unwrap();
        let empty = OutgoingEvent::encode_json(f, None, t, 9).unwrap();
        let r: EventRecord = rmp_serde::from_slice(&empty.body).unwrap();
        assert!(r.payload.is_empty());
        assert_eq!(id_time_ms(&r.id), Some(9));
    }

    #[test]
    fn json_text_payload_checks() {
        let mut deep = "1".to_string();
        for _ in 0..31 {
            deep = format!("{{\"a\": {deep}}}");
        }
        // 31 levels inside the payload object: 32, the limit. Brackets in strings do not count.
        let ok = format!("{{\"s\": \"[[[{{{{\\\"\", \"a\": {deep}}}");
        assert_eq!(check_json_payload(&ok, "").ok(), Some(true));
        let e = check_json_payload(&format!("{{\"a\": [{deep}]}}"), "events[1].").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("events[1].payload"));
        assert!(e.detail.contains("33 levels"), "{}", e.detail);
        assert_eq!(check_json_payload("null", "").ok(), Some(false));
        for not_object in ["[1]", "3", "\"x\"", "true"] {
            let e = check_json_payload(not_object, "").unwrap_err();
            assert_eq!(e.field.as_deref(), Some("payload"));
        }
    }

    #[test]
    fn batch_limits() {
        let many = json!({"events": (0..3).map(|_| json!({"type": "a"})).collect::<Vec<_>>()});
        assert_eq!(split_body(many.clone(), 3).map(|b| b.events.len()).ok(), Some(3));
        let e = split_body(many, 2).err().unwrap();
        assert_eq!(e.status().as_u16(), 413);
        assert!(split_body(json!({"events": []}), 2).is_err());
        assert!(split_body(json!([1]), 2).is_err());
    }
}
