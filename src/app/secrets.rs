//! Secrets: values encrypted with the active data key and stored as Fernet
//! tokens beside the kid that made them.

use std::io::BufRead;

use anyhow::Context;
use rayon::prelude::*;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::App;
use crate::app::keyring::DecryptError;
use crate::audit::{self, Event, action};
use crate::error::{Rejected, UsageError};
use crate::store::secrets::{NewSecret, put_secrets_in};

/// How many imported rows one transaction writes.
pub const IMPORT_BATCH: usize = 5000;

/// A line of `secrets import`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    name: String,
    value: String,
}

/// What an import did.
#[derive(Debug, serde::Serialize)]
pub struct ImportOutcome {
    pub rows: usize,
    pub batches: usize,
    pub seconds: f64,
    pub rows_per_second: f64,
}

/// Checks a secret's name: printable, no control characters, bounded.
pub fn check_secret_name(name: &str) -> Result<(), UsageError> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(UsageError(
            "a secret name must be 1 to 256 printable characters".into(),
        ));
    }
    Ok(())
}

impl App {
    /// Stores `value` under `name` (replacing any previous value).
    pub async fn put_secret(
        &self,
        name: &str,
        value: &[u8],
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<String> {
        check_secret_name(name)?;
        // The audit row names the secret only by its keyed HMAC.
        let redacted = self.redact(name).await?;
        let keys = self.data_keys().await?;
        let (kid, token) = keys.encrypt(value, now.timestamp() as u64);
        let mut tx = self.store.begin().await?;
        put_secrets_in(
            &mut tx,
            &[NewSecret {
                name: name.to_string(),
                kid: kid.clone(),
                token,
            }],
            now.timestamp(),
        )
        .await?;
        let event = Event::new(action::SECRET_WRITTEN)
            .target(redacted)
            .detail("kid", kid.as_str());
        audit::commit(self, tx, vec![event], now)
            .await
            .context("committing the secret")?;
        Ok(kid)
    }

    /// Reads and decrypts the secret `name`.
    pub async fn get_secret(&self, name: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        check_secret_name(name)?;
        let secret = self
            .store
            .secret(name)
            .await?
            .ok_or_else(|| UsageError(format!("no secret named {name:?}")))?;
        let keys = self.data_keys().await?;
        // The stored kid picks the key; MultiFernet order is the fallback
        // for rows whose kid is stale.
        if let Some(key) = keys.get(&secret.kid)
            && let Ok(p) = key.decrypt(&secret.token)
        {
            return Ok(p);
        }
        match keys.decrypt(&secret.token) {
            Ok((_, p)) => Ok(p),
            Err(e) => Err(anyhow::anyhow!(
                "secret {name:?} (under key {}) cannot be decrypted: {e}",
                secret.kid
            )),
        }
    }

    /// Decrypts a Fernet token with the usable data keys; exit 3 on a token
    /// that does not decrypt.
    pub async fn decrypt_token(&self, token: &str) -> anyhow::Result<(String, Zeroizing<Vec<u8>>)> {
        let keys = self.data_keys().await?;
        keys.decrypt(token.trim()).map_err(|e| match e {
            DecryptError::Malformed(_) | DecryptError::NoKey => Rejected(e.to_string()).into(),
            other => anyhow::Error::from(other),
        })
    }

    /// Imports JSON Lines `{"name": ..., "value": ...}`. Every line is read
    /// and checked before anything is written, so a malformed line anywhere
    /// imports nothing; then rows are encrypted in parallel and written in
    /// transactions of `IMPORT_BATCH` rows (re-running after a database
    /// failure is safe: a name is written, not appended).
    pub async fn import_secrets(
        &self,
        input: impl BufRead,
        source: &str,
        now: chrono::DateTime<chrono::Utc>,
        progress: impl Fn(usize, usize),
    ) -> anyhow::Result<ImportOutcome> {
        let started = std::time::Instant::now();
        let mut lines: Vec<ImportLine> = Vec::new();
        for (i, line) in input.lines().enumerate() {
            let line = Zeroizing::new(line.with_context(|| format!("reading {source}"))?);
            if line.trim().is_empty() {
                continue;
            }
            // serde_json's message names the column and the expected shape,
            // never the value itself.
            let parsed: ImportLine = serde_json::from_str(&line).map_err(|e| {
                UsageError(format!(
                    "{source}: line {}: not a JSON object {{\"name\": ..., \"value\": ...}} ({}); nothing was imported",
                    i + 1,
                    describe_json_error(&e)
                ))
            })?;
            check_secret_name(&parsed.name).map_err(|e| {
                UsageError(format!(
                    "{source}: line {}: {e}; nothing was imported",
                    i + 1
                ))
            })?;
            lines.push(parsed);
        }
        // Later lines win for a repeated name, as they would one by one.
        let mut seen = std::collections::HashMap::with_capacity(lines.len());
        for (i, l) in lines.iter().enumerate() {
            seen.insert(l.name.as_str(), i);
        }
        let keep: Vec<&ImportLine> = lines
            .iter()
            .enumerate()
            .filter(|(i, l)| seen.get(l.name.as_str()) == Some(i))
            .map(|(_, l)| l)
            .collect();
        let keys = self.data_keys().await?;
        self.audit_keys().await?;
        let now_unix = now.timestamp() as u64;
        let total = keep.len();
        let batch_count = total.div_ceil(IMPORT_BATCH);
        let mut written = 0;
        let mut batches = 0;
        for chunk in keep.chunks(IMPORT_BATCH) {
            let rows: Vec<NewSecret> = chunk
                .par_iter()
                .map(|l| {
                    let (kid, token) = keys.encrypt(l.value.as_bytes(), now_unix);
                    NewSecret {
                        name: l.name.clone(),
                        kid,
                        token,
                    }
                })
                .collect();
            // One audit row per transaction, with the count (never the
            // names): the rows and their audit record commit together.
            let mut tx = self.store.begin().await?;
            put_secrets_in(&mut tx, &rows, now.timestamp()).await?;
            let event = Event::new(action::SECRETS_IMPORTED)
                .target("secrets")
                .detail("rows", rows.len())
                .detail("kid", keys.active_kid.as_str())
                .detail("batch", batches + 1)
                .detail("batches", batch_count)
                .detail("total", total);
            audit::commit(self, tx, vec![event], now)
                .await
                .context("committing imported secrets")?;
            written += rows.len();
            batches += 1;
            progress(written, total);
        }
        for l in &mut lines {
            zeroize::Zeroize::zeroize(&mut l.value);
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(ImportOutcome {
            rows: written,
            batches,
            seconds,
            rows_per_second: if seconds > 0.0 {
                written as f64 / seconds
            } else {
                0.0
            },
        })
    }
}

/// A JSON error's category and position, without the offending text.
fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax => "syntax error",
        Category::Eof => "unexpected end of line",
        Category::Data => {
            "wrong fields or types: it needs exactly a string \"name\" and a string \"value\""
        }
        Category::Io => "read error",
    };
    format!("{what} at column {}", e.column())
}
