//! Encrypted tokens: compact JWE (RFC 7516) with `alg: "dir"` and `enc: "A256GCM"`.
//!
//! Some tokens carry claims their bearer must not read. keywarden encrypts those directly with a
//! 256-bit token-encryption key from the keyring (its own purpose, rotated with the signing
//! keys); the kid in the protected header tells the receiver which key to use, so rotation works
//! like it does for signing keys. The AEAD is aws-lc-rs AES-256-GCM; this module only does the
//! JOSE framing, exactly as RFC 7516 §5.1 and §7.1 put it:
//!
//! ```text
//! BASE64URL(UTF8(protected header)) . "" . BASE64URL(IV) . BASE64URL(ciphertext) . BASE64URL(tag)
//! ```
//!
//! with the ASCII of the encoded protected header as additional authenticated data, an empty
//! encrypted-key part (`dir`), and a fresh random 96-bit IV per token. Random IVs are safe for
//! about 2^32 tokens per key, far beyond one key's life between rotations.
//!
//! Decryption returns the claims without judging them; [`decrypt_and_check`] (or the caller,
//! with [`check_claims`]) applies the same claim checks as JWS verification.

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::crypto::jose::{
    KeyUse, VerifyError, VerifyOptions, check_claims, decode_b64, is_valid_kid, parse_claims,
    parse_jose_header, printable_alg,
};

/// Length of a token-encryption key, in bytes.
pub const KEY_LEN: usize = 32;

/// Length of the AES-GCM authentication tag, in bytes.
const TAG_LEN: usize = 16;

/// Errors from encrypting a token. Messages never include key bytes or claims.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum JweError {
    /// The key is not exactly 32 bytes.
    #[error("token-encryption key must be {KEY_LEN} bytes")]
    InvalidKeyLength,
    /// The kid is not 1 to 256 visible ASCII characters.
    #[error("key id must be 1 to 256 visible ASCII characters")]
    InvalidKid,
    /// Claims to encrypt must be a JSON object.
    #[error("claims must be a JSON object")]
    ClaimsNotObject,
    /// The AEAD failed (it does not for a valid key; kept so that nothing panics).
    #[error("encryption failed")]
    Encryption,
}

/// The protected header keywarden writes, in this member order.
#[derive(Serialize)]
struct ProtectedHeader<'a> {
    alg: &'static str,
    enc: &'static str,
    kid: &'a str,
    typ: &'static str,
}

/// Encrypts `claims` (a JSON object) for the token-encryption key `kid` into a compact JWE.
pub fn encrypt(kid: &str, key: &[u8], claims: &Value) -> Result<String, JweError> {
    if key.len() != KEY_LEN {
        return Err(JweError::InvalidKeyLength);
    }
    if !is_valid_kid(kid) {
        return Err(JweError::InvalidKid);
    }
    if !claims.is_object() {
        return Err(JweError::ClaimsNotObject);
    }
    let header = ProtectedHeader {
        alg: "dir",
        enc: "A256GCM",
        kid,
        typ: "JWT",
    };
    let header_json = serde_json::to_vec(&header).map_err(|_| JweError::Encryption)?;
    let header_b64 = URL_SAFE_NO_PAD.encode(header_json);

    // The plaintext claims are what the token hides, so they are wiped once sealed.
    let mut buffer = Zeroizing::new(serde_json::to_vec(claims).map_err(|_| JweError::Encryption)?);
    let sealing_key =
        RandomizedNonceKey::new(&AES_256_GCM, key).map_err(|_| JweError::InvalidKeyLength)?;
    let (nonce, tag) = sealing_key
        .seal_in_place_separate_tag(Aad::from(header_b64.as_bytes()), &mut buffer[..])
        .map_err(|_| JweError::Encryption)?;

    let mut token = header_b64;
    token.push_str("..");
    URL_SAFE_NO_PAD.encode_string(nonce.as_ref(), &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&buffer[..], &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut token);
    Ok(token)
}

/// Decrypts a compact JWE and returns its kid and claims (a JSON object), without checking the
/// claims. `lookup` maps a kid to the key's state and its 32 key bytes; it is only a lookup.
///
/// Errors: [`VerifyError::TooLarge`] past `max_size`; [`VerifyError::Malformed`] for anything but
/// five parts with an empty encrypted key, a 96-bit IV and a 128-bit tag;
/// [`VerifyError::UnsupportedAlgorithm`] for anything but `dir` + `A256GCM`;
/// [`VerifyError::UnknownKid`] / [`VerifyError::KeyNotUsable`] from the lookup; and
/// [`VerifyError::BadSignature`] when the tag does not authenticate (wrong key, any tampering).
pub fn decrypt<'k>(
    token: &str,
    lookup: impl Fn(&str) -> Option<(KeyUse, &'k [u8])>,
    max_size: usize,
) -> Result<(String, Value), VerifyError> {
    if token.len() > max_size {
        return Err(VerifyError::TooLarge {
            size: token.len(),
            max: max_size,
        });
    }
    let mut parts = token.split('.');
    let (
        Some(header_b64),
        Some(encrypted_key),
        Some(iv_b64),
        Some(ciphertext_b64),
        Some(tag_b64),
        None,
    ) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    )
    else {
        return Err(VerifyError::Malformed(
            "a JWE has exactly five dot-separated parts".into(),
        ));
    };

    let header_json = decode_b64(header_b64, "protected header")?;
    let header = parse_jose_header(&header_json)?;
    if header.alg != "dir" || header.enc.as_deref() != Some("A256GCM") {
        let enc = header.enc.as_deref().unwrap_or("");
        return Err(VerifyError::UnsupportedAlgorithm(format!(
            "{}/{}",
            printable_alg(&header.alg),
            printable_alg(enc)
        )));
    }
    if header.zip {
        return Err(VerifyError::Malformed(
            "compressed JWE is not accepted".into(),
        ));
    }
    if !encrypted_key.is_empty() {
        return Err(VerifyError::Malformed(
            "dir JWE has a non-empty encrypted key".into(),
        ));
    }
    let iv = decode_b64(iv_b64, "IV")?;
    let nonce = Nonce::try_assume_unique_for_key(&iv)
        .map_err(|_| VerifyError::Malformed(format!("IV is not {NONCE_LEN} bytes")))?;
    let tag = decode_b64(tag_b64, "tag")?;
    if tag.len() != TAG_LEN {
        return Err(VerifyError::Malformed(format!(
            "tag is not {TAG_LEN} bytes"
        )));
    }

    let (state, key) = lookup(&header.kid).ok_or(VerifyError::UnknownKid)?;
    if let KeyUse::Unusable(state) = state {
        return Err(VerifyError::KeyNotUsable(state));
    }
    // A wrong-length key is a keyring fault, not the token's; refuse the key rather than guess.
    if key.len() != KEY_LEN {
        return Err(VerifyError::KeyNotUsable("invalid"));
    }
    let opening_key = RandomizedNonceKey::new(&AES_256_GCM, key)
        .map_err(|_| VerifyError::KeyNotUsable("invalid"))?;

    let mut buffer = Zeroizing::new(decode_b64(ciphertext_b64, "ciphertext")?);
    buffer.extend_from_slice(&tag);
    let plaintext = opening_key
        .open_in_place(nonce, Aad::from(header_b64.as_bytes()), &mut buffer[..])
        .map_err(|_| VerifyError::BadSignature)?;
    let claims = parse_claims(plaintext)?;
    Ok((header.kid.into_owned(), claims))
}

/// [`decrypt`] with `opts.max_size`, then [`check_claims`] against `opts`: the same claim rules
/// as a signed token.
pub fn decrypt_and_check<'k>(
    token: &str,
    lookup: impl Fn(&str) -> Option<(KeyUse, &'k [u8])>,
    opts: &VerifyOptions,
) -> Result<(String, Value), VerifyError> {
    let (kid, claims) = decrypt(token, lookup, opts.max_size)?;
    check_claims(&claims, opts)?;
    Ok((kid, claims))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crypto::jose::DEFAULT_MAX_TOKEN_SIZE;

    const NOW: i64 = 1_750_000_000;
    const KEY: [u8; 32] = [0x42; 32];
    const OTHER_KEY: [u8; 32] = [0x24; 32];

    fn claims() -> Value {
        json!({ "sub": "user-7", "exp": NOW + 600, "scope": "read" })
    }

    fn keyring(kid: &str) -> Option<(KeyUse, &'static [u8])> {
        match kid {
            "enc-1" => Some((KeyUse::Active, &KEY[..])),
            "enc-old" => Some((KeyUse::Retiring, &OTHER_KEY[..])),
            "enc-revoked" => Some((KeyUse::Unusable("revoked"), &KEY[..])),
            "enc-short" => Some((KeyUse::Active, &KEY[..16])),
            _ => None,
        }
    }

    fn open(token: &str) -> Result<(String, Value), VerifyError> {
        decrypt(token, keyring, DEFAULT_MAX_TOKEN_SIZE)
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn part(token: &str, index: usize) -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(token.split('.').nth(index).unwrap())
            .unwrap()
    }

    fn replace_part(token: &str, index: usize, value: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = value;
        parts.join(".")
    }

    fn flip(token: &str, index: usize) -> String {
        let mut bytes = part(token, index);
        bytes[0] ^= 0x80;
        replace_part(token, index, &b64(&bytes))
    }

    #[test]
    fn encrypted_claims_round_trip() {
        let token = encrypt("enc-1", &KEY, &claims()).unwrap();
        assert_eq!(open(&token).unwrap(), ("enc-1".to_owned(), claims()));
        let opts = VerifyOptions::new(NOW);
        assert_eq!(
            decrypt_and_check(&token, keyring, &opts).unwrap().1,
            claims()
        );
    }

    #[test]
    fn retiring_key_still_decrypts() {
        let token = encrypt("enc-old", &OTHER_KEY, &claims()).unwrap();
        assert_eq!(open(&token).unwrap().0, "enc-old");
    }

    #[test]
    fn token_has_the_rfc_7516_compact_shape() {
        let token = encrypt("enc-1", &KEY, &claims()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 5);
        assert_eq!(parts[1], "", "dir has an empty encrypted key");
        let header: Value = serde_json::from_slice(&part(&token, 0)).unwrap();
        assert_eq!(
            header,
            json!({ "alg": "dir", "enc": "A256GCM", "kid": "enc-1", "typ": "JWT" })
        );
        assert_eq!(part(&token, 2).len(), 12);
        assert_eq!(part(&token, 4).len(), 16);
        assert_eq!(
            part(&token, 3).len(),
            serde_json::to_vec(&claims()).unwrap().len()
        );
        assert!(!token.contains("user-7"));
    }

    #[test]
    fn each_token_gets_a_fresh_iv() {
        let a = encrypt("enc-1", &KEY, &claims()).unwrap();
        let b = encrypt("enc-1", &KEY, &claims()).unwrap();
        assert_ne!(part(&a, 2), part(&b, 2));
        assert_ne!(a, b);
    }

    #[test]
    fn the_header_is_authenticated_as_its_base64_text() {
        // Same header members, different encoding (extra whitespace): the AAD changes, so the tag
        // no longer verifies even though the parsed header is identical.
        let token = encrypt("enc-1", &KEY, &claims()).unwrap();
        let respaced = br#"{"alg": "dir","enc":"A256GCM","kid":"enc-1","typ":"JWT"}"#;
        assert_eq!(
            open(&replace_part(&token, 0, &b64(respaced))),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn tampering_anywhere_fails_authentication() {
        let token = encrypt("enc-1", &KEY, &claims()).unwrap();
        for index in [2, 3, 4] {
            assert_eq!(
                open(&flip(&token, index)),
                Err(VerifyError::BadSignature),
                "part {index}"
            );
        }
    }

    #[test]
    fn wrong_key_and_foreign_keyring_fail_authentication() {
        let token = encrypt("enc-1", &OTHER_KEY, &claims()).unwrap();
        assert_eq!(open(&token), Err(VerifyError::BadSignature));
    }

    #[test]
    fn each_bad_jwe_gets_its_specific_error() {
        let good = encrypt("enc-1", &KEY, &claims()).unwrap();
        let header = |json: &str| replace_part(&good, 0, &b64(json.as_bytes()));
        let too_large = format!("{good}{}", "A".repeat(DEFAULT_MAX_TOKEN_SIZE));
        let cases: Vec<(&str, String, VerifyError)> = vec![
            (
                "four parts",
                good.rsplit_once('.').unwrap().0.to_owned(),
                VerifyError::Malformed(String::new()),
            ),
            (
                "six parts",
                format!("{good}.AAAA"),
                VerifyError::Malformed(String::new()),
            ),
            (
                "a JWS",
                "a.b.c".into(),
                VerifyError::Malformed(String::new()),
            ),
            (
                "too large",
                too_large.clone(),
                VerifyError::TooLarge {
                    size: too_large.len(),
                    max: DEFAULT_MAX_TOKEN_SIZE,
                },
            ),
            (
                "non-JSON header",
                header("nope"),
                VerifyError::Malformed(String::new()),
            ),
            (
                "key wrapping alg",
                header(r#"{"alg":"A256KW","enc":"A256GCM","kid":"enc-1"}"#),
                VerifyError::UnsupportedAlgorithm("A256KW/A256GCM".into()),
            ),
            (
                "other content encryption",
                header(r#"{"alg":"dir","enc":"A128GCM","kid":"enc-1"}"#),
                VerifyError::UnsupportedAlgorithm("dir/A128GCM".into()),
            ),
            (
                "missing enc",
                header(r#"{"alg":"dir","kid":"enc-1"}"#),
                VerifyError::UnsupportedAlgorithm("dir/".into()),
            ),
            (
                "alg none",
                header(r#"{"alg":"none","enc":"A256GCM","kid":"enc-1"}"#),
                VerifyError::UnsupportedAlgorithm("none/A256GCM".into()),
            ),
            (
                "compressed",
                header(r#"{"alg":"dir","enc":"A256GCM","kid":"enc-1","zip":"DEF"}"#),
                VerifyError::Malformed(String::new()),
            ),
            (
                "critical extension",
                header(r#"{"alg":"dir","enc":"A256GCM","kid":"enc-1","crit":["exp"],"exp":1}"#),
                VerifyError::Malformed(String::new()),
            ),
            (
                "no kid",
                header(r#"{"alg":"dir","enc":"A256GCM"}"#),
                VerifyError::Malformed(String::new()),
            ),
            (
                "encrypted key present",
                replace_part(&good, 1, "AAAA"),
                VerifyError::Malformed(String::new()),
            ),
            (
                "short IV",
                replace_part(&good, 2, &b64(&[0; 8])),
                VerifyError::Malformed(String::new()),
            ),
            (
                "short tag",
                replace_part(&good, 4, &b64(&[0; 12])),
                VerifyError::Malformed(String::new()),
            ),
            (
                "bad base64 ciphertext",
                replace_part(&good, 3, "!!!!"),
                VerifyError::Malformed(String::new()),
            ),
            (
                "unknown kid",
                encrypt("enc-ghost", &KEY, &claims()).unwrap(),
                VerifyError::UnknownKid,
            ),
            (
                "revoked key",
                encrypt("enc-revoked", &KEY, &claims()).unwrap(),
                VerifyError::KeyNotUsable("revoked"),
            ),
            (
                "keyring holds a short key",
                encrypt("enc-short", &KEY, &claims()).unwrap(),
                VerifyError::KeyNotUsable("invalid"),
            ),
        ];
        for (name, token, expected) in cases {
            let got = open(&token);
            match (&got, &expected) {
                (Err(VerifyError::Malformed(_)), VerifyError::Malformed(_)) => {}
                _ => assert_eq!(got.as_ref().err(), Some(&expected), "case: {name}"),
            }
        }
    }

    #[test]
    fn decrypted_claims_get_the_jws_claim_checks() {
        let expired = encrypt("enc-1", &KEY, &json!({ "exp": NOW - 61 })).unwrap();
        let opts = VerifyOptions::new(NOW);
        assert_eq!(
            decrypt_and_check(&expired, keyring, &opts),
            Err(VerifyError::Expired)
        );
        let no_exp = encrypt("enc-1", &KEY, &json!({ "sub": "x" })).unwrap();
        assert_eq!(
            decrypt_and_check(&no_exp, keyring, &opts),
            Err(VerifyError::MissingClaim("exp"))
        );
    }

    #[test]
    fn encrypt_rejects_bad_inputs() {
        assert_eq!(
            encrypt("enc-1", &KEY[..31], &claims()),
            Err(JweError::InvalidKeyLength)
        );
        assert_eq!(encrypt("", &KEY, &claims()), Err(JweError::InvalidKid));
        assert_eq!(
            encrypt("enc-1", &KEY, &json!([1])),
            Err(JweError::ClaimsNotObject)
        );
    }

    #[test]
    fn token_encrypted_by_jwcrypto_decrypts() {
        // A fixed vector from jwcrypto 1.6: JWE(b'{"sub": "py", "exp": 1750000600}',
        // protected='{"alg":"dir","enc":"A256GCM","kid":"py-enc"}') for the key bytes(range(32)).
        const TOKEN: &str = "eyJhbGciOiAiZGlyIiwgImVuYyI6ICJBMjU2R0NNIiwgImtpZCI6ICJweS1lbmMifQ..\
            qcJ7GoQm6dLQVy5y.b8KQI5qAeacSa03X_SzSIOl0Y4kz1lzKjFvxUl42_-E.P-7SK4cO1LjCFj9CW01RVg";
        let key: Vec<u8> = (0u8..32).collect();
        let lookup = |kid: &str| (kid == "py-enc").then_some((KeyUse::Active, &key[..]));
        let (kid, claims) = decrypt(TOKEN, lookup, DEFAULT_MAX_TOKEN_SIZE).unwrap();
        assert_eq!(kid, "py-enc");
        assert_eq!(claims, json!({ "sub": "py", "exp": 1_750_000_600 }));
    }
}
