use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Api, Setup};

async fn raw(api: &Api, content_type: &str, body: Vec<u8>) -> (StatusCode, Option<String>, Value) {
    let (status, headers, v) = api.post_raw("/v1/events", &[("content-type", content_type)], body).await;
    (status, headers.get("content-type").map(|v| v.to_str().unwrap().to_string()), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_problem_json_with_the_field() {
    let s = Setup::with(|c| {
        c.ingest.max_batch_events = 5;
        c.ingest.max_body_bytes = 4096;
    })
    .await;
    let (status, ct, v) = raw(&s.api, "application/json", b"{\"type\": ".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
    assert_eq!(v["status"], 400);
    assert!(v["detail"].as_str().unwrap().contains("malformed JSON"));
    let (status, _, v) = raw(&s.api, "application/msgpack", vec![0xc1, 0x00]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("MessagePack"));

    let mut deep = json!(1);
    for _ in 0..33 {
        deep = json!({ "d": deep });
    }
    let cases = [
        (json!({"payload": {}}), "type"),
        (json!({"type": "bad type!"}), "type"),
        (json!({"type": 7}), "type"),
        (json!({"type": "a", "payload": "x"}), "payload"),
        (json!({"type": "a", "payload": deep}), "payload"),
        (json!({"type": "a", "occurred_at": "not-a-time"}), "occurred_at"),
        (json!({"type": "a", "id": "has space"}), "id"),
        (json!({"events": [{"type": "ok"}, {"type": ""}]}), "events[1].type"),
        (json!({"events": [{"type": "ok"}, {"type": "b", "occurred_at": 5}]}), "events[1].occurred_at"),
        (json!({"type": "a", "extra": 1}), "extra"),
    ];
    for (body, field) in cases {
        let (status, v) = s.api.post("/v1/events", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    // Nothing of a rejected batch was accepted: its valid first event is not stored.
    let (status, _) =
        s.api.post("/v1/events", &json!({"events": [{"type": "ok", "id": "first-ok"}, {"type": ""}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _, v) = raw(&s.api, "text/plain", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(v["field"], "content-type");

    let many: Vec<Value> = (0..6).map(|_| json!({"type": "a"})).collect();
    let (status, v) = s.api.post("/v1/events", &json!({ "events": many })).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["field"], "events");
    let big = json!({"type": "a", "payload": {"blob": "x".repeat(5000)}});
    let (status, v) = s.api.post("/v1/events", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");

    let anon = Api::new(&s.api.base, "");
    let r = anon.http.post(format!("{}/v1/events", s.api.base)).json(&json!({"type": "a"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = Api::new(&s.api.base, "so_unknown_key").post("/v1/events", &json!({"type": "a"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = s.api.get("/v1/admin/tenants").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a tenant key is not an operator token");

    // The node keeps serving, and the half-valid batch above left nothing behind.
    let (status, v) = s.api.post("/v1/events", &json!({"type": "after.errors", "id": "after"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    s.api.wait_event("after").await;
    let (status, _) = s.api.get("/v1/events/first-ok").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(s.api.all_events("").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let s = Setup::new().await;
    let (_, limited) = s.admin.create_tenant("small", Some(json!({"events_per_second": 3}))).await;
    let batch = json!({"events": [{"type": "a"}, {"type": "a"}, {"type": "a"}]});
    let (status, _) = limited.post("/v1/events", &batch).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let r = limited
        .http
        .post(format!("{}/v1/events", limited.base))
        .bearer_auth(&limited.token)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    // Another tenant is not limited by it.
    let (status, _) = s.api.post("/v1/events", &batch).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_down_answers_503_and_recovers() {
    let mut s = Setup::with(|c| c.ingest.publish_timeout_ms = 1000).await;
    let (status, _) = s.api.post("/v1/events", &json!({"type": "before", "id": "before"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    s.api.wait_event("before").await;

    let nats = std::mem::replace(&mut s.nats, crate::harness::Nats::start());
    let (dir, port) = nats.kill();
    let started = std::time::Instant::now();
    let r = s
        .api
        .http
        .post(format!("{}/v1/events", s.api.base))
        .bearer_auth(&s.api.token)
        .json(&json!({"type": "during", "id": "during"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["events"][0]["status"], "failed", "{v}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // NATS comes back on the same port with its data: the retry is accepted exactly once.
    s.nats = crate::harness::Nats::start_in(dir, Some(port));
    let v = crate::harness::eventually(30, "ingest works again", || {
        let api = s.api.clone();
        async move {
            let (status, v) = api.post("/v1/events", &json!({"type": "during", "id": "during"})).await;
            (status == StatusCode::ACCEPTED).then_some(v)
        }
    })
    .await;
    assert_eq!(v["events"][0]["id"], "during");
    s.api.wait_event("during").await;
    let ids: Vec<String> = s.api.all_events("").await.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["during", "before"]);
}
