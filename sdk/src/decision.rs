//! What a rule plugin answers for one event.

use std::fmt;

use crate::msgpack::{decode, encode, encode_str, map_header, Value};

/// Alert severities, as rules name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// Fire an alert or not, and what the alert says.
///
/// ```
/// use signalops_sdk::{Decision, Severity};
/// let d = Decision::fire("card used 12 times in 10 minutes")
///     .severity(Severity::Critical)
///     .label("card", "4242")
///     .field("count", 12i64);
/// assert!(d.fires());
/// ```
///
/// Labels and fields are encoded as they are added, so a decision with fields costs one
/// buffer rather than a string per name and a list of values.
#[derive(Clone, PartialEq)]
pub struct Decision {
    fire: bool,
    severity: Option<Severity>,
    title: Option<String>,
    labels: Entries,
    fields: Entries,
}

/// MessagePack map entries (key, value, key, value, ...) and how many there are.
#[derive(Clone, PartialEq, Default)]
struct Entries {
    count: usize,
    bytes: Vec<u8>,
}

impl Entries {
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if self.bytes.capacity() == 0 {
            self.bytes.reserve(64);
        }
        self.count += 1;
        encode_str(key, &mut self.bytes);
        &mut self.bytes
    }

    fn encode(&self, name: &str, out: &mut Vec<u8>) {
        encode_str(name, out);
        map_header(self.count, out);
        out.extend_from_slice(&self.bytes);
    }

    /// The entries as a map value (what the host reads).
    fn to_value(&self) -> Value {
        let mut bytes = Vec::with_capacity(5 + self.bytes.len());
        map_header(self.count, &mut bytes);
        bytes.extend_from_slice(&self.bytes);
        decode(&bytes).unwrap_or(Value::Nil)
    }
}

impl Decision {
    /// Do not fire for this event.
    pub fn skip() -> Decision {
        Decision { fire: false, severity: None, title: None, labels: Entries::default(), fields: Entries::default() }
    }

    /// Fire, with a title for the alert.
    pub fn fire(title: impl Into<String>) -> Decision {
        Decision { fire: true, title: Some(title.into()), ..Decision::skip() }
    }

    /// Fire with nothing else: no title, severity, labels or fields. For an event that only
    /// counts toward an alert already open (see [`host::alert_open`](crate::host::alert_open)),
    /// whose details the node would not use.
    pub fn fire_plain() -> Decision {
        Decision { fire: true, ..Decision::skip() }
    }

    /// Overrides the rule's severity.
    pub fn severity(mut self, s: Severity) -> Decision {
        self.severity = Some(s);
        self
    }

    /// Adds a label to the alert (next to the rule's own labels).
    pub fn label(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Decision {
        encode_str(value.as_ref(), self.labels.key(key.as_ref()));
        self
    }

    /// Adds a detail field to the alert.
    pub fn field(mut self, key: impl AsRef<str>, value: impl Into<Value>) -> Decision {
        encode(&value.into(), self.fields.key(key.as_ref()));
        self
    }

    /// Whether the decision fires.
    pub fn fires(&self) -> bool {
        self.fire
    }

    /// Whether this is `Decision::skip()` or `Decision::fire_plain()` with nothing added.
    pub(crate) fn is_bare(&self) -> bool {
        self.severity.is_none() && self.title.is_none() && self.labels.count == 0 && self.fields.count == 0
    }

    /// The output map (ABI.md, "Output").
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut n = 1;
        n += self.severity.is_some() as u8;
        n += self.title.is_some() as u8;
        n += (self.labels.count > 0) as u8;
        n += (self.fields.count > 0) as u8;
        out.push(0x80 | n);
        encode_str("fire", out);
        encode(&Value::Bool(self.fire), out);
        if let Some(s) = self.severity {
            encode_str("severity", out);
            encode_str(s.as_str(), out);
        }
        if let Some(t) = &self.title {
            encode_str("title", out);
            encode_str(t, out);
        }
        if self.labels.count > 0 {
            self.labels.encode("labels", out);
        }
        if self.fields.count > 0 {
            self.fields.encode("fields", out);
        }
    }
}

impl fmt::Debug for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decision")
            .field("fire", &self.fire)
            .field("severity", &self.severity)
            .field("title", &self.title)
            .field("labels", &self.labels.to_value())
            .field("fields", &self.fields.to_value())
            .finish()
    }
}
