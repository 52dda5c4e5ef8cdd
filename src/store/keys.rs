//! The `keys` table and the keyring epoch with its outbox.
//!
//! Every key change goes through a transaction that also bumps the epoch and
//! writes outbox rows, so a change and its announcement commit together.

use anyhow::Context;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{Store, from_unix, to_unix};
use crate::crypto::rootkey::Wrapped;
use crate::keyring::{KeyMeta, KeyState, Purpose};

/// A key as stored: its metadata and its wrapped material.
#[derive(Clone, Debug)]
pub struct StoredKey {
    pub meta: KeyMeta,
    pub wrapped: Wrapped,
    pub revoked_reason: Option<String>,
}

const KEY_COLUMNS: &str = "kid, purpose, algorithm, state, version, wrapped, root_kid, row_mac, \
     created_at, activated_at, rotate_after, retire_after, revoked_at, revoked_reason";

fn opt_time(v: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    v.map(from_unix)
}

fn row_to_key(row: &AnyRow) -> anyhow::Result<StoredKey> {
    let kid: String = row.try_get("kid")?;
    let parse_err = |what: &str| format!("key {kid}: unreadable {what} in the store");
    let purpose: String = row.try_get("purpose")?;
    let algorithm: String = row.try_get("algorithm")?;
    let state: String = row.try_get("state")?;
    Ok(StoredKey {
        meta: KeyMeta {
            purpose: purpose.parse().with_context(|| parse_err("purpose"))?,
            algorithm: algorithm.parse().with_context(|| parse_err("algorithm"))?,
            state: state.parse().with_context(|| parse_err("state"))?,
            version: row.try_get("version")?,
            created_at: from_unix(row.try_get("created_at")?),
            activated_at: opt_time(row.try_get("activated_at")?),
            rotate_after: opt_time(row.try_get("rotate_after")?),
            retire_after: opt_time(row.try_get("retire_after")?),
            revoked_at: opt_time(row.try_get("revoked_at")?),
            kid: kid.clone(),
        },
        wrapped: Wrapped {
            token: row.try_get("wrapped")?,
            root_kid: row.try_get("root_kid")?,
            row_mac: row.try_get("row_mac")?,
        },
        revoked_reason: row.try_get("revoked_reason")?,
    })
}

impl Store {
    /// Every key, optionally of one purpose, ordered by purpose and newest
    /// version first.
    pub async fn list_keys(&self, purpose: Option<Purpose>) -> anyhow::Result<Vec<StoredKey>> {
        let rows = match purpose {
            Some(p) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM keys WHERE purpose = $1 ORDER BY version DESC"
                )))
                .bind(p.as_str())
                .fetch_all(self.pool())
                .await
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM keys ORDER BY purpose, version DESC"
                )))
                .fetch_all(self.pool())
                .await
            }
        }
        .context("reading keys")?;
        rows.iter().map(row_to_key).collect()
    }

    /// One key by kid.
    pub async fn key(&self, kid: &str) -> anyhow::Result<Option<StoredKey>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE kid = $1"
        )))
        .bind(kid)
        .fetch_optional(self.pool())
        .await
        .context("reading a key")?;
        row.as_ref().map(row_to_key).transpose()
    }

    /// When each destroyed key's material was erased: kid -> time. Read
    /// apart from [`StoredKey`] (which has no such field) for the export.
    pub async fn destroyed_times(
        &self,
    ) -> anyhow::Result<std::collections::HashMap<String, chrono::DateTime<chrono::Utc>>> {
        let rows = sqlx::query("SELECT kid, destroyed_at FROM keys WHERE destroyed_at IS NOT NULL")
            .fetch_all(self.pool())
            .await
            .context("reading destruction times")?;
        rows.iter()
            .map(|r| Ok((r.try_get("kid")?, from_unix(r.try_get("destroyed_at")?))))
            .collect()
    }

    /// The current keyring epoch (0 before any change).
    pub async fn epoch(&self) -> anyhow::Result<i64> {
        Ok(self
            .meta("epoch")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }
}

/// Keys of one purpose, read inside a transaction.
pub async fn keys_of_purpose(
    conn: &mut AnyConnection,
    purpose: Purpose,
) -> anyhow::Result<Vec<StoredKey>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {KEY_COLUMNS} FROM keys WHERE purpose = $1 ORDER BY version DESC"
    )))
    .bind(purpose.as_str())
    .fetch_all(&mut *conn)
    .await
    .context("reading keys")?;
    rows.iter().map(row_to_key).collect()
}

/// The next version number of a purpose.
pub async fn next_version(conn: &mut AnyConnection, purpose: Purpose) -> anyhow::Result<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM keys WHERE purpose = $1")
        .bind(purpose.as_str())
        .fetch_one(&mut *conn)
        .await
        .context("reading key versions")?;
    Ok(row.try_get::<i64, _>(0)? + 1)
}

/// Inserts a new key row.
pub async fn insert_key(conn: &mut AnyConnection, key: &StoredKey) -> anyhow::Result<()> {
    let m = &key.meta;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    )))
    .bind(&m.kid)
    .bind(m.purpose.as_str())
    .bind(m.algorithm.as_str())
    .bind(m.state.as_str())
    .bind(m.version)
    .bind(key.wrapped.token.clone())
    .bind(&key.wrapped.root_kid)
    .bind(&key.wrapped.row_mac)
    .bind(to_unix(m.created_at))
    .bind(m.activated_at.map(to_unix))
    .bind(m.rotate_after.map(to_unix))
    .bind(m.retire_after.map(to_unix))
    .bind(m.revoked_at.map(to_unix))
    .bind(key.revoked_reason.clone())
    .execute(&mut *conn)
    .await
    .with_context(|| format!("storing key {}", m.kid))?;
    Ok(())
}

/// Moves a key from `from` to `to`, setting the timestamps that go with the
/// new state, only if it is still in `from` (compare-and-set). Returns
/// whether the row changed. The transition itself is checked by the caller
/// with `KeyState::transition`.
pub async fn set_state(
    conn: &mut AnyConnection,
    kid: &str,
    from: KeyState,
    to: KeyState,
    at: chrono::DateTime<chrono::Utc>,
    retire_after: Option<chrono::DateTime<chrono::Utc>>,
    reason: Option<&str>,
) -> anyhow::Result<bool> {
    from.transition(to)?;
    let at = to_unix(at);
    let query = match to {
        KeyState::Active => sqlx::query(
            "UPDATE keys SET state = 'active', activated_at = $1 WHERE kid = $2 AND state = $3",
        )
        .bind(at),
        KeyState::Retiring => sqlx::query(
            "UPDATE keys SET state = 'retiring', retire_after = $1 WHERE kid = $2 AND state = $3",
        )
        .bind(retire_after.map(to_unix)),
        KeyState::Revoked => sqlx::query(
            "UPDATE keys SET state = 'revoked', revoked_at = $1, revoked_reason = $4 WHERE kid = $2 AND state = $3",
        )
        .bind(at),
        KeyState::Retired => {
            sqlx::query("UPDATE keys SET state = 'retired' WHERE kid = $1 AND state = $2")
        }
        KeyState::Pending | KeyState::Destroyed => {
            anyhow::bail!("set_state cannot move a key to {to}")
        }
    };
    let query = query.bind(kid).bind(from.as_str());
    let query = if to == KeyState::Revoked {
        query.bind(reason.unwrap_or("").to_string())
    } else {
        query
    };
    let done = query
        .execute(&mut *conn)
        .await
        .with_context(|| format!("changing key {kid} from {from} to {to}"))?;
    Ok(done.rows_affected() == 1)
}

/// Erases a key's material (keeping the row for the audit trail).
pub async fn destroy_key(
    conn: &mut AnyConnection,
    kid: &str,
    from: KeyState,
    marker: &Wrapped,
    at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<bool> {
    from.transition(KeyState::Destroyed)?;
    let done = sqlx::query(
        "UPDATE keys SET state = 'destroyed', wrapped = NULL, root_kid = $1, row_mac = $2, destroyed_at = $3 \
         WHERE kid = $4 AND state = $5",
    )
    .bind(&marker.root_kid)
    .bind(&marker.row_mac)
    .bind(to_unix(at))
    .bind(kid)
    .bind(from.as_str())
    .execute(&mut *conn)
    .await
    .with_context(|| format!("destroying key {kid}"))?;
    Ok(done.rows_affected() == 1)
}

/// Sets when a destroyed key's material was erased (`keyring import`
/// restoring an exported `destroyed_at`).
pub async fn set_destroyed_at(
    conn: &mut AnyConnection,
    kid: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    sqlx::query("UPDATE keys SET destroyed_at = $1 WHERE kid = $2")
        .bind(to_unix(at))
        .bind(kid)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("restoring when key {kid} was destroyed"))?;
    Ok(())
}

/// Replaces a key's wrapping (root key rotation).
pub async fn set_wrapped(
    conn: &mut AnyConnection,
    kid: &str,
    old: &Wrapped,
    new: &Wrapped,
) -> anyhow::Result<bool> {
    let done = sqlx::query(
        "UPDATE keys SET wrapped = $1, root_kid = $2, row_mac = $3 WHERE kid = $4 AND row_mac = $5",
    )
    .bind(new.token.clone())
    .bind(&new.root_kid)
    .bind(&new.row_mac)
    .bind(kid)
    .bind(&old.row_mac)
    .execute(&mut *conn)
    .await
    .with_context(|| format!("re-wrapping key {kid}"))?;
    Ok(done.rows_affected() == 1)
}

/// Bumps the keyring epoch and records one outbox event per change, in the
/// caller's transaction. Returns the new epoch.
pub async fn announce(
    conn: &mut AnyConnection,
    events: &[(&str, &str, Purpose)],
    at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<i64> {
    sqlx::query(
        "INSERT INTO kw_meta (name, value) VALUES ('epoch', '0') ON CONFLICT (name) DO NOTHING",
    )
    .execute(&mut *conn)
    .await
    .context("initialising the keyring epoch")?;
    let row = sqlx::query("SELECT value FROM kw_meta WHERE name = 'epoch'")
        .fetch_one(&mut *conn)
        .await
        .context("reading the keyring epoch")?;
    let epoch: i64 = row.get::<String, _>(0).parse().unwrap_or(0) + 1;
    sqlx::query("UPDATE kw_meta SET value = $1 WHERE name = 'epoch'")
        .bind(epoch.to_string())
        .execute(&mut *conn)
        .await
        .context("bumping the keyring epoch")?;
    for (action, kid, purpose) in events {
        sqlx::query(
            "INSERT INTO outbox (epoch, action, kid, purpose, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(epoch)
        .bind(*action)
        .bind(*kid)
        .bind(purpose.as_str())
        .bind(to_unix(at))
        .execute(&mut *conn)
        .await
        .context("writing an outbox event")?;
    }
    Ok(epoch)
}
