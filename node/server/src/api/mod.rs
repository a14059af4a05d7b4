//! The HTTP API: one router per resource, merged here, over a small cloneable [`AppState`].
//! Handlers get the caller's tenant from the [`AuthTenant`] extractor, so no handler can forget
//! tenant scoping; operator routes take [`Operator`].

pub mod admin;
pub mod alerts;
pub mod channels;
pub mod deliveries;
pub mod events;
pub mod health;
pub mod insights;
pub mod plugins;
pub mod rules;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;

use signalops_control::state::Tenant;
use signalops_control::ControlPlane;
use signalops_core::error::{ApiError, ErrorKind};
use signalops_store::EventStore;

use crate::eventlog::EventLog;
use crate::ingest::Ingestor;

/// What every handler gets: shared services behind one `Arc`, so that handing the state to a
/// request (axum clones it for each) is one reference-count increment.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> AppState {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

pub struct Services {
    pub control: ControlPlane,
    pub ingestor: Ingestor,
    pub store: Arc<dyn EventStore>,
    pub log: EventLog,
    pub nats: async_nats::Client,
    pub metrics: PrometheusHandle,
    /// SHA-256 digest (hex) of the operator token.
    pub admin_digest: Arc<String>,
    pub rules: signalops_core::config::RulesConfig,
    pub rule_stats: crate::processor::RuleStatsRegistry,
    pub plugins: signalops_plugins::PluginServices,
    pub plugin_cfg: signalops_core::config::PluginsConfig,
    pub notifier: std::sync::Arc<signalops_notify::Notifier>,
    pub notify_cfg: signalops_core::config::NotifyConfig,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(events::router())
        .merge(admin::router())
        .merge(rules::router())
        .merge(alerts::router())
        .merge(insights::router())
        .merge(plugins::router())
        .merge(channels::router())
        .merge(deliveries::router())
        .merge(health::router())
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The JSON body of a request, or a problem naming what is wrong with it.
pub(crate) fn json_body(body: Result<Json<Value>, JsonRejection>) -> Result<Value, ApiError> {
    body.map(|Json(v)| v).map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "the body must be JSON with `Content-Type: application/json`",
        ),
        other => ApiError::bad_request("", other.body_text()),
    })
}

/// The tenant of the request's API key.
pub struct AuthTenant(pub Tenant);

impl FromRequestParts<AppState> for AuthTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        crate::auth::tenant_for(&state.control, crate::auth::credential(&parts.headers)).map(AuthTenant)
    }
}

/// A request authenticated with the operator token.
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match crate::auth::credential(&parts.headers) {
            Some(token) if crate::auth::digest(token) == *state.admin_digest => Ok(Operator),
            Some(_) => Err(ApiError::unauthorized("the operator token is not valid")),
            None => Err(ApiError::unauthorized("the operator token is required: `Authorization: Bearer <token>`")),
        }
    }
}
