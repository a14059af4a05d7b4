//! # SignalOps plugin SDK (ABI v1)
//!
//! A rule plugin is a function that looks at one event (and the rule's `config`) and returns a
//! [`Decision`]. [`export_rule!`] turns it into a WebAssembly module the SignalOps node can load:
//!
//! ```ignore
//! use signalops_sdk::{export_rule, Decision, Event, Value};
//!
//! fn evaluate(event: &Event, config: &Value) -> Result<Decision, String> {
//!     let threshold = config.get("threshold").and_then(Value::as_f64).unwrap_or(100.0);
//!     match event.payload().get("amount").and_then(Value::as_f64) {
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

/// The ABI version this SDK speaks (exported as `signalops_abi_v1`, used as the import
/// namespace `signalops_v1`, and sent by the host as `abi` in every input).
pub const ABI_VERSION: u32 = 1;

/// Exports a rule plugin's entry point.
///
/// The function has the signature `fn(&Event, &Value) -> Result<Decision, String>`; the second
/// argument is the rule's `plugin.config` (an empty map when the rule gives none). Returning
/// `Err(message)` counts as a plugin failure (kind `plugin_error`) with that message.
///
/// The macro defines the module's exports: `signalops_abi_v1`, `signalops_alloc` and
/// `evaluate`. Use it once per crate.
#[macro_export]
macro_rules! export_rule {
    ($handler:path) => {
        const _: () = {
            $crate::__export_abi_v1!();

            #[export_name = "evaluate"]
            pub extern "C" fn __signalops_evaluate(ptr: i32, len: i32) -> i64 {
                $crate::abi::run_rule(ptr, len, $handler)
            }
        };
    };
}

/// Exports a notifier plugin's entry point.
///
/// The function has the signature `fn(&Notification, &Value) -> Result<Request, String>`; the
/// second argument is the channel's `config`. Returning `Err(message)` fails the delivery
/// attempt (kind `plugin_error`); it is retried on the channel's schedule.
///
/// The macro defines the module's exports: `signalops_abi_v1`, `signalops_alloc` and `render`.
/// Use it once per crate (a module is either a rule or a notifier).
#[macro_export]
macro_rules! export_notifier {
    ($handler:path) => {
        const _: () = {
            $crate::__export_abi_v1!();

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
macro_rules! __export_abi_v1 {
    () => {
        #[export_name = "signalops_abi_v1"]
        pub extern "C" fn __signalops_abi_v1() -> i32 {
            $crate::ABI_VERSION as i32
        }

        #[export_name = "signalops_alloc"]
        pub extern "C" fn __signalops_alloc(len: i32) -> i32 {
            $crate::abi::input_buffer(len)
        }
    };
}
