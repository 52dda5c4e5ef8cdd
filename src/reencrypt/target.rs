//! Where rows live: keywarden's own `secrets` table or one of the
//! application's tables (`[[reencrypt.targets]]`), and the SQL that reads,
//! counts and rewrites them.
//!
//! Table and column names come from validated config and are still quoted
//! here; the only other text pasted into SQL is the operator's own `filter`
//! (trusted config, no `;`) and numbered placeholders. Values are always
//! bound.

use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AnyPool, Row};

use crate::config::ReencryptTarget;
use crate::store::{Backend, Store, redact_url};

/// The name of keywarden's own secrets as a target. It contains a dot, which
/// configured target names cannot, so the two never collide.
pub const OWN_SECRETS: &str = "keywarden.secrets";

/// A row's primary key: integer or text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RowId {
    Int(i64),
    Text(String),
}

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowId::Int(i) => write!(f, "{i}"),
            RowId::Text(s) => f.write_str(s),
        }
    }
}

/// One row read for re-encryption. The token is ciphertext only.
#[derive(Clone, Debug)]
pub struct SourceRow {
    pub id: RowId,
    pub token: String,
    /// The kid column's value (None: no kid column, or NULL).
    pub kid: Option<String>,
}

/// A re-encrypted row to write back with compare-and-set on the old token.
#[derive(Debug)]
pub struct Rewrite {
    pub id: RowId,
    pub old_token: String,
    pub new_token: String,
}

/// A table of Fernet tokens, connected.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub pool: AnyPool,
    pub backend: Backend,
    /// The table is in keywarden's own store (so the key check can share the
    /// write transaction).
    pub in_own_store: bool,
    /// The engine's own connections for its read and write path (`hot`).
    pub(super) hot: Hot,
    pub(super) table: String,
    pub(super) id: String,
    pub(super) ct: String,
    pub(super) kid: Option<String>,
    pub(super) filter: Option<String>,
}

/// How the engine reaches a target's database for its hot path, outside
/// the `Any` pool (see `hot`): the SQLite file it opens directly, or a
/// native PostgreSQL pool (connected lazily, on first use).
#[derive(Clone)]
pub enum Hot {
    Sqlite {
        path: PathBuf,
        /// keywarden's own store runs `synchronous = NORMAL` on WAL (as every
        /// store connection does); an application's database keeps its own
        /// settings.
        own_store: bool,
    },
    Postgres(PgPool),
}

impl Hot {
    /// The hot-path handle for a database URL.
    pub fn for_url(url: &str, own_store: bool) -> anyhow::Result<Hot> {
        let shown = redact_url(url);
        if url.starts_with("sqlite:") {
            let path = crate::store::sqlite_path(url)
                .with_context(|| format!("database URL {shown} names no file"))?;
            Ok(Hot::Sqlite { path, own_store })
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // Each batch in flight holds a connection (its claim) from read to
            // commit: up to ten with two crypto workers and two writers.
            let pool = PgPoolOptions::new()
                .max_connections(12)
                .acquire_timeout(Duration::from_secs(15))
                .connect_lazy(url)
                .with_context(|| format!("invalid database URL {shown}"))?;
            Ok(Hot::Postgres(pool))
        } else {
            anyhow::bail!(
                "database URL {shown} is not supported (use sqlite:PATH or postgres://...)"
            )
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// Quotes an identifier (optionally `schema.table`) for SQL. The config
/// admits only `[A-Za-z_][A-Za-z0-9_]*` parts; anything else is refused
/// here too, so a bad name can never reach SQL.
pub fn quote_ident(name: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = name.split('.').collect();
    anyhow::ensure!(
        parts.len() <= 2 && parts.iter().all(|p| crate::config::is_sql_identifier(p)),
        "{name:?} is not a plain SQL identifier"
    );
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

impl Target {
    /// keywarden's own `secrets` table; `url` is the store's database URL.
    pub fn own_secrets(store: &Store, url: &str) -> anyhow::Result<Target> {
        Ok(Target {
            name: OWN_SECRETS.into(),
            pool: store.pool().clone(),
            backend: store.backend(),
            in_own_store: true,
            hot: Hot::for_url(url, true)?,
            table: "\"secrets\"".into(),
            id: "\"id\"".into(),
            ct: "\"token\"".into(),
            kid: Some("\"kid\"".into()),
            filter: None,
        })
    }

    /// A configured target, connected to its database (keywarden's store
    /// when it names none).
    pub async fn open(
        store: &Store,
        store_url: &str,
        cfg: &ReencryptTarget,
    ) -> anyhow::Result<Target> {
        let (pool, backend, in_own_store, hot) = match cfg.database_url() {
            None => (
                store.pool().clone(),
                store.backend(),
                true,
                Hot::for_url(store_url, true)?,
            ),
            Some(url) => {
                let (pool, backend) = connect_foreign(url)
                    .await
                    .with_context(|| format!("reencrypt target {}", cfg.name))?;
                let hot = Hot::for_url(url, false)
                    .with_context(|| format!("reencrypt target {}", cfg.name))?;
                (pool, backend, false, hot)
            }
        };
        Ok(Target {
            name: cfg.name.clone(),
            pool,
            backend,
            in_own_store,
            hot,
            table: quote_ident(&cfg.table)?,
            id: quote_ident(&cfg.id_column)?,
            ct: quote_ident(&cfg.ciphertext_column)?,
            kid: cfg.kid_column().map(quote_ident).transpose()?,
            filter: cfg.filter().map(|f| format!("({f})")),
        })
    }

    /// Whether rows say which key made them.
    pub fn has_kid_column(&self) -> bool {
        self.kid.is_some()
    }

    /// Reads every row in id order (for the census of a table without a kid
    /// column, or NULL kids), a batch at a time.
    pub async fn read_all_batch(
        &self,
        after: Option<&RowId>,
        limit: usize,
        only_null_kid: bool,
    ) -> anyhow::Result<Vec<SourceRow>> {
        let mut conds = vec![format!("{} IS NOT NULL", self.ct)];
        if only_null_kid && let Some(kid) = &self.kid {
            conds.push(format!("{kid} IS NULL"));
        }
        if after.is_some() {
            conds.push(format!("{} > $1", self.id));
        }
        if let Some(f) = &self.filter {
            conds.push(f.clone());
        }
        let sql = format!(
            "SELECT {}, {} FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
            self.id,
            self.ct,
            self.table,
            conds.join(" AND "),
            self.id
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(after) = after {
            q = bind_id(q, after);
        }
        let rows = q
            .fetch_all(&self.pool)
            .await
            .with_context(|| format!("reading target {}", self.name))?;
        rows.iter()
            .map(|r| {
                Ok(SourceRow {
                    id: read_id(r, 0)?,
                    token: r.try_get(1)?,
                    kid: None,
                })
            })
            .collect()
    }

    /// Rows per kid column value (tables with a kid column); NULL kids are
    /// returned as `None`. `expected` names the kids counted in the one
    /// scan; a kid outside it costs a second query, only when present.
    pub async fn count_by_kid(
        &self,
        expected: &[String],
    ) -> anyhow::Result<Vec<(Option<String>, u64)>> {
        let kid = self.kid.as_ref().context("target has no kid column")?;
        let mut filter = format!(" WHERE {} IS NOT NULL", self.ct);
        if let Some(f) = &self.filter {
            filter.push_str(&format!(" AND {f}"));
        }
        // One scan with a counter per expected kid: no sort and no hash
        // table (an unindexed GROUP BY sorts on SQLite, which took twice as
        // long), and no index on kid needed (which every re-encrypted row
        // would have to update).
        let mut cols = vec!["COUNT(*)".to_string(), format!("COUNT(*) - COUNT({kid})")];
        for i in 1..=expected.len() {
            cols.push(format!("COUNT(CASE WHEN {kid} = ${i} THEN 1 END)"));
        }
        let sql = format!("SELECT {} FROM {}{filter}", cols.join(", "), self.table);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for k in expected {
            q = q.bind(k.clone());
        }
        let row = q
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("counting rows per key in target {}", self.name))?;
        let count = |i: usize| -> anyhow::Result<u64> { Ok(row.try_get::<i64, _>(i)? as u64) };
        let total = count(0)?;
        let nulls = count(1)?;
        let mut out = Vec::with_capacity(expected.len() + 1);
        let mut seen = nulls;
        if nulls > 0 {
            out.push((None, nulls));
        }
        for (i, k) in expected.iter().enumerate() {
            let n = count(i + 2)?;
            seen += n;
            if n > 0 {
                out.push((Some(k.clone()), n));
            }
        }
        if seen == total {
            return Ok(out);
        }
        // Some rows carry a kid nobody expected (a foreign or deleted key):
        // name them with a GROUP BY (rare: such rows would be quarantined).
        let sql = format!(
            "SELECT {kid}, COUNT(*) FROM {}{filter} GROUP BY {kid}",
            self.table
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .with_context(|| format!("counting rows per key in target {}", self.name))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<Option<String>, _>(0)?,
                    r.try_get::<i64, _>(1)? as u64,
                ))
            })
            .collect()
    }

    /// An upper bound of the rows a pass visits: rows not under
    /// `active_kid` (every row, without a kid column).
    pub async fn count_pending(&self, active_kid: &str) -> anyhow::Result<u64> {
        let mut conds = vec![format!("{} IS NOT NULL", self.ct)];
        if let Some(kid) = &self.kid {
            conds.push(format!("({kid} IS NULL OR {kid} <> $1)"));
        }
        if let Some(f) = &self.filter {
            conds.push(f.clone());
        }
        let sql = format!(
            "SELECT COUNT(*) FROM {} WHERE {}",
            self.table,
            conds.join(" AND ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if self.kid.is_some() {
            q = q.bind(active_kid.to_string());
        }
        let row = q
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("counting rows of target {}", self.name))?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }
}

/// Binds a row id with its own type.
fn bind_id<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    id: &RowId,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    match id {
        RowId::Int(i) => q.bind(*i),
        RowId::Text(s) => q.bind(s.clone()),
    }
}

/// Reads an integer or text id.
fn read_id(r: &AnyRow, i: usize) -> anyhow::Result<RowId> {
    if let Ok(v) = r.try_get::<i64, _>(i) {
        return Ok(RowId::Int(v));
    }
    r.try_get::<String, _>(i)
        .map(RowId::Text)
        .context("the id column is neither an integer nor text")
}

/// Connects to an application database named by a target.
async fn connect_foreign(url: &str) -> anyhow::Result<(AnyPool, Backend)> {
    sqlx::any::install_default_drivers();
    let shown = redact_url(url);
    let backend = if url.starts_with("sqlite:") {
        Backend::Sqlite
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Backend::Postgres
    } else {
        anyhow::bail!("database URL {shown} is not supported (use sqlite:PATH or postgres://...)");
    };
    let mut url = url.to_string();
    if backend == Backend::Sqlite && !url.contains('?') {
        // Never create an application database that is not there.
        url.push_str("?mode=rw");
    }
    let options: AnyConnectOptions = url
        .parse()
        .with_context(|| format!("invalid database URL {shown}"))?;
    let mut pool_options = AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(15));
    if backend == Backend::Sqlite {
        // The application's database keeps its own journal mode: only wait
        // for its writers instead of failing.
        pool_options = pool_options.after_connect(|conn, _meta| {
            Box::pin(async move {
                sqlx::query("PRAGMA busy_timeout = 15000")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        });
    }
    let pool = pool_options
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to the database at {shown}"))?;
    Ok((pool, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_anything_else_is_refused() {
        assert_eq!(quote_ident("user_secrets").unwrap(), "\"user_secrets\"");
        assert_eq!(quote_ident("app.t1").unwrap(), "\"app\".\"t1\"");
        for bad in ["a\"b", "a;b", "a.b.c", "", "1a", "a b"] {
            assert!(quote_ident(bad).is_err(), "{bad}");
        }
    }
}
