//! The alert channels: email over SMTP (lettre), Slack incoming webhooks and
//! a generic signed JSON webhook (reqwest), and the delivery loop around
//! them: per-attempt timeout, retries with exponential backoff and jitter,
//! `Retry-After`, and a dead-letter record after the last attempt.
//!
//! Deliveries run in their own tokio tasks, one per channel: a caller
//! enqueues and goes on (a rotation never waits for a mail server), and a
//! channel that never answers cannot hold up another.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};

use super::rules::{Channel, Notification};
use crate::config::{AlertsConfig, DeliveryConfig, EmailConfig, EmailTls};
use crate::store::Store;
use crate::store::alerts::NewDelivery;

/// The header carrying the unix time the webhook body was signed at.
pub const TIMESTAMP_HEADER: &str = "X-Keywarden-Timestamp";
/// The header carrying hex(HMAC-SHA256(secret, timestamp + "." + body)).
pub const SIGNATURE_HEADER: &str = "X-Keywarden-Signature";
/// The version of the webhook body's schema.
pub const WEBHOOK_SCHEMA_VERSION: u32 = 1;

/// Why one attempt failed.
#[derive(Debug, Clone)]
pub struct AttemptError {
    pub message: String,
    /// Retrying cannot help (a bad address, a 4xx other than 408/429).
    pub permanent: bool,
    /// The receiver asked to wait this long.
    pub retry_after: Option<Duration>,
}

impl AttemptError {
    fn retry(message: impl Into<String>) -> Self {
        AttemptError {
            message: message.into(),
            permanent: false,
            retry_after: None,
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        AttemptError {
            message: message.into(),
            permanent: true,
            retry_after: None,
        }
    }
}

/// How one message on one channel ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryOutcome {
    pub channel: Channel,
    pub notification_id: String,
    pub delivered: bool,
    pub attempts: u32,
    pub error: Option<String>,
    pub seconds: f64,
}

/// The configured channels and one shared HTTP client.
pub struct Channels {
    http: reqwest::Client,
    config: AlertsConfig,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("configured", &self.configured())
            .finish_non_exhaustive()
    }
}

/// The delay before retry number `retry` (1 = the first retry): the base
/// doubled per retry, capped, then jittered into its upper half; a
/// receiver's `Retry-After` is honoured up to the cap.
pub fn backoff(
    d: &DeliveryConfig,
    retry: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = d
        .backoff_ms
        .saturating_mul(1u64 << retry.saturating_sub(1).min(32));
    let capped = exp.min(d.max_backoff_ms) as f64;
    let jittered = Duration::from_millis((capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0))) as u64);
    match retry_after {
        Some(ra) => ra
            .min(Duration::from_millis(d.max_backoff_ms))
            .max(jittered),
        None => jittered,
    }
}

/// Parses a `Retry-After` header given in seconds (an HTTP date is ignored;
/// the backoff applies then).
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The signature a webhook receiver recomputes: hex HMAC-SHA256 over
/// `timestamp + "." + body`.
pub fn sign_webhook(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    hex::encode(ctx.sign().as_ref())
}

/// The generic webhook's body (README, "Webhook payload").
pub fn webhook_body(n: &Notification) -> Value {
    let mut v = serde_json::to_value(n).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("version".into(), WEBHOOK_SCHEMA_VERSION.into());
        map.insert("source".into(), "keywarden".into());
    }
    v
}

fn figure_line(n: &Notification) -> Option<String> {
    let (value, threshold, cmp, unit) = (n.value?, n.threshold?, n.comparison?, n.unit.as_deref()?);
    Some(format!(
        "{value:.2}{unit} (alert when {} {threshold}{unit})",
        cmp.symbol()
    ))
}

/// The Slack message: `text` as the notification fallback, and blocks.
pub fn slack_body(n: &Notification) -> Value {
    let mut header: String = n.summary.chars().take(150).collect();
    if header.is_empty() {
        header = "keywarden alert".into();
    }
    let mut facts = format!(
        "*Severity:* {}\n*Kind:* {}\n*Since:* {}",
        n.severity.as_str(),
        n.kind.as_str(),
        n.since.to_rfc3339()
    );
    if let Some(line) = figure_line(n) {
        facts.push_str(&format!("\n*Figure:* {line}"));
    }
    json!({
        "text": n.summary,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": header}},
            {"type": "section", "text": {"type": "mrkdwn", "text": facts}},
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("*Runbook:* {}", n.runbook)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!("keywarden · {} · {}", n.rule, n.id)}]}
        ]
    })
}

/// The email subject and plain-text body: what, how bad, since when, the
/// figure against its threshold, and the runbook step.
pub fn email_text(n: &Notification) -> (String, String) {
    let subject = format!("[keywarden] {}", n.summary);
    let mut body = format!(
        "{}\n\nWhat:      {} ({})\nHow bad:   {}\nSince:     {}\n",
        n.summary,
        n.rule,
        n.kind.as_str(),
        n.severity.as_str(),
        n.since.to_rfc3339()
    );
    if let Some(line) = figure_line(n) {
        body.push_str(&format!("Figure:    {line}\n"));
    }
    body.push_str(&format!(
        "Sent at:   {}\nAlert id:  {}\n\nRunbook:\n{}\n",
        n.at.to_rfc3339(),
        n.id,
        n.runbook
    ));
    (subject.chars().take(200).collect(), body)
}

fn env_secret(var: &str, key: &str) -> Result<String, AttemptError> {
    if var.is_empty() {
        return Err(AttemptError::permanent(format!("{key} is not set")));
    }
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(AttemptError::permanent(format!(
            "the environment variable {var} (named by {key}) is not set"
        ))),
    }
}

impl Channels {
    /// The channels from config (each timeout-bounded per attempt).
    pub fn from_config(config: &AlertsConfig) -> anyhow::Result<Channels> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.delivery.timeout_ms))
            .connect_timeout(Duration::from_millis(config.delivery.timeout_ms))
            .user_agent(concat!("keywarden/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Channels {
            http,
            config: config.clone(),
        })
    }

    /// Whether a channel has its settings (email: host and recipients).
    pub fn is_configured(&self, channel: Channel) -> bool {
        match channel {
            Channel::Email => {
                !self.config.email.smtp_host.is_empty() && !self.config.email.to.is_empty()
            }
            Channel::Slack => !self.config.slack.webhook_url.is_empty(),
            Channel::Webhook => !self.config.webhook.url.is_empty(),
        }
    }

    /// The configured channels.
    pub fn configured(&self) -> Vec<Channel> {
        Channel::ALL
            .into_iter()
            .filter(|c| self.is_configured(*c))
            .collect()
    }

    /// Where a notification goes: its channels (empty: all), configured ones only.
    pub fn targets(&self, n: &Notification) -> Vec<Channel> {
        if n.channels.is_empty() {
            self.configured()
        } else {
            n.channels
                .iter()
                .copied()
                .filter(|c| self.is_configured(*c))
                .collect()
        }
    }

    /// One attempt on one channel.
    pub async fn attempt(&self, channel: Channel, n: &Notification) -> Result<(), AttemptError> {
        match channel {
            Channel::Email => self.send_email(n).await,
            Channel::Slack => {
                let body = serde_json::to_vec(&slack_body(n)).unwrap_or_default();
                let req = self
                    .http
                    .post(self.config.slack.webhook_url.expose())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                self.send_http(req).await
            }
            Channel::Webhook => {
                let secret =
                    env_secret(&self.config.webhook.secret_env, "alerts.webhook.secret_env")?;
                let body = serde_json::to_vec(&webhook_body(n)).unwrap_or_default();
                let ts = Utc::now().timestamp();
                let sig = sign_webhook(secret.as_bytes(), ts, &body);
                let req = self
                    .http
                    .post(self.config.webhook.url.expose())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(TIMESTAMP_HEADER, ts.to_string())
                    .header(SIGNATURE_HEADER, sig)
                    .body(body);
                self.send_http(req).await
            }
        }
    }

    async fn send_http(&self, req: reqwest::RequestBuilder) -> Result<(), AttemptError> {
        // The URL may hold a token: errors name the status, never the URL.
        let resp = req
            .send()
            .await
            .map_err(|e| AttemptError::retry(describe_reqwest(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let wait = retry_after(&resp);
        let code = status.as_u16();
        let message = format!("the receiver answered HTTP {code}");
        if code == 429 || code == 503 {
            Err(AttemptError {
                message,
                permanent: false,
                retry_after: wait,
            })
        } else if code == 408 || status.is_server_error() {
            Err(AttemptError::retry(message))
        } else {
            Err(AttemptError::permanent(message))
        }
    }

    async fn send_email(&self, n: &Notification) -> Result<(), AttemptError> {
        use lettre::message::header::ContentType;
        use lettre::transport::smtp::authentication::Credentials;
        use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
        let c: &EmailConfig = &self.config.email;
        let timeout = Duration::from_millis(self.config.delivery.timeout_ms);
        let builder = match c.tls {
            EmailTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.smtp_host),
            EmailTls::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&c.smtp_host)
                    .map_err(|e| AttemptError::permanent(format!("SMTP setup: {e}")))?
            }
            EmailTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&c.smtp_host)
                .map_err(|e| AttemptError::permanent(format!("SMTP setup: {e}")))?,
        };
        let mut builder = builder.port(c.smtp_port).timeout(Some(timeout));
        if !c.username.is_empty() {
            let password = env_secret(&c.password_env, "alerts.email.password_env")?;
            builder = builder.credentials(Credentials::new(c.username.clone(), password));
        }
        let transport = builder.build();
        let (subject, body) = email_text(n);
        let from = if c.from.is_empty() {
            "keywarden <keywarden@localhost>"
        } else {
            &c.from
        };
        let mut msg = Message::builder()
            .from(
                from.parse()
                    .map_err(|e| AttemptError::permanent(format!("alerts.email.from: {e}")))?,
            )
            .subject(subject)
            .header(ContentType::TEXT_PLAIN);
        for to in &c.to {
            msg = msg.to(to
                .parse()
                .map_err(|e| AttemptError::permanent(format!("alerts.email.to {to}: {e}")))?);
        }
        let msg = msg
            .body(body)
            .map_err(|e| AttemptError::permanent(format!("building the email: {e}")))?;
        match transport.send(msg).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(AttemptError::permanent(format!("SMTP: {e}"))),
            Err(e) => Err(AttemptError::retry(format!("SMTP: {e}"))),
        }
    }

    /// Delivers with retries; never fails, returns how it ended.
    pub async fn deliver(&self, channel: Channel, n: &Notification) -> DeliveryOutcome {
        let d = &self.config.delivery;
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(d.timeout_ms);
        let mut last_error = String::new();
        let mut attempts = 0;
        for attempt in 1..=d.attempts.max(1) {
            attempts = attempt;
            let result = match tokio::time::timeout(timeout, self.attempt(channel, n)).await {
                Ok(r) => r,
                Err(_) => Err(AttemptError::retry(format!(
                    "no answer within {} ms",
                    d.timeout_ms
                ))),
            };
            match result {
                Ok(()) => {
                    return DeliveryOutcome {
                        channel,
                        notification_id: n.id.clone(),
                        delivered: true,
                        attempts,
                        error: None,
                        seconds: started.elapsed().as_secs_f64(),
                    };
                }
                Err(e) => {
                    tracing::warn!(
                        alert.channel = channel.as_str(),
                        alert.id = n.id.as_str(),
                        attempt,
                        error = e.message.as_str(),
                        "alert delivery attempt failed"
                    );
                    last_error = e.message;
                    if e.permanent {
                        break;
                    }
                    if attempt < d.attempts {
                        let jitter: f64 = rand::random();
                        tokio::time::sleep(backoff(d, attempt, e.retry_after, jitter)).await;
                    }
                }
            }
        }
        DeliveryOutcome {
            channel,
            notification_id: n.id.clone(),
            delivered: false,
            attempts,
            error: Some(last_error),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    // Without the URL, which may carry a token.
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "[url]");
    }
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        format!("cannot connect: {text}")
    } else {
        format!("request failed: {text}")
    }
}

/// Deliveries waiting in their tasks; `wait` collects them (a long-running
/// worker may simply drop it: the tasks carry on).
pub struct Pending(Vec<tokio::task::JoinHandle<DeliveryOutcome>>);

impl Pending {
    /// Waits for every delivery to end (each is bounded by the retry
    /// settings).
    pub async fn wait(self) -> Vec<DeliveryOutcome> {
        let mut out = Vec::new();
        for h in self.0 {
            if let Ok(o) = h.await {
                out.push(o);
            }
        }
        out
    }

    /// How many deliveries were started.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was started (no configured channel).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sends notifications through the channels and records each outcome.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    channels: Arc<Channels>,
    store: Store,
}

impl Dispatcher {
    /// A dispatcher over the configured channels.
    pub fn new(store: Store, config: &AlertsConfig) -> anyhow::Result<Dispatcher> {
        Ok(Dispatcher {
            channels: Arc::new(Channels::from_config(config)?),
            store,
        })
    }

    /// The channels.
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// Starts one task per target channel and returns at once.
    pub fn enqueue(&self, n: Notification) -> Pending {
        let n = Arc::new(n);
        let mut handles = Vec::new();
        for channel in self.channels.targets(&n) {
            let channels = self.channels.clone();
            let store = self.store.clone();
            let n = n.clone();
            handles.push(tokio::spawn(async move {
                let created_at = Utc::now();
                let outcome = channels.deliver(channel, &n).await;
                let payload = serde_json::to_string(&webhook_body(&n)).unwrap_or_default();
                let record = NewDelivery {
                    notification_id: &n.id,
                    rule: &n.rule,
                    kind: n.kind.as_str(),
                    severity: n.severity.as_str(),
                    channel: channel.as_str(),
                    status: if outcome.delivered {
                        "delivered"
                    } else {
                        "dead_letter"
                    },
                    attempts: i64::from(outcome.attempts),
                    error: outcome.error.as_deref(),
                    payload: &payload,
                    created_at,
                    finished_at: Utc::now(),
                };
                if let Err(e) = store.record_delivery(&record).await {
                    tracing::warn!(error = format!("{e:#}"), "cannot record an alert delivery");
                }
                if !outcome.delivered {
                    tracing::error!(
                        alert.channel = channel.as_str(),
                        alert.id = n.id.as_str(),
                        attempts = outcome.attempts,
                        error = outcome.error.as_deref().unwrap_or(""),
                        "alert delivery gave up; recorded as a dead letter"
                    );
                }
                outcome
            }));
        }
        Pending(handles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(base: u64, max: u64) -> DeliveryConfig {
        DeliveryConfig {
            attempts: 5,
            backoff_ms: base,
            max_backoff_ms: max,
            timeout_ms: 1000,
        }
    }

    #[test]
    fn backoff_doubles_is_capped_and_jitters_in_its_upper_half() {
        let c = d(100, 1000);
        assert_eq!(backoff(&c, 1, None, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(&c, 2, None, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(&c, 3, None, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(&c, 5, None, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(&c, 40, None, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(&c, 2, None, 0.0), Duration::from_millis(100));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let c = d(100, 5000);
        assert_eq!(
            backoff(&c, 1, Some(Duration::from_secs(2)), 1.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff(&c, 1, Some(Duration::from_secs(60)), 1.0),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn the_webhook_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Python: hmac.new(b"s3cret", b"1700000000.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            sign_webhook(b"s3cret", 1_700_000_000, b"{}"),
            "97926816e98fbb41ccb1673225ff29a2f35369099990e1b1561651e7bd097ebf"
        );
        assert_eq!(sign_webhook(b"k", 1, b"x").len(), 64);
        assert_ne!(sign_webhook(b"k", 1, b"x"), sign_webhook(b"k", 2, b"x"));
    }
}
