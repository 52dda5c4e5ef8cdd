//! `keyring import FILE`: disaster recovery from a `keyring export`
//! document. The material stays wrapped as exported (each key carries its
//! root kid and row MAC); every key is checked to unwrap with the given root
//! keys before anything is written, then all rows go in one transaction with
//! the epoch bump and the audit rows.
//!
//! Into an empty store (no keys) by default; with `merge`, keys the store
//! already holds are left exactly as they are (so no state is ever
//! downgraded) and only new kids are added.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::App;
use super::keyring::Snapshot;
use crate::audit::{self, Event, action};
use crate::crypto::rootkey::{UnwrapError, Wrapped};
use crate::error::UsageError;
use crate::keyring::{KeyMeta, KeyState, Purpose};
use crate::store::keys::{self as keystore, StoredKey};

/// What an import did (or would do).
#[derive(Clone, Debug, Serialize)]
pub struct ImportOutcome {
    /// Kids inserted.
    pub imported: Vec<String>,
    /// Kids the store already had (left unchanged).
    pub kept: Vec<String>,
    pub epoch: Option<i64>,
    pub dry_run: bool,
}

fn to_stored(k: &super::keyring::SnapshotKey) -> anyhow::Result<StoredKey> {
    let bad = |what: &str| UsageError(format!("key {}: unreadable {what} in the document", k.kid));
    Ok(StoredKey {
        meta: KeyMeta {
            kid: k.kid.clone(),
            purpose: k.purpose.parse().map_err(|_| bad("purpose"))?,
            algorithm: k.algorithm.parse().map_err(|_| bad("algorithm"))?,
            state: k.state.parse().map_err(|_| bad("state"))?,
            version: k.version,
            created_at: k.created_at,
            activated_at: k.activated_at,
            rotate_after: k.rotate_after,
            retire_after: k.retire_after,
            revoked_at: k.revoked_at,
        },
        wrapped: Wrapped {
            token: k.wrapped.clone(),
            root_kid: k.wrapped_root_kid.clone(),
            row_mac: k.row_mac.clone(),
        },
        revoked_reason: k.revoked_reason.clone(),
    })
}

impl App {
    /// Restores the keys of `doc` (see the module docs).
    pub async fn import_keyring(
        &self,
        doc: &Snapshot,
        merge: bool,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> anyhow::Result<ImportOutcome> {
        let mut keys = Vec::new();
        for k in &doc.keys {
            let key = to_stored(k)?;
            let m = &key.meta;
            match self.roots.unwrap(
                &m.kid,
                m.purpose.as_str(),
                m.algorithm.as_str(),
                &key.wrapped,
            ) {
                Ok(_) => {}
                Err(UnwrapError::Destroyed { .. }) if m.state == KeyState::Destroyed => {}
                Err(e) => {
                    return Err(UsageError(format!(
                        "key {} does not unwrap with the given root key ({e}): \
                         import needs the root key the export was made under \
                         (KEYWARDEN_ROOT_KEY or the key file)",
                        m.kid
                    ))
                    .into());
                }
            }
            keys.push(key);
        }
        for p in Purpose::ALL {
            let active = keys
                .iter()
                .filter(|k| k.meta.purpose == p && k.meta.state == KeyState::Active)
                .count();
            if active > 1 {
                return Err(UsageError(format!(
                    "the document has {active} active {p} keys: it is not a keyring export"
                ))
                .into());
            }
        }
        let existing = self.store.list_keys(None).await?;
        if !existing.is_empty() && !merge {
            return Err(UsageError(format!(
                "the store already holds {} keys: import restores into an empty store \
                 (pass --merge to add only the keys it does not have)",
                existing.len()
            ))
            .into());
        }
        let (kept, new): (Vec<StoredKey>, Vec<StoredKey>) = keys
            .into_iter()
            .partition(|k| existing.iter().any(|e| e.meta.kid == k.meta.kid));
        for k in &new {
            if k.meta.state == KeyState::Active
                && let Some(e) = existing
                    .iter()
                    .find(|e| e.meta.purpose == k.meta.purpose && e.meta.state == KeyState::Active)
            {
                return Err(UsageError(format!(
                    "cannot merge: the document's active {} key {} would replace the store's active key {} \
                     (rotate or revoke one of them first)",
                    k.meta.purpose, k.meta.kid, e.meta.kid
                ))
                .into());
            }
        }
        let mut outcome = ImportOutcome {
            imported: new.iter().map(|k| k.meta.kid.clone()).collect(),
            kept: kept.iter().map(|k| k.meta.kid.clone()).collect(),
            epoch: None,
            dry_run,
        };
        if dry_run || new.is_empty() {
            return Ok(outcome);
        }
        let mut tx = self.store.begin().await?;
        // Subscribers ignore epochs they have passed: continue from the
        // exported epoch, never below.
        let current = self.store.epoch().await?;
        sqlx::query(
            "INSERT INTO kw_meta (name, value) VALUES ('epoch', $1) \
             ON CONFLICT (name) DO UPDATE SET value = $1",
        )
        .bind(current.max(doc.epoch).to_string())
        .execute(&mut *tx)
        .await
        .context("setting the keyring epoch")?;
        let mut outbox = Vec::new();
        let mut events = Vec::new();
        for k in &new {
            keystore::insert_key(&mut tx, k).await?;
            if let Some(at) = doc
                .keys
                .iter()
                .find(|d| d.kid == k.meta.kid)
                .and_then(|d| d.destroyed_at)
            {
                keystore::set_destroyed_at(&mut tx, &k.meta.kid, at).await?;
            }
            if k.meta.state == KeyState::Active {
                outbox.push(("activate", k.meta.kid.as_str(), k.meta.purpose));
            }
            events.push(
                Event::new(action::KEY_IMPORTED)
                    .target(k.meta.kid.as_str())
                    .detail("purpose", k.meta.purpose.as_str())
                    .detail("state", k.meta.state.as_str())
                    .detail("version", k.meta.version),
            );
        }
        let epoch = keystore::announce(&mut tx, &outbox, now).await?;
        audit::commit(self, tx, events, now)
            .await
            .context("committing the keyring import")?;
        outcome.epoch = Some(epoch);
        Ok(outcome)
    }
}
