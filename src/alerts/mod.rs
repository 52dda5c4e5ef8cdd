//! Alerts: the seed's health figures judged by rules, and notifications by
//! email, Slack and webhook.
//!
//! - `rules`: PURE: rule config, seed defaults, the ok/firing state machine,
//!   event-raised alerts.
//! - `channels`: the real clients and the retrying, dead-lettering delivery.
//! - this file: the edge that measures the figures, runs the state machine
//!   over stored state (`check_alerts`, for the worker's `check-alerts` job)
//!   and raises event alerts (`raise_event`).
//!
//! Figures that other parts of the system own plug in through
//! [`FigureHooks`]: the sync engineer's acknowledgement lag and the
//! verification-failure counters kept in Redis, and the worker's
//! `job_runs` for the rotation success rate. Without a hook a figure is
//! measured from what this store has (rotation success) or reports no data
//! (the rule keeps its state; nothing is sent).

pub mod channels;
pub mod rules;

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::future::BoxFuture;

use crate::app::App;
use channels::{DeliveryOutcome, Dispatcher, Pending};
use rules::{Event, Figure, Observation, Rule, RuleState, Status};

/// A figure source: given `now` and the rule's window, the value in the
/// figure's unit, or `None` when there is nothing to judge by.
pub type FigureFn = Arc<
    dyn Fn(DateTime<Utc>, TimeDelta) -> BoxFuture<'static, anyhow::Result<Option<f64>>>
        + Send
        + Sync,
>;

/// Sources for the figures this module cannot measure alone.
#[derive(Clone, Default)]
pub struct FigureHooks {
    /// Percent of token verifications that failed in the window, across all
    /// instances (the sync issue's Redis counters).
    pub verification_failure_rate: Option<FigureFn>,
    /// Seconds the slowest subscriber's acknowledged epoch lags (the sync
    /// issue's `keywarden:acks`).
    pub sync_lag: Option<FigureFn>,
    /// Percent of rotation job runs that succeeded in the window (the
    /// worker's `job_runs`). Without it: see [`rotation_success_rate`].
    pub rotation_success_rate: Option<FigureFn>,
    /// Replaces the signing canary (tests slow the signer with it).
    pub signing_latency: Option<FigureFn>,
}

impl std::fmt::Debug for FigureHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FigureHooks")
            .field(
                "verification_failure_rate",
                &self.verification_failure_rate.is_some(),
            )
            .field("sync_lag", &self.sync_lag.is_some())
            .field(
                "rotation_success_rate",
                &self.rotation_success_rate.is_some(),
            )
            .field("signing_latency", &self.signing_latency.is_some())
            .finish()
    }
}

/// What one rule did in one check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleOutcome {
    pub rule: String,
    pub figure: Figure,
    pub value: Option<f64>,
    pub status: Status,
    pub notifications: Vec<String>,
}

/// What `check_alerts` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub rules: Vec<RuleOutcome>,
    pub deliveries: Vec<DeliveryOutcome>,
}

impl Summary {
    /// How many notifications were sent (before delivery).
    pub fn notified(&self) -> usize {
        self.rules.iter().map(|r| r.notifications.len()).sum()
    }
}

/// The signing canary: sign and verify one short token with the active
/// signing key, milliseconds (includes loading and unwrapping the key).
pub async fn signing_canary_ms(app: &App, now: DateTime<Utc>) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
    let issued = app
        .sign_token(
            serde_json::json!({"sub": "keywarden-canary"}),
            TimeDelta::minutes(1),
            None,
            now,
        )
        .await?;
    let opts = app.verify_options(now, None, None);
    match app.verify_token(&issued.token, &opts).await? {
        Ok(_) => Ok(started.elapsed().as_secs_f64() * 1000.0),
        Err(e) => anyhow::bail!("the signing canary did not verify: {e}"),
    }
}

/// Rotation success rate over `window` from this store: activations in
/// the outbox are successes, `rotation_failed` events are failures. The
/// worker's `job_runs` replaces this through [`FigureHooks`].
pub async fn rotation_success_rate(
    app: &App,
    now: DateTime<Utc>,
    window: TimeDelta,
) -> anyhow::Result<Option<f64>> {
    let since = now - window;
    let ok = app.store.count_outbox_actions("activate", since).await?;
    let failed = app
        .store
        .count_alert_events("rotation_failed", since)
        .await?;
    let total = ok + failed;
    Ok((total > 0).then(|| ok as f64 * 100.0 / total as f64))
}

async fn measure(
    app: &App,
    hooks: &FigureHooks,
    rule: &Rule,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<f64>> {
    let hook = match rule.figure {
        Figure::VerificationFailureRate => &hooks.verification_failure_rate,
        Figure::SyncLag => &hooks.sync_lag,
        Figure::RotationSuccessRate => &hooks.rotation_success_rate,
        Figure::SigningLatency => &hooks.signing_latency,
    };
    if let Some(f) = hook {
        return f(now, rule.window).await;
    }
    match rule.figure {
        Figure::SigningLatency => signing_canary_ms(app, now).await.map(Some),
        Figure::RotationSuccessRate => rotation_success_rate(app, now, rule.window).await,
        Figure::VerificationFailureRate | Figure::SyncLag => Ok(None),
    }
}

/// Evaluates every rule at `now` against stored state, saves the new
/// state, and delivers what the state machine says. Deliveries run in their
/// own tasks; this waits for them (it is its own job, not a rotation).
pub async fn check_alerts(app: &App, now: DateTime<Utc>) -> anyhow::Result<Summary> {
    check_alerts_with(app, &FigureHooks::default(), now).await
}

/// [`check_alerts`] with figure sources plugged in.
pub async fn check_alerts_with(
    app: &App,
    hooks: &FigureHooks,
    now: DateTime<Utc>,
) -> anyhow::Result<Summary> {
    let rules = rules::rules_from_config(&app.config.alerts);
    let dispatcher = Dispatcher::new(app.store.clone(), &app.config.alerts)?;
    let states = app.store.alert_states().await?;
    let mut outcomes = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    for rule in &rules {
        let value = match measure(app, hooks, rule, now).await {
            Ok(v) => v,
            Err(e) => {
                // A figure that cannot be measured is no data, not an
                // alert storm; the log says why.
                tracing::warn!(
                    alert.rule = rule.name.as_str(),
                    error = format!("{e:#}"),
                    "cannot measure the figure"
                );
                None
            }
        };
        let stored = states.get(&rule.name);
        let state = stored.cloned().unwrap_or_default();
        let observation = value.map_or(Observation::NoData, Observation::Value);
        let (next, mut notes) = rules::evaluate(rule, &state, observation, now);
        if next != state
            && !app
                .store
                .save_alert_state(&rule.name, stored, &next, now)
                .await?
        {
            // Another evaluation changed this rule since we read it: it
            // has sent (or will send) what there is to send.
            tracing::info!(
                alert.rule = rule.name.as_str(),
                "rule state changed concurrently; not notifying"
            );
            notes.clear();
        }
        let kinds = notes.iter().map(|n| n.kind.as_str().to_string()).collect();
        for n in notes {
            pending.push(dispatcher.enqueue(n));
        }
        outcomes.push(RuleOutcome {
            rule: rule.name.clone(),
            figure: rule.figure,
            value,
            status: next.status,
            notifications: kinds,
        });
    }
    let mut deliveries = Vec::new();
    for p in pending {
        deliveries.extend(p.wait().await);
    }
    Ok(Summary {
        rules: outcomes,
        deliveries,
    })
}

/// Raises an event alert: records it (it feeds figures and history) and
/// enqueues the notification to every configured channel. Returns at once;
/// a caller in a long-running process may drop the `Pending`.
pub async fn raise_event(app: &App, event: &Event, now: DateTime<Utc>) -> anyhow::Result<Pending> {
    let n = event.notification(Vec::new(), now);
    // The record feeds history and figures; the notification matters more.
    // A store that refuses the record (the very failure some events are
    // about) must not keep the alert from going out.
    if let Err(e) = app
        .store
        .record_alert_event(event.name(), &event.subject(), &n.summary, now)
        .await
    {
        tracing::warn!(
            alert.rule = event.name(),
            "cannot record the {} alert in the store (sending it anyway): {e:#}",
            event.name()
        );
    }
    let dispatcher = Dispatcher::new(app.store.clone(), &app.config.alerts)?;
    Ok(dispatcher.enqueue(n))
}

/// A rule with its stored state, for `alerts list` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleView {
    #[serde(flatten)]
    pub rule: Rule,
    pub unit: &'static str,
    pub status: Status,
    pub since: Option<DateTime<Utc>>,
    pub last_value: Option<f64>,
    pub last_fired: Option<DateTime<Utc>>,
    pub escalated: bool,
}

/// Every effective rule with its stored state.
pub async fn rule_views(app: &App) -> anyhow::Result<Vec<RuleView>> {
    let states = app.store.alert_states().await?;
    Ok(rules::rules_from_config(&app.config.alerts)
        .into_iter()
        .map(|rule| {
            let s: RuleState = states.get(&rule.name).cloned().unwrap_or_default();
            RuleView {
                unit: rule.figure.unit(),
                rule,
                status: s.status,
                since: s.since,
                last_value: s.last_value,
                last_fired: s.last_fired,
                escalated: s.escalated,
            }
        })
        .collect())
}
