//! Runs one job once: claim (row + lease), run with a heartbeat, record the
//! result, give the lease back. Shared by `run`, `run --once` and `job run`,
//! so every way of running a job obeys the same one-run-per-tick rule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::defs::JobDef;
use crate::app::App;
use crate::audit::events;
use crate::jobs::{self, JobOutcome};
use crate::store::job_runs::{Claim, Lease, NewRun, Origin, RunStatus};

/// How long a run waits for its event alerts to be delivered.
const ALERT_WAIT: Duration = Duration::from_secs(15);

/// What one attempt to run a job came to (the `job run --json` document).
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub job: String,
    /// `ok`, `failed`, `skipped` (a previous run still held the job's lease)
    /// or `claimed_elsewhere` (another worker took this tick).
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub actions: Vec<Value>,
    pub error: Option<String>,
    pub run_id: Option<i64>,
    pub origin: Origin,
    pub scheduled_at: DateTime<Utc>,
    pub worker_id: String,
    pub dry_run: bool,
}

impl RunReport {
    /// Whether the job itself failed (exit 1 for one-shot commands).
    pub fn failed(&self) -> bool {
        self.status == RunStatus::Failed.as_str()
    }
}

/// Runs jobs for one worker identity.
#[derive(Clone)]
pub struct Runner {
    pub app: Arc<App>,
    pub worker_id: String,
    pub lease_ttl: Duration,
}

impl Runner {
    pub fn new(app: Arc<App>, worker_id: String) -> Runner {
        let lease_ttl = app.config.worker.lease_ttl.as_std();
        Runner {
            app,
            worker_id,
            lease_ttl,
        }
    }

    fn report(
        &self,
        def: &JobDef,
        origin: Origin,
        scheduled_at: DateTime<Utc>,
        started_at: DateTime<Utc>,
    ) -> RunReport {
        RunReport {
            job: def.name.clone(),
            status: String::new(),
            started_at,
            finished_at: started_at,
            actions: Vec::new(),
            error: None,
            run_id: None,
            origin,
            scheduled_at,
            worker_id: self.worker_id.clone(),
            dry_run: false,
        }
    }

    /// Runs the cron tick `tick` of `def` unless another worker claimed it.
    /// `Err` only for the store (the database is unreachable, ...): the job's
    /// own failure is a report with status `failed`.
    pub async fn run_tick(
        &self,
        def: &JobDef,
        tick: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<RunReport> {
        let claim = self
            .app
            .store
            .claim_run(
                &NewRun {
                    job: &def.name,
                    origin: Origin::Schedule,
                    scheduled_at: tick,
                    worker_id: &self.worker_id,
                    started_at: now,
                },
                self.lease_ttl,
            )
            .await?;
        self.after_claim(def, Origin::Schedule, tick, now, claim)
            .await
    }

    /// Runs `def` now, by hand: its own row (never a tick's), after waiting
    /// up to `wait` for a run in progress elsewhere to give the lease back.
    pub async fn run_manual(
        &self,
        def: &JobDef,
        now: DateTime<Utc>,
        wait: Duration,
    ) -> anyhow::Result<RunReport> {
        let deadline = Instant::now() + wait;
        loop {
            let claim = self
                .app
                .store
                .claim_run(
                    &NewRun {
                        job: &def.name,
                        origin: Origin::Manual,
                        scheduled_at: now,
                        worker_id: &self.worker_id,
                        started_at: now,
                    },
                    self.lease_ttl,
                )
                .await?;
            if let Claim::Busy {
                holder, expires_at, ..
            } = &claim
            {
                if Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                anyhow::bail!(
                    "job {} is running on worker {holder} (its lease runs until {}); try again later",
                    def.name,
                    expires_at.map_or_else(|| "-".into(), |t| t.to_rfc3339())
                );
            }
            return self.after_claim(def, Origin::Manual, now, now, claim).await;
        }
    }

    /// Runs `def` without claiming anything or writing a row: what it would do.
    pub async fn dry_run(&self, def: &JobDef, now: DateTime<Utc>) -> RunReport {
        let mut report = self.report(def, Origin::Manual, now, now);
        let started = Instant::now();
        let outcome = jobs::run_job(&self.app, def, now, now, true).await;
        report.dry_run = true;
        report.status = outcome.status().as_str().into();
        report.finished_at = now + elapsed(started);
        report.actions = outcome.actions;
        report.error = outcome.error;
        report
    }

    async fn after_claim(
        &self,
        def: &JobDef,
        origin: Origin,
        scheduled_at: DateTime<Utc>,
        now: DateTime<Utc>,
        claim: Claim,
    ) -> anyhow::Result<RunReport> {
        let mut report = self.report(def, origin, scheduled_at, now);
        match claim {
            Claim::AlreadyClaimed => {
                report.status = "claimed_elsewhere".into();
                Ok(report)
            }
            Claim::Busy { holder, run_id, .. } => {
                tracing::info!(
                    job.name = def.name.as_str(),
                    lease.holder = holder.as_str(),
                    %scheduled_at,
                    "skipped a tick of {}: a previous run still holds its lease",
                    def.name
                );
                report.status = RunStatus::Skipped.as_str().into();
                report.run_id = run_id;
                report.error = Some(format!(
                    "a previous run still holds the lease (worker {holder})"
                ));
                Ok(report)
            }
            Claim::Claimed {
                run_id,
                lease,
                reaped,
            } => {
                if reaped > 0 {
                    tracing::warn!(
                        job.name = def.name.as_str(),
                        runs = reaped,
                        "marked {reaped} run(s) of {} failed: their worker stopped before finishing",
                        def.name
                    );
                }
                report.run_id = Some(run_id);
                let started = Instant::now();
                // Fail closed: a run whose start cannot be audited does not
                // run (its key operations could not be audited either).
                let began = events::job_started(&def.name, scheduled_at.timestamp());
                let outcome = match self.app.audit_now(vec![began], now).await {
                    Ok(_) => self.run_holding(def, &lease, scheduled_at, now).await,
                    Err(e) => {
                        let mut out = JobOutcome::default();
                        out.fail("record the run's start in the audit log", &e);
                        out
                    }
                };
                let duration = elapsed(started);
                report.finished_at = now + duration;
                report.status = outcome.status().as_str().into();
                let actions = Value::Array(outcome.actions.clone());
                let recorded = self
                    .app
                    .store
                    .finish_run(
                        run_id,
                        &lease,
                        outcome.status(),
                        outcome.error.as_deref(),
                        &actions,
                        report.finished_at,
                        duration.num_milliseconds(),
                    )
                    .await?;
                if !recorded {
                    tracing::warn!(
                        job.name = def.name.as_str(),
                        run.id = run_id,
                        "run {run_id} of {} was taken over by another worker after its lease \
                         expired; its result was not recorded",
                        def.name
                    );
                }
                let ended = match &outcome.error {
                    Some(e) => events::job_failed(&def.name, scheduled_at.timestamp(), e),
                    None => {
                        events::job_finished(&def.name, scheduled_at.timestamp(), actions.clone())
                    }
                };
                if let Err(e) = self.app.audit_now(vec![ended], report.finished_at).await {
                    tracing::error!(
                        job.name = def.name.as_str(),
                        run.id = run_id,
                        "cannot record the end of run {run_id} of {} in the audit log: {e:#}",
                        def.name
                    );
                }
                self.app.store.release_lease(&lease).await?;
                self.raise_alerts(def, &outcome, report.finished_at).await;
                match &outcome.error {
                    Some(e) => tracing::error!(
                        job.name = def.name.as_str(),
                        run.id = run_id,
                        duration_ms = duration.num_milliseconds(),
                        "job {} failed: {e}",
                        def.name
                    ),
                    // A tick that found nothing to do is not news.
                    None if outcome.actions.iter().all(|a| {
                        matches!(a["action"].as_str(), Some("not_due" | "not_available"))
                    }) =>
                    {
                        tracing::debug!(
                            job.name = def.name.as_str(),
                            run.id = run_id,
                            "job {} found nothing to do",
                            def.name
                        )
                    }
                    None => tracing::info!(
                        job.name = def.name.as_str(),
                        run.id = run_id,
                        duration_ms = duration.num_milliseconds(),
                        actions = %actions,
                        "job {} done",
                        def.name
                    ),
                }
                report.actions = outcome.actions;
                report.error = outcome.error;
                Ok(report)
            }
        }
    }

    /// Sends the event alerts the run asked for, waiting (bounded) for the
    /// deliveries so a one-shot `run --once` does not exit before them.
    async fn raise_alerts(&self, def: &JobDef, outcome: &JobOutcome, now: DateTime<Utc>) {
        for event in &outcome.alerts {
            match crate::alerts::raise_event(&self.app, event, now).await {
                Ok(pending) => {
                    if tokio::time::timeout(ALERT_WAIT, pending.wait())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            job.name = def.name.as_str(),
                            "the {} alert is still being delivered; not waiting longer",
                            event.name()
                        );
                    }
                }
                Err(e) => tracing::error!(
                    job.name = def.name.as_str(),
                    "cannot raise the {} alert: {e:#}",
                    event.name()
                ),
            }
        }
    }

    /// Runs the job while renewing its lease every third of its lifetime.
    /// If the lease is lost (it expired and another worker took it), the job
    /// is stopped at its next await point: its transactions roll back, and
    /// the key changes it already committed were compare-and-set.
    async fn run_holding(
        &self,
        def: &JobDef,
        lease: &Lease,
        scheduled_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> JobOutcome {
        let period = (self.lease_ttl / 3).max(Duration::from_millis(200));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let job = jobs::run_job(&self.app, def, scheduled_at, now, false);
        tokio::pin!(job);
        loop {
            tokio::select! {
                outcome = &mut job => return outcome,
                _ = heartbeat.tick() => match self.app.store.renew_lease(lease, self.lease_ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let mut out = JobOutcome::default();
                        out.fail("hold the job's lease", &anyhow::anyhow!(
                            "the lease expired and another worker took it over; stopped"
                        ));
                        return out;
                    }
                    Err(e) => tracing::warn!(
                        job.name = def.name.as_str(),
                        "cannot renew the lease of {}: {e:#}", def.name
                    ),
                },
            }
        }
    }
}

fn elapsed(started: Instant) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(started.elapsed()).unwrap_or_default()
}
