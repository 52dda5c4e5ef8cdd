//! The re-encryption engine: moves every stored Fernet token that is not
//! under the active data key onto it, in keywarden's `secrets` and in the
//! application's own tables (`[[reencrypt.targets]]`), then retires data
//! keys the census shows protect no row.
//!
//! - `target`: the tables and their SQL (identifiers quoted, values bound).
//! - `rotate`: the CPU stage (pure): kid-directed `rotate_from`, a batch per crypto worker.
//! - `engine`: the pipeline reader -> crypto -> writer for one pass.
//! - `census`: rows per data key across every target.
//! - `quarantine`: rows no key opens, recorded and skipped.
//! - `import`: `keys import-fernet`, adopting an application's Fernet key.
//!
//! Crash safety: each batch is one transaction of compare-and-set updates
//! (a row is either wholly old or wholly new, and both decrypt), rows already
//! under the active key are never selected (so a restart resumes where the
//! last commit left off), and a key retires only when a census after the
//! run counts zero rows under it. ARCHITECTURE.md has the argument in full.

pub mod census;
pub mod engine;
pub mod hot;
pub mod import;
pub mod quarantine;
pub mod rotate;
pub mod sqlite_raw;
pub mod target;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

pub use census::{Census, CensusEntry, census};
use engine::{ActiveKeyChanged, PassCtx};
use rotate::RotateKeys;
use target::{OWN_SECRETS, Target};

use crate::app::App;
use crate::audit::events;
use crate::error::UsageError;
use crate::store::Backend;

/// Passes over one target at most per run: a pass re-reads only what the
/// application changed under it (compare-and-set misses).
const MAX_PASSES: u32 = 4;
/// Restarts after a rotation demoted the active key mid-run.
const MAX_KEY_CHANGES: u32 = 3;
/// Default rows per batch (measured: see README "Tuning").
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// Rows/s used for the `--dry-run` estimate, measured end to end on the
/// development machine (2 cores, loaded) with the defaults on 1M rows
/// (README "Tuning"), rounded down.
const ESTIMATED_ROWS_PER_SECOND: [(Backend, f64); 2] =
    [(Backend::Sqlite, 200_000.0), (Backend::Postgres, 90_000.0)];

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// One target (`keywarden.secrets` or a configured name); all when None.
    pub target: Option<String>,
    /// Count and estimate only; write nothing.
    pub dry_run: bool,
    /// Rows per batch (default: config `reencrypt.batch_size`).
    pub batch_size: Option<usize>,
    /// Crypto threads (default: config `reencrypt.threads`, 0 = one per core).
    pub threads: Option<usize>,
    /// Clear the quarantine of the selected targets first, so those rows are
    /// tried again.
    pub retry_quarantined: bool,
    /// Live counters for a progress display.
    pub progress: Option<Arc<Progress>>,
    /// A revoked data key to decrypt with (never to encrypt): the emergency
    /// `revoke` flow moves the rows it protects; without it those rows are
    /// quarantined like any row no usable key opens.
    pub decrypt_with_revoked: Option<String>,
}

/// Live counters, updated as batches commit.
#[derive(Debug, Default)]
pub struct Progress {
    /// Rows expected (an upper bound counted before the run).
    pub total: AtomicU64,
    /// Rows visited so far.
    pub done: AtomicU64,
    pub reencrypted: AtomicU64,
    pub failed: AtomicU64,
}

/// What one target's run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetSummary {
    pub target: String,
    pub rows_scanned: u64,
    pub rows_reencrypted: u64,
    /// Rows no usable key decrypts, quarantined by this run.
    pub rows_failed: u64,
    /// Rows the application changed between read and write (left alone and
    /// picked up by the next pass).
    pub rows_conflicted: u64,
    /// Rows already under the active key (tables without a kid column).
    pub rows_already_current: u64,
    pub rows_skipped_quarantined: u64,
    pub batches: u64,
    pub passes: u32,
}

impl TargetSummary {
    fn new(name: &str) -> TargetSummary {
        TargetSummary {
            target: name.to_string(),
            ..TargetSummary::default()
        }
    }

    fn add(&mut self, o: &TargetSummary) {
        self.rows_scanned += o.rows_scanned;
        self.rows_reencrypted += o.rows_reencrypted;
        self.rows_failed += o.rows_failed;
        self.rows_conflicted += o.rows_conflicted;
        self.rows_already_current += o.rows_already_current;
        self.rows_skipped_quarantined += o.rows_skipped_quarantined;
        self.batches += o.batches;
    }
}

/// What a run did (`reencrypt --json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub rows_scanned: u64,
    pub rows_reencrypted: u64,
    pub rows_failed: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    pub rows_conflicted: u64,
    pub rows_already_current: u64,
    pub rows_skipped_quarantined: u64,
    /// Rows in quarantine after the run, over every target.
    pub rows_quarantined_total: u64,
    pub active_kid: String,
    pub batch_size: usize,
    pub threads: usize,
    pub dry_run: bool,
    /// Dry run: rows a run would visit and how long it would take.
    pub rows_pending: Option<u64>,
    pub estimated_seconds: Option<f64>,
    /// Data keys retired by this run (their census reached zero).
    pub retired: Vec<String>,
    pub targets: Vec<TargetSummary>,
    /// The census after the run (before it, in a dry run).
    pub census: Vec<CensusEntry>,
}

/// The usable data keys, unwrapped, active first.
pub async fn rotate_keys(app: &App) -> anyhow::Result<RotateKeys> {
    rotate_keys_with(app, None).await
}

/// The usable data keys, plus (last, so it never encrypts and is tried
/// last) the named revoked data key for decryption only.
pub async fn rotate_keys_with(app: &App, revoked: Option<&str>) -> anyhow::Result<RotateKeys> {
    let mut keys = app.data_keys().await?.keys;
    if let Some(kid) = revoked {
        let key = app.key_by_kid(kid).await?;
        anyhow::ensure!(
            key.meta.purpose == crate::keyring::Purpose::Data
                && key.meta.state == crate::keyring::KeyState::Revoked,
            "key {kid} is not a revoked data key (it is a {} key, {})",
            key.meta.purpose,
            key.meta.state
        );
        keys.push((kid.to_string(), app.fernet_of(&key)?));
    }
    RotateKeys::new(keys)
}

/// Opens the selected targets: keywarden's secrets and every configured
/// target, or the one named.
pub async fn open_targets(app: &App, only: Option<&str>) -> anyhow::Result<Vec<Target>> {
    let cfg = &app.config.reencrypt;
    if let Some(name) = only
        && name != OWN_SECRETS
        && cfg.target(name).is_none()
    {
        let mut known = vec![OWN_SECRETS.to_string()];
        known.extend(cfg.targets.iter().map(|t| t.name.clone()));
        return Err(UsageError(format!(
            "no reencrypt target named {name:?} (known: {})",
            known.join(", ")
        ))
        .into());
    }
    let mut out = Vec::new();
    if only.is_none_or(|n| n == OWN_SECRETS) {
        out.push(Target::own_secrets(&app.store, &app.paths.database_url)?);
    }
    for t in &cfg.targets {
        if only.is_none_or(|n| n == t.name) {
            out.push(Target::open(&app.store, &app.paths.database_url, t).await?);
        }
    }
    Ok(out)
}

/// Runs the re-encryption (what `keywarden reencrypt` and the
/// `reencrypt-secrets` job do): every selected target, pass after pass until
/// no compare-and-set misses remain; then the census, and data keys it
/// shows protect no row retire. `now` stamps the quarantine and the
/// retirement.
///
/// A run that finds rows to move is audited: `reencrypt.started` (with the
/// rows planned, written before the first row is touched: if it cannot be
/// written nothing is) and `reencrypt.finished` with the counts, or with
/// the error that ended it. A run with nothing to do writes no audit row
/// (the `reencrypt-secrets` job ticks often; its job rows say it ran).
pub async fn run_reencrypt(
    app: &App,
    opts: &Options,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut audited_start = false;
    let result = run_unaudited(app, opts, now, &mut audited_start).await;
    if !audited_start {
        return result;
    }
    let target = opts.target.as_deref().unwrap_or("all");
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let event = match &result {
        Ok(s) => events::reencrypt_finished(
            target,
            s.rows_scanned,
            s.rows_reencrypted,
            s.rows_failed,
            elapsed_ms,
        ),
        Err(e) => {
            let (scanned, moved) = opts.progress.as_ref().map_or((0, 0), |p| {
                (
                    p.done.load(Ordering::Relaxed),
                    p.reencrypted.load(Ordering::Relaxed),
                )
            });
            events::reencrypt_finished(target, scanned, moved, 0, elapsed_ms)
                .outcome("failed")
                .detail("error", format!("{e:#}"))
        }
    };
    if let Err(e) = app.audit_now(vec![event], now).await {
        // The rows moved are safe either way; the missing end row shows
        // in the log as a start without a finish.
        tracing::error!("cannot record the end of the re-encryption in the audit log: {e:#}");
    }
    result
}

async fn run_unaudited(
    app: &App,
    opts: &Options,
    now: chrono::DateTime<chrono::Utc>,
    audited_start: &mut bool,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let batch_size = opts
        .batch_size
        .unwrap_or(app.config.reencrypt.batch_size)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match opts.threads {
        Some(0) | None => app.config.reencrypt.effective_threads(cores),
        Some(n) => n,
    };
    let targets = open_targets(app, opts.target.as_deref()).await?;
    let progress = opts.progress.clone().unwrap_or_default();

    let revoked = opts.decrypt_with_revoked.as_deref();
    if opts.dry_run {
        let census = census::census_with(app, revoked).await?;
        let keys = rotate_keys_with(app, revoked).await?;
        let mut pending = 0;
        for t in &targets {
            pending += t.count_pending(&keys.active_kid).await?;
        }
        let rate = ESTIMATED_ROWS_PER_SECOND
            .iter()
            .find(|(b, _)| *b == app.store.backend())
            .map_or(40_000.0, |(_, r)| *r);
        return Ok(Summary {
            rows_scanned: 0,
            rows_reencrypted: 0,
            rows_failed: 0,
            seconds: started.elapsed().as_secs_f64(),
            rows_per_second: 0.0,
            rows_conflicted: 0,
            rows_already_current: 0,
            rows_skipped_quarantined: 0,
            rows_quarantined_total: census.quarantined.values().sum(),
            active_kid: keys.active_kid.clone(),
            batch_size,
            threads,
            dry_run: true,
            rows_pending: Some(pending),
            estimated_seconds: Some(pending as f64 / rate),
            retired: Vec::new(),
            targets: Vec::new(),
            census: census.lines(),
        });
    }

    if opts.retry_quarantined {
        let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
        let n = quarantine::clear(&app.store, Some(&names)).await?;
        if n > 0 {
            tracing::info!(rows = n, "cleared {n} quarantined rows for another try");
        }
    }

    let mut per_target: Vec<TargetSummary> = targets
        .iter()
        .map(|t| TargetSummary::new(&t.name))
        .collect();
    let mut key_changes = 0;
    let active_kid = 'restart: loop {
        let keys = Arc::new(rotate_keys_with(app, revoked).await?);
        let mut total = 0;
        for t in &targets {
            total += t.count_pending(&keys.active_kid).await?;
        }
        progress.total.store(
            total + progress.done.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if total > 0 && !*audited_start {
            let target = opts.target.as_deref().unwrap_or("all");
            app.audit_now(
                vec![events::reencrypt_started(
                    target,
                    &keys.active_kid,
                    Some(total),
                )],
                now,
            )
            .await
            .context("recording the start of the re-encryption in the audit log")?;
            *audited_start = true;
        }
        tracing::info!(
            key.id = keys.active_kid.as_str(),
            rows = total,
            threads,
            batch_size,
            "re-encrypting up to {total} rows under data key {}",
            keys.active_kid
        );
        for (t, sum) in targets.iter().zip(per_target.iter_mut()) {
            for _ in 0..MAX_PASSES {
                // Read per pass, so rows quarantined by the previous pass are
                // skipped, not counted again.
                let quarantined = Arc::new(quarantine::ids(&app.store, &t.name).await?);
                let cx = PassCtx {
                    store: &app.store,
                    keys: keys.clone(),
                    threads,
                    batch_size,
                    quarantined,
                    progress: &progress,
                    now_unix: now.timestamp(),
                };
                let pass = match engine::run_pass(&cx, t).await {
                    Ok(p) => p,
                    Err(e) if e.is::<ActiveKeyChanged>() && key_changes < MAX_KEY_CHANGES => {
                        key_changes += 1;
                        tracing::info!(
                            "the active data key changed during the run: starting over with the new keys"
                        );
                        continue 'restart;
                    }
                    Err(e) => return Err(e),
                };
                sum.add(&pass);
                sum.passes += 1;
                if pass.rows_conflicted == 0 {
                    break;
                }
            }
        }
        break keys.active_kid.clone();
    };

    // Retire what the census shows protects nothing. The census counts
    // every target, whatever --target chose, so a key another target still
    // needs stays.
    let counts = census::count_with(app, revoked)
        .await
        .context("counting rows per data key after the run")?;
    let expired = app
        .expire(now, false, |kid| Some(counts.rows_under(kid)))
        .await?;
    let retired: Vec<String> = expired
        .into_iter()
        .filter(|e| e.purpose == crate::keyring::Purpose::Data)
        .map(|e| e.kid)
        .collect();
    // Labelled after the retirements, from the same count.
    let census = counts.census(app).await?;

    let mut all = TargetSummary::default();
    for s in &per_target {
        all.add(s);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        rows_scanned: all.rows_scanned,
        rows_reencrypted: all.rows_reencrypted,
        rows_failed: all.rows_failed,
        seconds,
        rows_per_second: if seconds > 0.0 {
            all.rows_reencrypted as f64 / seconds
        } else {
            0.0
        },
        rows_conflicted: all.rows_conflicted,
        rows_already_current: all.rows_already_current,
        rows_skipped_quarantined: all.rows_skipped_quarantined,
        rows_quarantined_total: census.quarantined.values().sum(),
        active_kid,
        batch_size,
        threads,
        dry_run: false,
        rows_pending: None,
        estimated_seconds: None,
        retired,
        targets: per_target,
        census: census.lines(),
    })
}
