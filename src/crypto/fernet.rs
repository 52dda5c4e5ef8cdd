//! Fernet tokens (<https://github.com/fernet/spec>), byte-compatible with Python's
//! `cryptography.fernet`.
//!
//! keywarden re-encrypts secrets that applications stored as Fernet tokens, so it must read
//! and write exactly the format Python produces, and it must do so fast: a rotation touches
//! every stored secret. A token is `urlsafe_b64(0x80 || ts_be64 || iv16 || AES-128-CBC-PKCS7(p)
//! || HMAC-SHA256(signing_key, everything before the MAC))`, with padding kept on the base64.
//! The 32-byte key is the signing key (first 16 bytes) followed by the encryption key (last 16).
//!
//! Design notes:
//! - [`FernetKey`] expands the AES key schedules and the HMAC inner/outer state once, so no
//!   per-call key setup happens on the hot path.
//! - [`FernetKey::rotate_from`] re-encrypts in place inside one reused buffer: the decrypted
//!   plaintext keeps its PKCS7 padding (the padding of the same plaintext is the same bytes), so
//!   it is encrypted again where it lies, and the plaintext never exists anywhere else.
//! - The MAC is checked (in constant time) before anything else looks at the ciphertext or
//!   trusts the timestamp.
//! - The module is pure: time is an argument; the only outside input is randomness for keys
//!   and IVs.

use aws_lc_rs::cipher::{
    AES_128, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::{digest, hmac};
use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE};
use rand::rngs::{OsRng, StdRng};
use rand::{RngCore, SeedableRng, TryRngCore};
use zeroize::{Zeroize, Zeroizing};

/// The only token version the spec defines.
const VERSION: u8 = 0x80;
/// Version byte plus big-endian timestamp.
const TS_END: usize = 1 + 8;
/// Version, timestamp and IV: where the ciphertext starts.
const HEADER_LEN: usize = TS_END + 16;
/// Length of the HMAC-SHA256 tag at the end of a token.
const MAC_LEN: usize = 32;
/// AES block size.
const BLOCK: usize = 16;
/// Bytes a token adds around its ciphertext.
const OVERHEAD: usize = HEADER_LEN + MAC_LEN;
/// The smallest valid token: one ciphertext block (an empty plaintext still has a padding block).
const MIN_TOKEN_LEN: usize = OVERHEAD + BLOCK;
/// The spec's tolerated clock skew for tokens stamped in the future, in seconds.
const MAX_CLOCK_SKEW_SECS: u64 = 60;

/// Lenient decoder for keys: URL-safe alphabet (the standard one is mapped onto it first),
/// padding optional, and non-zero trailing bits accepted as Python's `urlsafe_b64decode` does.
const KEY_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone),
);

/// Why a key or token was refused.
///
/// Messages name what is wrong, never the key or token content.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum FernetError {
    /// The key text is not a base64 encoding of exactly 32 bytes.
    #[error("invalid Fernet key: {0}")]
    InvalidKey(&'static str),
    /// The token is structurally invalid: base64, length, version, block size or padding.
    #[error("malformed Fernet token: {0}")]
    Malformed(&'static str),
    /// The MAC does not verify: the token was made with another key or was tampered with.
    #[error("Fernet token MAC does not verify (wrong key or tampered token)")]
    BadMac,
    /// The token is older than the allowed TTL.
    #[error("Fernet token has expired")]
    Expired,
    /// The token's timestamp is more than the tolerated clock skew ahead of `now`.
    #[error("Fernet token timestamp is too far in the future")]
    FutureTimestamp,
}

/// A Fernet key with its AES schedules and HMAC state expanded once.
///
/// The raw bytes are zeroized on drop; the aws-lc key objects clean their own state.
pub struct FernetKey {
    raw: Zeroizing<[u8; 32]>,
    mac: hmac::Key,
    enc: EncryptingKey,
    dec: DecryptingKey,
}

impl Clone for FernetKey {
    fn clone(&self) -> Self {
        // aws-lc's cipher keys are not `Clone`, so the schedules are expanded again.
        Self::from_bytes(&self.raw)
    }
}

impl std::fmt::Debug for FernetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FernetKey([redacted])")
    }
}

impl FernetKey {
    /// Generates a fresh key from the operating system's CSPRNG.
    ///
    /// # Panics
    /// Panics if the operating system cannot provide randomness, as there is no safe fallback.
    #[must_use]
    pub fn generate() -> Self {
        let mut raw = Zeroizing::new([0u8; 32]);
        OsRng
            .try_fill_bytes(raw.as_mut())
            .expect("the OS random number generator failed");
        Self::from_bytes(&raw)
    }

    /// Builds a key from its 32 raw bytes (signing key, then encryption key).
    #[must_use]
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let raw = Zeroizing::new(*bytes);
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &raw[..16]);
        // A 16-byte slice is always a valid AES-128 key and CBC is supported for AES, so these
        // constructors cannot fail.
        let enc = EncryptingKey::cbc(
            UnboundCipherKey::new(&AES_128, &raw[16..]).expect("16 bytes is an AES-128 key"),
        )
        .expect("AES-128 supports CBC");
        let dec = DecryptingKey::cbc(
            UnboundCipherKey::new(&AES_128, &raw[16..]).expect("16 bytes is an AES-128 key"),
        )
        .expect("AES-128 supports CBC");
        Self { raw, mac, enc, dec }
    }

    /// Parses a key as Python's `Fernet.generate_key()` writes it: URL-safe base64 of 32 bytes.
    ///
    /// Surrounding whitespace is ignored; the standard base64 alphabet (`+`, `/`) and a missing
    /// `=` are accepted too, so keys pasted from other tools work.
    ///
    /// # Errors
    /// [`FernetError::InvalidKey`] saying whether the length, the padding or the alphabet is wrong.
    pub fn from_base64(s: &str) -> Result<Self, FernetError> {
        let text = s.trim().as_bytes();
        let body_len = text.iter().rposition(|&c| c != b'=').map_or(0, |i| i + 1);
        let (body, pad) = text.split_at(body_len);
        // 32 bytes are 43 base64 characters; a padded encoding adds exactly one '='.
        if body.len() != 43 || body.contains(&b'=') {
            return Err(FernetError::InvalidKey(
                "wrong length: expected 44 base64 characters encoding 32 bytes",
            ));
        }
        if pad.len() > 1 {
            return Err(FernetError::InvalidKey(
                "bad padding: a 32-byte key takes exactly one '='",
            ));
        }
        let mut norm = Zeroizing::new([0u8; 43]);
        for (dst, &c) in norm.iter_mut().zip(body) {
            *dst = match c {
                b'+' => b'-',
                b'/' => b'_',
                other => other,
            };
        }
        let mut raw = Zeroizing::new([0u8; 36]);
        match KEY_B64.decode_slice(norm.as_ref(), raw.as_mut()) {
            Ok(32) => {}
            Ok(_) => {
                return Err(FernetError::InvalidKey(
                    "wrong length: key must decode to 32 bytes",
                ));
            }
            Err(_) => {
                return Err(FernetError::InvalidKey(
                    "contains a character outside the base64 alphabet",
                ));
            }
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&raw[..32]);
        Ok(Self::from_bytes(&bytes))
    }

    /// The key as URL-safe base64 with padding, the form Python's `Fernet(key)` accepts.
    #[must_use]
    pub fn to_base64(&self) -> Zeroizing<String> {
        let mut buf = Zeroizing::new([0u8; 44]);
        let n = URL_SAFE
            .encode_slice(self.raw.as_ref(), buf.as_mut())
            .expect("32 bytes encode to 44 characters");
        // The base64 alphabet is ASCII, so this conversion cannot fail.
        Zeroizing::new(
            std::str::from_utf8(&buf[..n])
                .expect("base64 output is ASCII")
                .to_owned(),
        )
    }

    /// Encrypts `plaintext` into a token stamped `now_unix`, with a fresh random IV from the
    /// thread-local CSPRNG.
    #[must_use]
    pub fn encrypt(&self, plaintext: &[u8], now_unix: u64) -> String {
        let mut iv = [0u8; 16];
        rand::rng().fill_bytes(&mut iv);
        self.encrypt_with_iv(plaintext, now_unix, &iv)
    }

    /// Encrypts with a caller-chosen IV.
    ///
    /// This exists for test vectors and reproducible fixtures: an IV must never repeat under
    /// one key in production, so use [`FernetKey::encrypt`] there.
    #[must_use]
    pub fn encrypt_with_iv(&self, plaintext: &[u8], now_unix: u64, iv: &[u8; 16]) -> String {
        let padded = (plaintext.len() / BLOCK + 1) * BLOCK;
        let total = OVERHEAD + padded;
        // The buffer briefly holds plaintext before it is encrypted in place.
        let mut raw = Zeroizing::new(vec![0u8; total]);
        raw[0] = VERSION;
        raw[1..TS_END].copy_from_slice(&now_unix.to_be_bytes());
        let ct_end = HEADER_LEN + padded;
        raw[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
        let pad = u8::try_from(padded - plaintext.len()).expect("padding is at most 16");
        raw[HEADER_LEN + plaintext.len()..ct_end].fill(pad);
        self.seal_in_place(&mut raw, iv);
        let mut text = vec![0u8; b64::encoded_len(total)];
        b64::encode_into(&raw, &mut text);
        String::from_utf8(text).expect("base64 output is ASCII")
    }

    /// Verifies and decrypts `token` without any age check.
    ///
    /// # Errors
    /// [`FernetError::Malformed`] for a structurally bad token, [`FernetError::BadMac`] when the
    /// token was not made with this key or was altered.
    pub fn decrypt(&self, token: &str) -> Result<Zeroizing<Vec<u8>>, FernetError> {
        open(std::slice::from_ref(self), token.as_bytes(), None).map(|(p, _)| p)
    }

    /// Verifies and decrypts `token`, refusing it if it is older than `ttl_secs` at `now_unix`
    /// or stamped more than 60 s ahead of `now_unix` (the spec's clock-skew rule).
    ///
    /// # Errors
    /// As [`FernetKey::decrypt`], plus [`FernetError::Expired`] and
    /// [`FernetError::FutureTimestamp`]. The MAC is checked before the timestamp is trusted.
    pub fn decrypt_with_ttl(
        &self,
        token: &str,
        ttl_secs: u64,
        now_unix: u64,
    ) -> Result<Zeroizing<Vec<u8>>, FernetError> {
        open(
            std::slice::from_ref(self),
            token.as_bytes(),
            Some((ttl_secs, now_unix)),
        )
        .map(|(p, _)| p)
    }

    /// Fast path for re-encryption: decrypt `token` with `old`, re-encrypt under `self` keeping
    /// the original timestamp (as Python's `MultiFernet.rotate` does), appending the new token's
    /// ASCII bytes to `out` with no separator. Reuses `scratch` buffers so the per-token path
    /// does not allocate once warmed up.
    ///
    /// No TTL is applied, as in Python. On error `out` is left unchanged.
    ///
    /// # Errors
    /// [`FernetError::Malformed`] or [`FernetError::BadMac`] as for [`FernetKey::decrypt`].
    pub fn rotate_from(
        &self,
        old: &FernetKey,
        token: &[u8],
        scratch: &mut FernetScratch,
        out: &mut Vec<u8>,
    ) -> Result<(), FernetError> {
        rotate_raw(self, std::slice::from_ref(old), token, scratch, out).map(|_| ())
    }

    /// Checks the MAC of a decoded token in constant time.
    fn verify_mac(&self, raw: &[u8]) -> Result<(), FernetError> {
        let (signed, tag) = raw.split_at(raw.len() - MAC_LEN);
        hmac::verify(&self.mac, signed, tag).map_err(|_| FernetError::BadMac)
    }

    /// Decrypts the ciphertext of a MAC-verified token in place and checks its PKCS7 padding.
    ///
    /// Returns the plaintext length; the plaintext sits at `raw[HEADER_LEN..HEADER_LEN + len]`
    /// followed by its padding. On a padding error the decrypted bytes are wiped.
    fn decrypt_in_place(&self, raw: &mut [u8]) -> Result<usize, FernetError> {
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&raw[TS_END..HEADER_LEN]);
        let ct_end = raw.len() - MAC_LEN;
        let ct = &mut raw[HEADER_LEN..ct_end];
        let ctx = DecryptionContext::Iv128(FixedLength::from(iv));
        if self.dec.decrypt(ct, ctx).is_err() {
            // Unreachable for a length that passed `check_layout`, but refuse rather than panic.
            ct.zeroize();
            return Err(FernetError::Malformed(
                "ciphertext is not a whole number of blocks",
            ));
        }
        match pkcs7_plaintext_len(ct) {
            Some(len) => Ok(len),
            None => {
                ct.zeroize();
                Err(FernetError::Malformed("bad padding"))
            }
        }
    }

    /// Encrypts the padded plaintext in `raw[HEADER_LEN..len - MAC_LEN]` in place under `iv`,
    /// stores `iv`, and writes the MAC. Version and timestamp must already be in place.
    fn seal_in_place(&self, raw: &mut [u8], iv: &[u8; 16]) {
        raw[TS_END..HEADER_LEN].copy_from_slice(iv);
        let ct_end = raw.len() - MAC_LEN;
        let ctx = EncryptionContext::Iv128(FixedLength::from(iv));
        self.enc
            .less_safe_encrypt(&mut raw[HEADER_LEN..ct_end], ctx)
            .expect("the padded plaintext is a whole number of blocks");
        let tag = hmac::sign(&self.mac, &raw[..ct_end]);
        raw[ct_end..].copy_from_slice(tag.as_ref());
    }
}

/// Derives a Fernet key from an arbitrary secret as `sha256(secret)`, the Python idiom
/// `Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret).digest()))`.
///
/// This is a plain hash, not a password KDF: use it only where the secret already has full
/// entropy and the derivation must match existing Python code.
#[must_use]
pub fn derive_fernet_key_from_secret(secret: &[u8]) -> FernetKey {
    let digest = digest::digest(&digest::SHA256, secret);
    let mut bytes = Zeroizing::new([0u8; 32]);
    bytes.copy_from_slice(digest.as_ref());
    FernetKey::from_bytes(&bytes)
}

/// Reusable per-worker state for [`FernetKey::rotate_from`] and [`MultiFernet::rotate_into`]:
/// the decode buffer and a fast CSPRNG for IVs.
///
/// The RNG is ChaCha-based and seeded once from the OS, so drawing an IV costs no syscall.
/// Keep one per thread; it is deliberately not `Clone` so two workers never share an IV stream.
pub struct FernetScratch {
    buf: Zeroizing<Vec<u8>>,
    rng: StdRng,
}

impl Default for FernetScratch {
    /// # Panics
    /// Panics if the operating system cannot provide a seed for the IV generator.
    fn default() -> Self {
        Self {
            buf: Zeroizing::new(Vec::new()),
            rng: StdRng::from_os_rng(),
        }
    }
}

impl std::fmt::Debug for FernetScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FernetScratch([redacted])")
    }
}

/// Reads a token's timestamp (seconds since the Unix epoch) without verifying its MAC.
///
/// The token's structure is checked, but since no key is involved the value is unauthenticated:
/// use it for reporting and scheduling, never for an access decision.
///
/// # Errors
/// [`FernetError::Malformed`] if the token is not structurally a Fernet token.
pub fn token_timestamp(token: &str) -> Result<u64, FernetError> {
    let mut buf = Vec::new();
    let n = decode_token(token.as_bytes(), &mut buf)?;
    check_layout(&buf[..n])
}

/// Several keys used together, newest first, with Python `MultiFernet` semantics: encrypt with
/// the first key, decrypt with whichever key verifies, rotate onto the first key.
#[derive(Clone)]
pub struct MultiFernet {
    keys: Vec<FernetKey>,
}

impl std::fmt::Debug for MultiFernet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MultiFernet({} keys, [redacted])", self.keys.len())
    }
}

impl MultiFernet {
    /// Builds the set from keys ordered newest first.
    ///
    /// # Panics
    /// Panics if `keys` is empty, as Python's `MultiFernet` refuses that too; use
    /// [`MultiFernet::try_new`] where the list comes from input.
    #[must_use]
    pub fn new(keys: Vec<FernetKey>) -> Self {
        Self::try_new(keys).expect("MultiFernet needs at least one key")
    }

    /// Builds the set from keys ordered newest first.
    ///
    /// # Errors
    /// [`FernetError::InvalidKey`] if `keys` is empty.
    pub fn try_new(keys: Vec<FernetKey>) -> Result<Self, FernetError> {
        if keys.is_empty() {
            return Err(FernetError::InvalidKey(
                "MultiFernet needs at least one key",
            ));
        }
        Ok(Self { keys })
    }

    /// The keys, newest first.
    #[must_use]
    pub fn keys(&self) -> &[FernetKey] {
        &self.keys
    }

    /// Encrypts with the newest key.
    #[must_use]
    pub fn encrypt(&self, plaintext: &[u8], now_unix: u64) -> String {
        self.keys[0].encrypt(plaintext, now_unix)
    }

    /// Decrypts with the first key whose MAC verifies, returning the plaintext and that key's
    /// index. No age check.
    ///
    /// # Errors
    /// [`FernetError::Malformed`] for a structurally bad token, [`FernetError::BadMac`] if no key
    /// verifies it.
    pub fn decrypt(&self, token: &str) -> Result<(Zeroizing<Vec<u8>>, usize), FernetError> {
        open(&self.keys, token.as_bytes(), None)
    }

    /// As [`MultiFernet::decrypt`], with the TTL and clock-skew rules of
    /// [`FernetKey::decrypt_with_ttl`].
    ///
    /// # Errors
    /// As [`MultiFernet::decrypt`], plus [`FernetError::Expired`] and
    /// [`FernetError::FutureTimestamp`].
    pub fn decrypt_with_ttl(
        &self,
        token: &str,
        ttl_secs: u64,
        now_unix: u64,
    ) -> Result<(Zeroizing<Vec<u8>>, usize), FernetError> {
        open(&self.keys, token.as_bytes(), Some((ttl_secs, now_unix)))
    }

    /// Re-encrypts `token` under the newest key, keeping its timestamp (Python's
    /// `MultiFernet.rotate`). A token already under the newest key is re-encrypted too, with a
    /// fresh IV.
    ///
    /// # Errors
    /// As [`MultiFernet::decrypt`].
    pub fn rotate(&self, token: &str) -> Result<String, FernetError> {
        let mut scratch = FernetScratch::default();
        let mut out = Vec::with_capacity(token.len());
        self.rotate_into(token.as_bytes(), &mut scratch, &mut out)?;
        Ok(String::from_utf8(out).expect("base64 output is ASCII"))
    }

    /// Allocation-free form of [`MultiFernet::rotate`]: appends the new token to `out` and returns
    /// the index of the key that opened the old one (0 means it was already under the newest).
    ///
    /// # Errors
    /// As [`MultiFernet::decrypt`]; on error `out` is left unchanged.
    pub fn rotate_into(
        &self,
        token: &[u8],
        scratch: &mut FernetScratch,
        out: &mut Vec<u8>,
    ) -> Result<usize, FernetError> {
        rotate_raw(&self.keys[0], &self.keys, token, scratch, out)
    }
}

/// Decodes the URL-safe base64 of `token` (surrounding ASCII whitespace ignored) into `buf`,
/// growing it if needed but never shrinking it, and returns the decoded length.
fn decode_token(token: &[u8], buf: &mut Vec<u8>) -> Result<usize, FernetError> {
    let token = token.trim_ascii();
    if token.is_empty() {
        return Err(FernetError::Malformed("empty token"));
    }
    let needed = b64::decode_room(token.len());
    if buf.len() < needed {
        buf.resize(needed, 0);
    }
    b64::decode_into(token, buf).ok_or(FernetError::Malformed("not valid URL-safe base64"))
}

/// Checks version, minimum length and block alignment of a decoded token; returns its timestamp.
fn check_layout(raw: &[u8]) -> Result<u64, FernetError> {
    match raw.first() {
        Some(&VERSION) => {}
        Some(_) => return Err(FernetError::Malformed("unknown version byte")),
        None => return Err(FernetError::Malformed("empty token")),
    }
    if raw.len() < MIN_TOKEN_LEN {
        return Err(FernetError::Malformed("too short"));
    }
    if !(raw.len() - OVERHEAD).is_multiple_of(BLOCK) {
        return Err(FernetError::Malformed(
            "ciphertext is not a whole number of blocks",
        ));
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&raw[1..TS_END]);
    Ok(u64::from_be_bytes(ts))
}

/// Applies the TTL and clock-skew rules to an authenticated timestamp, with Python's bounds:
/// expired when `ts + ttl < now`, too new when `ts > now + 60`.
fn check_age(ts: u64, ttl_secs: u64, now_unix: u64) -> Result<(), FernetError> {
    if ts.saturating_add(ttl_secs) < now_unix {
        return Err(FernetError::Expired);
    }
    if ts > now_unix.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(FernetError::FutureTimestamp);
    }
    Ok(())
}

/// Returns the plaintext length of a PKCS7-padded buffer, or `None` if the padding is invalid.
///
/// The buffer is MAC-verified before this runs, so no padding oracle can form; the check is
/// still written without an early exit over the padding bytes.
fn pkcs7_plaintext_len(padded: &[u8]) -> Option<usize> {
    let pad = *padded.last()?;
    let pad_len = usize::from(pad);
    if pad_len == 0 || pad_len > BLOCK || pad_len > padded.len() {
        return None;
    }
    let tail = &padded[padded.len() - pad_len..];
    let diff = tail.iter().fold(0u8, |acc, &b| acc | (b ^ pad));
    (diff == 0).then(|| padded.len() - pad_len)
}

/// Finds the first key among `keys` whose MAC verifies `raw`.
fn find_key(keys: &[FernetKey], raw: &[u8]) -> Result<usize, FernetError> {
    keys.iter()
        .position(|k| k.verify_mac(raw).is_ok())
        .ok_or(FernetError::BadMac)
}

/// Shared decrypt path: decode, check layout, find the verifying key, check age, decrypt.
fn open(
    keys: &[FernetKey],
    token: &[u8],
    ttl: Option<(u64, u64)>,
) -> Result<(Zeroizing<Vec<u8>>, usize), FernetError> {
    let mut buf = Zeroizing::new(Vec::new());
    let n = decode_token(token, &mut buf)?;
    buf.truncate(n);
    let ts = check_layout(&buf)?;
    let idx = find_key(keys, &buf)?;
    if let Some((ttl_secs, now_unix)) = ttl {
        check_age(ts, ttl_secs, now_unix)?;
    }
    let len = keys[idx].decrypt_in_place(&mut buf)?;
    // Move the plaintext to the front; `Zeroizing<Vec>` wipes the whole capacity on drop,
    // including the stale tail left by `truncate`.
    buf.copy_within(HEADER_LEN..HEADER_LEN + len, 0);
    buf[len..].zeroize();
    buf.truncate(len);
    Ok((buf, idx))
}

/// Shared rotation path: decrypt with the first of `olds` that verifies, re-encrypt in place
/// under `new` with a fresh IV and the original timestamp, and append the encoded token to `out`.
fn rotate_raw(
    new: &FernetKey,
    olds: &[FernetKey],
    token: &[u8],
    scratch: &mut FernetScratch,
    out: &mut Vec<u8>,
) -> Result<usize, FernetError> {
    let n = decode_token(token, &mut scratch.buf)?;
    let raw = &mut scratch.buf[..n];
    check_layout(raw)?;
    let idx = find_key(olds, raw)?;
    olds[idx].decrypt_in_place(raw)?;
    // The PKCS7 padding of the same plaintext is the same bytes, so the decrypted block run is
    // already the padded input for the new encryption.
    let mut iv = [0u8; 16];
    scratch.rng.fill_bytes(&mut iv);
    new.seal_in_place(raw, &iv);
    let enc_len = b64::encoded_len(n);
    let start = out.len();
    out.resize(start + enc_len, 0);
    b64::encode_into(&scratch.buf[..n], &mut out[start..]);
    Ok(idx)
}

/// URL-safe, padded base64 for token bytes, canonical as the `base64` crate's `URL_SAFE` engine
/// (padding required, no stray bits), with an SSSE3 path for the bulk of the data.
///
/// Base64 was a fifth of the rotation cost with the general-purpose engine; the vector path
/// handles whole 12-byte / 16-character groups and leaves the tail (and so all padding and
/// trailing-bit rules) to the `base64` crate, so both paths accept and produce exactly the same
/// text. Tests compare the two on random input of every length.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE;

    /// Characters needed for `n` bytes, padding included.
    pub(super) const fn encoded_len(n: usize) -> usize {
        n.div_ceil(3) * 4
    }

    /// Output room to give [`decode_into`] for `n` characters: the decoded size plus a vector
    /// store's overhang, so the fast path runs to the end.
    pub(super) const fn decode_room(n: usize) -> usize {
        n / 4 * 3 + 16
    }

    /// Encodes `input` into the front of `out`, returning the characters written.
    ///
    /// # Panics
    /// Panics if `out` is shorter than [`encoded_len`] of the input.
    pub(super) fn encode_into(input: &[u8], out: &mut [u8]) -> usize {
        let (mut i, mut o) = (0, 0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("ssse3") {
            // SAFETY: the CPU supports SSSE3, checked just above.
            (i, o) = unsafe { x86::encode_blocks(input, out) };
        }
        o + URL_SAFE
            .encode_slice(&input[i..], &mut out[o..])
            .expect("output holds encoded_len bytes")
    }

    /// Decodes canonical URL-safe padded base64 into the front of `out`, returning the byte
    /// count, or `None` if the text is not valid base64 or `out` is too small.
    pub(super) fn decode_into(input: &[u8], out: &mut [u8]) -> Option<usize> {
        let (mut i, mut o) = (0, 0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("ssse3") {
            // SAFETY: the CPU supports SSSE3, checked just above.
            (i, o) = unsafe { x86::decode_blocks(input, out) }?;
        }
        URL_SAFE
            .decode_slice(&input[i..], &mut out[o..])
            .ok()
            .map(|n| o + n)
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        //! SSSE3 kernels after Wojciech Muła's vector base64, with the character classes
        //! written as plain range compares for the URL-safe alphabet.
        use std::arch::x86_64::{
            __m128i, _mm_add_epi8, _mm_and_si128, _mm_cmpeq_epi8, _mm_cmpgt_epi8, _mm_cmplt_epi8,
            _mm_loadu_si128, _mm_madd_epi16, _mm_maddubs_epi16, _mm_movemask_epi8, _mm_mulhi_epu16,
            _mm_mullo_epi16, _mm_or_si128, _mm_set1_epi8, _mm_set1_epi32, _mm_setr_epi8,
            _mm_shuffle_epi8, _mm_storeu_si128,
        };

        /// Encodes whole 12-byte groups while a 16-byte load and store stay in bounds; returns
        /// (bytes consumed, characters written). Consumption is a multiple of 3, so the caller
        /// can finish the rest with any encoder.
        #[target_feature(enable = "ssse3")]
        pub(super) unsafe fn encode_blocks(input: &[u8], out: &mut [u8]) -> (usize, usize) {
            // Each 32-bit lane gets bytes [b1, b0, b2, b1] of its 3-byte group.
            let spread = _mm_setr_epi8(1, 0, 2, 1, 4, 3, 5, 4, 7, 6, 8, 7, 10, 9, 11, 10);
            let (mut i, mut o) = (0, 0);
            while i + 16 <= input.len() && o + 16 <= out.len() {
                // SAFETY: `i + 16 <= input.len()`, so the unaligned 16-byte load is in bounds.
                let v: __m128i = unsafe { _mm_loadu_si128(input.as_ptr().add(i).cast()) };
                let v = _mm_shuffle_epi8(v, spread);
                // Move the four 6-bit fields of each lane into its four bytes.
                let hi = _mm_mulhi_epu16(
                    _mm_and_si128(v, _mm_set1_epi32(0x0FC0_FC00)),
                    _mm_set1_epi32(0x0400_0040),
                );
                let lo = _mm_mullo_epi16(
                    _mm_and_si128(v, _mm_set1_epi32(0x003F_03F0)),
                    _mm_set1_epi32(0x0100_0010),
                );
                let idx = _mm_or_si128(hi, lo);
                // Map 0..=63 onto A-Z a-z 0-9 - _ by adding a per-range offset.
                let ge26 = _mm_cmpgt_epi8(idx, _mm_set1_epi8(25));
                let ge52 = _mm_cmpgt_epi8(idx, _mm_set1_epi8(51));
                let eq62 = _mm_cmpeq_epi8(idx, _mm_set1_epi8(62));
                let eq63 = _mm_cmpeq_epi8(idx, _mm_set1_epi8(63));
                let mut off = _mm_set1_epi8(b'A' as i8);
                off = _mm_add_epi8(off, _mm_and_si128(ge26, _mm_set1_epi8(6)));
                off = _mm_add_epi8(off, _mm_and_si128(ge52, _mm_set1_epi8(-75)));
                off = _mm_add_epi8(off, _mm_and_si128(eq62, _mm_set1_epi8(-13)));
                off = _mm_add_epi8(off, _mm_and_si128(eq63, _mm_set1_epi8(36)));
                let chars = _mm_add_epi8(idx, off);
                // SAFETY: `o + 16 <= out.len()`, so the unaligned 16-byte store is in bounds.
                unsafe { _mm_storeu_si128(out.as_mut_ptr().add(o).cast(), chars) };
                i += 12;
                o += 16;
            }
            (i, o)
        }

        /// Decodes whole 16-character groups, always leaving the final quad (which may carry
        /// padding) to the caller; returns (characters consumed, bytes written), or `None` on a
        /// character outside the URL-safe alphabet (`=` included: it is only valid at the end).
        #[target_feature(enable = "ssse3")]
        pub(super) unsafe fn decode_blocks(input: &[u8], out: &mut [u8]) -> Option<(usize, usize)> {
            let pack = _mm_setr_epi8(2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, -1, -1, -1, -1);
            let (mut i, mut o) = (0, 0);
            while i + 20 <= input.len() && o + 16 <= out.len() {
                // SAFETY: `i + 20 <= input.len()`, so the unaligned 16-byte load is in bounds.
                let c: __m128i = unsafe { _mm_loadu_si128(input.as_ptr().add(i).cast()) };
                // Bytes >= 0x80 are negative as i8 and so fall in no class.
                let in_range = |lo: u8, hi: u8| {
                    _mm_and_si128(
                        _mm_cmpgt_epi8(c, _mm_set1_epi8(lo as i8 - 1)),
                        _mm_cmplt_epi8(c, _mm_set1_epi8(hi as i8 + 1)),
                    )
                };
                let upper = in_range(b'A', b'Z');
                let lower = in_range(b'a', b'z');
                let digit = in_range(b'0', b'9');
                let dash = _mm_cmpeq_epi8(c, _mm_set1_epi8(b'-' as i8));
                let under = _mm_cmpeq_epi8(c, _mm_set1_epi8(b'_' as i8));
                let valid = _mm_or_si128(
                    _mm_or_si128(_mm_or_si128(upper, lower), _mm_or_si128(digit, dash)),
                    under,
                );
                if _mm_movemask_epi8(valid) != 0xFFFF {
                    return None;
                }
                // The classes are disjoint, so OR-ing their offsets picks exactly one.
                let mut off = _mm_and_si128(upper, _mm_set1_epi8(-65));
                off = _mm_or_si128(off, _mm_and_si128(lower, _mm_set1_epi8(-71)));
                off = _mm_or_si128(off, _mm_and_si128(digit, _mm_set1_epi8(4)));
                off = _mm_or_si128(off, _mm_and_si128(dash, _mm_set1_epi8(17)));
                off = _mm_or_si128(off, _mm_and_si128(under, _mm_set1_epi8(-32)));
                let vals = _mm_add_epi8(c, off);
                // Pairs of 6-bit values into 12 bits, pairs of those into 24 bits per lane, then
                // the three bytes of each lane out in big-endian order.
                let pairs = _mm_maddubs_epi16(vals, _mm_set1_epi32(0x0140_0140));
                let quads = _mm_madd_epi16(pairs, _mm_set1_epi32(0x0001_1000));
                let bytes = _mm_shuffle_epi8(quads, pack);
                // SAFETY: `o + 16 <= out.len()`, so the unaligned 16-byte store is in bounds.
                unsafe { _mm_storeu_si128(out.as_mut_ptr().add(o).cast(), bytes) };
                i += 16;
                o += 12;
            }
            Some((i, o))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::path::PathBuf;

    /// The key of the fernet/spec vectors.
    const SPEC_SECRET: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    /// 1985-10-26T01:20:01-07:00, the `now` of the spec vectors.
    const SPEC_NOW: u64 = 499_162_801;

    /// `$KEYWARDEN_VECTORS_DIR` (either the fernet directory itself or its parent), else
    /// `../shared/vectors/fernet` beside the crate.
    fn vectors_dir() -> PathBuf {
        match std::env::var_os("KEYWARDEN_VECTORS_DIR") {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                let nested = dir.join("fernet");
                if nested.join("verify.json").is_file() {
                    nested
                } else {
                    dir
                }
            }
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/fernet"),
        }
    }

    /// Loads a vector file, lower-casing field names because their case varies (`token`/`Token`).
    fn load_vectors(name: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let path = vectors_dir().join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let value: serde_json::Value = serde_json::from_str(&text).expect("vector file is JSON");
        let list = value.as_array().expect("vector file is a JSON array");
        assert!(!list.is_empty(), "{name} holds no vectors");
        list.iter()
            .map(|v| {
                v.as_object()
                    .expect("each vector is an object")
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect()
            })
            .collect()
    }

    fn field<'a>(v: &'a serde_json::Map<String, serde_json::Value>, name: &str) -> &'a str {
        v.get(name)
            .and_then(|x| x.as_str())
            .unwrap_or_else(|| panic!("vector lacks string field {name}"))
    }

    /// Parses the vectors' RFC 3339 `now` (e.g. `1985-10-26T01:20:01-07:00`) to Unix seconds.
    fn parse_now(s: &str) -> u64 {
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| -> i64 { s[r].parse().expect("digits") };
        let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
        let (h, mi, se) = (num(11..13), num(14..16), num(17..19));
        let offset = match b.get(19) {
            Some(b'Z') | None => 0,
            Some(&sign) => {
                let o = num(20..22) * 3600 + num(23..25) * 60;
                if sign == b'-' { -o } else { o }
            }
        };
        // Days from civil date (Howard Hinnant's algorithm).
        let (yy, mm) = if mo <= 2 {
            (y - 1, mo + 9)
        } else {
            (y, mo - 3)
        };
        let era = yy.div_euclid(400);
        let yoe = yy - era * 400;
        let doy = (153 * mm + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se - offset).expect("after 1970")
    }

    fn ttl_secs(v: &serde_json::Map<String, serde_json::Value>) -> u64 {
        if let Some(s) = v.get("ttl_sec").and_then(|x| x.as_f64()) {
            return s as u64;
        }
        let ns = v
            .get("ttlns")
            .and_then(|x| x.as_f64())
            .expect("vector has ttl_sec or ttlns");
        (ns / 1e9) as u64
    }

    fn spec_key() -> FernetKey {
        FernetKey::from_base64(SPEC_SECRET).unwrap()
    }

    #[test]
    fn parse_now_matches_the_known_epoch_of_the_spec_date() {
        assert_eq!(parse_now("1985-10-26T01:20:01-07:00"), SPEC_NOW);
        assert_eq!(parse_now("1970-01-01T00:00:00Z"), 0);
    }

    #[test]
    fn verify_vectors_decrypt_to_src_and_reencrypt_to_the_exact_token() {
        for v in load_vectors("verify.json") {
            let key = FernetKey::from_base64(field(&v, "secret")).unwrap();
            let token = field(&v, "token");
            let now = parse_now(field(&v, "now"));
            let src = field(&v, "src").as_bytes();
            assert_eq!(key.decrypt(token).unwrap().as_slice(), src);
            assert_eq!(
                key.decrypt_with_ttl(token, ttl_secs(&v), now)
                    .unwrap()
                    .as_slice(),
                src
            );
            let ts = token_timestamp(token).unwrap();
            let raw = URL_SAFE.decode(token).unwrap();
            let iv: [u8; 16] = raw[TS_END..HEADER_LEN].try_into().unwrap();
            assert_eq!(key.encrypt_with_iv(src, ts, &iv), token);
        }
    }

    #[test]
    fn invalid_vectors_are_all_rejected_with_their_ttl() {
        for v in load_vectors("invalid.json") {
            let key = FernetKey::from_base64(field(&v, "secret")).unwrap();
            let token = field(&v, "token");
            let desc = field(&v, "desc");
            let now = parse_now(field(&v, "now"));
            let res = key.decrypt_with_ttl(token, ttl_secs(&v), now);
            assert!(res.is_err(), "accepted invalid vector {desc:?}");
            let multi = MultiFernet::new(vec![FernetKey::generate(), key.clone()]);
            assert!(multi.decrypt_with_ttl(token, ttl_secs(&v), now).is_err());
            let ttl_dependent = desc.contains("TTL") || desc.contains("clock skew");
            if !ttl_dependent {
                assert!(key.decrypt(token).is_err(), "accepted {desc:?} without TTL");
                let mut out = Vec::new();
                let r = key.rotate_from(
                    &key,
                    token.as_bytes(),
                    &mut FernetScratch::default(),
                    &mut out,
                );
                assert!(r.is_err() && out.is_empty(), "rotated {desc:?}");
            }
        }
    }

    // Vectors from the current fernet/spec invalid.json, each with a specific reason. The shared
    // file holds an older revision whose tokens lack the version byte, so these pin the
    // individual checks down.
    const SPEC_BAD_MAC: &str = "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykQUFBQUFBQUFBQQ==";
    const SPEC_TOO_SHORT: &str = "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPA==";
    const SPEC_BAD_BASE64: &str = "%%%%%%%%%%%%%AECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykRtfsH-p1YsUD2Q==";
    const SPEC_BAD_BLOCKS: &str = "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPOm73QeoCk9uGib28Xe5vz6oxq5nmxbx_v7mrfyudzUm";
    const SPEC_BAD_PADDING: &str = "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0ODz4LEpdELGQAad7aNEHbf-JkLPIpuiYRLQ3RtXatOYREu2FWke6CnJNYIbkuKNqOhw==";
    const SPEC_FAR_FUTURE: &str = "gAAAAAAdwStRAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAnja1xKYyhd-Y6mSkTOyTGJmw2Xc2a6kBd-iX9b_qXQcw==";
    const SPEC_EXPIRED: &str = "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykRtfsH-p1YsUD2Q==";
    const SPEC_BAD_IV: &str = "gAAAAAAdwJ6xBQECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAkLhFLHpGtDBRLRTZeUfWgHSv49TF2AUEZ1TIvcZjK1zQ==";

    #[test]
    fn current_spec_invalid_tokens_fail_for_their_stated_reason() {
        let k = spec_key();
        let ttl = |t| k.decrypt_with_ttl(t, 60, SPEC_NOW).map(|_| ()).unwrap_err();
        assert_eq!(ttl(SPEC_BAD_MAC), FernetError::BadMac);
        assert_eq!(ttl(SPEC_TOO_SHORT), FernetError::Malformed("too short"));
        assert!(matches!(ttl(SPEC_BAD_BASE64), FernetError::Malformed(_)));
        // At 72 bytes this token is also below the one-block minimum, which is checked first.
        assert!(matches!(ttl(SPEC_BAD_BLOCKS), FernetError::Malformed(_)));
        assert_eq!(ttl(SPEC_BAD_PADDING), FernetError::Malformed("bad padding"));
        assert_eq!(ttl(SPEC_FAR_FUTURE), FernetError::FutureTimestamp);
        assert_eq!(ttl(SPEC_BAD_IV), FernetError::Malformed("bad padding"));
        assert_eq!(
            k.decrypt_with_ttl(SPEC_EXPIRED, 60, SPEC_NOW + 90)
                .unwrap_err(),
            FernetError::Expired
        );
        assert_eq!(
            k.decrypt_with_ttl("gAAAAABdnQ1TUKh2OE_ggbyCIxfg", 0, SPEC_NOW)
                .unwrap_err(),
            FernetError::Malformed("too short")
        );
        assert_eq!(
            k.decrypt("gAAA").unwrap_err(),
            FernetError::Malformed("too short")
        );
    }

    #[test]
    fn ttl_dependent_spec_tokens_decrypt_without_a_ttl() {
        let k = spec_key();
        assert!(k.decrypt(SPEC_FAR_FUTURE).is_ok());
        assert!(k.decrypt(SPEC_EXPIRED).is_ok());
    }

    #[test]
    fn ttl_bounds_follow_python() {
        let k = spec_key();
        let t = k.encrypt(b"x", 1_000);
        assert!(k.decrypt_with_ttl(&t, 10, 1_010).is_ok());
        assert_eq!(
            k.decrypt_with_ttl(&t, 10, 1_011).unwrap_err(),
            FernetError::Expired
        );
        assert!(k.decrypt_with_ttl(&t, 10, 940).is_ok());
        assert_eq!(
            k.decrypt_with_ttl(&t, 10, 939).unwrap_err(),
            FernetError::FutureTimestamp
        );
        let far = k.encrypt(b"x", u64::MAX);
        assert_eq!(
            k.decrypt_with_ttl(&far, u64::MAX, 0).unwrap_err(),
            FernetError::FutureTimestamp
        );
    }

    #[test]
    fn mac_is_checked_before_the_timestamp() {
        let k = spec_key();
        let t = FernetKey::generate().encrypt(b"x", 0);
        assert_eq!(
            k.decrypt_with_ttl(&t, 1, 1_000_000).unwrap_err(),
            FernetError::BadMac
        );
    }

    #[test]
    fn round_trips_plaintexts_of_every_length_around_block_edges() {
        let k = FernetKey::generate();
        for len in 0..=70 {
            let p: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let t = k.encrypt(&p, 1_700_000_000);
            assert_eq!(t.len(), (OVERHEAD + (len / 16 + 1) * 16).div_ceil(3) * 4);
            assert_eq!(k.decrypt(&t).unwrap().as_slice(), p.as_slice());
        }
    }

    #[test]
    fn rejects_token_with_flipped_mac_byte() {
        let k = FernetKey::generate();
        let t = k.encrypt(b"secret value", 5);
        let mut raw = URL_SAFE.decode(&t).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(
            k.decrypt(&URL_SAFE.encode(&raw)).unwrap_err(),
            FernetError::BadMac
        );
    }

    #[test]
    fn rejects_token_with_flipped_ciphertext_or_timestamp_byte() {
        let k = FernetKey::generate();
        let t = k.encrypt(b"secret value", 5);
        for pos in [0usize, 3, 12, 30] {
            let mut raw = URL_SAFE.decode(&t).unwrap();
            raw[pos] ^= 0x40;
            assert!(k.decrypt(&URL_SAFE.encode(&raw)).is_err(), "byte {pos}");
        }
    }

    #[test]
    fn rejects_ciphertext_that_is_not_whole_blocks() {
        let k = FernetKey::generate();
        let mut raw = URL_SAFE.decode(k.encrypt(&[1u8; 40], 5)).unwrap();
        raw.drain(HEADER_LEN..HEADER_LEN + 8);
        assert_eq!(
            k.decrypt(&URL_SAFE.encode(&raw)).unwrap_err(),
            FernetError::Malformed("ciphertext is not a whole number of blocks")
        );
    }

    #[test]
    fn rejects_unknown_version_byte() {
        let k = FernetKey::generate();
        let mut raw = URL_SAFE.decode(k.encrypt(b"v", 5)).unwrap();
        raw[0] = 0x81;
        assert_eq!(
            k.decrypt(&URL_SAFE.encode(&raw)).unwrap_err(),
            FernetError::Malformed("unknown version byte")
        );
    }

    #[test]
    fn rejects_token_missing_base64_padding_or_using_standard_alphabet() {
        let k = FernetKey::generate();
        let t = k.encrypt(b"hello", 5);
        assert!(t.ends_with('='), "5-byte plaintext gives a padded token");
        assert!(k.decrypt(t.trim_end_matches('=')).is_err());
        let std_alpha =
            base64::engine::general_purpose::STANDARD.encode(URL_SAFE.decode(&t).unwrap());
        if std_alpha != t {
            assert!(k.decrypt(&std_alpha).is_err());
        }
    }

    #[test]
    fn tolerates_surrounding_whitespace_in_token() {
        let k = FernetKey::generate();
        let t = k.encrypt(b"hello", 5);
        assert_eq!(k.decrypt(&format!(" {t}\n")).unwrap().as_slice(), b"hello");
    }

    #[test]
    fn rejects_token_made_with_another_key() {
        let t = FernetKey::generate().encrypt(b"hello", 5);
        assert_eq!(
            FernetKey::generate().decrypt(&t).unwrap_err(),
            FernetError::BadMac
        );
    }

    #[test]
    fn token_timestamp_reads_the_stamp_and_rejects_garbage() {
        let k = FernetKey::generate();
        assert_eq!(
            token_timestamp(&k.encrypt(b"a", 1_234_567)).unwrap(),
            1_234_567
        );
        assert_eq!(token_timestamp(SPEC_FAR_FUTURE).unwrap(), 499_198_801);
        assert!(token_timestamp("not a token").is_err());
        assert!(token_timestamp("").is_err());
    }

    #[test]
    fn key_base64_round_trips_and_matches_python_format() {
        let k = spec_key();
        assert_eq!(k.to_base64().as_str(), SPEC_SECRET);
        let g = FernetKey::generate();
        let text = g.to_base64();
        assert_eq!(text.len(), 44);
        assert!(text.ends_with('='));
        let back = FernetKey::from_base64(&text).unwrap();
        assert_eq!(back.raw.as_ref(), g.raw.as_ref());
    }

    #[test]
    fn key_parsing_accepts_standard_alphabet_missing_padding_and_whitespace() {
        let expect = spec_key();
        let std_alpha = SPEC_SECRET.replace('-', "+").replace('_', "/");
        for text in [
            std_alpha.as_str(),
            SPEC_SECRET.trim_end_matches('='),
            "  cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=\n",
        ] {
            let k = FernetKey::from_base64(text).unwrap();
            assert_eq!(k.raw.as_ref(), expect.raw.as_ref(), "{text:?}");
        }
    }

    #[test]
    fn key_parsing_errors_name_the_problem_without_echoing_the_value() {
        let cases = [
            ("", "wrong length"),
            ("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e", "wrong length"),
            (
                "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e=",
                "wrong length",
            ),
            (
                "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4e4=",
                "wrong length",
            ),
            ("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4==", "padding"),
            ("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpw*4e4=", "alphabet"),
            (
                "cw_0x689RpI-jtRR7oE8h_eQs=ImvJapLeSbXpwF4e4=",
                "wrong length",
            ),
        ];
        for (text, want) in cases {
            let err = FernetKey::from_base64(text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{text:?}: {msg}");
            assert!(!msg.contains("cw_0x"), "message echoes the key: {msg}");
        }
        assert_eq!(
            FernetKey::from_base64("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4===").unwrap_err(),
            FernetError::InvalidKey("bad padding: a 32-byte key takes exactly one '='")
        );
    }

    #[test]
    fn key_debug_is_redacted() {
        let k = spec_key();
        assert_eq!(format!("{k:?}"), "FernetKey([redacted])");
        let m = MultiFernet::new(vec![k.clone(), k]);
        let shown = format!("{m:?}");
        assert!(shown.contains("[redacted]") && !shown.contains("cw_0x"));
        assert_eq!(
            format!("{:?}", FernetScratch::default()),
            "FernetScratch([redacted])"
        );
    }

    #[test]
    fn cloned_key_decrypts_tokens_of_the_original() {
        let k = FernetKey::generate();
        let t = k.encrypt(b"abc", 9);
        assert_eq!(k.clone().decrypt(&t).unwrap().as_slice(), b"abc");
    }

    #[test]
    fn rotate_from_keeps_timestamp_and_plaintext_under_the_new_key() {
        let old = FernetKey::generate();
        let new = FernetKey::generate();
        let mut scratch = FernetScratch::default();
        let mut out = b"prefix|".to_vec();
        for len in [0usize, 1, 15, 16, 17, 200, 1000] {
            let p: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let t = old.encrypt(&p, 1_600_000_000 + len as u64);
            let start = out.len();
            new.rotate_from(&old, t.as_bytes(), &mut scratch, &mut out)
                .unwrap();
            let rotated = std::str::from_utf8(&out[start..]).unwrap();
            assert_eq!(rotated.len(), t.len());
            assert_ne!(rotated, t);
            assert_eq!(new.decrypt(rotated).unwrap().as_slice(), p.as_slice());
            assert_eq!(old.decrypt(rotated).unwrap_err(), FernetError::BadMac);
            assert_eq!(
                token_timestamp(rotated).unwrap(),
                1_600_000_000 + len as u64
            );
        }
        assert!(out.starts_with(b"prefix|"));
    }

    #[test]
    fn rotate_from_the_spec_vector_decrypts_to_hello() {
        let old = spec_key();
        let new = FernetKey::generate();
        let mut out = Vec::new();
        let token = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
        new.rotate_from(
            &old,
            token.as_bytes(),
            &mut FernetScratch::default(),
            &mut out,
        )
        .unwrap();
        let rotated = std::str::from_utf8(&out).unwrap();
        assert_eq!(new.decrypt(rotated).unwrap().as_slice(), b"hello");
        assert_eq!(token_timestamp(rotated).unwrap(), 499_162_800);
    }

    #[test]
    fn rotate_from_rejects_wrong_old_key_and_bad_padding_leaving_out_untouched() {
        let old = FernetKey::generate();
        let new = FernetKey::generate();
        let mut scratch = FernetScratch::default();
        let mut out = b"keep".to_vec();
        let t = old.encrypt(b"data", 3);
        assert_eq!(
            new.rotate_from(&new, t.as_bytes(), &mut scratch, &mut out),
            Err(FernetError::BadMac)
        );
        assert_eq!(
            new.rotate_from(
                &spec_key(),
                SPEC_BAD_PADDING.as_bytes(),
                &mut scratch,
                &mut out
            ),
            Err(FernetError::Malformed("bad padding"))
        );
        assert_eq!(out, b"keep");
        // The scratch buffer must not keep the plaintext of a refused token.
        assert!(!scratch.buf.windows(4).any(|w| w == b"data"));
    }

    #[test]
    fn rotate_from_does_not_grow_scratch_once_warmed() {
        let old = FernetKey::generate();
        let new = FernetKey::generate();
        let t = old.encrypt(&[b'x'; 200], 3);
        let mut scratch = FernetScratch::default();
        let mut out = Vec::with_capacity(t.len() * 4);
        new.rotate_from(&old, t.as_bytes(), &mut scratch, &mut out)
            .unwrap();
        let (buf_ptr, buf_cap) = (scratch.buf.as_ptr(), scratch.buf.capacity());
        let out_ptr = out.as_ptr();
        for _ in 0..3 {
            new.rotate_from(&old, t.as_bytes(), &mut scratch, &mut out)
                .unwrap();
        }
        assert_eq!(scratch.buf.as_ptr(), buf_ptr);
        assert_eq!(scratch.buf.capacity(), buf_cap);
        assert_eq!(out.as_ptr(), out_ptr);
    }

    #[test]
    fn rotated_ivs_differ_between_tokens() {
        let old = FernetKey::generate();
        let new = FernetKey::generate();
        let t = old.encrypt(b"same", 3);
        let mut scratch = FernetScratch::default();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        new.rotate_from(&old, t.as_bytes(), &mut scratch, &mut a)
            .unwrap();
        new.rotate_from(&old, t.as_bytes(), &mut scratch, &mut b)
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn multifernet_encrypts_with_first_and_decrypts_with_any_reporting_the_index() {
        let (a, b, c) = (
            FernetKey::generate(),
            FernetKey::generate(),
            FernetKey::generate(),
        );
        let m = MultiFernet::new(vec![a.clone(), b.clone()]);
        let t = m.encrypt(b"one", 10);
        assert_eq!(a.decrypt(&t).unwrap().as_slice(), b"one");
        let (p, idx) = m.decrypt(&t).unwrap();
        assert_eq!((p.as_slice(), idx), (&b"one"[..], 0));
        let (p, idx) = m.decrypt(&b.encrypt(b"two", 10)).unwrap();
        assert_eq!((p.as_slice(), idx), (&b"two"[..], 1));
        assert_eq!(
            m.decrypt(&c.encrypt(b"x", 10)).unwrap_err(),
            FernetError::BadMac
        );
        assert_eq!(
            m.decrypt_with_ttl(&b.encrypt(b"x", 10), 5, 100)
                .unwrap_err(),
            FernetError::Expired
        );
    }

    #[test]
    fn multifernet_rotate_moves_old_tokens_onto_the_newest_key_keeping_timestamp() {
        let (old, new) = (FernetKey::generate(), FernetKey::generate());
        let m = MultiFernet::new(vec![new.clone(), old.clone()]);
        let t = old.encrypt(b"rotate me", 77);
        let r = m.rotate(&t).unwrap();
        assert_eq!(new.decrypt(&r).unwrap().as_slice(), b"rotate me");
        assert_eq!(token_timestamp(&r).unwrap(), 77);
        let mut out = Vec::new();
        let idx = m
            .rotate_into(r.as_bytes(), &mut FernetScratch::default(), &mut out)
            .unwrap();
        assert_eq!(idx, 0);
        assert_eq!(
            MultiFernet::new(vec![FernetKey::generate()])
                .rotate(&t)
                .unwrap_err(),
            FernetError::BadMac
        );
    }

    #[test]
    fn multifernet_refuses_an_empty_key_list() {
        assert_eq!(
            MultiFernet::try_new(Vec::new()).unwrap_err(),
            FernetError::InvalidKey("MultiFernet needs at least one key")
        );
    }

    #[test]
    fn derived_key_matches_python_sha256_idiom() {
        // python3 -c "import base64,hashlib;
        //   print(base64.urlsafe_b64encode(hashlib.sha256(b'correct horse battery staple').digest()))"
        let k = derive_fernet_key_from_secret(b"correct horse battery staple");
        assert_eq!(
            k.to_base64().as_str(),
            "xLvLH77JnWW_WdhcjLYu4tuWPw_hBvSD2a-nO9Tjmoo="
        );
        let other = derive_fernet_key_from_secret(b"correct horse battery stapler");
        assert_ne!(other.to_base64().as_str(), k.to_base64().as_str());
    }

    /// Reference decode with the `base64` crate, for comparison with [`b64::decode_into`].
    fn crate_decode(text: &[u8]) -> Option<Vec<u8>> {
        URL_SAFE.decode(text).ok()
    }

    fn fast_decode(text: &[u8]) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; b64::decode_room(text.len())];
        b64::decode_into(text, &mut buf).map(|n| buf[..n].to_vec())
    }

    #[test]
    fn fast_base64_matches_the_crate_on_random_bytes_of_every_length() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in 0..400 {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            let want = URL_SAFE.encode(&data);
            let mut out = vec![0u8; b64::encoded_len(len)];
            assert_eq!(b64::encode_into(&data, &mut out), want.len());
            assert_eq!(out, want.as_bytes(), "encode, len {len}");
            assert_eq!(
                fast_decode(want.as_bytes()),
                Some(data),
                "decode, len {len}"
            );
        }
    }

    #[test]
    fn fast_base64_decode_agrees_with_the_crate_on_every_byte_at_every_position() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut data = vec![0u8; 60];
        rng.fill_bytes(&mut data);
        let text = URL_SAFE.encode(&data).into_bytes();
        for pos in 0..text.len() {
            for byte in 0..=255u8 {
                let mut t = text.clone();
                t[pos] = byte;
                assert_eq!(fast_decode(&t), crate_decode(&t), "byte {byte:#x} at {pos}");
            }
        }
    }

    #[test]
    fn fast_base64_decode_rejects_padding_and_bad_lengths_like_the_crate() {
        let mut rng = StdRng::seed_from_u64(9);
        for len in [4usize, 5, 6, 28, 29, 30, 31, 32, 33, 100, 101] {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            let text = URL_SAFE.encode(&data);
            let unpadded = text.trim_end_matches('=');
            let extra = format!("{text}=");
            let cut = &text[..text.len() - 1];
            let inner_pad = format!("{}={}", &text[..4], &text[5..]);
            for t in [unpadded, extra.as_str(), cut, inner_pad.as_str()] {
                assert_eq!(
                    fast_decode(t.as_bytes()),
                    crate_decode(t.as_bytes()),
                    "{t:?}"
                );
            }
        }
        // Non-zero trailing bits before the padding are refused, as by the crate.
        assert_eq!(fast_decode(b"AAAAAAAAAAAAAAAAAAAAAB=="), None);
        assert!(fast_decode(b"AAAAAAAAAAAAAAAAAAAAAA==").is_some());
    }

    #[test]
    fn fast_base64_decode_reports_a_too_small_output_instead_of_panicking() {
        let text = URL_SAFE.encode([5u8; 90]);
        let mut small = vec![0u8; 40];
        assert_eq!(b64::decode_into(text.as_bytes(), &mut small), None);
    }

    #[test]
    fn pkcs7_check_accepts_only_well_formed_padding() {
        let mut b = [7u8; 16];
        assert_eq!(pkcs7_plaintext_len(&b), Some(9));
        b[10] = 6;
        assert_eq!(pkcs7_plaintext_len(&b), None);
        assert_eq!(pkcs7_plaintext_len(&[0u8; 16]), None);
        assert_eq!(pkcs7_plaintext_len(&[17u8; 16]), None);
        assert_eq!(pkcs7_plaintext_len(&[16u8; 16]), Some(0));
        assert_eq!(pkcs7_plaintext_len(&[]), None);
    }
}
