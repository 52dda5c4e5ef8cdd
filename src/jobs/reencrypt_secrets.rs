//! `kind = "reencrypt-secrets"`: moves rows still under a non-active data
//! key to the active one, in batches, resumably; a key left protecting no
//! row retires at the next `expire-keys` tick.

use std::num::NonZeroU32;

use chrono::{DateTime, Utc};

use super::{JobOutcome, not_available};
use crate::app::App;

/// HOOK (re-encryption issue): call the engine here, limited to `target`
/// (a `[[reencrypt.targets]]` name; `None` = keywarden's own secrets and
/// every target), `batch_size` rows at a time (`None` = the config's
/// `reencrypt.batch_size`). Report per target `{"action": "reencrypt",
/// "target", "rows_scanned", "rows_reencrypted", "rows_failed"}` (in a dry
/// run `would_reencrypt` with the rows that would move) and fail the outcome
/// if any row failed. Between batches, stop when
/// `crate::scheduler::worker::shutdown_requested()` says the worker is
/// shutting down (the next tick resumes).
pub async fn run(
    _app: &App,
    target: Option<&str>,
    batch_size: Option<NonZeroU32>,
    _now: DateTime<Utc>,
    _dry_run: bool,
) -> JobOutcome {
    let mut action = not_available("re-encryption engine");
    action["target"] = serde_json::json!(target);
    action["batch_size"] = serde_json::json!(batch_size.map(NonZeroU32::get));
    JobOutcome::ok(vec![action])
}
