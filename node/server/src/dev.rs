//! First-start set-up of `signalops dev`: a dev tenant, its API key and an operator token,
//! kept in `<data-dir>/dev-credentials.json` so restarts reuse them.

use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use signalops_control::state::TenantLimits;
use signalops_control::ControlPlane;

use crate::api::admin::create_tenant_with_key;
use crate::auth::{digest, generate_admin_token};

pub const CREDENTIALS_FILE: &str = "dev-credentials.json";
const DEV_TENANT: &str = "dev";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevCredentials {
    pub tenant_id: Uuid,
    pub api_key: String,
    pub admin_token: String,
}

/// Reads the credentials file, or creates the dev tenant and writes it.
pub async fn ensure(
    control: &ControlPlane,
    data_dir: &Path,
    configured_admin: Option<&str>,
) -> anyhow::Result<DevCredentials> {
    let path = data_dir.join(CREDENTIALS_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let mut creds: DevCredentials =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not valid: {e}", path.display()))?;
        let valid = {
            let view = control.read();
            view.key_by_digest(&digest(&creds.api_key)).is_some_and(|k| k.tenant_id == creds.tenant_id)
        };
        if !valid {
            anyhow::bail!(
                "{} names a tenant or key the control plane does not have (revoked, or a different data dir); remove the file to create new credentials",
                path.display()
            );
        }
        if let Some(admin) = configured_admin {
            creds.admin_token = admin.to_string();
        }
        return Ok(creds);
    }
    let (tenant, api_key) = create_tenant_with_key(control, DEV_TENANT, TenantLimits::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the dev tenant: {e}"))?;
    let admin_token = configured_admin.map(str::to_string).unwrap_or_else(generate_admin_token);
    let creds = DevCredentials { tenant_id: tenant.id, api_key, admin_token };
    write_private(&path, &serde_json::to_vec_pretty(&creds)?)?;
    Ok(creds)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
