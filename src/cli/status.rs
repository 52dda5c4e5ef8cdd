//! `keywarden status`: the keyring at a glance.

use serde::Serialize;

use super::{Ctx, print_json, show_time};
use crate::app::OpenMode;
use crate::keyring::{KeyState, Purpose, RotationPlan, plan_rotation};

#[derive(Serialize)]
struct PurposeStatus {
    purpose: Purpose,
    active_kid: Option<String>,
    algorithm: Option<String>,
    version: Option<i64>,
    rotate_due_at: Option<chrono::DateTime<chrono::Utc>>,
    rotation_due_now: bool,
    retiring: usize,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    let now = super::now();
    let keys = app.key_metas(None).await?;
    let purposes: Vec<PurposeStatus> = Purpose::ALL
        .iter()
        .map(|&p| {
            let active = keys
                .iter()
                .find(|k| k.purpose == p && k.state == KeyState::Active);
            let plan = plan_rotation(&keys, p, &app.policy, now);
            PurposeStatus {
                purpose: p,
                active_kid: active.map(|k| k.kid.clone()),
                algorithm: active.map(|k| k.algorithm.to_string()),
                version: active.map(|k| k.version),
                rotate_due_at: match &plan {
                    RotationPlan::NotDue { next_at, .. } => Some(*next_at),
                    _ => None,
                },
                rotation_due_now: !matches!(plan, RotationPlan::NotDue { .. }),
                retiring: keys
                    .iter()
                    .filter(|k| k.purpose == p && k.state == KeyState::Retiring)
                    .count(),
            }
        })
        .collect();
    let jobs = jobs_status(&app, now).await?;
    let epoch = app.store.epoch().await?;
    let audit = audit_health(&app).await;
    let sync = crate::sync::sync_lag(&app).await?;
    if ctx.json {
        let redis = if !sync.configured {
            "not configured: events wait in the outbox"
        } else if sync.reachable {
            "reachable"
        } else {
            "unreachable: events wait in the outbox"
        };
        print_json(&serde_json::json!({
            "audit": audit,
            "store": crate::store::redact_url(&app.paths.database_url),
            "root_key": app.root_source.to_string(),
            "root_kid": app.roots.newest().id(),
            "epoch": epoch,
            "redis": redis,
            "outbox_backlog": sync.outbox.events,
            "sync": sync,
            "keyring": purposes,
            "jobs": jobs,
        }))?;
        return Ok(());
    }
    println!(
        "store:    {}",
        crate::store::redact_url(&app.paths.database_url)
    );
    println!(
        "root key: {} ({})",
        app.root_source,
        app.roots.newest().id()
    );
    // Epochs (store and Redis), Redis, outbox backlog and sync lag.
    super::sync::print_summary(&sync);
    println!("audit:    {}", audit["summary"].as_str().unwrap_or("-"));
    println!();
    println!(
        "{:<17} {:<26} {:<12} {:>4}  {:<21} {:>8}",
        "PURPOSE", "ACTIVE KID", "ALGORITHM", "VER", "ROTATES AT", "RETIRING"
    );
    for s in &purposes {
        let due = if s.rotation_due_now {
            "due now".to_string()
        } else {
            show_time(s.rotate_due_at)
        };
        println!(
            "{:<17} {:<26} {:<12} {:>4}  {:<21} {:>8}",
            s.purpose.as_str(),
            s.active_kid.as_deref().unwrap_or("(none: run init)"),
            s.algorithm.as_deref().unwrap_or("-"),
            s.version.map_or("-".into(), |v| v.to_string()),
            due,
            s.retiring
        );
    }
    println!();
    match jobs.as_array() {
        Some(jobs) => {
            println!("{:<22} {:<21} LAST", "JOB", "NEXT RUN");
            for j in jobs {
                let s = |k: &str| j[k].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<22} {:<21} {}",
                    s("name"),
                    s("next_run"),
                    s("last_status")
                );
            }
        }
        None => println!("jobs:     {}", jobs["error"].as_str().unwrap_or("-")),
    }
    Ok(())
}

/// The jobs' next and last runs; a broken job file is shown, not fatal here.
async fn jobs_status(
    app: &crate::app::App,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<serde_json::Value> {
    let jobs = match crate::scheduler::load_jobs(&app.config) {
        Ok(jobs) => jobs,
        Err(e) => return Ok(serde_json::json!({ "error": format!("{e:#}") })),
    };
    let mut out = Vec::new();
    for def in &jobs.defs {
        let last = app.store.last_run(&def.name).await?;
        let next = def.enabled.then(|| def.schedule.next_after(now)).flatten();
        out.push(serde_json::json!({
            "name": def.name,
            "enabled": def.enabled,
            "next_run": show_time(next),
            "last_status": last.map(|r| r.status),
        }));
    }
    Ok(serde_json::Value::Array(out))
}

/// Audit log health for `status`: rows, head, last checkpoint and how old
/// it is. Cheap (no chain walk: that is `audit verify`); a failure to read
/// is reported, not fatal, so `status` still shows the keyring.
async fn audit_health(app: &crate::app::App) -> serde_json::Value {
    use crate::audit::checkpoint::{checkpoint_dir, latest_checkpoint};
    let counts = app.store.audit_count().await;
    let cp = latest_checkpoint(&checkpoint_dir(app));
    match (counts, cp) {
        (Ok((rows, head)), Ok(cp)) => {
            let cp_at = cp
                .as_ref()
                .and_then(|(_, c)| chrono::DateTime::from_timestamp_millis(c.at_ms));
            let summary = format!(
                "{rows} rows, head {}; last checkpoint {}",
                head.map_or("-".into(), |h| format!("#{h}")),
                match (&cp, cp_at) {
                    (Some((_, c)), Some(at)) => format!("#{} at {}", c.seq, show_time(Some(at))),
                    _ => "never (run `keywarden audit checkpoint`)".into(),
                }
            );
            serde_json::json!({
                "rows": rows,
                "head_seq": head,
                "last_checkpoint_seq": cp.as_ref().map(|(_, c)| c.seq),
                "last_checkpoint_at": cp_at,
                "summary": summary,
            })
        }
        (Err(e), _) | (_, Err(e)) => serde_json::json!({
            "error": format!("{e:#}"),
            "summary": format!("UNHEALTHY: {e:#}"),
        }),
    }
}
