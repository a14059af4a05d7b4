//! The plugin host: tenant-uploaded WebAssembly plugins (ABI v1 and v2, see `sdk/ABI.md`).
//!
//! - [`registry`]: the plugin records the control plane keeps (kinds, versions, disabling).
//! - [`runtime`]: wasmtime and its sandbox: upload validation, the call ABI, host functions
//!   and the per-partition instance cache.
//! - [`guest_event`] and [`output`]: what a call reads and writes (MessagePack).
//! - [`state`]: plugin counters and state entries, committed only when a call succeeds.
//! - [`stats`]: per-plugin health and the auto-disable requests.
//! - [`store`]: module binaries in the JetStream object store.
//!
//! Uses only `signalops-core` among SignalOps crates: the rule engine and the notifier call
//! into it; it knows neither.

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

/// What partition owners need to run plugin rules (and notifiers, their plugins).
#[derive(Clone)]
pub struct PluginServices {
    pub runtime: std::sync::Arc<PluginRuntime>,
    pub modules: store::ModuleStore,
    pub stats: PluginStatsRegistry,
    pub max_consecutive_failures: u32,
}
