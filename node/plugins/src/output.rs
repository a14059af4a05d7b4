//! Reading a rule plugin's output map, and its detail fields.
//!
//! The output is read by hand over the MessagePack bytes: a firing decision is read on every
//! alert, and going through serde cost more than the rest of the host's work on the call.
//!
//! Detail fields are kept as the MessagePack map the module wrote, checked when the call
//! returns, and decoded into JSON only when an alert takes them: most events a grouped plugin
//! rule fires on fold into an alert that is already open for their group, and their fields are
//! never shown.

use std::collections::BTreeMap;
use std::fmt;

use rmp::Marker;
use serde::Serialize;
use serde_json::{Map, Value};

use signalops_core::alert::Severity;

/// Most characters in a decision's title.
pub const MAX_TITLE_CHARS: usize = 1024;
/// Most labels on a decision.
pub const MAX_LABELS: usize = 32;
/// Deepest nesting of a field value.
const MAX_DEPTH: u32 = 64;

/// The `fields` member of a decision: a MessagePack map with string keys whose values JSON can
/// hold (checked when the call returned). Empty when there are none.
#[derive(Clone, Default, PartialEq)]
pub struct Fields(Vec<u8>);

impl Fields {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields as JSON.
    pub fn to_map(&self) -> Map<String, Value> {
        if self.0.is_empty() {
            return Map::new();
        }
        // The shape was checked when the call returned, so this does not fail; if it ever
        // did, the alert would go without details rather than not at all.
        rmp_serde::from_slice(&self.0).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a plugin decision's fields do not decode");
            Map::new()
        })
    }
}

impl Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(s)
    }
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_map().fmt(f)
    }
}

/// A decision map as read, before the runtime turns it into a `Decision` or a failure.
#[derive(Debug, Default, PartialEq)]
pub struct Output {
    pub fire: Option<bool>,
    pub severity: Option<Severity>,
    pub title: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub fields: Fields,
    pub error: Option<String>,
}

/// Reads an output map: `{"fire", "severity"?, "title"?, "labels"?, "fields"?}` or
/// `{"error"}`; other members are skipped, and nil reads as absent. The error says what is
/// wrong, for the call's `bad_output` failure.
pub fn read_output(bytes: &[u8]) -> Result<Output, String> {
    let mut rd = bytes;
    let n = map_len(&mut rd)?.ok_or("the output is not a map")?;
    let mut out = Output::default();
    let mut seen = [false; 6];
    for _ in 0..n {
        // Keys are matched as bytes: a known key is valid UTF-8, and others are skipped.
        let key = bytes_of(&mut rd)?.ok_or("a key of the output map is not a string")?;
        let slot = match key {
            b"fire" => 0,
            b"severity" => 1,
            b"title" => 2,
            b"labels" => 3,
            b"fields" => 4,
            b"error" => 5,
            _ => {
                skip(&mut rd, false, 0)?;
                continue;
            }
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(format!("duplicate member `{}`", String::from_utf8_lossy(key)));
        }
        if rd.first() == Some(&0xc0) {
            rd = &rd[1..];
            continue;
        }
        match slot {
            0 => {
                out.fire = Some(match take(&mut rd, 1)? {
                    [0xc2] => false,
                    [0xc3] => true,
                    _ => return Err("`fire` is not a boolean".into()),
                })
            }
            1 => {
                let s = str_of(&mut rd)?.ok_or("`severity` is not a string")?;
                out.severity =
                    Some(Severity::from_name(s).ok_or_else(|| format!("`severity` {s:?} is not a severity"))?);
            }
            2 => {
                let t = str_of(&mut rd)?.ok_or("`title` is not a string")?;
                if t.len() > MAX_TITLE_CHARS && t.chars().count() > MAX_TITLE_CHARS {
                    return Err(format!("`title` is longer than {MAX_TITLE_CHARS} characters"));
                }
                out.title = Some(t.to_owned());
            }
            3 => {
                let n = map_len(&mut rd)?.ok_or("`labels` is not a map")?;
                if n > MAX_LABELS {
                    return Err(format!("more than {MAX_LABELS} labels"));
                }
                for _ in 0..n {
                    let k = str_of(&mut rd)?.ok_or("a label name is not a string")?;
                    let v = str_of(&mut rd)?.ok_or_else(|| format!("label `{k}` is not a string"))?;
                    out.labels.insert(k.to_owned(), v.to_owned());
                }
            }
            4 => {
                let start = rd;
                if !matches!(start.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
                    return Err("`fields` is not a map".into());
                }
                skip(&mut rd, true, 0).map_err(|e| format!("`fields`: {e}"))?;
                let raw = &start[..start.len() - rd.len()];
                if raw != [0x80] {
                    out.fields = Fields(raw.to_vec());
                }
            }
            _ => out.error = Some(str_of(&mut rd)?.ok_or("`error` is not a string")?.to_owned()),
        }
    }
    Ok(out)
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if rd.len() < n {
        return Err("the output ends early".into());
    }
    let (head, rest) = rd.split_at(n);
    *rd = rest;
    Ok(head)
}

/// A big-endian length.
fn be(bytes: &[u8]) -> usize {
    bytes.iter().fold(0usize, |n, b| (n << 8) | *b as usize)
}

/// A map header's length; `None` (nothing read) when the next value is not a map.
fn map_len(rd: &mut &[u8]) -> Result<Option<usize>, String> {
    let n = match rd.first().copied() {
        Some(m @ 0x80..=0x8f) => {
            *rd = &rd[1..];
            (m & 0x0f) as usize
        }
        Some(m @ (0xde | 0xdf)) => {
            take(rd, 1)?;
            be(take(rd, if m == 0xde { 2 } else { 4 })?)
        }
        _ => return Ok(None),
    };
    Ok(Some(n))
}

/// A string, checked to be UTF-8; `None` (nothing read) when the next value is not a string.
fn str_of<'a>(rd: &mut &'a [u8]) -> Result<Option<&'a str>, String> {
    match bytes_of(rd)? {
        Some(b) => std::str::from_utf8(b).map(Some).map_err(|_| "a string is not UTF-8".into()),
        None => Ok(None),
    }
}

/// A string's bytes, unchecked; `None` (nothing read) when the next value is not a string.
fn bytes_of<'a>(rd: &mut &'a [u8]) -> Result<Option<&'a [u8]>, String> {
    let n = match rd.first().copied() {
        Some(m @ 0xa0..=0xbf) => {
            *rd = &rd[1..];
            (m & 0x1f) as usize
        }
        Some(m @ 0xd9..=0xdb) => {
            take(rd, 1)?;
            be(take(rd, 1 << (m - 0xd9))?)
        }
        _ => return Ok(None),
    };
    take(rd, n).map(Some)
}

/// Skips one value. With `json`, only what a JSON value can hold passes: map keys are
/// strings (and every string is UTF-8), and there are no byte strings or extension types.
fn skip(rd: &mut &[u8], json: bool, depth: u32) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH}"));
    }
    if matches!(rd.first(), Some(0xa0..=0xbf | 0xd9..=0xdb)) {
        return if json { str_of(rd).map(drop) } else { bytes_of(rd).map(drop) };
    }
    let m = Marker::from_u8(take(rd, 1)?[0]);
    let (len, items) = match m {
        Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => (0, 0),
        Marker::U8 | Marker::I8 => (1, 0),
        Marker::U16 | Marker::I16 => (2, 0),
        Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
        Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
        Marker::FixArray(n) => (0, n as usize),
        Marker::Array16 => (0, be(take(rd, 2)?)),
        Marker::Array32 => (0, be(take(rd, 4)?)),
        Marker::FixMap(n) => (0, 2 * n as usize),
        Marker::Map16 => (0, 2 * be(take(rd, 2)?)),
        Marker::Map32 => (0, 2 * be(take(rd, 4)?)),
        Marker::Reserved => return Err("a reserved MessagePack marker".into()),
        _ if json => return Err("a value JSON cannot hold (bytes or an extension type)".into()),
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => (be(take(rd, 1 << (m.to_u8() - 0xc4))?), 0),
        Marker::FixExt1 => (2, 0),
        Marker::FixExt2 => (3, 0),
        Marker::FixExt4 => (5, 0),
        Marker::FixExt8 => (9, 0),
        Marker::FixExt16 => (17, 0),
        Marker::Ext8 | Marker::Ext16 | Marker::Ext32 => (1 + be(take(rd, 1 << (m.to_u8() - 0xc7))?), 0),
        // Strings were read above.
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => (0, 0),
    };
    take(rd, len)?;
    let is_map = matches!(m, Marker::FixMap(_) | Marker::Map16 | Marker::Map32);
    for i in 0..items {
        if json && is_map && i % 2 == 0 {
            str_of(rd)?.ok_or("a map key is not a string")?;
        } else {
            skip(rd, json, depth + 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn output(fields: &Value) -> Vec<u8> {
        rmp_serde::to_vec_named(&json!({"fire": true, "title": "t", "fields": fields, "labels": {"a": "b"}})).unwrap()
    }

    /// `{"fire": true, "fields": <what write adds>}`.
    fn with_fields(write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, 2).unwrap();
        rmp::encode::write_str(&mut out, "fire").unwrap();
        rmp::encode::write_bool(&mut out, true).unwrap();
        rmp::encode::write_str(&mut out, "fields").unwrap();
        write(&mut out);
        out
    }

    #[test]
    fn an_output_reads_as_its_members() {
        let o = read_output(&output(&json!({"n": 1}))).unwrap();
        assert_eq!(
            (o.fire, o.title.as_deref(), o.labels.get("a").map(String::as_str)),
            (Some(true), Some("t"), Some("b"))
        );
        // Unknown members are skipped, whatever they hold; nil reads as absent.
        let mut bytes = rmp_serde::to_vec_named(
            &json!({"fire": false, "severity": "critical", "x": [1, {"y": [1.5, -7, 300, 70000, 5_000_000_000i64]}],
                    "error": null, "title": null}),
        )
        .unwrap();
        bytes[0] += 1;
        rmp::encode::write_str(&mut bytes, "raw").unwrap();
        rmp::encode::write_ext_meta(&mut bytes, 3, 1).unwrap();
        bytes.extend_from_slice(b"abc");
        let o = read_output(&bytes).unwrap();
        assert_eq!((o.fire, o.severity, o.title, o.error), (Some(false), Some(Severity::Critical), None, None));
        let o = read_output(&rmp_serde::to_vec_named(&json!({"error": "no card"})).unwrap()).unwrap();
        assert_eq!((o.fire, o.error.as_deref()), (None, Some("no card")));
    }

    #[test]
    fn fields_decode_to_what_the_module_wrote() {
        let fields = json!({"amount": 1000.5, "n": -3, "big": u64::MAX, "s": "x", "ok": true, "none": null,
                            "list": [1, "a", {"k": [null]}], "nested": {"a": {"b": 1}}, "long": "y".repeat(300)});
        let f = read_output(&output(&fields)).unwrap().fields;
        assert_eq!(Value::Object(f.to_map()), fields);
        assert_eq!(serde_json::to_value(&f).unwrap(), fields);
        for empty in [json!({}), Value::Null] {
            assert!(read_output(&output(&empty)).unwrap().fields.is_empty(), "{empty}");
        }
        let f32 = with_fields(|o| {
            rmp::encode::write_map_len(o, 1).unwrap();
            rmp::encode::write_str(o, "h").unwrap();
            rmp::encode::write_f32(o, 0.25).unwrap();
        });
        assert_eq!(Value::Object(read_output(&f32).unwrap().fields.to_map()), json!({"h": 0.25}));
    }

    #[test]
    fn bad_outputs_say_what_is_wrong() {
        let key = |o: &mut Vec<u8>| {
            rmp::encode::write_map_len(o, 1).unwrap();
            rmp::encode::write_str(o, "b").unwrap();
        };
        let bad = [
            (rmp_serde::to_vec(&json!([1])).unwrap(), "not a map"),
            (rmp_serde::to_vec_named(&json!({"fire": 1})).unwrap(), "`fire` is not a boolean"),
            (rmp_serde::to_vec_named(&json!({"severity": "loud"})).unwrap(), "not a severity"),
            (rmp_serde::to_vec_named(&json!({"title": "x".repeat(1025)})).unwrap(), "longer than 1024"),
            (rmp_serde::to_vec_named(&json!({"labels": {"a": 1}})).unwrap(), "label `a` is not a string"),
            (output(&json!([1, 2])), "`fields` is not a map"),
            (output(&json!("x")), "`fields` is not a map"),
            (
                with_fields(|o| {
                    rmp::encode::write_map_len(o, 1).unwrap();
                    rmp::encode::write_uint(o, 1).unwrap();
                    rmp::encode::write_str(o, "x").unwrap();
                }),
                "key is not a string",
            ),
            (
                with_fields(|o| {
                    key(o);
                    rmp::encode::write_bin(o, b"raw").unwrap();
                }),
                "JSON cannot hold",
            ),
            (
                with_fields(|o| {
                    key(o);
                    rmp::encode::write_str_len(o, 2).unwrap();
                    o.extend_from_slice(&[0xff, 0xfe]);
                }),
                "not UTF-8",
            ),
            (
                with_fields(|o| {
                    key(o);
                    rmp::encode::write_array_len(o, 3).unwrap();
                }),
                "ends early",
            ),
            (
                with_fields(|o| {
                    key(o);
                    for _ in 0..100 {
                        rmp::encode::write_array_len(o, 1).unwrap();
                    }
                    o.push(0xc0);
                }),
                "nested deeper",
            ),
            (
                {
                    let mut o = rmp_serde::to_vec_named(&json!({"fire": true})).unwrap();
                    o[0] = 0x82;
                    o.extend_from_slice(&o.clone()[1..]);
                    o
                },
                "duplicate member `fire`",
            ),
        ];
        for (bytes, want) in bad {
            let e = read_output(&bytes).unwrap_err();
            assert!(e.contains(want), "{e:?} does not say {want:?}");
        }
    }
}
