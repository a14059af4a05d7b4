//! Plugins: `POST/GET /v1/plugins`, `GET/DELETE /v1/plugins/{id}`, `POST /v1/plugins/{id}/test`
//! and `POST /v1/plugins/{id}/enable`. `{id}` is the plugin's id or its name. Every plugin is
//! the tenant's own: another tenant's id answers 404.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use signalops_control::state::{Command, CommandResult};
use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::model::{format_ms, now_ms, split_body, validate_event, TenantId};
use signalops_plugins::registry::{PluginKind, PluginRecord, PluginVersion};
use signalops_plugins::runtime::{digest_hex, encode_config, CallInput, Rejection};
use signalops_plugins::state::PluginState;
use signalops_plugins::stats::PluginHealth;
use signalops_plugins::{CallReport, PluginHost};

use super::admin::control_error;
use super::{AppState, AuthTenant};

pub fn router() -> Router<AppState> {
    Router::new()
        // The upload reads its body with the plugin size limit itself.
        .route("/v1/plugins", get(list).post(upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/plugins/{id}", get(one).delete(remove))
        .route("/v1/plugins/{id}/test", post(test))
        .route("/v1/plugins/{id}/enable", post(enable))
}

const MAX_NAME_CHARS: usize = 64;

fn kind_name(k: PluginKind) -> &'static str {
    match k {
        PluginKind::Rule => "rule",
        PluginKind::Notifier => "notifier",
    }
}

#[derive(Serialize)]
struct PluginView<'a> {
    id: Uuid,
    name: &'a str,
    kind: PluginKind,
    /// The newest version.
    version: Option<&'a str>,
    versions: Vec<VersionView<'a>>,
    created_at: String,
    /// `active`, or `disabled` (its rules are not evaluated; see `disabled_reason`).
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_at: Option<String>,
    /// Rules that use the plugin.
    used_by: Vec<Uuid>,
    /// Calls on this node.
    health: PluginHealth,
}

#[derive(Serialize)]
struct VersionView<'a> {
    version: &'a str,
    sha256: &'a str,
    size: u64,
    uploaded_at: String,
}

fn view<'a>(state: &AppState, p: &'a PluginRecord, used_by: Vec<Uuid>) -> PluginView<'a> {
    PluginView {
        id: p.id,
        name: &p.name,
        kind: p.kind,
        version: p.versions.last().map(|v| v.version.as_str()),
        versions: p
            .versions
            .iter()
            .map(|v| VersionView {
                version: &v.version,
                sha256: &v.sha256,
                size: v.size,
                uploaded_at: format_ms(v.uploaded_at_ms),
            })
            .collect(),
        created_at: format_ms(p.created_at_ms),
        status: if p.disabled.is_some() { "disabled" } else { "active" },
        disabled_reason: p.disabled.as_ref().map(|d| d.reason.as_str()),
        disabled_at: p.disabled.as_ref().map(|d| format_ms(d.at_ms)),
        used_by,
        health: state.plugins.stats.health(p.tenant_id, p.id),
    }
}

/// The tenant's plugin with this id or name.
fn find(state: &AppState, tenant: TenantId, id: &str) -> Result<PluginRecord, ApiError> {
    let view = state.control.read();
    let by_id = Uuid::parse_str(id).ok().and_then(|u| view.plugin(tenant, &u));
    by_id
        .or_else(|| view.plugins_of(tenant).into_iter().find(|p| p.name == id))
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no plugin `{id}`")))
}

fn rejection(r: Rejection) -> ApiError {
    let kind = match r.status {
        503 => return ApiError::new(ErrorKind::Unavailable, r.detail).with_extra(json!({ "reason": r.reason })),
        413 => ErrorKind::PayloadTooLarge,
        400 => ErrorKind::BadRequest,
        _ => ErrorKind::Unprocessable,
    };
    ApiError::new(kind, r.detail).with_field("module").with_extra(json!({ "reason": r.reason }))
}

#[derive(Deserialize, Default)]
struct UploadParams {
    name: Option<String>,
    kind: Option<String>,
}

struct Upload {
    name: Option<String>,
    kind: Option<String>,
    module: Bytes,
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(ErrorKind::PayloadTooLarge, format!("the module is larger than {max} bytes"))
        .with_field("module")
        .with_extra(json!({ "reason": "module_too_large" }))
}

/// Reads an upload: a raw module (`application/wasm` or `application/octet-stream`, name and
/// kind in the query) or `multipart/form-data` with parts `name`, `kind` and `module`.
async fn read_upload(state: &AppState, params: UploadParams, req: Request) -> Result<Upload, ApiError> {
    let max = state.plugin_cfg.max_module_bytes;
    let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request("", format!("bad multipart body: {e}")))?;
        let mut up = Upload { name: params.name, kind: params.kind, module: Bytes::new() };
        while let Some(mut field) =
            mp.next_field().await.map_err(|e| ApiError::bad_request("", format!("bad multipart body: {e}")))?
        {
            let part = field.name().unwrap_or("").to_string();
            let mut buf = Vec::new();
            while let Some(chunk) =
                field.chunk().await.map_err(|e| ApiError::bad_request(&part, format!("bad multipart part: {e}")))?
            {
                buf.extend_from_slice(&chunk);
                if buf.len() > max {
                    return Err(too_large(max));
                }
            }
            let text =
                || String::from_utf8(buf.clone()).map_err(|_| ApiError::bad_request(&part, "must be UTF-8 text"));
            match part.as_str() {
                "name" => up.name = Some(text()?),
                "kind" => up.kind = Some(text()?),
                "module" => up.module = Bytes::from(buf),
                other => return Err(ApiError::bad_request(other, "unknown part; expected name, kind and module")),
            }
        }
        return Ok(up);
    }
    if !(ctype.is_empty() || ctype.starts_with("application/wasm") || ctype.starts_with("application/octet-stream")) {
        return Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "upload a module as `application/wasm` (name and kind in the query) or `multipart/form-data`",
        ));
    }
    let module = axum::body::to_bytes(req.into_body(), max).await.map_err(|_| too_large(max))?;
    Ok(Upload { name: params.name, kind: params.kind, module })
}

fn check_name(name: Option<String>) -> Result<String, ApiError> {
    let name = name.ok_or_else(|| ApiError::bad_request("name", "`name` is required"))?;
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok || Uuid::parse_str(&name).is_ok() {
        return Err(ApiError::bad_request(
            "name",
            format!("must be 1 to {MAX_NAME_CHARS} characters of [A-Za-z0-9_.-] and not a UUID"),
        ));
    }
    Ok(name)
}

async fn upload(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Query(params): Query<UploadParams>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let up = read_upload(&state, params, req).await?;
    let name = check_name(up.name)?;
    let wanted = match up.kind.as_deref() {
        None => None,
        Some("rule") => Some(PluginKind::Rule),
        Some("notifier") => Some(PluginKind::Notifier),
        Some(other) => {
            return Err(ApiError::bad_request(
                "kind",
                format!("unknown plugin kind `{other}`; expected `rule` or `notifier`"),
            ))
        }
    };
    if up.module.is_empty() {
        return Err(ApiError::bad_request("module", "the module is empty"));
    }
    let runtime = state.plugins.runtime.clone();
    let bytes = up.module.clone();
    let validated = tokio::task::spawn_blocking(move || runtime.compile(&bytes))
        .await
        .map_err(|e| ApiError::internal("plugin compile", &e))?
        .map_err(rejection)?;
    if let Some(kind) = wanted.filter(|k| *k != validated.kind) {
        let (entry, other) = match kind {
            PluginKind::Rule => ("evaluate", "render"),
            PluginKind::Notifier => ("render", "evaluate"),
        };
        return Err(ApiError::new(
            ErrorKind::Unprocessable,
            format!("a `{}` plugin exports `{entry}`; this module exports `{other}`", kind_name(kind)),
        )
        .with_field("kind")
        .with_extra(json!({ "reason": "missing_export" })));
    }
    let sha256 = digest_hex(&validated.digest);
    state
        .plugins
        .modules
        .put(tenant.id, &sha256, &up.module)
        .await
        .map_err(|e| ApiError::internal("plugin module store", &e))?;
    let version = PluginVersion {
        version: sha256[..16].to_string(),
        sha256: sha256.clone(),
        size: up.module.len() as u64,
        uploaded_at_ms: now_ms(),
    };
    let existed = {
        let v = state.control.read();
        v.plugins_of(tenant.id).iter().any(|p| p.name == name && p.versions.iter().any(|x| x.sha256 == sha256))
    };
    let cmd = Command::AddPluginVersion {
        tenant_id: tenant.id,
        name: name.clone(),
        kind: validated.kind,
        new_id: Uuid::now_v7(),
        version,
        max_plugins: state.plugin_cfg.max_plugins_per_tenant,
    };
    let id = match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::PluginStored(id) => id,
        CommandResult::PluginLimit(n) => {
            return Err(ApiError::new(ErrorKind::Conflict, format!("the tenant already has {n} plugins, the limit")))
        }
        CommandResult::PluginKindConflict => {
            return Err(ApiError::new(ErrorKind::Conflict, format!("a plugin named `{name}` of another kind exists"))
                .with_field("kind"))
        }
        other => return Err(ApiError::internal("plugin upload", &format!("{other:?}"))),
    };
    let record = find(&state, tenant.id, &id.to_string())?;
    let used_by = state.control.read().rules_using(tenant.id, &record);
    let mut body = serde_json::to_value(view(&state, &record, used_by)).map_err(|e| ApiError::internal("view", &e))?;
    if let Value::Object(o) = &mut body {
        // The version this upload is (the newest, or an earlier one with the same module).
        o.insert("version".into(), Value::String(sha256[..16].to_string()));
        o.insert("sha256".into(), Value::String(sha256));
    }
    let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(body)).into_response())
}

async fn list(State(state): State<AppState>, AuthTenant(tenant): AuthTenant) -> Result<Response, ApiError> {
    let control = state.control.read();
    let views: Vec<Value> = control
        .plugins_of(tenant.id)
        .into_iter()
        .map(|p| serde_json::to_value(view(&state, p, control.rules_using(tenant.id, p))).unwrap_or(Value::Null))
        .collect();
    drop(control);
    Ok(Json(json!({ "plugins": views })).into_response())
}

async fn one(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = find(&state, tenant.id, &id)?;
    let used_by = state.control.read().rules_using(tenant.id, &p);
    Ok(Json(view(&state, &p, used_by)).into_response())
}

async fn remove(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = find(&state, tenant.id, &id)?;
    match state
        .control
        .propose(Command::DeletePlugin { tenant_id: tenant.id, plugin_id: p.id })
        .await
        .map_err(control_error)?
    {
        CommandResult::Done => {}
        CommandResult::PluginNotFound => return Err(ApiError::not_found(format!("no plugin `{id}`"))),
        CommandResult::PluginInUse(rules) => {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!("the plugin is used by {} rule(s); delete or change them first", rules.len()),
            )
            .with_extra(json!({ "rules": rules })))
        }
        CommandResult::PluginUsedByChannels(channels) => {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!("the notifier renders for {} channel(s); delete or change them first", channels.len()),
            )
            .with_extra(json!({ "channels": channels })))
        }
        other => return Err(ApiError::internal("plugin delete", &format!("{other:?}"))),
    }
    for v in &p.versions {
        if let Err(e) = state.plugins.modules.delete(tenant.id, &v.sha256).await {
            tracing::warn!(tenant_id = %tenant.id, plugin_id = %p.id, error = %e, "plugin module left in the object store");
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn enable(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = find(&state, tenant.id, &id)?;
    let cmd = Command::SetPluginDisabled { tenant_id: tenant.id, plugin_id: p.id, disabled: None };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => {}
        other => return Err(ApiError::internal("plugin enable", &format!("{other:?}"))),
    }
    state.plugins.stats.reset_failures(tenant.id, p.id);
    one(State(state), AuthTenant(tenant), Path(id)).await
}

#[derive(Serialize)]
struct TestResult {
    index: usize,
    event_id: String,
    #[serde(flatten)]
    report: CallReport,
}

/// `{"events": [...], "config": {...}, "version"?}`: runs the plugin over the events, in
/// order, with fresh state (so window counters and state carry from one event to the next),
/// and reports each call. Nothing is stored; no alert fires.
async fn test(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let p = find(&state, tenant.id, &id)?;
    if p.kind == PluginKind::Notifier {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            "a notifier renders notifications: test it through a channel that uses it (POST /v1/channels/{id}/test)",
        ));
    }
    let Json(body) = body.map_err(|e| ApiError::bad_request("", e.body_text()))?;
    let Value::Object(mut body) = body else {
        return Err(ApiError::bad_request("", "the body must be an object: {\"events\": [...], \"config\": {...}}"));
    };
    let version = match body.remove("version") {
        None | Some(Value::Null) => None,
        Some(Value::String(v)) => Some(v),
        Some(_) => return Err(ApiError::bad_request("version", "must be a string")),
    };
    let v = p
        .version(version.as_deref())
        .ok_or_else(|| ApiError::bad_request("version", format!("plugin `{id}` has no such version")))?
        .clone();
    let config = match body.remove("config") {
        None | Some(Value::Null) => json!({}),
        Some(c @ Value::Object(_)) => c,
        Some(_) => return Err(ApiError::bad_request("config", "must be an object")),
    };
    let events = body.remove("events").ok_or_else(|| ApiError::bad_request("events", "`events` is required"))?;
    let parsed = split_body(json!({ "events": events }), state.plugin_cfg.max_test_events)?;
    let now = now_ms();
    let mut records = Vec::with_capacity(parsed.events.len());
    for (i, obj) in parsed.events.into_iter().enumerate() {
        records.push(validate_event(obj, &format!("events[{i}]."), tenant.id, now)?);
    }
    let digest = signalops_plugins::registry::parse_digest(&v.sha256)
        .ok_or_else(|| ApiError::internal("plugin digest", &v.sha256))?;
    signalops_plugins::store::ensure_loaded(&state.plugins.runtime, &state.plugins.modules, tenant.id, &digest)
        .await
        .map_err(|e| ApiError::internal("plugin load", &e))?;
    let runtime = Arc::clone(&state.plugins.runtime);
    let config = encode_config(&config);
    let tenant_id = tenant.id;
    let results = tokio::task::spawn_blocking(move || {
        let mut host = PluginHost::new(runtime);
        let mut plugin_state = Box::<PluginState>::default();
        records
            .iter()
            .enumerate()
            .map(|(index, ev)| {
                let input = CallInput {
                    event: ev,
                    time_ms: ev.occurred_at_ms,
                    config: &config,
                    rule_id: Uuid::nil(),
                    rule_version: 0,
                };
                let report = host.evaluate(tenant_id, &digest, &mut plugin_state, &input, &mut ());
                TestResult { index, event_id: ev.id.clone(), report }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::internal("plugin test", &e))?;
    Ok(Json(json!({ "plugin_id": p.id, "version": v.version, "results": results })).into_response())
}
