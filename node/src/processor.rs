//! Partition owners: one task per partition consumes its durable JetStream consumer in order,
//! hands each batch to the store writer, and acks (ack-all on the batch's last message) only
//! after the writer reports the batch committed. A crash before the ack means redelivery; the
//! store skips ids it already holds, so every event is stored exactly once.
//!
//! The store writer group-commits: it takes every batch waiting from all partitions and writes
//! them in one store transaction, so the cost of a durable commit is shared across partitions.
//! A failed write is retried by the writer; owners wait, and nothing is acked meanwhile.
//!
//! This node owns every partition of the stream; partition assignment through the control plane
//! arrives with multi-node clusters.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::eventlog::EventLog;
use crate::model::{now_ms, EncodedEvent, LogPosition};
use crate::store::EventStore;
use crate::telemetry;

const BATCH: usize = 500;
/// Batches a partition may have handed to the writer and not yet acked.
const MAX_UNACKED_BATCHES: usize = 16;
/// Most events the writer puts in one transaction.
const MAX_COMMIT: usize = 8_000;

/// A partition's batch waiting for the store writer.
struct WriteRequest {
    events: Vec<EncodedEvent>,
    committed: oneshot::Sender<()>,
}

/// Sends batches to the group-commit writer; cheap to clone.
#[derive(Clone)]
struct StoreWriter {
    tx: mpsc::Sender<WriteRequest>,
}

impl StoreWriter {
    fn spawn(store: Arc<dyn EventStore>, tracker: &TaskTracker, cancel: CancellationToken) -> StoreWriter {
        let (tx, rx) = mpsc::channel(1024);
        tracker.spawn(write_loop(store, rx, cancel));
        StoreWriter { tx }
    }

    /// Queues a batch; the receiver resolves once it is committed (an error if the writer
    /// stopped first). Batches commit in the order they are queued.
    async fn submit(&self, events: Vec<EncodedEvent>) -> Option<oneshot::Receiver<()>> {
        let (committed, done) = oneshot::channel();
        self.tx.send(WriteRequest { events, committed }).await.ok()?;
        Some(done)
    }
}

async fn write_loop(store: Arc<dyn EventStore>, mut rx: mpsc::Receiver<WriteRequest>, cancel: CancellationToken) {
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let mut waiting = vec![first.committed];
        let mut events = first.events;
        while events.len() < MAX_COMMIT {
            match rx.try_recv() {
                Ok(mut r) => {
                    events.append(&mut r.events);
                    waiting.push(r.committed);
                }
                Err(_) => break,
            }
        }
        let events: Arc<[EncodedEvent]> = events.into();
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.store_batch(events.clone(), now_ms()).await {
                Ok(outcome) => {
                    metrics::counter!(telemetry::EVENTS_STORED).increment(outcome.stored as u64);
                    metrics::counter!(telemetry::EVENTS_SKIPPED).increment(outcome.skipped as u64);
                    let stored_at = now_ms();
                    let latency = metrics::histogram!(telemetry::ACCEPT_TO_STORE);
                    for ev in events.iter() {
                        latency.record((stored_at - ev.received_at_ms).max(0) as f64 / 1000.0);
                    }
                    break;
                }
                Err(e) => {
                    metrics::counter!(telemetry::STORE_ERRORS).increment(1);
                    tracing::error!(error = %e, events = events.len(), "store write failed; retrying before ack");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for w in waiting {
            let _ = w.send(());
        }
    }
}

pub fn consumer_name(partition: u32) -> String {
    format!("partition-{partition}")
}

/// Starts one owner task per partition plus the lag reporter, tracked by `tracker`.
pub fn spawn_all(log: &EventLog, store: Arc<dyn EventStore>, tracker: &TaskTracker, cancel: CancellationToken) {
    let writer = StoreWriter::spawn(store, tracker, cancel.clone());
    for partition in 0..log.partitions() {
        let log = log.clone();
        let writer = writer.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while !cancel.is_cancelled() {
                match run_partition(&log, partition, &writer, cancel.clone()).await {
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
    writer: &StoreWriter,
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
    let (acks, pending_acks) = mpsc::channel(MAX_UNACKED_BATCHES);
    let acker = tokio::spawn(ack_in_order(partition, pending_acks));
    let result = read_batches(partition, &name, &mut batches, writer, &acks, cancel).await;
    drop(acks);
    // Stored batches still get their acks; the acker ends when its queue is drained.
    let _ = acker.await;
    result
}

/// Acks each batch's last message (ack-all) after its commit, in order. A batch whose commit
/// never came (writer stopped) ends the acker: nothing after it is acked either.
async fn ack_in_order(
    partition: u32,
    mut pending: mpsc::Receiver<(oneshot::Receiver<()>, async_nats::jetstream::Message)>,
) {
    while let Some((committed, last)) = pending.recv().await {
        if committed.await.is_err() {
            return;
        }
        if let Err(e) = last.ack().await {
            // Not fatal: the batch is stored; a redelivery is skipped by the store.
            tracing::warn!(partition, error = %e, "ack failed; the batch will be redelivered and skipped");
        }
    }
}

type Batches = futures::stream::ReadyChunks<async_nats::jetstream::consumer::pull::Stream>;

async fn read_batches(
    partition: u32,
    name: &str,
    batches: &mut Batches,
    writer: &StoreWriter,
    acks: &mpsc::Sender<(oneshot::Receiver<()>, async_nats::jetstream::Message)>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
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
            let position = LogPosition { partition, sequence: seq };
            match EncodedEvent::from_log(msg.payload.clone(), position) {
                Ok(ev) if subject_matches(msg.subject.as_str(), partition, &ev) => events.push(ev),
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
        // Hand the batch to the writer and go on reading: the acker acks each batch, in order,
        // once its commit is reported, so reading, committing and acking overlap.
        let Some(committed) = writer.submit(events).await else { return Ok(()) };
        if acks.send((committed, last)).await.is_err() {
            anyhow::bail!("partition {partition} acker stopped");
        }
    }
}

/// The subject must be `events.<partition>.<tenant>.<type>` of the event it carries.
fn subject_matches(subject: &str, partition: u32, ev: &EncodedEvent) -> bool {
    let mut parts = subject.splitn(4, '.');
    parts.next() == Some("events")
        && parts.next().and_then(|p| p.parse::<u32>().ok()) == Some(partition)
        && parts.next().and_then(|t| uuid::Uuid::parse_str(t).ok()) == Some(ev.tenant_id)
        && parts.next() == Some(ev.event_type.as_str())
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
