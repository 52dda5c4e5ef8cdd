//! `kind = "audit-checkpoint"`: verifies the audit chain, writes a signed
//! checkpoint and applies retention.

use chrono::{DateTime, Utc};

use super::{JobOutcome, not_available};
use crate::app::App;

/// HOOK (audit issue): verify the chain, write the checkpoint and prune past
/// `audit.retention` here; report `{"action": "checkpoint", "rows", "head"}`
/// and fail the outcome when the chain is broken.
pub async fn run(_app: &App, _now: DateTime<Utc>, _dry_run: bool) -> JobOutcome {
    JobOutcome::ok(vec![not_available("audit checkpoint")])
}
