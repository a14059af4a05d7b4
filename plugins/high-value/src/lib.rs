//! `high-value`: fires when a numeric payload field is at or above a threshold.
//!
//! Config: `{"threshold": 1000, "field": "amount"}` (`field` defaults to `amount` and may be a
//! dotted path into the payload).

use signalops_sdk::{export_rule, push_number, Decision, Event, Value};

fn evaluate(event: &Event, config: &Value) -> Result<Decision, String> {
    let field = match config.get("field") {
        None => "amount",
        Some(v) => v.as_str().ok_or("config.field must be a string")?,
    };
    let threshold = match config.get("threshold") {
        None => return Err("config.threshold is required".to_string()),
        Some(v) => v.as_f64().ok_or("config.threshold must be a number")?,
    };
    // Only the one number is read from the event.
    match event.number(field) {
        Some(value) if value >= threshold => {
            // Built by hand: `format!` and float formatting cost thousands of instructions in
            // WebAssembly, on every alert.
            let mut title = String::with_capacity(field.len() + 32);
            title.push_str(field);
            title.push(' ');
            push_number(&mut title, value);
            title.push_str(" is at least ");
            push_number(&mut title, threshold);
            Ok(Decision::fire(title).field(field, value).field("threshold", threshold))
        }
        _ => Ok(Decision::skip()),
    }
}

export_rule!(evaluate);
