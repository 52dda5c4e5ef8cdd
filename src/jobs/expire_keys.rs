//! `kind = "expire-keys"`: retires signing and token-encryption keys past
//! their grace, destroys expired temp keys (material erased, row kept),
//! retires data keys that protect no row, and expires API keys.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::JobOutcome;
use crate::app::App;

pub async fn run(app: &App, now: DateTime<Utc>, dry_run: bool) -> JobOutcome {
    let mut out = JobOutcome::default();
    let census = match rows_under_data_keys(app).await {
        Ok(c) => c,
        Err(e) => {
            out.fail("count rows per data key", &e);
            return out;
        }
    };
    match app
        .expire(now, dry_run, |kid| census.as_ref()?.get(kid).copied())
        .await
    {
        Ok(done) => {
            for e in done {
                let verb = if e.to == crate::keyring::KeyState::Destroyed {
                    "destroy"
                } else {
                    "retire"
                };
                out.actions.push(json!({
                    "action": if dry_run { format!("would_{verb}") } else { verb.to_string() },
                    "kid": e.kid,
                    "purpose": e.purpose,
                    "from": e.from,
                    "to": e.to,
                }));
            }
        }
        Err(e) => out.fail("expire keys", &e),
    }
    match expire_api_keys(app, now, dry_run).await {
        Ok(actions) => out.actions.extend(actions),
        Err(e) => out.fail("expire API keys", &e),
    }
    out
}

/// How many stored rows each data key still protects, from a real count
/// over keywarden's store and every target (the re-encryption census). A
/// retiring data key is retired only when this says zero.
async fn rows_under_data_keys(app: &App) -> anyhow::Result<Option<HashMap<String, u64>>> {
    let census = crate::reencrypt::census(app).await?;
    let keys = app.key_metas(Some(crate::keyring::Purpose::Data)).await?;
    Ok(Some(
        keys.into_iter()
            .map(|k| {
                let n = census.rows_under(&k.kid);
                (k.kid, n)
            })
            .collect(),
    ))
}

/// API keys need no state change to expire: `apikey verify` and the HTTP
/// endpoint refuse a key past its `expires_at` with "expired". This reports
/// the keys that have expired since, so the run history shows them.
async fn expire_api_keys(
    app: &App,
    now: DateTime<Utc>,
    _dry_run: bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(app
        .store
        .list_api_keys()
        .await?
        .into_iter()
        .filter(|k| k.revoked_at.is_none() && k.expires_at.is_some_and(|e| e <= now))
        .map(|k| json!({"action": "api_key_expired", "id": k.id, "expired_at": k.expires_at}))
        .collect())
}
