use async_nats::HeaderMap;
use serde_json::{json, Value};

use crate::harness::{eventually, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_request_reply_and_plain_publish() {
    let s = Setup::new().await;
    let client = async_nats::connect(&s.nats.url).await.unwrap();
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {}", s.api.token).as_str());
    let body = json!({"events": [{"type": "nats.req", "id": "n-1"}, {"type": "nats.req", "id": "n-2"}]});
    let reply = client
        .request_with_headers("signalops.v1.ingest", h.clone(), serde_json::to_vec(&body).unwrap().into())
        .await
        .unwrap();
    assert_eq!(reply.headers.as_ref().and_then(|h| h.get("Status")).map(|v| v.as_str()), Some("202"));
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["events"][1], json!({"id": "n-2", "status": "accepted"}));

    // Same body again: duplicates, as over HTTP.
    let reply = client
        .request_with_headers("signalops.v1.ingest", h.clone(), serde_json::to_vec(&body).unwrap().into())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["duplicates"], 2);

    // MessagePack over NATS.
    let mut mh = h.clone();
    mh.insert("Content-Type", "application/msgpack");
    let packed = rmp_serde::to_vec_named(&json!({"type": "nats.mp", "id": "n-mp"})).unwrap();
    let reply = client.request_with_headers("signalops.v1.ingest", mh, packed.into()).await.unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["accepted"], 1, "{v}");

    // Errors come back as problem documents with their status.
    let mut bad = HeaderMap::new();
    bad.insert("Authorization", "Bearer so_nope_nope");
    let reply =
        client.request_with_headers("signalops.v1.ingest", bad, b"{\"type\":\"x\"}".to_vec().into()).await.unwrap();
    assert_eq!(reply.headers.as_ref().and_then(|h| h.get("Status")).map(|v| v.as_str()), Some("401"));
    let p: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(p["status"], 401);
    let reply = client
        .request_with_headers("signalops.v1.ingest", h.clone(), b"{\"payload\":{}}".to_vec().into())
        .await
        .unwrap();
    let p: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!((p["status"].as_u64(), p["field"].as_str()), (Some(400), Some("type")));

    // A plain publish (no reply subject) is accepted too.
    client
        .publish_with_headers(
            "signalops.v1.ingest",
            h.clone(),
            serde_json::to_vec(&json!({"type": "nats.pub", "id": "n-pub"})).unwrap().into(),
        )
        .await
        .unwrap();
    // A failing plain publish is counted.
    client.publish_with_headers("signalops.v1.ingest", h, b"not json".to_vec().into()).await.unwrap();
    client.flush().await.unwrap();
    for id in ["n-1", "n-2", "n-mp", "n-pub"] {
        s.api.wait_event(id).await;
    }
    eventually(10, "plain publish failure counted", || async {
        let text = reqwest::get(format!("{}/metrics", s.api.base)).await.ok()?.text().await.ok()?;
        text.contains("signalops_nats_ingest_failures_total{status=\"400\"} 1").then_some(())
    })
    .await;
}
