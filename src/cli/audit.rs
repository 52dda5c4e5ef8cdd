//! `keywarden audit ...`: verify the chain, read it, checkpoint it, and
//! compute the `hmac:` form of a name for an auditor.

use clap::Subcommand;

use super::{Ctx, print_json, read_stdin, show_time};
use crate::app::OpenMode;
use crate::audit::chain::AuditRecord;
use crate::audit::checkpoint;
use crate::error::{Rejected, UsageError};
use crate::store::audit::Filter;

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Walk the hash chain from the retention anchor and check it against
    /// the newest checkpoint; exit 3 and name the first broken row.
    Verify,
    /// The newest rows, oldest first.
    Tail {
        /// How many rows.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        n: i64,
    },
    /// Rows as JSON Lines on stdout, oldest first.
    Export {
        /// Only rows at or after this time: RFC 3339, or a duration meaning
        /// "that long ago" (24h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only this action (key.rotated), or every action under a prefix
        /// ending in `.` or `*` (key.).
        #[arg(long, value_name = "A")]
        action: Option<String>,
        /// Only rows whose target is this kid (or object, e.g. an `hmac:` name).
        #[arg(long, value_name = "K", visible_alias = "target")]
        kid: Option<String>,
    },
    /// Verify the chain, write a signed checkpoint of its head to
    /// `audit.checkpoint_dir`, then apply `audit.retention`.
    Checkpoint {
        /// Say what would be written and pruned without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the `hmac:` form under which a name (of a secret, an operator)
    /// appears in the log; the name is read from standard input.
    Hmac,
}

fn parse_since(s: &str, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    match s.parse::<crate::duration::Duration>() {
        Ok(d) => Ok((now - d.to_chrono()).timestamp_millis()),
        Err(_) => Err(UsageError(format!(
            "--since {s:?} is neither an RFC 3339 time (2026-01-31T00:00:00Z) nor a duration (24h, 7d)"
        ))
        .into()),
    }
}

fn print_row(r: &AuditRecord) {
    let at = chrono::DateTime::from_timestamp_millis(r.at_ms).map_or_else(
        || r.at_ms.to_string(),
        |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    );
    println!(
        "{:>7}  {}  {:<20} {:<28} {:<8} {}  {}",
        r.seq,
        at,
        r.action,
        r.target.as_deref().unwrap_or("-"),
        r.outcome,
        r.actor,
        serde_json::to_string(&r.details).unwrap_or_default()
    );
}

pub async fn run(ctx: &Ctx, cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Verify => {
            let app = ctx.open(OpenMode::Existing).await?;
            let out = checkpoint::verify_store(&app).await?;
            if ctx.json {
                print_json(&out)?;
            } else if out.ok {
                println!(
                    "ok: {} rows verify (rows {}..{}){}",
                    out.rows,
                    out.anchor_seq + 1,
                    out.head_seq,
                    match out.checkpoint_seq {
                        Some(s) => format!(
                            ", consistent with the checkpoint of row {s} taken {}",
                            show_time(out.checkpoint_at)
                        ),
                        None => "; no checkpoint yet, so a truncated tail could not be detected \
                                 (run `keywarden audit checkpoint`)"
                            .into(),
                    }
                );
            }
            if out.ok {
                Ok(())
            } else {
                Err(Rejected(format!(
                    "the audit chain is broken: {}",
                    out.reason.as_deref().unwrap_or("unknown breakage")
                ))
                .into())
            }
        }
        AuditCmd::Tail { n } => {
            if n < 0 {
                return Err(UsageError("-n must be 0 or more".into()).into());
            }
            let app = ctx.open(OpenMode::Existing).await?;
            let rows = app.store.audit_tail(n).await?;
            if ctx.json {
                return print_json(&rows);
            }
            for r in &rows {
                print_row(r);
            }
            Ok(())
        }
        AuditCmd::Export { since, action, kid } => {
            let since_ms = since
                .as_deref()
                .map(|s| parse_since(s, super::now()))
                .transpose()?;
            let app = ctx.open(OpenMode::Existing).await?;
            let filter = Filter {
                since_ms,
                action,
                target: kid,
            };
            use std::io::Write;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            app.store
                .audit_rows(&filter, |r| {
                    serde_json::to_writer(&mut out, &r)?;
                    out.write_all(b"\n")?;
                    Ok(true)
                })
                .await?;
            out.flush()?;
            Ok(())
        }
        AuditCmd::Checkpoint { dry_run } => {
            let app = ctx.open(OpenMode::Existing).await?;
            let out = checkpoint::checkpoint_with(&app, super::now(), dry_run).await?;
            if ctx.json {
                return print_json(&out);
            }
            let verb = if dry_run { "would write" } else { "wrote" };
            println!(
                "{verb} checkpoint of row {} to {}",
                out.seq,
                out.file.display()
            );
            println!(
                "retention: {} {} rows; the chain now starts after row {}",
                if dry_run { "would prune" } else { "pruned" },
                out.pruned_rows,
                out.anchor_seq
            );
            Ok(())
        }
        AuditCmd::Hmac => {
            let raw = read_stdin("audit hmac", "printf %s NAME | keywarden audit hmac")?;
            let text = std::str::from_utf8(&raw)
                .map_err(|_| UsageError("the name on standard input is not UTF-8".into()))?;
            // A trailing newline from `echo` is not part of any name.
            let name = text.strip_suffix('\n').unwrap_or(text);
            let name = name.strip_suffix('\r').unwrap_or(name);
            let app = ctx.open(OpenMode::Existing).await?;
            let h = app.redact(name).await?;
            if ctx.json {
                print_json(&serde_json::json!({ "hmac": h }))
            } else {
                println!("{h}");
                Ok(())
            }
        }
    }
}
