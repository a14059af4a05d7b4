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

/// What the handler's input decodes to.
pub struct Input {
    pub event: Event,
    pub config: Value,
}

/// Reads an ABI v1 input map.
pub fn parse_input(bytes: &[u8]) -> Result<Input, String> {
    let v = msgpack::decode(bytes).map_err(|e| format!("input is not MessagePack: {e}"))?;
    check_abi(&v)?;
    let event = v.get("event").and_then(Event::from_value).ok_or("input has no valid `event`")?;
    Ok(Input { event, config: config_of(&v) })
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
    let result = INPUT.with(|b| {
        let b = b.borrow();
        let n = (len.max(0) as usize).min(b.len());
        parse_input(&b[..n])
    });
    let result = result.and_then(|input| handler(&input.event, &input.config));
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        o.clear();
        encode_result(&result, &mut o);
        ((o.as_ptr() as usize as i64) << 32) | o.len() as i64
    })
}
