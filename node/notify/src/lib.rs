//! Notifications: channels (control-plane state), the job streams, delivery workers, the
//! outbound senders with their egress guard and Standard Webhooks signing.
//!
//! Flow: a partition owner turns each alert transition with actions into
//! [`signalops_core::delivery::Job`]s and publishes them to the job stream before it commits the
//! effects that produced them (so a crash in between republishes the same jobs, which JetStream
//! deduplicates). Workers on any node deliver them, record every attempt in the store and retry
//! on the channel's schedule.
//!
//! Uses `signalops-core`, `signalops-store` (delivery records, the events a message shows),
//! `signalops-plugins` (notifier plugins) and `signalops-rules` (the actions' message
//! templates). The control plane is above it: the worker reaches it through
//! [`worker::Directory`], which the control plane implements.

pub mod channel;
pub mod egress;
pub mod queue;
pub mod send;
pub mod sign;
pub mod worker;

pub use worker::Notifier;

use signalops_core::delivery::{jobs_for, Job};
use signalops_core::effects::PartitionEffects;

/// The jobs a run of engine effects makes, in transition order.
pub fn jobs_from_effects(effects: &PartitionEffects, now_ms: i64) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (id, transition) in &effects.transitions {
        // The last copy of the alert in this run is the one the store keeps.
        let Some(alert) = effects.alerts.iter().rev().find(|a| a.id == *id) else { continue };
        if alert.actions.is_empty() {
            continue;
        }
        jobs.extend(jobs_for(alert, *transition, now_ms));
    }
    jobs
}
