//! The control plane: an openraft cluster whose replicated state machine holds tenants and
//! API-key digests. `dev` runs a one-node cluster; more nodes join the same cluster later
//! (membership changes through [`openraft::Raft::add_learner`] / `change_membership`).
//!
//! Reads (key lookups on every request) go to the local state-machine view, which every node
//! updates as it applies the log: a revoked key stops working on a node as soon as that node
//! applies the revocation.
//!
//! Uses `signalops-core`, `signalops-plugins`, `signalops-notify` and `signalops-rules` for the
//! records its state holds (plugins, channels, rule sets); the node crate above runs it.

pub mod network;
pub mod state;
pub mod storage;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use signalops_core::model::TenantId;
use signalops_notify::channel::Channel;
use signalops_plugins::registry::Disabled;
use signalops_plugins::Digest;

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
    #[error("this node is not the raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("raft write failed: {0}")]
    Write(String),
    #[error("cannot serve raft rpc: {0}")]
    Rpc(#[from] async_nats::SubscribeError),
}

/// Handle to the control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    raft: Raft,
    view: Arc<RwLock<ControlView>>,
    node_id: u64,
}

impl ControlPlane {
    /// Opens the Raft store under `dir`, starts Raft with NATS as its network, bootstraps a
    /// one-node cluster on first start, and waits until this node leads.
    pub async fn start(
        node_id: u64,
        dir: &Path,
        nats: async_nats::Client,
        cancel: CancellationToken,
    ) -> Result<ControlPlane, ControlError> {
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
        tokio::spawn(async move {
            if let Err(e) = network::serve(nats, rpc_raft, node_id, cancel).await {
                tracing::error!(error = %e, "raft rpc server stopped");
            }
        });

        if !raft.is_initialized().await? {
            let mut members = BTreeMap::new();
            members.insert(node_id, BasicNode::default());
            raft.initialize(members).await.map_err(|e| ControlError::Initialize(e.to_string()))?;
            tracing::info!(node_id, "bootstrapped a one-node control-plane cluster");
        }
        let wait = Duration::from_secs(10);
        raft.wait(Some(wait))
            .metrics(|m| m.current_leader.is_some(), "a leader is elected")
            .await
            .map_err(|_| ControlError::NoLeader(wait))?;
        Ok(ControlPlane { raft, view, node_id })
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Proposes a command and waits until it is committed and applied here.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ControlError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ControlError::NotLeader { leader: f.leader_id })
            }
            Err(e) => Err(ControlError::Write(e.to_string())),
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
