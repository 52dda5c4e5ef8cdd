//! `keywarden run [--once]`: the worker.

use std::sync::Arc;

use clap::Args;

use super::{Ctx, print_json};
use crate::app::OpenMode;
use crate::audit::Actor;
use crate::scheduler::runner::Runner;
use crate::scheduler::{self, worker};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run every job whose latest tick (at or before now) has not run yet,
    /// once, and exit: for an external cron (Kubernetes CronJob, systemd
    /// timer, crontab). Exit 1 if a job failed.
    #[arg(long)]
    pub once: bool,
}

pub async fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<()> {
    let (config, config_source) = ctx.config_with_source()?;
    // Check the job files before touching the store: a typo stops here.
    let jobs = scheduler::load_jobs(&config)?;
    let app = ctx.open_with(config, OpenMode::Create).await?;
    let now = if args.once {
        super::job::one_shot_now()?
    } else {
        super::now()
    };
    // Everything this process does from here on is the worker's doing.
    let worker_id = scheduler::worker_id(&app.config);
    app.set_audit_actor(Actor::Worker(worker_id.clone()));
    if let Err(e) = app.audit_config_loaded(&config_source, now).await {
        // Key operations audit in their own transactions and fail closed;
        // a worker that cannot write this row keeps running and says so.
        tracing::error!("cannot record the config load in the audit log: {e:#}");
    }
    // `run` on a fresh store is the README's first command: it makes the
    // first keys itself, like `init`.
    let created = app.ensure_active_keys(now).await?;
    for k in &created {
        tracing::info!(
            key.id = k.kid.as_str(),
            key.purpose = k.purpose.as_str(),
            "created the first {} key {}",
            k.purpose,
            k.kid
        );
    }
    tracing::info!(
        store = crate::store::redact_url(&app.paths.database_url).as_str(),
        jobs.source = jobs.source.as_str(),
        "keyring store {}; jobs from {}",
        crate::store::redact_url(&app.paths.database_url),
        jobs.source
    );
    let runner = Runner::new(Arc::new(app), worker_id);
    if !args.once {
        return worker::run(runner, jobs.defs).await;
    }
    let reports = worker::run_once(&runner, &jobs.defs, now).await?;
    if ctx.json {
        print_json(&reports)?;
    } else {
        for r in &reports {
            let detail = match r.status.as_str() {
                "claimed_elsewhere" => "already run (by this or another worker)".to_string(),
                _ => r.error.clone().unwrap_or_default(),
            };
            println!(
                "{:<22} tick {}  {:<9} {}",
                r.job,
                super::show_time(Some(r.scheduled_at)),
                r.status,
                detail
            );
        }
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.job.as_str())
        .collect();
    runner.app.store.close().await;
    if !failed.is_empty() {
        anyhow::bail!("job(s) failed: {}", failed.join(", "));
    }
    Ok(())
}
