//! Operator API: tenants and their API keys. Writes go through the Raft control plane.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use signalops_control::state::{ApiKey, Command, CommandResult, Tenant, TenantLimits};
use signalops_control::{ControlError, ControlPlane};
use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::model::{format_ms, now_ms};

use super::{AppState, Operator};
use crate::auth::generate_key;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/admin/tenants/{id}/keys", post(create_key).get(list_keys))
        .route("/v1/admin/tenants/{id}/keys/{key_id}", delete(revoke_key))
        .route("/v1/admin/cluster", get(cluster))
        .route("/v1/admin/cluster/nodes/{id}", delete(decommission))
}

/// Takes a node out of the cluster: `202` while its partitions move away and it leaves.
async fn decommission(
    State(state): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let node: u64 =
        id.parse().map_err(|_| ApiError::bad_request("id", "must be a node id (a non-negative integer)"))?;
    if !state.control.decommission(node).await.map_err(control_error)? {
        return Err(ApiError::not_found(format!("node {node} is not a member of the cluster")));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"node_id": node, "state": "leaving"}))).into_response())
}

/// The cluster as the answering node sees it: members, their roles and heartbeats, the leader.
async fn cluster(State(state): State<AppState>, _: Operator) -> Json<signalops_control::ClusterView> {
    Json(state.control.cluster())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: Option<serde_json::Value>,
    #[serde(default)]
    pub limits: Option<TenantLimits>,
}

pub(crate) fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotLeader { leader } => {
            ApiError::unavailable(format!("no control-plane leader took the write (last known: {leader:?}); retry"), 1)
        }
        other => ApiError::internal("control plane write", &other),
    }
}

/// Creates a tenant with a first API key through Raft; shared with `dev` start-up.
pub async fn create_tenant_with_key(
    control: &ControlPlane,
    name: &str,
    limits: TenantLimits,
) -> Result<(Tenant, String), ApiError> {
    let now = now_ms();
    let tenant = Tenant { id: Uuid::now_v7(), name: name.to_string(), created_at_ms: now, limits };
    let key = generate_key();
    let record = ApiKey {
        key_id: key.key_id,
        tenant_id: tenant.id,
        digest: key.digest,
        created_at_ms: now,
        revoked_at_ms: None,
    };
    match control.propose(Command::CreateTenant { tenant: tenant.clone(), key: record }).await.map_err(control_error)? {
        CommandResult::Done => Ok((tenant, key.key)),
        CommandResult::TenantNameTaken => {
            Err(ApiError::new(ErrorKind::Conflict, format!("a tenant named `{name}` exists")).with_field("name"))
        }
        other => Err(ApiError::internal("create tenant", &format!("{other:?}"))),
    }
}

fn tenant_json(t: &Tenant) -> serde_json::Value {
    json!({"tenant_id": t.id, "name": t.name, "created_at": format_ms(t.created_at_ms), "limits": t.limits})
}

async fn create_tenant(
    State(state): State<AppState>,
    _: Operator,
    body: Result<Json<CreateTenant>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request("", e.body_text()))?;
    let name = match req.name {
        Some(serde_json::Value::String(n)) if !n.trim().is_empty() && n.len() <= 128 => n.trim().to_string(),
        Some(serde_json::Value::String(_)) => {
            return Err(ApiError::bad_request("name", "`name` must be 1 to 128 characters"))
        }
        Some(_) => return Err(ApiError::bad_request("name", "`name` must be a string")),
        None => return Err(ApiError::bad_request("name", "`name` is required")),
    };
    let limits = req.limits.unwrap_or_default();
    if limits.events_per_second == Some(0) {
        return Err(ApiError::bad_request(
            "limits.events_per_second",
            "must be positive (omit it for the node default)",
        ));
    }
    let (tenant, key) = create_tenant_with_key(&state.control, &name, limits).await?;
    let mut body = tenant_json(&tenant);
    body["api_key"] = json!(key);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_tenants(State(state): State<AppState>, _: Operator) -> Json<serde_json::Value> {
    let view = state.control.read();
    let tenants: Vec<_> = view.state.tenants.values().map(tenant_json).collect();
    Json(json!({ "tenants": tenants }))
}

fn parse_tenant(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no tenant `{id}`")))
}

async fn create_key(State(state): State<AppState>, _: Operator, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant_id = parse_tenant(&id)?;
    let key = generate_key();
    let record = ApiKey {
        key_id: key.key_id.clone(),
        tenant_id,
        digest: key.digest,
        created_at_ms: now_ms(),
        revoked_at_ms: None,
    };
    match state.control.propose(Command::CreateApiKey { key: record }).await.map_err(control_error)? {
        CommandResult::Done => {
            Ok((StatusCode::CREATED, Json(json!({"key_id": key.key_id, "tenant_id": tenant_id, "api_key": key.key})))
                .into_response())
        }
        CommandResult::TenantNotFound => Err(ApiError::not_found(format!("no tenant `{id}`"))),
        other => Err(ApiError::internal("create key", &format!("{other:?}"))),
    }
}

async fn list_keys(State(state): State<AppState>, _: Operator, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant_id = parse_tenant(&id)?;
    let view = state.control.read();
    if !view.state.tenants.contains_key(&tenant_id) {
        return Err(ApiError::not_found(format!("no tenant `{id}`")));
    }
    let keys: Vec<_> = view
        .state
        .keys
        .values()
        .filter(|k| k.tenant_id == tenant_id)
        .map(|k| {
            json!({"key_id": k.key_id, "created_at": format_ms(k.created_at_ms),
                   "revoked_at": k.revoked_at_ms.map(format_ms)})
        })
        .collect();
    Ok(Json(json!({ "keys": keys })).into_response())
}

async fn revoke_key(
    State(state): State<AppState>,
    _: Operator,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let tenant_id = parse_tenant(&id)?;
    let cmd = Command::RevokeApiKey { tenant_id, key_id: key_id.clone(), at_ms: now_ms() };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        CommandResult::KeyNotFound => Err(ApiError::not_found(format!("no key `{key_id}` for tenant `{id}`"))),
        other => Err(ApiError::internal("revoke key", &format!("{other:?}"))),
    }
}
