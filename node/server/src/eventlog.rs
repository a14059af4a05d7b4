//! The event log: one JetStream stream, `SIGNALOPS_EVENTS`, subjects
//! `events.<partition>.<tenant>.<type>`.
//!
//! The partition of a tenant is FNV-1a (32-bit) of the tenant id's hyphenated text, modulo the
//! partition count. The count is fixed when the stream is created and recorded in the stream's
//! metadata (`signalops.partitions`); a node always uses the stream's own value. One tenant's
//! events therefore stay in one partition, in order.
//!
//! Messages are MessagePack [`EventRecord`]s. Events with an idempotency key carry
//! `Nats-Msg-Id: <tenant>:<key>`, so JetStream drops retries inside its duplicate window.
//!
//! A request's events go to the stream one of two ways:
//! - **Fast batch** (nats-server 2.14+, stream option `allow_batched`): when none of them has an
//!   idempotency key, they are published as one JetStream fast batch in `gap: fail` mode. The
//!   server persists them in order and answers once, for the whole batch, with the number of
//!   messages it persisted, a prefix of the batch; the rest are reported as not stored. One
//!   acknowledgement instead of one per event saves about a quarter of the ingest CPU.
//! - **Pipelined**: every event is published with its own acknowledgement. Used when an event
//!   carries an idempotency key (fast batches drop duplicates without saying which, and the
//!   producer must learn the first copy's id), for single events, and when the server or the
//!   stream does not take fast batches.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{oneshot, OnceCell, Semaphore};

use signalops_core::config::StreamConfig;
use signalops_core::model::{EventRecord, OutgoingEvent, TenantId};
use signalops_core::partition::partition_of;

use crate::telemetry;

pub const STREAM: &str = "SIGNALOPS_EVENTS";
const PARTITIONS_KEY: &str = "signalops.partitions";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create or read the event stream: {0}")]
    Stream(String),
    #[error("event stream metadata: {0}")]
    Metadata(String),
    #[error("cannot read log message {seq}: {source}")]
    Read { seq: u64, source: async_nats::jetstream::stream::RawMessageError },
    #[error("log message {seq} is not an event: {source}")]
    Decode { seq: u64, source: rmp_serde::decode::Error },
}

pub fn subject(partition: u32, tenant: &TenantId, event_type: &str) -> String {
    format!("events.{partition}.{}.{event_type}", tenant.hyphenated())
}

/// Builds the subjects of a run of events, formatting each tenant's `events.<partition>.<tenant>.`
/// prefix once.
struct Subjects {
    partitions: u32,
    tenant: Option<TenantId>,
    prefix: String,
}

impl Subjects {
    fn new(partitions: u32) -> Subjects {
        Subjects { partitions, tenant: None, prefix: String::new() }
    }

    fn of(&mut self, ev: &OutgoingEvent) -> String {
        if self.tenant != Some(ev.tenant_id) {
            let partition = partition_of(&ev.tenant_id, self.partitions);
            self.prefix = format!("events.{partition}.{}.", ev.tenant_id.hyphenated());
            self.tenant = Some(ev.tenant_id);
        }
        let mut subject = String::with_capacity(self.prefix.len() + ev.event_type.len());
        subject.push_str(&self.prefix);
        subject.push_str(&ev.event_type);
        subject
    }
}

/// Subject of a partition's clock ticks (a token no tenant id can take).
pub fn tick_subject(partition: u32) -> String {
    format!("events.{partition}.tick")
}

/// Handle to the event stream. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    js: jetstream::Context,
    stream: stream::Stream,
    partitions: u32,
    fast: Arc<FastBatches>,
}

/// How one event's publish ended.
#[derive(Debug)]
pub enum Published {
    /// Durably in the stream.
    Stored,
    /// JetStream already holds a message with this `Nats-Msg-Id`, at this sequence.
    Duplicate(u64),
    /// Not acknowledged (error or timeout): the producer must retry.
    Failed(String),
}

impl EventLog {
    /// Creates the stream if missing (with this config's partition count) and opens it.
    pub async fn open(
        client: async_nats::Client,
        cfg: &StreamConfig,
        ack_timeout: Duration,
    ) -> Result<EventLog, LogError> {
        let mut js = jetstream::new(client);
        js.set_timeout(ack_timeout);
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec!["events.>".to_string()],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            max_age: Duration::from_secs(cfg.max_age_secs),
            allow_direct: true,
            allow_batch_publish: cfg.fast_batches,
            metadata: [(PARTITIONS_KEY.to_string(), cfg.partitions.to_string())].into_iter().collect(),
            ..Default::default()
        };
        let mut stream = js.get_or_create_stream(config).await.map_err(|e| LogError::Stream(e.to_string()))?;
        let mut info = stream.info().await.map_err(|e| LogError::Stream(e.to_string()))?.clone();
        if cfg.fast_batches && !info.config.allow_batch_publish {
            // A stream made before fast batches (or by an older node) gets the option; a server
            // that does not know it leaves it off, and publishing stays pipelined.
            let mut wanted = info.config.clone();
            wanted.allow_batch_publish = true;
            match js.update_stream(wanted).await {
                Ok(updated) => info = updated,
                Err(e) => tracing::warn!(error = %e, "cannot enable fast batch publishing on the event stream"),
            }
        }
        let partitions = match info.config.metadata.get(PARTITIONS_KEY) {
            Some(p) => p.parse::<u32>().map_err(|e| LogError::Metadata(format!("{PARTITIONS_KEY}={p}: {e}")))?,
            None => return Err(LogError::Metadata(format!("stream {STREAM} has no {PARTITIONS_KEY}"))),
        };
        if partitions != cfg.partitions {
            tracing::warn!(
                configured = cfg.partitions,
                stream = partitions,
                "the event stream was created with another partition count; using the stream's"
            );
        }
        let fast = FastBatches::new(js.client(), cfg.fast_batches && info.config.allow_batch_publish);
        Ok(EventLog { js, stream, partitions, fast: Arc::new(fast) })
    }

    /// True when requests without idempotency keys go to the stream as fast batches.
    pub fn fast_batches(&self) -> bool {
        self.fast.enabled.load(Ordering::Relaxed)
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn stream(&self) -> &stream::Stream {
        &self.stream
    }

    /// The largest message the server takes (its `max_payload`), so the largest one a
    /// consumer can be handed.
    pub fn max_message_bytes(&self) -> usize {
        self.js.client().server_info().max_payload
    }

    /// True when the stream answers (readiness).
    pub async fn check(&self) -> bool {
        self.js.get_stream(STREAM).await.is_ok()
    }

    /// Publishes the events, in order, and waits until JetStream has acknowledged them (or
    /// `timeout`). Results are in input order.
    pub async fn publish(&self, events: &[OutgoingEvent], timeout: Duration) -> Vec<Published> {
        if events.len() > 1 && events.iter().all(|e| e.idempotency_key.is_none()) && self.fast_batches() {
            if let Some(results) = self.publish_fast(events, timeout).await {
                metrics::counter!(telemetry::PUBLISHES, "mode" => "fast_batch").increment(1);
                return results;
            }
        }
        metrics::counter!(telemetry::PUBLISHES, "mode" => "pipelined").increment(1);
        self.publish_pipelined(events, timeout).await
    }

    /// One fast batch; `None` when the server turned the batch away before storing anything
    /// (too many batches in flight, or batching off), so the caller publishes pipelined.
    async fn publish_fast(&self, events: &[OutgoingEvent], timeout: Duration) -> Option<Vec<Published>> {
        let fast = &self.fast;
        let _permit = fast.permits.acquire().await.ok()?;
        if let Err(e) = fast.listen().await {
            tracing::warn!(error = %e, "cannot subscribe to fast batch replies; publishing pipelined");
            return None;
        }
        let id = format!("{}{}", fast.id_prefix, fast.next.fetch_add(1, Ordering::Relaxed));
        let (done, answer) = oneshot::channel();
        fast.waiting().insert(id.clone(), Waiter { done, flow_error: None });
        let n = events.len();
        // Flow acks every `flow` messages at most; the answer that matters is the commit's.
        let flow = n.min(usize::from(u16::MAX));
        let reply_prefix = format!("{}.{id}.{flow}.fail.", fast.inbox);
        let reply = |seq: usize, op: u8| {
            let mut r = String::with_capacity(reply_prefix.len() + 16);
            r.push_str(&reply_prefix);
            let _ = write!(r, "{seq}.{op}.$FI");
            r
        };
        let mut subjects = Subjects::new(self.partitions);
        let mut sent = 0;
        let sending = async {
            for (i, ev) in events.iter().enumerate() {
                let seq = i + 1;
                let op = match seq {
                    s if s == n => FAST_COMMIT,
                    1 => FAST_START,
                    _ => FAST_APPEND,
                };
                if fast.client.publish_with_reply(subjects.of(ev), reply(seq, op), ev.body.clone()).await.is_err() {
                    break;
                }
                sent += 1;
            }
        };
        let _ = tokio::time::timeout(timeout, sending).await;
        if sent == 0 {
            fast.waiting().remove(&id);
            return Some(failed_all(n, "cannot send to NATS"));
        }
        if sent < n {
            // End the batch after what was sent, without storing anything more; the answer
            // says how much of it JetStream holds.
            let subject = subject(partition_of(&events[0].tenant_id, self.partitions), &events[0].tenant_id, "eob");
            let eob = fast.client.publish_with_reply(subject, reply(sent + 1, FAST_COMMIT_EOB), Bytes::new());
            let _ = tokio::time::timeout(timeout, eob).await;
        }
        let answer = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answer)) => answer,
            _ => {
                fast.waiting().remove(&id);
                return Some(failed_all(n, "no JetStream acknowledgement in time"));
            }
        };
        if let Some(err) = &answer.error {
            match err.err_code {
                Some(ERR_TOO_MANY_BATCHES) => return None,
                Some(ERR_BATCH_DISABLED) => {
                    fast.enabled.store(false, Ordering::Relaxed);
                    tracing::warn!("the event stream refuses fast batches; publishing pipelined");
                    return None;
                }
                _ => {
                    let reason = format!("JetStream refused the batch: {}", err.text());
                    return Some(failed_all(n, &reason));
                }
            }
        }
        let stored = answer.count.unwrap_or(0).min(n as u64) as usize;
        let reason =
            answer.flow_error.unwrap_or_else(|| format!("JetStream stored {stored} of the batch's {n} events"));
        Some((0..n).map(|i| if i < stored { Published::Stored } else { Published::Failed(reason.clone()) }).collect())
    }

    /// Every event with its own acknowledgement.
    async fn publish_pipelined(&self, events: &[OutgoingEvent], timeout: Duration) -> Vec<Published> {
        let mut pending = Vec::with_capacity(events.len());
        let mut subjects = Subjects::new(self.partitions);
        for ev in events {
            let mut msg = PublishMessage::build().payload(ev.body.clone());
            if let Some(key) = &ev.idempotency_key {
                msg = msg.message_id(format!("{}:{key}", ev.tenant_id.hyphenated()));
            }
            let sent = self.js.send_publish(subjects.of(ev), msg);
            match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(fut)) => pending.push(Ok(fut)),
                Ok(Err(e)) => pending.push(Err(e.to_string())),
                Err(_) => pending.push(Err("timed out sending to NATS".into())),
            }
        }
        futures::future::join_all(pending.into_iter().map(|p| async move {
            let fut = match p {
                Ok(f) => f,
                Err(e) => return Published::Failed(e),
            };
            match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(ack)) if ack.duplicate => Published::Duplicate(ack.sequence),
                Ok(Ok(_)) => Published::Stored,
                Ok(Err(e)) => Published::Failed(e.to_string()),
                Err(_) => Published::Failed("no JetStream acknowledgement in time".into()),
            }
        }))
        .await
    }

    /// Publishes a clock tick into every partition (the leader does this each second), so
    /// time-driven rule transitions happen at log positions and replay identically.
    pub async fn publish_ticks(&self, at_ms: i64) -> Result<(), String> {
        let mut acks = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions {
            let body = Bytes::copy_from_slice(&at_ms.to_be_bytes());
            let sent = self.js.send_publish(tick_subject(p), PublishMessage::build().payload(body)).await;
            acks.push(sent.map_err(|e| e.to_string())?);
        }
        for ack in acks {
            ack.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Reads the event at a stream sequence (used to answer a duplicate with the first id).
    pub async fn read(&self, seq: u64) -> Result<EventRecord, LogError> {
        let msg = self.stream.get_raw_message(seq).await.map_err(|source| LogError::Read { seq, source })?;
        rmp_serde::from_slice(&msg.payload).map_err(|source| LogError::Decode { seq, source })
    }
}

fn failed_all(n: usize, reason: &str) -> Vec<Published> {
    (0..n).map(|_| Published::Failed(reason.to_string())).collect()
}

/// Fast batch operations, the last token but one of a batch message's reply subject
/// (`<inbox>.<batch id>.<flow>.<gap mode>.<batch sequence>.<operation>.$FI`).
const FAST_START: u8 = 0;
const FAST_APPEND: u8 = 1;
const FAST_COMMIT: u8 = 2;
/// Commits what came before without storing this message.
const FAST_COMMIT_EOB: u8 = 3;
/// JetStream error codes that mean "publish these another way".
const ERR_BATCH_DISABLED: u64 = 10205;
const ERR_TOO_MANY_BATCHES: u64 = 10211;
/// Fast batches one node keeps in flight (JetStream takes 1,000 per stream).
const MAX_FAST_BATCHES: usize = 128;

/// The node's side of fast batch publishing: one reply subscription for all batches, and the
/// batches waiting for their commit answer.
struct FastBatches {
    enabled: AtomicBool,
    client: async_nats::Client,
    /// Replies to batch messages arrive under `<inbox>.>`.
    inbox: String,
    /// Batch ids are `<prefix><n>`; the prefix is unique per connection, so ids never collide
    /// across nodes publishing into the same stream.
    id_prefix: String,
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<String, Waiter>>>,
    listening: OnceCell<()>,
    permits: Semaphore,
}

struct Waiter {
    done: oneshot::Sender<BatchAnswer>,
    /// The first per-message error the server reported before the commit answer.
    flow_error: Option<String>,
}

/// What the server answered to a batch's commit.
#[derive(Debug)]
struct BatchAnswer {
    count: Option<u64>,
    error: Option<ApiError>,
    flow_error: Option<String>,
}

/// A reply on a batch's reply subject: a flow message (`type` ack, gap or err) or the final
/// publish acknowledgement (it names the stream).
#[derive(Deserialize)]
struct FastReply {
    #[serde(rename = "type")]
    kind: Option<String>,
    stream: Option<String>,
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    err_code: Option<u64>,
    description: Option<String>,
}

impl ApiError {
    fn text(&self) -> String {
        match (&self.description, self.err_code) {
            (Some(d), Some(c)) => format!("{d} (error {c})"),
            (Some(d), None) => d.clone(),
            (None, c) => format!("error {}", c.unwrap_or(0)),
        }
    }
}

impl FastBatches {
    fn new(client: async_nats::Client, enabled: bool) -> FastBatches {
        let inbox = client.new_inbox();
        let id_prefix = format!("{}-", inbox.rsplit('.').next().unwrap_or("b"));
        FastBatches {
            enabled: AtomicBool::new(enabled),
            client,
            inbox,
            id_prefix,
            next: AtomicU64::new(1),
            waiting: Arc::new(Mutex::new(HashMap::new())),
            listening: OnceCell::new(),
            permits: Semaphore::new(MAX_FAST_BATCHES),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to the replies once; a task hands each commit answer to its batch.
    async fn listen(&self) -> Result<(), async_nats::SubscribeError> {
        self.listening
            .get_or_try_init(|| async {
                let mut replies = self.client.subscribe(format!("{}.>", self.inbox)).await?;
                let waiting = self.waiting.clone();
                let skip = self.inbox.len() + 1;
                tokio::spawn(async move {
                    while let Some(msg) = replies.next().await {
                        // `<batch id>.<flow>.<gap mode>.<batch sequence>.<operation>.$FI`
                        let mut tokens = msg.subject.get(skip..).unwrap_or_default().split('.');
                        let Some(id) = tokens.next() else { continue };
                        let seq = tokens.nth(2).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                        let Ok(reply) = serde_json::from_slice::<FastReply>(&msg.payload) else { continue };
                        let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
                        // A refused later message leaves a gap; in `fail` mode the server then
                        // commits the batch up to it and answers with the stored count.
                        let refused_later = reply.error.is_some() && reply.count.is_none() && seq > 1;
                        if reply.stream.is_some() && !refused_later {
                            if let Some(w) = waiting.remove(id) {
                                let answer =
                                    BatchAnswer { count: reply.count, error: reply.error, flow_error: w.flow_error };
                                let _ = w.done.send(answer);
                            }
                        } else if reply.kind.as_deref() == Some("err") || refused_later {
                            if let (Some(w), Some(err)) = (waiting.get_mut(id), &reply.error) {
                                w.flow_error
                                    .get_or_insert_with(|| format!("JetStream refused an event: {}", err.text()));
                            }
                        }
                    }
                });
                Ok(())
            })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_names_partition_tenant_and_type() {
        let t = uuid::Uuid::parse_str("0193a0f4-0000-7000-8000-000000000001").unwrap();
        assert_eq!(subject(3, &t, "payment.failed"), "events.3.0193a0f4-0000-7000-8000-000000000001.payment.failed");
    }
}
