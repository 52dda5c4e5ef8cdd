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
    let epoch = app.store.epoch().await?;
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
            "store": crate::store::redact_url(&app.paths.database_url),
            "root_key": app.root_source.to_string(),
            "root_kid": app.roots.newest().id(),
            "epoch": epoch,
            "redis": redis,
            "outbox_backlog": sync.outbox.events,
            "sync": sync,
            "keyring": purposes,
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
    Ok(())
}
