//! `keywarden keys ...`, `keyring export` and `jwks`.

use clap::Subcommand;

use super::{Ctx, now, print_json, show_time};
use crate::app::OpenMode;
use crate::error::UsageError;
use crate::keyring::{KeyMeta, KeyState, Purpose};

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// List keys, newest first within each purpose.
    List {
        /// Only keys of this purpose: signing | token_encryption | data | temp.
        #[arg(long)]
        purpose: Option<String>,
    },
    /// Show one key's metadata (never its material).
    Show {
        /// The key id.
        kid: String,
    },
    /// Rotate one purpose now: a new active key, the old one retiring.
    Rotate {
        /// signing | token_encryption | data | temp | root.
        purpose: String,
        /// Print what would happen without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// How many stored rows each data key still protects (keywarden's
    /// secrets and every reencrypt target), and quarantined rows.
    Census,
    /// Adopt an existing Fernet key as a decrypt-only (retiring) data key.
    ImportFernet(super::reencrypt::ImportFernetArgs),
}

#[derive(Debug, Subcommand)]
pub enum KeyringCmd {
    /// The keyring snapshot: every key with its material wrapped under the
    /// root key as a standard Fernet token.
    Export,
    /// Restore keys from a `keyring export` document into an empty store
    /// (disaster recovery); needs the root key the export was made under.
    Import {
        /// The exported document (`-` for standard input).
        file: std::path::PathBuf,
        /// Add the keys a non-empty store does not have (existing keys are
        /// left unchanged, never downgraded).
        #[arg(long)]
        merge: bool,
        /// Check the document and show what would be imported.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_purpose(s: &str) -> anyhow::Result<Purpose> {
    s.parse::<Purpose>()
        .map_err(|e| UsageError(e.to_string()).into())
}

fn print_keys(keys: &[KeyMeta]) {
    println!(
        "{:<26} {:<17} {:<12} {:<10} {:>4}  {:<21} {:<21} {:<21}",
        "KID", "PURPOSE", "ALGORITHM", "STATE", "VER", "CREATED", "ROTATE AFTER", "RETIRE AFTER"
    );
    for k in keys {
        println!(
            "{:<26} {:<17} {:<12} {:<10} {:>4}  {:<21} {:<21} {:<21}",
            k.kid,
            k.purpose.as_str(),
            k.algorithm.as_str(),
            k.state.as_str(),
            k.version,
            show_time(Some(k.created_at)),
            show_time(k.rotate_after.filter(|_| k.state == KeyState::Active)),
            show_time(k.retire_after),
        );
    }
}

pub async fn run(ctx: &Ctx, cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Census => super::reencrypt::census(ctx).await,
        KeysCmd::ImportFernet(args) => super::reencrypt::import_fernet(ctx, args).await,
        KeysCmd::List { purpose } => {
            let purpose = purpose.as_deref().map(parse_purpose).transpose()?;
            let app = ctx.open(OpenMode::Existing).await?;
            let keys = app.key_metas(purpose).await?;
            if ctx.json {
                print_json(&keys)
            } else {
                print_keys(&keys);
                Ok(())
            }
        }
        KeysCmd::Show { kid } => {
            let app = ctx.open(OpenMode::Existing).await?;
            let key = app.key_by_kid(&kid).await?;
            if ctx.json {
                let mut v = serde_json::to_value(&key.meta)?;
                v["revoked_reason"] = serde_json::json!(key.revoked_reason);
                print_json(&v)
            } else {
                let m = &key.meta;
                println!("kid:          {}", m.kid);
                println!("purpose:      {}", m.purpose);
                println!("algorithm:    {}", m.algorithm);
                println!("state:        {}", m.state);
                println!("version:      {}", m.version);
                println!("created_at:   {}", show_time(Some(m.created_at)));
                println!("activated_at: {}", show_time(m.activated_at));
                println!("rotate_after: {}", show_time(m.rotate_after));
                println!("retire_after: {}", show_time(m.retire_after));
                println!("revoked_at:   {}", show_time(m.revoked_at));
                if let Some(r) = &key.revoked_reason {
                    println!("revoked for:  {r}");
                }
                Ok(())
            }
        }
        KeysCmd::Rotate { purpose, dry_run } => {
            if purpose == "root" {
                return super::init::rotate_root(ctx, dry_run).await;
            }
            let purpose = parse_purpose(&purpose)?;
            let app = ctx.open(OpenMode::Existing).await?;
            let outcome = app
                .rotate(purpose, super::now(), dry_run, None)
                .await?
                .expect("an unconditional rotation always happens");
            if !dry_run {
                crate::sync::publisher::publish_after_change(&app).await;
            }
            if ctx.json {
                print_json(&outcome)
            } else {
                let old = outcome.old_kid.as_deref().unwrap_or("(none)");
                if dry_run {
                    println!(
                        "dry run: would make a new active {purpose} key ({}, v{}) and move {old} to retiring",
                        outcome.algorithm, outcome.version
                    );
                } else {
                    println!(
                        "rotated {purpose}: {} is active ({}, v{}); {old} is retiring",
                        outcome.new_kid.as_deref().unwrap_or("-"),
                        outcome.algorithm,
                        outcome.version
                    );
                }
                Ok(())
            }
        }
    }
}

pub async fn run_keyring(ctx: &Ctx, cmd: KeyringCmd) -> anyhow::Result<()> {
    match cmd {
        KeyringCmd::Export => {
            let app = ctx.open(OpenMode::Existing).await?;
            // The snapshot is JSON whatever the flag says: it is a document.
            print_json(&app.snapshot().await?)
        }
        KeyringCmd::Import {
            file,
            merge,
            dry_run,
        } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| UsageError(format!("cannot read {}: {e}", file.display())))?
            };
            let doc: crate::app::keyring::Snapshot = serde_json::from_str(&text).map_err(|e| {
                UsageError(format!(
                    "{} is not a `keyring export` document: {e}",
                    file.display()
                ))
            })?;
            // Create the store if missing, but never generate a root key:
            // the document's keys are wrapped under an existing one.
            let paths = crate::app::Paths::resolve(Some(&ctx.data_dir));
            if crate::app::load_root_keys(&paths.key_file)?.is_none() {
                return Err(UsageError(format!(
                    "import needs the root key the export was made under: set KEYWARDEN_ROOT_KEY \
                     or restore {}",
                    paths.key_file.display()
                ))
                .into());
            }
            let app = ctx.open(OpenMode::Create).await?;
            let out = app.import_keyring(&doc, merge, dry_run, now()).await?;
            if !dry_run {
                crate::sync::publisher::publish_after_change(&app).await;
            }
            if ctx.json {
                print_json(&out)
            } else {
                let verb = if dry_run { "would import" } else { "imported" };
                println!(
                    "{verb} {} keys; {} already present and left unchanged",
                    out.imported.len(),
                    out.kept.len()
                );
                Ok(())
            }
        }
    }
}

pub async fn jwks(ctx: &Ctx) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    print_json(&app.jwks().await?)
}
