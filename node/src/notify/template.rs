//! Message templates: an action's optional `{"title", "body"}` rendered with the alert and its
//! triggering event. The engine is minijinja in a sandbox: no loader, no file or network
//! access, no code execution, a fuel budget per render and capped sizes. Without a template a
//! channel gets a default title and body.

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

use crate::model::format_ms;
use crate::rules::alert::{Alert, AlertState};

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
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
pub fn render(template: &MessageTemplate, context: &Value, alert: &Alert) -> Message {
    let default = default_message(alert);
    if template.title.is_none() && template.body.is_none() {
        return default;
    }
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
pub fn default_message(alert: &Alert) -> Message {
    let name = alert.title.as_deref().unwrap_or(&alert.rule_name);
    let state = match alert.state {
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    };
    let severity = serde_json::to_value(alert.severity).ok();
    let severity = severity.as_ref().and_then(Value::as_str).unwrap_or_default();
    let title = truncate(format!("[{severity}] {name} {state}"), MAX_TITLE_BYTES);
    let mut body = format!("Rule `{}` (version {}) is {state}.", alert.rule_name, alert.rule_version);
    body.push_str(&format!("\nValue: {}", alert.value));
    if let Some(t) = alert.threshold {
        body.push_str(&format!(" (threshold {t})"));
    }
    if !alert.group.is_empty() {
        let parts: Vec<String> = alert.group.iter().map(|(k, v)| format!("{k}={v}")).collect();
        body.push_str(&format!("\nGroup: {}", parts.join(", ")));
    }
    body.push_str(&format!("\nFired at: {}", format_ms(alert.fired_at_ms)));
    if let Some(r) = alert.resolved_at_ms {
        body.push_str(&format!("\nResolved at: {}", format_ms(r)));
    }
    body.push_str(&format!("\nAlert: {}", alert.id));
    Message { title, body: truncate(body, MAX_BODY_BYTES) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alert() -> Alert {
        serde_json::from_value(json!({"id": uuid::Uuid::nil(), "tenant_id": uuid::Uuid::nil(), "rule_id": uuid::Uuid::nil(),
            "rule_version": 2, "rule_name": "Checkout failures", "kind": "window", "severity": "critical",
            "group": {"payload.merchant": "m1"}, "value": 12.0, "threshold": 10.0, "state": "firing", "fired_at_ms": 0}))
        .unwrap()
    }

    fn ctx() -> Value {
        json!({"alert": alert().view(None),
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
        let m = render(&t, &ctx(), &alert());
        assert_eq!(m.title, "Checkout failures: 150");
        assert_eq!(m.body, "payload.merchant=m1");
    }

    #[test]
    fn defaults_and_bad_templates() {
        let m = render(&MessageTemplate::default(), &ctx(), &alert());
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
        assert_eq!(render(&t, &ctx(), &alert()).title, "[critical] Checkout failures firing");
        // Missing fields render empty instead of failing.
        let t = parse_template(Some(&json!({"title": "{{ event.payload.nope.deeper }}!"})), "t").unwrap();
        assert_eq!(render(&t, &ctx(), &alert()).title, "!");
    }
}
