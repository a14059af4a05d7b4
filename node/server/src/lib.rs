//! SignalOps node: the top of the crate graph, where the parts meet and run.
//!
//! Modules, in the order an event meets them:
//! - [`api`]: HTTP routers (`/v1/events`, `/v1/admin`, health and metrics) over [`api::AppState`].
//! - [`nats_ingest`]: the `signalops.v1.ingest` NATS subject (queue group).
//! - [`ingest`]: decode ([`jsonbody`]), validate, authenticate ([`auth`]), rate-limit,
//!   deduplicate and publish; shared by both transports.
//! - [`eventlog`]: the JetStream event stream and its partitioning.
//! - [`processor`]: partition owners: consume, store, evaluate rules, commit effects, ack.
//! - [`node`]: start-up and ordered shutdown; [`natsd`] supervises `dev`'s nats-server;
//!   [`dev`] creates the dev tenant; [`telemetry`] installs the metrics recorder and logging.
//!
//! The crates below it, each using only those listed before it:
//! `signalops-core` (shared types and configuration), `signalops-store` (storage),
//! `signalops-plugins` (the WASM host), `signalops-rules` (the rule engine),
//! `signalops-notify` (channels and delivery), `signalops-control` (the Raft control plane).
//!
//! Tasks running in a node: the HTTP server, the NATS ingest subscriber, per partition a
//! reader, an evaluator and an acker, the store writer, the leader's clock ticker, the
//! consumer-lag reporter, the hourly idempotency purge, Raft and its RPC server.

pub mod api;
pub mod auth;
pub mod dev;
pub mod eventlog;
pub mod ingest;
pub mod jsonbody;
pub mod nats_ingest;
pub mod natsd;
pub mod node;
pub mod processor;
pub mod telemetry;
