//! The token denylist and keywarden's API keys.

use anyhow::Context;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, from_unix};

/// An API key as stored: never the key, only its SHA-256.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApiKeyRow {
    pub id: String,
    #[serde(skip)]
    pub hash: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn row_to_api_key(r: &AnyRow) -> anyhow::Result<ApiKeyRow> {
    let scopes: String = r.try_get("scopes")?;
    Ok(ApiKeyRow {
        id: r.try_get("id")?,
        hash: r.try_get("hash")?,
        name: r.try_get("name")?,
        scopes: scopes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        created_at: from_unix(r.try_get("created_at")?),
        expires_at: r.try_get::<Option<i64>, _>("expires_at")?.map(from_unix),
        revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(from_unix),
        last_used_at: r.try_get::<Option<i64>, _>("last_used_at")?.map(from_unix),
    })
}

const API_KEY_COLUMNS: &str =
    "id, hash, name, scopes, created_at, expires_at, revoked_at, last_used_at";

impl Store {
    /// Puts a jti on the denylist until `expires_at` (idempotent).
    pub async fn deny_token(
        &self,
        jti: &str,
        kid: &str,
        expires_at: i64,
        now: i64,
    ) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "INSERT INTO token_denylist (jti, kid, expires_at, revoked_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (jti) DO NOTHING",
        )
        .bind(jti)
        .bind(kid)
        .bind(expires_at)
        .bind(now)
        .execute(self.pool())
        .await
        .context("writing the token denylist")?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether a jti is denied (and not yet past its expiry).
    pub async fn is_token_denied(&self, jti: &str, now: i64) -> anyhow::Result<bool> {
        let row = sqlx::query("SELECT 1 FROM token_denylist WHERE jti = $1 AND expires_at >= $2")
            .bind(jti)
            .bind(now)
            .fetch_optional(self.pool())
            .await
            .context("reading the token denylist")?;
        Ok(row.is_some())
    }

    /// Removes denylist entries whose tokens have expired anyway.
    pub async fn prune_denylist(&self, now: i64) -> anyhow::Result<u64> {
        let done = sqlx::query("DELETE FROM token_denylist WHERE expires_at < $1")
            .bind(now)
            .execute(self.pool())
            .await
            .context("pruning the token denylist")?;
        Ok(done.rows_affected())
    }

    /// Stores a new API key (its hash only).
    pub async fn insert_api_key(&self, row: &ApiKeyRow) -> anyhow::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO api_keys ({API_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)"
        )))
        .bind(&row.id)
        .bind(&row.hash)
        .bind(&row.name)
        .bind(row.scopes.join(","))
        .bind(row.created_at.timestamp())
        .bind(row.expires_at.map(|t| t.timestamp()))
        .execute(self.pool())
        .await
        .context("storing an API key")?;
        Ok(())
    }

    /// One API key by id.
    pub async fn api_key(&self, id: &str) -> anyhow::Result<Option<ApiKeyRow>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .context("reading an API key")?;
        row.as_ref().map(row_to_api_key).transpose()
    }

    /// Every API key, newest first.
    pub async fn list_api_keys(&self) -> anyhow::Result<Vec<ApiKeyRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at DESC, id"
        )))
        .fetch_all(self.pool())
        .await
        .context("listing API keys")?;
        rows.iter().map(row_to_api_key).collect()
    }

    /// Revokes an API key; false when it does not exist or is already revoked.
    pub async fn revoke_api_key(&self, id: &str, now: i64) -> anyhow::Result<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(self.pool())
                .await
                .context("revoking an API key")?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that an API key was used.
    pub async fn touch_api_key(&self, id: &str, now: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(self.pool())
            .await
            .context("recording API key use")?;
        Ok(())
    }
}
