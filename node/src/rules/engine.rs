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

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BufMut;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::alert::{alert_id, Alert, AlertKind, AlertState};
use super::catalog;
use super::compiled::{CompiledRule, PluginBinding, RuleKind, RuleSet, TenantRules, WindowClass};
use super::effects::{
    CatalogDelta, CatalogEntry, EngineMeta, PartitionEffects, SeriesDelta, SeriesPoint, StateCheckpoint, StateKey,
    Transition,
};
use super::filter::Fields;
use super::window::{distinct_hash, window_from_stored, Bucket, Insert, Timeline, Window};
use crate::model::{EncodedEvent, EventRecord, TenantId};
use crate::plugins::runtime::{CallInput, CallReport, Decision, Outcome, RuleAlerts};
use crate::plugins::state::{Counter, EntryKey, PluginState};
use crate::plugins::stats::PendingCalls;
use crate::plugins::{PluginHost, PluginStatsRegistry};
use crate::telemetry;

/// Stored plugin state entries are group keys with these prefixes (group keys of rules are
/// JSON values, which never start with a NUL), followed by the entry's key in hex.
const PLUGIN_WINDOW: &str = "\u{0}w";
const PLUGIN_STATE: &str = "\u{0}s";
/// A window class's group is stored under the class id (as `rule`) and this prefix followed
/// by the group key.
const CLASS_GROUP: &str = "\u{0}c";

fn plugin_entry_group(k: &EntryKey) -> String {
    match k {
        EntryKey::Window(key) => format!("{PLUGIN_WINDOW}{}", hex::encode(key)),
        EntryKey::State(key) => format!("{PLUGIN_STATE}{}", hex::encode(key)),
    }
}

/// Hash maps on the event path: seeded foldhash (much cheaper than SipHash for short keys).
type FastMap<K, V> = foldhash::HashMap<K, V>;

/// A group's identity in its rule's table: the XXH3-128 hash of its key text. Rules probe
/// their tables with a hash computed once per event instead of hashing and comparing the key
/// text per rule; two of a rule's groups share an id with probability about n²/2¹²⁹.
type GroupId = u128;

fn group_id(key: &str) -> GroupId {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

/// Size of the buffers checkpoint entries are encoded into.
const CHECKPOINT_CHUNK: usize = 1 << 20;

/// How many triggering event ids an alert keeps.
pub const EVENT_SAMPLE: usize = 10;
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub allowed_lateness_ms: i64,
    pub max_future_ms: i64,
    pub max_groups_per_rule: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { allowed_lateness_ms: 60_000, max_future_ms: 300_000, max_groups_per_rule: 10_000 }
    }
}

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

/// The groups of one window class: the window rules of a tenant with the same `group_by` and
/// window length. Each group holds one bucket timeline with a lane per member rule, and each
/// lane's alert state next to it, so an event updates all of a group's rules in one place.
#[derive(Debug)]
struct ClassState {
    id: Uuid,
    seconds: u64,
    numeric: bool,
    rule_ids: Vec<Uuid>,
    dslots: Arc<[Option<u32>]>,
    groups: FastMap<GroupId, Box<SharedGroup>>,
}

impl ClassState {
    fn new(class: &WindowClass) -> ClassState {
        ClassState {
            id: class.id,
            seconds: class.seconds,
            numeric: class.numeric,
            rule_ids: class.rule_ids.clone(),
            dslots: class.dslots.clone().into(),
            groups: FastMap::default(),
        }
    }

    fn same_layout(&self, class: &WindowClass) -> bool {
        self.id == class.id
            && self.seconds == class.seconds
            && self.numeric == class.numeric
            && self.rule_ids == class.rule_ids
            && *self.dslots == *class.dslots
    }
}

#[derive(Debug)]
struct SharedGroup {
    /// The group key (each lane's state key in checkpoints, and part of alert ids).
    key: String,
    /// Group-by values, for the alerts' `group`.
    values: Vec<Value>,
    timeline: Timeline,
    lanes: Vec<Lane>,
    /// The event ids the lanes' samples hold.
    ids: IdSlab,
    /// Changed since the last checkpoint.
    dirty: bool,
}

/// Event ids the lanes of a shared group keep as samples: each held once, with the number of
/// lane samples holding it (lanes mostly sample the same events, and need no atomic reference
/// count per lane and event).
#[derive(Debug, Default)]
struct IdSlab {
    slots: Vec<(Option<Arc<str>>, u32)>,
    free: Vec<u32>,
    /// The slot filled last (the lanes of one event all hold its id).
    last: Option<u32>,
}

impl IdSlab {
    /// Holds `id` once more; returns its slot.
    fn hold(&mut self, id: &Arc<str>) -> u32 {
        if let Some(s) = self.last {
            if let Some((Some(held), refs)) = self.slots.get_mut(s as usize) {
                if Arc::ptr_eq(held, id) {
                    *refs += 1;
                    return s;
                }
            }
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = (Some(id.clone()), 1);
                s
            }
            None => {
                self.slots.push((Some(id.clone()), 1));
                (self.slots.len() - 1) as u32
            }
        };
        self.last = Some(s);
        s
    }

    fn release(&mut self, s: u32) {
        let Some((held, refs)) = self.slots.get_mut(s as usize) else { return };
        *refs = refs.saturating_sub(1);
        if *refs == 0 && held.take().is_some() {
            self.free.push(s);
        }
    }

    fn get(&self, s: u32) -> Option<&Arc<str>> {
        self.slots.get(s as usize).and_then(|(id, _)| id.as_ref())
    }
}

/// The newest [`EVENT_SAMPLE`] slots of an [`IdSlab`], oldest first.
#[derive(Debug, Default, Clone, Copy)]
struct Ring {
    slots: [u32; EVENT_SAMPLE],
    start: u8,
    len: u8,
}

impl Ring {
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..usize::from(self.len)).map(|i| self.slots[(usize::from(self.start) + i) % EVENT_SAMPLE])
    }

    fn push(&mut self, ids: &mut IdSlab, id: &Arc<str>) {
        let slot = ids.hold(id);
        if usize::from(self.len) == EVENT_SAMPLE {
            ids.release(self.slots[usize::from(self.start)]);
            self.slots[usize::from(self.start)] = slot;
            self.start = ((usize::from(self.start) + 1) % EVENT_SAMPLE) as u8;
        } else {
            self.slots[(usize::from(self.start) + usize::from(self.len)) % EVENT_SAMPLE] = slot;
            self.len += 1;
        }
    }

    /// Releases every slot (the lane is emptied).
    fn clear(&mut self, ids: &mut IdSlab) {
        for s in self.iter() {
            ids.release(s);
        }
        *self = Ring::default();
    }

    fn to_ids(self, ids: &IdSlab) -> VecDeque<Arc<str>> {
        self.iter().filter_map(|s| ids.get(s).cloned()).collect()
    }

    fn event_ids(&self, ids: &IdSlab) -> Vec<String> {
        self.iter().filter_map(|s| ids.get(s).map(|id| id.to_string())).collect()
    }
}

impl SharedGroup {
    /// A group of a class whose windows are `seconds` long, with lanes `dslots` (see
    /// [`Timeline::new`]).
    fn new(
        key: String,
        values: Vec<Value>,
        (seconds, dslots, numeric): (u64, &Arc<[Option<u32>]>, bool),
    ) -> SharedGroup {
        SharedGroup {
            key,
            values,
            timeline: Timeline::new(seconds, dslots.clone(), numeric),
            lanes: (0..dslots.len()).map(|_| Lane::default()).collect(),
            ids: IdSlab::default(),
            dirty: false,
        }
    }
}

/// One window rule's alert state in one group (its window is its lane of the timeline).
#[derive(Debug, Default)]
struct Lane {
    /// The newest matching events, as slots of the group's [`IdSlab`].
    recent: Ring,
    pending_since_ms: Option<i64>,
    open: Option<Box<Alert>>,
    last_fired_ms: Option<i64>,
}

/// A shared group as checkpoints hold it, positionally:
/// `[seconds, values, ids, idxs, dvals, lanes]`. `ids` are the event ids the lanes' samples
/// name (each once), `idxs` the timeline's bucket indexes and `dvals` its distinct values
/// (hashes). Each started lane is
/// `[rule, head_ms, buckets, distinct, recent, pending_since_ms, open, last_fired_ms]`:
/// `buckets` its non-empty buckets by position in `idxs`, `distinct` per value of `dvals` the
/// age in buckets of its newest sighting before the lane's head bucket (or nil), or, when an
/// earlier lane's column is the same, that lane's position in `lanes`; `recent` positions in
/// `ids`, and `open` the open alert's named MessagePack encoding.
struct GroupEntry<'a> {
    group: &'a SharedGroup,
    class: &'a ClassState,
}

impl Serialize for GroupEntry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeTuple};
        let (g, tl) = (self.group, &self.group.timeline);
        let mut t = s.serialize_tuple(6)?;
        t.serialize_element(&self.class.seconds)?;
        t.serialize_element(&g.values)?;
        t.serialize_element(&g.ids.slots.iter().map(|(id, _)| id).collect::<Vec<_>>())?;
        t.serialize_element(tl.stored_idxs())?;
        t.serialize_element(&tl.stored_values())?;
        let mut lanes = Vec::with_capacity(g.lanes.len());
        // Lanes that count the same values see the same sightings (same field, same or no
        // filter): such a lane refers to the earlier lane's column instead of repeating it.
        let mut columns: Vec<(usize, Vec<Option<u32>>)> = Vec::new();
        for (lane, (l, rule)) in g.lanes.iter().zip(&self.class.rule_ids).enumerate() {
            if !tl.is_started(lane) {
                continue;
            }
            let mut ages = Vec::new();
            tl.stored_distinct(lane, &mut ages);
            let distinct = match columns.iter().find(|(_, c)| !ages.is_empty() && *c == ages) {
                Some((at, _)) => DistinctColumn::Same(*at as u32),
                None if ages.is_empty() => DistinctColumn::Ages(Vec::new()),
                None => {
                    columns.push((lanes.len(), ages.clone()));
                    DistinctColumn::Ages(ages)
                }
            };
            let recent: Vec<u32> = l.recent.iter().collect();
            let open = match &l.open {
                Some(a) => Some(Bin(rmp_serde::to_vec_named(&**a).map_err(S::Error::custom)?)),
                None => None,
            };
            lanes.push((
                rule,
                tl.head(lane),
                tl.stored_buckets(lane),
                distinct,
                recent,
                l.pending_since_ms,
                open,
                l.last_fired_ms,
            ));
        }
        t.serialize_element(&lanes)?;
        t.end()
    }
}

/// A lane's distinct sightings in a stored shared group (see [`GroupEntry`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum DistinctColumn {
    /// The same as the column of the stored lane at this position.
    Same(u32),
    Ages(Vec<Option<u32>>),
}

/// Bytes as MessagePack `bin`.
#[derive(Debug)]
struct Bin(Vec<u8>);

impl Serialize for Bin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bin;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bin, E> {
                Ok(Bin(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A stored shared group (see [`GroupEntry`]).
#[derive(Deserialize)]
struct StoredGroup {
    seconds: u64,
    values: Vec<Value>,
    ids: Vec<Option<Arc<str>>>,
    idxs: Vec<i64>,
    dvals: Vec<u64>,
    lanes: Vec<StoredLane>,
}

#[derive(Deserialize)]
struct StoredLane(Uuid, i64, Vec<Bucket>, DistinctColumn, Vec<u32>, Option<i64>, Option<Bin>, Option<i64>);

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

    /// Rebuilds an engine from its last checkpoint. Processing resumes after `meta.state_seq`;
    /// positions up to `meta.effects_seq` are re-evaluated without re-emitting increments.
    pub fn restore(
        partition: u32,
        cfg: EngineConfig,
        meta: EngineMeta,
        entries: impl IntoIterator<Item = (StateKey, impl AsRef<[u8]> + Into<Vec<u8>>)>,
    ) -> Result<Engine, RestoreError> {
        let mut e = Engine::new(partition, cfg);
        e.processed_seq = meta.state_seq;
        e.committed_seq = meta.effects_seq;
        e.state_seq = meta.state_seq;
        e.clock_ms = meta.clock_ms;
        for (k, bytes) in entries {
            let rule = k.rule;
            let bad = |source: Box<dyn std::error::Error + Send + Sync>| RestoreError { rule, source };
            if let Some(g) = k.group.as_deref().filter(|g| g.starts_with(CLASS_GROUP)) {
                // A shared group: each lane goes back to its rule until the rules are known.
                let stored: StoredGroup = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?;
                let key = g[CLASS_GROUP.len()..].to_string();
                let id = group_id(&key);
                let ts = e.tenants.entry(k.tenant).or_default();
                let mut columns: Vec<Vec<Option<u32>>> = Vec::with_capacity(stored.lanes.len());
                for lane in stored.lanes {
                    let StoredLane(lane_rule, head_ms, buckets, column, recent, pending_since_ms, open, last_fired_ms) =
                        lane;
                    let distinct = match column {
                        DistinctColumn::Ages(ages) => ages,
                        DistinctColumn::Same(at) => columns.get(at as usize).cloned().unwrap_or_default(),
                    };
                    columns.push(distinct.clone());
                    let window =
                        window_from_stored(stored.seconds, head_ms, &stored.idxs, &stored.dvals, buckets, &distinct);
                    let open = match open {
                        Some(Bin(b)) => Some(rmp_serde::from_slice(&b).map_err(|e| bad(e.into()))?),
                        None => None,
                    };
                    let state = GroupState {
                        key: key.clone(),
                        id,
                        values: stored.values.clone(),
                        head_ms,
                        window: Some(window),
                        last_seen_ms: None,
                        recent: recent.iter().filter_map(|&i| stored.ids.get(i as usize).cloned().flatten()).collect(),
                        pending_since_ms,
                        open,
                        last_fired_ms,
                        dirty: false,
                        alert_dirty: false,
                    };
                    ts.rules.entry(lane_rule).or_default().groups.insert(id, Box::new(state));
                }
                ts.restored.push(k);
                continue;
            }
            let rs = e.tenants.entry(k.tenant).or_default().rules.entry(k.rule).or_default();
            match k.group {
                None => rs.meta = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?,
                Some(g) if g.starts_with(PLUGIN_WINDOW) => {
                    let key = hex::decode(&g[PLUGIN_WINDOW.len()..]).map_err(|e| bad(e.into()))?;
                    let c: Counter = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?;
                    rs.plugin.restore_window(key, c);
                }
                Some(g) if g.starts_with(PLUGIN_STATE) => {
                    let key = hex::decode(&g[PLUGIN_STATE.len()..]).map_err(|e| bad(e.into()))?;
                    rs.plugin.kv.insert(key, bytes.into());
                }
                Some(g) => {
                    let mut gs: GroupState = rmp_serde::from_slice(bytes.as_ref()).map_err(|e| bad(e.into()))?;
                    gs.id = group_id(&g);
                    gs.key = g;
                    // A window group stored per rule (before window classes existed).
                    let legacy = gs.window.is_some().then(|| StateKey { group: Some(gs.key.clone()), ..k });
                    rs.groups.insert(gs.id, Box::new(gs));
                    if let Some(key) = legacy {
                        e.tenants.entry(key.tenant).or_default().restored.push(key);
                    }
                }
            }
        }
        Ok(e)
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

    /// Takes what was emitted since the last call. With `checkpoint`, also the state that
    /// changed, and the returned meta says the stored state now reflects `processed_seq`.
    pub fn take_effects(&mut self, checkpoint: bool) -> PartitionEffects {
        if let Some(p) = &mut self.plugins {
            if let Some(stats) = &p.stats {
                p.pending.flush(stats);
            }
        }
        let out = &mut self.out;
        for (tenant, rule, group) in out.alert_dirty.drain(..) {
            let g = self
                .tenants
                .get_mut(&tenant)
                .and_then(|t| t.rules.get_mut(&rule))
                .and_then(|r| r.groups.get_mut(&group));
            if let Some(g) = g {
                g.alert_dirty = false;
                refresh_event_ids(g);
                if let Some(open) = &g.open {
                    out.alerts.push(open.clone());
                }
            }
        }
        metrics::counter!(telemetry::ALERTS_FIRED).increment(std::mem::take(&mut out.fired));
        metrics::counter!(telemetry::ALERTS_RESOLVED).increment(std::mem::take(&mut out.resolved));
        metrics::counter!(telemetry::RULE_LATE_EVENTS).increment(std::mem::take(&mut out.late));
        metrics::counter!(telemetry::RULE_GROUPS_DROPPED).increment(std::mem::take(&mut out.dropped_groups));
        let mut effects = PartitionEffects {
            partition: self.partition,
            meta: EngineMeta {
                effects_seq: self.processed_seq.max(self.committed_seq),
                state_seq: self.state_seq,
                clock_ms: self.clock_ms,
            },
            alerts: std::mem::take(&mut out.alerts),
            transitions: std::mem::take(&mut out.transitions),
            series: out
                .series
                .drain()
                .map(|((tenant, event_type, minute), point)| SeriesDelta { tenant, event_type, minute, point })
                .collect(),
            catalog: out
                .catalog
                .drain()
                .map(|((tenant, event_type), entry)| CatalogDelta { tenant, event_type, entry })
                .collect(),
            checkpoint: None,
        };
        if checkpoint {
            let mut cp = StateCheckpoint {
                puts: Vec::with_capacity(out.state_dirty.len()),
                deletes: std::mem::take(&mut out.deletes),
            };
            // Encoded back to back into large buffers that the entries then share.
            let mut buf = bytes::BytesMut::with_capacity(CHECKPOINT_CHUNK);
            for key in out.state_dirty.drain(..) {
                let Some(ts) = self.tenants.get_mut(&key.tenant) else { continue };
                if buf.capacity() < CHECKPOINT_CHUNK / 16 {
                    buf.reserve(CHECKPOINT_CHUNK);
                }
                let mut w = (&mut buf).writer();
                let encoded = match key.group.as_deref() {
                    Some(g) if g.starts_with(CLASS_GROUP) => {
                        let gid = group_id(&g[CLASS_GROUP.len()..]);
                        let Some(cs) = ts.classes.iter_mut().find(|c| c.id == key.rule) else { continue };
                        match cs.groups.get_mut(&gid) {
                            Some(sg) if sg.dirty => sg.dirty = false,
                            _ => continue,
                        }
                        let cs = &*cs;
                        let Some(sg) = cs.groups.get(&gid) else { continue };
                        let entry = GroupEntry { group: sg, class: cs };
                        rmp_serde::encode::write(&mut w, &entry)
                    }
                    group => {
                        let Some(rs) = ts.rules.get_mut(&key.rule) else { continue };
                        match group {
                            None => {
                                rs.meta_dirty = false;
                                rmp_serde::encode::write_named(&mut w, &rs.meta)
                            }
                            Some(g) => match rs.groups.get_mut(&group_id(g)) {
                                Some(gs) => {
                                    gs.dirty = false;
                                    rmp_serde::encode::write_named(&mut w, &**gs)
                                }
                                None => continue,
                            },
                        }
                    }
                };
                let bytes = buf.split().freeze();
                match encoded {
                    Ok(()) => cp.puts.push((key, bytes)),
                    Err(e) => {
                        tracing::error!(rule_id = %key.rule, error = %e, "cannot encode rule state; it will be rebuilt")
                    }
                }
            }
            for (tenant, ts) in self.tenants.iter_mut() {
                for (rule, rs) in ts.rules.iter_mut() {
                    for k in rs.plugin.take_dirty() {
                        let group = Some(plugin_entry_group(&k));
                        let key = StateKey { tenant: *tenant, rule: *rule, group };
                        let bytes = match &k {
                            EntryKey::Window(w) => {
                                rs.plugin.windows.get(w).map(|c| rmp_serde::to_vec_named(c).map(bytes::Bytes::from))
                            }
                            EntryKey::State(s) => rs.plugin.kv.get(s).map(|v| Ok(bytes::Bytes::copy_from_slice(v))),
                        };
                        match bytes {
                            Some(Ok(b)) => cp.puts.push((key, b)),
                            None => cp.deletes.push(key),
                            Some(Err(e)) => {
                                tracing::error!(rule_id = %rule, error = %e, "cannot encode plugin state")
                            }
                        }
                    }
                }
            }
            self.state_seq = self.processed_seq;
            effects.meta.state_seq = self.processed_seq;
            effects.checkpoint = Some(cp);
            self.since_checkpoint = 0;
        }
        effects
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

fn mark_dirty(out: &mut Out, tenant: TenantId, rule: Uuid, g: &mut GroupState) {
    if !g.dirty {
        g.dirty = true;
        out.state_dirty.push(StateKey { tenant, rule, group: Some(g.key.clone()) });
    }
}

/// Copies the group's recent event ids into its open alert (an event or plugin rule's open
/// alert collects the ids of the matches that keep it open; they are copied once per batch,
/// when the alert is written, not on every match).
fn refresh_event_ids(g: &mut GroupState) {
    if let Some(open) = g.open.as_mut() {
        open.event_ids.clear();
        open.event_ids.extend(g.recent.iter().map(|s| s.to_string()));
    }
}

fn mark_alert(out: &mut Out, tenant: TenantId, rule: Uuid, g: &mut GroupState) {
    if !g.alert_dirty {
        g.alert_dirty = true;
        out.alert_dirty.push((tenant, rule, g.id));
    }
}

/// Brings the tenant's rule states in line with its current rules: state of deleted rules is
/// dropped (open alerts resolve), and a new version whose window, absence or group-by differs
/// starts afresh.
fn sync_tenant(tenant: TenantId, ts: &mut TenantState, compiled: &Arc<TenantRules>, clock: i64, out: &mut Out) {
    if ts.compiled.as_ref().is_some_and(|c| Arc::ptr_eq(c, compiled)) {
        return;
    }
    // Window state stays in its classes when no window rule changed; otherwise it goes back to
    // its rules for the changes below and into the new classes after them.
    let keep_classes = ts.restored.is_empty()
        && ts.classes.len() == compiled.window_classes.len()
        && ts.classes.iter().zip(&compiled.window_classes).all(|(c, w)| c.same_layout(w))
        && compiled.window_classes.iter().flat_map(|w| &w.rule_ids).all(|id| {
            ts.rules.get(id).is_none_or(|rs| compiled.get(id).is_some_and(|r| r.rule.version == rs.meta.version))
        });
    if !keep_classes {
        dissolve_classes(tenant, ts, out);
    }
    ts.compiled = Some(compiled.clone());
    ts.by_type.clear();
    let ids: Vec<Uuid> = ts.rules.keys().copied().collect();
    for id in ids {
        match compiled.get(&id) {
            None => {
                if let Some(rs) = ts.rules.remove(&id) {
                    drop_rule_state(tenant, id, rs, clock, out);
                }
            }
            Some(rule) => {
                let Some(rs) = ts.rules.get_mut(&id) else { continue };
                if rs.meta.version == rule.rule.version {
                    continue;
                }
                if rs.meta.shape != rule.shape {
                    if let Some(old) = ts.rules.remove(&id) {
                        drop_rule_state(tenant, id, old, clock, out);
                    }
                    let rs = ts.rules.entry(id).or_default();
                    rs.meta =
                        RuleMeta { version: rule.rule.version, shape: rule.shape, dropped_groups: 0, since_ms: clock };
                    rs.meta_dirty = true;
                    out.state_dirty.push(StateKey { tenant, rule: id, group: None });
                } else {
                    rs.meta.version = rule.rule.version;
                    if !rs.meta_dirty {
                        rs.meta_dirty = true;
                        out.state_dirty.push(StateKey { tenant, rule: id, group: None });
                    }
                }
            }
        }
    }
    if !keep_classes {
        ts.classes = compiled.window_classes.iter().map(ClassState::new).collect();
        absorb_classes(tenant, ts, compiled, out);
    }
}

/// Moves every window lane back to its rule as a group state of its own, and deletes the
/// stored shared groups (the new classes write theirs).
fn dissolve_classes(tenant: TenantId, ts: &mut TenantState, out: &mut Out) {
    for rs in ts.rules.values_mut() {
        rs.lanes = 0;
    }
    out.deletes.append(&mut ts.restored);
    for cs in ts.classes.drain(..) {
        for (gid, g) in cs.groups {
            let SharedGroup { key, values, timeline, lanes, ids, .. } = *g;
            out.deletes.push(StateKey { tenant, rule: cs.id, group: Some(class_group_key(&key)) });
            for (lane, l) in lanes.into_iter().enumerate() {
                let Some(rule) = cs.rule_ids.get(lane).filter(|_| timeline.is_started(lane)) else { continue };
                let state = GroupState {
                    key: key.clone(),
                    id: gid,
                    values: values.clone(),
                    head_ms: timeline.head(lane),
                    window: Some(timeline.export(lane)),
                    last_seen_ms: None,
                    recent: l.recent.to_ids(&ids),
                    pending_since_ms: l.pending_since_ms,
                    open: l.open.map(|a| *a),
                    last_fired_ms: l.last_fired_ms,
                    dirty: false,
                    alert_dirty: false,
                };
                ts.rules.entry(*rule).or_default().groups.insert(gid, Box::new(state));
            }
        }
    }
}

/// Moves the group states of the compiled window rules (restored from a checkpoint, or
/// dissolved by a rule change) into their window classes, to be written in that layout.
fn absorb_classes(tenant: TenantId, ts: &mut TenantState, compiled: &TenantRules, out: &mut Out) {
    for (class, cs) in compiled.window_classes.iter().zip(ts.classes.iter_mut()) {
        for (lane, id) in class.rule_ids.iter().enumerate() {
            let Some(rs) = ts.rules.get_mut(id) else { continue };
            for (gid, g) in rs.groups.drain() {
                let g = *g;
                let (seconds, dslots, numeric) = (cs.seconds, &cs.dslots, cs.numeric);
                let sg = cs.groups.entry(gid).or_insert_with(|| {
                    Box::new(SharedGroup::new(g.key.clone(), g.values.clone(), (seconds, dslots, numeric)))
                });
                match &g.window {
                    Some(w) => sg.timeline.import(lane, g.head_ms, w),
                    None => sg.timeline.import(lane, g.head_ms, &Window::new(seconds)),
                }
                if let Some(l) = sg.lanes.get_mut(lane) {
                    let mut recent = Ring::default();
                    for id in &g.recent {
                        recent.push(&mut sg.ids, id);
                    }
                    *l = Lane {
                        recent,
                        pending_since_ms: g.pending_since_ms,
                        open: g.open.map(Box::new),
                        last_fired_ms: g.last_fired_ms,
                    };
                }
                mark_group_dirty(out, tenant, cs.id, sg);
                rs.lanes += 1;
            }
        }
    }
}

/// Resolves a removed rule's open alerts and deletes its stored state.
fn drop_rule_state(tenant: TenantId, rule: Uuid, rs: RuleState, clock: i64, out: &mut Out) {
    for (_, mut g) in rs.groups {
        if g.alert_dirty {
            refresh_event_ids(&mut g);
        }
        if let Some(mut alert) = g.open {
            alert.state = AlertState::Resolved;
            alert.resolved_at_ms = Some(clock);
            out.transitions.push((alert.id, Transition::Resolved));
            out.alerts.push(alert);
            out.resolved += 1;
        }
        out.deletes.push(StateKey { tenant, rule, group: Some(g.key) });
    }
    let mut plugin = rs.plugin;
    let dirty = plugin.take_dirty();
    let entries = plugin.windows.keys().map(|k| EntryKey::Window(k.clone()));
    let entries = entries.chain(plugin.kv.keys().map(|k| EntryKey::State(k.clone())));
    for k in entries.chain(dirty) {
        out.deletes.push(StateKey { tenant, rule, group: Some(plugin_entry_group(&k)) });
    }
    out.deletes.push(StateKey { tenant, rule, group: None });
}

fn rule_state<'a>(
    rules: &'a mut FastMap<Uuid, RuleState>,
    rule: &CompiledRule,
    clock: i64,
    out: &mut Out,
    tenant: TenantId,
) -> &'a mut RuleState {
    rules.entry(rule.id()).or_insert_with(|| {
        out.state_dirty.push(StateKey { tenant, rule: rule.id(), group: None });
        RuleState {
            meta: RuleMeta { version: rule.rule.version, shape: rule.shape, dropped_groups: 0, since_ms: clock },
            meta_dirty: true,
            groups: FastMap::default(),
            lanes: 0,
            plugin: Box::default(),
        }
    })
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

fn push_recent(recent: &mut VecDeque<Arc<str>>, id: &Arc<str>) {
    if recent.len() == EVENT_SAMPLE {
        recent.pop_front();
    }
    recent.push_back(id.clone());
}

/// Without a cooldown every match fires, even one older than the last firing (events arrive
/// out of order); with one, a match must come `cooldown` after the last firing.
fn cooldown_over(rule: &CompiledRule, last_fired_ms: Option<i64>, at: i64) -> bool {
    rule.cooldown_ms == 0 || last_fired_ms.is_none_or(|f| at.saturating_sub(f) >= rule.cooldown_ms)
}

/// Whether an event rule's open alert in `g` has seen no match for the rule's cooldown by `now`.
fn event_alert_expired(rule: &CompiledRule, g: &GroupState, now: i64) -> bool {
    g.open.is_some() && g.last_seen_ms.is_some_and(|last| now >= last.saturating_add(rule.cooldown_ms))
}

/// An event rule's open alert resolves once `cooldown` has passed since its last match.
fn expire_event_alert(ctx: &Ctx<'_>, rule: &CompiledRule, g: &mut GroupState, out: &mut Out) {
    let now = g.head_ms.max(ctx.clock_ms - ctx.cfg.allowed_lateness_ms);
    let Some(last) = g.last_seen_ms else { return };
    if event_alert_expired(rule, g, now) {
        if g.alert_dirty {
            refresh_event_ids(g);
        }
        if let Some(mut a) = g.open.take() {
            a.state = AlertState::Resolved;
            a.resolved_at_ms = Some(last.saturating_add(rule.cooldown_ms));
            out.transitions.push((a.id, Transition::Resolved));
            out.alerts.push(a);
            out.resolved += 1;
            mark_dirty(out, ctx.tenant, rule.id(), g);
        }
    }
}

/// An event for the rules of one window class it matched: `run` holds (lane, rule index) of
/// the matching rules, in lane order.
#[allow(clippy::too_many_arguments)]
fn on_class_event(
    ctx: &Ctx<'_>,
    ts: &mut TenantState,
    class: usize,
    run: &[(usize, usize)],
    fields: &mut Fields<'_>,
    id: &Arc<str>,
    t: i64,
    (key, gid): (&str, GroupId),
    out: &mut Out,
) {
    let Some(cs) = ts.classes.get_mut(class) else { return };
    let Some(first) = run.first().and_then(|h| ctx.compiled.rules.get(h.1)) else { return };
    let (seconds, dslots, numeric) = (cs.seconds, &cs.dslots, cs.numeric);
    let g = cs.groups.entry(gid).or_insert_with(|| {
        let values = first.group_by.iter().map(|p| fields.get(p).map_or(Value::Null, |v| v.to_json())).collect();
        Box::new(SharedGroup::new(key.to_string(), values, (seconds, dslots, numeric)))
    });
    for &(lane, i) in run {
        let Some(rule) = ctx.compiled.rules.get(i) else { continue };
        if !g.timeline.is_started(lane) {
            let rs = rule_state(&mut ts.rules, rule, ctx.clock_ms, out, ctx.tenant);
            if !admit_group(ctx, rule, rs, out) {
                continue;
            }
            rs.lanes += 1;
            g.timeline.start(lane, t);
        }
        on_lane_event(ctx, rule, (cs.id, g), lane, fields, id, t, out);
    }
    if g.timeline.is_idle() {
        cs.groups.remove(&gid);
    }
}

#[allow(clippy::too_many_arguments)]
fn on_lane_event(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    (class_id, g): (Uuid, &mut SharedGroup),
    lane: usize,
    fields: &mut Fields<'_>,
    id: &Arc<str>,
    t: i64,
    out: &mut Out,
) {
    let RuleKind::Window { spec, field } = &rule.kind else { return };
    let head = g.timeline.head(lane);
    if t < head - ctx.cfg.allowed_lateness_ms {
        out.late += 1;
        return;
    }
    if t > head {
        g.timeline.advance(lane, t);
    }
    let (value, distinct) = match spec.aggregate {
        super::spec::Aggregate::Distinct => (None, field.as_ref().and_then(|f| fields.key_hash(f, distinct_hash))),
        super::spec::Aggregate::Count => (None, None),
        _ => (field.as_ref().and_then(|f| fields.get(f)).and_then(|v| v.as_f64()), None),
    };
    if g.timeline.insert(lane, t, value, distinct) == Insert::TooLate {
        out.late += 1;
        return;
    }
    let Some(l) = g.lanes.get_mut(lane) else { return };
    l.recent.push(&mut g.ids, id);
    evaluate_lane(ctx, rule, g, lane, out);
    mark_group_dirty(out, ctx.tenant, class_id, g);
}

fn mark_group_dirty(out: &mut Out, tenant: TenantId, class: Uuid, g: &mut SharedGroup) {
    if !g.dirty {
        g.dirty = true;
        out.state_dirty.push(StateKey { tenant, rule: class, group: Some(class_group_key(&g.key)) });
    }
}

/// The stored key of a window class's group.
fn class_group_key(key: &str) -> String {
    let mut k = String::with_capacity(CLASS_GROUP.len() + key.len());
    k.push_str(CLASS_GROUP);
    k.push_str(key);
    k
}

/// Fires or resolves a window rule's alert in one group, from its lane's value at the lane's
/// head.
fn evaluate_lane(ctx: &Ctx<'_>, rule: &CompiledRule, g: &mut SharedGroup, lane: usize, out: &mut Out) {
    let RuleKind::Window { spec, .. } = &rule.kind else { return };
    let at = g.timeline.head(lane);
    let value = g.timeline.value(lane, spec.aggregate);
    let holds = value.is_some_and(|v| spec.op.holds(v, spec.threshold));
    let Some(l) = g.lanes.get_mut(lane) else { return };
    if holds {
        if l.open.is_some() {
            return;
        }
        let since = *l.pending_since_ms.get_or_insert(at);
        if at - since >= rule.for_ms && cooldown_over(rule, l.last_fired_ms, at) {
            let sample = l.recent.event_ids(&g.ids);
            let alert = new_alert(ctx, rule, (&g.key, &g.values), sample, at, value.unwrap_or_default(), None);
            l.last_fired_ms = Some(at);
            l.pending_since_ms = None;
            out.transitions.push((alert.id, Transition::Firing));
            out.alerts.push(alert.clone());
            l.open = Some(Box::new(alert));
            out.fired += 1;
        }
    } else {
        l.pending_since_ms = None;
        if let Some(mut a) = l.open.take() {
            a.state = AlertState::Resolved;
            a.resolved_at_ms = Some(at);
            out.transitions.push((a.id, Transition::Resolved));
            out.alerts.push(*a);
            out.resolved += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fire(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    g: &mut GroupState,
    at: i64,
    value: f64,
    out: &mut Out,
    decision: Option<&Decision>,
) {
    let sample = g.recent.iter().map(|s| s.to_string()).collect();
    let alert = new_alert(ctx, rule, (&g.key, &g.values), sample, at, value, decision);
    g.last_fired_ms = Some(at);
    g.pending_since_ms = None;
    g.open = Some(alert.clone());
    out.transitions.push((alert.id, Transition::Firing));
    out.alerts.push(alert);
    out.fired += 1;
}

/// The alert a rule fires for a group at `at`.
fn new_alert(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    (key, values): (&str, &[Value]),
    event_ids: Vec<String>,
    at: i64,
    value: f64,
    decision: Option<&Decision>,
) -> Alert {
    let spec = &rule.rule.spec;
    let group: std::collections::BTreeMap<String, Value> =
        spec.group_by.iter().cloned().zip(values.iter().cloned()).collect();
    let silence_id =
        ctx.compiled.silences.iter().find(|s| s.matches(at, &rule.rule.id, &spec.labels, &group)).map(|s| s.id);
    let (kind, threshold, op, aggregate, window_seconds) = match &rule.kind {
        RuleKind::Event => (AlertKind::Event, None, None, None, None),
        RuleKind::Plugin(_) => (AlertKind::Plugin, None, None, None, None),
        RuleKind::Window { spec: w, .. } => {
            (AlertKind::Window, Some(w.threshold), Some(w.op), Some(w.aggregate), Some(w.seconds))
        }
        RuleKind::Absence { ms } => {
            (AlertKind::Absence, Some((*ms / 1000) as f64), None, None, Some((*ms / 1000) as u64))
        }
    };
    Alert {
        id: alert_id(at, &ctx.tenant, &rule.rule.id, key, ctx.trigger),
        tenant_id: ctx.tenant,
        rule_id: rule.rule.id,
        rule_version: rule.rule.version,
        rule_name: spec.name.clone(),
        kind,
        severity: decision.and_then(|d| d.severity).unwrap_or(spec.severity),
        labels: match decision {
            Some(d) if !d.labels.is_empty() => {
                let mut l = spec.labels.clone();
                l.extend(d.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                l
            }
            _ => spec.labels.clone(),
        },
        group,
        value,
        threshold,
        op,
        aggregate,
        window_seconds,
        state: AlertState::Firing,
        fired_at_ms: at,
        resolved_at_ms: None,
        event_ids,
        silence_id,
        actions: spec.actions.clone(),
        title: decision.and_then(|d| d.title.as_deref()).map(Arc::from),
        details: Arc::new(decision.map(|d| d.fields.to_map()).unwrap_or_default()),
    }
}

/// Time-driven transitions of one tenant's rules at a tick.
fn tick_tenant(ctx: &Ctx<'_>, ts: &mut TenantState, out: &mut Out) {
    let watermark = ctx.clock_ms - ctx.cfg.allowed_lateness_ms;
    for rule in &ctx.compiled.rules {
        // An ungrouped absence rule watches from the moment it appears, even with no event yet.
        if matches!(rule.kind, RuleKind::Absence { .. }) && rule.group_by.is_empty() {
            let rs = rule_state(&mut ts.rules, rule, ctx.clock_ms, out, ctx.tenant);
            if !rs.groups.contains_key(&group_id("")) {
                let since = rs.meta.since_ms;
                let mut g = GroupState::new(String::new(), Vec::new(), since, &rule.kind);
                g.last_seen_ms = Some(since);
                rs.groups.insert(g.id, Box::new(g));
                out.state_dirty.push(StateKey { tenant: ctx.tenant, rule: rule.id(), group: Some(String::new()) });
            }
        }
    }
    for (rule_id, rs) in ts.rules.iter_mut() {
        let Some(rule) = ctx.compiled.get(rule_id) else { continue };
        if matches!(rule.kind, RuleKind::Plugin(_)) {
            rs.plugin.expire(watermark);
        }
        let mut idle = Vec::new();
        for g in rs.groups.values_mut() {
            match &rule.kind {
                // Window rules' groups live in their window class (below).
                RuleKind::Window { .. } => {}
                RuleKind::Event | RuleKind::Plugin(_) => {
                    expire_event_alert(ctx, rule, g, out);
                    let now = g.head_ms.max(watermark);
                    if g.open.is_none() && cooldown_over(rule, g.last_fired_ms, now) {
                        idle.push(g.id);
                    }
                }
                RuleKind::Absence { ms } => {
                    let Some(last) = g.last_seen_ms else { continue };
                    if g.open.is_none() && ctx.clock_ms.saturating_sub(last) >= *ms {
                        let silent_s = (ctx.clock_ms - last) as f64 / 1000.0;
                        fire(ctx, rule, g, last.saturating_add(*ms), silent_s, out, None);
                        mark_dirty(out, ctx.tenant, *rule_id, g);
                    }
                }
            }
        }
        for id in idle {
            let Some(g) = rs.groups.remove(&id) else { continue };
            out.deletes.push(StateKey { tenant: ctx.tenant, rule: *rule_id, group: Some(g.key) });
        }
    }
    for (class, cs) in ctx.compiled.window_classes.iter().zip(ts.classes.iter_mut()) {
        let class_id = cs.id;
        cs.groups.retain(|_, g| {
            for (lane, &i) in class.rules.iter().enumerate() {
                let Some(rule) = ctx.compiled.rules.get(i) else { continue };
                if !g.timeline.is_started(lane) {
                    continue;
                }
                if g.timeline.head(lane) < watermark {
                    g.timeline.advance(lane, watermark);
                    evaluate_lane(ctx, rule, g, lane, out);
                    mark_group_dirty(out, ctx.tenant, class_id, g);
                }
                let head = g.timeline.head(lane);
                let Some(l) = g.lanes.get_mut(lane) else { continue };
                if g.timeline.lane_is_empty(lane)
                    && l.open.is_none()
                    && l.pending_since_ms.is_none()
                    && cooldown_over(rule, l.last_fired_ms, head)
                {
                    l.recent.clear(&mut g.ids);
                    *l = Lane::default();
                    g.timeline.stop(lane);
                    if let Some(rs) = ts.rules.get_mut(&rule.id()) {
                        rs.lanes = rs.lanes.saturating_sub(1);
                    }
                    mark_group_dirty(out, ctx.tenant, class_id, g);
                }
            }
            let idle = g.timeline.is_idle();
            if idle {
                out.deletes.push(StateKey { tenant: ctx.tenant, rule: class_id, group: Some(class_group_key(&g.key)) });
            }
            !idle
        });
    }
}

/// Answers a plugin rule call's `alert_open` for its event: whether a match now would only
/// count toward the open alert of the event's group, as `on_group_event` will treat it. The
/// group key is built only when the plugin asks, and is then kept for the event's other rules.
struct GroupAlerts<'a, 'e> {
    keys: &'a mut [(String, GroupId)],
    ready: &'a mut [bool],
    gc: usize,
    rule: &'a CompiledRule,
    fields: &'a mut Fields<'e>,
    groups: &'a FastMap<GroupId, Box<GroupState>>,
    /// The event's effective time.
    t: i64,
    /// The engine clock less the allowed lateness (what alerts expire against).
    floor_ms: i64,
}

impl RuleAlerts for GroupAlerts<'_, '_> {
    fn alert_open(&mut self) -> bool {
        let Some((_, gid)) = event_key(self.keys, self.ready, self.gc, self.rule, self.fields) else {
            return false;
        };
        let Some(g) = self.groups.get(&gid) else { return false };
        // `on_group_event` first moves the group's head to the event, then expires the alert.
        g.open.is_some() && !event_alert_expired(self.rule, g, g.head_ms.max(self.t).max(self.floor_ms))
    }
}

/// Calls a plugin rule's module for one event; failures are recorded (and the rule's event
/// evaluation simply does not fire).
#[allow(clippy::too_many_arguments)]
fn call_plugin(
    plugins: &mut Option<EnginePlugins>,
    binding: &PluginBinding,
    rule: &CompiledRule,
    state: &mut Box<PluginState>,
    ev: &EventRecord,
    t: i64,
    clock: i64,
    alerts: &mut dyn RuleAlerts,
) -> Option<Decision> {
    let p = plugins.as_mut()?;
    let input = CallInput {
        event: ev,
        time_ms: t,
        config: &binding.config,
        rule_id: rule.rule.id,
        rule_version: rule.rule.version,
    };
    let report = p.host.evaluate(ev.tenant_id, &binding.digest, state, &input, alerts);
    if let Some(stats) = &p.stats {
        p.pending.record(stats, ev.tenant_id, binding.plugin_id, &report, clock, p.max_consecutive_failures);
    }
    match p.reports.as_mut() {
        // Dry-runs keep the report; the live path moves the decision out without a copy.
        Some(r) => {
            let decision = match &report.outcome {
                Outcome::Decision(d) => Some(d.clone()),
                Outcome::Failure(_) => None,
            };
            r.push((ev.id.clone(), rule.rule.id, report));
            decision
        }
        None => match report.outcome {
            Outcome::Decision(d) => Some(d),
            Outcome::Failure(_) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::compiled::Rule;
    use crate::rules::spec::{parse_rule, RuleLimits};
    use serde_json::json;

    const S: i64 = 1000;

    fn tenant() -> TenantId {
        Uuid::from_u128(7)
    }

    fn rules(defs: &[Value]) -> RuleSet {
        let mut versions = std::collections::BTreeMap::new();
        for (i, d) in defs.iter().enumerate() {
            let spec = parse_rule(d, &RuleLimits::default()).unwrap();
            let id = Uuid::from_u128(100 + i as u128);
            versions.insert(
                id,
                vec![Rule { id, tenant_id: tenant(), version: 1, spec, created_at_ms: 0, updated_at_ms: 0 }],
            );
        }
        let tr = TenantRules::build(&versions, &Default::default(), tenant(), Vec::new());
        RuleSet { revision: 1, tenants: [(tenant(), Arc::new(tr))].into_iter().collect() }
    }

    fn event(id: &str, t: i64, payload: Value) -> EventRecord {
        EventRecord {
            id: id.into(),
            tenant_id: tenant(),
            event_type: "payment.failed".into(),
            payload: payload.as_object().cloned().unwrap_or_default(),
            source: None,
            user_id: None,
            session_id: None,
            occurred_at_ms: t,
            received_at_ms: t,
            idempotency_key: None,
        }
    }

    fn cfg() -> EngineConfig {
        EngineConfig { allowed_lateness_ms: 5 * S, max_future_ms: 60 * S, max_groups_per_rule: 3 }
    }

    /// Runs inputs and returns every alert write, in order.
    fn run(engine: &mut Engine, set: &RuleSet, inputs: Vec<Input<'_>>) -> Vec<Alert> {
        let mut out = Vec::new();
        for i in inputs {
            engine.process(i, set);
            out.extend(engine.take_effects(false).alerts);
        }
        out
    }

    fn count_rule(threshold: f64, op: &str) -> Value {
        json!({"name": "r", "event_types": ["payment.*"], "group_by": ["payload.card"],
               "window": {"seconds": 10, "aggregate": "count", "op": op, "threshold": threshold}})
    }

    #[test]
    fn an_event_alerts_sample_follows_its_matches_until_it_resolves() {
        let set = rules(&[json!({"name": "r", "event_types": ["payment.*"], "cooldown_seconds": 10})]);
        let mut e = Engine::new(0, cfg());
        let evs: Vec<EventRecord> = (0..3).map(|i| event(&format!("e{i}"), i * S, json!({}))).collect();
        let input = |i: usize| Input::Event { seq: i as u64 + 1, record: &evs[i] };
        // Fired by e0; e1 folds into it in the same batch.
        e.process(input(0), &set);
        e.process(input(1), &set);
        let written = e.take_effects(false).alerts;
        assert_eq!(written.last().map(|a| (a.value, a.event_ids.clone())), Some((2.0, vec!["e0".into(), "e1".into()])));
        // e2 folds in, and the alert resolves (cooldown over) before the batch is taken.
        e.process(input(2), &set);
        e.process(Input::Tick { seq: 4, at_ms: 80 * S }, &set);
        let written = e.take_effects(false).alerts;
        let resolved = written.iter().find(|a| a.state == AlertState::Resolved).expect("resolved");
        assert_eq!((resolved.value, resolved.event_ids.as_slice()), (3.0, &["e0", "e1", "e2"].map(String::from)[..]));
    }

    #[test]
    fn exactly_at_threshold_fires_for_gte_not_gt() {
        for (op, fires) in [("gte", true), ("gt", false)] {
            let set = rules(&[count_rule(3.0, op)]);
            let mut e = Engine::new(0, cfg());
            let evs: Vec<EventRecord> = (0..3).map(|i| event(&format!("e{i}"), i * S, json!({"card": "c"}))).collect();
            let inputs = evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect();
            let alerts = run(&mut e, &set, inputs);
            assert_eq!(alerts.len(), usize::from(fires), "{op}");
            if fires {
                assert_eq!(alerts[0].value, 3.0);
                assert_eq!(alerts[0].fired_at_ms, 2 * S);
                assert_eq!(alerts[0].event_ids, ["e0", "e1", "e2"]);
            }
        }
    }

    #[test]
    fn event_rules_without_cooldown_fire_for_every_match_in_any_order() {
        let set = rules(&[json!({"name": "each", "event_types": ["payment.*"]})]);
        let mut e = Engine::new(0, cfg());
        let evs: Vec<EventRecord> =
            [5, 3, 4, 3, 1].iter().enumerate().map(|(i, t)| event(&format!("e{i}"), t * S, json!({}))).collect();
        let inputs = evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect();
        let alerts = run(&mut e, &set, inputs);
        let ids: std::collections::BTreeSet<Uuid> = alerts.iter().map(|a| a.id).collect();
        assert_eq!(ids.len(), 5, "{alerts:?}");
        // With a cooldown, an older match inside it does not fire again.
        let set = rules(&[json!({"name": "cool", "event_types": ["payment.*"], "cooldown_seconds": 10})]);
        let mut e = Engine::new(0, cfg());
        let inputs = evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect();
        let ids: std::collections::BTreeSet<Uuid> = run(&mut e, &set, inputs).iter().map(|a| a.id).collect();
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn redelivered_positions_count_once_and_replays_are_deterministic() {
        let set = rules(&[count_rule(2.0, "gte")]);
        let evs: Vec<EventRecord> = (0..4).map(|i| event(&format!("e{i}"), i * S, json!({"card": "c"}))).collect();
        let inputs = || evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r });
        let mut a = Engine::new(0, cfg());
        let first = run(&mut a, &set, inputs().chain(inputs()).collect());
        assert_eq!(first.len(), 1, "the second pass is at positions already processed");
        let mut b = Engine::new(0, cfg());
        let again = run(&mut b, &set, inputs().collect());
        assert_eq!(first, again, "the same log gives the same alerts, ids included");
    }

    #[test]
    fn late_and_out_of_order_events() {
        let set = rules(&[count_rule(3.0, "gte")]);
        let mut e = Engine::new(0, cfg());
        let (a, b, late, inside) = (
            event("a", 20 * S, json!({"card": "c"})),
            event("b", 21 * S, json!({"card": "c"})),
            event("late", 14 * S, json!({"card": "c"})),
            event("inside", 18 * S, json!({"card": "c"})),
        );
        let alerts = run(
            &mut e,
            &set,
            vec![
                Input::Event { seq: 1, record: &a },
                Input::Event { seq: 2, record: &b },
                // More than the allowed lateness (5 s) behind the head: not counted.
                Input::Event { seq: 3, record: &late },
            ],
        );
        assert!(alerts.is_empty());
        // Out of order but within lateness and window: counts, and the count reaches 3.
        let alerts = run(&mut e, &set, vec![Input::Event { seq: 4, record: &inside }]);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].fired_at_ms, 21 * S, "windows are evaluated at the group's head");
    }

    #[test]
    fn ticks_resolve_windows_and_fire_absence_at_the_deadline() {
        let set = rules(&[
            count_rule(1.0, "gte"),
            json!({"name": "quiet", "event_types": ["payment.*"], "absence": {"seconds": 30}}),
        ]);
        let mut e = Engine::new(0, cfg());
        let ev = event("x", 100 * S, json!({"card": "c"}));
        let fired = run(&mut e, &set, vec![Input::Event { seq: 1, record: &ev }]);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].state, AlertState::Firing);
        // Watermark = tick - lateness; the 10 s window at head 100 s empties once the head
        // passes 109.999 s, i.e. at a tick of 115 s.
        assert!(run(&mut e, &set, vec![Input::Tick { seq: 2, at_ms: 114 * S }]).is_empty());
        let resolved = run(&mut e, &set, vec![Input::Tick { seq: 3, at_ms: 115 * S }]);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].id, resolved[0].state, resolved[0].resolved_at_ms),
            (fired[0].id, AlertState::Resolved, Some(110 * S))
        );
        // Absence: 30 s after the last event was received, whenever the tick comes.
        let absent = run(&mut e, &set, vec![Input::Tick { seq: 4, at_ms: 200 * S }]);
        assert_eq!(absent.len(), 1);
        assert_eq!((absent[0].kind, absent[0].fired_at_ms), (AlertKind::Absence, 130 * S));
        assert!(run(&mut e, &set, vec![Input::Tick { seq: 5, at_ms: 300 * S }]).is_empty(), "once per silence");
    }

    #[test]
    fn group_limit_drops_new_groups_and_counts_them() {
        let set = rules(&[count_rule(100.0, "gte")]);
        let mut e = Engine::new(0, cfg());
        let evs: Vec<EventRecord> =
            (0..5).map(|i| event(&format!("e{i}"), S, json!({"card": format!("c{i}")}))).collect();
        run(&mut e, &set, evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect());
        let stats = e.stats();
        assert_eq!(stats.len(), 1);
        assert_eq!((stats[0].2.groups, stats[0].2.dropped_groups), (3, 2));
    }

    #[test]
    fn checkpoint_and_restore_continue_the_window() {
        let set = rules(&[count_rule(3.0, "gte")]);
        let evs: Vec<EventRecord> = (0..3).map(|i| event(&format!("e{i}"), i * S, json!({"card": "c"}))).collect();
        let mut e = Engine::new(0, cfg());
        run(&mut e, &set, vec![Input::Event { seq: 1, record: &evs[0] }, Input::Event { seq: 2, record: &evs[1] }]);
        let effects = e.take_effects(true);
        assert_eq!((effects.meta.state_seq, effects.meta.effects_seq), (2, 2));
        let cp = effects.checkpoint.unwrap();
        let mut restored = Engine::restore(0, cfg(), effects.meta, cp.puts).unwrap();
        assert_eq!(restored.processed_seq(), 2);
        let alerts = run(&mut restored, &set, vec![Input::Event { seq: 3, record: &evs[2] }]);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].value, 3.0);
    }
    /// Window rules that share a timeline (same `group_by` and window length) fire exactly the
    /// alerts each fires alone, through out-of-order and late events, ticks, a checkpoint and
    /// restore, and rules added and removed around them.
    #[test]
    fn rules_sharing_a_timeline_fire_as_they_do_alone() {
        use rand::{Rng, SeedableRng};
        let defs = [
            json!({"name": "count", "event_types": ["payment.*"], "group_by": ["payload.card"],
                   "filter": {"field": "payload.amount", "op": "gte", "value": 5},
                   "window": {"seconds": 10, "aggregate": "count", "op": "gt", "threshold": 3}}),
            json!({"name": "sum", "event_types": ["payment.*"], "group_by": ["payload.card"],
                   "window": {"seconds": 10, "aggregate": "sum", "field": "payload.amount", "op": "gt", "threshold": 40}}),
            json!({"name": "distinct", "event_types": ["payment.*"], "group_by": ["payload.card"],
                   "window": {"seconds": 10, "aggregate": "distinct", "field": "payload.merchant", "op": "gte", "threshold": 3}}),
            json!({"name": "pending", "event_types": ["payment.*"], "group_by": ["payload.card"], "for_seconds": 2,
                   "filter": {"field": "payload.merchant", "op": "ne", "value": "m0"},
                   "window": {"seconds": 10, "aggregate": "max", "field": "payload.amount", "op": "gte", "threshold": 8}}),
            // The same window as `distinct` with another threshold: its checkpointed column
            // refers to that rule's.
            json!({"name": "distinct tier 2", "event_types": ["payment.*"], "group_by": ["payload.card"],
                   "window": {"seconds": 10, "aggregate": "distinct", "field": "payload.merchant", "op": "gte", "threshold": 4}}),
            json!({"name": "distinct2", "event_types": ["payment.*"], "group_by": ["payload.card"], "cooldown_seconds": 30,
                   "filter": {"field": "payload.amount", "op": "lt", "value": 7},
                   "window": {"seconds": 10, "aggregate": "distinct", "field": "payload.merchant", "op": "gte", "threshold": 2}}),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut now = 1_000 * S;
        let mut events = Vec::new();
        for i in 0..1_500 {
            now += rng.random_range(0..700);
            let t = now - rng.random_range(0..8 * S);
            let payload = json!({"card": format!("c{}", rng.random_range(0..4)),
                                 "merchant": format!("m{}", rng.random_range(0..4)),
                                 "amount": rng.random_range(0..10)});
            events.push((event(&format!("e{i}"), t, payload), now, i % 7 == 0));
        }
        let cfg = EngineConfig { max_groups_per_rule: 100, ..cfg() };
        // Runs the events (a tick after every seventh), switching rule sets at `switch`; with
        // `restore`, the engine is rebuilt from its checkpoints at that point too.
        let play = |sets: &[(usize, RuleSet)], restore: bool| -> Vec<Alert> {
            let mut e = Engine::new(0, cfg);
            let mut stored: std::collections::BTreeMap<StateKey, Vec<u8>> = Default::default();
            let mut alerts = Vec::new();
            let mut seq = 0;
            for (i, (ev, clock, tick)) in events.iter().enumerate() {
                let set = &sets.iter().rev().find(|(from, _)| i >= *from).unwrap().1;
                if restore && i == 700 {
                    let effects = e.take_effects(true);
                    alerts.extend(effects.alerts);
                    let cp = effects.checkpoint.unwrap();
                    for k in cp.deletes {
                        stored.remove(&k);
                    }
                    stored.extend(cp.puts.into_iter().map(|(k, b)| (k, b.to_vec())));
                    e = Engine::restore(0, cfg, effects.meta, stored.clone()).unwrap();
                }
                seq += 1;
                e.process(Input::Event { seq, record: ev }, set);
                if *tick {
                    seq += 1;
                    e.process(Input::Tick { seq, at_ms: *clock }, set);
                }
                let effects = e.take_effects(i % 100 == 0);
                if let Some(cp) = effects.checkpoint {
                    for k in cp.deletes {
                        stored.remove(&k);
                    }
                    stored.extend(cp.puts.into_iter().map(|(k, b)| (k, b.to_vec())));
                }
                alerts.extend(effects.alerts);
            }
            alerts
        };
        // Alerts written in one batch come in the order groups are visited, so compare them as
        // sorted lists, and name the first difference.
        let of_rule = |alerts: &[Alert], id: Uuid| -> Vec<Alert> {
            let mut v: Vec<Alert> = alerts.iter().filter(|a| a.rule_id == id).cloned().collect();
            v.sort_by_key(|a| (a.fired_at_ms, a.id, a.resolved_at_ms, a.event_ids.clone()));
            v
        };
        let same = |a: &[Alert], b: &[Alert], what: &str| {
            let mut a = a.to_vec();
            let mut b = b.to_vec();
            a.sort_by_key(|a| (a.fired_at_ms, a.id, a.resolved_at_ms, a.event_ids.clone()));
            b.sort_by_key(|a| (a.fired_at_ms, a.id, a.resolved_at_ms, a.event_ids.clone()));
            if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
                panic!(
                    "{what}: {} vs {} alerts, first difference at {i}:\n{:?}\n{:?}",
                    a.len(),
                    b.len(),
                    a.get(i),
                    b.get(i)
                );
            }
        };
        let all = rules(&defs);
        let together = play(&[(0, all.clone())], false);
        let restored = play(&[(0, all.clone())], true);
        same(&together, &restored, "restoring from checkpoints changes nothing");
        for i in 0..defs.len() {
            let id = Uuid::from_u128(100 + i as u128);
            let mut alone = rules(&defs[i..=i]);
            // Built alone, the rule has another id: give it this one.
            let tr = Arc::get_mut(alone.tenants.get_mut(&tenant()).unwrap()).unwrap();
            let mut rule = tr.rules.pop().unwrap();
            Arc::get_mut(&mut rule).unwrap().rule.id = id;
            let mut rebuilt = TenantRules::default();
            rebuilt.push(Arc::into_inner(rule).unwrap());
            alone.tenants.insert(tenant(), Arc::new(rebuilt));
            let solo = play(&[(0, alone)], false);
            assert!(!solo.is_empty(), "rule {i} fires in this test");
            same(&of_rule(&together, id), &solo, &format!("rule {i}"));
        }
        // Rules added and removed midway leave the others' windows alone.
        let first_three = rules(&defs[..3]);
        let changed = play(&[(0, first_three), (500, all.clone()), (1_000, rules(&defs[..2]))], true);
        for i in 0..2 {
            let id = Uuid::from_u128(100 + i as u128);
            same(&of_rule(&changed, id), &of_rule(&together, id), &format!("rule {i} across rule changes"));
        }
    }
    /// Window state checkpointed per rule and group (before window classes) restores, carries
    /// on, and is rewritten as one shared-group entry that replaces the old ones.
    #[test]
    fn window_state_stored_per_rule_moves_to_shared_groups() {
        let set = rules(&[count_rule(3.0, "gte"), count_rule(100.0, "gte")]);
        let rule = Uuid::from_u128(100);
        let mut window = Window::new(10);
        window.insert(S, 0, None, None);
        window.insert(S, S, None, None);
        let legacy = GroupState {
            key: String::new(),
            id: 0,
            values: vec![json!("c")],
            head_ms: S,
            window: Some(window),
            last_seen_ms: None,
            recent: ["e0", "e1"].into_iter().map(Arc::from).collect(),
            pending_since_ms: None,
            open: None,
            last_fired_ms: None,
            dirty: false,
            alert_dirty: false,
        };
        // Group keys are the group-by values as JSON, each ended by U+001F.
        let key = format!("{}\u{1f}", json!("c"));
        let old_key = StateKey { tenant: tenant(), rule, group: Some(key.clone()) };
        let meta =
            RuleMeta { version: 1, shape: set.tenants[&tenant()].rules[0].shape, dropped_groups: 0, since_ms: 0 };
        let mut stored: std::collections::BTreeMap<StateKey, Vec<u8>> = [
            (old_key.clone(), rmp_serde::to_vec_named(&legacy).unwrap()),
            (StateKey { tenant: tenant(), rule, group: None }, rmp_serde::to_vec_named(&meta).unwrap()),
        ]
        .into_iter()
        .collect();
        let meta = EngineMeta { effects_seq: 2, state_seq: 2, clock_ms: S };
        let mut e = Engine::restore(0, cfg(), meta, stored.clone()).unwrap();
        let ev = event("e2", 2 * S, json!({"card": "c"}));
        let alerts = run(&mut e, &set, vec![Input::Event { seq: 3, record: &ev }]);
        assert_eq!(alerts.len(), 1, "the restored window counts on");
        assert_eq!((alerts[0].value, alerts[0].event_ids.clone()), (3.0, vec!["e0".into(), "e1".into(), "e2".into()]));
        let effects = e.take_effects(true);
        let cp = effects.checkpoint.unwrap();
        assert!(cp.deletes.contains(&old_key), "the per-rule entry is deleted");
        let shared: Vec<&StateKey> = cp
            .puts
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.group.as_deref().is_some_and(|g| g.starts_with(CLASS_GROUP)))
            .collect();
        assert_eq!(shared.len(), 1, "one entry for the group, whatever the number of rules: {:?}", cp.puts);
        for k in &cp.deletes {
            stored.remove(k);
        }
        stored.extend(cp.puts.into_iter().map(|(k, b)| (k, b.to_vec())));
        assert!(!stored.contains_key(&old_key));
        // Restored from the new entry: the open alert stays open (no second firing), and the
        // group exists once.
        let mut again = Engine::restore(0, cfg(), effects.meta, stored).unwrap();
        let ev = event("e3", 3 * S, json!({"card": "c"}));
        assert!(run(&mut again, &set, vec![Input::Event { seq: 4, record: &ev }]).is_empty());
        let stats: Vec<RuleStats> = again.stats().into_iter().filter(|s| s.1 == rule).map(|s| s.2).collect();
        assert_eq!(stats, [RuleStats { groups: 1, dropped_groups: 0, firing: 1 }]);
        // It resolves once the window has emptied.
        let resolved = run(&mut again, &set, vec![Input::Tick { seq: 5, at_ms: 30 * S }]);
        assert_eq!(
            resolved.iter().map(|a| (a.id, a.state)).collect::<Vec<_>>(),
            [(alerts[0].id, AlertState::Resolved)]
        );
    }
    #[test]
    fn lane_samples_hold_each_id_once_and_free_what_they_drop() {
        let mut ids = IdSlab::default();
        let mut lanes = [Ring::default(); 3];
        let events: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("e{i}").as_str())).collect();
        for (i, id) in events.iter().enumerate() {
            // Every lane samples even events; lane 2 also odd ones.
            for (l, ring) in lanes.iter_mut().enumerate() {
                if i % 2 == 0 || l == 2 {
                    ring.push(&mut ids, id);
                }
            }
        }
        let sample = |r: &Ring| r.event_ids(&ids);
        let want: Vec<String> = (80..100).step_by(2).map(|i| format!("e{i}")).collect();
        assert_eq!(sample(&lanes[0]), want);
        assert_eq!(sample(&lanes[2]), (90..100).map(|i| format!("e{i}")).collect::<Vec<_>>());
        let live = ids.slots.iter().filter(|(id, _)| id.is_some()).count();
        assert_eq!(live, 15, "e80..e98 even for lanes 0 and 1, e90..e99 for lane 2: 15 distinct ids");
        assert_eq!(Arc::strong_count(&events[98]), 2, "held once by the slab, however many lanes sample it");
        for ring in &mut lanes {
            ring.clear(&mut ids);
        }
        assert!(ids.slots.iter().all(|(id, refs)| id.is_none() && *refs == 0));
        assert_eq!(Arc::strong_count(&events[98]), 1);
    }

    /// Events as the log carries them are counted, catalogued and evaluated exactly as decoded
    /// ones: for tenants with rules on the type, without rules on it, and without any rules.
    #[test]
    fn logged_events_have_the_effects_of_decoded_ones() {
        let set = rules(&[
            json!({"name": "sum", "event_types": ["payment.*"], "group_by": ["payload.card"],
                   "window": {"seconds": 10, "aggregate": "sum", "field": "payload.amount", "op": "gt", "threshold": 20}}),
            json!({"name": "each", "event_types": ["payment.*"], "filter": {"field": "payload.amount", "op": "gte", "value": 9}}),
        ]);
        let mut events = Vec::new();
        for i in 0..60i64 {
            let mut ev = event(
                &format!("e{i}"),
                1_000 * S + i * 300,
                json!({"card": format!("c{}", i % 3),
                "amount": i % 10, "meta": {"ok": i % 2 == 0, "tags": ["x"], "n": null}}),
            );
            match i % 3 {
                1 => ev.event_type = "user.signup".into(),
                2 => ev.tenant_id = Uuid::from_u128(8),
                _ => {}
            }
            events.push(ev);
        }
        let encoded: Vec<EncodedEvent> = events
            .iter()
            .enumerate()
            .map(|(i, r)| {
                EncodedEvent::from_record(r, crate::model::LogPosition { partition: 0, sequence: i as u64 + 1 })
                    .unwrap()
            })
            .collect();
        let effects = |logged: bool| {
            let mut e = Engine::new(0, cfg());
            for (i, (r, enc)) in events.iter().zip(&encoded).enumerate() {
                let seq = i as u64 + 1;
                e.process(
                    if logged { Input::Logged { seq, event: enc } } else { Input::Event { seq, record: r } },
                    &set,
                );
            }
            let fx = e.take_effects(true);
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            let mut checkpoint = fx.checkpoint.map(|c| c.puts).unwrap_or_default();
            checkpoint.sort();
            (
                fx.alerts,
                sorted(fx.series.iter().map(|d| format!("{d:?}")).collect()),
                sorted(fx.catalog.iter().map(|d| format!("{d:?}")).collect()),
                checkpoint,
            )
        };
        let (decoded, logged) = (effects(false), effects(true));
        assert!(!decoded.0.is_empty(), "the rules fire");
        assert_eq!(decoded.1.len(), 3, "a series point per tenant and type");
        assert!(decoded.1.iter().any(|p| p.contains("payload.amount")), "the sum field rides along: {:?}", decoded.1);
        assert!(decoded.2.iter().all(|c| c.contains("payload.meta.ok")), "{:?}", decoded.2);
        assert_eq!(logged, decoded);
    }
}
