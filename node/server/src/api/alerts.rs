//! Alerts (`GET /v1/alerts`, `GET /v1/alerts/{id}`, `POST /v1/alerts/{id}/ack`) and silences
//! (`POST/GET /v1/silences`, `GET/DELETE /v1/silences/{id}`).

use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use signalops_control::state::{Command, CommandResult};
use signalops_core::alert::{AlertAck, Silence, SilenceMatchers};
use signalops_core::error::ApiError;
use signalops_core::model::{format_ms, now_ms, parse_time, valid_name};
use signalops_rules::filter::FieldPath;
use signalops_store::AlertQuery;

use super::admin::control_error;
use super::events::time_param;
use super::{AppState, AuthTenant};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/alerts", get(list))
        .route("/v1/alerts/{id}", get(one))
        .route("/v1/alerts/{id}/ack", post(ack))
        .route("/v1/silences", get(list_silences).post(create_silence))
        .route("/v1/silences/{id}", get(one_silence).delete(delete_silence))
}

const MAX_LIMIT: usize = 1000;
/// Most silences one tenant may have.
const MAX_SILENCES: usize = 1000;

#[derive(Deserialize)]
struct ListParams {
    state: Option<String>,
    rule_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn encode_cursor(id: &Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_cursor(s: &str) -> Option<Uuid> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
    Uuid::from_slice(&raw).ok()
}

async fn list(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    if let Some(s) = &p.state {
        if !matches!(s.as_str(), "firing" | "acknowledged" | "resolved") {
            return Err(ApiError::bad_request("state", "`state` must be firing, acknowledged or resolved"));
        }
    }
    let rule_id = match &p.rule_id {
        None => None,
        Some(r) => {
            Some(Uuid::parse_str(r).map_err(|_| ApiError::bad_request("rule_id", "`rule_id` must be a rule id"))?)
        }
    };
    let limit = match &p.limit {
        None => 100,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::bad_request("limit", format!("`limit` must be 1 to {MAX_LIMIT}"))),
        },
    };
    let after = match &p.cursor {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::bad_request("cursor", "`cursor` is not a cursor from this API"))?,
        ),
    };
    let q = AlertQuery {
        state: p.state.clone(),
        rule_id,
        from_ms: time_param("from", &p.from)?,
        to_ms: time_param("to", &p.to)?,
        limit,
        after,
    };
    let page = state.store.query_alerts(tenant.id, q).await.map_err(|e| ApiError::internal("alert query", &e))?;
    let alerts: Vec<_> = page.alerts.iter().map(|(a, ack)| a.view(ack.as_ref())).collect();
    Ok(Json(json!({ "alerts": alerts, "next_cursor": page.next.as_ref().map(encode_cursor) })).into_response())
}

fn alert_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no alert `{id}`")))
}

async fn one(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let uuid = alert_id(&id)?;
    match state.store.get_alert(tenant.id, uuid).await.map_err(|e| ApiError::internal("alert read", &e))? {
        Some((a, ack)) => Ok(Json(a.view(ack.as_ref())).into_response()),
        None => Err(ApiError::not_found(format!("no alert `{id}`"))),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AckBody {
    by: Option<String>,
}

/// Acknowledges a firing alert: it shows as `acknowledged` until it resolves. The first
/// acknowledgement is kept; repeating it answers the same.
async fn ack(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
    body: Option<Json<Value>>,
) -> Result<Response, ApiError> {
    let uuid = alert_id(&id)?;
    let body: AckBody = match body {
        None => AckBody::default(),
        Some(Json(v)) => serde_json::from_value(v).map_err(|e| ApiError::bad_request("", e.to_string()))?,
    };
    if body.by.as_ref().is_some_and(|b| b.is_empty() || b.len() > 256) {
        return Err(ApiError::bad_request("by", "`by` must be 1 to 256 characters"));
    }
    let ack = AlertAck { at_ms: now_ms(), by: body.by };
    match state.store.ack_alert(tenant.id, uuid, ack).await.map_err(|e| ApiError::internal("alert ack", &e))? {
        Some((a, ack)) => Ok(Json(a.view(ack.as_ref())).into_response()),
        None => Err(ApiError::not_found(format!("no alert `{id}`"))),
    }
}

fn silence_json(s: &Silence, now: i64) -> Value {
    json!({
        "id": s.id,
        "matchers": s.matchers,
        "starts_at": format_ms(s.starts_at_ms),
        "ends_at": format_ms(s.ends_at_ms),
        "comment": s.comment,
        "created_at": format_ms(s.created_at_ms),
        "active": now >= s.starts_at_ms && now < s.ends_at_ms,
    })
}

fn time_member(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(name, format!("`{name}` must be an RFC 3339 timestamp"))),
        Some(_) => Err(ApiError::bad_request(name, format!("`{name}` must be an RFC 3339 timestamp"))),
    }
}

/// Validates a silence body: `{"matchers": {"rule_id"?, "labels"?, "group"?}, "starts_at"?,
/// "ends_at", "comment"?}`.
fn parse_silence(body: Value, tenant: Uuid, now: i64) -> Result<Silence, ApiError> {
    let Value::Object(obj) = body else { return Err(ApiError::bad_request("", "the body must be a JSON object")) };
    for k in obj.keys() {
        if !matches!(k.as_str(), "matchers" | "starts_at" | "ends_at" | "comment") {
            return Err(ApiError::bad_request(k.clone(), format!("unknown member `{k}`")));
        }
    }
    let Some(Value::Object(m)) = obj.get("matchers") else {
        return Err(ApiError::bad_request(
            "matchers",
            "`matchers` must be an object with rule_id, labels and/or group",
        ));
    };
    let mut matchers = SilenceMatchers::default();
    for (k, v) in m {
        match (k.as_str(), v) {
            ("rule_id", Value::String(s)) => {
                matchers.rule_id = Some(
                    Uuid::parse_str(s).map_err(|_| ApiError::bad_request("matchers.rule_id", "must be a rule id"))?,
                );
            }
            ("labels", Value::Object(l)) => {
                let mut labels = BTreeMap::new();
                for (lk, lv) in l {
                    let field = format!("matchers.labels.{lk}");
                    let Value::String(s) = lv else { return Err(ApiError::bad_request(field, "must be a string")) };
                    if !valid_name(lk) {
                        return Err(ApiError::bad_request(
                            field,
                            "label names are 1-128 characters of [A-Za-z0-9_.:-]",
                        ));
                    }
                    labels.insert(lk.clone(), s.clone());
                }
                matchers.labels = labels;
            }
            ("group", Value::Object(g)) => {
                for gk in g.keys() {
                    if FieldPath::parse(gk).is_none() {
                        return Err(ApiError::bad_request(
                            format!("matchers.group.{gk}"),
                            "group keys are the rule's group_by field paths, e.g. payload.merchant_id",
                        ));
                    }
                }
                matchers.group = g.clone().into_iter().collect();
            }
            ("rule_id" | "labels" | "group", _) => {
                return Err(ApiError::bad_request(format!("matchers.{k}"), "has the wrong type"))
            }
            _ => return Err(ApiError::bad_request(format!("matchers.{k}"), format!("unknown matcher `{k}`"))),
        }
    }
    if matchers == SilenceMatchers::default() {
        return Err(ApiError::bad_request("matchers", "a silence needs at least one matcher"));
    }
    let starts_at_ms = time_member(&obj, "starts_at")?.unwrap_or(now);
    let ends_at_ms =
        time_member(&obj, "ends_at")?.ok_or_else(|| ApiError::bad_request("ends_at", "`ends_at` is required"))?;
    if ends_at_ms <= starts_at_ms {
        return Err(ApiError::bad_request("ends_at", "`ends_at` must be after `starts_at`"));
    }
    let comment = match obj.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.len() <= 1000 => Some(c.clone()),
        Some(_) => return Err(ApiError::bad_request("comment", "`comment` must be a string of at most 1000 bytes")),
    };
    Ok(Silence {
        id: Uuid::now_v7(),
        tenant_id: tenant,
        matchers,
        starts_at_ms,
        ends_at_ms,
        comment,
        created_at_ms: now,
    })
}

async fn create_silence(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request("", e.body_text()))?;
    let now = now_ms();
    let silence = parse_silence(body, tenant.id, now)?;
    if state.control.read().silences_of(tenant.id).len() >= MAX_SILENCES {
        return Err(ApiError::new(
            signalops_core::error::ErrorKind::Conflict,
            format!("a tenant may have at most {MAX_SILENCES} silences; delete expired ones"),
        ));
    }
    match state
        .control
        .propose(Command::PutSilence { silence: Box::new(silence.clone()) })
        .await
        .map_err(control_error)?
    {
        CommandResult::Done => Ok((StatusCode::CREATED, Json(silence_json(&silence, now))).into_response()),
        other => Err(ApiError::internal("create silence", &format!("{other:?}"))),
    }
}

async fn list_silences(State(state): State<AppState>, AuthTenant(tenant): AuthTenant) -> Json<Value> {
    let now = now_ms();
    let v = state.control.read();
    let silences: Vec<_> = v.silences_of(tenant.id).into_iter().map(|s| silence_json(s, now)).collect();
    Json(json!({ "silences": silences }))
}

fn silence_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no silence `{id}`")))
}

async fn one_silence(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let uuid = silence_id(&id)?;
    let v = state.control.read();
    match v.state.silences.get(&uuid).filter(|s| s.tenant_id == tenant.id) {
        Some(s) => Ok(Json(silence_json(s, now_ms())).into_response()),
        None => Err(ApiError::not_found(format!("no silence `{id}`"))),
    }
}

async fn delete_silence(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let uuid = silence_id(&id)?;
    let cmd = Command::DeleteSilence { tenant_id: tenant.id, silence_id: uuid };
    match state.control.propose(cmd).await.map_err(control_error)? {
        CommandResult::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        CommandResult::SilenceNotFound => Err(ApiError::not_found(format!("no silence `{id}`"))),
        other => Err(ApiError::internal("delete silence", &format!("{other:?}"))),
    }
}
