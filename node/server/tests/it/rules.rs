//! Rules through the real node: create rules over the API, send events over HTTP, and watch
//! alerts fire, resolve, be silenced and acknowledged; absence; dry-run and backtest; series and
//! catalog; limits and tenant isolation.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, Api, Setup};

/// Fast clocks so windows and absence periods pass within a test.
async fn fast_setup() -> Setup {
    Setup::with(|c| {
        c.rules.allowed_lateness_secs = 1;
        c.rules.tick_interval_ms = 200;
        c.rules.checkpoint_interval_ms = 200;
    })
    .await
}

pub async fn create_rule(api: &Api, rule: Value) -> Value {
    let (status, v) = api.post("/v1/rules", &rule).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

/// Waits until `GET /v1/alerts{query}` returns alerts satisfying `done`, and returns them.
pub async fn wait_alerts(api: &Api, query: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    eventually(30, what, || {
        let api = api.clone();
        let path = format!("/v1/alerts{query}");
        let ok = &done;
        async move {
            let (s, v) = api.get(&path).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let alerts = v["alerts"].as_array().cloned().unwrap_or_default();
            ok(&alerts).then_some(alerts)
        }
    })
    .await
}

fn now_rfc3339(offset_ms: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(offset_ms);
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_rule_fires_per_group_is_acknowledged_and_resolves() {
    let s = fast_setup().await;
    let rule = create_rule(
        &s.api,
        json!({"name": "Checkout failures", "event_types": ["checkout.*"],
               "filter": {"all": [{"field": "payload.amount", "op": "gte", "value": 100}]},
               "window": {"seconds": 3, "aggregate": "count", "op": "gte", "threshold": 3},
               "group_by": ["payload.merchant_id"], "severity": "critical", "labels": {"team": "payments"}}),
    )
    .await;
    assert_eq!(rule["version"], 1);
    let rule_id = rule["id"].as_str().unwrap().to_string();

    // m1: three matching events (and one below the filter); m2: two. Only m1 crosses.
    let mut events = vec![];
    for (m, amount) in [("m1", 150), ("m1", 200), ("m1", 50), ("m2", 300), ("m2", 300), ("m1", 120)] {
        events.push(json!({"type": "checkout.failed", "payload": {"amount": amount, "merchant_id": m},
                           "occurred_at": now_rfc3339(0)}));
    }
    let (status, v) = s.api.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let ids: Vec<String> = v["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().into()).collect();

    let alerts = wait_alerts(&s.api, "?state=firing", "m1 alert fires", |a| !a.is_empty()).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(a["rule_id"], rule_id.as_str());
    assert_eq!(a["rule_version"], 1);
    assert_eq!(a["group"], json!({"payload.merchant_id": "m1"}));
    assert_eq!(a["value"], 3.0);
    assert_eq!(a["threshold"], 3.0);
    assert_eq!(a["severity"], "critical");
    assert_eq!(a["labels"]["team"], "payments");
    assert_eq!(a["silenced"], false);
    let sample: Vec<&str> = a["event_ids"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(sample, [ids[0].as_str(), ids[1].as_str(), ids[5].as_str()]);
    let alert_id = a["id"].as_str().unwrap().to_string();

    // Acknowledge: the alert shows as acknowledged until it resolves.
    let (status, acked) = s.api.post(&format!("/v1/alerts/{alert_id}/ack"), &json!({"by": "oncall"})).await;
    assert_eq!(status, StatusCode::OK, "{acked}");
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["acknowledged_by"], "oncall");
    let (_, listed) = s.api.get("/v1/alerts?state=acknowledged").await;
    assert_eq!(listed["alerts"].as_array().unwrap().len(), 1);

    // Nothing more arrives: once the window has passed the alert resolves.
    let resolved = wait_alerts(&s.api, "?state=resolved", "alert resolves", |a| !a.is_empty()).await;
    assert_eq!(resolved[0]["id"], alert_id.as_str());
    assert!(resolved[0]["resolved_at"].as_str().unwrap() > resolved[0]["fired_at"].as_str().unwrap());
    let (status, one) = s.api.get(&format!("/v1/alerts/{alert_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["state"], "resolved");
    assert!(one["acknowledged_at"].is_string());

    // A new version is recorded; alerts after it name it.
    let mut changed = rule.clone();
    changed["window"]["threshold"] = json!(2);
    let r = s.api.http.put(format!("{}/v1/rules/{rule_id}", s.api.base)).bearer_auth(&s.api.token).json(&changed);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["version"], 2);
    // Sending back a stale version is a conflict.
    let r = s.api.http.put(format!("{}/v1/rules/{rule_id}", s.api.base)).bearer_auth(&s.api.token).json(&changed);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (_, versions) = s.api.get(&format!("/v1/rules/{rule_id}/versions")).await;
    let v: Vec<u64> = versions["versions"].as_array().unwrap().iter().map(|r| r["version"].as_u64().unwrap()).collect();
    assert_eq!(v, [2, 1]);
    let two: Vec<Value> = (0..2)
        .map(|_| json!({"type": "checkout.failed", "payload": {"amount": 500, "merchant_id": "m2"}, "occurred_at": now_rfc3339(0)}))
        .collect();
    let (status, _) = s.api.post("/v1/events", &json!({ "events": two })).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let firing = wait_alerts(&s.api, "?state=firing", "m2 alert under version 2", |a| !a.is_empty()).await;
    assert_eq!(firing[0]["rule_version"], 2);
    assert_eq!(firing[0]["group"], json!({"payload.merchant_id": "m2"}));

    let (_, rule_now) = s.api.get(&format!("/v1/rules/{rule_id}")).await;
    assert_eq!(rule_now["version"], 2);
    assert_eq!(s.api.delete(&format!("/v1/rules/{rule_id}")).await, StatusCode::NO_CONTENT);
    assert_eq!(s.api.get(&format!("/v1/rules/{rule_id}")).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_rule_cooldown_folds_and_silences_mark_alerts() {
    let s = fast_setup().await;
    let (status, silence) = s
        .api
        .post(
            "/v1/silences",
            &json!({"matchers": {"labels": {"team": "quiet"}}, "ends_at": now_rfc3339(3_600_000),
                                      "comment": "maintenance"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{silence}");
    create_rule(
        &s.api,
        json!({"name": "Big refunds", "event_types": ["refund.issued"], "cooldown_seconds": 600,
                               "filter": {"field": "payload.amount", "op": "gt", "value": 1000}}),
    )
    .await;
    create_rule(&s.api, json!({"name": "Quiet", "event_types": ["refund.issued"], "labels": {"team": "quiet"}})).await;
    let events: Vec<Value> =
        [5000, 20, 7000].iter().map(|a| json!({"type": "refund.issued", "payload": {"amount": a}})).collect();
    let (status, _) = s.api.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Big refunds: one alert folding both matches (cooldown). Quiet: three point alerts
    // (no cooldown: each fires and resolves at once), all silenced.
    let alerts = wait_alerts(&s.api, "", "alerts", |a| a.len() >= 4).await;
    let big: Vec<&Value> = alerts.iter().filter(|a| a["rule_name"] == "Big refunds").collect();
    assert_eq!(big.len(), 1, "{alerts:?}");
    assert_eq!(big[0]["value"], 2.0);
    assert_eq!(big[0]["event_ids"].as_array().unwrap().len(), 2);
    assert_eq!(big[0]["state"], "firing");
    assert_eq!(big[0]["silenced"], false);
    let quiet: Vec<&Value> = alerts.iter().filter(|a| a["rule_name"] == "Quiet").collect();
    assert_eq!(quiet.len(), 3);
    for q in quiet {
        assert_eq!(q["silenced"], true);
        assert_eq!(q["silence_id"], silence["id"]);
        assert_eq!(q["state"], "resolved");
    }
    let (_, listed) = s.api.get("/v1/silences").await;
    assert_eq!(listed["silences"][0]["active"], true);
    let sid = silence["id"].as_str().unwrap();
    assert_eq!(s.api.delete(&format!("/v1/silences/{sid}")).await, StatusCode::NO_CONTENT);
    assert_eq!(s.api.delete(&format!("/v1/silences/{sid}")).await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absence_rule_fires_once_per_silence_and_resolves() {
    let s = fast_setup().await;
    create_rule(
        &s.api,
        json!({"name": "Host down", "event_types": ["heartbeat"], "absence": {"seconds": 2},
                               "group_by": ["payload.host"]}),
    )
    .await;
    let beat = json!({"type": "heartbeat", "payload": {"host": "h1"}});
    assert_eq!(s.api.post("/v1/events", &beat).await.0, StatusCode::ACCEPTED);
    let alerts = wait_alerts(&s.api, "?state=firing", "absence fires", |a| !a.is_empty()).await;
    assert_eq!(alerts[0]["kind"], "absence");
    assert_eq!(alerts[0]["group"], json!({"payload.host": "h1"}));
    // Still silent: no second alert for the same silence.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, all) = s.api.get("/v1/alerts").await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(s.api.post("/v1/events", &beat).await.0, StatusCode::ACCEPTED);
    let resolved = wait_alerts(&s.api, "?state=resolved", "absence resolves", |a| !a.is_empty()).await;
    assert_eq!(resolved[0]["id"], alerts[0]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_backtest_series_and_catalog() {
    let s = fast_setup().await;
    let rule = json!({"name": "Velocity", "event_types": ["payment.failed"], "group_by": ["payload.card"],
                      "window": {"seconds": 60, "aggregate": "sum", "field": "payload.amount", "op": "gt", "threshold": 100}});
    let events: Vec<Value> =
        [("c1", 60, "10:00:00"), ("c1", 50, "10:00:30"), ("c2", 90, "10:00:40"), ("c1", 10, "10:02:00")]
            .iter()
            .map(|(c, a, t)| {
                json!({"type": "payment.failed", "payload": {"card": c, "amount": a},
                                "occurred_at": format!("2026-03-01T{t}Z")})
            })
            .collect();
    let (status, v) = s.api.post("/v1/rules/test", &json!({"rule": rule, "events": events})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["events_evaluated"], 4);
    let alerts = v["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{v}");
    assert_eq!(alerts[0]["value"], 110.0);
    assert_eq!(alerts[0]["group"], json!({"payload.card": "c1"}));
    assert_eq!(alerts[0]["fired_at"], "2026-03-01T10:00:30.000Z");
    assert_eq!(alerts[0]["state"], "resolved", "the 10:02 event moved the window past both");
    // Errors in the dry-run rule name the field under `rule`.
    let (status, p) =
        s.api.post("/v1/rules/test", &json!({"rule": {"name": "x", "event_types": []}, "events": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(p["field"], "rule.event_types");

    // The same events stored, then backtested through a saved rule.
    let (status, _) = s.api.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stored = eventually(20, "events stored", || {
        let api = s.api.clone();
        async move {
            let all = api.all_events("&type=payment.failed").await;
            (all.len() == 4).then_some(all)
        }
    })
    .await;
    assert_eq!(stored.len(), 4);
    let saved = create_rule(&s.api, rule).await;
    let id = saved["id"].as_str().unwrap();
    let (status, bt) = s
        .api
        .post(&format!("/v1/rules/{id}/backtest?from=2026-03-01T09:00:00Z&to=2026-03-01T11:00:00Z"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{bt}");
    assert_eq!(bt["events_evaluated"], 4);
    assert_eq!(bt["truncated"], false);
    assert_eq!(bt["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(bt["alerts"][0]["value"], 110.0);
    // A backtest fires nothing for real.
    let (_, live) = s.api.get("/v1/alerts").await;
    assert!(live["alerts"].as_array().unwrap().is_empty(), "{live}");

    // Series: counts per minute of occurred_at (the sum of the rule's field rides along once a
    // rule uses it); catalog: types with their payload fields.
    let series = eventually(20, "series", || {
        let api = s.api.clone();
        async move {
            let (_, v) = api
                .get("/v1/metrics/series?type=payment.failed&interval=1m&from=2026-03-01T10:00:00Z&to=2026-03-01T10:05:00Z")
                .await;
            let total: u64 = v["points"].as_array()?.iter().map(|p| p["count"].as_u64().unwrap_or(0)).sum();
            (total == 4).then_some(v)
        }
    })
    .await;
    let points = series["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    assert_eq!(points[0]["t"], "2026-03-01T10:00:00.000Z");
    assert_eq!(points[0]["count"], 3);
    assert_eq!(points[1]["t"], "2026-03-01T10:02:00.000Z");
    let (_, hourly) = s
        .api
        .get("/v1/metrics/series?type=payment.failed&interval=1h&from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z")
        .await;
    assert_eq!(hourly["points"].as_array().unwrap().len(), 1);
    assert_eq!(hourly["points"][0]["count"], 4);
    let (status, p) = s.api.get("/v1/metrics/series?type=payment.failed&interval=5m").await;
    assert_eq!((status, p["field"].as_str()), (StatusCode::BAD_REQUEST, Some("interval")));

    let (_, cat) = s.api.get("/v1/catalog").await;
    let types = cat["event_types"].as_array().unwrap();
    assert_eq!(types.len(), 1);
    assert_eq!(types[0]["type"], "payment.failed");
    assert_eq!(types[0]["count"], 4);
    let fields: Vec<(&str, Vec<&str>)> = types[0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (f["path"].as_str().unwrap(), f["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect())
        })
        .collect();
    assert_eq!(fields, [("payload.amount", vec!["number"]), ("payload.card", vec!["string"])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_validation_limits_and_tenant_isolation() {
    let s = Setup::with(|c| c.rules.max_rules_per_tenant = 2).await;
    let bad = [
        (
            json!({"name": "x", "event_types": ["a"], "window": {"seconds": 10, "aggregate": "sum", "op": "gt", "threshold": 1}}),
            "window.field",
        ),
        (
            json!({"name": "x", "event_types": ["a"], "filter": {"all": [{"field": "payload.a", "op": "regex", "value": "("}]}}),
            "filter.all[0].value",
        ),
        (json!({"name": "x", "event_types": ["a"], "fliter": {}}), "fliter"),
        (json!({"name": "x", "event_types": ["a"], "plugin": {"id": "nope"}}), "plugin.id"),
    ];
    for (body, field) in bad {
        let (status, p) = s.api.post("/v1/rules", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {p}");
        assert_eq!(p["field"], field, "{p}");
    }
    let r =
        s.api.http.post(format!("{}/v1/rules", s.api.base)).bearer_auth(&s.api.token).body("{}").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let rule = json!({"name": "a", "event_types": ["a.b"]});
    let first = create_rule(&s.api, rule.clone()).await;
    create_rule(&s.api, rule.clone()).await;
    let (status, p) = s.api.post("/v1/rules", &rule).await;
    assert_eq!(status, StatusCode::CONFLICT, "{p}");
    assert_eq!(p["limit"], 2);

    // Another tenant sees none of it, and its events never reach this tenant's rules.
    let (_, other) = s.admin.create_tenant("globex", None).await;
    let id = first["id"].as_str().unwrap();
    assert_eq!(other.get(&format!("/v1/rules/{id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(other.delete(&format!("/v1/rules/{id}")).await, StatusCode::NOT_FOUND);
    let (_, list) = other.get("/v1/rules").await;
    assert!(list["rules"].as_array().unwrap().is_empty());
    assert_eq!(other.post("/v1/events", &json!({"type": "a.b", "payload": {}})).await.0, StatusCode::ACCEPTED);
    assert_eq!(s.api.post("/v1/events", &json!({"type": "a.b", "payload": {}})).await.0, StatusCode::ACCEPTED);
    let mine = wait_alerts(&s.api, "", "own alerts", |a| a.len() == 2).await;
    assert!(mine.iter().all(|a| a["rule_name"] == "a"));
    let (_, theirs) = other.get("/v1/alerts").await;
    assert!(theirs["alerts"].as_array().unwrap().is_empty(), "{theirs}");
    let alert_id = mine[0]["id"].as_str().unwrap();
    assert_eq!(other.get(&format!("/v1/alerts/{alert_id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(other.post(&format!("/v1/alerts/{alert_id}/ack"), &json!({})).await.0, StatusCode::NOT_FOUND);
    let (_, cat) = other.get("/v1/catalog").await;
    assert_eq!(cat["event_types"][0]["count"], 1, "{cat}");
}
