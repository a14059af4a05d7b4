//! The instance cache: live instances per (tenant, module) in one host, from the node-wide
//! pooling allocator; one is thrown away after any trap or limit error.

use super::*;

/// Bytes of a discarded instance's linear memory put back in place (only the pages it touched;
/// the rest is returned to the kernel). A typical plugin touches less than this.
pub(super) const KEEP_RESIDENT_BYTES: usize = 1 << 20;

/// Instances come from a pool of reusable slots rather than fresh mappings. An instance is
/// thrown away after every trap, and unmapping its memory would make the kernel interrupt every
/// core running one of the node's threads (a TLB shootdown), so a plugin that traps on every
/// event would slow other tenants' partitions; a pooled slot is reset in place instead, and a
/// module's next instance usually lands in the slot its last one had, with its data in place.
pub(super) fn instance_pool(cfg: &PluginsConfig) -> InstanceAllocationStrategy {
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

/// One live instance.
pub(super) struct Live {
    pub(super) store: Store<HostCtx>,
    pub(super) memory: Memory,
    pub(super) alloc: TypedFunc<i32, i32>,
    pub(super) entry: Entry,
}

/// How a live instance is called.
pub(super) enum Entry {
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
pub(super) struct Slot {
    pub(super) index: i32,
    pub(super) version: u32,
    pub(super) config: Vec<u8>,
}

/// A live instance's key: the tenant and the module. Hashed by the tenant and the digest's
/// first 16 bytes (a SHA-256 prefix is as good a hash as the whole), compared whole.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct InstanceKey(pub(super) TenantId, pub(super) Digest);

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
    pub(super) runtime: Arc<PluginRuntime>,
    pub(super) instances: Instances,
    /// Times calls (a TSC read each side).
    pub(super) clock: quanta::Clock,
    pub(super) buf: Vec<u8>,
    /// Full reports (every call timed, log lines kept) or health-only ones.
    pub(super) full_reports: bool,
    /// Picks the calls a health-only host times (xorshift; never zero).
    pub(super) sampler: u32,
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
    pub(super) fn time_call(&mut self) -> bool {
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
pub(super) struct Instances {
    pub(super) live: Vec<(InstanceKey, Live)>,
    pub(super) index: foldhash::HashMap<InstanceKey, usize>,
    pub(super) last: usize,
}

impl Instances {
    /// The live instance of a tenant's module, created when needed (within the instance
    /// limit).
    pub(super) fn live(&mut self, runtime: &PluginRuntime, key: InstanceKey) -> Result<&mut Live, (Failure, u64)> {
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

    pub(super) fn remove(&mut self, key: InstanceKey) {
        let Some(at) = self.index.remove(&key) else { return };
        self.live.swap_remove(at);
        if let Some((moved, _)) = self.live.get(at) {
            self.index.insert(*moved, at);
        }
    }

    pub(super) fn retain(&mut self, keep: impl Fn(&InstanceKey) -> bool) {
        self.live.retain(|(k, _)| keep(k));
        self.index = self.live.iter().enumerate().map(|(i, (k, _))| (*k, i)).collect();
    }
}

pub(super) fn instantiate(runtime: &PluginRuntime, module: &Module) -> Result<Live, Failure> {
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
