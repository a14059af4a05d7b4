use super::*;
use crate::compiled::Rule;
use crate::spec::{parse_rule, RuleLimits};
use serde_json::json;

const S: i64 = 1000;

fn tenant() -> TenantId {
    Uuid::from_u128(7)
}

fn rules(defs: &[Value]) -> RuleSet {
    let mut versions = std::collections::BTreeMap::new();
    for (i, d) in defs.iter().enumerate() {
        let spec = parse_rule(d, &RuleLimits::default()).unwrap();
        let id = Uuid::from_u128(100 + i as u128);
        versions
            .insert(id, vec![Rule { id, tenant_id: tenant(), version: 1, spec, created_at_ms: 0, updated_at_ms: 0 }]);
    }
    let tr = TenantRules::build(&versions, &Default::default(), tenant(), Vec::new());
    RuleSet { revision: 1, tenants: [(tenant(), Arc::new(tr))].into_iter().collect() }
}

fn event(id: &str, t: i64, payload: Value) -> EventRecord {
    EventRecord {
        id: id.into(),
        tenant_id: tenant(),
        event_type: "payment.failed".into(),
        payload: payload.as_object().cloned().unwrap_or_default(),
        source: None,
        user_id: None,
        session_id: None,
        occurred_at_ms: t,
        received_at_ms: t,
        idempotency_key: None,
    }
}

fn cfg() -> EngineConfig {
    EngineConfig { allowed_lateness_ms: 5 * S, max_future_ms: 60 * S, max_groups_per_rule: 3 }
}

/// Runs inputs and returns every alert write, in order.
fn run(engine: &mut Engine, set: &RuleSet, inputs: Vec<Input<'_>>) -> Vec<Alert> {
    let mut out = Vec::new();
    for i in inputs {
        engine.process(i, set);
        out.extend(engine.take_effects(false).alerts);
    }
    out
}

fn count_rule(threshold: f64, op: &str) -> Value {
    json!({"name": "r", "event_types": ["payment.*"], "group_by": ["payload.card"],
           "window": {"seconds": 10, "aggregate": "count", "op": op, "threshold": threshold}})
}

#[test]
fn an_event_alerts_sample_follows_its_matches_until_it_resolves() {
    let set = rules(&[json!({"name": "r", "event_types": ["payment.*"], "cooldown_seconds": 10})]);
    let mut e = Engine::new(0, cfg());
    let evs: Vec<EventRecord> = (0..3).map(|i| event(&format!("e{i}"), i * S, json!({}))).collect();
    let input = |i: usize| Input::Event { seq: i as u64 + 1, record: &evs[i] };
    // Fired by e0; e1 folds into it in the same batch.
    e.process(input(0), &set);
    e.process(input(1), &set);
    let written = e.take_effects(false).alerts;
    assert_eq!(written.last().map(|a| (a.value, a.event_ids.clone())), Some((2.0, vec!["e0".into(), "e1".into()])));
    // e2 folds in, and the alert resolves (cooldown over) before the batch is taken.
    e.process(input(2), &set);
    e.process(Input::Tick { seq: 4, at_ms: 80 * S }, &set);
    let written = e.take_effects(false).alerts;
    let resolved = written.iter().find(|a| a.state == AlertState::Resolved).expect("resolved");
    assert_eq!((resolved.value, resolved.event_ids.as_slice()), (3.0, &["e0", "e1", "e2"].map(String::from)[..]));
}

#[test]
fn exactly_at_threshold_fires_for_gte_not_gt() {
    for (op, fires) in [("gte", true), ("gt", false)] {
        let set = rules(&[count_rule(3.0, op)]);
        let mut e = Engine::new(0, cfg());
        let evs: Vec<EventRecord> = (0..3).map(|i| event(&format!("e{i}"), i * S, json!({"card": "c"}))).collect();
        let inputs = evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect();
        let alerts = run(&mut e, &set, inputs);
        assert_eq!(alerts.len(), usize::from(fires), "{op}");
        if fires {
            assert_eq!(alerts[0].value, 3.0);
            assert_eq!(alerts[0].fired_at_ms, 2 * S);
            assert_eq!(alerts[0].event_ids, ["e0", "e1", "e2"]);
        }
    }
}

#[test]
fn event_rules_without_cooldown_fire_for_every_match_in_any_order() {
    let set = rules(&[json!({"name": "each", "event_types": ["payment.*"]})]);
    let mut e = Engine::new(0, cfg());
    let evs: Vec<EventRecord> =
        [5, 3, 4, 3, 1].iter().enumerate().map(|(i, t)| event(&format!("e{i}"), t * S, json!({}))).collect();
    let inputs = evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect();
    let alerts = run(&mut e, &set, inputs);
    let ids: std::collections::BTreeSet<Uuid> = alerts.iter().map(|a| a.id).collect();
    assert_eq!(ids.len(), 5, "{alerts:?}");
    // With a cooldown, an older match inside it does not fire again.
    let set = rules(&[json!({"name": "cool", "event_types": ["payment.*"], "cooldown_seconds": 10})]);
    let mut e = Engine::new(0, cfg());
    let inputs = evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect();
    let ids: std::collections::BTreeSet<Uuid> = run(&mut e, &set, inputs).iter().map(|a| a.id).collect();
    assert_eq!(ids.len(), 1);
}

#[test]
fn redelivered_positions_count_once_and_replays_are_deterministic() {
    let set = rules(&[count_rule(2.0, "gte")]);
    let evs: Vec<EventRecord> = (0..4).map(|i| event(&format!("e{i}"), i * S, json!({"card": "c"}))).collect();
    let inputs = || evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r });
    let mut a = Engine::new(0, cfg());
    let first = run(&mut a, &set, inputs().chain(inputs()).collect());
    assert_eq!(first.len(), 1, "the second pass is at positions already processed");
    let mut b = Engine::new(0, cfg());
    let again = run(&mut b, &set, inputs().collect());
    assert_eq!(first, again, "the same log gives the same alerts, ids included");
}

#[test]
fn late_and_out_of_order_events() {
    let set = rules(&[count_rule(3.0, "gte")]);
    let mut e = Engine::new(0, cfg());
    let (a, b, late, inside) = (
        event("a", 20 * S, json!({"card": "c"})),
        event("b", 21 * S, json!({"card": "c"})),
        event("late", 14 * S, json!({"card": "c"})),
        event("inside", 18 * S, json!({"card": "c"})),
    );
    let alerts = run(
        &mut e,
        &set,
        vec![
            Input::Event { seq: 1, record: &a },
            Input::Event { seq: 2, record: &b },
            // More than the allowed lateness (5 s) behind the head: not counted.
            Input::Event { seq: 3, record: &late },
        ],
    );
    assert!(alerts.is_empty());
    // Out of order but within lateness and window: counts, and the count reaches 3.
    let alerts = run(&mut e, &set, vec![Input::Event { seq: 4, record: &inside }]);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].fired_at_ms, 21 * S, "windows are evaluated at the group's head");
}

#[test]
fn ticks_resolve_windows_and_fire_absence_at_the_deadline() {
    let set = rules(&[
        count_rule(1.0, "gte"),
        json!({"name": "quiet", "event_types": ["payment.*"], "absence": {"seconds": 30}}),
    ]);
    let mut e = Engine::new(0, cfg());
    let ev = event("x", 100 * S, json!({"card": "c"}));
    let fired = run(&mut e, &set, vec![Input::Event { seq: 1, record: &ev }]);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].state, AlertState::Firing);
    // Watermark = tick - lateness; the 10 s window at head 100 s empties once the head
    // passes 109.999 s, i.e. at a tick of 115 s.
    assert!(run(&mut e, &set, vec![Input::Tick { seq: 2, at_ms: 114 * S }]).is_empty());
    let resolved = run(&mut e, &set, vec![Input::Tick { seq: 3, at_ms: 115 * S }]);
    assert_eq!(resolved.len(), 1);
    assert_eq!(
        (resolved[0].id, resolved[0].state, resolved[0].resolved_at_ms),
        (fired[0].id, AlertState::Resolved, Some(110 * S))
    );
    // Absence: 30 s after the last event was received, whenever the tick comes.
    let absent = run(&mut e, &set, vec![Input::Tick { seq: 4, at_ms: 200 * S }]);
    assert_eq!(absent.len(), 1);
    assert_eq!((absent[0].kind, absent[0].fired_at_ms), (AlertKind::Absence, 130 * S));
    assert!(run(&mut e, &set, vec![Input::Tick { seq: 5, at_ms: 300 * S }]).is_empty(), "once per silence");
}

#[test]
fn group_limit_drops_new_groups_and_counts_them() {
    let set = rules(&[count_rule(100.0, "gte")]);
    let mut e = Engine::new(0, cfg());
    let evs: Vec<EventRecord> = (0..5).map(|i| event(&format!("e{i}"), S, json!({"card": format!("c{i}")}))).collect();
    run(&mut e, &set, evs.iter().enumerate().map(|(i, r)| Input::Event { seq: i as u64 + 1, record: r }).collect());
    let stats = e.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].2.groups, stats[0].2.dropped_groups), (3, 2));
}

#[test]
fn checkpoint_and_restore_continue_the_window() {
    let set = rules(&[count_rule(3.0, "gte")]);
    let evs: Vec<EventRecord> = (0..3).map(|i| event(&format!("e{i}"), i * S, json!({"card": "c"}))).collect();
    let mut e = Engine::new(0, cfg());
    run(&mut e, &set, vec![Input::Event { seq: 1, record: &evs[0] }, Input::Event { seq: 2, record: &evs[1] }]);
    let effects = e.take_effects(true);
    assert_eq!((effects.meta.state_seq, effects.meta.effects_seq), (2, 2));
    let cp = effects.checkpoint.unwrap();
    let mut restored = Engine::restore(0, cfg(), effects.meta, cp.puts).unwrap();
    assert_eq!(restored.processed_seq(), 2);
    let alerts = run(&mut restored, &set, vec![Input::Event { seq: 3, record: &evs[2] }]);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].value, 3.0);
}
/// Window rules that share a timeline (same `group_by` and window length) fire exactly the
/// alerts each fires alone, through out-of-order and late events, ticks, a checkpoint and
/// restore, and rules added and removed around them.
#[test]
fn rules_sharing_a_timeline_fire_as_they_do_alone() {
    use rand::{Rng, SeedableRng};
    let defs = [
        json!({"name": "count", "event_types": ["payment.*"], "group_by": ["payload.card"],
               "filter": {"field": "payload.amount", "op": "gte", "value": 5},
               "window": {"seconds": 10, "aggregate": "count", "op": "gt", "threshold": 3}}),
        json!({"name": "sum", "event_types": ["payment.*"], "group_by": ["payload.card"],
               "window": {"seconds": 10, "aggregate": "sum", "field": "payload.amount", "op": "gt", "threshold": 40}}),
        json!({"name": "distinct", "event_types": ["payment.*"], "group_by": ["payload.card"],
               "window": {"seconds": 10, "aggregate": "distinct", "field": "payload.merchant", "op": "gte", "threshold": 3}}),
        json!({"name": "pending", "event_types": ["payment.*"], "group_by": ["payload.card"], "for_seconds": 2,
               "filter": {"field": "payload.merchant", "op": "ne", "value": "m0"},
               "window": {"seconds": 10, "aggregate": "max", "field": "payload.amount", "op": "gte", "threshold": 8}}),
        // The same window as `distinct` with another threshold: its checkpointed column
        // refers to that rule's.
        json!({"name": "distinct tier 2", "event_types": ["payment.*"], "group_by": ["payload.card"],
               "window": {"seconds": 10, "aggregate": "distinct", "field": "payload.merchant", "op": "gte", "threshold": 4}}),
        json!({"name": "distinct2", "event_types": ["payment.*"], "group_by": ["payload.card"], "cooldown_seconds": 30,
               "filter": {"field": "payload.amount", "op": "lt", "value": 7},
               "window": {"seconds": 10, "aggregate": "distinct", "field": "payload.merchant", "op": "gte", "threshold": 2}}),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut now = 1_000 * S;
    let mut events = Vec::new();
    for i in 0..1_500 {
        now += rng.random_range(0..700);
        let t = now - rng.random_range(0..8 * S);
        let payload = json!({"card": format!("c{}", rng.random_range(0..4)),
                             "merchant": format!("m{}", rng.random_range(0..4)),
                             "amount": rng.random_range(0..10)});
        events.push((event(&format!("e{i}"), t, payload), now, i % 7 == 0));
    }
    let cfg = EngineConfig { max_groups_per_rule: 100, ..cfg() };
    // Runs the events (a tick after every seventh), switching rule sets at `switch`; with
    // `restore`, the engine is rebuilt from its checkpoints at that point too.
    let play = |sets: &[(usize, RuleSet)], restore: bool| -> Vec<Alert> {
        let mut e = Engine::new(0, cfg);
        let mut stored: std::collections::BTreeMap<StateKey, Vec<u8>> = Default::default();
        let mut alerts = Vec::new();
        let mut seq = 0;
        for (i, (ev, clock, tick)) in events.iter().enumerate() {
            let set = &sets.iter().rev().find(|(from, _)| i >= *from).unwrap().1;
            if restore && i == 700 {
                let effects = e.take_effects(true);
                alerts.extend(effects.alerts);
                let cp = effects.checkpoint.unwrap();
                for k in cp.deletes {
                    stored.remove(&k);
                }
                stored.extend(cp.puts.into_iter().map(|(k, b)| (k, b.to_vec())));
                e = Engine::restore(0, cfg, effects.meta, stored.clone()).unwrap();
            }
            seq += 1;
            e.process(Input::Event { seq, record: ev }, set);
            if *tick {
                seq += 1;
                e.process(Input::Tick { seq, at_ms: *clock }, set);
            }
            let effects = e.take_effects(i % 100 == 0);
            if let Some(cp) = effects.checkpoint {
                for k in cp.deletes {
                    stored.remove(&k);
                }
                stored.extend(cp.puts.into_iter().map(|(k, b)| (k, b.to_vec())));
            }
            alerts.extend(effects.alerts);
        }
        alerts
    };
    // Alerts written in one batch come in the order groups are visited, so compare them as
    // sorted lists, and name the first difference.
    let of_rule = |alerts: &[Alert], id: Uuid| -> Vec<Alert> {
        let mut v: Vec<Alert> = alerts.iter().filter(|a| a.rule_id == id).cloned().collect();
        v.sort_by_key(|a| (a.fired_at_ms, a.id, a.resolved_at_ms, a.event_ids.clone()));
        v
    };
    let same = |a: &[Alert], b: &[Alert], what: &str| {
        let mut a = a.to_vec();
        let mut b = b.to_vec();
        a.sort_by_key(|a| (a.fired_at_ms, a.id, a.resolved_at_ms, a.event_ids.clone()));
        b.sort_by_key(|a| (a.fired_at_ms, a.id, a.resolved_at_ms, a.event_ids.clone()));
        if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
            panic!(
                "{what}: {} vs {} alerts, first difference at {i}:\n{:?}\n{:?}",
                a.len(),
                b.len(),
                a.get(i),
                b.get(i)
            );
        }
    };
    let all = rules(&defs);
    let together = play(&[(0, all.clone())], false);
    let restored = play(&[(0, all.clone())], true);
    same(&together, &restored, "restoring from checkpoints changes nothing");
    for i in 0..defs.len() {
        let id = Uuid::from_u128(100 + i as u128);
        let mut alone = rules(&defs[i..=i]);
        // Built alone, the rule has another id: give it this one.
        let tr = Arc::get_mut(alone.tenants.get_mut(&tenant()).unwrap()).unwrap();
        let mut rule = tr.rules.pop().unwrap();
        Arc::get_mut(&mut rule).unwrap().rule.id = id;
        let mut rebuilt = TenantRules::default();
        rebuilt.push(Arc::into_inner(rule).unwrap());
        alone.tenants.insert(tenant(), Arc::new(rebuilt));
        let solo = play(&[(0, alone)], false);
        assert!(!solo.is_empty(), "rule {i} fires in this test");
        same(&of_rule(&together, id), &solo, &format!("rule {i}"));
    }
    // Rules added and removed midway leave the others' windows alone.
    let first_three = rules(&defs[..3]);
    let changed = play(&[(0, first_three), (500, all.clone()), (1_000, rules(&defs[..2]))], true);
    for i in 0..2 {
        let id = Uuid::from_u128(100 + i as u128);
        same(&of_rule(&changed, id), &of_rule(&together, id), &format!("rule {i} across rule changes"));
    }
}
/// Window state checkpointed per rule and group (before window classes) restores, carries
/// on, and is rewritten as one shared-group entry that replaces the old ones.
#[test]
fn window_state_stored_per_rule_moves_to_shared_groups() {
    let set = rules(&[count_rule(3.0, "gte"), count_rule(100.0, "gte")]);
    let rule = Uuid::from_u128(100);
    let mut window = Window::new(10);
    window.insert(S, 0, None, None);
    window.insert(S, S, None, None);
    let legacy = GroupState {
        key: String::new(),
        id: 0,
        values: vec![json!("c")],
        head_ms: S,
        window: Some(window),
        last_seen_ms: None,
        recent: ["e0", "e1"].into_iter().map(Arc::from).collect(),
        pending_since_ms: None,
        open: None,
        last_fired_ms: None,
        dirty: false,
        alert_dirty: false,
    };
    // Group keys are the group-by values as JSON, each ended by U+001F.
    let key = format!("{}\u{1f}", json!("c"));
    let old_key = StateKey { tenant: tenant(), rule, group: Some(key.clone()) };
    let meta = RuleMeta { version: 1, shape: set.tenants[&tenant()].rules[0].shape, dropped_groups: 0, since_ms: 0 };
    let mut stored: std::collections::BTreeMap<StateKey, Vec<u8>> = [
        (old_key.clone(), rmp_serde::to_vec_named(&legacy).unwrap()),
        (StateKey { tenant: tenant(), rule, group: None }, rmp_serde::to_vec_named(&meta).unwrap()),
    ]
    .into_iter()
    .collect();
    let meta = EngineMeta { effects_seq: 2, state_seq: 2, clock_ms: S };
    let mut e = Engine::restore(0, cfg(), meta, stored.clone()).unwrap();
    let ev = event("e2", 2 * S, json!({"card": "c"}));
    let alerts = run(&mut e, &set, vec![Input::Event { seq: 3, record: &ev }]);
    assert_eq!(alerts.len(), 1, "the restored window counts on");
    assert_eq!((alerts[0].value, alerts[0].event_ids.clone()), (3.0, vec!["e0".into(), "e1".into(), "e2".into()]));
    let effects = e.take_effects(true);
    let cp = effects.checkpoint.unwrap();
    assert!(cp.deletes.contains(&old_key), "the per-rule entry is deleted");
    let shared: Vec<&StateKey> = cp
        .puts
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.group.as_deref().is_some_and(|g| g.starts_with(CLASS_GROUP)))
        .collect();
    assert_eq!(shared.len(), 1, "one entry for the group, whatever the number of rules: {:?}", cp.puts);
    for k in &cp.deletes {
        stored.remove(k);
    }
    stored.extend(cp.puts.into_iter().map(|(k, b)| (k, b.to_vec())));
    assert!(!stored.contains_key(&old_key));
    // Restored from the new entry: the open alert stays open (no second firing), and the
    // group exists once.
    let mut again = Engine::restore(0, cfg(), effects.meta, stored).unwrap();
    let ev = event("e3", 3 * S, json!({"card": "c"}));
    assert!(run(&mut again, &set, vec![Input::Event { seq: 4, record: &ev }]).is_empty());
    let stats: Vec<RuleStats> = again.stats().into_iter().filter(|s| s.1 == rule).map(|s| s.2).collect();
    assert_eq!(stats, [RuleStats { groups: 1, dropped_groups: 0, firing: 1 }]);
    // It resolves once the window has emptied.
    let resolved = run(&mut again, &set, vec![Input::Tick { seq: 5, at_ms: 30 * S }]);
    assert_eq!(resolved.iter().map(|a| (a.id, a.state)).collect::<Vec<_>>(), [(alerts[0].id, AlertState::Resolved)]);
}
#[test]
fn lane_samples_hold_each_id_once_and_free_what_they_drop() {
    let mut ids = IdSlab::default();
    let mut lanes = [Ring::default(); 3];
    let events: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("e{i}").as_str())).collect();
    for (i, id) in events.iter().enumerate() {
        // Every lane samples even events; lane 2 also odd ones.
        for (l, ring) in lanes.iter_mut().enumerate() {
            if i % 2 == 0 || l == 2 {
                ring.push(&mut ids, id);
            }
        }
    }
    let sample = |r: &Ring| r.event_ids(&ids);
    let want: Vec<String> = (80..100).step_by(2).map(|i| format!("e{i}")).collect();
    assert_eq!(sample(&lanes[0]), want);
    assert_eq!(sample(&lanes[2]), (90..100).map(|i| format!("e{i}")).collect::<Vec<_>>());
    let live = ids.slots.iter().filter(|(id, _)| id.is_some()).count();
    assert_eq!(live, 15, "e80..e98 even for lanes 0 and 1, e90..e99 for lane 2: 15 distinct ids");
    assert_eq!(Arc::strong_count(&events[98]), 2, "held once by the slab, however many lanes sample it");
    for ring in &mut lanes {
        ring.clear(&mut ids);
    }
    assert!(ids.slots.iter().all(|(id, refs)| id.is_none() && *refs == 0));
    assert_eq!(Arc::strong_count(&events[98]), 1);
}

/// Events as the log carries them are counted, catalogued and evaluated exactly as decoded
/// ones: for tenants with rules on the type, without rules on it, and without any rules.
#[test]
fn logged_events_have_the_effects_of_decoded_ones() {
    let set = rules(&[
        json!({"name": "sum", "event_types": ["payment.*"], "group_by": ["payload.card"],
               "window": {"seconds": 10, "aggregate": "sum", "field": "payload.amount", "op": "gt", "threshold": 20}}),
        json!({"name": "each", "event_types": ["payment.*"], "filter": {"field": "payload.amount", "op": "gte", "value": 9}}),
    ]);
    let mut events = Vec::new();
    for i in 0..60i64 {
        let mut ev = event(
            &format!("e{i}"),
            1_000 * S + i * 300,
            json!({"card": format!("c{}", i % 3),
            "amount": i % 10, "meta": {"ok": i % 2 == 0, "tags": ["x"], "n": null}}),
        );
        match i % 3 {
            1 => ev.event_type = "user.signup".into(),
            2 => ev.tenant_id = Uuid::from_u128(8),
            _ => {}
        }
        events.push(ev);
    }
    let encoded: Vec<EncodedEvent> = events
        .iter()
        .enumerate()
        .map(|(i, r)| {
            EncodedEvent::from_record(r, signalops_core::model::LogPosition { partition: 0, sequence: i as u64 + 1 })
                .unwrap()
        })
        .collect();
    let effects = |logged: bool| {
        let mut e = Engine::new(0, cfg());
        for (i, (r, enc)) in events.iter().zip(&encoded).enumerate() {
            let seq = i as u64 + 1;
            e.process(if logged { Input::Logged { seq, event: enc } } else { Input::Event { seq, record: r } }, &set);
        }
        let fx = e.take_effects(true);
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let mut checkpoint = fx.checkpoint.map(|c| c.puts).unwrap_or_default();
        checkpoint.sort();
        (
            fx.alerts,
            sorted(fx.series.iter().map(|d| format!("{d:?}")).collect()),
            sorted(fx.catalog.iter().map(|d| format!("{d:?}")).collect()),
            checkpoint,
        )
    };
    let (decoded, logged) = (effects(false), effects(true));
    assert!(!decoded.0.is_empty(), "the rules fire");
    assert_eq!(decoded.1.len(), 3, "a series point per tenant and type");
    assert!(decoded.1.iter().any(|p| p.contains("payload.amount")), "the sum field rides along: {:?}", decoded.1);
    assert!(decoded.2.iter().all(|c| c.contains("payload.meta.ok")), "{:?}", decoded.2);
    assert_eq!(logged, decoded);
}
