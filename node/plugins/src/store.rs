//! Module bytes in the JetStream object store, and loading them into a node's compiled-module
//! cache: the uploading node compiles at upload; other nodes (and a restarted node) compile
//! when a rule set that uses the module reaches them, before its rules are evaluated.

use std::sync::Arc;

use async_nats::jetstream::{self, object_store};
use tokio::io::AsyncReadExt;

use signalops_core::model::TenantId;

use crate::registry::{object_name, OBJECT_BUCKET};
use crate::runtime::{digest_hex, Digest, PluginRuntime};

#[derive(Clone)]
pub struct ModuleStore {
    bucket: object_store::ObjectStore,
}

impl std::fmt::Debug for ModuleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModuleStore")
    }
}

impl ModuleStore {
    pub async fn open(client: async_nats::Client, replicas: usize) -> anyhow::Result<ModuleStore> {
        let js = jetstream::new(client);
        let bucket = match js.get_object_store(OBJECT_BUCKET).await {
            Ok(b) => b,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: OBJECT_BUCKET.to_string(),
                    description: Some("SignalOps plugin modules, <tenant>/<sha256>".into()),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("cannot create the plugin object store: {e}"))?,
        };
        Ok(ModuleStore { bucket })
    }

    pub async fn put(&self, tenant: TenantId, sha256: &str, bytes: &[u8]) -> Result<(), String> {
        let mut reader = bytes;
        self.bucket
            .put(object_name(tenant, sha256).as_str(), &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| format!("object store put: {e}"))
    }

    pub async fn get(&self, tenant: TenantId, sha256: &str) -> Result<Vec<u8>, String> {
        let mut obj =
            self.bucket.get(object_name(tenant, sha256)).await.map_err(|e| format!("object store get: {e}"))?;
        let mut out = Vec::new();
        obj.read_to_end(&mut out).await.map_err(|e| format!("object store read: {e}"))?;
        Ok(out)
    }

    pub async fn delete(&self, tenant: TenantId, sha256: &str) -> Result<(), String> {
        self.bucket.delete(object_name(tenant, sha256)).await.map_err(|e| format!("object store delete: {e}"))
    }
}

/// Makes sure this node has the module compiled, fetching it from the object store if needed.
pub async fn ensure_loaded(
    runtime: &Arc<PluginRuntime>,
    store: &ModuleStore,
    tenant: TenantId,
    digest: &Digest,
) -> Result<(), String> {
    if runtime.module(digest).is_some() {
        return Ok(());
    }
    let hex = digest_hex(digest);
    let bytes = store.get(tenant, &hex).await?;
    let rt = runtime.clone();
    let compiled = tokio::task::spawn_blocking(move || rt.compile(&bytes))
        .await
        .map_err(|e| format!("compile task: {e}"))?
        .map_err(|r| format!("stored module does not compile: {}", r.detail))?;
    if compiled.digest != *digest {
        return Err(format!("stored module {hex} has another digest"));
    }
    Ok(())
}
