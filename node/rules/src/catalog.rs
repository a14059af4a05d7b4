//! The field catalog of an event type: which payload paths (to depth 4) were seen with which
//! JSON types. Partition owners note every event's fields, whether or not its tenant has rules,
//! so the catalog walks the log's MessagePack bytes directly when nothing else needs the payload
//! decoded, and the decoded payload when a rule already has it.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use signalops_core::effects::{json_type, CatalogEntry, MAX_CATALOG_FIELDS};

/// Deepest payload level the catalog records (the payload's own keys are level 1).
const DEPTH: usize = 4;

/// Notes the fields of a decoded payload.
pub fn note_payload(payload: &Map<String, Value>, entry: &mut CatalogEntry) {
    let mut path = String::from("payload");
    walk_value(payload, &mut path, 1, entry);
}

/// Notes the payload fields of a MessagePack event record (the log's bytes) without building
/// the payload. Fields noted before a malformed part stay noted.
pub fn note_encoded(record: &[u8], entry: &mut CatalogEntry) -> Result<(), rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(record);
    de::Deserializer::deserialize_map(&mut de, RecordFields { entry })
}

fn note(entry: &mut CatalogEntry, path: &str, bits: u8) {
    if let Some(b) = entry.fields.get_mut(path) {
        *b |= bits;
    } else if entry.fields.len() < MAX_CATALOG_FIELDS {
        entry.fields.insert(path.to_string(), bits);
    } else {
        entry.fields_truncated = true;
    }
}

fn walk_value(obj: &Map<String, Value>, path: &mut String, depth: usize, entry: &mut CatalogEntry) {
    for (k, v) in obj {
        let len = path.len();
        path.push('.');
        path.push_str(k);
        let bits = match v {
            Value::Null => json_type::NULL,
            Value::Bool(_) => json_type::BOOLEAN,
            Value::Number(_) => json_type::NUMBER,
            Value::String(_) => json_type::STRING,
            Value::Array(_) => json_type::ARRAY,
            Value::Object(_) => json_type::OBJECT,
        };
        note(entry, path, bits);
        if let Value::Object(inner) = v {
            if depth < DEPTH {
                walk_value(inner, path, depth + 1, entry);
            }
        }
        path.truncate(len);
    }
}

/// The record's top-level map: everything but `payload` is skipped.
struct RecordFields<'e> {
    entry: &'e mut CatalogEntry,
}

impl<'de> Visitor<'de> for RecordFields<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<&str>()? {
            if key == "payload" {
                let mut path = String::from("payload");
                map.next_value_seed(Fields { path: &mut path, depth: 1, entry: &mut *self.entry })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// An object's fields below `path`.
struct Fields<'a> {
    path: &'a mut String,
    depth: usize,
    entry: &'a mut CatalogEntry,
}

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<&str>()? {
            let len = self.path.len();
            self.path.push('.');
            self.path.push_str(key);
            let field = Field { path: &mut *self.path, depth: self.depth, entry: &mut *self.entry };
            map.next_value_seed(field)?;
            self.path.truncate(len);
        }
        Ok(())
    }
}

/// One field's value at `path`: its type is noted, and an object below the depth limit is walked.
struct Field<'a> {
    path: &'a mut String,
    depth: usize,
    entry: &'a mut CatalogEntry,
}

impl Field<'_> {
    fn noted<E>(self, bits: u8) -> Result<(), E> {
        note(self.entry, self.path, bits);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Field<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Field<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.noted(json_type::NULL)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.noted(json_type::NULL)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.noted(json_type::BOOLEAN)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.noted(json_type::NUMBER)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.noted(json_type::NUMBER)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.noted(json_type::NUMBER)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.noted(json_type::STRING)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.noted(json_type::ARRAY)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        note(self.entry, self.path, json_type::OBJECT);
        if self.depth < DEPTH {
            Fields { path: self.path, depth: self.depth + 1, entry: self.entry }.visit_map(map)
        } else {
            let mut map = map;
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use signalops_core::model::EventRecord;

    use super::*;

    fn record(payload: Value) -> EventRecord {
        let Value::Object(payload) = payload else { panic!("payload must be an object") };
        EventRecord {
            id: "e1".into(),
            tenant_id: uuid::Uuid::nil(),
            event_type: "t".into(),
            payload,
            source: Some("s".into()),
            user_id: None,
            session_id: None,
            occurred_at_ms: 1,
            received_at_ms: 2,
            idempotency_key: None,
        }
    }

    #[test]
    fn encoded_and_decoded_payloads_note_the_same_fields() {
        let r = record(json!({
            "amount": 12.5, "n": -3, "big": u64::MAX, "ok": true, "none": null, "card": "4242",
            "tags": ["a", {"x": 1}],
            "a": {"b": {"c": {"d": {"e": 1}, "s": "x"}}, "k": false},
        }));
        let (mut decoded, mut encoded) = (CatalogEntry::default(), CatalogEntry::default());
        note_payload(&r.payload, &mut decoded);
        note_encoded(&rmp_serde::to_vec_named(&r).unwrap(), &mut encoded).unwrap();
        assert_eq!(encoded, decoded);
        let bits = |p: &str| encoded.fields.get(p).copied();
        assert_eq!(bits("payload.amount"), Some(json_type::NUMBER));
        assert_eq!(bits("payload.big"), Some(json_type::NUMBER));
        assert_eq!(bits("payload.none"), Some(json_type::NULL));
        assert_eq!(bits("payload.tags"), Some(json_type::ARRAY));
        assert_eq!(bits("payload.tags.x"), None, "arrays are not walked");
        assert_eq!(bits("payload.a.b.c"), Some(json_type::OBJECT));
        assert_eq!(bits("payload.a.b.c.d"), Some(json_type::OBJECT), "level 4 is noted");
        assert_eq!(bits("payload.a.b.c.d.e"), None, "level 5 is not");
        assert_eq!(bits("source"), None, "only payload fields are catalogued");
    }

    #[test]
    fn the_catalog_stops_at_its_field_limit_either_way() {
        let fields: Map<String, Value> = (0..MAX_CATALOG_FIELDS + 5).map(|i| (format!("f{i:04}"), json!(i))).collect();
        let r = record(Value::Object(fields));
        let (mut decoded, mut encoded) = (CatalogEntry::default(), CatalogEntry::default());
        note_payload(&r.payload, &mut decoded);
        note_encoded(&rmp_serde::to_vec_named(&r).unwrap(), &mut encoded).unwrap();
        assert_eq!(encoded.fields.len(), MAX_CATALOG_FIELDS);
        assert!(encoded.fields_truncated);
        assert_eq!(encoded, decoded);
    }

    #[test]
    fn a_malformed_record_is_an_error() {
        let mut entry = CatalogEntry::default();
        assert!(note_encoded(b"\x93\x01\x02", &mut entry).is_err(), "an array is not a record");
        assert!(note_encoded(&rmp_serde::to_vec_named(&json!({"payload": [1]})).unwrap(), &mut entry).is_err());
    }
}
