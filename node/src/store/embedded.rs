//! The embedded backend: one redb file under the data dir, for a single node and for tests.
//!
//! Tables (all keys are byte strings, big-endian numbers so byte order is time order):
//! - `events`:  tenant(16) | day(4) | occurred_ms(8) | id  →  partition(4) | sequence(8) | MessagePack record
//!   (the record bytes exactly as the log carries them)
//! - `by_id`:   tenant(16) | id                             →  occurred_ms(8)
//! - `by_type`: tenant(16) | len(1) | type | occurred_ms(8) | id  →  ()
//! - `idem`:    tenant(16) | key                            →  recorded_ms(8) | event id
//!
//! Every write transaction commits with immediate durability before the caller acks the log.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{EventPage, EventQuery, EventStore, PageCursor, StoreError, StoreOutcome};
use crate::model::{EncodedEvent, LogPosition, StoredEvent, TenantId};

const EVENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");
const BY_ID: TableDefinition<&[u8], &[u8]> = TableDefinition::new("by_id");
const BY_TYPE: TableDefinition<&[u8], ()> = TableDefinition::new("by_type");
const IDEM: TableDefinition<&[u8], &[u8]> = TableDefinition::new("idem");

const DAY_MS: i64 = 86_400_000;

/// The redb-backed event store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    idempotency_window_ms: i64,
}

fn ts(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_from(b: &[u8]) -> Option<i64> {
    let arr: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
}

fn day(ms: i64) -> [u8; 4] {
    (ms.div_euclid(DAY_MS).clamp(0, u32::MAX as i64) as u32).to_be_bytes()
}

fn event_key(tenant: &TenantId, ms: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(28 + id.len());
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(&day(ms));
    k.extend_from_slice(&ts(ms));
    k.extend_from_slice(id.as_bytes());
    k
}

fn time_prefix(tenant: &TenantId, ms: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(28);
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(&day(ms));
    k.extend_from_slice(&ts(ms));
    k
}

fn tenant_key(tenant: &TenantId, tail: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + tail.len());
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(tail.as_bytes());
    k
}

fn type_prefix(tenant: &TenantId, event_type: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + event_type.len() + 8);
    k.extend_from_slice(tenant.as_bytes());
    k.push(event_type.len() as u8);
    k.extend_from_slice(event_type.as_bytes());
    k
}

fn type_key(tenant: &TenantId, event_type: &str, ms: i64, id: &str) -> Vec<u8> {
    let mut k = type_prefix(tenant, event_type);
    k.extend_from_slice(&ts(ms));
    k.extend_from_slice(id.as_bytes());
    k
}

fn decode(bytes: &[u8]) -> Result<StoredEvent, StoreError> {
    let corrupt = || StoreError::Corrupt("event value shorter than its header".into());
    let partition = u32::from_be_bytes(bytes.get(..4).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?);
    let sequence = u64::from_be_bytes(bytes.get(4..12).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?);
    let record = rmp_serde::from_slice(&bytes[12..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(StoredEvent { record, position: LogPosition { partition, sequence } })
}

impl EmbeddedStore {
    /// Opens (or creates) the store file and its tables.
    pub fn open(path: &Path, idempotency_window_ms: i64) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(StoreError::backend)?;
        let tx = db.begin_write().map_err(StoreError::backend)?;
        {
            tx.open_table(EVENTS).map_err(StoreError::backend)?;
            tx.open_table(BY_ID).map_err(StoreError::backend)?;
            tx.open_table(BY_TYPE).map_err(StoreError::backend)?;
            tx.open_table(IDEM).map_err(StoreError::backend)?;
        }
        tx.commit().map_err(StoreError::backend)?;
        Ok(EmbeddedStore { db: Arc::new(db), idempotency_window_ms })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, i64) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let window = self.idempotency_window_ms;
        tokio::task::spawn_blocking(move || f(&db, window)).await?
    }
}

fn store_batch_sync(
    db: &Database,
    window_ms: i64,
    events: &[EncodedEvent],
    now_ms: i64,
) -> Result<StoreOutcome, StoreError> {
    let tx = db.begin_write().map_err(StoreError::backend)?;
    let mut outcome = StoreOutcome::default();
    {
        let mut events_t = tx.open_table(EVENTS).map_err(StoreError::backend)?;
        let mut by_id = tx.open_table(BY_ID).map_err(StoreError::backend)?;
        let mut by_type = tx.open_table(BY_TYPE).map_err(StoreError::backend)?;
        let mut idem = tx.open_table(IDEM).map_err(StoreError::backend)?;
        for r in events {
            let id_key = tenant_key(&r.tenant_id, &r.id);
            if by_id.get(id_key.as_slice()).map_err(StoreError::backend)?.is_some() {
                outcome.skipped += 1;
                continue;
            }
            let idem_key = match r.idempotency_key.as_deref() {
                Some(k) if k.starts_with("key:") => {
                    let ik = tenant_key(&r.tenant_id, k);
                    let live = match idem.get(ik.as_slice()).map_err(StoreError::backend)? {
                        Some(v) => ts_from(v.value()).is_some_and(|at| now_ms - at <= window_ms),
                        None => false,
                    };
                    if live {
                        outcome.skipped += 1;
                        continue;
                    }
                    Some(ik)
                }
                _ => None,
            };
            let mut value = Vec::with_capacity(12 + r.record.len());
            value.extend_from_slice(&r.position.partition.to_be_bytes());
            value.extend_from_slice(&r.position.sequence.to_be_bytes());
            value.extend_from_slice(&r.record);
            let ms = r.occurred_at_ms;
            events_t
                .insert(event_key(&r.tenant_id, ms, &r.id).as_slice(), value.as_slice())
                .map_err(StoreError::backend)?;
            by_id.insert(id_key.as_slice(), ts(ms).as_slice()).map_err(StoreError::backend)?;
            by_type
                .insert(type_key(&r.tenant_id, &r.event_type, ms, &r.id).as_slice(), ())
                .map_err(StoreError::backend)?;
            if let Some(ik) = idem_key {
                let mut v = ts(r.received_at_ms).to_vec();
                v.extend_from_slice(r.id.as_bytes());
                idem.insert(ik.as_slice(), v.as_slice()).map_err(StoreError::backend)?;
            }
            outcome.stored += 1;
        }
    }
    tx.commit().map_err(StoreError::backend)?;
    Ok(outcome)
}

fn get_sync(db: &Database, tenant: TenantId, id: &str) -> Result<Option<StoredEvent>, StoreError> {
    let tx = db.begin_read().map_err(StoreError::backend)?;
    let by_id = tx.open_table(BY_ID).map_err(StoreError::backend)?;
    let Some(at) = by_id.get(tenant_key(&tenant, id).as_slice()).map_err(StoreError::backend)? else {
        return Ok(None);
    };
    let ms = ts_from(at.value()).ok_or_else(|| StoreError::Corrupt("by_id value".into()))?;
    let events = tx.open_table(EVENTS).map_err(StoreError::backend)?;
    let found = events.get(event_key(&tenant, ms, id).as_slice()).map_err(StoreError::backend)?;
    match found {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Err(StoreError::Corrupt(format!("event {id} is indexed but missing"))),
    }
}

fn query_sync(db: &Database, tenant: TenantId, q: EventQuery) -> Result<EventPage, StoreError> {
    let tx = db.begin_read().map_err(StoreError::backend)?;
    let events = tx.open_table(EVENTS).map_err(StoreError::backend)?;
    let limit = q.limit.max(1);
    let mut out = Vec::with_capacity(limit.min(1000));
    let mut more = false;
    let from = q.from_ms.unwrap_or(0).max(0);
    match &q.event_type {
        None => {
            let lower = time_prefix(&tenant, from);
            let upper = match (&q.after, q.to_ms) {
                (Some(c), to) if to.is_none_or(|t| c.occurred_at_ms < t) => event_key(&tenant, c.occurred_at_ms, &c.id),
                (_, Some(to)) => time_prefix(&tenant, to),
                (_, None) => {
                    let mut k = tenant.as_bytes().to_vec();
                    k.extend_from_slice(&[0xff; 13]);
                    k
                }
            };
            if lower >= upper {
                return Ok(EventPage::default());
            }
            for item in events.range(lower.as_slice()..upper.as_slice()).map_err(StoreError::backend)?.rev() {
                let (_, v) = item.map_err(StoreError::backend)?;
                if out.len() == limit {
                    more = true;
                    break;
                }
                out.push(decode(v.value())?);
            }
        }
        Some(event_type) => {
            let by_type = tx.open_table(BY_TYPE).map_err(StoreError::backend)?;
            let prefix = type_prefix(&tenant, event_type);
            let mut lower = prefix.clone();
            lower.extend_from_slice(&ts(from));
            let upper = match (&q.after, q.to_ms) {
                (Some(c), to) if to.is_none_or(|t| c.occurred_at_ms < t) => {
                    type_key(&tenant, event_type, c.occurred_at_ms, &c.id)
                }
                (_, Some(to)) => {
                    let mut k = prefix.clone();
                    k.extend_from_slice(&ts(to));
                    k
                }
                (_, None) => {
                    let mut k = prefix.clone();
                    k.extend_from_slice(&[0xff; 9]);
                    k
                }
            };
            if lower >= upper {
                return Ok(EventPage::default());
            }
            for item in by_type.range(lower.as_slice()..upper.as_slice()).map_err(StoreError::backend)?.rev() {
                let (k, _) = item.map_err(StoreError::backend)?;
                if out.len() == limit {
                    more = true;
                    break;
                }
                let key = k.value();
                let tail = key.get(prefix.len()..).ok_or_else(|| StoreError::Corrupt("by_type key".into()))?;
                let ms = ts_from(tail).ok_or_else(|| StoreError::Corrupt("by_type key".into()))?;
                let id = std::str::from_utf8(&tail[8..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                match events.get(event_key(&tenant, ms, id).as_slice()).map_err(StoreError::backend)? {
                    Some(v) => out.push(decode(v.value())?),
                    None => return Err(StoreError::Corrupt(format!("event {id} is indexed but missing"))),
                }
            }
        }
    }
    let next = if more {
        out.last().map(|e| PageCursor { occurred_at_ms: e.record.occurred_at_ms, id: e.record.id.clone() })
    } else {
        None
    };
    Ok(EventPage { events: out, next })
}

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn store_batch(&self, events: Arc<[EncodedEvent]>, now_ms: i64) -> Result<StoreOutcome, StoreError> {
        if events.is_empty() {
            return Ok(StoreOutcome::default());
        }
        self.blocking(move |db, window| store_batch_sync(db, window, &events, now_ms)).await
    }

    async fn get_event(&self, tenant: TenantId, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db, _| get_sync(db, tenant, &id)).await
    }

    async fn query(&self, tenant: TenantId, query: EventQuery) -> Result<EventPage, StoreError> {
        self.blocking(move |db, _| query_sync(db, tenant, query)).await
    }

    async fn find_idempotent(
        &self,
        tenant: TenantId,
        keys: Vec<String>,
        now_ms: i64,
    ) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.blocking(move |db, window| {
            let tx = db.begin_read().map_err(StoreError::backend)?;
            let by_id = tx.open_table(BY_ID).map_err(StoreError::backend)?;
            let idem = tx.open_table(IDEM).map_err(StoreError::backend)?;
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(id) = key.strip_prefix("id:") {
                    let found = by_id.get(tenant_key(&tenant, id).as_slice()).map_err(StoreError::backend)?;
                    out.push(found.map(|_| id.to_string()));
                    continue;
                }
                let Some(v) = idem.get(tenant_key(&tenant, &key).as_slice()).map_err(StoreError::backend)? else {
                    out.push(None);
                    continue;
                };
                let v = v.value();
                let at = ts_from(v).ok_or_else(|| StoreError::Corrupt("idempotency record".into()))?;
                if now_ms - at > window {
                    out.push(None);
                    continue;
                }
                let id = std::str::from_utf8(&v[8..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push(Some(id.to_string()));
            }
            Ok(out)
        })
        .await
    }

    async fn purge_idempotency(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.blocking(move |db, window| {
            let tx = db.begin_write().map_err(StoreError::backend)?;
            let mut removed = 0u64;
            {
                let mut idem = tx.open_table(IDEM).map_err(StoreError::backend)?;
                idem.retain(|_, v| {
                    let keep = ts_from(v).is_some_and(|at| now_ms - at <= window);
                    if !keep {
                        removed += 1;
                    }
                    keep
                })
                .map_err(StoreError::backend)?;
            }
            tx.commit().map_err(StoreError::backend)?;
            Ok(removed)
        })
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.blocking(|db, _| {
            let tx = db.begin_read().map_err(StoreError::backend)?;
            tx.open_table(EVENTS).map_err(StoreError::backend)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_store_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("events.redb"), super::super::conformance::WINDOW_MS).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.redb");
        let tenant = uuid::Uuid::now_v7();
        {
            let store = EmbeddedStore::open(&path, 1000).unwrap();
            let ev = super::super::conformance::event(tenant, "a.b", "e1", 10);
            store.store_batch(vec![ev].into(), 10).await.unwrap();
        }
        let store = EmbeddedStore::open(&path, 1000).unwrap();
        assert!(store.get_event(tenant, "e1").await.unwrap().is_some());
    }
}
