//! Notification benchmark: deliveries per second to a local webhook receiver, and alert →
//! delivery latency, through a real node (nats-server, rules, job stream, workers, store).
//!
//! Two phases against one node:
//! 1. burst: `BENCH_ALERTS` events, each firing a rule whose `BENCH_CHANNELS` actions deliver
//!    to as many webhook channels; reports deliveries/s from the first to the last delivery;
//! 2. paced: `BENCH_RATE` alerts/s for `BENCH_SECS` seconds (one channel); reports the p50 and
//!    p99 of alert fired → webhook received (the receiver reads `data.alert.fired_at`).
//!
//! Run: `cargo bench -p signalops-node --bench notify`. Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;
use common::env;

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use harness::{eventually, test_config, Api, Nats, TestNode};
use serde_json::{json, Value};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Default)]
struct Seen {
    /// (received at, ms since the alert fired) per delivery.
    deliveries: Vec<(Instant, f64)>,
}

async fn receiver() -> (String, Arc<Mutex<Seen>>) {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let shared = seen.clone();
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let seen = shared.clone();
        async move {
            let now_ms = chrono::Utc::now().timestamp_millis() as f64;
            // A receiver of its own would parse the body; this one shares the node's two
            // cores, so it only picks out the alert's `fired_at`.
            let text = std::str::from_utf8(&body).unwrap_or_default();
            let fired = text
                .split("\"fired_at\":\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.timestamp_millis() as f64)
                .unwrap_or(now_ms);
            seen.lock().unwrap().deliveries.push((Instant::now(), now_ms - fired));
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

async fn channel(api: &Api, name: &str, url: &str) -> String {
    let (s, v) =
        api.post("/v1/channels", &json!({"kind": "webhook", "name": name, "url": url, "max_concurrency": 64})).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn rule(api: &Api, event_type: &str, channels: &[String]) {
    let actions: Vec<Value> = channels.iter().map(|c| json!({"channel_id": c})).collect();
    let (s, v) =
        api.post("/v1/rules", &json!({"name": event_type, "event_types": [event_type], "actions": actions})).await;
    assert_eq!(s, 201, "{v}");
}

/// Posts `n` events of a type in batches of 500, up to 8 requests at a time.
async fn post_events(api: &Api, event_type: &str, n: usize, offset: usize) {
    let mut inflight = FuturesUnordered::new();
    for start in (0..n).step_by(500) {
        let events: Vec<Value> = (start..(start + 500).min(n))
            .map(|i| json!({"type": event_type, "id": format!("{event_type}-{}", offset + i), "payload": {"i": i}}))
            .collect();
        let api = api.clone();
        inflight.push(tokio::spawn(async move {
            let (s, v) = api.post("/v1/events", &json!({ "events": events })).await;
            assert_eq!(s, 202, "{v}");
        }));
        while inflight.len() >= 8 {
            inflight.next().await;
        }
    }
    while inflight.next().await.is_some() {}
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    if std::env::var_os("RUST_LOG").is_some() {
        signalops::telemetry::init_logging("text");
    }
    let alerts = env("BENCH_ALERTS", 10_000);
    let channels = env("BENCH_CHANNELS", 4);
    let rate = env("BENCH_RATE", 500);
    let secs = env("BENCH_SECS", 10);

    let nats = Nats::start();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&nats.url, data.path());
    cfg.notify.egress_allow = vec!["127.0.0.1/32".into()];
    let node = TestNode::start(cfg).await;
    let (_, api) = Api::admin(&node).create_tenant("bench", None).await;
    let (base, seen) = receiver().await;

    // Burst.
    let mut ids = Vec::new();
    for i in 0..channels {
        ids.push(channel(&api, &format!("burst-{i}"), &format!("{base}/burst/{i}")).await);
    }
    rule(&api, "bench.burst", &ids).await;
    let want = alerts * channels;
    let started = Instant::now();
    post_events(&api, "bench.burst", alerts, 0).await;
    let posted = started.elapsed();
    let mut last_report = Instant::now();
    eventually(600, "every burst delivery", || {
        let n = seen.lock().unwrap().deliveries.len();
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  ... {n} of {want} delivered");
            last_report = Instant::now();
        }
        async move { (n >= want).then_some(()) }
    })
    .await;
    let (first, last) = {
        let s = seen.lock().unwrap();
        (s.deliveries.first().unwrap().0, s.deliveries.last().unwrap().0)
    };
    let span = (last - first).as_secs_f64();
    let total = started.elapsed().as_secs_f64();
    println!("burst: {alerts} alerts x {channels} channels = {want} deliveries");
    println!("  events posted in {:.2} s", posted.as_secs_f64());
    println!("  deliveries/s (first to last delivery): {:.0}", want as f64 / span);
    println!("  deliveries/s (first event posted to last delivery): {:.0}", want as f64 / total);
    seen.lock().unwrap().deliveries.clear();

    // Paced: latency below saturation.
    let paced_channel = channel(&api, "paced", &format!("{base}/paced")).await;
    rule(&api, "bench.paced", &[paced_channel]).await;
    let per_request = 50usize;
    let requests = rate * secs / per_request;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(per_request as f64 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = FuturesUnordered::new();
    for r in 0..requests {
        tick.tick().await;
        let api = api.clone();
        inflight
            .push(tokio::spawn(async move { post_events(&api, "bench.paced", per_request, r * per_request).await }));
        while inflight.len() > 64 {
            inflight.next().await;
        }
    }
    while inflight.next().await.is_some() {}
    let want = requests * per_request;
    eventually(120, "every paced delivery", || {
        let n = seen.lock().unwrap().deliveries.len();
        async move { (n >= want).then_some(()) }
    })
    .await;
    let mut lat: Vec<f64> = seen.lock().unwrap().deliveries.iter().map(|d| d.1).collect();
    lat.sort_by(f64::total_cmp);
    println!("paced: {rate} alerts/s for {secs} s = {want} deliveries (one channel)");
    println!(
        "  alert fired -> webhook received: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    node.stop().await.unwrap();
}
