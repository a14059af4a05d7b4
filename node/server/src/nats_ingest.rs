//! Ingest over NATS: `signalops.v1.ingest` in the queue group `signalops-ingest`, so any node
//! serves it. Headers: `Authorization: Bearer <key>`, optional `Content-Type` and
//! `Idempotency-Key`. With a reply subject the reply is the HTTP 2xx JSON body, or a problem
//! document; the `Status` header carries the HTTP-equivalent code either way. Without a reply
//! subject failures are counted (`signalops_nats_ingest_failures_total`) and logged.

use std::sync::Arc;

use async_nats::HeaderMap;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use signalops_control::ControlPlane;
use signalops_core::error::ApiError;

use crate::ingest::{IngestRequest, Ingestor};
use crate::telemetry;

pub const QUEUE_GROUP: &str = "signalops-ingest";
const MAX_IN_FLIGHT: usize = 512;

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

pub async fn serve(
    client: async_nats::Client,
    subject: String,
    control: ControlPlane,
    ingestor: Ingestor,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = client.queue_subscribe(subject.clone(), QUEUE_GROUP.to_string()).await?;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    tracing::info!(%subject, "serving NATS ingest");
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            m = sub.next() => match m {
                Some(m) => m,
                None => anyhow::bail!("NATS ingest subscription closed"),
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let client = client.clone();
        let control = control.clone();
        let ingestor = ingestor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let headers = msg.headers.as_ref();
            let auth = header(headers, "Authorization")
                .and_then(|v| v.trim().strip_prefix("Bearer ").map(str::trim))
                .or_else(|| header(headers, "x-api-key"));
            let result = match crate::auth::tenant_for(&control, auth) {
                Ok(tenant) => {
                    ingestor
                        .ingest(IngestRequest {
                            tenant: &tenant,
                            content_type: header(headers, "Content-Type"),
                            idempotency_key: header(headers, "Idempotency-Key"),
                            body: &msg.payload,
                            transport: "nats",
                        })
                        .await
                }
                Err(e) => Err(e),
            };
            let (status, body) = match &result {
                Ok(r) => (202u16, serde_json::to_vec(r)),
                Err(e) => (e.status().as_u16(), serde_json::to_vec(&e.problem())),
            };
            match msg.reply {
                Some(reply) => {
                    let mut h = HeaderMap::new();
                    h.insert("Status", status.to_string().as_str());
                    let ct = if result.is_ok() { "application/json" } else { "application/problem+json" };
                    h.insert("Content-Type", ct);
                    let body = body.unwrap_or_default();
                    if let Err(e) = client.publish_with_headers(reply, h, body.into()).await {
                        tracing::warn!(error = %e, "cannot send NATS ingest reply");
                    }
                }
                None => {
                    if let Err(e) = &result {
                        log_fire_and_forget_failure(e);
                    }
                }
            }
        });
    }
    Ok(())
}

fn log_fire_and_forget_failure(e: &ApiError) {
    metrics::counter!(telemetry::NATS_PUBLISH_FAILURES, "status" => e.status().as_u16().to_string()).increment(1);
    tracing::warn!(status = e.status().as_u16(), field = e.field.as_deref(), detail = %e.detail, "NATS ingest publish rejected");
}
