//! `/healthz` (the process answers), `/readyz` (NATS connected, stream present, store open,
//! this node has joined the control-plane cluster and knows its leader) and `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected;
    let stream = nats && state.log.check().await;
    let store = state.store.check().await.is_ok();
    let control = state.control.joined();
    let ready = nats && stream && store && control;
    let body =
        json!({"ready": ready, "checks": {"nats": nats, "stream": stream, "store": store, "control_plane": control}});
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
