//! The module side of ABI v2, used by [`export_rule!`](crate::export_rule) and
//! [`export_notifier!`](crate::export_notifier). Not for direct use.
//!
//! Memory ownership: the host asks `signalops_alloc(len)` for an input buffer and writes the
//! input there; the buffer belongs to the module and is reused by the next call. `evaluate`
//! (or `render`) returns `(ptr << 32) | len` of its output, which stays valid until the
//! module's next call.
//!
//! A rule's config arrives once per instance, through `signalops_configure(slot, ptr, len)`;
//! `evaluate(slot)` then runs the handler with that slot's config, and the handler reads the
//! event through the host.

use std::cell::RefCell;
use std::thread::LocalKey;

use crate::decision::Decision;
use crate::event::Event;
use crate::msgpack::{self, encode, encode_str, Value};
use crate::notification::{Notification, Request};
use crate::RuleConfig;

thread_local! {
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Each configured slot's config, prepared once by [`RuleConfig::from_config`] (or the reason
/// it could not be). [`export_rule!`](crate::export_rule) keeps one table per plugin.
pub type Slots<C> = RefCell<Vec<Option<Result<C, String>>>>;

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

/// Reads the input of `signalops_configure`: `{"abi": 2, "config": map, "rule": map}`; the
/// rule's config (an empty map when it has none).
pub fn read_rule_input(bytes: &[u8]) -> Result<Value, String> {
    let v = msgpack::decode(bytes).map_err(|e| format!("input is not MessagePack: {e}"))?;
    check_abi(&v)?;
    Ok(config_of(&v))
}

/// Runs one `signalops_configure` call: prepares the config for `slot` and keeps it. Returns 0,
/// or 1 (after logging why) when the input cannot be read. A config the plugin refuses is kept
/// as its reason: every call of that slot then fails with it, as the plugin's error.
pub fn configure<C: RuleConfig>(slots: &'static LocalKey<Slots<C>>, slot: i32, len: i32) -> i32 {
    install_panic_hook();
    let config = INPUT.with(|b| {
        let b = b.borrow();
        let n = (len.max(0) as usize).min(b.len());
        read_rule_input(&b[..n])
    });
    match (usize::try_from(slot), config) {
        (Ok(slot), Ok(config)) => {
            let prepared = C::from_config(&config);
            slots.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() <= slot {
                    c.resize_with(slot + 1, || None);
                }
                c[slot] = Some(prepared);
            });
            0
        }
        (_, Err(e)) => {
            crate::host::log(crate::host::Level::Error, &e);
            1
        }
        (Err(_), _) => {
            crate::host::log(crate::host::Level::Error, &format!("negative slot {slot}"));
            1
        }
    }
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
        Some(2) => Ok(()),
        other => Err(format!("input is for ABI {other:?}; this plugin speaks ABI 2")),
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

/// Runs one `evaluate` call for the rule configured in `slot`.
pub fn run_rule<C: RuleConfig>(
    slots: &'static LocalKey<Slots<C>>,
    slot: i32,
    handler: fn(&Event, &C) -> Result<Decision, String>,
) -> i64 {
    // The panic hook was installed by `configure`, which the host calls before any `evaluate`.
    let result = slots.with(|c| {
        let c = c.borrow();
        match usize::try_from(slot).ok().and_then(|s| c.get(s)).and_then(Option::as_ref) {
            Some(Ok(config)) => handler(&Event::current(), config),
            Some(Err(reason)) => Err(reason.clone()),
            None => Err(format!("slot {slot} was never configured")),
        }
    });
    // Most calls skip, or fire toward an open alert: their output is always the same bytes,
    // kept in a static.
    if let Ok(d) = &result {
        if d.is_bare() {
            let out: &[u8] = if d.fires() { &FIRE } else { &SKIP };
            return ((out.as_ptr() as usize as i64) << 32) | out.len() as i64;
        }
    }
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        o.clear();
        encode_result(&result, &mut o);
        ((o.as_ptr() as usize as i64) << 32) | o.len() as i64
    })
}

/// `{"fire": false}`, what [`Decision::skip()`] encodes to.
static SKIP: [u8; 7] = [0x81, 0xa4, b'f', b'i', b'r', b'e', 0xc2];
/// `{"fire": true}`, what [`Decision::fire_plain()`] encodes to.
static FIRE: [u8; 7] = [0x81, 0xa4, b'f', b'i', b'r', b'e', 0xc3];

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static CONFIGS: Slots<Value> = const { RefCell::new(Vec::new()) };
        static PREPARED: Slots<Threshold> = const { RefCell::new(Vec::new()) };
    }

    /// A typed config: a required number.
    struct Threshold(f64);

    impl RuleConfig for Threshold {
        fn from_config(config: &Value) -> Result<Threshold, String> {
            config
                .get("threshold")
                .and_then(Value::as_f64)
                .map(Threshold)
                .ok_or_else(|| "config.threshold is required".into())
        }
    }

    fn threshold(_: &Event, c: &Threshold) -> Result<Decision, String> {
        Ok(Decision::fire(crate::number_text(c.0)))
    }

    fn rule_input(abi: i64, config: Option<Value>) -> Vec<u8> {
        let mut entries = vec![("abi", Value::Int(abi))];
        if let Some(c) = config {
            entries.push(("config", c));
        }
        entries.push(("rule", Value::map(vec![("id", Value::from("r")), ("version", Value::Int(2))])));
        let mut out = Vec::new();
        encode(&Value::map(entries), &mut out);
        out
    }

    /// Hands `bytes` to `signalops_configure` for `slot` of a plugin whose slots are `slots`.
    fn configure_in<C: RuleConfig>(slots: &'static LocalKey<Slots<C>>, slot: i32, bytes: &[u8]) -> i32 {
        let ptr = input_buffer(bytes.len() as i32);
        INPUT.with(|b| b.borrow_mut().copy_from_slice(bytes));
        assert_ne!(ptr, 0);
        configure(slots, slot, bytes.len() as i32)
    }

    fn configure_with(slot: i32, bytes: &[u8]) -> i32 {
        configure_in(&CONFIGS, slot, bytes)
    }

    /// Echoes the slot's config back as the decision's title.
    fn echo(_: &Event, config: &Value) -> Result<Decision, String> {
        Ok(Decision::fire(config.to_json()))
    }

    fn output_of(packed: i64) -> Value {
        let len = (packed & 0xffff_ffff) as usize;
        OUTPUT.with(|o| {
            let o = o.borrow();
            msgpack::decode(&o[..len]).unwrap()
        })
    }

    #[test]
    fn each_slot_keeps_its_own_config() {
        let a = Value::map(vec![("threshold", Value::Int(5))]);
        let b = Value::map(vec![("threshold", Value::Int(7))]);
        assert_eq!(configure_with(0, &rule_input(2, Some(a))), 0);
        assert_eq!(configure_with(3, &rule_input(2, Some(b))), 0);
        assert_eq!(configure_with(1, &rule_input(2, Some(Value::Nil))), 0);
        let title =
            |slot| output_of(run_rule(&CONFIGS, slot, echo)).get("title").and_then(Value::as_str).map(str::to_string);
        assert_eq!(title(0).as_deref(), Some("{\"threshold\":5}"));
        assert_eq!(title(3).as_deref(), Some("{\"threshold\":7}"));
        assert_eq!(title(1).as_deref(), Some("{}"), "no config is an empty map");
        // Slot 2 was never configured: the call fails as the plugin's error.
        let out = output_of(run_rule(&CONFIGS, 2, echo));
        assert_eq!(out.get("error").and_then(Value::as_str), Some("slot 2 was never configured"));
        // Reconfiguring a slot replaces its config.
        assert_eq!(configure_with(0, &rule_input(2, Some(Value::map(vec![("x", Value::Bool(true))])))), 0);
        assert_eq!(title(0).as_deref(), Some("{\"x\":true}"));
    }

    /// A typed config is prepared once per slot; one the plugin refuses fails each call of its
    /// slot with the reason.
    #[test]
    fn typed_configs_are_prepared_per_slot() {
        let configure_typed = |slot, config| configure_in(&PREPARED, slot, &rule_input(2, config));
        assert_eq!(configure_typed(0, Some(Value::map(vec![("threshold", Value::Float(2.5))]))), 0);
        assert_eq!(configure_typed(1, Some(Value::Map(Vec::new()))), 0);
        let out = |slot| output_of(run_rule(&PREPARED, slot, threshold));
        assert_eq!(out(0).get("title").and_then(Value::as_str), Some("2.5"));
        assert_eq!(out(1).get("error").and_then(Value::as_str), Some("config.threshold is required"));
    }

    #[test]
    fn bare_decisions_answer_static_bytes() {
        for (decision, bytes) in [(Decision::skip(), &SKIP), (Decision::fire_plain(), &FIRE)] {
            let mut out = Vec::new();
            decision.encode(&mut out);
            assert_eq!(&out, bytes);
        }
        fn skip(_: &Event, _: &Value) -> Result<Decision, String> {
            Ok(Decision::skip())
        }
        fn plain(_: &Event, _: &Value) -> Result<Decision, String> {
            Ok(Decision::fire_plain())
        }
        fn titled(_: &Event, _: &Value) -> Result<Decision, String> {
            Ok(Decision::fire("t"))
        }
        assert_eq!(configure_with(5, &rule_input(2, None)), 0);
        // (On wasm32 the high half is the address; natively the packing only keeps its low bits.)
        assert_eq!(run_rule(&CONFIGS, 5, skip), ((SKIP.as_ptr() as usize as i64) << 32) | 7);
        assert_eq!(run_rule(&CONFIGS, 5, plain), ((FIRE.as_ptr() as usize as i64) << 32) | 7);
        assert_eq!(output_of(run_rule(&CONFIGS, 5, titled)).get("title").and_then(Value::as_str), Some("t"));
    }

    #[test]
    fn configure_refuses_other_versions_and_garbage() {
        assert_eq!(configure_with(0, &rule_input(1, None)), 1);
        assert_eq!(configure_with(0, &[0xc1]), 1);
        assert_eq!(configure_with(-1, &rule_input(2, None)), 1);
    }
}
