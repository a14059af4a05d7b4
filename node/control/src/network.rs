//! Raft RPC between nodes over NATS request/reply.
//!
//! Node `n` serves `signalops.raft.<n>.{append,vote,snapshot}`; bodies are MessagePack and a
//! reply is `Result<response, RaftError>`. It also serves `signalops.raft.<n>.write`, where the
//! other nodes forward control-plane writes while `n` leads ([`ForwardRequest`]). Using the NATS cluster the nodes already share means
//! no extra port or peer address book: a node id is enough to reach a peer.

use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use futures::StreamExt;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::state::{Command, CommandResult};
use crate::{Raft, TypeConfig};

type NodeId = u64;

/// A control-plane write a node forwards to the leader. `request` names it: a retried forward
/// is applied once and answered the same way.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ForwardRequest {
    pub request: Uuid,
    pub cmd: Command,
}

/// The leader's answer to a forwarded write.
#[derive(Debug, Serialize, serde::Deserialize)]
pub enum ForwardReply {
    /// Committed and applied on the leader at this log index, with this result.
    Applied { result: CommandResult, index: u64 },
    /// The receiver does not lead (any more); the leader it knows, if any.
    NotLeader { leader: Option<NodeId> },
    /// The write failed on the leader (storage, shutdown).
    Failed(String),
}

pub(crate) fn subject(node: NodeId, rpc: &str) -> String {
    format!("signalops.raft.{node}.{rpc}")
}

/// Creates a [`NatsPeer`] per target node.
#[derive(Clone)]
pub struct NatsNetwork {
    client: Client,
}

impl NatsNetwork {
    pub fn new(client: Client) -> Self {
        NatsNetwork { client }
    }
}

pub struct NatsPeer {
    client: Client,
    target: NodeId,
}

impl NatsPeer {
    async fn call<Req, Resp, E>(
        &self,
        rpc: &str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = rmp_serde::to_vec_named(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = self.client.request(subject(self.target, rpc), body.into());
        let reply = match tokio::time::timeout(ttl, request).await {
            Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(e)) => return Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(msg)) => msg,
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            rmp_serde::from_slice(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetworkFactory<TypeConfig> for NatsNetwork {
    type Network = NatsPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        NatsPeer { client: self.client.clone(), target }
    }
}

impl RaftNetwork<TypeConfig> for NatsPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}

/// Answers Raft RPCs addressed to this node until `cancel` fires.
pub async fn serve(client: Client, raft: Raft, node_id: NodeId, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut sub = client.subscribe(format!("signalops.raft.{node_id}.*")).await?;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            msg = sub.next() => match msg {
                Some(m) => m,
                None => anyhow::bail!("raft RPC subscription closed"),
            },
        };
        let raft = raft.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let Some(reply) = msg.reply.clone() else { return };
            let rpc = msg.subject.rsplit('.').next().unwrap_or_default();
            let body = match rpc {
                "append" => handle(&msg.payload, |req| async move { raft.append_entries(req).await }).await,
                "vote" => handle(&msg.payload, |req| async move { raft.vote(req).await }).await,
                "snapshot" => handle(&msg.payload, |req| async move { raft.install_snapshot(req).await }).await,
                "write" => handle(&msg.payload, |req: ForwardRequest| async move { write(&raft, req).await }).await,
                other => Err(anyhow::anyhow!("unknown raft rpc `{other}`")),
            };
            match body {
                Ok(bytes) => {
                    if let Err(e) = client.publish(reply, bytes.into()).await {
                        tracing::warn!(error = %e, "cannot send raft rpc reply");
                    }
                }
                Err(e) => tracing::warn!(error = %e, rpc, "bad raft rpc"),
            }
        });
    }
    Ok(())
}

async fn handle<Req, Resp, F, Fut>(payload: &[u8], f: F) -> anyhow::Result<Vec<u8>>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: std::future::Future<Output = Resp>,
{
    let req: Req = rmp_serde::from_slice(payload)?;
    let resp = f(req).await;
    Ok(rmp_serde::to_vec_named(&resp)?)
}

/// Applies a forwarded write if this node leads.
async fn write(raft: &Raft, req: ForwardRequest) -> ForwardReply {
    use openraft::error::{ClientWriteError, RaftError};
    let cmd = Command::Forwarded { request: req.request, cmd: Box::new(req.cmd) };
    match raft.client_write(cmd).await {
        Ok(resp) => ForwardReply::Applied { result: resp.data, index: resp.log_id.index },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            ForwardReply::NotLeader { leader: f.leader_id }
        }
        Err(e) => ForwardReply::Failed(e.to_string()),
    }
}
