//! The embedded backend, for a single node and for tests: fjall (an LSM tree) keyspaces under
//! `<data-dir>/events`, laid out as [`super::keys`] describes:
//! - `events`:  tenant(16) | day(4) | occurred_ms(8) | id  →  partition(4) | sequence(8) | record
//!   (the MessagePack record bytes exactly as the log carries them)
//! - `by_id`:   tenant(16) | id                             →  occurred_ms(8)
//! - `by_type`: tenant(16) | len(1) | type | occurred_ms(8) | id  →  (empty)
//! - `idem`:    tenant(16) | `key:<key>`                    →  received_ms(8) | event id
//!
//! One writer at a time (a mutex), since the upsert check reads before it writes. A batch
//! commits atomically across keyspaces and is fsynced (`PersistMode::SyncData`) before
//! `store_batch` returns, so partition owners can ack right after. (A redb B-tree backend with
//! the same layout was measured first: the LSM drains a backlog about 1.5x faster here.)

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::keys::{decode, event_key, tenant_key, time_prefix, ts, ts_from, type_key, type_prefix};
use super::{EventPage, EventQuery, EventStore, PageCursor, StoreError, StoreOutcome};
use crate::model::{EncodedEvent, StoredEvent, TenantId};

struct Inner {
    db: Database,
    events: Keyspace,
    by_id: Keyspace,
    by_type: Keyspace,
    idem: Keyspace,
    write: Mutex<()>,
    window_ms: i64,
}

/// The fjall-backed event store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

fn be(e: fjall::Error) -> StoreError {
    StoreError::backend(e)
}

impl EmbeddedStore {
    pub fn open(dir: &Path, idempotency_window_ms: i64) -> Result<Self, StoreError> {
        let db = Database::builder(dir).open().map_err(be)?;
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(be);
        let inner = Inner {
            events: ks("events")?,
            by_id: ks("by_id")?,
            by_type: ks("by_type")?,
            idem: ks("idem")?,
            db,
            write: Mutex::new(()),
            window_ms: idempotency_window_ms,
        };
        Ok(EmbeddedStore { inner: Arc::new(inner) })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await?
    }
}

fn store_batch_sync(s: &Inner, events: &[EncodedEvent], now_ms: i64) -> Result<StoreOutcome, StoreError> {
    let _writer = s.write.lock().map_err(|_| StoreError::Corrupt("writer lock poisoned".into()))?;
    let mut batch = s.db.batch().durability(Some(PersistMode::SyncData));
    let mut outcome = StoreOutcome::default();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for r in events {
        let id_key = tenant_key(&r.tenant_id, &r.id);
        if seen.contains(&id_key) || s.by_id.contains_key(&id_key).map_err(be)? {
            outcome.skipped += 1;
            continue;
        }
        let idem_key = match r.idempotency_key.as_deref() {
            Some(k) if k.starts_with("key:") => {
                let ik = tenant_key(&r.tenant_id, k);
                let live = seen.contains(&ik)
                    || match s.idem.get(&ik).map_err(be)? {
                        Some(v) => ts_from(&v).is_some_and(|at| now_ms - at <= s.window_ms),
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
        batch.insert(&s.events, event_key(&r.tenant_id, ms, &r.id), value);
        batch.insert(&s.by_id, id_key.clone(), ts(ms).to_vec());
        batch.insert(&s.by_type, type_key(&r.tenant_id, &r.event_type, ms, &r.id), Vec::new());
        if let Some(ik) = idem_key {
            let mut v = ts(r.received_at_ms).to_vec();
            v.extend_from_slice(r.id.as_bytes());
            batch.insert(&s.idem, ik.clone(), v);
            seen.insert(ik);
        }
        seen.insert(id_key);
        outcome.stored += 1;
    }
    batch.commit().map_err(be)?;
    Ok(outcome)
}

fn get_sync(s: &Inner, tenant: TenantId, id: &str) -> Result<Option<StoredEvent>, StoreError> {
    let Some(at) = s.by_id.get(tenant_key(&tenant, id)).map_err(be)? else { return Ok(None) };
    let ms = ts_from(&at).ok_or_else(|| StoreError::Corrupt("by_id value".into()))?;
    match s.events.get(event_key(&tenant, ms, id)).map_err(be)? {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Err(StoreError::Corrupt(format!("event {id} is indexed but missing"))),
    }
}

fn query_sync(s: &Inner, tenant: TenantId, q: EventQuery) -> Result<EventPage, StoreError> {
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
            for item in s.events.range(lower..upper).rev() {
                let v = item.value().map_err(be)?;
                if out.len() == limit {
                    more = true;
                    break;
                }
                out.push(decode(&v)?);
            }
        }
        Some(event_type) => {
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
            for item in s.by_type.range(lower..upper).rev() {
                let key = item.key().map_err(be)?;
                if out.len() == limit {
                    more = true;
                    break;
                }
                let tail = key.get(prefix.len()..).ok_or_else(|| StoreError::Corrupt("by_type key".into()))?;
                let ms = ts_from(tail).ok_or_else(|| StoreError::Corrupt("by_type key".into()))?;
                let id = std::str::from_utf8(&tail[8..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                match s.events.get(event_key(&tenant, ms, id)).map_err(be)? {
                    Some(v) => out.push(decode(&v)?),
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
        self.blocking(move |s| store_batch_sync(s, &events, now_ms)).await
    }

    async fn get_event(&self, tenant: TenantId, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let id = id.to_string();
        self.blocking(move |s| get_sync(s, tenant, &id)).await
    }

    async fn query(&self, tenant: TenantId, query: EventQuery) -> Result<EventPage, StoreError> {
        self.blocking(move |s| query_sync(s, tenant, query)).await
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
        self.blocking(move |s| {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(id) = key.strip_prefix("id:") {
                    let found = s.by_id.contains_key(tenant_key(&tenant, id)).map_err(be)?;
                    out.push(found.then(|| id.to_string()));
                    continue;
                }
                let Some(v) = s.idem.get(tenant_key(&tenant, &key)).map_err(be)? else {
                    out.push(None);
                    continue;
                };
                let at = ts_from(&v).ok_or_else(|| StoreError::Corrupt("idempotency record".into()))?;
                if now_ms - at > s.window_ms {
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
        self.blocking(move |s| {
            let _writer = s.write.lock().map_err(|_| StoreError::Corrupt("writer lock poisoned".into()))?;
            let mut batch = s.db.batch().durability(Some(PersistMode::SyncData));
            let mut removed = 0u64;
            for item in s.idem.iter() {
                let (k, v) = item.into_inner().map_err(be)?;
                if ts_from(&v).is_none_or(|at| now_ms - at > s.window_ms) {
                    batch.remove(&s.idem, k);
                    removed += 1;
                }
            }
            batch.commit().map_err(be)?;
            Ok(removed)
        })
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.blocking(|s| {
            s.events.contains_key(b"").map_err(be)?;
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
        let store = EmbeddedStore::open(dir.path(), super::super::conformance::WINDOW_MS).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_events() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = uuid::Uuid::now_v7();
        {
            let store = EmbeddedStore::open(dir.path(), 1000).unwrap();
            let ev = super::super::conformance::event(tenant, "a.b", "e1", 10);
            store.store_batch(vec![ev].into(), 10).await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), 1000).unwrap();
        assert!(store.get_event(tenant, "e1").await.unwrap().is_some());
    }
}
