//! The command line: the clap definitions (CLI.md is the contract) and one
//! file per command group. `main` parses, calls `run`, and turns the error
//! into a message and an exit status once.

mod alerts;
mod apikey;
mod audit;
mod config_cmd;
mod crypt;
mod init;
pub mod job;
mod keys;
mod reencrypt;
mod revoke;
mod run;
mod secrets;
mod serve;
mod status;
pub(crate) mod sync;
mod token;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{App, OpenMode, Paths};
use crate::config::Config;
use crate::error::UsageError;

/// keywarden: rotates an application's keys on schedule, re-encrypts its
/// secrets, syncs every instance through Redis and keeps a tamper-evident
/// audit log.
#[derive(Debug, Parser)]
#[command(
    name = "keywarden",
    version,
    about,
    after_help = "Exit status: 0 success; 1 the operation failed (nothing half-done is left); \
                  2 bad usage, config or input; 3 a verification said no.\n\
                  Docs: README.md. Every listing takes --json (one JSON document on stdout)."
)]
pub struct Cli {
    /// Config file (default: keywarden.toml in the working directory, if present).
    #[arg(long, global = true, env = "KEYWARDEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory for the embedded store and the root key file.
    #[arg(
        long,
        global = true,
        env = "KEYWARDEN_DATA_DIR",
        value_name = "DIR",
        default_value = ".keywarden"
    )]
    pub data_dir: PathBuf,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "KEYWARDEN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Print one JSON document on stdout instead of human text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the store, the root key and the first key of every purpose; safe to repeat.
    Init,
    /// The keyring at a glance: active keys, due dates, store, root key.
    Status,
    /// The worker: runs every enabled job on its cron schedule until SIGTERM.
    Run(run::RunArgs),
    /// List, run and review jobs.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// List, show and rotate keys.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Export the keyring snapshot (material wrapped under the root key).
    #[command(subcommand)]
    Keyring(keys::KeyringCmd),
    /// Public signing keys as a JWK Set (never an HMAC secret).
    Jwks,
    /// Encrypt standard input with the active data key; the Fernet token goes to stdout.
    Encrypt(crypt::EncryptArgs),
    /// Decrypt a Fernet token from standard input; the plaintext goes to stdout.
    Decrypt,
    /// Store and read application secrets.
    #[command(subcommand)]
    Secrets(secrets::SecretsCmd),
    /// Move every stored secret (and configured application table) to the active data key.
    Reencrypt(reencrypt::ReencryptArgs),
    /// Show the effective config or print an annotated default.
    #[command(subcommand)]
    Config(config_cmd::ConfigCmd),
    /// Sign, verify, encrypt, decrypt and revoke tokens (JWS and JWE).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// keywarden's own API keys: create, list, revoke, verify.
    #[command(subcommand)]
    Apikey(apikey::ApikeyCmd),
    /// The audit log: verify its hash chain, read it, checkpoint it.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Redis sync: status (outbox, epochs, per-instance lag) and publishing by hand.
    #[command(subcommand)]
    Sync(sync::SyncCmd),
    /// Alert rules, their state, delivery history and channel tests.
    #[command(subcommand)]
    Alerts(alerts::AlertsCmd),
    /// Emergency response: revoke a key, rotate, re-encrypt, publish, alert.
    Revoke(revoke::RevokeArgs),
    /// Serve the HTTP endpoint (health, metrics, JWKS, admin routes) without running jobs.
    Serve(serve::ServeArgs),
}

/// What every command gets: the parsed global flags.
pub struct Ctx {
    pub config_path: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub json: bool,
}

impl Ctx {
    /// Loads the config (file + environment).
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config_path.as_deref())?)
    }

    /// The config and where it came from (a file path or `defaults`).
    pub fn config_with_source(&self) -> anyhow::Result<(Config, String)> {
        Ok(Config::load_with_source(self.config_path.as_deref())?)
    }

    /// Opens config, store and root keys.
    pub async fn open(&self, mode: OpenMode) -> anyhow::Result<App> {
        self.open_with(self.config()?, mode).await
    }

    /// Opens store and root keys with a config already loaded (commands
    /// that read it first, for its source or its job files).
    pub async fn open_with(&self, config: Config, mode: OpenMode) -> anyhow::Result<App> {
        let paths = Paths::resolve(Some(&self.data_dir));
        App::open(config, paths, mode).await
    }
}

/// The current time, read once per command at the edge.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// Prints `value` as one JSON document on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Reads all of standard input, refusing a terminal with a hint on how to
/// pipe the value in (a value typed at a prompt would end up in shell
/// history or on screen).
pub fn read_stdin(what: &str, example: &str) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(UsageError(format!(
            "{what} reads from standard input, which is a terminal: pipe the value in, e.g. `{example}`"
        ))
        .into());
    }
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    stdin.lock().read_to_end(&mut buf)?;
    Ok(buf)
}

/// Formats an optional time for tables.
pub fn show_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = Ctx {
        config_path: cli.config,
        data_dir: cli.data_dir,
        json: cli.json,
    };
    match cli.command {
        Command::Init => init::run(&ctx).await,
        Command::Status => status::run(&ctx).await,
        Command::Run(args) => run::run(&ctx, args).await,
        Command::Job(cmd) => job::run(&ctx, cmd).await,
        Command::Keys(cmd) => keys::run(&ctx, cmd).await,
        Command::Keyring(cmd) => keys::run_keyring(&ctx, cmd).await,
        Command::Jwks => keys::jwks(&ctx).await,
        Command::Encrypt(args) => crypt::encrypt(&ctx, args).await,
        Command::Decrypt => crypt::decrypt(&ctx).await,
        Command::Secrets(cmd) => secrets::run(&ctx, cmd).await,
        Command::Reencrypt(args) => reencrypt::run(&ctx, args).await,
        Command::Config(cmd) => config_cmd::run(&ctx, cmd),
        Command::Token(cmd) => token::run(&ctx, cmd).await,
        Command::Apikey(cmd) => apikey::run(&ctx, cmd).await,
        Command::Audit(cmd) => audit::run(&ctx, cmd).await,
        Command::Sync(cmd) => sync::run(&ctx, cmd).await,
        Command::Alerts(cmd) => alerts::run(&ctx, cmd).await,
        Command::Serve(args) => serve::run(&ctx, args).await,
        Command::Revoke(args) => revoke::run(&ctx, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
