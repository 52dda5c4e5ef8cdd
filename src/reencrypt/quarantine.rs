//! The quarantine: rows no usable data key decrypts, recorded in
//! keywarden's store (target, id, kid, reason; never the token), left
//! untouched in their table and skipped by later passes until an operator
//! clears them.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use sqlx::Row;

use crate::store::Store;

/// One row to quarantine.
#[derive(Clone, Debug)]
pub struct Quarantined {
    pub row_id: String,
    pub kid: Option<String>,
    pub reason: String,
}

/// Records rows (or refreshes their reason and `last_seen`).
pub async fn record(
    store: &Store,
    target: &str,
    rows: &[Quarantined],
    now_unix: i64,
) -> anyhow::Result<()> {
    let mut tx = store.begin().await?;
    for r in rows {
        sqlx::query(
            "INSERT INTO reencrypt_quarantine (target, row_id, kid, reason, first_seen, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (target, row_id) DO UPDATE SET kid = excluded.kid, reason = excluded.reason, \
             last_seen = excluded.last_seen",
        )
        .bind(target)
        .bind(r.row_id.as_str())
        .bind(r.kid.clone())
        .bind(r.reason.as_str())
        .bind(now_unix)
        .execute(&mut *tx)
        .await
        .context("recording a quarantined row")?;
    }
    tx.commit().await.context("committing quarantined rows")?;
    Ok(())
}

/// The ids quarantined in `target`.
pub async fn ids(store: &Store, target: &str) -> anyhow::Result<HashSet<String>> {
    let rows = sqlx::query("SELECT row_id FROM reencrypt_quarantine WHERE target = $1")
        .bind(target)
        .fetch_all(store.pool())
        .await
        .context("reading the quarantine")?;
    rows.iter()
        .map(|r| Ok(r.try_get::<String, _>(0)?))
        .collect()
}

/// Quarantined rows per target.
pub async fn counts(store: &Store) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows = sqlx::query("SELECT target, COUNT(*) FROM reencrypt_quarantine GROUP BY target")
        .fetch_all(store.pool())
        .await
        .context("counting quarantined rows")?;
    rows.iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64)))
        .collect()
}

/// A quarantined row as listed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Entry {
    pub target: String,
    pub row_id: String,
    pub kid: Option<String>,
    pub reason: String,
    pub first_seen: chrono::DateTime<chrono::Utc>,
    pub last_seen: chrono::DateTime<chrono::Utc>,
}

/// Every quarantined row, by target and id.
pub async fn list(store: &Store) -> anyhow::Result<Vec<Entry>> {
    let rows = sqlx::query(
        "SELECT target, row_id, kid, reason, first_seen, last_seen FROM reencrypt_quarantine \
         ORDER BY target, row_id",
    )
    .fetch_all(store.pool())
    .await
    .context("reading the quarantine")?;
    rows.iter()
        .map(|r| {
            Ok(Entry {
                target: r.try_get(0)?,
                row_id: r.try_get(1)?,
                kid: r.try_get(2)?,
                reason: r.try_get(3)?,
                first_seen: crate::store::from_unix(r.try_get(4)?),
                last_seen: crate::store::from_unix(r.try_get(5)?),
            })
        })
        .collect()
}

/// Clears the quarantine of some targets (all when `None`) so the next
/// pass tries those rows again; returns how many were cleared.
pub async fn clear(store: &Store, targets: Option<&[String]>) -> anyhow::Result<u64> {
    let done = match targets {
        None => sqlx::query("DELETE FROM reencrypt_quarantine")
            .execute(store.pool())
            .await
            .context("clearing the quarantine")?,
        Some(names) => {
            let mut n = 0;
            for name in names {
                n += sqlx::query("DELETE FROM reencrypt_quarantine WHERE target = $1")
                    .bind(name.as_str())
                    .execute(store.pool())
                    .await
                    .context("clearing the quarantine")?
                    .rows_affected();
            }
            return Ok(n);
        }
    };
    Ok(done.rows_affected())
}
