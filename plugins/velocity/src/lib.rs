//! `velocity`: fires when more than `max` events with the same value of a payload field arrive
//! within `seconds` (e.g. one card used more than 5 times in 10 minutes).
//!
//! Config: `{"key": "card_id", "max": 5, "seconds": 600}` (`seconds` up to 3600). Counts are
//! host window counters, kept per tenant and rule, at event time.
//!
//! It fires on the event that takes the count past `max`, once per burst: the following events
//! of the same burst do not fire again, and a later burst (after the count fell back to `max`
//! or below) fires anew. The rule's `group_by` and cooldown then decide whether that makes a
//! new alert.

use signalops_sdk::{export_rule, host, Decision, Event, RuleConfig, Value};

/// The rule's config, read once per rule (not on every event).
struct Config {
    key: String,
    max: i64,
    seconds: u32,
}

impl RuleConfig for Config {
    fn from_config(config: &Value) -> Result<Config, String> {
        let key = config.get("key").and_then(Value::as_str).ok_or("config.key (a payload field) is required")?;
        let max = config.get("max").and_then(Value::as_i64).ok_or("config.max (an integer) is required")?;
        let seconds = match config.get("seconds").and_then(Value::as_i64) {
            Some(s) if s >= 1 && s <= host::MAX_WINDOW_SECONDS as i64 => s as u32,
            _ => return Err(format!("config.seconds must be an integer from 1 to {}", host::MAX_WINDOW_SECONDS)),
        };
        Ok(Config { key: key.to_string(), max, seconds })
    }
}

fn evaluate(event: &Event, config: &Config) -> Result<Decision, String> {
    let (key, max, seconds) = (config.key.as_str(), config.max, config.seconds);
    // `key=value`, built in one buffer without `format!` (costly in WebAssembly, and this runs
    // on every event).
    let mut counter = String::with_capacity(key.len() + 32);
    counter.push_str(key);
    counter.push('=');
    if !event.push_field_key(key, &mut counter) {
        return Ok(Decision::skip());
    }
    let value = &counter[key.len() + 1..];
    let count = host::window_add(&counter, seconds, 1).map_err(|e| e.to_string())?;
    // Counts grow one event at a time, so a burst passes `max + 1` exactly once.
    if count != max + 1 {
        return Ok(Decision::skip());
    }
    host::info(&format!("{key}={value}: {count} events in {seconds}s"));
    Ok(Decision::fire(format!("{count} events with {key} {value} in {seconds}s (max {max})"))
        .label(key, value)
        .field("count", count))
}

export_rule!(evaluate, Config);
