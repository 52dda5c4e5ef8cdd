//! The `audit_log` table and the audit rows of `kw_meta` (`audit_lock`,
//! `audit_anchor`, `audit_key`).
//!
//! Rows are written only through `crate::audit::record`, inside the caller's
//! transaction, after `lock_head`: that row lock (PostgreSQL) or the
//! `BEGIN IMMEDIATE` write lock (SQLite) is what keeps `seq` gap-free and
//! the chain linear when several processes write at once.

use anyhow::Context;
use futures_util::TryStreamExt;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::Store;
use crate::audit::chain::AuditRecord;

/// `kw_meta` name of the signed retention anchor (JSON of a `Checkpoint`).
pub const ANCHOR_META: &str = "audit_anchor";
/// `kw_meta` name of the wrapped audit key.
pub const KEY_META: &str = "audit_key";
/// `kw_meta` name of the row every writer locks.
const LOCK_META: &str = "audit_lock";

const COLUMNS: &str = "seq, at_ms, actor, action, target, outcome, details, prev_hash, hash";

/// Maps a row; `details` that no longer parse as JSON (a tampered byte) are
/// kept as a JSON string so the row still reaches the verifier, which then
/// reports it as changed.
fn row_to_record(row: &AnyRow) -> anyhow::Result<AuditRecord> {
    let details: String = row.try_get("details")?;
    let details =
        serde_json::from_str(&details).unwrap_or(serde_json::Value::String(details.clone()));
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        at_ms: row.try_get("at_ms")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        outcome: row.try_get("outcome")?,
        details,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// Takes the audit writer lock for the rest of the transaction (used on
/// PostgreSQL; on SQLite `BEGIN IMMEDIATE` is the lock): the `UPDATE` holds
/// the row lock until commit, so a second writer waits here and then reads
/// the head the first one wrote.
pub async fn lock_head(conn: &mut AnyConnection) -> anyhow::Result<()> {
    let done = sqlx::query("UPDATE kw_meta SET value = value WHERE name = $1")
        .bind(LOCK_META)
        .execute(&mut *conn)
        .await
        .context("locking the audit log head")?;
    if done.rows_affected() == 0 {
        sqlx::query(
            "INSERT INTO kw_meta (name, value) VALUES ($1, '0') ON CONFLICT (name) DO UPDATE \
             SET value = kw_meta.value",
        )
        .bind(LOCK_META)
        .execute(&mut *conn)
        .await
        .context("locking the audit log head")?;
    }
    Ok(())
}

/// The newest row's seq and hash, if the table has rows.
pub async fn head(conn: &mut AnyConnection) -> anyhow::Result<Option<(i64, String)>> {
    let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await
        .context("reading the audit log head")?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// A `kw_meta` value read inside a transaction.
pub async fn meta_in(conn: &mut AnyConnection, name: &str) -> anyhow::Result<Option<String>> {
    let row = sqlx::query("SELECT value FROM kw_meta WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .context("reading store metadata")?;
    row.map(|r| Ok(r.try_get(0)?)).transpose()
}

/// Writes a `kw_meta` value inside a transaction.
pub async fn set_meta_in(conn: &mut AnyConnection, name: &str, value: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO kw_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE \
         SET value = excluded.value",
    )
    .bind(name)
    .bind(value)
    .execute(&mut *conn)
    .await
    .context("writing store metadata")?;
    Ok(())
}

/// Appends one sealed row.
pub async fn insert(conn: &mut AnyConnection, r: &AuditRecord) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(r.seq)
    .bind(r.at_ms)
    .bind(r.actor.as_str())
    .bind(r.action.as_str())
    .bind(r.target.as_deref())
    .bind(r.outcome.as_str())
    .bind(serde_json::to_string(&r.details)?)
    .bind(r.prev_hash.as_str())
    .bind(r.hash.as_str())
    .execute(&mut *conn)
    .await
    .context("writing the audit row")?;
    Ok(())
}

/// One row by seq, inside a transaction.
pub async fn row_in(conn: &mut AnyConnection, seq: i64) -> anyhow::Result<Option<AuditRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM audit_log WHERE seq = $1"
    )))
    .bind(seq)
    .fetch_optional(&mut *conn)
    .await
    .context("reading an audit row")?;
    row.as_ref().map(row_to_record).transpose()
}

/// The newest seq at or before `seq_max` whose time is before `before_ms`.
pub async fn last_seq_before(
    conn: &mut AnyConnection,
    before_ms: i64,
    seq_max: i64,
) -> anyhow::Result<Option<i64>> {
    let row = sqlx::query("SELECT MAX(seq) FROM audit_log WHERE at_ms < $1 AND seq <= $2")
        .bind(before_ms)
        .bind(seq_max)
        .fetch_one(&mut *conn)
        .await
        .context("reading the audit log")?;
    Ok(row.try_get::<Option<i64>, _>(0)?)
}

/// Deletes every row up to and including `seq`; returns how many went.
pub async fn delete_through(conn: &mut AnyConnection, seq: i64) -> anyhow::Result<u64> {
    let done = sqlx::query("DELETE FROM audit_log WHERE seq <= $1")
        .bind(seq)
        .execute(&mut *conn)
        .await
        .context("pruning the audit log")?;
    Ok(done.rows_affected())
}

/// Which rows `export` and `tail` read.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only rows at or after this time (unix milliseconds).
    pub since_ms: Option<i64>,
    /// Only this action, or actions under this prefix when it ends with `.`
    /// or `*` (`key.` matches `key.rotated`).
    pub action: Option<String>,
    /// Only rows whose target is this kid or object.
    pub target: Option<String>,
}

impl Store {
    /// Streams rows in seq order to `each` (constant memory whatever the
    /// table's size); stops early when `each` returns false.
    pub async fn audit_rows(
        &self,
        filter: &Filter,
        mut each: impl FnMut(AuditRecord) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let mut sql = format!("SELECT {COLUMNS} FROM audit_log WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        let action_prefix = filter
            .action
            .as_deref()
            .and_then(|a| a.strip_suffix('*').or(a.ends_with('.').then_some(a)));
        if filter.since_ms.is_some() {
            sql.push_str(&format!(" AND at_ms >= ${}", next()));
        }
        if filter.action.is_some() {
            if action_prefix.is_some() {
                sql.push_str(&format!(" AND action LIKE ${} ESCAPE '!'", next()));
            } else {
                sql.push_str(&format!(" AND action = ${}", next()));
            }
        }
        if filter.target.is_some() {
            sql.push_str(&format!(" AND target = ${}", next()));
        }
        sql.push_str(" ORDER BY seq");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(s) = filter.since_ms {
            q = q.bind(s);
        }
        if let Some(a) = &filter.action {
            match action_prefix {
                Some(p) => {
                    let escaped = p.replace('!', "!!").replace('%', "!%").replace('_', "!_");
                    q = q.bind(format!("{escaped}%"))
                }
                None => q = q.bind(a.clone()),
            }
        }
        if let Some(t) = &filter.target {
            q = q.bind(t.clone());
        }
        let mut rows = q.fetch(self.pool());
        while let Some(row) = rows.try_next().await.context("reading the audit log")? {
            if !each(row_to_record(&row)?)? {
                break;
            }
        }
        Ok(())
    }

    /// The last `n` rows, oldest first.
    pub async fn audit_tail(&self, n: i64) -> anyhow::Result<Vec<AuditRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT $1"
        )))
        .bind(n)
        .fetch_all(self.pool())
        .await
        .context("reading the audit log")?;
        let mut out = rows
            .iter()
            .map(row_to_record)
            .collect::<anyhow::Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    /// How many rows the table holds, and the newest seq.
    pub async fn audit_count(&self) -> anyhow::Result<(i64, Option<i64>)> {
        let row = sqlx::query("SELECT COUNT(*), MAX(seq) FROM audit_log")
            .fetch_one(self.pool())
            .await
            .context("reading the audit log")?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
}
