//! `kind = "reencrypt-secrets"`: moves rows still under a non-active data
//! key to the active one, in batches, resumably; a key left protecting no
//! row retires at the next `expire-keys` tick.

use std::num::NonZeroU32;

use chrono::{DateTime, Utc};

use super::JobOutcome;
use crate::app::App;

/// Runs the re-encryption engine on `target` (a `[[reencrypt.targets]]`
/// name, `keywarden.secrets`, or every target when `None`), `batch_size`
/// rows at a time. A row that no key opens is quarantined and fails the
/// run (the summary says how many); the next tick resumes where this one
/// stopped, since rows already under the active key are never selected.
pub async fn run(
    app: &App,
    target: Option<&str>,
    batch_size: Option<NonZeroU32>,
    now: DateTime<Utc>,
    dry_run: bool,
) -> JobOutcome {
    let opts = crate::reencrypt::Options {
        target: target.map(str::to_string),
        dry_run,
        batch_size: batch_size.map(|b| b.get() as usize),
        ..Default::default()
    };
    let mut out = JobOutcome::default();
    match crate::reencrypt::run_reencrypt(app, &opts, now).await {
        Ok(summary) => {
            out.actions.push(serde_json::json!({
                "action": if dry_run { "would_reencrypt" } else { "reencrypt" },
                "target": target.unwrap_or("all"),
                "rows_scanned": summary.rows_scanned,
                "rows_reencrypted": summary.rows_reencrypted,
                "rows_failed": summary.rows_failed,
                "rows_quarantined_total": summary.rows_quarantined_total,
                "seconds": summary.seconds,
            }));
            if summary.rows_failed > 0 {
                out.fail(
                    "re-encrypt",
                    &anyhow::anyhow!(
                        "{} rows could not be decrypted and were quarantined",
                        summary.rows_failed
                    ),
                );
                for t in summary.targets.iter().filter(|t| t.rows_failed > 0) {
                    out.alerts.push(quarantine_alert(app, &t.target).await);
                }
            }
        }
        Err(e) => out.fail("re-encrypt", &e),
    }
    out
}

/// The `row_quarantined` alert for `target`: its quarantined row ids (the
/// first ten; ids are the table's own keys, never secret values).
async fn quarantine_alert(app: &App, target: &str) -> crate::alerts::rules::Event {
    const SHOWN: usize = 10;
    let row = match crate::reencrypt::quarantine::ids(&app.store, target).await {
        Ok(ids) => {
            let mut ids: Vec<String> = ids.into_iter().collect();
            ids.sort();
            let more = ids.len().saturating_sub(SHOWN);
            ids.truncate(SHOWN);
            let mut row = ids.join(", ");
            if more > 0 {
                row.push_str(&format!(" and {more} more"));
            }
            row
        }
        Err(_) => "(see keys census)".into(),
    };
    crate::alerts::rules::Event::RowQuarantined {
        target: target.to_string(),
        row,
        error: "no known key decrypts them; they are left untouched".into(),
    }
}
