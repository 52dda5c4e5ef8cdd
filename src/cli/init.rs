//! `keywarden init`: create the store, the root key and the first key of
//! every purpose. Safe to repeat and to run twice at once.

use super::{Ctx, print_json};
use crate::app::OpenMode;

pub async fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Create).await?;
    let created = app.ensure_active_keys(super::now()).await?;
    // Also on a repeated init: it puts the snapshot in a fresh Redis.
    crate::sync::publisher::publish_after_change(&app).await;
    let keys = app.key_metas(None).await?;
    if ctx.json {
        print_json(&serde_json::json!({
            "store": crate::store::redact_url(&app.paths.database_url),
            "root_key": app.root_source.to_string(),
            "root_kid": app.roots.newest().id(),
            "created": created,
            "keys": keys,
        }))?;
    } else {
        println!(
            "store:    {}",
            crate::store::redact_url(&app.paths.database_url)
        );
        println!(
            "root key: {} ({})",
            app.root_source,
            app.roots.newest().id()
        );
        if created.is_empty() {
            println!("already initialised: every purpose has an active key");
        }
        for k in &created {
            println!(
                "created {:<17} {} ({}, v{})",
                k.purpose.as_str(),
                k.kid,
                k.algorithm,
                k.version
            );
        }
    }
    Ok(())
}

/// `keywarden keys rotate root`.
pub async fn rotate_root(ctx: &Ctx, dry_run: bool) -> anyhow::Result<()> {
    let mut app = ctx.open(OpenMode::Existing).await?;
    let outcome = app.rotate_root(super::now(), dry_run).await?;
    if !dry_run {
        crate::sync::publisher::publish_after_change(&app).await;
    }
    if ctx.json {
        return print_json(&outcome);
    }
    if dry_run {
        println!(
            "dry run: would re-wrap {} keys under a new root key and retire {}",
            outcome.keys_rewrapped,
            outcome.old_root_kid.join(", ")
        );
    } else {
        println!(
            "re-wrapped {} keys under root key {}; retired {}",
            outcome.keys_rewrapped,
            outcome.new_root_kid,
            outcome.old_root_kid.join(", ")
        );
        if app.root_source == crate::app::RootKeySource::Env {
            println!("now remove the old key(s) from KEYWARDEN_ROOT_KEY, keeping only the first");
        }
    }
    Ok(())
}
