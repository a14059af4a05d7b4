//! What the tenant's events look like: `GET /v1/metrics/series` (per-type counts and sums in
//! 1-minute or 1-hour buckets) and `GET /v1/catalog` (event types with their payload fields).

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use signalops_core::effects::{json_type, SeriesPoint};
use signalops_core::error::ApiError;
use signalops_core::model::{format_ms, now_ms, valid_type};

use super::events::time_param;
use super::{AppState, AuthTenant};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/metrics/series", get(series)).route("/v1/catalog", get(catalog))
}

/// Most points one series request returns.
const MAX_POINTS: i64 = 10_080;

#[derive(Deserialize)]
struct SeriesParams {
    #[serde(rename = "type")]
    event_type: Option<String>,
    interval: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// Points are bucketed by `occurred_at`; empty buckets are omitted. `from` defaults to one hour
/// (1m) or one day (1h) before `to`, which defaults to now.
async fn series(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    params: Result<Query<SeriesParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let event_type = p.event_type.ok_or_else(|| ApiError::bad_request("type", "`type` is required"))?;
    if !valid_type(&event_type) {
        return Err(ApiError::bad_request("type", "`type` is not a valid event type"));
    }
    let (interval, minutes) = match p.interval.as_deref().unwrap_or("1m") {
        "1m" => ("1m", 1i64),
        "1h" => ("1h", 60i64),
        _ => return Err(ApiError::bad_request("interval", "`interval` must be 1m or 1h")),
    };
    let to_ms = time_param("to", &p.to)?.unwrap_or_else(now_ms);
    let from_ms = time_param("from", &p.from)?.unwrap_or(to_ms - minutes * 60 * 60_000);
    if from_ms >= to_ms {
        return Err(ApiError::bad_request("from", "`from` must be before `to`"));
    }
    let step = minutes * 60_000;
    let from_bucket = from_ms.div_euclid(step);
    let to_bucket = (to_ms - 1).div_euclid(step) + 1;
    if to_bucket - from_bucket > MAX_POINTS {
        return Err(ApiError::bad_request("from", format!("a request spans at most {MAX_POINTS} intervals")));
    }
    let raw = state
        .store
        .series(tenant.id, &event_type, from_bucket * minutes, to_bucket * minutes)
        .await
        .map_err(|e| ApiError::internal("series read", &e))?;
    let mut buckets: BTreeMap<i64, SeriesPoint> = BTreeMap::new();
    for (minute, point) in raw {
        buckets.entry(minute.div_euclid(minutes)).or_default().merge(&point);
    }
    let points: Vec<_> =
        buckets.into_iter().map(|(b, p)| json!({"t": format_ms(b * step), "count": p.count, "sums": p.sums})).collect();
    Ok(Json(json!({
        "type": event_type,
        "interval": interval,
        "from": format_ms(from_bucket * step),
        "to": format_ms(to_bucket * step),
        "points": points,
    }))
    .into_response())
}

async fn catalog(State(state): State<AppState>, AuthTenant(tenant): AuthTenant) -> Result<Response, ApiError> {
    let entries = state.store.catalog(tenant.id).await.map_err(|e| ApiError::internal("catalog read", &e))?;
    let types: Vec<_> = entries
        .iter()
        .map(|(name, e)| {
            let fields: Vec<_> =
                e.fields.iter().map(|(path, bits)| json!({"path": path, "types": json_type::names(*bits)})).collect();
            json!({
                "type": name,
                "count": e.count,
                "first_seen": format_ms(e.first_seen_ms),
                "last_seen": format_ms(e.last_seen_ms),
                "fields": fields,
                "fields_truncated": e.fields_truncated,
            })
        })
        .collect();
    Ok(Json(json!({ "event_types": types })).into_response())
}
