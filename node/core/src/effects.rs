//! What a partition's rule engine hands the store after a batch: alert upserts, metric-series
//! and catalog increments, and (at checkpoints) the engine state that changed. The store
//! commits one [`PartitionEffects`] atomically with the log position it reflects, which is
//! what makes the increments exactly-once: after a crash the engine resumes from that position.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::alert::Alert;
use crate::model::TenantId;

/// Where a partition's engine stands, as last committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EngineMeta {
    /// Last log sequence whose effects are committed.
    pub effects_seq: u64,
    /// Last log sequence the stored engine state reflects (≤ `effects_seq`). Events in
    /// between are replayed from the log at start-up to rebuild windows, without re-emitting
    /// increments.
    pub state_seq: u64,
    /// The partition clock at `effects_seq`.
    pub clock_ms: i64,
}

/// Key of one piece of engine state: a rule's metadata (`group: None`) or one group's state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    pub tenant: TenantId,
    pub rule: Uuid,
    pub group: Option<String>,
}

/// Engine state written at a checkpoint: changed entries and removed ones.
#[derive(Debug, Clone, Default)]
pub struct StateCheckpoint {
    /// Encoded entries; they share a few large buffers rather than owning one each.
    pub puts: Vec<(StateKey, bytes::Bytes)>,
    pub deletes: Vec<StateKey>,
}

/// Events of one type in one minute (by `occurred_at`) and the sums of the numeric fields
/// the tenant's rules aggregate.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub count: u64,
    #[serde(default)]
    pub sums: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeriesDelta {
    pub tenant: TenantId,
    pub event_type: String,
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub point: SeriesPoint,
}

impl SeriesPoint {
    pub fn merge(&mut self, other: &SeriesPoint) {
        self.count += other.count;
        for (k, v) in &other.sums {
            *self.sums.entry(k.clone()).or_insert(0.0) += v;
        }
    }
}

/// JSON types seen at a payload path, as bits.
pub mod json_type {
    pub const NULL: u8 = 1;
    pub const BOOLEAN: u8 = 2;
    pub const NUMBER: u8 = 4;
    pub const STRING: u8 = 8;
    pub const ARRAY: u8 = 16;
    pub const OBJECT: u8 = 32;

    pub fn names(bits: u8) -> Vec<&'static str> {
        [
            (NULL, "null"),
            (BOOLEAN, "boolean"),
            (NUMBER, "number"),
            (STRING, "string"),
            (ARRAY, "array"),
            (OBJECT, "object"),
        ]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| n)
        .collect()
    }
}

/// Most payload paths the catalog records per event type.
pub const MAX_CATALOG_FIELDS: usize = 256;

/// What the catalog knows of one event type of one tenant.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Payload path (`payload.a.b`) → JSON types seen there.
    #[serde(default)]
    pub fields: BTreeMap<String, u8>,
    /// True when more paths were seen than the catalog keeps.
    #[serde(default)]
    pub fields_truncated: bool,
}

impl CatalogEntry {
    pub fn merge(&mut self, other: &CatalogEntry) {
        if self.count == 0 {
            self.first_seen_ms = other.first_seen_ms;
            self.last_seen_ms = other.last_seen_ms;
        } else {
            self.first_seen_ms = self.first_seen_ms.min(other.first_seen_ms);
            self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
        }
        self.count += other.count;
        self.fields_truncated |= other.fields_truncated;
        for (path, bits) in &other.fields {
            if let Some(b) = self.fields.get_mut(path) {
                *b |= bits;
            } else if self.fields.len() < MAX_CATALOG_FIELDS {
                self.fields.insert(path.clone(), *bits);
            } else {
                self.fields_truncated = true;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CatalogDelta {
    pub tenant: TenantId,
    pub event_type: String,
    pub entry: CatalogEntry,
}

/// An alert's lifecycle step that notifications announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Firing,
    Resolved,
}

impl Transition {
    /// The `type` of the webhook payload.
    pub fn event_type(self) -> &'static str {
        match self {
            Transition::Firing => "alert.firing",
            Transition::Resolved => "alert.resolved",
        }
    }
}

/// Everything one partition's engine commits for a run of log messages.
#[derive(Debug, Clone, Default)]
pub struct PartitionEffects {
    pub partition: u32,
    /// The owner's epoch for the partition (the control plane raises it at every move; 0 for
    /// an engine no assignment stands behind). The store refuses effects older than the
    /// newest epoch it has committed for the partition, so a deposed owner commits nothing.
    pub epoch: u64,
    pub meta: EngineMeta,
    /// Alerts created or changed, in order (a later copy of the same id wins).
    pub alerts: Vec<Alert>,
    /// Alerts that fired or resolved in this run, in order (their last copy is in `alerts`).
    pub transitions: Vec<(Uuid, Transition)>,
    pub series: Vec<SeriesDelta>,
    pub catalog: Vec<CatalogDelta>,
    pub checkpoint: Option<StateCheckpoint>,
}
