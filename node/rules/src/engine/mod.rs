//! The rule engine of one partition: evaluates every event of the partition, in log order,
//! against its tenant's rules, keeps window and alert state per (rule, group), and produces the
//! partition's [`PartitionEffects`].
//!
//! ## Time
//! - Each event has an effective time `t = min(occurred_at, received_at + max_future)`, so a
//!   producer clock far ahead cannot push windows into the future.
//! - The partition clock is the latest `received_at` or tick time seen, in log order. Ticks are
//!   messages the control-plane leader publishes into every partition each second, so time
//!   passes for idle tenants and replaying the log replays the same clock.
//! - A group's head is the latest `t` of its events, moved up to the watermark
//!   (`clock - allowed_lateness`) at each tick. Windows are evaluated at the head. An event
//!   older than `head - allowed_lateness`, or older than the window itself, is late: it is
//!   stored and counted in series and the catalog, but not in windows.
//! - Absence rules use the partition clock: they fire `seconds` after the last matching event
//!   was received (or after the rule appeared, for an ungrouped rule that never saw one).
//!
//! ## Exactly-once
//! Effects are derived only from log positions above the last committed one: the engine
//! skips positions it has processed, and does not emit series or catalog increments for
//! positions at or below `committed_seq` (already committed before a restart). Alert ids are
//! deterministic, so re-deriving an alert during recovery rewrites the same record.
//!
//! ## Parts
//! This file holds the engine's state types and the event path (an event's rules, groups and
//! windows). [`sync`] keeps that state in step with changed rules, [`classes`] runs windows
//! shared by several rules, [`transitions`] fires and resolves alerts and runs ticks,
//! [`plugin`] calls rule plugins, and [`checkpoint`] writes and restores the state.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BufMut;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use signalops_core::alert::{alert_id, Alert, AlertKind, AlertState};
use signalops_core::effects::{
    CatalogDelta, CatalogEntry, EngineMeta, PartitionEffects, SeriesDelta, SeriesPoint, StateCheckpoint, StateKey,
    Transition,
};
use signalops_core::model::{EncodedEvent, EventRecord, TenantId};
use signalops_core::telemetry;
use signalops_plugins::runtime::{CallInput, CallReport, Decision, Outcome, RuleAlerts};
use signalops_plugins::state::{Counter, EntryKey, PluginState};
use signalops_plugins::stats::PendingCalls;
use signalops_plugins::{PluginHost, PluginStatsRegistry};

use crate::catalog;
use crate::compiled::{CompiledRule, PluginBinding, RuleKind, RuleSet, TenantRules, WindowClass};
use crate::filter::Fields;
use crate::window::{distinct_hash, window_from_stored, Bucket, Insert, Timeline, Window};

pub use signalops_core::config::EngineConfig;

mod checkpoint;
mod classes;
mod plugin;
mod sync;
#[cfg(test)]
mod tests;
mod transitions;

use classes::*;
use plugin::*;
use sync::*;
use transitions::*;

/// A window class's group is stored under the class id (as `rule`) and this prefix followed
/// by the group key.
const CLASS_GROUP: &str = "\u{0}c";

/// Hash maps on the event path: seeded foldhash (much cheaper than SipHash for short keys).
type FastMap<K, V> = foldhash::HashMap<K, V>;

/// A group's identity in its rule's table: the XXH3-128 hash of its key text. Rules probe
/// their tables with a hash computed once per event instead of hashing and comparing the key
/// text per rule; two of a rule's groups share an id with probability about n²/2¹²⁹.
type GroupId = u128;

fn group_id(key: &str) -> GroupId {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

/// How many triggering event ids an alert keeps.
pub const EVENT_SAMPLE: usize = 10;

/// One log message as the engine sees it.
pub enum Input<'a> {
    /// An event the store holds at this position (not a duplicate of an earlier event).
    Event { seq: u64, record: &'a EventRecord },
    /// The same, as the log carries it: the payload is decoded only if one of the tenant's
    /// rules reads the event (most events of most tenants are only counted and catalogued).
    Logged { seq: u64, event: &'a EncodedEvent },
    /// A clock tick published by the leader.
    Tick { seq: u64, at_ms: i64 },
    /// Anything else at this position (duplicates, undecodable messages).
    Skip { seq: u64 },
}

/// An event on its way into [`Engine::on_event`].
#[derive(Clone, Copy)]
enum Arrived<'a> {
    Decoded(&'a EventRecord),
    Encoded(&'a EncodedEvent),
}

impl<'a> Arrived<'a> {
    fn key(self) -> (TenantId, &'a str) {
        match self {
            Arrived::Decoded(r) => (r.tenant_id, r.event_type.as_str()),
            Arrived::Encoded(e) => (e.tenant_id, e.event_type.as_str()),
        }
    }

    fn occurred_at_ms(self) -> i64 {
        match self {
            Arrived::Decoded(r) => r.occurred_at_ms,
            Arrived::Encoded(e) => e.occurred_at_ms,
        }
    }

    fn received_at_ms(self) -> i64 {
        match self {
            Arrived::Decoded(r) => r.received_at_ms,
            Arrived::Encoded(e) => e.received_at_ms,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RuleMeta {
    version: u32,
    shape: u64,
    dropped_groups: u64,
    /// Partition clock when the engine first saw this rule version's shape.
    since_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GroupState {
    /// The group key: the state's key in checkpoints and part of alert ids.
    #[serde(skip)]
    key: String,
    #[serde(skip)]
    id: GroupId,
    /// Group-by values, for the alert's `group`.
    values: Vec<Value>,
    head_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<Window>,
    /// Event rules: time of the last matching event; absence rules: when it was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_seen_ms: Option<i64>,
    #[serde(default)]
    recent: VecDeque<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_since_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    open: Option<Alert>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_fired_ms: Option<i64>,
    /// Changed since the last checkpoint.
    #[serde(skip)]
    dirty: bool,
    /// The open alert changed since the last effects were taken.
    #[serde(skip)]
    alert_dirty: bool,
}

impl GroupState {
    fn new(key: String, values: Vec<Value>, head_ms: i64, kind: &RuleKind) -> GroupState {
        GroupState {
            id: group_id(&key),
            key,
            values,
            head_ms,
            window: match kind {
                RuleKind::Window { spec, .. } => Some(Window::new(spec.seconds)),
                _ => None,
            },
            last_seen_ms: None,
            recent: VecDeque::new(),
            pending_since_ms: None,
            open: None,
            last_fired_ms: None,
            dirty: true,
            alert_dirty: false,
        }
    }
}

#[derive(Debug, Default)]
struct RuleState {
    meta: RuleMeta,
    meta_dirty: bool,
    /// Boxed so the table stays small and probes stay in cache. A window rule's groups live
    /// in its window class ([`ClassState`]) instead, and are here only between a restore (or a
    /// rule change) and the next event.
    groups: FastMap<GroupId, Box<GroupState>>,
    /// How many groups this (window) rule has in its window class.
    lanes: usize,
    /// Window counters and key-value state of a plugin rule.
    plugin: Box<PluginState>,
}

/// What the engine needs to run plugin rules.
pub struct EnginePlugins {
    pub host: PluginHost,
    /// Where call health is recorded (none for dry-runs and backtests).
    pub stats: Option<PluginStatsRegistry>,
    pub max_consecutive_failures: u32,
    /// Dry-runs keep every call's report.
    pub reports: Option<Vec<(String, Uuid, CallReport)>>,
    /// Health of this batch's calls, recorded into `stats` when the batch's effects are taken.
    pub pending: PendingCalls,
}

/// The compiled rules one event type meets.
#[derive(Debug, Clone)]
struct TypeIndex {
    /// Indexes of the rules matching the type.
    rules: Arc<[usize]>,
    /// Of those, one rule per distinct numeric field (for series sums).
    sum_fields: Arc<[usize]>,
}

#[derive(Debug, Default)]
struct TenantState {
    compiled: Option<Arc<TenantRules>>,
    by_type: FastMap<String, TypeIndex>,
    rules: FastMap<Uuid, RuleState>,
    /// Window state, per window class of `compiled` (same order).
    classes: Vec<ClassState>,
    /// Stored window state read at restore (shared groups, and window groups stored per rule
    /// before classes existed): rewritten in the current layout once the rules are known.
    restored: Vec<StateKey>,
}

/// Buffers of what the engine emits between two `take_effects`.
#[derive(Default)]
struct Out {
    alerts: Vec<Alert>,
    /// Alerts that fired or resolved, in order (what notifications are sent for).
    transitions: Vec<(Uuid, Transition)>,
    series: FastMap<(TenantId, String, i64), SeriesPoint>,
    catalog: FastMap<(TenantId, String), CatalogEntry>,
    /// Groups whose open alert changed (written at the end of the batch).
    alert_dirty: Vec<(TenantId, Uuid, GroupId)>,
    /// Groups and rule metas changed since the last checkpoint.
    state_dirty: Vec<StateKey>,
    deletes: Vec<StateKey>,
    fired: u64,
    resolved: u64,
    late: u64,
    dropped_groups: u64,
}

/// Statistics of one rule in this partition, for the API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RuleStats {
    pub groups: usize,
    pub dropped_groups: u64,
    pub firing: usize,
}

pub struct Engine {
    partition: u32,
    cfg: EngineConfig,
    /// Last position processed.
    processed_seq: u64,
    /// Positions at or below this had their increments committed before (re)start.
    committed_seq: u64,
    clock_ms: i64,
    /// The position the stored state reflects (the last checkpoint).
    state_seq: u64,
    tenants: FastMap<TenantId, TenantState>,
    out: Out,
    /// Group keys of the event being processed, one per distinct `group_by` list of its
    /// tenant (`TenantRules::group_class`), built on first use.
    group_keys: Vec<(String, GroupId)>,
    group_key_ready: Vec<bool>,
    /// Window rules the event being processed matched, per window class: (lane, rule index);
    /// and the classes with any, in order.
    class_hits: Vec<Vec<(usize, usize)>>,
    classes_hit: Vec<usize>,
    /// Events processed since the last checkpoint.
    since_checkpoint: u64,
    plugins: Option<EnginePlugins>,
}

/// Why stored engine state could not be restored.
#[derive(Debug, thiserror::Error)]
#[error("engine state for rule {rule} is unreadable: {source}")]
pub struct RestoreError {
    rule: Uuid,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Engine {
    pub fn new(partition: u32, cfg: EngineConfig) -> Engine {
        Engine {
            partition,
            cfg,
            processed_seq: 0,
            committed_seq: 0,
            clock_ms: 0,
            state_seq: 0,
            tenants: FastMap::default(),
            out: Out::default(),
            group_keys: Vec::new(),
            group_key_ready: Vec::new(),
            class_hits: Vec::new(),
            classes_hit: Vec::new(),
            since_checkpoint: 0,
            plugins: None,
        }
    }

    /// Lets the engine run plugin rules (without, plugin rules never fire and nothing is
    /// recorded; dry-runs of declarative rules need none).
    pub fn set_plugins(&mut self, mut plugins: EnginePlugins) {
        plugins.host.set_full_reports(plugins.reports.is_some());
        self.plugins = Some(plugins);
    }

    pub fn plugins_mut(&mut self) -> Option<&mut EnginePlugins> {
        self.plugins.as_mut()
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The last log position processed; the log is read again from the one after.
    pub fn processed_seq(&self) -> u64 {
        self.processed_seq
    }

    /// Events processed since the last checkpoint.
    pub fn since_checkpoint(&self) -> u64 {
        self.since_checkpoint
    }

    pub fn process(&mut self, input: Input<'_>, rules: &RuleSet) {
        let seq = match &input {
            Input::Event { seq, .. } | Input::Logged { seq, .. } | Input::Tick { seq, .. } | Input::Skip { seq } => {
                *seq
            }
        };
        if seq <= self.processed_seq {
            return;
        }
        self.processed_seq = seq;
        self.since_checkpoint += 1;
        let announced = self.out.transitions.len();
        match input {
            Input::Event { seq, record } => self.on_event(seq, Arrived::Decoded(record), rules),
            Input::Logged { seq, event } => self.on_event(seq, Arrived::Encoded(event), rules),
            Input::Tick { seq, at_ms } => self.on_tick(seq, at_ms, rules),
            Input::Skip { .. } => {}
        }
        if seq <= self.committed_seq {
            // Recovery: these transitions were announced (their jobs queued) before the restart.
            self.out.transitions.truncate(announced);
        }
    }

    fn on_event(&mut self, seq: u64, arrived: Arrived<'_>, rules: &RuleSet) {
        let (tenant, event_type) = arrived.key();
        self.clock_ms = self.clock_ms.max(arrived.received_at_ms());
        let counts = seq > self.committed_seq;
        let Some(compiled) = rules.tenants.get(&tenant) else {
            if counts {
                self.count(arrived, None, &[]);
            }
            if self.tenants.contains_key(&tenant) {
                self.drop_tenant(tenant);
            }
            return;
        };
        let clock = self.clock_ms;
        let ts = self.tenants.entry(tenant).or_default();
        sync_tenant(tenant, ts, compiled, clock, &mut self.out);
        let index = match ts.by_type.get(event_type) {
            Some(i) => i.clone(),
            None => {
                let i = type_index(compiled, event_type);
                ts.by_type.insert(event_type.to_string(), i.clone());
                i
            }
        };
        let decoded;
        let ev = match arrived {
            Arrived::Decoded(record) => record,
            Arrived::Encoded(_) if index.rules.is_empty() && index.sum_fields.is_empty() => {
                if counts {
                    self.count(arrived, None, &[]);
                }
                return;
            }
            Arrived::Encoded(event) => match rmp_serde::from_slice::<EventRecord>(&event.record) {
                Ok(record) => {
                    decoded = record;
                    &decoded
                }
                Err(e) => {
                    // Stored, counted and catalogued; no rule sees it.
                    metrics::counter!(telemetry::EVENTS_UNDECODABLE, "reason" => "decode").increment(1);
                    tracing::warn!(partition = self.partition, seq, error = %e, "event cannot be decoded for its rules");
                    if counts {
                        self.count(arrived, None, &[]);
                    }
                    return;
                }
            },
        };
        if counts {
            self.count(Arrived::Decoded(ev), Some(compiled), &index.sum_fields);
        }
        if index.rules.is_empty() {
            return;
        }
        let Some(ts) = self.tenants.get_mut(&ev.tenant_id) else { return };
        let t = ev.occurred_at_ms.min(ev.received_at_ms.saturating_add(self.cfg.max_future_ms));
        let id: Arc<str> = Arc::from(ev.id.as_str());
        let ctx = Ctx { tenant: ev.tenant_id, compiled, cfg: &self.cfg, clock_ms: clock, trigger: seq };
        let mut fields = Fields::new(ev);
        self.group_key_ready.clear();
        self.group_key_ready.resize(compiled.group_classes, false);
        if self.group_keys.len() < compiled.group_classes {
            self.group_keys.resize(compiled.group_classes, (String::new(), 0));
        }
        for c in self.classes_hit.drain(..) {
            if let Some(h) = self.class_hits.get_mut(c) {
                h.clear();
            }
        }
        if self.class_hits.len() < compiled.window_classes.len() {
            self.class_hits.resize_with(compiled.window_classes.len(), Vec::new);
        }
        for &i in index.rules.iter() {
            let Some(rule) = compiled.rules.get(i) else { continue };
            if rule.filter.as_ref().is_some_and(|f| !f.matches_fields(&mut fields)) {
                continue;
            }
            if let Some(&Some((class, lane))) = compiled.window_lane.get(i) {
                if let Some(hits) = self.class_hits.get_mut(class) {
                    if hits.is_empty() {
                        self.classes_hit.push(class);
                    }
                    hits.push((lane, i));
                }
                continue;
            }
            let gc = compiled.group_class.get(i).copied().unwrap_or_default();
            let decision = match &rule.kind {
                RuleKind::Plugin(binding) => {
                    let rs = rule_state(&mut ts.rules, rule, clock, &mut self.out, ev.tenant_id);
                    let mut alerts = GroupAlerts {
                        keys: &mut self.group_keys,
                        ready: &mut self.group_key_ready,
                        gc,
                        rule,
                        fields: &mut fields,
                        groups: &rs.groups,
                        t,
                        floor_ms: clock - self.cfg.allowed_lateness_ms,
                    };
                    match call_plugin(&mut self.plugins, binding, rule, &mut rs.plugin, ev, t, clock, &mut alerts) {
                        Some(d) if d.fire => Some(d),
                        _ => continue,
                    }
                }
                _ => None,
            };
            let Some(key) = event_key(&mut self.group_keys, &mut self.group_key_ready, gc, rule, &mut fields) else {
                continue;
            };
            on_rule_event(&ctx, ts, rule, &mut fields, &id, t, key, &mut self.out, decision.as_ref());
        }
        // Window rules, one class (one group lookup, one timeline) at a time; within a class
        // the hits are in lane order.
        for &class in &self.classes_hit {
            let Some(run) = self.class_hits.get(class) else { continue };
            let Some(&(_, first)) = run.first() else { continue };
            let Some(rule) = compiled.rules.get(first) else { continue };
            let gc = compiled.group_class.get(first).copied().unwrap_or_default();
            let Some(key) = event_key(&mut self.group_keys, &mut self.group_key_ready, gc, rule, &mut fields) else {
                continue;
            };
            on_class_event(&ctx, ts, class, run, &mut fields, &id, t, key, &mut self.out);
        }
    }

    fn on_tick(&mut self, seq: u64, at_ms: i64, rules: &RuleSet) {
        self.clock_ms = self.clock_ms.max(at_ms);
        let clock = self.clock_ms;
        let gone: Vec<TenantId> = self.tenants.keys().filter(|t| !rules.tenants.contains_key(t)).copied().collect();
        for t in gone {
            self.drop_tenant(t);
        }
        for (tenant, compiled) in &rules.tenants {
            let ts = self.tenants.entry(*tenant).or_default();
            sync_tenant(*tenant, ts, compiled, clock, &mut self.out);
            let ctx = Ctx { tenant: *tenant, compiled, cfg: &self.cfg, clock_ms: clock, trigger: seq };
            tick_tenant(&ctx, ts, &mut self.out);
        }
        self.tenants.retain(|_, ts| !ts.rules.is_empty() || ts.compiled.as_ref().is_some_and(|c| !c.rules.is_empty()));
    }

    /// Removes all state of a tenant that has no rules left.
    fn drop_tenant(&mut self, tenant: TenantId) {
        let Some(mut ts) = self.tenants.remove(&tenant) else { return };
        dissolve_classes(tenant, &mut ts, &mut self.out);
        for (rule_id, rs) in ts.rules {
            drop_rule_state(tenant, rule_id, rs, self.clock_ms, &mut self.out);
        }
    }

    /// Series and catalog increments for one event; `sum_fields` are the rules whose numeric
    /// fields the series sums.
    fn count(&mut self, ev: Arrived<'_>, compiled: Option<&Arc<TenantRules>>, sum_fields: &[usize]) {
        let (tenant, event_type) = ev.key();
        let minute = ev.occurred_at_ms().div_euclid(60_000);
        let point = self.out.series.entry((tenant, event_type.to_string(), minute)).or_default();
        point.count += 1;
        if let (Some(compiled), Arrived::Decoded(record)) = (compiled, ev) {
            for &i in sum_fields {
                let Some(field) = compiled.rules.get(i).and_then(|r| r.numeric_field()) else { continue };
                if let Some(v) = field.resolve(record).and_then(|v| v.as_f64()) {
                    match point.sums.get_mut(field.as_str()) {
                        Some(s) => *s += v,
                        None => {
                            point.sums.insert(field.as_str().to_string(), v);
                        }
                    }
                }
            }
        }
        let entry = self.out.catalog.entry((tenant, event_type.to_string())).or_default();
        let received = ev.received_at_ms();
        let seen = CatalogEntry {
            count: 1,
            first_seen_ms: received,
            last_seen_ms: received,
            fields: Default::default(),
            fields_truncated: false,
        };
        entry.merge(&seen);
        match ev {
            Arrived::Decoded(record) => catalog::note_payload(&record.payload, entry),
            Arrived::Encoded(event) => {
                if let Err(e) = catalog::note_encoded(&event.record, entry) {
                    tracing::debug!(partition = self.partition, error = %e, "payload fields not catalogued");
                }
            }
        }
    }

    /// Per-rule statistics of this partition.
    pub fn stats(&self) -> Vec<(TenantId, Uuid, RuleStats)> {
        let mut out = Vec::new();
        for (tenant, ts) in &self.tenants {
            let mut lanes_firing: FastMap<Uuid, usize> = FastMap::default();
            for cs in &ts.classes {
                for g in cs.groups.values() {
                    for (rule, _) in cs.rule_ids.iter().zip(&g.lanes).filter(|(_, l)| l.open.is_some()) {
                        *lanes_firing.entry(*rule).or_default() += 1;
                    }
                }
            }
            for (rule, rs) in &ts.rules {
                let firing = rs.groups.values().filter(|g| g.open.is_some()).count()
                    + lanes_firing.get(rule).copied().unwrap_or_default();
                out.push((
                    *tenant,
                    *rule,
                    RuleStats { groups: rs.groups.len() + rs.lanes, dropped_groups: rs.meta.dropped_groups, firing },
                ));
            }
        }
        out
    }
}

/// Which rules an event type meets, and which of them carry the series' numeric fields.
fn type_index(compiled: &TenantRules, event_type: &str) -> TypeIndex {
    let rules: Vec<usize> =
        compiled.rules.iter().enumerate().filter(|(_, r)| r.types.matches(event_type)).map(|(i, _)| i).collect();
    let mut seen = std::collections::HashSet::new();
    let sum_fields: Vec<usize> = rules
        .iter()
        .copied()
        .filter(|&i| compiled.rules[i].numeric_field().is_some_and(|f| seen.insert(f.as_str().to_string())))
        .collect();
    TypeIndex { rules: rules.into(), sum_fields: sum_fields.into() }
}

struct Ctx<'a> {
    tenant: TenantId,
    compiled: &'a TenantRules,
    cfg: &'a EngineConfig,
    clock_ms: i64,
    /// Log position of the message being processed (makes alert ids deterministic).
    trigger: u64,
}

/// The event's group key and id under `rule`'s `group_by` (group class `gc`), built on first
/// use and kept for the other rules of the class.
fn event_key<'k>(
    keys: &'k mut [(String, GroupId)],
    ready: &mut [bool],
    gc: usize,
    rule: &CompiledRule,
    fields: &mut Fields<'_>,
) -> Option<(&'k str, GroupId)> {
    let (key, ready) = (keys.get_mut(gc)?, ready.get_mut(gc)?);
    if !*ready {
        group_key(rule, fields, &mut key.0);
        key.1 = group_id(&key.0);
        *ready = true;
    }
    Some((&key.0, key.1))
}

/// Writes the event's group key under `rule`'s `group_by` into `key`.
fn group_key(rule: &CompiledRule, fields: &mut Fields<'_>, key: &mut String) {
    key.clear();
    for p in &rule.group_by {
        match fields.get(p) {
            Some(v) => v.write_key(key),
            None => key.push_str("null"),
        }
        key.push('\u{1f}');
    }
}

#[allow(clippy::too_many_arguments)]
fn on_rule_event(
    ctx: &Ctx<'_>,
    ts: &mut TenantState,
    rule: &CompiledRule,
    fields: &mut Fields<'_>,
    id: &Arc<str>,
    t: i64,
    (key, gid): (&str, GroupId),
    out: &mut Out,
    decision: Option<&Decision>,
) {
    let rs = rule_state(&mut ts.rules, rule, ctx.clock_ms, out, ctx.tenant);
    if let Some(g) = rs.groups.get_mut(&gid) {
        on_group_event(ctx, rule, g, fields, id, t, out, decision);
        return;
    }
    {
        if !admit_group(ctx, rule, rs, out) {
            return;
        }
        let values = rule.group_by.iter().map(|p| fields.get(p).map_or(Value::Null, |v| v.to_json())).collect();
        rs.groups.insert(gid, Box::new(GroupState::new(key.to_string(), values, t, &rule.kind)));
        out.state_dirty.push(StateKey { tenant: ctx.tenant, rule: rule.id(), group: Some(key.to_string()) });
    }
    if let Some(g) = rs.groups.get_mut(&gid) {
        on_group_event(ctx, rule, g, fields, id, t, out, decision);
    }
}

/// Whether the rule may have one more group (its cap, `max_groups_per_rule`); a group refused
/// is counted in the rule's statistics.
fn admit_group(ctx: &Ctx<'_>, rule: &CompiledRule, rs: &mut RuleState, out: &mut Out) -> bool {
    if rs.groups.len() + rs.lanes < ctx.cfg.max_groups_per_rule {
        return true;
    }
    rs.meta.dropped_groups += 1;
    out.dropped_groups += 1;
    if !rs.meta_dirty {
        rs.meta_dirty = true;
        out.state_dirty.push(StateKey { tenant: ctx.tenant, rule: rule.id(), group: None });
    }
    false
}

#[allow(clippy::too_many_arguments)]
fn on_group_event(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    g: &mut GroupState,
    fields: &mut Fields<'_>,
    id: &Arc<str>,
    t: i64,
    out: &mut Out,
    decision: Option<&Decision>,
) {
    let ev = fields.event();
    match &rule.kind {
        RuleKind::Event | RuleKind::Plugin(_) => {
            if t > g.head_ms {
                g.head_ms = t;
            }
            expire_event_alert(ctx, rule, g, out);
            push_recent(&mut g.recent, id);
            g.last_seen_ms = Some(g.last_seen_ms.map_or(t, |s| s.max(t)));
            if let Some(open) = g.open.as_mut() {
                open.value += 1.0;
                // Its `event_ids` are brought up to date when the alert is written out.
                mark_alert(out, ctx.tenant, rule.id(), g);
            } else if cooldown_over(rule, g.last_fired_ms, t) {
                fire(ctx, rule, g, t, 1.0, out, decision);
                if rule.cooldown_ms == 0 {
                    if let Some(mut a) = g.open.take() {
                        a.state = AlertState::Resolved;
                        a.resolved_at_ms = Some(t);
                        out.transitions.push((a.id, Transition::Resolved));
                        if let Some(last) = out.alerts.last_mut().filter(|l| l.id == a.id) {
                            *last = a;
                        }
                        out.resolved += 1;
                    }
                }
            }
        }
        // Window rules' groups live in their window class (`on_class_event`).
        RuleKind::Window { .. } => return,
        RuleKind::Absence { .. } => {
            push_recent(&mut g.recent, id);
            g.last_seen_ms = Some(ev.received_at_ms.max(g.last_seen_ms.unwrap_or(i64::MIN)));
            if let Some(mut a) = g.open.take() {
                a.state = AlertState::Resolved;
                a.resolved_at_ms = Some(ev.received_at_ms);
                a.event_ids = g.recent.iter().map(|s| s.to_string()).collect();
                out.transitions.push((a.id, Transition::Resolved));
                out.alerts.push(a);
                out.resolved += 1;
            }
        }
    }
    mark_dirty(out, ctx.tenant, rule.id(), g);
}
