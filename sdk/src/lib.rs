//! # SignalOps plugin SDK (ABI v2)
//!
//! A rule plugin is a function that looks at one event (and the rule's `config`) and returns a
//! [`Decision`]. [`export_rule!`] turns it into a WebAssembly module the SignalOps node can load:
//!
//! ```ignore
//! use signalops_sdk::{export_rule, Decision, Event, Value};
//!
//! fn evaluate(event: &Event, config: &Value) -> Result<Decision, String> {
//!     let threshold = config.get("threshold").and_then(Value::as_f64).unwrap_or(100.0);
//!     match event.number("amount") {
//!         Some(amount) if amount >= threshold => Ok(Decision::fire(format!("amount {amount}"))),
//!         _ => Ok(Decision::skip()),
//!     }
//! }
//!
//! export_rule!(evaluate);
//! ```
//!
//! The node gives plugins a few helpers ([`host`]): log lines that show up in test runs,
//! sliding-window counters and small key-value state kept per tenant and rule, and the event's
//! time. Nothing else: no clock, no randomness, no network, no files. A plugin's decisions are
//! therefore a function of the events it saw, and replaying the log gives the same alerts.
//!
//! A notifier plugin turns an alert notification into one HTTP request for a service the node
//! has no built-in channel for; [`export_notifier!`] exports it:
//!
//! ```ignore
//! use signalops_sdk::{export_notifier, Notification, Request, Value};
//!
//! fn render(n: &Notification, config: &Value) -> Result<Request, String> {
//!     let url = config.get("url").and_then(Value::as_str).ok_or("config.url is required")?;
//!     Ok(Request::post(url).json(&Value::map(vec![("text", Value::from(n.title()))])))
//! }
//!
//! export_notifier!(render);
//! ```
//!
//! The wire format between node and plugin is documented in `ABI.md` next to this crate.
//!
//! The SDK has no dependencies and builds with rustc 1.63 (the wasm32 toolchain of the build
//! machines) as well as current stable.

pub mod msgpack;

#[cfg(any(test, all(target_arch = "wasm32", not(target_feature = "atomics"))))]
mod allocator;

#[cfg(all(feature = "allocator", target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: allocator::SizeClasses = allocator::SizeClasses::new();

mod decision;
mod event;
pub mod host;
mod notification;

#[doc(hidden)]
pub mod abi;

pub use decision::{Decision, Severity};
pub use event::Event;
pub use msgpack::Value;
pub use notification::{Notification, Request};

/// The ABI version this SDK speaks (exported as `signalops_abi_v2`, used as the import
/// namespace `signalops_v2`, and sent by the host as `abi` in every input).
pub const ABI_VERSION: u32 = 2;

/// Exports a rule plugin's entry point.
///
/// `export_rule!(handler)` takes a function `fn(&Event, &Value) -> Result<Decision, String>`;
/// the second argument is the rule's `plugin.config` (an empty map when the rule gives none).
///
/// `export_rule!(handler, Config)` takes `fn(&Event, &Config) -> Result<Decision, String>`,
/// where `Config` implements [`RuleConfig`]: the config map is read into it once per rule and
/// instance, not on every event. A config that `Config::from_config` refuses fails every call of
/// that rule with the returned message (kind `plugin_error`).
///
/// Returning `Err(message)` counts as a plugin failure (kind `plugin_error`) with that message.
///
/// The macro defines the module's exports: `signalops_abi_v2`, `signalops_alloc`,
/// `signalops_configure` and `evaluate`. Use it once per crate.
#[macro_export]
macro_rules! export_rule {
    ($handler:path) => {
        $crate::export_rule!($handler, $crate::Value);
    };
    ($handler:path, $config:ty) => {
        const _: () = {
            $crate::__export_abi!();

            thread_local! {
                static CONFIGS: $crate::abi::Slots<$config> = const { ::std::cell::RefCell::new(::std::vec::Vec::new()) };
            }

            #[export_name = "signalops_configure"]
            pub extern "C" fn __signalops_configure(slot: i32, _ptr: i32, len: i32) -> i32 {
                $crate::abi::configure(&CONFIGS, slot, len)
            }

            #[export_name = "evaluate"]
            pub extern "C" fn __signalops_evaluate(slot: i32) -> i64 {
                $crate::abi::run_rule(&CONFIGS, slot, $handler)
            }
        };
    };
}

/// A rule's config as its handler takes it, read from the rule's `plugin.config` map once per
/// rule and instance (see [`export_rule!`]). Reading a config map with [`Value::get`] on every
/// event costs a few hundred fuel per lookup; a prepared config costs nothing per event.
///
/// ```
/// use signalops_sdk::{RuleConfig, Value};
///
/// struct Config {
///     threshold: f64,
/// }
///
/// impl RuleConfig for Config {
///     fn from_config(config: &Value) -> Result<Config, String> {
///         let threshold = config.get("threshold").and_then(Value::as_f64);
///         Ok(Config { threshold: threshold.ok_or("config.threshold is required")? })
///     }
/// }
/// ```
pub trait RuleConfig: Sized + 'static {
    /// Reads the config map; `Err(message)` refuses it.
    fn from_config(config: &Value) -> Result<Self, String>;
}

/// The config map itself, for handlers that take `&Value`.
impl RuleConfig for Value {
    fn from_config(config: &Value) -> Result<Value, String> {
        Ok(config.clone())
    }
}

/// Exports a notifier plugin's entry point.
///
/// The function has the signature `fn(&Notification, &Value) -> Result<Request, String>`; the
/// second argument is the channel's `config`. Returning `Err(message)` fails the delivery
/// attempt (kind `plugin_error`); it is retried on the channel's schedule.
///
/// The macro defines the module's exports: `signalops_abi_v2`, `signalops_alloc` and `render`.
/// Use it once per crate (a module is either a rule or a notifier).
#[macro_export]
macro_rules! export_notifier {
    ($handler:path) => {
        const _: () = {
            $crate::__export_abi!();

            #[export_name = "render"]
            pub extern "C" fn __signalops_render(ptr: i32, len: i32) -> i64 {
                $crate::abi::run_notifier(ptr, len, $handler)
            }
        };
    };
}

/// The exports every plugin has: the ABI marker and the input allocator. Used by
/// [`export_rule!`] and [`export_notifier!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __export_abi {
    () => {
        #[export_name = "signalops_abi_v2"]
        pub extern "C" fn __signalops_abi_v2() -> i32 {
            $crate::ABI_VERSION as i32
        }

        #[export_name = "signalops_alloc"]
        pub extern "C" fn __signalops_alloc(len: i32) -> i32 {
            $crate::abi::input_buffer(len)
        }
    };
}

/// A number as text, exactly as `format!("{}", v)` writes it, but with integer arithmetic for
/// values under a billion with up to six decimals (`1500`, `2.5`, `19.99`). Formatting through
/// `core::fmt` costs thousands of instructions in WebAssembly (fuel, and time on every alert
/// a plugin titles); this is a few hundred.
pub fn number_text(v: f64) -> String {
    let mut out = String::new();
    push_number(&mut out, v);
    out
}

/// Appends [`number_text`]`(v)` to `out`.
pub fn push_number(out: &mut String, v: f64) {
    const SCALE: f64 = 1e6;
    // Under 1e9 two numbers with at most six decimals are further apart than one step of an
    // f64, so the one found here is the shortest text that reads back as `v`.
    if v.is_finite() && v.abs() < 1e9 && !(v == 0.0 && v.is_sign_negative()) {
        let scaled = (v * SCALE).round();
        if scaled / SCALE == v {
            let micros = scaled.abs() as u64;
            if v < 0.0 {
                out.push('-');
            }
            push_digits(out, micros / 1_000_000, 1);
            let mut frac = micros % 1_000_000;
            if frac > 0 {
                let mut digits = 6;
                while frac % 10 == 0 {
                    frac /= 10;
                    digits -= 1;
                }
                out.push('.');
                push_digits(out, frac, digits);
            }
            return;
        }
    }
    use std::fmt::Write;
    let _ = write!(out, "{v}");
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
pub(crate) fn push_digits(out: &mut String, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    while n > 0 || buf.len() - i < width {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    for &b in &buf[i..] {
        out.push(b as char);
    }
}

#[cfg(test)]
mod tests {
    use super::number_text;

    #[test]
    fn number_text_writes_what_display_writes() {
        let mut values = vec![0.0, -0.0, 1.0, -1.0, 0.1, 0.2, 0.3, 2.5, 19.99, 1e-7, 123456.789, 999_999_999.999_999];
        values.extend([1e9, 1e15, 1e300, f64::NAN, f64::INFINITY, f64::MIN_POSITIVE, 2.5000000000000004]);
        // A grid of values with up to seven decimals, around the edges of the fast path.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let decimals = (x % 8) as i32;
            let magnitude = 10f64.powi((x >> 8) as i32 % 10);
            let v = ((x >> 16) % 1_000_000_000) as f64 / 10f64.powi(decimals) % magnitude;
            values.push(if x & 1 == 0 { v } else { -v });
            values.push(f64::from_bits(x));
        }
        for v in values {
            assert_eq!(number_text(v), format!("{v}"), "{v:?}");
        }
    }
}
