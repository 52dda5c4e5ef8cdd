//! JWS tokens for keywarden's signing keys: key generation, signing, verification and JWKS.
//!
//! Signing keys (HS256, RS256, ES256, EdDSA) are what applications use to issue their JWTs, and
//! keywarden rotates them. This module is the pure, CPU-bound part of that story: it turns key
//! material from the keyring into a [`SigningKey`] (issue) or a [`VerifierSet`] (check), and it
//! publishes the public half of asymmetric keys as JWKs. It does no IO and never reads the clock:
//! "now" arrives in [`VerifyOptions`].
//!
//! Verification follows RFC 8725 (JWT best current practices):
//! - the token size is capped before anything is decoded;
//! - the header is parsed here (or recognised byte for byte as one our own signer wrote), and
//!   `alg: none` or any algorithm we do not issue is refused;
//! - the key is chosen by `kid` with a plain map lookup (the kid never becomes a path or a query);
//! - the algorithm is pinned to the key that the kid names, so an HS256 token that names an RSA
//!   key is an [`VerifyError::AlgorithmMismatch`], never an HMAC keyed with a public key;
//! - keys that are revoked, retired, destroyed or pending never verify anything;
//! - registered claims are checked by [`check_claims`] against the caller's clock, with `exp`
//!   required.
//!
//! Tokens are signed with `jsonwebtoken` (header `{"typ":"JWT","alg":..,"kid":..}`). Verification
//! does its own JOSE framing over prebuilt aws-lc-rs keys (an HMAC key schedule or a parsed public
//! key per kid, built once in [`VerifierSet::new`]): `jsonwebtoken::decode` rebuilds its verifier
//! and re-parses the header and claims on every call, which costs more than an HMAC itself and
//! would miss the "verify at 80% of the raw primitive" goal. An HS256 token whose header is the
//! one our signer writes resumes an HMAC-SHA256 already fed with that header
//! ([`PrefixedHmac`], see `OwnHeader`); any other HS256 token uses the aws-lc-rs key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::error::Unspecified;
use aws_lc_rs::hmac;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::b64url;
pub use super::claims::Claims;
use super::prefixed_hmac::PrefixedHmac;

/// Default clock-skew allowance for `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: i64 = 60;

/// Default cap on the size of a token, in bytes, checked before any decoding.
pub const DEFAULT_MAX_TOKEN_SIZE: usize = 8 * 1024;

/// Length of a freshly generated HS256 secret, and the shortest one accepted (RFC 7518 §3.2).
pub const HMAC_SECRET_LEN: usize = 32;

/// The longest key id accepted, in bytes.
pub const MAX_KID_LEN: usize = 256;

/// Longest base64url signature we decode: an RSA-8192 signature is 1024 bytes.
const MAX_SIGNATURE_LEN: usize = 1024;

/// Longest non-RSA signature: an ES256 signature is 64 bytes (r || s).
const SMALL_SIGNATURE_LEN: usize = 64;

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// A JWS signing algorithm that keywarden issues and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigningAlg {
    /// HMAC with SHA-256 over a 32-byte secret.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA-2048 or larger.
    RS256,
    /// ECDSA on P-256 with SHA-256 (fixed-length r||s signatures).
    ES256,
    /// Ed25519.
    EdDSA,
}

impl SigningAlg {
    /// Every supported algorithm, in a stable order.
    pub const ALL: [SigningAlg; 4] = [
        SigningAlg::HS256,
        SigningAlg::RS256,
        SigningAlg::ES256,
        SigningAlg::EdDSA,
    ];

    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::HS256 => "HS256",
            SigningAlg::RS256 => "RS256",
            SigningAlg::ES256 => "ES256",
            SigningAlg::EdDSA => "EdDSA",
        }
    }

    /// Whether the key is a shared secret (and so must never be published).
    pub fn is_symmetric(self) -> bool {
        self == SigningAlg::HS256
    }

    /// Maps a header `alg` to an algorithm. JOSE names are case-sensitive, so this is exact.
    fn from_jose_name(name: &str) -> Option<SigningAlg> {
        SigningAlg::ALL.into_iter().find(|alg| alg.as_str() == name)
    }

    fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            SigningAlg::HS256 => jsonwebtoken::Algorithm::HS256,
            SigningAlg::RS256 => jsonwebtoken::Algorithm::RS256,
            SigningAlg::ES256 => jsonwebtoken::Algorithm::ES256,
            SigningAlg::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing a [`SigningAlg`] out of configuration or a command line.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("unknown signing algorithm {0:?} (allowed: HS256, RS256, ES256, EdDSA)")]
pub struct UnknownSigningAlg(pub String);

impl FromStr for SigningAlg {
    type Err = UnknownSigningAlg;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SigningAlg::from_jose_name(s).ok_or_else(|| UnknownSigningAlg(s.to_owned()))
    }
}

/// How the keyring lets a key be used for verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    /// The current key: signs new tokens and verifies.
    Active,
    /// A rotated-out key in its grace period: verifies only.
    Retiring,
    /// A key that must not verify anything; the reason is "revoked", "retired", "destroyed" or
    /// "pending".
    Unusable(&'static str),
}

/// Errors from turning key material into a signer, verifier or JWK.
///
/// Messages name the key and what is wrong with it, never the material.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The kid is empty, too long, or holds characters other than visible ASCII.
    #[error("key id must be 1 to {MAX_KID_LEN} visible ASCII characters")]
    InvalidKid,
    /// The material does not hold a usable key of the named algorithm.
    #[error("key {kid}: material is not a valid {alg} key ({reason})")]
    InvalidMaterial {
        /// The key the material belongs to.
        kid: String,
        /// The algorithm the keyring says the key has.
        alg: SigningAlg,
        /// What is wrong, without the material itself.
        reason: &'static str,
    },
    /// The same kid was given twice to one [`VerifierSet`].
    #[error("key {0} appears more than once in the verifier set")]
    DuplicateKid(String),
    /// Claims to sign must be a JSON object.
    #[error("claims must be a JSON object")]
    ClaimsNotObject,
    /// The signing primitive failed (it does not for valid keys; kept so that nothing panics).
    #[error("signing with key {kid} failed")]
    Signing {
        /// The key that failed to sign.
        kid: String,
    },
}

/// Why a token was rejected. The caller branches on the variant; [`VerifyError::code`] gives a
/// stable name for metrics and JSON output. No variant carries token or key bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The token is not a well-formed compact JWS/JWE or its JSON is not what it must be.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The token is larger than the configured cap; nothing was decoded.
    #[error("token is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Size of the token, in bytes.
        size: usize,
        /// The configured cap, in bytes.
        max: usize,
    },
    /// No key in the keyring has the token's kid.
    #[error("unknown key id")]
    UnknownKid,
    /// The kid names a key that may not verify ("revoked", "retired", "destroyed", "pending").
    #[error("key is {0} and may not be used")]
    KeyNotUsable(&'static str),
    /// The header's algorithm is not the algorithm of the key its kid names.
    #[error("token algorithm {found} does not match the {expected} key it names")]
    AlgorithmMismatch {
        /// The algorithm of the key named by the kid.
        expected: SigningAlg,
        /// The algorithm in the token header.
        found: SigningAlg,
    },
    /// The header names an algorithm keywarden never accepts (`none`, HS512, `dir` + A128GCM..).
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The signature (or, for JWE, the authentication tag) does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// A claim that is required (`exp`, or `iss`/`aud` when configured) is absent.
    #[error("required claim {0} is missing")]
    MissingClaim(&'static str),
    /// `iss` is not the configured issuer.
    #[error("token issuer is not the expected issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience (or is present when none is configured).
    #[error("token audience does not include this service")]
    WrongAudience,
    /// The token's jti is on the denylist; returned by the caller that owns the denylist.
    #[error("token has been revoked")]
    Revoked,
}

impl VerifyError {
    /// A stable snake_case reason for metrics labels and JSON output.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::TooLarge { .. } => "too_large",
            VerifyError::UnknownKid => "unknown_kid",
            VerifyError::KeyNotUsable(_) => "key_not_usable",
            VerifyError::AlgorithmMismatch { .. } => "algorithm_mismatch",
            VerifyError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::MissingClaim(_) => "missing_claim",
            VerifyError::WrongIssuer => "wrong_issuer",
            VerifyError::WrongAudience => "wrong_audience",
            VerifyError::Revoked => "revoked",
        }
    }

    fn malformed(reason: &str) -> Self {
        VerifyError::Malformed(reason.to_owned())
    }
}

/// Everything verification needs besides the keys; the clock is an argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyOptions {
    /// The current time, in seconds since the Unix epoch.
    pub now_unix: i64,
    /// Allowed clock skew for `exp` and `nbf`, in seconds (negative values count as zero).
    pub leeway_secs: i64,
    /// Largest token accepted, in bytes.
    pub max_size: usize,
    /// When set, `iss` must be present and equal to it.
    pub issuer: Option<String>,
    /// When set, `aud` must be present and be it or contain it. When unset, a token that carries
    /// an `aud` is rejected (RFC 7519 §4.1.3: we cannot identify with any audience).
    pub audience: Option<String>,
}

impl VerifyOptions {
    /// Options with the defaults (60 s leeway, 8 KiB cap, no issuer or audience) at `now_unix`.
    pub fn new(now_unix: i64) -> Self {
        VerifyOptions {
            now_unix,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            max_size: DEFAULT_MAX_TOKEN_SIZE,
            issuer: None,
            audience: None,
        }
    }
}

/// A token that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    /// The key that verified it (shared with the [`VerifierSet`]: no copy per token).
    pub kid: Arc<str>,
    /// Its algorithm.
    pub alg: SigningAlg,
    /// The claims (a JSON object; [`Claims::to_value`] gives it as a `serde_json::Value`).
    pub claims: Claims,
}

/// Generates fresh key material for `alg`: a 32-byte random secret for HS256, and an unencrypted
/// PKCS#8 PEM private key for the others (RSA-2048, P-256, Ed25519).
///
/// # Panics
/// Only if the system random number generator fails, which aws-lc-rs treats as fatal too.
pub fn generate_signing_material(alg: SigningAlg) -> Zeroizing<Vec<u8>> {
    const RNG_FAILED: &str = "system random number generator failed";
    match alg {
        SigningAlg::HS256 => {
            let mut secret = Zeroizing::new(vec![0u8; HMAC_SECRET_LEN]);
            aws_lc_rs::rand::fill(&mut secret[..]).expect(RNG_FAILED);
            secret
        }
        SigningAlg::RS256 => {
            let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect(RNG_FAILED);
            let der = pair
                .as_der()
                .expect("a generated RSA key encodes as PKCS#8");
            pem_encode_private_key(der.as_ref())
        }
        SigningAlg::ES256 => {
            let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect(RNG_FAILED);
            let der = pair
                .to_pkcs8v1()
                .expect("a generated P-256 key encodes as PKCS#8");
            pem_encode_private_key(der.as_ref())
        }
        SigningAlg::EdDSA => {
            let pair = Ed25519KeyPair::generate().expect(RNG_FAILED);
            // PKCS#8 v1 is what `openssl genpkey` writes and what every JOSE library loads.
            let der = pair
                .to_pkcs8v1()
                .expect("a generated Ed25519 key encodes as PKCS#8");
            pem_encode_private_key(der.as_ref())
        }
    }
}

/// Whether `kid` is acceptable as a key id: 1 to [`MAX_KID_LEN`] visible ASCII characters.
pub fn is_valid_kid(kid: &str) -> bool {
    !kid.is_empty() && kid.len() <= MAX_KID_LEN && kid.bytes().all(|b| b.is_ascii_graphic())
}

/// A key that signs tokens: kid, algorithm and a `jsonwebtoken` key, all built once.
pub struct SigningKey {
    kid: String,
    alg: SigningAlg,
    /// The encoded header, `base64url({"typ":"JWT","alg":..,"kid":..})`, the same bytes for
    /// every token this key signs.
    header_b64: String,
    key: PrivateSigner,
}

/// A private key parsed once, ready to sign.
enum PrivateSigner {
    /// The HMAC keyed and fed with this key's header and the dot, which start every token it
    /// signs (see [`PrefixedHmac`]; boxed: it is larger than the other variants).
    Hmac(Box<PrefixedHmac>),
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("material", &"[redacted]")
            .finish()
    }
}

impl SigningKey {
    /// Builds a signer from material as [`generate_signing_material`] produces it. The material
    /// is parsed here, once: signing is then JSON, base64url and the primitive.
    pub fn new(kid: &str, alg: SigningAlg, material: &[u8]) -> Result<Self, KeyError> {
        if !is_valid_kid(kid) {
            return Err(KeyError::InvalidKid);
        }
        let header_b64 = signed_header_b64(kid, alg);
        let key = match parse_private_key(kid, alg, material)? {
            PrivateKey::Hmac => PrivateSigner::Hmac(Box::new(header_hmac(material, &header_b64))),
            PrivateKey::Rsa(pair) => PrivateSigner::Rsa(pair),
            PrivateKey::Ec(pair) => PrivateSigner::Ec(pair),
            PrivateKey::Ed(pair) => PrivateSigner::Ed(pair),
        };
        Ok(SigningKey {
            kid: kid.to_owned(),
            alg,
            header_b64,
            key,
        })
    }

    /// The key id this key puts in every header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key's algorithm.
    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// Signs `claims` (a JSON object) into a compact JWS with header `typ: JWT`, `alg` and `kid`.
    /// The caller supplies every claim, including `exp`, which verification requires.
    ///
    /// The framing is RFC 7515's compact serialization, byte for byte what `jsonwebtoken::encode`
    /// writes for the same header and claims (a unit test compares them); the signature comes
    /// from the key parsed in [`SigningKey::new`] instead of one re-parsed from DER per call.
    pub fn sign(&self, claims: &Value) -> Result<String, KeyError> {
        if !claims.is_object() {
            return Err(KeyError::ClaimsNotObject);
        }
        let failed = || KeyError::Signing {
            kid: self.kid.clone(),
        };
        let payload = serde_json::to_vec(claims).map_err(|_| failed())?;
        let mut token = String::with_capacity(
            self.header_b64.len() + payload.len().div_ceil(3) * 4 + MAX_SIGNATURE_LEN / 3 * 4 + 8,
        );
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let input = token.as_bytes();
        let mut buf = [0u8; MAX_SIGNATURE_LEN];
        let mut put = |bytes: &[u8]| {
            buf[..bytes.len()].copy_from_slice(bytes);
            bytes.len()
        };
        let len = match &self.key {
            // The HMAC has already absorbed the header and the dot.
            PrivateSigner::Hmac(key) => put(&key.tag(&input[self.header_b64.len() + 1..])),
            PrivateSigner::Rsa(pair) => {
                let len = pair.public_modulus_len();
                let out = buf.get_mut(..len).ok_or_else(failed)?;
                let rng = aws_lc_rs::rand::SystemRandom::new();
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, input, out)
                    .map_err(|_| failed())?;
                len
            }
            PrivateSigner::Ec(pair) => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                put(pair.sign(&rng, input).map_err(|_| failed())?.as_ref())
            }
            PrivateSigner::Ed(pair) => put(pair.sign(input).as_ref()),
        };
        let signature = &buf[..len];
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }
}

/// An HMAC-SHA256 keyed with `material` and fed with `header_b64` and the dot after it: the start
/// of every token signed under that header. Signing and verification both resume it.
fn header_hmac(material: &[u8], header_b64: &str) -> PrefixedHmac {
    PrefixedHmac::new(material, &[header_b64.as_bytes(), b"."].concat())
}

/// `base64url` of the JWS header [`SigningKey`] writes, as `jsonwebtoken` serializes it.
fn signed_header_b64(kid: &str, alg: SigningAlg) -> String {
    let header_json =
        serde_json::to_vec(&signed_header(kid, alg)).expect("a JWS header always serializes");
    URL_SAFE_NO_PAD.encode(header_json)
}

/// The JWS header [`SigningKey`] writes: `{"typ":"JWT","alg":..,"kid":..}`.
fn signed_header(kid: &str, alg: SigningAlg) -> jsonwebtoken::Header {
    let mut header = jsonwebtoken::Header::new(alg.to_jsonwebtoken());
    header.kid = Some(kid.to_owned());
    header
}

/// A prebuilt verification key.
enum Verifier {
    /// The HMAC key schedule, computed once (boxed: it is far larger than a parsed public key).
    Hmac(Box<hmac::Key>),
    /// A public key parsed once by aws-lc-rs, bound to its verification algorithm.
    Public(ParsedPublicKey),
}

struct Entry {
    kid: Arc<str>,
    alg: SigningAlg,
    state: KeyUse,
    /// `None` for unusable keys: their material is never parsed, and may be absent.
    verifier: Option<Verifier>,
}

/// Every key a verifier may meet, indexed by kid, with verification keys built once.
///
/// Build a new set when the keyring changes (rotation, revocation); verifying is then a lookup,
/// the signature primitive, and a scan of the claims (see [`super::claims`]).
pub struct VerifierSet {
    entries: Vec<Entry>,
    /// Position in `entries` by kid.
    by_kid: HashMap<String, usize>,
    /// The exact encoded header our own [`SigningKey`] writes for each usable key. Every token a
    /// key signs repeats these bytes, so recognising them skips a base64 decode, a JSON parse and
    /// a hash of the kid per call; any other header takes the parsing path. A plain list: a
    /// keyring has one active key and a few retiring ones, and comparing a few short strings
    /// costs less than hashing one.
    own_headers: Vec<OwnHeader>,
}

/// A header our own signer writes for one usable key.
struct OwnHeader {
    /// The header as it appears in the token (base64url of the JSON).
    encoded: String,
    /// The key's position in `entries`.
    position: usize,
    /// For an HMAC key: the HMAC keyed and already fed with `encoded` and the `.` after it, the
    /// start of every signing input with this header ([`PrefixedHmac`]). Verification hashes
    /// only the rest, which saves hashing the header again (one SHA-256 block of the six or so
    /// in a typical token) and copies two states instead of cloning a keyed MAC: cloning an
    /// aws-lc `hmac::Context` initialises and copies a whole `HMAC_CTX` through FFI, which costs
    /// about as much as hashing two blocks.
    midstate: Option<PrefixedHmac>,
}

impl fmt::Debug for VerifierSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<&Entry> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.kid.cmp(&b.kid));
        let mut list = f.debug_list();
        for entry in entries {
            list.entry(&format_args!(
                "{} {} {:?} [redacted]",
                entry.kid, entry.alg, entry.state
            ));
        }
        list.finish()
    }
}

impl VerifierSet {
    /// Builds the set from `(kid, alg, use, material)` tuples. Material is what
    /// [`generate_signing_material`] produced (the private key: the public half is derived here);
    /// for [`KeyUse::Unusable`] keys it is ignored and may be empty.
    pub fn new<'m>(
        keys: impl IntoIterator<Item = (String, SigningAlg, KeyUse, &'m [u8])>,
    ) -> Result<Self, KeyError> {
        let mut entries = Vec::new();
        let mut by_kid = HashMap::new();
        let mut own_headers = Vec::new();
        for (kid, alg, state, material) in keys {
            if !is_valid_kid(&kid) {
                return Err(KeyError::InvalidKid);
            }
            let verifier = match state {
                KeyUse::Unusable(_) => None,
                KeyUse::Active | KeyUse::Retiring => Some(build_verifier(&kid, alg, material)?),
            };
            if by_kid.contains_key(&kid) {
                return Err(KeyError::DuplicateKid(kid));
            }
            let position = entries.len();
            if let Some(verifier) = &verifier {
                let encoded = signed_header_b64(&kid, alg);
                let midstate = match verifier {
                    Verifier::Hmac(_) => Some(header_hmac(material, &encoded)),
                    Verifier::Public(_) => None,
                };
                own_headers.push(OwnHeader {
                    encoded,
                    position,
                    midstate,
                });
            }
            by_kid.insert(kid.clone(), position);
            entries.push(Entry {
                kid: kid.into(),
                alg,
                state,
                verifier,
            });
        }
        Ok(VerifierSet {
            entries,
            by_kid,
            own_headers,
        })
    }

    /// Number of keys in the set, usable or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set holds no keys at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies a compact JWS: size, header, kid, algorithm pinning, key state, signature, then
    /// the claims ([`check_claims`]'s rules). The first failing check decides the error.
    pub fn verify(&self, token: &str, opts: &VerifyOptions) -> Result<Verified, VerifyError> {
        if token.len() > opts.max_size {
            return Err(VerifyError::TooLarge {
                size: token.len(),
                max: opts.max_size,
            });
        }
        let bytes = token.as_bytes();
        let (first_dot, second_dot) = two_dots(bytes)
            .ok_or_else(|| VerifyError::malformed("a JWS has exactly three dot-separated parts"))?;
        // Dots are ASCII, so these are char boundaries.
        let header_b64 = &token[..first_dot];
        let payload_b64 = &token[first_dot + 1..second_dot];
        let signature_b64 = &token[second_dot + 1..];
        let signing_input = &bytes[..second_dot];

        let own = self
            .own_headers
            .iter()
            .find(|own| own.encoded.as_bytes() == header_b64.as_bytes());
        let entry = match own {
            Some(own) => &self.entries[own.position],
            None => {
                let header_json = decode_b64(header_b64, "header")?;
                let header = parse_jws_header(&header_json)?;
                let entry = self
                    .by_kid
                    .get(header.kid.as_ref())
                    .map(|&position| &self.entries[position])
                    .ok_or(VerifyError::UnknownKid)?;
                if entry.alg != header.alg {
                    return Err(VerifyError::AlgorithmMismatch {
                        expected: entry.alg,
                        found: header.alg,
                    });
                }
                entry
            }
        };
        let verifier = match (entry.state, &entry.verifier) {
            (KeyUse::Unusable(state), _) => return Err(VerifyError::KeyNotUsable(state)),
            (_, Some(verifier)) => verifier,
            // `new` builds a verifier for every usable key, so this arm is never taken.
            (_, None) => return Err(VerifyError::KeyNotUsable("invalid")),
        };

        // HMAC, ECDSA and Ed25519 signatures fit the small buffer; only RSA needs the large one
        // (zeroing a kilobyte per token is a measurable share of an HS256 verification).
        // With our own HMAC header, the HMAC resumes after it (`midstate`) on the rest of the
        // signing input, the payload; the tag is the one over the whole signing input.
        let signed = match own.and_then(|own| own.midstate.as_ref()) {
            Some(midstate) => Signed::Rest(midstate, &signing_input[first_dot + 1..]),
            None => Signed::Whole(verifier, signing_input),
        };
        let signature_len = b64url::decoded_len(signature_b64.len())
            .ok_or_else(|| VerifyError::malformed("signature is not unpadded base64url"))?;
        if signature_len <= SMALL_SIGNATURE_LEN {
            check_signature::<SMALL_SIGNATURE_LEN>(signed, signature_b64)?;
        } else if signature_len <= MAX_SIGNATURE_LEN {
            check_signature::<MAX_SIGNATURE_LEN>(signed, signature_b64)?;
        } else {
            return Err(VerifyError::malformed("signature is too long"));
        }

        let payload_len = b64url::decoded_len(payload_b64.len())
            .ok_or_else(|| VerifyError::malformed("payload is not unpadded base64url"))?;
        // `with_capacity` and `resize` rather than `vec![0; n]`: that is `calloc`, which glibc
        // serves without its per-thread cache, at about twice the cost of `malloc` and a memset.
        #[allow(clippy::slow_vector_initialization)]
        let mut payload = Vec::with_capacity(payload_len);
        payload.resize(payload_len, 0);
        b64url::decode_into(payload_b64.as_bytes(), &mut payload)
            .ok_or_else(|| VerifyError::malformed("payload is not unpadded base64url"))?;
        let claims = Claims::from_json(payload)?;
        claims.check(opts)?;
        Ok(Verified {
            kid: entry.kid.clone(),
            alg: entry.alg,
            claims,
        })
    }
}

/// The positions of the two dots of a compact JWS, or `None` unless it has exactly two. One pass
/// over the token: 64 bytes at a time while they hold no dot (most of a token), then sixteen.
fn two_dots(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut dots = [0usize; 2];
    let mut count = 0;
    let mut record = |at: usize| {
        *dots.get_mut(count)? = at;
        count += 1;
        Some(())
    };
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8,
        };
        // SAFETY (every block below): SSE2 is part of the x86_64 baseline, and each load reads
        // sixteen bytes at `at` with `at + 16 <= bytes.len()` (unaligned loads have no other
        // requirement).
        let dots_in = |at: usize| unsafe {
            let chunk = _mm_loadu_si128(bytes.as_ptr().add(at).cast::<__m128i>());
            _mm_cmpeq_epi8(chunk, _mm_set1_epi8(b'.' as i8))
        };
        while i + 64 <= bytes.len() {
            let (a, b, c, d) = (
                dots_in(i),
                dots_in(i + 16),
                dots_in(i + 32),
                dots_in(i + 48),
            );
            // SAFETY: as above; no memory is read here.
            let any =
                unsafe { _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d))) };
            if any != 0 {
                for (part, found) in [a, b, c, d].into_iter().enumerate() {
                    // SAFETY: as above; no memory is read here.
                    let mut mask = unsafe { _mm_movemask_epi8(found) } as u32;
                    while mask != 0 {
                        record(i + 16 * part + mask.trailing_zeros() as usize)?;
                        mask &= mask - 1;
                    }
                }
            }
            i += 64;
        }
        while i + 16 <= bytes.len() {
            // SAFETY: as above; no memory is read here.
            let mut mask = unsafe { _mm_movemask_epi8(dots_in(i)) } as u32;
            while mask != 0 {
                record(i + mask.trailing_zeros() as usize)?;
                mask &= mask - 1;
            }
            i += 16;
        }
    }
    for (at, &b) in bytes.iter().enumerate().skip(i) {
        if b == b'.' {
            record(at)?;
        }
    }
    (count == 2).then_some((dots[0], dots[1]))
}

/// What a signature must be checked over.
#[derive(Clone, Copy)]
enum Signed<'a> {
    /// The whole signing input, with the key.
    Whole(&'a Verifier, &'a [u8]),
    /// An HMAC already fed with the start of the signing input, and the rest of it.
    Rest(&'a PrefixedHmac, &'a [u8]),
}

/// Decodes the signature into an `N`-byte stack buffer and checks it over the signing input.
fn check_signature<const N: usize>(
    signed: Signed<'_>,
    signature_b64: &str,
) -> Result<(), VerifyError> {
    let mut buf = [0u8; N];
    let len = b64url::decode_into(signature_b64.as_bytes(), &mut buf)
        .ok_or_else(|| VerifyError::malformed("signature is not unpadded base64url"))?;
    let signature = &buf[..len];
    let verified = match signed {
        // `hmac::verify` compares tags in constant time.
        Signed::Whole(Verifier::Hmac(key), input) => hmac::verify(key, input, signature),
        Signed::Whole(Verifier::Public(key), input) => key.verify_sig(input, signature),
        // Like `hmac::verify`: a length check, then a constant-time comparison of the tags.
        Signed::Rest(midstate, rest) => midstate
            .verify(rest, signature)
            .then_some(())
            .ok_or(Unspecified),
    };
    verified.map_err(|_| VerifyError::BadSignature)
}

/// Checks the registered claims of already-authenticated claims against `opts`.
///
/// - `exp` is required and must be a number: `exp <= now - leeway` is [`VerifyError::Expired`];
/// - `nbf`, when present, must be a number: `nbf > now + leeway` is [`VerifyError::NotYetValid`];
/// - with an issuer configured, `iss` must be present and equal to it;
/// - with an audience configured, `aud` (a string or an array of strings) must contain it;
///   without one, a token carrying `aud` is rejected.
pub fn check_claims(claims: &Value, opts: &VerifyOptions) -> Result<(), VerifyError> {
    let claims = claims
        .as_object()
        .ok_or_else(|| VerifyError::malformed("claims are not a JSON object"))?;
    super::claims::check(claims, opts)
}

/// The public JWK of an asymmetric signing key, with `kid`, `alg` and `use: "sig"`; `None` for
/// HS256, whose secret must never be published.
pub fn public_jwk(kid: &str, alg: SigningAlg, material: &[u8]) -> Result<Option<Value>, KeyError> {
    if !is_valid_kid(kid) {
        return Err(KeyError::InvalidKid);
    }
    let b64 = |bytes: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(bytes));
    let mut jwk = Map::new();
    match parse_private_key(kid, alg, material)? {
        PrivateKey::Hmac => return Ok(None),
        PrivateKey::Rsa(pair) => {
            let public = pair.public_key();
            jwk.insert("kty".into(), "RSA".into());
            jwk.insert(
                "n".into(),
                b64(public.modulus().big_endian_without_leading_zero()),
            );
            jwk.insert(
                "e".into(),
                b64(public.exponent().big_endian_without_leading_zero()),
            );
        }
        PrivateKey::Ec(pair) => {
            // An uncompressed SEC1 point: 0x04 || x || y, 32 bytes each on P-256.
            let point = pair.public_key().as_ref();
            if point.len() != 65 || point[0] != 0x04 {
                return Err(KeyError::InvalidMaterial {
                    kid: kid.to_owned(),
                    alg,
                    reason: "unexpected public point encoding",
                });
            }
            jwk.insert("kty".into(), "EC".into());
            jwk.insert("crv".into(), "P-256".into());
            jwk.insert("x".into(), b64(&point[1..33]));
            jwk.insert("y".into(), b64(&point[33..65]));
        }
        PrivateKey::Ed(pair) => {
            jwk.insert("kty".into(), "OKP".into());
            jwk.insert("crv".into(), "Ed25519".into());
            jwk.insert("x".into(), b64(pair.public_key().as_ref()));
        }
    }
    jwk.insert("kid".into(), kid.into());
    jwk.insert("alg".into(), alg.as_str().into());
    jwk.insert("use".into(), "sig".into());
    Ok(Some(Value::Object(jwk)))
}

/// A JWKS document (`{"keys": [..]}`) of the active and retiring asymmetric keys among `keys`.
/// HS256 keys and unusable keys are left out.
pub fn jwks<'m>(
    keys: impl IntoIterator<Item = (&'m str, SigningAlg, KeyUse, &'m [u8])>,
) -> Result<Value, KeyError> {
    let mut out = Vec::new();
    for (kid, alg, state, material) in keys {
        if matches!(state, KeyUse::Unusable(_)) {
            continue;
        }
        if let Some(jwk) = public_jwk(kid, alg, material)? {
            out.push(jwk);
        }
    }
    Ok(serde_json::json!({ "keys": out }))
}

/// Private key material parsed by aws-lc-rs (HMAC secrets are used as they are).
enum PrivateKey {
    Hmac,
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

fn parse_private_key(kid: &str, alg: SigningAlg, material: &[u8]) -> Result<PrivateKey, KeyError> {
    let invalid = |reason| KeyError::InvalidMaterial {
        kid: kid.to_owned(),
        alg,
        reason,
    };
    if alg == SigningAlg::HS256 {
        if material.len() < HMAC_SECRET_LEN {
            return Err(invalid("HMAC secret shorter than 32 bytes"));
        }
        return Ok(PrivateKey::Hmac);
    }
    let der = pem_decode_private_key(material)
        .ok_or_else(|| invalid("expected an unencrypted PKCS#8 PEM private key"))?;
    Ok(match alg {
        SigningAlg::HS256 => unreachable!("handled above"),
        SigningAlg::RS256 => {
            let pair = RsaKeyPair::from_pkcs8(&der).map_err(|_| invalid("not an RSA key"))?;
            if pair.public_modulus_len() < 256 {
                return Err(invalid("RSA modulus shorter than 2048 bits"));
            }
            PrivateKey::Rsa(pair)
        }
        SigningAlg::ES256 => PrivateKey::Ec(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                .map_err(|_| invalid("not a P-256 key"))?,
        ),
        SigningAlg::EdDSA => PrivateKey::Ed(
            Ed25519KeyPair::from_pkcs8(&der).map_err(|_| invalid("not an Ed25519 key"))?,
        ),
    })
}

fn build_verifier(kid: &str, alg: SigningAlg, material: &[u8]) -> Result<Verifier, KeyError> {
    let invalid = |reason| KeyError::InvalidMaterial {
        kid: kid.to_owned(),
        alg,
        reason,
    };
    let parsed = |valg: &'static dyn signature::VerificationAlgorithm, public: &[u8]| {
        ParsedPublicKey::new(valg, public)
            .map(Verifier::Public)
            .map_err(|_| invalid("public key rejected"))
    };
    match parse_private_key(kid, alg, material)? {
        PrivateKey::Hmac => Ok(Verifier::Hmac(Box::new(hmac::Key::new(
            hmac::HMAC_SHA256,
            material,
        )))),
        PrivateKey::Rsa(pair) => parsed(&RSA_PKCS1_2048_8192_SHA256, pair.public_key().as_ref()),
        PrivateKey::Ec(pair) => parsed(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref()),
        PrivateKey::Ed(pair) => parsed(&ED25519, pair.public_key().as_ref()),
    }
}

/// PEM-armours PKCS#8 DER as `PRIVATE KEY`, 64 columns, keeping every copy zeroizing.
fn pem_encode_private_key(der: &[u8]) -> Zeroizing<Vec<u8>> {
    let body = Zeroizing::new(STANDARD.encode(der));
    let mut pem = Zeroizing::new(Vec::with_capacity(body.len() + body.len() / 64 + 64));
    pem.extend_from_slice(PEM_BEGIN.as_bytes());
    pem.push(b'\n');
    for line in body.as_bytes().chunks(64) {
        pem.extend_from_slice(line);
        pem.push(b'\n');
    }
    pem.extend_from_slice(PEM_END.as_bytes());
    pem.push(b'\n');
    pem
}

/// Extracts the DER of a single `PRIVATE KEY` PEM block; `None` for anything else.
fn pem_decode_private_key(pem: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let text = std::str::from_utf8(pem).ok()?.trim();
    let body = text.strip_prefix(PEM_BEGIN)?.strip_suffix(PEM_END)?;
    let compact: Zeroizing<Vec<u8>> =
        Zeroizing::new(body.bytes().filter(|b| !b.is_ascii_whitespace()).collect());
    let der = STANDARD.decode(&compact[..]).ok()?;
    Some(Zeroizing::new(der))
}

/// The parts of a JWS header that verification uses.
struct JwsHeader<'a> {
    alg: SigningAlg,
    kid: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawJoseHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    enc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    typ: Option<Cow<'a, str>>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
    #[serde(default)]
    zip: Option<IgnoredAny>,
}

/// The parts of a JOSE header that keywarden reads, shared by JWS and JWE parsing.
pub(crate) struct JoseHeader<'a> {
    /// The `alg` member.
    pub alg: Cow<'a, str>,
    /// The `enc` member (JWE only).
    pub enc: Option<Cow<'a, str>>,
    /// The `kid` member, required.
    pub kid: Cow<'a, str>,
    /// Whether a `zip` member is present.
    pub zip: bool,
}

/// Parses a decoded JOSE header strictly: a JSON object without duplicate known members, a kid,
/// no `crit` (we understand no extensions, so RFC 7515 §4.1.11 says reject), and a `typ` that,
/// when present, says JWT.
pub(crate) fn parse_jose_header(json: &[u8]) -> Result<JoseHeader<'_>, VerifyError> {
    // A derived struct would also accept a JSON array positionally; a header is an object.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(VerifyError::malformed("header is not a JSON object"));
    }
    let raw: RawJoseHeader<'_> = serde_json::from_slice(json)
        .map_err(|_| VerifyError::malformed("header is not valid JSON with a string alg"))?;
    if raw.crit.is_some() {
        return Err(VerifyError::malformed("header has critical extensions"));
    }
    if let Some(typ) = raw.typ.as_deref()
        && !(typ.eq_ignore_ascii_case("JWT") || typ.eq_ignore_ascii_case("application/jwt"))
    {
        return Err(VerifyError::malformed("header typ is not JWT"));
    }
    let kid = raw
        .kid
        .ok_or_else(|| VerifyError::malformed("header has no kid"))?;
    Ok(JoseHeader {
        alg: raw.alg,
        enc: raw.enc,
        kid,
        zip: raw.zip.is_some(),
    })
}

fn parse_jws_header(json: &[u8]) -> Result<JwsHeader<'_>, VerifyError> {
    let header = parse_jose_header(json)?;
    if header.enc.is_some() || header.zip {
        return Err(VerifyError::malformed("JWS header carries JWE members"));
    }
    let alg = SigningAlg::from_jose_name(&header.alg)
        .ok_or_else(|| VerifyError::UnsupportedAlgorithm(printable_alg(&header.alg)))?;
    Ok(JwsHeader {
        alg,
        kid: header.kid,
    })
}

/// An attacker-chosen algorithm name, made safe to log: short and plain, or a placeholder.
pub(crate) fn printable_alg(alg: &str) -> String {
    let plain = alg.len() <= 32
        && alg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+'));
    if plain {
        alg.to_owned()
    } else {
        "(unprintable)".to_owned()
    }
}

/// Decodes one unpadded base64url part, naming the part (not its content) on failure.
pub(crate) fn decode_b64(part: &str, what: &str) -> Result<Vec<u8>, VerifyError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| VerifyError::Malformed(format!("{what} is not unpadded base64url")))
}

/// Parses decoded claims: a single JSON object whose top-level names are all distinct. A repeated
/// `exp` would otherwise let the last copy silently win.
pub fn parse_claims(json: &[u8]) -> Result<Value, VerifyError> {
    parse_claims_object(json).map(Value::Object)
}

/// [`parse_claims`], returning the object's map.
pub(crate) fn parse_claims_object(json: &[u8]) -> Result<Map<String, Value>, VerifyError> {
    serde_json::from_slice::<StrictObject>(json)
        .map(|object| object.0)
        .map_err(|_| VerifyError::malformed("claims are not a JSON object with distinct names"))
}

struct StrictObject(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrictVisitor;
        impl<'de> Visitor<'de> for StrictVisitor {
            type Value = StrictObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
                let mut map = Map::new();
                while let Some(name) = access.next_key::<String>()? {
                    let value = access.next_value::<Value>()?;
                    match map.entry(name) {
                        serde_json::map::Entry::Vacant(slot) => {
                            slot.insert(value);
                        }
                        serde_json::map::Entry::Occupied(_) => {
                            return Err(de::Error::custom("duplicate claim name"));
                        }
                    }
                }
                Ok(StrictObject(map))
            }
        }
        deserializer.deserialize_map(StrictVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_750_000_000;

    /// Key material for one keyring: one key per algorithm, generated once per test binary.
    struct Ring {
        materials: Vec<(SigningAlg, Zeroizing<Vec<u8>>)>,
    }

    impl Ring {
        fn generate() -> Ring {
            Ring {
                materials: SigningAlg::ALL
                    .into_iter()
                    .map(|alg| (alg, generate_signing_material(alg)))
                    .collect(),
            }
        }

        fn material(&self, alg: SigningAlg) -> &[u8] {
            &self
                .materials
                .iter()
                .find(|(a, _)| *a == alg)
                .expect("every alg is generated")
                .1
        }

        fn signer(&self, alg: SigningAlg) -> SigningKey {
            SigningKey::new(kid_of(alg), alg, self.material(alg)).expect("valid material")
        }
    }

    fn kid_of(alg: SigningAlg) -> &'static str {
        match alg {
            SigningAlg::HS256 => "hs-1",
            SigningAlg::RS256 => "rs-1",
            SigningAlg::ES256 => "es-1",
            SigningAlg::EdDSA => "ed-1",
        }
    }

    fn ours() -> &'static Ring {
        static RING: OnceLock<Ring> = OnceLock::new();
        RING.get_or_init(Ring::generate)
    }

    fn other() -> &'static Ring {
        static RING: OnceLock<Ring> = OnceLock::new();
        RING.get_or_init(Ring::generate)
    }

    /// The verifier set of "our" keyring: all four algorithms active, plus unusable keys.
    fn set() -> &'static VerifierSet {
        static SET: OnceLock<VerifierSet> = OnceLock::new();
        SET.get_or_init(|| {
            let ring = ours();
            let mut keys: Vec<(String, SigningAlg, KeyUse, &[u8])> = SigningAlg::ALL
                .into_iter()
                .map(|alg| {
                    (
                        kid_of(alg).to_owned(),
                        alg,
                        KeyUse::Active,
                        ring.material(alg),
                    )
                })
                .collect();
            for state in ["revoked", "retired", "destroyed", "pending"] {
                keys.push((
                    format!("hs-{state}"),
                    SigningAlg::HS256,
                    KeyUse::Unusable(state),
                    &[],
                ));
            }
            VerifierSet::new(keys).expect("valid keys")
        })
    }

    fn claims() -> Value {
        json!({ "sub": "user-7", "iat": NOW, "exp": NOW + 600, "jti": "j-1" })
    }

    fn opts() -> VerifyOptions {
        VerifyOptions::new(NOW)
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token with an arbitrary header and payload, HMAC-signed with our HS256 secret, so that
    /// only the property under test is wrong.
    fn forge_hs(header: &str, payload: &str) -> String {
        forge_hs_with(ours().material(SigningAlg::HS256), header, payload)
    }

    fn forge_hs_with(secret: &[u8], header: &str, payload: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    }

    fn payload(claims: &Value) -> String {
        serde_json::to_string(claims).unwrap()
    }

    const HS_HEADER: &str = r#"{"typ":"JWT","alg":"HS256","kid":"hs-1"}"#;

    fn hs_token_with(claims: &Value) -> String {
        forge_hs(HS_HEADER, &payload(claims))
    }

    fn replace_part(token: &str, index: usize, part: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = part;
        parts.join(".")
    }

    fn flip_last_signature_byte(token: &str) -> String {
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        *raw.last_mut().unwrap() ^= 0x01;
        format!("{input}.{}", b64(&raw))
    }

    #[test]
    fn every_algorithm_round_trips_through_sign_and_verify() {
        for alg in SigningAlg::ALL {
            let token = ours().signer(alg).sign(&claims()).unwrap();
            let verified = set().verify(&token, &opts()).unwrap();
            assert_eq!(&*verified.kid, kid_of(alg));
            assert_eq!(verified.alg, alg);
            assert_eq!(verified.claims, claims());
            assert!(verified.claims.was_scanned(), "{alg}");
        }
    }

    #[test]
    fn signed_header_carries_typ_alg_and_kid() {
        for alg in SigningAlg::ALL {
            let token = ours().signer(alg).sign(&claims()).unwrap();
            let header: Value = serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(token.split('.').next().unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(
                header,
                json!({ "typ": "JWT", "alg": alg.as_str(), "kid": kid_of(alg) })
            );
        }
    }

    #[test]
    fn signing_writes_what_jsonwebtoken_writes() {
        // PKCS#1 v1.5, Ed25519 and HMAC are deterministic, so the tokens must be identical.
        let ring = ours();
        for alg in [SigningAlg::HS256, SigningAlg::RS256, SigningAlg::EdDSA] {
            let material = ring.material(alg);
            let key = match alg {
                SigningAlg::HS256 => jsonwebtoken::EncodingKey::from_secret(material),
                SigningAlg::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(material).unwrap(),
                _ => jsonwebtoken::EncodingKey::from_ed_pem(material).unwrap(),
            };
            let expected =
                jsonwebtoken::encode(&signed_header(kid_of(alg), alg), &claims(), &key).unwrap();
            assert_eq!(ring.signer(alg).sign(&claims()).unwrap(), expected, "{alg}");
        }
    }

    #[test]
    fn tokens_verify_with_jsonwebtoken_decoding_keys_built_from_our_jwks() {
        // An independent check of both the signatures and the published JWKs.
        for alg in [SigningAlg::RS256, SigningAlg::ES256, SigningAlg::EdDSA] {
            let token = ours().signer(alg).sign(&claims()).unwrap();
            let jwk_json = public_jwk(kid_of(alg), alg, ours().material(alg))
                .unwrap()
                .unwrap();
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk_json).unwrap();
            let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut validation = jsonwebtoken::Validation::new(alg.to_jsonwebtoken());
            validation.validate_exp = false;
            validation.required_spec_claims.clear();
            let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
            assert_eq!(data.claims, claims());
        }
    }

    #[test]
    fn each_bad_token_gets_its_specific_error() {
        let ring = ours();
        let hs = ring.signer(SigningAlg::HS256);
        let good_hs = hs.sign(&claims()).unwrap();
        let good_es = ring.signer(SigningAlg::ES256).sign(&claims()).unwrap();
        let ghost = SigningKey::new("ghost", SigningAlg::HS256, ring.material(SigningAlg::HS256))
            .unwrap()
            .sign(&claims())
            .unwrap();
        // The classic confusion: an HMAC "signed" with the RSA key's public JWK as the secret.
        let rsa_public = serde_json::to_vec(
            &public_jwk("rs-1", SigningAlg::RS256, ring.material(SigningAlg::RS256)).unwrap(),
        )
        .unwrap();
        let hs_naming_rsa = forge_hs_with(
            &rsa_public,
            r#"{"typ":"JWT","alg":"HS256","kid":"rs-1"}"#,
            &payload(&claims()),
        );
        let es_naming_ed = replace_part(
            &good_es,
            0,
            &b64(br#"{"typ":"JWT","alg":"ES256","kid":"ed-1"}"#),
        );
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","kid":"hs-1"}"#),
            b64(payload(&claims()).as_bytes())
        );
        let hs512 = forge_hs(r#"{"alg":"HS512","kid":"hs-1"}"#, &payload(&claims()));
        let random_signature = replace_part(&good_hs, 2, &b64(&[7u8; 32]));
        let tampered_payload = replace_part(
            &good_hs,
            1,
            &b64(payload(&json!({"sub": "admin", "exp": NOW + 600})).as_bytes()),
        );
        let truncated_to_two_parts = good_hs.rsplit_once('.').unwrap().0.to_owned();
        let truncated_signature = {
            let (input, sig) = good_hs.rsplit_once('.').unwrap();
            let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
            format!("{input}.{}", b64(&raw[..raw.len() - 3]))
        };
        let huge_header = forge_hs(
            &format!(
                r#"{{"alg":"HS256","kid":"hs-1","pad":"{}"}}"#,
                "x".repeat(9000)
            ),
            &payload(&claims()),
        );
        let too_large = format!("{good_hs}{}", "A".repeat(DEFAULT_MAX_TOKEN_SIZE));
        let another_keyring_same_kid = |alg| other().signer(alg).sign(&claims()).unwrap();
        let revoked = |state: &str| {
            forge_hs(
                &format!(r#"{{"alg":"HS256","kid":"hs-{state}"}}"#),
                &payload(&claims()),
            )
        };
        let with_opts = |issuer: Option<&str>, audience: Option<&str>| VerifyOptions {
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            ..opts()
        };

        let table: Vec<(&str, String, VerifyOptions, VerifyError)> = vec![
            (
                "garbage",
                "not-a-token".into(),
                opts(),
                VerifyError::malformed(""),
            ),
            ("empty", String::new(), opts(), VerifyError::malformed("")),
            (
                "too large",
                too_large.clone(),
                opts(),
                VerifyError::TooLarge {
                    size: too_large.len(),
                    max: DEFAULT_MAX_TOKEN_SIZE,
                },
            ),
            (
                "huge header",
                huge_header.clone(),
                opts(),
                VerifyError::TooLarge {
                    size: huge_header.len(),
                    max: DEFAULT_MAX_TOKEN_SIZE,
                },
            ),
            ("unknown kid", ghost, opts(), VerifyError::UnknownKid),
            (
                "duplicate-looking kid (trailing space)",
                forge_hs(r#"{"alg":"HS256","kid":"hs-1 "}"#, &payload(&claims())),
                opts(),
                VerifyError::UnknownKid,
            ),
            (
                "duplicate-looking kid (case)",
                forge_hs(r#"{"alg":"HS256","kid":"HS-1"}"#, &payload(&claims())),
                opts(),
                VerifyError::UnknownKid,
            ),
            (
                "duplicate-looking kid (unicode hyphen)",
                forge_hs(
                    "{\"alg\":\"HS256\",\"kid\":\"hs\u{2011}1\"}",
                    &payload(&claims()),
                ),
                opts(),
                VerifyError::UnknownKid,
            ),
            (
                "revoked key",
                revoked("revoked"),
                opts(),
                VerifyError::KeyNotUsable("revoked"),
            ),
            (
                "retired key",
                revoked("retired"),
                opts(),
                VerifyError::KeyNotUsable("retired"),
            ),
            (
                "destroyed key",
                revoked("destroyed"),
                opts(),
                VerifyError::KeyNotUsable("destroyed"),
            ),
            (
                "pending key",
                revoked("pending"),
                opts(),
                VerifyError::KeyNotUsable("pending"),
            ),
            (
                "HS256 token naming an RSA key",
                hs_naming_rsa,
                opts(),
                VerifyError::AlgorithmMismatch {
                    expected: SigningAlg::RS256,
                    found: SigningAlg::HS256,
                },
            ),
            (
                "ES256 token naming an Ed25519 key",
                es_naming_ed,
                opts(),
                VerifyError::AlgorithmMismatch {
                    expected: SigningAlg::EdDSA,
                    found: SigningAlg::ES256,
                },
            ),
            (
                "alg none",
                none,
                opts(),
                VerifyError::UnsupportedAlgorithm("none".into()),
            ),
            (
                "alg HS512",
                hs512,
                opts(),
                VerifyError::UnsupportedAlgorithm("HS512".into()),
            ),
            (
                "random signature",
                random_signature,
                opts(),
                VerifyError::BadSignature,
            ),
            (
                "tampered payload",
                tampered_payload,
                opts(),
                VerifyError::BadSignature,
            ),
            (
                "tampered signature HS256",
                flip_last_signature_byte(&good_hs),
                opts(),
                VerifyError::BadSignature,
            ),
            (
                "truncated to two parts",
                truncated_to_two_parts,
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "truncated signature",
                truncated_signature,
                opts(),
                VerifyError::BadSignature,
            ),
            (
                "four parts",
                format!("{good_hs}.AAAA"),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "non-JSON header",
                replace_part(&good_hs, 0, &b64(b"not json at all")),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "header is a JSON array",
                forge_hs(r#"["HS256","hs-1"]"#, &payload(&claims())),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "header without kid",
                forge_hs(r#"{"alg":"HS256"}"#, &payload(&claims())),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "header with duplicate alg",
                forge_hs(
                    r#"{"alg":"HS256","alg":"none","kid":"hs-1"}"#,
                    &payload(&claims()),
                ),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "header with crit",
                forge_hs(
                    r#"{"alg":"HS256","kid":"hs-1","crit":["b64"],"b64":false}"#,
                    &payload(&claims()),
                ),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "header typ is not JWT",
                forge_hs(
                    r#"{"alg":"HS256","kid":"hs-1","typ":"dpop+jwt"}"#,
                    &payload(&claims()),
                ),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "padded base64 header",
                replace_part(
                    &good_hs,
                    0,
                    &format!("{}=", good_hs.split('.').next().unwrap()),
                ),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "payload is not JSON",
                forge_hs(HS_HEADER, "hello"),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "payload is a JSON array",
                forge_hs(HS_HEADER, "[1,2]"),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "payload repeats exp",
                forge_hs(
                    HS_HEADER,
                    &format!(r#"{{"exp":{},"exp":{}}}"#, NOW - 10_000, NOW + 600),
                ),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "expired",
                hs_token_with(&json!({ "exp": NOW - 61 })),
                opts(),
                VerifyError::Expired,
            ),
            (
                "not yet valid",
                hs_token_with(&json!({ "exp": NOW + 600, "nbf": NOW + 61 })),
                opts(),
                VerifyError::NotYetValid,
            ),
            (
                "missing exp",
                hs_token_with(&json!({ "sub": "x" })),
                opts(),
                VerifyError::MissingClaim("exp"),
            ),
            (
                "exp is a string",
                hs_token_with(&json!({ "exp": "tomorrow" })),
                opts(),
                VerifyError::malformed(""),
            ),
            (
                "wrong issuer",
                hs_token_with(&json!({ "exp": NOW + 600, "iss": "evil" })),
                with_opts(Some("keywarden"), None),
                VerifyError::WrongIssuer,
            ),
            (
                "missing issuer",
                hs_token_with(&json!({ "exp": NOW + 600 })),
                with_opts(Some("keywarden"), None),
                VerifyError::MissingClaim("iss"),
            ),
            (
                "wrong audience (string)",
                hs_token_with(&json!({ "exp": NOW + 600, "aud": "billing" })),
                with_opts(None, Some("api")),
                VerifyError::WrongAudience,
            ),
            (
                "wrong audience (array)",
                hs_token_with(&json!({ "exp": NOW + 600, "aud": ["billing", "mail"] })),
                with_opts(None, Some("api")),
                VerifyError::WrongAudience,
            ),
            (
                "audience present but none configured",
                hs_token_with(&json!({ "exp": NOW + 600, "aud": "api" })),
                opts(),
                VerifyError::WrongAudience,
            ),
            (
                "missing audience",
                hs_token_with(&json!({ "exp": NOW + 600 })),
                with_opts(None, Some("api")),
                VerifyError::MissingClaim("aud"),
            ),
        ];
        let mut table = table;
        for alg in SigningAlg::ALL {
            let good = ring.signer(alg).sign(&claims()).unwrap();
            table.push((
                "tampered signature (every alg)",
                flip_last_signature_byte(&good),
                opts(),
                VerifyError::BadSignature,
            ));
            table.push((
                "another keyring, same kid",
                another_keyring_same_kid(alg),
                opts(),
                VerifyError::BadSignature,
            ));
        }

        for (name, token, opts, expected) in table {
            let got = set().verify(&token, &opts);
            match (&got, &expected) {
                // Malformed reasons are prose; the variant is the contract.
                (Err(VerifyError::Malformed(_)), VerifyError::Malformed(_)) => {}
                _ => assert_eq!(got.as_ref().err(), Some(&expected), "case: {name}"),
            }
        }
    }

    #[test]
    fn exp_and_nbf_boundaries_honour_the_leeway() {
        let at = |claims: Value| set().verify(&hs_token_with(&claims), &opts());
        assert_eq!(
            at(json!({ "exp": NOW - 60 })).err(),
            Some(VerifyError::Expired)
        );
        assert!(at(json!({ "exp": NOW - 59 })).is_ok());
        assert!(at(json!({ "exp": NOW + 600, "nbf": NOW + 60 })).is_ok());
        assert_eq!(
            at(json!({ "exp": NOW + 600, "nbf": NOW + 61 })).err(),
            Some(VerifyError::NotYetValid)
        );
        let strict = VerifyOptions {
            leeway_secs: 0,
            ..opts()
        };
        let token = hs_token_with(&json!({ "exp": NOW + 1 }));
        assert!(set().verify(&token, &strict).is_ok());
        let token = hs_token_with(&json!({ "exp": NOW }));
        assert_eq!(
            set().verify(&token, &strict).err(),
            Some(VerifyError::Expired)
        );
        // Fractional NumericDates are allowed by RFC 7519 and compared exactly.
        let token = hs_token_with(&json!({ "exp": NOW as f64 + 0.5 }));
        assert!(set().verify(&token, &strict).is_ok());
    }

    #[test]
    fn issuer_and_audience_match_when_configured() {
        let opts = VerifyOptions {
            issuer: Some("keywarden".into()),
            audience: Some("api".into()),
            ..opts()
        };
        for aud in [json!("api"), json!(["billing", "api"])] {
            let token = hs_token_with(&json!({ "exp": NOW + 600, "iss": "keywarden", "aud": aud }));
            assert!(set().verify(&token, &opts).is_ok(), "aud {aud}");
        }
    }

    #[test]
    fn check_claims_rejects_non_object_claims() {
        assert!(matches!(
            check_claims(&json!([1]), &opts()),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn token_exactly_at_the_size_cap_is_decoded() {
        let token = set_token_of_len(300);
        let opts = VerifyOptions {
            max_size: token.len(),
            ..opts()
        };
        assert!(set().verify(&token, &opts).is_ok());
        let opts = VerifyOptions {
            max_size: token.len() - 1,
            ..opts
        };
        assert!(matches!(
            set().verify(&token, &opts),
            Err(VerifyError::TooLarge { .. })
        ));
    }

    fn set_token_of_len(min_len: usize) -> String {
        let mut pad = String::new();
        loop {
            let token = hs_token_with(&json!({ "exp": NOW + 600, "pad": pad }));
            if token.len() >= min_len {
                return token;
            }
            pad.push('x');
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_the_old_key_is_retired() {
        let ring = ours();
        let old =
            SigningKey::new("old", SigningAlg::ES256, ring.material(SigningAlg::ES256)).unwrap();
        let new = SigningKey::new(
            "new",
            SigningAlg::ES256,
            other().material(SigningAlg::ES256),
        )
        .unwrap();
        let old_token = old.sign(&claims()).unwrap();
        let new_token = new.sign(&claims()).unwrap();
        let grace = VerifierSet::new([
            (
                "old".to_owned(),
                SigningAlg::ES256,
                KeyUse::Retiring,
                ring.material(SigningAlg::ES256),
            ),
            (
                "new".to_owned(),
                SigningAlg::ES256,
                KeyUse::Active,
                other().material(SigningAlg::ES256),
            ),
        ])
        .unwrap();
        assert_eq!(&*grace.verify(&old_token, &opts()).unwrap().kid, "old");
        assert_eq!(&*grace.verify(&new_token, &opts()).unwrap().kid, "new");
        let after = VerifierSet::new([
            (
                "old".to_owned(),
                SigningAlg::ES256,
                KeyUse::Unusable("retired"),
                &[][..],
            ),
            (
                "new".to_owned(),
                SigningAlg::ES256,
                KeyUse::Active,
                other().material(SigningAlg::ES256),
            ),
        ])
        .unwrap();
        assert_eq!(
            after.verify(&old_token, &opts()).err(),
            Some(VerifyError::KeyNotUsable("retired"))
        );
        assert!(after.verify(&new_token, &opts()).is_ok());
    }

    #[test]
    fn generated_material_has_the_documented_shape_and_is_fresh() {
        let hs = generate_signing_material(SigningAlg::HS256);
        assert_eq!(hs.len(), HMAC_SECRET_LEN);
        assert_ne!(*hs, *generate_signing_material(SigningAlg::HS256));
        for alg in [SigningAlg::RS256, SigningAlg::ES256, SigningAlg::EdDSA] {
            let pem = std::str::from_utf8(ours().material(alg)).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{alg}");
            assert!(pem.ends_with("-----END PRIVATE KEY-----\n"), "{alg}");
            assert!(pem.lines().all(|line| line.len() <= 64), "{alg}");
            assert_ne!(ours().material(alg), other().material(alg));
        }
        let rsa = parse_private_key("k", SigningAlg::RS256, ours().material(SigningAlg::RS256));
        match rsa {
            Ok(PrivateKey::Rsa(pair)) => assert_eq!(pair.public_modulus_len(), 256),
            _ => panic!("RSA material does not parse"),
        }
    }

    #[test]
    fn material_of_the_wrong_kind_is_rejected() {
        let ring = ours();
        let cases: [(SigningAlg, &[u8]); 5] = [
            (SigningAlg::ES256, ring.material(SigningAlg::RS256)),
            (SigningAlg::EdDSA, ring.material(SigningAlg::ES256)),
            (SigningAlg::RS256, ring.material(SigningAlg::EdDSA)),
            (SigningAlg::RS256, ring.material(SigningAlg::HS256)),
            (SigningAlg::HS256, &[1u8; 16]),
        ];
        for (alg, material) in cases {
            assert!(
                matches!(
                    SigningKey::new("k", alg, material),
                    Err(KeyError::InvalidMaterial { .. })
                ),
                "{alg}"
            );
            let set = VerifierSet::new([("k".to_owned(), alg, KeyUse::Active, material)]);
            assert!(
                matches!(set, Err(KeyError::InvalidMaterial { .. })),
                "{alg}"
            );
        }
    }

    #[test]
    fn bad_kids_and_duplicate_kids_are_rejected() {
        let secret = ours().material(SigningAlg::HS256);
        for kid in ["", "has space", "tab\t", &"k".repeat(MAX_KID_LEN + 1)] {
            assert_eq!(
                SigningKey::new(kid, SigningAlg::HS256, secret).err(),
                Some(KeyError::InvalidKid)
            );
        }
        let dup = VerifierSet::new([
            ("k".to_owned(), SigningAlg::HS256, KeyUse::Active, secret),
            ("k".to_owned(), SigningAlg::HS256, KeyUse::Retiring, secret),
        ]);
        assert_eq!(dup.err(), Some(KeyError::DuplicateKid("k".into())));
    }

    #[test]
    fn signing_refuses_claims_that_are_not_an_object() {
        let hs = ours().signer(SigningAlg::HS256);
        assert_eq!(hs.sign(&json!("x")).err(), Some(KeyError::ClaimsNotObject));
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let secret = ours().material(SigningAlg::HS256);
        let hs = ours().signer(SigningAlg::HS256);
        let printed = format!("{hs:?} {:?}", set());
        assert!(printed.contains("[redacted]"));
        assert!(!printed.contains(&b64(secret)));
        assert!(!printed.contains(&hex::encode(secret)));
        let pem = std::str::from_utf8(ours().material(SigningAlg::ES256)).unwrap();
        let body_line = pem.lines().nth(1).unwrap();
        let es = ours().signer(SigningAlg::ES256);
        assert!(!format!("{es:?}").contains(body_line));
    }

    #[test]
    fn jwks_shapes_follow_rfc_7518() {
        let ring = ours();
        let rsa = public_jwk("rs-1", SigningAlg::RS256, ring.material(SigningAlg::RS256))
            .unwrap()
            .unwrap();
        assert_eq!(rsa["kty"], "RSA");
        assert_eq!(rsa["e"], "AQAB");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(rsa["n"].as_str().unwrap())
                .unwrap()
                .len(),
            256
        );
        let ec = public_jwk("es-1", SigningAlg::ES256, ring.material(SigningAlg::ES256))
            .unwrap()
            .unwrap();
        assert_eq!(
            (ec["kty"].as_str(), ec["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        for coordinate in ["x", "y"] {
            assert_eq!(
                URL_SAFE_NO_PAD
                    .decode(ec[coordinate].as_str().unwrap())
                    .unwrap()
                    .len(),
                32
            );
        }
        let ed = public_jwk("ed-1", SigningAlg::EdDSA, ring.material(SigningAlg::EdDSA))
            .unwrap()
            .unwrap();
        assert_eq!(
            (ed["kty"].as_str(), ed["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(ed["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        for (jwk, kid, alg) in [
            (&rsa, "rs-1", "RS256"),
            (&ec, "es-1", "ES256"),
            (&ed, "ed-1", "EdDSA"),
        ] {
            assert_eq!(
                (
                    jwk["kid"].as_str(),
                    jwk["alg"].as_str(),
                    jwk["use"].as_str()
                ),
                (Some(kid), Some(alg), Some("sig"))
            );
            for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                assert!(jwk.get(private).is_none(), "{alg} JWK leaks {private}");
            }
        }
        assert_eq!(
            public_jwk("hs-1", SigningAlg::HS256, ring.material(SigningAlg::HS256)).unwrap(),
            None
        );
    }

    #[test]
    fn jwks_lists_usable_asymmetric_keys_only() {
        let ring = ours();
        let doc = jwks([
            (
                "hs-1",
                SigningAlg::HS256,
                KeyUse::Active,
                ring.material(SigningAlg::HS256),
            ),
            (
                "rs-1",
                SigningAlg::RS256,
                KeyUse::Active,
                ring.material(SigningAlg::RS256),
            ),
            (
                "es-1",
                SigningAlg::ES256,
                KeyUse::Retiring,
                ring.material(SigningAlg::ES256),
            ),
            (
                "ed-1",
                SigningAlg::EdDSA,
                KeyUse::Unusable("revoked"),
                ring.material(SigningAlg::EdDSA),
            ),
        ])
        .unwrap();
        let kids: Vec<&str> = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, ["rs-1", "es-1"]);
    }

    #[test]
    fn signing_alg_parses_its_own_names_and_lists_the_allowed_ones() {
        for alg in SigningAlg::ALL {
            assert_eq!(alg.as_str().parse::<SigningAlg>(), Ok(alg));
            assert_eq!(alg.to_string(), alg.as_str());
        }
        let err = "hs256".parse::<SigningAlg>().unwrap_err().to_string();
        for name in ["HS256", "RS256", "ES256", "EdDSA"] {
            assert!(err.contains(name), "{err}");
        }
        assert!("none".parse::<SigningAlg>().is_err());
    }

    #[test]
    fn error_codes_are_distinct_snake_case() {
        let all = [
            VerifyError::malformed("x"),
            VerifyError::TooLarge { size: 2, max: 1 },
            VerifyError::UnknownKid,
            VerifyError::KeyNotUsable("revoked"),
            VerifyError::AlgorithmMismatch {
                expected: SigningAlg::RS256,
                found: SigningAlg::HS256,
            },
            VerifyError::UnsupportedAlgorithm("none".into()),
            VerifyError::BadSignature,
            VerifyError::Expired,
            VerifyError::NotYetValid,
            VerifyError::MissingClaim("exp"),
            VerifyError::WrongIssuer,
            VerifyError::WrongAudience,
            VerifyError::Revoked,
        ];
        let codes: std::collections::HashSet<&str> = all.iter().map(VerifyError::code).collect();
        assert_eq!(codes.len(), all.len());
        assert!(
            codes
                .iter()
                .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
    }

    #[test]
    fn unsupported_algorithm_names_are_sanitised_before_reporting() {
        let token = forge_hs(r#"{"alg":"x\n<script>","kid":"hs-1"}"#, &payload(&claims()));
        assert_eq!(
            set().verify(&token, &opts()).err(),
            Some(VerifyError::UnsupportedAlgorithm("(unprintable)".into()))
        );
    }

    #[test]
    fn headers_written_by_our_signer_take_the_precomputed_path() {
        for alg in SigningAlg::ALL {
            let token = ours().signer(alg).sign(&claims()).unwrap();
            let header_b64 = token.split('.').next().unwrap();
            let own = set()
                .own_headers
                .iter()
                .find(|own| own.encoded == header_b64)
                .expect("our header is precomputed");
            let entry = &set().entries[own.position];
            assert_eq!((&*entry.kid, entry.alg), (kid_of(alg), alg));
            assert_eq!(own.midstate.is_some(), alg == SigningAlg::HS256);
        }
    }

    #[test]
    fn hmac_midstate_agrees_with_the_whole_input_hmac() {
        // Payload lengths that put the end of the signing input on both sides of every SHA-256
        // block boundary; each token verifies through the midstate (own header) and through the
        // plain path (the same header JSON with its members in another order), and a flipped
        // payload or signature byte fails on both.
        let ring = ours();
        let signer = ring.signer(SigningAlg::HS256);
        let reordered = format!(
            r#"{{"alg":"HS256","kid":"{}","typ":"JWT"}}"#,
            kid_of(SigningAlg::HS256)
        );
        for filler in 0..200 {
            let mut claims = claims();
            claims["pad"] = json!("x".repeat(filler));
            let own = signer.sign(&claims).unwrap();
            let plain = forge_hs(&reordered, &payload(&claims));
            assert!(set().verify(&own, &opts()).is_ok(), "filler {filler}");
            assert!(set().verify(&plain, &opts()).is_ok(), "filler {filler}");
            for token in [&own, &plain] {
                let (input, _) = token.rsplit_once('.').unwrap();
                let (header, payload_b64) = input.split_once('.').unwrap();
                let mut bytes = URL_SAFE_NO_PAD.decode(payload_b64).unwrap();
                *bytes.last_mut().unwrap() ^= 0x01;
                let tampered = replace_part(token, 1, &b64(&bytes));
                assert_eq!(
                    set().verify(&tampered, &opts()).err(),
                    Some(VerifyError::BadSignature),
                    "{header} filler {filler}"
                );
                assert_eq!(
                    set()
                        .verify(&flip_last_signature_byte(token), &opts())
                        .err(),
                    Some(VerifyError::BadSignature)
                );
            }
        }
    }

    #[test]
    fn hmac_midstate_covers_header_bytes_after_the_first_block() {
        // Two keys with the same secret whose encoded headers share their first 64 bytes (one
        // SHA-256 block) and differ after it: a token signed under one header must not verify
        // with its header swapped for the other, although the midstates agree on block one.
        let secret = ours().material(SigningAlg::HS256);
        let stem = "k".repeat(60);
        let (kid_a, kid_b) = (format!("{stem}-a"), format!("{stem}-b"));
        let set = VerifierSet::new([
            (kid_a.clone(), SigningAlg::HS256, KeyUse::Active, secret),
            (kid_b.clone(), SigningAlg::HS256, KeyUse::Retiring, secret),
        ])
        .unwrap();
        let (header_a, header_b) = (
            signed_header_b64(&kid_a, SigningAlg::HS256),
            signed_header_b64(&kid_b, SigningAlg::HS256),
        );
        assert_eq!(header_a.as_bytes()[..64], header_b.as_bytes()[..64]);
        assert_ne!(header_a, header_b);
        let token_a = SigningKey::new(&kid_a, SigningAlg::HS256, secret)
            .unwrap()
            .sign(&claims())
            .unwrap();
        assert_eq!(&*set.verify(&token_a, &opts()).unwrap().kid, kid_a);
        let swapped = replace_part(&token_a, 0, &header_b);
        assert_eq!(
            set.verify(&swapped, &opts()).err(),
            Some(VerifyError::BadSignature)
        );
        // Any single changed header byte leaves the own-header path or breaks the signature.
        for at in 0..header_a.len() {
            let mut header = header_a.clone().into_bytes();
            header[at] = if header[at] == b'A' { b'B' } else { b'A' };
            let tampered = replace_part(&token_a, 0, std::str::from_utf8(&header).unwrap());
            assert!(set.verify(&tampered, &opts()).is_err(), "byte {at}");
        }
    }

    #[test]
    fn exactly_two_dots_make_three_parts() {
        for (token, dots) in [
            ("", None),
            ("a.b", None),
            ("a.b.c", Some((1, 3))),
            ("..", Some((0, 1))),
            ("a.b.c.d", None),
            ("...", None),
        ] {
            assert_eq!(two_dots(token.as_bytes()), dots, "{token:?}");
        }
        // Dots on both sides of the sixteen- and 64-byte steps, and a third one far away.
        for len in (0..70).chain([127, 128, 129, 135]) {
            for first in 0..len {
                for second in first + 1..len {
                    let mut token = vec![b'x'; len];
                    token[first] = b'.';
                    token[second] = b'.';
                    assert_eq!(two_dots(&token), Some((first, second)));
                    for third in (0..len).filter(|&t| t != first && t != second).step_by(7) {
                        let mut more = token.clone();
                        more[third] = b'.';
                        assert_eq!(two_dots(&more), None);
                    }
                }
            }
        }
    }

    #[test]
    fn token_signed_by_pyjwt_verifies() {
        // A fixed vector from PyJWT 2.15: jwt.encode({"sub": "py", "exp": 1750000600},
        // bytes(range(32)), algorithm="HS256", headers={"kid": "py-hs"}).
        const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsImtpZCI6InB5LWhzIiwidHlwIjoiSldUIn0.\
            eyJzdWIiOiJweSIsImV4cCI6MTc1MDAwMDYwMH0.O7SRBQy3TS6PTi83231XyT76PxPz8ozNay2i1sOEPGs";
        let secret: Vec<u8> = (0u8..32).collect();
        let set = VerifierSet::new([(
            "py-hs".to_owned(),
            SigningAlg::HS256,
            KeyUse::Active,
            &secret[..],
        )])
        .unwrap();
        let verified = set.verify(TOKEN, &opts()).unwrap();
        assert_eq!(
            verified.claims,
            json!({ "sub": "py", "exp": 1_750_000_600 })
        );
        let later = VerifyOptions::new(1_750_000_600 + 60);
        assert_eq!(set.verify(TOKEN, &later).err(), Some(VerifyError::Expired));
    }
}
