//! `first-seen`: fires the first time a value of a payload field is seen (per tenant and rule),
//! e.g. a login from a country the account never used.
//!
//! Config: `{"field": "country"}`. Seen values are kept in host key-value state.

use signalops_sdk::{export_rule, host, Decision, Event, RuleConfig, Value};

/// The rule's config, read once per rule (not on every event).
struct Config {
    field: String,
}

impl RuleConfig for Config {
    fn from_config(config: &Value) -> Result<Config, String> {
        let field = config.get("field").and_then(Value::as_str).ok_or("config.field (a payload field) is required")?;
        Ok(Config { field: field.to_string() })
    }
}

fn evaluate(event: &Event, config: &Config) -> Result<Decision, String> {
    let field = config.field.as_str();
    let value = match event.field(field).and_then(Value::into_key) {
        Some(v) => v,
        None => return Ok(Decision::skip()),
    };
    let key = format!("seen:{value}");
    if host::state_get(&key).is_some() {
        return Ok(Decision::skip());
    }
    host::state_set(&key, &event.occurred_at_ms().to_be_bytes()).map_err(|e| e.to_string())?;
    Ok(Decision::fire(format!("first {field} {value}")).label(field, value))
}

export_rule!(evaluate, Config);
