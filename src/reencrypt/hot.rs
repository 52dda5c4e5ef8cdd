//! The engine's read and write path (its hot path), off sqlx's `Any`
//! driver: on SQLite the C library stepped directly (`sqlite_raw`), on
//! PostgreSQL sqlx's native driver with binary array parameters.
//!
//! SQLite: a batch is read with one prepared keyset SELECT on the engine's
//! read connection and written on its write connection in one
//! `BEGIN IMMEDIATE` transaction: the active-key check, then one prepared
//! single-row compare-and-set UPDATE re-bound per row (`WHERE id = ? AND
//! token = <old>`), then COMMIT.
//!
//! PostgreSQL: a batch is read and claimed in its own transaction
//! (`FOR UPDATE SKIP LOCKED`), and the same transaction later checks the
//! active key (`FOR SHARE`) and writes the whole batch with one statement:
//! `UPDATE t SET token = v.new FROM unnest($1, $2, $3) AS v(id, new, old)
//! WHERE t.id = v.id AND t.token = v.old`, arrays sent in binary.
//!
//! Either way a row changed by the application since it was read no longer
//! matches its old token and is left alone (counted as a conflict).

use std::ffi::c_int;

use anyhow::Context;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::engine::ActiveKeyChanged;
use super::sqlite_raw::{Conn, Kind};
use super::target::{Hot, Rewrite, RowId, SourceRow, Target};

/// A PostgreSQL transaction of the hot path (claims a batch, then writes it).
pub type PgTx = sqlx::Transaction<'static, sqlx::Postgres>;

/// How long an engine SQLite connection waits for other writers (as the
/// store's connections do).
const SQLITE_BUSY_TIMEOUT_MS: i32 = 15_000;

const ACTIVE_CHECK_SQLITE: &str =
    "SELECT kid FROM keys WHERE kid = ?1 AND state = 'active' AND purpose = 'data'";
const ACTIVE_CHECK_PG: &str =
    "SELECT kid FROM keys WHERE kid = $1 AND state = 'active' AND purpose = 'data' FOR SHARE";

impl Target {
    /// The batch SELECT: rows not under the active key (`kid <> p1`, when
    /// there is a kid column) after the last id read (`id > p2`), in id
    /// order. Placeholders are `?N` on SQLite, `$N` on PostgreSQL, where
    /// `lock` adds `FOR UPDATE SKIP LOCKED`.
    fn hot_select_sql(&self, after: bool, limit: usize, pg: bool) -> String {
        let p = |n: usize| if pg { format!("${n}") } else { format!("?{n}") };
        let mut n = 0;
        let mut conds = vec![format!("{} IS NOT NULL", self.ct)];
        let cols = match &self.kid {
            Some(kid) => {
                n += 1;
                conds.push(format!("({kid} IS NULL OR {kid} <> {})", p(n)));
                format!("{}, {}, {kid}", self.id, self.ct)
            }
            None => format!("{}, {}", self.id, self.ct),
        };
        if after {
            n += 1;
            conds.push(format!("{} > {}", self.id, p(n)));
        }
        if let Some(f) = &self.filter {
            conds.push(f.clone());
        }
        let mut sql = format!(
            "SELECT {cols} FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
            self.table,
            conds.join(" AND "),
            self.id
        );
        if pg {
            sql.push_str(" FOR UPDATE SKIP LOCKED");
        }
        sql
    }

    /// Opens an engine connection to the target's SQLite file (blocking).
    pub fn sqlite_connect(&self) -> anyhow::Result<Conn> {
        let Hot::Sqlite { path, own_store } = &self.hot else {
            anyhow::bail!("target {} is not on SQLite", self.name);
        };
        let conn = Conn::open(path, SQLITE_BUSY_TIMEOUT_MS)
            .with_context(|| format!("connecting to the database of target {}", self.name))?;
        if *own_store {
            // The store's own connection settings (store::Store::connect):
            // WAL is a property of the file already; NORMAL is per
            // connection. In WAL mode a commit under NORMAL survives a
            // process crash; only an OS crash or power loss can lose the
            // last commits, which then roll back whole (every row stays
            // decryptable either way).
            conn.exec("PRAGMA synchronous = NORMAL")?;
        }
        Ok(conn)
    }

    /// Opens the engine's SQLite write connection: as [`Self::sqlite_connect`],
    /// but its commits never checkpoint the WAL; a [`Checkpointer`] beside
    /// it does, on the other core, instead of the writer stopping every
    /// thousand pages to copy them into the database file and wait for the
    /// disk.
    pub fn sqlite_connect_writer(&self) -> anyhow::Result<Conn> {
        let conn = self.sqlite_connect()?;
        conn.exec("PRAGMA wal_autocheckpoint = 0")?;
        Ok(conn)
    }

    /// Reads the next batch on SQLite (blocking).
    pub fn sqlite_read(
        &self,
        conn: &Conn,
        active_kid: &str,
        after: Option<&RowId>,
        limit: usize,
    ) -> anyhow::Result<Vec<SourceRow>> {
        let read = || -> anyhow::Result<Vec<SourceRow>> {
            let mut st = conn.prepare(&self.hot_select_sql(after.is_some(), limit, false))?;
            let mut n: c_int = 0;
            if self.kid.is_some() {
                n += 1;
                st.bind_text(n, active_kid)?;
            }
            if let Some(after) = after {
                n += 1;
                match after {
                    RowId::Int(i) => st.bind_i64(n, *i)?,
                    RowId::Text(s) => st.bind_text(n, s)?,
                }
            }
            let mut rows = Vec::with_capacity(limit.min(10_000));
            while st.step()? {
                let id = match st.column_kind(0) {
                    Kind::Integer => RowId::Int(st.column_i64(0)),
                    Kind::Text => RowId::Text(st.column_text(0)?.unwrap_or_default()),
                    _ => anyhow::bail!("the id column is neither an integer nor text"),
                };
                let token = match st.column_kind(1) {
                    Kind::Text => st.column_text(1)?.unwrap_or_default(),
                    _ => anyhow::bail!("target {}: the ciphertext column is not text", self.name),
                };
                let kid = if self.kid.is_some() {
                    st.column_text(2)?
                } else {
                    None
                };
                rows.push(SourceRow { id, token, kid });
            }
            Ok(rows)
        };
        read().with_context(|| format!("reading a batch from target {}", self.name))
    }

    /// Writes a batch on SQLite in one `BEGIN IMMEDIATE` transaction
    /// (blocking): the active-key check first when `check_active` (the
    /// table is in keywarden's store), then a compare-and-set UPDATE per
    /// row. Returns the rows changed; on any error the transaction is
    /// rolled back, so the batch is all or nothing.
    pub fn sqlite_write(
        &self,
        conn: &Conn,
        rows: &[Rewrite],
        new_kid: &str,
        check_active: bool,
    ) -> anyhow::Result<u64> {
        conn.exec("BEGIN IMMEDIATE")
            .with_context(|| format!("beginning a transaction on target {}", self.name))?;
        let result = (|| -> anyhow::Result<u64> {
            if check_active {
                let mut st = conn.prepare(ACTIVE_CHECK_SQLITE)?;
                st.bind_text(1, new_kid)?;
                if !st.step().context("checking the active data key")? {
                    return Err(ActiveKeyChanged(new_kid.to_string()).into());
                }
            }
            let set = match &self.kid {
                Some(kid) => format!("{} = ?1, {kid} = ?4", self.ct),
                None => format!("{} = ?1", self.ct),
            };
            let sql = format!(
                "UPDATE {} SET {set} WHERE {} = ?2 AND {} = ?3",
                self.table, self.id, self.ct
            );
            let mut st = conn.prepare(&sql)?;
            if self.kid.is_some() {
                st.bind_text(4, new_kid)?;
            }
            let mut changed = 0;
            for r in rows {
                st.reset();
                st.bind_text_borrowed(1, &r.new_token)?;
                match &r.id {
                    RowId::Int(i) => st.bind_i64(2, *i)?,
                    RowId::Text(s) => st.bind_text_borrowed(2, s)?,
                }
                st.bind_text_borrowed(3, &r.old_token)?;
                st.step()
                    .with_context(|| format!("writing a batch to target {}", self.name))?;
                changed += conn.changes();
            }
            drop(st);
            conn.exec("COMMIT")
                .with_context(|| format!("committing a batch to target {}", self.name))?;
            Ok(changed)
        })();
        if result.is_err() && conn.in_transaction() {
            // Best effort: if even ROLLBACK fails, closing the connection
            // rolls back.
            let _ = conn.exec("ROLLBACK");
        }
        result
    }

    /// Begins a hot-path transaction on PostgreSQL.
    pub async fn pg_begin(&self) -> anyhow::Result<PgTx> {
        let Hot::Postgres(pool) = &self.hot else {
            anyhow::bail!("target {} is not on PostgreSQL", self.name);
        };
        pool.begin()
            .await
            .with_context(|| format!("beginning a transaction on target {}", self.name))
    }

    /// Reads and claims (`FOR UPDATE SKIP LOCKED`) the next batch on
    /// PostgreSQL, in `tx`.
    pub async fn pg_read(
        &self,
        tx: &mut PgTx,
        active_kid: &str,
        after: Option<&RowId>,
        limit: usize,
    ) -> anyhow::Result<Vec<SourceRow>> {
        let sql = self.hot_select_sql(after.is_some(), limit, true);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if self.kid.is_some() {
            q = q.bind(active_kid);
        }
        match after {
            Some(RowId::Int(i)) => q = q.bind(*i),
            Some(RowId::Text(s)) => q = q.bind(s.as_str()),
            None => {}
        }
        let rows = q
            .fetch_all(&mut **tx)
            .await
            .with_context(|| format!("reading a batch from target {}", self.name))?;
        rows.iter().map(|r| self.pg_source_row(r)).collect()
    }

    fn pg_source_row(&self, r: &PgRow) -> anyhow::Result<SourceRow> {
        let id = if let Ok(v) = r.try_get::<i64, _>(0) {
            RowId::Int(v)
        } else if let Ok(v) = r.try_get::<i32, _>(0) {
            RowId::Int(v.into())
        } else if let Ok(v) = r.try_get::<i16, _>(0) {
            RowId::Int(v.into())
        } else {
            RowId::Text(
                r.try_get::<String, _>(0)
                    .context("the id column is neither an integer nor text")?,
            )
        };
        Ok(SourceRow {
            id,
            token: r.try_get::<String, _>(1).with_context(|| {
                format!("target {}: the ciphertext column is not text", self.name)
            })?,
            kid: if self.kid.is_some() {
                r.try_get::<Option<String>, _>(2)?
            } else {
                None
            },
        })
    }

    /// Writes a batch on PostgreSQL in `tx` with one compare-and-set
    /// UPDATE over unnested arrays; returns the rows changed.
    pub async fn pg_write(
        &self,
        tx: &mut PgTx,
        rows: &[Rewrite],
        new_kid: &str,
    ) -> anyhow::Result<u64> {
        let int_ids = matches!(rows.first().map(|r| &r.id), Some(RowId::Int(_)));
        let set = match &self.kid {
            Some(kid) => format!("{} = v.new_token, {kid} = $4", self.ct),
            None => format!("{} = v.new_token", self.ct),
        };
        let sql = format!(
            "UPDATE {table} AS t SET {set} \
             FROM unnest($1::{id_type}[], $2::text[], $3::text[]) AS v(id, new_token, old_token) \
             WHERE t.{id} = v.id AND t.{ct} = v.old_token",
            table = self.table,
            id = self.id,
            ct = self.ct,
            id_type = if int_ids { "int8" } else { "text" },
        );
        let new: Vec<&str> = rows.iter().map(|r| r.new_token.as_str()).collect();
        let old: Vec<&str> = rows.iter().map(|r| r.old_token.as_str()).collect();
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if int_ids {
            let ids = rows
                .iter()
                .map(|r| match &r.id {
                    RowId::Int(i) => Ok(*i),
                    RowId::Text(_) => anyhow::bail!("mixed integer and text ids in one batch"),
                })
                .collect::<anyhow::Result<Vec<i64>>>()?;
            q = q.bind(ids);
        } else {
            let ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
            q = q.bind(ids);
        }
        q = q.bind(new).bind(old);
        if self.kid.is_some() {
            q = q.bind(new_kid);
        }
        let done = q
            .execute(&mut **tx)
            .await
            .with_context(|| format!("writing a batch to target {}", self.name))?;
        Ok(done.rows_affected())
    }
}

/// Checks in `tx` that `kid` is still the active data key, locking its row
/// `FOR SHARE` so a rotation that would demote it waits for this batch.
pub async fn pg_check_active(tx: &mut PgTx, kid: &str) -> anyhow::Result<()> {
    let row = sqlx::query(ACTIVE_CHECK_PG)
        .bind(kid)
        .fetch_optional(&mut **tx)
        .await
        .context("checking the active data key")?;
    match row {
        Some(_) => Ok(()),
        None => Err(ActiveKeyChanged(kid.to_string()).into()),
    }
}

/// Checkpoints a SQLite target's WAL from its own thread and connection
/// while the engine writes (the engine's writer has automatic checkpoints
/// off): a PASSIVE checkpoint every few milliseconds, so the WAL stays
/// small, and one more when the pass ends. A checkpoint that cannot run
/// (busy) is only retried later: the WAL itself is the committed data.
pub struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Pause between two checkpoints: at the engine's rate that is a few
/// thousand pages, about the size SQLite's own automatic checkpoint takes.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a checkpoint waits for other connections, in milliseconds.
const CHECKPOINT_BUSY_TIMEOUT_MS: i32 = 100;

/// WAL length (in frames, a page each) past which a fully copied WAL is
/// restarted: 16,384 frames of 4 KiB, 64 MiB.
const RESTART_AT_FRAMES: i64 = 16_384;

impl Checkpointer {
    pub fn start(target: &Target) -> anyhow::Result<Checkpointer> {
        let conn = target.sqlite_connect()?;
        // A RESTART checkpoint holds off every writer of the file (the
        // application's too) while it waits for readers: it may wait only
        // briefly, and is tried again later if a reader is slow.
        conn.exec(&format!(
            "PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}"
        ))?;
        let name = target.name.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("reencrypt-wal".into())
            .spawn(move || {
                // (frames in the WAL, frames copied to the database file)
                let run = |mode: &str| -> anyhow::Result<(i64, i64)> {
                    let mut st = conn.prepare(&format!("PRAGMA wal_checkpoint({mode})"))?;
                    st.step()?;
                    Ok((st.column_i64(1), st.column_i64(2)))
                };
                let checkpoint = || match run("PASSIVE") {
                    // Everything is copied but the WAL is long: RESTART
                    // (nothing left to copy, so the writer waits only for
                    // its lock) makes the next commit write from the WAL's
                    // start again, so the file stops growing.
                    Ok((log, done)) if log >= RESTART_AT_FRAMES && done == log => {
                        if let Err(e) = run("RESTART") {
                            tracing::debug!(
                                target.name = name.as_str(),
                                "WAL restart skipped: {e:#}"
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(
                            target.name = name.as_str(),
                            "WAL checkpoint skipped: {e:#}"
                        )
                    }
                };
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    checkpoint();
                }
                checkpoint();
            })
            .context("starting the WAL checkpoint thread")?;
        Ok(Checkpointer { stop, thread })
    }

    /// Runs the last checkpoint and waits for it.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}
