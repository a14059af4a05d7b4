//! Rules: `POST/GET /v1/rules`, `GET/PUT/DELETE /v1/rules/{id}`, `GET /v1/rules/{id}/versions`,
//! `POST /v1/rules/test` (dry-run) and `POST /v1/rules/{id}/backtest`. Writes go through Raft;
//! every change makes a new version.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use signalops_control::state::{Command, CommandResult, ControlView};
use signalops_core::alert::Alert;
use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::json::FieldError;
use signalops_core::model::{format_ms, now_ms, split_body, validate_event, EventRecord, TenantId};
use signalops_plugins::registry::parse_digest;
use signalops_plugins::PluginHost;
use signalops_rules::compiled::{resolve_plugin, Rule};
use signalops_rules::engine::RuleStats;
use signalops_rules::spec::{parse_rule, RuleLimits, RuleSpec};
use signalops_store::EventQuery;

use super::admin::control_error;
use super::events::time_param;
use super::{json_body, AppState, AuthTenant};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/rules", get(list).post(create))
        .route("/v1/rules/test", post(dry_run))
        .route("/v1/rules/{id}", get(one).put(update).delete(remove))
        .route("/v1/rules/{id}/versions", get(versions))
        .route("/v1/rules/{id}/backtest", post(backtest))
}

/// Most events one dry-run request may carry.
const MAX_TEST_EVENTS: usize = 10_000;

#[derive(Serialize)]
struct RuleView<'a> {
    id: Uuid,
    tenant_id: TenantId,
    version: u32,
    #[serde(flatten)]
    spec: &'a RuleSpec,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<RuleStatus>,
    /// Set while the rule is not evaluated because its plugin is disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
}

/// What the partition owner reports of a rule (as of its last checkpoint).
#[derive(Serialize)]
struct RuleStatus {
    groups: usize,
    group_limit: usize,
    /// Events not evaluated because the rule had reached its group limit.
    dropped_groups: u64,
    group_limit_hit: bool,
    firing: usize,
}

fn view<'a>(rule: &'a Rule, stats: Option<(RuleStats, usize)>) -> RuleView<'a> {
    RuleView {
        id: rule.id,
        tenant_id: rule.tenant_id,
        version: rule.version,
        spec: &rule.spec,
        created_at: format_ms(rule.created_at_ms),
        updated_at: format_ms(rule.updated_at_ms),
        status: stats.map(|(s, limit)| RuleStatus {
            groups: s.groups,
            group_limit: limit,
            dropped_groups: s.dropped_groups,
            group_limit_hit: s.dropped_groups > 0,
            firing: s.firing,
        }),
        disabled_reason: None,
    }
}

/// A rule's view with what the partition owner reports and, for a plugin rule whose plugin is
/// disabled, why it is not evaluated.
fn full_view<'a>(state: &AppState, control: &ControlView, rule: &'a Rule) -> RuleView<'a> {
    let mut v = view(rule, stats(state, rule));
    if let Some(r) = &rule.spec.plugin {
        if let Ok((p, _)) = resolve_plugin(control.plugins(), rule.tenant_id, r) {
            v.disabled_reason = p.disabled.as_ref().map(|d| format!("plugin `{}` is disabled: {}", p.name, d.reason));
        }
    }
    v
}

/// The partition owner's statistics of a rule, with the group limit they are measured against.
fn stats(state: &AppState, rule: &Rule) -> Option<(RuleStats, usize)> {
    state.rule_stats.get(rule.tenant_id, rule.id).map(|s| (s, state.rules.max_groups_per_rule))
}

fn field_error(e: FieldError) -> ApiError {
    ApiError::bad_request(e.field, e.detail)
}

/// Parses a rule definition; a plugin rule's plugin must be one of the tenant's rule plugins.
fn parse_spec(state: &AppState, tenant: TenantId, body: &Value) -> Result<RuleSpec, ApiError> {
    let mut spec = parse_rule(body, &RuleLimits::default()).map_err(field_error)?;
    let view = state.control.read();
    if let Some(r) = &spec.plugin {
        resolve_plugin(view.plugins(), tenant, r).map_err(field_error)?;
    }
    for (i, action) in spec.actions.iter_mut().enumerate() {
        let id = action.get("channel_id").and_then(Value::as_str).unwrap_or_default();
        let Some(channel) = Uuid::parse_str(id).ok().and_then(|c| view.channel(tenant, &c)) else {
            return Err(ApiError::bad_request(format!("actions[{i}].channel_id"), format!("no channel `{id}`")));
        };
        // Stored in canonical form, so every lookup by id string finds it.
        action["channel_id"] = Value::String(channel.id.to_string());
    }
    drop(view);
    Ok(spec)
}

/// A plugin host for a dry-run or backtest of a plugin rule, with its module loaded.
async fn replay_host(state: &AppState, tenant: TenantId, spec: &RuleSpec) -> Result<Option<PluginHost>, ApiError> {
    let Some(r) = &spec.plugin else { return Ok(None) };
    let digest = {
        let view = state.control.read();
        let (_, v) = resolve_plugin(view.plugins(), tenant, r).map_err(field_error)?;
        parse_digest(&v.sha256).ok_or_else(|| ApiError::internal("plugin digest", &v.sha256))?
    };
    signalops_plugins::store::ensure_loaded(&state.plugins.runtime, &state.plugins.modules, tenant, &digest)
        .await
        .map_err(|e| ApiError::internal("plugin load", &e))?;
    Ok(Some(PluginHost::new(state.plugins.runtime.clone())))
}

fn rule_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no rule `{id}`")))
}

fn not_found(id: &Uuid) -> ApiError {
    ApiError::not_found(format!("no rule `{id}`"))
}

async fn create(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let spec = parse_spec(&state, tenant.id, &json_body(body)?)?;
    let now = now_ms();
    let rule =
        Rule { id: Uuid::now_v7(), tenant_id: tenant.id, version: 1, spec, created_at_ms: now, updated_at_ms: now };
    let max_rules = state.rules.max_rules_per_tenant;
    match state
        .control
        .propose(Command::PutRule { rule: Box::new(rule.clone()), max_rules })
        .await
        .map_err(control_error)?
    {
        CommandResult::Done => Ok((StatusCode::CREATED, Json(view(&rule, None))).into_response()),
        CommandResult::RuleLimit(n) => {
            Err(ApiError::new(ErrorKind::Conflict, format!("a tenant may have at most {n} rules; delete one first"))
                .with_extra(json!({"limit": n})))
        }
        other => Err(ApiError::internal("create rule", &format!("{other:?}"))),
    }
}

async fn list(State(state): State<AppState>, AuthTenant(tenant): AuthTenant) -> Json<Value> {
    let view_ = state.control.read();
    let rules: Vec<_> = view_.rules_of(tenant.id).into_iter().map(|r| full_view(&state, &view_, r)).collect();
    Json(json!({ "rules": rules }))
}

async fn one(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = rule_id(&id)?;
    let v = state.control.read();
    let rule = v.rule(tenant.id, &id).ok_or_else(|| not_found(&id))?;
    Ok(Json(full_view(&state, &v, rule)).into_response())
}

async fn versions(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = rule_id(&id)?;
    let v = state.control.read();
    let all = v.rule_versions(tenant.id, &id).ok_or_else(|| not_found(&id))?;
    let versions: Vec<_> = all.iter().rev().map(|r| view(r, None)).collect();
    Ok(Json(json!({ "versions": versions })).into_response())
}

async fn update(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = rule_id(&id)?;
    let body = json_body(body)?;
    let spec = parse_spec(&state, tenant.id, &body)?;
    let current = state.control.read().rule(tenant.id, &id).cloned().ok_or_else(|| not_found(&id))?;
    // A client that sends back the version it read gets optimistic concurrency.
    if let Some(v) = body.get("version").and_then(Value::as_u64) {
        if v != u64::from(current.version) {
            return Err(version_conflict(current.version));
        }
    }
    let rule = Rule { version: current.version + 1, spec, updated_at_ms: now_ms(), ..current };
    let max_rules = state.rules.max_rules_per_tenant;
    match state
        .control
        .propose(Command::PutRule { rule: Box::new(rule.clone()), max_rules })
        .await
        .map_err(control_error)?
    {
        CommandResult::Done => Ok(Json(view(&rule, None)).into_response()),
        CommandResult::RuleNotFound => Err(not_found(&id)),
        CommandResult::RuleVersionConflict(v) => Err(version_conflict(v)),
        other => Err(ApiError::internal("update rule", &format!("{other:?}"))),
    }
}

fn version_conflict(current: u32) -> ApiError {
    ApiError::new(ErrorKind::Conflict, format!("the rule changed meanwhile; its current version is {current}"))
        .with_field("version")
        .with_extra(json!({"current_version": current}))
}

async fn remove(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = rule_id(&id)?;
    match state
        .control
        .propose(Command::DeleteRule { tenant_id: tenant.id, rule_id: id })
        .await
        .map_err(control_error)?
    {
        CommandResult::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        CommandResult::RuleNotFound => Err(not_found(&id)),
        other => Err(ApiError::internal("delete rule", &format!("{other:?}"))),
    }
}

fn alerts_json(alerts: &[Alert]) -> Vec<Value> {
    alerts.iter().map(|a| serde_json::to_value(a.view(None)).unwrap_or(Value::Null)).collect()
}

/// The body of a dry-run or backtest: the alerts, plugin calls (plugin rules) and `extra`.
fn replay_json(replay: &signalops_rules::replay::Replay, extra: Value) -> Value {
    let mut body = json!({ "alerts": alerts_json(&replay.alerts) });
    if !replay.plugin_calls.is_empty() {
        body["plugin_calls"] = serde_json::to_value(&replay.plugin_calls).unwrap_or(Value::Null);
    }
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

/// `{"rule": {...}, "events": [...]}`: evaluates the rule over the events, in order, as if each
/// arrived when it occurred. Nothing is stored or notified.
async fn dry_run(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Value::Object(mut body) = json_body(body)? else {
        return Err(ApiError::bad_request("", "the body must be an object: {\"rule\": {...}, \"events\": [...]}"));
    };
    let rule_body = body.remove("rule").ok_or_else(|| ApiError::bad_request("rule", "`rule` is required"))?;
    let spec = parse_rule(&rule_body, &RuleLimits::default())
        .map_err(|e| ApiError::bad_request(format!("rule.{}", e.field).trim_end_matches('.').to_string(), e.detail))?;
    let events = body.remove("events").ok_or_else(|| ApiError::bad_request("events", "`events` is required"))?;
    let parsed = split_body(json!({ "events": events }), MAX_TEST_EVENTS)?;
    let now = now_ms();
    let mut records = Vec::with_capacity(parsed.events.len());
    for (i, obj) in parsed.events.into_iter().enumerate() {
        records.push(validate_event(obj, &format!("events[{i}]."), tenant.id, now)?);
    }
    let host = replay_host(&state, tenant.id, &spec).await.map_err(|e| {
        if let Some(f) = e.field.clone() {
            e.with_field(format!("rule.{f}"))
        } else {
            e
        }
    })?;
    let rule = Rule { id: Uuid::nil(), tenant_id: tenant.id, version: 0, spec, created_at_ms: now, updated_at_ms: now };
    let n = records.len();
    let cfg = state.rules.engine();
    let plugins = state.control.read().plugins().clone();
    let replay = tokio::task::spawn_blocking(move || {
        signalops_rules::replay::run(rule, &plugins, host, &mut records, None, cfg)
    })
    .await
    .map_err(|e| ApiError::internal("dry run", &e))?
    .map_err(|e| ApiError::bad_request(format!("rule.{}", e.field), e.detail))?;
    Ok(Json(replay_json(&replay, json!({ "events_evaluated": n }))).into_response())
}

#[derive(Deserialize)]
struct BacktestParams {
    from: Option<String>,
    to: Option<String>,
}

/// Replays the tenant's stored events in `[from, to)` (default: the last 24 hours) through the
/// rule's current version, oldest first, and returns the alerts it would have fired.
async fn backtest(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    params: Result<Query<BacktestParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = rule_id(&id)?;
    let Query(p) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let rule = state.control.read().rule(tenant.id, &id).cloned().ok_or_else(|| not_found(&id))?;
    let host = replay_host(&state, tenant.id, &rule.spec).await?;
    let now = now_ms();
    let to = time_param("to", &p.to)?.unwrap_or(now);
    let from = time_param("from", &p.from)?.unwrap_or(to - 24 * 3_600_000);
    if from >= to {
        return Err(ApiError::bad_request("from", "`from` must be before `to`"));
    }
    let max = state.rules.max_backtest_events;
    let mut records: Vec<EventRecord> = Vec::new();
    let mut after = None;
    let mut truncated = false;
    loop {
        let q = EventQuery { event_type: None, from_ms: Some(from), to_ms: Some(to), limit: 1000, after };
        let page = state.store.query(tenant.id, q).await.map_err(|e| ApiError::internal("backtest read", &e))?;
        records.extend(page.events.into_iter().map(|e| e.record));
        if records.len() >= max {
            truncated = page.next.is_some() || records.len() > max;
            records.truncate(max);
            break;
        }
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    // Pages come newest first; the engine wants the oldest first. When truncated, the newest
    // `max` events of the range are the ones replayed.
    records.reverse();
    let n = records.len();
    let cfg = state.rules.engine();
    let end = Some(to.min(now));
    let plugins = state.control.read().plugins().clone();
    let replay =
        tokio::task::spawn_blocking(move || signalops_rules::replay::run(rule, &plugins, host, &mut records, end, cfg))
            .await
            .map_err(|e| ApiError::internal("backtest", &e))?
            .map_err(field_error)?;
    let extra = json!({
        "events_evaluated": n,
        "truncated": truncated,
        "from": format_ms(from),
        "to": format_ms(to),
    });
    Ok(Json(replay_json(&replay, extra)).into_response())
}
