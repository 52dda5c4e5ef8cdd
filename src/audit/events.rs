//! Ready-made events for the operations other modules own, so every caller
//! writes the same action names and detail fields. Record them with
//! `audit::commit` in the transaction that makes the change, or with
//! `App::audit_now` when there is no other write (a job run, a config load,
//! an access denial). Hot-path events (token issued, verification failed,
//! API key used/rejected) go through `App::audit_bump` instead (see
//! `aggregate`).

use serde_json::Value;

use super::{Event, action};

/// A re-encryption run starts over `target` (a `[[reencrypt.targets]]`
/// name, or `secrets` for keywarden's own table).
pub fn reencrypt_started(target: &str, to_kid: &str, rows_planned: Option<u64>) -> Event {
    Event::new(action::REENCRYPT_STARTED)
        .target(target)
        .detail("to_kid", to_kid)
        .detail("rows_planned", rows_planned)
}

/// A re-encryption run ended; `outcome` is `ok` or `failed`. Seconds are
/// given as whole milliseconds (no floats in details).
pub fn reencrypt_finished(
    target: &str,
    rows_scanned: u64,
    rows_reencrypted: u64,
    rows_failed: u64,
    elapsed_ms: u64,
) -> Event {
    Event::new(action::REENCRYPT_FINISHED)
        .target(target)
        .outcome(if rows_failed == 0 { "ok" } else { "failed" })
        .detail("rows_scanned", rows_scanned)
        .detail("rows_reencrypted", rows_reencrypted)
        .detail("rows_failed", rows_failed)
        .detail("elapsed_ms", elapsed_ms)
}

/// A key was revoked; `reason` is the operator's text (kept as given: it
/// must not name people; the keys table stores it the same way).
pub fn key_revoked(kid: &str, purpose: &str, from_state: &str, reason: &str) -> Event {
    Event::new(action::KEY_REVOKED)
        .target(kid)
        .detail("purpose", purpose)
        .detail("from", from_state)
        .detail("reason", reason)
}

/// A job run started (`scheduled_at` in unix seconds).
pub fn job_started(job: &str, scheduled_at: i64) -> Event {
    Event::new(action::JOB_STARTED)
        .target(job)
        .detail("scheduled_at", scheduled_at)
}

/// A job run finished; `actions` is what it did. Details hold no floats
/// (their canonical form would differ between writers), so a figure such
/// as a duration in seconds is kept as its decimal text.
pub fn job_finished(job: &str, scheduled_at: i64, actions: Value) -> Event {
    Event::new(action::JOB_FINISHED)
        .target(job)
        .detail("scheduled_at", scheduled_at)
        .detail("actions", floats_as_text(actions))
}

/// `value` with every number that is not an integer replaced by its text.
fn floats_as_text(value: Value) -> Value {
    match value {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => Value::String(n.to_string()),
        Value::Array(items) => Value::Array(items.into_iter().map(floats_as_text).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, floats_as_text(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A job run failed; `error` is the error's message (which never holds a
/// secret: errors name kids and positions, not values).
pub fn job_failed(job: &str, scheduled_at: i64, error: &str) -> Event {
    Event::new(action::JOB_FAILED)
        .target(job)
        .outcome("failed")
        .detail("scheduled_at", scheduled_at)
        .detail("error", error)
}

/// A process loaded its config (`source`: the file path or `defaults`;
/// `sha256`: hex digest of the effective config as `config show` prints it).
pub fn config_loaded(source: &str, sha256: &str) -> Event {
    Event::new(action::CONFIG_LOADED)
        .target(source)
        .detail("sha256", sha256)
}

/// An API key was created; `name_hmac` is `App::redact(name)`.
pub fn apikey_created(
    id: &str,
    name_hmac: &str,
    scopes: &[String],
    expires_at: Option<i64>,
) -> Event {
    Event::new(action::APIKEY_CREATED)
        .target(id)
        .detail("name", name_hmac)
        .detail("scopes", scopes.to_vec())
        .detail("expires_at", expires_at)
}

/// An API key was revoked.
pub fn apikey_revoked(id: &str) -> Event {
    Event::new(action::APIKEY_REVOKED).target(id)
}

/// A request was refused: `what` is the route or command, `reason` a
/// closed-set word (`missing_scope`, `no_key`, ...).
pub fn access_denied(what: &str, reason: &str) -> Event {
    Event::new(action::ACCESS_DENIED)
        .target(what)
        .outcome("denied")
        .detail("reason", reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_events_carry_no_floats_and_the_expected_outcome() {
        let e = reencrypt_finished("secrets", 10, 9, 1, 1500);
        assert_eq!(e.outcome, "failed");
        assert_eq!(e.details["elapsed_ms"], 1500);
        assert_eq!(
            access_denied("/admin/keys", "missing_scope").outcome,
            "denied"
        );
        assert_eq!(job_failed("expire-keys", 0, "db down").action, "job.failed");
        let e = job_finished(
            "reencrypt-secrets",
            0,
            serde_json::json!([{"seconds": 0.25, "rows": 3, "nested": {"v": 1.5}}]),
        );
        assert_eq!(
            e.details["actions"],
            serde_json::json!([{"seconds": "0.25", "rows": 3, "nested": {"v": "1.5"}}])
        );
    }
}
