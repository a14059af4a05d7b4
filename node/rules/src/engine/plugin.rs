//! Plugin rule calls from the engine: the call input, the alert view a plugin reads, and how a
//! decision or failure becomes window, state and alert changes (committed only on success).

use super::*;

/// Stored plugin state entries are group keys with these prefixes (group keys of rules are
/// JSON values, which never start with a NUL), followed by the entry's key in hex.
pub(super) const PLUGIN_WINDOW: &str = "\u{0}w";

pub(super) const PLUGIN_STATE: &str = "\u{0}s";

pub(super) fn plugin_entry_group(k: &EntryKey) -> String {
    match k {
        EntryKey::Window(key) => format!("{PLUGIN_WINDOW}{}", hex::encode(key)),
        EntryKey::State(key) => format!("{PLUGIN_STATE}{}", hex::encode(key)),
    }
}

/// Answers a plugin rule call's `alert_open` for its event: whether a match now would only
/// count toward the open alert of the event's group, as `on_group_event` will treat it. The
/// group key is built only when the plugin asks, and is then kept for the event's other rules.
pub(super) struct GroupAlerts<'a, 'e> {
    pub(super) keys: &'a mut [(String, GroupId)],
    pub(super) ready: &'a mut [bool],
    pub(super) gc: usize,
    pub(super) rule: &'a CompiledRule,
    pub(super) fields: &'a mut Fields<'e>,
    pub(super) groups: &'a FastMap<GroupId, Box<GroupState>>,
    /// The event's effective time.
    pub(super) t: i64,
    /// The engine clock less the allowed lateness (what alerts expire against).
    pub(super) floor_ms: i64,
}

impl RuleAlerts for GroupAlerts<'_, '_> {
    fn alert_open(&mut self) -> bool {
        let Some((_, gid)) = event_key(self.keys, self.ready, self.gc, self.rule, self.fields) else {
            return false;
        };
        let Some(g) = self.groups.get(&gid) else { return false };
        // `on_group_event` first moves the group's head to the event, then expires the alert.
        g.open.is_some() && !event_alert_expired(self.rule, g, g.head_ms.max(self.t).max(self.floor_ms))
    }
}

/// Calls a plugin rule's module for one event; failures are recorded (and the rule's event
/// evaluation simply does not fire).
#[allow(clippy::too_many_arguments)]
pub(super) fn call_plugin(
    plugins: &mut Option<EnginePlugins>,
    binding: &PluginBinding,
    rule: &CompiledRule,
    state: &mut Box<PluginState>,
    ev: &EventRecord,
    t: i64,
    clock: i64,
    alerts: &mut dyn RuleAlerts,
) -> Option<Decision> {
    let p = plugins.as_mut()?;
    let input = CallInput {
        event: ev,
        time_ms: t,
        config: &binding.config,
        rule_id: rule.rule.id,
        rule_version: rule.rule.version,
    };
    let report = p.host.evaluate(ev.tenant_id, &binding.digest, state, &input, alerts);
    if let Some(stats) = &p.stats {
        p.pending.record(stats, ev.tenant_id, binding.plugin_id, &report, clock, p.max_consecutive_failures);
    }
    match p.reports.as_mut() {
        // Dry-runs keep the report; the live path moves the decision out without a copy.
        Some(r) => {
            let decision = match &report.outcome {
                Outcome::Decision(d) => Some(d.clone()),
                Outcome::Failure(_) => None,
            };
            r.push((ev.id.clone(), rule.rule.id, report));
            decision
        }
        None => match report.outcome {
            Outcome::Decision(d) => Some(d),
            Outcome::Failure(_) => None,
        },
    }
}
