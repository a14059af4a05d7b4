//! The control-plane state the Raft log replicates: tenants and API-key digests (rules,
//! plugins, channels and partition ownership join it with their features).
//!
//! Commands carry every generated value (ids, timestamps, digests) so applying them is
//! deterministic on every node.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::TenantId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TenantLimits {
    /// Sustained ingest rate in events per second; `None` uses the node default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_per_second: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub limits: TenantLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// The key's visible prefix (`so_<key_id>_...`), also its id in the API.
    pub key_id: String,
    pub tenant_id: TenantId,
    /// SHA-256 of the whole key, hex. The key itself is never stored.
    pub digest: String,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
}

/// A change to the control plane, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A tenant with its first API key, created together.
    CreateTenant {
        tenant: Tenant,
        key: ApiKey,
    },
    CreateApiKey {
        key: ApiKey,
    },
    RevokeApiKey {
        tenant_id: TenantId,
        key_id: String,
        at_ms: i64,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Done,
    TenantNameTaken,
    TenantNotFound,
    KeyNotFound,
    KeyIdTaken,
}

/// The replicated state, serialized whole into snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub tenants: BTreeMap<TenantId, Tenant>,
    pub keys: BTreeMap<String, ApiKey>,
}

/// The state plus lookup indexes derived from it (rebuilt, never replicated).
#[derive(Debug, Default)]
pub struct ControlView {
    pub state: ControlState,
    by_digest: HashMap<String, String>,
}

impl ControlView {
    pub fn from_state(state: ControlState) -> Self {
        let by_digest = state.keys.values().map(|k| (k.digest.clone(), k.key_id.clone())).collect();
        ControlView { state, by_digest }
    }

    /// The live (unrevoked) key with this digest, and its tenant.
    pub fn key_by_digest(&self, digest: &str) -> Option<&ApiKey> {
        let key = self.state.keys.get(self.by_digest.get(digest)?)?;
        (key.revoked_at_ms.is_none()).then_some(key)
    }

    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::CreateTenant { tenant, key } => {
                if self.state.tenants.values().any(|t| t.name == tenant.name) {
                    return CommandResult::TenantNameTaken;
                }
                if self.state.keys.contains_key(&key.key_id) {
                    return CommandResult::KeyIdTaken;
                }
                self.state.tenants.insert(tenant.id, tenant.clone());
                self.insert_key(key.clone());
                CommandResult::Done
            }
            Command::CreateApiKey { key } => {
                if !self.state.tenants.contains_key(&key.tenant_id) {
                    return CommandResult::TenantNotFound;
                }
                if self.state.keys.contains_key(&key.key_id) {
                    return CommandResult::KeyIdTaken;
                }
                self.insert_key(key.clone());
                CommandResult::Done
            }
            Command::RevokeApiKey { tenant_id, key_id, at_ms } => match self.state.keys.get_mut(key_id) {
                Some(k) if k.tenant_id == *tenant_id => {
                    if k.revoked_at_ms.is_none() {
                        k.revoked_at_ms = Some(*at_ms);
                    }
                    CommandResult::Done
                }
                _ => CommandResult::KeyNotFound,
            },
        }
    }

    fn insert_key(&mut self, key: ApiKey) {
        self.by_digest.insert(key.digest.clone(), key.key_id.clone());
        self.state.keys.insert(key.key_id.clone(), key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn key(id: &str, tenant: TenantId, digest: &str) -> ApiKey {
        ApiKey { key_id: id.into(), tenant_id: tenant, digest: digest.into(), created_at_ms: 1, revoked_at_ms: None }
    }

    #[test]
    fn revoke_hides_key_and_is_tenant_scoped() {
        let t = Uuid::now_v7();
        let other = Uuid::now_v7();
        let mut v = ControlView::default();
        let tenant = Tenant { id: t, name: "acme".into(), created_at_ms: 1, limits: Default::default() };
        assert_eq!(
            v.apply(&Command::CreateTenant { tenant: tenant.clone(), key: key("k1", t, "d1") }),
            CommandResult::Done
        );
        assert_eq!(
            v.apply(&Command::CreateTenant { tenant: Tenant { id: other, ..tenant }, key: key("k2", other, "d2") }),
            CommandResult::TenantNameTaken
        );
        assert_eq!(v.key_by_digest("d1").map(|k| k.tenant_id), Some(t));
        let wrong = Command::RevokeApiKey { tenant_id: other, key_id: "k1".into(), at_ms: 2 };
        assert_eq!(v.apply(&wrong), CommandResult::KeyNotFound);
        assert!(v.key_by_digest("d1").is_some());
        let revoke = Command::RevokeApiKey { tenant_id: t, key_id: "k1".into(), at_ms: 2 };
        assert_eq!(v.apply(&revoke), CommandResult::Done);
        assert!(v.key_by_digest("d1").is_none());
        // Rebuilding the view from the replicated state gives the same answers.
        let rebuilt = ControlView::from_state(v.state.clone());
        assert!(rebuilt.key_by_digest("d1").is_none());
    }
}
