//! The control plane: an openraft cluster whose replicated state machine holds tenants, API-key
//! digests, rules, silences, plugins and channels. A single node is a one-voter cluster; the
//! nodes of a cluster find each other over NATS ([`membership`]).
//!
//! Reads (key lookups on every request) go to the local state-machine view, which every node
//! updates as it applies the log: a revoked key stops working on a node as soon as that node
//! applies the revocation. Writes work on every node: a follower forwards them to the leader
//! ([`network::ForwardRequest`]) and answers once its own view has applied them, so what a
//! caller wrote on a node is what it reads there next.
//!
//! Uses `signalops-core`, `signalops-plugins`, `signalops-notify` and `signalops-rules` for the
//! records its state holds (plugins, channels, rule sets); the node crate above runs it.

pub mod assignment;
pub mod membership;
pub mod network;
pub mod state;
pub mod storage;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use signalops_core::model::TenantId;
use signalops_notify::channel::Channel;
use signalops_plugins::registry::Disabled;
use signalops_plugins::Digest;

use membership::{MembershipConfig, Peers};
use network::{ForwardReply, ForwardRequest};
use state::{Command, CommandResult, ControlView};

openraft::declare_raft_types!(
    /// Raft type configuration of the SignalOps control plane.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
);

pub type Raft = openraft::Raft<TypeConfig>;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open the raft store: {0}")]
    Store(#[from] redb::Error),
    #[error("raft storage: {0}")]
    Storage(#[from] openraft::StorageError<u64>),
    #[error("raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<u64>),
    #[error("invalid raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("cannot initialize the cluster: {0}")]
    Initialize(String),
    #[error("no raft leader elected within {0:?}")]
    NoLeader(Duration),
    #[error("no control-plane leader could take the write (last known leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("raft write failed: {0}")]
    Write(String),
    #[error("cannot serve raft rpc: {0}")]
    Rpc(#[from] async_nats::SubscribeError),
}

/// How long a forwarded write may take, retries included, before the caller gets a 503.
const FORWARD_DEADLINE: Duration = Duration::from_secs(10);
/// How long one forward waits for the leader's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle to the control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    raft: Raft,
    view: Arc<RwLock<ControlView>>,
    node_id: u64,
    nats: async_nats::Client,
    peers: Peers,
    cfg: Arc<MembershipConfig>,
    /// Partitions of the event stream (0 until the node has opened it): the leader assigns
    /// them once known.
    partitions: Arc<AtomicU32>,
}

/// A member of the cluster as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub id: u64,
    /// Its HTTP API, from its heartbeats (or from when it was added).
    pub url: Option<String>,
    /// `voter` or `learner` (a member that owns partitions but does not vote).
    pub role: &'static str,
    pub leader: bool,
    /// Milliseconds since this node last heard its heartbeat; `None` if never.
    pub last_heartbeat_ms_ago: Option<u64>,
    /// `alive` (heard within `cluster.node_timeout_ms`), `down`, or `leaving` (decommissioned;
    /// its partitions move away, then it leaves the membership).
    pub state: &'static str,
}

/// The cluster as this node sees it: what `GET /v1/admin/cluster` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// The node answering.
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// Whether the answering node is a member (voter or learner) and knows a leader.
    pub joined: bool,
    pub members: Vec<MemberView>,
    /// Nodes heard from that are not members yet (the leader is adding them).
    pub joining: Vec<MemberView>,
    /// Every partition of the event stream, with its owner.
    pub partitions: Vec<PartitionView>,
}

/// A partition and its owner.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub partition: u32,
    pub owner: Option<u64>,
    /// Grows with every move of the partition.
    pub epoch: u64,
    /// `active` (its owner is alive), `orphaned` (its owner is down; the leader moves it) or
    /// `unassigned`.
    pub state: &'static str,
}

impl ControlPlane {
    /// Opens the Raft store under `dir`, starts Raft with NATS as its network, and bootstraps
    /// the cluster if this node is a seed and Raft has no state yet. A lone seed (a single
    /// node) waits until it leads; in a larger cluster the node starts at once and joins as the
    /// others come ([`ControlPlane::joined`] tells when).
    pub async fn start(
        cfg: MembershipConfig,
        dir: &Path,
        nats: async_nats::Client,
        cancel: CancellationToken,
    ) -> Result<ControlPlane, ControlError> {
        let node_id = cfg.node_id;
        let db = storage::open_db(&dir.join("raft.redb"))?;
        let sm = storage::StateMachineStore::load(db.clone())?;
        let view = sm.view();
        let log = storage::LogStore::new(db);
        let config = openraft::Config {
            cluster_name: "signalops".into(),
            heartbeat_interval: 250,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_max_chunk_size: 256 * 1024,
            ..Default::default()
        }
        .validate()?;
        let network = network::NatsNetwork::new(nats.clone());
        let raft = openraft::Raft::new(node_id, Arc::new(config), network, log, sm).await?;

        let rpc_raft = raft.clone();
        let (rpc_nats, rpc_cancel) = (nats.clone(), cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = network::serve(rpc_nats, rpc_raft, node_id, rpc_cancel).await {
                tracing::error!(error = %e, "raft rpc server stopped");
            }
        });

        let peers = Peers::default();
        // Heard before bootstrapping, so the first leader adds the other nodes at once.
        let heartbeat = membership::heartbeats(nats.clone(), cfg.clone(), peers.clone(), cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = heartbeat.await {
                tracing::error!(error = %e, "cluster heartbeats stopped");
            }
        });
        if membership::bootstrap(&raft, &cfg).await.map_err(ControlError::Initialize)? {
            tracing::info!(node_id, seeds = ?cfg.seeds, "bootstrapped the control-plane cluster");
        } else if !cfg.seeds.contains(&node_id) && !raft.is_initialized().await? {
            tracing::info!(node_id, seeds = ?cfg.seeds, "waiting for the cluster's leader to add this node");
        }
        let partitions = Arc::new(AtomicU32::new(0));
        tokio::spawn(membership::reconcile(
            raft.clone(),
            cfg.clone(),
            peers.clone(),
            view.clone(),
            partitions.clone(),
            cancel.clone(),
        ));
        if cfg.seeds == [node_id] {
            let wait = Duration::from_secs(10);
            raft.wait(Some(wait))
                .metrics(|m| m.current_leader.is_some(), "a leader is elected")
                .await
                .map_err(|_| ControlError::NoLeader(wait))?;
        }
        Ok(ControlPlane { raft, view, node_id, nats, peers, cfg: Arc::new(cfg), partitions })
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Proposes a command and waits until it is committed and applied here. On a follower the
    /// command is forwarded to the leader (again to a new leader if the first one goes away),
    /// applied there once, and answered when this node has applied it too.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ControlError> {
        match self.raft.client_write(cmd.clone()).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => self.forward(cmd, f.leader_id).await,
            Err(e) => Err(ControlError::Write(e.to_string())),
        }
    }

    async fn forward(&self, cmd: Command, mut leader: Option<u64>) -> Result<CommandResult, ControlError> {
        let req = ForwardRequest { request: Uuid::new_v4(), cmd };
        let body: bytes::Bytes = rmp_serde::to_vec_named(&req)
            .map_err(|e| ControlError::Write(format!("cannot encode the forwarded write: {e}")))?
            .into();
        let deadline = tokio::time::Instant::now() + FORWARD_DEADLINE;
        loop {
            let reply = match leader {
                // Leading now (the leader changed meanwhile): write here, under the same request
                // id, so a forward that did reach the old leader is not applied twice.
                Some(id) if id == self.node_id => {
                    let cmd = Command::Forwarded { request: req.request, cmd: Box::new(req.cmd.clone()) };
                    match self.raft.client_write(cmd).await {
                        Ok(resp) => return Ok(resp.data),
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                            Some(ForwardReply::NotLeader { leader: f.leader_id })
                        }
                        Err(e) => return Err(ControlError::Write(e.to_string())),
                    }
                }
                Some(id) => {
                    let request = self.nats.request(network::subject(id, "write"), body.clone());
                    match tokio::time::timeout(FORWARD_TIMEOUT, request).await {
                        Ok(Ok(msg)) => rmp_serde::from_slice::<ForwardReply>(&msg.payload).ok(),
                        Ok(Err(e)) => {
                            tracing::debug!(leader = id, error = %e, "forwarded write not answered");
                            None
                        }
                        Err(_) => None,
                    }
                }
                None => None,
            };
            match reply {
                Some(ForwardReply::Applied { result, index }) => {
                    // Read-your-writes here: wait (briefly) until this node applied it too.
                    let wait = self.raft.wait(Some(Duration::from_secs(2)));
                    if wait.applied_index_at_least(Some(index), "forwarded write applied").await.is_err() {
                        tracing::warn!(index, "forwarded write committed but not yet applied on this node");
                    }
                    return Ok(result);
                }
                Some(ForwardReply::Failed(e)) => return Err(ControlError::Write(e)),
                Some(ForwardReply::NotLeader { leader: Some(l) }) if Some(l) != leader => {
                    leader = Some(l);
                    continue;
                }
                _ => {}
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(ControlError::NotLeader { leader });
            }
            // No answer or no leader: wait for one (an election in progress), then try again.
            let known = leader;
            let _ = self
                .raft
                .wait(Some(remaining.min(Duration::from_millis(500))))
                .metrics(|m| m.current_leader.is_some() && m.current_leader != known, "a new leader")
                .await;
            leader = self.raft.metrics().borrow().current_leader;
        }
    }

    /// The applied control-plane state, for reads.
    pub fn read(&self) -> RwLockReadGuard<'_, ControlView> {
        match self.view.read() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// True while this node knows a leader (used by readiness).
    pub fn has_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }

    /// True while this node is the Raft leader (it runs the singleton tasks).
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Decommissions a member: its partitions move to the other live members, then it leaves
    /// the membership (a voter's place goes to a learner, if there is one). `false` when `node`
    /// is not a member.
    pub async fn decommission(&self, node: u64) -> Result<bool, ControlError> {
        if !self.is_member(node) {
            return Ok(false);
        }
        self.propose(Command::DecommissionNode { node }).await?;
        Ok(true)
    }

    /// Tells the control plane how many partitions the event stream has; the leader assigns
    /// them from then on.
    pub fn set_partitions(&self, count: u32) {
        self.partitions.store(count, Ordering::Relaxed);
    }

    /// The partitions this node owns, with their epochs: none once it is no longer a member
    /// (decommissioned), even if it never applied the moves of its last partitions.
    pub fn owned_partitions(&self) -> BTreeMap<u32, u64> {
        if !self.is_member(self.node_id) {
            return BTreeMap::new();
        }
        self.read().partitions_of(self.node_id)
    }

    /// True while this node is a member of the cluster (voter or learner) and knows a leader.
    pub fn joined(&self) -> bool {
        let has_leader = self.raft.metrics().borrow().current_leader.is_some();
        has_leader && self.is_member(self.node_id)
    }

    /// Whether `node` is in the membership this node knows (voter or learner).
    fn is_member(&self, node: u64) -> bool {
        self.raft.metrics().borrow().membership_config.membership().nodes().any(|(id, _)| *id == node)
    }

    /// The members, their roles and liveness, as this node sees them.
    pub fn cluster(&self) -> ClusterView {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let heard = self.peers.snapshot();
        let leaving = self.read().state.decommissioned.clone();
        let now = std::time::Instant::now();
        let member = |id: u64, addr: Option<&str>, role: &'static str| {
            let peer = heard.get(&id);
            let ago = peer.map(|p| now.duration_since(p.last_seen));
            MemberView {
                id,
                url: peer.map(|p| p.url.clone()).or_else(|| addr.filter(|a| !a.is_empty()).map(str::to_string)),
                role,
                leader: m.current_leader == Some(id),
                last_heartbeat_ms_ago: ago.map(|d| d.as_millis() as u64),
                state: if leaving.contains(&id) {
                    "leaving"
                } else if ago.is_some_and(|d| d <= self.cfg.node_timeout) {
                    "alive"
                } else {
                    "down"
                },
            }
        };
        let members: Vec<MemberView> = membership
            .nodes()
            .map(|(id, node)| {
                member(*id, Some(node.addr.as_str()), if voters.contains(id) { "voter" } else { "learner" })
            })
            .collect();
        let joining = heard
            .keys()
            .filter(|id| !members.iter().any(|mv| mv.id == **id))
            .map(|id| member(*id, None, "joining"))
            .collect();
        let assigned = self.read().state.partitions.clone();
        let partitions = (0..self.partitions.load(Ordering::Relaxed))
            .map(|p| match assigned.get(&p) {
                Some(o) => {
                    let alive = members.iter().any(|mv| mv.id == o.node && mv.state == "alive");
                    PartitionView {
                        partition: p,
                        owner: Some(o.node),
                        epoch: o.epoch,
                        state: if alive { "active" } else { "orphaned" },
                    }
                }
                None => PartitionView { partition: p, owner: None, epoch: 0, state: "unassigned" },
            })
            .collect();
        ClusterView {
            node_id: self.node_id,
            leader: m.current_leader,
            term: m.current_term,
            joined: self.joined(),
            members,
            joining,
            partitions,
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// The delivery worker's view of the control plane: channels and notifier plugins from this
/// node's state machine, channel disabling through Raft.
#[async_trait::async_trait]
impl signalops_notify::worker::Directory for ControlPlane {
    fn channel(&self, tenant: TenantId, id: &Uuid) -> Option<Channel> {
        self.read().channel(tenant, id).cloned()
    }

    fn notifier(&self, tenant: TenantId, plugin: &str, version: Option<&str>) -> Result<(Uuid, Digest), String> {
        signalops_notify::worker::find_notifier(self.read().plugins_of(tenant), plugin, version)
    }

    async fn set_channel_disabled(
        &self,
        tenant: TenantId,
        channel: Uuid,
        disabled: Option<Disabled>,
    ) -> Result<(), String> {
        let cmd = Command::SetChannelDisabled { tenant_id: tenant, channel_id: channel, disabled };
        self.propose(cmd).await.map(|_| ()).map_err(|e| e.to_string())
    }
}
