//! The wasmtime side of the plugin ABI (v1 and v2): module validation and compilation (at upload), instances kept
//! per (tenant, module) in each partition engine (and in the notification workers), one
//! `evaluate` (rule) or `render` (notifier) call with its limits, and the classification of
//! what went wrong.
//!
//! Limits: fuel per call (deterministic, so a replay after a crash makes the same decisions; an
//! epoch deadline would not), a linear-memory cap per instance (a `ResourceLimiter`), an output
//! size cap, a wasm stack cap, and a fuel charge per host call proportional to the bytes it
//! moves. An instance is thrown away after any trap or limit error; the next call gets a fresh
//! one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmtime::{
    Caller, Config, Enabled, Engine, ExternType, Instance, InstanceAllocationStrategy, Linker, Memory, Module,
    PoolConcurrencyLimitError, PoolingAllocationConfig, ResourceLimiter, Store, Trap, TypedFunc, ValType,
};

use super::guest_event;
use super::output::{read_output, Fields};
use super::registry::PluginKind;
use super::state::{PluginState, StateLimits};
use crate::config::PluginsConfig;
use crate::model::{EventRecord, TenantId};
use crate::rules::spec::Severity;

/// SHA-256 of a module's bytes: its identity in caches and the object store.
pub type Digest = [u8; 32];

/// The ABI versions this node runs (see `sdk/ABI.md`). A module's version is the marker it
/// exports (`signalops_abi_v2` or `signalops_abi_v1`); its imports come from that version's
/// namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// The whole event and the rule's config encoded into every call's input.
    V1,
    /// Each rule's config handed over once per instance (`signalops_configure`); the event
    /// read through host functions, only the fields the plugin asks for.
    V2,
}

impl Abi {
    pub fn number(self) -> i32 {
        match self {
            Abi::V1 => 1,
            Abi::V2 => 2,
        }
    }

    /// The import namespace.
    pub fn namespace(self) -> &'static str {
        match self {
            Abi::V1 => "signalops_v1",
            Abi::V2 => "signalops_v2",
        }
    }

    /// The export that marks the version (returns [`Abi::number`]).
    pub fn marker(self) -> &'static str {
        match self {
            Abi::V1 => "signalops_abi_v1",
            Abi::V2 => "signalops_abi_v2",
        }
    }

    /// A module's version, by its marker export (a module without one is checked as v1, so
    /// the missing marker is what the upload reports).
    pub fn of(module: &Module) -> Abi {
        match module.get_export(Abi::V2.marker()) {
            Some(_) => Abi::V2,
            None => Abi::V1,
        }
    }

    /// Host functions: name, parameter types, result types (`i` = i32, `I` = i64, `F` = f64).
    fn imports(self) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str)> {
        let extra: &[_] = match self {
            Abi::V1 => &[],
            Abi::V2 => EVENT_IMPORTS,
        };
        IMPORTS.iter().chain(extra)
    }

    /// The exports a module of this version and kind must have: name, parameters, results.
    fn exports(self, kind: PluginKind) -> &'static [(&'static str, &'static str, &'static str)] {
        match (self, kind) {
            (Abi::V1, PluginKind::Rule) => {
                &[("signalops_abi_v1", "", "i"), ("signalops_alloc", "i", "i"), ("evaluate", "ii", "I")]
            }
            (Abi::V1, PluginKind::Notifier) => {
                &[("signalops_abi_v1", "", "i"), ("signalops_alloc", "i", "i"), ("render", "ii", "I")]
            }
            (Abi::V2, PluginKind::Rule) => &[
                ("signalops_abi_v2", "", "i"),
                ("signalops_alloc", "i", "i"),
                ("signalops_configure", "iii", "i"),
                ("evaluate", "i", "I"),
            ],
            (Abi::V2, PluginKind::Notifier) => {
                &[("signalops_abi_v2", "", "i"), ("signalops_alloc", "i", "i"), ("render", "ii", "I")]
            }
        }
    }
}

/// Host functions of every ABI version.
const IMPORTS: &[(&str, &str, &str)] = &[
    ("log", "iii", ""),
    ("now_ms", "", "I"),
    ("window_add", "iiiI", "I"),
    ("window_sum", "iii", "I"),
    ("state_get", "iiii", "i"),
    ("state_set", "iiii", "i"),
    ("state_delete", "ii", "i"),
];

/// Host functions added by ABI v2: the event, read by path, and whether the rule's alert for
/// the event's group is open.
const EVENT_IMPORTS: &[(&str, &str, &str)] =
    &[("event_get", "iiii", "i"), ("event_number", "ii", "F"), ("alert_open", "", "i")];

/// What a module is, by its entry point: `evaluate` makes a rule plugin, `render` a notifier.
pub fn kind_of(module: &Module) -> Option<PluginKind> {
    match (module.get_export("evaluate").is_some(), module.get_export("render").is_some()) {
        (true, false) => Some(PluginKind::Rule),
        (false, true) => Some(PluginKind::Notifier),
        _ => None,
    }
}

/// Fuel a host call costs before counting the bytes it moves.
const HOST_CALL_FUEL: u64 = 200;
/// Wasm stack per call.
const MAX_WASM_STACK: usize = 512 * 1024;

/// Elements a module's table may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Why an uploaded module was refused. `status` is the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
}

impl Rejection {
    fn new(status: u16, reason: &'static str, detail: impl Into<String>) -> Rejection {
        Rejection { status, reason, detail: detail.into() }
    }
}

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

/// The store data of one instance.
pub struct HostCtx {
    /// The calling rule's plugin state, swapped in for the call (a box, so that is a pointer swap).
    state: Box<PluginState>,
    now_ms: i64,
    logs: Vec<LogLine>,
    /// Whether `log` lines are kept (test runs and dry-runs) or only checked and charged.
    keep_logs: bool,
    /// The instance's memory, once instantiated.
    memory: Option<Memory>,
    memory_denied: bool,
    limits: Limits,
    /// The event of the rule call in progress (ABI v2 `event_get` / `event_number`).
    event: CallEvent,
    /// Where `event_get` encodes a value before copying it into the module's memory.
    scratch: Vec<u8>,
    /// What answers `alert_open` during the rule call in progress.
    alerts: CallAlerts,
}

/// What a rule call may ask about its rule's alerts (ABI v2 `alert_open`). The partition
/// engine answers for the rule and event of the call, and only works the answer out when the
/// plugin asks.
pub trait RuleAlerts {
    /// Whether a firing decision for the call's event would only count toward an alert the
    /// rule already has open for the event's group (so its title, severity, labels and fields
    /// would not be used).
    fn alert_open(&mut self) -> bool;
}

/// A call with no rule behind it (a plugin test run): no alert is ever open.
impl RuleAlerts for () {
    fn alert_open(&mut self) -> bool {
        false
    }
}

/// The [`RuleAlerts`] of the rule call in progress, for `alert_open`. Like [`CallEvent`] it is
/// a pointer, set by [`PluginHost::evaluate`] for the span of the call that borrows it and
/// cleared before that call returns.
#[derive(Default)]
struct CallAlerts(Option<std::ptr::NonNull<dyn RuleAlerts>>);

// SAFETY: as for `CallEvent`: only dereferenced by `alert_open`, on the thread that called into
// the module, during `PluginHost::evaluate`, while the value it points to is borrowed by it.
#[allow(unsafe_code)]
unsafe impl Send for CallAlerts {}

impl CallAlerts {
    fn set(&mut self, alerts: Option<&mut dyn RuleAlerts>) {
        self.0 = alerts.map(|a| {
            let p: std::ptr::NonNull<dyn RuleAlerts + '_> = std::ptr::NonNull::from(a);
            // SAFETY: only the lifetime is erased; the pointer is cleared before the borrow
            // it comes from ends (see the type's docs).
            #[allow(unsafe_code)]
            unsafe {
                std::mem::transmute::<std::ptr::NonNull<dyn RuleAlerts + '_>, std::ptr::NonNull<dyn RuleAlerts>>(p)
            }
        });
    }

    fn alert_open(&mut self) -> bool {
        // SAFETY: see the type's docs: set only for the span of the call that borrows it.
        #[allow(unsafe_code)]
        self.0.is_some_and(|mut p| unsafe { p.as_mut() }.alert_open())
    }
}

/// The event a rule plugin's call is about, for the host functions that read it. It is a
/// pointer because the store's data must be `'static` while the event is only borrowed for
/// the call: [`PluginHost::evaluate`] sets it from its `&EventRecord` before it enters the
/// module and clears it before it returns, and every other entry into a module (instantiation,
/// `render`) clears it first.
#[derive(Default)]
struct CallEvent(Option<std::ptr::NonNull<EventRecord>>);

// SAFETY: the pointer is only dereferenced by host functions, which run on the thread that
// called into the module, during `PluginHost::evaluate`, while the event it points to is
// borrowed by that call.
#[allow(unsafe_code)]
unsafe impl Send for CallEvent {}

impl CallEvent {
    fn set(&mut self, ev: Option<&EventRecord>) {
        self.0 = ev.map(std::ptr::NonNull::from);
    }

    fn get(&self) -> Option<&EventRecord> {
        // SAFETY: see the type's docs: set only for the span of the call that borrows it.
        #[allow(unsafe_code)]
        self.0.map(|p| unsafe { p.as_ref() })
    }
}

impl ResourceLimiter for HostCtx {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.max_memory_bytes {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
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

fn sig(params: impl Iterator<Item = ValType>, results: impl Iterator<Item = ValType>) -> (String, String) {
    let code = |t: ValType| match t {
        ValType::I32 => 'i',
        ValType::I64 => 'I',
        ValType::F32 => 'f',
        ValType::F64 => 'F',
        _ => '?',
    };
    (params.map(code).collect(), results.map(code).collect())
}

/// The caller's memory (remembered at instantiation; looked up by name before that).
fn guest_memory(caller: &mut Caller<'_, HostCtx>) -> wasmtime::Result<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("module has no memory export"))
}

/// Runs `f` over the `len` bytes at `ptr` of the caller's memory (borrowed, not copied), with
/// the host context; an out-of-bounds buffer traps.
fn with_guest_bytes<R>(
    caller: &mut Caller<'_, HostCtx>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &mut HostCtx) -> R,
) -> wasmtime::Result<R> {
    let mem = guest_memory(caller)?;
    let (data, ctx) = mem.data_and_store_mut(caller);
    let start = ptr as u32 as usize;
    match start.checked_add(len as u32 as usize).and_then(|end| data.get(start..end)) {
        Some(bytes) => Ok(f(bytes, ctx)),
        None => Err(wasmtime::Error::msg(format!("host call with out-of-bounds buffer {ptr}+{len}"))),
    }
}

/// Takes the fuel a host call costs; traps with `OutOfFuel` when there is not enough.
fn charge(caller: &mut Caller<'_, HostCtx>, bytes: usize) -> wasmtime::Result<()> {
    let cost = HOST_CALL_FUEL.saturating_add(bytes as u64);
    let fuel = caller.get_fuel()?;
    if fuel < cost {
        caller.set_fuel(0)?;
        return Err(Trap::OutOfFuel.into());
    }
    caller.set_fuel(fuel - cost)
}

fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<HostCtx>> {
    let mut l = Linker::new(engine);
    for abi in [Abi::V1, Abi::V2] {
        define_host_functions(&mut l, abi.namespace())?;
    }
    define_v2_functions(&mut l, Abi::V2.namespace())?;
    Ok(l)
}

/// The host functions every ABI version has, in namespace `ns`.
fn define_host_functions(l: &mut Linker<HostCtx>, ns: &str) -> wasmtime::Result<()> {
    l.func_wrap(ns, "log", |mut c: Caller<'_, HostCtx>, level: i32, ptr: i32, len: i32| {
        charge(&mut c, len.max(0) as usize)?;
        let cap = c.data().limits.max_log_line_bytes;
        with_guest_bytes(&mut c, ptr, len.min(cap as i32), |bytes, ctx| {
            // The buffer is checked (and the call charged) whether or not lines are kept, so a
            // test run and the live path trap alike.
            if ctx.keep_logs && ctx.logs.len() < ctx.limits.max_log_lines {
                let level = match level {
                    0 => "debug",
                    1 => "info",
                    2 => "warn",
                    _ => "error",
                };
                ctx.logs.push(LogLine { level, message: String::from_utf8_lossy(bytes).into_owned() });
            }
        })
    })?;
    l.func_wrap(ns, "now_ms", |c: Caller<'_, HostCtx>| c.data().now_ms)?;
    l.func_wrap(ns, "window_add", |mut c: Caller<'_, HostCtx>, kp: i32, kl: i32, seconds: i32, delta: i64| {
        charge(&mut c, kl.max(0) as usize)?;
        with_guest_bytes(&mut c, kp, kl, |key, ctx| {
            let limits = ctx.limits.state;
            ctx.state.window_add(key, ctx.now_ms, seconds as i64, delta, limits)
        })
    })?;
    l.func_wrap(ns, "window_sum", |mut c: Caller<'_, HostCtx>, kp: i32, kl: i32, seconds: i32| {
        charge(&mut c, kl.max(0) as usize)?;
        with_guest_bytes(&mut c, kp, kl, |key, ctx| ctx.state.window_sum(key, ctx.now_ms, seconds as i64))
    })?;
    l.func_wrap(
        ns,
        "state_get",
        |mut c: Caller<'_, HostCtx>, kp: i32, kl: i32, out: i32, cap: i32| -> wasmtime::Result<i32> {
            charge(&mut c, kl.max(0) as usize)?;
            let value = with_guest_bytes(&mut c, kp, kl, |key, ctx| ctx.state.state_get(key).map(<[u8]>::to_vec))?;
            let Some(value) = value else { return Ok(-1) };
            if value.len() <= cap.max(0) as usize {
                charge(&mut c, value.len())?;
                let mem = guest_memory(&mut c)?;
                mem.write(&mut c, out as u32 as usize, &value)
                    .map_err(|_| wasmtime::Error::msg(format!("state_get into out-of-bounds buffer {out}+{cap}")))?;
            }
            Ok(value.len() as i32)
        },
    )?;
    l.func_wrap(
        ns,
        "state_set",
        |mut c: Caller<'_, HostCtx>, kp: i32, kl: i32, vp: i32, vl: i32| -> wasmtime::Result<i32> {
            charge(&mut c, (kl.max(0) as usize).saturating_add(vl.max(0) as usize))?;
            if vl as u32 as usize > super::state::MAX_VALUE_BYTES {
                return Ok(super::state::ERR_INVALID as i32);
            }
            let key = with_guest_bytes(&mut c, kp, kl, |key, _| key.to_vec())?;
            with_guest_bytes(&mut c, vp, vl, |value, ctx| {
                let limits = ctx.limits.state;
                ctx.state.state_set(&key, value, limits) as i32
            })
        },
    )?;
    l.func_wrap(ns, "state_delete", |mut c: Caller<'_, HostCtx>, kp: i32, kl: i32| {
        charge(&mut c, kl.max(0) as usize)?;
        with_guest_bytes(&mut c, kp, kl, |key, ctx| ctx.state.state_delete(key) as i32)
    })?;
    Ok(())
}

/// ABI v2's event accessors (a path that is not UTF-8 finds nothing) and `alert_open`, in
/// namespace `ns`.
fn define_v2_functions(l: &mut Linker<HostCtx>, ns: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        ns,
        "event_get",
        |mut c: Caller<'_, HostCtx>, pp: i32, pl: i32, out: i32, cap: i32| -> wasmtime::Result<i32> {
            let found = with_guest_bytes(&mut c, pp, pl, |path, ctx| {
                ctx.scratch.clear();
                let ev = ctx.event.get();
                let found = std::str::from_utf8(path).ok().zip(ev).and_then(|(p, ev)| guest_event::lookup(ev, p));
                found.map(|v| v.encode(&mut ctx.scratch)).is_some()
            })?;
            let len = c.data().scratch.len();
            let copy = found && len <= cap.max(0) as usize;
            // One charge for the path and, when it is copied, the value.
            charge(&mut c, pl.max(0) as usize + if copy { len } else { 0 })?;
            if !found {
                return Ok(-1);
            }
            if copy {
                let mem = guest_memory(&mut c)?;
                let (data, ctx) = mem.data_and_store_mut(&mut c);
                let start = out as u32 as usize;
                let Some(dst) = start.checked_add(len).and_then(|end| data.get_mut(start..end)) else {
                    return Err(wasmtime::Error::msg(format!("event_get into out-of-bounds buffer {out}+{cap}")));
                };
                dst.copy_from_slice(&ctx.scratch);
            }
            // An event is at most the ingest size limit, far below 2 GiB.
            Ok(i32::try_from(len).unwrap_or(i32::MAX))
        },
    )?;
    l.func_wrap(ns, "event_number", |mut c: Caller<'_, HostCtx>, pp: i32, pl: i32| -> wasmtime::Result<f64> {
        charge(&mut c, pl.max(0) as usize)?;
        with_guest_bytes(&mut c, pp, pl, |path, ctx| {
            let ev = ctx.event.get();
            let found = std::str::from_utf8(path).ok().zip(ev).and_then(|(p, ev)| guest_event::lookup(ev, p));
            found.map_or(f64::NAN, |v| v.number())
        })
    })?;
    l.func_wrap(ns, "alert_open", |mut c: Caller<'_, HostCtx>| -> wasmtime::Result<i32> {
        charge(&mut c, 0)?;
        Ok(i32::from(c.data_mut().alerts.alert_open()))
    })?;
    Ok(())
}

/// A module that passed validation.
#[derive(Debug, Clone)]
pub struct Validated {
    pub digest: Digest,
    pub module: Module,
    pub kind: PluginKind,
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

    /// Validates and compiles a module (CPU-heavy: call from a blocking thread), checks its
    /// ABI by instantiating it once, and caches the compiled module.
    pub fn compile(&self, bytes: &[u8]) -> Result<Validated, Rejection> {
        use sha2::Digest as _;
        if bytes.len() > self.limits.max_module_bytes {
            return Err(Rejection::new(
                413,
                "module_too_large",
                format!("the module is {} bytes; the limit is {}", bytes.len(), self.limits.max_module_bytes),
            ));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(Rejection::new(
                400,
                "not_wasm",
                "the body is not a WebAssembly binary module (no \\0asm header)",
            ));
        }
        let digest: Digest = sha2::Sha256::digest(bytes).into();
        if let Some(module) = self.module(&digest) {
            let kind = check_interface(&module)?;
            return Ok(Validated { digest, module, kind });
        }
        let module = Module::new(&self.engine, bytes).map_err(|e| {
            let e = format!("{e:#}");
            // The instance pool checks a module's declared memory and tables against its
            // slots when it compiles (the wasmtime version is pinned; a test covers the text).
            if e.contains("pooling allocator") {
                Rejection::new(
                    422,
                    "instantiation_failed",
                    format!("the module needs more than a plugin may have: {e}"),
                )
            } else {
                Rejection::new(422, "invalid_module", format!("the module does not validate: {e}"))
            }
        })?;
        let kind = check_interface(&module)?;
        let abi = Abi::of(&module);
        // Instantiate once: runs the start function under the limits and checks the marker.
        let mut store = self.new_store();
        let version = (|| -> wasmtime::Result<i32> {
            store.set_fuel(self.limits.fuel_per_call)?;
            let instance = self.linker.instantiate(&mut store, &module)?;
            let marker = instance.get_typed_func::<(), i32>(&mut store, abi.marker())?;
            marker.call(&mut store, ())
        })()
        .map_err(|e| {
            let f = classify(&e, store.data().memory_denied);
            if f.kind == FailureKind::Unavailable {
                // The node's state, not the module's: retry later.
                return Rejection::new(503, "instance_pool_full", f.message);
            }
            Rejection::new(
                422,
                "instantiation_failed",
                format!("the module fails to start ({}): {}", f.kind.as_str(), f.message),
            )
        })?;
        if version != abi.number() {
            return Err(Rejection::new(
                422,
                "abi_version",
                format!(
                    "`{}` returns {version}; this node speaks ABI {} and {}",
                    abi.marker(),
                    Abi::V1.number(),
                    Abi::V2.number()
                ),
            ));
        }
        if let Ok(mut m) = self.modules.lock() {
            m.insert(digest, module.clone());
        }
        Ok(Validated { digest, module, kind })
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

/// Checks imports and exports against the module's ABI version; the entry point decides the
/// module's kind.
fn check_interface(module: &Module) -> Result<PluginKind, Rejection> {
    let abi = Abi::of(module);
    let ns = abi.namespace();
    for imp in module.imports() {
        let what = format!("{}.{}", imp.module(), imp.name());
        if imp.module() != ns {
            return Err(Rejection::new(
                422,
                "forbidden_import",
                format!("the module imports `{what}`; plugins of ABI v{} may import only from `{ns}` (no WASI, no host access)", abi.number()),
            ));
        }
        let Some((_, p, r)) = abi.imports().find(|(n, _, _)| *n == imp.name()) else {
            return Err(Rejection::new(
                422,
                "forbidden_import",
                format!("`{what}` is not a host function of ABI v{}", abi.number()),
            ));
        };
        let ExternType::Func(ft) = imp.ty() else {
            return Err(Rejection::new(422, "forbidden_import", format!("`{what}` must be imported as a function")));
        };
        if sig(ft.params(), ft.results()) != (p.to_string(), r.to_string()) {
            return Err(Rejection::new(
                422,
                "import_signature",
                format!("`{what}` is imported with the wrong signature"),
            ));
        }
    }
    match module.get_export("memory") {
        Some(ExternType::Memory(m)) if !m.is_64() => {}
        _ => {
            return Err(Rejection::new(
                422,
                "missing_export",
                "the module must export its 32-bit linear memory as `memory`",
            ))
        }
    }
    let Some(kind) = kind_of(module) else {
        return Err(Rejection::new(
            422,
            "missing_export",
            "the module must export exactly one entry point: `evaluate` (a rule plugin, built with `export_rule!`) or `render` (a notifier, built with `export_notifier!`)",
        ));
    };
    for (name, p, r) in abi.exports(kind) {
        match module.get_export(name) {
            Some(ExternType::Func(ft)) if sig(ft.params(), ft.results()) == (p.to_string(), r.to_string()) => {}
            Some(_) => {
                return Err(Rejection::new(422, "export_signature", format!("the export `{name}` has the wrong type")))
            }
            None => {
                return Err(Rejection::new(
                    422,
                    "missing_export",
                    format!(
                        "the module does not export `{name}` (built without `export_rule!` or `export_notifier!`?)"
                    ),
                ))
            }
        }
    }
    Ok(kind)
}

/// Bytes of a discarded instance's linear memory put back in place (only the pages it touched;
/// the rest is returned to the kernel). A typical plugin touches less than this.
const KEEP_RESIDENT_BYTES: usize = 1 << 20;

/// Instances come from a pool of reusable slots rather than fresh mappings. An instance is
/// thrown away after every trap, and unmapping its memory would make the kernel interrupt every
/// core running one of the node's threads (a TLB shootdown), so a plugin that traps on every
/// event would slow other tenants' partitions; a pooled slot is reset in place instead, and a
/// module's next instance usually lands in the slot its last one had, with its data in place.
fn instance_pool(cfg: &PluginsConfig) -> InstanceAllocationStrategy {
    let mut p = PoolingAllocationConfig::new();
    p.total_core_instances(cfg.instance_pool)
        .total_memories(cfg.instance_pool)
        .total_tables(cfg.instance_pool)
        .max_memory_size(cfg.max_memory_bytes)
        .linear_memory_keep_resident(KEEP_RESIDENT_BYTES.min(cfg.max_memory_bytes))
        .table_elements(MAX_TABLE_ELEMENTS)
        .table_keep_resident(16 << 10)
        // Reset only the pages a discarded instance touched, where the kernel can tell (Linux 6.7+).
        .pagemap_scan(Enabled::Auto);
    InstanceAllocationStrategy::Pooling(p)
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

/// One live instance.
struct Live {
    store: Store<HostCtx>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    entry: Entry,
}

/// How a live instance is called.
enum Entry {
    /// `evaluate` (ABI v1) or `render` (both versions): the whole input in a buffer.
    Buffer(TypedFunc<(i32, i32), i64>),
    /// ABI v2 `evaluate(slot)`, after `signalops_configure` gave the slot its rule and config.
    Slots {
        configure: TypedFunc<(i32, i32, i32), i32>,
        evaluate: TypedFunc<i32, i64>,
        slots: foldhash::HashMap<uuid::Uuid, Slot>,
    },
}

/// What an ABI v2 instance was told about one rule.
struct Slot {
    index: i32,
    version: u32,
    config: Vec<u8>,
}

/// What a call is about.
pub struct CallInput<'a> {
    pub event: &'a EventRecord,
    /// The event's effective time (what `now_ms` returns).
    pub time_ms: i64,
    /// The rule's `plugin.config`, MessagePack-encoded.
    pub config: &'a [u8],
    pub rule_id: uuid::Uuid,
    pub rule_version: u32,
}

/// A live instance's key: the tenant and the module. Hashed by the tenant and the digest's
/// first 16 bytes (a SHA-256 prefix is as good a hash as the whole), compared whole.
#[derive(Clone, Copy, PartialEq, Eq)]
struct InstanceKey(TenantId, Digest);

impl std::hash::Hash for InstanceKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.0.as_u128());
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&self.1[..16]);
        state.write_u128(u128::from_le_bytes(prefix));
    }
}

/// The plugin instances of one partition engine (or one test run): calls are sequential.
pub struct PluginHost {
    runtime: Arc<PluginRuntime>,
    instances: Instances,
    /// Times calls (a TSC read each side).
    clock: quanta::Clock,
    buf: Vec<u8>,
    /// Full reports (every call timed, log lines kept) or health-only ones.
    full_reports: bool,
    /// Picks the calls a health-only host times (xorshift; never zero).
    sampler: u32,
}

impl PluginHost {
    pub fn new(runtime: Arc<PluginRuntime>) -> PluginHost {
        PluginHost {
            runtime,
            instances: Instances::default(),
            clock: quanta::Clock::new(),
            buf: Vec::new(),
            full_reports: true,
            sampler: 0x9e37_79b9,
        }
    }

    /// Whether calls report in full (the default): every call timed and the lines the plugin
    /// logs kept. A partition owner turns it off: its reports only feed health statistics,
    /// which have no use for log lines and are as good over a sample of the call times.
    pub fn set_full_reports(&mut self, full: bool) {
        self.full_reports = full;
    }

    /// Whether this call is timed: every one with full reports, else about one in
    /// [`TIMED_ONE_IN`], picked at random so no pattern in the events lines up with it.
    fn time_call(&mut self) -> bool {
        if self.full_reports {
            return true;
        }
        let mut x = self.sampler;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.sampler = x;
        x.is_multiple_of(TIMED_ONE_IN)
    }

    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    /// Calls a notifier plugin's `render` with an encoded input (see `notify::plugin`). A
    /// notifier has no state: host state calls see an empty state that the call drops.
    pub fn render(
        &mut self,
        tenant: TenantId,
        digest: &Digest,
        input: &[u8],
    ) -> (Result<PluginRequest, Failure>, u64, Vec<LogLine>) {
        let limits = self.runtime.limits;
        let key = InstanceKey(tenant, *digest);
        let live = match self.instances.live(&self.runtime, key) {
            Ok(l) => l,
            Err((f, fuel)) => return (Err(f), fuel, Vec::new()),
        };
        {
            let ctx = live.store.data_mut();
            *ctx.state = PluginState::default();
            ctx.now_ms = 0;
            ctx.logs.clear();
            ctx.memory_denied = false;
            ctx.event.set(None);
            ctx.alerts.set(None);
        }
        let result = call_buffer(live, input, limits).and_then(decode_request);
        let fuel_used = limits.fuel_per_call.saturating_sub(live.store.get_fuel().unwrap_or(0));
        let logs = std::mem::take(&mut live.store.data_mut().logs);
        *live.store.data_mut().state = PluginState::default();
        if result.as_ref().is_err_and(|f| f.kind != FailureKind::PluginError) {
            self.instances.remove(key);
        }
        (result, fuel_used, logs)
    }

    /// Calls a rule plugin for one event, with `state` (the rule's plugin state) available to
    /// the host functions and `alerts` answering `alert_open`. The state keeps the call's
    /// changes only if it returns a decision.
    pub fn evaluate(
        &mut self,
        tenant: TenantId,
        digest: &Digest,
        state: &mut Box<PluginState>,
        input: &CallInput<'_>,
        alerts: &mut dyn RuleAlerts,
    ) -> CallReport {
        let started = self.time_call().then(|| self.clock.raw());
        let took = |clock: &quanta::Clock| started.map(|s| clock.delta(s, clock.raw()));
        let limits = self.runtime.limits;
        let key = InstanceKey(tenant, *digest);
        let keep_logs = self.full_reports;
        let buf = &mut self.buf;
        let live = match self.instances.live(&self.runtime, key) {
            Ok(live) => live,
            Err((f, fuel)) => return CallReport::new(Outcome::Failure(f), fuel, took(&self.clock), Vec::new()),
        };
        std::mem::swap(&mut live.store.data_mut().state, state);
        {
            let ctx = live.store.data_mut();
            ctx.now_ms = input.time_ms;
            ctx.keep_logs = keep_logs;
            ctx.logs.clear();
            ctx.memory_denied = false;
            ctx.event.set(Some(input.event));
            ctx.alerts.set(Some(alerts));
        }
        let result = match live.entry {
            Entry::Buffer(_) => {
                encode_input(buf, input);
                call_buffer(live, buf, limits).and_then(decode_output)
            }
            Entry::Slots { .. } => call_slot(live, input, buf, limits).and_then(decode_output),
        };
        live.store.data_mut().event.set(None);
        live.store.data_mut().alerts.set(None);
        let fuel_used = limits.fuel_per_call.saturating_sub(live.store.get_fuel().unwrap_or(0));
        let logs = std::mem::take(&mut live.store.data_mut().logs);
        std::mem::swap(&mut live.store.data_mut().state, state);
        let discard = match &result {
            Ok(_) => {
                state.commit();
                false
            }
            Err(f) => {
                state.rollback();
                f.kind != FailureKind::PluginError
            }
        };
        if discard {
            self.instances.remove(key);
        }
        let outcome = match result {
            Ok(d) => Outcome::Decision(d),
            Err(f) => Outcome::Failure(f),
        };
        CallReport::new(outcome, fuel_used, took(&self.clock), logs)
    }

    /// Drops the instances of modules other than `keep` (after a rule-set change).
    pub fn retain(&mut self, keep: impl Fn(&TenantId, &Digest) -> bool) {
        self.instances.retain(|InstanceKey(t, d)| keep(t, d));
    }
}

/// The live instances of a host, by tenant and module. Consecutive calls mostly go to the
/// same module, so the last one used is tried before the index.
#[derive(Default)]
struct Instances {
    live: Vec<(InstanceKey, Live)>,
    index: foldhash::HashMap<InstanceKey, usize>,
    last: usize,
}

impl Instances {
    /// The live instance of a tenant's module, created when needed (within the instance
    /// limit).
    fn live(&mut self, runtime: &PluginRuntime, key: InstanceKey) -> Result<&mut Live, (Failure, u64)> {
        let at = match self.live.get(self.last) {
            Some((k, _)) if *k == key => Some(self.last),
            _ => self.index.get(&key).copied(),
        };
        let at = match at {
            Some(at) => at,
            None => {
                let limits = runtime.limits;
                if self.live.len() >= limits.max_instances {
                    // Bounded: drop an arbitrary instance; it is rebuilt when needed.
                    if let Some(&(k, _)) = self.live.first() {
                        self.remove(k);
                    }
                }
                let Some(module) = runtime.module(&key.1) else {
                    return Err((
                        failure(FailureKind::Unavailable, "the plugin's module is not loaded on this node"),
                        0,
                    ));
                };
                let live = instantiate(runtime, &module).map_err(|f| (f, limits.fuel_per_call))?;
                self.live.push((key, live));
                self.index.insert(key, self.live.len() - 1);
                self.live.len() - 1
            }
        };
        self.last = at;
        match self.live.get_mut(at) {
            Some((_, live)) => Ok(live),
            None => Err((failure(FailureKind::Unavailable, "the plugin's instance is gone"), 0)),
        }
    }

    fn remove(&mut self, key: InstanceKey) {
        let Some(at) = self.index.remove(&key) else { return };
        self.live.swap_remove(at);
        if let Some((moved, _)) = self.live.get(at) {
            self.index.insert(*moved, at);
        }
    }

    fn retain(&mut self, keep: impl Fn(&InstanceKey) -> bool) {
        self.live.retain(|(k, _)| keep(k));
        self.index = self.live.iter().enumerate().map(|(i, (k, _))| (*k, i)).collect();
    }
}

fn instantiate(runtime: &PluginRuntime, module: &Module) -> Result<Live, Failure> {
    let mut store = runtime.new_store();
    let Some(kind) = kind_of(module) else {
        return Err(failure(FailureKind::Unavailable, "the module has no entry point"));
    };
    let abi = Abi::of(module);
    let r = (|| -> wasmtime::Result<(Memory, TypedFunc<i32, i32>, Entry)> {
        store.set_fuel(runtime.limits.fuel_per_call)?;
        let instance: Instance = runtime.linker.instantiate(&mut store, module)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::Error::msg("module has no memory export"))?;
        let alloc = instance.get_typed_func::<i32, i32>(&mut store, "signalops_alloc")?;
        let entry = match (abi, kind) {
            (Abi::V2, PluginKind::Rule) => Entry::Slots {
                configure: instance.get_typed_func(&mut store, "signalops_configure")?,
                evaluate: instance.get_typed_func(&mut store, "evaluate")?,
                slots: foldhash::HashMap::default(),
            },
            (_, PluginKind::Rule) => Entry::Buffer(instance.get_typed_func(&mut store, "evaluate")?),
            (_, PluginKind::Notifier) => Entry::Buffer(instance.get_typed_func(&mut store, "render")?),
        };
        Ok((memory, alloc, entry))
    })();
    match r {
        Ok((memory, alloc, entry)) => {
            store.data_mut().memory = Some(memory);
            Ok(Live { store, memory, alloc, entry })
        }
        Err(e) => Err(classify(&e, store.data().memory_denied)),
    }
}

/// Writes `input` into a buffer the module allocates; returns its address.
fn write_input(live: &mut Live, input: &[u8]) -> wasmtime::Result<i32> {
    let len = i32::try_from(input.len()).map_err(|_| wasmtime::Error::msg("input too large"))?;
    let ptr = live.alloc.call(&mut live.store, len)?;
    live.memory
        .write(&mut live.store, ptr as u32 as usize, input)
        .map_err(|_| wasmtime::Error::msg(format!("signalops_alloc returned an out-of-bounds buffer {ptr}+{len}")))?;
    Ok(ptr)
}

/// One call with the whole input in a buffer (ABI v1 `evaluate`, `render`); the output's bytes.
fn call_buffer<'a>(live: &'a mut Live, input: &[u8], limits: Limits) -> Result<&'a [u8], Failure> {
    let run = (|| -> wasmtime::Result<i64> {
        live.store.set_fuel(limits.fuel_per_call)?;
        let ptr = write_input(live, input)?;
        let Entry::Buffer(entry) = &live.entry else {
            return Err(wasmtime::Error::msg("the module's entry point takes no input buffer"));
        };
        entry.call(&mut live.store, (ptr, input.len() as i32))
    })();
    match run {
        Ok(packed) => output(live, packed, limits),
        Err(e) => Err(classify(&e, live.store.data().memory_denied)),
    }
}

/// One ABI v2 `evaluate(slot)`: the rule's slot is configured first if this instance has not
/// seen the rule (or its version or config changed). The output's bytes.
fn call_slot<'a>(
    live: &'a mut Live,
    input: &CallInput<'_>,
    buf: &mut Vec<u8>,
    limits: Limits,
) -> Result<&'a [u8], Failure> {
    let run = (|| -> wasmtime::Result<Result<i64, Failure>> {
        live.store.set_fuel(limits.fuel_per_call)?;
        let Entry::Slots { slots, .. } = &live.entry else {
            return Err(wasmtime::Error::msg("the module is not an ABI v2 rule plugin"));
        };
        let known = slots.get(&input.rule_id);
        let current = known.filter(|s| s.version == input.rule_version && s.config == input.config).map(|s| s.index);
        let slot = match current {
            Some(slot) => slot,
            None => {
                let index = known.map_or(slots.len() as i32, |s| s.index);
                encode_rule(buf, input);
                let ptr = write_input(live, buf)?;
                let Entry::Slots { configure, slots, .. } = &mut live.entry else {
                    return Err(wasmtime::Error::msg("the module is not an ABI v2 rule plugin"));
                };
                let code = configure.call(&mut live.store, (index, ptr, buf.len() as i32))?;
                if code != 0 {
                    return Ok(Err(failure(
                        FailureKind::BadOutput,
                        format!("`signalops_configure` returned {code} for the rule's config"),
                    )));
                }
                let slot = Slot { index, version: input.rule_version, config: input.config.to_vec() };
                slots.insert(input.rule_id, slot);
                index
            }
        };
        let Entry::Slots { evaluate, .. } = &live.entry else {
            return Err(wasmtime::Error::msg("the module is not an ABI v2 rule plugin"));
        };
        Ok(Ok(evaluate.call(&mut live.store, slot)?))
    })();
    match run {
        Ok(Ok(packed)) => output(live, packed, limits),
        Ok(Err(f)) => Err(f),
        Err(e) => Err(classify(&e, live.store.data().memory_denied)),
    }
}

/// The output a call returned as `(ptr << 32) | len`, checked against the limit and the memory.
fn output(live: &Live, packed: i64, limits: Limits) -> Result<&[u8], Failure> {
    let ptr = (packed as u64 >> 32) as usize;
    let len = (packed as u64 & 0xffff_ffff) as usize;
    if len > limits.max_output_bytes {
        return Err(failure(
            FailureKind::BadOutput,
            format!("output is {len} bytes; the limit is {}", limits.max_output_bytes),
        ));
    }
    let data = live.memory.data(&live.store);
    ptr.checked_add(len)
        .and_then(|end| data.get(ptr..end))
        .ok_or_else(|| failure(FailureKind::BadOutput, format!("output {ptr}+{len} is outside the module's memory")))
}

/// The HTTP request a notifier plugin rendered (checked by the sender before it goes out).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A body given as MessagePack bin or str.
#[derive(Default)]
struct RawBody(Vec<u8>);

impl<'de> Deserialize<'de> for RawBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawBody, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes or a string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<RawBody, E> {
                Ok(RawBody(v.to_vec()))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawBody, E> {
                Ok(RawBody(v.as_bytes().to_vec()))
            }
            fn visit_unit<E>(self) -> Result<RawBody, E> {
                Ok(RawBody::default())
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct RawRequest {
    method: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: RawBody,
    error: Option<String>,
}

/// Reads a notifier's output map: `{"method", "url", "headers", "body"}` or `{"error"}`.
pub fn decode_request(bytes: &[u8]) -> Result<PluginRequest, Failure> {
    let raw: RawRequest = rmp_serde::from_slice(bytes)
        .map_err(|e| failure(FailureKind::BadOutput, format!("output is not an ABI v1 request map: {e}")))?;
    if let Some(msg) = raw.error {
        return Err(failure(FailureKind::PluginError, msg));
    }
    let url = raw.url.ok_or_else(|| failure(FailureKind::BadOutput, "output has no `url`"))?;
    Ok(PluginRequest {
        method: raw.method.unwrap_or_else(|| "POST".into()).to_ascii_uppercase(),
        url,
        headers: raw.headers.into_iter().collect(),
        body: raw.body.0,
    })
}

/// Reads a rule's output map (the same in ABI v1 and v2).
pub fn decode_output(bytes: &[u8]) -> Result<Decision, Failure> {
    // Most calls decide not to fire, and say so in exactly these bytes (what the SDK writes for
    // `Decision::skip()`): `{"fire": false}` / `{"fire": true}`.
    if let [0x81, 0xa4, b'f', b'i', b'r', b'e', b @ (0xc2 | 0xc3)] = bytes {
        return Ok(Decision {
            fire: *b == 0xc3,
            severity: None,
            title: None,
            labels: BTreeMap::new(),
            fields: Fields::default(),
        });
    }
    let out = read_output(bytes)
        .map_err(|e| failure(FailureKind::BadOutput, format!("output is not a decision map: {e}")))?;
    if let Some(msg) = out.error {
        return Err(failure(FailureKind::PluginError, msg));
    }
    let fire = out.fire.ok_or_else(|| failure(FailureKind::BadOutput, "output has no `fire`"))?;
    Ok(Decision { fire, severity: out.severity, title: out.title, labels: out.labels, fields: out.fields })
}

/// Writes the ABI v1 input map.
fn encode_input(buf: &mut Vec<u8>, input: &CallInput<'_>) {
    use rmp::encode as w;
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = w::write_map_len(buf, 4);
    let _ = w::write_str(buf, "abi");
    let _ = w::write_uint(buf, Abi::V1.number() as u64);
    let _ = w::write_str(buf, "event");
    guest_event::encode_event(buf, input.event);
    write_rule_members(buf, input);
}

/// Writes the input of ABI v2 `signalops_configure`: `{"abi", "config", "rule"}`.
fn encode_rule(buf: &mut Vec<u8>, input: &CallInput<'_>) {
    use rmp::encode as w;
    buf.clear();
    let _ = w::write_map_len(buf, 3);
    let _ = w::write_str(buf, "abi");
    let _ = w::write_uint(buf, Abi::V2.number() as u64);
    write_rule_members(buf, input);
}

/// The `config` and `rule` members of a rule's input.
fn write_rule_members(buf: &mut Vec<u8>, input: &CallInput<'_>) {
    use rmp::encode as w;
    let mut uuid_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let _ = w::write_str(buf, "config");
    buf.extend_from_slice(input.config);
    let _ = w::write_str(buf, "rule");
    let _ = w::write_map_len(buf, 2);
    let _ = w::write_str(buf, "id");
    let _ = w::write_str(buf, input.rule_id.hyphenated().encode_lower(&mut uuid_text));
    let _ = w::write_str(buf, "version");
    let _ = w::write_uint(buf, input.rule_version as u64);
}

/// Encodes a rule's `plugin.config` once, when the rule is compiled.
pub fn encode_config(config: &Value) -> Arc<[u8]> {
    rmp_serde::to_vec(config).unwrap_or_else(|_| vec![0x80]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_decisions_read_like_any_other_map() {
        for fire in [false, true] {
            let short = decode_output(&[0x81, 0xa4, b'f', b'i', b'r', b'e', if fire { 0xc3 } else { 0xc2 }]);
            // The same map in a longer form (str8 key) goes through the general reader.
            let long = decode_output(&[0x81, 0xd9, 4, b'f', b'i', b'r', b'e', if fire { 0xc3 } else { 0xc2 }]);
            assert_eq!(short.as_ref().ok(), long.as_ref().ok());
            assert_eq!(short.map(|d| d.fire).ok(), Some(fire));
        }
        assert!(decode_output(&[0x81, 0xa4, b'f', b'i', b'r', b'e', 0xc0]).is_err(), "fire must be a boolean");
    }
}
