//! Verifying the stored chain, signed checkpoint files, and retention.
//!
//! A checkpoint is `chain::Checkpoint` as JSON in
//! `<audit.checkpoint_dir>/checkpoint-<seq>.json` (mode 0600, written to a
//! temporary file, fsynced and renamed, so a reader never sees half a
//! file). The newest one (highest seq) is what `audit verify` checks the
//! chain against: it catches a truncated tail and a chain rewritten
//! consistently, which the chain alone cannot.
//!
//! Retention deletes rows older than `audit.retention`, but never past the
//! latest checkpoint, and in the same transaction records the new anchor
//! (seq and hash of the last deleted row), signed with the anchor key, in
//! `kw_meta.audit_anchor`: the remaining rows verify from it, and an anchor
//! moved by someone without the root key fails verification.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::chain::{Anchor, Breakage, ChainVerifier, Checkpoint, VerifyReport};
use super::{Event, action};
use crate::app::App;
use crate::error::Rejected;
use crate::store::audit::{self as auditstore, ANCHOR_META, Filter};

/// What `audit verify` reports (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct VerifyOutcome {
    pub ok: bool,
    /// Rows that verified as an unbroken chain (all of them when ok).
    pub rows: u64,
    /// The seq the breakage names.
    pub first_bad_row: Option<i64>,
    pub reason: Option<String>,
    pub breakage: Option<Breakage>,
    /// The last row that verified.
    pub head_seq: i64,
    /// Where the chain starts after retention (0: nothing pruned).
    pub anchor_seq: i64,
    /// The checkpoint checked against, if any.
    pub checkpoint_seq: Option<i64>,
    pub checkpoint_at: Option<DateTime<Utc>>,
    pub checkpoint_file: Option<PathBuf>,
    #[serde(skip)]
    pub head_hash: String,
}

/// What `audit checkpoint` did.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointOutcome {
    pub seq: i64,
    pub head_hash: String,
    pub at: DateTime<Utc>,
    pub file: PathBuf,
    /// Rows deleted by retention (or that would be, in a dry run).
    pub pruned_rows: u64,
    /// Where the chain starts now.
    pub anchor_seq: i64,
    pub dry_run: bool,
}

/// The checkpoint directory in force.
pub fn checkpoint_dir(app: &App) -> PathBuf {
    app.config.audit.checkpoint_dir_in(&app.paths.data_dir)
}

/// The newest checkpoint in `dir` (highest seq), if any. A file that does
/// not parse is an error: it is evidence, not noise.
pub fn latest_checkpoint(dir: &Path) -> anyhow::Result<Option<(PathBuf, Checkpoint)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot read the checkpoint directory {}", dir.display())
            });
        }
    };
    let mut best: Option<(i64, PathBuf)> = None;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(seq) = name
            .strip_prefix("checkpoint-")
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| seq > *b) {
            best = Some((seq, path));
        }
    }
    let Some((_, path)) = best else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the checkpoint {}", path.display()))?;
    let cp: Checkpoint = serde_json::from_str(&text).map_err(|e| {
        Rejected(format!(
            "the checkpoint {} is unreadable: {e}",
            path.display()
        ))
    })?;
    Ok(Some((path, cp)))
}

/// Writes a checkpoint file atomically with mode 0600 (the directory is
/// made 0700 when created).
pub fn write_checkpoint(dir: &Path, cp: &Checkpoint) -> anyhow::Result<PathBuf> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the checkpoint directory {}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let path = dir.join(format!("checkpoint-{:020}.json", cp.seq));
    let tmp = dir.join(format!(".checkpoint-{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(cp)?.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

/// Verifies the stored chain: the signed retention anchor, then every row
/// streamed in seq order through [`ChainVerifier`], against the newest
/// checkpoint file.
pub async fn verify_store(app: &App) -> anyhow::Result<VerifyOutcome> {
    let keys = app.audit_keys().await?;
    let latest = latest_checkpoint(&checkpoint_dir(app))?;
    let (cp_file, cp) = match latest {
        Some((f, c)) => (Some(f), Some(c)),
        None => (None, None),
    };
    let outcome = |report: VerifyReport, anchor_seq: i64| VerifyOutcome {
        ok: report.ok,
        rows: report.rows,
        first_bad_row: report.first_bad_row,
        reason: report.reason,
        breakage: report.breakage,
        head_seq: report.head.seq,
        head_hash: report.head.hash,
        anchor_seq,
        checkpoint_seq: cp.as_ref().map(|c| c.seq),
        checkpoint_at: cp
            .as_ref()
            .and_then(|c| DateTime::from_timestamp_millis(c.at_ms)),
        checkpoint_file: cp_file.clone(),
    };
    let anchor = match app.store.meta(ANCHOR_META).await? {
        None => None,
        Some(json) => {
            let signed: Option<Checkpoint> = serde_json::from_str(&json).ok();
            match signed.filter(|a| a.verify_mac(keys.anchor_key())) {
                Some(a) => Some(Anchor {
                    seq: a.seq,
                    hash: a.head_hash,
                }),
                None => {
                    let report = VerifyReport {
                        ok: false,
                        rows: 0,
                        first_bad_row: None,
                        reason: Some(
                            "the retention anchor (kw_meta.audit_anchor) is not genuine: its MAC \
                             does not verify, so where the chain starts cannot be trusted"
                                .into(),
                        ),
                        breakage: Some(Breakage::BadCheckpoint),
                        head: Anchor::genesis(),
                    };
                    return Ok(outcome(report, 0));
                }
            }
        }
    };
    let anchor_seq = anchor.as_ref().map_or(0, |a| a.seq);
    let mut verifier = ChainVerifier::new(anchor.as_ref(), cp.as_ref(), keys.checkpoint_key());
    if !verifier.is_decided() {
        app.store
            .audit_rows(&Filter::default(), |row| {
                verifier.push(row);
                Ok(!verifier.is_decided())
            })
            .await?;
    }
    Ok(outcome(verifier.finish(), anchor_seq))
}

/// The context of the error a checkpoint returns when the chain does not
/// verify: the job runner raises the `audit_chain_broken` alert from it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit chain is broken at row {first_bad_row}")]
pub struct ChainBroken {
    pub first_bad_row: i64,
    pub reason: String,
}

/// The `audit-checkpoint` job: verifies the chain (a broken chain gets no
/// checkpoint and the error is a `Rejected`: alert on it), writes a signed
/// checkpoint of its head, then applies retention (`audit.retention`),
/// never deleting past that checkpoint, and records both in one audit row.
pub async fn checkpoint(app: &App, now: DateTime<Utc>) -> anyhow::Result<CheckpointOutcome> {
    checkpoint_with(app, now, false).await
}

/// [`checkpoint`], or with `dry_run` only what it would write and prune
/// (`audit checkpoint --dry-run`).
pub async fn checkpoint_with(
    app: &App,
    now: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<CheckpointOutcome> {
    let report = verify_store(app).await?;
    if !report.ok {
        let reason = report.reason.clone().unwrap_or_else(|| "broken".into());
        return Err(anyhow::Error::new(Rejected(format!(
            "the audit chain does not verify, so no checkpoint was written: {reason}"
        )))
        .context(ChainBroken {
            first_bad_row: report.first_bad_row.unwrap_or(0),
            reason,
        }));
    }
    let keys = app.audit_keys().await?;
    let cp = Checkpoint::sign(
        report.head_seq,
        &report.head_hash,
        now.timestamp_millis(),
        keys.checkpoint_key(),
    );
    let dir = checkpoint_dir(app);
    let file = if dry_run {
        dir.join(format!("checkpoint-{:020}.json", cp.seq))
    } else {
        write_checkpoint(&dir, &cp)?
    };
    let cutoff_ms = (now - app.config.audit.retention.to_chrono()).timestamp_millis();
    let mut tx = app.store.begin().await?;
    // The anchor is read again under the write lock: a concurrent
    // checkpoint may have pruned since the verification above.
    let current_anchor = match auditstore::meta_in(&mut tx, ANCHOR_META).await? {
        Some(json) => {
            serde_json::from_str::<Checkpoint>(&json)
                .context("reading the audit retention anchor")?
                .seq
        }
        None => 0,
    };
    let prune_to = auditstore::last_seq_before(&mut tx, cutoff_ms, cp.seq)
        .await?
        .filter(|&k| k > current_anchor);
    let mut pruned = 0;
    let mut anchor_seq = current_anchor;
    if let Some(k) = prune_to {
        pruned = (k - current_anchor) as u64;
        anchor_seq = k;
        if !dry_run {
            let last = auditstore::row_in(&mut tx, k)
                .await?
                .with_context(|| format!("audit row {k} vanished during retention"))?;
            let anchor = Checkpoint::sign(k, &last.hash, now.timestamp_millis(), keys.anchor_key());
            auditstore::set_meta_in(&mut tx, ANCHOR_META, &serde_json::to_string(&anchor)?).await?;
            pruned = auditstore::delete_through(&mut tx, k).await?;
        }
    }
    let outcome = CheckpointOutcome {
        seq: cp.seq,
        head_hash: cp.head_hash.clone(),
        at: now,
        file,
        pruned_rows: pruned,
        anchor_seq,
        dry_run,
    };
    if dry_run {
        return Ok(outcome);
    }
    let event = Event::new(action::AUDIT_CHECKPOINT)
        .target(format!("seq:{}", cp.seq))
        .detail("checkpoint_seq", cp.seq)
        .detail("head_hash", cp.head_hash.as_str())
        .detail("pruned_rows", pruned)
        .detail("anchor_seq", anchor_seq);
    super::commit(app, tx, vec![event], now)
        .await
        .context("recording the checkpoint and retention")?;
    Ok(outcome)
}
