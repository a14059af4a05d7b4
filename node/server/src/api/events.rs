//! `POST /v1/events` (ingest) and `GET /v1/events`, `GET /v1/events/{id}` (query).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;

use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::model::parse_time;
use signalops_store::{EventQuery, PageCursor};

use super::{AppState, AuthTenant};
use crate::ingest::IngestRequest;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/events", get(list).post(ingest)).route("/v1/events/{id}", get(one))
}

async fn ingest(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("the body exceeds the limit of {} bytes", state.ingestor.max_body_bytes()),
        ),
        _ => ApiError::bad_request("", format!("cannot read the body: {e}")),
    })?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let resp = state
        .ingestor
        .ingest(IngestRequest {
            tenant: &tenant,
            content_type: header("content-type"),
            idempotency_key: header("idempotency-key"),
            body: &body,
            transport: "http",
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(resp)).into_response())
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(rename = "type")]
    event_type: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

const MAX_LIMIT: usize = 1000;

fn encode_cursor(c: &PageCursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", c.occurred_at_ms, c.id))
}

fn decode_cursor(s: &str) -> Option<PageCursor> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (ms, id) = text.split_once('.')?;
    Some(PageCursor { occurred_at_ms: ms.parse().ok()?, id: id.to_string() })
}

pub(crate) fn time_param(name: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => parse_time(s)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(name, format!("`{name}` must be an RFC 3339 timestamp"))),
    }
}

async fn list(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let limit = match &p.limit {
        None => 100,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::bad_request("limit", format!("`limit` must be 1 to {MAX_LIMIT}"))),
        },
    };
    if let Some(t) = &p.event_type {
        if !signalops_core::model::valid_type(t) {
            return Err(ApiError::bad_request("type", "`type` is not a valid event type"));
        }
    }
    let after = match &p.cursor {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::bad_request("cursor", "`cursor` is not a cursor from this API"))?,
        ),
    };
    let query = EventQuery {
        event_type: p.event_type.clone(),
        from_ms: time_param("from", &p.from)?,
        to_ms: time_param("to", &p.to)?,
        limit,
        after,
    };
    let page = state.store.query(tenant.id, query).await.map_err(|e| ApiError::internal("event query", &e))?;
    let events: Vec<_> = page.events.iter().map(|e| e.view()).collect();
    let next = page.next.as_ref().map(encode_cursor);
    Ok(Json(serde_json::json!({ "events": events, "next_cursor": next })).into_response())
}

async fn one(
    State(state): State<AppState>,
    AuthTenant(tenant): AuthTenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let found = state.store.get_event(tenant.id, &id).await.map_err(|e| ApiError::internal("event read", &e))?;
    match found {
        Some(ev) => Ok(Json(ev.view()).into_response()),
        None => Err(ApiError::not_found(format!("no event `{id}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_junk() {
        let c = PageCursor { occurred_at_ms: 1234, id: "a.b:c".into() };
        assert_eq!(decode_cursor(&encode_cursor(&c)), Some(c));
        assert_eq!(decode_cursor("!!"), None);
        assert_eq!(decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x.y")), None);
    }
}
