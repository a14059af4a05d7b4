//! Start-up and shutdown of one node.
//!
//! Start: (dev) supervised nats-server → NATS connection → event stream → store → control
//! plane (Raft) → (dev) credentials → partition owners, NATS ingest, idempotency purge →
//! HTTP. Shutdown, in order: stop HTTP intake and finish in-flight requests, stop NATS
//! intake, stop partition owners between batches (acks of stored batches complete), stop Raft,
//! flush NATS, stop the supervised nats-server; the stores close when dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use signalops_control::membership::MembershipConfig;
use signalops_control::ControlPlane;
use signalops_core::config::Config;
use signalops_core::config::ConfigError;
use signalops_notify::egress::EgressPolicy;
use signalops_store::embedded::EmbeddedStore;
use signalops_store::EventStore;

use crate::api::{self, AppState};
use crate::eventlog::EventLog;
use crate::ingest::Ingestor;
use crate::natsd::{self, NatsServer};
use crate::{dev, nats_ingest, processor, telemetry};

/// How the node gets its NATS and its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `signalops dev`: supervise a local nats-server and create a dev tenant on first start.
    Dev,
    /// `signalops node`: use the external NATS at `nats.url`; `admin_token` is required.
    Node,
}

pub async fn run(
    cfg: Config,
    mode: Mode,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    cfg.validate()?;
    // The egress exceptions are checked with the policy notify enforces.
    EgressPolicy::parse(cfg.notify.egress_allow.iter().map(String::as_str))
        .map_err(|e| ConfigError::Invalid(format!("notify.egress_allow: {e}")))?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let metrics = telemetry::prometheus();

    let nats_server = match mode {
        Mode::Dev => {
            let bin = natsd::find_binary(cfg.nats.server_bin.as_deref())?;
            Some(NatsServer::start(&bin, &cfg.data_dir, cfg.nats.port).await?)
        }
        Mode::Node => None,
    };
    let url = nats_server.as_ref().map(|s| s.url.clone()).unwrap_or_else(|| cfg.nats.url.clone());
    let result = serve(cfg, mode, listener, shutdown, &url, metrics).await;
    if let Some(server) = nats_server {
        server.stop().await;
    }
    result
}

async fn serve(
    cfg: Config,
    mode: Mode,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    url: &str,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    // Two connections: one carries ingest publishes and their acks, the other consumption,
    // Raft and the NATS ingest subscription, so neither direction queues behind the other.
    let node_id = node_identity(&cfg)?;
    let http_addr = listener.local_addr()?;
    let connect =
        |role: &str| async_nats::ConnectOptions::new().name(format!("signalops-node-{node_id}-{role}")).connect(url);
    let client = connect("main").await.with_context(|| format!("cannot connect to NATS at {url}"))?;
    let publisher = connect("ingest").await.with_context(|| format!("cannot connect to NATS at {url}"))?;
    let publish_timeout = Duration::from_millis(cfg.ingest.publish_timeout_ms);
    let log = until_ready("the event stream", || EventLog::open(client.clone(), &cfg.stream, publish_timeout)).await?;
    let ingest_log =
        until_ready("the event stream", || EventLog::open(publisher.clone(), &cfg.stream, publish_timeout)).await?;
    let window_ms = (cfg.ingest.idempotency_window_secs as i64).saturating_mul(1000);
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(&cfg.data_dir.join("events"), window_ms)?);

    let cancel = CancellationToken::new();
    let membership = MembershipConfig {
        node_id,
        // No seeds: this node alone.
        seeds: if cfg.cluster.seeds.is_empty() { vec![node_id] } else { cfg.cluster.seeds.clone() },
        voters: cfg.cluster.voters,
        heartbeat: Duration::from_millis(cfg.cluster.heartbeat_ms),
        node_timeout: Duration::from_millis(cfg.cluster.node_timeout_ms),
        url: cfg.cluster.advertise_url.clone().unwrap_or_else(|| format!("http://{}", http_addr)),
    };
    let control = ControlPlane::start(membership, &cfg.data_dir, client.clone(), cancel.child_token()).await?;

    let admin_token = match mode {
        Mode::Dev => {
            let creds = dev::ensure(&control, &cfg.data_dir, cfg.admin_token.as_deref()).await?;
            println!("SignalOps dev node");
            println!("  HTTP        http://{}", listener.local_addr()?);
            println!("  NATS        {url}");
            println!("  tenant_id   {}", creds.tenant_id);
            println!("  api_key     {}", creds.api_key);
            println!("  admin_token {}", creds.admin_token);
            println!("  saved in    {}", cfg.data_dir.join(dev::CREDENTIALS_FILE).display());
            creds.admin_token
        }
        Mode::Node => cfg
            .admin_token
            .clone()
            .context("admin_token is required for `signalops node` (config file or SIGNALOPS_ADMIN_TOKEN)")?,
    };

    let ingestor = Ingestor::new(ingest_log, store.clone(), cfg.ingest.clone());
    let tracker = TaskTracker::new();
    let intake = CancellationToken::new();
    let rule_stats = processor::RuleStatsRegistry::default();
    let plugins = signalops_plugins::PluginServices {
        runtime: Arc::new(signalops_plugins::PluginRuntime::new(&cfg.plugins)?),
        modules: until_ready("the plugin module store", || {
            signalops_plugins::store::ModuleStore::open(client.clone(), cfg.stream.replicas)
        })
        .await?,
        stats: signalops_plugins::PluginStatsRegistry::default(),
        max_consecutive_failures: cfg.plugins.max_consecutive_failures,
    };
    let jobs = until_ready("the notification streams", || {
        signalops_notify::queue::JobQueue::open(client.clone(), &cfg.notify, cfg.stream.replicas)
    })
    .await?;
    let notifier = signalops_notify::Notifier::new(
        Arc::new(control.clone()),
        store.clone(),
        jobs.clone(),
        cfg.notify.clone(),
        plugins.clone(),
        &tracker,
    )?;
    tracker.spawn(notifier.clone().run(tracker.clone(), cancel.clone()));
    let owners = processor::Owners {
        control: control.clone(),
        rules: cfg.rules.clone(),
        stats: rule_stats.clone(),
        plugins: plugins.clone(),
        notify: Some(jobs),
    };
    let owner_rt = processor::owner_runtime(&cfg.owners).context("cannot start the partition owners' runtime")?;
    processor::spawn_all(&log, store.clone(), owners, &tracker, &owner_rt.handle(), cancel.clone());
    {
        // Clock ticks for rules: the leader publishes one into every partition per interval.
        let (log, control, cancel) = (log.clone(), control.clone(), cancel.clone());
        let every = Duration::from_millis(cfg.rules.tick_interval_ms);
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !control.is_leader() {
                    continue;
                }
                if let Err(e) = log.publish_ticks(signalops_core::model::now_ms()).await {
                    tracing::warn!(error = %e, "cannot publish rule clock ticks");
                }
            }
        });
    }
    {
        let (client, control, ingestor, intake) = (client.clone(), control.clone(), ingestor.clone(), intake.clone());
        let subject = cfg.ingest.nats_subject.clone();
        tracker.spawn(async move {
            if let Err(e) = nats_ingest::serve(client, subject, control, ingestor, intake).await {
                tracing::error!(error = %e, "NATS ingest stopped");
            }
        });
    }
    {
        let (store, cancel) = (store.clone(), cancel.clone());
        let retention_ms = (cfg.notify.delivery_retention_days as i64).saturating_mul(86_400_000);
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match store.purge_idempotency(signalops_core::model::now_ms()).await {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "expired idempotency records purged"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "idempotency purge failed"),
                }
                match store.purge_deliveries(signalops_core::model::now_ms() - retention_ms).await {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "delivery records past retention purged"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "delivery purge failed"),
                }
            }
        });
    }
    tracker.close();

    let state = AppState::new(api::Services {
        control: control.clone(),
        ingestor,
        store: store.clone(),
        log,
        nats: client.clone(),
        metrics,
        admin_digest: Arc::new(crate::auth::digest(&admin_token)),
        rules: cfg.rules.clone(),
        rule_stats,
        plugins,
        plugin_cfg: cfg.plugins.clone(),
        notifier,
        notify_cfg: cfg.notify.clone(),
    });
    tracing::info!(addr = %http_addr, node_id, "serving HTTP");
    let http_intake = intake.clone();
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: stopping intake");
            http_intake.cancel();
        })
        .await;
    intake.cancel();
    cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(20), tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within 20 s");
    }
    drop(owner_rt);
    control.shutdown().await;
    for c in [&client, &publisher] {
        if let Err(e) = c.flush().await {
            tracing::warn!(error = %e, "NATS flush on shutdown");
        }
    }
    served.context("HTTP server")?;
    tracing::info!("stopped");
    Ok(())
}

/// How long start-up waits for JetStream to take its streams (a NATS cluster still electing
/// its leaders answers with time-outs meanwhile).
const JETSTREAM_START_WAIT: Duration = Duration::from_secs(60);

/// Runs `open` until it succeeds or [`JETSTREAM_START_WAIT`] has passed, backing off between
/// tries; the last error is returned.
async fn until_ready<T, E, F, Fut>(what: &str, mut open: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + JETSTREAM_START_WAIT;
    let mut delay = Duration::from_millis(250);
    loop {
        match open().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open {what} yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(4));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The file in the data dir that records which node the data dir belongs to.
pub const NODE_ID_FILE: &str = "node-id";

/// This node's id, kept in the data dir from its first start: a node that restarts stays the
/// member it was even if its host name changes. A configured `cluster.node_id` that disagrees
/// with the data dir stops the node (it would join as a stranger holding another's log).
fn node_identity(cfg: &Config) -> anyhow::Result<u64> {
    let path = cfg.data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let stored: u64 =
                text.trim().parse().with_context(|| format!("{} does not hold a node id", path.display()))?;
            if let Some(configured) = cfg.cluster.node_id.filter(|c| *c != stored) {
                anyhow::bail!(
                    "the data dir {} belongs to node {stored}, but cluster.node_id is {configured}",
                    cfg.data_dir.display()
                );
            }
            Ok(stored)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A data dir from before node ids were recorded was always node 1's.
            let id =
                if cfg.data_dir.join("raft.redb").exists() { cfg.cluster.node_id.unwrap_or(1) } else { cfg.node_id() };
            std::fs::write(&path, format!("{id}\n")).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
