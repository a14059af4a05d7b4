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
    let connect = |role: &str| {
        async_nats::ConnectOptions::new().name(format!("signalops-node-{}-{role}", cfg.node_id)).connect(url)
    };
    let client = connect("main").await.with_context(|| format!("cannot connect to NATS at {url}"))?;
    let publisher = connect("ingest").await.with_context(|| format!("cannot connect to NATS at {url}"))?;
    let publish_timeout = Duration::from_millis(cfg.ingest.publish_timeout_ms);
    let log = EventLog::open(client.clone(), &cfg.stream, publish_timeout).await?;
    let ingest_log = EventLog::open(publisher.clone(), &cfg.stream, publish_timeout).await?;
    let window_ms = (cfg.ingest.idempotency_window_secs as i64).saturating_mul(1000);
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(&cfg.data_dir.join("events"), window_ms)?);

    let cancel = CancellationToken::new();
    let control = ControlPlane::start(cfg.node_id, &cfg.data_dir, client.clone(), cancel.child_token()).await?;

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
        modules: signalops_plugins::store::ModuleStore::open(client.clone(), cfg.stream.replicas).await?,
        stats: signalops_plugins::PluginStatsRegistry::default(),
        max_consecutive_failures: cfg.plugins.max_consecutive_failures,
    };
    let jobs = signalops_notify::queue::JobQueue::open(client.clone(), &cfg.notify, cfg.stream.replicas).await?;
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
    tracing::info!(addr = %listener.local_addr()?, node_id = cfg.node_id, "serving HTTP");
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
