//! `keywarden serve`: the HTTP endpoint alone, without the scheduler, for
//! deployments whose jobs run from an external cron but still want
//! `/metrics`, `/readyz` and the JWKS. `keywarden run` serves the same
//! endpoint inside the worker.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;

use super::Ctx;
use crate::app::OpenMode;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (default: http.bind from config).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<SocketAddr>,
}

pub async fn run(ctx: &Ctx, args: ServeArgs) -> anyhow::Result<()> {
    let (config, config_source) = ctx.config_with_source()?;
    let mut app = ctx.open_with(config, OpenMode::Existing).await?;
    if let Err(e) = app.audit_config_loaded(&config_source, super::now()).await {
        tracing::error!("cannot record the config load in the audit log: {e:#}");
    }
    if let Some(bind) = args.bind {
        app.config.http.bind = bind;
    }
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot listen for SIGTERM");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down the HTTP endpoint");
    };
    eprintln!("serving on http://{}", app.config.http.bind);
    crate::http::serve(Arc::new(app), shutdown).await
}
