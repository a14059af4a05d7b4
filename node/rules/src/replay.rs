//! Offline evaluation for `POST /v1/rules/test` (dry-run over given events) and
//! `POST /v1/rules/{id}/backtest` (over stored events): the live engine, run on a private
//! partition with no store, collecting the alerts it would have written.
//!
//! Events are treated as arriving when they occurred (`received_at := occurred_at`), in the
//! order given. Between two events more than a second apart, a clock tick is inserted just
//! before the later one, as the leader's ticks would have been, so absence rules and pending
//! periods behave as they do live.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use signalops_core::alert::Alert;
use signalops_core::json::FieldError;
use signalops_core::model::EventRecord;
use signalops_plugins::{CallReport, PluginHost};

use crate::compiled::{CompiledRule, Plugins, Rule, RuleSet, TenantRules};
use crate::engine::{Engine, EngineConfig, EnginePlugins, Input};

/// One plugin call of a replay.
#[derive(Debug, Serialize)]
pub struct PluginCall {
    pub event_id: String,
    #[serde(flatten)]
    pub report: CallReport,
}

/// What a replay produced.
#[derive(Debug, Default)]
pub struct Replay {
    pub alerts: Vec<Alert>,
    /// Plugin rules: every call, in order.
    pub plugin_calls: Vec<PluginCall>,
}

/// The alerts a rule produces over `events`, each in its final state, in firing order.
/// `end_ms`, when given, adds a final tick (e.g. the end of a backtest range). A plugin rule's
/// plugin is resolved in `plugins` and run on `host` (with fresh plugin state).
pub fn run(
    rule: Rule,
    plugins: &Plugins,
    host: Option<PluginHost>,
    events: &mut [EventRecord],
    end_ms: Option<i64>,
    cfg: EngineConfig,
) -> Result<Replay, FieldError> {
    let tenant = rule.tenant_id;
    let compiled = CompiledRule::compile(rule, plugins)?;
    let mut rules = TenantRules::default();
    rules.push(compiled);
    let set = RuleSet { revision: 1, tenants: [(tenant, Arc::new(rules))].into_iter().collect() };
    let mut engine = Engine::new(0, cfg);
    if let Some(host) = host {
        engine.set_plugins(EnginePlugins {
            host,
            stats: None,
            max_consecutive_failures: u32::MAX,
            reports: Some(Vec::new()),
            pending: Default::default(),
        });
    }
    let mut seq = 0u64;
    let mut clock: Option<i64> = None;
    let mut alerts: Vec<Alert> = Vec::new();
    let mut index: HashMap<uuid::Uuid, usize> = HashMap::new();
    let mut collect = |engine: &mut Engine, alerts: &mut Vec<Alert>| {
        for a in engine.take_effects(false).alerts {
            match index.get(&a.id) {
                Some(&i) => alerts[i] = a,
                None => {
                    index.insert(a.id, alerts.len());
                    alerts.push(a);
                }
            }
        }
    };
    for ev in events.iter_mut() {
        ev.received_at_ms = ev.occurred_at_ms;
        if let Some(c) = clock {
            if ev.received_at_ms - c >= 1000 {
                seq += 1;
                engine.process(Input::Tick { seq, at_ms: ev.received_at_ms - 1 }, &set);
            }
        }
        clock = Some(clock.map_or(ev.received_at_ms, |c| c.max(ev.received_at_ms)));
        seq += 1;
        engine.process(Input::Event { seq, record: ev }, &set);
        collect(&mut engine, &mut alerts);
    }
    if let Some(end) = end_ms.or(clock) {
        seq += 1;
        engine.process(Input::Tick { seq, at_ms: end }, &set);
    }
    collect(&mut engine, &mut alerts);
    let plugin_calls = engine
        .plugins_mut()
        .and_then(|p| p.reports.take())
        .unwrap_or_default()
        .into_iter()
        .map(|(event_id, _, report)| PluginCall { event_id, report })
        .collect();
    Ok(Replay { alerts, plugin_calls })
}
