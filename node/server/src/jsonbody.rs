//! JSON ingest bodies, read in one pass without building the payloads. Each event's own fields
//! (`type`, `id`, `occurred_at`, ...) are decoded into values for validation; its payload stays
//! the JSON text it arrived in, borrowed from the body, and is later transcoded straight into
//! the log's MessagePack ([`signalops_core::model::OutgoingEvent::encode_json`]). Building a value tree
//! per payload and encoding it again cost about a tenth of the node's CPU under sustained
//! ingest.
//!
//! The shape rules and error fields are those of [`signalops_core::model::split_body`], which reads
//! MessagePack bodies.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use signalops_core::error::ApiError;

/// One event of a JSON body: every field but the payload decoded, the payload as JSON text.
pub struct JsonEvent<'a> {
    pub fields: Map<String, Value>,
    pub payload: Option<&'a RawValue>,
}

/// A JSON body split into events.
pub struct JsonBody<'a> {
    pub events: Vec<JsonEvent<'a>>,
    pub batch: bool,
}

/// Splits a JSON body into events; errors name the field at fault as `split_body` does.
pub fn parse(body: &[u8], max_events: usize) -> Result<JsonBody<'_>, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = de.deserialize_any(ItemVisitor { top: true }).and_then(|top| de.end().map(|()| top));
    let top = top.map_err(|e| ApiError::bad_request("", format!("malformed JSON: {e}")))?;
    let Item::Object { event, events } = top else {
        return Err(ApiError::bad_request("", "the body must be a JSON object: an event or {\"events\": [...]}"));
    };
    let Some(events) = events else { return Ok(JsonBody { events: vec![event], batch: false }) };
    if let Some(extra) = event.fields.keys().next() {
        return Err(ApiError::bad_request(extra.clone(), "a batch body has only the `events` member"));
    }
    if event.payload.is_some() {
        return Err(ApiError::bad_request("payload", "a batch body has only the `events` member"));
    }
    let Some(items) = events else { return Err(ApiError::bad_request("events", "`events` must be an array")) };
    signalops_core::model::check_batch_len(items.len(), max_events)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Item::Object { event, .. } => out.push(event),
            Item::Other => return Err(ApiError::bad_request(format!("events[{i}]"), "each event must be an object")),
        }
    }
    Ok(JsonBody { events: out, batch: true })
}

/// A JSON value where an event may stand.
enum Item<'a> {
    /// An object. At the top of the body, its `events` member, if any, is read as the batch:
    /// `Some(items)` for an array, `None` for anything else.
    Object { event: JsonEvent<'a>, events: Option<Option<Vec<Item<'a>>>> },
    /// Anything but an object (skipped over).
    Other,
}

struct ItemVisitor {
    top: bool,
}

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item<'de>, A::Error> {
        let mut fields = Map::new();
        let mut payload = None;
        let mut events = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match &*key {
                "payload" => payload = Some(map.next_value::<&'de RawValue>()?),
                "events" if self.top => events = Some(map.next_value_seed(EventsSeed)?),
                _ => {
                    let value: Value = map.next_value()?;
                    fields.insert(key.into_owned(), value);
                }
            }
        }
        Ok(Item::Object { event: JsonEvent { fields, payload }, events })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Item<'de>, E> {
        Ok(Item::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Item<'de>, E> {
        Ok(Item::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Item<'de>, E> {
        Ok(Item::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Item<'de>, E> {
        Ok(Item::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Item<'de>, E> {
        Ok(Item::Other)
    }

    fn visit_unit<E>(self) -> Result<Item<'de>, E> {
        Ok(Item::Other)
    }
}

/// The `events` member: the items of an array, or `None` for any other value.
struct EventsSeed;

impl<'de> DeserializeSeed<'de> for EventsSeed {
    type Value = Option<Vec<Item<'de>>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(EventsVisitor)
    }
}

struct EventsVisitor;

impl<'de> Visitor<'de> for EventsVisitor {
    type Value = Option<Vec<Item<'de>>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element_seed(ItemSeed)? {
            items.push(item);
        }
        Ok(Some(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// One element of `events`.
struct ItemSeed;

impl<'de> DeserializeSeed<'de> for ItemSeed {
    type Value = Item<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Item<'de>, D::Error> {
        d.deserialize_any(ItemVisitor { top: false })
    }
}

/// An object key, borrowed from the body unless it holds escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use signalops_core::model::split_body;

    /// The field an error names, or the number of events and whether it is a batch.
    fn outcome(r: Result<(usize, bool), ApiError>) -> Result<(usize, bool), (u16, Option<String>)> {
        r.map_err(|e| (e.status().as_u16(), e.field))
    }

    #[test]
    fn shapes_and_errors_match_the_msgpack_reader() {
        let bodies = [
            json!({"type": "a", "payload": {"n": 1}}),
            json!({"events": [{"type": "a"}, {"type": "b", "payload": null}]}),
            json!({"events": [{"type": "a"}], "extra": 1}),
            json!({"events": [{"type": "a"}], "payload": {}}),
            json!({"events": {"type": "a"}}),
            json!({"events": null}),
            json!({"events": []}),
            json!({"events": [{"type": "a"}, 7]}),
            json!({"events": [{"type": "a"}, [1, {"x": 2}]]}),
            json!({"events": [{"type": "a"}, {"type": "b"}, {"type": "c"}, {"type": "d"}]}),
            json!([{"type": "a"}]),
            json!("text"),
            json!(null),
        ];
        for body in bodies {
            let text = serde_json::to_vec(&body).unwrap();
            let ours = outcome(parse(&text, 3).map(|b| (b.events.len(), b.batch)));
            let theirs = outcome(split_body(body.clone(), 3).map(|b| (b.events.len(), b.batch)));
            assert_eq!(ours, theirs, "{body}");
        }
    }

    #[test]
    fn payloads_stay_text_and_fields_decode() {
        let text = br#"{"events": [{"type": "a", "payload": {"s": "x\"}", "n": [1, 2.5]}, "user_id": "u\u0031"}]}"#;
        let body = parse(text, 10).unwrap();
        let ev = &body.events[0];
        assert_eq!(ev.payload.map(RawValue::get), Some(r#"{"s": "x\"}", "n": [1, 2.5]}"#));
        assert_eq!(ev.fields.get("user_id"), Some(&json!("u1")));
        assert_eq!(ev.fields.get("type"), Some(&json!("a")));
    }

    #[test]
    fn malformed_json_is_a_400_for_the_whole_body() {
        for text in [&b"{\"type\": "[..], b"{\"type\": \"a\"} trailing", b"{\"events\": [{\"type\": \"a\",}]}"] {
            let e = parse(text, 10).err().unwrap();
            assert_eq!(e.status().as_u16(), 400);
            assert!(e.detail.contains("malformed JSON"), "{}", e.detail);
        }
    }
}
