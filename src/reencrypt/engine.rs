//! The pipeline for one target and one pass: read a batch (keyset
//! pagination), re-encrypt it on the crypto workers, write it back with
//! compare-and-set, with the three stages overlapping through bounded
//! channels (so at most a few batches are in memory, whatever the table's
//! size).
//!
//! ```text
//!  reader ──(2 batches)──> crypto (N workers, a batch each) ──(2 batches)──> writer
//!  SELECT ... WHERE kid <> active                                 UPDATE ... FROM (VALUES ...)
//!    AND id > last ORDER BY id LIMIT n                              WHERE id = v.id AND token = v.old
//!    [FOR UPDATE SKIP LOCKED on PostgreSQL]                       + active-key check, one transaction
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use tokio::sync::mpsc;

use super::hot::{Checkpointer, PgTx, pg_check_active};
use super::quarantine::{self, Quarantined};
use super::rotate::{Outcome, RotateKeys};
use super::sqlite_raw::Conn;
use super::target::{Rewrite, RowId, SourceRow, Target};
use super::{Progress, TargetSummary};
use crate::crypto::fernet::FernetScratch;
use crate::store::{Backend, Store};

/// The active data key stopped being active during the run (a rotation
/// happened): the run stops before writing under a demoted key and starts
/// over with the new keys.
#[derive(Debug, thiserror::Error)]
#[error("the active data key {0} was demoted during the run")]
pub struct ActiveKeyChanged(pub String);

/// A batch read and, on PostgreSQL, claimed: `claim` is the transaction
/// holding its row locks until the writer commits.
struct ReadBatch {
    rows: Vec<SourceRow>,
    claim: Option<PgTx>,
}

struct DoneBatch {
    rows: Vec<SourceRow>,
    outcomes: Vec<Outcome>,
    skipped: u64,
    claim: Option<PgTx>,
}

/// Batches written at once on PostgreSQL (see `run_pass`); for measurement,
/// `KEYWARDEN_REENCRYPT_PG_WRITERS` (1 to 8) overrides it.
const PG_WRITERS: usize = 2;

/// What the engine needs besides the target.
pub struct PassCtx<'a> {
    pub store: &'a Store,
    pub keys: Arc<RotateKeys>,
    /// Crypto workers (each re-encrypts whole batches on its own thread).
    pub threads: usize,
    pub batch_size: usize,
    pub quarantined: Arc<HashSet<String>>,
    pub progress: &'a Progress,
    pub now_unix: i64,
}

/// Checks, inside `conn`'s transaction, that `kid` is still the active data
/// key. On PostgreSQL the row is locked `FOR SHARE`, so a rotation that
/// demotes it waits for this batch to commit; on SQLite the write
/// transaction already excludes it. So every row written under a key
/// commits before that key can be demoted, and a census taken after the
/// demotion sees it.
async fn check_active(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    kid: &str,
) -> anyhow::Result<()> {
    let sql = match backend {
        Backend::Postgres => {
            "SELECT kid FROM keys WHERE kid = $1 AND state = 'active' AND purpose = 'data' FOR SHARE"
        }
        Backend::Sqlite => {
            "SELECT kid FROM keys WHERE kid = $1 AND state = 'active' AND purpose = 'data'"
        }
    };
    let row = sqlx::query(sql)
        .bind(kid)
        .fetch_optional(&mut *conn)
        .await
        .context("checking the active data key")?;
    match row {
        Some(_) => Ok(()),
        None => Err(ActiveKeyChanged(kid.to_string()).into()),
    }
}

/// Busy and waiting time of each stage of a pass, logged at debug level:
/// where a slow pass spends its time.
#[derive(Default)]
struct StageTimes {
    read_busy: AtomicU64,
    crypto_busy: AtomicU64,
    crypto_wait: AtomicU64,
    write_busy: AtomicU64,
    write_wait: AtomicU64,
}

impl StageTimes {
    fn add(counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// Runs one pass over `target`; returns what it did.
pub async fn run_pass(cx: &PassCtx<'_>, target: &Target) -> anyhow::Result<TargetSummary> {
    let active = cx.keys.active_kid.clone();
    let pass_started = Instant::now();
    let times = StageTimes::default();
    let times = &times;
    let (read_tx, read_rx) = mpsc::channel::<ReadBatch>(2);
    let (done_tx, done_rx) = mpsc::channel::<DoneBatch>(2);

    // The SQLite connections are blocking handles: each batch moves its
    // connection into a blocking task and gets it back.
    let shared = Arc::new(target.clone());
    let reader = {
        let active = active.clone();
        let target = shared.clone();
        async move {
            let mut after: Option<RowId> = None;
            let mut conn: Option<Conn> = None;
            loop {
                let t0 = Instant::now();
                let (rows, claim) = match target.backend {
                    Backend::Postgres => {
                        let mut tx = target.pg_begin().await?;
                        let rows = target
                            .pg_read(&mut tx, &active, after.as_ref(), cx.batch_size)
                            .await?;
                        (rows, Some(tx))
                    }
                    Backend::Sqlite => {
                        let (t, a, limit) = (target.clone(), active.clone(), cx.batch_size);
                        let prev = after.clone();
                        let c = conn.take();
                        let (c, rows) = tokio::task::spawn_blocking(move || {
                            let c = match c {
                                Some(c) => c,
                                None => t.sqlite_connect()?,
                            };
                            let rows = t.sqlite_read(&c, &a, prev.as_ref(), limit)?;
                            anyhow::Ok((c, rows))
                        })
                        .await
                        .context("the re-encryption reader panicked")??;
                        conn = Some(c);
                        (rows, None)
                    }
                };
                StageTimes::add(&times.read_busy, t0);
                let Some(last) = rows.last() else {
                    break;
                };
                after = Some(last.id.clone());
                let full = rows.len() == cx.batch_size;
                if read_tx.send(ReadBatch { rows, claim }).await.is_err() || !full {
                    break;
                }
            }
            anyhow::Ok(())
        }
    };

    // Crypto workers: each takes whole batches and re-encrypts them on a
    // blocking thread of its own. Whole batches rather than a batch split
    // across a rayon pool: on a two-core machine the reader, the writer and
    // the database share the cores with the crypto, and a split batch waits
    // for its slowest half while idle rayon threads spin for work.
    let read_rx = Arc::new(tokio::sync::Mutex::new(read_rx));
    let crypto_loop = |_| {
        let read_rx = read_rx.clone();
        let done_tx = done_tx.clone();
        async move {
            // Moved into each blocking task and handed back with its result.
            let mut scratch = FernetScratch::default();
            loop {
                let t0 = Instant::now();
                let next = read_rx.lock().await.recv().await;
                let Some(batch) = next else {
                    break;
                };
                StageTimes::add(&times.crypto_wait, t0);
                let t0 = Instant::now();
                let keys = cx.keys.clone();
                let quarantined = cx.quarantined.clone();
                let rows = batch.rows;
                let (rows, outcomes, skipped, sc) = tokio::task::spawn_blocking(move || {
                    let mut sc = scratch;
                    let before = rows.len();
                    let rows: Vec<SourceRow> = if quarantined.is_empty() {
                        rows
                    } else {
                        rows.into_iter()
                            .filter(|r| !quarantined.contains(&r.id.to_string()))
                            .collect()
                    };
                    let skipped = (before - rows.len()) as u64;
                    let outcomes = keys.rotate_rows(&rows, &mut sc);
                    (rows, outcomes, skipped, sc)
                })
                .await
                .context("the re-encryption worker panicked")?;
                scratch = sc;
                StageTimes::add(&times.crypto_busy, t0);
                let done = DoneBatch {
                    rows,
                    outcomes,
                    skipped,
                    claim: batch.claim,
                };
                if done_tx.send(done).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        }
    };
    let workers: Vec<_> = (0..cx.threads.max(1)).map(crypto_loop).collect();
    // The workers hold the senders now: the writers see the channel close
    // when the last worker ends.
    drop(done_tx);
    let crypto = async {
        futures_util::future::try_join_all(workers).await?;
        anyhow::Ok(())
    };

    // Said on any write failure. A batch is one transaction, so its rows
    // are all unchanged, or (when only the commit's answer was lost) all
    // re-encrypted: every row decrypts either way.
    let rolled_back = || {
        format!(
            "re-encryption of target {} stopped: the batch being written did not commit \
             (no row is half-written and every row still decrypts); run `keywarden reencrypt` again to resume",
            target.name
        )
    };
    // Several writers on PostgreSQL: the server's UPDATE work, not the
    // round trips, bounds a batch there, and claimed batches are disjoint,
    // so two transactions write side by side. SQLite has one writer at a
    // time whatever we do.
    let writers = match target.backend {
        Backend::Postgres => std::env::var("KEYWARDEN_REENCRYPT_PG_WRITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| (1..=8).contains(n))
            .unwrap_or(PG_WRITERS),
        Backend::Sqlite => 1,
    };
    let done_rx = Arc::new(tokio::sync::Mutex::new(done_rx));
    let write_loop = |_| {
        let done_rx = done_rx.clone();
        let shared = shared.clone();
        let active = active.clone();
        async move {
            let mut sum = TargetSummary::new(&target.name);
            let mut conn: Option<Conn> = None;
            loop {
                // The lock is held only to take the next batch.
                let t0 = Instant::now();
                let next = done_rx.lock().await.recv().await;
                let Some(batch) = next else { break };
                StageTimes::add(&times.write_wait, t0);
                let t0 = Instant::now();
                let mut rewrites: Vec<Rewrite> = Vec::with_capacity(batch.rows.len());
                let mut failed: Vec<Quarantined> = Vec::new();
                let mut current = 0u64;
                for (row, outcome) in batch.rows.into_iter().zip(batch.outcomes) {
                    match outcome {
                        Outcome::Rotated(new_token) => rewrites.push(Rewrite {
                            id: row.id,
                            old_token: row.token,
                            new_token,
                        }),
                        Outcome::Current => current += 1,
                        Outcome::Failed(reason) => failed.push(Quarantined {
                            row_id: row.id.to_string(),
                            kid: row.kid,
                            reason,
                        }),
                    }
                }
                let scanned = rewrites.len() as u64 + current + failed.len() as u64 + batch.skipped;
                let changed = if rewrites.is_empty() {
                    // Release a claim without writing.
                    drop(batch.claim);
                    0
                } else {
                    // The active-key check shares the write transaction when the
                    // table is in keywarden's store; otherwise a keywarden
                    // transaction holding the check stays open until the
                    // target's batch has committed.
                    let mut guard = None;
                    if !target.in_own_store {
                        let mut g = cx.store.begin().await?;
                        check_active(&mut g, cx.store.backend(), &active).await?;
                        guard = Some(g);
                    }
                    let changed = match batch.claim {
                        Some(mut tx) => {
                            if target.in_own_store {
                                pg_check_active(&mut tx, &active).await?;
                            }
                            let changed = target
                                .pg_write(&mut tx, &rewrites, &active)
                                .await
                                .with_context(rolled_back)?;
                            tx.commit()
                                .await
                                .with_context(|| {
                                    format!("committing a batch to target {}", target.name)
                                })
                                .with_context(rolled_back)?;
                            changed
                        }
                        None => {
                            let t = shared.clone();
                            let kid = active.clone();
                            let check = target.in_own_store;
                            let c = conn.take();
                            let (c, result) = tokio::task::spawn_blocking(move || {
                                let c = match c {
                                    Some(c) => c,
                                    None => t.sqlite_connect_writer()?,
                                };
                                let result = t.sqlite_write(&c, &rewrites, &kid, check);
                                anyhow::Ok((c, result.map(|n| (n, rewrites))))
                            })
                            .await
                            .context("the re-encryption writer panicked")??;
                            conn = Some(c);
                            let (changed, back) = match result {
                                Ok(v) => v,
                                Err(e) if e.is::<ActiveKeyChanged>() => return Err(e),
                                Err(e) => return Err(e.context(rolled_back())),
                            };
                            rewrites = back;
                            changed
                        }
                    };
                    if let Some(g) = guard {
                        g.commit().await.context("releasing the active-key check")?;
                    }
                    changed
                };
                if !failed.is_empty() {
                    quarantine::record(cx.store, &target.name, &failed, cx.now_unix).await?;
                    for f in &failed {
                        tracing::warn!(
                            target.name = target.name.as_str(),
                            row.id = f.row_id.as_str(),
                            reason = f.reason.as_str(),
                            "row {} of {} quarantined: {}",
                            f.row_id,
                            target.name,
                            f.reason
                        );
                    }
                }
                StageTimes::add(&times.write_busy, t0);
                let conflicted = rewrites.len() as u64 - changed;
                sum.rows_scanned += scanned;
                sum.rows_reencrypted += changed;
                sum.rows_conflicted += conflicted;
                sum.rows_failed += failed.len() as u64;
                sum.rows_already_current += current;
                sum.rows_skipped_quarantined += batch.skipped;
                sum.batches += 1;
                let p = cx.progress;
                p.done.fetch_add(scanned, Ordering::Relaxed);
                p.reencrypted.fetch_add(changed, Ordering::Relaxed);
                p.failed.fetch_add(failed.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(sum)
        }
    };
    let writer = futures_util::future::try_join_all((0..writers).map(write_loop));

    let checkpointer = match target.backend {
        Backend::Sqlite => Some(Checkpointer::start(target)?),
        Backend::Postgres => None,
    };
    let result = tokio::try_join!(reader, crypto, writer);
    if let Some(c) = checkpointer {
        c.finish().await;
    }
    let ((), (), sums) = result?;
    let ms = |c: &AtomicU64| c.load(Ordering::Relaxed) / 1000;
    tracing::debug!(
        target.name = target.name.as_str(),
        wall_ms = pass_started.elapsed().as_millis() as u64,
        read_busy_ms = ms(&times.read_busy),
        crypto_busy_ms = ms(&times.crypto_busy),
        crypto_wait_ms = ms(&times.crypto_wait),
        write_busy_ms = ms(&times.write_busy),
        write_wait_ms = ms(&times.write_wait),
        "re-encryption pass stage times"
    );
    let mut sum = TargetSummary::new(&target.name);
    for s in &sums {
        sum.add(s);
    }
    Ok(sum)
}
