use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::Setup;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_and_batch_ingest_then_query() {
    let s = Setup::new().await;
    let (status, v) = s
        .api
        .post(
            "/v1/events",
            &json!({"type": "payment.failed", "payload": {"amount": 120, "card": {"last4": "4242"}},
                    "source": "billing", "user_id": "u1", "occurred_at": "2026-03-01T10:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!((v["accepted"].as_u64(), v["duplicates"].as_u64()), (Some(1), Some(0)));
    let single_id = v["events"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(v["events"][0]["status"], "accepted");
    let uuid = uuid::Uuid::parse_str(&single_id).unwrap();
    assert_eq!(uuid.get_version_num(), 7, "server ids are UUIDv7");

    let batch: Vec<Value> = (0..3)
        .map(|i| json!({"type": "user.signup", "payload": {"n": i}, "occurred_at": format!("2026-03-01T10:0{}:00Z", i + 1)}))
        .collect();
    let (status, v) = s.api.post("/v1/events", &json!({ "events": batch })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["accepted"], 3);
    let ids: Vec<String> =
        v["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "ids are time-ordered within a batch");

    let stored = s.api.wait_event(&single_id).await;
    assert_eq!(stored["type"], "payment.failed");
    assert_eq!(stored["tenant_id"], s.tenant_id.as_str());
    assert_eq!(stored["payload"]["card"]["last4"], "4242");
    assert_eq!(stored["source"], "billing");
    assert_eq!(stored["user_id"], "u1");
    assert_eq!(stored["occurred_at"], "2026-03-01T10:00:00.000Z");
    assert!(stored["received_at"].as_str().unwrap().ends_with('Z'));
    assert!(stored["position"]["sequence"].as_u64().unwrap() >= 1);
    assert!(stored["position"]["partition"].as_u64().unwrap() < 4);
    for id in &ids {
        s.api.wait_event(id).await;
    }

    // Newest first by event time, with a type filter, a time range and cursor paging.
    let all = s.api.all_events("").await;
    let order: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(order, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str(), single_id.as_str()]);
    let (_, signups) = s.api.get("/v1/events?type=user.signup&limit=2").await;
    assert_eq!(signups["events"].as_array().unwrap().len(), 2);
    let cursor = signups["next_cursor"].as_str().unwrap();
    let (_, rest) = s.api.get(&format!("/v1/events?type=user.signup&limit=2&cursor={cursor}")).await;
    assert_eq!(rest["events"][0]["id"], ids[0].as_str());
    assert!(rest["next_cursor"].is_null());
    let (_, ranged) = s.api.get("/v1/events?from=2026-03-01T10:01:00Z&to=2026-03-01T10:03:00Z").await;
    let ranged: Vec<&str> = ranged["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ranged, [ids[1].as_str(), ids[0].as_str()]);
    let (status, v) = s.api.get("/v1/events?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["field"], "limit");
    let (status, v) = s.api.get("/v1/events?cursor=garbage!").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["field"], "cursor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messagepack_ingest() {
    let s = Setup::new().await;
    let body = rmp_serde::to_vec_named(&json!({"events": [
        {"type": "order.created", "payload": {"total": 19.5, "items": [1, 2]}, "id": "ord-1"},
        {"type": "order.created", "payload": {"total": 5}, "id": "ord-2"}
    ]}))
    .unwrap();
    let r = s
        .api
        .http
        .post(format!("{}/v1/events", s.api.base))
        .bearer_auth(&s.api.token)
        .header("content-type", "application/msgpack")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["accepted"], 2);
    let stored = s.api.wait_event("ord-1").await;
    assert_eq!(stored["payload"]["total"], 19.5);
    assert_eq!(stored["payload"]["items"], json!([1, 2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_only_see_their_own_events() {
    let s = Setup::new().await;
    let (_, other) = s.admin.create_tenant("globex", None).await;
    let (_, v) = s.api.post("/v1/events", &json!({"type": "a.b", "id": "shared-id", "payload": {"who": "acme"}})).await;
    assert_eq!(v["accepted"], 1);
    let (_, v) =
        other.post("/v1/events", &json!({"type": "a.b", "id": "only-globex", "payload": {"who": "globex"}})).await;
    assert_eq!(v["accepted"], 1);
    s.api.wait_event("shared-id").await;
    other.wait_event("only-globex").await;
    let (status, _) = other.get("/v1/events/shared-id").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's event id is not found");
    let (status, _) = s.api.get("/v1/events/only-globex").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The same id used by another tenant is a different event, not a duplicate.
    let (_, v) =
        other.post("/v1/events", &json!({"type": "a.b", "id": "shared-id", "payload": {"who": "globex"}})).await;
    assert_eq!(v["events"][0]["status"], "accepted");
    let theirs = other.wait_event("shared-id").await;
    assert_eq!(theirs["payload"]["who"], "globex");
    let (_, mine) = s.api.get("/v1/events/shared-id").await;
    assert_eq!(mine["payload"]["who"], "acme");
    assert_eq!(s.api.all_events("").await.len(), 1);
    assert_eq!(other.all_events("").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics() {
    let s = Setup::new().await;
    let (status, _) = s.api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = s.api.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["checks"]["nats"], true);
    let (_, v) = s.api.post("/v1/events", &json!({"type": "m.x", "id": "m1"})).await;
    assert_eq!(v["accepted"], 1);
    s.api.wait_event("m1").await;
    let (_, _) = s.api.post("/v1/events", &json!({"payload": {}})).await;
    let text = reqwest::get(format!("{}/metrics", s.api.base)).await.unwrap().text().await.unwrap();
    for needle in [
        "signalops_ingest_requests_total{transport=\"http\",outcome=\"ok\"}",
        "signalops_ingest_requests_total{transport=\"http\",outcome=\"400\"}",
        "signalops_ingest_events_total{transport=\"http\",outcome=\"accepted\"}",
        "signalops_ingest_duration_seconds_bucket",
        "signalops_jetstream_publish_duration_seconds_bucket",
        "signalops_events_stored_total",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}

/// The events of this tenant in the event stream, in stream order (ticks and other tenants'
/// events left out).
async fn stream_ids(js: &async_nats::jetstream::Context, tenant: &str) -> Vec<String> {
    let mut stream = js.get_stream("SIGNALOPS_EVENTS").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut ids = Vec::new();
    for seq in 1..=last {
        let Ok(msg) = stream.get_raw_message(seq).await else { continue };
        if msg.subject.split('.').nth(2) == Some(tenant) {
            let record: signalops_core::model::EventRecord = rmp_serde::from_slice(&msg.payload).unwrap();
            ids.push(record.id);
        }
    }
    ids
}

fn publishes(metrics: &str, mode: &str) -> u64 {
    let name = format!("signalops_jetstream_publishes_total{{mode=\"{mode}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&name)?.parse().ok()).unwrap_or(0)
}

/// A batch without idempotency keys goes to JetStream as one fast batch and lands in request
/// order; a batch with keys is published event by event. When an operator turns fast batches
/// off on the stream, the node takes the refusal, publishes pipelined, and the request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_batches_go_as_fast_batches_and_fall_back_when_refused() {
    let s = Setup::new().await;
    let js = async_nats::jetstream::new(async_nats::connect(&s.nats.url).await.unwrap());
    let mut stream = js.get_stream("SIGNALOPS_EVENTS").await.unwrap();
    assert!(stream.info().await.unwrap().config.allow_batch_publish, "the node enables fast batches on the stream");
    let metrics = || async { reqwest::get(format!("{}/metrics", s.api.base)).await.unwrap().text().await.unwrap() };
    let send = |events: Vec<Value>| {
        let api = &s.api;
        async move {
            let (status, v) = api.post("/v1/events", &json!({ "events": events })).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{v}");
            v["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };

    let mut expected = send((0..300).map(|i| json!({"type": "order.created", "payload": {"n": i}})).collect()).await;
    assert_eq!(expected.len(), 300);
    let text = metrics().await;
    assert_eq!((publishes(&text, "fast_batch"), publishes(&text, "pipelined")), (1, 0), "{text}");

    let keyed: Vec<Value> =
        (0..3).map(|i| json!({"type": "order.created", "id": format!("k-{i}"), "payload": {"n": i}})).collect();
    expected.extend(send(keyed).await);
    let text = metrics().await;
    assert_eq!((publishes(&text, "fast_batch"), publishes(&text, "pipelined")), (1, 1), "{text}");

    let mut config = stream.info().await.unwrap().config.clone();
    config.allow_batch_publish = false;
    js.update_stream(config).await.unwrap();
    for round in 0..2 {
        expected.extend(
            send((0..50).map(|i| json!({"type": "order.created", "payload": {"round": round, "n": i}})).collect())
                .await,
        );
    }
    let text = metrics().await;
    assert_eq!((publishes(&text, "fast_batch"), publishes(&text, "pipelined")), (1, 3), "{text}");

    assert_eq!(stream_ids(&js, &s.tenant_id).await, expected, "every accepted event once, in request order");
    s.api.wait_event(expected.last().unwrap()).await;
}

/// When JetStream refuses an event in the middle of a fast batch, the answer is exact: the
/// events before it are durable and reported accepted, the rest are reported failed (503), and
/// the stream holds exactly the accepted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_fast_batch_reports_the_stored_prefix() {
    let s = Setup::new().await;
    let js = async_nats::jetstream::new(async_nats::connect(&s.nats.url).await.unwrap());
    let mut stream = js.get_stream("SIGNALOPS_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 2048;
    js.update_stream(config).await.unwrap();

    let events: Vec<Value> = (0..6)
        .map(|i| {
            let note = if i == 2 { "x".repeat(4096) } else { "small".into() };
            json!({"type": "order.created", "payload": {"n": i, "note": note}})
        })
        .collect();
    let (status, v) = s.api.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let statuses: Vec<&str> = v["events"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["accepted", "accepted", "failed", "failed", "failed", "failed"], "{v}");
    let accepted: Vec<String> =
        v["events"].as_array().unwrap()[..2].iter().map(|e| e["id"].as_str().unwrap().into()).collect();
    assert_eq!(stream_ids(&js, &s.tenant_id).await, accepted);
    let text = reqwest::get(format!("{}/metrics", s.api.base)).await.unwrap().text().await.unwrap();
    assert_eq!(publishes(&text, "fast_batch"), 1, "{text}");
}
