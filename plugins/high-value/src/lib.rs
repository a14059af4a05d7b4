//! `high-value`: fires when a numeric payload field is at or above a threshold.
//!
//! Config: `{"threshold": 1000, "field": "amount"}` (`field` defaults to `amount` and may be a
//! dotted path into the payload).

use signalops_sdk::{export_rule, host, push_number, Decision, Event, RuleConfig, Value};

/// The rule's config, read once per rule (not on every event).
struct Config {
    field: String,
    /// `payload.<field>`: the event path `Event::get_number` reads.
    path: String,
    threshold: f64,
}

impl RuleConfig for Config {
    fn from_config(config: &Value) -> Result<Config, String> {
        let field = match config.get("field") {
            None => "amount",
            Some(v) => v.as_str().ok_or("config.field must be a string")?,
        };
        let threshold = match config.get("threshold") {
            None => return Err("config.threshold is required".to_string()),
            Some(v) => v.as_f64().ok_or("config.threshold must be a number")?,
        };
        let mut path = String::from("payload.");
        path.push_str(field);
        Ok(Config { field: field.to_string(), path, threshold })
    }
}

fn evaluate(event: &Event, config: &Config) -> Result<Decision, String> {
    // Only the one number is read from the event.
    match event.get_number(&config.path) {
        Some(value) if value >= config.threshold => {
            // While the alert for this event's group is open, a match only counts toward it:
            // its text would go unused.
            if host::alert_open() {
                return Ok(Decision::fire_plain());
            }
            // Built by hand: `format!` and float formatting cost thousands of instructions in
            // WebAssembly, on every alert.
            let field = config.field.as_str();
            let mut title = String::with_capacity(field.len() + 32);
            title.push_str(field);
            title.push(' ');
            push_number(&mut title, value);
            title.push_str(" is at least ");
            push_number(&mut title, config.threshold);
            Ok(Decision::fire(title).field(field, value).field("threshold", config.threshold))
        }
        _ => Ok(Decision::skip()),
    }
}

export_rule!(evaluate, Config);
