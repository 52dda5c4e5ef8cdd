//! The `keywarden` binary: parse, dispatch, and turn an error into a message
//! and an exit status once.

use clap::Parser;
use keywarden::cli::{Cli, LogFormat};

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KEYWARDEN_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("warn,keywarden=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One TLS stack for every client (PostgreSQL, Redis, SMTP, HTTP).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    let result = runtime.block_on(keywarden::cli::run(cli));
    if let Err(err) = result {
        eprintln!("keywarden: error: {err:#}");
        std::process::exit(keywarden::error::exit_code(&err));
    }
}
