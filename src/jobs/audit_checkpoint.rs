//! `kind = "audit-checkpoint"`: verifies the audit chain, writes a signed
//! checkpoint and applies retention.

use chrono::{DateTime, Utc};

use super::JobOutcome;
use crate::app::App;

/// Verifies the audit chain, writes a signed checkpoint outside the
/// database and applies retention (never past that checkpoint). A broken
/// chain fails the run (and writes no checkpoint).
pub async fn run(app: &App, now: DateTime<Utc>, dry_run: bool) -> JobOutcome {
    let mut out = JobOutcome::default();
    match crate::audit::checkpoint::checkpoint_with(app, now, dry_run).await {
        Ok(c) => out.actions.push(serde_json::json!({
            "action": if dry_run { "would_checkpoint" } else { "checkpoint" },
            "seq": c.seq,
            "file": c.file.display().to_string(),
            "pruned_rows": c.pruned_rows,
            "anchor_seq": c.anchor_seq,
        })),
        Err(e) => out.fail("audit checkpoint", &e),
    }
    out
}
