//! The control-plane state the Raft log replicates: tenants, API-key digests, rules (every
//! version) and silences (plugins, channels and partition ownership join it with their
//! features).
//!
//! Commands carry every generated value (ids, timestamps, digests) so applying them is
//! deterministic on every node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use signalops_core::alert::Silence;
use signalops_core::model::TenantId;
use signalops_core::partition::partition_of;
use signalops_notify::channel::{Channel, ChannelSpec, SigningSecret, Target};
use signalops_plugins::registry::{Disabled, PluginKind, PluginRecord, PluginVersion};
use signalops_rules::compiled::{Rule, RuleSet, TenantRules};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// A new rule (version 1) or a new version of one (`version` = current + 1).
    PutRule {
        rule: Box<Rule>,
        /// Most rules the tenant may have (checked when creating).
        max_rules: usize,
    },
    DeleteRule {
        tenant_id: TenantId,
        rule_id: Uuid,
    },
    PutSilence {
        silence: Box<Silence>,
    },
    DeleteSilence {
        tenant_id: TenantId,
        silence_id: Uuid,
    },
    /// A module uploaded as plugin `name`: a new plugin (with `new_id`), a new version of the
    /// tenant's plugin of that name, or nothing new when that plugin already has this module.
    AddPluginVersion {
        tenant_id: TenantId,
        name: String,
        kind: PluginKind,
        new_id: Uuid,
        version: PluginVersion,
        max_plugins: usize,
    },
    /// Refused while a rule of the tenant uses the plugin.
    DeletePlugin {
        tenant_id: TenantId,
        plugin_id: Uuid,
    },
    /// Disables (with a reason) or re-enables a plugin's rules.
    SetPluginDisabled {
        tenant_id: TenantId,
        plugin_id: Uuid,
        disabled: Option<Disabled>,
    },
    CreateChannel {
        channel: Box<Channel>,
        max_channels: usize,
    },
    /// Replaces a channel's definition; its secrets and status stay.
    UpdateChannel {
        tenant_id: TenantId,
        channel_id: Uuid,
        spec: Box<ChannelSpec>,
        at_ms: i64,
    },
    /// Refused while a rule of the tenant delivers to the channel.
    DeleteChannel {
        tenant_id: TenantId,
        channel_id: Uuid,
    },
    /// A new current signing secret; the previous one stays valid until `previous_expires_at_ms`.
    RotateChannelSecret {
        tenant_id: TenantId,
        channel_id: Uuid,
        secret: String,
        previous_expires_at_ms: i64,
        at_ms: i64,
    },
    /// Disables (with a reason) or re-enables a channel.
    SetChannelDisabled {
        tenant_id: TenantId,
        channel_id: Uuid,
        disabled: Option<Disabled>,
    },
    /// Partition owners chosen by the leader's balancer: each move gives the partition to
    /// `node` with the next epoch.
    AssignPartitions {
        moves: Vec<(u32, u64)>,
    },
    /// An operator takes a node out of the cluster: the leader moves its partitions to the
    /// others, then removes it from the membership; it is not added again.
    DecommissionNode {
        node: u64,
    },
    /// A command another node forwarded to the leader. Applied once per `request` however often
    /// the forward is retried; a repeat answers what the first application did.
    Forwarded {
        request: Uuid,
        cmd: Box<Command>,
    },
}

/// Which node owns a partition. The epoch grows with every move, so an owner can tell it was
/// deposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOwner {
    pub node: u64,
    pub epoch: u64,
}

/// How many forwarded requests the state remembers (for retried forwards); the oldest go first.
pub const FORWARDED_KEPT: usize = 10_000;

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Done,
    TenantNameTaken,
    TenantNotFound,
    KeyNotFound,
    KeyIdTaken,
    RuleNotFound,
    /// The rule changed meanwhile: its current version is this one.
    RuleVersionConflict(u32),
    RuleLimit(usize),
    SilenceNotFound,
    /// The plugin a version was added to (or that already had it).
    PluginStored(Uuid),
    PluginNotFound,
    PluginLimit(usize),
    /// A plugin of this name exists with another kind.
    PluginKindConflict,
    /// Rules that still use the plugin.
    PluginInUse(Vec<Uuid>),
    /// Channels that still render with the (notifier) plugin.
    PluginUsedByChannels(Vec<Uuid>),
    ChannelNotFound,
    ChannelLimit(usize),
    ChannelNameTaken,
    /// Rules that still deliver to the channel.
    ChannelInUse(Vec<Uuid>),
}

/// The replicated state, serialized whole into snapshots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlState {
    pub tenants: BTreeMap<TenantId, Tenant>,
    pub keys: BTreeMap<String, ApiKey>,
    /// Rule id → every version, oldest first (the last one is current).
    #[serde(default)]
    pub rules: BTreeMap<Uuid, Vec<Rule>>,
    #[serde(default)]
    pub silences: BTreeMap<Uuid, Silence>,
    #[serde(default)]
    pub plugins: BTreeMap<Uuid, PluginRecord>,
    #[serde(default)]
    pub channels: BTreeMap<Uuid, Channel>,
    /// Forwarded requests already applied and what they answered, oldest first (at most
    /// [`FORWARDED_KEPT`]); in snapshots too, so a retry after a snapshot is still recognised.
    #[serde(default)]
    pub forwarded: std::collections::VecDeque<(Uuid, CommandResult)>,
    /// The owner of each assigned partition.
    #[serde(default)]
    pub partitions: BTreeMap<u32, PartitionOwner>,
    /// Nodes being (or already) decommissioned: they get no partitions and leave the membership.
    #[serde(default)]
    pub decommissioned: std::collections::BTreeSet<u64>,
}

/// The state plus lookup indexes derived from it (rebuilt, never replicated).
#[derive(Debug, Default)]
pub struct ControlView {
    pub state: ControlState,
    by_digest: HashMap<String, String>,
    /// Compiled rules and silences per tenant (tenants with any).
    compiled: HashMap<TenantId, Arc<TenantRules>>,
    /// Bumped whenever any tenant's rules or silences change.
    rules_revision: u64,
}

impl ControlView {
    pub fn from_state(state: ControlState) -> Self {
        let by_digest = state.keys.values().map(|k| (k.digest.clone(), k.key_id.clone())).collect();
        let mut view = ControlView { state, by_digest, compiled: HashMap::new(), rules_revision: 1 };
        let tenants: std::collections::BTreeSet<TenantId> = view
            .state
            .rules
            .values()
            .filter_map(|v| v.last().map(|r| r.tenant_id))
            .chain(view.state.silences.values().map(|s| s.tenant_id))
            .collect();
        for t in tenants {
            view.recompile(t);
        }
        view
    }

    fn recompile(&mut self, tenant: TenantId) {
        let silences: Vec<Silence> = self.state.silences.values().filter(|s| s.tenant_id == tenant).cloned().collect();
        let compiled = TenantRules::build(&self.state.rules, &self.state.plugins, tenant, silences);
        if compiled.rules.is_empty() && compiled.silences.is_empty() {
            self.compiled.remove(&tenant);
        } else {
            self.compiled.insert(tenant, Arc::new(compiled));
        }
        self.rules_revision += 1;
    }

    pub fn rules_revision(&self) -> u64 {
        self.rules_revision
    }

    /// The compiled rules of the tenants in one partition.
    pub fn rule_set(&self, partition: u32, partitions: u32) -> RuleSet {
        let tenants = self
            .compiled
            .iter()
            .filter(|(t, c)| !c.rules.is_empty() && partition_of(t, partitions) == partition)
            .map(|(t, c)| (*t, c.clone()))
            .collect();
        RuleSet { revision: self.rules_revision, tenants }
    }

    /// The partitions `node` owns, with their epochs.
    pub fn partitions_of(&self, node: u64) -> BTreeMap<u32, u64> {
        self.state.partitions.iter().filter(|(_, o)| o.node == node).map(|(p, o)| (*p, o.epoch)).collect()
    }

    /// The current version of a tenant's rule.
    pub fn rule(&self, tenant: TenantId, id: &Uuid) -> Option<&Rule> {
        self.state.rules.get(id).and_then(|v| v.last()).filter(|r| r.tenant_id == tenant)
    }

    /// Every version of a tenant's rule, oldest first.
    pub fn rule_versions(&self, tenant: TenantId, id: &Uuid) -> Option<&[Rule]> {
        self.state.rules.get(id).filter(|v| v.last().is_some_and(|r| r.tenant_id == tenant)).map(|v| v.as_slice())
    }

    /// The tenant's rules (current versions), by id.
    pub fn rules_of(&self, tenant: TenantId) -> Vec<&Rule> {
        self.state.rules.values().filter_map(|v| v.last()).filter(|r| r.tenant_id == tenant).collect()
    }

    /// A tenant's plugin, by id.
    pub fn plugin(&self, tenant: TenantId, id: &Uuid) -> Option<&PluginRecord> {
        self.state.plugins.get(id).filter(|p| p.tenant_id == tenant)
    }

    pub fn plugins_of(&self, tenant: TenantId) -> Vec<&PluginRecord> {
        self.state.plugins.values().filter(|p| p.tenant_id == tenant).collect()
    }

    pub fn plugins(&self) -> &signalops_rules::compiled::Plugins {
        &self.state.plugins
    }

    /// The tenant's rules (current versions) that use a plugin.
    pub fn rules_using(&self, tenant: TenantId, plugin: &PluginRecord) -> Vec<Uuid> {
        self.rules_of(tenant)
            .into_iter()
            .filter(|r| r.spec.plugin.as_ref().is_some_and(|p| p.id == plugin.name || p.id == plugin.id.to_string()))
            .map(|r| r.id)
            .collect()
    }

    /// A tenant's channel, by id.
    pub fn channel(&self, tenant: TenantId, id: &Uuid) -> Option<&Channel> {
        self.state.channels.get(id).filter(|c| c.tenant_id == tenant)
    }

    pub fn channels_of(&self, tenant: TenantId) -> Vec<&Channel> {
        self.state.channels.values().filter(|c| c.tenant_id == tenant).collect()
    }

    /// The tenant's rules (current versions) with an action delivering to the channel.
    pub fn rules_delivering_to(&self, tenant: TenantId, channel: &Uuid) -> Vec<Uuid> {
        let id = channel.to_string();
        self.rules_of(tenant)
            .into_iter()
            .filter(|r| r.spec.actions.iter().any(|a| a.get("channel_id").and_then(|c| c.as_str()) == Some(&id)))
            .map(|r| r.id)
            .collect()
    }

    /// The tenant's `plugin` channels that render with a notifier plugin.
    pub fn channels_using(&self, tenant: TenantId, plugin: &PluginRecord) -> Vec<Uuid> {
        let id = plugin.id.to_string();
        self.channels_of(tenant)
            .into_iter()
            .filter(|c| matches!(&c.target, Target::Plugin { plugin: p, .. } if *p == plugin.name || *p == id))
            .map(|c| c.id)
            .collect()
    }

    pub fn silences_of(&self, tenant: TenantId) -> Vec<&Silence> {
        self.state.silences.values().filter(|s| s.tenant_id == tenant).collect()
    }

    /// The live (unrevoked) key with this digest, and its tenant.
    pub fn key_by_digest(&self, digest: &str) -> Option<&ApiKey> {
        let key = self.state.keys.get(self.by_digest.get(digest)?)?;
        (key.revoked_at_ms.is_none()).then_some(key)
    }

    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::DecommissionNode { node } => {
                self.state.decommissioned.insert(*node);
                CommandResult::Done
            }
            Command::AssignPartitions { moves } => {
                for (partition, node) in moves {
                    let epoch = self.state.partitions.get(partition).map_or(0, |o| o.epoch) + 1;
                    self.state.partitions.insert(*partition, PartitionOwner { node: *node, epoch });
                }
                CommandResult::Done
            }
            Command::Forwarded { request, cmd } => {
                if let Some((_, done)) = self.state.forwarded.iter().find(|(r, _)| r == request) {
                    return done.clone();
                }
                let result = self.apply(cmd);
                self.state.forwarded.push_back((*request, result.clone()));
                while self.state.forwarded.len() > FORWARDED_KEPT {
                    self.state.forwarded.pop_front();
                }
                result
            }
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
            Command::PutRule { rule, max_rules } => {
                if !self.state.tenants.contains_key(&rule.tenant_id) {
                    return CommandResult::TenantNotFound;
                }
                match self.state.rules.get_mut(&rule.id) {
                    None => {
                        if rule.version != 1 {
                            return CommandResult::RuleNotFound;
                        }
                        let count = self
                            .state
                            .rules
                            .values()
                            .filter(|v| v.last().is_some_and(|r| r.tenant_id == rule.tenant_id))
                            .count();
                        if count >= *max_rules {
                            return CommandResult::RuleLimit(*max_rules);
                        }
                        self.state.rules.insert(rule.id, vec![(**rule).clone()]);
                    }
                    Some(versions) => {
                        let Some(current) = versions.last() else { return CommandResult::RuleNotFound };
                        if current.tenant_id != rule.tenant_id {
                            return CommandResult::RuleNotFound;
                        }
                        if current.version + 1 != rule.version {
                            return CommandResult::RuleVersionConflict(current.version);
                        }
                        versions.push((**rule).clone());
                    }
                }
                self.recompile(rule.tenant_id);
                CommandResult::Done
            }
            Command::DeleteRule { tenant_id, rule_id } => {
                if self.rule(*tenant_id, rule_id).is_none() {
                    return CommandResult::RuleNotFound;
                }
                self.state.rules.remove(rule_id);
                self.recompile(*tenant_id);
                CommandResult::Done
            }
            Command::PutSilence { silence } => {
                if !self.state.tenants.contains_key(&silence.tenant_id) {
                    return CommandResult::TenantNotFound;
                }
                self.state.silences.insert(silence.id, (**silence).clone());
                self.recompile(silence.tenant_id);
                CommandResult::Done
            }
            Command::DeleteSilence { tenant_id, silence_id } => {
                match self.state.silences.get(silence_id) {
                    Some(s) if s.tenant_id == *tenant_id => {}
                    _ => return CommandResult::SilenceNotFound,
                }
                self.state.silences.remove(silence_id);
                self.recompile(*tenant_id);
                CommandResult::Done
            }
            Command::AddPluginVersion { tenant_id, name, kind, new_id, version, max_plugins } => {
                if !self.state.tenants.contains_key(tenant_id) {
                    return CommandResult::TenantNotFound;
                }
                let existing = self.state.plugins.values_mut().find(|p| p.tenant_id == *tenant_id && p.name == *name);
                let id = match existing {
                    Some(p) => {
                        if p.kind != *kind {
                            return CommandResult::PluginKindConflict;
                        }
                        if p.versions.iter().any(|v| v.sha256 == version.sha256) {
                            return CommandResult::PluginStored(p.id);
                        }
                        p.versions.push(version.clone());
                        p.id
                    }
                    None => {
                        let count = self.state.plugins.values().filter(|p| p.tenant_id == *tenant_id).count();
                        if count >= *max_plugins {
                            return CommandResult::PluginLimit(*max_plugins);
                        }
                        self.state.plugins.insert(
                            *new_id,
                            PluginRecord {
                                id: *new_id,
                                tenant_id: *tenant_id,
                                name: name.clone(),
                                kind: *kind,
                                versions: vec![version.clone()],
                                created_at_ms: version.uploaded_at_ms,
                                disabled: None,
                            },
                        );
                        *new_id
                    }
                };
                self.recompile(*tenant_id);
                CommandResult::PluginStored(id)
            }
            Command::DeletePlugin { tenant_id, plugin_id } => {
                let Some(p) = self.plugin(*tenant_id, plugin_id) else { return CommandResult::PluginNotFound };
                let users = self.rules_using(*tenant_id, p);
                if !users.is_empty() {
                    return CommandResult::PluginInUse(users);
                }
                let channels = self.channels_using(*tenant_id, p);
                if !channels.is_empty() {
                    return CommandResult::PluginUsedByChannels(channels);
                }
                self.state.plugins.remove(plugin_id);
                self.recompile(*tenant_id);
                CommandResult::Done
            }
            Command::SetPluginDisabled { tenant_id, plugin_id, disabled } => {
                match self.state.plugins.get_mut(plugin_id) {
                    Some(p) if p.tenant_id == *tenant_id => p.disabled = disabled.clone(),
                    _ => return CommandResult::PluginNotFound,
                }
                self.recompile(*tenant_id);
                CommandResult::Done
            }
            Command::CreateChannel { channel, max_channels } => {
                if !self.state.tenants.contains_key(&channel.tenant_id) {
                    return CommandResult::TenantNotFound;
                }
                let mine = self.channels_of(channel.tenant_id);
                if mine.iter().any(|c| c.name == channel.name) {
                    return CommandResult::ChannelNameTaken;
                }
                if mine.len() >= *max_channels {
                    return CommandResult::ChannelLimit(*max_channels);
                }
                self.state.channels.insert(channel.id, (**channel).clone());
                CommandResult::Done
            }
            Command::UpdateChannel { tenant_id, channel_id, spec, at_ms } => {
                let taken = self.channels_of(*tenant_id).iter().any(|c| c.name == spec.name && c.id != *channel_id);
                match self.state.channels.get_mut(channel_id) {
                    Some(c) if c.tenant_id == *tenant_id => {
                        if taken {
                            return CommandResult::ChannelNameTaken;
                        }
                        c.name = spec.name.clone();
                        c.target = spec.target.clone();
                        c.delivery = spec.delivery.clone();
                        c.updated_at_ms = *at_ms;
                        CommandResult::Done
                    }
                    _ => CommandResult::ChannelNotFound,
                }
            }
            Command::DeleteChannel { tenant_id, channel_id } => {
                if self.channel(*tenant_id, channel_id).is_none() {
                    return CommandResult::ChannelNotFound;
                }
                let users = self.rules_delivering_to(*tenant_id, channel_id);
                if !users.is_empty() {
                    return CommandResult::ChannelInUse(users);
                }
                self.state.channels.remove(channel_id);
                CommandResult::Done
            }
            Command::RotateChannelSecret { tenant_id, channel_id, secret, previous_expires_at_ms, at_ms } => {
                match self.state.channels.get_mut(channel_id) {
                    Some(c) if c.tenant_id == *tenant_id => {
                        // Only the secret being replaced stays valid, for its grace period.
                        let previous = c.secrets.first().map(|s| SigningSecret {
                            secret: s.secret.clone(),
                            expires_at_ms: Some(*previous_expires_at_ms),
                        });
                        c.secrets = std::iter::once(SigningSecret { secret: secret.clone(), expires_at_ms: None })
                            .chain(previous)
                            .collect();
                        c.updated_at_ms = *at_ms;
                        CommandResult::Done
                    }
                    _ => CommandResult::ChannelNotFound,
                }
            }
            Command::SetChannelDisabled { tenant_id, channel_id, disabled } => {
                match self.state.channels.get_mut(channel_id) {
                    Some(c) if c.tenant_id == *tenant_id => {
                        c.disabled = disabled.clone();
                        CommandResult::Done
                    }
                    _ => CommandResult::ChannelNotFound,
                }
            }
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
