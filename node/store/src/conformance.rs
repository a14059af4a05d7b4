//! Behaviour every [`EventStore`] backend must show. Backend tests call [`run_all`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use uuid::Uuid;

use signalops_core::alert::Alert;
use signalops_core::delivery::{jobs_for, DeliveryRecord, DeliveryStatus, Transition};
use signalops_core::model::{EncodedEvent, EventRecord, LogPosition, TenantId};

use super::{DeliveryQuery, EventQuery, EventStore, USAGE_NOTIFICATIONS_SENT};

/// The idempotency window the suite expects the backend under test to be opened with.
pub const WINDOW_MS: i64 = 60_000;

pub fn record(tenant: TenantId, event_type: &str, id: &str, occurred_at_ms: i64) -> EventRecord {
    EventRecord {
        id: id.to_string(),
        tenant_id: tenant,
        event_type: event_type.to_string(),
        payload: json!({"n": occurred_at_ms}).as_object().cloned().unwrap_or_default(),
        source: Some("conformance".into()),
        user_id: None,
        session_id: None,
        occurred_at_ms,
        received_at_ms: occurred_at_ms,
        idempotency_key: None,
    }
}

pub fn encode(r: &EventRecord) -> EncodedEvent {
    EncodedEvent::from_record(r, LogPosition { partition: 1, sequence: r.occurred_at_ms as u64 }).unwrap()
}

pub fn event(tenant: TenantId, event_type: &str, id: &str, occurred_at_ms: i64) -> EncodedEvent {
    encode(&record(tenant, event_type, id, occurred_at_ms))
}

pub async fn run_all(store: &dyn EventStore) {
    upsert_by_id(store).await;
    node_made_ids(store).await;
    fencing(store).await;
    newest_first_paging(store).await;
    time_range_and_type(store).await;
    tenant_isolation(store).await;
    idempotency_records(store).await;
    store.check().await.unwrap();
    deliveries(store).await;
}

async fn upsert_by_id(store: &dyn EventStore) {
    let t = Uuid::now_v7();
    let first = store.store_batch(vec![event(t, "a", "x1", 100), event(t, "a", "x2", 100)].into(), 100).await.unwrap();
    assert_eq!((first.stored, first.skipped), (2, 0));
    // A redelivered event, even with other content, stores once and keeps the first version.
    let mut again = record(t, "a", "x1", 500);
    again.payload.insert("changed".into(), json!(true));
    let second = store.store_batch(vec![encode(&again)].into(), 600).await.unwrap();
    assert_eq!((second.stored, second.skipped), (0, 1));
    let got = store.get_event(t, "x1").await.unwrap().unwrap();
    assert_eq!(got.record.occurred_at_ms, 100);
    assert!(!got.record.payload.contains_key("changed"));
    assert_eq!(got.record, record(t, "a", "x1", 100), "the stored record reads back whole");
    assert_eq!(got.position, LogPosition { partition: 1, sequence: 100 });
    let page = store.query(t, EventQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page.events.len(), 2);
}

/// Events whose ids the node made (UUIDv7 carrying the event time) and producer ids that look
/// like them: found by id, stored once, and a producer reusing such an id is a duplicate.
async fn node_made_ids(store: &dyn EventStore) {
    use super::{EventOutcome, WriteSet};
    let t = Uuid::now_v7();
    let at = 1_700_000_000_123;
    let id = signalops_core::model::event_id(at).to_string();
    let first = encode(&record(t, "n", &id, at));
    let write = |events: Vec<EncodedEvent>| async move {
        let set = std::sync::Arc::new(WriteSet { events: vec![events.into()], effects: Vec::new() });
        store.write(set, at).await.map(|w| w.events)
    };
    assert_eq!(write(vec![first.clone()]).await.unwrap(), [EventOutcome::Stored]);
    let got = store.get_event(t, &id).await.unwrap().unwrap();
    assert_eq!(got.record, record(t, "n", &id, at));
    assert!(store.get_event(Uuid::now_v7(), &id).await.unwrap().is_none(), "only within the tenant");
    let unknown = signalops_core::model::event_id(at).to_string();
    assert!(store.get_event(t, &unknown).await.unwrap().is_none());
    // A redelivery at the same position, and the same id from another position.
    let mut moved = first.clone();
    moved.position.sequence += 1;
    assert_eq!(
        write(vec![first.clone(), moved]).await.unwrap(),
        [EventOutcome::AlreadyStored, EventOutcome::Duplicate]
    );
    // A producer sending the id it was given back, with another event time, is a duplicate too.
    let mut reused = record(t, "n", &id, at - 5_000);
    reused.idempotency_key = Some(format!("id:{id}"));
    let mut reused = encode(&reused);
    reused.position.sequence = 9;
    assert_eq!(write(vec![reused]).await.unwrap(), [EventOutcome::Duplicate]);
    assert_eq!(store.find_idempotent(t, vec![format!("id:{id}")], at).await.unwrap(), [Some(id.clone())]);
    // A producer id that is a UUIDv7 of another time is found by id as well.
    let foreign = signalops_core::model::event_id(at - 60_000).to_string();
    let mut own = record(t, "n", &foreign, at);
    own.idempotency_key = Some(format!("id:{foreign}"));
    assert_eq!(write(vec![encode(&own)]).await.unwrap(), [EventOutcome::Stored]);
    assert_eq!(store.get_event(t, &foreign).await.unwrap().unwrap().record.occurred_at_ms, at);
    let page = store.query(t, EventQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page.events.len(), 2);
}

/// A partition's effects commit only from its newest owner: effects of an older epoch than one
/// already committed (or committed beside them) are refused, and named in the outcome.
async fn fencing(store: &dyn EventStore) {
    use super::WriteSet;
    use signalops_core::effects::{EngineMeta, PartitionEffects};
    let partition = 7;
    let effects = |epoch: u64, seq: u64| PartitionEffects {
        partition,
        epoch,
        meta: EngineMeta { effects_seq: seq, state_seq: seq, clock_ms: 0 },
        ..Default::default()
    };
    let write = |effects: Vec<PartitionEffects>| async move {
        store.write(std::sync::Arc::new(WriteSet { events: Vec::new(), effects }), 1).await.unwrap().fenced
    };
    let seq = || async { store.load_engine(partition).await.unwrap().meta.map(|m| m.effects_seq) };
    assert!(write(vec![effects(1, 10)]).await.is_empty());
    assert_eq!(seq().await, Some(10));
    // The partition moves (epoch 2); the new owner commits.
    assert!(write(vec![effects(2, 20)]).await.is_empty());
    // The deposed owner's late commit is refused and changes nothing.
    assert_eq!(write(vec![effects(1, 30)]).await, [0]);
    assert_eq!(seq().await, Some(20), "a fenced commit leaves the partition as it was");
    // In one commit beside the newer owner's effects, the older ones are refused too.
    assert_eq!(write(vec![effects(2, 25), effects(3, 40), effects(2, 50)]).await, [0, 2]);
    assert_eq!(seq().await, Some(40));
    // Other partitions are not affected.
    let other = PartitionEffects { partition: partition + 1, ..effects(1, 5) };
    assert!(write(vec![other]).await.is_empty());
}

async fn newest_first_paging(store: &dyn EventStore) {
    let t = Uuid::now_v7();
    // Spread over several days so pages cross day buckets; two events share a millisecond.
    let day = 86_400_000;
    let mut batch = Vec::new();
    for i in 0..25i64 {
        batch.push(event(t, "p", &format!("e{i:02}"), 1_000 + i * day / 3));
    }
    batch.push(event(t, "p", "e24b", 1_000 + 24 * day / 3));
    store.store_batch(batch.into(), 0).await.unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.query(t, EventQuery { limit: 7, after: after.clone(), ..Default::default() }).await.unwrap();
        assert!(page.events.len() <= 7);
        seen.extend(page.events.iter().map(|e| e.record.id.clone()));
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 26, "every event exactly once across pages: {seen:?}");
    assert_eq!(seen[0], "e24b");
    assert_eq!(seen[1], "e24");
    assert_eq!(seen[25], "e00");
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 26);
}

async fn time_range_and_type(store: &dyn EventStore) {
    let t = Uuid::now_v7();
    let mut batch = Vec::new();
    for i in 0..10i64 {
        let ty = if i % 2 == 0 { "even.n" } else { "odd.n" };
        batch.push(event(t, ty, &format!("r{i}"), 10_000 + i * 1000));
    }
    store.store_batch(batch.into(), 0).await.unwrap();
    let q = EventQuery { from_ms: Some(12_000), to_ms: Some(16_000), limit: 100, ..Default::default() };
    let ids: Vec<_> = store.query(t, q).await.unwrap().events.into_iter().map(|e| e.record.id).collect();
    assert_eq!(ids, ["r5", "r4", "r3", "r2"], "from is inclusive, to exclusive");
    let q = EventQuery { event_type: Some("even.n".into()), limit: 2, ..Default::default() };
    let page = store.query(t, q.clone()).await.unwrap();
    let ids: Vec<_> = page.events.iter().map(|e| e.record.id.as_str()).collect();
    assert_eq!(ids, ["r8", "r6"]);
    let page2 = store.query(t, EventQuery { after: page.next, ..q }).await.unwrap();
    let ids: Vec<_> = page2.events.iter().map(|e| e.record.id.as_str()).collect();
    assert_eq!(ids, ["r4", "r2"]);
    let q = EventQuery {
        event_type: Some("odd.n".into()),
        from_ms: Some(13_000),
        to_ms: Some(17_001),
        limit: 10,
        ..Default::default()
    };
    let ids: Vec<_> = store.query(t, q).await.unwrap().events.into_iter().map(|e| e.record.id).collect();
    assert_eq!(ids, ["r7", "r5", "r3"]);
    let q = EventQuery { event_type: Some("odd".into()), limit: 10, ..Default::default() };
    assert!(store.query(t, q).await.unwrap().events.is_empty(), "type filter is exact");
}

async fn tenant_isolation(store: &dyn EventStore) {
    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    store.store_batch(vec![event(a, "s", "same-id", 5), event(b, "s", "same-id", 6)].into(), 0).await.unwrap();
    assert_eq!(store.get_event(a, "same-id").await.unwrap().unwrap().record.tenant_id, a);
    assert_eq!(store.get_event(b, "same-id").await.unwrap().unwrap().record.tenant_id, b);
    let c = Uuid::now_v7();
    assert!(store.get_event(c, "same-id").await.unwrap().is_none());
    for (t, n) in [(a, 1), (b, 1), (c, 0)] {
        let page = store.query(t, EventQuery { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(page.events.len(), n);
        assert!(page.events.iter().all(|e| e.record.tenant_id == t));
        let typed = EventQuery { event_type: Some("s".into()), limit: 10, ..Default::default() };
        assert_eq!(store.query(t, typed).await.unwrap().events.len(), n);
    }
}

async fn idempotency_records(store: &dyn EventStore) {
    let t = Uuid::now_v7();
    let other = Uuid::now_v7();
    let mut first = record(t, "k", "id-1", 1_000);
    first.idempotency_key = Some("key:order-7".into());
    store.store_batch(vec![encode(&first)].into(), 1_000).await.unwrap();
    let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let found =
        store.find_idempotent(t, keys(&["key:order-7", "id:id-1", "id:nope", "key:nope"]), 2_000).await.unwrap();
    assert_eq!(found, [Some("id-1".to_string()), Some("id-1".to_string()), None, None]);
    assert_eq!(store.find_idempotent(other, keys(&["key:order-7", "id:id-1"]), 2_000).await.unwrap(), [None, None]);
    // A second event published under the same key (a retry after the log's dedup window) is
    // not stored while the record lives.
    let mut retry = record(t, "k", "id-2", 1_500);
    retry.idempotency_key = Some("key:order-7".into());
    let retry = encode(&retry);
    let o = store.store_batch(vec![retry.clone()].into(), 1_500).await.unwrap();
    assert_eq!((o.stored, o.skipped), (0, 1));
    assert!(store.get_event(t, "id-2").await.unwrap().is_none());
    // Past the window the record is gone from lookups and from the table after a purge.
    let late = 1_000 + WINDOW_MS + 1;
    assert_eq!(store.find_idempotent(t, keys(&["key:order-7"]), late).await.unwrap(), [None]);
    assert!(store.purge_idempotency(late).await.unwrap() >= 1);
    let o = store.store_batch(vec![retry].into(), late).await.unwrap();
    assert_eq!(o.stored, 1);
}

/// A firing alert of `tenant` at `at_ms` with one action to channel `ch`.
fn alert(tenant: TenantId, at_ms: i64, ch: &str) -> Alert {
    serde_json::from_value(
        json!({"id": signalops_core::alert::alert_id(at_ms, &tenant, &Uuid::nil(), "", at_ms as u64),
        "tenant_id": tenant, "rule_id": Uuid::nil(), "rule_version": 1, "rule_name": "r", "kind": "event",
        "severity": "warning", "value": 1.0, "state": "firing", "fired_at_ms": at_ms, "actions": [{"channel_id": ch}]}),
    )
    .unwrap()
}

/// Delivery records: newest-first pages with filters, tenant isolation, usage counted once per
/// delivery however often its record is written, and the retention purge.
async fn deliveries(store: &dyn EventStore) {
    let tenant = Uuid::now_v7();
    let other = Uuid::now_v7();
    let day = 86_400_000i64;
    let mut records = Vec::new();
    for (i, ch) in ["c1", "c2", "c1"].iter().enumerate() {
        let job = jobs_for(&alert(tenant, 100 * day + i as i64, ch), Transition::Firing, 0).remove(0);
        records.push(DeliveryRecord::new(job, 0));
    }
    store.put_deliveries(records.clone(), 100 * day).await.unwrap();
    let page = store.query_deliveries(tenant, DeliveryQuery { limit: 10, ..Default::default() }).await.unwrap();
    let ids: Vec<Uuid> = page.deliveries.iter().map(|r| r.id()).collect();
    assert_eq!(ids, [records[2].id(), records[1].id(), records[0].id()]);
    let c1 = DeliveryQuery { channel_id: Some("c1".into()), limit: 1, ..Default::default() };
    let first = store.query_deliveries(tenant, c1.clone()).await.unwrap();
    assert_eq!(first.deliveries[0].id(), records[2].id());
    let second = store.query_deliveries(tenant, DeliveryQuery { after: first.next, ..c1 }).await.unwrap();
    assert_eq!(second.deliveries[0].id(), records[0].id());
    assert!(store.get_delivery(other, records[0].id()).await.unwrap().is_none());
    assert!(store
        .query_deliveries(other, DeliveryQuery { limit: 10, ..Default::default() })
        .await
        .unwrap()
        .deliveries
        .is_empty());

    // Delivered twice (a redelivered job), counted once; a failed one not at all.
    let mut done = records[0].clone();
    done.status = DeliveryStatus::Delivered;
    store.put_deliveries(vec![done.clone()], 100 * day).await.unwrap();
    store.put_deliveries(vec![done.clone(), done], 100 * day).await.unwrap();
    let mut failed = records[1].clone();
    failed.status = DeliveryStatus::Failed;
    store.put_deliveries(vec![failed], 100 * day).await.unwrap();
    let usage = store.usage(tenant, 100, 101).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].day, usage[0].metric.as_str(), usage[0].count), (100, USAGE_NOTIFICATIONS_SENT, 1));
    assert!(store.usage(other, 0, 1000).await.unwrap().is_empty());
    let by_status = DeliveryQuery { status: Some(DeliveryStatus::Failed), limit: 10, ..Default::default() };
    assert_eq!(store.query_deliveries(tenant, by_status).await.unwrap().deliveries.len(), 1);

    // Retention drops finished records older than the cut; pending ones stay.
    assert_eq!(store.purge_deliveries(100 * day + 2).await.unwrap(), 2);
    let left = store.query_deliveries(tenant, DeliveryQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(left.deliveries.len(), 1);
    assert_eq!(left.deliveries[0].id(), records[2].id());
}
