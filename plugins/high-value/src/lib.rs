//! `high-value`: fires when a numeric payload field is at or above a threshold.
//!
//! Config: `{"threshold": 1000, "field": "amount"}` (`field` defaults to `amount` and may be a
//! dotted path into the payload).

use signalops_sdk::{export_rule, Decision, Event, Value};

fn evaluate(event: &Event, config: &Value) -> Result<Decision, String> {
    let field = match config.get("field") {
        None => "amount",
        Some(v) => v.as_str().ok_or("config.field must be a string")?,
    };
    let threshold = match config.get("threshold") {
        None => return Err("config.threshold is required".to_string()),
        Some(v) => v.as_f64().ok_or("config.threshold must be a number")?,
    };
    match event.field(field).and_then(Value::as_f64) {
        Some(value) if value >= threshold => Ok(Decision::fire(format!("{field} {value} is at least {threshold}"))
            .field(field, value)
            .field("threshold", threshold)),
        _ => Ok(Decision::skip()),
    }
}

export_rule!(evaluate);
