//! Notifications end to end: rules fire, jobs go through JetStream, workers deliver to real
//! local receivers (HTTP servers standing in for webhook endpoints, Slack and Telegram, and a
//! real SMTP server), every attempt lands in the delivery log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus, Uri};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::durability::{terminate, ProcessNode};
use crate::harness::{eventually, free_port, Api, Setup, ADMIN};

/// A request a receiver got.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

#[derive(Default)]
struct ReceiverState {
    got: Vec<Got>,
    /// Statuses to answer, in order; 200 once empty.
    plan: VecDeque<u16>,
    delay: Duration,
}

/// A local HTTP server that records every request and answers as planned.
#[derive(Clone, Default)]
struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    base: String,
}

impl Receiver {
    async fn start() -> Receiver {
        let state: Arc<Mutex<ReceiverState>> = Arc::default();
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move {
                let delay = {
                    let mut s = state.lock().unwrap();
                    s.got.push(Got { path: uri.path().to_string(), headers, body, at: Instant::now() });
                    s.delay
                };
                tokio::time::sleep(delay).await;
                let code = state.lock().unwrap().plan.pop_front().unwrap_or(200);
                (AxumStatus::from_u16(code).unwrap(), r#"{"ok":true}"#)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { state, base }
    }

    fn plan(&self, codes: &[u16]) {
        self.state.lock().unwrap().plan.extend(codes);
    }

    fn delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    fn got(&self) -> Vec<Got> {
        self.state.lock().unwrap().got.clone()
    }

    async fn wait_for(&self, n: usize, what: &str) -> Vec<Got> {
        eventually(30, what, || {
            let got = self.got();
            async move { (got.len() >= n).then_some(got) }
        })
        .await
    }
}

fn allow_loopback(cfg: &mut signalops_core::config::Config) {
    cfg.notify.egress_allow = vec!["127.0.0.1/32".into()];
}

async fn create_channel(api: &Api, body: Value) -> Value {
    let (status, v) = api.post("/v1/channels", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

/// A rule that fires for every `payment.failed` event and delivers to the channels.
async fn create_rule(api: &Api, channels: &[&str]) -> String {
    let actions: Vec<Value> = channels.iter().map(|c| json!({"channel_id": c})).collect();
    let rule = json!({"name": "Payment failed", "event_types": ["payment.failed"], "severity": "critical",
                      "actions": actions});
    let (status, v) = api.post("/v1/rules", &rule).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn send_failure(api: &Api, id: &str) {
    let (status, v) =
        api.post("/v1/events", &json!({"type": "payment.failed", "id": id, "payload": {"amount": 120}})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
}

async fn deliveries(api: &Api, query: &str) -> Vec<Value> {
    let (status, v) = api.get(&format!("/v1/deliveries{query}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["deliveries"].as_array().unwrap().clone()
}

async fn wait_delivery(api: &Api, query: &str, status: &str) -> Value {
    eventually(30, &format!("a {status} delivery"), || {
        let api = api.clone();
        let query = query.to_string();
        let status = status.to_string();
        async move { deliveries(&api, &query).await.into_iter().find(|d| d["status"] == status.as_str()) }
    })
    .await
}

fn verify(secret: &str, got: &Got) {
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    wh.verify(&got.body, &got.headers).unwrap_or_else(|e| panic!("signature does not verify: {e:?}"));
}

async fn dead_letters(nats_url: &str) -> u64 {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("SIGNALOPS_NOTIFY_DLQ").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_rule_delivers_a_signed_webhook_and_logs_it() {
    let s = Setup::with(allow_loopback).await;
    let rx = Receiver::start().await;
    let ch = create_channel(
        &s.api,
        json!({"kind": "webhook", "name": "ops", "url": format!("{}/hooks/ops", rx.base), "headers": {"X-Team": "payments"}}),
    )
    .await;
    let secret = ch["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let channel_id = ch["id"].as_str().unwrap().to_string();
    // The secret is shown once: reads never return it.
    let (_, again) = s.api.get(&format!("/v1/channels/{channel_id}")).await;
    assert!(again.get("secret").is_none() && !again.to_string().contains(&secret), "{again}");
    assert_eq!(again["status"], "active");
    assert_eq!(again["headers"]["x-team"], "***");

    let rule_id = create_rule(&s.api, &[&channel_id]).await;
    send_failure(&s.api, "pf-1").await;
    let got = rx.wait_for(1, "webhook delivered").await;
    let hook = &got[0];
    assert_eq!(hook.path, "/hooks/ops");
    verify(&secret, hook);
    assert_eq!(hook.header("x-team"), "payments");
    assert_eq!(hook.header("content-type"), "application/json");
    let body = hook.json();
    assert_eq!(body["type"], "alert.firing");
    assert_eq!(body["data"]["alert"]["rule_id"], rule_id.as_str());
    assert_eq!(body["data"]["alert"]["event_ids"][0], "pf-1");
    assert_eq!(body["data"]["message"]["title"], "[critical] Payment failed firing");

    let d = wait_delivery(&s.api, "", "delivered").await;
    assert_eq!(d["channel_id"], channel_id.as_str());
    assert_eq!(d["webhook_id"], hook.header("webhook-id"));
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(d["attempts"][0]["status_code"], 200);
    let (status, one) = s.api.get(&format!("/v1/deliveries/{}", d["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["alert_id"], body["data"]["alert"]["id"]);
    let by_alert = deliveries(&s.api, &format!("?alert_id={}", one["alert_id"].as_str().unwrap())).await;
    assert_eq!(by_alert.len(), 1);

    // Counted once per successful delivery.
    let (_, usage) = s.api.get("/v1/usage").await;
    assert_eq!(usage["usage"][0]["notifications_sent"], 1, "{usage}");

    // Another tenant sees none of it and cannot deliver to the channel.
    let (_, other) = s.admin.create_tenant("other", None).await;
    assert_eq!(other.get(&format!("/v1/channels/{channel_id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(other.get(&format!("/v1/deliveries/{}", d["id"].as_str().unwrap())).await.0, StatusCode::NOT_FOUND);
    assert!(deliveries(&other, "").await.is_empty());
    let rule = json!({"name": "steal", "event_types": ["x"], "actions": [{"channel_id": channel_id}]});
    let (status, v) = other.post("/v1/rules", &rule).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "actions[0].channel_id");
    // A channel in use cannot be deleted.
    assert_eq!(s.api.delete(&format!("/v1/channels/{channel_id}")).await, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_the_same_webhook_id_until_delivered() {
    let s = Setup::with(allow_loopback).await;
    let rx = Receiver::start().await;
    rx.plan(&[500, 503, 500]);
    let ch = create_channel(
        &s.api,
        json!({"kind": "webhook", "name": "flaky", "url": rx.base, "retry_schedule_secs": [1, 1, 1, 1]}),
    )
    .await;
    let secret = ch["secret"].as_str().unwrap();
    create_rule(&s.api, &[ch["id"].as_str().unwrap()]).await;
    send_failure(&s.api, "pf-retry").await;
    let got = rx.wait_for(4, "four attempts").await;
    let ids: Vec<&str> = got.iter().map(|g| g.header("webhook-id")).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    for g in &got {
        verify(secret, g);
        assert_eq!(g.body, got[0].body, "the body is the same on every attempt");
    }
    // Backoff: about a second between attempts.
    for w in got.windows(2) {
        assert!(w[1].at - w[0].at >= Duration::from_millis(800), "{:?}", w[1].at - w[0].at);
    }
    let d = wait_delivery(&s.api, "", "delivered").await;
    let codes: Vec<Value> = d["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].clone()).collect();
    assert_eq!(codes, vec![json!(500), json!(503), json!(500), json!(200)]);
    assert_eq!(d["attempt_count"], 4);
    let (_, usage) = s.api.get("/v1/usage").await;
    assert_eq!(usage["usage"][0]["notifications_sent"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_jobs_are_dead_lettered_replayed_and_recovered() {
    let s = Setup::with(allow_loopback).await;
    let rx = Receiver::start().await;
    rx.plan(&[500, 500]);
    let ch =
        create_channel(&s.api, json!({"kind": "webhook", "name": "down", "url": rx.base, "retry_schedule_secs": [1]}))
            .await;
    let channel_id = ch["id"].as_str().unwrap().to_string();
    create_rule(&s.api, &[&channel_id]).await;
    send_failure(&s.api, "pf-a").await;
    let failed = wait_delivery(&s.api, "?status=failed", "failed").await;
    assert_eq!(failed["attempts"].as_array().unwrap().len(), 2, "one attempt and one retry");
    assert!(failed["last_error"].as_str().unwrap().contains("500"), "{failed}");
    assert_eq!(dead_letters(&s.nats.url).await, 1);

    // Replay: the endpoint answers now; same webhook id, a second run.
    let id = failed["id"].as_str().unwrap();
    let (status, v) = s.api.post(&format!("/v1/deliveries/{id}/replay"), &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "pending");
    let d = wait_delivery(&s.api, &format!("?alert_id={}", failed["alert_id"].as_str().unwrap()), "delivered").await;
    assert_eq!(d["id"], id);
    assert_eq!(d["replays"], 1);
    let got = rx.got();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].header("webhook-id"), got[0].header("webhook-id"));

    // Recover: everything that failed since a time is sent again.
    rx.plan(&[500, 500]);
    send_failure(&s.api, "pf-b").await;
    let second = eventually(30, "second failure", || {
        let api = s.api.clone();
        async move { deliveries(&api, "?status=failed").await.into_iter().next() }
    })
    .await;
    assert_ne!(second["id"], id);
    let since = "2000-01-01T00:00:00Z";
    let (status, v) = s.api.post(&format!("/v1/channels/{channel_id}/recover?since={since}"), &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["replayed"], 1);
    eventually(30, "recovered delivery", || {
        let api = s.api.clone();
        async move { (deliveries(&api, "?status=delivered").await.len() == 2).then_some(()) }
    })
    .await;
    assert!(deliveries(&s.api, "?status=failed").await.is_empty());
    assert_eq!(dead_letters(&s.nats.url).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_channel_with_a_reason_and_an_operational_alert() {
    let s = Setup::with(allow_loopback).await;
    let rx = Receiver::start().await;
    rx.plan(&[410]);
    let ch = create_channel(&s.api, json!({"kind": "webhook", "name": "gone", "url": rx.base})).await;
    let channel_id = ch["id"].as_str().unwrap().to_string();
    create_rule(&s.api, &[&channel_id]).await;
    send_failure(&s.api, "pf-gone").await;
    let failed = wait_delivery(&s.api, "", "failed").await;
    assert_eq!(failed["attempts"].as_array().unwrap().len(), 1, "410 is not retried");
    let ch = eventually(30, "channel disabled", || {
        let api = s.api.clone();
        let path = format!("/v1/channels/{channel_id}");
        async move {
            let (_, v) = api.get(&path).await;
            (v["status"] == "disabled").then_some(v)
        }
    })
    .await;
    assert!(ch["disabled_reason"].as_str().unwrap().contains("410"), "{ch}");
    // The operational alert is written right after the channel is disabled.
    let system: Vec<Value> = eventually(10, "the channel-disabled alert", || {
        let api = s.api.clone();
        async move {
            let (_, alerts) = api.get("/v1/alerts").await;
            let system: Vec<Value> =
                alerts["alerts"].as_array()?.iter().filter(|a| a["kind"] == "system").cloned().collect();
            (!system.is_empty()).then_some(system)
        }
    })
    .await;
    assert_eq!(system.len(), 1, "{system:?}");
    assert!(system[0]["title"].as_str().unwrap().contains("gone"));

    // While disabled, new deliveries fail at once without reaching the endpoint.
    send_failure(&s.api, "pf-gone-2").await;
    eventually(30, "second delivery failed", || {
        let api = s.api.clone();
        async move { (deliveries(&api, "?status=failed").await.len() == 2).then_some(()) }
    })
    .await;
    assert_eq!(rx.got().len(), 1);
    // Re-enabled and recovered: both arrive.
    let (status, v) = s.api.post(&format!("/v1/channels/{channel_id}/enable"), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "active");
    let (_, v) = s.api.post(&format!("/v1/channels/{channel_id}/recover"), &json!({})).await;
    assert_eq!(v["replayed"], 2, "{v}");
    rx.wait_for(3, "recovered deliveries").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_both_secrets_during_the_grace_period() {
    let s = Setup::with(allow_loopback).await;
    let rx = Receiver::start().await;
    let ch = create_channel(&s.api, json!({"kind": "webhook", "name": "rot", "url": rx.base})).await;
    let old = ch["secret"].as_str().unwrap().to_string();
    let channel_id = ch["id"].as_str().unwrap().to_string();
    let (status, v) = s.api.post(&format!("/v1/channels/{channel_id}/rotate-secret?grace_secs=3600"), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new = v["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert!(v["previous_secret_expires_at"].is_string());
    create_rule(&s.api, &[&channel_id]).await;
    send_failure(&s.api, "pf-rot").await;
    let got = rx.wait_for(1, "delivery after rotation").await;
    assert_eq!(got[0].header("webhook-signature").split(' ').count(), 2);
    verify(&new, &got[0]);
    verify(&old, &got[0]);

    // Without a grace period the old secret stops at once.
    let (_, v) = s.api.post(&format!("/v1/channels/{channel_id}/rotate-secret?grace_secs=0"), &json!({})).await;
    let newest = v["secret"].as_str().unwrap().to_string();
    let (_, t) = s.api.post(&format!("/v1/channels/{channel_id}/test"), &json!({})).await;
    assert_eq!(t["delivered"], true, "{t}");
    let got = rx.wait_for(2, "test delivery").await;
    verify(&newest, &got[1]);
    assert!(standardwebhooks::Webhook::new(&new).unwrap().verify(&got[1].body, &got[1].headers).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_and_telegram_get_their_own_formats_with_templates() {
    let s = Setup::with(allow_loopback).await;
    let slack = Receiver::start().await;
    let telegram = Receiver::start().await;
    let sl = create_channel(
        &s.api,
        json!({"kind": "slack", "name": "slack", "url": format!("{}/services/T1/B1/tok", slack.base)}),
    )
    .await;
    assert!(sl.get("secret").is_none());
    assert!(!sl["url"].as_str().unwrap().contains("tok"), "{sl}");
    let tg = create_channel(
        &s.api,
        json!({"kind": "telegram", "name": "tg", "bot_token": "4242:secret-token", "chat_id": -100123, "api_base_url": telegram.base}),
    )
    .await;
    assert_eq!(tg["bot_token"], "4242:***");
    let template = json!({"title": "{{ alert.rule_name }} over {{ event.payload.amount }}",
                          "body": "card {{ event.payload.card }} ({{ alert.severity }})"});
    let rule = json!({"name": "Big failure", "event_types": ["payment.failed"], "actions": [
        {"channel_id": sl["id"], "template": template}, {"channel_id": tg["id"], "template": template}]});
    let (status, v) = s.api.post("/v1/rules", &rule).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, _) = s
        .api
        .post(
            "/v1/events",
            &json!({"type": "payment.failed", "id": "big-1", "payload": {"amount": 900, "card": "c-7"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = slack.wait_for(1, "slack message").await;
    assert_eq!(got[0].path, "/services/T1/B1/tok");
    assert_eq!(got[0].json()["text"], "*Big failure over 900*\ncard c-7 (warning)");
    let got = telegram.wait_for(1, "telegram message").await;
    assert_eq!(got[0].path, "/bot4242:secret-token/sendMessage");
    let body = got[0].json();
    assert_eq!(body["chat_id"], "-100123");
    assert_eq!(body["text"], "Big failure over 900\n\ncard c-7 (warning)");
    // A bad template is refused at rule write, naming the field.
    let bad = json!({"name": "bad", "event_types": ["x"], "actions": [{"channel_id": sl["id"], "template": {"title": "{{ oops"}}]});
    let (status, v) = s.api.post("/v1/rules", &bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["field"], "actions[0].template.title");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_through_a_real_smtp_server() {
    let maildir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut smtp = std::process::Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
        .arg(maildir.path().join("box"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with aiosmtpd (pip install aiosmtpd; scripts/setup.sh installs it)");
    eventually(20, "SMTP server listening", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await;
    let s = Setup::with(|cfg| {
        cfg.notify.smtp_url = Some(format!("smtp://127.0.0.1:{port}"));
        cfg.notify.smtp_from = Some("SignalOps <alerts@signalops.test>".into());
    })
    .await;
    let ch = create_channel(
        &s.api,
        json!({"kind": "email", "name": "oncall", "to": ["oncall@example.com", "lead@example.com"]}),
    )
    .await;
    create_rule(&s.api, &[ch["id"].as_str().unwrap()]).await;
    send_failure(&s.api, "mail-1").await;
    let d = wait_delivery(&s.api, "", "delivered").await;
    assert_eq!(d["attempts"][0]["status_code"], 250);
    let new = maildir.path().join("box").join("new");
    let mail = eventually(20, "mail in the maildir", || {
        let new = new.clone();
        async move {
            let entry = std::fs::read_dir(&new).ok()?.next()?.ok()?;
            std::fs::read_to_string(entry.path()).ok()
        }
    })
    .await;
    assert!(mail.contains("Subject: [critical] Payment failed firing"), "{mail}");
    assert!(mail.contains("oncall@example.com") && mail.contains("lead@example.com"), "{mail}");
    assert!(mail.contains("alerts@signalops.test"), "{mail}");
    let _ = smtp.kill();
    let _ = smtp.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_unless_allowed() {
    let s = Setup::new().await;
    for url in [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest",
        "http://[::1]/",
        "http://localhost:8080/",
        "http://10.0.0.8/",
    ] {
        let (status, v) = s.api.post("/v1/channels", &json!({"kind": "webhook", "name": "x", "url": url})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {v}");
        assert_eq!(v["field"], "url");
        assert!(v["detail"].as_str().unwrap().contains("refused"), "{v}");
    }
    let (status, v) =
        s.api.post("/v1/channels", &json!({"kind": "webhook", "name": "x", "url": "ftp://example.com"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "url");
    let (status, v) = s.api.post("/v1/channels", &json!({"kind": "email", "name": "x", "to": ["a@b.c"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "no SMTP server configured: {v}");
}

/// One tenant's endpoint hangs; another tenant's deliveries are not held up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_delay_other_tenants() {
    let s = Setup::with(allow_loopback).await;
    let slow = Receiver::start().await;
    slow.delay(Duration::from_secs(4));
    let fast = Receiver::start().await;
    let ch = create_channel(&s.api, json!({"kind": "webhook", "name": "slow", "url": slow.base, "max_concurrency": 2}))
        .await;
    create_rule(&s.api, &[ch["id"].as_str().unwrap()]).await;
    let (_, other) = s.admin.create_tenant("neighbour", None).await;
    let ch2 = create_channel(&other, json!({"kind": "webhook", "name": "fast", "url": fast.base})).await;
    create_rule(&other, &[ch2["id"].as_str().unwrap()]).await;

    let events: Vec<Value> = (0..40).map(|i| json!({"type": "payment.failed", "id": format!("slow-{i}")})).collect();
    let (status, _) = s.api.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    slow.wait_for(2, "slow endpoint busy").await;
    let sent = Instant::now();
    send_failure(&other, "fast-1").await;
    fast.wait_for(1, "neighbour delivered").await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(3), "the neighbour waited {took:?} behind a slow endpoint");
    // The slow channel works through its backlog two at a time.
    assert!(slow.got().len() <= 4, "{}", slow.got().len());
}

/// kill -9 while an attempt is in flight: the job is not lost; after the restart it is sent
/// again with the same webhook id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_delivers_after_restart() {
    let rx = Receiver::start().await;
    rx.delay(Duration::from_secs(30));
    let node =
        ProcessNode::new(&[("SIGNALOPS_EGRESS_ALLOW", "127.0.0.1/32"), ("SIGNALOPS_NOTIFY__ACK_WAIT_SECS", "3")]);
    let mut child = node.spawn().await;
    let (_, api) = Api::new(&node.base, ADMIN).create_tenant("crash", None).await;
    let ch = create_channel(&api, json!({"kind": "webhook", "name": "hook", "url": rx.base, "timeout_secs": 60})).await;
    let secret = ch["secret"].as_str().unwrap().to_string();
    create_rule(&api, &[ch["id"].as_str().unwrap()]).await;
    send_failure(&api, "crash-1").await;
    rx.wait_for(1, "attempt in flight").await;
    child.kill().unwrap();
    child.wait().unwrap();
    rx.delay(Duration::ZERO);
    let mut child = node.spawn().await;
    let got = rx.wait_for(2, "delivery after restart").await;
    assert_eq!(got[1].header("webhook-id"), got[0].header("webhook-id"));
    verify(&secret, &got[1]);
    let d = wait_delivery(&api, "", "delivered").await;
    assert_eq!(d["webhook_id"], got[0].header("webhook-id"));
    assert!(terminate(&mut child).success());
}

async fn upload_notifier(api: &Api, name: &str, module: Vec<u8>, kind: &str) -> (StatusCode, Value) {
    let path = format!("/v1/plugins?name={name}&kind={kind}");
    let (s, _, v) = api.post_raw(&path, &[("content-type", "application/wasm")], module).await;
    (s, v)
}

/// A tenant's notifier plugin shapes the request; the node checks the host, adds the secret
/// headers the plugin never sees, sends it and logs the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_plugin_renders_the_request_and_the_node_sends_it() {
    let s = Setup::with(allow_loopback).await;
    let rx = Receiver::start().await;
    let module = crate::plugins::built("chat-card");
    // The kind must match the module's entry point.
    let (status, v) = upload_notifier(&s.api, "chat-card", module.clone(), "rule").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "kind");
    let (status, v) = upload_notifier(&s.api, "chat-card", module, "notifier").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["kind"], "notifier");
    // A rule cannot use a notifier.
    let bad_rule = json!({"name": "x", "event_types": ["x"], "plugin": {"id": "chat-card"}});
    assert_eq!(s.api.post("/v1/rules", &bad_rule).await.0, StatusCode::BAD_REQUEST);

    let ch = create_channel(
        &s.api,
        json!({"kind": "plugin", "name": "cards", "plugin": "chat-card",
               "config": {"url": format!("{}/api/webhooks/42/tok", rx.base), "format": "discord"},
               "allowed_hosts": ["127.0.0.1"], "headers": {"Authorization": "Bot very-secret"}}),
    )
    .await;
    assert_eq!(ch["headers"]["authorization"], "***");
    // Chat services put tokens in URL paths: views keep only scheme and host.
    assert!(ch["config"]["url"].as_str().unwrap().ends_with("/***"), "{ch}");
    let channel_id = ch["id"].as_str().unwrap().to_string();
    create_rule(&s.api, &[&channel_id]).await;
    send_failure(&s.api, "card-1").await;
    let got = rx.wait_for(1, "card delivered").await;
    assert_eq!(got[0].path, "/api/webhooks/42/tok");
    assert_eq!(got[0].header("authorization"), "Bot very-secret");
    assert_eq!(got[0].header("content-type"), "application/json");
    let body = got[0].json();
    let embed = &body["embeds"][0];
    assert_eq!(embed["title"], "[critical] Payment failed firing");
    assert_eq!(embed["color"], 0xd0312d);
    assert_eq!(embed["fields"][3]["value"], "payment.failed (card-1)", "{body}");
    let d = wait_delivery(&s.api, "", "delivered").await;
    assert_eq!(got[0].header("x-signalops-webhook-id"), d["webhook_id"].as_str().unwrap());
    let (_, p) = s.api.get("/v1/plugins/chat-card").await;
    assert_eq!(p["health"]["invocations"], 1, "{p}");
    // The plugin is in use: it cannot be deleted.
    assert_eq!(s.api.delete("/v1/plugins/chat-card").await, StatusCode::CONFLICT);

    // A request to a host outside allowed_hosts is refused, and logged as such.
    let (status, v) = s
        .api
        .http
        .put(format!("{}/v1/channels/{channel_id}", s.api.base))
        .bearer_auth(&s.api.token)
        .json(&json!({"kind": "plugin", "name": "cards", "plugin": "chat-card",
                      "config": {"url": format!("{}/x", rx.base)}, "allowed_hosts": ["chat.example"]}))
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{:?}", v.text().await);
    let (_, t) = s.api.post(&format!("/v1/channels/{channel_id}/test"), &json!({})).await;
    assert_eq!(t["delivered"], false, "{t}");
    assert!(t["attempt"]["error"].as_str().unwrap().contains("allowed_hosts"), "{t}");
    assert_eq!(rx.got().len(), 1);
}

/// A tenant's failing endpoints cannot fill the job stream: beyond its retry allowance a
/// failed attempt is dead-lettered at once (and can be recovered later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_retry_backlog_is_bounded() {
    let s = Setup::with(|cfg| {
        allow_loopback(cfg);
        cfg.notify.max_retrying_per_tenant = 1;
    })
    .await;
    let rx = Receiver::start().await;
    rx.plan(&[500, 500, 500, 500]);
    let ch =
        create_channel(&s.api, json!({"kind": "webhook", "name": "down", "url": rx.base, "retry_schedule_secs": [60]}))
            .await;
    create_rule(&s.api, &[ch["id"].as_str().unwrap()]).await;
    send_failure(&s.api, "backlog-1").await;
    wait_delivery(&s.api, "", "pending").await;
    eventually(30, "first attempt recorded", || {
        let api = s.api.clone();
        async move { deliveries(&api, "?status=pending").await.into_iter().find(|d| d["attempt_count"] == 1).map(|_| ()) }
    })
    .await;
    send_failure(&s.api, "backlog-2").await;
    let failed = wait_delivery(&s.api, "", "failed").await;
    assert_eq!(failed["attempt_count"], 1);
    assert!(failed["last_error"].as_str().unwrap().contains("waiting for a retry"), "{failed}");
    assert_eq!(deliveries(&s.api, "?status=pending").await.len(), 1);
    assert_eq!(dead_letters(&s.nats.url).await, 1);
}
