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

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;

use crate::config::StreamConfig;
use crate::model::{EventRecord, TenantId};

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

/// FNV-1a, 32 bit.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub fn partition_of(tenant: &TenantId, partitions: u32) -> u32 {
    fnv1a(tenant.hyphenated().to_string().as_bytes()) % partitions.max(1)
}

pub fn subject(partition: u32, tenant: &TenantId, event_type: &str) -> String {
    format!("events.{partition}.{}.{event_type}", tenant.hyphenated())
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
}

/// How one event's publish ended.
#[derive(Debug)]
pub enum Published {
    /// Stored at this stream sequence.
    Stored(u64),
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
            metadata: [(PARTITIONS_KEY.to_string(), cfg.partitions.to_string())].into_iter().collect(),
            ..Default::default()
        };
        let mut stream = js.get_or_create_stream(config).await.map_err(|e| LogError::Stream(e.to_string()))?;
        let info = stream.info().await.map_err(|e| LogError::Stream(e.to_string()))?;
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
        Ok(EventLog { js, stream, partitions })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn stream(&self) -> &stream::Stream {
        &self.stream
    }

    /// True when the stream answers (readiness).
    pub async fn check(&self) -> bool {
        self.js.get_stream(STREAM).await.is_ok()
    }

    /// Publishes the events pipelined and waits for every ack (or `timeout`). Results are in
    /// input order.
    pub async fn publish(&self, events: &[EventRecord], timeout: Duration) -> Vec<Published> {
        let mut pending = Vec::with_capacity(events.len());
        for ev in events {
            let body = match rmp_serde::to_vec_named(ev) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    pending.push(Err(e.to_string()));
                    continue;
                }
            };
            let partition = partition_of(&ev.tenant_id, self.partitions);
            let mut msg = PublishMessage::build().payload(body);
            if let Some(key) = &ev.idempotency_key {
                msg = msg.message_id(format!("{}:{key}", ev.tenant_id.hyphenated()));
            }
            let sent = self.js.send_publish(subject(partition, &ev.tenant_id, &ev.event_type), msg);
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
                Ok(Ok(ack)) => Published::Stored(ack.sequence),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a(b""), 0x811c9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let t = uuid::Uuid::parse_str("0193a0f4-0000-7000-8000-000000000001").unwrap();
        let p = partition_of(&t, 16);
        assert!(p < 16);
        assert_eq!(p, partition_of(&t, 16));
        assert_eq!(p, fnv1a(b"0193a0f4-0000-7000-8000-000000000001") % 16);
        assert_eq!(subject(3, &t, "payment.failed"), "events.3.0193a0f4-0000-7000-8000-000000000001.payment.failed");
    }
}
