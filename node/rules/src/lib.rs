//! Declarative rules and alerts.
//!
//! - [`spec`]: the rule definition tenants write, and its validation.
//! - [`filter`]: field paths, conditions and event-type patterns, compiled for evaluation.
//! - [`compiled`]: rules as the control plane stores them and as the engine runs them.
//! - [`window`]: sliding event-time windows.
//! - [`engine`]: the per-partition evaluator and its exactly-once effects
//!   ([`signalops_core::effects`]).
//! - [`catalog`]: the payload fields seen per event type.
//! - [`replay`]: evaluating a rule over stored events without effects (rule tests).
//!
//! - [`template`]: the message templates of a rule's actions (checked here, rendered by notify).
//!
//! Alerts and silences are `signalops_core::alert`'s. Uses `signalops-core` and
//! `signalops-plugins` (rule plugins are called from the engine); never the store, NATS, HTTP
//! or the control plane.

pub mod catalog;
pub mod compiled;
pub mod engine;
pub mod filter;
pub mod replay;
pub mod spec;
pub mod template;
pub mod window;
