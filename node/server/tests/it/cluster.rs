//! Several nodes in one cluster, on a NATS cluster of three servers: one control-plane cluster
//! forms from the seeds whatever their start order, writes work on any node, and a node that is
//! not a seed joins without operator steps.

use reqwest::StatusCode;
use serde_json::{json, Value};
use signalops_core::config::Config;
use tempfile::TempDir;

use crate::harness::{eventually, test_config, Api, NatsCluster, TestNode};

fn node_config(nats: &NatsCluster, data: &TempDir, id: u64, seeds: &[u64]) -> Config {
    let mut cfg = test_config(nats.url(id as usize % nats.servers.len()), data.path());
    cfg.cluster.node_id = Some(id);
    cfg.cluster.seeds = seeds.to_vec();
    cfg.cluster.heartbeat_ms = 100;
    cfg.cluster.node_timeout_ms = 2000;
    cfg.stream.replicas = 3;
    cfg
}

/// The cluster view of `api`'s node once `ok` holds for it.
async fn cluster_when(api: &Api, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    eventually(30, what, || async {
        let (s, v) = api.get("/v1/admin/cluster").await;
        (s == StatusCode::OK && ok(&v)).then_some(v)
    })
    .await
}

/// Partitions per owner, when every partition is active.
fn owners(view: &Value) -> Option<std::collections::BTreeMap<u64, usize>> {
    let parts = view["partitions"].as_array()?;
    let mut out = std::collections::BTreeMap::new();
    for p in parts {
        if p["state"] != json!("active") {
            return None;
        }
        *out.entry(p["owner"].as_u64()?).or_insert(0) += 1;
    }
    (!parts.is_empty()).then_some(out)
}

fn roles(view: &Value) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = view["members"]
        .as_array()
        .map(|m| {
            m.iter().map(|m| (m["id"].as_u64().unwrap_or(0), m["role"].as_str().unwrap_or("").to_string())).collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeds_form_one_cluster_writes_work_on_any_node_and_a_new_node_joins() {
    signalops::telemetry::init_logging("text");
    let nats = NatsCluster::start(3).await;
    let dirs: Vec<TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let seeds = [1, 2, 3];
    // Started in reverse order, without waiting for one another.
    let mut nodes = Vec::new();
    for id in [3u64, 2, 1] {
        nodes.push((id, TestNode::spawn(node_config(&nats, &dirs[id as usize - 1], id, &seeds)).await));
    }
    nodes.sort_by_key(|(id, _)| *id);
    for (_, n) in &mut nodes {
        n.wait_ready().await;
    }
    let apis: Vec<Api> = nodes.iter().map(|(_, n)| Api::admin(n)).collect();

    // One cluster: every node names the same leader and the same three voters.
    let expected = vec![(1, "voter".to_string()), (2, "voter".to_string()), (3, "voter".to_string())];
    let mut leaders = Vec::new();
    for api in &apis {
        let v = cluster_when(api, "three voters and a leader", |v| {
            v["joined"] == json!(true) && v["leader"].is_u64() && roles(v) == expected
        })
        .await;
        leaders.push(v["leader"].as_u64().unwrap());
    }
    leaders.dedup();
    assert_eq!(leaders.len(), 1, "every node names the same leader: {leaders:?}");
    let leader = leaders[0];

    // The four partitions are shared by the three nodes (2, 1, 1).
    let v = cluster_when(&apis[0], "partitions over three nodes", |v| {
        owners(v).is_some_and(|o| o.len() == 3 && o.values().all(|n| (1..=2).contains(n)))
    })
    .await;
    let epochs: Vec<u64> = v["partitions"].as_array().unwrap().iter().map(|p| p["epoch"].as_u64().unwrap()).collect();
    assert!(epochs.iter().all(|e| *e >= 1), "{v}");

    // A write on a follower is forwarded, answered as on the leader, and seen everywhere.
    let follower = apis.iter().zip(&nodes).find(|(_, (id, _))| *id != leader).map(|(a, _)| a.clone()).unwrap();
    let (status, created) = follower.post("/v1/admin/tenants", &json!({"name": "acme"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let tenant_id = created["tenant_id"].as_str().unwrap().to_string();
    let (status, again) = follower.post("/v1/admin/tenants", &json!({"name": "acme"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "the follower answers what the leader does: {again}");
    // Read-your-writes on the node that took the write, and the key works there at once.
    let tenant = Api::new(&follower.base, created["api_key"].as_str().unwrap());
    let (status, _) = tenant.get("/v1/events?limit=1").await;
    assert_eq!(status, StatusCode::OK);
    for api in &apis {
        eventually(5, "the tenant visible on every node", || async {
            let (s, v) = api.get("/v1/admin/tenants").await;
            let found = v["tenants"].as_array()?.iter().any(|t| t["tenant_id"] == json!(tenant_id));
            (s == StatusCode::OK && found).then_some(())
        })
        .await;
    }

    // A fourth node, not a seed, joins as a learner (the cluster has its three voters).
    let fourth = TestNode::start(node_config(&nats, &dirs[3], 4, &seeds)).await;
    let fourth_api = Api::admin(&fourth);
    let mut with_learner = expected.clone();
    with_learner.push((4, "learner".to_string()));
    let v = cluster_when(&fourth_api, "node 4 a learner that hears every member", |v| {
        let alive = v["members"].as_array().is_some_and(|m| m.iter().all(|m| m["state"] == json!("alive")));
        v["joined"] == json!(true) && roles(v) == with_learner && alive
    })
    .await;
    assert_eq!(v["leader"].as_u64(), Some(leader));
    // It takes writes too.
    let (status, body) = fourth_api.post("/v1/admin/tenants", &json!({"name": "globex"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // And a share of the partitions: one each.
    cluster_when(&fourth_api, "one partition per node", |v| {
        owners(v).is_some_and(|o| o.len() == 4 && o.values().all(|n| *n == 1))
    })
    .await;

    // Decommissioning a seed that does not lead (asked on the new node): its partitions move
    // away, it leaves the membership, and node 4 takes its vote.
    let gone = (1..=3u64).rev().find(|id| *id != leader).unwrap();
    let leader_api = apis[leader as usize - 1].clone();
    assert_eq!(fourth_api.delete("/v1/admin/cluster/nodes/99").await, StatusCode::NOT_FOUND);
    assert_eq!(fourth_api.delete("/v1/admin/cluster/nodes/abc").await, StatusCode::BAD_REQUEST);
    assert_eq!(fourth_api.delete(&format!("/v1/admin/cluster/nodes/{gone}")).await, StatusCode::ACCEPTED);
    let mut after: Vec<(u64, String)> =
        [1, 2, 3, 4].into_iter().filter(|id| *id != gone).map(|id| (id, "voter".to_string())).collect();
    after.sort();
    cluster_when(&leader_api, "the decommissioned node gone, node 4 a voter", |v| {
        roles(v) == after && owners(v).is_some_and(|o| o.len() == 3 && !o.contains_key(&gone))
    })
    .await;

    // Node 4 goes away: once its heartbeats stop for the node timeout, its partition moves.
    fourth.stop().await.unwrap();
    let v = cluster_when(&leader_api, "node 4's partition moved", |v| {
        owners(v).is_some_and(|o| o.len() == 2 && !o.contains_key(&4) && !o.contains_key(&gone))
    })
    .await;
    let down = v["members"].as_array().unwrap().iter().find(|m| m["id"] == json!(4)).cloned();
    assert_eq!(down.map(|m| m["state"].clone()), Some(json!("down")), "{v}");

    for (_, n) in nodes {
        n.stop().await.unwrap();
    }
}
