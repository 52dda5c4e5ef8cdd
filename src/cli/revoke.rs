//! `keywarden revoke KID --reason TEXT [--yes] [--dry-run] [--wait DURATION]`:
//! the emergency response (src/app/revoke.rs runs the steps).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use clap::Args;

use super::{Ctx, now, print_json};
use crate::app::OpenMode;
use crate::app::revoke::{RevokeOptions, RevokeReport, StepReport};
use crate::duration::Duration;
use crate::error::UsageError;
use crate::reencrypt::Progress;

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key to revoke (any purpose, any state but revoked; a revoked key
    /// finishes the steps an earlier run did not).
    pub kid: String,
    /// Why (kept in the key's row, the audit trail and the alert; do not
    /// name people).
    #[arg(long)]
    pub reason: String,
    /// Do not ask for confirmation (required without a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Show what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for instances to acknowledge the new keyring epoch.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub wait: Duration,
}

fn confirm(kid: &str) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(UsageError(format!(
            "revoking {kid} cannot be undone and there is no terminal to confirm on: pass --yes"
        ))
        .into());
    }
    eprint!(
        "Revoke {kid}? Nothing will sign, encrypt, decrypt or verify with it again. Type the kid to confirm: "
    );
    std::io::stderr().flush()?;
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    if line.trim() != kid {
        return Err(UsageError("not confirmed: nothing was changed".into()).into());
    }
    Ok(())
}

fn show_step(s: &StepReport) {
    eprintln!(
        "[{:<9}] {:<12} {:>7.2}s  {}",
        s.step, s.status, s.seconds, s.detail
    );
}

/// `keywarden revoke`.
pub async fn run(ctx: &Ctx, args: RevokeArgs) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    // Check the kid before asking.
    let key = app.key_by_kid(&args.kid).await?;
    if !args.dry_run && !args.yes {
        confirm(&key.meta.kid)?;
    }
    let progress = Arc::new(Progress::default());
    let opts = RevokeOptions {
        kid: args.kid,
        reason: args.reason,
        dry_run: args.dry_run,
        wait: args.wait.as_std(),
        progress: Some(progress.clone()),
    };
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shower = tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
            let done = progress
                .reencrypted
                .load(std::sync::atomic::Ordering::Relaxed);
            let total = progress.total.load(std::sync::atomic::Ordering::Relaxed);
            if done != last {
                eprintln!("[reencrypt] {done}/{total} rows moved");
                last = done;
            }
        }
    });
    let result = app.revoke_key(&opts, now(), &show_step).await;
    let _ = stop_tx.send(());
    let _ = shower.await;
    let report = result?;
    if ctx.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    if !report.dry_run && !report.complete {
        anyhow::bail!(
            "the response for {} is not complete (see the steps above): run the same command again to finish it",
            report.kid
        );
    }
    Ok(())
}

fn print_report(r: &RevokeReport) {
    let title = if r.dry_run {
        "dry run (nothing was changed)"
    } else if r.complete {
        "complete"
    } else {
        "NOT complete"
    };
    println!("revocation of {}: {title}", r.kid);
    println!("  key:          {} ({}, {})", r.kid, r.purpose, r.algorithm);
    println!("  state before: {}", r.previous_state);
    println!("  reason:       {}", r.reason);
    println!("  actor:        {}", r.actor);
    if let Some(n) = &r.new_kid {
        println!("  new key:      {n}");
    } else if let Some(a) = &r.active_kid {
        println!("  active key:   {a}");
    }
    println!("  epoch:        {}", r.epoch);
    if let Some(left) = r.rows_remaining {
        println!("  rows moved:   {}", r.rows_moved);
        println!("  rows left:    {left} under {}", r.kid);
    }
    if r.redis_configured {
        println!(
            "  instances:    {} acknowledged, {} missing{}",
            r.instances_acknowledged.len(),
            r.instances_missing.len(),
            if r.instances_missing.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.instances_missing.join(", "))
            }
        );
    }
    println!("  steps:");
    for s in &r.steps {
        println!("    {:<9} {:<12} {:>7.2}s", s.step, s.status, s.seconds);
    }
    println!("  follow-ups:");
    for f in &r.follow_ups {
        println!("    - {f}");
    }
}
