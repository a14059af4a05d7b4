use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Api, Setup};

async fn post_with_key(api: &Api, key: &str, body: &Value) -> (StatusCode, Value) {
    let headers = [("Idempotency-Key", key), ("content-type", "application/json")];
    let (status, _, v) = api.post_raw("/v1/events", &headers, serde_json::to_vec(body).unwrap()).await;
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_inside_the_jetstream_window_are_duplicates() {
    let s = Setup::new().await;
    let body = json!({"type": "charge.created", "payload": {"amount": 10}});
    let (status, first) = post_with_key(&s.api, "charge-42", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(first["events"][0]["status"], "accepted");
    let id = first["events"][0]["id"].as_str().unwrap().to_string();
    // Immediately: JetStream's duplicate window answers (the event may not be stored yet).
    let (status, again) = post_with_key(&s.api, "charge-42", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!((again["accepted"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(1)));
    assert_eq!(again["events"][0], json!({"id": id, "status": "duplicate"}));

    // A batch with producer ids, retried whole, and with an id repeated inside the batch.
    let batch = json!({"events": [{"type": "a", "id": "b-1"}, {"type": "a", "id": "b-2"}, {"type": "a", "id": "b-1"}]});
    let (_, v) = s.api.post("/v1/events", &batch).await;
    let statuses: Vec<&str> = v["events"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["accepted", "accepted", "duplicate"]);
    assert_eq!(v["events"][2]["id"], "b-1");
    let (_, v) = s.api.post("/v1/events", &batch).await;
    assert_eq!((v["accepted"].as_u64(), v["duplicates"].as_u64()), (Some(0), Some(3)));

    // The Idempotency-Key header on a batch keys each event by its index.
    let kb = json!({"events": [{"type": "k"}, {"type": "k"}]});
    let (_, v1) = post_with_key(&s.api, "batch-key", &kb).await;
    let (_, v2) = post_with_key(&s.api, "batch-key", &kb).await;
    assert_eq!(v1["accepted"], 2);
    assert_eq!(v2["duplicates"], 2);
    assert_eq!(v1["events"][1]["id"], v2["events"][1]["id"]);
    assert_ne!(v1["events"][0]["id"], v1["events"][1]["id"]);

    s.api.wait_event(&id).await;
    s.api.wait_event("b-2").await;
    let all = s.api.all_events("").await;
    assert_eq!(all.len(), 5, "one charge, b-1, b-2 and two keyed batch events: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_past_the_jetstream_window_are_duplicates() {
    // A one-second JetStream window: past it only the durable idempotency record can answer.
    let s = Setup::with(|c| c.stream.duplicate_window_secs = 1).await;
    let body = json!({"type": "refund.issued", "payload": {"amount": 3}});
    let (_, first) = post_with_key(&s.api, "refund-7", &body).await;
    let id = first["events"][0]["id"].as_str().unwrap().to_string();
    let (_, v) = s.api.post("/v1/events", &json!({"type": "refund.issued", "id": "producer-id-1"})).await;
    assert_eq!(v["accepted"], 1);
    s.api.wait_event(&id).await;
    s.api.wait_event("producer-id-1").await;
    // Let the JetStream window pass: this wait is the behaviour under test, not a stand-in.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, again) = post_with_key(&s.api, "refund-7", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["events"][0], json!({"id": id, "status": "duplicate"}));
    let (_, again) = s.api.post("/v1/events", &json!({"type": "refund.issued", "id": "producer-id-1"})).await;
    assert_eq!(again["events"][0], json!({"id": "producer-id-1", "status": "duplicate"}));
    // A new event still goes through, and nothing was stored twice.
    let (_, v) = s.api.post("/v1/events", &json!({"type": "refund.issued", "id": "new-one"})).await;
    assert_eq!(v["accepted"], 1);
    s.api.wait_event("new-one").await;
    assert_eq!(s.api.all_events("").await.len(), 3);
}
