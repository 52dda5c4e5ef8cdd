//! The `secrets` table: application secrets stored as Fernet tokens, each
//! with the kid of the data key that made it.

use anyhow::Context;
use sqlx::Row;

use super::{Store, from_unix};

/// A secret as stored (its value is only ever the Fernet token).
#[derive(Clone, Debug)]
pub struct StoredSecret {
    pub id: i64,
    pub name: String,
    pub kid: String,
    pub token: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// One row to write: name, kid, token.
pub struct NewSecret {
    pub name: String,
    pub kid: String,
    pub token: String,
}

/// How many rows one multi-row INSERT carries: 5 parameters a row stays far
/// below SQLite's and PostgreSQL's parameter limits.
const ROWS_PER_STATEMENT: usize = 500;

impl Store {
    /// Writes (inserts or replaces) secrets, all in one transaction.
    pub async fn put_secrets(&self, rows: &[NewSecret], now: i64) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        put_secrets_in(&mut tx, rows, now).await?;
        tx.commit().await.context("committing secrets")?;
        Ok(())
    }

    /// One secret by name.
    pub async fn secret(&self, name: &str) -> anyhow::Result<Option<StoredSecret>> {
        let row = sqlx::query(
            "SELECT id, name, kid, token, created_at, updated_at FROM secrets WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .context("reading a secret")?;
        row.map(|r| -> anyhow::Result<StoredSecret> {
            Ok(StoredSecret {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                kid: r.try_get("kid")?,
                token: r.try_get("token")?,
                created_at: from_unix(r.try_get("created_at")?),
                updated_at: from_unix(r.try_get("updated_at")?),
            })
        })
        .transpose()
    }

    /// Names, kids and times of every secret (no tokens), by name.
    pub async fn list_secrets(&self) -> anyhow::Result<Vec<StoredSecret>> {
        let rows = sqlx::query(
            "SELECT id, name, kid, '' AS token, created_at, updated_at FROM secrets ORDER BY name",
        )
        .fetch_all(self.pool())
        .await
        .context("listing secrets")?;
        rows.iter()
            .map(|r| {
                Ok(StoredSecret {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    kid: r.try_get("kid")?,
                    token: String::new(),
                    created_at: from_unix(r.try_get("created_at")?),
                    updated_at: from_unix(r.try_get("updated_at")?),
                })
            })
            .collect()
    }
}

/// Writes (inserts or replaces) secrets inside the caller's transaction
/// (so their audit row commits with them).
pub async fn put_secrets_in(
    conn: &mut sqlx::AnyConnection,
    rows: &[NewSecret],
    now: i64,
) -> anyhow::Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("INSERT INTO secrets (name, kid, token, created_at, updated_at) VALUES ");
        for i in 0..chunk.len() {
            let b = i * 5;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5
            ));
        }
        sql.push_str(
            " ON CONFLICT (name) DO UPDATE SET kid = excluded.kid, token = excluded.token, \
             updated_at = excluded.updated_at",
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(r.name.as_str())
                .bind(r.kid.as_str())
                .bind(r.token.as_str())
                .bind(now)
                .bind(now);
        }
        q.execute(&mut *conn).await.context("writing secrets")?;
    }
    Ok(())
}
