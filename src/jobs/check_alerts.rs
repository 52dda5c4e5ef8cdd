//! `kind = "check-alerts"`: evaluates the alert rules and notifies on a
//! state change.

use chrono::{DateTime, Utc};

use super::{JobOutcome, not_available};
use crate::app::App;

/// HOOK (alerts issue): evaluate the rules at `now` here and report one
/// action per rule that changed state (`{"action": "fire" | "resolve",
/// "rule", "value", "threshold"}`); a failing channel is an action, not a
/// failed job (a failing channel never blocks a rotation).
pub async fn run(_app: &App, _now: DateTime<Utc>, _dry_run: bool) -> JobOutcome {
    JobOutcome::ok(vec![not_available("alert rules")])
}
