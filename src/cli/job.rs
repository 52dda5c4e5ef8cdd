//! `keywarden job list | run NAME | history [NAME]`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::Subcommand;

use super::{Ctx, print_json, show_time};
use crate::app::OpenMode;
use crate::error::UsageError;
use crate::scheduler::runner::Runner;
use crate::scheduler::{self, defs::JobDef};

/// For tests and operators replaying a date: the time one-shot commands
/// (`job run`, `job list`, `run --once`) take as now, in RFC 3339. The
/// long-running `run` ignores it.
pub const NOW_ENV: &str = "KEYWARDEN_NOW";

/// How long `job run` waits for a run of the same job in progress elsewhere.
const MANUAL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Every job: name, schedule, enabled, next run, last result.
    List,
    /// Run one job now (enabled or not); exit 1 if it fails.
    Run {
        /// The job's name (see `job list`).
        name: String,
        /// Print what the job would do (which keys rotate, ...) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Past runs, newest first.
    History {
        /// Only this job's runs.
        name: Option<String>,
        /// How many runs to show.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: u32,
    },
}

/// Now, or `KEYWARDEN_NOW` when set.
pub fn one_shot_now() -> anyhow::Result<DateTime<Utc>> {
    match std::env::var(NOW_ENV) {
        Ok(v) if !v.trim().is_empty() => DateTime::parse_from_rfc3339(v.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                UsageError(format!(
                    "{NOW_ENV}: \"{v}\" is not an RFC 3339 time ({e}), e.g. 2026-01-31T03:00:00Z"
                ))
                .into()
            }),
        _ => Ok(super::now()),
    }
}

pub async fn run(ctx: &Ctx, cmd: JobCmd) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let jobs = scheduler::load_jobs(&config)?;
    let now = one_shot_now()?;
    match cmd {
        JobCmd::List => {
            let app = ctx.open(OpenMode::Existing).await?;
            let mut rows = Vec::new();
            for def in &jobs.defs {
                let last = app.store.last_run(&def.name).await?;
                rows.push(serde_json::json!({
                    "name": def.name,
                    "kind": def.kind.name(),
                    "schedule": def.schedule.as_str(),
                    "enabled": def.enabled,
                    "next_run": next_run(def, now),
                    "last_status": last.as_ref().map(|r| r.status),
                    "last_started_at": last.as_ref().map(|r| r.started_at),
                    "last_error": last.as_ref().and_then(|r| r.error.clone()),
                    "description": def.description,
                    "file": def.file.display().to_string(),
                }));
            }
            if ctx.json {
                return print_json(&rows);
            }
            println!(
                "{:<22} {:<18} {:<8} {:<21} {:<9} {:<21}",
                "NAME", "SCHEDULE", "ENABLED", "NEXT RUN", "LAST", "LAST STARTED"
            );
            for r in &rows {
                let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<22} {:<18} {:<8} {:<21} {:<9} {:<21}",
                    s("name"),
                    s("schedule"),
                    if r["enabled"] == true { "yes" } else { "no" },
                    short_time(&s("next_run")),
                    s("last_status"),
                    short_time(&s("last_started_at")),
                );
            }
            eprintln!("jobs from {}", jobs.source);
            Ok(())
        }
        JobCmd::Run { name, dry_run } => {
            let def = jobs.get(&name)?.clone();
            let app = ctx.open(OpenMode::Existing).await?;
            let runner = Runner::new(Arc::new(app), scheduler::worker_id(&config));
            let report = if dry_run {
                runner.dry_run(&def, now).await
            } else {
                runner.run_manual(&def, now, MANUAL_WAIT).await?
            };
            if ctx.json {
                print_json(&report)?;
            } else {
                let what = if dry_run { "dry run of" } else { "ran" };
                println!(
                    "{what} {} ({}): {}",
                    report.job,
                    def.kind.name(),
                    report.status
                );
                for a in &report.actions {
                    println!("  {}", describe(a));
                }
            }
            runner.app.store.close().await;
            if report.failed() {
                anyhow::bail!(
                    "job {} failed: {}",
                    report.job,
                    report.error.as_deref().unwrap_or("unknown error")
                );
            }
            Ok(())
        }
        JobCmd::History { name, limit } => {
            let app = ctx.open(OpenMode::Existing).await?;
            let runs = app
                .store
                .job_runs(name.as_deref(), i64::from(limit.max(1)))
                .await?;
            if let Some(name) = &name
                && runs.is_empty()
            {
                // A removed job keeps its history; only a name never seen is wrong.
                jobs.get(name)?;
            }
            if ctx.json {
                return print_json(&runs);
            }
            println!(
                "{:>6} {:<22} {:<8} {:<21} {:<9} {:>8}  {:<20} ERROR",
                "ID", "JOB", "ORIGIN", "SCHEDULED", "STATUS", "MS", "WORKER"
            );
            for r in &runs {
                println!(
                    "{:>6} {:<22} {:<8} {:<21} {:<9} {:>8}  {:<20} {}",
                    r.id,
                    r.job,
                    r.origin,
                    show_time(Some(r.scheduled_at)),
                    r.status.as_str(),
                    r.duration_ms.map_or("-".into(), |d| d.to_string()),
                    r.worker_id,
                    r.error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

fn next_run(def: &JobDef, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    def.enabled.then(|| def.schedule.next_after(now)).flatten()
}

fn short_time(s: &str) -> String {
    DateTime::parse_from_rfc3339(s)
        .map(|t| show_time(Some(t.with_timezone(&Utc))))
        .unwrap_or_else(|_| s.to_string())
}

/// One action as a line of text.
fn describe(a: &serde_json::Value) -> String {
    let s = |k: &str| a[k].as_str().unwrap_or("-").to_string();
    match a["action"].as_str().unwrap_or("") {
        "rotate" => format!(
            "rotated {}: {} -> {} (v{})",
            s("purpose"),
            s("old_kid"),
            s("new_kid"),
            a["version"]
        ),
        "would_rotate" => format!(
            "would rotate {}: {} -> a new key (v{})",
            s("purpose"),
            s("old_kid"),
            a["version"]
        ),
        "not_due" => format!(
            "{} key {} is not due until {}",
            s("purpose"),
            s("kid"),
            short_time(&s("due_at"))
        ),
        "already_rotated" => format!("{} was rotated by someone else just now", s("purpose")),
        "retire" | "destroy" | "would_retire" | "would_destroy" => format!(
            "{} {} key {} ({} -> {})",
            s("action").replace('_', " "),
            s("purpose"),
            s("kid"),
            s("from"),
            s("to")
        ),
        "not_available" => format!("{}: not available yet", s("what")),
        "failed" => format!("FAILED {}: {}", s("step"), s("error")),
        _ => a.to_string(),
    }
}
