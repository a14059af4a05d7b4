//! Rule filters, field paths and event-type patterns, compiled once per rule and evaluated
//! against every event the rule sees without allocating.
//!
//! Field paths: `id`, `type`, `source`, `user_id`, `session_id`, or `payload.<key>[.<key>...]`
//! with 1 to 8 keys. A key made only of digits indexes an array when the value at that point
//! is an array, and is an object key otherwise (`payload.items.0.sku`).

use std::cmp::Ordering;
use std::fmt::Write as _;

use regex::{Regex, RegexBuilder};
use serde_json::Value;

use signalops_core::json::FieldError;
use signalops_core::model::EventRecord;

use crate::spec::{Filter, Op};

/// Maximum number of keys after `payload.` in a field path.
pub const MAX_PATH_KEYS: usize = 8;
/// Compiled size limit of a `regex` condition (program and lazy DFA each).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What a field path may be; used as the error detail for a bad path.
pub const FIELD_PATH_HELP: &str = "must be a field path: id, type, source, user_id, session_id or \
    payload.<key>[.<key>...] (1 to 8 non-empty keys; an all-digit key indexes an array)";

/// Compiles a `regex` condition's pattern with SignalOps' size limits.
pub fn build_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).dfa_size_limit(REGEX_SIZE_LIMIT).build()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Id,
    Type,
    Source,
    UserId,
    SessionId,
    Payload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    name: Box<str>,
    /// The array index this key stands for, when it is all digits.
    index: Option<usize>,
}

/// A parsed field path (see the module docs for the grammar).
#[derive(Debug, Clone)]
pub struct FieldPath {
    text: Box<str>,
    root: Root,
    keys: Vec<Key>,
    /// The path's slot in a per-event [`Fields`] cache (assigned per tenant when its rules are
    /// compiled); `NO_SLOT` resolves every time.
    slot: u16,
}

const NO_SLOT: u16 = u16::MAX;

impl PartialEq for FieldPath {
    fn eq(&self, other: &FieldPath) -> bool {
        self.text == other.text
    }
}

impl Eq for FieldPath {}

/// How many distinct field paths of one tenant's rules a [`Fields`] cache holds; paths past
/// that are resolved on every use.
pub const FIELD_SLOTS: usize = 32;

/// How many distinct conditions of one tenant's rules a [`Fields`] cache remembers the
/// outcome of; conditions past that are evaluated on every use.
pub const CONDITION_SLOTS: usize = 64;

/// One event's field values, each resolved at most once however many rules read it, and the
/// outcomes of the conditions evaluated on it, each evaluated at most once however many rules
/// share it.
pub struct Fields<'a> {
    ev: &'a EventRecord,
    cache: [Option<Option<FieldValue<'a>>>; FIELD_SLOTS],
    /// Bit `i`: condition slot `i` was evaluated; and its outcome.
    known: u64,
    outcome: u64,
    /// Bit `i`: `hashes[i]` holds the key hash of field slot `i`'s value.
    hashed: u32,
    hashes: [Option<u64>; FIELD_SLOTS],
    /// Scratch text for key hashes.
    text: String,
}

impl<'a> Fields<'a> {
    pub fn new(ev: &'a EventRecord) -> Fields<'a> {
        Fields {
            ev,
            cache: [None; FIELD_SLOTS],
            known: 0,
            outcome: 0,
            hashed: 0,
            hashes: [None; FIELD_SLOTS],
            text: String::new(),
        }
    }

    /// The hash of the value of `path`'s canonical text ([`FieldValue::write_key`]) by
    /// `hash`, computed once per slot and event; `None` when the event has no such field.
    /// Every caller must pass the same `hash` function.
    pub fn key_hash(&mut self, path: &FieldPath, hash: fn(&str) -> u64) -> Option<u64> {
        let slot = usize::from(path.slot);
        let bit = if slot < FIELD_SLOTS { 1u32 << slot } else { 0 };
        if self.hashed & bit != 0 {
            return self.hashes[slot];
        }
        let h = self.get(path).map(|v| {
            self.text.clear();
            v.write_key(&mut self.text);
            hash(&self.text)
        });
        if bit != 0 {
            self.hashed |= bit;
            self.hashes[slot] = h;
        }
        h
    }

    pub fn event(&self) -> &'a EventRecord {
        self.ev
    }

    /// The value of `path` in the event (see [`FieldPath::resolve`]).
    pub fn get(&mut self, path: &FieldPath) -> Option<FieldValue<'a>> {
        match self.cache.get_mut(usize::from(path.slot)) {
            Some(Some(v)) => *v,
            Some(slot) => *slot.insert(path.resolve(self.ev)),
            None => path.resolve(self.ev),
        }
    }
}

impl FieldPath {
    /// Parses a field path; `None` when it does not follow the grammar.
    pub fn parse(s: &str) -> Option<FieldPath> {
        let root = match s {
            "id" => Root::Id,
            "type" => Root::Type,
            "source" => Root::Source,
            "user_id" => Root::UserId,
            "session_id" => Root::SessionId,
            _ => Root::Payload,
        };
        let mut keys = Vec::new();
        if root == Root::Payload {
            for k in s.strip_prefix("payload.")?.split('.') {
                if k.is_empty() || keys.len() == MAX_PATH_KEYS {
                    return None;
                }
                let index = if k.bytes().all(|b| b.is_ascii_digit()) { k.parse().ok() } else { None };
                keys.push(Key { name: k.into(), index });
            }
        }
        Some(FieldPath { text: s.into(), root, keys, slot: NO_SLOT })
    }

    /// Gives the path a slot in per-event [`Fields`] caches (ignored past [`FIELD_SLOTS`]).
    /// Paths that share a slot must have the same text.
    pub fn set_slot(&mut self, slot: usize) {
        self.slot = if slot < FIELD_SLOTS { slot as u16 } else { NO_SLOT };
    }

    /// The path as written in the rule.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The field's value in `ev`; `None` when it is missing (a JSON `null` is present).
    pub fn resolve<'a>(&self, ev: &'a EventRecord) -> Option<FieldValue<'a>> {
        let attr = |a: &'a Option<String>| a.as_deref().map(FieldValue::Str);
        match self.root {
            Root::Id => Some(FieldValue::Str(&ev.id)),
            Root::Type => Some(FieldValue::Str(&ev.event_type)),
            Root::Source => attr(&ev.source),
            Root::UserId => attr(&ev.user_id),
            Root::SessionId => attr(&ev.session_id),
            Root::Payload => {
                let (first, rest) = self.keys.split_first()?;
                let mut cur = ev.payload.get(&*first.name)?;
                for k in rest {
                    cur = match cur {
                        Value::Array(a) => a.get(k.index?)?,
                        Value::Object(m) => m.get(&*k.name)?,
                        _ => return None,
                    };
                }
                Some(FieldValue::Json(cur))
            }
        }
    }
}

/// A field's value: a payload value, or a top-level attribute's string.
#[derive(Debug, Clone, Copy)]
pub enum FieldValue<'a> {
    Json(&'a Value),
    Str(&'a str),
}

impl FieldValue<'_> {
    /// The value as a number; strings (even numeric ones) are not numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            FieldValue::Json(Value::Number(n)) => n.as_f64(),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::Str(s) => Some(s),
            FieldValue::Json(Value::String(s)) => Some(s),
            FieldValue::Json(_) => None,
        }
    }

    /// Appends the value's canonical text, used for group and distinct keys: compact JSON with
    /// strings quoted (so `"1"` and `1` differ), object members in key order, and integral
    /// floats written as integers (`100.0` and `100` are the same key).
    pub fn write_key(&self, out: &mut String) {
        match self {
            FieldValue::Str(s) => write_json_str(s, out),
            FieldValue::Json(v) => write_json(v, out),
        }
    }

    /// The value as JSON (attributes become strings).
    pub fn to_json(&self) -> Value {
        match self {
            FieldValue::Json(v) => (*v).clone(),
            FieldValue::Str(s) => Value::String((*s).to_owned()),
        }
    }
}

fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                // Display writes integral floats without a fraction (100.0 -> "100"); -0 is 0.
                let f = if f == 0.0 { 0.0 } else { f };
                let _ = write!(out, "{f}");
            }
        }
        Value::String(s) => write_json_str(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(e, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_str(k, out);
                out.push(':');
                if let Some(v) = m.get(k) {
                    write_json(v, out);
                }
            }
            out.push('}');
        }
    }
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// JSON equality where numbers compare as f64 (`100 == 100.0`), at any depth.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A comparison operand, with numbers converted once.
#[derive(Debug)]
enum Lit {
    Num(f64),
    Str(Box<str>),
    /// null, bool, array or object.
    Json(Value),
}

impl Lit {
    fn new(v: &Value) -> Lit {
        match v {
            Value::Number(n) => n.as_f64().map_or_else(|| Lit::Json(v.clone()), Lit::Num),
            Value::String(s) => Lit::Str(s.as_str().into()),
            _ => Lit::Json(v.clone()),
        }
    }

    fn equals(&self, f: FieldValue<'_>) -> bool {
        match (self, f) {
            (Lit::Num(n), f) => f.as_f64() == Some(*n),
            (Lit::Str(s), f) => f.as_str() == Some(&**s),
            (Lit::Json(v), FieldValue::Json(w)) => json_eq(v, w),
            (Lit::Json(_), FieldValue::Str(_)) => false,
        }
    }
}

/// The values of an `in` / `not_in` list, strings sorted for binary search.
#[derive(Debug)]
struct LitSet {
    strs: Vec<Box<str>>,
    others: Vec<Lit>,
}

impl LitSet {
    fn new(values: &[Value]) -> LitSet {
        let mut strs = Vec::new();
        let mut others = Vec::new();
        for v in values {
            match Lit::new(v) {
                Lit::Str(s) => strs.push(s),
                lit => others.push(lit),
            }
        }
        strs.sort_unstable();
        strs.dedup();
        LitSet { strs, others }
    }

    fn contains(&self, f: FieldValue<'_>) -> bool {
        match f.as_str() {
            Some(s) => self.strs.binary_search_by(|p| (**p).cmp(s)).is_ok(),
            None => self.others.iter().any(|l| l.equals(f)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Cmp {
    fn holds(self, o: Option<Ordering>) -> bool {
        match (self, o) {
            (_, None) => false,
            (Cmp::Gt, Some(o)) => o == Ordering::Greater,
            (Cmp::Gte, Some(o)) => o != Ordering::Less,
            (Cmp::Lt, Some(o)) => o == Ordering::Less,
            (Cmp::Lte, Some(o)) => o != Ordering::Greater,
        }
    }
}

#[derive(Debug)]
enum Test {
    Eq(Lit),
    Ne(Lit),
    Cmp(Cmp, Lit),
    In(LitSet),
    NotIn(LitSet),
    Contains(Lit),
    StartsWith(Box<str>),
    Exists(bool),
    Regex(Regex),
}

impl Test {
    /// The outcome when the field is missing.
    fn on_missing(&self) -> bool {
        matches!(self, Test::Ne(_) | Test::NotIn(_) | Test::Exists(false))
    }

    fn eval(&self, f: FieldValue<'_>) -> bool {
        match self {
            Test::Eq(l) => l.equals(f),
            Test::Ne(l) => !l.equals(f),
            Test::Cmp(c, Lit::Num(n)) => c.holds(f.as_f64().and_then(|x| x.partial_cmp(n))),
            Test::Cmp(c, Lit::Str(s)) => c.holds(f.as_str().map(|x| x.cmp(s))),
            Test::Cmp(_, Lit::Json(_)) => false,
            Test::In(set) => set.contains(f),
            Test::NotIn(set) => !set.contains(f),
            Test::Contains(l) => match (f, l) {
                (FieldValue::Json(Value::Array(a)), l) => a.iter().any(|e| l.equals(FieldValue::Json(e))),
                (f, Lit::Str(s)) => f.as_str().is_some_and(|x| x.contains(&**s)),
                _ => false,
            },
            Test::StartsWith(p) => f.as_str().is_some_and(|x| x.starts_with(&**p)),
            Test::Exists(want) => *want,
            Test::Regex(r) => f.as_str().is_some_and(|x| r.is_match(x)),
        }
    }
}

#[derive(Debug)]
struct Cond {
    path: FieldPath,
    test: Test,
    /// The condition as written (field, operator and operand): conditions with the same
    /// identity share an outcome slot.
    identity: Box<str>,
    /// Its slot in per-event [`Fields`] outcome caches (`u8::MAX`: none).
    slot: u8,
}

impl Cond {
    fn eval(&self, fields: &mut Fields<'_>) -> bool {
        let bit = if usize::from(self.slot) < CONDITION_SLOTS { 1u64 << self.slot } else { 0 };
        if fields.known & bit != 0 {
            return fields.outcome & bit != 0;
        }
        let outcome = match fields.get(&self.path) {
            Some(f) => self.test.eval(f),
            None => self.test.on_missing(),
        };
        fields.known |= bit;
        if outcome {
            fields.outcome |= bit;
        }
        outcome
    }
}

#[derive(Debug)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Cond(Cond),
}

impl Node {
    fn eval(&self, fields: &mut Fields<'_>) -> bool {
        match self {
            Node::All(c) => c.iter().all(|n| n.eval(fields)),
            Node::Any(c) => c.iter().any(|n| n.eval(fields)),
            Node::Not(n) => !n.eval(fields),
            Node::Cond(c) => c.eval(fields),
        }
    }

    fn for_each_cond_mut(&mut self, f: &mut dyn FnMut(&mut Cond)) {
        match self {
            Node::All(c) | Node::Any(c) => c.iter_mut().for_each(|n| n.for_each_cond_mut(f)),
            Node::Not(n) => n.for_each_cond_mut(f),
            Node::Cond(c) => f(c),
        }
    }

    fn for_each_path_mut(&mut self, f: &mut dyn FnMut(&mut FieldPath)) {
        match self {
            Node::All(c) | Node::Any(c) => c.iter_mut().for_each(|n| n.for_each_path_mut(f)),
            Node::Not(n) => n.for_each_path_mut(f),
            Node::Cond(c) => f(&mut c.path),
        }
    }
}

/// A filter ready to evaluate: paths parsed, operands converted and regexes compiled once.
#[derive(Debug)]
pub struct CompiledFilter {
    root: Node,
}

impl CompiledFilter {
    /// Compiles a filter. Errors name the member under `filter` (`filter.all[0].value`): a bad
    /// field path, a missing or wrongly typed operand, or a regex that does not compile.
    pub fn compile(f: &Filter) -> Result<CompiledFilter, FieldError> {
        Ok(CompiledFilter { root: compile_node(f, "filter")? })
    }

    /// True when `ev` passes the filter.
    pub fn matches(&self, ev: &EventRecord) -> bool {
        self.root.eval(&mut Fields::new(ev))
    }

    /// True when the event whose fields these are passes the filter.
    pub fn matches_fields(&self, fields: &mut Fields<'_>) -> bool {
        self.root.eval(fields)
    }

    /// Visits every field path the filter reads.
    pub fn for_each_path_mut(&mut self, f: &mut dyn FnMut(&mut FieldPath)) {
        self.root.for_each_path_mut(f)
    }

    /// Gives each condition an outcome slot in per-event [`Fields`] caches: `slot_of` maps a
    /// condition's identity (field, operator and operand as written) to its slot, and must
    /// give conditions the same slot only when their identities are equal. Slots past
    /// [`CONDITION_SLOTS`] are ignored.
    pub fn set_condition_slots(&mut self, slot_of: &mut dyn FnMut(&str) -> usize) {
        self.root.for_each_cond_mut(&mut |c| {
            let slot = slot_of(&c.identity);
            c.slot = if slot < CONDITION_SLOTS { slot as u8 } else { u8::MAX };
        })
    }
}

fn compile_node(f: &Filter, path: &str) -> Result<Node, FieldError> {
    let children = |c: &[Filter], kind: &str| {
        c.iter()
            .enumerate()
            .map(|(i, c)| compile_node(c, &format!("{path}.{kind}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match f {
        Filter::All { all } => Node::All(children(all, "all")?),
        Filter::Any { any } => Node::Any(children(any, "any")?),
        Filter::Not { not } => Node::Not(Box::new(compile_node(not, &format!("{path}.not"))?)),
        Filter::Condition(c) => {
            let path_err = || FieldError::new(format!("{path}.field"), FIELD_PATH_HELP);
            let field = FieldPath::parse(&c.field).ok_or_else(path_err)?;
            let value_err = |detail: &str| FieldError::new(format!("{path}.value"), detail);
            let value = c.value.as_ref();
            let test = match (c.op, value) {
                (Op::Exists, None) => Test::Exists(true),
                (Op::Exists, Some(Value::Bool(b))) => Test::Exists(*b),
                (Op::Exists, Some(_)) => return Err(value_err("must be true or false (or omitted)")),
                (_, None) => return Err(value_err("required")),
                (Op::Eq, Some(v)) => Test::Eq(Lit::new(v)),
                (Op::Ne, Some(v)) => Test::Ne(Lit::new(v)),
                (Op::Gt | Op::Gte | Op::Lt | Op::Lte, Some(v @ (Value::Number(_) | Value::String(_)))) => {
                    let cmp = match c.op {
                        Op::Gt => Cmp::Gt,
                        Op::Gte => Cmp::Gte,
                        Op::Lt => Cmp::Lt,
                        _ => Cmp::Lte,
                    };
                    Test::Cmp(cmp, Lit::new(v))
                }
                (Op::Gt | Op::Gte | Op::Lt | Op::Lte, Some(_)) => {
                    return Err(value_err("must be a number or a string"))
                }
                (Op::In, Some(Value::Array(a))) => Test::In(LitSet::new(a)),
                (Op::NotIn, Some(Value::Array(a))) => Test::NotIn(LitSet::new(a)),
                (Op::In | Op::NotIn, Some(_)) => return Err(value_err("must be an array")),
                (Op::Contains, Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_)))) => {
                    Test::Contains(Lit::new(v))
                }
                (Op::Contains, Some(_)) => return Err(value_err("must be a string, a number or a boolean")),
                (Op::StartsWith, Some(Value::String(s))) => Test::StartsWith(s.as_str().into()),
                (Op::StartsWith, Some(_)) => return Err(value_err("must be a string")),
                (Op::Regex, Some(Value::String(s))) => {
                    Test::Regex(build_regex(s).map_err(|e| value_err(&format!("invalid regex: {e}")))?)
                }
                (Op::Regex, Some(_)) => return Err(value_err("must be a string (a regular expression)")),
            };
            let operand = value.map_or_else(String::new, |v| v.to_string());
            let identity = format!("{}\u{1f}{:?}\u{1f}{operand}", c.field, c.op).into();
            Node::Cond(Cond { path: field, test, identity, slot: u8::MAX })
        }
    })
}

/// Matches event types against a rule's `event_types`: exact types and `*` globs.
#[derive(Debug, Clone)]
pub struct TypeMatcher {
    exact: Vec<String>,
    /// Each glob split at its `*`s (so at least two parts).
    globs: Vec<Vec<Box<str>>>,
}

impl TypeMatcher {
    pub fn new(patterns: &[String]) -> TypeMatcher {
        let mut exact = Vec::new();
        let mut globs = Vec::new();
        for p in patterns {
            if p.contains('*') {
                globs.push(p.split('*').map(Box::from).collect());
            } else {
                exact.push(p.clone());
            }
        }
        TypeMatcher { exact, globs }
    }

    /// True when `event_type` equals an exact type or matches a glob.
    pub fn matches(&self, event_type: &str) -> bool {
        self.exact.iter().any(|t| t == event_type) || self.globs.iter().any(|g| glob_matches(g, event_type))
    }

    /// The exact types, when there are no globs (the rule can be indexed by type).
    pub fn is_exact(&self) -> Option<&[String]> {
        self.globs.is_empty().then_some(self.exact.as_slice())
    }
}

fn glob_matches(parts: &[Box<str>], s: &str) -> bool {
    let [first, middle @ .., last] = parts else { return parts.first().is_some_and(|p| **p == *s) };
    let Some(mut rest) = s.strip_prefix(&**first) else { return false };
    for m in middle {
        match rest.find(&**m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.ends_with(&**last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(payload: Value) -> EventRecord {
        EventRecord {
            id: "e1".into(),
            tenant_id: uuid::Uuid::nil(),
            event_type: "checkout.failed".into(),
            payload: payload.as_object().cloned().unwrap_or_default(),
            source: Some("web".into()),
            user_id: None,
            session_id: Some("s1".into()),
            occurred_at_ms: 0,
            received_at_ms: 0,
            idempotency_key: None,
        }
    }

    fn sample() -> EventRecord {
        event(json!({
            "amount": 100, "price": 12.5, "big": 100.0, "country": "DE", "code": "42",
            "tags": ["a", "b", 1], "items": [{"sku": "x"}, {"sku": "y"}], "nested": {"k": null, "0": "zero"},
            "flag": true, "obj": {"n": 1.0, "s": [1, 2]}
        }))
    }

    fn compile(f: Value) -> CompiledFilter {
        let f: Filter = serde_json::from_value(f).unwrap();
        CompiledFilter::compile(&f).unwrap()
    }

    /// Each case alone, and all of them through one shared per-event cache (as the engine
    /// evaluates a tenant's rules), with slots given per distinct path text.
    /// Each case alone, and all of them twice through one shared per-event cache (as the
    /// engine evaluates a tenant's rules), with slots given per distinct path text and per
    /// distinct condition: the second time, every condition's outcome comes from the cache.
    fn check(cases: &[(Value, bool)]) {
        let ev = sample();
        let mut slots = std::collections::HashMap::new();
        let mut conditions = std::collections::HashMap::new();
        let mut fields = Fields::new(&ev);
        let mut filters = Vec::new();
        for (f, want) in cases {
            let mut filter = compile(f.clone());
            assert_eq!(filter.matches(&ev), *want, "{f}");
            filter.for_each_path_mut(&mut |p| {
                let next = slots.len();
                p.set_slot(*slots.entry(p.as_str().to_string()).or_insert(next));
            });
            filter.set_condition_slots(&mut |identity| {
                let next = conditions.len();
                *conditions.entry(identity.to_string()).or_insert(next)
            });
            assert_eq!(filter.matches_fields(&mut fields), *want, "{f} through the cache");
            filters.push(filter);
        }
        for ((f, want), filter) in cases.iter().zip(&filters) {
            assert_eq!(filter.matches_fields(&mut fields), *want, "{f} from remembered outcomes");
        }
    }

    fn c(field: &str, op: &str, value: Value) -> Value {
        json!({"field": field, "op": op, "value": value})
    }

    #[test]
    fn eq_and_ne() {
        check(&[
            (c("payload.amount", "eq", json!(100)), true),
            (c("payload.amount", "eq", json!(100.0)), true),
            (c("payload.big", "eq", json!(100)), true),
            (c("payload.amount", "eq", json!("100")), false),
            (c("payload.code", "eq", json!(42)), false),
            (c("payload.country", "eq", json!("DE")), true),
            (c("payload.obj", "eq", json!({"s": [1.0, 2], "n": 1})), true),
            (c("payload.obj", "eq", json!({"n": 1})), false),
            (c("payload.nested.k", "eq", Value::Null), true),
            (c("payload.flag", "eq", json!(true)), true),
            (c("type", "eq", json!("checkout.failed")), true),
            (c("id", "eq", json!("e1")), true),
            (c("source", "eq", json!("web")), true),
            (c("session_id", "eq", json!("s1")), true),
            (c("payload.missing", "eq", Value::Null), false),
            (c("user_id", "eq", json!("u")), false),
            (c("payload.amount", "ne", json!(100.0)), false),
            (c("payload.amount", "ne", json!(101)), true),
            (c("payload.code", "ne", json!(42)), true),
            (c("payload.missing", "ne", json!(1)), true),
            (c("user_id", "ne", json!("u")), true),
        ]);
    }

    #[test]
    fn ordering() {
        check(&[
            (c("payload.amount", "gt", json!(99.5)), true),
            (c("payload.amount", "gt", json!(100)), false),
            (c("payload.amount", "gte", json!(100)), true),
            (c("payload.price", "lt", json!(13)), true),
            (c("payload.price", "lte", json!(12.5)), true),
            (c("payload.price", "lte", json!(12)), false),
            (c("payload.country", "gt", json!("DA")), true),
            (c("payload.country", "lt", json!("DA")), false),
            (c("source", "gte", json!("web")), true),
            (c("payload.code", "gt", json!(1)), false),
            (c("payload.amount", "lt", json!("z")), false),
            (c("payload.flag", "gt", json!(0)), false),
            (c("payload.missing", "gt", json!(0)), false),
            (c("payload.missing", "lte", json!(0)), false),
        ]);
    }

    #[test]
    fn membership() {
        check(&[
            (c("payload.country", "in", json!(["FR", "DE"])), true),
            (c("payload.country", "in", json!(["FR"])), false),
            (c("payload.amount", "in", json!([1, 100.0])), true),
            (c("payload.amount", "in", json!(["100"])), false),
            (c("payload.code", "in", json!([42])), false),
            (c("payload.nested.k", "in", json!([null])), true),
            (c("type", "in", json!(["x", "checkout.failed"])), true),
            (c("payload.missing", "in", json!([null])), false),
            (c("payload.country", "not_in", json!(["DE"])), false),
            (c("payload.country", "not_in", json!(["FR"])), true),
            (c("payload.amount", "not_in", json!([100])), false),
            (c("payload.missing", "not_in", json!(["DE"])), true),
            (c("user_id", "not_in", json!([])), true),
        ]);
    }

    #[test]
    fn contains_starts_with_regex_exists() {
        check(&[
            (c("payload.country", "contains", json!("E")), true),
            (c("payload.country", "contains", json!("X")), false),
            (c("type", "contains", json!(".fail")), true),
            (c("payload.tags", "contains", json!("b")), true),
            (c("payload.tags", "contains", json!(1.0)), true),
            (c("payload.tags", "contains", json!("c")), false),
            (c("payload.code", "contains", json!(4)), false),
            (c("payload.amount", "contains", json!(100)), false),
            (c("payload.missing", "contains", json!("a")), false),
            (c("payload.country", "starts_with", json!("D")), true),
            (c("source", "starts_with", json!("we")), true),
            (c("payload.country", "starts_with", json!("E")), false),
            (c("payload.amount", "starts_with", json!("1")), false),
            (c("payload.missing", "starts_with", json!("")), false),
            (c("payload.country", "regex", json!("^[A-Z]{2}$")), true),
            (c("id", "regex", json!("1")), true),
            (c("payload.country", "regex", json!("^de$")), false),
            (c("payload.amount", "regex", json!("1")), false),
            (c("payload.missing", "regex", json!(".*")), false),
            (json!({"field": "payload.nested.k", "op": "exists"}), true),
            (c("payload.nested.k", "exists", json!(true)), true),
            (c("payload.nested.k", "exists", json!(false)), false),
            (json!({"field": "payload.missing", "op": "exists"}), false),
            (c("payload.missing", "exists", json!(false)), true),
            (c("user_id", "exists", json!(false)), true),
            (c("session_id", "exists", json!(true)), true),
        ]);
    }

    #[test]
    fn nested_logic() {
        let yes = c("payload.country", "eq", json!("DE"));
        let no = c("payload.country", "eq", json!("FR"));
        let big = c("payload.amount", "gte", json!(100));
        check(&[
            (json!({"all": [yes, yes]}), true),
            (json!({"all": [yes, no]}), false),
            (json!({"any": [no, yes]}), true),
            (json!({"any": [no, no]}), false),
            (json!({"not": no}), true),
            (json!({"not": {"not": yes}}), true),
            (json!({"all": [yes, {"any": [no, {"not": no}]}]}), true),
            (json!({"all": [yes, {"not": {"any": [no, yes]}}]}), false),
            (json!({"all": [big, {"not": c("payload.country", "in", json!(["DE"]))}]}), false),
        ]);
    }

    #[test]
    fn field_paths() {
        let ev = sample();
        let get = |p: &str| FieldPath::parse(p).unwrap().resolve(&ev).map(|v| v.to_json());
        assert_eq!(get("payload.items.1.sku"), Some(json!("y")));
        assert_eq!(get("payload.items.2.sku"), None);
        assert_eq!(get("payload.items.x"), None);
        assert_eq!(get("payload.tags.0"), Some(json!("a")));
        assert_eq!(get("payload.nested.0"), Some(json!("zero")));
        assert_eq!(get("payload.amount.0"), None);
        assert_eq!(get("payload.tags.99999999999999999999999"), None);
        assert_eq!(get("payload.nested.k"), Some(Value::Null));
        assert_eq!(get("type"), Some(json!("checkout.failed")));
        assert_eq!(get("user_id"), None);
        assert_eq!(FieldPath::parse("payload.items.0.sku").unwrap().as_str(), "payload.items.0.sku");
        assert!(FieldPath::parse("payload.1.2.3.4.5.6.7.8").is_some());
        for bad in [
            "",
            "payload",
            "payload.",
            "payload.a.",
            ".payload.a",
            "payload..a",
            "tenant_id",
            "amount",
            "id.x",
            "payload.1.2.3.4.5.6.7.8.9",
            "Payload.a",
        ] {
            assert!(FieldPath::parse(bad).is_none(), "{bad}");
        }
        check(&[
            (c("payload.items.0.sku", "eq", json!("x")), true),
            (c("payload.items.5.sku", "ne", json!("x")), true),
        ]);
    }

    #[test]
    fn values_and_keys() {
        let ev = event(json!({"n": 1, "s": "1", "f": 100.0, "i": 100, "neg": -0.0, "x": 1.5, "u": u64::MAX,
            "o": {"b": [true, null], "a": "q\"\n\u{1}"}}));
        let key = |p: &str| {
            let mut out = String::new();
            FieldPath::parse(p).unwrap().resolve(&ev).unwrap().write_key(&mut out);
            out
        };
        assert_eq!(key("payload.n"), "1");
        assert_eq!(key("payload.s"), "\"1\"");
        assert_ne!(key("payload.n"), key("payload.s"));
        assert_eq!(key("payload.f"), "100");
        assert_eq!(key("payload.f"), key("payload.i"));
        assert_eq!(key("payload.neg"), "0");
        assert_eq!(key("payload.x"), "1.5");
        assert_eq!(key("payload.u"), "18446744073709551615");
        assert_eq!(key("payload.o"), r#"{"a":"q\"\n\u0001","b":[true,null]}"#);
        assert_eq!(key("payload.o"), serde_json::to_string(&ev.payload["o"]).unwrap());
        assert_eq!(key("id"), "\"e1\"");
        let v = |p: &str| FieldPath::parse(p).unwrap().resolve(&ev).unwrap();
        assert_eq!(v("payload.f").as_f64(), Some(100.0));
        assert_eq!(v("payload.s").as_f64(), None);
        assert_eq!(v("id").as_f64(), None);
        assert_eq!(v("id").to_json(), json!("e1"));
    }

    #[test]
    fn compile_errors_name_the_member() {
        let err = |f: Value| CompiledFilter::compile(&serde_json::from_value(f).unwrap()).unwrap_err();
        let e = err(json!({"all": [c("id", "eq", json!(1)), {"not": c("amount", "eq", json!(1))}]}));
        assert_eq!(e.field, "filter.all[1].not.field");
        assert_eq!(err(json!({"any": [{"field": "id", "op": "gt"}]})).field, "filter.any[0].value");
        assert_eq!(err(c("id", "in", json!({}))).field, "filter.value");
        let e = err(c("id", "regex", json!("(?:a{1000}){1000}")));
        assert_eq!(e.field, "filter.value");
        assert!(e.detail.contains("size limit"), "{}", e.detail);
    }

    #[test]
    fn type_patterns() {
        let m = |p: &[&str]| TypeMatcher::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let exact = m(&["checkout.failed", "a"]);
        assert!(exact.matches("checkout.failed") && exact.matches("a"));
        assert!(!exact.matches("checkout.failed.x") && !exact.matches("checkout"));
        assert_eq!(exact.is_exact(), Some(&["checkout.failed".to_string(), "a".to_string()][..]));

        let prefix = m(&["payment.*"]);
        assert!(prefix.matches("payment.failed") && prefix.matches("payment.card.declined"));
        assert!(!prefix.matches("payment") && !prefix.matches("payments.failed"));
        assert!(prefix.matches("payment."));
        assert_eq!(prefix.is_exact(), None);

        let all = m(&["*"]);
        assert!(all.matches("x") && all.matches("a.b.c"));

        let suffix = m(&["*.failed", "exact"]);
        assert!(suffix.matches("checkout.failed") && suffix.matches("a.b.failed") && suffix.matches("exact"));
        assert!(!suffix.matches("failed") && !suffix.matches("checkout.failed.x"));

        let inner = m(&["a*b*a"]);
        assert!(inner.matches("aba") && inner.matches("a.x.b.y.a") && inner.matches("abba"));
        assert!(!inner.matches("ab") && !inner.matches("aab") && !inner.matches("a"));

        assert!(!m(&[]).matches("x"));
        assert_eq!(m(&[]).is_exact(), Some(&[][..]));
    }
}
