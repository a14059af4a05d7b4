//! Host functions: the per-call context a module runs with (limits, plugin state, the event and
//! the rule's alerts), the memory and table limiter, and the `signalops` import module.

use super::*;

/// Fuel a host call costs before counting the bytes it moves.
pub(super) const HOST_CALL_FUEL: u64 = 200;

/// Elements a module's table may have.
pub(super) const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The store data of one instance.
pub struct HostCtx {
    /// The calling rule's plugin state, swapped in for the call (a box, so that is a pointer swap).
    pub(super) state: Box<PluginState>,
    pub(super) now_ms: i64,
    pub(super) logs: Vec<LogLine>,
    /// Whether `log` lines are kept (test runs and dry-runs) or only checked and charged.
    pub(super) keep_logs: bool,
    /// The instance's memory, once instantiated.
    pub(super) memory: Option<Memory>,
    pub(super) memory_denied: bool,
    pub(super) limits: Limits,
    /// The event of the rule call in progress (ABI v2 `event_get` / `event_number`).
    pub(super) event: CallEvent,
    /// Where `event_get` encodes a value before copying it into the module's memory.
    pub(super) scratch: Vec<u8>,
    /// What answers `alert_open` during the rule call in progress.
    pub(super) alerts: CallAlerts,
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
pub(super) struct CallAlerts(pub(super) Option<std::ptr::NonNull<dyn RuleAlerts>>);

// SAFETY: as for `CallEvent`: only dereferenced by `alert_open`, on the thread that called into
// the module, during `PluginHost::evaluate`, while the value it points to is borrowed by it.
#[allow(unsafe_code)]
unsafe impl Send for CallAlerts {}

impl CallAlerts {
    pub(super) fn set(&mut self, alerts: Option<&mut dyn RuleAlerts>) {
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

    pub(super) fn alert_open(&mut self) -> bool {
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
pub(super) struct CallEvent(pub(super) Option<std::ptr::NonNull<EventRecord>>);

// SAFETY: the pointer is only dereferenced by host functions, which run on the thread that
// called into the module, during `PluginHost::evaluate`, while the event it points to is
// borrowed by that call.
#[allow(unsafe_code)]
unsafe impl Send for CallEvent {}

impl CallEvent {
    pub(super) fn set(&mut self, ev: Option<&EventRecord>) {
        self.0 = ev.map(std::ptr::NonNull::from);
    }

    pub(super) fn get(&self) -> Option<&EventRecord> {
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

/// The caller's memory (remembered at instantiation; looked up by name before that).
pub(super) fn guest_memory(caller: &mut Caller<'_, HostCtx>) -> wasmtime::Result<Memory> {
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
pub(super) fn with_guest_bytes<R>(
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
pub(super) fn charge(caller: &mut Caller<'_, HostCtx>, bytes: usize) -> wasmtime::Result<()> {
    let cost = HOST_CALL_FUEL.saturating_add(bytes as u64);
    let fuel = caller.get_fuel()?;
    if fuel < cost {
        caller.set_fuel(0)?;
        return Err(Trap::OutOfFuel.into());
    }
    caller.set_fuel(fuel - cost)
}

pub(super) fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<HostCtx>> {
    let mut l = Linker::new(engine);
    for abi in [Abi::V1, Abi::V2] {
        define_host_functions(&mut l, abi.namespace())?;
    }
    define_v2_functions(&mut l, Abi::V2.namespace())?;
    Ok(l)
}

/// The host functions every ABI version has, in namespace `ns`.
pub(super) fn define_host_functions(l: &mut Linker<HostCtx>, ns: &str) -> wasmtime::Result<()> {
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
            if vl as u32 as usize > crate::state::MAX_VALUE_BYTES {
                return Ok(crate::state::ERR_INVALID as i32);
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
pub(super) fn define_v2_functions(l: &mut Linker<HostCtx>, ns: &str) -> wasmtime::Result<()> {
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
