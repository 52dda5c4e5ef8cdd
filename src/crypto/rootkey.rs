//! The root key: envelope encryption for every other key.
//!
//! Key material is stored only as a standard Fernet token made with the root
//! key (any Fernet library can unwrap it, which is what the keyring snapshot
//! promises to non-Rust apps). Each stored row also carries a MAC, keyed
//! from the root key, over kid, purpose, algorithm and the wrapped token, so
//! a wrapped key copied onto another row is refused when loaded.
//!
//! Several root keys may be given, newest first: the newest wraps, every one
//! of them unwraps, which is how the root key itself rotates (re-wrap).
//! Parsing lives here; reading the environment and the key file is the
//! caller's business.

use std::fmt;

use zeroize::Zeroizing;

use super::fernet::FernetKey;
use super::{KeyMaterial, hmac_parts};

/// One root key with the subkeys derived from it.
#[derive(Clone)]
pub struct RootKey {
    fernet: FernetKey,
    raw: Zeroizing<[u8; 32]>,
    id: String,
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootKey({}, [redacted])", self.id)
    }
}

impl RootKey {
    /// Parses a root key written as a Fernet key (urlsafe base64 of 32 bytes).
    pub fn from_base64(s: &str) -> Result<Self, super::fernet::FernetError> {
        let fernet = FernetKey::from_base64(s)?;
        Ok(Self::from_fernet(fernet))
    }

    /// A fresh root key from the OS CSPRNG.
    pub fn generate() -> Self {
        Self::from_fernet(FernetKey::generate())
    }

    fn from_fernet(fernet: FernetKey) -> Self {
        use base64::Engine;
        let encoded = fernet.to_base64();
        let mut raw = Zeroizing::new([0u8; 32]);
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE
                .decode(encoded.as_bytes())
                .expect("a Fernet key encodes as urlsafe base64"),
        );
        raw.copy_from_slice(&decoded);
        let id_tag = hmac_parts(&raw[..], &[b"keywarden/root-key-id/v1"]);
        let id = format!("rk_{}", hex::encode(&id_tag[..8]));
        RootKey { fernet, raw, id }
    }

    /// A non-secret identifier of this root key (a keyed fingerprint).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as written in a key file or `KEYWARDEN_ROOT_KEY`.
    pub fn to_base64(&self) -> Zeroizing<String> {
        self.fernet.to_base64()
    }

    /// A 32-byte subkey for one use (row MACs, audit HMACs, checkpoint
    /// signatures), so no two uses share a key.
    pub fn derive(&self, label: &str) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(hmac_parts(
            &self.raw[..],
            &[b"keywarden/derive/v1", label.as_bytes()],
        ))
    }

    /// The Fernet view of the root key (for wrapping and the canary).
    pub fn fernet(&self) -> &FernetKey {
        &self.fernet
    }
}

/// The root keys in force, newest first.
#[derive(Clone, Debug)]
pub struct RootKeys {
    keys: Vec<RootKey>,
}

/// Why a wrapped key could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnwrapError {
    #[error(
        "key {kid} is wrapped under root key {root_kid}, which is not among the root keys given"
    )]
    UnknownRootKey { kid: String, root_kid: String },
    #[error("key {kid}: its row MAC does not match (the wrapped key was moved or altered)")]
    BadRowMac { kid: String },
    #[error("key {kid}: the wrapped material does not decrypt under its root key")]
    BadWrap { kid: String },
    #[error("key {kid} has been destroyed: it has no material")]
    Destroyed { kid: String },
}

/// A wrapped key as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrapped {
    /// Fernet token under the root key; `None` once destroyed.
    pub token: Option<String>,
    pub root_kid: String,
    pub row_mac: String,
}

impl RootKeys {
    /// Root keys from a list, newest first. The list must not be empty.
    pub fn new(keys: Vec<RootKey>) -> Self {
        assert!(!keys.is_empty(), "at least one root key is required");
        RootKeys { keys }
    }

    /// Parses a comma- or newline-separated list of keys, newest first.
    /// Errors name the entry's position (1-based), never its value.
    pub fn parse_list(text: &str, what: &str) -> Result<Self, String> {
        let entries: Vec<&str> = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.starts_with('#'))
            .collect();
        if entries.is_empty() {
            return Err(format!("{what} holds no root key"));
        }
        let mut keys = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let key = RootKey::from_base64(entry).map_err(|e| {
                format!(
                    "{what}: entry {} of {} is not a Fernet key ({e}; expected urlsafe base64 of 32 bytes, as Fernet.generate_key() makes)",
                    i + 1,
                    entries.len()
                )
            })?;
            keys.push(key);
        }
        Ok(RootKeys { keys })
    }

    /// The newest root key: the one that wraps.
    pub fn newest(&self) -> &RootKey {
        &self.keys[0]
    }

    /// Every root key, newest first.
    pub fn all(&self) -> &[RootKey] {
        &self.keys
    }

    /// The root key with this id.
    pub fn by_id(&self, id: &str) -> Option<&RootKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The row MAC binding a wrapped token to its row.
    fn row_mac(root: &RootKey, kid: &str, purpose: &str, algorithm: &str, token: &str) -> String {
        let key = root.derive("row-mac");
        hex::encode(hmac_parts(
            &key[..],
            &[
                kid.as_bytes(),
                purpose.as_bytes(),
                algorithm.as_bytes(),
                token.as_bytes(),
            ],
        ))
    }

    /// Wraps `material` for the row (`kid`, `purpose`, `algorithm`) under
    /// the newest root key.
    pub fn wrap(
        &self,
        kid: &str,
        purpose: &str,
        algorithm: &str,
        material: &KeyMaterial,
        now_unix: u64,
    ) -> Wrapped {
        let root = self.newest();
        let token = root.fernet.encrypt(material.expose(), now_unix);
        let row_mac = Self::row_mac(root, kid, purpose, algorithm, &token);
        Wrapped {
            token: Some(token),
            root_kid: root.id.clone(),
            row_mac,
        }
    }

    /// The row MAC of a destroyed key (no token left), so its row stays bound.
    pub fn destroyed_marker(&self, kid: &str, purpose: &str, algorithm: &str) -> Wrapped {
        let root = self.newest();
        Wrapped {
            token: None,
            root_kid: root.id.clone(),
            row_mac: Self::row_mac(root, kid, purpose, algorithm, ""),
        }
    }

    /// Checks the row MAC and unwraps the material.
    pub fn unwrap(
        &self,
        kid: &str,
        purpose: &str,
        algorithm: &str,
        wrapped: &Wrapped,
    ) -> Result<KeyMaterial, UnwrapError> {
        let root = self
            .by_id(&wrapped.root_kid)
            .ok_or_else(|| UnwrapError::UnknownRootKey {
                kid: kid.to_string(),
                root_kid: wrapped.root_kid.clone(),
            })?;
        let token = wrapped.token.as_deref().unwrap_or("");
        let expected = Self::row_mac(root, kid, purpose, algorithm, token);
        let same = aws_lc_rs::constant_time::verify_slices_are_equal(
            expected.as_bytes(),
            wrapped.row_mac.as_bytes(),
        )
        .is_ok();
        if !same {
            return Err(UnwrapError::BadRowMac {
                kid: kid.to_string(),
            });
        }
        let Some(token) = wrapped.token.as_deref() else {
            return Err(UnwrapError::Destroyed {
                kid: kid.to_string(),
            });
        };
        let plain = root
            .fernet
            .decrypt(token)
            .map_err(|_| UnwrapError::BadWrap {
                kid: kid.to_string(),
            })?;
        Ok(KeyMaterial::new(Zeroizing::new(plain.to_vec())))
    }

    /// Re-wraps under the newest root key (root key rotation).
    pub fn rewrap(
        &self,
        kid: &str,
        purpose: &str,
        algorithm: &str,
        wrapped: &Wrapped,
        now_unix: u64,
    ) -> Result<Wrapped, UnwrapError> {
        if wrapped.token.is_none() {
            self.unwrap(kid, purpose, algorithm, wrapped)
                .err()
                .map_or(Ok(()), |e| match e {
                    UnwrapError::Destroyed { .. } => Ok(()),
                    other => Err(other),
                })?;
            return Ok(self.destroyed_marker(kid, purpose, algorithm));
        }
        let material = self.unwrap(kid, purpose, algorithm, wrapped)?;
        Ok(self.wrap(kid, purpose, algorithm, &material, now_unix))
    }

    /// The canary stored with a new store: proves later that the root keys
    /// given belong to this store before anything is written.
    pub fn make_canary(&self, now_unix: u64) -> String {
        self.newest().fernet.encrypt(CANARY_PLAINTEXT, now_unix)
    }

    /// Whether any of the root keys opens the canary.
    pub fn opens_canary(&self, canary: &str) -> bool {
        self.keys.iter().any(|k| {
            k.fernet
                .decrypt(canary)
                .is_ok_and(|p| p.as_slice() == CANARY_PLAINTEXT)
        })
    }
}

const CANARY_PLAINTEXT: &[u8] = b"keywarden root key canary v1";

#[cfg(test)]
mod tests {
    use super::*;

    fn material() -> KeyMaterial {
        KeyMaterial::new(Zeroizing::new(b"0123456789abcdef0123456789abcdef".to_vec()))
    }

    #[test]
    fn wrap_round_trips_and_the_token_is_plain_fernet() {
        let roots = RootKeys::new(vec![RootKey::generate()]);
        let w = roots.wrap("dat_x", "data", "fernet", &material(), 1_700_000_000);
        let m = roots.unwrap("dat_x", "data", "fernet", &w).unwrap();
        assert_eq!(m.expose(), material().expose());
        // Any Fernet implementation with the root key opens it.
        let plain = roots
            .newest()
            .fernet()
            .decrypt(w.token.as_deref().unwrap())
            .unwrap();
        assert_eq!(plain.as_slice(), material().expose());
    }

    #[test]
    fn a_wrapped_key_moved_to_another_row_is_refused() {
        let roots = RootKeys::new(vec![RootKey::generate()]);
        let w = roots.wrap("dat_a", "data", "fernet", &material(), 0);
        assert_eq!(
            roots.unwrap("dat_b", "data", "fernet", &w).unwrap_err(),
            UnwrapError::BadRowMac {
                kid: "dat_b".into()
            }
        );
        assert!(roots.unwrap("dat_a", "temp", "fernet", &w).is_err());
    }

    #[test]
    fn an_older_root_key_still_unwraps_and_rewrap_moves_to_the_newest() {
        let old = RootKey::generate();
        let old_only = RootKeys::new(vec![old.clone()]);
        let w = old_only.wrap("k", "data", "fernet", &material(), 0);
        let both = RootKeys::new(vec![RootKey::generate(), old]);
        assert!(both.unwrap("k", "data", "fernet", &w).is_ok());
        let moved = both.rewrap("k", "data", "fernet", &w, 0).unwrap();
        assert_eq!(moved.root_kid, both.newest().id());
        let newest_only = RootKeys::new(vec![both.newest().clone()]);
        assert!(newest_only.unwrap("k", "data", "fernet", &moved).is_ok());
        assert!(matches!(
            newest_only.unwrap("k", "data", "fernet", &w),
            Err(UnwrapError::UnknownRootKey { .. })
        ));
    }

    #[test]
    fn the_canary_tells_a_wrong_root_key() {
        let a = RootKeys::new(vec![RootKey::generate()]);
        let b = RootKeys::new(vec![RootKey::generate()]);
        let canary = a.make_canary(0);
        assert!(a.opens_canary(&canary));
        assert!(!b.opens_canary(&canary));
    }

    #[test]
    fn a_malformed_list_entry_is_named_by_position_not_value() {
        let good = RootKey::generate().to_base64();
        let text = format!("{},not-a-key-SECRETISH", &*good);
        let err = RootKeys::parse_list(&text, "KEYWARDEN_ROOT_KEY").unwrap_err();
        assert!(err.contains("entry 2 of 2"), "{err}");
        assert!(!err.contains("SECRETISH"), "{err}");
        assert!(!err.contains(&*good), "{err}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let k = RootKey::generate();
        let shown = format!("{k:?} {:?}", RootKeys::new(vec![k.clone()]));
        assert!(!shown.contains(&*k.to_base64()));
    }
}
