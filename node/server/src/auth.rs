//! API keys and the operator token.
//!
//! A key looks like `so_<key_id>_<secret>`: `key_id` (10 characters) is the visible prefix and
//! the key's id in the API; the secret is 32 random bytes (256 bits) in URL-safe base64. Only
//! the SHA-256 digest of the whole key is stored; a fast digest suits keys of this entropy and
//! keeps the ingest path cheap. Lookups read the local control-plane view.

use axum::http::HeaderMap;
use base64::Engine;
use rand::Rng;
use sha2::{Digest, Sha256};

use signalops_control::state::Tenant;
use signalops_control::ControlPlane;
use signalops_core::error::ApiError;

pub struct NewKey {
    pub key: String,
    pub key_id: String,
    pub digest: String,
}

pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

const ID_ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyz23456789";

pub fn generate_key() -> NewKey {
    let mut rng = rand::rng();
    let key_id: String = (0..10).map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char).collect();
    let secret: [u8; 32] = rng.random();
    let key = format!("so_{key_id}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let digest = digest(&key);
    NewKey { key, key_id, digest }
}

/// A random operator token (256 bits).
pub fn generate_admin_token() -> String {
    let secret: [u8; 32] = rand::rng().random();
    format!("soadm_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret))
}

/// The credential of a request: `Authorization: Bearer <key>` or `x-api-key: <key>`.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(rest) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")) {
            return Some(rest.trim());
        }
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Resolves an API key to its tenant; 401 when missing, unknown or revoked.
pub fn tenant_for(control: &ControlPlane, key: Option<&str>) -> Result<Tenant, ApiError> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(ApiError::unauthorized("an API key is required: `Authorization: Bearer <key>` or `x-api-key`"));
    };
    let view = control.read();
    let tenant = view.key_by_digest(&digest(key)).and_then(|k| view.state.tenants.get(&k.tenant_id)).cloned();
    tenant.ok_or_else(|| ApiError::unauthorized("the API key is unknown or revoked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_prefixed() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a.key, b.key);
        assert!(a.key.starts_with(&format!("so_{}_", a.key_id)));
        assert_eq!(a.key.len(), 3 + 10 + 1 + 43);
        assert_eq!(a.digest, digest(&a.key));
        assert_eq!(a.digest.len(), 64);
    }

    #[test]
    fn credential_from_either_header() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(credential(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "xyz".parse().unwrap());
        assert_eq!(credential(&h), Some("xyz"));
        assert_eq!(credential(&HeaderMap::new()), None);
    }
}
