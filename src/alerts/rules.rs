//! PURE: alert rules, their state machine and the notifications it emits.
//!
//! A rule watches one figure against a threshold. `evaluate(rule, state,
//! observation, now)` is the whole policy: it fires on ok -> firing, sends
//! a resolve on firing -> ok, and otherwise stays quiet except for a
//! reminder once the cooldown has passed and one escalation once the rule
//! has been firing for the escalation delay. No IO and no clock: `now` is an
//! argument, the state is a value the caller stores.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{AlertRuleConfig, AlertsConfig};

/// A health figure a rule can watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// Failed token verifications / all verifications, percent, over the window.
    VerificationFailureRate,
    /// Sign + verify with the active signing key, milliseconds.
    SigningLatency,
    /// How far the slowest subscriber's acknowledged epoch lags, seconds.
    SyncLag,
    /// Successful rotations / all rotation attempts, percent, over the window.
    RotationSuccessRate,
}

impl Figure {
    /// Every figure, in the seed's order.
    pub const ALL: [Figure; 4] = [
        Figure::VerificationFailureRate,
        Figure::SigningLatency,
        Figure::SyncLag,
        Figure::RotationSuccessRate,
    ];

    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Figure::VerificationFailureRate => "verification_failure_rate",
            Figure::SigningLatency => "signing_latency",
            Figure::SyncLag => "sync_lag",
            Figure::RotationSuccessRate => "rotation_success_rate",
        }
    }

    /// The unit its values and thresholds are written in.
    pub const fn unit(self) -> &'static str {
        match self {
            Figure::VerificationFailureRate | Figure::RotationSuccessRate => "%",
            Figure::SigningLatency => "ms",
            Figure::SyncLag => "s",
        }
    }

    /// A human name.
    pub const fn title(self) -> &'static str {
        match self {
            Figure::VerificationFailureRate => "token verification failure rate",
            Figure::SigningLatency => "JWT signing latency",
            Figure::SyncLag => "Redis sync lag",
            Figure::RotationSuccessRate => "key rotation success rate",
        }
    }

    /// The seed's runbook step ("处理建议" in "监控告警配置"), in English.
    pub const fn runbook(self) -> &'static str {
        match self {
            Figure::VerificationFailureRate => {
                "Check the key configuration: do the failing instances hold the current keyring \
                 (keywarden status, keys list), and are tokens signed by a kid that is active or \
                 retiring? A sudden rise may also mean forged tokens: see the emergency flow."
            }
            Figure::SigningLatency => {
                "Optimise the algorithm's performance: check the host's CPU load, the key \
                 algorithm (RS256 signs far slower than ES256/EdDSA/HS256) and the store's latency."
            }
            Figure::SyncLag => {
                "Check the network connection between the instances and Redis, and that every \
                 subscriber is running and acknowledging the epoch."
            }
            Figure::RotationSuccessRate => {
                "Check the automation: the rotate-* jobs' recent runs (job history), their \
                 errors in the worker log, and the store's health."
            }
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Figure> {
        Figure::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// Which side of the threshold is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Bad when the value is strictly above the threshold.
    Above,
    /// Bad when the value is strictly below the threshold.
    Below,
}

impl Comparison {
    /// Whether `value` is on the bad side of `threshold` (equal is fine).
    pub fn breached(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::Below => value < threshold,
        }
    }

    /// `>` or `<`.
    pub const fn symbol(self) -> &'static str {
        match self {
            Comparison::Above => ">",
            Comparison::Below => "<",
        }
    }
}

/// How bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// An alert channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Slack,
    Webhook,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Slack, Channel::Webhook];

    /// The config and CLI spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Slack => "slack",
            Channel::Webhook => "webhook",
        }
    }

    /// Parses the config and CLI spelling.
    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A rule, parsed from config over the seed defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub name: String,
    pub figure: Figure,
    pub comparison: Comparison,
    pub threshold: f64,
    /// How far back the figure looks.
    #[serde(serialize_with = "ser_delta")]
    pub window: TimeDelta,
    pub severity: Severity,
    /// Empty: every configured channel.
    pub channels: Vec<Channel>,
    /// Reminder interval while firing; zero: never.
    #[serde(serialize_with = "ser_delta")]
    pub cooldown: TimeDelta,
    /// Escalate once after firing this long; `None`: never.
    #[serde(serialize_with = "ser_opt_delta")]
    pub escalate_after: Option<TimeDelta>,
    pub escalate_channels: Vec<Channel>,
}

fn ser_delta<S: serde::Serializer>(d: &TimeDelta, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        &crate::duration::Duration::from_secs(d.num_seconds().max(0) as u64).to_string(),
    )
}

fn ser_opt_delta<S: serde::Serializer>(d: &Option<TimeDelta>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_delta(d, s),
        None => s.serialize_none(),
    }
}

/// The seed's four rules ("监控告警配置"), before any config override.
pub fn seed_rules() -> Vec<Rule> {
    let base = |name: Figure, comparison, threshold, window, severity| Rule {
        name: name.as_str().to_string(),
        figure: name,
        comparison,
        threshold,
        window,
        severity,
        channels: Vec::new(),
        cooldown: TimeDelta::hours(4),
        escalate_after: None,
        escalate_channels: Vec::new(),
    };
    vec![
        base(
            Figure::VerificationFailureRate,
            Comparison::Above,
            1.0,
            TimeDelta::minutes(5),
            Severity::Warning,
        ),
        base(
            Figure::SigningLatency,
            Comparison::Above,
            100.0,
            TimeDelta::minutes(5),
            Severity::Critical,
        ),
        base(
            Figure::SyncLag,
            Comparison::Above,
            5.0,
            TimeDelta::minutes(5),
            Severity::Warning,
        ),
        base(
            Figure::RotationSuccessRate,
            Comparison::Below,
            95.0,
            TimeDelta::days(30),
            Severity::Critical,
        ),
    ]
}

fn channels_of(names: &[String]) -> Vec<Channel> {
    // The config schema has checked every name.
    names.iter().filter_map(|n| Channel::parse(n)).collect()
}

fn apply(rule: &mut Rule, c: &AlertRuleConfig) {
    if let Some(f) = c.figure.as_deref().and_then(Figure::parse) {
        rule.figure = f;
    }
    match c.comparison.as_deref() {
        Some("above") => rule.comparison = Comparison::Above,
        Some("below") => rule.comparison = Comparison::Below,
        _ => {}
    }
    if let Some(t) = c.threshold {
        rule.threshold = t.0;
    }
    if let Some(w) = c.window {
        rule.window = w.to_chrono();
    }
    if let Some(s) = c.severity.as_deref().and_then(Severity::parse) {
        rule.severity = s;
    }
    if let Some(ch) = &c.channels {
        rule.channels = channels_of(ch);
    }
    if let Some(d) = c.cooldown {
        rule.cooldown = d.to_chrono();
    }
    if let Some(d) = c.escalate_after {
        rule.escalate_after = (!d.is_zero()).then(|| d.to_chrono());
    }
    if let Some(ch) = &c.escalate_channels {
        rule.escalate_channels = channels_of(ch);
    }
}

/// The effective rules: the seed rules with config overrides applied, then
/// the config's extra rules. A new rule's comparison defaults to the
/// figure's natural bad side (below for success rates, above otherwise).
pub fn rules_from_config(config: &AlertsConfig) -> Vec<Rule> {
    let mut rules = seed_rules();
    for c in &config.rules {
        if let Some(rule) = rules.iter_mut().find(|r| r.name == c.name) {
            apply(rule, c);
        } else {
            let figure = c
                .figure
                .as_deref()
                .and_then(Figure::parse)
                .unwrap_or(Figure::SigningLatency);
            let mut rule = seed_rules()
                .into_iter()
                .find(|r| r.figure == figure)
                .expect("every figure has a seed rule");
            rule.name = c.name.clone();
            apply(&mut rule, c);
            rules.push(rule);
        }
    }
    rules
}

/// Whether a rule is quiet or firing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Ok,
    Firing,
}

impl Status {
    /// The stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Firing => "firing",
        }
    }

    /// Parses the stored spelling (anything else reads as ok).
    pub fn parse(s: &str) -> Status {
        if s == "firing" {
            Status::Firing
        } else {
            Status::Ok
        }
    }
}

/// A rule's state between evaluations; stored, so a restarted worker
/// carries on instead of re-sending.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RuleState {
    pub status: Status,
    /// When the current firing began.
    pub since: Option<DateTime<Utc>>,
    /// When the primary channels were last told (fire or reminder).
    pub last_notified: Option<DateTime<Utc>>,
    /// Whether the current firing has been escalated.
    pub escalated: bool,
    /// The last value observed.
    pub last_value: Option<f64>,
    /// When the rule last went from ok to firing.
    pub last_fired: Option<DateTime<Utc>>,
}

/// What a figure measured this time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    Value(f64),
    /// Nothing to judge by (no traffic, no subscribers, no source wired):
    /// the state is kept as it is.
    NoData,
}

/// Why a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// ok -> firing.
    Firing,
    /// Still firing after the cooldown.
    Reminder,
    /// Still firing after the escalation delay.
    Escalation,
    /// firing -> ok.
    Resolved,
    /// Raised by an event (failed rotation, revoked key, ...).
    Event,
    /// `alerts test`.
    Test,
}

impl Kind {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Firing => "firing",
            Kind::Reminder => "reminder",
            Kind::Escalation => "escalation",
            Kind::Resolved => "resolved",
            Kind::Event => "event",
            Kind::Test => "test",
        }
    }
}

/// One message for the channels. It is also the generic webhook's body
/// (README, "Webhook payload"): keep field names stable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    /// Unique per notification; receivers can de-duplicate retries by it.
    pub id: String,
    pub kind: Kind,
    /// The rule or event name.
    pub rule: String,
    pub severity: Severity,
    /// One line: what and how bad.
    pub summary: String,
    pub figure: Option<Figure>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub comparison: Option<Comparison>,
    pub unit: Option<String>,
    /// When the condition began.
    pub since: DateTime<Utc>,
    /// When this notification was made.
    pub at: DateTime<Utc>,
    pub runbook: String,
    /// Where it goes; empty: every configured channel. Not on the wire.
    #[serde(skip)]
    pub channels: Vec<Channel>,
}

fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn notify(
    rule: &Rule,
    kind: Kind,
    value: Option<f64>,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    channels: Vec<Channel>,
) -> Notification {
    let unit = rule.figure.unit();
    let shown = value.map_or_else(
        || "no data".to_string(),
        |v| format!("{}{unit}", fmt_value(v)),
    );
    let limit = format!(
        "{} {}{unit}",
        rule.comparison.symbol(),
        fmt_value(rule.threshold)
    );
    let summary = match kind {
        Kind::Resolved => format!(
            "RESOLVED {}: {} is {shown}, back within {limit} is bad",
            rule.name,
            rule.figure.title()
        ),
        _ => format!(
            "{} {}: {} is {shown} (alert when {limit})",
            rule.severity.as_str().to_uppercase(),
            rule.name,
            rule.figure.title()
        ),
    };
    Notification {
        id: uuid::Uuid::new_v4().to_string(),
        kind,
        rule: rule.name.clone(),
        severity: rule.severity,
        summary,
        figure: Some(rule.figure),
        value,
        threshold: Some(rule.threshold),
        comparison: Some(rule.comparison),
        unit: Some(unit.to_string()),
        since,
        at: now,
        runbook: rule.figure.runbook().to_string(),
        channels,
    }
}

fn union(a: &[Channel], b: &[Channel]) -> Vec<Channel> {
    let mut v: Vec<Channel> = a.iter().chain(b).copied().collect();
    v.sort();
    v.dedup();
    v
}

/// The state machine. Returns the next state and what to send.
pub fn evaluate(
    rule: &Rule,
    state: &RuleState,
    observation: Observation,
    now: DateTime<Utc>,
) -> (RuleState, Vec<Notification>) {
    let Observation::Value(value) = observation else {
        return (state.clone(), Vec::new());
    };
    let mut next = state.clone();
    next.last_value = Some(value);
    let mut out = Vec::new();
    let breached = rule.comparison.breached(value, rule.threshold);
    match (state.status, breached) {
        (Status::Ok, false) => {}
        (Status::Ok, true) => {
            next.status = Status::Firing;
            next.since = Some(now);
            next.last_notified = Some(now);
            next.last_fired = Some(now);
            next.escalated = false;
            out.push(notify(
                rule,
                Kind::Firing,
                Some(value),
                now,
                now,
                rule.channels.clone(),
            ));
        }
        (Status::Firing, false) => {
            let since = state.since.unwrap_or(now);
            let channels = if state.escalated {
                union(&rule.channels, &rule.escalate_channels)
            } else {
                rule.channels.clone()
            };
            out.push(notify(
                rule,
                Kind::Resolved,
                Some(value),
                since,
                now,
                channels,
            ));
            next.status = Status::Ok;
            next.since = None;
            next.last_notified = Some(now);
            next.escalated = false;
        }
        (Status::Firing, true) => {
            let since = state.since.unwrap_or(now);
            if let Some(after) = rule.escalate_after
                && !state.escalated
                && now - since >= after
            {
                next.escalated = true;
                out.push(notify(
                    rule,
                    Kind::Escalation,
                    Some(value),
                    since,
                    now,
                    rule.escalate_channels.clone(),
                ));
            }
            let last = state.last_notified.unwrap_or(since);
            if rule.cooldown > TimeDelta::zero() && now - last >= rule.cooldown {
                next.last_notified = Some(now);
                let channels = if next.escalated {
                    union(&rule.channels, &rule.escalate_channels)
                } else {
                    rule.channels.clone()
                };
                out.push(notify(
                    rule,
                    Kind::Reminder,
                    Some(value),
                    since,
                    now,
                    channels,
                ));
            }
        }
    }
    (next, out)
}

/// Something that happened and is worth an alert at once, with no figure
/// behind it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    RotationFailed {
        purpose: String,
        error: String,
    },
    KeyRevoked {
        kid: String,
        reason: String,
    },
    RowQuarantined {
        target: String,
        row: String,
        error: String,
    },
    AuditWriteFailed {
        error: String,
    },
    AuditChainBroken {
        first_bad_row: i64,
        reason: String,
    },
}

impl Event {
    /// The event's name: the `rule` field of its notification.
    pub const fn name(&self) -> &'static str {
        match self {
            Event::RotationFailed { .. } => "rotation_failed",
            Event::KeyRevoked { .. } => "key_revoked",
            Event::RowQuarantined { .. } => "row_quarantined",
            Event::AuditWriteFailed { .. } => "audit_write_failed",
            Event::AuditChainBroken { .. } => "audit_chain_broken",
        }
    }

    /// How bad.
    pub const fn severity(&self) -> Severity {
        match self {
            Event::RowQuarantined { .. } => Severity::Warning,
            _ => Severity::Critical,
        }
    }

    /// A subject for the event's own record (what it is about).
    pub fn subject(&self) -> String {
        match self {
            Event::RotationFailed { purpose, .. } => purpose.clone(),
            Event::KeyRevoked { kid, .. } => kid.clone(),
            Event::RowQuarantined { target, row, .. } => format!("{target}/{row}"),
            Event::AuditWriteFailed { .. } => "audit_log".into(),
            Event::AuditChainBroken { first_bad_row, .. } => first_bad_row.to_string(),
        }
    }

    fn summary(&self) -> String {
        match self {
            Event::RotationFailed { purpose, error } => {
                format!("rotation of the {purpose} key failed: {error}")
            }
            Event::KeyRevoked { kid, reason } => format!("key {kid} was revoked: {reason}"),
            Event::RowQuarantined { target, row, error } => {
                format!("{target}: quarantined row(s) {row}: {error}")
            }
            Event::AuditWriteFailed { error } => {
                format!(
                    "an audit row could not be written (the key operation did not happen): {error}"
                )
            }
            Event::AuditChainBroken {
                first_bad_row,
                reason,
            } => format!("the audit chain is broken at row {first_bad_row}: {reason}"),
        }
    }

    fn runbook(&self) -> &'static str {
        match self {
            Event::RotationFailed { .. } => Figure::RotationSuccessRate.runbook(),
            Event::KeyRevoked { .. } => {
                "Emergency response: 1. isolate the affected service instances; 2. make sure the \
                 leaked key is revoked; 3. rotate at once (keywarden revoke does steps 2-3 and \
                 re-encrypts); 4. scan for other leak points; 5. tell affected users to \
                 re-authenticate; 6. find the root cause; 7. strengthen the controls."
            }
            Event::RowQuarantined { .. } => {
                "A stored row did not decrypt under any key: check which key it names \
                 (keys census), restore the row from a backup or re-import the secret."
            }
            Event::AuditWriteFailed { .. } => {
                "Check the store: disk space, permissions, connectivity. Key operations stay \
                 blocked until audit rows can be written."
            }
            Event::AuditChainBroken { .. } => {
                "Treat as tampering: keep the database as evidence, compare with the last signed \
                 checkpoint, and follow the emergency response (isolate, revoke, rotate)."
            }
        }
    }

    /// The notification for this event, to `channels` (empty: all).
    pub fn notification(&self, channels: Vec<Channel>, now: DateTime<Utc>) -> Notification {
        let severity = self.severity();
        Notification {
            id: uuid::Uuid::new_v4().to_string(),
            kind: Kind::Event,
            rule: self.name().to_string(),
            severity,
            summary: format!(
                "{} {}: {}",
                severity.as_str().to_uppercase(),
                self.name(),
                self.summary()
            ),
            figure: None,
            value: None,
            threshold: None,
            comparison: None,
            unit: None,
            since: now,
            at: now,
            runbook: self.runbook().to_string(),
            channels,
        }
    }
}

/// The message `alerts test CHANNEL` sends.
pub fn test_notification(channel: Channel, now: DateTime<Utc>) -> Notification {
    Notification {
        id: uuid::Uuid::new_v4().to_string(),
        kind: Kind::Test,
        rule: "test".into(),
        severity: Severity::Info,
        summary: format!(
            "TEST keywarden alert through {}: if you read this, the channel works",
            channel.as_str()
        ),
        figure: None,
        value: None,
        threshold: None,
        comparison: None,
        unit: None,
        since: now,
        at: now,
        runbook: "Nothing to do: this is a test sent by `keywarden alerts test`.".into(),
        channels: vec![channel],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn rule(figure: Figure) -> Rule {
        seed_rules()
            .into_iter()
            .find(|r| r.figure == figure)
            .unwrap()
    }

    fn run(rule: &Rule, state: &RuleState, v: f64, at: i64) -> (RuleState, Vec<Kind>) {
        let (s, n) = evaluate(rule, state, Observation::Value(v), t(at));
        (s, n.iter().map(|n| n.kind).collect())
    }

    #[test]
    fn the_seed_rules_are_the_seed_table() {
        let r = seed_rules();
        let get = |f| r.iter().find(|r| r.figure == f).unwrap();
        let v = get(Figure::VerificationFailureRate);
        assert_eq!(
            (v.comparison, v.threshold, v.severity, v.window),
            (
                Comparison::Above,
                1.0,
                Severity::Warning,
                TimeDelta::minutes(5)
            )
        );
        let l = get(Figure::SigningLatency);
        assert_eq!(
            (l.comparison, l.threshold, l.severity),
            (Comparison::Above, 100.0, Severity::Critical)
        );
        let s = get(Figure::SyncLag);
        assert_eq!(
            (s.comparison, s.threshold, s.severity),
            (Comparison::Above, 5.0, Severity::Warning)
        );
        let k = get(Figure::RotationSuccessRate);
        assert_eq!(
            (k.comparison, k.threshold, k.severity, k.window),
            (
                Comparison::Below,
                95.0,
                Severity::Critical,
                TimeDelta::days(30)
            )
        );
    }

    #[test]
    fn each_seed_rule_driven_over_its_threshold_fires_once_then_resolves() {
        // (rule, a bad value, a good value)
        let cases = [
            (Figure::VerificationFailureRate, 1.5, 0.2),
            (Figure::SigningLatency, 250.0, 3.0),
            (Figure::SyncLag, 12.0, 0.5),
            (Figure::RotationSuccessRate, 80.0, 100.0),
        ];
        for (figure, bad, good) in cases {
            let r = rule(figure);
            let mut state = RuleState::default();
            let mut sent = Vec::new();
            // Good, then bad every minute for an hour, then good twice.
            let mut at = 0;
            for v in std::iter::once(good)
                .chain(std::iter::repeat_n(bad, 60))
                .chain([good, good])
            {
                let (s, kinds) = run(&r, &state, v, at);
                state = s;
                sent.extend(kinds);
                at += 60;
            }
            assert_eq!(sent, vec![Kind::Firing, Kind::Resolved], "{figure:?}");
            assert_eq!(state.status, Status::Ok);
            assert_eq!(state.last_fired, Some(t(60)));
        }
    }

    #[test]
    fn the_threshold_itself_is_not_a_breach() {
        let r = rule(Figure::SigningLatency);
        let (s, k) = run(&r, &RuleState::default(), 100.0, 0);
        assert_eq!((s.status, k), (Status::Ok, vec![]));
        let (s, k) = run(&r, &RuleState::default(), 100.001, 0);
        assert_eq!((s.status, k), (Status::Firing, vec![Kind::Firing]));
        let r = rule(Figure::RotationSuccessRate);
        let (s, _) = run(&r, &RuleState::default(), 95.0, 0);
        assert_eq!(s.status, Status::Ok);
        let (s, _) = run(&r, &RuleState::default(), 94.99, 0);
        assert_eq!(s.status, Status::Firing);
    }

    #[test]
    fn no_data_keeps_the_state_and_sends_nothing() {
        let r = rule(Figure::SyncLag);
        let (firing, _) = run(&r, &RuleState::default(), 10.0, 0);
        let (s, n) = evaluate(&r, &firing, Observation::NoData, t(60));
        assert_eq!(s, firing);
        assert!(n.is_empty());
    }

    #[test]
    fn a_reminder_comes_exactly_when_the_cooldown_has_passed() {
        let mut r = rule(Figure::SyncLag);
        r.cooldown = TimeDelta::minutes(30);
        let (s, _) = run(&r, &RuleState::default(), 10.0, 0);
        let (s, k) = run(&r, &s, 10.0, 30 * 60 - 1);
        assert!(k.is_empty());
        let (s, k) = run(&r, &s, 10.0, 30 * 60);
        assert_eq!(k, vec![Kind::Reminder]);
        assert_eq!(s.last_notified, Some(t(30 * 60)));
        let (_, k) = run(&r, &s, 10.0, 60 * 60 - 1);
        assert!(k.is_empty());
        // A zero cooldown never reminds.
        r.cooldown = TimeDelta::zero();
        let (s, _) = run(&r, &RuleState::default(), 10.0, 0);
        let (_, k) = run(&r, &s, 10.0, 86_400 * 10);
        assert!(k.is_empty());
    }

    #[test]
    fn escalation_happens_once_after_the_delay_to_the_escalation_channels() {
        let mut r = rule(Figure::SigningLatency);
        r.cooldown = TimeDelta::zero();
        r.channels = vec![Channel::Slack];
        r.escalate_after = Some(TimeDelta::minutes(15));
        r.escalate_channels = vec![Channel::Email, Channel::Webhook];
        let (s, _) = run(&r, &RuleState::default(), 500.0, 0);
        let (s, k) = run(&r, &s, 500.0, 15 * 60 - 1);
        assert!(k.is_empty());
        let (s, n) = evaluate(&r, &s, Observation::Value(500.0), t(15 * 60));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].kind, Kind::Escalation);
        assert_eq!(n[0].channels, vec![Channel::Email, Channel::Webhook]);
        assert!(s.escalated);
        let (s, k) = run(&r, &s, 500.0, 3600);
        assert!(k.is_empty());
        // The resolve reaches everyone who was told.
        let (s, n) = evaluate(&r, &s, Observation::Value(1.0), t(3700));
        assert_eq!(n[0].kind, Kind::Resolved);
        assert_eq!(
            n[0].channels,
            vec![Channel::Email, Channel::Slack, Channel::Webhook]
        );
        assert!(!s.escalated);
        // A new firing may escalate again.
        let (s, _) = run(&r, &s, 500.0, 4000);
        let (_, k) = run(&r, &s, 500.0, 4000 + 15 * 60);
        assert_eq!(k, vec![Kind::Escalation]);
    }

    #[test]
    fn a_restored_state_does_not_fire_again() {
        let r = rule(Figure::VerificationFailureRate);
        let (s, _) = run(&r, &RuleState::default(), 5.0, 0);
        // What the store gives back after a restart is the same value.
        let restored = s.clone();
        let (_, k) = run(&r, &restored, 5.0, 60);
        assert!(k.is_empty());
    }

    #[test]
    fn the_firing_message_says_what_how_bad_and_the_threshold() {
        let r = rule(Figure::SigningLatency);
        let (_, n) = evaluate(&r, &RuleState::default(), Observation::Value(123.4), t(0));
        assert_eq!(
            n[0].summary,
            "CRITICAL signing_latency: JWT signing latency is 123.40ms (alert when > 100ms)"
        );
        assert!(n[0].runbook.contains("Optimise"));
    }

    #[test]
    fn config_overrides_seed_rules_and_adds_new_ones() {
        let config = crate::config::Config::from_sources(
            Some((
                std::path::Path::new("k.toml"),
                "[[alerts.rules]]\nname = \"sync_lag\"\nthreshold = 2\nchannels = [\"slack\"]\n\
                 escalate_after = \"10m\"\nescalate_channels = [\"email\"]\n\
                 [[alerts.rules]]\nname = \"slow_rotations\"\nfigure = \"rotation_success_rate\"\nthreshold = 99\n",
            )),
            &[],
        )
        .unwrap();
        let rules = rules_from_config(&config.alerts);
        assert_eq!(rules.len(), 5);
        let lag = rules.iter().find(|r| r.name == "sync_lag").unwrap();
        assert_eq!(lag.threshold, 2.0);
        assert_eq!(lag.severity, Severity::Warning);
        assert_eq!(lag.channels, vec![Channel::Slack]);
        assert_eq!(lag.escalate_after, Some(TimeDelta::minutes(10)));
        let extra = rules.iter().find(|r| r.name == "slow_rotations").unwrap();
        assert_eq!(extra.comparison, Comparison::Below);
        assert_eq!(extra.window, TimeDelta::days(30));
        assert_eq!(extra.threshold, 99.0);
    }

    #[test]
    fn events_are_critical_except_a_quarantined_row() {
        let e = Event::KeyRevoked {
            kid: "k1".into(),
            reason: "leak".into(),
        };
        let n = e.notification(vec![], t(0));
        assert_eq!((n.kind, n.severity), (Kind::Event, Severity::Critical));
        assert!(n.summary.contains("key k1 was revoked: leak"));
        assert!(n.runbook.contains("isolate"));
        let q = Event::RowQuarantined {
            target: "secrets".into(),
            row: "7".into(),
            error: "no key".into(),
        };
        assert_eq!(q.severity(), Severity::Warning);
        assert!(
            q.notification(vec![], t(0))
                .summary
                .contains("secrets: quarantined row(s) 7: no key")
        );
    }
}
