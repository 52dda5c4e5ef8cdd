//! Cryptography, pure and CPU-bound: the root key and envelope wrapping,
//! Fernet, JWS/JWE, and fresh key material for every purpose.
//!
//! Architecture invariant: no async, no IO here (the root key's *loading*
//! from env and file lives in `rootkey`, at the edge). Key material is held in
//! types that zeroize on drop and never print their bytes.

pub mod b64url;
pub mod claims;
pub mod fernet;
pub mod jose;
pub mod jwe;
pub mod prefixed_hmac;
pub mod rootkey;

use std::fmt;

use aws_lc_rs::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::keyring::{Algorithm, Purpose};

/// Raw key material: exactly the bytes that get wrapped under the root key
/// (a data key's urlsafe-base64 Fernet key string, an HMAC or AES key's raw
/// bytes, an asymmetric key's PKCS#8 PEM). Never printed.
#[derive(Clone)]
pub struct KeyMaterial(Zeroizing<Vec<u8>>);

impl KeyMaterial {
    /// Wraps bytes that are already key material.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        KeyMaterial(bytes)
    }

    /// The bytes, for the crypto that uses them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial([redacted])")
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    aws_lc_rs::rand::SystemRandom::new()
        .fill(buf)
        .expect("the operating system's random number generator failed");
}

/// A fixed-size array of OS randomness.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    random_bytes(&mut out);
    out
}

/// Makes fresh material for a key of `purpose` with `algorithm`.
pub fn generate_material(purpose: Purpose, algorithm: Algorithm) -> anyhow::Result<KeyMaterial> {
    anyhow::ensure!(
        algorithm.fits(purpose),
        "algorithm {algorithm} cannot be used for {purpose} keys"
    );
    let bytes = match algorithm {
        Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
            jose::generate_signing_material(signing_alg(algorithm)?)
        }
        Algorithm::Fernet => {
            let key = fernet::FernetKey::generate();
            Zeroizing::new(key.to_base64().as_bytes().to_vec())
        }
        Algorithm::A256GCM | Algorithm::HmacSha256 => {
            let mut raw = Zeroizing::new(vec![0u8; 32]);
            random_bytes(&mut raw);
            raw
        }
    };
    Ok(KeyMaterial::new(bytes))
}

/// Maps a keyring algorithm to the JOSE signing algorithm.
pub fn signing_alg(algorithm: Algorithm) -> anyhow::Result<jose::SigningAlg> {
    Ok(match algorithm {
        Algorithm::HS256 => jose::SigningAlg::HS256,
        Algorithm::RS256 => jose::SigningAlg::RS256,
        Algorithm::ES256 => jose::SigningAlg::ES256,
        Algorithm::EdDSA => jose::SigningAlg::EdDSA,
        other => anyhow::bail!("{other} is not a signing algorithm"),
    })
}

/// HMAC-SHA256 of `parts`, each length-prefixed so that no two different
/// part lists hash alike.
pub fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_never_prints_its_bytes() {
        let m = KeyMaterial::new(Zeroizing::new(b"supersecretbytes".to_vec()));
        let shown = format!("{m:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
    }

    #[test]
    fn material_has_the_shape_each_purpose_needs() {
        let data = generate_material(Purpose::Data, Algorithm::Fernet).unwrap();
        assert_eq!(data.expose().len(), 44);
        assert!(
            fernet::FernetKey::from_base64(std::str::from_utf8(data.expose()).unwrap()).is_ok()
        );
        let temp = generate_material(Purpose::Temp, Algorithm::HmacSha256).unwrap();
        assert_eq!(temp.expose().len(), 32);
        let enc = generate_material(Purpose::TokenEncryption, Algorithm::A256GCM).unwrap();
        assert_eq!(enc.expose().len(), 32);
        assert!(generate_material(Purpose::Data, Algorithm::HS256).is_err());
    }

    #[test]
    fn hmac_parts_are_unambiguous() {
        assert_ne!(
            hmac_parts(b"k", &[b"ab", b"c"]),
            hmac_parts(b"k", &[b"a", b"bc"])
        );
    }
}
