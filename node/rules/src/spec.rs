//! Rule definitions: what a tenant sends to create or replace a rule, and its validation.
//!
//! A rule watches events of some types (exact types or `*` globs), keeps those its `filter`
//! accepts, and fires either on every such event, on a windowed aggregate crossing a threshold
//! (`window`), on the absence of such events (`absence`), or as a plugin decides (`plugin`).
//! Validation rejects the whole definition with the JSON path of the first member at fault
//! (`filter.all[1].not.op`, `labels.team`), so an author can find the mistake.
//!
//! The types are stored as they are (JSON in the API, MessagePack in the Raft log).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub use signalops_core::alert::{Aggregate, CompareOp, Severity};
pub use signalops_core::json::FieldError;
use signalops_core::json::{array, integer, join, member, object, only_members, string};
use signalops_core::named_enum;

use signalops_core::model::{valid_name, valid_type};

use crate::filter::{CompiledFilter, FieldPath, FIELD_PATH_HELP};

/// Maximum length of a rule name, in characters, after trimming.
pub const MAX_NAME_CHARS: usize = 200;
/// Maximum length of a rule description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
/// Longest cooldown between two firings of a rule for one group: 30 days.
pub const MAX_COOLDOWN_SECONDS: u64 = 2_592_000;
/// Maximum length of a label value, in characters.
pub const MAX_LABEL_VALUE_CHARS: usize = 256;
/// Maximum length of a plugin id, in characters.
pub const MAX_PLUGIN_ID_CHARS: usize = 128;

/// Members a client gets back from GET and may send back on PUT; they are ignored on input.
pub const READ_ONLY_MEMBERS: &[&str] = &["id", "version", "tenant_id", "created_at", "updated_at", "status"];

const RULE_MEMBERS: &[&str] = &[
    "name",
    "description",
    "event_types",
    "filter",
    "window",
    "absence",
    "plugin",
    "group_by",
    "for_seconds",
    "cooldown_seconds",
    "severity",
    "labels",
    "actions",
    "enabled",
];

/// Size limits on rule definitions (operator configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleLimits {
    /// Conditions in one filter, counted across all nesting levels.
    pub max_filter_conditions: usize,
    /// Nesting levels of a filter; a bare condition is one level.
    pub max_filter_depth: usize,
    /// Length of a `regex` condition's pattern, in bytes.
    pub max_regex_len: usize,
    /// Entries in `event_types`.
    pub max_event_types: usize,
    /// Entries in `group_by`.
    pub max_group_by: usize,
    /// Entries in `labels`.
    pub max_labels: usize,
    /// Longest `window`, `absence` and `for_seconds` duration.
    pub max_window_seconds: u64,
    /// Values in one `in` or `not_in` list.
    pub max_in_values: usize,
    /// Entries in `actions`.
    pub max_actions: usize,
}

impl Default for RuleLimits {
    fn default() -> Self {
        RuleLimits {
            max_filter_conditions: 64,
            max_filter_depth: 8,
            max_regex_len: 512,
            max_event_types: 32,
            max_group_by: 5,
            max_labels: 32,
            max_window_seconds: 604_800,
            max_in_values: 1000,
            max_actions: 16,
        }
    }
}

/// A rule as its author defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Display name, 1 to 200 characters (surrounding whitespace is trimmed).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Event types the rule sees: exact types or globs where `*` matches any run of characters
    /// (dots included); `*` alone matches every type.
    pub event_types: Vec<String>,
    /// Which of those events count; none means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    /// Fire when an aggregate over a sliding window crosses a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
    /// Fire when no matching event arrives for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absence: Option<AbsenceSpec>,
    /// Hand matching events to a plugin, which decides when to fire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginRef>,
    /// Field paths whose values split the rule into independent groups (one state, one alert each).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// How long a window condition must hold before the rule fires; 0 fires at once.
    #[serde(default)]
    pub for_seconds: u64,
    /// Minimum time between two firings for one group.
    #[serde(default)]
    pub cooldown_seconds: u64,
    #[serde(default)]
    pub severity: Severity,
    /// Free-form labels copied onto alerts.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Notifications to send when the rule fires; each names a `channel_id`.
    #[serde(default)]
    pub actions: Vec<Value>,
    /// A disabled rule keeps its definition but evaluates nothing.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

/// A filter node: `{"all": [...]}`, `{"any": [...]}`, `{"not": {...}}` or a condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Filter {
    /// Every child matches (logical AND).
    All {
        all: Vec<Filter>,
    },
    /// At least one child matches (logical OR).
    Any {
        any: Vec<Filter>,
    },
    /// The child does not match.
    Not {
        not: Box<Filter>,
    },
    Condition(Condition),
}

/// `{"field": "payload.amount", "op": "gte", "value": 100}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// A field path: `id`, `type`, `source`, `user_id`, `session_id` or `payload.<key>[.<key>...]`.
    pub field: String,
    pub op: Op,
    /// The operand; an explicit `null` is kept (it is a value `eq` and `ne` can compare with).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present_value")]
    pub value: Option<Value>,
}

/// A member that is present is `Some`, even when it is `null`.
fn present_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

named_enum! {
    /// A condition's operator. A missing field fails every operator except `ne`, `not_in` and
    /// `exists: false`.
    pub enum Op {
        /// Equal (JSON equality; numbers compare by value, so 100 equals 100.0).
        Eq = "eq",
        /// Not equal, or the field is missing.
        Ne = "ne",
        /// Greater than: two numbers compare numerically, two strings lexicographically.
        Gt = "gt",
        Gte = "gte",
        Lt = "lt",
        Lte = "lte",
        /// Equal to one of the listed values.
        In = "in",
        /// Equal to none of the listed values, or the field is missing.
        NotIn = "not_in",
        /// A string field contains the string value, or an array field has an element equal to it.
        Contains = "contains",
        /// A string field starts with the string value.
        StartsWith = "starts_with",
        /// The field is present (`null` counts as present); `"value": false` inverts.
        Exists = "exists",
        /// A string field matches the regular expression (unanchored; Rust `regex` syntax).
        Regex = "regex",
    }
}

/// Slides over the last `seconds` of matching events (per group) and fires when
/// `aggregate(field) op threshold` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSpec {
    pub seconds: u64,
    pub aggregate: Aggregate,
    /// The aggregated field path; required for every aggregate except `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub op: CompareOp,
    pub threshold: f64,
}

/// Fires when no matching event arrives (per group) for `seconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsenceSpec {
    pub seconds: u64,
}

/// A plugin that evaluates the rule's matching events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginRef {
    pub id: String,
    /// The plugin version to use, if the rule pins one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Passed to the plugin as it is; defaults to `{}`.
    #[serde(default = "empty_object")]
    pub config: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// True when `s` is an event type, or a glob: an event type's characters plus `*`, where each
/// `*` stands for any run of characters (so `payment.*`, `*.failed` and `*` are globs).
pub fn valid_type_pattern(s: &str) -> bool {
    if s.contains('*') {
        valid_type(&s.replace('*', "x"))
    } else {
        valid_type(s)
    }
}

/// Parses and validates a rule definition (a JSON request body).
///
/// Members set to `null` count as absent. Unknown members are rejected, except the read-only
/// ones a GET returns ([`READ_ONLY_MEMBERS`]), which are ignored.
pub fn parse_rule(body: &Value, limits: &RuleLimits) -> Result<RuleSpec, FieldError> {
    let Value::Object(obj) = body else {
        return Err(FieldError::new("", "a rule must be a JSON object"));
    };
    for key in obj.keys() {
        if !RULE_MEMBERS.contains(&key.as_str()) && !READ_ONLY_MEMBERS.contains(&key.as_str()) {
            return Err(FieldError::new(
                key.as_str(),
                format!("unknown member; a rule has {}", RULE_MEMBERS.join(", ")),
            ));
        }
    }

    let name = match member(obj, "name") {
        None => return Err(FieldError::new("name", "required")),
        Some(v) => {
            let s = string(v, "name")?.trim();
            let n = s.chars().count();
            if n == 0 || n > MAX_NAME_CHARS {
                return Err(FieldError::new("name", format!("must be 1 to {MAX_NAME_CHARS} characters")));
            }
            s.to_owned()
        }
    };
    let description = match member(obj, "description") {
        None => None,
        Some(v) => {
            let s = string(v, "description")?;
            if s.chars().count() > MAX_DESCRIPTION_CHARS {
                return Err(FieldError::new(
                    "description",
                    format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
                ));
            }
            Some(s.to_owned())
        }
    };
    let event_types = parse_event_types(member(obj, "event_types"), limits)?;
    let filter = member(obj, "filter").map(|v| parse_filter(v, limits)).transpose()?;

    let mut kind: Option<&str> = None;
    for k in ["window", "absence", "plugin"] {
        if member(obj, k).is_some() {
            if let Some(first) = kind {
                return Err(FieldError::new(
                    k,
                    format!("a rule has at most one of window, absence and plugin; {first} is set"),
                ));
            }
            kind = Some(k);
        }
    }
    let window = member(obj, "window").map(|v| parse_window(v, limits)).transpose()?;
    let absence = match member(obj, "absence") {
        None => None,
        Some(v) => {
            let o = object(v, "absence")?;
            only_members(o, "absence", &["seconds"])?;
            Some(AbsenceSpec { seconds: seconds(member(o, "seconds"), "absence.seconds", limits)? })
        }
    };
    let plugin = member(obj, "plugin").map(parse_plugin).transpose()?;

    let for_seconds = integer(member(obj, "for_seconds"), "for_seconds", 0, limits.max_window_seconds)?;
    if for_seconds > 0 && window.is_none() {
        let detail =
            if absence.is_some() { "must be 0 with absence" } else { "needs a window; set it to 0 or omit it" };
        return Err(FieldError::new("for_seconds", detail));
    }
    let cooldown_seconds = integer(member(obj, "cooldown_seconds"), "cooldown_seconds", 0, MAX_COOLDOWN_SECONDS)?;
    let group_by = parse_group_by(member(obj, "group_by"), limits)?;
    let severity = match member(obj, "severity") {
        None => Severity::default(),
        Some(v) => Severity::from_name(string(v, "severity")?)
            .ok_or_else(|| FieldError::new("severity", format!("must be one of {}", Severity::names())))?,
    };
    let labels = parse_labels(member(obj, "labels"), limits)?;
    let actions = parse_actions(member(obj, "actions"), limits)?;
    let enabled = match member(obj, "enabled") {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| FieldError::new("enabled", "must be true or false"))?,
    };

    Ok(RuleSpec {
        name,
        description,
        event_types,
        filter,
        window,
        absence,
        plugin,
        group_by,
        for_seconds,
        cooldown_seconds,
        severity,
        labels,
        actions,
        enabled,
    })
}

/// A required duration of 1 second up to the window limit.
fn seconds(v: Option<&Value>, path: &str, limits: &RuleLimits) -> Result<u64, FieldError> {
    match v {
        None => Err(FieldError::new(path, "required")),
        Some(_) => integer(v, path, 1, limits.max_window_seconds),
    }
}

fn field_path(v: &Value, path: &str) -> Result<String, FieldError> {
    let s = string(v, path)?;
    match FieldPath::parse(s) {
        Some(_) => Ok(s.to_owned()),
        None => Err(FieldError::new(path, FIELD_PATH_HELP)),
    }
}

fn parse_event_types(v: Option<&Value>, limits: &RuleLimits) -> Result<Vec<String>, FieldError> {
    let v = v.ok_or_else(|| FieldError::new("event_types", "required"))?;
    let items = array(v, "event_types", limits.max_event_types)?;
    if items.is_empty() {
        return Err(FieldError::new("event_types", "must list at least one event type"));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("event_types[{i}]");
        let s = string(item, &path)?;
        if !valid_type_pattern(s) {
            return Err(FieldError::new(
                path,
                "must be an event type ([A-Za-z0-9_.:-], no empty dot-separated part) or a glob using *",
            ));
        }
        if out.iter().any(|t| t == s) {
            return Err(FieldError::new(path, "duplicate event type"));
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

fn parse_window(v: &Value, limits: &RuleLimits) -> Result<WindowSpec, FieldError> {
    let o = object(v, "window")?;
    only_members(o, "window", &["seconds", "aggregate", "field", "op", "threshold"])?;
    let seconds = seconds(member(o, "seconds"), "window.seconds", limits)?;
    let aggregate = match member(o, "aggregate") {
        None => return Err(FieldError::new("window.aggregate", "required")),
        Some(v) => Aggregate::from_name(string(v, "window.aggregate")?)
            .ok_or_else(|| FieldError::new("window.aggregate", format!("must be one of {}", Aggregate::names())))?,
    };
    let field = match (member(o, "field"), aggregate) {
        (Some(_), Aggregate::Count) => {
            return Err(FieldError::new("window.field", "not allowed with aggregate count"));
        }
        (None, Aggregate::Count) => None,
        (None, _) => {
            return Err(FieldError::new("window.field", format!("required with aggregate {}", aggregate.as_str())))
        }
        (Some(v), _) => Some(field_path(v, "window.field")?),
    };
    let op = match member(o, "op") {
        None => return Err(FieldError::new("window.op", "required")),
        Some(v) => CompareOp::from_name(string(v, "window.op")?)
            .ok_or_else(|| FieldError::new("window.op", format!("must be one of {}", CompareOp::names())))?,
    };
    let threshold = match member(o, "threshold").and_then(Value::as_f64) {
        Some(t) if t.is_finite() => t,
        _ => return Err(FieldError::new("window.threshold", "required: a finite number")),
    };
    Ok(WindowSpec { seconds, aggregate, field, op, threshold })
}

fn parse_plugin(v: &Value) -> Result<PluginRef, FieldError> {
    let o = object(v, "plugin")?;
    only_members(o, "plugin", &["id", "version", "config"])?;
    let id = match member(o, "id") {
        None => return Err(FieldError::new("plugin.id", "required")),
        Some(v) => string(v, "plugin.id")?,
    };
    if id.is_empty() || id.chars().count() > MAX_PLUGIN_ID_CHARS {
        return Err(FieldError::new("plugin.id", format!("must be 1 to {MAX_PLUGIN_ID_CHARS} characters")));
    }
    let version = member(o, "version").map(|v| string(v, "plugin.version").map(str::to_owned)).transpose()?;
    let config = match member(o, "config") {
        None => empty_object(),
        Some(v) => Value::Object(object(v, "plugin.config")?.clone()),
    };
    Ok(PluginRef { id: id.to_owned(), version, config })
}

fn parse_group_by(v: Option<&Value>, limits: &RuleLimits) -> Result<Vec<String>, FieldError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let items = array(v, "group_by", limits.max_group_by)?;
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("group_by[{i}]");
        let s = field_path(item, &path)?;
        if out.contains(&s) {
            return Err(FieldError::new(path, "duplicate field"));
        }
        out.push(s);
    }
    Ok(out)
}

fn parse_labels(v: Option<&Value>, limits: &RuleLimits) -> Result<BTreeMap<String, String>, FieldError> {
    let Some(v) = v else { return Ok(BTreeMap::new()) };
    let o = object(v, "labels")?;
    if o.len() > limits.max_labels {
        return Err(FieldError::new("labels", format!("must have at most {} labels", limits.max_labels)));
    }
    let mut out = BTreeMap::new();
    for (k, v) in o {
        let path = join("labels", k);
        if !valid_name(k) {
            return Err(FieldError::new(path, "label names are 1 to 128 characters of [A-Za-z0-9_.:-]"));
        }
        let s = string(v, &path)?;
        if s.chars().count() > MAX_LABEL_VALUE_CHARS {
            return Err(FieldError::new(path, format!("must be at most {MAX_LABEL_VALUE_CHARS} characters")));
        }
        out.insert(k.clone(), s.to_owned());
    }
    Ok(out)
}

fn parse_actions(v: Option<&Value>, limits: &RuleLimits) -> Result<Vec<Value>, FieldError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let items = array(v, "actions", limits.max_actions)?;
    for (i, item) in items.iter().enumerate() {
        let path = format!("actions[{i}]");
        let o = object(item, &path)?;
        let channel = join(&path, "channel_id");
        match member(o, "channel_id").map(|c| string(c, &channel)).transpose()? {
            Some(c) if !c.is_empty() => {}
            _ => return Err(FieldError::new(channel, "required: a non-empty string")),
        }
        crate::template::parse_template(member(o, "template"), &join(&path, "template"))?;
    }
    Ok(items.to_vec())
}

const NODE_HELP: &str =
    r#"a filter node is {"all": [...]}, {"any": [...]}, {"not": {...}} or {"field", "op", "value"}"#;

/// Checks the filter's shape and limits here, then compiles it for the per-operator checks
/// (operand types, field paths, regexes).
fn parse_filter(v: &Value, limits: &RuleLimits) -> Result<Filter, FieldError> {
    let mut walk = FilterWalk { limits, conditions: 0 };
    let filter = walk.node(v, "filter", 1)?;
    CompiledFilter::compile(&filter)?;
    Ok(filter)
}

struct FilterWalk<'a> {
    limits: &'a RuleLimits,
    conditions: usize,
}

impl FilterWalk<'_> {
    fn node(&mut self, v: &Value, path: &str, depth: usize) -> Result<Filter, FieldError> {
        if depth > self.limits.max_filter_depth {
            return Err(FieldError::new(path, format!("filters nest at most {} levels", self.limits.max_filter_depth)));
        }
        let Value::Object(o) = v else { return Err(FieldError::new(path, NODE_HELP)) };
        if o.is_empty() {
            return Err(FieldError::new(path, NODE_HELP));
        }
        let Some(kind) = ["all", "any", "not"].into_iter().find(|k| o.contains_key(*k)) else {
            return self.condition(o, path);
        };
        if let Some(other) = o.keys().find(|k| *k != kind) {
            return Err(FieldError::new(
                join(path, other),
                format!("a filter node with \"{kind}\" has no other members"),
            ));
        }
        let child_path = join(path, kind);
        let child = &o[kind];
        if kind == "not" {
            return Ok(Filter::Not { not: Box::new(self.node(child, &child_path, depth + 1)?) });
        }
        let items = match child.as_array() {
            Some(a) if !a.is_empty() => a,
            _ => return Err(FieldError::new(child_path, "must be a non-empty array of filter nodes")),
        };
        let children = items
            .iter()
            .enumerate()
            .map(|(i, c)| self.node(c, &format!("{child_path}[{i}]"), depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if kind == "all" { Filter::All { all: children } } else { Filter::Any { any: children } })
    }

    fn condition(&mut self, o: &Map<String, Value>, path: &str) -> Result<Filter, FieldError> {
        self.conditions += 1;
        if self.conditions > self.limits.max_filter_conditions {
            return Err(FieldError::new(
                "filter",
                format!("a filter has at most {} conditions", self.limits.max_filter_conditions),
            ));
        }
        if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "field" | "op" | "value")) {
            return Err(FieldError::new(
                join(path, k),
                "unknown member; a condition has field, op and value (combine conditions with all, any, not)",
            ));
        }
        let field = match member(o, "field") {
            None => return Err(FieldError::new(join(path, "field"), "required")),
            Some(v) => field_path(v, &join(path, "field"))?,
        };
        let op_path = join(path, "op");
        let op = match member(o, "op") {
            None => return Err(FieldError::new(op_path, "required")),
            Some(v) => Op::from_name(string(v, &op_path)?)
                .ok_or_else(|| FieldError::new(&op_path, format!("must be one of {}", Op::names())))?,
        };
        let value = o.get("value").cloned();
        match (op, &value) {
            (Op::In | Op::NotIn, Some(Value::Array(a))) if a.len() > self.limits.max_in_values => {
                return Err(FieldError::new(
                    join(path, "value"),
                    format!("must list at most {} values", self.limits.max_in_values),
                ));
            }
            (Op::Regex, Some(Value::String(s))) if s.len() > self.limits.max_regex_len => {
                return Err(FieldError::new(
                    join(path, "value"),
                    format!("a pattern is at most {} bytes", self.limits.max_regex_len),
                ));
            }
            _ => {}
        }
        Ok(Filter::Condition(Condition { field, op, value }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canonical() -> Value {
        serde_json::from_str(
            r#"{"name": "Checkout failures", "event_types": ["checkout.failed"], "filter": {"all": [
                {"field": "payload.amount", "op": "gte", "value": 100},
                {"not": {"field": "payload.country", "op": "in", "value": ["DE"]}}]},
            "window": {"seconds": 300, "aggregate": "count", "op": "gt", "threshold": 10},
            "group_by": ["payload.merchant_id"], "for_seconds": 0, "cooldown_seconds": 600, "severity": "critical",
            "labels": {"team": "payments"}, "actions": [], "enabled": true}"#,
        )
        .unwrap()
    }

    /// A minimal valid rule with `extra` members merged in.
    fn rule(extra: Value) -> Value {
        let mut body = json!({"name": "r", "event_types": ["a.b"]});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        body
    }

    /// A valid count window with `changes` applied (`null` removes a member).
    fn window(changes: Value) -> Value {
        let mut w = json!({"seconds": 1, "aggregate": "count", "op": "gt", "threshold": 1});
        if let (Some(w), Value::Object(c)) = (w.as_object_mut(), changes) {
            for (k, v) in c {
                if v.is_null() {
                    w.remove(&k);
                } else {
                    w.insert(k, v);
                }
            }
        }
        w
    }

    fn cond(field: &str, op: &str, value: Value) -> Value {
        json!({"field": field, "op": op, "value": value})
    }

    fn err(body: Value) -> FieldError {
        match parse_rule(&body, &RuleLimits::default()) {
            Ok(spec) => panic!("accepted {body}: {spec:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn canonical_example_parses() {
        let spec = parse_rule(&canonical(), &RuleLimits::default()).unwrap();
        assert_eq!(spec.name, "Checkout failures");
        assert_eq!(spec.event_types, ["checkout.failed"]);
        assert_eq!(
            spec.filter,
            Some(Filter::All {
                all: vec![
                    Filter::Condition(Condition {
                        field: "payload.amount".into(),
                        op: Op::Gte,
                        value: Some(json!(100))
                    }),
                    Filter::Not {
                        not: Box::new(Filter::Condition(Condition {
                            field: "payload.country".into(),
                            op: Op::In,
                            value: Some(json!(["DE"]))
                        }))
                    },
                ]
            })
        );
        assert_eq!(
            spec.window,
            Some(WindowSpec {
                seconds: 300,
                aggregate: Aggregate::Count,
                field: None,
                op: CompareOp::Gt,
                threshold: 10.0
            })
        );
        assert_eq!(spec.group_by, ["payload.merchant_id"]);
        assert_eq!(spec.cooldown_seconds, 600);
        assert_eq!(spec.severity, Severity::Critical);
        assert_eq!(spec.labels.get("team").map(String::as_str), Some("payments"));
        assert!(spec.enabled);
        // The typed form deserializes from the same JSON.
        let typed: RuleSpec = serde_json::from_value(canonical()).unwrap();
        assert_eq!(typed, spec);
    }

    #[test]
    fn defaults_and_trimming() {
        let spec = parse_rule(&json!({"name": "  r  ", "event_types": ["*"]}), &RuleLimits::default()).unwrap();
        assert_eq!(spec.name, "r");
        assert_eq!(spec.severity, Severity::Warning);
        assert!(spec.enabled);
        assert!(spec.filter.is_none() && spec.window.is_none() && spec.group_by.is_empty());
        let typed: RuleSpec = serde_json::from_value(json!({"name": "r", "event_types": ["*"]})).unwrap();
        assert_eq!(typed, spec);
    }

    #[test]
    fn read_only_members_and_nulls_are_ignored() {
        let body = rule(json!({"id": "x", "version": 3, "tenant_id": "t", "created_at": "c", "updated_at": "u",
            "status": {}, "description": null, "filter": null, "window": null, "severity": null}));
        let spec = parse_rule(&body, &RuleLimits::default()).unwrap();
        assert_eq!(spec.severity, Severity::Warning);
        assert!(spec.description.is_none() && spec.filter.is_none());
    }

    #[test]
    fn round_trips_through_json_and_messagepack() {
        let mut body = canonical();
        body["labels"]["env"] = json!("prod");
        body["actions"] = json!([{"channel_id": "ch1", "extra": [1, 2.5, null]}]);
        body["description"] = json!("desc");
        body["filter"]["all"]
            .as_array_mut()
            .unwrap()
            .extend([cond("payload.x", "eq", Value::Null), json!({"field": "source", "op": "exists"})]);
        let spec = parse_rule(&body, &RuleLimits::default()).unwrap();

        let bytes = rmp_serde::to_vec_named(&spec).unwrap();
        let back: RuleSpec = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, spec);

        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(serde_json::from_value::<RuleSpec>(json.clone()).unwrap(), spec);
        // What a GET returns can be sent back unchanged.
        assert_eq!(parse_rule(&json, &RuleLimits::default()).unwrap(), spec);

        let plugin = parse_rule(&rule(json!({"plugin": {"id": "p", "version": "1"}})), &RuleLimits::default()).unwrap();
        let bytes = rmp_serde::to_vec_named(&plugin).unwrap();
        assert_eq!(rmp_serde::from_slice::<RuleSpec>(&bytes).unwrap(), plugin);
        assert_eq!(plugin.plugin.map(|p| p.config), Some(json!({})));
    }

    #[test]
    fn enum_names_match_serde() {
        fn check<T: Serialize + Copy>(all: &[T], name: impl Fn(T) -> &'static str) {
            for v in all {
                assert_eq!(serde_json::to_value(v).unwrap(), json!(name(*v)));
            }
        }
        check(Op::ALL, Op::as_str);
        check(Aggregate::ALL, Aggregate::as_str);
        check(CompareOp::ALL, CompareOp::as_str);
        check(Severity::ALL, Severity::as_str);
    }

    #[test]
    fn compare_op_holds() {
        assert!(CompareOp::Gt.holds(2.0, 1.0) && !CompareOp::Gt.holds(1.0, 1.0));
        assert!(CompareOp::Gte.holds(1.0, 1.0) && !CompareOp::Gte.holds(0.5, 1.0));
        assert!(CompareOp::Lt.holds(0.5, 1.0) && !CompareOp::Lt.holds(1.0, 1.0));
        assert!(CompareOp::Lte.holds(1.0, 1.0) && !CompareOp::Lte.holds(2.0, 1.0));
        assert!(CompareOp::Eq.holds(1.0, 1.0) && !CompareOp::Eq.holds(1.0, 1.000001));
        assert!(CompareOp::Ne.holds(1.0, 2.0) && !CompareOp::Ne.holds(2.0, 2.0));
    }

    #[test]
    fn valid_rules_are_accepted() {
        let ok = [
            rule(json!({"event_types": ["payment.*", "*.failed", "a*b", "x.y:z-1"]})),
            rule(json!({
                "window": window(json!({"seconds": 604800, "aggregate": "sum", "field": "id", "threshold": 1.5})),
                "for_seconds": 60
            })),
            rule(json!({"window": window(json!({"aggregate": "distinct", "field": "user_id", "threshold": -3}))})),
            rule(json!({"absence": {"seconds": 60}, "for_seconds": 0})),
            rule(json!({"plugin": {"id": "anomaly", "config": {"k": 1}}})),
            rule(json!({"group_by": ["id", "type", "source", "user_id", "payload.a.0.b"]})),
            rule(json!({"cooldown_seconds": 2592000, "severity": "info", "enabled": false})),
            rule(
                json!({"labels": {"a:b-c.d_e": ""}, "actions": [{"channel_id": "c", "template": {"title": "{{ alert.rule_name }}"}}]}),
            ),
            rule(json!({"filter": cond("payload.a", "eq", json!({"x": [1]}))})),
            rule(json!({"filter": cond("payload.a", "ne", Value::Null)})),
            rule(json!({"filter": cond("payload.a", "lt", json!("m"))})),
            rule(json!({"filter": cond("payload.a", "not_in", json!([]))})),
            rule(json!({"filter": cond("payload.a", "contains", json!(true))})),
            rule(json!({"filter": cond("payload.a", "exists", json!(false))})),
            rule(json!({"filter": {"field": "payload.a", "op": "exists"}})),
            rule(json!({"filter": cond("source", "regex", json!("^web-[0-9]+$"))})),
            rule(json!({"filter": {"not": {"not": {"any": [cond("id", "starts_with", json!("e"))]}}}})),
        ];
        for body in ok {
            if let Err(e) = parse_rule(&body, &RuleLimits::default()) {
                panic!("rejected {body}: {e}");
            }
        }
    }

    #[test]
    fn invalid_rules_name_the_member_at_fault() {
        let long = "x".repeat(201);
        let nested = (0..8).fold(cond("id", "eq", json!("a")), |n, _| json!({"not": n}));
        let many: Vec<Value> = (0..65).map(|_| cond("id", "eq", json!("a"))).collect();
        let cases: Vec<(Value, &str)> = vec![
            (json!([]), ""),
            (rule(json!({"nmae": "typo"})), "nmae"),
            (json!({"event_types": ["a"]}), "name"),
            (rule(json!({"name": 1})), "name"),
            (rule(json!({"name": "   "})), "name"),
            (rule(json!({"name": long})), "name"),
            (rule(json!({"description": "x".repeat(2001)})), "description"),
            (json!({"name": "r"}), "event_types"),
            (rule(json!({"event_types": []})), "event_types"),
            (rule(json!({"event_types": "a"})), "event_types"),
            (rule(json!({"event_types": vec!["a"; 33]})), "event_types"),
            (rule(json!({"event_types": ["a", "b", "a..b"]})), "event_types[2]"),
            (rule(json!({"event_types": ["a", 1]})), "event_types[1]"),
            (rule(json!({"event_types": ["a.*", "a b*"]})), "event_types[1]"),
            (rule(json!({"event_types": ["*.", "a"]})), "event_types[0]"),
            (rule(json!({"event_types": ["a", "a"]})), "event_types[1]"),
            (rule(json!({"window": window(json!({})), "absence": {"seconds": 1}})), "absence"),
            (rule(json!({"absence": {"seconds": 1}, "plugin": {"id": "p"}})), "plugin"),
            (rule(json!({"window": 1})), "window"),
            (rule(json!({"window": window(json!({"seconds": 0}))})), "window.seconds"),
            (rule(json!({"window": window(json!({"seconds": 604801}))})), "window.seconds"),
            (rule(json!({"window": window(json!({"seconds": 1.5}))})), "window.seconds"),
            (rule(json!({"window": window(json!({"seconds": null}))})), "window.seconds"),
            (rule(json!({"window": window(json!({"aggregate": "median"}))})), "window.aggregate"),
            (rule(json!({"window": window(json!({"aggregate": null}))})), "window.aggregate"),
            (rule(json!({"window": window(json!({"field": "id"}))})), "window.field"),
            (rule(json!({"window": window(json!({"aggregate": "sum"}))})), "window.field"),
            (rule(json!({"window": window(json!({"aggregate": "avg", "field": "amount"}))})), "window.field"),
            (rule(json!({"window": window(json!({"op": null}))})), "window.op"),
            (rule(json!({"window": window(json!({"op": "in"}))})), "window.op"),
            (rule(json!({"window": window(json!({"threshold": null}))})), "window.threshold"),
            (rule(json!({"window": window(json!({"threshold": "1"}))})), "window.threshold"),
            (rule(json!({"window": window(json!({"every": 1}))})), "window.every"),
            (rule(json!({"absence": {"seconds": 0}})), "absence.seconds"),
            (rule(json!({"absence": {}})), "absence.seconds"),
            (rule(json!({"absence": {"seconds": 5, "x": 1}})), "absence.x"),
            (rule(json!({"absence": {"seconds": 5}, "for_seconds": 5})), "for_seconds"),
            (rule(json!({"plugin": {"id": ""}})), "plugin.id"),
            (rule(json!({"plugin": {"id": "x".repeat(129)}})), "plugin.id"),
            (rule(json!({"plugin": {}})), "plugin.id"),
            (rule(json!({"plugin": {"id": "p", "version": 1}})), "plugin.version"),
            (rule(json!({"plugin": {"id": "p", "config": []}})), "plugin.config"),
            (rule(json!({"plugin": {"id": "p", "cfg": {}}})), "plugin.cfg"),
            (rule(json!({"for_seconds": 5})), "for_seconds"),
            (rule(json!({"for_seconds": -1})), "for_seconds"),
            (rule(json!({"window": window(json!({})), "for_seconds": 604801})), "for_seconds"),
            (rule(json!({"cooldown_seconds": 2592001})), "cooldown_seconds"),
            (rule(json!({"cooldown_seconds": "1"})), "cooldown_seconds"),
            (rule(json!({"group_by": "id"})), "group_by"),
            (rule(json!({"group_by": ["id", "type", "source", "user_id", "session_id", "payload.a"]})), "group_by"),
            (rule(json!({"group_by": ["id", "tenant_id"]})), "group_by[1]"),
            (rule(json!({"group_by": ["id", "id"]})), "group_by[1]"),
            (rule(json!({"group_by": ["payload"]})), "group_by[0]"),
            (rule(json!({"group_by": ["payload.a..b"]})), "group_by[0]"),
            (rule(json!({"group_by": ["payload.1.2.3.4.5.6.7.8.9"]})), "group_by[0]"),
            (rule(json!({"severity": "fatal"})), "severity"),
            (rule(json!({"labels": []})), "labels"),
            (rule(json!({"labels": {"team": 1}})), "labels.team"),
            (rule(json!({"labels": {"bad key": "v"}})), "labels.bad key"),
            (rule(json!({"labels": {"team": "x".repeat(257)}})), "labels.team"),
            (rule(json!({"labels": (0..33).map(|i| (format!("k{i}"), json!("v"))).collect::<Map<_, _>>()})), "labels"),
            (rule(json!({"actions": {}})), "actions"),
            (rule(json!({"actions": vec![json!({"channel_id": "c"}); 17]})), "actions"),
            (rule(json!({"actions": ["c"]})), "actions[0]"),
            (rule(json!({"actions": [{"channel": "c"}]})), "actions[0].channel_id"),
            (rule(json!({"actions": [{"channel_id": ""}]})), "actions[0].channel_id"),
            (rule(json!({"actions": [{"channel_id": "a"}, {"channel_id": 2}]})), "actions[1].channel_id"),
            (rule(json!({"actions": [{"channel_id": "a", "template": "x"}]})), "actions[0].template"),
            (
                rule(json!({"actions": [{"channel_id": "a", "template": {"body": "{% if %}"}}]})),
                "actions[0].template.body",
            ),
            (rule(json!({"enabled": "yes"})), "enabled"),
            // Filters.
            (rule(json!({"filter": []})), "filter"),
            (rule(json!({"filter": {}})), "filter"),
            (rule(json!({"filter": {"all": []}})), "filter.all"),
            (rule(json!({"filter": {"any": {}}})), "filter.any"),
            (rule(json!({"filter": {"all": [cond("id", "eq", json!(1))], "field": "id"}})), "filter.field"),
            (
                rule(json!({"filter": {"all": [cond("id", "eq", json!(1)), {"not": {"field": "id", "op": "like"}}]}})),
                "filter.all[1].not.op",
            ),
            (
                rule(json!({"filter": {"all": [cond("id", "eq", json!(1)), {"not": {"field": "id"}}]}})),
                "filter.all[1].not.op",
            ),
            (rule(json!({"filter": {"any": [{"op": "eq", "value": 1}]}})), "filter.any[0].field"),
            (rule(json!({"filter": {"any": [cond("payload", "eq", json!(1))]}})), "filter.any[0].field"),
            (
                rule(json!({"filter": {"any": [cond("id", "eq", json!(1)), {"field": "id", "op": "eq", "x": 1}]}})),
                "filter.any[1].x",
            ),
            (rule(json!({"filter": {"any": [{"field": "id", "op": "eq"}]}})), "filter.any[0].value"),
            (rule(json!({"filter": {"any": [cond("id", "gt", json!(true))]}})), "filter.any[0].value"),
            (rule(json!({"filter": {"any": [cond("id", "gte", json!([1]))]}})), "filter.any[0].value"),
            (rule(json!({"filter": cond("id", "in", json!("a"))})), "filter.value"),
            (rule(json!({"filter": cond("id", "not_in", json!(vec![1; 1001]))})), "filter.value"),
            (rule(json!({"filter": cond("id", "contains", json!({}))})), "filter.value"),
            (rule(json!({"filter": cond("id", "contains", Value::Null)})), "filter.value"),
            (rule(json!({"filter": cond("id", "starts_with", json!(1))})), "filter.value"),
            (rule(json!({"filter": cond("id", "exists", json!("yes"))})), "filter.value"),
            (rule(json!({"filter": cond("id", "regex", json!(1))})), "filter.value"),
            (rule(json!({"filter": cond("id", "regex", json!("("))})), "filter.value"),
            (rule(json!({"filter": cond("id", "regex", json!("a".repeat(513)))})), "filter.value"),
            (rule(json!({"filter": {"not": 1}})), "filter.not"),
            (rule(json!({"filter": nested})), "filter.not.not.not.not.not.not.not.not"),
            (rule(json!({"filter": {"any": many}})), "filter"),
        ];
        for (body, field) in cases {
            let e = err(body.clone());
            assert_eq!(e.field, field, "{body} -> {e}");
            assert!(!e.detail.is_empty());
        }
    }

    #[test]
    fn error_details_help_the_author() {
        let e = err(rule(json!({"group_by": ["amount"]})));
        assert!(e.detail.contains("id, type, source, user_id, session_id or payload."), "{}", e.detail);
        let e = err(rule(json!({"filter": cond("id", "regex", json!("(?:a{1000}){1000}"))})));
        assert_eq!(e.field, "filter.value");
        assert!(e.detail.contains("size limit"), "{}", e.detail);
        let e = err(rule(json!({"filter": cond("id", "regex", json!("a("))})));
        assert!(e.detail.contains("unclosed group"), "{}", e.detail);
        let e = err(rule(json!({"severity": "fatal"})));
        assert_eq!(e.detail, "must be one of critical, error, warning, info");
        assert_eq!(err(json!(1)).to_string(), "a rule must be a JSON object");
        assert_eq!(err(rule(json!({"enabled": 1}))).to_string(), "enabled: must be true or false");
    }

    #[test]
    fn limits_are_configurable() {
        let limits = RuleLimits { max_filter_depth: 2, max_filter_conditions: 2, ..RuleLimits::default() };
        let body = rule(json!({"filter": {"all": [cond("id", "eq", json!(1)), cond("id", "eq", json!(2))]}}));
        assert!(parse_rule(&body, &limits).is_ok());
        let body = rule(json!({"filter": {"all": [{"not": cond("id", "eq", json!(1))}]}}));
        assert_eq!(parse_rule(&body, &limits).unwrap_err().field, "filter.all[0].not");
        let three: Vec<Value> = (0..3).map(|i| cond("id", "eq", json!(i))).collect();
        let body = rule(json!({"filter": {"all": three}}));
        assert_eq!(parse_rule(&body, &limits).unwrap_err().field, "filter");
        let parsed: RuleLimits = serde_json::from_value(json!({"max_labels": 3})).unwrap();
        assert_eq!(parsed, RuleLimits { max_labels: 3, ..RuleLimits::default() });
    }
}
