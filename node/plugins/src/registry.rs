//! Plugin metadata as the control plane replicates it. Module bytes live in the JetStream
//! object store (bucket [`OBJECT_BUCKET`], object `<tenant>/<sha256>`); every node compiles
//! them into its own cache.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use signalops_core::model::TenantId;

/// The JetStream object store bucket holding module bytes.
pub const OBJECT_BUCKET: &str = "SIGNALOPS_PLUGINS";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// Exports `evaluate`: decides whether a rule fires for an event.
    Rule,
    /// Exports `render`: turns an alert notification into an HTTP request (a `plugin` channel).
    Notifier,
}

/// One uploaded module of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginVersion {
    /// The first 16 hex digits of the module's SHA-256: versions are content addressed.
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub uploaded_at_ms: i64,
}

/// Why a plugin's rules are not evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    pub reason: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub name: String,
    pub kind: PluginKind,
    /// Oldest first; the last is the newest.
    pub versions: Vec<PluginVersion>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<Disabled>,
}

impl PluginRecord {
    /// The named version, or the newest.
    pub fn version(&self, v: Option<&str>) -> Option<&PluginVersion> {
        match v {
            None => self.versions.last(),
            Some(v) => self.versions.iter().find(|x| x.version == v || x.sha256 == v),
        }
    }
}

/// The object name of a module.
pub fn object_name(tenant: TenantId, sha256: &str) -> String {
    format!("{tenant}/{sha256}")
}

/// Parses a hex SHA-256.
pub fn parse_digest(hex_digest: &str) -> Option<crate::Digest> {
    let bytes = hex::decode(hex_digest).ok()?;
    bytes.try_into().ok()
}
