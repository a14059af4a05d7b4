//! Declarative rules and alerts.
//!
//! - [`spec`]: the rule definition tenants write, and its validation.
//! - [`filter`]: field paths, conditions and event-type patterns, compiled for evaluation.
//! - [`compiled`]: rules as the control plane stores them and as the engine runs them.
//! - [`window`]: sliding event-time windows.
//! - [`engine`]: the per-partition evaluator and its exactly-once effects ([`effects`]).
//! - [`catalog`]: the payload fields seen per event type.
//! - [`alert`]: alerts and silences.

pub mod alert;
pub mod catalog;
pub mod compiled;
pub mod effects;
pub mod engine;
pub mod filter;
pub mod replay;
pub mod spec;
pub mod window;
