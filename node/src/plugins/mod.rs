//! Tenant-uploaded WebAssembly plugins (ABI v1 and v2, see `sdk/ABI.md`): the registry records kept in
//! the control plane, the wasmtime runtime and its sandbox, plugin state, and health
//! statistics.

pub mod guest_event;
pub mod output;
pub mod registry;
pub mod runtime;
pub mod state;
pub mod stats;
pub mod store;

pub use registry::{PluginKind, PluginRecord, PluginVersion};
pub use runtime::{Abi, CallReport, Decision, Digest, FailureKind, Outcome, PluginHost, PluginRequest, PluginRuntime};
pub use stats::PluginStatsRegistry;
