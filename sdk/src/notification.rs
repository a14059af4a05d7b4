//! Notifier plugins: turn an alert notification into one outbound HTTP request. The node sends
//! the request (after checking it against the channel's allowed hosts), adds the channel's
//! secret headers, records the response and retries on the channel's schedule. The plugin sees
//! no secrets and has no network of its own.

use crate::event::Event;
use crate::msgpack::Value;

/// What a notifier renders: one alert transition for one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub(crate) kind: String,
    pub(crate) alert: Value,
    pub(crate) title: String,
    pub(crate) body: String,
    pub(crate) event: Option<Event>,
    pub(crate) channel_name: String,
    pub(crate) webhook_id: String,
}

impl Notification {
    /// Reads the input map of a `render` call (see ABI.md).
    pub(crate) fn from_value(v: &Value) -> Option<Notification> {
        let message = v.get("message")?;
        Some(Notification {
            kind: v.get("type")?.as_str()?.to_string(),
            alert: v.get("alert")?.clone(),
            title: message.get("title")?.as_str()?.to_string(),
            body: message.get("body")?.as_str()?.to_string(),
            event: v.get("event").and_then(Event::from_value),
            channel_name: v.get("channel").and_then(|c| c.get("name")).and_then(Value::as_str)?.to_string(),
            webhook_id: v.get("webhook_id")?.as_str()?.to_string(),
        })
    }

    /// Builds a notification by hand (for a plugin's own unit tests).
    pub fn new(kind: &str, alert: Value, title: &str, body: &str) -> Notification {
        Notification {
            kind: kind.to_string(),
            alert,
            title: title.to_string(),
            body: body.to_string(),
            event: None,
            channel_name: String::from("test-channel"),
            webhook_id: String::from("msg_test"),
        }
    }

    /// `alert.firing` or `alert.resolved`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// True for `alert.firing`.
    pub fn firing(&self) -> bool {
        self.kind == "alert.firing"
    }

    /// The alert (a map: `id`, `rule_id`, `rule_name`, `severity`, `state`, `value`,
    /// `threshold`, `labels`, `group`, `details`, `fired_at_ms`, `resolved_at_ms`, ...).
    pub fn alert(&self) -> &Value {
        &self.alert
    }

    /// A string member of the alert (`""` when it is absent).
    pub fn alert_str(&self, key: &str) -> &str {
        self.alert.get(key).and_then(Value::as_str).unwrap_or("")
    }

    /// The message title the channel's template (or the default) rendered.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The message body the channel's template (or the default) rendered.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The newest event that triggered the alert, when the node still has it.
    pub fn event(&self) -> Option<&Event> {
        self.event.as_ref()
    }

    pub fn channel_name(&self) -> &str {
        &self.channel_name
    }

    /// The delivery's id, the same on every retry: give it to receivers that deduplicate.
    pub fn webhook_id(&self) -> &str {
        &self.webhook_id
    }
}

/// The HTTP request a notifier asks the node to send.
///
/// ```
/// use signalops_sdk::{Request, Value};
/// let r = Request::post("https://chat.example.com/hook")
///     .header("x-source", "signalops")
///     .json(&Value::map(vec![("text", Value::from("disk full"))]));
/// assert_eq!(r.method(), "POST");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, url: impl Into<String>) -> Request {
        Request { method: method.to_string(), url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn post(url: impl Into<String>) -> Request {
        Request::new("POST", url)
    }

    pub fn put(url: impl Into<String>) -> Request {
        Request::new("PUT", url)
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A raw body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// A JSON body with `content-type: application/json`.
    pub fn json(self, v: &Value) -> Request {
        self.header("content-type", "application/json").body(v.to_json())
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The output map of a `render` call.
    pub(crate) fn to_value(&self) -> Value {
        let headers = self.headers.iter().map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str()))).collect();
        Value::map(vec![
            ("method", Value::from(self.method.as_str())),
            ("url", Value::from(self.url.as_str())),
            ("headers", Value::Map(headers)),
            ("body", Value::Bin(self.body.clone())),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_escape_and_nest() {
        let v = Value::map(vec![
            ("text", Value::from("line \"one\"\nline\ttwo \u{1}")),
            ("n", Value::from(3i64)),
            ("x", Value::from(1.5)),
            ("list", Value::from(vec![Value::Nil, Value::from(true)])),
        ]);
        assert_eq!(v.to_json(), r#"{"text":"line \"one\"\nline\ttwo \u0001","n":3,"x":1.5,"list":[null,true]}"#);
        let r = Request::post("https://a.example/h").json(&v);
        assert_eq!(r.headers()[0], ("content-type".to_string(), "application/json".to_string()));
        assert_eq!(r.body_bytes(), v.to_json().as_bytes());
    }
}
