//! Rule-engine benchmark: events/s through one partition's engine with 0, 1, 10 and 100 active
//! declarative rules for the event's tenant, on one core. Each event is decoded from the log's
//! MessagePack (as partition owners do), evaluated, and its effects taken per 500-event batch
//! with a state checkpoint every 20,000 events (the checkpoint bytes written are reported per
//! event).
//!
//! Run: `cargo bench -p signalops-node --bench rules` (env: BENCH_EVENTS, BENCH_GROUPS, and
//! BENCH_RULES, the rule counts to run, default `1,10,100`).
//! Prints figures; asserts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use signalops_core::model::EncodedEvent;
use signalops_rules::compiled::{Rule, RuleSet, TenantRules};
use signalops_rules::engine::{Engine, EngineConfig, Input};
use signalops_rules::spec::{parse_rule, RuleLimits};
use uuid::Uuid;

mod common;
use common::env;
use common::payment_events;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A mix of the rule shapes tenants write, all matching the benchmark's event type.
fn rule(i: usize) -> Value {
    let filter = json!({"all": [{"field": "payload.amount", "op": "gte", "value": (i % 50) as f64},
                                {"field": "payload.currency", "op": "in", "value": ["EUR", "USD"]}]});
    match i % 4 {
        0 => json!({"name": format!("count {i}"), "event_types": ["payment.failed"], "filter": filter,
                    "group_by": ["payload.card"],
                    "window": {"seconds": 300, "aggregate": "count", "op": "gt", "threshold": 1e9}}),
        1 => json!({"name": format!("sum {i}"), "event_types": ["payment.*"], "filter": filter,
                    "group_by": ["payload.merchant"],
                    "window": {"seconds": 600, "aggregate": "sum", "field": "payload.amount", "op": "gt", "threshold": 1e12}}),
        2 => json!({"name": format!("distinct {i}"), "event_types": ["payment.failed"],
                    "group_by": ["payload.card"],
                    "window": {"seconds": 60, "aggregate": "distinct", "field": "payload.merchant", "op": "gt", "threshold": 1e6}}),
        _ => json!({"name": format!("match {i}"), "event_types": ["payment.failed"], "cooldown_seconds": 600,
                    "filter": {"any": [{"field": "payload.amount", "op": "gt", "value": 1e9},
                                       {"field": "payload.card", "op": "starts_with", "value": "9999"}]}}),
    }
}

fn rule_set(tenant: Uuid, n: usize) -> RuleSet {
    let mut versions = BTreeMap::new();
    for i in 0..n {
        let spec = parse_rule(&rule(i), &RuleLimits::default()).unwrap();
        let id = Uuid::from_u128(1_000 + i as u128);
        versions.insert(id, vec![Rule { id, tenant_id: tenant, version: 1, spec, created_at_ms: 0, updated_at_ms: 0 }]);
    }
    let tr = TenantRules::build(&versions, &Default::default(), tenant, Vec::new());
    assert_eq!(tr.rules.len(), n);
    RuleSet { revision: 1, tenants: [(tenant, Arc::new(tr))].into_iter().collect() }
}

/// Runs the events; returns the seconds taken, the alerts and the checkpoint bytes written.
fn run(events: &[EncodedEvent], set: &RuleSet) -> (f64, usize, usize) {
    let cfg = EngineConfig { max_groups_per_rule: 100_000, ..Default::default() };
    let mut engine = Engine::new(0, cfg);
    let (mut alerts, mut checkpointed) = (0, 0);
    let started = Instant::now();
    for (i, ev) in events.iter().enumerate() {
        // What the partition owner reads from each log message.
        let ev = &EncodedEvent::decode(ev.record.clone(), ev.position).unwrap();
        engine.process(Input::Logged { seq: ev.position.sequence, event: ev }, set);
        if (i + 1) % 500 == 0 {
            let effects = engine.take_effects((i + 1) % 20_000 == 0);
            alerts += effects.alerts.len();
            checkpointed += effects.checkpoint.map_or(0, |cp| cp.puts.iter().map(|(_, b)| b.len()).sum());
        }
    }
    let last = engine.take_effects(true);
    alerts += last.alerts.len();
    checkpointed += last.checkpoint.map_or(0, |cp| cp.puts.iter().map(|(_, b)| b.len()).sum());
    (started.elapsed().as_secs_f64(), alerts, checkpointed)
}

fn main() {
    let n = env("BENCH_EVENTS", 200_000);
    let groups = env("BENCH_GROUPS", 1_000);
    let tenant = Uuid::now_v7();
    let evs = payment_events(tenant, n, groups, 1);
    println!("rule engine, one partition, one core: {n} events, {groups} cards, 97 merchants");
    println!(
        "{:>6} {:>12} {:>14} {:>16} {:>8} {:>16}",
        "rules", "events/s", "µs per event", "µs per rule·ev", "alerts", "checkpoint B/ev"
    );
    let (base, _, _) = run(&evs, &rule_set(tenant, 0));
    let base_us = base * 1e6 / n as f64;
    println!("{:>6} {:>12.0} {:>14.2} {:>16} {:>8} {:>16}", 0, n as f64 / base, base_us, "-", 0, 0);
    let counts: Vec<usize> = std::env::var("BENCH_RULES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10, 100]);
    for rules in counts {
        let set = rule_set(tenant, rules);
        let (secs, alerts, checkpointed) = run(&evs, &set);
        let us = secs * 1e6 / n as f64;
        println!(
            "{:>6} {:>12.0} {:>14.2} {:>16.3} {:>8} {:>16.0}",
            rules,
            n as f64 / secs,
            us,
            (us - base_us) / rules as f64,
            alerts,
            checkpointed as f64 / n as f64
        );
    }
    println!("(0 rules = reading the key fields of each log message + series and catalog counting; rules add the payload decode and evaluation)");
}
