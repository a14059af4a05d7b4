//! Alert transitions: firing and resolving alerts with cooldowns and `for_seconds`, the
//! triggering event samples, and what each tick resolves, expires or fires (absence).

use super::*;

pub(super) fn mark_dirty(out: &mut Out, tenant: TenantId, rule: Uuid, g: &mut GroupState) {
    if !g.dirty {
        g.dirty = true;
        out.state_dirty.push(StateKey { tenant, rule, group: Some(g.key.clone()) });
    }
}

/// Copies the group's recent event ids into its open alert (an event or plugin rule's open
/// alert collects the ids of the matches that keep it open; they are copied once per batch,
/// when the alert is written, not on every match).
pub(super) fn refresh_event_ids(g: &mut GroupState) {
    if let Some(open) = g.open.as_mut() {
        open.event_ids.clear();
        open.event_ids.extend(g.recent.iter().map(|s| s.to_string()));
    }
}

pub(super) fn mark_alert(out: &mut Out, tenant: TenantId, rule: Uuid, g: &mut GroupState) {
    if !g.alert_dirty {
        g.alert_dirty = true;
        out.alert_dirty.push((tenant, rule, g.id));
    }
}

pub(super) fn push_recent(recent: &mut VecDeque<Arc<str>>, id: &Arc<str>) {
    if recent.len() == EVENT_SAMPLE {
        recent.pop_front();
    }
    recent.push_back(id.clone());
}

/// Without a cooldown every match fires, even one older than the last firing (events arrive
/// out of order); with one, a match must come `cooldown` after the last firing.
pub(super) fn cooldown_over(rule: &CompiledRule, last_fired_ms: Option<i64>, at: i64) -> bool {
    rule.cooldown_ms == 0 || last_fired_ms.is_none_or(|f| at.saturating_sub(f) >= rule.cooldown_ms)
}

/// Whether an event rule's open alert in `g` has seen no match for the rule's cooldown by `now`.
pub(super) fn event_alert_expired(rule: &CompiledRule, g: &GroupState, now: i64) -> bool {
    g.open.is_some() && g.last_seen_ms.is_some_and(|last| now >= last.saturating_add(rule.cooldown_ms))
}

/// An event rule's open alert resolves once `cooldown` has passed since its last match.
pub(super) fn expire_event_alert(ctx: &Ctx<'_>, rule: &CompiledRule, g: &mut GroupState, out: &mut Out) {
    let now = g.head_ms.max(ctx.clock_ms - ctx.cfg.allowed_lateness_ms);
    let Some(last) = g.last_seen_ms else { return };
    if event_alert_expired(rule, g, now) {
        if g.alert_dirty {
            refresh_event_ids(g);
        }
        if let Some(mut a) = g.open.take() {
            a.state = AlertState::Resolved;
            a.resolved_at_ms = Some(last.saturating_add(rule.cooldown_ms));
            out.transitions.push((a.id, Transition::Resolved));
            out.alerts.push(a);
            out.resolved += 1;
            mark_dirty(out, ctx.tenant, rule.id(), g);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn fire(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    g: &mut GroupState,
    at: i64,
    value: f64,
    out: &mut Out,
    decision: Option<&Decision>,
) {
    let sample = g.recent.iter().map(|s| s.to_string()).collect();
    let alert = new_alert(ctx, rule, (&g.key, &g.values), sample, at, value, decision);
    g.last_fired_ms = Some(at);
    g.pending_since_ms = None;
    g.open = Some(alert.clone());
    out.transitions.push((alert.id, Transition::Firing));
    out.alerts.push(alert);
    out.fired += 1;
}

/// The alert a rule fires for a group at `at`.
pub(super) fn new_alert(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    (key, values): (&str, &[Value]),
    event_ids: Vec<String>,
    at: i64,
    value: f64,
    decision: Option<&Decision>,
) -> Alert {
    let spec = &rule.rule.spec;
    let group: std::collections::BTreeMap<String, Value> =
        spec.group_by.iter().cloned().zip(values.iter().cloned()).collect();
    let silence_id =
        ctx.compiled.silences.iter().find(|s| s.matches(at, &rule.rule.id, &spec.labels, &group)).map(|s| s.id);
    let (kind, threshold, op, aggregate, window_seconds) = match &rule.kind {
        RuleKind::Event => (AlertKind::Event, None, None, None, None),
        RuleKind::Plugin(_) => (AlertKind::Plugin, None, None, None, None),
        RuleKind::Window { spec: w, .. } => {
            (AlertKind::Window, Some(w.threshold), Some(w.op), Some(w.aggregate), Some(w.seconds))
        }
        RuleKind::Absence { ms } => {
            (AlertKind::Absence, Some((*ms / 1000) as f64), None, None, Some((*ms / 1000) as u64))
        }
    };
    Alert {
        id: alert_id(at, &ctx.tenant, &rule.rule.id, key, ctx.trigger),
        tenant_id: ctx.tenant,
        rule_id: rule.rule.id,
        rule_version: rule.rule.version,
        rule_name: spec.name.clone(),
        kind,
        severity: decision.and_then(|d| d.severity).unwrap_or(spec.severity),
        labels: match decision {
            Some(d) if !d.labels.is_empty() => {
                let mut l = spec.labels.clone();
                l.extend(d.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                l
            }
            _ => spec.labels.clone(),
        },
        group,
        value,
        threshold,
        op,
        aggregate,
        window_seconds,
        state: AlertState::Firing,
        fired_at_ms: at,
        resolved_at_ms: None,
        event_ids,
        silence_id,
        actions: spec.actions.clone(),
        title: decision.and_then(|d| d.title.as_deref()).map(Arc::from),
        details: Arc::new(decision.map(|d| d.fields.to_map()).unwrap_or_default()),
    }
}

/// Time-driven transitions of one tenant's rules at a tick.
pub(super) fn tick_tenant(ctx: &Ctx<'_>, ts: &mut TenantState, out: &mut Out) {
    let watermark = ctx.clock_ms - ctx.cfg.allowed_lateness_ms;
    for rule in &ctx.compiled.rules {
        // An ungrouped absence rule watches from the moment it appears, even with no event yet.
        if matches!(rule.kind, RuleKind::Absence { .. }) && rule.group_by.is_empty() {
            let rs = rule_state(&mut ts.rules, rule, ctx.clock_ms, out, ctx.tenant);
            if !rs.groups.contains_key(&group_id("")) {
                let since = rs.meta.since_ms;
                let mut g = GroupState::new(String::new(), Vec::new(), since, &rule.kind);
                g.last_seen_ms = Some(since);
                rs.groups.insert(g.id, Box::new(g));
                out.state_dirty.push(StateKey { tenant: ctx.tenant, rule: rule.id(), group: Some(String::new()) });
            }
        }
    }
    for (rule_id, rs) in ts.rules.iter_mut() {
        let Some(rule) = ctx.compiled.get(rule_id) else { continue };
        if matches!(rule.kind, RuleKind::Plugin(_)) {
            rs.plugin.expire(watermark);
        }
        let mut idle = Vec::new();
        for g in rs.groups.values_mut() {
            match &rule.kind {
                // Window rules' groups live in their window class (below).
                RuleKind::Window { .. } => {}
                RuleKind::Event | RuleKind::Plugin(_) => {
                    expire_event_alert(ctx, rule, g, out);
                    let now = g.head_ms.max(watermark);
                    if g.open.is_none() && cooldown_over(rule, g.last_fired_ms, now) {
                        idle.push(g.id);
                    }
                }
                RuleKind::Absence { ms } => {
                    let Some(last) = g.last_seen_ms else { continue };
                    if g.open.is_none() && ctx.clock_ms.saturating_sub(last) >= *ms {
                        let silent_s = (ctx.clock_ms - last) as f64 / 1000.0;
                        fire(ctx, rule, g, last.saturating_add(*ms), silent_s, out, None);
                        mark_dirty(out, ctx.tenant, *rule_id, g);
                    }
                }
            }
        }
        for id in idle {
            let Some(g) = rs.groups.remove(&id) else { continue };
            out.deletes.push(StateKey { tenant: ctx.tenant, rule: *rule_id, group: Some(g.key) });
        }
    }
    for (class, cs) in ctx.compiled.window_classes.iter().zip(ts.classes.iter_mut()) {
        let class_id = cs.id;
        cs.groups.retain(|_, g| {
            for (lane, &i) in class.rules.iter().enumerate() {
                let Some(rule) = ctx.compiled.rules.get(i) else { continue };
                if !g.timeline.is_started(lane) {
                    continue;
                }
                if g.timeline.head(lane) < watermark {
                    g.timeline.advance(lane, watermark);
                    evaluate_lane(ctx, rule, g, lane, out);
                    mark_group_dirty(out, ctx.tenant, class_id, g);
                }
                let head = g.timeline.head(lane);
                let Some(l) = g.lanes.get_mut(lane) else { continue };
                if g.timeline.lane_is_empty(lane)
                    && l.open.is_none()
                    && l.pending_since_ms.is_none()
                    && cooldown_over(rule, l.last_fired_ms, head)
                {
                    l.recent.clear(&mut g.ids);
                    *l = Lane::default();
                    g.timeline.stop(lane);
                    if let Some(rs) = ts.rules.get_mut(&rule.id()) {
                        rs.lanes = rs.lanes.saturating_sub(1);
                    }
                    mark_group_dirty(out, ctx.tenant, class_id, g);
                }
            }
            let idle = g.timeline.is_idle();
            if idle {
                out.deletes.push(StateKey { tenant: ctx.tenant, rule: class_id, group: Some(class_group_key(&g.key)) });
            }
            !idle
        });
    }
}
