//! Rule-state sync: when a tenant's compiled rules change, its state follows them: new rules
//! start empty, changed rules keep what still applies, removed rules resolve their alerts, and
//! rules move into or out of shared window classes.

use super::*;

/// Brings the tenant's rule states in line with its current rules: state of deleted rules is
/// dropped (open alerts resolve), and a new version whose window, absence or group-by differs
/// starts afresh.
pub(super) fn sync_tenant(
    tenant: TenantId,
    ts: &mut TenantState,
    compiled: &Arc<TenantRules>,
    clock: i64,
    out: &mut Out,
) {
    if ts.compiled.as_ref().is_some_and(|c| Arc::ptr_eq(c, compiled)) {
        return;
    }
    // Window state stays in its classes when no window rule changed; otherwise it goes back to
    // its rules for the changes below and into the new classes after them.
    let keep_classes = ts.restored.is_empty()
        && ts.classes.len() == compiled.window_classes.len()
        && ts.classes.iter().zip(&compiled.window_classes).all(|(c, w)| c.same_layout(w))
        && compiled.window_classes.iter().flat_map(|w| &w.rule_ids).all(|id| {
            ts.rules.get(id).is_none_or(|rs| compiled.get(id).is_some_and(|r| r.rule.version == rs.meta.version))
        });
    if !keep_classes {
        dissolve_classes(tenant, ts, out);
    }
    ts.compiled = Some(compiled.clone());
    ts.by_type.clear();
    let ids: Vec<Uuid> = ts.rules.keys().copied().collect();
    for id in ids {
        match compiled.get(&id) {
            None => {
                if let Some(rs) = ts.rules.remove(&id) {
                    drop_rule_state(tenant, id, rs, clock, out);
                }
            }
            Some(rule) => {
                let Some(rs) = ts.rules.get_mut(&id) else { continue };
                if rs.meta.version == rule.rule.version {
                    continue;
                }
                if rs.meta.shape != rule.shape {
                    if let Some(old) = ts.rules.remove(&id) {
                        drop_rule_state(tenant, id, old, clock, out);
                    }
                    let rs = ts.rules.entry(id).or_default();
                    rs.meta =
                        RuleMeta { version: rule.rule.version, shape: rule.shape, dropped_groups: 0, since_ms: clock };
                    rs.meta_dirty = true;
                    out.state_dirty.push(StateKey { tenant, rule: id, group: None });
                } else {
                    rs.meta.version = rule.rule.version;
                    if !rs.meta_dirty {
                        rs.meta_dirty = true;
                        out.state_dirty.push(StateKey { tenant, rule: id, group: None });
                    }
                }
            }
        }
    }
    if !keep_classes {
        ts.classes = compiled.window_classes.iter().map(ClassState::new).collect();
        absorb_classes(tenant, ts, compiled, out);
    }
}

/// Moves every window lane back to its rule as a group state of its own, and deletes the
/// stored shared groups (the new classes write theirs).
pub(super) fn dissolve_classes(tenant: TenantId, ts: &mut TenantState, out: &mut Out) {
    for rs in ts.rules.values_mut() {
        rs.lanes = 0;
    }
    out.deletes.append(&mut ts.restored);
    for cs in ts.classes.drain(..) {
        for (gid, g) in cs.groups {
            let SharedGroup { key, values, timeline, lanes, ids, .. } = *g;
            out.deletes.push(StateKey { tenant, rule: cs.id, group: Some(class_group_key(&key)) });
            for (lane, l) in lanes.into_iter().enumerate() {
                let Some(rule) = cs.rule_ids.get(lane).filter(|_| timeline.is_started(lane)) else { continue };
                let state = GroupState {
                    key: key.clone(),
                    id: gid,
                    values: values.clone(),
                    head_ms: timeline.head(lane),
                    window: Some(timeline.export(lane)),
                    last_seen_ms: None,
                    recent: l.recent.to_ids(&ids),
                    pending_since_ms: l.pending_since_ms,
                    open: l.open.map(|a| *a),
                    last_fired_ms: l.last_fired_ms,
                    dirty: false,
                    alert_dirty: false,
                };
                ts.rules.entry(*rule).or_default().groups.insert(gid, Box::new(state));
            }
        }
    }
}

/// Moves the group states of the compiled window rules (restored from a checkpoint, or
/// dissolved by a rule change) into their window classes, to be written in that layout.
pub(super) fn absorb_classes(tenant: TenantId, ts: &mut TenantState, compiled: &TenantRules, out: &mut Out) {
    for (class, cs) in compiled.window_classes.iter().zip(ts.classes.iter_mut()) {
        for (lane, id) in class.rule_ids.iter().enumerate() {
            let Some(rs) = ts.rules.get_mut(id) else { continue };
            for (gid, g) in rs.groups.drain() {
                let g = *g;
                let (seconds, dslots, numeric) = (cs.seconds, &cs.dslots, cs.numeric);
                let sg = cs.groups.entry(gid).or_insert_with(|| {
                    Box::new(SharedGroup::new(g.key.clone(), g.values.clone(), (seconds, dslots, numeric)))
                });
                match &g.window {
                    Some(w) => sg.timeline.import(lane, g.head_ms, w),
                    None => sg.timeline.import(lane, g.head_ms, &Window::new(seconds)),
                }
                if let Some(l) = sg.lanes.get_mut(lane) {
                    let mut recent = Ring::default();
                    for id in &g.recent {
                        recent.push(&mut sg.ids, id);
                    }
                    *l = Lane {
                        recent,
                        pending_since_ms: g.pending_since_ms,
                        open: g.open.map(Box::new),
                        last_fired_ms: g.last_fired_ms,
                    };
                }
                mark_group_dirty(out, tenant, cs.id, sg);
                rs.lanes += 1;
            }
        }
    }
}

/// Resolves a removed rule's open alerts and deletes its stored state.
pub(super) fn drop_rule_state(tenant: TenantId, rule: Uuid, rs: RuleState, clock: i64, out: &mut Out) {
    for (_, mut g) in rs.groups {
        if g.alert_dirty {
            refresh_event_ids(&mut g);
        }
        if let Some(mut alert) = g.open {
            alert.state = AlertState::Resolved;
            alert.resolved_at_ms = Some(clock);
            out.transitions.push((alert.id, Transition::Resolved));
            out.alerts.push(alert);
            out.resolved += 1;
        }
        out.deletes.push(StateKey { tenant, rule, group: Some(g.key) });
    }
    let mut plugin = rs.plugin;
    let dirty = plugin.take_dirty();
    let entries = plugin.windows.keys().map(|k| EntryKey::Window(k.clone()));
    let entries = entries.chain(plugin.kv.keys().map(|k| EntryKey::State(k.clone())));
    for k in entries.chain(dirty) {
        out.deletes.push(StateKey { tenant, rule, group: Some(plugin_entry_group(&k)) });
    }
    out.deletes.push(StateKey { tenant, rule, group: None });
}

pub(super) fn rule_state<'a>(
    rules: &'a mut FastMap<Uuid, RuleState>,
    rule: &CompiledRule,
    clock: i64,
    out: &mut Out,
    tenant: TenantId,
) -> &'a mut RuleState {
    rules.entry(rule.id()).or_insert_with(|| {
        out.state_dirty.push(StateKey { tenant, rule: rule.id(), group: None });
        RuleState {
            meta: RuleMeta { version: rule.rule.version, shape: rule.shape, dropped_groups: 0, since_ms: clock },
            meta_dirty: true,
            groups: FastMap::default(),
            lanes: 0,
            plugin: Box::default(),
        }
    })
}
