//! RFC 9457 problem details: the one error shape every HTTP and NATS reply uses.
//!
//! Modules return their own typed errors; at the API edge they become an [`ApiError`], whose
//! [`ErrorKind`] decides the status. Internal errors answer an opaque 500 and log their cause once.

use axum_core::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

/// The bounded set of outcomes an API error maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    /// Well-formed but refused (a module that fails validation).
    Unprocessable,
    PayloadTooLarge,
    UnsupportedMediaType,
    TooManyRequests,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unprocessable => "unprocessable",
            ErrorKind::PayloadTooLarge => "payload-too-large",
            ErrorKind::UnsupportedMediaType => "unsupported-media-type",
            ErrorKind::TooManyRequests => "rate-limited",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// A request-level error carrying everything the problem document shows.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub detail: String,
    /// The request field at fault, as a JSON-pointer-like path (`events[3].type`).
    pub field: Option<String>,
    /// Seconds the client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
    /// Extra members merged into the problem document.
    pub extra: Option<serde_json::Value>,
}

/// The serialized problem document (RFC 9457), also sent as a NATS reply body.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ApiError { kind, detail: detail.into(), field: None, retry_after: None, extra: None }
    }

    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::BadRequest, detail).with_field(field)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::NotFound, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Unauthorized, detail)
    }

    pub fn unavailable(detail: impl Into<String>, retry_after: u64) -> Self {
        ApiError { retry_after: Some(retry_after), ..ApiError::new(ErrorKind::Unavailable, detail) }
    }

    /// An internal failure: the cause is logged here, the client sees an opaque message.
    pub fn internal(context: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, context, "internal error");
        ApiError::new(ErrorKind::Internal, "internal error; the cause was logged on the node")
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(extra);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn problem(&self) -> Problem {
        let status = self.status();
        Problem {
            type_uri: format!("https://signalops.dev/problems/{}", self.kind.slug()),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            status: status.as_u16(),
            detail: self.detail.clone(),
            field: self.field.clone(),
            retry_after: self.retry_after,
            extra: self.extra.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({}): {}", self.status(), field, self.detail),
            None => write!(f, "{}: {}", self.status(), self.detail),
        }
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
