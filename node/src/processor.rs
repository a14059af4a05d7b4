//! Partition owners: one task per partition consumes its durable JetStream consumer in order,
//! writes each batch to the store in one transaction, and only then acks (ack-all on the last
//! message of the batch). A crash before the ack means redelivery; the store skips ids it
//! already holds, so every event is stored exactly once.
//!
//! This node owns every partition of the stream; partition assignment through the control plane
//! arrives with multi-node clusters.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::eventlog::EventLog;
use crate::model::{now_ms, EventRecord, LogPosition, StoredEvent};
use crate::store::EventStore;
use crate::telemetry;

const BATCH: usize = 500;

pub fn consumer_name(partition: u32) -> String {
    format!("partition-{partition}")
}

/// Starts one owner task per partition plus the lag reporter, tracked by `tracker`.
pub fn spawn_all(log: &EventLog, store: Arc<dyn EventStore>, tracker: &TaskTracker, cancel: CancellationToken) {
    for partition in 0..log.partitions() {
        let log = log.clone();
        let store = store.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while !cancel.is_cancelled() {
                match run_partition(&log, partition, store.clone(), cancel.clone()).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(partition, error = %e, "partition owner failed; restarting");
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }
    let log = log.clone();
    tracker.spawn(report_lag(log, cancel));
}

async fn run_partition(
    log: &EventLog,
    partition: u32,
    store: Arc<dyn EventStore>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let name = consumer_name(partition);
    let consumer = log
        .stream()
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: format!("events.{partition}.>"),
                ack_policy: AckPolicy::All,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(10),
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consumer {name} stream: {e}"))?;
    let mut batches = messages.ready_chunks(BATCH);
    tracing::debug!(partition, "partition owner started");
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            b = batches.next() => match b {
                Some(b) => b,
                None => anyhow::bail!("consumer {name} message stream ended"),
            },
        };
        let mut events = Vec::with_capacity(batch.len());
        let mut last = None;
        for item in batch {
            let msg = match item {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "consumer error");
                    continue;
                }
            };
            let seq = match msg.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "message without JetStream metadata");
                    continue;
                }
            };
            match rmp_serde::from_slice::<EventRecord>(&msg.payload) {
                Ok(record)
                    if msg
                        .subject
                        .as_str()
                        .starts_with(&format!("events.{partition}.{}.", record.tenant_id.hyphenated())) =>
                {
                    events.push(StoredEvent { record, position: LogPosition { partition, sequence: seq } });
                }
                Ok(_) => {
                    metrics::counter!(telemetry::EVENTS_UNDECODABLE, "reason" => "subject_mismatch").increment(1);
                    tracing::warn!(partition, seq, subject = %msg.subject, "event subject does not match its tenant; skipped");
                }
                Err(e) => {
                    metrics::counter!(telemetry::EVENTS_UNDECODABLE, "reason" => "decode").increment(1);
                    tracing::warn!(partition, seq, error = %e, "log message is not an event; skipped");
                }
            }
            last = Some(msg);
        }
        let Some(last) = last else { continue };
        let events: Arc<[StoredEvent]> = events.into();
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.store_batch(events.clone(), now_ms()).await {
                Ok(outcome) => {
                    metrics::counter!(telemetry::EVENTS_STORED).increment(outcome.stored as u64);
                    metrics::counter!(telemetry::EVENTS_SKIPPED).increment(outcome.skipped as u64);
                    let stored_at = now_ms();
                    let latency = metrics::histogram!(telemetry::ACCEPT_TO_STORE);
                    for ev in events.iter() {
                        latency.record((stored_at - ev.record.received_at_ms).max(0) as f64 / 1000.0);
                    }
                    break;
                }
                Err(e) => {
                    metrics::counter!(telemetry::STORE_ERRORS).increment(1);
                    tracing::error!(partition, error = %e, "store write failed; retrying before ack");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Err(e) = last.double_ack().await {
            // Not fatal: the batch is stored, redelivery is skipped by the store.
            tracing::warn!(partition, error = %e, "ack failed; the batch will be redelivered and skipped");
        }
    }
}

async fn report_lag(log: EventLog, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for partition in 0..log.partitions() {
            if let Ok(consumer) = log.stream().get_consumer::<pull::Config>(&consumer_name(partition)).await {
                if let Ok(info) = consumer.get_info().await {
                    metrics::gauge!(telemetry::CONSUMER_LAG, "partition" => partition.to_string())
                        .set((info.num_pending + info.num_ack_pending as u64) as f64);
                }
            }
        }
    }
}
