//! Rules as the control plane stores them ([`Rule`]) and as partition owners evaluate them
//! ([`CompiledRule`], grouped per tenant in [`TenantRules`]): field paths parsed, regexes
//! built and event-type patterns indexed once per rule version, never per event.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use signalops_core::alert::Silence;
use signalops_core::json::FieldError;
use signalops_core::model::TenantId;
use signalops_plugins::registry::{parse_digest, PluginKind, PluginRecord, PluginVersion};
use signalops_plugins::store::{ensure_loaded, ModuleStore};
use signalops_plugins::{Digest, PluginRuntime};

use crate::filter::{CompiledFilter, FieldPath, TypeMatcher};
use crate::spec::{PluginRef, RuleSpec, WindowSpec};

/// The control plane's plugin records, by id.
pub type Plugins = BTreeMap<Uuid, PluginRecord>;

/// The plugin module a rule calls, resolved when the rule is compiled.
#[derive(Debug, Clone)]
pub struct PluginBinding {
    pub plugin_id: Uuid,
    pub version: String,
    pub digest: Digest,
    /// `plugin.config`, MessagePack-encoded once.
    pub config: Arc<[u8]>,
}

/// Finds the plugin a rule names (by id or by name) among the tenant's plugins, and the
/// version it pins (or the newest).
pub fn resolve_plugin<'a>(
    plugins: &'a Plugins,
    tenant: TenantId,
    r: &PluginRef,
) -> Result<(&'a PluginRecord, &'a PluginVersion), FieldError> {
    let by_id = Uuid::parse_str(&r.id).ok().and_then(|id| plugins.get(&id)).filter(|p| p.tenant_id == tenant);
    let record = by_id
        .or_else(|| plugins.values().find(|p| p.tenant_id == tenant && p.name == r.id))
        .ok_or_else(|| FieldError { field: "plugin.id".into(), detail: format!("no such plugin: `{}`", r.id) })?;
    if record.kind != PluginKind::Rule {
        return Err(FieldError { field: "plugin.id".into(), detail: "the plugin is not a rule plugin".into() });
    }
    let version = record.version(r.version.as_deref()).ok_or_else(|| FieldError {
        field: "plugin.version".into(),
        detail: format!("plugin `{}` has no version `{}`", r.id, r.version.as_deref().unwrap_or("")),
    })?;
    Ok((record, version))
}

/// One version of a rule, as replicated through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub version: u32,
    pub spec: RuleSpec,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What a rule evaluates once its filter matched.
#[derive(Debug, Clone)]
pub enum RuleKind {
    /// Fires per matching event (subject to cooldown).
    Event,
    Window {
        spec: WindowSpec,
        field: Option<FieldPath>,
    },
    Absence {
        ms: i64,
    },
    /// Fires per matching event for which the plugin decides so (subject to cooldown).
    Plugin(PluginBinding),
}

#[derive(Debug)]
pub struct CompiledRule {
    pub rule: Rule,
    pub types: TypeMatcher,
    pub filter: Option<CompiledFilter>,
    pub group_by: Vec<FieldPath>,
    pub kind: RuleKind,
    pub for_ms: i64,
    pub cooldown_ms: i64,
    /// Hash of what shapes the rule's state (window, absence, group-by): when it changes
    /// between versions, the rule's windows start afresh.
    pub shape: u64,
}

fn path(p: &str, field: &str) -> Result<FieldPath, FieldError> {
    FieldPath::parse(p).ok_or_else(|| FieldError { field: field.into(), detail: format!("`{p}` is not a field path") })
}

impl CompiledRule {
    /// Compiles a rule; a plugin rule's plugin is resolved among `plugins`.
    pub fn compile(rule: Rule, plugins: &Plugins) -> Result<CompiledRule, FieldError> {
        let spec = &rule.spec;
        let filter = spec.filter.as_ref().map(CompiledFilter::compile).transpose()?;
        let group_by = spec
            .group_by
            .iter()
            .enumerate()
            .map(|(i, p)| path(p, &format!("group_by[{i}]")))
            .collect::<Result<_, _>>()?;
        let kind = match (&spec.window, &spec.absence) {
            _ if spec.plugin.is_some() => {
                let r = spec.plugin.as_ref().ok_or_else(|| FieldError::new("plugin", "required"))?;
                let (record, version) = resolve_plugin(plugins, rule.tenant_id, r)?;
                let digest = parse_digest(&version.sha256)
                    .ok_or_else(|| FieldError::new("plugin.version", "the plugin version has no valid digest"))?;
                RuleKind::Plugin(PluginBinding {
                    plugin_id: record.id,
                    version: version.version.clone(),
                    digest,
                    config: signalops_plugins::runtime::encode_config(&r.config),
                })
            }
            (Some(w), _) => RuleKind::Window {
                spec: w.clone(),
                field: w.field.as_deref().map(|f| path(f, "window.field")).transpose()?,
            },
            (None, Some(a)) => RuleKind::Absence { ms: (a.seconds as i64).saturating_mul(1000) },
            (None, None) => RuleKind::Event,
        };
        let plugin_id = match &kind {
            RuleKind::Plugin(b) => b.plugin_id.to_string(),
            _ => String::new(),
        };
        let shape_text = format!(
            "{}|{}|{}|{plugin_id}",
            serde_json::to_string(&spec.window).unwrap_or_default(),
            serde_json::to_string(&spec.absence).unwrap_or_default(),
            spec.group_by.join("\u{1f}")
        );
        Ok(CompiledRule {
            types: TypeMatcher::new(&spec.event_types),
            filter,
            group_by,
            kind,
            for_ms: (spec.for_seconds as i64).saturating_mul(1000),
            cooldown_ms: (spec.cooldown_seconds as i64).saturating_mul(1000),
            shape: u64::from(signalops_core::partition::fnv1a(shape_text.as_bytes())),
            rule,
        })
    }

    pub fn id(&self) -> Uuid {
        self.rule.id
    }

    /// The numeric field this rule aggregates, if any (sum, avg, min, max).
    pub fn numeric_field(&self) -> Option<&FieldPath> {
        match &self.kind {
            RuleKind::Window { spec, field }
                if !matches!(spec.aggregate, signalops_core::alert::Aggregate::Distinct) =>
            {
                field.as_ref()
            }
            _ => None,
        }
    }
}

/// Window rules of a tenant that share one bucket timeline per group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowClass {
    /// Stable identity of the class (its `group_by` list and window length): the `rule` of
    /// its groups' checkpoint entries.
    pub id: Uuid,
    /// The members' `group_class`.
    pub group_class: usize,
    pub seconds: u64,
    /// Member rules (indexes into `TenantRules::rules`) and their ids, by lane.
    pub rules: Vec<usize>,
    pub rule_ids: Vec<Uuid>,
    /// Per lane, its column among the lanes that count distinct values.
    pub dslots: Vec<Option<u32>>,
    /// Whether a member aggregates a numeric field (sum, avg, min or max).
    pub numeric: bool,
}

/// A tenant's enabled rules and silences, compiled. Replaced whole when any of them changes.
#[derive(Debug, Default)]
pub struct TenantRules {
    pub rules: Vec<Arc<CompiledRule>>,
    pub by_id: HashMap<Uuid, usize>,
    /// Per rule, the index of its `group_by` list among the tenant's distinct lists: rules
    /// with the same list share one group key per event.
    pub group_class: Vec<usize>,
    /// How many distinct `group_by` lists the tenant's rules have.
    pub group_classes: usize,
    /// Per rule, for window rules: its window class and its lane in that class.
    pub window_lane: Vec<Option<(usize, usize)>>,
    /// Window rules with the same `group_by` list and window length, whose windows share one
    /// bucket timeline per group (see `window::Timeline`).
    pub window_classes: Vec<WindowClass>,
    /// Slots of the field paths the tenant's rules read, in per-event `Fields` caches.
    field_slots: HashMap<String, usize>,
    /// Slots of the conditions of the tenant's rules (by identity), in the same caches.
    condition_slots: HashMap<String, usize>,
    pub silences: Vec<Silence>,
}

impl TenantRules {
    /// Compiles the tenant's enabled rules. Rules of a disabled plugin are left out.
    pub fn build(
        rules: &BTreeMap<Uuid, Vec<Rule>>,
        plugins: &Plugins,
        tenant: TenantId,
        silences: Vec<Silence>,
    ) -> TenantRules {
        let mut out = TenantRules { silences, ..Default::default() };
        for versions in rules.values() {
            let Some(current) = versions.last() else { continue };
            if current.tenant_id != tenant || !current.spec.enabled {
                continue;
            }
            if let Some(r) = &current.spec.plugin {
                if resolve_plugin(plugins, tenant, r).is_ok_and(|(p, _)| p.disabled.is_some()) {
                    continue;
                }
            }
            match CompiledRule::compile(current.clone(), plugins) {
                Ok(c) => out.push(c),
                // Rules are validated before they are proposed; one that still fails to compile
                // (a newer node's rule on an older node) is skipped, visibly.
                Err(e) => {
                    tracing::error!(rule_id = %current.id, field = %e.field, error = %e.detail, "rule does not compile; skipped")
                }
            }
        }
        out
    }

    /// Adds a compiled rule; its field paths get this tenant's cache slots.
    pub fn push(&mut self, mut rule: CompiledRule) {
        let slots = &mut self.field_slots;
        let mut intern = |p: &mut FieldPath| {
            let next = slots.len();
            p.set_slot(*slots.entry(p.as_str().to_string()).or_insert(next));
        };
        if let Some(f) = rule.filter.as_mut() {
            f.for_each_path_mut(&mut intern);
            let conditions = &mut self.condition_slots;
            f.set_condition_slots(&mut |identity| {
                let next = conditions.len();
                *conditions.entry(identity.to_string()).or_insert(next)
            });
        }
        rule.group_by.iter_mut().for_each(&mut intern);
        if let RuleKind::Window { field: Some(p), .. } = &mut rule.kind {
            intern(p);
        }
        let group_by = &rule.rule.spec.group_by;
        let class = match self.rules.iter().position(|r| r.rule.spec.group_by == *group_by) {
            Some(same) => self.group_class[same],
            None => {
                self.group_classes += 1;
                self.group_classes - 1
            }
        };
        let lane = match &rule.kind {
            RuleKind::Window { spec, .. } => {
                let c = match self
                    .window_classes
                    .iter()
                    .position(|w| w.group_class == class && w.seconds == spec.seconds)
                {
                    Some(c) => c,
                    None => {
                        let identity = format!("window class\u{1f}{}\u{1f}{}", group_by.join("\u{1f}"), spec.seconds);
                        self.window_classes.push(WindowClass {
                            id: Uuid::from_u128(xxhash_rust::xxh3::xxh3_128(identity.as_bytes())),
                            group_class: class,
                            seconds: spec.seconds,
                            rules: Vec::new(),
                            rule_ids: Vec::new(),
                            dslots: Vec::new(),
                            numeric: false,
                        });
                        self.window_classes.len() - 1
                    }
                };
                let wc = &mut self.window_classes[c];
                let distinct = matches!(spec.aggregate, signalops_core::alert::Aggregate::Distinct);
                wc.dslots.push(distinct.then(|| wc.dslots.iter().flatten().count() as u32));
                wc.numeric |= !matches!(
                    spec.aggregate,
                    signalops_core::alert::Aggregate::Count | signalops_core::alert::Aggregate::Distinct
                );
                wc.rules.push(self.rules.len());
                wc.rule_ids.push(rule.id());
                Some((c, wc.rules.len() - 1))
            }
            _ => None,
        };
        self.window_lane.push(lane);
        self.by_id.insert(rule.id(), self.rules.len());
        self.group_class.push(class);
        self.rules.push(Arc::new(rule));
    }

    pub fn get(&self, id: &Uuid) -> Option<&Arc<CompiledRule>> {
        self.by_id.get(id).and_then(|&i| self.rules.get(i))
    }
}

/// The compiled rules of every tenant in one partition, tagged with the control-plane
/// revision they were built from.
#[derive(Debug, Default, Clone)]
pub struct RuleSet {
    pub revision: u64,
    pub tenants: HashMap<TenantId, Arc<TenantRules>>,
}

impl RuleSet {
    /// Whether a rule of `tenant` calls the module with this digest.
    pub fn uses_module(&self, tenant: &TenantId, digest: &Digest) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|t| t.rules.iter().any(|r| matches!(&r.kind, RuleKind::Plugin(b) if b.digest == *digest)))
    }
}

impl RuleSet {
    /// Loads every module this set's plugin rules use; failures are logged (those rules' calls
    /// then fail as `unavailable`, visibly).
    pub async fn load_plugin_modules(&self, runtime: &Arc<PluginRuntime>, store: &ModuleStore) {
        for (tenant, rules) in &self.tenants {
            for rule in &rules.rules {
                if let RuleKind::Plugin(b) = &rule.kind {
                    if let Err(e) = ensure_loaded(runtime, store, *tenant, &b.digest).await {
                        tracing::error!(tenant_id = %tenant, rule_id = %rule.id(), plugin_id = %b.plugin_id, error = %e, "cannot load plugin module");
                    }
                }
            }
        }
    }
}
