//! `keywarden reencrypt`, `keys census` and `keys import-fernet`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{ArgGroup, Args};

use super::{Ctx, now, print_json};
use crate::app::OpenMode;
use crate::crypto::fernet::{FernetKey, derive_fernet_key_from_secret};
use crate::error::UsageError;
use crate::reencrypt::{self, Options, Progress, Summary, quarantine};

#[derive(Debug, Args)]
pub struct ReencryptArgs {
    /// Only this target: `keywarden.secrets` or a `[[reencrypt.targets]]` name
    /// (default: keywarden's secrets and every configured target).
    #[arg(long, value_name = "T")]
    pub target: Option<String>,
    /// Print the census and an estimated duration; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per batch (default: config reencrypt.batch_size).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: Option<u64>,
    /// Crypto threads (default: config reencrypt.threads; 0 = one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=256))]
    pub threads: Option<u64>,
    /// Clear the quarantine of the selected targets first, so rows that did
    /// not decrypt before are tried again (e.g. after importing their key).
    #[arg(long)]
    pub retry_quarantined: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["key_file", "key_env", "derive_from_env"])))]
pub struct ImportFernetArgs {
    /// A file holding the Fernet key (urlsafe base64 of 32 bytes).
    #[arg(long, value_name = "F")]
    pub key_file: Option<PathBuf>,
    /// An environment variable holding the Fernet key.
    #[arg(long, value_name = "VAR")]
    pub key_env: Option<String>,
    /// An environment variable holding a secret; the key is
    /// urlsafe_b64(sha256(value)), as Python apps derive Fernet keys from a
    /// JWT secret.
    #[arg(long, value_name = "VAR")]
    pub derive_from_env: Option<String>,
}

fn env_value(var: &str) -> anyhow::Result<zeroize::Zeroizing<String>> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(zeroize::Zeroizing::new(v)),
        _ => Err(UsageError(format!("environment variable {var} is not set or empty")).into()),
    }
}

/// `keys import-fernet`.
pub async fn import_fernet(ctx: &Ctx, args: ImportFernetArgs) -> anyhow::Result<()> {
    let bad_key = |from: &str, e: crate::crypto::fernet::FernetError| -> anyhow::Error {
        UsageError(format!("{from} does not hold a Fernet key: {e}")).into()
    };
    let key = if let Some(path) = &args.key_file {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            UsageError(format!("cannot read the key file {}: {e}", path.display()))
        })?);
        FernetKey::from_base64(&text).map_err(|e| bad_key(&path.display().to_string(), e))?
    } else if let Some(var) = &args.key_env {
        FernetKey::from_base64(&env_value(var)?).map_err(|e| bad_key(var, e))?
    } else {
        let var = args
            .derive_from_env
            .as_deref()
            .expect("clap requires one source");
        derive_fernet_key_from_secret(env_value(var)?.as_bytes())
    };
    let app = ctx.open(OpenMode::Existing).await?;
    let imported = app.import_fernet(&key, now()).await?;
    if ctx.json {
        return print_json(&imported);
    }
    if imported.created {
        println!(
            "imported as data key {} (retiring: decrypts, never encrypts); move its rows with `keywarden reencrypt --target ...`",
            imported.kid
        );
    } else {
        println!(
            "the keyring already holds this key as {} ({}); nothing changed",
            imported.kid, imported.state
        );
    }
    Ok(())
}

/// `keys census`.
pub async fn census(ctx: &Ctx) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    let census = reencrypt::census(&app).await?;
    if ctx.json {
        return print_json(&census.lines());
    }
    print_census(&census.lines());
    let q = quarantine::list(&app.store).await?;
    if !q.is_empty() {
        println!("\nquarantined rows (no usable data key decrypts them; left untouched):");
        for e in q.iter().take(50) {
            println!("  {} id {}: {}", e.target, e.row_id, e.reason);
        }
        if q.len() > 50 {
            println!("  ... and {} more", q.len() - 50);
        }
        println!(
            "after fixing them (or importing their key), run `keywarden reencrypt --retry-quarantined`"
        );
    }
    Ok(())
}

fn print_census(lines: &[reencrypt::CensusEntry]) {
    println!("{:<26} {:<12} {:>10}  TARGETS", "KID", "STATE", "ROWS");
    for e in lines {
        let targets: Vec<String> = e.targets.iter().map(|(t, n)| format!("{t}={n}")).collect();
        println!(
            "{:<26} {:<12} {:>10}  {}",
            e.kid.as_deref().unwrap_or("-"),
            e.state,
            e.rows,
            targets.join(" ")
        );
    }
}

/// Shows progress until `stop` fires: a bar on a terminal, a log line every
/// few seconds otherwise.
fn spawn_progress(
    progress: Arc<Progress>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} rows  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("a valid template"),
            );
            loop {
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.done.load(Ordering::Relaxed));
                let failed = progress.failed.load(Ordering::Relaxed);
                if failed > 0 {
                    bar.set_message(format!("{failed} quarantined"));
                }
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            bar.finish_and_clear();
        } else {
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let done = progress.done.load(Ordering::Relaxed);
                let total = progress.total.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                let rate = done as f64 / secs.max(0.001);
                let eta = if rate > 0.0 {
                    total.saturating_sub(done) as f64 / rate
                } else {
                    0.0
                };
                tracing::info!(
                    rows_done = done,
                    rows_total = total,
                    rows_per_second = rate.round(),
                    eta_seconds = eta.round(),
                    "re-encryption: {done}/{total} rows, {:.0} rows/s, ETA {:.0} s",
                    rate,
                    eta
                );
            }
        }
    })
}

/// `keywarden reencrypt`.
pub async fn run(ctx: &Ctx, args: ReencryptArgs) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    let progress = Arc::new(Progress::default());
    let opts = Options {
        target: args.target,
        dry_run: args.dry_run,
        batch_size: args.batch_size.map(|n| n as usize),
        threads: args.threads.map(|n| n as usize),
        retry_quarantined: args.retry_quarantined,
        progress: Some(progress.clone()),
        decrypt_with_revoked: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let shower = (!args.dry_run).then(|| spawn_progress(progress, stop_rx));
    let result = reencrypt::run_reencrypt(&app, &opts, now()).await;
    let _ = stop_tx.send(());
    if let Some(h) = shower {
        let _ = h.await;
    }
    let summary = result?;
    if ctx.json {
        print_json(&summary)?;
    } else {
        print_summary(&summary);
    }
    if summary.rows_failed > 0 {
        return Err(anyhow::anyhow!(
            "{} rows could not be decrypted with any usable data key and were quarantined \
             (left untouched; see `keywarden keys census`)",
            summary.rows_failed
        ));
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    if s.dry_run {
        print_census(&s.census);
        println!(
            "\ndry run: {} rows are not under the active data key {}; a run would take about {:.0} s (nothing was written)",
            s.rows_pending.unwrap_or(0),
            s.active_kid,
            s.estimated_seconds.unwrap_or(0.0).ceil()
        );
        return;
    }
    println!(
        "re-encrypted {} of {} rows scanned under data key {} in {:.1} s ({:.0} rows/s)",
        s.rows_reencrypted, s.rows_scanned, s.active_kid, s.seconds, s.rows_per_second
    );
    if s.rows_conflicted > 0 {
        println!(
            "{} rows changed by the application during the run were left to it",
            s.rows_conflicted
        );
    }
    if s.rows_failed > 0 {
        println!("{} rows quarantined by this run", s.rows_failed);
    }
    if s.rows_quarantined_total > 0 {
        println!(
            "{} rows are in quarantine (`keywarden keys census`)",
            s.rows_quarantined_total
        );
    }
    for kid in &s.retired {
        println!("data key {kid} protects no row any more: retired");
    }
}
