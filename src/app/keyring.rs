//! Keyring operations with IO: creating first keys, rotating a purpose,
//! unwrapping data keys, and the keyring snapshot.
//!
//! A rotation is one transaction: the new key is activated together with
//! the old key's demotion, the epoch bump and the outbox events, so no crash
//! can leave half a rotation or a change that is never announced.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::App;
use crate::audit::{self, Event, action};
use crate::crypto::fernet::FernetKey;
use crate::crypto::{self, KeyMaterial};
use crate::error::UsageError;
use crate::keyring::{
    self, Algorithm, KeyMeta, KeyState, Purpose, RotationPlan, plan_expiry, plan_rotation,
};
use crate::store::keys::{self as keystore, StoredKey};

/// What a rotation did (or, in a dry run, would do).
#[derive(Clone, Debug, Serialize)]
pub struct RotateOutcome {
    pub purpose: Purpose,
    /// The key that was active before, now retiring.
    pub old_kid: Option<String>,
    /// The new active key (None in a dry run).
    pub new_kid: Option<String>,
    pub algorithm: Algorithm,
    pub version: i64,
    pub epoch: Option<i64>,
    pub dry_run: bool,
}

/// One expiry step taken.
#[derive(Clone, Debug, Serialize)]
pub struct ExpiryOutcome {
    pub kid: String,
    pub purpose: Purpose,
    pub from: KeyState,
    pub to: KeyState,
}

/// The keyring snapshot (`keyring export`, and the document published to
/// Redis): metadata and root-wrapped material of every key.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub epoch: i64,
    pub root_kid: String,
    pub keys: Vec<SnapshotKey>,
}

/// One key in the snapshot.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SnapshotKey {
    pub kid: String,
    pub purpose: String,
    pub algorithm: String,
    pub state: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub rotate_after: Option<DateTime<Utc>>,
    pub retire_after: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Why the key was revoked (null unless revoked). Added after the first
    /// documents were written: an older export imports with no reason.
    #[serde(default)]
    pub revoked_reason: Option<String>,
    /// When the key's material was erased (null unless destroyed); absent
    /// from older exports.
    #[serde(default)]
    pub destroyed_at: Option<DateTime<Utc>>,
    /// A Fernet token made with the root key whose plaintext is the key
    /// material; null once the key is destroyed.
    pub wrapped: Option<String>,
    /// The root key that made `wrapped` (differs from the document's
    /// `root_kid` only while a root key rotation is under way).
    pub wrapped_root_kid: String,
    pub row_mac: String,
}

/// The data keys that can decrypt, unwrapped: the active one first, then
/// retiring ones newest first (MultiFernet order).
pub struct DataKeys {
    pub active_kid: String,
    pub keys: Vec<(String, FernetKey)>,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        write!(
            f,
            "DataKeys {{ active: {}, usable: {kids:?} }}",
            self.active_kid
        )
    }
}

/// Why a token did not decrypt.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    #[error("not a Fernet token ({0})")]
    Malformed(&'static str),
    #[error(
        "no usable data key decrypts this token (tampered, or made by an unknown or revoked key)"
    )]
    NoKey,
    #[error("data key {0} cannot decrypt: it is {1}")]
    KeyNotUsable(String, KeyState),
    #[error("unknown data key {0}")]
    UnknownKid(String),
}

impl DataKeys {
    /// Encrypts with the active key; returns its kid and the token.
    pub fn encrypt(&self, plaintext: &[u8], now_unix: u64) -> (String, String) {
        let (kid, key) = &self.keys[0];
        (kid.clone(), key.encrypt(plaintext, now_unix))
    }

    /// The usable key with this kid.
    pub fn get(&self, kid: &str) -> Option<&FernetKey> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, key)| key)
    }

    /// Decrypts by trying every usable key in order (active first).
    pub fn decrypt(
        &self,
        token: &str,
    ) -> Result<(String, zeroize::Zeroizing<Vec<u8>>), DecryptError> {
        use crate::crypto::fernet::FernetError;
        for (kid, key) in &self.keys {
            match key.decrypt(token) {
                Ok(p) => return Ok((kid.clone(), p)),
                Err(FernetError::Malformed(why)) => return Err(DecryptError::Malformed(why)),
                Err(_) => continue,
            }
        }
        Err(DecryptError::NoKey)
    }
}

impl App {
    /// The signing algorithm new signing keys use (from config).
    pub fn signing_algorithm(&self) -> Algorithm {
        self.config
            .policy
            .signing
            .algorithm
            .as_str()
            .parse()
            .expect("config only admits known signing algorithms")
    }

    /// The algorithm of the next key of `purpose`.
    pub fn algorithm_for(&self, purpose: Purpose) -> Algorithm {
        match purpose {
            Purpose::Signing => self.signing_algorithm(),
            Purpose::TokenEncryption => Algorithm::A256GCM,
            Purpose::Data => Algorithm::Fernet,
            Purpose::Temp => Algorithm::HmacSha256,
        }
    }

    /// Every key's metadata.
    pub async fn key_metas(&self, purpose: Option<Purpose>) -> anyhow::Result<Vec<KeyMeta>> {
        Ok(self
            .store
            .list_keys(purpose)
            .await?
            .into_iter()
            .map(|k| k.meta)
            .collect())
    }

    /// One key by kid, or a usage error naming it.
    pub async fn key_by_kid(&self, kid: &str) -> anyhow::Result<StoredKey> {
        if !keyring::kid_is_well_formed(kid) {
            return Err(UsageError(format!(
                "{kid:?} is not a key id (key ids look like dat_3k9x...)"
            ))
            .into());
        }
        self.store
            .key(kid)
            .await?
            .ok_or_else(|| UsageError(format!("no key with kid {kid}")).into())
    }

    /// Unwraps one stored key's material.
    pub fn unwrap_key(&self, key: &StoredKey) -> anyhow::Result<KeyMaterial> {
        Ok(self.roots.unwrap(
            &key.meta.kid,
            key.meta.purpose.as_str(),
            key.meta.algorithm.as_str(),
            &key.wrapped,
        )?)
    }

    /// Builds a new key of `purpose` (not yet stored).
    pub(crate) fn new_key(
        &self,
        purpose: Purpose,
        version: i64,
        material: &KeyMaterial,
        now: DateTime<Utc>,
    ) -> StoredKey {
        let algorithm = self.algorithm_for(purpose);
        let kid = keyring::new_kid(purpose, crypto::random_array());
        let wrapped = self.roots.wrap(
            &kid,
            purpose.as_str(),
            algorithm.as_str(),
            material,
            now.timestamp() as u64,
        );
        StoredKey {
            meta: KeyMeta {
                kid,
                purpose,
                algorithm,
                state: KeyState::Active,
                version,
                created_at: now,
                activated_at: Some(now),
                rotate_after: Some(self.policy.rotate_at(purpose, now)),
                retire_after: None,
                revoked_at: None,
            },
            wrapped,
            revoked_reason: None,
        }
    }

    /// Makes the first active key of every purpose that has none. Safe to
    /// repeat and to run from several processes at once.
    pub async fn ensure_active_keys(&self, now: DateTime<Utc>) -> anyhow::Result<Vec<KeyMeta>> {
        let mut created = Vec::new();
        for purpose in Purpose::ALL {
            let existing = self.store.list_keys(Some(purpose)).await?;
            if existing.iter().any(|k| k.meta.state == KeyState::Active) {
                continue;
            }
            let material = crypto::generate_material(purpose, self.algorithm_for(purpose))?;
            let mut tx = self.store.begin().await?;
            let keys = keystore::keys_of_purpose(&mut tx, purpose).await?;
            if keys.iter().any(|k| k.meta.state == KeyState::Active) {
                // Another process made it between our read and our lock.
                continue;
            }
            let attempt = async {
                let version = keystore::next_version(&mut tx, purpose).await?;
                let key = self.new_key(purpose, version, &material, now);
                keystore::insert_key(&mut tx, &key).await?;
                keystore::announce(&mut tx, &[("activate", &key.meta.kid, purpose)], now).await?;
                let events = vec![
                    generated(&key.meta),
                    Event::new(action::KEY_ACTIVATED)
                        .target(key.meta.kid.as_str())
                        .detail("purpose", purpose.as_str())
                        .detail("version", version)
                        .detail("first", true),
                ];
                audit::commit(self, tx, events, now).await?;
                anyhow::Ok(key.meta)
            };
            match attempt.await {
                Ok(meta) => created.push(meta),
                Err(e) => {
                    // A concurrent init on PostgreSQL may win the unique
                    // index (at the insert or at the commit); that is
                    // success for us if a key now exists.
                    let again = self.store.list_keys(Some(purpose)).await?;
                    if !again.iter().any(|k| k.meta.state == KeyState::Active) {
                        return Err(e).context(format!("creating the first {purpose} key"));
                    }
                }
            }
        }
        Ok(created)
    }

    /// Rotates `purpose` now, whatever its age. With `expected_old`, rotates
    /// only if that key is still the active one (so two workers acting on
    /// the same plan rotate once).
    pub async fn rotate(
        &self,
        purpose: Purpose,
        now: DateTime<Utc>,
        dry_run: bool,
        expected_old: Option<&str>,
    ) -> anyhow::Result<Option<RotateOutcome>> {
        let algorithm = self.algorithm_for(purpose);
        if dry_run {
            let keys = self.store.list_keys(Some(purpose)).await?;
            let active = keys.iter().find(|k| k.meta.state == KeyState::Active);
            let version = keys.iter().map(|k| k.meta.version).max().unwrap_or(0) + 1;
            return Ok(Some(RotateOutcome {
                purpose,
                old_kid: active.map(|k| k.meta.kid.clone()),
                new_kid: None,
                algorithm,
                version,
                epoch: None,
                dry_run: true,
            }));
        }
        // Key generation (RSA especially) happens before the transaction so
        // the write lock is held only for the few statements below.
        let material = crypto::generate_material(purpose, algorithm)?;
        let mut tx = self.store.begin().await?;
        let keys = keystore::keys_of_purpose(&mut tx, purpose).await?;
        let active = keys.iter().find(|k| k.meta.state == KeyState::Active);
        if let Some(expected) = expected_old
            && active.map(|k| k.meta.kid.as_str()) != Some(expected)
        {
            return Ok(None);
        }
        let version = keystore::next_version(&mut tx, purpose).await?;
        let new = self.new_key(purpose, version, &material, now);
        let mut events: Vec<(&str, &str, Purpose)> = Vec::new();
        let mut audit_events = vec![generated(&new.meta)];
        if let Some(old) = active {
            let retire_after = self.policy.retire_at(purpose, now);
            let changed = keystore::set_state(
                &mut tx,
                &old.meta.kid,
                KeyState::Active,
                KeyState::Retiring,
                now,
                retire_after,
                None,
            )
            .await?;
            anyhow::ensure!(changed, "key {} changed under us", old.meta.kid);
            events.push(("demote", &old.meta.kid, purpose));
            audit_events.push(
                Event::new(action::KEY_ROTATED)
                    .target(old.meta.kid.as_str())
                    .detail("purpose", purpose.as_str())
                    .detail("from", KeyState::Active.as_str())
                    .detail("to", KeyState::Retiring.as_str())
                    .detail("replaced_by", new.meta.kid.as_str())
                    .detail("retire_after", retire_after.map(|t| t.timestamp())),
            );
        }
        keystore::insert_key(&mut tx, &new).await?;
        events.push(("activate", &new.meta.kid, purpose));
        let epoch = keystore::announce(&mut tx, &events, now).await?;
        audit_events.push(
            Event::new(action::KEY_ACTIVATED)
                .target(new.meta.kid.as_str())
                .detail("purpose", purpose.as_str())
                .detail("version", version)
                .detail("replaces", active.map(|k| k.meta.kid.as_str()))
                .detail("epoch", epoch),
        );
        audit::commit(self, tx, audit_events, now)
            .await
            .with_context(|| format!("committing the {purpose} rotation"))?;
        tracing::info!(
            key.purpose = purpose.as_str(),
            key.id = new.meta.kid.as_str(),
            key.old_id = active.map(|k| k.meta.kid.as_str()),
            epoch,
            "rotated {purpose} key"
        );
        Ok(Some(RotateOutcome {
            purpose,
            old_kid: active.map(|k| k.meta.kid.clone()),
            new_kid: Some(new.meta.kid),
            algorithm,
            version,
            epoch: Some(epoch),
            dry_run: false,
        }))
    }

    /// Rotates `purpose` if the policy says it is due at `now`.
    pub async fn rotate_if_due(
        &self,
        purpose: Purpose,
        now: DateTime<Utc>,
        dry_run: bool,
    ) -> anyhow::Result<Option<RotateOutcome>> {
        let metas = self.key_metas(Some(purpose)).await?;
        match plan_rotation(&metas, purpose, &self.policy, now) {
            RotationPlan::NotDue { .. } => Ok(None),
            RotationPlan::Create => self.rotate(purpose, now, dry_run, None).await,
            RotationPlan::Rotate { old_kid } => {
                self.rotate(purpose, now, dry_run, Some(&old_kid)).await
            }
        }
    }

    /// Applies expiry at `now`: retires signing/token keys past grace,
    /// destroys expired temp keys, retires data keys that protect no row.
    /// `rows_under` gives the counted rows per data key.
    pub async fn expire(
        &self,
        now: DateTime<Utc>,
        dry_run: bool,
        rows_under: impl Fn(&str) -> Option<u64>,
    ) -> anyhow::Result<Vec<ExpiryOutcome>> {
        let metas = self.key_metas(None).await?;
        let actions = plan_expiry(&metas, now, rows_under);
        let mut done = Vec::new();
        for a in actions {
            if !dry_run {
                let mut tx = self.store.begin().await?;
                let changed = if a.to == KeyState::Destroyed {
                    let algorithm = metas
                        .iter()
                        .find(|m| m.kid == a.kid)
                        .map(|m| m.algorithm)
                        .context("planned key vanished")?;
                    let marker =
                        self.roots
                            .destroyed_marker(&a.kid, a.purpose.as_str(), algorithm.as_str());
                    keystore::destroy_key(&mut tx, &a.kid, a.from, &marker, now).await?
                } else {
                    keystore::set_state(&mut tx, &a.kid, a.from, a.to, now, None, None).await?
                };
                if !changed {
                    // Someone else applied it first.
                    continue;
                }
                let action = if a.to == KeyState::Destroyed {
                    "destroy"
                } else {
                    "retire"
                };
                keystore::announce(&mut tx, &[(action, &a.kid, a.purpose)], now).await?;
                let event = Event::new(if a.to == KeyState::Destroyed {
                    action::KEY_DESTROYED
                } else {
                    action::KEY_RETIRED
                })
                .target(a.kid.as_str())
                .detail("purpose", a.purpose.as_str())
                .detail("from", a.from.as_str())
                .detail("to", a.to.as_str());
                audit::commit(self, tx, vec![event], now)
                    .await
                    .context("committing key expiry")?;
                tracing::info!(
                    key.id = a.kid.as_str(),
                    to = a.to.as_str(),
                    "key {}",
                    a.to.as_str()
                );
            }
            done.push(ExpiryOutcome {
                kid: a.kid,
                purpose: a.purpose,
                from: a.from,
                to: a.to,
            });
        }
        Ok(done)
    }

    /// Unwraps the data keys that can decrypt (active first).
    pub async fn data_keys(&self) -> anyhow::Result<DataKeys> {
        let keys = self.store.list_keys(Some(Purpose::Data)).await?;
        let mut usable: Vec<&StoredKey> = keys
            .iter()
            .filter(|k| k.meta.state.can_verify_or_decrypt())
            .collect();
        usable.sort_by_key(|k| (k.meta.state != KeyState::Active, -k.meta.version));
        let active = usable
            .first()
            .filter(|k| k.meta.state == KeyState::Active)
            .context("there is no active data key: run `keywarden init`")?;
        let active_kid = active.meta.kid.clone();
        let mut out = Vec::with_capacity(usable.len());
        for k in usable {
            out.push((k.meta.kid.clone(), self.fernet_of(k)?));
        }
        Ok(DataKeys {
            active_kid,
            keys: out,
        })
    }

    /// The Fernet key a data key's material holds.
    pub fn fernet_of(&self, key: &StoredKey) -> anyhow::Result<FernetKey> {
        let material = self.unwrap_key(key)?;
        let text = std::str::from_utf8(material.expose())
            .ok()
            .with_context(|| format!("data key {} holds no Fernet key", key.meta.kid))?;
        FernetKey::from_base64(text)
            .map_err(|_| anyhow::anyhow!("data key {} holds no Fernet key", key.meta.kid))
    }

    /// The keyring snapshot.
    ///
    /// The epoch is read before the keys: a rotation committing in between
    /// makes the keys newer than the label, never older, so a subscriber
    /// holding this epoch still reloads when it sees the next one.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let epoch = self.store.epoch().await?;
        let keys = self.store.list_keys(None).await?;
        let mut destroyed = self.store.destroyed_times().await?;
        Ok(Snapshot {
            epoch,
            root_kid: self.roots.newest().id().to_string(),
            keys: keys
                .into_iter()
                .map(|k| SnapshotKey {
                    destroyed_at: if k.meta.state == KeyState::Destroyed {
                        destroyed.remove(&k.meta.kid)
                    } else {
                        None
                    },
                    kid: k.meta.kid,
                    purpose: k.meta.purpose.as_str().into(),
                    algorithm: k.meta.algorithm.as_str().into(),
                    state: k.meta.state.as_str().into(),
                    version: k.meta.version,
                    created_at: k.meta.created_at,
                    activated_at: k.meta.activated_at,
                    rotate_after: k.meta.rotate_after,
                    retire_after: k.meta.retire_after,
                    revoked_at: k.meta.revoked_at,
                    revoked_reason: k.revoked_reason,
                    wrapped: k.wrapped.token,
                    wrapped_root_kid: k.wrapped.root_kid,
                    row_mac: k.wrapped.row_mac,
                })
                .collect(),
        })
    }
}

/// The `key.generated` event of a new key.
pub(crate) fn generated(meta: &KeyMeta) -> Event {
    Event::new(action::KEY_GENERATED)
        .target(meta.kid.as_str())
        .detail("purpose", meta.purpose.as_str())
        .detail("algorithm", meta.algorithm.as_str())
        .detail("version", meta.version)
}

/// What a root key rotation did.
#[derive(Clone, Debug, Serialize)]
pub struct RootRotation {
    pub old_root_kid: Vec<String>,
    pub new_root_kid: String,
    pub keys_rewrapped: usize,
    pub dry_run: bool,
}

impl App {
    /// Re-wraps every key under a new root key and makes it the only one.
    ///
    /// With a key file: a new key is generated and written in front of the
    /// old one (mode 0600), every key is re-wrapped and the canary replaced
    /// in one transaction, then the old key is dropped from the file. A
    /// crash at any step leaves a file that opens the store.
    /// With `KEYWARDEN_ROOT_KEY`: the operator puts the new key first in the
    /// list; this re-wraps everything under it (and says to drop the rest).
    pub async fn rotate_root(
        &mut self,
        now: DateTime<Utc>,
        dry_run: bool,
    ) -> anyhow::Result<RootRotation> {
        use crate::app::RootKeySource;
        use crate::crypto::rootkey::{RootKey, RootKeys};
        let keys = self.store.list_keys(None).await?;
        let old_ids: Vec<String> = self
            .roots
            .all()
            .iter()
            .map(|k| k.id().to_string())
            .collect();
        let file = match &self.root_source {
            RootKeySource::Env => {
                if self.roots.all().len() < 2 && !dry_run {
                    return Err(UsageError(
                        "KEYWARDEN_ROOT_KEY holds one key: put a new key first in the list \
                         (e.g. from Python's Fernet.generate_key()), keep the current one after it, \
                         and run `keywarden keys rotate root` again"
                            .into(),
                    )
                    .into());
                }
                None
            }
            RootKeySource::File(p) | RootKeySource::Generated(p) => Some(p.clone()),
        };
        if dry_run {
            return Ok(RootRotation {
                old_root_kid: old_ids,
                new_root_kid: "(generated on rotation)".into(),
                keys_rewrapped: keys.len(),
                dry_run: true,
            });
        }
        if let Some(path) = &file {
            let new = RootKey::generate();
            let mut all = vec![new];
            all.extend(self.roots.all().iter().cloned());
            write_key_file(path, &RootKeys::new(all.clone()))?;
            self.roots = RootKeys::new(all);
        }
        let mut tx = self.store.begin().await?;
        let mut count = 0;
        for k in &keys {
            let m = &k.meta;
            let new = self.roots.rewrap(
                &m.kid,
                m.purpose.as_str(),
                m.algorithm.as_str(),
                &k.wrapped,
                now.timestamp() as u64,
            )?;
            let changed = keystore::set_wrapped(&mut tx, &m.kid, &k.wrapped, &new).await?;
            anyhow::ensure!(
                changed,
                "key {} changed during the root key rotation",
                m.kid
            );
            count += 1;
        }
        sqlx::query("UPDATE kw_meta SET value = $1 WHERE name = 'root_canary'")
            .bind(self.roots.make_canary(now.timestamp() as u64))
            .execute(&mut *tx)
            .await
            .context("replacing the root key canary")?;
        // The audit key moves with the others, so checkpoints and `hmac:`
        // identifiers stay checkable after the old root key is gone.
        audit::keys::rewrap_in(&mut tx, &self.roots, now.timestamp() as u64).await?;
        let newest = self.roots.newest().clone();
        keystore::announce(&mut tx, &[("rewrap", newest.id(), Purpose::Data)], now).await?;
        let event = Event::new(action::KEY_REWRAPPED)
            .target(newest.id())
            .detail("keys", count)
            .detail(
                "old_root_kids",
                old_ids
                    .iter()
                    .filter(|id| *id != newest.id())
                    .cloned()
                    .collect::<Vec<String>>(),
            );
        audit::commit(self, tx, vec![event], now)
            .await
            .context("committing the root key rotation")?;
        let only_new = RootKeys::new(vec![newest.clone()]);
        if let Some(path) = &file {
            write_key_file(path, &only_new)?;
        }
        self.roots = only_new;
        Ok(RootRotation {
            old_root_kid: old_ids.into_iter().filter(|id| id != newest.id()).collect(),
            new_root_kid: newest.id().to_string(),
            keys_rewrapped: count,
            dry_run: false,
        })
    }
}

/// Replaces the key file atomically (write a 0600 temp file, fsync, rename).
fn write_key_file(
    path: &std::path::Path,
    keys: &crate::crypto::rootkey::RootKeys,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut text = zeroize::Zeroizing::new(String::new());
    for k in keys.all() {
        text.push_str(&k.to_base64());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}
