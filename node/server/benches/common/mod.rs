//! What the benchmarks share: settings from the environment and synthetic payment events.

use serde_json::json;
use signalops_core::model::{EncodedEvent, EventRecord, LogPosition};
use uuid::Uuid;

/// `n` `payment.failed` events of one tenant, 20,000 per second of event time, in order, as
/// the log holds them (MessagePack), from log position `first_seq`; cards cycle over `cards`
/// values, merchants over 97.
pub fn payment_events(tenant: Uuid, n: usize, cards: usize, first_seq: u64) -> Vec<EncodedEvent> {
    let start = 1_800_000_000_000i64;
    (0..n)
        .map(|i| {
            let t = start + (i as i64) / 20;
            let record = EventRecord {
                id: format!("evt-{i}"),
                tenant_id: tenant,
                event_type: "payment.failed".into(),
                payload: json!({"amount": (i % 200) as f64 + 0.5, "currency": if i % 3 == 0 { "USD" } else { "EUR" },
                                "card": format!("4242-{}", i % cards), "merchant": format!("m-{}", i % 97),
                                "attempt": i % 3})
                .as_object()
                .cloned()
                .unwrap_or_default(),
                source: Some("bench".into()),
                user_id: None,
                session_id: None,
                occurred_at_ms: t,
                received_at_ms: t,
                idempotency_key: None,
            };
            let position = LogPosition { partition: 0, sequence: first_seq + i as u64 };
            EncodedEvent::from_record(&record, position).unwrap_or_else(|e| panic!("encode: {e}"))
        })
        .collect()
}

/// A numeric setting from the environment (`BENCH_*`), or its default.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
