//! Message templates: an action's optional `{"title", "body"}` rendered with the alert and its
//! triggering event. The engine is minijinja in a sandbox: no loader, no file or network
//! access, no code execution, a fuel budget per render and output written into a capped buffer.
//!
//! Templates are tenant input, so nothing in them may build large values before they reach the
//! output: only `{{ expression }}`, `if`/`elif`/`else` and `for` are allowed; expressions may
//! not use `~`, `*` or `+` (concatenation and repetition), list or map literals, or any global
//! function; and only filters that never grow a value are registered. Loops are bounded by the
//! fuel, and what they print by the output cap. Without a template a channel gets a default
//! title and body.

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

use signalops_core::alert::{Alert, AlertState};
use signalops_core::model::format_ms;

use signalops_core::json::{join, member, object, only_members, string, FieldError};

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
    use minijinja::{filters as f, tests as t};
    // Empty: no globals (`range`, `namespace`, ...), and only the filters and tests below.
    let mut env = Environment::empty();
    env.set_fuel(Some(FUEL));
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.add_filter("upper", f::upper);
    env.add_filter("lower", f::lower);
    env.add_filter("title", f::title);
    env.add_filter("capitalize", f::capitalize);
    env.add_filter("trim", f::trim);
    env.add_filter("length", f::length);
    env.add_filter("count", f::length);
    env.add_filter("default", f::default);
    env.add_filter("d", f::default);
    env.add_filter("first", f::first);
    env.add_filter("last", f::last);
    env.add_filter("min", f::min);
    env.add_filter("max", f::max);
    env.add_filter("sum", f::sum);
    env.add_filter("abs", f::abs);
    env.add_filter("int", f::int);
    env.add_filter("float", f::float);
    env.add_filter("round", f::round);
    env.add_filter("items", f::items);
    env.add_filter("dictsort", f::dictsort);
    env.add_filter("sort", f::sort);
    env.add_filter("reverse", f::reverse);
    env.add_filter("unique", f::unique);
    env.add_test("defined", |v: minijinja::Value| !v.is_undefined());
    env.add_test("undefined", |v: minijinja::Value| v.is_undefined());
    env.add_test("none", |v: minijinja::Value| v.is_none());
    env.add_test("number", t::is_number);
    env.add_test("string", t::is_string);
    env.add_test("mapping", t::is_mapping);
    env.add_test("sequence", t::is_sequence);
    env.add_test("true", t::is_true);
    env.add_test("false", t::is_false);
    env.add_test("eq", t::is_eq);
    env.add_test("ne", t::is_ne);
    env.add_test("lt", t::is_lt);
    env.add_test("le", t::is_le);
    env.add_test("gt", t::is_gt);
    env.add_test("ge", t::is_ge);
    env.add_test("in", t::is_in);
    env.add_test("startingwith", t::is_startingwith);
    env.add_test("endingwith", t::is_endingwith);
    env
}

/// Statements a template may use.
const STATEMENTS: [&str; 6] = ["if", "elif", "else", "endif", "for", "endfor"];

/// Calls `f` with each character outside string literals (and its byte offset).
fn outside_strings(text: &str, mut f: impl FnMut(usize, char) -> bool) -> bool {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c == '"' || c == '\'' {
            quote = Some(c);
        } else if !f(i, c) {
            return false;
        }
    }
    true
}

/// Rejects what could build large values (see the module docs), tag by tag.
fn check_restricted(src: &str) -> Result<(), String> {
    let mut rest = src;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            Some('#') => "#}",
            _ => {
                rest = after;
                continue;
            }
        };
        let body = &after[1..];
        let end = if close == "#}" {
            body.find(close)
        } else {
            let mut end = None;
            outside_strings(body, |i, _| {
                if body[i..].starts_with(close) {
                    end = Some(i);
                    return false;
                }
                true
            });
            end
        };
        let Some(end) = end else { return Err("a tag is not closed".into()) };
        let inner = body[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if close != "#}" {
            let mut bad = None;
            outside_strings(inner, |_, c| {
                if matches!(c, '~' | '*' | '+' | '[' | '{') {
                    bad = Some(c);
                    return false;
                }
                true
            });
            if let Some(c) = bad {
                return Err(format!(
                    "`{c}` is not allowed in templates (no concatenation, repetition or literals; use a.b paths)"
                ));
            }
            if close == "%}" {
                let word = inner.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').next().unwrap_or_default();
                if !STATEMENTS.contains(&word) {
                    return Err(format!("`{word}` is not allowed; templates use if/elif/else/endif and for/endfor"));
                }
            }
        }
        rest = &body[end + close.len()..];
    }
    Ok(())
}

/// Collects rendered output up to a limit; writing past it fails, which stops the render.
struct CappedWriter {
    buf: Vec<u8>,
    max: usize,
    full: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.max - self.buf.len();
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            self.full = true;
            return Err(std::io::Error::other("template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders one template into at most `max` bytes; `None` when it fails (not when it is cut).
fn render_capped(env: &Environment<'_>, src: &str, context: &Value, max: usize) -> Option<String> {
    let template = env.template_from_str(src).ok()?;
    let mut out = CappedWriter { buf: Vec::new(), max, full: false };
    match template.render_captured_to(context, &mut out) {
        Ok(_) => {}
        Err(_) if out.full => {}
        Err(e) => {
            tracing::debug!(error = %e, "template render failed; default text used");
            return None;
        }
    }
    match String::from_utf8(out.buf) {
        Ok(t) => Some(t),
        Err(e) => {
            // Cut inside a character: keep the valid prefix.
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            String::from_utf8(bytes).ok()
        }
    }
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
        check_restricted(src).map_err(|e| FieldError::new(&p, e))?;
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
        // Templates were checked at rule write; a stored one that no longer passes (or fails
        // to render) gets the default text.
        if check_restricted(src).is_err() {
            return fallback;
        }
        render_capped(&env, src, context, max).unwrap_or(fallback)
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
        // Missing fields render empty instead of failing.
        let t = parse_template(Some(&json!({"title": "{{ event.payload.nope.deeper }}!"})), "t").unwrap();
        assert_eq!(render(&t, &ctx(), &alert()).title, "!");
    }

    #[test]
    fn templates_cannot_build_large_values() {
        // Loops are bounded by the fuel and their output by the cap.
        let nested = "{% for a in alert.event_ids %}{% for b in alert.event_ids %}{{ alert }}{% endfor %}{% endfor %}";
        let t = parse_template(Some(&json!({"body": nested})), "t").unwrap();
        let mut big = alert();
        big.event_ids = (0..1000).map(|i| i.to_string()).collect();
        let ctx_big = json!({"alert": big.view(None)});
        assert!(render(&t, &ctx_big, &big).body.len() <= MAX_BODY_BYTES);
        // What could build large values is refused at rule write.
        for bad in [
            "{% set a = alert.rule_name %}",
            "{{ alert.rule_name ~ alert.rule_name }}",
            "{{ 'x' * 100000000 }}",
            "{{ alert.value + 1 }}",
            "{% for x in [alert, alert] %}{{ x }}{% endfor %}",
            "{% macro m() %}{% endmacro %}",
        ] {
            let e = parse_template(Some(&json!({"title": bad})), "actions[0].template").unwrap_err();
            assert_eq!(e.field, "actions[0].template.title", "{bad}");
        }
        // Unknown functions and growing filters do not exist: the default text is used.
        for missing in ["{{ range(10) }}", "{{ alert.rule_name | replace('a', 'bbbb') }}"] {
            let t = parse_template(Some(&json!({"title": missing})), "t").unwrap();
            assert_eq!(render(&t, &ctx(), &alert()).title, "[critical] Checkout failures firing", "{missing}");
        }
        // Strings may hold any character.
        let t = parse_template(Some(&json!({"title": "{{ alert.nope | default('a ~ * + [x] }}') }}!"})), "t").unwrap();
        assert_eq!(render(&t, &ctx(), &alert()).title, "a ~ * + [x] }}!");
    }
}
