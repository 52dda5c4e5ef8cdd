//! `keywarden secrets put|get|list|import`.

use std::io::{BufReader, Write};
use std::path::PathBuf;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::{Ctx, print_json, read_stdin, show_time};
use crate::app::OpenMode;
use crate::error::UsageError;

#[derive(Debug, Subcommand)]
pub enum SecretsCmd {
    /// Store a secret; the value comes from standard input unless --from-file.
    Put {
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long, value_name = "F")]
        from_file: Option<PathBuf>,
        /// Allow an empty value.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Print a secret's value on stdout.
    Get { name: String },
    /// List secrets: name, key, times (never values).
    List,
    /// Import JSON Lines, one {"name": "...", "value": "..."} per line. A
    /// malformed line anywhere imports nothing.
    Import {
        /// The JSON Lines file (`-` for standard input).
        file: PathBuf,
    },
}

pub async fn run(ctx: &Ctx, cmd: SecretsCmd) -> anyhow::Result<()> {
    match cmd {
        SecretsCmd::Put {
            name,
            from_file,
            allow_empty,
        } => {
            crate::app::secrets::check_secret_name(&name)?;
            let value = match from_file {
                Some(path) => zeroize::Zeroizing::new(
                    std::fs::read(&path)
                        .map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?,
                ),
                None => read_stdin(
                    "secrets put",
                    "printf %s \"$VALUE\" | keywarden secrets put NAME",
                )?,
            };
            if value.is_empty() && !allow_empty {
                return Err(UsageError(format!(
                    "the value for secret {name:?} is empty; pass --allow-empty to store an empty value"
                ))
                .into());
            }
            let app = ctx.open(OpenMode::Existing).await?;
            let kid = app.put_secret(&name, &value, super::now()).await?;
            if ctx.json {
                print_json(&serde_json::json!({ "name": name, "kid": kid }))
            } else {
                eprintln!("stored secret {name:?} under key {kid}");
                Ok(())
            }
        }
        SecretsCmd::Get { name } => {
            let app = ctx.open(OpenMode::Existing).await?;
            let value = app.get_secret(&name).await?;
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            out.flush()?;
            Ok(())
        }
        SecretsCmd::List => {
            let app = ctx.open(OpenMode::Existing).await?;
            let list = app.store.list_secrets().await?;
            if ctx.json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name, "kid": s.kid,
                            "created_at": s.created_at, "updated_at": s.updated_at,
                        })
                    })
                    .collect();
                print_json(&rows)
            } else {
                println!("{:<40} {:<26} {:<21}", "NAME", "KID", "UPDATED");
                for s in &list {
                    println!(
                        "{:<40} {:<26} {:<21}",
                        s.name,
                        s.kid,
                        show_time(Some(s.updated_at))
                    );
                }
                Ok(())
            }
        }
        SecretsCmd::Import { file } => {
            let app = ctx.open(OpenMode::Existing).await?;
            let (reader, source): (Box<dyn std::io::BufRead>, String) = if file.as_os_str() == "-" {
                (
                    Box::new(BufReader::new(std::io::stdin())),
                    "standard input".into(),
                )
            } else {
                let f = std::fs::File::open(&file)
                    .map_err(|e| UsageError(format!("cannot open {}: {e}", file.display())))?;
                (
                    Box::new(BufReader::with_capacity(1 << 20, f)),
                    file.display().to_string(),
                )
            };
            let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} rows  {per_sec}  eta {eta}")
                        .expect("a valid progress template"),
                );
                Some(bar)
            } else {
                None
            };
            // Without a terminal, a log line every few seconds says how far
            // it got, instead of a bar.
            let last_log = std::cell::Cell::new(std::time::Instant::now());
            let outcome = app
                .import_secrets(reader, &source, super::now(), |done, total| {
                    if let Some(bar) = &bar {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    } else if last_log.get().elapsed() >= std::time::Duration::from_secs(2) {
                        last_log.set(std::time::Instant::now());
                        tracing::info!(rows_done = done, rows_total = total, "importing secrets");
                    }
                })
                .await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if ctx.json {
                print_json(&outcome)
            } else {
                eprintln!(
                    "imported {} secrets in {:.2}s ({:.0} rows/s, {} transactions)",
                    outcome.rows, outcome.seconds, outcome.rows_per_second, outcome.batches
                );
                Ok(())
            }
        }
    }
}
