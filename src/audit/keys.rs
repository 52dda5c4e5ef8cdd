//! The audit key: 32 random bytes made once per store, kept in `kw_meta`
//! (`audit_key`) only wrapped under the root key (a Fernet token plus a row
//! MAC, exactly like a keyring key), and re-wrapped by `keys rotate root`
//! in the same transaction as every other key.
//!
//! Why a wrapped key rather than a subkey of the root key itself: the
//! checkpoint MACs and the `hmac:` identifiers must stay checkable after
//! the root key rotates (the old root key is dropped then). From the audit
//! key, HKDF (`chain::derive_key`) derives independent keys for
//! checkpoints, the retention anchor and identifiers; none is ever written
//! anywhere.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use zeroize::Zeroizing;

use super::chain::{self, CHECKPOINT_KEY_LABEL, IDENTIFIER_KEY_LABEL};
use crate::crypto::rootkey::{RootKeys, Wrapped};
use crate::crypto::{self, KeyMaterial};
use crate::store::Store;
use crate::store::audit::{self as auditstore, KEY_META};

/// The [`chain::derive_key`] label of the key that signs the retention anchor.
pub const ANCHOR_KEY_LABEL: &str = "keywarden/audit/anchor/v1";

const WRAP_KID: &str = "audit_key";
const WRAP_PURPOSE: &str = "audit";
const WRAP_ALGORITHM: &str = "hmac-sha256";

/// The keys derived from the audit key. Never printed.
pub struct AuditKeys {
    checkpoint: Zeroizing<[u8; 32]>,
    anchor: Zeroizing<[u8; 32]>,
    identifier: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKeys([redacted])")
    }
}

impl AuditKeys {
    /// Derives the keys from the audit key's bytes.
    pub fn from_secret(secret: &[u8]) -> AuditKeys {
        AuditKeys {
            checkpoint: chain::derive_key(secret, CHECKPOINT_KEY_LABEL),
            anchor: chain::derive_key(secret, ANCHOR_KEY_LABEL),
            identifier: chain::derive_key(secret, IDENTIFIER_KEY_LABEL),
        }
    }

    /// `hmac:` + keyed HMAC of a name (see [`chain::redact_identifier`]).
    pub fn redact(&self, value: &str) -> String {
        chain::redact_identifier(&self.identifier[..], value)
    }

    /// The key that signs and checks checkpoint files.
    pub fn checkpoint_key(&self) -> &[u8] {
        &self.checkpoint[..]
    }

    /// The key that signs and checks the retention anchor.
    pub fn anchor_key(&self) -> &[u8] {
        &self.anchor[..]
    }
}

/// `kw_meta.audit_key` as stored.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    token: String,
    root_kid: String,
    row_mac: String,
}

impl StoredKey {
    fn wrapped(&self) -> Wrapped {
        Wrapped {
            token: Some(self.token.clone()),
            root_kid: self.root_kid.clone(),
            row_mac: self.row_mac.clone(),
        }
    }

    fn from_wrapped(w: Wrapped) -> anyhow::Result<StoredKey> {
        Ok(StoredKey {
            token: w.token.context("the audit key cannot be destroyed")?,
            root_kid: w.root_kid,
            row_mac: w.row_mac,
        })
    }
}

fn fresh(roots: &RootKeys) -> anyhow::Result<String> {
    let secret = KeyMaterial::new(Zeroizing::new(crypto::random_array::<32>().to_vec()));
    let now = chrono::Utc::now().timestamp() as u64;
    let w = roots.wrap(WRAP_KID, WRAP_PURPOSE, WRAP_ALGORITHM, &secret, now);
    Ok(serde_json::to_string(&StoredKey::from_wrapped(w)?)?)
}

fn open(json: &str, roots: &RootKeys) -> anyhow::Result<AuditKeys> {
    let stored: StoredKey =
        serde_json::from_str(json).context("the stored audit key is unreadable")?;
    let secret = roots
        .unwrap(WRAP_KID, WRAP_PURPOSE, WRAP_ALGORITHM, &stored.wrapped())
        .context("opening the audit key")?;
    Ok(AuditKeys::from_secret(secret.expose()))
}

/// Loads the audit key through the pool, creating it on first use (the
/// first writer wins when several processes race).
pub async fn load_or_create(store: &Store, roots: &RootKeys) -> anyhow::Result<AuditKeys> {
    let json = match store.meta(KEY_META).await? {
        Some(j) => j,
        None => store.meta_insert_once(KEY_META, &fresh(roots)?).await?,
    };
    open(&json, roots)
}

/// Loads the audit key inside a transaction, creating it on first use
/// (the caller holds the audit writer lock, so no one races it).
pub async fn load_or_create_in(
    conn: &mut AnyConnection,
    roots: &RootKeys,
) -> anyhow::Result<AuditKeys> {
    let json = match auditstore::meta_in(conn, KEY_META).await? {
        Some(j) => j,
        None => {
            // Insert-once: a process outside the audit lock (the pool path
            // above) may have made one since; the first key made wins.
            sqlx::query(
                "INSERT INTO kw_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(KEY_META)
            .bind(fresh(roots)?)
            .execute(&mut *conn)
            .await
            .context("storing the audit key")?;
            auditstore::meta_in(conn, KEY_META)
                .await?
                .context("the audit key vanished after storing it")?
        }
    };
    open(&json, roots)
}

/// Re-wraps the audit key under the newest root key (root key rotation),
/// in the rotation's transaction. A store without an audit key yet is left
/// alone.
pub async fn rewrap_in(
    conn: &mut AnyConnection,
    roots: &RootKeys,
    now_unix: u64,
) -> anyhow::Result<()> {
    let Some(json) = auditstore::meta_in(conn, KEY_META).await? else {
        return Ok(());
    };
    let stored: StoredKey =
        serde_json::from_str(&json).context("the stored audit key is unreadable")?;
    let new = roots
        .rewrap(
            WRAP_KID,
            WRAP_PURPOSE,
            WRAP_ALGORITHM,
            &stored.wrapped(),
            now_unix,
        )
        .context("re-wrapping the audit key")?;
    auditstore::set_meta_in(
        conn,
        KEY_META,
        &serde_json::to_string(&StoredKey::from_wrapped(new)?)?,
    )
    .await
}
