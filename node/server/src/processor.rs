//! Partition owners: for each partition, a reader consumes the partition's durable JetStream
//! consumer in order and hands each batch to the store writer; an evaluator runs the batch's
//! stored events through the partition's rule engine once the writer reports what it stored,
//! and submits the engine's effects; an acker acks (ack-all on the batch's last message) once
//! those effects are committed. Reading, storing, evaluating and acking overlap.
//!
//! The store writer group-commits: it takes every write waiting from all partitions (event
//! batches and engine effects) and commits them in one durable transaction. A failed write is
//! retried by the writer; owners wait, and nothing is acked meanwhile.
//!
//! Recovery: the engine's state is checkpointed (every second, or every few thousand events)
//! together with the log position it reflects. When an owner starts it restores the engine and
//! re-creates its consumer at the position after that checkpoint, so the log replays in order
//! from there: the store reports those events as already stored, and the engine re-derives its
//! windows without repeating increments it had committed. Every event is stored once and counts
//! once.
//!
//! Ownership: the control plane's leader assigns each partition to one live node (with an
//! epoch that grows at every move); [`supervise`] runs an owner for each partition assigned to
//! this node and stops the owner of one that moves away, which commits its checkpoint as it
//! ends. A single node owns every partition.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use signalops_control::state::Command;
use signalops_control::ControlPlane;
use signalops_core::config::{OwnersConfig, RulesConfig};
use signalops_core::effects::PartitionEffects;
use signalops_core::model::{now_ms, EncodedEvent, LogPosition, TenantId};
use signalops_plugins::registry::Disabled;
use signalops_plugins::{PluginHost, PluginServices};
use signalops_rules::compiled::RuleSet;
use signalops_rules::engine::EnginePlugins;
use signalops_rules::engine::{Engine, Input, RuleStats};
use signalops_store::{EventOutcome, EventStore, WriteSet};

use crate::eventlog::EventLog;
use crate::telemetry;

/// Most events read, stored and evaluated together.
const BATCH: usize = 500;
/// Messages the consumer asks JetStream for per pull request. The client asks again when
/// half are delivered, so up to one and a half of these are on their way at once: many
/// batches' worth, so that delivery does not wait on a request's round trip while
/// nats-server is busy taking in events (with requests of one batch, a partition fell behind
/// in JetStream at about 45k events/s on the 2-core build machine).
const PULL: usize = 5_000;
/// Bytes per pull request, which bounds what waits in the client for a busy owner (at least
/// two of the largest messages the server takes, so that no message is too big to deliver).
const PULL_BYTES: usize = 4 << 20;
/// Batches a partition may have handed on and not yet acked.
const MAX_UNACKED_BATCHES: usize = 16;
/// Most events the writer puts in one transaction.
const MAX_COMMIT: usize = 8_000;

enum Job {
    Events { events: Arc<[EncodedEvent]>, done: oneshot::Sender<Vec<EventOutcome>> },
    Effects { effects: PartitionEffects, done: oneshot::Sender<bool> },
}

/// Sends writes to the group-commit writer; cheap to clone. The writer stops once every
/// handle is dropped.
#[derive(Clone)]
struct StoreWriter {
    tx: mpsc::Sender<Job>,
}

impl StoreWriter {
    fn spawn(store: Arc<dyn EventStore>, tracker: &TaskTracker, on: &Handle, cancel: CancellationToken) -> StoreWriter {
        let (tx, rx) = mpsc::channel(1024);
        tracker.spawn_on(write_loop(store, rx, cancel), on);
        StoreWriter { tx }
    }

    /// Queues events; the receiver yields one outcome per event once they are committed (an
    /// error if the writer stopped first). Writes commit in the order they are queued.
    async fn events(&self, events: Arc<[EncodedEvent]>) -> Option<oneshot::Receiver<Vec<EventOutcome>>> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Job::Events { events, done }).await.ok()?;
        Some(rx)
    }

    /// Submits effects; the answer says whether they were committed (`false`: fenced, the
    /// partition has a newer owner).
    async fn effects(&self, effects: PartitionEffects) -> Option<oneshot::Receiver<bool>> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Job::Effects { effects, done }).await.ok()?;
        Some(rx)
    }
}

async fn write_loop(store: Arc<dyn EventStore>, mut rx: mpsc::Receiver<Job>, cancel: CancellationToken) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut events = 0;
        while events < MAX_COMMIT {
            match rx.try_recv() {
                Ok(job) => {
                    if let Job::Events { events: e, .. } = &job {
                        events += e.len();
                    }
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut set = WriteSet::default();
        let mut waiting_events = Vec::new();
        let mut waiting_effects = Vec::new();
        for job in jobs {
            match job {
                Job::Events { events, done } => {
                    waiting_events.push((events.len(), done));
                    set.events.push(events);
                }
                Job::Effects { effects, done } => {
                    set.effects.push(effects);
                    waiting_effects.push(done);
                }
            }
        }
        let set = Arc::new(set);
        let mut backoff = Duration::from_millis(50);
        let written = loop {
            match store.write(set.clone(), now_ms()).await {
                Ok(written) => break written,
                Err(e) => {
                    metrics::counter!(telemetry::STORE_ERRORS).increment(1);
                    tracing::error!(error = %e, "store write failed; retrying before ack");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let outcomes = written.events;
        let stored = outcomes.iter().filter(|o| **o == EventOutcome::Stored).count();
        metrics::counter!(telemetry::EVENTS_STORED).increment(stored as u64);
        metrics::counter!(telemetry::EVENTS_SKIPPED).increment((outcomes.len() - stored) as u64);
        let stored_at = now_ms();
        let latency = metrics::histogram!(telemetry::ACCEPT_TO_STORE);
        for (ev, outcome) in set.events.iter().flat_map(|b| b.iter()).zip(&outcomes) {
            if *outcome == EventOutcome::Stored {
                latency.record((stored_at - ev.received_at_ms).max(0) as f64 / 1000.0);
            }
        }
        let mut rest = outcomes.into_iter();
        for (n, done) in waiting_events {
            let _ = done.send(rest.by_ref().take(n).collect());
        }
        for (i, done) in waiting_effects.into_iter().enumerate() {
            let _ = done.send(!written.fenced.contains(&i));
        }
        if !written.fenced.is_empty() {
            metrics::counter!(telemetry::FENCED_COMMITS).increment(written.fenced.len() as u64);
        }
    }
}

/// Rule statistics per partition, published by each partition's engine at its checkpoints.
#[derive(Clone, Default)]
pub struct RuleStatsRegistry {
    inner: Arc<RwLock<HashMap<u32, PartitionStats>>>,
}

type PartitionStats = HashMap<(TenantId, Uuid), RuleStats>;

impl RuleStatsRegistry {
    fn publish(&self, partition: u32, stats: Vec<(TenantId, Uuid, RuleStats)>) {
        let map = stats.into_iter().map(|(t, r, s)| ((t, r), s)).collect();
        if let Ok(mut inner) = self.inner.write() {
            inner.insert(partition, map);
        }
    }

    /// A rule's statistics as of its partition's last checkpoint.
    pub fn get(&self, tenant: TenantId, rule: Uuid) -> Option<RuleStats> {
        let inner = self.inner.read().ok()?;
        inner.values().find_map(|m| m.get(&(tenant, rule)).copied())
    }
}

pub fn consumer_name(partition: u32) -> String {
    format!("partition-{partition}")
}

/// What partition owners need besides the log and the store.
#[derive(Clone)]
pub struct Owners {
    pub control: ControlPlane,
    pub rules: RulesConfig,
    pub stats: RuleStatsRegistry,
    pub plugins: PluginServices,
    /// Where alert transitions with actions become notification jobs (none in tools that only
    /// evaluate).
    pub notify: Option<signalops_notify::queue::JobQueue>,
}

/// Asks the control plane to disable the rules of plugins that failed too often in a row.
fn submit_disable_requests(plugins: &PluginServices, control: &ControlPlane) {
    for req in plugins.stats.take_disable_requests() {
        let control = control.clone();
        tokio::spawn(async move {
            let cmd = Command::SetPluginDisabled {
                tenant_id: req.tenant,
                plugin_id: req.plugin,
                disabled: Some(Disabled { reason: req.reason.clone(), at_ms: signalops_core::model::now_ms() }),
            };
            match control.propose(cmd).await {
                Ok(_) => {
                    tracing::warn!(tenant_id = %req.tenant, plugin_id = %req.plugin, reason = %req.reason, "plugin rules disabled")
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %req.tenant, plugin_id = %req.plugin, error = %e, "cannot disable plugin rules")
                }
            }
        });
    }
}

/// The runtime partition owners run on: `cfg.threads` workers, and every thread of it (its
/// blocking threads too, where store commits and rule evaluation run) `cfg.nice` lower in
/// priority than the thread that builds it. When the node's CPU is short, HTTP and NATS
/// intake then get it first and owners fall behind in JetStream instead, as a database runs
/// its compactions at a lower priority than its writes.
pub fn owner_runtime(cfg: &OwnersConfig) -> std::io::Result<OwnerRuntime> {
    // Absolute, worked out once: a blocking thread inherits the nice value of the (already
    // lowered) thread that starts it.
    let base = rustix::process::getpriority_process(None).unwrap_or(0);
    let nice = (base + cfg.nice).min(19);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.threads > 0 {
        builder.worker_threads(cfg.threads);
    }
    builder
        .thread_name("partition-owner")
        .on_thread_start(move || {
            if nice == base {
                return;
            }
            if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
                tracing::warn!(error = %e, nice, "cannot lower the priority of a partition owner thread");
            }
        })
        .enable_all()
        .build()
        .map(|rt| OwnerRuntime { handle: rt.handle().clone(), rt: Some(rt) })
}

/// The owners' runtime. Dropping it stops its threads without waiting for them (it may be
/// dropped inside the node's own runtime, where blocking is not allowed): stop the tasks on
/// it first.
pub struct OwnerRuntime {
    /// Taken out only by `drop`.
    rt: Option<Runtime>,
    handle: Handle,
}

impl OwnerRuntime {
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl Drop for OwnerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts one owner task per partition plus the lag reporter on `on`, tracked by `tracker`.
pub fn spawn_all(
    log: &EventLog,
    store: Arc<dyn EventStore>,
    owners: Owners,
    tracker: &TaskTracker,
    on: &Handle,
    cancel: CancellationToken,
) {
    let writer = StoreWriter::spawn(store.clone(), tracker, on, cancel.clone());
    owners.control.set_partitions(log.partitions());
    tracker.spawn_on(supervise(log.clone(), store, writer, owners, tracker.clone(), on.clone(), cancel.clone()), on);
    tracker.spawn_on(report_lag(log.clone(), cancel), on);
}

/// How often the supervisor compares the partitions it runs with those assigned to it.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// Runs an owner for each partition the control plane assigns to this node, and stops the
/// owner of a partition that moves away (or moves back with a new epoch): the owner stops
/// reading, commits what it read and its engine checkpoint, and ends.
async fn supervise(
    log: EventLog,
    store: Arc<dyn EventStore>,
    writer: StoreWriter,
    owners: Owners,
    tracker: TaskTracker,
    on: Handle,
    cancel: CancellationToken,
) {
    let mut running: HashMap<u32, (u64, CancellationToken, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let assigned = owners.control.owned_partitions();
        running.retain(|partition, (epoch, stop, handle)| {
            if assigned.get(partition) != Some(epoch) {
                if !stop.is_cancelled() {
                    tracing::info!(partition, epoch, "partition moved away; stopping its owner");
                    stop.cancel();
                }
                // Kept until it has ended, so a partition moving back is not run twice here.
                !handle.is_finished()
            } else {
                true
            }
        });
        for (partition, epoch) in &assigned {
            if running.contains_key(partition) {
                continue;
            }
            tracing::info!(partition, epoch, "partition assigned; starting its owner");
            let stop = cancel.child_token();
            let owner =
                run_owner(log.clone(), *partition, *epoch, store.clone(), writer.clone(), owners.clone(), stop.clone());
            running.insert(*partition, (*epoch, stop, tracker.spawn_on(owner, &on)));
        }
        metrics::gauge!(telemetry::OWNED_PARTITIONS).set(assigned.len() as f64);
    }
    for (_, (_, stop, handle)) in running {
        stop.cancel();
        let _ = handle.await;
    }
}

/// One partition's owner, restarted with back-off after a failure, until `stop` fires.
async fn run_owner(
    log: EventLog,
    partition: u32,
    epoch: u64,
    store: Arc<dyn EventStore>,
    writer: StoreWriter,
    owners: Owners,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match run_partition(&log, partition, epoch, &store, &writer, &owners, stop.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(partition, error = %e, "partition owner failed; restarting");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A batch read from the log, on its way to the evaluator.
struct ReadBatch {
    items: Vec<Item>,
    /// The batch's events, as the store got them.
    events: Arc<[EncodedEvent]>,
    outcomes: oneshot::Receiver<Vec<EventOutcome>>,
    last: async_nats::jetstream::Message,
}

enum Item {
    /// An event: its index into the batch's events, and its log sequence.
    Event {
        index: usize,
        seq: u64,
    },
    Tick {
        seq: u64,
        at_ms: i64,
    },
    Skip(u64),
}

async fn run_partition(
    log: &EventLog,
    partition: u32,
    epoch: u64,
    store: &Arc<dyn EventStore>,
    writer: &StoreWriter,
    owners: &Owners,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let snapshot = store.load_engine(partition).await?;
    let cfg = owners.rules.engine();
    let mut engine = match snapshot.meta {
        Some(meta) => Engine::restore(partition, cfg, meta, snapshot.entries)?,
        None => Engine::new(partition, cfg),
    };
    let p = &owners.plugins;
    engine.set_plugins(EnginePlugins {
        host: PluginHost::new(p.runtime.clone()),
        stats: Some(p.stats.clone()),
        max_consecutive_failures: p.max_consecutive_failures,
        reports: None,
        pending: Default::default(),
    });
    let start = engine.processed_seq() + 1;
    let name = consumer_name(partition);
    // The consumer is a cursor over the partition: it restarts right after what the engine's
    // stored state reflects, so the log replays in order from there.
    match log.stream().delete_consumer(&name).await {
        Ok(_) => {}
        Err(e) if e.to_string().contains("not found") => {}
        Err(e) => anyhow::bail!("cannot reset consumer {name}: {e}"),
    }
    let consumer = log
        .stream()
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: format!("events.{partition}.>"),
            ack_policy: AckPolicy::All,
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 50_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
    tracing::debug!(partition, start, "partition owner started");
    let messages = consumer
        .stream()
        .max_messages_per_batch(PULL)
        .max_bytes_per_batch(PULL_BYTES.max(2 * log.max_message_bytes()))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consumer {name} stream: {e}"))?;
    let mut batches = messages.ready_chunks(BATCH);
    let (to_eval, eval_rx) = mpsc::channel(MAX_UNACKED_BATCHES);
    let (acks, pending_acks) = mpsc::channel(MAX_UNACKED_BATCHES);
    let acker = tokio::spawn(ack_in_order(partition, pending_acks));
    let evaluator =
        tokio::spawn(evaluate(engine, epoch, eval_rx, writer.clone(), acks, owners.clone(), log.partitions()));
    let result = read_batches(partition, &name, &mut batches, writer, &to_eval, cancel).await;
    drop(to_eval);
    // Batches already read are still evaluated, committed and acked before the owner ends.
    let evaluated = evaluator.await;
    let _ = acker.await;
    result?;
    evaluated.map_err(|e| anyhow::anyhow!("partition {partition} evaluator: {e}"))?
}

/// Acks each batch's last message (ack-all) after its effects commit, in order. A batch whose
/// commit never came (writer stopped) ends the acker: nothing after it is acked either.
async fn ack_in_order(
    partition: u32,
    mut pending: mpsc::Receiver<(oneshot::Receiver<bool>, async_nats::jetstream::Message)>,
) {
    while let Some((committed, last)) = pending.recv().await {
        match committed.await {
            Ok(true) => {}
            Ok(false) => {
                // The store has a newer owner's commit for this partition: this owner was
                // deposed, and nothing it read is acknowledged.
                tracing::warn!(partition, "partition fenced: a newer owner commits it; this owner stops");
                return;
            }
            Err(_) => return,
        }
        if let Err(e) = last.ack().await {
            // Not fatal: the consumer restarts from the engine's checkpoint anyway.
            tracing::warn!(partition, error = %e, "ack failed");
        }
    }
}

/// Runs batches through the engine in log order once their events are committed, submits the
/// effects, and hands the ack on. Ends with a final checkpoint when the reader stops.
async fn evaluate(
    mut engine: Engine,
    epoch: u64,
    mut batches: mpsc::Receiver<ReadBatch>,
    writer: StoreWriter,
    acks: mpsc::Sender<(oneshot::Receiver<bool>, async_nats::jetstream::Message)>,
    owners: Owners,
    partitions: u32,
) -> anyhow::Result<()> {
    let partition = engine.partition();
    let interval = Duration::from_millis(owners.rules.checkpoint_interval_ms);
    let mut rules = Arc::new(owners.control.read().rule_set(partition, partitions));
    rules.load_plugin_modules(&owners.plugins.runtime, &owners.plugins.modules).await;
    let mut last_checkpoint = Instant::now();
    while let Some(batch) = batches.recv().await {
        let Ok(outcomes) = batch.outcomes.await else { return Ok(()) };
        let fresh = {
            let view = owners.control.read();
            (view.rules_revision() != rules.revision).then(|| view.rule_set(partition, partitions))
        };
        if let Some(fresh) = fresh {
            // Modules are compiled before the rules that use them are evaluated.
            fresh.load_plugin_modules(&owners.plugins.runtime, &owners.plugins.modules).await;
            if let Some(p) = engine.plugins_mut() {
                // Instances of modules no rule uses any more go.
                p.host.retain(|tenant, digest| fresh.uses_module(tenant, digest));
            }
            rules = Arc::new(fresh);
        }
        let checkpoint = last_checkpoint.elapsed() >= interval
            || engine.since_checkpoint() + batch.items.len() as u64 >= owners.rules.checkpoint_events;
        let (items, events, ruleset) = (batch.items, batch.events, rules.clone());
        let started = Instant::now();
        let (back, mut effects) = tokio::task::spawn_blocking(move || {
            run_engine(&mut engine, &items, &events, &outcomes, &ruleset);
            let effects = engine.take_effects(checkpoint);
            (engine, effects)
        })
        .await?;
        engine = back;
        submit_disable_requests(&owners.plugins, &owners.control);
        metrics::histogram!(telemetry::RULES_BATCH_DURATION).record(started.elapsed().as_secs_f64());
        if checkpoint {
            last_checkpoint = Instant::now();
            metrics::counter!(telemetry::RULE_CHECKPOINTS).increment(1);
            owners.stats.publish(partition, engine.stats());
        }
        if let Some(queue) = &owners.notify {
            queue_jobs(queue, &effects, partition).await;
        }
        effects.epoch = epoch;
        let Some(committed) = writer.effects(effects).await else { return Ok(()) };
        if acks.send((committed, batch.last)).await.is_err() {
            anyhow::bail!("partition {partition} acker stopped");
        }
    }
    let mut effects = engine.take_effects(true);
    effects.epoch = epoch;
    owners.stats.publish(partition, engine.stats());
    if let Some(queue) = &owners.notify {
        queue_jobs(queue, &effects, partition).await;
    }
    if let Some(done) = writer.effects(effects).await {
        let _ = done.await;
    }
    Ok(())
}

/// Publishes the notification jobs of a run's alert transitions before its effects commit, so
/// a crash in between re-derives and republishes them (JetStream drops the copies). Retries
/// until JetStream takes them: the batch is not acked meanwhile.
async fn queue_jobs(queue: &signalops_notify::queue::JobQueue, effects: &PartitionEffects, partition: u32) {
    let jobs = signalops_notify::jobs_from_effects(effects, now_ms());
    if jobs.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        match queue.publish(&jobs).await {
            Ok(()) => {
                metrics::counter!(telemetry::NOTIFY_JOBS_QUEUED).increment(jobs.len() as u64);
                return;
            }
            Err(e) => {
                tracing::error!(partition, jobs = jobs.len(), error = %e, "cannot queue notification jobs; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Feeds one batch to the engine: events the store holds at their position, ticks, and skips.
fn run_engine(
    engine: &mut Engine,
    items: &[Item],
    events: &[EncodedEvent],
    outcomes: &[EventOutcome],
    rules: &RuleSet,
) {
    for item in items {
        match item {
            Item::Tick { seq, at_ms } => engine.process(Input::Tick { seq: *seq, at_ms: *at_ms }, rules),
            Item::Skip(seq) => engine.process(Input::Skip { seq: *seq }, rules),
            Item::Event { index, seq } => {
                let seq = *seq;
                match (events.get(*index), outcomes.get(*index)) {
                    (Some(event), Some(outcome)) if *outcome != EventOutcome::Duplicate => {
                        engine.process(Input::Logged { seq, event }, rules)
                    }
                    _ => engine.process(Input::Skip { seq }, rules),
                }
            }
        }
    }
}

type Batches = futures::stream::ReadyChunks<async_nats::jetstream::consumer::pull::Stream>;

async fn read_batches(
    partition: u32,
    name: &str,
    batches: &mut Batches,
    writer: &StoreWriter,
    to_eval: &mpsc::Sender<ReadBatch>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tick_subject = crate::eventlog::tick_subject(partition);
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            b = batches.next() => match b {
                Some(b) => b,
                None => anyhow::bail!("consumer {name} message stream ended"),
            },
        };
        let mut events = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
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
            if msg.subject.as_str() == tick_subject {
                match <[u8; 8]>::try_from(&msg.payload[..]) {
                    Ok(b) => items.push(Item::Tick { seq, at_ms: i64::from_be_bytes(b) }),
                    Err(_) => items.push(Item::Skip(seq)),
                }
                last = Some(msg);
                continue;
            }
            let position = LogPosition { partition, sequence: seq };
            match EncodedEvent::decode(msg.payload.clone(), position) {
                Ok(event) if subject_matches(msg.subject.as_str(), partition, &event) => {
                    items.push(Item::Event { index: events.len(), seq });
                    events.push(event);
                }
                Ok(_) => {
                    metrics::counter!(telemetry::EVENTS_UNDECODABLE, "reason" => "subject_mismatch").increment(1);
                    tracing::warn!(partition, seq, subject = %msg.subject, "event subject does not match its tenant; skipped");
                    items.push(Item::Skip(seq));
                }
                Err(e) => {
                    metrics::counter!(telemetry::EVENTS_UNDECODABLE, "reason" => "decode").increment(1);
                    tracing::warn!(partition, seq, error = %e, "log message is not an event; skipped");
                    items.push(Item::Skip(seq));
                }
            }
            last = Some(msg);
        }
        let Some(last) = last else { continue };
        let events: Arc<[EncodedEvent]> = events.into();
        let Some(outcomes) = writer.events(events.clone()).await else { return Ok(()) };
        if to_eval.send(ReadBatch { items, events, outcomes, last }).await.is_err() {
            anyhow::bail!("partition {partition} evaluator stopped");
        }
    }
}

/// The subject must be `events.<partition>.<tenant>.<type>` of the event it carries.
fn subject_matches(subject: &str, partition: u32, ev: &EncodedEvent) -> bool {
    let mut parts = subject.splitn(4, '.');
    let mut tenant = [0u8; uuid::fmt::Hyphenated::LENGTH];
    parts.next() == Some("events")
        && parts.next().and_then(|p| p.parse::<u32>().ok()) == Some(partition)
        && parts.next() == Some(&*ev.tenant_id.hyphenated().encode_lower(&mut tenant))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Owner threads, workers and blocking threads alike, run `nice` lower than the node's
    /// own threads, and no lower than that however they are started.
    #[test]
    fn owner_threads_run_at_lower_priority() {
        let own = rustix::process::getpriority_process(None).unwrap();
        let rt = owner_runtime(&OwnersConfig { threads: 1, nice: 3 }).unwrap();
        let handle = rt.handle();
        let (worker, blocking, nested) = handle.block_on(async {
            let worker = tokio::spawn(async { rustix::process::getpriority_process(None).unwrap() }).await.unwrap();
            let blocking =
                tokio::task::spawn_blocking(|| rustix::process::getpriority_process(None).unwrap()).await.unwrap();
            // A blocking thread started from a blocking thread (already lowered).
            let nested = tokio::task::spawn_blocking(|| {
                Handle::current()
                    .block_on(tokio::task::spawn_blocking(|| rustix::process::getpriority_process(None).unwrap()))
                    .unwrap()
            })
            .await
            .unwrap();
            (worker, blocking, nested)
        });
        let expected = (own + 3).min(19);
        assert_eq!((worker, blocking, nested), (expected, expected, expected));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), own, "the caller keeps its priority");
        let same = owner_runtime(&OwnersConfig { threads: 1, nice: 0 }).unwrap();
        let p = same.handle().block_on(async {
            tokio::task::spawn_blocking(|| rustix::process::getpriority_process(None).unwrap()).await
        });
        assert_eq!(p.unwrap(), own);
    }

    #[test]
    fn an_event_matches_only_its_own_subject() {
        let tenant = uuid::Uuid::now_v7();
        let other = uuid::Uuid::now_v7();
        let record = signalops_core::model::validate_event(
            serde_json::json!({"type": "payment.failed"}).as_object().cloned().unwrap_or_default(),
            "",
            tenant,
            1,
        )
        .unwrap();
        let record = EncodedEvent::from_record(&record, LogPosition { partition: 5, sequence: 1 }).unwrap();
        let own = crate::eventlog::subject(5, &tenant, "payment.failed");
        assert!(subject_matches(&own, 5, &record));
        assert!(!subject_matches(&own, 4, &record), "another partition");
        assert!(!subject_matches(&crate::eventlog::subject(5, &other, "payment.failed"), 5, &record));
        assert!(!subject_matches(&crate::eventlog::subject(5, &tenant, "payment.ok"), 5, &record));
        assert!(!subject_matches(&own.to_uppercase(), 5, &record));
        assert!(!subject_matches("events.5", 5, &record));
    }
}
