//! `keys import-fernet`: adopt an application's existing Fernet key as a
//! decrypt-only (retiring) data key, so `reencrypt --target ...` can move its
//! rows onto keywarden's active key. The key is stored like every other key:
//! wrapped under the root key and bound to its row by the row MAC.

use anyhow::Context;
use serde::Serialize;

use crate::app::App;
use crate::crypto::KeyMaterial;
use crate::crypto::fernet::FernetKey;
use crate::keyring::{self, Algorithm, KeyMeta, KeyState, Purpose};
use crate::store::keys::{self as keystore, StoredKey};

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct Imported {
    pub kid: String,
    pub state: KeyState,
    pub version: i64,
    /// False when the keyring already held this key (nothing was written).
    pub created: bool,
}

impl App {
    /// Adds `key` as a retiring data key; a key the keyring already holds
    /// (compared in constant time after unwrapping) is reported, not added
    /// twice.
    pub async fn import_fernet(
        &self,
        key: &FernetKey,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Imported> {
        let text = key.to_base64();
        for existing in self.store.list_keys(Some(Purpose::Data)).await? {
            if existing.wrapped.token.is_none() {
                continue;
            }
            let theirs = self.fernet_of(&existing)?.to_base64();
            if aws_lc_rs::constant_time::verify_slices_are_equal(theirs.as_bytes(), text.as_bytes())
                .is_ok()
            {
                return Ok(Imported {
                    kid: existing.meta.kid,
                    state: existing.meta.state,
                    version: existing.meta.version,
                    created: false,
                });
            }
        }
        let material = KeyMaterial::new(zeroize::Zeroizing::new(text.as_bytes().to_vec()));
        let kid = keyring::new_kid(Purpose::Data, crate::crypto::random_array());
        let algorithm = Algorithm::Fernet;
        let wrapped = self.roots.wrap(
            &kid,
            Purpose::Data.as_str(),
            algorithm.as_str(),
            &material,
            now.timestamp() as u64,
        );
        let mut tx = self.store.begin().await?;
        let version = keystore::next_version(&mut tx, Purpose::Data).await?;
        let stored = StoredKey {
            meta: KeyMeta {
                kid: kid.clone(),
                purpose: Purpose::Data,
                algorithm,
                state: KeyState::Retiring,
                version,
                created_at: now,
                activated_at: None,
                rotate_after: None,
                retire_after: None,
                revoked_at: None,
            },
            wrapped,
            revoked_reason: None,
        };
        keystore::insert_key(&mut tx, &stored).await?;
        keystore::announce(&mut tx, &[("import", &kid, Purpose::Data)], now).await?;
        tx.commit().await.context("committing the imported key")?;
        tracing::info!(
            key.id = kid.as_str(),
            "imported a Fernet key as retiring data key {kid}"
        );
        Ok(Imported {
            kid,
            state: KeyState::Retiring,
            version,
            created: true,
        })
    }
}
