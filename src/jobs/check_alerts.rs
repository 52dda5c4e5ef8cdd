//! `kind = "check-alerts"`: evaluates the alert rules and notifies on a
//! state change.

use chrono::{DateTime, Utc};

use chrono::TimeDelta;

use super::JobOutcome;
use crate::alerts::{FigureFn, FigureHooks};
use crate::app::App;

/// Evaluates the alert rules at `now` with every figure from real data:
/// the verification failure rate from the per-minute counters in Redis, the
/// sync lag from the instances' acknowledgements, the rotation success rate
/// from `job_runs`, and the signing canary. A rule that changes state sends
/// its notification in the background; delivery never blocks this job.
pub async fn run(app: &App, now: DateTime<Utc>, dry_run: bool) -> JobOutcome {
    let mut out = JobOutcome::default();
    if dry_run {
        out.actions
            .push(serde_json::json!({"action": "would_check_alerts"}));
        return out;
    }
    let hooks = match figure_hooks(app, now).await {
        Ok(h) => h,
        Err(e) => {
            out.fail("measure figures", &e);
            return out;
        }
    };
    match crate::alerts::check_alerts_with(app, &hooks, now).await {
        Ok(summary) => {
            for r in &summary.rules {
                out.actions
                    .push(serde_json::to_value(r).unwrap_or_default());
            }
        }
        Err(e) => out.fail("check alerts", &e),
    }
    out
}

/// Measures the figures owned by the sync engine and the worker once, up
/// front, and hands them to the rule evaluation as constants.
async fn figure_hooks(app: &App, now: DateTime<Utc>) -> anyhow::Result<FigureHooks> {
    use crate::alerts::rules::{Figure, rules_from_config};
    let rules = rules_from_config(&app.config.alerts);
    let window_of = |f: Figure| {
        rules
            .iter()
            .find(|r| r.figure == f)
            .map(|r| r.window)
            .unwrap_or(TimeDelta::minutes(5))
    };
    let failure_window = window_of(Figure::VerificationFailureRate);
    let rotation_window = window_of(Figure::RotationSuccessRate);
    // A figure whose source is down is "no data", not a failed job.
    let failure_rate =
        match crate::sync::verification_counts(app, now, failure_window.num_minutes().max(1)).await
        {
            Ok(Some(c)) if c.ok + c.fail > 0 => {
                Some(100.0 * c.fail as f64 / (c.ok + c.fail) as f64)
            }
            _ => None,
        };
    let lag = match crate::sync::sync_lag(app).await {
        Ok(l) if l.configured && l.reachable => l.max_lag_ms.map(|ms| ms as f64 / 1000.0),
        _ => None,
    };
    let (ok, failed) = app.store.rotation_run_counts(now - rotation_window).await?;
    let rotation = (ok + failed > 0).then(|| 100.0 * ok as f64 / (ok + failed) as f64);
    Ok(FigureHooks {
        verification_failure_rate: Some(constant(failure_rate)),
        sync_lag: Some(constant(lag)),
        rotation_success_rate: Some(constant(rotation)),
        signing_latency: None,
    })
}

fn constant(v: Option<f64>) -> FigureFn {
    std::sync::Arc::new(move |_, _| Box::pin(async move { Ok(v) }))
}
