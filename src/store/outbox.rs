//! The outbox (events waiting to be published to Redis) and the publisher
//! lease that keeps several publishers from sending them out of order.
//!
//! Rows are written by `keys::announce` in the transaction of the change
//! they announce; here they are read in id order and marked published.

use anyhow::Context;
use sqlx::Row;

use super::{Store, from_unix, to_unix};

/// One outbox row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub epoch: i64,
    pub action: String,
    pub kid: String,
    pub purpose: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// How many events wait, and since when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    pub events: i64,
    pub oldest_created_at: Option<chrono::DateTime<chrono::Utc>>,
}

const LEASE: &str = "publisher_lease";

impl Store {
    /// Unpublished events, oldest first.
    pub async fn outbox_unpublished(&self, limit: i64) -> anyhow::Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, epoch, action, kid, purpose, created_at FROM outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .context("reading the outbox")?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    epoch: r.try_get("epoch")?,
                    action: r.try_get("action")?,
                    kid: r.try_get("kid")?,
                    purpose: r.try_get("purpose")?,
                    created_at: from_unix(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    /// Marks these events published.
    pub async fn outbox_mark_published(
        &self,
        ids: &[i64],
        at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for id in ids {
            sqlx::query("UPDATE outbox SET published_at = $1 WHERE id = $2")
                .bind(to_unix(at))
                .bind(*id)
                .execute(&mut *tx)
                .await
                .context("marking an outbox event published")?;
        }
        tx.commit()
            .await
            .context("marking outbox events published")?;
        Ok(())
    }

    /// The events that wait for Redis.
    pub async fn outbox_backlog(&self) -> anyhow::Result<Backlog> {
        let row =
            sqlx::query("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE published_at IS NULL")
                .fetch_one(self.pool())
                .await
                .context("counting the outbox backlog")?;
        Ok(Backlog {
            events: row.try_get(0)?,
            oldest_created_at: row.try_get::<Option<i64>, _>(1)?.map(from_unix),
        })
    }

    /// Takes (or renews) the publisher lease for `holder` until
    /// `expires_ms` (unix milliseconds) if it is free, expired or already
    /// ours at `now_ms`. A compare-and-set on `kw_meta`, so it works the
    /// same on both backends.
    pub async fn try_publisher_lease(
        &self,
        holder: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> anyhow::Result<bool> {
        let current = match self.meta(LEASE).await? {
            Some(v) => v,
            None => {
                sqlx::query(
                    "INSERT INTO kw_meta (name, value) VALUES ($1, '') ON CONFLICT (name) DO NOTHING",
                )
                .bind(LEASE)
                .execute(self.pool())
                .await
                .context("creating the publisher lease")?;
                self.meta(LEASE).await?.unwrap_or_default()
            }
        };
        let free = match current.split_once('|') {
            Some((exp, who)) => who == holder || exp.parse::<i64>().map_or(true, |e| e <= now_ms),
            None => true,
        };
        if !free {
            return Ok(false);
        }
        let done = sqlx::query("UPDATE kw_meta SET value = $1 WHERE name = $2 AND value = $3")
            .bind(format!("{expires_ms}|{holder}"))
            .bind(LEASE)
            .bind(&current)
            .execute(self.pool())
            .await
            .context("taking the publisher lease")?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the publisher lease back if `holder` has it.
    pub async fn release_publisher_lease(&self, holder: &str) -> anyhow::Result<()> {
        let current = self.meta(LEASE).await?.unwrap_or_default();
        if current
            .split_once('|')
            .is_some_and(|(_, who)| who == holder)
        {
            sqlx::query("UPDATE kw_meta SET value = '' WHERE name = $1 AND value = $2")
                .bind(LEASE)
                .bind(&current)
                .execute(self.pool())
                .await
                .context("releasing the publisher lease")?;
        }
        Ok(())
    }
}
