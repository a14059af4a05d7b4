//! SignalOps core: the vocabulary every other crate of the node shares.
//!
//! - [`model`]: events as producers send them, as the log carries them and as the store keeps
//!   them; ids, validation and time formats.
//! - [`error`]: RFC 9457 problem details and the bounded [`error::ErrorKind`] set.
//! - [`json`]: helpers that validate JSON bodies and name the member at fault.
//! - [`alert`]: alerts, silences, severity, and the window aggregates alerts report.
//! - [`effects`]: what a partition's rule engine hands the store in one commit.
//! - [`delivery`]: notification jobs and delivery records.
//! - [`config`]: the node's configuration, layered from defaults, a file and the environment.
//! - [`partition`]: which partition a tenant's events go to.
//! - [`telemetry`]: metric names.
//!
//! It may use no other SignalOps crate and no I/O-heavy dependency (no NATS, no storage engine,
//! no WASM runtime, no HTTP server): everything here is plain data and pure functions.

pub mod alert;
pub mod config;
pub mod delivery;
pub mod effects;
pub mod error;
pub mod json;
pub mod model;
pub mod partition;
pub mod telemetry;
