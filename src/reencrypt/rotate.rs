//! The CPU stage of the engine: re-encrypt one batch of tokens under the
//! active data key, on the calling thread (the engine runs one batch per
//! crypto worker). Pure: no IO, no clock, no async.
//!
//! The kid a row carries picks the old key directly (one MAC check, no trial
//! decryption); only a row without a kid, or whose kid names no usable key
//! or a key that does not verify it, is tried against every usable key in
//! MultiFernet order (active first). Each crypto worker owns one
//! `FernetScratch` (decode buffer and IV generator), so the per-token path
//! allocates only the new token's text.

use std::collections::HashMap;

use super::target::SourceRow;
use crate::crypto::fernet::{FernetError, FernetKey, FernetScratch, MultiFernet};

/// The usable data keys, ready for the CPU stage.
pub struct RotateKeys {
    pub active_kid: String,
    /// Active first, then retiring newest first.
    multi: MultiFernet,
    kids: Vec<String>,
    by_kid: HashMap<String, usize>,
}

impl std::fmt::Debug for RotateKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RotateKeys {{ active: {}, usable: {:?} }}",
            self.active_kid, self.kids
        )
    }
}

/// What happened to one row.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Re-encrypted: the new token (under the active key).
    Rotated(String),
    /// Already under the active key (tables without a kid column).
    Current,
    /// No usable key decrypts it: quarantine with this reason.
    Failed(String),
}

impl RotateKeys {
    /// Builds the set from `(kid, key)` pairs, active first.
    pub fn new(keys: Vec<(String, FernetKey)>) -> anyhow::Result<RotateKeys> {
        anyhow::ensure!(!keys.is_empty(), "there is no active data key");
        let kids: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        let by_kid = kids
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let multi = MultiFernet::new(keys.into_iter().map(|(_, k)| k).collect());
        Ok(RotateKeys {
            active_kid: kids[0].clone(),
            multi,
            kids,
            by_kid,
        })
    }

    /// The kid of the key at `index` (MultiFernet order).
    pub fn kid_at(&self, index: usize) -> &str {
        &self.kids[index]
    }

    /// The index of the usable key that opens `token` (MAC check by trial),
    /// for the census of tables without a kid column.
    pub fn identify(&self, token: &str) -> Result<usize, FernetError> {
        self.multi.decrypt(token).map(|(_, i)| i)
    }

    /// Re-encrypts one row.
    pub fn rotate_row(
        &self,
        row: &SourceRow,
        scratch: &mut FernetScratch,
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        let keys = self.multi.keys();
        let active = &keys[0];
        let token = row.token.as_bytes();
        // The kid names the key: one MAC check.
        if let Some(kid) = &row.kid
            && let Some(&i) = self.by_kid.get(kid)
        {
            match active.rotate_from(&keys[i], token, scratch, out) {
                Ok(()) => return Outcome::Rotated(into_string(out)),
                Err(FernetError::Malformed(why)) => {
                    return Outcome::Failed(format!("malformed Fernet token: {why}"));
                }
                // A stale kid: fall through to trial in MultiFernet order.
                Err(_) => out.clear(),
            }
        }
        match self.multi.rotate_into(token, scratch, out) {
            // Already under the active key: a table without a kid column
            // needs nothing; one with a stale kid gets the kid fixed.
            Ok(0) if row.kid.is_none() => Outcome::Current,
            Ok(_) => Outcome::Rotated(into_string(out)),
            Err(FernetError::Malformed(why)) => {
                Outcome::Failed(format!("malformed Fernet token: {why}"))
            }
            Err(_) => Outcome::Failed(match &row.kid {
                Some(kid) if self.by_kid.contains_key(kid) => {
                    format!(
                        "the token does not verify under its data key {kid} nor any other usable data key (tampered or corrupt)"
                    )
                }
                Some(kid) => format!(
                    "its data key {kid} is not usable (unknown, retired, revoked or destroyed) and no usable data key decrypts it"
                ),
                None => {
                    "no usable data key decrypts it (tampered, or made by an unknown key)".into()
                }
            }),
        }
    }

    /// Re-encrypts a batch on the calling thread with the caller's
    /// scratch (the engine gives each crypto worker one, kept across
    /// batches, so the OS is asked for a random seed once per worker, not
    /// per row). Outcomes are in row order.
    pub fn rotate_rows(&self, rows: &[SourceRow], scratch: &mut FernetScratch) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(rows.first().map_or(0, |r| r.token.len()));
        rows.iter()
            .map(|r| self.rotate_row(r, scratch, &mut out))
            .collect()
    }
}

fn into_string(out: &[u8]) -> String {
    // Fernet tokens are base64 text.
    String::from_utf8(out.to_vec()).expect("a Fernet token is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reencrypt::target::RowId;

    fn row(id: i64, token: String, kid: Option<&str>) -> SourceRow {
        SourceRow {
            id: RowId::Int(id),
            token,
            kid: kid.map(str::to_string),
        }
    }

    fn keys() -> (RotateKeys, FernetKey, FernetKey) {
        let new = FernetKey::generate();
        let old = FernetKey::generate();
        let rk = RotateKeys::new(vec![
            ("new".into(), new.clone()),
            ("old".into(), old.clone()),
        ])
        .unwrap();
        (rk, new, old)
    }

    #[test]
    fn rows_move_to_the_active_key_keeping_plaintext_and_timestamp() {
        let (rk, new, old) = keys();
        let rows: Vec<SourceRow> = (0..300)
            .map(|i| {
                let t = old.encrypt(format!("value {i}").as_bytes(), 1_000 + i as u64);
                row(i, t, if i % 2 == 0 { Some("old") } else { None })
            })
            .collect();
        let out = rk.rotate_rows(&rows, &mut FernetScratch::default());
        assert_eq!(out.len(), rows.len());
        for (i, (o, r)) in out.iter().zip(&rows).enumerate() {
            let Outcome::Rotated(t) = o else {
                panic!("row {i}: {o:?}")
            };
            assert_eq!(&*new.decrypt(t).unwrap(), format!("value {i}").as_bytes());
            assert!(old.decrypt(t).is_err());
            assert_eq!(
                crate::crypto::fernet::token_timestamp(t).unwrap(),
                crate::crypto::fernet::token_timestamp(&r.token).unwrap()
            );
        }
    }

    #[test]
    fn a_stale_kid_falls_back_to_trial_and_current_rows_without_kid_are_left() {
        let (rk, new, old) = keys();
        let mut s = FernetScratch::default();
        let mut out = Vec::new();
        // Kid says "new" but the old key made it.
        let r = row(1, old.encrypt(b"x", 1), Some("new"));
        assert!(matches!(
            rk.rotate_row(&r, &mut s, &mut out),
            Outcome::Rotated(_)
        ));
        // Already under the active key, no kid column: nothing to do.
        let r = row(2, new.encrypt(b"x", 1), None);
        assert_eq!(rk.rotate_row(&r, &mut s, &mut out), Outcome::Current);
        // A retired kid whose key is gone, token from a foreign key.
        let foreign = FernetKey::generate();
        let r = row(3, foreign.encrypt(b"x", 1), Some("dat_gone"));
        let Outcome::Failed(why) = rk.rotate_row(&r, &mut s, &mut out) else {
            panic!()
        };
        assert!(why.contains("dat_gone"), "{why}");
        let r = row(4, "not a token".into(), Some("old"));
        assert!(matches!(
            rk.rotate_row(&r, &mut s, &mut out),
            Outcome::Failed(_)
        ));
    }
}
