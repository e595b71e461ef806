//! The command line: `countersink serve | migrate | flush`.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::app::AppState;
use crate::config::{CoreConfig, LogFormat, ServeConfig};
use crate::flush::WhenBusy;
use crate::{http, schedule};

/// How long `countersink flush` waits for a flush already running elsewhere.
const CLI_FLUSH_WAIT: Duration = Duration::from_secs(120);

/// countersink: exact, fast unread-notification counters for Django.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Where Redis and the database are, and how to log.
    #[command(flatten)]
    pub core: CoreConfig,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service and the scheduled flush.
    Serve(Box<ServeConfig>),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Flush pending deltas into the count table now, print what was written, and exit
    /// (the manage.py-style trigger; safe beside a running service).
    Flush,
}

impl Cli {
    /// Validates the settings and runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        self.core.validate()?;
        match self.command {
            Command::Serve(serve) => run_serve(&self.core, *serve).await,
            Command::Migrate => {
                let state = AppState::new(&self.core, None)?;
                let applied = state.db.migrate().await.context("migrating the database")?;
                println!(
                    "{}",
                    if applied.is_empty() {
                        "no migrations to apply".to_string()
                    } else {
                        format!("applied: {}", applied.join(", "))
                    }
                );
                Ok(())
            }
            Command::Flush => {
                let state = AppState::new(&self.core, None)?;
                let report = state.flusher.flush(WhenBusy::Wait(CLI_FLUSH_WAIT)).await.context("flushing")?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            }
        }
    }

    /// The log format chosen.
    pub fn log_format(&self) -> LogFormat {
        self.core.log_format
    }
}

async fn run_serve(core: &CoreConfig, serve: ServeConfig) -> anyhow::Result<()> {
    serve.validate()?;
    schedule::validate_cron(&serve.flush_cron)?;
    let state = AppState::new(core, Some(&serve))?;
    if state.auth.is_open() {
        warn!(listen = %serve.listen, "running without a webhook secret or an admin token (--insecure-no-auth): anyone who reaches the port can change counts");
    }
    if serve.migrate_on_start {
        let applied = state.db.migrate().await.context("migrating the database at start-up (--migrate-on-start)")?;
        if !applied.is_empty() {
            info!(migrations = ?applied, "applied migrations");
        }
    }
    if let Err(e) = state.store.ping().await {
        warn!(error = %e, "redis is not reachable yet; events will be answered 503 until it is");
    }
    let mut scheduler = schedule::start(&serve.flush_cron, state.flusher.clone()).await?;
    let router = http::router(state);
    let listener = TcpListener::bind(serve.listen).await.with_context(|| format!("binding {}", serve.listen))?;
    info!(address = %listener.local_addr()?, "listening");
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await?;
    if let Some(scheduler) = scheduler.as_mut() {
        scheduler.shutdown().await?;
    }
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
