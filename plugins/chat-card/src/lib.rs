//! `chat-card`: a notifier that posts alerts as rich chat cards to services SignalOps has no
//! built-in channel for.
//!
//! Config: `{"url": "https://discord.com/api/webhooks/...", "format": "discord"}`; `format` is
//! `discord` (an embed, the default) or `teams` (an Adaptive Card). The channel's
//! `allowed_hosts` must include the URL's host.

use signalops_sdk::{export_notifier, Notification, Request, Value};

/// Card colours by severity (resolved alerts are green).
fn colour(n: &Notification) -> i64 {
    if !n.firing() {
        return 0x2e_b8_86;
    }
    match n.alert_str("severity") {
        "critical" => 0xd0_31_2d,
        "error" => 0xe8_6a_1c,
        "warning" => 0xf2_c7_44,
        _ => 0x3a_7b_d5,
    }
}

fn value_text(v: Option<&Value>) -> String {
    match v {
        Some(v) => v.to_key().unwrap_or_else(|| v.to_json()),
        None => String::from("-"),
    }
}

fn discord(n: &Notification) -> Value {
    let field = |name: &str, value: String| {
        Value::map(vec![("name", Value::from(name)), ("value", Value::from(value)), ("inline", Value::from(true))])
    };
    let mut fields = vec![
        field("Rule", n.alert_str("rule_name").to_string()),
        field("Severity", n.alert_str("severity").to_string()),
        field("Value", value_text(n.alert().get("value"))),
    ];
    if let Some(e) = n.event() {
        fields.push(field("Event", format!("{} ({})", e.event_type(), e.id())));
    }
    let embed = Value::map(vec![
        ("title", Value::from(n.title())),
        ("description", Value::from(n.body())),
        ("color", Value::from(colour(n))),
        ("fields", Value::from(fields)),
        ("footer", Value::map(vec![("text", Value::from(format!("SignalOps · {}", n.webhook_id())))])),
    ]);
    Value::map(vec![("embeds", Value::from(vec![embed]))])
}

fn teams(n: &Notification) -> Value {
    let text = |t: &str, bold: bool| {
        let mut m = vec![("type", Value::from("TextBlock")), ("text", Value::from(t)), ("wrap", Value::from(true))];
        if bold {
            m.push(("weight", Value::from("Bolder")));
        }
        Value::map(m)
    };
    let card = Value::map(vec![
        ("type", Value::from("AdaptiveCard")),
        ("version", Value::from("1.4")),
        ("body", Value::from(vec![text(n.title(), true), text(n.body(), false)])),
    ]);
    let attachment =
        Value::map(vec![("contentType", Value::from("application/vnd.microsoft.card.adaptive")), ("content", card)]);
    Value::map(vec![("type", Value::from("message")), ("attachments", Value::from(vec![attachment]))])
}

fn render(n: &Notification, config: &Value) -> Result<Request, String> {
    let url = config.get("url").and_then(Value::as_str).ok_or("config.url is required")?;
    let body = match config.get("format").and_then(Value::as_str).unwrap_or("discord") {
        "discord" => discord(n),
        "teams" => teams(n),
        other => return Err(format!("config.format `{other}` is not discord or teams")),
    };
    Ok(Request::post(url).header("x-signalops-webhook-id", n.webhook_id()).json(&body))
}

export_notifier!(render);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_discord_embed_by_default() {
        let alert = Value::map(vec![
            ("rule_name", Value::from("Checkout failures")),
            ("severity", Value::from("critical")),
            ("value", Value::from(12i64)),
        ]);
        let n = Notification::new("alert.firing", alert, "[critical] Checkout failures firing", "12 in 5 minutes");
        let config = Value::map(vec![("url", Value::from("https://chat.example/hook"))]);
        let r = render(&n, &config).unwrap();
        assert_eq!(r.url(), "https://chat.example/hook");
        let body = String::from_utf8(r.body_bytes().to_vec()).unwrap();
        assert!(body.starts_with(r#"{"embeds":[{"title":"[critical] Checkout failures firing""#), "{body}");
        assert!(body.contains(r#""color":13644077"#), "{body}");
        assert!(render(&n, &Value::map(vec![("format", Value::from("x"))])).is_err());
    }
}
