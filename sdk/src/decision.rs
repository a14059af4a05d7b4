//! What a rule plugin answers for one event.

use crate::msgpack::{encode, encode_str, map_header, Value};

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
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    fire: bool,
    severity: Option<Severity>,
    title: Option<String>,
    labels: Vec<(String, String)>,
    fields: Vec<(String, Value)>,
}

impl Decision {
    /// Do not fire for this event.
    pub fn skip() -> Decision {
        Decision { fire: false, severity: None, title: None, labels: Vec::new(), fields: Vec::new() }
    }

    /// Fire, with a title for the alert.
    pub fn fire(title: impl Into<String>) -> Decision {
        Decision { fire: true, title: Some(title.into()), ..Decision::skip() }
    }

    /// Overrides the rule's severity.
    pub fn severity(mut self, s: Severity) -> Decision {
        self.severity = Some(s);
        self
    }

    /// Adds a label to the alert (next to the rule's own labels).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Decision {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Adds a detail field to the alert.
    pub fn field(mut self, key: impl Into<String>, value: impl Into<Value>) -> Decision {
        self.fields.push((key.into(), value.into()));
        self
    }

    pub fn fires(&self) -> bool {
        self.fire
    }

    /// The output map (ABI.md, "Output").
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut n = 1;
        n += self.severity.is_some() as u8;
        n += self.title.is_some() as u8;
        n += !self.labels.is_empty() as u8;
        n += !self.fields.is_empty() as u8;
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
        if !self.labels.is_empty() {
            encode_str("labels", out);
            map_header(self.labels.len(), out);
            for (k, v) in &self.labels {
                encode_str(k, out);
                encode_str(v, out);
            }
        }
        if !self.fields.is_empty() {
            encode_str("fields", out);
            map_header(self.fields.len(), out);
            for (k, v) in &self.fields {
                encode_str(k, out);
                encode(v, out);
            }
        }
    }
}
