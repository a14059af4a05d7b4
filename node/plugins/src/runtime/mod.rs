//! The wasmtime side of the plugin ABI (v1 and v2): module validation and compilation (at
//! upload), instances kept per (tenant, module) in each partition engine (and in the notification workers), one
//! `evaluate` (rule) or `render` (notifier) call with its limits, and the classification of
//! what went wrong.
//!
//! Limits: fuel per call (deterministic, so a replay after a crash makes the same decisions; an
//! epoch deadline would not), a linear-memory cap per instance (a `ResourceLimiter`), an output
//! size cap, a wasm stack cap, and a fuel charge per host call proportional to the bytes it
//! moves. An instance is thrown away after any trap or limit error; the next call gets a fresh
//! one.
//!
//! ## Parts
//! This file holds the runtime (engine configuration, the compiled-module cache) and what a call
//! reports. [`validate`] checks and compiles uploads, [`host`] defines the host functions and
//! the per-call context, [`instances`] keeps live instances per (tenant, module), and [`call`]
//! is the call ABI: input encoding, the guest buffer and output decoding.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmtime::{
    Caller, Config, Enabled, Engine, ExternType, Instance, InstanceAllocationStrategy, Linker, Memory, Module,
    PoolConcurrencyLimitError, PoolingAllocationConfig, ResourceLimiter, Store, Trap, TypedFunc, ValType,
};

use signalops_core::alert::Severity;
use signalops_core::config::PluginsConfig;
use signalops_core::model::{EventRecord, TenantId};

use crate::guest_event;
use crate::output::{read_output, Fields};
use crate::registry::PluginKind;
use crate::state::{PluginState, StateLimits};

mod call;
mod host;
mod instances;
#[cfg(test)]
mod tests;
mod validate;

pub use call::*;
pub use host::*;
pub use instances::*;
pub use validate::*;

/// SHA-256 of a module's bytes: its identity in caches and the object store.
pub type Digest = [u8; 32];

/// Wasm stack per call.
const MAX_WASM_STACK: usize = 512 * 1024;

/// How a plugin call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The module trapped (a panic, `unreachable`, an out-of-bounds access, stack overflow).
    Trap,
    /// The call used all its fuel.
    FuelExhausted,
    /// The module tried to grow its memory past the cap.
    MemoryLimit,
    /// The output is too large or not a decision map (see `sdk/ABI.md`).
    BadOutput,
    /// The plugin returned an error.
    PluginError,
    /// The module could not be loaded on this node.
    Unavailable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::FuelExhausted => "fuel_exhausted",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::BadOutput => "bad_output",
            FailureKind::PluginError => "plugin_error",
            FailureKind::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure { kind, message: message.into() }
}

/// What a rule plugin decided for one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub fire: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    pub fields: Fields,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// Everything about one call: the decision or the failure, and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallReport {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub fuel_used: u64,
    /// The call's time, if it was timed: always in test runs and dry-runs, about one call in
    /// [`TIMED_ONE_IN`] on a partition owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micros: Option<u64>,
    /// The same time in nanoseconds (health percentiles of calls well under a microsecond).
    #[serde(skip)]
    pub nanos: Option<u64>,
    pub logs: Vec<LogLine>,
}

impl CallReport {
    pub fn new(outcome: Outcome, fuel_used: u64, took: Option<std::time::Duration>, logs: Vec<LogLine>) -> CallReport {
        let nanos = took.map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX));
        CallReport { outcome, fuel_used, micros: nanos.map(|n| n / 1000), nanos, logs }
    }
}

/// A partition owner times about one plugin call in this many (two clock reads, a histogram
/// sample and a kept time per call cost more than a small plugin's own work); the health
/// percentiles and the duration histogram are over those samples.
pub const TIMED_ONE_IN: u32 = 16;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Decision(Decision),
    Failure(Failure),
}

/// The limits of the plugin sandbox (from the `[plugins]` config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_module_bytes: usize,
    pub fuel_per_call: u64,
    pub max_memory_bytes: usize,
    pub max_output_bytes: usize,
    pub max_log_lines: usize,
    pub max_log_line_bytes: usize,
    pub state: StateLimits,
    pub max_instances: usize,
}

impl From<&PluginsConfig> for Limits {
    fn from(c: &PluginsConfig) -> Limits {
        Limits {
            max_module_bytes: c.max_module_bytes,
            fuel_per_call: c.fuel_per_call,
            max_memory_bytes: c.max_memory_bytes,
            max_output_bytes: c.max_output_bytes,
            max_log_lines: c.max_log_lines,
            max_log_line_bytes: 1024,
            state: StateLimits { max_keys: c.max_state_keys, max_buckets: c.max_window_buckets },
            max_instances: c.max_instances_per_partition,
        }
    }
}

/// The engine, the host functions and the compiled modules of one node.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostCtx>,
    limits: Limits,
    modules: Mutex<HashMap<Digest, Module>>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// Hex form of a digest.
pub fn digest_hex(d: &Digest) -> String {
    hex::encode(d)
}

impl PluginRuntime {
    pub fn new(cfg: &PluginsConfig) -> anyhow::Result<PluginRuntime> {
        let mut c = Config::new();
        c.consume_fuel(true);
        c.max_wasm_stack(MAX_WASM_STACK);
        c.allocation_strategy(instance_pool(cfg));
        let engine = Engine::new(&c).map_err(|e| anyhow::anyhow!("plugin engine: {e:#}"))?;
        let linker = build_linker(&engine).map_err(|e| anyhow::anyhow!("plugin host functions: {e:#}"))?;
        Ok(PluginRuntime { engine, linker, limits: Limits::from(cfg), modules: Mutex::new(HashMap::new()) })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The compiled module with this digest, if this node has it.
    pub fn module(&self, digest: &Digest) -> Option<Module> {
        self.modules.lock().ok().and_then(|m| m.get(digest).cloned())
    }

    fn new_store(&self) -> Store<HostCtx> {
        let ctx = HostCtx {
            state: Box::default(),
            now_ms: 0,
            logs: Vec::new(),
            keep_logs: true,
            memory: None,
            memory_denied: false,
            limits: self.limits,
            event: CallEvent::default(),
            scratch: Vec::new(),
            alerts: CallAlerts::default(),
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|c| c as &mut dyn ResourceLimiter);
        store
    }
}

/// Sorts an error from wasmtime into a failure kind.
fn classify(e: &wasmtime::Error, memory_denied: bool) -> Failure {
    if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return failure(
            FailureKind::Unavailable,
            "every slot of this node's plugin instance pool is in use (raise plugins.instance_pool)",
        );
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => failure(FailureKind::FuelExhausted, "the call used all its fuel"),
        _ if memory_denied => failure(FailureKind::MemoryLimit, format!("memory limit reached, then: {e}")),
        _ => failure(FailureKind::Trap, format!("{e:#}")),
    }
}
