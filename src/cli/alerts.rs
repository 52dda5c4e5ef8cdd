//! `keywarden alerts list|history|test`.

use clap::Subcommand;
use serde_json::json;

use super::{Ctx, print_json, show_time};
use crate::alerts::channels::Dispatcher;
use crate::alerts::rule_views;
use crate::alerts::rules::{Channel, test_notification};
use crate::app::OpenMode;
use crate::error::UsageError;

#[derive(Debug, Subcommand)]
pub enum AlertsCmd {
    /// The rules (seed defaults plus config), their state and when they last fired.
    List,
    /// Recent deliveries, dead letters included (newest first).
    History {
        /// How many to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        n: i64,
    },
    /// Send a test alert through one channel and report the outcome (exit 1 if it failed).
    Test {
        /// email | slack | webhook
        channel: String,
    },
}

pub async fn run(ctx: &Ctx, cmd: AlertsCmd) -> anyhow::Result<()> {
    let app = ctx.open(OpenMode::Existing).await?;
    match cmd {
        AlertsCmd::List => {
            let views = rule_views(&app).await?;
            if ctx.json {
                return print_json(&views);
            }
            println!(
                "{:<28} {:<26} {:<14} {:<9} {:<8} {:<12} {:<21}",
                "RULE", "FIGURE", "THRESHOLD", "SEVERITY", "STATUS", "LAST VALUE", "LAST FIRED"
            );
            for v in views {
                let r = &v.rule;
                println!(
                    "{:<28} {:<26} {:<14} {:<9} {:<8} {:<12} {:<21}",
                    r.name,
                    r.figure.as_str(),
                    format!("{} {}{}", r.comparison.symbol(), r.threshold, v.unit),
                    r.severity.as_str(),
                    v.status.as_str(),
                    v.last_value
                        .map_or_else(|| "-".into(), |x| format!("{x:.2}{}", v.unit)),
                    show_time(v.last_fired),
                );
            }
            Ok(())
        }
        AlertsCmd::History { n } => {
            if !(1..=100_000).contains(&n) {
                return Err(UsageError("-n must be from 1 to 100000".into()).into());
            }
            let rows = app.store.deliveries(n).await?;
            if ctx.json {
                return print_json(&rows);
            }
            println!(
                "{:<6} {:<21} {:<24} {:<10} {:<8} {:<12} {:<3} ERROR",
                "ID", "FINISHED", "RULE", "KIND", "CHANNEL", "STATUS", "TRY"
            );
            for r in rows {
                println!(
                    "{:<6} {:<21} {:<24} {:<10} {:<8} {:<12} {:<3} {}",
                    r.id,
                    show_time(Some(r.finished_at)),
                    r.rule,
                    r.kind,
                    r.channel,
                    r.status,
                    r.attempts,
                    r.error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        AlertsCmd::Test { channel } => {
            let ch = Channel::parse(&channel).ok_or_else(|| {
                UsageError(format!(
                    "unknown channel {channel:?}: use email, slack or webhook"
                ))
            })?;
            let dispatcher = Dispatcher::new(app.store.clone(), &app.config.alerts)?;
            if !dispatcher.channels().is_configured(ch) {
                let hint = match ch {
                    Channel::Email => "set alerts.email.smtp_host and alerts.email.to",
                    Channel::Slack => "set alerts.slack.webhook_url",
                    Channel::Webhook => "set alerts.webhook.url and alerts.webhook.secret_env",
                };
                return Err(UsageError(format!(
                    "the {} channel is not configured: {hint}",
                    ch.as_str()
                ))
                .into());
            }
            let n = test_notification(ch, super::now());
            let outcome = dispatcher
                .enqueue(n)
                .wait()
                .await
                .into_iter()
                .next()
                .ok_or_else(|| anyhow::anyhow!("the test delivery task did not finish"))?;
            if ctx.json {
                print_json(&json!({
                    "channel": ch.as_str(),
                    "delivered": outcome.delivered,
                    "attempts": outcome.attempts,
                    "error": outcome.error,
                    "seconds": outcome.seconds,
                    "notification_id": outcome.notification_id,
                }))?;
            } else if outcome.delivered {
                eprintln!(
                    "test alert delivered through {} ({} attempt(s), {:.2}s)",
                    ch.as_str(),
                    outcome.attempts,
                    outcome.seconds
                );
            }
            if outcome.delivered {
                Ok(())
            } else {
                anyhow::bail!(
                    "the test alert through {} was not delivered after {} attempt(s): {}; it is recorded as a dead letter (alerts history)",
                    ch.as_str(),
                    outcome.attempts,
                    outcome.error.unwrap_or_default()
                )
            }
        }
    }
}
