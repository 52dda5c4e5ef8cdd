//! The audit trail: every key operation as a hash-chained row.
//!
//! `chain` is the pure core (canonical form, hashing, verification,
//! checkpoints). This module is the one write path on top of it:
//! [`commit`] (or [`record`] for callers that commit themselves) appends
//! rows in the *caller's* transaction, so a key change and its audit row
//! commit together or not at all (fail closed), and after the commit emits
//! each row as a tracing event with the same content (target
//! `keywarden::audit`; JSON with `--log-format json`).
//!
//! - `keys`: the audit key (wrapped under the root key) from which the
//!   checkpoint, anchor and identifier keys are derived.
//! - `aggregate`: counters for hot-path events (token verification
//!   failures, API key use) flushed as one row per interval and reason.
//! - `checkpoint`: verifying the stored chain, signed checkpoint files,
//!   retention.
//!
//! Names of secrets and people never appear in clear: callers pass them
//! through [`App::redact`] (`hmac:...`), and the operator's user name in the
//! actor is redacted the same way.

pub mod aggregate;
pub mod chain;
pub mod checkpoint;
pub mod events;
pub mod keys;

pub use checkpoint::{checkpoint, verify_store};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::AnyConnection;

use self::chain::{AuditRecord, GENESIS_HASH, NewEvent};
use self::keys::AuditKeys;
use crate::app::App;
use crate::store::Tx;
use crate::store::audit as auditstore;

/// The action names written to `audit_log.action` (README lists them).
pub mod action {
    /// A key was generated (target: its kid).
    pub const KEY_GENERATED: &str = "key.generated";
    /// A key became the active key of its purpose.
    pub const KEY_ACTIVATED: &str = "key.activated";
    /// The active key was demoted by a rotation: it is now retiring.
    pub const KEY_ROTATED: &str = "key.rotated";
    /// A key left `retiring` for `retired`.
    pub const KEY_RETIRED: &str = "key.retired";
    /// A key was revoked (the emergency flow).
    pub const KEY_REVOKED: &str = "key.revoked";
    /// A key's material was erased.
    pub const KEY_DESTROYED: &str = "key.destroyed";
    /// Every key was re-wrapped under a new root key (target: the new root kid).
    pub const KEY_REWRAPPED: &str = "key.rewrapped";
    /// A re-encryption run started.
    pub const REENCRYPT_STARTED: &str = "reencrypt.started";
    /// A re-encryption run finished (details carry the counts).
    pub const REENCRYPT_FINISHED: &str = "reencrypt.finished";
    /// Tokens were issued (aggregated: details.count per interval).
    pub const TOKEN_ISSUED: &str = "token.issued";
    /// Token verifications failed (aggregated per interval and reason).
    pub const TOKEN_VERIFY_FAILED: &str = "token.verify_failed";
    /// An API key was created (target: its id).
    pub const APIKEY_CREATED: &str = "apikey.created";
    /// An API key was used (aggregated per interval).
    pub const APIKEY_USED: &str = "apikey.used";
    /// An API key was revoked.
    pub const APIKEY_REVOKED: &str = "apikey.revoked";
    /// An API key was rejected (aggregated per interval and reason).
    pub const APIKEY_REJECTED: &str = "apikey.rejected";
    /// A request or command was refused for lack of permission.
    pub const ACCESS_DENIED: &str = "access.denied";
    /// A process loaded its config.
    pub const CONFIG_LOADED: &str = "config.loaded";
    /// A job run started / finished / failed (target: the job name).
    pub const JOB_STARTED: &str = "job.started";
    /// See [`JOB_STARTED`].
    pub const JOB_FINISHED: &str = "job.finished";
    /// See [`JOB_STARTED`].
    pub const JOB_FAILED: &str = "job.failed";
    /// A secret was written (target: the secret's name as `hmac:...`).
    pub const SECRET_WRITTEN: &str = "secret.written";
    /// A batch of secrets was imported (details: the count, never names).
    pub const SECRETS_IMPORTED: &str = "secrets.imported";
    /// A checkpoint was written (and retention applied).
    pub const AUDIT_CHECKPOINT: &str = "audit.checkpoint";
    /// A step of the emergency `revoke` flow finished (target: the revoked
    /// kid; details.step names it).
    pub const REVOKE_STEP: &str = "revoke.step";
    /// A key was restored by `keyring import` (target: its kid).
    pub const KEY_IMPORTED: &str = "key.imported";
    /// The critical alert of a revocation was raised (target: the kid).
    pub const REVOKE_ALERTED: &str = "revoke.alerted";
}

/// Who acted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// An operator at the command line: user name (redacted when written)
    /// and host.
    Operator { user: String, host: String },
    /// A worker instance (its `worker.id`).
    Worker(String),
    /// An HTTP client, by API key id.
    ApiKey(String),
}

impl Actor {
    /// The operator running this process: `USER` (or `LOGNAME`, else the
    /// uid) and the host name.
    pub fn operator_from_env() -> Actor {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .ok()
            .filter(|u| !u.is_empty())
            // SAFETY: getuid has no preconditions and cannot fail.
            .unwrap_or_else(|| format!("uid{}", unsafe { libc::getuid() }));
        Actor::Operator {
            user,
            host: hostname(),
        }
    }

    /// The text stored in `audit_log.actor`.
    pub fn render(&self, keys: &AuditKeys) -> String {
        match self {
            Actor::Operator { user, host } => format!("cli:{}@{host}", keys.redact(user)),
            Actor::Worker(id) => format!("worker:{id}"),
            Actor::ApiKey(id) => format!("apikey:{id}"),
        }
    }
}

/// This machine's host name (`unknown-host` if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes
    // at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// An event about to be recorded. Build it with [`Event::new`] and the
/// builder methods; `details` must hold no floats (see `chain`) and no
/// names of secrets or people except as [`App::redact`] output.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub actor: Option<Actor>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub details: Map<String, Value>,
}

impl Event {
    /// An event with outcome `ok`, no target and no details, by the
    /// process's default actor.
    pub fn new(action: &str) -> Event {
        Event {
            actor: None,
            action: action.to_string(),
            target: None,
            outcome: "ok".into(),
            details: Map::new(),
        }
    }

    /// The kid or object acted on.
    pub fn target(mut self, target: impl Into<String>) -> Event {
        self.target = Some(target.into());
        self
    }

    /// How it ended: `ok`, `failed`, `denied`, ...
    pub fn outcome(mut self, outcome: &str) -> Event {
        self.outcome = outcome.to_string();
        self
    }

    /// Adds one detail (integers, strings, booleans, arrays, objects).
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.details.insert(key.to_string(), value.into());
        self
    }

    /// Acts for someone other than the process default (an HTTP client).
    pub fn by(mut self, actor: Actor) -> Event {
        self.actor = Some(actor);
        self
    }
}

/// Audit state held by the [`App`]: the audit keys once loaded, the
/// default actor and the hot-path counters.
pub struct AuditState {
    keys: tokio::sync::OnceCell<AuditKeys>,
    actor: std::sync::Mutex<Actor>,
    /// Counters for aggregated events (see `aggregate`).
    pub counters: aggregate::Counters,
}

impl AuditState {
    /// State whose events are by `actor` unless an event says otherwise.
    pub fn new(actor: Actor) -> AuditState {
        AuditState {
            keys: tokio::sync::OnceCell::new(),
            actor: std::sync::Mutex::new(actor),
            counters: aggregate::Counters::default(),
        }
    }
}

impl std::fmt::Debug for AuditState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditState { .. }")
    }
}

impl App {
    /// Makes `actor` the default actor of this process's events (the
    /// worker sets `Actor::Worker(id)` at start).
    pub fn set_audit_actor(&self, actor: Actor) {
        *self.audit.actor.lock().unwrap_or_else(|e| e.into_inner()) = actor;
    }

    /// The audit keys, loaded (or created on first use) through the pool.
    /// Do not call while holding a write transaction on SQLite: creating
    /// the key would wait on that transaction; [`record`] loads them through
    /// the transaction's own connection instead.
    pub async fn audit_keys(&self) -> anyhow::Result<&AuditKeys> {
        self.audit
            .keys
            .get_or_try_init(|| keys::load_or_create(&self.store, &self.roots))
            .await
    }

    async fn audit_keys_in(&self, conn: &mut AnyConnection) -> anyhow::Result<&AuditKeys> {
        if let Some(k) = self.audit.keys.get() {
            return Ok(k);
        }
        let loaded = keys::load_or_create_in(conn, &self.roots).await?;
        Ok(self.audit.keys.get_or_init(|| async { loaded }).await)
    }

    /// A name of a secret or person as it may appear in the audit log:
    /// `hmac:` + a keyed HMAC (`keywarden audit hmac` computes the same).
    pub async fn redact(&self, value: &str) -> anyhow::Result<String> {
        Ok(self.audit_keys().await?.redact(value))
    }

    /// Records `events` in a transaction of their own (for events that go
    /// with no other write: config loaded, job runs, access denied, flushed
    /// counters).
    pub async fn audit_now(
        &self,
        events: Vec<Event>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Vec<AuditRecord>> {
        self.audit_keys().await?;
        let tx = self.store.begin().await?;
        commit(self, tx, events, now).await
    }

    /// Records that this process loaded its config from `source` (what
    /// `Config::load_with_source` said). The digest is of the redacted
    /// config, so it shows whether two workers run the same settings
    /// without making a password guessable from the log.
    pub async fn audit_config_loaded(
        &self,
        source: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let text = self.config.to_redacted_toml();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
        self.audit_now(
            vec![events::config_loaded(source, &hex::encode(digest.as_ref()))],
            now,
        )
        .await?;
        Ok(())
    }
}

/// Appends one event to the chain in the caller's transaction and returns
/// the sealed row (not yet logged: call [`emit`] after the commit, or use
/// [`commit`]). Takes the audit writer lock, so call it as the last write
/// of the transaction to keep the lock short.
pub async fn record(
    conn: &mut AnyConnection,
    app: &App,
    event: Event,
    now: DateTime<Utc>,
) -> anyhow::Result<AuditRecord> {
    let mut out = record_all(conn, app, vec![event], now).await?;
    Ok(out.pop().expect("one event makes one row"))
}

/// Appends several events in order (one lock, one head read), in the
/// caller's transaction; see [`record`].
pub async fn record_all(
    conn: &mut AnyConnection,
    app: &App,
    events: Vec<Event>,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<AuditRecord>> {
    for e in &events {
        anyhow::ensure!(
            !e.details.values().any(has_float),
            "audit event {} carries a floating-point detail (only integers are allowed)",
            e.action
        );
    }
    // SQLite's BEGIN IMMEDIATE (`Store::begin`) already holds the one write
    // lock; PostgreSQL needs the row lock to serialise writers.
    if app.store.backend() == crate::store::Backend::Postgres {
        auditstore::lock_head(conn).await?;
    }
    let keys = app.audit_keys_in(conn).await?;
    let (mut seq, mut prev_hash) = match auditstore::head(conn).await? {
        Some(head) => head,
        None => match auditstore::meta_in(conn, auditstore::ANCHOR_META).await? {
            Some(json) => {
                let anchor: chain::Checkpoint =
                    serde_json::from_str(&json).context("reading the audit retention anchor")?;
                (anchor.seq, anchor.head_hash)
            }
            None => (0, GENESIS_HASH.to_string()),
        },
    };
    let default_actor = app
        .audit
        .actor
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .render(keys);
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let actor = match &event.actor {
            Some(a) => a.render(keys),
            None => default_actor.clone(),
        };
        seq += 1;
        let rec = chain::seal(
            seq,
            &prev_hash,
            NewEvent {
                at_ms: now.timestamp_millis(),
                actor,
                action: event.action,
                target: event.target,
                outcome: event.outcome,
                details: Value::Object(event.details),
            },
        );
        auditstore::insert(conn, &rec)
            .await
            .with_context(|| format!("recording the audit event {}", rec.action))?;
        prev_hash = rec.hash.clone();
        out.push(rec);
    }
    Ok(out)
}

/// The context of every error from writing audit rows: a caller (the job
/// runner) finds it with `err.downcast_ref::<AuditUnwritable>()` and raises
/// the `audit_write_failed` alert.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the audit log could not be written, so nothing was changed")]
pub struct AuditUnwritable;

/// Records `events` as the last writes of `tx`, commits, then logs them.
/// If any row cannot be written the transaction rolls back and the whole
/// operation fails: nothing happens without its audit row.
pub async fn commit(
    app: &App,
    mut tx: Tx,
    events: Vec<Event>,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<AuditRecord>> {
    let out = record_all(&mut tx, app, events, now)
        .await
        .context(AuditUnwritable)?;
    tx.commit().await.context("committing")?;
    for r in &out {
        emit(r);
    }
    Ok(out)
}

/// Logs a committed row as a tracing event (target `keywarden::audit`) with
/// the same content as the row.
pub fn emit(r: &AuditRecord) {
    let details = serde_json::to_string(&r.details).unwrap_or_default();
    tracing::event!(
        target: "keywarden::audit",
        tracing::Level::INFO,
        audit.seq = r.seq,
        audit.at_ms = r.at_ms,
        audit.actor = r.actor.as_str(),
        audit.action = r.action.as_str(),
        audit.target = r.target.as_deref(),
        audit.outcome = r.outcome.as_str(),
        audit.details = details.as_str(),
        audit.hash = r.hash.as_str(),
        "audit #{} {} {} {}",
        r.seq,
        r.action,
        r.target.as_deref().unwrap_or("-"),
        r.outcome
    );
}

/// The tracing target of audit events.
pub const AUDIT_TARGET: &str = "keywarden::audit";

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => !(n.is_i64() || n.is_u64()),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_found_at_any_depth() {
        assert!(!has_float(
            &serde_json::json!({"a": [1, -2, "x"], "b": {"c": true}})
        ));
        assert!(has_float(&serde_json::json!({"a": [1, {"b": 1.5}]})));
    }

    #[test]
    fn the_operator_name_is_redacted_in_the_actor() {
        let keys = AuditKeys::from_secret(&[7u8; 32]);
        let a = Actor::Operator {
            user: "alice".into(),
            host: "box".into(),
        };
        let shown = a.render(&keys);
        assert!(
            shown.starts_with("cli:hmac:") && shown.ends_with("@box"),
            "{shown}"
        );
        assert!(!shown.contains("alice"));
        assert_eq!(Actor::Worker("w1".into()).render(&keys), "worker:w1");
    }
}
