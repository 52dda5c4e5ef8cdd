//! `kind = "rotate"`: rotates the keys of the listed purposes that the
//! keyring policy says are due at `now`.
//!
//! Due-date driven: a tick that finds nothing due does nothing, a missed
//! tick is caught up by the next, and two workers acting on the same plan
//! rotate once (`App::rotate` is a compare-and-set on the old active key, in
//! one transaction with the new key's activation).

use chrono::{DateTime, Utc};
use serde_json::json;

use super::JobOutcome;
use crate::app::App;
use crate::keyring::{Purpose, RotationPlan, plan_rotation};
use crate::scheduler::defs::KeyPurpose;

/// The keyring's purpose for a job file's purpose name.
pub fn purpose_of(p: KeyPurpose) -> Purpose {
    match p {
        KeyPurpose::Signing => Purpose::Signing,
        KeyPurpose::TokenEncryption => Purpose::TokenEncryption,
        KeyPurpose::Data => Purpose::Data,
        KeyPurpose::Temp => Purpose::Temp,
    }
}

pub async fn run(
    app: &App,
    purposes: &[KeyPurpose],
    now: DateTime<Utc>,
    dry_run: bool,
) -> JobOutcome {
    let mut out = JobOutcome::default();
    // Each purpose on its own: a failing signing rotation must not hold back
    // the token-encryption key listed beside it.
    for &p in purposes {
        let purpose = purpose_of(p);
        let step = format!("rotate {purpose}");
        match rotate_one(app, purpose, now, dry_run).await {
            Ok(action) => out.actions.push(action),
            Err(e) => {
                out.fail(&step, &e);
                // The rotation_success_rate figure counts these events.
                if !dry_run {
                    out.alerts
                        .push(crate::alerts::rules::Event::RotationFailed {
                            purpose: purpose.as_str().into(),
                            error: format!("{e:#}"),
                        });
                }
            }
        }
    }
    out
}

async fn rotate_one(
    app: &App,
    purpose: Purpose,
    now: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<serde_json::Value> {
    let metas = app.key_metas(Some(purpose)).await?;
    if let RotationPlan::NotDue { kid, next_at } = plan_rotation(&metas, purpose, &app.policy, now)
    {
        return Ok(json!({
            "action": "not_due",
            "purpose": purpose,
            "kid": kid,
            "due_at": next_at,
        }));
    }
    Ok(match app.rotate_if_due(purpose, now, dry_run).await? {
        Some(o) => json!({
            "action": if dry_run { "would_rotate" } else { "rotate" },
            "purpose": purpose,
            "old_kid": o.old_kid,
            "new_kid": o.new_kid,
            "algorithm": o.algorithm,
            "version": o.version,
            "epoch": o.epoch,
        }),
        // Another worker (or a manual rotation) replaced the key between our
        // plan and our transaction: nothing left to do.
        None => json!({"action": "already_rotated", "purpose": purpose}),
    })
}
