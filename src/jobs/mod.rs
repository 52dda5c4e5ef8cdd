//! What each job does: one module per job kind, behind [`run_job`].
//!
//! A job decides nothing about *when* it runs (that is `jobs/*.toml` and the
//! scheduler) nor about claiming its tick (that is `scheduler::runner`): it
//! is handed the app, its definition, the tick it runs for and `now`, does
//! its work through `App`, and says what it did as a list of JSON actions.
//! Every job honours `dry_run` by reporting what it would do and changing
//! nothing.
//!
//! The pairing is `jobs/<name>.toml` (kind = "...") <-> `src/jobs/<kind>.rs`:
//! `rotate` -> `rotate.rs`, `expire-keys` -> `expire_keys.rs`,
//! `reencrypt-secrets` -> `reencrypt_secrets.rs`, `check-alerts` ->
//! `check_alerts.rs`, `audit-checkpoint` -> `audit_checkpoint.rs`.

pub mod audit_checkpoint;
pub mod check_alerts;
pub mod expire_keys;
pub mod reencrypt_secrets;
pub mod rotate;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::alerts::rules::Event as AlertEvent;
use crate::app::App;
use crate::audit::AuditUnwritable;
use crate::audit::checkpoint::ChainBroken;
use crate::scheduler::defs::{JobDef, JobKind};
use crate::store::job_runs::RunStatus;

/// Test-only: every non-dry run sleeps this many milliseconds before its
/// work, so tests can kill a worker mid-job. Never set it in production.
pub const TEST_DELAY_ENV: &str = "KEYWARDEN_TEST_JOB_DELAY_MS";

/// What a job run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobOutcome {
    /// One JSON object per thing done (or, in a dry run, that would be done),
    /// each with an `action` field.
    pub actions: Vec<Value>,
    /// Set when the run failed; the actions still list what succeeded.
    pub error: Option<String>,
    /// Event alerts the runner raises after the run (an audit row that
    /// could not be written, a broken audit chain).
    pub alerts: Vec<AlertEvent>,
}

impl JobOutcome {
    /// An outcome with these actions and no error.
    pub fn ok(actions: Vec<Value>) -> JobOutcome {
        JobOutcome {
            actions,
            ..JobOutcome::default()
        }
    }

    /// Records a failed step: an action naming it and the run's error.
    pub fn fail(&mut self, step: &str, err: &anyhow::Error) {
        let msg = format!("{step}: {err:#}");
        let alert = if let Some(broken) = err.downcast_ref::<ChainBroken>() {
            Some(AlertEvent::AuditChainBroken {
                first_bad_row: broken.first_bad_row,
                reason: broken.reason.clone(),
            })
        } else if err.downcast_ref::<AuditUnwritable>().is_some() {
            Some(AlertEvent::AuditWriteFailed { error: msg.clone() })
        } else {
            None
        };
        if let Some(a) = alert
            && !self.alerts.iter().any(|x| x.name() == a.name())
        {
            self.alerts.push(a);
        }
        self.actions
            .push(json!({"action": "failed", "step": step, "error": format!("{err:#}")}));
        self.error = Some(match self.error.take() {
            Some(prev) => format!("{prev}; {msg}"),
            None => msg,
        });
    }

    /// `ok` or `failed`.
    pub fn status(&self) -> RunStatus {
        if self.error.is_some() {
            RunStatus::Failed
        } else {
            RunStatus::Ok
        }
    }
}

/// An action for a step whose engine has not landed yet: recorded so the run
/// history says so, without failing the job.
pub fn not_available(what: &str) -> Value {
    json!({"action": "not_available", "what": what})
}

/// Runs one job for the tick `scheduled_at`, judging what is due at `now`.
///
/// Never returns an error: a failure is in [`JobOutcome::error`], so the
/// caller records it in `job_runs` and the next tick retries.
pub async fn run_job(
    app: &App,
    def: &JobDef,
    scheduled_at: DateTime<Utc>,
    now: DateTime<Utc>,
    dry_run: bool,
) -> JobOutcome {
    if !dry_run && let Some(ms) = test_delay() {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    tracing::debug!(
        job.name = def.name.as_str(),
        job.kind = def.kind.name(),
        %scheduled_at,
        dry_run,
        "running job {}",
        def.name
    );
    match &def.kind {
        JobKind::Rotate { purposes } => rotate::run(app, purposes, now, dry_run).await,
        JobKind::ExpireKeys => expire_keys::run(app, now, dry_run).await,
        JobKind::ReencryptSecrets { target, batch_size } => {
            reencrypt_secrets::run(app, target.as_deref(), *batch_size, now, dry_run).await
        }
        JobKind::CheckAlerts => check_alerts::run(app, now, dry_run).await,
        JobKind::AuditCheckpoint => audit_checkpoint::run(app, now, dry_run).await,
    }
}

fn test_delay() -> Option<u64> {
    std::env::var(TEST_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|ms| *ms > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_audit_write_or_broken_chain_asks_for_its_alert_once() {
        let mut out = JobOutcome::default();
        let unwritable = anyhow::anyhow!("disk full")
            .context(AuditUnwritable)
            .context("rotating the data key");
        out.fail("rotate", &unwritable);
        out.fail("rotate again", &unwritable);
        out.fail("other", &anyhow::anyhow!("something else"));
        assert_eq!(out.alerts.len(), 1, "{:?}", out.alerts);
        assert_eq!(out.alerts[0].name(), "audit_write_failed");

        let broken = anyhow::anyhow!("does not verify").context(ChainBroken {
            first_bad_row: 7,
            reason: "row 7 was changed".into(),
        });
        let mut out = JobOutcome::default();
        out.fail("audit checkpoint", &broken);
        assert_eq!(
            out.alerts,
            [AlertEvent::AuditChainBroken {
                first_bad_row: 7,
                reason: "row 7 was changed".into()
            }]
        );
        assert_eq!(out.status(), RunStatus::Failed);
    }
}
