//! The SQL store: one code path over SQLite (the embedded default) and
//! PostgreSQL (for several replicas), through sqlx's `Any` driver.
//!
//! Every statement here is written once and runs on both backends: `$N`
//! placeholders (SQLite reads them as numbered parameters), `ON CONFLICT`,
//! `RETURNING`, integers for times (unix seconds). Where the backends truly
//! differ (the migration files, row locking), `Backend` says which one runs.
//! Nothing here holds key material unwrapped: the `keys` table stores only
//! Fernet tokens made with the root key.

pub mod alerts;
pub mod audit;
pub mod job_runs;
pub mod keys;
pub mod outbox;
pub mod secrets;
pub mod tokens;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlStr};

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to the keyring store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A write transaction (on SQLite, begun IMMEDIATE so concurrent writers
/// queue instead of failing half-way).
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "keyring",
        include_str!("../../migrations/sqlite/0001_keyring.sql"),
    ),
    (
        2,
        "audit",
        include_str!("../../migrations/sqlite/0002_audit.sql"),
    ),
    (
        3,
        "worker",
        include_str!("../../migrations/sqlite/0003_worker.sql"),
    ),
    (
        4,
        "reencrypt",
        include_str!("../../migrations/sqlite/0004_reencrypt.sql"),
    ),
    (
        5,
        "tokens",
        include_str!("../../migrations/sqlite/0005_tokens.sql"),
    ),
    (
        7,
        "alerts",
        include_str!("../../migrations/sqlite/0007_alerts.sql"),
    ),
    (
        8,
        "secrets_no_kid_index",
        include_str!("../../migrations/sqlite/0008_secrets_no_kid_index.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "keyring",
        include_str!("../../migrations/postgres/0001_keyring.sql"),
    ),
    (
        2,
        "audit",
        include_str!("../../migrations/postgres/0002_audit.sql"),
    ),
    (
        3,
        "worker",
        include_str!("../../migrations/postgres/0003_worker.sql"),
    ),
    (
        4,
        "reencrypt",
        include_str!("../../migrations/postgres/0004_reencrypt.sql"),
    ),
    (
        5,
        "tokens",
        include_str!("../../migrations/postgres/0005_tokens.sql"),
    ),
    (
        7,
        "alerts",
        include_str!("../../migrations/postgres/0007_alerts.sql"),
    ),
    (
        8,
        "secrets_no_kid_index",
        include_str!("../../migrations/postgres/0008_secrets_no_kid_index.sql"),
    ),
];

/// Hides a database URL's password for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:[redacted]{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The file path of a `sqlite://` URL, if it names one.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    Some(PathBuf::from(path))
}

impl Store {
    /// Connects and applies migrations. On SQLite the database file is
    /// created when `create` is true; otherwise a missing file is an error
    /// (so a typo in the data directory does not silently start a new
    /// keyring).
    pub async fn connect(url: &str, create: bool) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let shown = redact_url(url);
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            bail!("database URL {shown} is not supported (use sqlite://PATH or postgres://...)");
        };
        let mut url = url.to_string();
        if backend == Backend::Sqlite {
            let path =
                sqlite_path(&url).with_context(|| format!("database URL {shown} names no file"))?;
            if !create && !path.exists() {
                return Err(crate::error::UsageError(format!(
                    "no keyring store at {}: run `keywarden init` first",
                    path.display()
                ))
                .into());
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!("cannot create the data directory {}", dir.display())
                })?;
                check_writable(dir)?;
            }
            if !url.contains('?') {
                url.push_str(if create { "?mode=rwc" } else { "?mode=rw" });
            }
        }
        let options: AnyConnectOptions = url
            .parse()
            .with_context(|| format!("invalid database URL {shown}"))?;
        let pool_options = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(15));
        let pool_options = if backend == Backend::Sqlite {
            pool_options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL lets readers run beside the one writer; NORMAL
                    // sync is durable against a process crash (the crash
                    // guarantee), and busy_timeout makes writers queue.
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 15000")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
        } else {
            pool_options
        };
        let pool = pool_options
            .connect_with(options)
            .await
            .with_context(|| format!("cannot connect to the database at {shown}"))?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let list = match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        let migrations: Vec<Migration> = list
            .iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    Cow::Borrowed(*d),
                    MigrationType::Simple,
                    SqlStr::from_static(sql),
                    false,
                )
            })
            .collect();
        let migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        };
        // SQLite has no migration lock: when two processes start on a new
        // file at once, one may lose the race; running again then finds
        // the schema the other made.
        let mut attempt = 0;
        loop {
            match migrator.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 && self.backend == Backend::Sqlite => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migration raced, retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e).context("applying database migrations"),
            }
        }
    }

    /// The pool, for queries that need no transaction.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which backend this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a write transaction.
    pub async fn begin(&self) -> anyhow::Result<Tx> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        };
        tx.context("beginning a database transaction")
    }

    /// Reads a value from `kw_meta`.
    pub async fn meta(&self, name: &str) -> anyhow::Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM kw_meta WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .context("reading store metadata")?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Writes `value` under `name` unless a value is there already; returns
    /// the value that is there afterwards (the first writer wins).
    pub async fn meta_insert_once(&self, name: &str, value: &str) -> anyhow::Result<String> {
        sqlx::query(
            "INSERT INTO kw_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await
        .context("writing store metadata")?;
        self.meta(name)
            .await?
            .context("store metadata vanished after writing it")
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Fails with a clear message when `dir` is not writable.
fn check_writable(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".keywarden-write-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "the data directory {} is not writable: {e}",
            dir.display()
        )),
    }
}

/// Converts unix seconds from the store to a time.
pub fn from_unix(secs: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// Converts a time to unix seconds for the store.
pub fn to_unix(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            redact_url("postgres://kw:hunter2@db:5432/kw"),
            "postgres://kw:[redacted]@db:5432/kw"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_path("sqlite://.keywarden/keywarden.db?mode=rwc"),
            Some(PathBuf::from(".keywarden/keywarden.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/a.db"),
            Some(PathBuf::from("/tmp/a.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }
}
