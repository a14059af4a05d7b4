//! The module side of ABI v1, used by [`export_rule!`](crate::export_rule) and
//! [`export_notifier!`](crate::export_notifier). Not for direct use.
//!
//! Memory ownership: the host asks `signalops_alloc(len)` for an input buffer and writes the
//! input there; the buffer belongs to the module and is reused by the next call. `evaluate`
//! (or `render`) returns `(ptr << 32) | len` of its output, which stays valid until the module's next call.

use std::cell::RefCell;

use crate::decision::Decision;
use crate::event::Event;
use crate::msgpack::{self, encode, encode_str, Value};
use crate::notification::{Notification, Request};

thread_local! {
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The event of the current call, decoded over the previous call's (see [`read_call`]).
    static EVENT: RefCell<Event> = RefCell::new(Event::new("", Value::Map(Vec::new())));
    /// The last config seen: its bytes and its decoded value. A rule's config is the same on
    /// every call, so it is decoded once.
    static CONFIG: RefCell<(Vec<u8>, Value)> = const { RefCell::new((Vec::new(), Value::Nil)) };
}

/// Makes the input buffer `len` bytes long and returns where it starts (0 for a negative
/// length).
pub fn input_buffer(len: i32) -> i32 {
    if len < 0 {
        return 0;
    }
    INPUT.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        b.resize(len as usize, 0);
        b.as_mut_ptr() as usize as i32
    })
}

/// A panic aborts the call (the host sees a trap); the hook first logs its message so the
/// plugin's test results and last error say what happened.
fn install_panic_hook() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            crate::host::log(crate::host::Level::Error, &format!("plugin panicked: {info}"));
        }))
    });
}

/// Reads an ABI v1 input map into `event` and `config`, reusing their allocations: strings
/// and payload maps are overwritten in place, and a config whose bytes equal `config.0` is not
/// decoded again. Nothing is allocated per call in the steady state.
pub fn read_call(bytes: &[u8], event: &mut Event, config: &mut (Vec<u8>, Value)) -> Result<(), String> {
    let bad = |e: msgpack::DecodeError| format!("input is not MessagePack: {e}");
    let mut r = msgpack::Reader { buf: bytes, pos: 0 };
    let entries = r.read_map_len().map_err(bad)?.ok_or("input is not a map")?;
    let (mut abi, mut have_event, mut have_config) = (None, false, false);
    for _ in 0..entries {
        let key = r.read_str().map_err(bad)?;
        match key {
            Some("abi") => {
                let mut v = Value::Nil;
                r.value_into(1, &mut v).map_err(bad)?;
                abi = v.as_i64();
            }
            Some("event") => have_event = read_event(&mut r, event).map_err(bad)?,
            Some("config") => {
                let start = r.pos;
                r.skip(1).map_err(bad)?;
                let raw = &bytes[start..r.pos];
                if raw != config.0.as_slice() {
                    config.0.clear();
                    config.0.extend_from_slice(raw);
                    config.1 = match msgpack::decode(raw).map_err(bad)? {
                        Value::Nil => Value::Map(Vec::new()),
                        v => v,
                    };
                }
                have_config = true;
            }
            _ => r.skip(1).map_err(bad)?,
        }
    }
    if r.pos != bytes.len() {
        return Err(bad(msgpack::DecodeError::Trailing));
    }
    if abi != Some(1) {
        return Err(format!("input is for ABI {abi:?}; this plugin speaks ABI 1"));
    }
    if !have_event {
        return Err("input has no valid `event`".to_string());
    }
    if !have_config {
        config.0.clear();
        config.1 = Value::Map(Vec::new());
    }
    Ok(())
}

/// Reads the `event` map into `ev`; false when a required member is missing or mistyped.
fn read_event(r: &mut msgpack::Reader<'_>, ev: &mut Event) -> Result<bool, msgpack::DecodeError> {
    let n = match r.read_map_len()? {
        Some(n) => n,
        None => return Ok(false),
    };
    let mut seen = 0u8;
    let mut tmp = Value::Nil;
    for _ in 0..n {
        let key = r.read_str()?;
        let (field, bit): (Option<&mut String>, u8) = match key {
            Some("id") => (Some(&mut ev.id), 1),
            Some("tenant_id") => (Some(&mut ev.tenant_id), 2),
            Some("type") => (Some(&mut ev.event_type), 4),
            _ => (None, 0),
        };
        if let Some(field) = field {
            if let Some(s) = r.read_str()? {
                field.clear();
                field.push_str(s);
                seen |= bit;
            }
            continue;
        }
        match key {
            Some("source") => read_opt_str(r, &mut ev.source)?,
            Some("user_id") => read_opt_str(r, &mut ev.user_id)?,
            Some("session_id") => read_opt_str(r, &mut ev.session_id)?,
            Some("occurred_at_ms") | Some("received_at_ms") => {
                r.value_into(2, &mut tmp)?;
                if let Some(t) = tmp.as_i64() {
                    if key == Some("occurred_at_ms") {
                        ev.occurred_at_ms = t;
                        seen |= 8;
                    } else {
                        ev.received_at_ms = t;
                        seen |= 16;
                    }
                }
            }
            Some("payload") => {
                r.value_into(2, &mut ev.payload)?;
                seen |= 32;
            }
            _ => r.skip(2)?,
        }
    }
    if seen & 32 == 0 {
        ev.payload = Value::Map(Vec::new());
    }
    Ok(seen & 31 == 31)
}

fn read_opt_str(r: &mut msgpack::Reader<'_>, slot: &mut Option<String>) -> Result<(), msgpack::DecodeError> {
    match r.read_str()? {
        Some(s) => match slot {
            Some(old) => {
                old.clear();
                old.push_str(s);
            }
            None => *slot = Some(s.to_string()),
        },
        None => *slot = None,
    }
    Ok(())
}

/// Encodes a handler's result: the decision map, or `{"error": message}`.
pub fn encode_result(result: &Result<Decision, String>, out: &mut Vec<u8>) {
    match result {
        Ok(d) => d.encode(out),
        Err(msg) => {
            out.push(0x81);
            encode_str("error", out);
            encode(&Value::Str(msg.clone()), out);
        }
    }
}

fn check_abi(v: &Value) -> Result<(), String> {
    match v.get("abi").and_then(Value::as_i64) {
        Some(1) => Ok(()),
        other => Err(format!("input is for ABI {other:?}; this plugin speaks ABI 1")),
    }
}

fn config_of(v: &Value) -> Value {
    match v.get("config") {
        None | Some(Value::Nil) => Value::Map(Vec::new()),
        Some(c) => c.clone(),
    }
}

/// Reads the input map of a notifier's `render`.
pub fn parse_notification(bytes: &[u8]) -> Result<(Notification, Value), String> {
    let v = msgpack::decode(bytes).map_err(|e| format!("input is not MessagePack: {e}"))?;
    check_abi(&v)?;
    let n = Notification::from_value(&v).ok_or("input has no valid notification")?;
    Ok((n, config_of(&v)))
}

/// Runs one `render` call.
pub fn run_notifier(_ptr: i32, len: i32, handler: fn(&Notification, &Value) -> Result<Request, String>) -> i64 {
    install_panic_hook();
    let result = INPUT.with(|b| {
        let b = b.borrow();
        let n = (len.max(0) as usize).min(b.len());
        parse_notification(&b[..n])
    });
    let result = result.and_then(|(n, config)| handler(&n, &config));
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        o.clear();
        match &result {
            Ok(req) => encode(&req.to_value(), &mut o),
            Err(msg) => {
                o.push(0x81);
                encode_str("error", &mut o);
                encode(&Value::Str(msg.clone()), &mut o);
            }
        }
        ((o.as_ptr() as usize as i64) << 32) | o.len() as i64
    })
}

/// Runs one `evaluate` call.
pub fn run_rule(_ptr: i32, len: i32, handler: fn(&Event, &Value) -> Result<Decision, String>) -> i64 {
    install_panic_hook();
    let result = EVENT.with(|event| {
        CONFIG.with(|config| {
            let (mut event, mut config) = (event.borrow_mut(), config.borrow_mut());
            INPUT.with(|b| {
                let b = b.borrow();
                let n = (len.max(0) as usize).min(b.len());
                read_call(&b[..n], &mut event, &mut config)
            })?;
            handler(&event, &config.1)
        })
    });
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        o.clear();
        encode_result(&result, &mut o);
        ((o.as_ptr() as usize as i64) << 32) | o.len() as i64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference reader: the whole input decoded into a fresh tree.
    struct Input {
        event: Event,
        config: Value,
    }

    fn parse_input(bytes: &[u8]) -> Result<Input, String> {
        let v = msgpack::decode(bytes).map_err(|e| format!("input is not MessagePack: {e}"))?;
        check_abi(&v)?;
        let event = v.get("event").and_then(Event::from_value).ok_or("input has no valid `event`")?;
        Ok(Input { event, config: config_of(&v) })
    }

    fn input(event: Value, config: Option<Value>) -> Vec<u8> {
        let mut entries = vec![("abi", Value::Int(1)), ("event", event)];
        if let Some(c) = config {
            entries.push(("config", c));
        }
        entries.push(("rule", Value::map(vec![("id", Value::from("r")), ("version", Value::Int(2))])));
        let mut out = Vec::new();
        encode(&Value::map(entries), &mut out);
        out
    }

    fn event(id: &str, source: Option<&str>, payload: Value) -> Value {
        Value::map(vec![
            ("id", Value::from(id)),
            ("tenant_id", Value::from("t")),
            ("type", Value::from("payment.failed")),
            ("source", source.map_or(Value::Nil, Value::from)),
            ("user_id", Value::Nil),
            ("session_id", Value::from("s")),
            ("occurred_at_ms", Value::Int(1_700_000_000_000)),
            ("received_at_ms", Value::Int(1_700_000_000_001)),
            ("payload", payload),
        ])
    }

    #[test]
    fn reading_in_place_gives_what_a_fresh_decode_gives() {
        let calls = [
            input(event("a", Some("web"), Value::map(vec![("amount", Value::Float(10.5))])), None),
            input(
                event("b", None, Value::map(vec![("amount", Value::Int(7)), ("card", Value::from("4242"))])),
                Some(Value::map(vec![("threshold", Value::Int(5))])),
            ),
            input(event("c", Some("api"), Value::Map(vec![])), Some(Value::map(vec![("threshold", Value::Int(5))]))),
            input(event("d", None, Value::map(vec![("x", Value::Array(vec![Value::Nil]))])), Some(Value::Nil)),
        ];
        let mut ev = Event::new("", Value::Nil);
        let mut config = (Vec::new(), Value::Nil);
        for bytes in &calls {
            let fresh = parse_input(bytes).unwrap();
            read_call(bytes, &mut ev, &mut config).unwrap();
            assert_eq!(ev, fresh.event);
            assert_eq!(config.1, fresh.config);
        }
    }

    #[test]
    fn reading_in_place_refuses_what_parse_input_refuses() {
        let mut ev = Event::new("", Value::Nil);
        let mut config = (Vec::new(), Value::Nil);
        let no_type = Value::map(vec![("id", Value::from("a")), ("tenant_id", Value::from("t"))]);
        let mut v2 = Vec::new();
        encode(&Value::map(vec![("abi", Value::Int(2)), ("event", event("a", None, Value::Nil))]), &mut v2);
        let mut trailing = input(event("a", None, Value::Nil), None);
        trailing.push(0xc0);
        for bad in [input(no_type, None), v2, trailing, vec![0x81, 0xa3, b'a'], vec![0xc1]] {
            assert!(parse_input(&bad).is_err());
            assert!(read_call(&bad, &mut ev, &mut config).is_err(), "{bad:?}");
        }
    }
}
