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

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod embedded;
mod keys;

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{EncodedEvent, StoredEvent, TenantId};

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

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Stores a batch atomically. Events whose id is already stored for their tenant, or whose
    /// `key:` idempotency key has a live record, are skipped.
    async fn store_batch(&self, events: Arc<[EncodedEvent]>, now_ms: i64) -> Result<StoreOutcome, StoreError>;

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

    /// Succeeds when the store can serve reads (readiness).
    async fn check(&self) -> Result<(), StoreError>;
}
