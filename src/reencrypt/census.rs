//! The census: how many rows each data key protects, counted across
//! keywarden's `secrets` and every configured target. A retiring data key
//! retires only when this count (a real count, never an assumption) is zero.
//!
//! Tables with a kid column are counted in one scan with a counter per data
//! key that may hold rows (a `GROUP BY` names any other kid); rows without a
//! kid (no kid column, or NULL) are identified by checking their MAC against
//! every usable key in MultiFernet order. A row under no usable key counts as
//! `unknown`: it would be quarantined by a run.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::rotate::RotateKeys;
use super::target::{RowId, Target};
use super::{open_targets, quarantine};
use crate::app::App;
use crate::keyring::{KeyState, Purpose};

/// Rows read at a time when identifying keys by trial.
const SCAN_BATCH: usize = 2000;

/// One line of the census.
#[derive(Clone, Debug, Serialize)]
pub struct CensusEntry {
    /// The data key (None for rows no usable key opens, and for the
    /// quarantine line).
    pub kid: Option<String>,
    /// The key's state; `unknown` for kids the keyring does not hold or rows
    /// no usable key opens; `quarantined` for the quarantine line.
    pub state: String,
    /// Rows this key protects, summed over every target.
    pub rows: u64,
    /// The same rows per target.
    pub targets: BTreeMap<String, u64>,
}

/// The census of every data key.
#[derive(Clone, Debug, Serialize)]
pub struct Census {
    pub entries: Vec<CensusEntry>,
    /// Quarantined rows per target.
    pub quarantined: BTreeMap<String, u64>,
}

impl Census {
    /// Rows counted under `kid` (0 when none).
    pub fn rows_under(&self, kid: &str) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kid.as_deref() == Some(kid))
            .map(|e| e.rows)
            .sum()
    }

    /// Rows not under `active_kid` (what a full run would visit).
    pub fn rows_not_under(&self, active_kid: &str) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.state != "quarantined" && e.kid.as_deref() != Some(active_kid))
            .map(|e| e.rows)
            .sum()
    }

    /// The `keys census --json` document: `[{kid, state, rows, targets}]`,
    /// plus one `{kid: null, state: "quarantined"}` line when rows are
    /// quarantined (those rows are also counted under their kid, if they
    /// carry one).
    pub fn lines(&self) -> Vec<CensusEntry> {
        let mut out = self.entries.clone();
        let total: u64 = self.quarantined.values().sum();
        if total > 0 {
            out.push(CensusEntry {
                kid: None,
                state: "quarantined".into(),
                rows: total,
                targets: self.quarantined.clone(),
            });
        }
        out
    }
}

/// Adds `n` rows under `kid` in `target`.
fn add(
    map: &mut BTreeMap<Option<String>, BTreeMap<String, u64>>,
    kid: Option<String>,
    target: &str,
    n: u64,
) {
    if n > 0 {
        *map.entry(kid)
            .or_default()
            .entry(target.to_string())
            .or_default() += n;
    }
}

/// Identifies the key of every row `read` returns, by trial, on the rayon
/// pool; adds the counts.
async fn count_by_trial(
    target: &Target,
    keys: &Arc<RotateKeys>,
    only_null_kid: bool,
    map: &mut BTreeMap<Option<String>, BTreeMap<String, u64>>,
) -> anyhow::Result<()> {
    let mut after: Option<RowId> = None;
    loop {
        let rows = target
            .read_all_batch(after.as_ref(), SCAN_BATCH, only_null_kid)
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id.clone());
        let full = rows.len() == SCAN_BATCH;
        let keys2 = keys.clone();
        let found: Vec<Option<usize>> = tokio::task::spawn_blocking(move || {
            use rayon::prelude::*;
            rows.par_iter()
                .map(|r| keys2.identify(&r.token).ok())
                .collect()
        })
        .await?;
        for f in found {
            add(map, f.map(|i| keys.kid_at(i).to_string()), &target.name, 1);
        }
        if !full {
            break;
        }
    }
    Ok(())
}

/// Counts the rows under every data key in keywarden's secrets and every
/// configured target. Fails (rather than guess) if any target cannot be
/// counted.
pub async fn census(app: &App) -> anyhow::Result<Census> {
    census_with(app, None).await
}

/// The census, also identifying rows (in tables without a kid column) under
/// the named revoked data key, so the emergency flow can prove none remain.
pub async fn census_with(app: &App, revoked: Option<&str>) -> anyhow::Result<Census> {
    count_with(app, revoked).await?.census(app).await
}

/// The rows counted per data key and target, before they are labelled with
/// the keys' states ([`Counts::census`]).
#[derive(Debug)]
pub struct Counts {
    map: BTreeMap<Option<String>, BTreeMap<String, u64>>,
    quarantined: BTreeMap<String, u64>,
}

/// Counts the rows under every data key (see [`census_with`]).
pub async fn count_with(app: &App, revoked: Option<&str>) -> anyhow::Result<Counts> {
    let keys = Arc::new(super::rotate_keys_with(app, revoked).await?);
    let targets = open_targets(app, None).await?;
    // Kids that may still protect rows, each counted in the same scan; a
    // row under any other kid is still counted (and named), by a second
    // query that runs only when such rows exist.
    let expected: Vec<String> = app
        .key_metas(Some(Purpose::Data))
        .await?
        .into_iter()
        .filter(|m| !matches!(m.state, KeyState::Retired | KeyState::Destroyed))
        .map(|m| m.kid)
        .collect();
    let mut map: BTreeMap<Option<String>, BTreeMap<String, u64>> = BTreeMap::new();
    for target in &targets {
        if target.has_kid_column() {
            let mut nulls = 0;
            for (kid, n) in target.count_by_kid(&expected).await? {
                match kid {
                    Some(kid) => add(&mut map, Some(kid), &target.name, n),
                    None => nulls += n,
                }
            }
            if nulls > 0 {
                count_by_trial(target, &keys, true, &mut map).await?;
            }
        } else {
            count_by_trial(target, &keys, false, &mut map).await?;
        }
    }
    Ok(Counts {
        map,
        quarantined: quarantine::counts(&app.store).await?,
    })
}

impl Counts {
    /// Rows counted under `kid` (0 when none).
    pub fn rows_under(&self, kid: &str) -> u64 {
        self.map
            .get(&Some(kid.to_string()))
            .map_or(0, |t| t.values().sum())
    }

    /// The census lines, with the keys' states as the keyring holds them
    /// now (so labelling the same counts again after a retirement needs no
    /// second scan).
    pub async fn census(self, app: &App) -> anyhow::Result<Census> {
        let mut map = self.map;
        let metas = app.key_metas(Some(Purpose::Data)).await?;
        let mut entries = Vec::new();
        // Every data key that can still decrypt, and any other that holds rows:
        // active first, then by version, newest first.
        let mut ordered: Vec<_> = metas.iter().collect();
        ordered.sort_by_key(|m| (m.state != KeyState::Active, -m.version));
        for m in ordered {
            let per_target = map.remove(&Some(m.kid.clone())).unwrap_or_default();
            let rows = per_target.values().sum();
            if rows > 0 || m.state.can_verify_or_decrypt() {
                entries.push(CensusEntry {
                    kid: Some(m.kid.clone()),
                    state: m.state.as_str().into(),
                    rows,
                    targets: per_target,
                });
            }
        }
        // Kids the keyring does not know, then rows no usable key opens.
        for (kid, per_target) in map {
            entries.push(CensusEntry {
                kid,
                state: "unknown".into(),
                rows: per_target.values().sum(),
                targets: per_target,
            });
        }
        Ok(Census {
            entries,
            quarantined: self.quarantined,
        })
    }
}
