//! The delivery log: `GET /v1/deliveries`, `GET /v1/deliveries/{id}`,
//! `POST /v1/deliveries/{id}/replay`; and the tenant's usage, `GET /v1/usage`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use signalops_core::delivery::{DeliveryRecord, DeliveryStatus};
use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::model::{format_ms, now_ms};
use signalops_store::DeliveryQuery;

use super::events::time_param;
use super::{AppState, AuthTenant};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/deliveries", get(list))
        .route("/v1/deliveries/{id}", get(one))
        .route("/v1/deliveries/{id}/replay", post(replay))
        .route("/v1/usage", get(usage))
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
const DAY_MS: i64 = 86_400_000;

#[derive(Deserialize, Default)]
struct ListParams {
    channel_id: Option<String>,
    alert_id: Option<String>,
    status: Option<String>,
    from: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let limit = match &p.limit {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::bad_request("limit", format!("`limit` must be 1 to {MAX_LIMIT}"))),
        },
    };
    let status = match p.status.as_deref() {
        None => None,
        Some(s) => Some(
            DeliveryStatus::parse(s)
                .ok_or_else(|| ApiError::bad_request("status", "`status` is pending, delivered or failed"))?,
        ),
    };
    let alert_id = match &p.alert_id {
        None => None,
        Some(a) => {
            Some(Uuid::parse_str(a).map_err(|_| ApiError::bad_request("alert_id", "`alert_id` must be an alert id"))?)
        }
    };
    let after = match &p.cursor {
        None => None,
        Some(c) => {
            Some(Uuid::parse_str(c).map_err(|_| ApiError::bad_request("cursor", "`cursor` is not one this API gave"))?)
        }
    };
    let query = DeliveryQuery {
        channel_id: p.channel_id.clone(),
        alert_id,
        status,
        from_ms: time_param("from", &p.from)?,
        limit,
        after,
    };
    let page =
        state.store.query_deliveries(tenant.id, query).await.map_err(|e| ApiError::internal("deliveries", &e))?;
    let deliveries: Vec<Value> = page.deliveries.iter().map(DeliveryRecord::view).collect();
    Ok(Json(json!({ "deliveries": deliveries, "next_cursor": page.next })))
}

async fn find(state: &AppState, tenant: Uuid, id: &str) -> Result<DeliveryRecord, ApiError> {
    let not_found = || ApiError::not_found(format!("no delivery `{id}`"));
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    state.store.get_delivery(tenant, uuid).await.map_err(|e| ApiError::internal("delivery", &e))?.ok_or_else(not_found)
}

async fn one(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(find(&state, tenant.id, &id).await?.view()))
}

async fn replay(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = find(&state, tenant.id, &id).await?;
    if record.status == DeliveryStatus::Pending {
        return Err(ApiError::new(ErrorKind::Conflict, "the delivery is still pending; it is retried on its schedule"));
    }
    let record = replay_record(&state, record).await?;
    Ok((StatusCode::ACCEPTED, Json(record.view())).into_response())
}

/// Queues a finished delivery again as a new run (same delivery and webhook id; the retry
/// schedule starts over). The record is written first: no worker holds a finished delivery, and
/// the job of the new run only exists once it is published.
pub(crate) async fn replay_record(state: &AppState, record: DeliveryRecord) -> Result<DeliveryRecord, ApiError> {
    // One replay at a time on this node, each re-reading the record: two requests for the same
    // delivery cannot both start a run.
    static REPLAYS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = REPLAYS.lock().await;
    let tenant = record.job.tenant_id;
    let current = state.store.get_delivery(tenant, record.id()).await.map_err(|e| ApiError::internal("replay", &e))?;
    let Some(mut record) = current else { return Err(ApiError::not_found(format!("no delivery `{}`", record.id()))) };
    if record.status == DeliveryStatus::Pending {
        return Err(ApiError::new(ErrorKind::Conflict, "the delivery is still pending; it is retried on its schedule"));
    }
    let previous = record.clone();
    record.job.run += 1;
    record.status = DeliveryStatus::Pending;
    record.run_attempts = 0;
    record.next_attempt_at_ms = None;
    record.updated_at_ms = now_ms();
    let write = |r: DeliveryRecord| state.store.put_deliveries(vec![r], now_ms());
    write(record.clone()).await.map_err(|e| ApiError::internal("replay", &e))?;
    if let Err(e) = state.notifier.queue().publish(std::slice::from_ref(&record.job)).await {
        tracing::warn!(delivery_id = %record.id(), error = %e, "cannot queue replay");
        // Put the finished record back, unless a worker got the job after all (the publish
        // may have reached JetStream without its acknowledgement reaching us).
        let now = state.store.get_delivery(tenant, record.id()).await.ok().flatten();
        if now.is_some_and(|r| {
            r.job.run == record.job.run
                && r.status == DeliveryStatus::Pending
                && r.attempts.len() == previous.attempts.len()
        }) {
            if let Err(e) = write(previous).await {
                tracing::error!(delivery_id = %record.id(), error = %e, "cannot restore delivery record after a failed replay");
            }
        }
        return Err(ApiError::unavailable("the job stream did not take the replay; retry", 1));
    }
    Ok(record)
}

#[derive(Deserialize, Default)]
struct UsageParams {
    from: Option<String>,
    to: Option<String>,
}

/// Per-day usage: `{"usage": [{"day": "2026-11-23", "notifications_sent": 3}]}` (UTC days,
/// default the last 30).
async fn usage(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let to = time_param("to", &p.to)?.unwrap_or_else(now_ms);
    let from = time_param("from", &p.from)?.unwrap_or(to - 30 * DAY_MS);
    if from > to {
        return Err(ApiError::bad_request("from", "`from` must not be after `to`"));
    }
    let days = state
        .store
        .usage(tenant.id, from.div_euclid(DAY_MS), to.div_euclid(DAY_MS) + 1)
        .await
        .map_err(|e| ApiError::internal("usage", &e))?;
    let mut out: Vec<serde_json::Map<String, Value>> = Vec::new();
    for d in days {
        let day = format_ms(d.day * DAY_MS)[..10].to_owned();
        if out.last().and_then(|m| m.get("day")).and_then(Value::as_str) != Some(day.as_str()) {
            let mut m = serde_json::Map::new();
            m.insert("day".into(), Value::String(day));
            out.push(m);
        }
        if let Some(m) = out.last_mut() {
            m.insert(d.metric, Value::from(d.count));
        }
    }
    Ok(Json(json!({ "usage": out })))
}
