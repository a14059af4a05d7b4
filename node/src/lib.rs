//! SignalOps node.
//!
//! Modules, in the order an event meets them:
//! - [`api`]: HTTP routers (`/v1/events`, `/v1/admin`, health and metrics) over [`api::AppState`].
//! - [`nats_ingest`]: the `signalops.v1.ingest` NATS subject (queue group).
//! - [`ingest`]: decode, validate ([`model`]), authenticate ([`auth`]), rate-limit, deduplicate
//!   and publish; shared by both transports.
//! - [`eventlog`]: the JetStream event stream and its partitioning.
//! - [`processor`]: partition owners: consume, store, evaluate rules, commit effects, ack.
//! - [`rules`]: rule definitions, the per-partition rule engine, alerts and silences.
//! - [`store`]: the store trait, the embedded (fjall) backend and the conformance suite.
//! - [`cluster`]: the openraft control plane (tenants, API keys, rules, silences) with NATS as
//!   its transport.
//! - [`node`]: start-up and ordered shutdown; [`natsd`] supervises `dev`'s nats-server;
//!   [`dev`] creates the dev tenant; [`config`] layers the configuration; [`telemetry`] names
//!   the metrics.
//!
//! Tasks running in a node: the HTTP server, the NATS ingest subscriber, per partition a
//! reader, an evaluator and an acker, the store writer, the leader's clock ticker, the
//! consumer-lag reporter, the hourly idempotency purge, Raft and its RPC server.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod dev;
pub mod error;
pub mod eventlog;
pub mod ingest;
pub mod jsonbody;
pub mod model;
pub mod nats_ingest;
pub mod natsd;
pub mod node;
pub mod notify;
pub mod plugins;
pub mod processor;
pub mod rules;
pub mod store;
pub mod telemetry;
