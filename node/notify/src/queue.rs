//! The notification job streams: `SIGNALOPS_NOTIFY` (work queue; subjects
//! `notify.jobs.<tenant>`) that workers on every node consume through one durable consumer, and
//! `SIGNALOPS_NOTIFY_DLQ` (subjects `notify.dlq.<tenant>`) where jobs go once every attempt
//! failed or the channel refused them. Job messages are MessagePack [`Job`]s with
//! `Nats-Msg-Id: <delivery id>:<run>`, so a partition owner that republishes after a crash
//! does not queue a job twice.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;

use signalops_core::config::NotifyConfig;
use signalops_core::delivery::{DeliveryRecord, Job};

pub const JOBS_STREAM: &str = "SIGNALOPS_NOTIFY";
pub const DLQ_STREAM: &str = "SIGNALOPS_NOTIFY_DLQ";

#[derive(Clone)]
pub struct JobQueue {
    js: jetstream::Context,
    jobs: stream::Stream,
}

impl JobQueue {
    /// Creates (or opens) both streams.
    pub async fn open(client: async_nats::Client, cfg: &NotifyConfig, replicas: usize) -> anyhow::Result<JobQueue> {
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(10));
        let jobs = js
            .get_or_create_stream(stream::Config {
                name: JOBS_STREAM.into(),
                subjects: vec!["notify.jobs.>".into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("stream {JOBS_STREAM}: {e}"))?;
        js.get_or_create_stream(stream::Config {
            name: DLQ_STREAM.into(),
            subjects: vec!["notify.dlq.>".into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: Duration::from_secs(cfg.dead_letter_max_age_secs),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("stream {DLQ_STREAM}: {e}"))?;
        Ok(JobQueue { js, jobs })
    }

    pub fn jobs_stream(&self) -> &stream::Stream {
        &self.jobs
    }

    /// Queues jobs and waits until JetStream holds every one of them.
    pub async fn publish(&self, jobs: &[Job]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(jobs.len());
        for job in jobs {
            let body = Bytes::from(rmp_serde::to_vec_named(job)?);
            let msg = PublishMessage::build().payload(body).message_id(format!("{}:{}", job.delivery_id, job.run));
            let subject = format!("notify.jobs.{}", job.tenant_id.simple());
            acks.push(self.js.send_publish(subject, msg).await?);
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    /// Keeps a failed delivery's job, with its last error, in the dead-letter stream.
    pub async fn dead_letter(&self, record: &DeliveryRecord) -> anyhow::Result<()> {
        let body = Bytes::from(rmp_serde::to_vec_named(record)?);
        let msg = PublishMessage::build()
            .payload(body)
            .message_id(format!("{}:{}:dlq", record.id(), record.job.run))
            .header("SignalOps-Error", record.last_error.as_deref().unwrap_or("failed").replace(['\r', '\n'], " "));
        let subject = format!("notify.dlq.{}", record.job.tenant_id.simple());
        self.js.send_publish(subject, msg).await?.await?;
        Ok(())
    }
}
