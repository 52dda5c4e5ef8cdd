//! Tokens and API keys through the keyring: JWS signing with the active
//! signing key, verification against active and retiring keys (RFC 8725
//! rules live in `crypto::jose`), JWE with the token-encryption key, the
//! token denylist, JWKS, and keywarden's own API keys.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

use super::App;
use crate::crypto::jose::{self, KeyUse, SigningKey, VerifierSet, VerifyError, VerifyOptions};
use crate::crypto::{self, KeyMaterial, jwe};
use crate::error::UsageError;
use crate::keyring::{Algorithm, KeyState, Purpose};
use crate::store::keys::StoredKey;
use crate::store::tokens::ApiKeyRow;

/// A freshly issued token.
#[derive(Debug, serde::Serialize)]
pub struct Issued {
    pub token: String,
    pub kid: String,
    pub alg: String,
    pub jti: String,
    pub expires_at: DateTime<Utc>,
}

/// How the keyring state maps to what a token key may do.
pub fn key_use(state: KeyState) -> KeyUse {
    match state {
        KeyState::Active => KeyUse::Active,
        KeyState::Retiring => KeyUse::Retiring,
        KeyState::Pending => KeyUse::Unusable("pending"),
        KeyState::Retired => KeyUse::Unusable("retired"),
        KeyState::Revoked => KeyUse::Unusable("revoked"),
        KeyState::Destroyed => KeyUse::Unusable("destroyed"),
    }
}

/// An API key's parts: `kw_<id>_<secret>`; the id is the non-secret prefix.
pub const API_KEY_PREFIX: &str = "kw_";

/// Why an API key was refused (distinct reasons, exit 3).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiKeyError {
    #[error("not a keywarden API key")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("API key {0} has been revoked")]
    Revoked(String),
    #[error("API key {0} has expired")]
    Expired(String),
}

impl App {
    /// Verification options from config, at `now`, with optional overrides.
    pub fn verify_options(
        &self,
        now: DateTime<Utc>,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> VerifyOptions {
        let t = &self.config.tokens;
        VerifyOptions {
            now_unix: now.timestamp(),
            leeway_secs: t.leeway.as_secs() as i64,
            max_size: t.max_size,
            issuer: issuer.or(t.issuer()).map(str::to_string),
            audience: audience.or(t.audience()).map(str::to_string),
        }
    }

    /// Signing keys with their material (none for unusable ones).
    async fn signing_keys(&self) -> anyhow::Result<Vec<(StoredKey, Option<KeyMaterial>)>> {
        let keys = self.store.list_keys(Some(Purpose::Signing)).await?;
        keys.into_iter()
            .map(|k| {
                let material = if k.meta.state.can_verify_or_decrypt() {
                    Some(self.unwrap_key(&k)?)
                } else {
                    None
                };
                Ok((k, material))
            })
            .collect()
    }

    /// A verifier over every signing key: active and retiring ones verify,
    /// the rest are named so their tokens fail with "key not usable".
    pub async fn verifier(&self) -> anyhow::Result<VerifierSet> {
        let keys = self.signing_keys().await?;
        let mut entries = Vec::with_capacity(keys.len());
        for (k, material) in &keys {
            entries.push((
                k.meta.kid.clone(),
                crypto::signing_alg(k.meta.algorithm)?,
                key_use(k.meta.state),
                material.as_ref().map_or(&[][..], |m| m.expose()),
            ));
        }
        Ok(VerifierSet::new(entries)?)
    }

    /// Adds the standard claims: iat, exp from `ttl`, jti, and iss/aud
    /// from config when set (explicit claims win).
    fn standard_claims(
        &self,
        claims: Value,
        ttl: TimeDelta,
        now: DateTime<Utc>,
    ) -> anyhow::Result<(Value, String, DateTime<Utc>)> {
        let Value::Object(mut map) = claims else {
            return Err(UsageError("--claims must be a JSON object".into()).into());
        };
        let exp = now + ttl;
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let defaults: [(&str, Value); 3] = [
            ("iat", now.timestamp().into()),
            ("exp", exp.timestamp().into()),
            ("jti", jti.clone().into()),
        ];
        for (k, v) in defaults {
            map.entry(k).or_insert(v);
        }
        if let Some(iss) = self.config.tokens.issuer() {
            map.entry("iss").or_insert(iss.into());
        }
        if let Some(aud) = self.config.tokens.audience() {
            map.entry("aud").or_insert(aud.into());
        }
        let jti = map
            .get("jti")
            .and_then(Value::as_str)
            .map_or(jti, str::to_string);
        let exp = map
            .get("exp")
            .and_then(Value::as_i64)
            .and_then(|e| DateTime::from_timestamp(e, 0))
            .unwrap_or(exp);
        Ok((Value::Object(map), jti, exp))
    }

    /// Signs `claims` with the active signing key.
    pub async fn sign_token(
        &self,
        claims: Value,
        ttl: TimeDelta,
        alg: Option<Algorithm>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Issued> {
        let keys = self.store.list_keys(Some(Purpose::Signing)).await?;
        let active = keys
            .iter()
            .find(|k| k.meta.state == KeyState::Active)
            .ok_or_else(|| {
                anyhow::anyhow!("there is no active signing key: run `keywarden init`")
            })?;
        if let Some(alg) = alg
            && alg != active.meta.algorithm
        {
            return Err(UsageError(format!(
                "the active signing key {} is {}, not {alg}; set policy.signing.algorithm = \"{alg}\" \
                 and run `keywarden keys rotate signing` to sign with {alg}",
                active.meta.kid, active.meta.algorithm
            ))
            .into());
        }
        let (claims, jti, expires_at) = self.standard_claims(claims, ttl, now)?;
        let material = self.unwrap_key(active)?;
        let alg = crypto::signing_alg(active.meta.algorithm)?;
        let signer = SigningKey::new(&active.meta.kid, alg, material.expose())?;
        let token = signer.sign(&claims)?;
        Ok(Issued {
            token,
            kid: active.meta.kid.clone(),
            alg: alg.as_str().to_string(),
            jti,
            expires_at,
        })
    }

    /// Verifies a JWS: keys, algorithm pinning, claims, then the denylist.
    pub async fn verify_token(
        &self,
        token: &str,
        opts: &VerifyOptions,
    ) -> anyhow::Result<Result<jose::Verified, VerifyError>> {
        let verifier = self.verifier().await?;
        let verified = match verifier.verify(token, opts) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(jti) = verified.claims.jti()
            && self.store.is_token_denied(jti, opts.now_unix).await?
        {
            return Ok(Err(VerifyError::Revoked));
        }
        Ok(Ok(verified))
    }

    /// Encrypts `claims` as a compact JWE (dir + A256GCM) with the active
    /// token-encryption key.
    pub async fn encrypt_token(
        &self,
        claims: Value,
        ttl: TimeDelta,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Issued> {
        let keys = self.store.list_keys(Some(Purpose::TokenEncryption)).await?;
        let active = keys
            .iter()
            .find(|k| k.meta.state == KeyState::Active)
            .ok_or_else(|| {
                anyhow::anyhow!("there is no active token-encryption key: run `keywarden init`")
            })?;
        let (claims, jti, expires_at) = self.standard_claims(claims, ttl, now)?;
        let material = self.unwrap_key(active)?;
        let token = jwe::encrypt(&active.meta.kid, material.expose(), &claims)?;
        Ok(Issued {
            token,
            kid: active.meta.kid.clone(),
            alg: "dir+A256GCM".into(),
            jti,
            expires_at,
        })
    }

    /// Decrypts a JWE and checks its claims and the denylist.
    pub async fn decrypt_jwe(
        &self,
        token: &str,
        opts: &VerifyOptions,
    ) -> anyhow::Result<Result<(String, Value), VerifyError>> {
        let keys = self.store.list_keys(Some(Purpose::TokenEncryption)).await?;
        let mut usable: Vec<(String, KeyUse, Option<KeyMaterial>)> = Vec::new();
        for k in &keys {
            let material = if k.meta.state.can_verify_or_decrypt() {
                Some(self.unwrap_key(k)?)
            } else {
                None
            };
            usable.push((k.meta.kid.clone(), key_use(k.meta.state), material));
        }
        let lookup = |kid: &str| {
            usable
                .iter()
                .find(|(k, _, _)| k == kid)
                .map(|(_, u, m)| (*u, m.as_ref().map_or(&[][..], |m| m.expose())))
        };
        let (kid, claims) = match jwe::decrypt_and_check(token, lookup, opts) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(jti) = claims.get("jti").and_then(Value::as_str)
            && self.store.is_token_denied(jti, opts.now_unix).await?
        {
            return Ok(Err(VerifyError::Revoked));
        }
        Ok(Ok((kid, claims)))
    }

    /// Puts a token (or a bare jti) on the denylist until its expiry. A
    /// whole token is verified first, so only a genuine token's jti and exp
    /// are trusted; a bare jti is denied for the longest token lifetime.
    pub async fn revoke_token(
        &self,
        token_or_jti: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<(String, DateTime<Utc>)> {
        let s = token_or_jti.trim();
        let (jti, kid, exp) = if s.contains('.') {
            // Verify ignoring expiry-related failures: revoking an expired
            // token is a no-op, revoking a forged one is refused.
            let opts = self.verify_options(now, None, None);
            let claims = match self.verify_token(s, &opts).await? {
                Ok(v) => (v.claims.into_value(), v.kid.to_string()),
                Err(VerifyError::Revoked) => {
                    return Err(UsageError("this token is already revoked".into()).into());
                }
                Err(e) => {
                    return Err(UsageError(format!(
                        "cannot revoke this token: it does not verify ({e})"
                    ))
                    .into());
                }
            };
            let jti = claims
                .0
                .get("jti")
                .and_then(Value::as_str)
                .ok_or_else(|| UsageError("the token has no jti claim to revoke".into()))?
                .to_string();
            let exp = claims.0.get("exp").and_then(Value::as_i64).unwrap_or(0);
            (jti, claims.1, exp)
        } else {
            if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
                return Err(
                    UsageError("a jti must be 1 to 256 printable characters".into()).into(),
                );
            }
            let longest = self
                .config
                .tokens
                .default_ttl
                .to_chrono()
                .max(self.policy.signing.grace)
                + self.policy.signing.rotate_after;
            (s.to_string(), String::new(), (now + longest).timestamp())
        };
        // Keep the entry past exp by the leeway, since verification accepts
        // a token that long after it expires.
        let until = exp + self.config.tokens.leeway.as_secs() as i64;
        self.store
            .deny_token(&jti, &kid, until, now.timestamp())
            .await?;
        self.store.prune_denylist(now.timestamp()).await?;
        Ok((jti, DateTime::from_timestamp(until, 0).unwrap_or_default()))
    }

    /// Public signing keys of active and retiring asymmetric keys.
    pub async fn jwks(&self) -> anyhow::Result<Value> {
        let keys = self.signing_keys().await?;
        let mut entries = Vec::new();
        for (k, material) in &keys {
            if let Some(m) = material {
                entries.push((
                    k.meta.kid.as_str(),
                    crypto::signing_alg(k.meta.algorithm)?,
                    key_use(k.meta.state),
                    m.expose(),
                ));
            }
        }
        Ok(jose::jwks(entries)?)
    }

    /// Creates an API key; returns the row and the key (shown once).
    pub async fn create_api_key(
        &self,
        name: &str,
        scopes: &[String],
        ttl: Option<TimeDelta>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<(ApiKeyRow, zeroize::Zeroizing<String>)> {
        use base64::Engine;
        if name.trim().is_empty() || name.len() > 128 {
            return Err(UsageError("--name must be 1 to 128 characters".into()).into());
        }
        for s in scopes {
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_:-.*".contains(&b))
            {
                return Err(UsageError(format!(
                    "scope {s:?} is not valid (letters, digits and _ : - . * only, e.g. keys:rotate)"
                ))
                .into());
            }
        }
        // The store keeps whole seconds; report what is stored.
        let now = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
        let id = hex::encode(crypto::random_array::<6>());
        let secret = zeroize::Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crypto::random_array::<32>()),
        );
        let key = zeroize::Zeroizing::new(format!("{API_KEY_PREFIX}{id}_{}", &*secret));
        let row = ApiKeyRow {
            id,
            hash: hex::encode(crypto::sha256(key.as_bytes())),
            name: name.to_string(),
            scopes: scopes.to_vec(),
            created_at: now,
            expires_at: ttl.map(|t| now + t),
            revoked_at: None,
            last_used_at: None,
        };
        // Audit first: if the row cannot be written, no key is made.
        let name_hmac = self.redact(name).await?;
        self.audit_now(
            vec![crate::audit::events::apikey_created(
                &row.id,
                &name_hmac,
                &row.scopes,
                row.expires_at.map(|t| t.timestamp()),
            )],
            now,
        )
        .await?;
        self.store.insert_api_key(&row).await?;
        Ok((row, key))
    }

    /// Checks an API key: constant-time hash comparison, then revocation
    /// and expiry. Returns the row on success.
    pub async fn verify_api_key(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Result<ApiKeyRow, ApiKeyError>> {
        let key = key.trim();
        let Some(rest) = key.strip_prefix(API_KEY_PREFIX) else {
            return Ok(Err(ApiKeyError::Malformed));
        };
        let Some((id, _secret)) = rest.split_once('_') else {
            return Ok(Err(ApiKeyError::Malformed));
        };
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Err(ApiKeyError::Malformed));
        }
        let Some(row) = self.store.api_key(id).await? else {
            self.audit_bump(crate::audit::action::APIKEY_REJECTED, "unknown", now);
            self.flush_audit_counters(now).await?;
            return Ok(Err(ApiKeyError::Unknown));
        };
        let presented = hex::encode(crypto::sha256(key.as_bytes()));
        if aws_lc_rs::constant_time::verify_slices_are_equal(
            presented.as_bytes(),
            row.hash.as_bytes(),
        )
        .is_err()
        {
            self.audit_bump(crate::audit::action::APIKEY_REJECTED, "unknown", now);
            self.flush_audit_counters(now).await?;
            return Ok(Err(ApiKeyError::Unknown));
        }
        let refused = if row.revoked_at.is_some() {
            Some(("revoked", ApiKeyError::Revoked(row.id.clone())))
        } else if row.expires_at.is_some_and(|e| now >= e) {
            Some(("expired", ApiKeyError::Expired(row.id.clone())))
        } else {
            None
        };
        if let Some((reason, err)) = refused {
            self.audit_bump(crate::audit::action::APIKEY_REJECTED, reason, now);
            self.flush_audit_counters(now).await?;
            return Ok(Err(err));
        }
        self.audit_bump(crate::audit::action::APIKEY_USED, &row.id, now);
        self.flush_audit_counters(now).await?;
        self.store.touch_api_key(&row.id, now.timestamp()).await?;
        Ok(Ok(row))
    }
}

/// Parses `--claims` JSON (an object), naming the problem.
pub fn parse_claims_arg(s: Option<&str>) -> anyhow::Result<Value> {
    match s {
        None => Ok(Value::Object(Map::new())),
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| UsageError(format!("--claims is not valid JSON: {e}")))?;
            if !v.is_object() {
                return Err(UsageError("--claims must be a JSON object".into()).into());
            }
            Ok(v)
        }
    }
}
