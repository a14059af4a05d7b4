//! Health of each plugin as this node sees it: invocations, failures by kind, call times,
//! the last error and the current run of consecutive failures. Also exported as metrics
//! labelled by tenant and plugin.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use uuid::Uuid;

use signalops_core::model::TenantId;
use signalops_core::telemetry;

use crate::runtime::{CallReport, FailureKind, Outcome};

/// Call times kept for percentiles (of the timed calls: see `runtime::TIMED_ONE_IN`).
const TIMES_KEPT: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub kind: FailureKind,
    pub message: String,
    pub at_ms: i64,
}

#[derive(Debug)]
struct Entry {
    /// Metric handles, registered once per (tenant, plugin) rather than per call.
    calls: metrics::Counter,
    duration: metrics::Histogram,
    invocations: u64,
    fired: u64,
    failures: BTreeMap<FailureKind, u64>,
    consecutive_failures: u32,
    last_error: Option<LastError>,
    /// The latest timed calls' times, nanoseconds.
    nanos: VecDeque<u32>,
}

/// What the API shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PluginHealth {
    pub invocations: u64,
    pub fired: u64,
    pub failures: BTreeMap<FailureKind, u64>,
    pub consecutive_failures: u32,
    /// Call time percentiles, microseconds (to the nanosecond).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub last_error: Option<LastError>,
}

/// A request to disable a plugin's rules after too many failures in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisableRequest {
    pub tenant: TenantId,
    pub plugin: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct PluginStatsRegistry {
    inner: Arc<Mutex<HashMap<(TenantId, Uuid), Entry>>>,
    disable: Arc<Mutex<Vec<DisableRequest>>>,
}

impl PluginStatsRegistry {
    fn entry(map: &mut HashMap<(TenantId, Uuid), Entry>, tenant: TenantId, plugin: Uuid) -> &mut Entry {
        map.entry((tenant, plugin)).or_insert_with(|| {
            let (t, p) = (tenant.to_string(), plugin.to_string());
            Entry {
                calls: metrics::counter!(telemetry::PLUGIN_CALLS, "tenant_id" => t.clone(), "plugin_id" => p.clone()),
                duration: metrics::histogram!(telemetry::PLUGIN_CALL_DURATION, "tenant_id" => t, "plugin_id" => p),
                invocations: 0,
                fired: 0,
                failures: BTreeMap::new(),
                consecutive_failures: 0,
                last_error: None,
                nanos: VecDeque::new(),
            }
        })
    }

    /// Records one call; asks for the plugin to be disabled when its run of failures reaches
    /// `max_consecutive`.
    pub fn record(&self, tenant: TenantId, plugin: Uuid, r: &CallReport, at_ms: i64, max_consecutive: u32) {
        let Ok(mut map) = self.inner.lock() else { return };
        let e = Self::entry(&mut map, tenant, plugin);
        if let Some(nanos) = r.nanos {
            e.add_time(nanos);
        }
        e.calls.increment(1);
        e.invocations += 1;
        match &r.outcome {
            Outcome::Decision(d) => {
                e.consecutive_failures = 0;
                e.fired += d.fire as u64;
            }
            Outcome::Failure(f) => {
                metrics::counter!(telemetry::PLUGIN_FAILURES, "tenant_id" => tenant.to_string(),
                    "plugin_id" => plugin.to_string(), "kind" => f.kind.as_str())
                .increment(1);
                *e.failures.entry(f.kind).or_default() += 1;
                e.consecutive_failures += 1;
                e.last_error = Some(LastError { kind: f.kind, message: f.message.clone(), at_ms });
                tracing::warn!(tenant_id = %tenant, plugin_id = %plugin, kind = f.kind.as_str(), error = %f.message, "plugin call failed");
                if max_consecutive > 0 && e.consecutive_failures % max_consecutive == 0 {
                    let reason = format!(
                        "{max_consecutive} consecutive failures; last: {} ({})",
                        f.kind.as_str(),
                        truncate(&f.message, 200)
                    );
                    tracing::warn!(tenant_id = %tenant, plugin_id = %plugin, %reason, "disabling plugin");
                    if let Ok(mut d) = self.disable.lock() {
                        d.push(DisableRequest { tenant, plugin, reason });
                    }
                }
            }
        }
    }

    /// Records a run of successful calls of one plugin at once (see [`PendingCalls`]).
    fn record_decisions(&self, tenant: TenantId, plugin: Uuid, p: &Pending) {
        let Ok(mut map) = self.inner.lock() else { return };
        let e = Self::entry(&mut map, tenant, plugin);
        for &n in &p.nanos {
            e.add_time(n);
        }
        e.calls.increment(p.calls);
        e.invocations += p.calls;
        e.fired += p.fired;
        e.consecutive_failures = 0;
    }

    /// Takes the pending disable requests.
    pub fn take_disable_requests(&self) -> Vec<DisableRequest> {
        self.disable.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default()
    }

    /// Forgets the run of failures (when the plugin is enabled again).
    pub fn reset_failures(&self, tenant: TenantId, plugin: Uuid) {
        if let Ok(mut map) = self.inner.lock() {
            if let Some(e) = map.get_mut(&(tenant, plugin)) {
                e.consecutive_failures = 0;
            }
        }
    }

    pub fn health(&self, tenant: TenantId, plugin: Uuid) -> PluginHealth {
        let Ok(map) = self.inner.lock() else { return PluginHealth::default() };
        let Some(e) = map.get(&(tenant, plugin)) else { return PluginHealth::default() };
        let mut times: Vec<u32> = e.nanos.iter().copied().collect();
        times.sort_unstable();
        let pct = |q: f64| {
            (!times.is_empty()).then(|| f64::from(times[((times.len() - 1) as f64 * q).round() as usize]) / 1000.0)
        };
        PluginHealth {
            invocations: e.invocations,
            fired: e.fired,
            failures: e.failures.clone(),
            consecutive_failures: e.consecutive_failures,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            last_error: e.last_error.clone(),
        }
    }
}

impl Entry {
    fn add_time(&mut self, nanos: u64) {
        self.duration.record(nanos as f64 / 1e9);
        if self.nanos.len() == TIMES_KEPT {
            self.nanos.pop_front();
        }
        self.nanos.push_back(nanos.min(u32::MAX as u64) as u32);
    }
}

/// The successful calls of one partition engine since its last batch ended, per plugin. A
/// partition makes many calls per batch; taking the registry's lock once per batch instead of
/// once per call keeps health recording off the per-event cost. Failures are recorded at once
/// (after the plugin's pending successes, so runs of failures count right).
#[derive(Debug, Default)]
pub struct PendingCalls {
    entries: Vec<((TenantId, Uuid), Pending)>,
}

#[derive(Debug, Default)]
struct Pending {
    calls: u64,
    fired: u64,
    nanos: Vec<u64>,
}

impl PendingCalls {
    /// Records one call: decisions wait for [`flush`](PendingCalls::flush); a failure flushes
    /// the plugin's pending decisions and is recorded now.
    pub fn record(
        &mut self,
        registry: &PluginStatsRegistry,
        tenant: TenantId,
        plugin: Uuid,
        r: &CallReport,
        at_ms: i64,
        max_consecutive: u32,
    ) {
        let key = (tenant, plugin);
        let i = match self.entries.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.entries.push((key, Pending::default()));
                self.entries.len() - 1
            }
        };
        let p = &mut self.entries[i].1;
        match &r.outcome {
            Outcome::Decision(d) => {
                p.fired += d.fire as u64;
                p.nanos.extend(r.nanos);
                p.calls += 1;
            }
            Outcome::Failure(_) => {
                let (_, p) = self.entries.swap_remove(i);
                if p.calls > 0 {
                    registry.record_decisions(tenant, plugin, &p);
                }
                registry.record(tenant, plugin, r, at_ms, max_consecutive);
            }
        }
    }

    /// Records everything pending.
    pub fn flush(&mut self, registry: &PluginStatsRegistry) {
        for ((tenant, plugin), p) in self.entries.drain(..) {
            registry.record_decisions(tenant, plugin, &p);
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
