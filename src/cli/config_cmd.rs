//! `keywarden config show|default`.

use clap::Subcommand;

use super::Ctx;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// The effective config (file + environment), secrets redacted.
    Show,
    /// An annotated default config file.
    Default,
}

pub fn run(ctx: &Ctx, cmd: ConfigCmd) -> anyhow::Result<()> {
    match cmd {
        ConfigCmd::Show => {
            let config = ctx.config()?;
            if ctx.json {
                let text = config.to_redacted_toml();
                let value: toml::Value = toml::from_str(&text)?;
                super::print_json(&value)?;
            } else {
                print!("{}", config.to_redacted_toml());
            }
        }
        ConfigCmd::Default => print!("{}", Config::default_annotated()),
    }
    Ok(())
}
