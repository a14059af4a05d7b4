//! The outbound side: one attempt at delivering a rendered notification to a channel.
//!
//! HTTP goes through one shared client that resolves names through the egress guard, follows
//! no redirects and uses no proxy. Email goes through the node's SMTP server. An attempt never
//! takes longer than the channel's timeout, and reads at most a short excerpt of the response.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::message::{header::ContentType, Mailbox};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::json;

use signalops_core::config::NotifyConfig;
use signalops_plugins::PluginRequest;

use signalops_rules::template::Message;

use crate::channel::{host_allowed, Channel, Target};
use crate::egress::{EgressPolicy, GuardedResolver};
use crate::sign::signature_header;

/// Bytes of a response body kept in the delivery log.
const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status_code: Option<u16>,
    pub latency: Duration,
    pub response: Option<String>,
    pub error: Option<String>,
    /// The endpoint said it is gone for good (HTTP 410): the channel is disabled.
    pub gone: bool,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.status_code.is_none_or(|c| (200..300).contains(&c))
    }

    pub(crate) fn failed(started: Instant, error: String) -> Outcome {
        Outcome { status_code: None, latency: started.elapsed(), response: None, error: Some(error), gone: false }
    }
}

/// What a delivery sends: the webhook body, the rendered message (chat and email text) or the
/// notifier's request.
pub struct Outgoing<'a> {
    pub webhook_id: &'a str,
    /// The JSON body of a webhook (Standard Webhooks `{"type", "timestamp", "data"}`).
    pub payload: &'a [u8],
    pub message: &'a Message,
    /// What a `plugin` channel's notifier rendered.
    pub request: Option<&'a PluginRequest>,
}

/// Largest body a notifier plugin may ask the node to send, bytes.
const MAX_PLUGIN_BODY_BYTES: usize = 256 * 1024;
const MAX_PLUGIN_HEADERS: usize = 32;
/// Headers only the node sets on a plugin's request.
const PLUGIN_RESERVED_HEADERS: [&str; 5] = ["host", "content-length", "transfer-encoding", "connection", "user-agent"];

pub struct Outbound {
    http: reqwest::Client,
    smtp: Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)>,
    egress: Arc<EgressPolicy>,
    telegram_base: String,
}

impl Outbound {
    pub fn new(cfg: &NotifyConfig) -> anyhow::Result<Outbound> {
        let egress =
            Arc::new(EgressPolicy::parse(cfg.egress_allow.iter().map(String::as_str)).map_err(anyhow::Error::msg)?);
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { policy: egress.clone() }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("SignalOps-Webhooks/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let smtp = match (&cfg.smtp_url, &cfg.smtp_from) {
            (Some(url), Some(from)) => {
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| anyhow::anyhow!("notify.smtp_url: {e}"))?
                    .timeout(Some(Duration::from_secs(30)))
                    .build();
                let from: Mailbox = from.parse().map_err(|e| anyhow::anyhow!("notify.smtp_from: {e}"))?;
                Some((transport, from))
            }
            (Some(_), None) => anyhow::bail!("notify.smtp_from (SIGNALOPS_SMTP_FROM) is required with an SMTP URL"),
            _ => None,
        };
        Ok(Outbound { http, smtp, egress, telegram_base: cfg.telegram_api_base_url.trim_end_matches('/').to_owned() })
    }

    pub fn egress(&self) -> &EgressPolicy {
        &self.egress
    }

    /// One attempt, bounded by the channel's timeout.
    pub async fn send(&self, channel: &Channel, out: &Outgoing<'_>, now_ms: i64) -> Outcome {
        let started = Instant::now();
        let timeout = Duration::from_secs(channel.delivery.timeout_secs);
        let attempt = self.attempt(channel, out, now_ms, started);
        match tokio::time::timeout(timeout, attempt).await {
            Ok(o) => o,
            Err(_) => Outcome::failed(started, format!("no answer within {} s", timeout.as_secs())),
        }
    }

    async fn attempt(&self, channel: &Channel, out: &Outgoing<'_>, now_ms: i64, started: Instant) -> Outcome {
        match &channel.target {
            Target::Webhook { url, headers } => {
                let body = out.payload.to_vec();
                let ts = now_ms.div_euclid(1000);
                let signature = signature_header(channel.live_secrets(now_ms), out.webhook_id, ts, &body);
                let mut extra: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                extra.push(("webhook-id", out.webhook_id.to_owned()));
                extra.push(("webhook-timestamp", ts.to_string()));
                extra.push(("webhook-signature", signature));
                self.post(url, body, &extra, started).await
            }
            Target::Slack { url } => {
                let text = format!("*{}*\n{}", out.message.title, out.message.body);
                let body = json!({ "text": text });
                self.post(url, body.to_string().into_bytes(), &[], started).await
            }
            Target::Telegram { bot_token, chat_id, api_base_url } => {
                let base = api_base_url.as_deref().map(|b| b.trim_end_matches('/')).unwrap_or(&self.telegram_base);
                let url = format!("{base}/bot{bot_token}/sendMessage");
                let body = json!({
                    "chat_id": chat_id,
                    "text": format!("{}\n\n{}", out.message.title, out.message.body),
                    "disable_web_page_preview": true,
                });
                let mut o = self.post(&url, body.to_string().into_bytes(), &[], started).await;
                if let Some(e) = o.error.as_mut() {
                    // The bot token is part of the URL: keep it out of the delivery log.
                    *e = e.replace(bot_token.as_str(), "***");
                }
                o
            }
            Target::Email { to } => self.email(to, out.message, started).await,
            Target::Plugin { allowed_hosts, headers, .. } => match out.request {
                Some(r) => self.plugin_request(r, allowed_hosts, headers, started).await,
                None => Outcome::failed(started, "the notifier rendered no request".into()),
            },
        }
    }

    /// Checks a notifier's request (method, allowed host, headers, size), adds the channel's
    /// secret headers and sends it.
    async fn plugin_request(
        &self,
        r: &PluginRequest,
        allowed: &[String],
        secret_headers: &std::collections::BTreeMap<String, String>,
        started: Instant,
    ) -> Outcome {
        let refuse = |why: String| Outcome::failed(started, format!("the notifier's request was refused: {why}"));
        let method = match r.method.as_str() {
            "POST" => reqwest::Method::POST,
            "PUT" => reqwest::Method::PUT,
            "PATCH" => reqwest::Method::PATCH,
            other => return refuse(format!("method `{other}` (POST, PUT or PATCH)")),
        };
        let url = match reqwest::Url::parse(&r.url) {
            Ok(u) => u,
            Err(e) => return refuse(format!("its URL does not parse: {e}")),
        };
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        if !host_allowed(allowed, host) {
            return refuse(format!("host `{host}` is not in the channel's allowed_hosts"));
        }
        if r.body.len() > MAX_PLUGIN_BODY_BYTES {
            return refuse(format!("the body is {} bytes; the limit is {MAX_PLUGIN_BODY_BYTES}", r.body.len()));
        }
        if r.headers.len() > MAX_PLUGIN_HEADERS {
            return refuse(format!("more than {MAX_PLUGIN_HEADERS} headers"));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &r.headers {
            let name = k.to_ascii_lowercase();
            if PLUGIN_RESERVED_HEADERS.contains(&name.as_str()) {
                return refuse(format!("header `{k}` is set by the node"));
            }
            match (reqwest::header::HeaderName::from_bytes(name.as_bytes()), reqwest::header::HeaderValue::from_str(v))
            {
                (Ok(n), Ok(v)) => {
                    headers.insert(n, v);
                }
                _ => return refuse(format!("header `{k}` is not a valid header")),
            }
        }
        if !secret_headers.is_empty() && url.scheme() != "https" && !self.egress.explicitly_allowed(&url) {
            return refuse("the channel's secret headers go only over https".into());
        }
        for (k, v) in secret_headers {
            if let (Ok(n), Ok(v)) =
                (reqwest::header::HeaderName::from_bytes(k.as_bytes()), reqwest::header::HeaderValue::from_str(v))
            {
                headers.insert(n, v);
            }
        }
        if let Err(e) = self.egress.check_url(&url) {
            return Outcome::failed(started, e);
        }
        let req = self.http.request(method, url).headers(headers).body(r.body.clone());
        self.finish(req, started).await
    }

    async fn post(&self, url: &str, body: Vec<u8>, headers: &[(&str, String)], started: Instant) -> Outcome {
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return Outcome::failed(started, format!("invalid URL: {e}")),
        };
        if let Err(e) = self.egress.check_url(&parsed) {
            return Outcome::failed(started, e);
        }
        let mut req = self.http.post(parsed).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        self.finish(req, started).await
    }

    /// Sends a request and reads the status and an excerpt of the answer.
    async fn finish(&self, req: reqwest::RequestBuilder, started: Instant) -> Outcome {
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::failed(started, describe(&e)),
        };
        let status = resp.status().as_u16();
        let mut excerpt = Vec::new();
        while excerpt.len() < RESPONSE_EXCERPT_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => excerpt.extend_from_slice(&c[..c.len().min(RESPONSE_EXCERPT_BYTES - excerpt.len())]),
                _ => break,
            }
        }
        let response = (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned());
        Outcome { status_code: Some(status), latency: started.elapsed(), response, error: None, gone: status == 410 }
    }

    async fn email(&self, to: &[String], message: &Message, started: Instant) -> Outcome {
        let Some((transport, from)) = &self.smtp else {
            return Outcome::failed(started, "no SMTP server is configured on the node (SIGNALOPS_SMTP_URL)".into());
        };
        let mut builder = lettre::Message::builder().from(from.clone()).subject(message.title.as_str());
        for addr in to {
            match addr.parse::<Mailbox>() {
                Ok(m) => builder = builder.to(m),
                Err(e) => return Outcome::failed(started, format!("recipient `{addr}`: {e}")),
            }
        }
        let email = match builder.header(ContentType::TEXT_PLAIN).body(message.body.clone()) {
            Ok(m) => m,
            Err(e) => return Outcome::failed(started, format!("cannot build the email: {e}")),
        };
        match transport.send(email).await {
            Ok(resp) => Outcome {
                status_code: Some(u16::from(resp.code())),
                latency: started.elapsed(),
                response: Some(resp.message().collect::<Vec<_>>().join(" ")),
                error: None,
                gone: false,
            },
            Err(e) => {
                let code = e.status().map(u16::from);
                Outcome {
                    status_code: code,
                    latency: started.elapsed(),
                    response: None,
                    error: Some(e.to_string()),
                    gone: false,
                }
            }
        }
    }
}

/// A transport error with its causes, on one line.
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_timeout() {
        "timed out".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
