//! Window classes: rules that share one timeline (same event types, filter, group-by and
//! window length) keep one group per key with a lane per rule, so an event is inserted once
//! however many of those rules watch it. Lanes keep their own alert state and event samples.

use super::*;

/// The groups of one window class: the window rules of a tenant with the same `group_by` and
/// window length. Each group holds one bucket timeline with a lane per member rule, and each
/// lane's alert state next to it, so an event updates all of a group's rules in one place.
#[derive(Debug)]
pub(super) struct ClassState {
    pub(super) id: Uuid,
    pub(super) seconds: u64,
    pub(super) numeric: bool,
    pub(super) rule_ids: Vec<Uuid>,
    pub(super) dslots: Arc<[Option<u32>]>,
    pub(super) groups: FastMap<GroupId, Box<SharedGroup>>,
}

impl ClassState {
    pub(super) fn new(class: &WindowClass) -> ClassState {
        ClassState {
            id: class.id,
            seconds: class.seconds,
            numeric: class.numeric,
            rule_ids: class.rule_ids.clone(),
            dslots: class.dslots.clone().into(),
            groups: FastMap::default(),
        }
    }

    pub(super) fn same_layout(&self, class: &WindowClass) -> bool {
        self.id == class.id
            && self.seconds == class.seconds
            && self.numeric == class.numeric
            && self.rule_ids == class.rule_ids
            && *self.dslots == *class.dslots
    }
}

#[derive(Debug)]
pub(super) struct SharedGroup {
    /// The group key (each lane's state key in checkpoints, and part of alert ids).
    pub(super) key: String,
    /// Group-by values, for the alerts' `group`.
    pub(super) values: Vec<Value>,
    pub(super) timeline: Timeline,
    pub(super) lanes: Vec<Lane>,
    /// The event ids the lanes' samples hold.
    pub(super) ids: IdSlab,
    /// Changed since the last checkpoint.
    pub(super) dirty: bool,
}

/// Event ids the lanes of a shared group keep as samples: each held once, with the number of
/// lane samples holding it (lanes mostly sample the same events, and need no atomic reference
/// count per lane and event).
#[derive(Debug, Default)]
pub(super) struct IdSlab {
    pub(super) slots: Vec<(Option<Arc<str>>, u32)>,
    pub(super) free: Vec<u32>,
    /// The slot filled last (the lanes of one event all hold its id).
    pub(super) last: Option<u32>,
}

impl IdSlab {
    /// Holds `id` once more; returns its slot.
    pub(super) fn hold(&mut self, id: &Arc<str>) -> u32 {
        if let Some(s) = self.last {
            if let Some((Some(held), refs)) = self.slots.get_mut(s as usize) {
                if Arc::ptr_eq(held, id) {
                    *refs += 1;
                    return s;
                }
            }
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = (Some(id.clone()), 1);
                s
            }
            None => {
                self.slots.push((Some(id.clone()), 1));
                (self.slots.len() - 1) as u32
            }
        };
        self.last = Some(s);
        s
    }

    pub(super) fn release(&mut self, s: u32) {
        let Some((held, refs)) = self.slots.get_mut(s as usize) else { return };
        *refs = refs.saturating_sub(1);
        if *refs == 0 && held.take().is_some() {
            self.free.push(s);
        }
    }

    pub(super) fn get(&self, s: u32) -> Option<&Arc<str>> {
        self.slots.get(s as usize).and_then(|(id, _)| id.as_ref())
    }
}

/// The newest [`EVENT_SAMPLE`] slots of an [`IdSlab`], oldest first.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Ring {
    pub(super) slots: [u32; EVENT_SAMPLE],
    pub(super) start: u8,
    pub(super) len: u8,
}

impl Ring {
    pub(super) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..usize::from(self.len)).map(|i| self.slots[(usize::from(self.start) + i) % EVENT_SAMPLE])
    }

    pub(super) fn push(&mut self, ids: &mut IdSlab, id: &Arc<str>) {
        let slot = ids.hold(id);
        if usize::from(self.len) == EVENT_SAMPLE {
            ids.release(self.slots[usize::from(self.start)]);
            self.slots[usize::from(self.start)] = slot;
            self.start = ((usize::from(self.start) + 1) % EVENT_SAMPLE) as u8;
        } else {
            self.slots[(usize::from(self.start) + usize::from(self.len)) % EVENT_SAMPLE] = slot;
            self.len += 1;
        }
    }

    /// Releases every slot (the lane is emptied).
    pub(super) fn clear(&mut self, ids: &mut IdSlab) {
        for s in self.iter() {
            ids.release(s);
        }
        *self = Ring::default();
    }

    pub(super) fn to_ids(self, ids: &IdSlab) -> VecDeque<Arc<str>> {
        self.iter().filter_map(|s| ids.get(s).cloned()).collect()
    }

    pub(super) fn event_ids(&self, ids: &IdSlab) -> Vec<String> {
        self.iter().filter_map(|s| ids.get(s).map(|id| id.to_string())).collect()
    }
}

impl SharedGroup {
    /// A group of a class whose windows are `seconds` long, with lanes `dslots` (see
    /// [`Timeline::new`]).
    pub(super) fn new(
        key: String,
        values: Vec<Value>,
        (seconds, dslots, numeric): (u64, &Arc<[Option<u32>]>, bool),
    ) -> SharedGroup {
        SharedGroup {
            key,
            values,
            timeline: Timeline::new(seconds, dslots.clone(), numeric),
            lanes: (0..dslots.len()).map(|_| Lane::default()).collect(),
            ids: IdSlab::default(),
            dirty: false,
        }
    }
}

/// One window rule's alert state in one group (its window is its lane of the timeline).
#[derive(Debug, Default)]
pub(super) struct Lane {
    /// The newest matching events, as slots of the group's [`IdSlab`].
    pub(super) recent: Ring,
    pub(super) pending_since_ms: Option<i64>,
    pub(super) open: Option<Box<Alert>>,
    pub(super) last_fired_ms: Option<i64>,
}

/// An event for the rules of one window class it matched: `run` holds (lane, rule index) of
/// the matching rules, in lane order.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_class_event(
    ctx: &Ctx<'_>,
    ts: &mut TenantState,
    class: usize,
    run: &[(usize, usize)],
    fields: &mut Fields<'_>,
    id: &Arc<str>,
    t: i64,
    (key, gid): (&str, GroupId),
    out: &mut Out,
) {
    let Some(cs) = ts.classes.get_mut(class) else { return };
    let Some(first) = run.first().and_then(|h| ctx.compiled.rules.get(h.1)) else { return };
    let (seconds, dslots, numeric) = (cs.seconds, &cs.dslots, cs.numeric);
    let g = cs.groups.entry(gid).or_insert_with(|| {
        let values = first.group_by.iter().map(|p| fields.get(p).map_or(Value::Null, |v| v.to_json())).collect();
        Box::new(SharedGroup::new(key.to_string(), values, (seconds, dslots, numeric)))
    });
    for &(lane, i) in run {
        let Some(rule) = ctx.compiled.rules.get(i) else { continue };
        if !g.timeline.is_started(lane) {
            let rs = rule_state(&mut ts.rules, rule, ctx.clock_ms, out, ctx.tenant);
            if !admit_group(ctx, rule, rs, out) {
                continue;
            }
            rs.lanes += 1;
            g.timeline.start(lane, t);
        }
        on_lane_event(ctx, rule, (cs.id, g), lane, fields, id, t, out);
    }
    if g.timeline.is_idle() {
        cs.groups.remove(&gid);
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn on_lane_event(
    ctx: &Ctx<'_>,
    rule: &CompiledRule,
    (class_id, g): (Uuid, &mut SharedGroup),
    lane: usize,
    fields: &mut Fields<'_>,
    id: &Arc<str>,
    t: i64,
    out: &mut Out,
) {
    let RuleKind::Window { spec, field } = &rule.kind else { return };
    let head = g.timeline.head(lane);
    if t < head - ctx.cfg.allowed_lateness_ms {
        out.late += 1;
        return;
    }
    if t > head {
        g.timeline.advance(lane, t);
    }
    let (value, distinct) = match spec.aggregate {
        signalops_core::alert::Aggregate::Distinct => {
            (None, field.as_ref().and_then(|f| fields.key_hash(f, distinct_hash)))
        }
        signalops_core::alert::Aggregate::Count => (None, None),
        _ => (field.as_ref().and_then(|f| fields.get(f)).and_then(|v| v.as_f64()), None),
    };
    if g.timeline.insert(lane, t, value, distinct) == Insert::TooLate {
        out.late += 1;
        return;
    }
    let Some(l) = g.lanes.get_mut(lane) else { return };
    l.recent.push(&mut g.ids, id);
    evaluate_lane(ctx, rule, g, lane, out);
    mark_group_dirty(out, ctx.tenant, class_id, g);
}

pub(super) fn mark_group_dirty(out: &mut Out, tenant: TenantId, class: Uuid, g: &mut SharedGroup) {
    if !g.dirty {
        g.dirty = true;
        out.state_dirty.push(StateKey { tenant, rule: class, group: Some(class_group_key(&g.key)) });
    }
}

/// The stored key of a window class's group.
pub(super) fn class_group_key(key: &str) -> String {
    let mut k = String::with_capacity(CLASS_GROUP.len() + key.len());
    k.push_str(CLASS_GROUP);
    k.push_str(key);
    k
}

/// Fires or resolves a window rule's alert in one group, from its lane's value at the lane's
/// head.
pub(super) fn evaluate_lane(ctx: &Ctx<'_>, rule: &CompiledRule, g: &mut SharedGroup, lane: usize, out: &mut Out) {
    let RuleKind::Window { spec, .. } = &rule.kind else { return };
    let at = g.timeline.head(lane);
    let value = g.timeline.value(lane, spec.aggregate);
    let holds = value.is_some_and(|v| spec.op.holds(v, spec.threshold));
    let Some(l) = g.lanes.get_mut(lane) else { return };
    if holds {
        if l.open.is_some() {
            return;
        }
        let since = *l.pending_since_ms.get_or_insert(at);
        if at - since >= rule.for_ms && cooldown_over(rule, l.last_fired_ms, at) {
            let sample = l.recent.event_ids(&g.ids);
            let alert = new_alert(ctx, rule, (&g.key, &g.values), sample, at, value.unwrap_or_default(), None);
            l.last_fired_ms = Some(at);
            l.pending_since_ms = None;
            out.transitions.push((alert.id, Transition::Firing));
            out.alerts.push(alert.clone());
            l.open = Some(Box::new(alert));
            out.fired += 1;
        }
    } else {
        l.pending_since_ms = None;
        if let Some(mut a) = l.open.take() {
            a.state = AlertState::Resolved;
            a.resolved_at_ms = Some(at);
            out.transitions.push((a.id, Transition::Resolved));
            out.alerts.push(*a);
            out.resolved += 1;
        }
    }
}
