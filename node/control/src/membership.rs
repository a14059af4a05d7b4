//! Who is in the cluster: heartbeats over NATS, the bootstrap by the seed nodes, and the
//! leader adding the nodes it hears from.
//!
//! Every node publishes a [`Heartbeat`] on [`HEARTBEAT_SUBJECT`] every `heartbeat` and keeps
//! the last one it heard from each node ([`Peers`]); that table is what the cluster view shows
//! as last heartbeat and state, and what the leader reads to tell live nodes from down ones.
//!
//! Forming: only the nodes listed in `cluster.seeds` bootstrap, each with exactly that set of
//! voters, so however they start (all at once, one by one, restarted mid-way) they form one
//! cluster; Raft lets every member initialise with the same membership. Any other node waits
//! until the leader hears its heartbeat, adds it as a learner and, while the cluster has fewer
//! than `cluster.voters` voters, promotes it. A node that restarts is already a member and is
//! never added again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::state::{Command, ControlView};
use crate::Raft;

/// Where nodes announce themselves. Only nodes may publish or subscribe here.
pub const HEARTBEAT_SUBJECT: &str = "signalops.cluster.heartbeat";

/// What a node announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: u64,
    /// Where its HTTP API is reached.
    pub url: String,
}

/// The last heartbeat heard from a node, on this node's clock.
#[derive(Debug, Clone)]
pub struct Peer {
    pub url: String,
    pub last_seen: Instant,
}

/// The heartbeats this node has heard, by node id (its own included).
#[derive(Debug, Clone, Default)]
pub struct Peers {
    inner: Arc<Mutex<BTreeMap<u64, Peer>>>,
}

impl Peers {
    fn note(&self, hb: Heartbeat) {
        let mut peers = match self.inner.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        peers.insert(hb.node_id, Peer { url: hb.url, last_seen: Instant::now() });
    }

    /// Every node heard from, with its last heartbeat.
    pub fn snapshot(&self) -> BTreeMap<u64, Peer> {
        match self.inner.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The nodes heard from within `timeout`.
    pub fn live(&self, timeout: Duration) -> BTreeMap<u64, Peer> {
        let now = Instant::now();
        self.snapshot().into_iter().filter(|(_, p)| now.duration_since(p.last_seen) <= timeout).collect()
    }
}

/// What membership needs to know about this node's cluster settings.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub node_id: u64,
    pub seeds: Vec<u64>,
    pub voters: usize,
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    pub url: String,
}

/// Bootstraps Raft if this node is a seed and Raft has no state yet. Every seed initialises
/// with the same voters (and no addresses, which come from heartbeats), so the first entry of
/// the log is the same on each of them.
pub async fn bootstrap(raft: &Raft, cfg: &MembershipConfig) -> Result<bool, String> {
    if raft.is_initialized().await.map_err(|e| e.to_string())? || !cfg.seeds.contains(&cfg.node_id) {
        return Ok(false);
    }
    let members: BTreeMap<u64, BasicNode> = cfg.seeds.iter().map(|id| (*id, BasicNode::default())).collect();
    match raft.initialize(members).await {
        Ok(()) => Ok(true),
        // Another seed's leader reached this node first: it is a member already.
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Publishes this node's heartbeat every `cfg.heartbeat` and records every heartbeat heard,
/// until `cancel` fires.
pub async fn heartbeats(
    nats: async_nats::Client,
    cfg: MembershipConfig,
    peers: Peers,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut sub = nats.subscribe(HEARTBEAT_SUBJECT).await?;
    let own = Heartbeat { node_id: cfg.node_id, url: cfg.url.clone() };
    let body: bytes::Bytes = match rmp_serde::to_vec_named(&own) {
        Ok(b) => b.into(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode this node's heartbeat");
            return Ok(());
        }
    };
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                peers.note(own.clone());
                if let Err(e) = nats.publish(HEARTBEAT_SUBJECT, body.clone()).await {
                    tracing::debug!(error = %e, "cannot publish heartbeat");
                }
            }
            msg = sub.next() => {
                let Some(msg) = msg else { return Ok(()) };
                match rmp_serde::from_slice::<Heartbeat>(&msg.payload) {
                    Ok(hb) => peers.note(hb),
                    Err(e) => tracing::debug!(error = %e, "undecodable heartbeat"),
                }
            }
        }
    }
}

/// On the leader: adds the live nodes that are not members as learners, promotes live
/// learners to voters while there are fewer than `cfg.voters`, and assigns the partitions
/// (once `partitions` is known) over the live members. Runs every heartbeat until `cancel`
/// fires; followers only watch.
pub async fn reconcile(
    raft: Raft,
    cfg: MembershipConfig,
    peers: Peers,
    view: Arc<std::sync::RwLock<ControlView>>,
    partitions: Arc<AtomicU32>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_leader = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let leader = raft.metrics().borrow().current_leader;
        if leader != last_leader {
            if leader.is_some() {
                metrics::counter!(signalops_core::telemetry::LEADER_CHANGES).increment(1);
                tracing::info!(leader = ?leader, "control-plane leader");
            }
            last_leader = leader;
        }
        if leader != Some(cfg.node_id) {
            continue;
        }
        if let Err(e) = reconcile_once(&raft, &cfg, &peers, &view).await {
            tracing::warn!(error = %e, "cluster membership change failed; retrying");
        }
        let count = partitions.load(Ordering::Relaxed);
        if count > 0 {
            if let Err(e) = balance(&raft, &cfg, &peers, &view, count).await {
                tracing::warn!(error = %e, "partition assignment failed; retrying");
            }
        }
    }
}

/// Moves partitions so that every one has a live owner and the live members share them evenly.
async fn balance(
    raft: &Raft,
    cfg: &MembershipConfig,
    peers: &Peers,
    view: &std::sync::RwLock<ControlView>,
    partitions: u32,
) -> Result<(), String> {
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let (current, decommissioned) = match view.read() {
        Ok(v) => (v.state.partitions.clone(), v.state.decommissioned.clone()),
        Err(poisoned) => {
            let v = poisoned.into_inner();
            (v.state.partitions.clone(), v.state.decommissioned.clone())
        }
    };
    let live: BTreeSet<u64> = {
        let heard = peers.live(cfg.node_timeout);
        membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| heard.contains_key(id) && !decommissioned.contains(id))
            .collect()
    };
    let moves = crate::assignment::plan(&current, partitions, &live);
    if moves.is_empty() {
        return Ok(());
    }
    let orphaned = moves.iter().filter(|(p, _)| current.get(p).is_none_or(|o| !live.contains(&o.node))).count();
    tracing::info!(moves = moves.len(), orphaned, live = ?live, "assigning partitions");
    metrics::counter!(signalops_core::telemetry::PARTITION_MOVES).increment(moves.len() as u64);
    raft.client_write(Command::AssignPartitions { moves }).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn reconcile_once(
    raft: &Raft,
    cfg: &MembershipConfig,
    peers: &Peers,
    view: &std::sync::RwLock<ControlView>,
) -> Result<(), String> {
    let (decommissioned, owning) = {
        let v = match view.read() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        let owning: BTreeSet<u64> = v.state.partitions.values().map(|o| o.node).collect();
        (v.state.decommissioned.clone(), owning)
    };
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let members: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
    // A decommissioned node leaves once its partitions have moved away.
    let leaving: BTreeSet<u64> =
        decommissioned.iter().filter(|id| members.contains(id) && !owning.contains(id)).copied().collect();
    if !leaving.is_empty() {
        tracing::info!(nodes = ?leaving, "removing decommissioned nodes from the cluster");
        let voting: BTreeSet<u64> = leaving.intersection(&voters).copied().collect();
        if !voting.is_empty() {
            raft.change_membership(ChangeMembers::RemoveVoters(voting), false).await.map_err(|e| e.to_string())?;
        }
        let learners: BTreeSet<u64> = leaving.difference(&voters).copied().collect();
        if !learners.is_empty() {
            raft.change_membership(ChangeMembers::RemoveNodes(learners), false).await.map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let live: BTreeMap<u64, Peer> =
        peers.live(cfg.node_timeout).into_iter().filter(|(id, _)| !decommissioned.contains(id)).collect();
    for (id, peer) in &live {
        if members.contains(id) {
            continue;
        }
        tracing::info!(node_id = id, url = %peer.url, "adding node to the cluster as a learner");
        // Waits until the learner has caught up with the log, so a promotion right after it
        // does not stall commits.
        raft.add_learner(*id, BasicNode::new(&peer.url), true).await.map_err(|e| e.to_string())?;
    }
    if voters.len() >= cfg.voters {
        return Ok(());
    }
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let promote: BTreeSet<u64> =
        membership.learner_ids().filter(|id| live.contains_key(id)).take(cfg.voters - voters.len()).collect();
    if promote.is_empty() {
        return Ok(());
    }
    tracing::info!(nodes = ?promote, "promoting learners to voters");
    raft.change_membership(ChangeMembers::AddVoterIds(promote), false).await.map_err(|e| e.to_string())?;
    Ok(())
}
