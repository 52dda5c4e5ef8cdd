//! `keywarden encrypt` and `keywarden decrypt`: Fernet through the keyring.

use std::io::Write;

use clap::Args;

use super::{Ctx, read_stdin};
use crate::app::OpenMode;
use crate::error::UsageError;

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Allow an empty plaintext.
    #[arg(long)]
    pub allow_empty: bool,
}

pub async fn encrypt(ctx: &Ctx, args: EncryptArgs) -> anyhow::Result<()> {
    let plaintext = read_stdin("encrypt", "printf %s \"$VALUE\" | keywarden encrypt")?;
    if plaintext.is_empty() && !args.allow_empty {
        return Err(UsageError(
            "standard input is empty: nothing to encrypt (pass --allow-empty to encrypt an empty value)".into(),
        )
        .into());
    }
    let app = ctx.open(OpenMode::Existing).await?;
    let keys = app.data_keys().await?;
    let (kid, token) = keys.encrypt(&plaintext, super::now().timestamp() as u64);
    if ctx.json {
        super::print_json(&serde_json::json!({ "kid": kid, "token": token }))
    } else {
        println!("{token}");
        Ok(())
    }
}

pub async fn decrypt(ctx: &Ctx) -> anyhow::Result<()> {
    let input = read_stdin("decrypt", "keywarden decrypt < token.txt")?;
    let token = std::str::from_utf8(&input)
        .map_err(|_| crate::error::Rejected("not a Fernet token (input is not text)".into()))?;
    let app = ctx.open(OpenMode::Existing).await?;
    let (kid, plaintext) = app.decrypt_token(token).await?;
    tracing::debug!(key.id = kid.as_str(), "decrypted a token");
    let mut out = std::io::stdout().lock();
    out.write_all(&plaintext)?;
    out.flush()?;
    Ok(())
}
