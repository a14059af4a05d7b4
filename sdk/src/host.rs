//! Helpers the node provides to plugins (the `signalops_v2` import module).
//!
//! Window counters and key-value state belong to the tenant and the rule that runs the plugin:
//! two rules using the same plugin, or two tenants, never see each other's. Changes a call makes
//! are kept only if the call succeeds (returns a decision); after a trap, a limit or an `Err`,
//! they are rolled back. Each event is evaluated once per rule, including across node restarts.
//!
//! Compiled for a native target (a plugin's own unit tests), the same helpers run against an
//! in-process emulation with the same semantics; [`testing`] resets and inspects it.

/// Longest key, in bytes, of a window counter or a state entry.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest state value, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Longest window, in seconds.
pub const MAX_WINDOW_SECONDS: u32 = 3600;

/// Why a helper refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// A key or value too long, or a window length out of range.
    Invalid,
    /// The rule holds as many keys as the node allows.
    Full,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::Invalid => write!(f, "key, value or window length out of range"),
            HostError::Full => write!(f, "the rule's state is full"),
        }
    }
}

fn status(code: i64) -> Result<i64, HostError> {
    match code {
        -1 => Err(HostError::Invalid),
        c if c < 0 => Err(HostError::Full),
        c => Ok(c),
    }
}

/// Log levels of [`log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
}

/// Writes a log line. Lines appear in plugin test results and the node's log; the node keeps a
/// bounded number per call.
pub fn log(level: Level, message: &str) {
    imp::log(level as i32, message.as_bytes())
}

pub fn info(message: &str) {
    log(Level::Info, message)
}

pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// The event's time in milliseconds (its `occurred_at`, capped by the node's allowance for
/// producer clocks running ahead). The only clock plugins have, so decisions replay exactly.
pub fn now_ms() -> i64 {
    imp::now_ms()
}

/// Whether the rule already has an alert open for this event's group that a firing decision
/// would only count toward: its title, severity, labels and fields would not be used. A plugin
/// that builds costly alert text can then answer [`Decision::fire_plain`](crate::Decision::fire_plain).
/// Always false in plugin test runs (no rule is behind them) and during `configure`.
pub fn alert_open() -> bool {
    imp::alert_open() == 1
}

/// Adds `delta` (zero or more) to the sliding-window counter `key` at the event's time, and
/// returns the counter's sum over the last `seconds` seconds (including this addition).
pub fn window_add(key: &str, seconds: u32, delta: i64) -> Result<i64, HostError> {
    status(imp::window_add(key.as_bytes(), seconds as i32, delta))
}

/// The sum of the sliding-window counter `key` over the last `seconds` seconds.
pub fn window_sum(key: &str, seconds: u32) -> Result<i64, HostError> {
    status(imp::window_sum(key.as_bytes(), seconds as i32))
}

/// The state value stored under `key`.
pub fn state_get(key: &str) -> Option<Vec<u8>> {
    imp::state_get(key.as_bytes())
}

/// Stores `value` under `key`.
pub fn state_set(key: &str, value: &[u8]) -> Result<(), HostError> {
    status(imp::state_set(key.as_bytes(), value) as i64).map(|_| ())
}

/// Removes `key`; tells whether it was there.
pub fn state_delete(key: &str) -> bool {
    imp::state_delete(key.as_bytes()) == 1
}

/// The value at `path` in the call's event map (see [`Event`](crate::Event)).
pub(crate) fn event_get(path: &str) -> Option<crate::Value> {
    imp::event_get(path.as_bytes(), |bytes| crate::msgpack::decode(bytes).ok())?
}

/// Hands the MessagePack encoding of the value at `path` to `f` (no copy out of the SDK's
/// read buffer); `None` when there is no value.
pub(crate) fn event_get_with<R>(path: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    imp::event_get(path.as_bytes(), f)
}

/// The number at `path` in the call's event map.
pub(crate) fn event_number(path: &str) -> Option<f64> {
    let n = imp::event_number(path.as_bytes());
    if n.is_nan() {
        None
    } else {
        Some(n)
    }
}

/// Calls a host function that copies a value of unknown length into `buf` and returns its
/// length (`-1`: no value); grows the buffer and calls again when the value did not fit.
/// Leaves the value in `buf`; false when there is none.
#[cfg(target_arch = "wasm32")]
fn read_value(buf: &mut Vec<u8>, mut call: impl FnMut(&mut Vec<u8>) -> i32) -> bool {
    buf.clear();
    loop {
        let n = call(buf);
        if n < 0 {
            return false;
        }
        let n = n as usize;
        if n <= buf.capacity() {
            // The host wrote `n` bytes into the buffer.
            unsafe { buf.set_len(n) };
            return true;
        }
        buf.reserve_exact(n);
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    #[link(wasm_import_module = "signalops_v2")]
    extern "C" {
        #[link_name = "event_get"]
        fn host_event_get(path_ptr: i32, path_len: i32, out_ptr: i32, out_cap: i32) -> i32;
        #[link_name = "event_number"]
        fn host_event_number(path_ptr: i32, path_len: i32) -> f64;
        #[link_name = "log"]
        fn host_log(level: i32, ptr: i32, len: i32);
        #[link_name = "now_ms"]
        fn host_now_ms() -> i64;
        #[link_name = "window_add"]
        fn host_window_add(key_ptr: i32, key_len: i32, seconds: i32, delta: i64) -> i64;
        #[link_name = "window_sum"]
        fn host_window_sum(key_ptr: i32, key_len: i32, seconds: i32) -> i64;
        #[link_name = "state_get"]
        fn host_state_get(key_ptr: i32, key_len: i32, out_ptr: i32, out_cap: i32) -> i32;
        #[link_name = "state_set"]
        fn host_state_set(key_ptr: i32, key_len: i32, val_ptr: i32, val_len: i32) -> i32;
        #[link_name = "state_delete"]
        fn host_state_delete(key_ptr: i32, key_len: i32) -> i32;
        #[link_name = "alert_open"]
        fn host_alert_open() -> i32;
    }

    pub fn alert_open() -> i32 {
        unsafe { host_alert_open() }
    }

    pub fn log(level: i32, msg: &[u8]) {
        unsafe { host_log(level, msg.as_ptr() as i32, msg.len() as i32) }
    }

    pub fn now_ms() -> i64 {
        unsafe { host_now_ms() }
    }

    pub fn window_add(key: &[u8], seconds: i32, delta: i64) -> i64 {
        unsafe { host_window_add(key.as_ptr() as i32, key.len() as i32, seconds, delta) }
    }

    pub fn window_sum(key: &[u8], seconds: i32) -> i64 {
        unsafe { host_window_sum(key.as_ptr() as i32, key.len() as i32, seconds) }
    }

    thread_local! {
        /// Where `event_get` copies values; kept from call to call.
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(256));
    }

    /// Reads the value at `path` into the scratch buffer and hands it to `f`.
    pub fn event_get<R>(path: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        SCRATCH.with(|s| {
            let mut buf = s.borrow_mut();
            let found = super::read_value(&mut buf, |buf| unsafe {
                host_event_get(path.as_ptr() as i32, path.len() as i32, buf.as_mut_ptr() as i32, buf.capacity() as i32)
            });
            if found {
                Some(f(&buf))
            } else {
                None
            }
        })
    }

    pub fn event_number(path: &[u8]) -> f64 {
        unsafe { host_event_number(path.as_ptr() as i32, path.len() as i32) }
    }

    pub fn state_get(key: &[u8]) -> Option<Vec<u8>> {
        let mut buf = Vec::with_capacity(256);
        let found = super::read_value(&mut buf, |buf| unsafe {
            host_state_get(key.as_ptr() as i32, key.len() as i32, buf.as_mut_ptr() as i32, buf.capacity() as i32)
        });
        if found {
            Some(buf)
        } else {
            None
        }
    }

    pub fn state_set(key: &[u8], value: &[u8]) -> i32 {
        unsafe { host_state_set(key.as_ptr() as i32, key.len() as i32, value.as_ptr() as i32, value.len() as i32) }
    }

    pub fn state_delete(key: &[u8]) -> i32 {
        unsafe { host_state_delete(key.as_ptr() as i32, key.len() as i32) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::{MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_WINDOW_SECONDS};
    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    pub struct Emulation {
        pub now_ms: i64,
        /// The event map of the call in progress.
        pub event: Option<crate::Value>,
        pub logs: Vec<(i32, String)>,
        /// key → second → sum
        pub windows: HashMap<Vec<u8>, BTreeMap<i64, i64>>,
        pub state: HashMap<Vec<u8>, Vec<u8>>,
        /// What `alert_open` answers.
        pub alert_open: bool,
    }

    thread_local! {
        pub static EMU: RefCell<Emulation> = RefCell::new(Emulation::default());
    }

    pub fn log(level: i32, msg: &[u8]) {
        EMU.with(|e| e.borrow_mut().logs.push((level, String::from_utf8_lossy(msg).into_owned())))
    }

    pub fn now_ms() -> i64 {
        EMU.with(|e| e.borrow().now_ms)
    }

    pub fn alert_open() -> i32 {
        EMU.with(|e| i32::from(e.borrow().alert_open))
    }

    fn event_value(path: &[u8]) -> Option<crate::Value> {
        let path = std::str::from_utf8(path).ok()?;
        let map = EMU.with(|e| e.borrow().event.clone())?;
        crate::Event::from_value(&map)?.get(path)
    }

    pub fn event_get<R>(path: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let mut out = Vec::new();
        crate::msgpack::encode(&event_value(path)?, &mut out);
        Some(f(&out))
    }

    pub fn event_number(path: &[u8]) -> f64 {
        event_value(path).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
    }

    fn sum(buckets: &BTreeMap<i64, i64>, now_s: i64, seconds: i32) -> i64 {
        buckets.range(now_s - seconds as i64 + 1..=now_s).map(|(_, v)| *v).sum()
    }

    fn valid(key: &[u8], seconds: i32) -> bool {
        key.len() <= MAX_KEY_BYTES && seconds >= 1 && seconds as u32 <= MAX_WINDOW_SECONDS
    }

    pub fn window_add(key: &[u8], seconds: i32, delta: i64) -> i64 {
        if !valid(key, seconds) || delta < 0 {
            return -1;
        }
        EMU.with(|e| {
            let mut e = e.borrow_mut();
            let now_s = e.now_ms.div_euclid(1000);
            let buckets = e.windows.entry(key.to_vec()).or_default();
            *buckets.entry(now_s).or_insert(0) += delta;
            sum(buckets, now_s, seconds)
        })
    }

    pub fn window_sum(key: &[u8], seconds: i32) -> i64 {
        if !valid(key, seconds) {
            return -1;
        }
        EMU.with(|e| {
            let e = e.borrow();
            let now_s = e.now_ms.div_euclid(1000);
            e.windows.get(key).map_or(0, |b| sum(b, now_s, seconds))
        })
    }

    pub fn state_get(key: &[u8]) -> Option<Vec<u8>> {
        EMU.with(|e| e.borrow().state.get(key).cloned())
    }

    pub fn state_set(key: &[u8], value: &[u8]) -> i32 {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return -1;
        }
        EMU.with(|e| e.borrow_mut().state.insert(key.to_vec(), value.to_vec()));
        0
    }

    pub fn state_delete(key: &[u8]) -> i32 {
        EMU.with(|e| e.borrow_mut().state.remove(key).is_some() as i32)
    }
}

/// Native builds only: control of the in-process emulation of the host, for a plugin's own
/// unit tests.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    /// Clears windows, state and logs.
    pub fn reset() {
        super::imp::EMU.with(|e| *e.borrow_mut() = Default::default())
    }

    /// Sets what [`alert_open`](super::alert_open) answers from now on (false after `reset`).
    pub fn set_alert_open(open: bool) {
        super::imp::EMU.with(|e| e.borrow_mut().alert_open = open)
    }

    /// The log lines written so far, with their levels.
    pub fn logs() -> Vec<(i32, String)> {
        super::imp::EMU.with(|e| e.borrow().logs.clone())
    }

    /// Runs a rule handler the way the node does: the host clock set to the event's time, and
    /// the event read through the (emulated) host functions.
    /// The config is prepared as `export_rule!` does; one the plugin refuses is the result.
    pub fn evaluate<C: crate::RuleConfig>(
        handler: fn(&crate::Event, &C) -> Result<crate::Decision, String>,
        event: &crate::Event,
        config: &crate::Value,
    ) -> Result<crate::Decision, String> {
        let config = C::from_config(config)?;
        super::imp::EMU.with(|e| {
            let mut e = e.borrow_mut();
            e.now_ms = event.occurred_at_ms();
            e.event = Some(event.to_map());
        });
        let result = handler(&crate::Event::current(), &config);
        super::imp::EMU.with(|e| e.borrow_mut().event = None);
        result
    }
}
