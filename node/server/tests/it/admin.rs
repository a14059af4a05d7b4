use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Api, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keys_and_revocation() {
    let s = Setup::new().await;
    let (status, v) = s.admin.get("/v1/admin/tenants").await;
    assert_eq!(status, StatusCode::OK);
    assert!(v["tenants"].as_array().unwrap().iter().any(|t| t["tenant_id"] == s.tenant_id.as_str()));
    let (status, v) = s.admin.post("/v1/admin/tenants", &json!({"name": "acme"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = s.admin.post("/v1/admin/tenants", &json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["field"], "name");
    let (status, _) = Api::new(&s.api.base, "wrong-operator-token").get("/v1/admin/tenants").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A second key: shown once, with a visible prefix that is its id.
    let (status, v) = s.admin.post(&format!("/v1/admin/tenants/{}/keys", s.tenant_id), &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let key_id = v["key_id"].as_str().unwrap().to_string();
    let key = v["api_key"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("so_{key_id}_")));
    assert!(key.len() >= 40, "at least 128 bits of secret");
    let second = Api::new(&s.api.base, &key);
    let (status, _) = second.post("/v1/events", &json!({"type": "k.one"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, keys) = s.admin.get(&format!("/v1/admin/tenants/{}/keys", s.tenant_id)).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2);
    assert!(!keys.to_string().contains(&key), "keys are never shown again");

    let status = s.admin.delete(&format!("/v1/admin/tenants/{}/keys/{key_id}", s.tenant_id)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked_at = Instant::now();
    let (status, v) = second.post("/v1/events", &json!({"type": "k.two"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // The first key still works; unknown keys and tenants are 404.
    let (status, _) = s.api.post("/v1/events", &json!({"type": "k.three"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let status = s.admin.delete(&format!("/v1/admin/tenants/{}/keys/nope", s.tenant_id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.admin.post(&format!("/v1/admin/tenants/{}/keys", uuid::Uuid::now_v7()), &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
