//! `keywarden apikey create|list|revoke|verify`.

use clap::Subcommand;
use serde_json::json;

use super::{Ctx, print_json, show_time};
use crate::app::OpenMode;
use crate::duration::Duration;
use crate::error::{Rejected, UsageError};

#[derive(Debug, Subcommand)]
pub enum ApikeyCmd {
    /// Create an API key; it is printed once and only its hash is stored.
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated scopes, e.g. jobs:run,keys:rotate,keys:revoke,audit:read.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Lifetime (default: no expiry).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// List API keys (never the keys themselves).
    List,
    /// Revoke an API key by id.
    Revoke { id: String },
    /// Check a key read from standard input: exit 0 and its scopes, or exit 3.
    Verify,
}

pub async fn run(ctx: &Ctx, cmd: ApikeyCmd) -> anyhow::Result<()> {
    let now = super::now();
    match cmd {
        ApikeyCmd::Create { name, scopes, ttl } => {
            let app = ctx.open(OpenMode::Existing).await?;
            let ttl = ttl.filter(|t| !t.is_zero()).map(Duration::to_chrono);
            let (row, key) = app.create_api_key(&name, &scopes, ttl, now).await?;
            if ctx.json {
                print_json(&json!({
                    "id": row.id, "key": &*key, "name": row.name,
                    "scopes": row.scopes, "expires_at": row.expires_at,
                }))
            } else {
                println!("{}", &*key);
                eprintln!(
                    "created API key {} ({}); it is shown only now, store it safely",
                    row.id, row.name
                );
                Ok(())
            }
        }
        ApikeyCmd::List => {
            let app = ctx.open(OpenMode::Existing).await?;
            let rows = app.store.list_api_keys().await?;
            if ctx.json {
                return print_json(&rows);
            }
            println!(
                "{:<14} {:<20} {:<30} {:<21} {:<21} {:<8}",
                "ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "STATE"
            );
            for r in &rows {
                let state = if r.revoked_at.is_some() {
                    "revoked"
                } else if r.expires_at.is_some_and(|e| now >= e) {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "{:<14} {:<20} {:<30} {:<21} {:<21} {:<8}",
                    r.id,
                    r.name,
                    r.scopes.join(","),
                    show_time(Some(r.created_at)),
                    show_time(r.expires_at),
                    state
                );
            }
            Ok(())
        }
        ApikeyCmd::Revoke { id } => {
            let app = ctx.open(OpenMode::Existing).await?;
            if app
                .store
                .api_key(&id)
                .await?
                .is_none_or(|k| k.revoked_at.is_some())
            {
                return Err(UsageError(format!(
                    "no unrevoked API key with id {id:?} (see `keywarden apikey list`)"
                ))
                .into());
            }
            app.audit_now(vec![crate::audit::events::apikey_revoked(&id)], now)
                .await?;
            if !app.store.revoke_api_key(&id, now.timestamp()).await? {
                return Err(UsageError(format!(
                    "no unrevoked API key with id {id:?} (see `keywarden apikey list`)"
                ))
                .into());
            }
            if ctx.json {
                print_json(&json!({ "id": id, "revoked": true }))
            } else {
                println!("revoked API key {id}");
                Ok(())
            }
        }
        ApikeyCmd::Verify => {
            let input = super::read_stdin("apikey verify", "keywarden apikey verify <<< \"$KEY\"")?;
            let key = String::from_utf8_lossy(&input).to_string();
            let app = ctx.open(OpenMode::Existing).await?;
            match app.verify_api_key(&key, now).await? {
                Ok(row) => {
                    if ctx.json {
                        print_json(&json!({
                            "valid": true, "id": row.id, "name": row.name, "scopes": row.scopes,
                        }))
                    } else {
                        println!("{}", row.scopes.join(","));
                        Ok(())
                    }
                }
                Err(e) => {
                    if ctx.json {
                        print_json(&json!({ "valid": false, "error": e.to_string() }))?;
                    }
                    Err(Rejected(format!("API key rejected: {e}")).into())
                }
            }
        }
    }
}
