//! Message templates: an action's optional `{"title", "body"}` rendered with the alert and its
//! triggering event. The engine is minijinja in a sandbox: no loader, no file or network
//! access, no code execution, a fuel budget per render and capped sizes. Without a template a
//! channel gets a default title and body.

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

use crate::rules::spec::{join, member, object, only_members, string, FieldError};

/// Longest template source (title and body each), bytes.
pub const MAX_TEMPLATE_BYTES: usize = 16 * 1024;
/// Longest rendered title and body, bytes (longer output is cut at a character boundary).
pub const MAX_TITLE_BYTES: usize = 1024;
pub const MAX_BODY_BYTES: usize = 32 * 1024;
/// Template instructions one render may execute.
const FUEL: u64 = 100_000;

/// An action's template, checked at rule write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageTemplate {
    pub title: Option<String>,
    pub body: Option<String>,
}

/// A rendered message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub title: String,
    pub body: String,
}

fn env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

/// Parses and compiles an action's `template` member (`path` names it in errors).
pub fn parse_template(v: Option<&Value>, path: &str) -> Result<MessageTemplate, FieldError> {
    let Some(v) = v else { return Ok(MessageTemplate::default()) };
    let obj = object(v, path)?;
    only_members(obj, path, &["title", "body"])?;
    let env = env();
    let mut out = MessageTemplate::default();
    for (key, slot) in [("title", &mut out.title), ("body", &mut out.body)] {
        let Some(src) = member(obj, key) else { continue };
        let p = join(path, key);
        let src = string(src, &p)?;
        if src.len() > MAX_TEMPLATE_BYTES {
            return Err(FieldError::new(p, format!("must be at most {MAX_TEMPLATE_BYTES} bytes")));
        }
        if let Err(e) = env.template_from_str(src) {
            return Err(FieldError::new(p, format!("template syntax: {}", e.detail().unwrap_or("invalid"))));
        }
        *slot = Some(src.to_owned());
    }
    Ok(out)
}

/// Renders an action's template against `context` (`{"alert", "event", "channel"}`); parts
/// the template leaves out, or that fail to render, get the default text.
pub fn render(template: &MessageTemplate, context: &Value) -> Message {
    let default = default_message(context);
    let env = env();
    let one = |src: &Option<String>, fallback: String, max: usize| -> String {
        let Some(src) = src else { return fallback };
        match env.render_str(src, context) {
            Ok(s) => truncate(s, max),
            Err(e) => {
                tracing::debug!(error = %e, "template render failed; default text used");
                fallback
            }
        }
    };
    Message {
        title: one(&template.title, default.title, MAX_TITLE_BYTES),
        body: one(&template.body, default.body, MAX_BODY_BYTES),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// `[critical] Checkout failures firing` and a body with the value, threshold and group.
fn default_message(context: &Value) -> Message {
    let alert = &context["alert"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let name = alert["title"].as_str().map(str::to_owned).unwrap_or_else(|| s(&alert["rule_name"]));
    let state = s(&alert["state"]);
    let title = truncate(format!("[{}] {} {}", s(&alert["severity"]), name, state), MAX_TITLE_BYTES);
    let mut body = format!("Rule `{}` (version {}) is {state}.", s(&alert["rule_name"]), alert["rule_version"]);
    if let Some(v) = alert["value"].as_f64() {
        body.push_str(&format!("\nValue: {v}"));
    }
    if let Some(t) = alert["threshold"].as_f64() {
        body.push_str(&format!(" (threshold {t})"));
    }
    if let Some(g) = alert["group"].as_object().filter(|g| !g.is_empty()) {
        let parts: Vec<String> = g.iter().map(|(k, v)| format!("{k}={v}")).collect();
        body.push_str(&format!("\nGroup: {}", parts.join(", ")));
    }
    body.push_str(&format!("\nFired at: {}", s(&alert["fired_at"])));
    if let Some(r) = alert["resolved_at"].as_str() {
        body.push_str(&format!("\nResolved at: {r}"));
    }
    body.push_str(&format!("\nAlert: {}", s(&alert["id"])));
    Message { title, body: truncate(body, MAX_BODY_BYTES) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({"alert": {"id": "a1", "rule_name": "Checkout failures", "rule_version": 2, "severity": "critical",
                         "state": "firing", "value": 12.0, "threshold": 10.0, "group": {"payload.merchant": "m1"},
                         "fired_at": "2026-11-23T00:00:00Z"},
               "event": {"type": "checkout.failed", "payload": {"amount": 150, "merchant": "m1"}}})
    }

    #[test]
    fn renders_alert_and_event_fields() {
        let t = parse_template(
            Some(&json!({"title": "{{ alert.rule_name }}: {{ event.payload.amount }}",
                         "body": "{% for k, v in alert.group | items %}{{ k }}={{ v }}{% endfor %}"})),
            "actions[0].template",
        )
        .unwrap();
        let m = render(&t, &ctx());
        assert_eq!(m.title, "Checkout failures: 150");
        assert_eq!(m.body, "payload.merchant=m1");
    }

    #[test]
    fn defaults_and_bad_templates() {
        let m = render(&MessageTemplate::default(), &ctx());
        assert_eq!(m.title, "[critical] Checkout failures firing");
        assert!(
            m.body.contains("Value: 12 (threshold 10)") && m.body.contains("payload.merchant=\"m1\""),
            "{}",
            m.body
        );
        let e = parse_template(Some(&json!({"title": "{{ unclosed"})), "actions[0].template").unwrap_err();
        assert_eq!(e.field, "actions[0].template.title");
        let e = parse_template(Some(&json!({"subject": "x"})), "actions[0].template").unwrap_err();
        assert_eq!(e.field, "actions[0].template.subject");
        // A template that loops forever runs out of fuel; the default text is used.
        let t = parse_template(
            Some(
                &json!({"title": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"}),
            ),
            "t",
        )
        .unwrap();
        assert_eq!(render(&t, &ctx()).title, "[critical] Checkout failures firing");
        // Missing fields render empty instead of failing.
        let t = parse_template(Some(&json!({"title": "{{ event.payload.nope.deeper }}!"})), "t").unwrap();
        assert_eq!(render(&t, &ctx()).title, "!");
    }
}
