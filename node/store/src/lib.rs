//! The event store: a view of the event log, keyed for tenant + time-range scans.
//!
//! Both backends share one key design (the ScyllaDB table has the same shape):
//! partition key = (tenant, day bucket), clustering = (occurred_at ms, event id), plus a
//! by-id index and a by-type index. Writes come from partition owners in batches and are
//! idempotent: an event id already stored for the tenant is skipped, so a redelivered message
//! stores once. The store also keeps idempotency records (`key:` keys from the
//! `Idempotency-Key` header) written in the same transaction as their event, which makes the
//! long-window deduplication exact: a record exists if and only if its event is stored.
//!
//! [`conformance`] holds the behaviour every backend must pass.
//!
//! Uses only `signalops-core` among SignalOps crates: a backend (the embedded one here, ScyllaDB
//! next to it) never pulls in the rule engine, the WASM runtime or NATS.

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod embedded;
mod keys;

use std::sync::Arc;

use async_trait::async_trait;

use uuid::Uuid;

use signalops_core::alert::{Alert, AlertAck};
use signalops_core::delivery::{DeliveryRecord, DeliveryStatus};
use signalops_core::effects::{CatalogEntry, EngineMeta, PartitionEffects, SeriesPoint, StateKey};
use signalops_core::model::{EncodedEvent, StoredEvent, TenantId};

/// A failure of the storage backend. It keeps its cause for the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StoreError {
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// A page request over one tenant's events, newest first.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub event_type: Option<String>,
    /// Inclusive lower bound on `occurred_at`, epoch ms.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound on `occurred_at`, epoch ms.
    pub to_ms: Option<i64>,
    pub limit: usize,
    /// Continue strictly after (older than) this position.
    pub after: Option<PageCursor>,
}

/// Position of the last event of a page: (occurred_at ms, event id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub occurred_at_ms: i64,
    pub id: String,
}

#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    pub next: Option<PageCursor>,
}

/// What a batch write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Events written for the first time.
    pub stored: usize,
    /// Events skipped because their id (or idempotency key) was already stored.
    pub skipped: usize,
}

/// What a write did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Written for the first time.
    Stored,
    /// The store already holds this event at this same log position: a redelivery of the
    /// message (its effects may still be due).
    AlreadyStored,
    /// Another log message already carried this event (same id, or a live idempotency key):
    /// nothing was written and the message has no effects of its own.
    Duplicate,
}

/// What one [`EventStore::write`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// One per event of the set, in order.
    pub events: Vec<EventOutcome>,
    /// Indexes into the set's effects that were fenced (a deposed owner's), in order.
    pub fenced: Vec<usize>,
}

/// One atomic write: events from the log and the effects rule engines derived from earlier
/// events. Partition owners submit these through a group-commit writer.
#[derive(Debug, Default)]
pub struct WriteSet {
    /// Batches of events, written in order (outcomes come back flattened, in the same order).
    pub events: Vec<Arc<[EncodedEvent]>>,
    pub effects: Vec<PartitionEffects>,
}

/// A page request over one tenant's alerts, newest first.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    /// `firing`, `acknowledged` or `resolved`.
    pub state: Option<String>,
    pub rule_id: Option<Uuid>,
    /// Inclusive lower bound on `fired_at`, epoch ms.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound on `fired_at`, epoch ms.
    pub to_ms: Option<i64>,
    pub limit: usize,
    /// Continue strictly after (older than) this alert.
    pub after: Option<Uuid>,
}

#[derive(Debug, Clone, Default)]
pub struct AlertPage {
    pub alerts: Vec<(Alert, Option<AlertAck>)>,
    pub next: Option<Uuid>,
}

/// Most alert records one page request examines before it returns what it has found
/// (with a cursor), so a selective filter cannot turn a request into a full scan.
pub const MAX_ALERT_SCAN: usize = 10_000;

/// A page request over one tenant's deliveries, newest first.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub channel_id: Option<String>,
    pub alert_id: Option<Uuid>,
    pub status: Option<DeliveryStatus>,
    /// Inclusive lower bound on the delivery's transition time, epoch ms.
    pub from_ms: Option<i64>,
    pub limit: usize,
    /// Continue strictly after (older than) this delivery.
    pub after: Option<Uuid>,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliveryRecord>,
    pub next: Option<Uuid>,
}

/// Usage a tenant accrued on one day (days since the Unix epoch, UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDay {
    pub day: i64,
    pub metric: String,
    pub count: u64,
}

/// The usage metric of successful notification deliveries.
pub const USAGE_NOTIFICATIONS_SENT: &str = "notifications_sent";

/// A partition engine's stored state: where it stands and its entries.
#[derive(Debug, Default)]
pub struct EngineSnapshot {
    pub meta: Option<EngineMeta>,
    pub entries: Vec<(StateKey, Vec<u8>)>,
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Writes events and effects in one atomic, durable commit. Returns one outcome per event,
    /// in order, and the effects it refused. Events whose id is already stored for their
    /// tenant, or whose `key:` idempotency key has a live record, are not written again.
    /// Effects whose epoch is older than the newest committed for their partition (in the
    /// store or in the same commit) are fenced: not written, and named in the outcome.
    async fn write(&self, set: Arc<WriteSet>, now_ms: i64) -> Result<WriteOutcome, StoreError>;

    /// Stores a batch of events (no effects) and counts what happened.
    async fn store_batch(&self, events: Arc<[EncodedEvent]>, now_ms: i64) -> Result<StoreOutcome, StoreError> {
        let set = WriteSet { events: vec![events], effects: Vec::new() };
        let outcomes = self.write(Arc::new(set), now_ms).await?.events;
        let stored = outcomes.iter().filter(|o| **o == EventOutcome::Stored).count();
        Ok(StoreOutcome { stored, skipped: outcomes.len() - stored })
    }

    /// The stored state of one partition's rule engine.
    async fn load_engine(&self, partition: u32) -> Result<EngineSnapshot, StoreError>;

    /// One alert (with its acknowledgement), only within the tenant.
    async fn get_alert(&self, tenant: TenantId, id: Uuid) -> Result<Option<(Alert, Option<AlertAck>)>, StoreError>;

    /// A page of the tenant's alerts, newest first.
    async fn query_alerts(&self, tenant: TenantId, query: AlertQuery) -> Result<AlertPage, StoreError>;

    /// Acknowledges an alert (the first acknowledgement is kept). `None` when the tenant has
    /// no such alert.
    async fn ack_alert(
        &self,
        tenant: TenantId,
        id: Uuid,
        ack: AlertAck,
    ) -> Result<Option<(Alert, Option<AlertAck>)>, StoreError>;

    /// Per-minute points of one event type, `[from_minute, to_minute)`, in time order.
    async fn series(
        &self,
        tenant: TenantId,
        event_type: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(i64, SeriesPoint)>, StoreError>;

    /// The tenant's event catalog, by event type.
    async fn catalog(&self, tenant: TenantId) -> Result<Vec<(String, CatalogEntry)>, StoreError>;

    /// One event by id, only within the tenant.
    async fn get_event(&self, tenant: TenantId, id: &str) -> Result<Option<StoredEvent>, StoreError>;

    /// A page of the tenant's events, newest first.
    async fn query(&self, tenant: TenantId, query: EventQuery) -> Result<EventPage, StoreError>;

    /// For each idempotency key, the event id it was accepted as, if that event is stored and
    /// (for `key:` keys) its record is not older than the window. One answer per key, in order.
    async fn find_idempotent(
        &self,
        tenant: TenantId,
        keys: Vec<String>,
        now_ms: i64,
    ) -> Result<Vec<Option<String>>, StoreError>;

    /// Drops idempotency records older than the window; returns how many.
    async fn purge_idempotency(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Stores alerts the node raises itself (operational alerts, such as a disabled channel).
    async fn put_alerts(&self, alerts: Vec<Alert>) -> Result<(), StoreError>;

    /// One delivery record, only within the tenant.
    async fn get_delivery(&self, tenant: TenantId, id: Uuid) -> Result<Option<DeliveryRecord>, StoreError>;

    /// Writes delivery records in one durable commit. A record that becomes `delivered` (its
    /// stored copy was not) adds one to its tenant's `notifications_sent` usage of the day, in
    /// the same commit, so a delivery is counted once however often its record is written.
    async fn put_deliveries(&self, records: Vec<DeliveryRecord>, now_ms: i64) -> Result<(), StoreError>;

    /// A page of the tenant's deliveries, newest first.
    async fn query_deliveries(&self, tenant: TenantId, query: DeliveryQuery) -> Result<DeliveryPage, StoreError>;

    /// Drops finished (delivered or failed) delivery records whose transition happened before
    /// `before_ms`; returns how many.
    async fn purge_deliveries(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// The tenant's usage per day and metric, `[from_day, to_day)`, in time order.
    async fn usage(&self, tenant: TenantId, from_day: i64, to_day: i64) -> Result<Vec<UsageDay>, StoreError>;

    /// Succeeds when the store can serve reads (readiness).
    async fn check(&self) -> Result<(), StoreError>;
}
