//! WASM plugins: the example plugins built from `plugins/` (by `plugins/build.sh`) and hostile
//! WAT fixtures, run in the real runtime; then upload, rules, tests, health, disabling and
//! tenant isolation through a real node.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{json, Value};
use signalops_core::config::PluginsConfig;
use signalops_core::model::EventRecord;
use signalops_plugins::runtime::{CallInput, CallReport, Outcome, PluginHost, PluginRuntime, RuleAlerts};
use signalops_plugins::state::PluginState;
use signalops_plugins::FailureKind;
use uuid::Uuid;

use crate::harness::{eventually, Api, Setup};
use crate::rules::{create_rule, wait_alerts};

/// A module built from `plugins/<name>` by `plugins/build.sh` (never a checked-in binary).
pub fn built(name: &str) -> Vec<u8> {
    let path = format!("{}/../../plugins/out/{name}.wasm", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}; build the example plugins with plugins/build.sh"))
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/wat/{name}.wat", env!("CARGO_MANIFEST_DIR"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn small_limits() -> PluginsConfig {
    PluginsConfig { fuel_per_call: 1_000_000, max_memory_bytes: 2 << 20, ..PluginsConfig::default() }
}

fn event(payload: Value, at_ms: i64) -> EventRecord {
    let Value::Object(payload) = payload else { panic!("payload must be an object") };
    EventRecord {
        id: Uuid::now_v7().to_string(),
        tenant_id: Uuid::nil(),
        event_type: "payment.failed".into(),
        payload,
        source: None,
        user_id: Some("u1".into()),
        session_id: None,
        occurred_at_ms: at_ms,
        received_at_ms: at_ms,
        idempotency_key: None,
    }
}

struct Harness {
    host: PluginHost,
    state: Box<PluginState>,
    digest: [u8; 32],
    config: Arc<[u8]>,
}

impl Harness {
    fn new(rt: &Arc<PluginRuntime>, module: &[u8], config: Value) -> Harness {
        let v = rt.compile(module).unwrap_or_else(|r| panic!("module refused: {r:?}"));
        Harness {
            host: PluginHost::new(rt.clone()),
            state: Box::default(),
            digest: v.digest,
            config: signalops_plugins::runtime::encode_config(&config),
        }
    }

    fn call(&mut self, payload: Value, at_ms: i64) -> CallReport {
        self.call_with(payload, at_ms, &mut ())
    }

    /// A call whose `alert_open` questions `alerts` answers.
    fn call_with(&mut self, payload: Value, at_ms: i64, alerts: &mut dyn RuleAlerts) -> CallReport {
        let ev = event(payload, at_ms);
        let input =
            CallInput { event: &ev, time_ms: at_ms, config: &self.config, rule_id: Uuid::nil(), rule_version: 1 };
        self.host.evaluate(Uuid::nil(), &self.digest, &mut self.state, &input, alerts)
    }

    fn fires(&mut self, payload: Value, at_ms: i64) -> bool {
        match self.call(payload, at_ms).outcome {
            Outcome::Decision(d) => d.fire,
            Outcome::Failure(f) => panic!("call failed: {f:?}"),
        }
    }
}

fn failure_kind(r: &CallReport) -> FailureKind {
    match &r.outcome {
        Outcome::Failure(f) => f.kind,
        Outcome::Decision(d) => panic!("expected a failure, got {d:?}"),
    }
}

#[test]
fn example_plugins_decide_from_config_window_counters_and_state() {
    let rt = Arc::new(PluginRuntime::new(&small_limits()).unwrap());

    let mut hv = Harness::new(&rt, &built("high-value"), json!({"threshold": 1000}));
    assert!(!hv.fires(json!({"amount": 999.5}), 0));
    let r = hv.call(json!({"amount": 1000}), 0);
    let Outcome::Decision(d) = &r.outcome else { panic!("{r:?}") };
    assert!(d.fire);
    assert_eq!(d.title.as_deref(), Some("amount 1000 is at least 1000"));
    assert_eq!(d.fields.to_map()["amount"], json!(1000.0));
    assert!(r.fuel_used > 0);
    assert!(!hv.fires(json!({"other": 5000}), 0), "a missing field does not fire");
    // With the group's alert open, a match fires plainly (the node would drop the text); the
    // plugin asks only when it matches.
    struct Open(bool, u32);
    impl RuleAlerts for Open {
        fn alert_open(&mut self) -> bool {
            self.1 += 1;
            self.0
        }
    }
    let mut open = Open(true, 0);
    let plain = hv.call_with(json!({"amount": 1000}), 0, &mut open);
    let Outcome::Decision(p) = &plain.outcome else { panic!("{plain:?}") };
    assert!(p.fire && p.title.is_none() && p.fields.is_empty(), "{p:?}");
    assert!(plain.fuel_used < r.fuel_used, "{} vs {}", plain.fuel_used, r.fuel_used);
    assert!(!hv.fires(json!({"amount": 1}), 0));
    let skip = hv.call_with(json!({"amount": 1}), 0, &mut open);
    assert!(matches!(&skip.outcome, Outcome::Decision(d) if !d.fire));
    assert_eq!(open.1, 1, "a skip does not ask");
    let mut closed = Open(false, 0);
    let titled = hv.call_with(json!({"amount": 1000}), 0, &mut closed);
    assert_eq!(titled.outcome, r.outcome);
    let mut by_field = Harness::new(&rt, &built("high-value"), json!({"threshold": 10, "field": "order.total"}));
    assert!(by_field.fires(json!({"order": {"total": 12}}), 0));
    let mut no_config = Harness::new(&rt, &built("high-value"), json!({}));
    let r = no_config.call(json!({"amount": 1}), 0);
    assert_eq!(failure_kind(&r), FailureKind::PluginError);

    // velocity: more than 2 events per card within 10 s, on event time.
    let mut v = Harness::new(&rt, &built("velocity"), json!({"key": "card", "max": 2, "seconds": 10}));
    let s = 1000;
    assert!(!v.fires(json!({"card": "A"}), 100 * s));
    assert!(!v.fires(json!({"card": "A"}), 101 * s));
    assert!(!v.fires(json!({"card": "B"}), 102 * s));
    let r = v.call(json!({"card": "A"}), 105 * s);
    let Outcome::Decision(d) = &r.outcome else { panic!("{r:?}") };
    assert!(d.fire && d.labels["card"] == "A" && d.fields.to_map()["count"] == json!(3), "{d:?}");
    assert_eq!(r.logs.len(), 1);
    assert_eq!(r.logs[0].message, "card=A: 3 events in 10s");
    // The rest of the burst does not fire again.
    assert!(!v.fires(json!({"card": "A"}), 106 * s));
    // By 111, 100 and 101 have left the window: 105, 106 and 111 pass the limit anew.
    assert!(v.fires(json!({"card": "A"}), 111 * s));
    assert!(!v.fires(json!({"card": "A"}), 112 * s));

    // first-seen: once per value.
    let mut f = Harness::new(&rt, &built("first-seen"), json!({"field": "country"}));
    assert!(f.fires(json!({"country": "DE"}), 0));
    assert!(f.fires(json!({"country": "FR"}), 1));
    assert!(!f.fires(json!({"country": "DE"}), 2));
    assert!(!f.fires(json!({"city": "Berlin"}), 3));
    assert_eq!(f.state.kv.len(), 2);
    // A value longer than the SDK's first read buffer (256 bytes) is read whole, growing the
    // buffer and asking again: here it then makes a state key over the 256-byte limit, which
    // the plugin reports as its error (a value read short would not decode, and not fire).
    let r = f.call(json!({"country": "x".repeat(1000)}), 4);
    assert_eq!(failure_kind(&r), FailureKind::PluginError);
    assert!(matches!(&r.outcome, Outcome::Failure(e) if e.message.contains("out of range")), "{r:?}");
    assert!(f.fires(json!({"country": "y".repeat(240)}), 5), "a long value within the limits");

    // The same call costs the same fuel every time (decisions replay exactly).
    let a = hv.call(json!({"amount": 5}), 0).fuel_used;
    let b = hv.call(json!({"amount": 5}), 0).fuel_used;
    assert_eq!(a, b);
}

/// One instance serves every rule of the tenant that uses the module: each rule's config is
/// handed over once, and a new version or config of a rule replaces it.
#[test]
fn each_rule_calls_the_shared_instance_with_its_own_config() {
    let rt = Arc::new(PluginRuntime::new(&small_limits()).unwrap());
    let digest = rt.compile(&built("high-value")).unwrap().digest;
    let mut host = PluginHost::new(rt.clone());
    let (low, high) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let mut state = Box::<PluginState>::default();
    let mut fires = |rule: Uuid, version: u32, config: &Value, amount: i64| {
        let ev = event(json!({"amount": amount}), 0);
        let config = signalops_plugins::runtime::encode_config(config);
        let input = CallInput { event: &ev, time_ms: 0, config: &config, rule_id: rule, rule_version: version };
        match host.evaluate(Uuid::nil(), &digest, &mut state, &input, &mut ()).outcome {
            Outcome::Decision(d) => d.fire,
            Outcome::Failure(f) => panic!("{f:?}"),
        }
    };
    for _ in 0..2 {
        assert!(fires(low, 1, &json!({"threshold": 10}), 50));
        assert!(!fires(high, 1, &json!({"threshold": 100}), 50));
    }
    assert!(!fires(low, 2, &json!({"threshold": 60}), 50), "a new version brings its config");
    assert!(fires(high, 1, &json!({"threshold": 40}), 50), "so does a changed config");
    assert!(fires(high, 1, &json!({"threshold": 40, "field": "amount"}), 50));
}

/// A host keeps at most `max_instances_per_partition` live instances: calls that rotate over
/// more modules than that rebuild them as needed, and every call still runs its own module
/// (one that traps is dropped and rebuilt without disturbing the others).
#[test]
fn calls_over_more_modules_than_the_instance_limit_each_run_their_own() {
    let limits = PluginsConfig { max_instances_per_partition: 2, ..small_limits() };
    let rt = Arc::new(PluginRuntime::new(&limits).unwrap());
    let modules = [fixture("fires"), fixture("skips"), built("high-value"), fixture("trap")];
    let digests: Vec<[u8; 32]> = modules.iter().map(|m| rt.compile(m).unwrap().digest).collect();
    let config = signalops_plugins::runtime::encode_config(&json!({"threshold": 100}));
    let mut host = PluginHost::new(rt.clone());
    let mut state = Box::<PluginState>::default();
    // (tenant, module, amount, what the call must give)
    let calls = [
        (1, 0, 5, Some(true)),
        (2, 1, 500, Some(false)),
        (3, 2, 500, Some(true)),
        (3, 2, 5, Some(false)),
        (4, 3, 5, None),
        (1, 0, 5, Some(true)),
    ];
    for round in 0..5 {
        for (i, &(tenant, module, amount, expect)) in calls.iter().enumerate() {
            let ev = event(json!({"amount": amount}), 0);
            let input = CallInput { event: &ev, time_ms: 0, config: &config, rule_id: Uuid::nil(), rule_version: 1 };
            let got =
                match host.evaluate(Uuid::from_u128(tenant), &digests[module], &mut state, &input, &mut ()).outcome {
                    Outcome::Decision(d) => Some(d.fire),
                    Outcome::Failure(f) => {
                        assert_eq!(f.kind, FailureKind::Trap, "round {round}, call {i}");
                        None
                    }
                };
            assert_eq!(got, expect, "round {round}, call {i}");
        }
    }
}

/// Instances come from the node's pool: a trapping module's discarded instances give their
/// slot back, a call that finds every slot taken fails as `unavailable` naming the setting, and
/// a slot freed elsewhere serves the next call.
#[test]
fn instances_come_from_a_node_wide_pool_whose_slots_are_reused() {
    let limits = PluginsConfig { instance_pool: 2, max_instances_per_partition: 1, ..small_limits() };
    let rt = Arc::new(PluginRuntime::new(&limits).unwrap());
    let mut trap = Harness::new(&rt, &fixture("trap"), json!({}));
    for _ in 0..200 {
        assert_eq!(failure_kind(&trap.call(json!({}), 0)), FailureKind::Trap);
    }
    drop(trap);
    let mut a = Harness::new(&rt, &fixture("fires"), json!({}));
    let mut b = Harness::new(&rt, &fixture("fires"), json!({}));
    assert!(a.fires(json!({}), 0) && b.fires(json!({}), 0), "two hosts, two slots");
    let mut c = Harness::new(&rt, &fixture("fires"), json!({}));
    match c.call(json!({}), 0).outcome {
        Outcome::Failure(f) => {
            assert_eq!(f.kind, FailureKind::Unavailable);
            assert!(f.message.contains("plugins.instance_pool"), "{}", f.message);
        }
        Outcome::Decision(d) => panic!("a third instance from a pool of two: {d:?}"),
    }
    drop(a);
    assert!(c.fires(json!({}), 0), "the slot the dropped host held");
    assert!(b.fires(json!({}), 0));
}

/// A health-only host (a partition owner's) times about one call in 16; a host reporting in
/// full (test runs, dry-runs) times every call.
#[test]
fn a_health_only_host_times_a_sample_of_its_calls() {
    let rt = Arc::new(PluginRuntime::new(&small_limits()).unwrap());
    let mut hv = Harness::new(&rt, &built("high-value"), json!({"threshold": 100}));
    assert!((0..50).all(|_| hv.call(json!({"amount": 5}), 0).micros.is_some()));
    hv.host.set_full_reports(false);
    let timed = (0..3_200).filter(|_| hv.call(json!({"amount": 5}), 0).nanos.is_some()).count();
    assert!((100..=300).contains(&timed), "{timed} of 3,200 calls timed");
}

#[test]
fn hostile_modules_are_refused_at_upload_with_the_reason() {
    let rt = PluginRuntime::new(&small_limits()).unwrap();
    for (name, reason) in [
        ("wasi", "forbidden_import"),
        ("unknown_host_fn", "forbidden_import"),
        ("no_evaluate", "missing_export"),
        ("abi_mismatch", "abi_version"),
        ("mixed_abi", "forbidden_import"),
        ("v1_event_get", "forbidden_import"),
        ("big_memory", "instantiation_failed"),
    ] {
        let r = rt.compile(&fixture(name)).expect_err(name);
        assert_eq!(r.reason, reason, "{name}: {r:?}");
        assert_eq!(r.status, 422, "{name}");
    }
    assert_eq!(rt.compile(b"not wasm at all").unwrap_err().reason, "not_wasm");
    let mut truncated = fixture("fires");
    truncated.truncate(20);
    assert_eq!(rt.compile(&truncated).unwrap_err().reason, "invalid_module");
    let tiny = PluginRuntime::new(&PluginsConfig { max_module_bytes: 16, ..small_limits() }).unwrap();
    assert_eq!(tiny.compile(&fixture("fires")).unwrap_err().status, 413);
}

#[test]
fn misbehaving_modules_fail_with_their_kind_and_leave_no_state() {
    let rt = Arc::new(PluginRuntime::new(&small_limits()).unwrap());
    for (name, kind) in [
        ("trap", FailureKind::Trap),
        ("spin", FailureKind::FuelExhausted),
        ("memory_hog", FailureKind::MemoryLimit),
        ("garbage", FailureKind::BadOutput),
        ("huge_output", FailureKind::BadOutput),
        ("out_of_bounds", FailureKind::BadOutput),
        ("host_abuse", FailureKind::FuelExhausted),
        ("event_out_of_bounds", FailureKind::Trap),
        ("configure_refuses", FailureKind::BadOutput),
    ] {
        let mut h = Harness::new(&rt, &fixture(name), json!({}));
        for _ in 0..2 {
            let r = h.call(json!({"amount": 1}), 0);
            assert_eq!(failure_kind(&r), kind, "{name}: {r:?}");
            if kind == FailureKind::FuelExhausted {
                assert_eq!(r.fuel_used, 1_000_000, "{name}");
            }
        }
        assert_eq!(h.state.keys(), 0, "{name}: a failed call's state changes are rolled back");
    }
    // A panicking plugin's message reaches the call's logs.
    let mut hv = Harness::new(&rt, &built("high-value"), json!({"threshold": "not a number"}));
    let r = hv.call(json!({"amount": 1}), 0);
    assert_eq!(failure_kind(&r), FailureKind::PluginError);
    // The well-behaved fixture works on the same runtime after all that.
    let mut ok = Harness::new(&rt, &fixture("fires"), json!({}));
    assert!(ok.fires(json!({}), 0));
}

async fn upload(api: &Api, name: &str, module: Vec<u8>) -> (StatusCode, Value) {
    let (s, _, v) = api
        .post_raw(&format!("/v1/plugins?name={name}&kind=rule"), &[("content-type", "application/wasm")], module)
        .await;
    (s, v)
}

async fn plugin(api: &Api, id: &str) -> Value {
    let (s, v) = api.get(&format!("/v1/plugins/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_rules_fire_through_the_api_and_failing_plugins_are_contained() {
    let s = Setup::with(|c| {
        c.rules.allowed_lateness_secs = 1;
        c.rules.tick_interval_ms = 200;
        c.rules.checkpoint_interval_ms = 200;
        c.plugins.max_consecutive_failures = 3;
    })
    .await;
    let api = &s.api;

    // Upload: raw body; the same module again is the same version; multipart works too.
    let (st, hv) = upload(api, "high-value", built("high-value")).await;
    assert_eq!(st, StatusCode::CREATED, "{hv}");
    let hv_id = hv["id"].as_str().unwrap().to_string();
    assert_eq!(hv["version"].as_str().unwrap().len(), 16);
    assert_eq!(hv["status"], "active");
    let (st, again) = upload(api, "high-value", built("high-value")).await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["id"], hv["id"]);
    let form = reqwest::multipart::Form::new()
        .text("name", "velocity")
        .text("kind", "rule")
        .part("module", reqwest::multipart::Part::bytes(built("velocity")).file_name("velocity.wasm"));
    let r =
        api.http.post(format!("{}/v1/plugins", api.base)).bearer_auth(&api.token).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Refused modules name the reason and the field.
    let (st, bad) = upload(api, "wasi", fixture("wasi")).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    assert_eq!(bad["reason"], "forbidden_import");
    assert_eq!(bad["field"], "module");
    assert!(bad["detail"].as_str().unwrap().contains("wasi_snapshot_preview1.fd_write"), "{bad}");
    let (st, bad) = upload(api, "x", b"hello".to_vec()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
    let (st, bad) = upload(api, "bad name!", built("high-value")).await;
    assert_eq!((st, bad["field"].as_str()), (StatusCode::BAD_REQUEST, Some("name")));

    // A plugin rule next to a declarative rule; a broken plugin's rule too.
    let big = create_rule(
        api,
        json!({"name": "Big payments", "event_types": ["payment.*"], "severity": "info",
               "plugin": {"id": "high-value", "config": {"threshold": 1000}}}),
    )
    .await;
    let (st, trap) = upload(api, "broken", fixture("trap")).await;
    assert_eq!(st, StatusCode::CREATED, "{trap}");
    let broken = create_rule(
        api,
        json!({"name": "Broken", "event_types": ["payment.*"], "plugin": {"id": trap["id"], "config": {}}}),
    )
    .await;
    let all = create_rule(api, json!({"name": "All payments", "event_types": ["payment.*"]})).await;

    let events: Vec<Value> = [500, 1500, 2000, 700]
        .iter()
        .map(|a| json!({"type": "payment.failed", "payload": {"amount": a, "card": "c1"}}))
        .collect();
    let (st, v) = api.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");

    let big_q = format!("?rule_id={}", big["id"].as_str().unwrap());
    let alerts = wait_alerts(api, &big_q, "plugin rule alerts", |a| a.len() == 2).await;
    for a in &alerts {
        assert_eq!(a["kind"], "plugin");
        assert_eq!(a["severity"], "info");
        assert!(a["title"].as_str().unwrap().starts_with("amount "), "{a}");
        assert!(a["details"]["amount"].as_f64().unwrap() >= 1000.0, "{a}");
    }
    // The declarative rule saw every event although the broken plugin trapped on each.
    let all_q = format!("?rule_id={}", all["id"].as_str().unwrap());
    wait_alerts(api, &all_q, "declarative rule alerts", |a| a.len() == 4).await;

    // The broken plugin: failures visible by kind, its rules disabled after 3 in a row.
    let trap_id = trap["id"].as_str().unwrap().to_string();
    let p = eventually(20, "broken plugin disabled", || {
        let api = api.clone();
        let id = trap_id.clone();
        async move {
            let p = plugin(&api, &id).await;
            (p["status"] == "disabled").then_some(p)
        }
    })
    .await;
    assert!(p["health"]["failures"]["trap"].as_u64().unwrap() >= 3, "{p}");
    assert_eq!(p["health"]["last_error"]["kind"], "trap");
    assert!(p["disabled_reason"].as_str().unwrap().contains("3 consecutive failures"), "{p}");
    let (_, r) = api.get(&format!("/v1/rules/{}", broken["id"].as_str().unwrap())).await;
    assert!(r["disabled_reason"].as_str().unwrap().contains("broken"), "{r}");
    let hvp = plugin(api, &hv_id).await;
    assert_eq!(hvp["health"]["invocations"], 4, "{hvp}");
    assert_eq!(hvp["health"]["fired"], 2);
    assert_eq!(hvp["used_by"], json!([big["id"]]));
    let (st, en) = api.post(&format!("/v1/plugins/{trap_id}/enable"), &json!({})).await;
    assert_eq!((st, en["status"].as_str()), (StatusCode::OK, Some("active")), "{en}");

    // Metrics carry plugin calls per tenant and plugin.
    let metrics = reqwest::get(format!("{}/metrics", api.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("signalops_plugin_failures_total"), "plugin failures are exported");
    assert!(metrics.contains(&format!("plugin_id=\"{hv_id}\"")));

    // In use: refused; after the rule goes, deleted.
    assert_eq!(api.delete(&format!("/v1/plugins/{hv_id}")).await, StatusCode::CONFLICT);
    assert_eq!(api.delete(&format!("/v1/rules/{}", big["id"].as_str().unwrap())).await, StatusCode::NO_CONTENT);
    assert_eq!(api.delete(&format!("/v1/plugins/{hv_id}")).await, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&format!("/v1/plugins/{hv_id}")).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_tested_in_place_and_stay_within_their_tenant() {
    let s = Setup::new().await;
    let api = &s.api;
    let (st, vel) = upload(api, "velocity", built("velocity")).await;
    assert_eq!(st, StatusCode::CREATED, "{vel}");
    let vel_id = vel["id"].as_str().unwrap().to_string();

    // The test endpoint: decisions, fuel, time and logs per event; state carries over.
    let events: Vec<Value> = (0..4)
        .map(|i| json!({"type": "payment.failed", "payload": {"card": "c9"}, "occurred_at": format!("2026-01-01T00:00:0{i}Z")}))
        .collect();
    let body = json!({"events": events, "config": {"key": "card", "max": 2, "seconds": 60}});
    let (st, t) = api.post("/v1/plugins/velocity/test", &body).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let results = t["results"].as_array().unwrap();
    let fired: Vec<bool> = results.iter().map(|r| r["decision"]["fire"].as_bool().unwrap()).collect();
    // The third event takes the count past 2; the fourth belongs to the same burst.
    assert_eq!(fired, [false, false, true, false]);
    assert!(results.iter().all(|r| r["fuel_used"].as_u64().unwrap() > 0 && r["micros"].is_u64()));
    assert_eq!(results[2]["logs"][0]["message"], "card=c9: 3 events in 60s");
    let (st, t) = api.post("/v1/plugins/velocity/test", &json!({"events": [events[0]], "config": {}})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(t["results"][0]["failure"]["kind"], "plugin_error", "{t}");

    // The rules dry-run runs plugin rules too, and shows the calls.
    let (st, fs) = upload(api, "first-seen", built("first-seen")).await;
    assert_eq!(st, StatusCode::CREATED, "{fs}");
    let logins: Vec<Value> =
        ["DE", "FR", "DE"].iter().map(|c| json!({"type": "login", "payload": {"country": c}})).collect();
    let dry = json!({
        "rule": {"name": "New country", "event_types": ["login"], "plugin": {"id": "first-seen", "config": {"field": "country"}}},
        "events": logins,
    });
    let (st, d) = api.post("/v1/rules/test", &dry).await;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(d["alerts"].as_array().unwrap().len(), 2, "{d}");
    assert_eq!(d["alerts"][1]["labels"]["country"], "FR");
    assert_eq!(d["plugin_calls"].as_array().unwrap().len(), 3);

    // Another tenant cannot see, test, or reference the plugin.
    let (_, other) = s.admin.create_tenant("globex", None).await;
    assert_eq!(other.get(&format!("/v1/plugins/{vel_id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(other.get("/v1/plugins/velocity").await.0, StatusCode::NOT_FOUND);
    let (st, _) = other.post(&format!("/v1/plugins/{vel_id}/test"), &body).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, listed) = other.get("/v1/plugins").await;
    assert_eq!(listed["plugins"], json!([]));
    let (st, e) = other
        .post("/v1/rules", &json!({"name": "steal", "event_types": ["x"], "plugin": {"id": vel_id, "config": {}}}))
        .await;
    assert_eq!((st, e["field"].as_str()), (StatusCode::BAD_REQUEST, Some("plugin.id")), "{e}");
    assert_eq!(other.delete(&format!("/v1/plugins/{vel_id}")).await, StatusCode::NOT_FOUND);
    let (_, mine) = api.get("/v1/plugins").await;
    assert_eq!(mine["plugins"].as_array().unwrap().len(), 2);
}

/// Plugin state is part of the engine's checkpoint: an engine restored from it keeps the
/// values `first-seen` saw and the counts `velocity` made, and does not fire again for them.
use signalops_rules::compiled::RuleSet;
use signalops_rules::engine::{Engine, EngineConfig, EnginePlugins, Input};

/// The rule set of one tenant whose `rules` use the example plugins `names` (ids 1, 2, ...).
fn plugin_rule_set(rt: &PluginRuntime, tenant: Uuid, names: &[&str], rules: &[Value]) -> RuleSet {
    use signalops_plugins::registry::{PluginKind, PluginRecord, PluginVersion};
    use signalops_rules::compiled::{Plugins, Rule, TenantRules};
    use signalops_rules::spec::{parse_rule, RuleLimits};
    use std::collections::BTreeMap;

    let mut plugins = Plugins::new();
    for (i, name) in names.iter().enumerate() {
        let v = rt.compile(&built(name)).unwrap();
        let sha = signalops_plugins::runtime::digest_hex(&v.digest);
        let id = Uuid::from_u128(i as u128 + 1);
        let version = PluginVersion { version: sha[..16].into(), sha256: sha, size: 0, uploaded_at_ms: 0 };
        let record = PluginRecord {
            id,
            tenant_id: tenant,
            name: name.to_string(),
            kind: PluginKind::Rule,
            versions: vec![version],
            created_at_ms: 0,
            disabled: None,
        };
        plugins.insert(id, record);
    }
    let mut versions = BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        let spec = parse_rule(r, &RuleLimits::default()).unwrap();
        let id = Uuid::from_u128(100 + i as u128);
        versions.insert(id, vec![Rule { id, tenant_id: tenant, version: 1, spec, created_at_ms: 0, updated_at_ms: 0 }]);
    }
    let rules = TenantRules::build(&versions, &plugins, tenant, Vec::new());
    assert_eq!(rules.rules.len(), versions.len());
    RuleSet { revision: 1, tenants: [(tenant, Arc::new(rules))].into_iter().collect() }
}

fn with_plugins(rt: &Arc<PluginRuntime>, mut e: Engine) -> Engine {
    e.set_plugins(EnginePlugins {
        host: PluginHost::new(rt.clone()),
        stats: None,
        max_consecutive_failures: u32::MAX,
        reports: None,
        pending: Default::default(),
    });
    e
}

#[test]
fn plugin_state_survives_a_checkpoint_and_restore() {
    let rt = Arc::new(PluginRuntime::new(&small_limits()).unwrap());
    let tenant = Uuid::now_v7();
    let set = plugin_rule_set(
        &rt,
        tenant,
        &["first-seen", "velocity"],
        &[
            json!({"name": "new country", "event_types": ["login"], "plugin": {"id": "first-seen", "config": {"field": "country"}}}),
            json!({"name": "busy", "event_types": ["login"], "group_by": ["payload.country"],
                   "plugin": {"id": "velocity", "config": {"key": "country", "max": 2, "seconds": 600}}}),
        ],
    );
    let login = |country: &str, seq: u64| {
        let mut ev = event(json!({"country": country}), 1_800_000_000_000 + seq as i64 * 1000);
        ev.tenant_id = tenant;
        ev.event_type = "login".into();
        ev
    };
    let mut engine = with_plugins(&rt, Engine::new(0, EngineConfig::default()));
    let mut fired = Vec::new();
    for (seq, c) in [(1, "DE"), (2, "FR"), (3, "DE")] {
        engine.process(Input::Event { seq, record: &login(c, seq) }, &set);
    }
    let effects = engine.take_effects(true);
    fired.extend(effects.alerts.iter().map(|a| a.rule_name.clone()));
    assert_eq!(fired, ["new country", "new country"]);
    let cp = effects.checkpoint.unwrap();
    assert!(cp.puts.iter().any(|(k, _)| k.group.as_deref().is_some_and(|g| g.starts_with('\0'))), "plugin entries");

    // Restore from what the checkpoint wrote: DE and FR are known, DE already counted twice.
    let mut restored = with_plugins(&rt, Engine::restore(0, EngineConfig::default(), effects.meta, cp.puts).unwrap());
    restored.process(Input::Event { seq: 4, record: &login("DE", 4) }, &set);
    let after: Vec<String> = restored.take_effects(false).alerts.iter().map(|a| a.rule_name.clone()).collect();
    assert_eq!(after, ["busy"], "DE is not new; its third login within 600 s trips velocity");
}

/// `alert_open` as the engine answers it: high-value fires plainly only toward an alert
/// already open for the event's card, so every new alert (a new card, or a card whose alert
/// expired after the cooldown) has the plugin's title and fields, and every match counts.
#[test]
fn plugin_alert_details_come_from_the_match_that_opens_the_alert() {
    let rt = Arc::new(PluginRuntime::new(&small_limits()).unwrap());
    let tenant = Uuid::now_v7();
    let set = plugin_rule_set(
        &rt,
        tenant,
        &["high-value"],
        &[json!({"name": "big", "event_types": ["payment.failed"], "group_by": ["payload.card"],
                  "cooldown_seconds": 60, "plugin": {"id": "high-value", "config": {"threshold": 100}}})],
    );
    let mut engine = with_plugins(&rt, Engine::new(0, EngineConfig { allowed_lateness_ms: 0, ..Default::default() }));
    engine.plugins_mut().unwrap().reports = Some(Vec::new());
    let t0 = 1_800_000_000_000;
    let mut seq = 0;
    let mut pay = |engine: &mut Engine, card: &str, amount: f64, at_s: i64| {
        seq += 1;
        let mut ev = event(json!({"card": card, "amount": amount}), t0 + at_s * 1000);
        ev.tenant_id = tenant;
        engine.process(Input::Event { seq, record: &ev }, &set);
    };
    for (card, amount, at_s) in [("A", 150.0, 0), ("A", 200.0, 1), ("B", 120.0, 2), ("A", 50.0, 3), ("A", 300.0, 4)] {
        pay(&mut engine, card, amount, at_s);
    }
    // The calls' own decisions: titled where a match opened an alert, plain where it counted.
    let titled: Vec<bool> = engine
        .plugins_mut()
        .unwrap()
        .reports
        .take()
        .unwrap()
        .iter()
        .map(|(_, _, r)| match &r.outcome {
            Outcome::Decision(d) => d.title.is_some(),
            Outcome::Failure(f) => panic!("{f:?}"),
        })
        .collect();
    assert_eq!(titled, [true, false, true, false, false]);
    let alerts = engine.take_effects(false).alerts;
    let latest = |card: &str| {
        alerts
            .iter()
            .rev()
            .find(|a| a.group.get("payload.card") == Some(&json!(card)))
            .unwrap_or_else(|| panic!("{alerts:?}"))
    };
    let (a, b) = (latest("A"), latest("B"));
    assert_ne!(a.id, b.id);
    assert_eq!(a.title.as_deref(), Some("amount 150 is at least 100"), "the opening match's text stays");
    assert_eq!(a.details.get("amount"), Some(&json!(150.0)));
    assert_eq!(a.value, 3.0, "three matches of A, the two plain ones included");
    assert_eq!(b.title.as_deref(), Some("amount 120 is at least 100"), "another card's alert is new");

    // 60 s after A's last match its alert expires: the next match opens a new one, with text.
    pay(&mut engine, "A", 400.0, 70);
    let alerts = engine.take_effects(false).alerts;
    let reopened = alerts.iter().find(|a| a.title.as_deref() == Some("amount 400 is at least 100"));
    let reopened = reopened.unwrap_or_else(|| panic!("{alerts:?}"));
    assert_ne!(reopened.id, a.id);
    assert_eq!(reopened.value, 1.0);
}
