//! Delivery workers: every node consumes the job stream through one shared durable consumer
//! (explicit acks), so each job is worked on by one node at a time and any node can take over.
//!
//! Per job: the delivery record is loaded (a finished one is skipped), the channel looked up,
//! the message rendered and one attempt made. The attempt goes into the record, which is
//! written (group-committed with other records) before the job is acked or handed back:
//! - a 2xx: `delivered`, acked;
//! - a failure with retries left: handed back with `Nak(delay)` for the channel's schedule,
//!   with ±10 % jitter. The job stays in JetStream meanwhile, so a node crash loses nothing: an
//!   unacked job comes back after the ack wait and is sent again with the same `webhook-id`;
//! - 410 Gone, no retries left, or a deleted or disabled channel: `failed`, dead-lettered,
//!   acked. 410 disables the channel at once; `disable_after_failed_deliveries` exhausted
//!   deliveries in a row disable it too. Either raises an operational alert for the tenant.
//!
//! Isolation: each channel has a lane with its own concurrency limit (and optional rate limit).
//! A lane holds at most `max_queued_per_channel` jobs; further jobs of that channel go back to
//! the stream for a second instead of occupying the node's `max_in_flight` slots, so a slow or
//! failing endpoint only ever delays itself.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use signalops_core::alert::Severity;
use signalops_core::alert::{alert_id, Alert, AlertKind, AlertState};
use signalops_core::config::NotifyConfig;
use signalops_core::delivery::{webhook_id, Attempt, DeliveryRecord, DeliveryStatus, Job, Transition};
use signalops_core::model::{format_ms, now_ms, StoredEvent, TenantId};
use signalops_core::telemetry;
use signalops_plugins::registry::{parse_digest, Disabled, PluginKind, PluginRecord};
use signalops_plugins::{CallReport, Digest, PluginHost, PluginRequest, PluginServices};
use signalops_store::EventStore;

use signalops_rules::template::{self, parse_template, Message, MessageTemplate};

use crate::channel::{Channel, Target};
use crate::queue::JobQueue;
use crate::send::{Outbound, Outcome, Outgoing};

const CONSUMER: &str = "notify-workers";
/// How long a job of a full lane first waits in the stream before it is offered again.
const LANE_FULL_DELAY: Duration = Duration::from_secs(1);
/// Records one store commit takes at most.
const MAX_RECORDS_PER_COMMIT: usize = 1024;

/// One channel's share of a node: its concurrency, rate limit and failure streak.
struct Lane {
    permits: Semaphore,
    concurrency: u32,
    rate: Option<u32>,
    limiter: Option<DefaultDirectRateLimiter>,
    queued: AtomicUsize,
    exhausted_in_row: AtomicU32,
}

impl Lane {
    fn new(channel: &Channel) -> Lane {
        let rate = channel.delivery.rate_limit_per_second;
        Lane {
            permits: Semaphore::new(channel.delivery.max_concurrency.max(1) as usize),
            concurrency: channel.delivery.max_concurrency,
            rate,
            limiter: rate.and_then(NonZeroU32::new).map(|r| RateLimiter::direct(Quota::per_second(r))),
            queued: AtomicUsize::new(0),
            exhausted_in_row: AtomicU32::new(0),
        }
    }
}

/// What the worker does with a job's message once the attempt is recorded.
enum Settle {
    Ack,
    Retry(Duration),
}

/// What the delivery worker asks of the control plane, which sits above this crate (the
/// control plane implements it).
#[async_trait::async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The tenant's channel with this id, as this node's view of the control plane has it.
    fn channel(&self, tenant: TenantId, id: &Uuid) -> Option<Channel>;
    /// The id and module digest of the tenant's notifier plugin `plugin` (its name or id) at
    /// `version` (the current one when `None`); the error says why there is none.
    fn notifier(&self, tenant: TenantId, plugin: &str, version: Option<&str>) -> Result<(Uuid, Digest), String>;
    /// Disables a channel (or enables it again with `None`) cluster-wide.
    async fn set_channel_disabled(
        &self,
        tenant: TenantId,
        channel: Uuid,
        disabled: Option<Disabled>,
    ) -> Result<(), String>;
}

/// The notifier plugin `plugin` (name or id) of a tenant's plugins, at `version`: what
/// [`Directory::notifier`] answers, for implementations to share.
pub fn find_notifier<'a>(
    plugins: impl IntoIterator<Item = &'a PluginRecord>,
    plugin: &str,
    version: Option<&str>,
) -> Result<(Uuid, Digest), String> {
    let p = plugins
        .into_iter()
        .find(|p| p.kind == PluginKind::Notifier && (p.name == plugin || p.id.to_string() == plugin))
        .ok_or_else(|| format!("the tenant has no notifier plugin `{plugin}`"))?;
    let v = p.version(version).ok_or_else(|| format!("notifier `{plugin}` has no version {version:?}"))?;
    Ok((p.id, parse_digest(&v.sha256).ok_or_else(|| format!("notifier `{plugin}` has a corrupt digest"))?))
}

/// Everything delivery needs; shared by the consumer loop, its tasks and the channel test API.
pub struct Notifier {
    control: Arc<dyn Directory>,
    store: Arc<dyn EventStore>,
    queue: JobQueue,
    outbound: Outbound,
    cfg: NotifyConfig,
    lanes: Mutex<HashMap<Uuid, Arc<Lane>>>,
    /// Deliveries per tenant waiting in the stream for their next retry (seen from this node).
    retrying: Mutex<HashMap<TenantId, usize>>,
    records: mpsc::Sender<(DeliveryRecord, oneshot::Sender<bool>)>,
    plugins: PluginServices,
    /// Notifier plugin instances of this node (calls are short; one at a time).
    notifiers: Arc<tokio::sync::Mutex<PluginHost>>,
}

impl Notifier {
    pub fn new(
        control: Arc<dyn Directory>,
        store: Arc<dyn EventStore>,
        queue: JobQueue,
        cfg: NotifyConfig,
        plugins: PluginServices,
        tracker: &TaskTracker,
    ) -> anyhow::Result<Arc<Notifier>> {
        let outbound = Outbound::new(&cfg)?;
        let (records, rx) = mpsc::channel(4096);
        tracker.spawn(write_records(store.clone(), rx));
        let notifiers = Arc::new(tokio::sync::Mutex::new(PluginHost::new(plugins.runtime.clone())));
        Ok(Arc::new(Notifier {
            control,
            store,
            queue,
            outbound,
            cfg,
            lanes: Mutex::new(HashMap::new()),
            retrying: Mutex::new(HashMap::new()),
            records,
            plugins,
            notifiers,
        }))
    }

    pub fn queue(&self) -> &JobQueue {
        &self.queue
    }

    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// Consumes the job stream until cancelled, restarting the consumer after failures.
    pub async fn run(self: Arc<Self>, tracker: TaskTracker, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            match self.clone().consume(&tracker, &cancel).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "notification worker failed; restarting");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn consume(self: Arc<Self>, tracker: &TaskTracker, cancel: &CancellationToken) -> anyhow::Result<()> {
        let consumer = self
            .queue
            .jobs_stream()
            // Create or update: a changed ack wait applies on the next start.
            .create_consumer(pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(self.cfg.ack_wait_secs),
                // Jobs waiting for a retry stay pending, so the consumer has no limit of its
                // own; `max_retrying_per_tenant` bounds them per tenant instead.
                max_ack_pending: -1,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("consumer {CONSUMER}: {e}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(256)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("consumer {CONSUMER} stream: {e}"))?;
        let in_flight = Arc::new(Semaphore::new(self.cfg.max_in_flight));
        // Progress acks keep a job that waits for its channel or a slow endpoint from being
        // offered to another worker.
        let progress_every = Duration::from_secs(self.cfg.ack_wait_secs) / 3;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = messages.next() => m,
            };
            let Some(msg) = next else { anyhow::bail!("job stream ended") };
            let msg = msg.map_err(|e| anyhow::anyhow!("job stream: {e}"))?;
            let job: Job = match rmp_serde::from_slice(&msg.payload) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, subject = %msg.subject, "undecodable notification job dropped");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let permit = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                p = in_flight.clone().acquire_owned() => p?,
            };
            // The first delivery of a job's first run has no record yet (unless the job was
            // queued twice beyond the stream's duplicate window, after a partition owner's
            // crash): the store read is skipped for it.
            let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
            let fresh = job.run == 0 && delivered == 1;
            let channel = Uuid::parse_str(&job.channel_id).ok().and_then(|id| self.control.channel(job.tenant_id, &id));
            let lane = channel.as_ref().map(|c| self.lane(c));
            if let Some(lane) = &lane {
                if lane.queued.load(Ordering::Relaxed) >= self.cfg.max_queued_per_channel {
                    // Backs off as the job keeps finding its lane full, so a channel with a
                    // large backlog does not cycle all of it through the consumer every second.
                    let exp = delivered.clamp(1, 3) as u32 - 1;
                    let delay = LANE_FULL_DELAY * (1 << exp);
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                    continue;
                }
                lane.queued.fetch_add(1, Ordering::Relaxed);
            }
            let me = self.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let work = me.deliver(job, channel, lane.clone(), fresh, store_backoff(delivered));
                tokio::pin!(work);
                let mut progress =
                    tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
                let settle = loop {
                    tokio::select! {
                        s = &mut work => break s,
                        _ = progress.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
                    }
                };
                if let Some(lane) = lane {
                    lane.queued.fetch_sub(1, Ordering::Relaxed);
                }
                let acked = match settle {
                    Settle::Ack => msg.ack().await,
                    Settle::Retry(d) => msg.ack_with(AckKind::Nak(Some(d))).await,
                };
                if let Err(e) = acked {
                    tracing::warn!(error = %e, "notification job ack failed; it will be offered again");
                }
            });
        }
    }

    /// The channel's lane, rebuilt when its limits changed.
    fn lane(&self, channel: &Channel) -> Arc<Lane> {
        let mut lanes = match self.lanes.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let d = &channel.delivery;
        match lanes.get(&channel.id) {
            Some(l) if l.concurrency == d.max_concurrency && l.rate == d.rate_limit_per_second => l.clone(),
            _ => {
                let lane = Arc::new(Lane::new(channel));
                lanes.insert(channel.id, lane.clone());
                lane
            }
        }
    }

    /// Works on one job. `backoff` is how long to wait before the job comes back when the store
    /// or the dead-letter stream fails (growing with the job's deliveries, so a broken disk
    /// does not turn into an endpoint hammered every second).
    async fn deliver(
        &self,
        job: Job,
        channel: Option<Channel>,
        lane: Option<Arc<Lane>>,
        fresh: bool,
        backoff: Duration,
    ) -> Settle {
        let tenant = job.tenant_id;
        let id = job.delivery_id;
        let stored = if fresh { Ok(None) } else { self.store.get_delivery(tenant, id).await };
        let mut record = match stored {
            Ok(Some(r)) => r,
            Ok(None) => DeliveryRecord::new(job.clone(), now_ms()),
            Err(e) => {
                tracing::warn!(delivery_id = %id, error = %e, "cannot read delivery record; retrying shortly");
                return Settle::Retry(backoff);
            }
        };
        if job.run < record.job.run || (job.run == record.job.run && record.status != DeliveryStatus::Pending) {
            // A copy of a job already finished (or superseded by a replay).
            return Settle::Ack;
        }
        if record.next_attempt_at_ms.take().is_some() {
            // Back from a retry wait.
            self.count_retrying(tenant, false);
        }
        if job.run > record.job.run {
            record.job = job;
            record.status = DeliveryStatus::Pending;
            record.run_attempts = 0;
        }
        let (Some(channel), Some(lane)) = (channel, lane) else {
            record.last_error = Some(format!("channel `{}` does not exist", record.job.channel_id));
            return self.fail(record, backoff).await;
        };
        if let Some(d) = &channel.disabled {
            record.last_error = Some(format!("channel is disabled: {}", d.reason));
            return self.fail(record, backoff).await;
        }
        let Ok(_permit) = lane.permits.acquire().await else { return Settle::Retry(LANE_FULL_DELAY) };
        if let Some(limiter) = &lane.limiter {
            limiter.until_ready().await;
        }
        // The wait may have been long: the channel as it is now (changed target, new headers,
        // disabled or deleted meanwhile).
        let Some(channel) = self.control.channel(tenant, &channel.id) else {
            record.last_error = Some(format!("channel `{}` does not exist", record.job.channel_id));
            return self.fail(record, backoff).await;
        };
        if let Some(d) = &channel.disabled {
            record.last_error = Some(format!("channel is disabled: {}", d.reason));
            return self.fail(record, backoff).await;
        }
        let (message, event) = self.render(&record.job, &channel).await;
        let payload = payload(&record.job, &message);
        let wid = webhook_id(&id);
        let started = now_ms();
        let payload = payload.as_slice();
        let outcome = self.attempt(&record.job, &channel, &message, event.as_ref(), payload, &wid, started).await;
        let kind = channel.target.kind();
        metrics::histogram!(telemetry::NOTIFY_ATTEMPT_DURATION, "kind" => kind).record(outcome.latency.as_secs_f64());
        let ok = outcome.succeeded();
        metrics::counter!(telemetry::NOTIFY_ATTEMPTS, "kind" => kind, "outcome" => if ok { "ok" } else { "failed" })
            .increment(1);
        record.push_attempt(attempt(&outcome, started, record.job.run));
        if ok {
            record.status = DeliveryStatus::Delivered;
            record.next_attempt_at_ms = None;
            lane.exhausted_in_row.store(0, Ordering::Relaxed);
            if !self.save(record.clone()).await {
                return Settle::Retry(backoff);
            }
            metrics::counter!(telemetry::NOTIFY_DELIVERIES, "status" => "delivered").increment(1);
            metrics::histogram!(telemetry::NOTIFY_QUEUE_TO_DELIVERED)
                .record((now_ms() - record.job.created_at_ms).max(0) as f64 / 1000.0);
            return Settle::Ack;
        }
        if outcome.gone {
            record.last_error = Some("the endpoint answered 410 Gone; the channel was disabled".into());
            let settle = self.fail(record, backoff).await;
            self.disable(&channel, "the endpoint answered 410 Gone".into()).await;
            return settle;
        }
        let schedule = &channel.delivery.retry_schedule_secs;
        match schedule.get(record.run_attempts as usize - 1) {
            Some(_) if !self.count_retrying(tenant, true) => {
                let limit = self.cfg.max_retrying_per_tenant;
                record.last_error = Some(format!(
                    "{} (the tenant already has {limit} deliveries waiting for a retry; dead-lettered without one)",
                    record.last_error.as_deref().unwrap_or("attempt failed")
                ));
                self.fail(record, backoff).await
            }
            Some(secs) => {
                let delay = jitter(Duration::from_secs(*secs));
                record.next_attempt_at_ms = Some(now_ms() + delay.as_millis() as i64);
                if !self.save(record).await {
                    return Settle::Retry(backoff);
                }
                Settle::Retry(delay)
            }
            None => {
                let streak = lane.exhausted_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                let settle = self.fail(record, backoff).await;
                if streak >= self.cfg.disable_after_failed_deliveries {
                    lane.exhausted_in_row.store(0, Ordering::Relaxed);
                    self.disable(&channel, format!("{streak} deliveries in a row failed every attempt")).await;
                }
                settle
            }
        }
    }

    /// Finishes a delivery as failed: recorded, dead-lettered, acked.
    async fn fail(&self, mut record: DeliveryRecord, backoff: Duration) -> Settle {
        record.status = DeliveryStatus::Failed;
        record.next_attempt_at_ms = None;
        record.updated_at_ms = now_ms();
        if let Err(e) = self.queue.dead_letter(&record).await {
            tracing::warn!(delivery_id = %record.id(), error = %e, "cannot dead-letter job; retrying shortly");
            return Settle::Retry(backoff);
        }
        let (id, tenant, error) = (record.id(), record.job.tenant_id, record.last_error.clone());
        if !self.save(record).await {
            return Settle::Retry(backoff);
        }
        metrics::counter!(telemetry::NOTIFY_DELIVERIES, "status" => "failed").increment(1);
        tracing::warn!(delivery_id = %id, tenant_id = %tenant, error = ?error, "delivery failed; job dead-lettered");
        Settle::Ack
    }

    /// Counts a tenant's deliveries waiting for a retry: `add` takes a place (false when the
    /// tenant is at `max_retrying_per_tenant`), otherwise one comes back.
    fn count_retrying(&self, tenant: TenantId, add: bool) -> bool {
        let mut map = match self.retrying.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let n = map.entry(tenant).or_insert(0);
        if add {
            if *n >= self.cfg.max_retrying_per_tenant {
                return false;
            }
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&tenant);
            }
        }
        true
    }

    /// Writes a record through the group-committing writer; false when it could not.
    async fn save(&self, record: DeliveryRecord) -> bool {
        let (done, rx) = oneshot::channel();
        if self.records.send((record, done)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Disables a channel through the control plane and raises an operational alert.
    async fn disable(&self, channel: &Channel, reason: String) {
        let at = now_ms();
        let disabled = Disabled { reason: reason.clone(), at_ms: at };
        match self.control.set_channel_disabled(channel.tenant_id, channel.id, Some(disabled)).await {
            Ok(_) => {
                metrics::counter!(telemetry::NOTIFY_CHANNELS_DISABLED).increment(1);
                tracing::warn!(tenant_id = %channel.tenant_id, channel_id = %channel.id, reason = %reason, "channel disabled");
            }
            Err(e) => {
                tracing::warn!(channel_id = %channel.id, error = %e, "cannot disable channel");
                return;
            }
        }
        let alert = channel_alert(channel, &reason, at);
        if let Err(e) = self.store.put_alerts(vec![alert]).await {
            tracing::warn!(channel_id = %channel.id, error = %e, "cannot store the channel-disabled alert");
        }
    }

    /// The message for a job: its action's template over the alert, the newest triggering
    /// event (returned too, when the store has it) and the channel.
    async fn render(&self, job: &Job, channel: &Channel) -> (Message, Option<StoredEvent>) {
        let tpl = match &job.template {
            Some(t) => parse_template(Some(t), "template").unwrap_or_default(),
            None => MessageTemplate::default(),
        };
        let plugin = matches!(channel.target, Target::Plugin { .. });
        if tpl.title.is_none() && tpl.body.is_none() && !plugin {
            // The default text needs neither the event nor the template context.
            return (template::default_message(&job.alert), None);
        }
        let event = match job.alert.event_ids.last() {
            Some(id) => self.store.get_event(job.tenant_id, id).await.ok().flatten(),
            None => None,
        };
        let context = json!({
            "alert": job.alert.view(None),
            "event": event.as_ref().map(|e| serde_json::to_value(e.view()).unwrap_or(Value::Null)),
            "channel": {"id": channel.id, "name": channel.name},
        });
        (template::render(&tpl, &context, &job.alert), event)
    }

    /// One attempt: a `plugin` channel's notifier renders the request first.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        job: &Job,
        channel: &Channel,
        message: &Message,
        event: Option<&StoredEvent>,
        payload: &[u8],
        wid: &str,
        now: i64,
    ) -> Outcome {
        let request = match &channel.target {
            Target::Plugin { plugin, version, config, .. } => {
                match self.render_plugin(job, channel, plugin, version.as_deref(), config, message, event, wid).await {
                    Ok(r) => Some(r),
                    Err(e) => return Outcome::failed(std::time::Instant::now(), e),
                }
            }
            _ => None,
        };
        let outgoing = Outgoing { webhook_id: wid, payload, message, request: request.as_ref() };
        self.outbound.send(channel, &outgoing, now).await
    }

    /// Calls the channel's notifier plugin; the error says why no request came out.
    #[allow(clippy::too_many_arguments)]
    async fn render_plugin(
        &self,
        job: &Job,
        channel: &Channel,
        plugin: &str,
        version: Option<&str>,
        config: &Value,
        message: &Message,
        event: Option<&StoredEvent>,
        wid: &str,
    ) -> Result<PluginRequest, String> {
        let tenant = channel.tenant_id;
        let (plugin_id, digest) = self.control.notifier(tenant, plugin, version)?;
        signalops_plugins::store::ensure_loaded(&self.plugins.runtime, &self.plugins.modules, tenant, &digest).await?;
        let abi = self.plugins.runtime.module(&digest).map_or(1, |m| signalops_plugins::Abi::of(&m).number());
        let input = render_input(abi, job, channel, config, message, event, wid)
            .map_err(|e| format!("cannot encode the notifier input: {e}"))?;
        // Waiting for the host happens here, not in a blocking thread: one notifier call at a
        // time occupies the blocking pool, whatever the number of deliveries waiting.
        let mut host = self.notifiers.clone().lock_owned().await;
        let started = std::time::Instant::now();
        let (result, fuel_used, logs) = tokio::task::spawn_blocking(move || host.render(tenant, &digest, &input))
            .await
            .map_err(|e| format!("notifier task: {e}"))?;
        let outcome = match &result {
            Ok(_) => signalops_plugins::Outcome::Decision(signalops_plugins::Decision {
                fire: true,
                severity: None,
                title: None,
                labels: Default::default(),
                fields: Default::default(),
            }),
            Err(f) => signalops_plugins::Outcome::Failure(f.clone()),
        };
        let report = CallReport::new(outcome, fuel_used, Some(started.elapsed()), logs);
        // Notifier calls show in the plugin's health; failures do not disable the plugin (the
        // channel's retries and disabling apply).
        self.plugins.stats.record(tenant, plugin_id, &report, now_ms(), u32::MAX);
        result.map_err(|f| format!("notifier `{plugin}` failed ({}): {}", f.kind.as_str(), f.message))
    }

    /// Sends a sample alert to a channel now, outside the job stream (`POST /v1/channels/{id}/test`).
    pub async fn send_test(&self, channel: &Channel) -> (Attempt, String) {
        let now = now_ms();
        let job = sample_job(channel, now);
        let (message, event) = self.render(&job, channel).await;
        let payload = payload(&job, &message);
        let wid = webhook_id(&job.delivery_id);
        let outcome = self.attempt(&job, channel, &message, event.as_ref(), &payload, &wid, now).await;
        (attempt(&outcome, now, 0), wid)
    }
}

fn attempt(o: &Outcome, at_ms: i64, run: u32) -> Attempt {
    Attempt {
        at_ms,
        status_code: o.status_code,
        latency_ms: o.latency.as_millis() as u64,
        response: o.response.clone(),
        error: o.error.clone(),
        run,
    }
}

/// Back-off for a job the store or the dead-letter stream could not take: 1 s, doubling with
/// each delivery of the job, at most 5 minutes.
fn store_backoff(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 10) as u32 - 1;
    Duration::from_secs((1u64 << exp).min(300))
}

/// ±10 % so retries of many deliveries that failed together spread out.
fn jitter(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    let f: f64 = rand::rng().random_range(0.9..1.1);
    d.mul_f64(f)
}

/// The webhook body (Standard Webhooks shape): the same bytes on every attempt of a delivery.
fn payload(job: &Job, message: &Message) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        timestamp: String,
        data: Data<'a>,
    }
    #[derive(serde::Serialize)]
    struct Data<'a> {
        tenant_id: Uuid,
        delivery_id: Uuid,
        channel_id: &'a str,
        alert: signalops_core::alert::AlertView<'a>,
        message: &'a Message,
    }
    let at = match job.transition {
        Transition::Firing => job.alert.fired_at_ms,
        Transition::Resolved => job.alert.resolved_at_ms.unwrap_or(job.alert.fired_at_ms),
    };
    let body = Body {
        kind: job.transition.event_type(),
        timestamp: format_ms(at),
        data: Data {
            tenant_id: job.tenant_id,
            delivery_id: job.delivery_id,
            channel_id: &job.channel_id,
            alert: job.alert.view(None),
            message,
        },
    };
    // Serializing these types cannot fail; an empty body would be refused by receivers.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The input map of a notifier's `render` (see ABI.md, "Notifier plugins").
fn render_input(
    abi: i32,
    job: &Job,
    channel: &Channel,
    config: &Value,
    message: &Message,
    event: Option<&StoredEvent>,
    wid: &str,
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let a = &job.alert;
    let state = match job.transition {
        Transition::Firing => "firing",
        Transition::Resolved => "resolved",
    };
    let alert = json!({
        "id": a.id.to_string(), "rule_id": a.rule_id.to_string(), "rule_version": a.rule_version,
        "rule_name": a.rule_name, "kind": a.kind, "severity": a.severity, "state": state, "title": a.title,
        "value": a.value, "threshold": a.threshold, "labels": a.labels, "group": a.group, "details": a.details,
        "fired_at_ms": a.fired_at_ms, "resolved_at_ms": a.resolved_at_ms, "event_ids": a.event_ids,
    });
    let event = event.map(|e| {
        let r = &e.record;
        json!({
            "id": r.id, "tenant_id": r.tenant_id.to_string(), "type": r.event_type, "source": r.source,
            "user_id": r.user_id, "session_id": r.session_id, "occurred_at_ms": r.occurred_at_ms,
            "received_at_ms": r.received_at_ms, "payload": r.payload,
        })
    });
    let input = json!({
        "abi": abi,
        "type": job.transition.event_type(),
        "alert": alert,
        "message": {"title": message.title, "body": message.body},
        "event": event,
        "channel": {"id": channel.id.to_string(), "name": channel.name},
        "config": config,
        "webhook_id": wid,
    });
    rmp_serde::to_vec_named(&input)
}

/// An alert the node raises itself about a channel (no rule: `rule_id` is nil).
fn system_alert(
    channel: &Channel,
    at: i64,
    name: &str,
    severity: Severity,
    title: String,
    details: serde_json::Map<String, Value>,
) -> Alert {
    Alert {
        id: alert_id(at, &channel.tenant_id, &channel.id, name, at as u64),
        tenant_id: channel.tenant_id,
        rule_id: Uuid::nil(),
        rule_version: 0,
        rule_name: name.into(),
        kind: AlertKind::System,
        severity,
        labels: [("channel".to_string(), channel.name.clone())].into(),
        group: Default::default(),
        value: 1.0,
        threshold: None,
        op: None,
        aggregate: None,
        window_seconds: None,
        state: AlertState::Firing,
        fired_at_ms: at,
        resolved_at_ms: None,
        event_ids: Vec::new(),
        silence_id: None,
        actions: Vec::new(),
        title: Some(title.into()),
        details: Arc::new(details),
    }
}

fn sample_job(channel: &Channel, now: i64) -> Job {
    let title = format!("Test notification for channel `{}`", channel.name);
    Job {
        delivery_id: Uuid::now_v7(),
        tenant_id: channel.tenant_id,
        channel_id: channel.id.to_string(),
        transition: Transition::Firing,
        alert: system_alert(channel, now, "SignalOps test notification", Severity::Info, title, Default::default()),
        template: None,
        created_at_ms: now,
        run: 0,
    }
}

/// The operational alert raised when the node disables a channel.
fn channel_alert(channel: &Channel, reason: &str, at: i64) -> Alert {
    let mut details = serde_json::Map::new();
    details.insert("channel_id".into(), Value::String(channel.id.to_string()));
    details.insert("reason".into(), Value::String(reason.to_owned()));
    let title = format!("Channel `{}` was disabled: {reason}", channel.name);
    system_alert(channel, at, "Channel disabled", Severity::Critical, title, details)
}

/// Group-commits delivery records: every record waiting is written in one durable commit.
async fn write_records(store: Arc<dyn EventStore>, mut rx: mpsc::Receiver<(DeliveryRecord, oneshot::Sender<bool>)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_RECORDS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (records, waiting): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let ok = match store.put_deliveries(records, now_ms()).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot write delivery records");
                false
            }
        };
        for done in waiting {
            let _ = done.send(ok);
        }
    }
}
