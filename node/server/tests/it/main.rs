//! Integration tests through a real node: real nats-server, real HTTP, real store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod cluster;
mod durability;
mod errors;
mod harness;
mod idempotency;
mod ingest;
mod nats;
mod notify;
mod plugins;
mod rules;
