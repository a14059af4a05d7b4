//! The Prometheus recorder and log setup; the metric names are [`signalops_core::telemetry`]'s
//! (re-exported here).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use signalops_core::telemetry::*;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// Sets up `tracing` with `RUST_LOG`-style filtering (default `info`), text or JSON lines.
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,async_nats=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = if format == "json" { builder.json().try_init() } else { builder.try_init() };
    if result.is_err() {
        tracing::debug!("logging was already initialised");
    }
}
