//! Channels: `POST/GET /v1/channels`, `GET/PUT/DELETE /v1/channels/{id}`, and per channel
//! `rotate-secret`, `enable`, `test` and `recover`. A webhook's signing secret appears only in
//! the create and rotate answers. Every channel is the tenant's own: another tenant's id is 404.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use signalops_control::state::{Command, CommandResult};
use signalops_core::delivery::DeliveryStatus;
use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::model::{format_ms, now_ms, TenantId};
use signalops_notify::channel::{generate_secret, parse_channel, Channel, ChannelSpec, SigningSecret, Target};
use signalops_plugins::PluginKind;
use signalops_store::DeliveryQuery;

use super::admin::control_error;
use super::deliveries::replay_record;
use super::events::time_param;
use super::{json_body, AppState, AuthTenant};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/channels", get(list).post(create))
        .route("/v1/channels/{id}", get(one).put(update).delete(remove))
        .route("/v1/channels/{id}/rotate-secret", post(rotate))
        .route("/v1/channels/{id}/enable", post(enable))
        .route("/v1/channels/{id}/test", post(test))
        .route("/v1/channels/{id}/recover", post(recover))
}

/// Most failed deliveries one recover request re-queues.
const MAX_RECOVER: usize = 10_000;

/// Parses a definition and checks its URLs against the egress guard.
fn parse(state: &AppState, tenant: TenantId, body: &Value) -> Result<ChannelSpec, ApiError> {
    let spec = parse_channel(body).map_err(|e| ApiError::bad_request(e.field, e.detail))?;
    let urls: Vec<(&str, &str)> = match &spec.target {
        Target::Webhook { url, .. } | Target::Slack { url } => vec![("url", url)],
        Target::Telegram { api_base_url: Some(u), .. } => vec![("api_base_url", u)],
        Target::Telegram { api_base_url: None, .. } | Target::Email { .. } | Target::Plugin { .. } => vec![],
    };
    if let Target::Plugin { plugin, version, .. } = &spec.target {
        let view = state.control.read();
        let found = view.plugins_of(tenant).into_iter().find(|p| p.name == *plugin || p.id.to_string() == *plugin);
        match found {
            Some(p) if p.kind == PluginKind::Notifier => {
                if p.version(version.as_deref()).is_none() {
                    return Err(ApiError::bad_request("version", format!("plugin `{plugin}` has no such version")));
                }
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "plugin",
                    format!("plugin `{plugin}` is a rule plugin, not a notifier"),
                ))
            }
            None => return Err(ApiError::bad_request("plugin", format!("no notifier plugin `{plugin}`"))),
        }
    }
    for (field, url) in urls {
        let parsed = reqwest::Url::parse(url).map_err(|e| ApiError::bad_request(field, e.to_string()))?;
        if let Err(e) = state.notifier.outbound().egress().check_url(&parsed) {
            return Err(ApiError::new(ErrorKind::Unprocessable, e).with_field(field));
        }
    }
    if matches!(spec.target, Target::Email { .. }) && state.notify_cfg.smtp_url.is_none() {
        return Err(ApiError::new(
            ErrorKind::Unprocessable,
            "this node has no SMTP server configured (notify.smtp_url / SIGNALOPS_SMTP_URL)",
        )
        .with_field("kind"));
    }
    Ok(spec)
}

fn find(state: &AppState, tenant: TenantId, id: &str) -> Result<Channel, ApiError> {
    let not_found = || ApiError::not_found(format!("no channel `{id}`"));
    let id = Uuid::parse_str(id).map_err(|_| not_found())?;
    state.control.read().channel(tenant, &id).cloned().ok_or_else(not_found)
}

fn view(state: &AppState, c: &Channel) -> Value {
    let used_by = state.control.read().rules_delivering_to(c.tenant_id, &c.id);
    c.view(used_by)
}

async fn create(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let spec = parse(&state, tenant.id, &json_body(body)?)?;
    let now = now_ms();
    let secret = generate_secret();
    let channel = Channel {
        id: Uuid::now_v7(),
        tenant_id: tenant.id,
        name: spec.name,
        target: spec.target,
        delivery: spec.delivery,
        secrets: vec![SigningSecret { secret: secret.clone(), expires_at_ms: None }],
        created_at_ms: now,
        updated_at_ms: now,
        disabled: None,
    };
    let max_channels = state.notify_cfg.max_channels_per_tenant;
    let cmd = Command::CreateChannel { channel: Box::new(channel.clone()), max_channels };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => {
            let mut v = channel.view(Vec::new());
            if matches!(channel.target, Target::Webhook { .. }) {
                v["secret"] = Value::String(secret);
            }
            Ok((StatusCode::CREATED, Json(v)).into_response())
        }
        other => Err(write_error(other, &channel.name)),
    }
}

fn write_error(r: CommandResult, name: &str) -> ApiError {
    match r {
        CommandResult::ChannelNameTaken => {
            ApiError::new(ErrorKind::Conflict, format!("a channel named `{name}` exists")).with_field("name")
        }
        CommandResult::ChannelLimit(n) => {
            ApiError::new(ErrorKind::Conflict, format!("a tenant may have at most {n} channels; delete one first"))
                .with_extra(json!({"limit": n}))
        }
        CommandResult::ChannelNotFound => ApiError::not_found("no such channel"),
        CommandResult::ChannelInUse(rules) => {
            ApiError::new(ErrorKind::Conflict, "rules deliver to this channel; remove it from their actions first")
                .with_extra(json!({"used_by": rules}))
        }
        other => ApiError::internal("channel write", &format!("{other:?}")),
    }
}

async fn list(State(state): State<AppState>, AuthTenant(tenant): AuthTenant) -> Json<Value> {
    let channels: Vec<Channel> = state.control.read().channels_of(tenant.id).into_iter().cloned().collect();
    let views: Vec<Value> = channels.iter().map(|c| view(&state, c)).collect();
    Json(json!({ "channels": views }))
}

async fn one(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = find(&state, tenant.id, &id)?;
    Ok(Json(view(&state, &c)))
}

async fn update(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let c = find(&state, tenant.id, &id)?;
    let spec = parse(&state, tenant.id, &json_body(body)?)?;
    let name = spec.name.clone();
    let cmd = Command::UpdateChannel { tenant_id: tenant.id, channel_id: c.id, spec: Box::new(spec), at_ms: now_ms() };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => {
            let c = find(&state, tenant.id, &id)?;
            Ok(Json(view(&state, &c)))
        }
        other => Err(write_error(other, &name)),
    }
}

async fn remove(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let c = find(&state, tenant.id, &id)?;
    match state
        .control
        .propose(Command::DeleteChannel { tenant_id: tenant.id, channel_id: c.id })
        .await
        .map_err(control_error)?
    {
        CommandResult::Done => Ok(StatusCode::NO_CONTENT),
        other => Err(write_error(other, &c.name)),
    }
}

#[derive(Deserialize, Default)]
struct RotateParams {
    /// How long the replaced secret stays valid, seconds.
    grace_secs: Option<u64>,
}

async fn rotate(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    params: Result<Query<RotateParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("grace_secs", e.body_text()))?;
    let c = find(&state, tenant.id, &id)?;
    if !matches!(c.target, Target::Webhook { .. }) {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("a `{}` channel has no signing secret", c.target.kind()),
        ));
    }
    let grace = p.grace_secs.unwrap_or(state.notify_cfg.secret_rotation_grace_secs);
    if grace > 30 * 86_400 {
        return Err(ApiError::bad_request("grace_secs", "must be at most 2592000 (30 days)"));
    }
    let now = now_ms();
    let secret = generate_secret();
    let expires = now + (grace as i64) * 1000;
    let cmd = Command::RotateChannelSecret {
        tenant_id: tenant.id,
        channel_id: c.id,
        secret: secret.clone(),
        previous_expires_at_ms: expires,
        at_ms: now,
    };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => {
            let c = find(&state, tenant.id, &id)?;
            let mut v = view(&state, &c);
            v["secret"] = Value::String(secret);
            v["previous_secret_expires_at"] = Value::String(format_ms(expires));
            Ok(Json(v))
        }
        other => Err(write_error(other, &c.name)),
    }
}

async fn enable(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = find(&state, tenant.id, &id)?;
    let cmd = Command::SetChannelDisabled { tenant_id: tenant.id, channel_id: c.id, disabled: None };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => {
            let c = find(&state, tenant.id, &id)?;
            Ok(Json(view(&state, &c)))
        }
        other => Err(write_error(other, &c.name)),
    }
}

/// Sends a sample notification now and answers with the attempt.
async fn test(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = find(&state, tenant.id, &id)?;
    let (attempt, webhook_id) = state.notifier.send_test(&c).await;
    let delivered = attempt.error.is_none() && attempt.status_code.is_none_or(|s| (200..300).contains(&s));
    Ok(Json(json!({
        "delivered": delivered,
        "webhook_id": webhook_id,
        "attempt": {
            "at": format_ms(attempt.at_ms),
            "status_code": attempt.status_code,
            "latency_ms": attempt.latency_ms,
            "response": attempt.response,
            "error": attempt.error,
        },
    })))
}

#[derive(Deserialize, Default)]
struct RecoverParams {
    since: Option<String>,
}

/// Re-queues every failed delivery of the channel since a time (default: the last 24 hours).
async fn recover(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    params: Result<Query<RecoverParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("since", e.body_text()))?;
    let c = find(&state, tenant.id, &id)?;
    let since = time_param("since", &p.since)?.unwrap_or_else(|| now_ms() - 86_400_000);
    let mut query = DeliveryQuery {
        channel_id: Some(c.id.to_string()),
        status: Some(DeliveryStatus::Failed),
        from_ms: Some(since),
        limit: 500,
        ..Default::default()
    };
    let mut replayed = Vec::new();
    loop {
        let page = state
            .store
            .query_deliveries(tenant.id, query.clone())
            .await
            .map_err(|e| ApiError::internal("recover", &e))?;
        for record in page.deliveries {
            if replayed.len() >= MAX_RECOVER {
                break;
            }
            replayed.push(replay_record(&state, record).await?.id());
        }
        match page.next {
            Some(next) if replayed.len() < MAX_RECOVER => query.after = Some(next),
            _ => break,
        }
    }
    let body = json!({"replayed": replayed.len(), "deliveries": replayed, "since": format_ms(since)});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
