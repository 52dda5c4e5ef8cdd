//! `keywarden sync ...`: the Redis sync at a glance, and publishing by hand.

use clap::Subcommand;

use super::{Ctx, print_json, show_time};
use crate::app::OpenMode;
use crate::sync::SyncLag;

#[derive(Debug, Subcommand)]
pub enum SyncCmd {
    /// Redis reachability, epochs, the outbox backlog, and each instance's
    /// acknowledged epoch and lag.
    Status,
    /// Publish the waiting outbox events to Redis now (and put the snapshot
    /// back if Redis lost it).
    Publish,
}

pub async fn run(ctx: &Ctx, cmd: SyncCmd) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    match cmd {
        SyncCmd::Status => {
            let lag = crate::sync::sync_lag(&app).await?;
            if ctx.json {
                print_json(&lag)
            } else {
                print_summary(&lag);
                print_instances(&lag);
                Ok(())
            }
        }
        SyncCmd::Publish => {
            if app.config.redis.url().is_none() {
                return Err(crate::error::UsageError(
                    "Redis is not configured: set KEYWARDEN_REDIS_URL or redis.url".into(),
                )
                .into());
            }
            let n = crate::sync::publish_pending(&app).await?;
            let backlog = app.store.outbox_backlog().await?;
            if ctx.json {
                print_json(&serde_json::json!({
                    "published": n,
                    "waiting": backlog.events,
                    "epoch": app.store.epoch().await?,
                }))
            } else {
                println!(
                    "published {n} events; {} waiting; epoch {}",
                    backlog.events,
                    app.store.epoch().await?
                );
                Ok(())
            }
        }
    }
}

/// The few lines `status` and `sync status` both print.
pub fn print_summary(lag: &SyncLag) {
    let redis = match (&lag.redis, lag.configured, lag.reachable) {
        (_, false, _) => "not configured: events wait in the outbox".to_string(),
        (r, true, true) => format!("{} (reachable)", r.as_deref().unwrap_or("?")),
        (r, true, false) => format!(
            "{} UNREACHABLE: {}",
            r.as_deref().unwrap_or("?"),
            lag.error.as_deref().unwrap_or("")
        ),
    };
    println!("redis:    {redis}");
    println!(
        "epoch:    store {}, redis {}",
        lag.store_epoch,
        lag.redis_epoch.map_or("-".into(), |e| e.to_string())
    );
    match lag.outbox_age_ms {
        Some(age) => println!(
            "outbox:   {} events waiting, oldest {} s",
            lag.outbox.events,
            age / 1000
        ),
        None => println!("outbox:   empty"),
    }
    if lag.reachable {
        let live = lag.instances.iter().filter(|i| !i.stale).count();
        println!(
            "sync lag: {} over {live} live instances (threshold {} ms){}; behind: {}",
            lag.max_lag_ms.map_or("-".into(), |m| format!("max {m} ms")),
            lag.threshold_ms,
            if lag.over_threshold { " OVER" } else { "" },
            if lag.behind.is_empty() {
                "none".to_string()
            } else {
                lag.behind.join(", ")
            }
        );
    }
}

fn print_instances(lag: &SyncLag) {
    if lag.instances.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<36} {:>6} {:>9}  {:<8} {:<21}",
        "INSTANCE", "EPOCH", "LAG MS", "STATE", "SEEN"
    );
    for i in &lag.instances {
        let state = if i.stale {
            "stale"
        } else if i.behind {
            "behind"
        } else {
            "current"
        };
        println!(
            "{:<36} {:>6} {:>9}  {:<8} {:<21}",
            i.instance,
            i.epoch,
            i.lag_ms.map_or("-".into(), |m| m.to_string()),
            state,
            show_time(i.seen)
        );
    }
}
