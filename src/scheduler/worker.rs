//! `keywarden run`: tokio-cron-scheduler fires every enabled job on its
//! schedule; each firing runs that tick through [`Runner::run_tick`], which
//! claims it in the store so that one worker among all replicas runs it.
//!
//! Shutdown (SIGTERM, SIGINT): the scheduler stops firing, runs in progress
//! finish (up to [`SHUTDOWN_GRACE`]), and `run` returns. A store that stops
//! answering puts the worker in back-off: ticks are let go without touching
//! the store until the back-off ends, doubling up to a minute, so the
//! worker neither exits nor spins and picks up again when the store returns.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio_cron_scheduler::{Job, JobScheduler};

use super::defs::JobDef;
use super::runner::{RunReport, Runner};

/// How long shutdown waits for runs in progress before giving up on them
/// (their leases then expire and the next holder marks them failed).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Set when `run` got SIGTERM/SIGINT: a long job (re-encryption) checks
/// [`shutdown_requested`] between batches and stops after the current one.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Whether the worker was asked to stop; long jobs stop at a batch boundary.
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::SeqCst)
}

/// Permits of the in-flight semaphore: shutdown takes all of them.
const MAX_IN_FLIGHT: u32 = 1 << 16;

/// Back-off after store errors: doubles from `BASE` up to `MAX`.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    /// Whether the store may be tried at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now >= u)
    }

    /// Records a failure at `now`; returns how long to wait.
    pub fn failure(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = Self::BASE
            .saturating_mul(1u32 << (self.failures - 1).min(6))
            .min(Self::MAX);
        self.until = Some(now + wait);
        wait
    }

    /// Records a success; returns whether the store had been failing.
    pub fn success(&mut self) -> bool {
        let was_failing = self.failures > 0;
        self.failures = 0;
        self.until = None;
        was_failing
    }
}

/// The state shared by every firing.
struct Shared {
    runner: Runner,
    stopping: AtomicBool,
    in_flight: Arc<Semaphore>,
    backoff: Mutex<Backoff>,
    /// Jobs with a tick in progress in this process.
    busy: Mutex<HashSet<String>>,
}

/// Marks a job busy in this process until dropped.
struct BusyGuard<'a> {
    busy: &'a Mutex<HashSet<String>>,
    job: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.busy.lock().expect("busy lock").remove(&self.job);
    }
}

impl Shared {
    /// One firing of `def`'s schedule.
    async fn on_tick(&self, def: &JobDef) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return;
        };
        let now = Utc::now();
        // The scheduler fires at or shortly after the tick; the tick is the
        // latest one at or before now, so every worker names it alike.
        let Some(tick) = def.schedule.latest_tick_at_or_before(now) else {
            return;
        };
        self.run_tick(def, tick, now).await;
    }

    async fn run_tick(&self, def: &JobDef, tick: DateTime<Utc>, now: DateTime<Utc>) {
        // A tick that fires while this process still runs the job's previous
        // tick is let go here (the lease would refuse it anyway; another
        // worker records it as skipped). This also bounds the attempts that
        // wait on an unreachable store to one per job.
        if !self
            .busy
            .lock()
            .expect("busy lock")
            .insert(def.name.clone())
        {
            tracing::debug!(
                job.name = def.name.as_str(),
                "letting a tick of {} go: its previous tick is still running here",
                def.name
            );
            return;
        }
        let _busy = BusyGuard {
            busy: &self.busy,
            job: def.name.clone(),
        };
        if !self
            .backoff
            .lock()
            .expect("backoff lock")
            .ready(Instant::now())
        {
            tracing::debug!(
                job.name = def.name.as_str(),
                "letting a tick of {} go: the store is in back-off",
                def.name
            );
            return;
        }
        match self.runner.run_tick(def, tick, now).await {
            Ok(_) => {
                if self.backoff.lock().expect("backoff lock").success() {
                    tracing::info!("the store answers again; ticks run again");
                }
            }
            Err(e) => {
                let wait = self
                    .backoff
                    .lock()
                    .expect("backoff lock")
                    .failure(Instant::now());
                tracing::warn!(
                    job.name = def.name.as_str(),
                    retry_in_s = wait.as_secs(),
                    "cannot run a tick of {}: {e:#}; trying the store again in {}s",
                    def.name,
                    wait.as_secs()
                );
            }
        }
    }
}

/// Runs the worker until SIGTERM or SIGINT.
pub async fn run(runner: Runner, defs: Vec<JobDef>) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        runner,
        stopping: AtomicBool::new(false),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
        backoff: Mutex::new(Backoff::default()),
        busy: Mutex::new(HashSet::new()),
    });
    // Listen for signals before anything else, so an early SIGTERM is not lost.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot listen for SIGINT")?;

    let mut scheduler = JobScheduler::new()
        .await
        .context("cannot start the job scheduler")?;
    let now = Utc::now();
    let enabled: Vec<JobDef> = defs.into_iter().filter(|d| d.enabled).collect();
    for def in &enabled {
        let for_job = def.clone();
        let shared_for_job = shared.clone();
        let job = Job::new_async(def.schedule.as_str(), move |_id, _scheduler| {
            let def = for_job.clone();
            let shared = shared_for_job.clone();
            Box::pin(async move { shared.on_tick(&def).await })
        })
        .with_context(|| format!("cannot schedule job {} ({})", def.name, def.schedule))?;
        scheduler
            .add(job)
            .await
            .with_context(|| format!("cannot schedule job {}", def.name))?;
        let next = def.schedule.next_after(now);
        tracing::info!(
            job.name = def.name.as_str(),
            job.schedule = def.schedule.as_str(),
            job.next_run = next.map(|t| t.to_rfc3339()),
            "scheduled {} ({}): next run at {}",
            def.name,
            def.schedule,
            next.map_or_else(|| "never".into(), |t| t.to_rfc3339())
        );
    }
    scheduler
        .start()
        .await
        .context("cannot start the job scheduler")?;
    tracing::info!(
        worker.id = shared.runner.worker_id.as_str(),
        jobs = enabled.len(),
        "worker {} running {} job(s); SIGTERM or Ctrl-C stops it",
        shared.runner.worker_id,
        enabled.len()
    );

    // The outbox publisher and the HTTP endpoint run beside the jobs until
    // shutdown. Neither may stop the worker: a port already taken (another
    // worker on this host) is a warning, not an exit.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let app = shared.runner.app.clone();
    let publisher = tokio::spawn(crate::sync::run_publisher(app.clone(), stopped()));
    let hooks = http_hooks(shared.clone(), enabled.clone());
    let http_stop = stopped();
    let http = tokio::spawn(async move {
        if let Err(e) = crate::http::serve_with(app, hooks, http_stop).await {
            tracing::warn!(error = %format!("{e:#}"), "the HTTP endpoint is not running");
        }
    });

    // Catch up: a tick missed while no worker ran is run now (once, across
    // all workers, like any tick); a tick that already ran is not repeated.
    for def in enabled.clone() {
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(_permit) = shared.in_flight.clone().try_acquire_owned() else {
                return;
            };
            let now = Utc::now();
            if let Some(tick) = def.schedule.latest_tick_at_or_before(now)
                && !shared.stopping.load(Ordering::SeqCst)
            {
                shared.run_tick(&def, tick, now).await;
            }
        });
    }

    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{signal}: no new ticks; waiting for runs in progress");
    shared.stopping.store(true, Ordering::SeqCst);
    SHUTDOWN.store(true, Ordering::SeqCst);
    scheduler
        .shutdown()
        .await
        .context("cannot stop the job scheduler")?;
    match tokio::time::timeout(SHUTDOWN_GRACE, shared.in_flight.acquire_many(MAX_IN_FLIGHT)).await {
        Ok(_) => tracing::info!("stopped"),
        Err(_) => tracing::warn!(
            "runs still in progress after {}s; stopping anyway (their leases will expire)",
            SHUTDOWN_GRACE.as_secs()
        ),
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), publisher).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), http).await;
    shared.runner.app.store.close().await;
    Ok(())
}

/// What the HTTP endpoint's admin routes call: a manual job run, the audit
/// tail, and the audit record of a refused request.
fn http_hooks(shared: Arc<Shared>, defs: Vec<JobDef>) -> crate::http::HttpHooks {
    let for_jobs = shared.clone();
    let run_job: crate::http::JobRunner = Arc::new(move |name: String| {
        let shared = for_jobs.clone();
        let def = defs.iter().find(|d| d.name == name).cloned();
        Box::pin(async move {
            let def = def.ok_or_else(|| {
                crate::error::UsageError(format!("no enabled job named {name:?}"))
            })?;
            let report = shared
                .runner
                .run_manual(&def, Utc::now(), std::time::Duration::from_secs(30))
                .await?;
            Ok(serde_json::to_value(report)?)
        })
    });
    let for_audit = shared.clone();
    let audit_tail: crate::http::AuditTail = Arc::new(move |n: usize| {
        let shared = for_audit.clone();
        Box::pin(async move {
            let rows = shared.runner.app.store.audit_tail(n as i64).await?;
            Ok(serde_json::to_value(rows)?)
        })
    });
    let access_denied: crate::http::DeniedFn =
        Arc::new(move |route: String, reason: String, key: Option<String>| {
            let shared = shared.clone();
            Box::pin(async move {
                let mut event = crate::audit::events::access_denied(&route, &reason);
                if let Some(key) = key {
                    event = event.detail("api_key", key);
                }
                if let Err(e) = shared.runner.app.audit_now(vec![event], Utc::now()).await {
                    tracing::warn!(error = %format!("{e:#}"), "could not audit a refused request");
                }
            })
        });
    crate::http::HttpHooks {
        run_job: Some(run_job),
        audit_tail: Some(audit_tail),
        extra_metrics: Vec::new(),
        access_denied: Some(access_denied),
    }
}

/// `run --once`: runs the latest tick at or before `now` of every enabled
/// job that has not run it yet (missed ticks collapse into that one, since
/// jobs are due-date driven), then returns the reports.
pub async fn run_once(
    runner: &Runner,
    defs: &[JobDef],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<RunReport>> {
    let mut reports = Vec::new();
    for def in defs.iter().filter(|d| d.enabled) {
        let Some(tick) = def.schedule.latest_tick_at_or_before(now) else {
            continue;
        };
        reports.push(runner.run_tick(def, tick, now).await?);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute_and_resets() {
        let mut b = Backoff::default();
        let t = Instant::now();
        assert!(b.ready(t));
        assert_eq!(b.failure(t), Duration::from_secs(1));
        assert!(!b.ready(t));
        assert!(b.ready(t + Duration::from_secs(1)));
        assert_eq!(b.failure(t), Duration::from_secs(2));
        assert_eq!(b.failure(t), Duration::from_secs(4));
        for _ in 0..10 {
            b.failure(t);
        }
        assert_eq!(b.failure(t), Duration::from_secs(60));
        assert!(b.success());
        assert!(b.ready(t));
        assert!(!b.success());
    }
}
