//! The ingest path shared by HTTP and NATS: decode, validate, rate-limit, deduplicate, publish,
//! and answer only after JetStream acknowledged every event.
//!
//! Deduplication has two layers. An event with an idempotency key (`id` given by the producer,
//! or the `Idempotency-Key` header: `<key>` for a single event, `<key>#<index>` per event of a
//! batch) is first looked up in the store's durable records (the long window, default 24 h);
//! then it is published with `Nats-Msg-Id`, so a retry racing the first attempt inside the
//! JetStream duplicate window is dropped by JetStream and answered with the first event's id.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{Quota, RateLimiter};
use serde::Serialize;
use serde_json::Value;

use signalops_control::state::Tenant;
use signalops_core::config::IngestConfig;
use signalops_core::error::{ApiError, ErrorKind};
use signalops_core::model::{self, OutgoingEvent, TenantId};
use signalops_store::EventStore;

use crate::eventlog::{EventLog, Published};
use crate::telemetry;

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct IngestResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub events: Vec<EventStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct EventStatus {
    pub id: String,
    pub status: String,
}

/// Body encodings the ingest endpoints read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MessagePack,
}

impl Encoding {
    /// From a `Content-Type` value; a missing type means JSON.
    pub fn from_content_type(ct: Option<&str>) -> Result<Encoding, ApiError> {
        let Some(ct) = ct else { return Ok(Encoding::Json) };
        let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" | "" => Ok(Encoding::Json),
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => Ok(Encoding::MessagePack),
            other => Err(ApiError::new(
                ErrorKind::UnsupportedMediaType,
                format!("content type `{other}` is not accepted; send application/json or application/msgpack"),
            )
            .with_field("content-type")),
        }
    }
}

/// Decodes a MessagePack body (JSON bodies are read by [`crate::jsonbody`]).
pub fn decode_msgpack(body: &[u8]) -> Result<Value, ApiError> {
    let mut de = rmp_serde::Deserializer::new(body);
    let v: Value = serde::Deserialize::deserialize(&mut de)
        .map_err(|e| ApiError::bad_request("", format!("malformed MessagePack: {e}")))?;
    if !de.get_ref().is_empty() {
        return Err(ApiError::bad_request("", "malformed MessagePack: trailing bytes after the body"));
    }
    Ok(v)
}

type Limiter = RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, governor::clock::DefaultClock>;

/// Per-tenant ingest rate limits (GCRA, burst of one second's worth).
#[derive(Default)]
struct RateLimits {
    limiters: Mutex<HashMap<TenantId, (u32, Arc<Limiter>)>>,
}

impl RateLimits {
    fn check(&self, tenant: TenantId, rate: u32, events: u32) -> Result<(), ApiError> {
        let Some(per_sec) = NonZeroU32::new(rate) else { return Ok(()) };
        let limiter = {
            let mut map = match self.limiters.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            let entry =
                map.entry(tenant).or_insert_with(|| (0, Arc::new(RateLimiter::direct(Quota::per_second(per_sec)))));
            if entry.0 != rate {
                *entry = (rate, Arc::new(RateLimiter::direct(Quota::per_second(per_sec))));
            }
            entry.1.clone()
        };
        let n = NonZeroU32::new(events.max(1)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(ApiError {
                    retry_after: Some(secs.max(1)),
                    ..ApiError::new(ErrorKind::TooManyRequests, format!("the tenant's ingest limit of {rate} events/s is exhausted"))
                })
            }
            Err(_) => Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    ErrorKind::TooManyRequests,
                    format!("a request of {events} events exceeds the tenant's limit of {rate} events/s; send smaller batches"),
                )
                .with_field("events")
            }),
        }
    }
}

/// Everything one ingest request carries, whatever the transport.
pub struct IngestRequest<'a> {
    pub tenant: &'a Tenant,
    pub content_type: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub body: &'a [u8],
    pub transport: &'static str,
}

/// The ingest service. Cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    inner: Arc<Inner>,
}

struct Inner {
    log: EventLog,
    store: Arc<dyn EventStore>,
    cfg: IngestConfig,
    limits: RateLimits,
}

impl Ingestor {
    pub fn new(log: EventLog, store: Arc<dyn EventStore>, cfg: IngestConfig) -> Self {
        Ingestor { inner: Arc::new(Inner { log, store, cfg, limits: RateLimits::default() }) }
    }

    pub fn max_body_bytes(&self) -> usize {
        self.inner.cfg.max_body_bytes
    }

    /// Runs one request and records its metrics.
    pub async fn ingest(&self, req: IngestRequest<'_>) -> Result<IngestResponse, ApiError> {
        let started = Instant::now();
        let transport = req.transport;
        let result = self.ingest_inner(req).await;
        metrics::histogram!(telemetry::INGEST_DURATION, "transport" => transport)
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok(r) => {
                metrics::counter!(telemetry::INGEST_REQUESTS, "transport" => transport, "outcome" => "ok").increment(1);
                metrics::counter!(telemetry::INGEST_EVENTS, "transport" => transport, "outcome" => "accepted")
                    .increment(r.accepted as u64);
                metrics::counter!(telemetry::INGEST_EVENTS, "transport" => transport, "outcome" => "duplicate")
                    .increment(r.duplicates as u64);
            }
            Err(e) => {
                let code = e.status().as_u16().to_string();
                metrics::counter!(telemetry::INGEST_REQUESTS, "transport" => transport, "outcome" => code).increment(1);
            }
        }
        result
    }

    async fn ingest_inner(&self, req: IngestRequest<'_>) -> Result<IngestResponse, ApiError> {
        let cfg = &self.inner.cfg;
        if req.body.len() > cfg.max_body_bytes {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("the body is {} bytes; the limit is {}", req.body.len(), cfg.max_body_bytes),
            ));
        }
        let encoding = Encoding::from_content_type(req.content_type)?;
        if let Some(k) = req.idempotency_key {
            if !model::valid_name(k) {
                return Err(ApiError::bad_request(
                    "Idempotency-Key",
                    "the Idempotency-Key header must be 1-128 characters of [A-Za-z0-9_.:-]",
                ));
            }
        }
        let tenant = req.tenant;
        let now = model::now_ms();
        // The header's key for event `i`, for events without their own id.
        let header_key = |i: usize, batch: bool| {
            req.idempotency_key.map(|k| if batch { format!("key:{k}#{i}") } else { format!("key:{k}") })
        };
        let encode_error = |prefix: model::EventPath, e: rmp_serde::encode::Error| {
            ApiError::bad_request(format!("{prefix}payload"), format!("the event cannot be encoded: {e}"))
        };
        let records = match encoding {
            Encoding::Json => {
                let body = crate::jsonbody::parse(req.body, cfg.max_batch_events)?;
                let mut records = Vec::with_capacity(body.events.len());
                for (i, ev) in body.events.into_iter().enumerate() {
                    let prefix = model::EventPath(body.batch.then_some(i));
                    let mut fields = model::validate_fields(ev.fields, prefix, now)?;
                    let payload = match ev.payload {
                        Some(raw) if model::check_json_payload(raw.get(), prefix)? => Some(raw.get()),
                        _ => None,
                    };
                    if fields.idempotency_key.is_none() {
                        fields.idempotency_key = header_key(i, body.batch);
                    }
                    let rec = OutgoingEvent::encode_json(fields, payload, tenant.id, now);
                    records.push(rec.map_err(|e| encode_error(prefix, e))?);
                }
                records
            }
            Encoding::MessagePack => {
                let parsed = model::split_body(decode_msgpack(req.body)?, cfg.max_batch_events)?;
                let mut records = Vec::with_capacity(parsed.events.len());
                for (i, obj) in parsed.events.into_iter().enumerate() {
                    let prefix = model::EventPath(parsed.batch.then_some(i));
                    let mut rec = model::validate_event(obj, prefix, tenant.id, now)?;
                    if rec.idempotency_key.is_none() {
                        rec.idempotency_key = header_key(i, parsed.batch);
                    }
                    records.push(OutgoingEvent::encode(rec).map_err(|e| encode_error(prefix, e))?);
                }
                records
            }
        };
        let rate = tenant.limits.events_per_second.unwrap_or(cfg.default_events_per_second);
        self.inner.limits.check(tenant.id, rate, records.len() as u32)?;
        self.publish(records, now).await
    }

    async fn publish(&self, records: Vec<OutgoingEvent>, now: i64) -> Result<IngestResponse, ApiError> {
        // Long-window deduplication against the store's durable records, one lookup per request.
        let keyed: Vec<usize> = (0..records.len()).filter(|&i| records[i].idempotency_key.is_some()).collect();
        let keys: Vec<String> = keyed.iter().filter_map(|&i| records[i].idempotency_key.clone()).collect();
        let mut first_ids: Vec<Option<String>> = vec![None; records.len()];
        if let Some(tenant) = records.first().map(|r| r.tenant_id) {
            let found = self
                .inner
                .store
                .find_idempotent(tenant, keys, now)
                .await
                .map_err(|e| ApiError::internal("idempotency lookup", &e))?;
            for (i, id) in keyed.into_iter().zip(found) {
                first_ids[i] = id;
            }
        }
        let mut statuses: Vec<Option<EventStatus>> = Vec::with_capacity(records.len());
        let mut to_publish = Vec::with_capacity(records.len());
        let mut slots = Vec::with_capacity(records.len());
        for (i, (rec, first)) in records.into_iter().zip(first_ids).enumerate() {
            if let Some(first_id) = first {
                statuses.push(Some(EventStatus { id: first_id, status: "duplicate".into() }));
                continue;
            }
            statuses.push(None);
            slots.push(i);
            to_publish.push(rec);
        }
        let timeout = Duration::from_millis(self.inner.cfg.publish_timeout_ms);
        let started = Instant::now();
        let results = self.inner.log.publish(&to_publish, timeout).await;
        metrics::histogram!(telemetry::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
        let mut failures = Vec::new();
        for ((slot, rec), result) in slots.into_iter().zip(to_publish).zip(results) {
            let status = match result {
                Published::Stored => EventStatus { id: rec.id, status: "accepted".into() },
                Published::Duplicate(seq) => match self.inner.log.read(seq).await {
                    Ok(first) => EventStatus { id: first.id, status: "duplicate".into() },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the first copy of a duplicate");
                        EventStatus { id: rec.id, status: "duplicate".into() }
                    }
                },
                Published::Failed(reason) => {
                    failures.push(reason);
                    EventStatus { id: rec.id, status: "failed".into() }
                }
            };
            statuses[slot] = Some(status);
        }
        let events: Vec<EventStatus> = statuses.into_iter().flatten().collect();
        if !failures.is_empty() {
            tracing::warn!(failed = failures.len(), first = %failures[0], "events not acknowledged by JetStream");
            let detail = serde_json::json!({ "events": events });
            return Err(ApiError::unavailable(
                format!(
                    "JetStream did not acknowledge {} of {} events in time; the others are durable. Retry with the same ids or Idempotency-Key to fill the gap without duplicates.",
                    failures.len(),
                    events.len()
                ),
                1,
            )
            .with_extra(detail));
        }
        let accepted = events.iter().filter(|e| e.status == "accepted").count();
        Ok(IngestResponse { accepted, duplicates: events.len() - accepted, events })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(Encoding::from_content_type(None).ok(), Some(Encoding::Json));
        assert_eq!(Encoding::from_content_type(Some("application/json; charset=utf-8")).ok(), Some(Encoding::Json));
        assert_eq!(Encoding::from_content_type(Some("application/msgpack")).ok(), Some(Encoding::MessagePack));
        let e = Encoding::from_content_type(Some("text/plain")).err().unwrap();
        assert_eq!(e.status().as_u16(), 415);
    }

    #[test]
    fn msgpack_decodes_and_rejects_garbage() {
        let v = serde_json::json!({"type": "a", "payload": {"n": 1}});
        let bytes = rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(decode_msgpack(&bytes).unwrap(), v);
        assert!(decode_msgpack(&[0xc1]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0x01);
        assert!(decode_msgpack(&trailing).is_err());
        assert!(crate::jsonbody::parse(b"{\"type\":", 10).is_err());
    }

    #[test]
    fn rate_limit_answers_retry_after() {
        let limits = RateLimits::default();
        let t = uuid::Uuid::now_v7();
        assert!(limits.check(t, 0, 1000).is_ok(), "0 means unlimited");
        assert!(limits.check(t, 5, 5).is_ok());
        let e = limits.check(t, 5, 1).unwrap_err();
        assert_eq!(e.status().as_u16(), 429);
        assert!(e.retry_after.unwrap_or(0) >= 1);
        let e = limits.check(uuid::Uuid::now_v7(), 5, 6).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("events"));
    }
}
