//! The command line: `countersink serve | migrate | flush`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::app::AppState;
use crate::config::{setting, ConfigError, CoreConfig, LogFormat, ServeConfig};
use crate::flush::{Flusher, WhenBusy};
use crate::http::server::HttpThreads;
use crate::schedule::Schedules;
use crate::{bootstrap, http, schedule};

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
    /// Recount users from the Notification table, repair any drift, print what was wrong, and
    /// exit (safe beside a running service). Needs --source-table.
    Reconcile(ReconcileArgs),
    /// Print the OpenAPI 3.1 document of the HTTP API (as checked into docs/openapi.json).
    Openapi,
    /// Rebuild the whole Redis state and every stored count from the Notification table, with
    /// progress, and exit. Events are answered 503 (senders retry) while it runs. Needs --source-table.
    Bootstrap,
}

/// What `countersink reconcile` recounts, and how fast.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Which users: one of --user or --all is required.
    #[command(flatten)]
    pub users: ReconcileUsers,
    /// With --all: users per second at most (0: no limit), to spare the database.
    #[arg(long, default_value_t = 2_000, requires = "all")]
    pub rate: u32,
}

/// Which users `countersink reconcile` recounts: given ones, or all of them. A group of its
/// own, so the usage line reads `<--user <USER_ID>|--all>` and `--rate` stays an option of `--all`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReconcileUsers {
    /// A user to recount; repeat for several.
    #[arg(long = "user", value_name = "USER_ID")]
    pub users: Vec<u64>,
    /// Every user with a notification or a stored count.
    #[arg(long)]
    pub all: bool,
}

/// Dependencies whose info lines are start-up noise for an operator (the scheduler announces
/// its own set-up): they log at warn unless `COUNTERSINK_LOG` names them.
const QUIET_DEPENDENCIES: [&str; 1] = ["tokio_cron_scheduler"];

/// The log filter: `COUNTERSINK_LOG` (a tracing filter, default `info`) with the dependencies
/// of [`QUIET_DEPENDENCIES`] at warn unless it names them. An invalid filter falls back to
/// `info`; the second value then says what was wrong, for the binary to log once logging is up.
pub fn log_filter(spec: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("info");
    let (mut filter, problem) = match tracing_subscriber::EnvFilter::try_new(spec) {
        Ok(filter) => (filter, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new("info"),
            Some(format!("COUNTERSINK_LOG={spec:?} is not a tracing filter ({e}); logging at info")),
        ),
    };
    for dependency in QUIET_DEPENDENCIES {
        if !spec.contains(dependency) {
            if let Ok(directive) = format!("{dependency}=warn").parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    (filter, problem)
}

impl Cli {
    /// Parses the process's arguments and environment, exiting with clap's message when they
    /// are wrong. A `COUNTERSINK_*` variable set to the empty string counts as unset, so its
    /// default applies: `KEY=` in an environment file (`.env.sample`) means "not set", as it
    /// does for systemd and most `.env` loaders.
    pub fn parse_args() -> Cli {
        Self::try_parse_with(std::env::args_os(), |name| std::env::var_os(name)).unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_args`] over given arguments and a given environment lookup, for tests.
    pub fn try_parse_with(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
        lookup: impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
    ) -> Result<Cli, clap::Error> {
        let command = without_empty_env(<Cli as clap::CommandFactory>::command(), &lookup);
        let mut matches = command.try_get_matches_from(args)?;
        <Cli as clap::FromArgMatches>::from_arg_matches_mut(&mut matches)
    }

    /// Validates the settings and runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        // The document needs no settings; everything else starts by checking them.
        if !matches!(self.command, Command::Openapi) {
            self.core.validate()?;
        }
        match self.command {
            Command::Serve(serve) => run_serve(&self.core, *serve).await,
            Command::Migrate => {
                let state = AppState::new(&self.core, None)?;
                let applied = state.db.migrate().await.context("migrating the database")?;
                print_line(&if applied.is_empty() {
                    "no migrations to apply".to_string()
                } else {
                    format!("applied: {}", applied.join(", "))
                })
            }
            Command::Openapi => print_line(&http::openapi::document()),
            Command::Reconcile(args) => run_reconcile(&self.core, args).await,
            Command::Bootstrap => {
                let state = AppState::new(&self.core, None)?;
                state.bootstrapper.check_source().await.context("checking the Notification table (--source-*)")?;
                let report = state
                    .bootstrapper
                    .bootstrap(
                        bootstrap::Batching::default(),
                        bootstrap::Rebuild::Always,
                        bootstrap::progress_printer(),
                    )
                    .await?;
                print_line(&serde_json::to_string_pretty(&report)?)
            }
            Command::Flush => {
                let state = AppState::new(&self.core, None)?;
                let report = state.flusher.flush(WhenBusy::Wait(CLI_FLUSH_WAIT)).await.context("flushing")?;
                print_line(&serde_json::to_string_pretty(&report)?)
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
    schedule::validate_cron(&serve.flush_cron, setting!(ServeConfig.flush_cron))?;
    schedule::validate_cron(&serve.reconcile_cron, setting!(ServeConfig.reconcile_cron))?;
    if core.source.source_table.is_none() && serve.reconcile_cron != schedule::CRON_OFF {
        let (table_flag, table_env) = setting!(SourceConfig.source_table).names();
        return Err(ConfigError::new(
            setting!(ServeConfig.reconcile_cron),
            format!("needs {table_flag} ({table_env}): a reconcile recounts from the Notification table"),
        )
        .into());
    }
    let state = AppState::new(core, Some(&serve))?;
    warn_if_few_file_descriptors(core, &serve);
    if state.auth.is_open() {
        warn!(listen = %serve.listen, "running without a webhook secret or an admin token (--insecure-no-auth): anyone who reaches the port can change counts");
    }
    if serve.migrate_on_start {
        let applied = state.db.migrate().await.context("migrating the database at start-up (--migrate-on-start)")?;
        if !applied.is_empty() {
            info!(migrations = ?applied, "applied migrations");
        }
    }
    match state.store.eviction_policy().await {
        Ok(Some(policy)) if policy != "noeviction" && !serve.allow_redis_eviction => anyhow::bail!(
            "Redis may evict keys (maxmemory-policy {policy}): an evicted state or pending delta is a count \
             silently lost. Set `maxmemory-policy noeviction` on Redis (CONFIG SET maxmemory-policy noeviction, \
             and in redis.conf), or pass --allow-redis-eviction (COUNTERSINK_ALLOW_REDIS_EVICTION) to start anyway"
        ),
        Ok(Some(policy)) if policy != "noeviction" => {
            warn!(policy, "Redis may evict keys (--allow-redis-eviction): counts can be lost without notice");
        }
        Ok(Some(_)) => {}
        Ok(None) => warn!(
            "cannot read Redis's maxmemory-policy (CONFIG is disabled?); make sure it is noeviction, or counts can \
             be lost when Redis is full"
        ),
        Err(e) => warn!(error = %e, "redis is not reachable yet; events will be answered 503 until it is"),
    }
    let mut workers = Vec::new();
    if state.reconciler.is_configured() {
        state.reconciler.check_source().await.context("checking the Notification table (--source-*)")?;
        workers.push(tokio::spawn(state.reconciler.clone().run_recount_worker(RECOUNT_INTERVAL)));
    }
    // Every process watches: a Redis restart is recovered from with a table or without.
    workers.push(tokio::spawn(state.bootstrapper.clone().watch_redis_state(
        REDIS_STATE_CHECK,
        serve.auto_bootstrap,
        serve.allow_redis_eviction,
    )));
    let schedules = Schedules {
        flush_cron: serve.flush_cron.clone(),
        reconcile_cron: serve.reconcile_cron.clone(),
        reconcile_rate: serve.reconcile_rate,
    };
    let mut scheduler = schedule::start(&schedules, state.flusher.clone(), state.reconciler.clone()).await?;
    let flusher = state.flusher.clone();
    let live = state.live.clone();
    let http_threads = serve.http_threads();
    let threads = HttpThreads::start(http_threads, || Ok(http::router(state.for_http_thread()?)))?;
    let listener = TcpListener::bind(serve.listen).await.with_context(|| format!("binding {}", serve.listen))?;
    info!(address = %listener.local_addr()?, http_threads, "listening");
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let connections = http::server::ConnectionLimits {
        header_timeout: Duration::from_secs(serve.header_timeout_secs),
        max_connections: serve.max_connections,
    };
    let mut server = tokio::spawn(http::server::serve(listener, threads.clone(), connections, async move {
        let _ = stopping.changed().await;
    }));
    tokio::select! {
        result = &mut server => {
            result.context("the HTTP server task")?.context("serving HTTP")?;
            anyhow::bail!("the HTTP server stopped by itself");
        }
        () = shutdown_signal() => {
            // Open live streams would hold the server's graceful stop up for ever: end them first.
            live.close();
        }
    }
    let stopped = shut_down(
        ShutDown { stop, server, scheduler: scheduler.as_mut(), flusher, workers },
        serve.shutdown_timeout_secs,
    )
    .await;
    // The final flush is done: the HTTP threads may stop (a connection of the shared store that a
    // request on one of them opened is driven there).
    drop(threads);
    stopped
}

/// Descriptors the process needs besides client connections, the database pool and the HTTP
/// threads: Redis (the shared connection, pub/sub, leases), the listener, stdio, epoll, SQLite
/// files, and headroom.
const RESERVED_FILE_DESCRIPTORS: u64 = 64;
/// What each HTTP thread opens: its runtime's epoll and wake-up descriptors, and its Redis
/// connections (commands, and `WAIT` pipelines with --redis-wait-replicas; none of its own under
/// Sentinel or on a cluster).
const FILE_DESCRIPTORS_PER_HTTP_THREAD: u64 = 4;

/// Warns when the open-file limit (RLIMIT_NOFILE, soft) is below what `--max-connections` and
/// the pools may open: past it, accepts and Redis or database reconnects fail with "Too many
/// open files" (issue #15: systemd's default soft limit is 1,024).
fn warn_if_few_file_descriptors(core: &CoreConfig, serve: &ServeConfig) {
    let needed = (serve.max_connections as u64)
        .saturating_add(u64::from(core.db_pool_size))
        .saturating_add(FILE_DESCRIPTORS_PER_HTTP_THREAD * serve.http_threads() as u64)
        .saturating_add(RESERVED_FILE_DESCRIPTORS);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    // `None` is RLIM_INFINITY: no limit.
    let Some(soft) = limit.current else { return };
    if soft < needed {
        warn!(
            nofile_soft_limit = soft,
            nofile_hard_limit = limit.maximum,
            needed,
            max_connections = serve.max_connections,
            "the open-file limit (RLIMIT_NOFILE soft limit {soft}) is below the {needed} descriptors that \
             --max-connections ({}) and the pools may need: connections past it fail with \"Too many open files\". \
             Raise it (systemd: LimitNOFILE=65536, as deploy/countersink.service sets; a shell: ulimit -n 65536) \
             or lower --max-connections (COUNTERSINK_MAX_CONNECTIONS)",
            serve.max_connections
        );
    }
}

/// What a graceful shutdown stops, in order.
struct ShutDown<'a> {
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    scheduler: Option<&'a mut tokio_cron_scheduler::JobScheduler>,
    flusher: Flusher,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// Stops accepting, lets requests in flight finish (until the deadline), stops the schedule,
/// waits for a running flush and flushes what is pending, then drops its handles on the pools
/// (their connections close as the process exits). A failed final flush loses nothing (the
/// deltas stay in Redis) but makes the exit code non-zero.
async fn shut_down(mut parts: ShutDown<'_>, timeout_secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    info!(timeout_secs, "shutting down: new connections are refused; waiting for requests in flight");
    // The receiver lives in the server task: it is gone only if that task ended already.
    let _ = parts.stop.send(true);
    match tokio::time::timeout_at(deadline.into(), &mut parts.server).await {
        Ok(Ok(Ok(()))) => info!("requests done; stopping the schedule"),
        // Whatever went wrong with serving, the final flush is still worth running.
        Ok(Ok(Err(e))) => error!(error = %e, "the HTTP server failed while stopping"),
        Ok(Err(e)) => error!(error = %e, "the HTTP server task failed while stopping"),
        Err(_) => {
            // Each request is atomic: it applies all of its events or none, and what it applies
            // after the final flush stays pending in Redis for the next start.
            warn!(timeout_secs, "requests still in flight at the shutdown deadline are not waited for");
            parts.server.abort();
        }
    }
    if let Some(scheduler) = parts.scheduler {
        if let Err(e) = scheduler.shutdown().await {
            warn!(error = %e, "could not stop the scheduler; flushing anyway");
        }
    }
    // Waits for a flush (or a reconcile step) running in this process or another, then flushes.
    let wait = deadline.saturating_duration_since(Instant::now()).max(MIN_FINAL_FLUSH_WAIT);
    info!(wait_secs = wait.as_secs(), "final flush: waiting for a running flush, then flushing what is pending");
    let flushed = parts.flusher.flush(WhenBusy::Wait(wait)).await;
    for worker in &parts.workers {
        worker.abort();
    }
    drop(parts.flusher);
    match flushed {
        Ok(report) => {
            info!(users_written = report.users_written, "final flush done; stopped");
            Ok(())
        }
        Err(e) => {
            error!(error = %e, "final flush failed; the pending deltas stay in Redis for the next flush");
            Err(anyhow::Error::new(e)
                .context("the final flush at shutdown failed (nothing is lost: the deltas stay in Redis)"))
        }
    }
}

/// The least a final flush waits for a running one, even past the shutdown deadline: a flush
/// takes seconds at most, and skipping the final flush only delays the stored counts.
const MIN_FINAL_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// How often `serve` checks that the Redis state is still there and that Redis did not restart
/// (an event refused for a restart wakes the check at once).
const REDIS_STATE_CHECK: Duration = Duration::from_secs(2);

/// How often queued recounts from other processes are looked for (this process's own start at once).
const RECOUNT_INTERVAL: Duration = Duration::from_secs(1);

async fn run_reconcile(core: &CoreConfig, args: ReconcileArgs) -> anyhow::Result<()> {
    let state = AppState::new(core, None)?;
    state.reconciler.check_source().await.context("checking the Notification table (--source-*)")?;
    let report = if args.users.all {
        let mut last_line = std::time::Instant::now();
        state
            .reconciler
            .reconcile_all(args.rate, |report| {
                if last_line.elapsed() >= Duration::from_secs(2) {
                    last_line = std::time::Instant::now();
                    let rate = report.users_checked as f64 / (report.duration_ms.max(1) as f64 / 1000.0);
                    // Not eprintln!: it panics when stderr is closed; a lost progress line is no failure.
                    let _ = writeln!(
                        std::io::stderr(),
                        "reconcile: {} users checked, {} drifted, {rate:.0} users/s",
                        report.users_checked,
                        report.drift.len()
                    );
                }
            })
            .await
            .context("reconcile --all stopped (the users reconciled before stay repaired; run it again once the cause is fixed)")?
    } else {
        state.reconciler.reconcile_users(&args.users.users).await?
    };
    print_line(&serde_json::to_string_pretty(&report)?)?;
    match failed_users_message(&report) {
        Some(message) => Err(anyhow::Error::msg(message)),
        None => Ok(()),
    }
}

/// Users named in a failure message at most; the report printed above lists every one.
const FAILED_USERS_NAMED: usize = 20;

/// What `countersink reconcile --all` says when some steps failed: which users, why, what to do.
fn failed_users_message(report: &crate::reconcile::ReconcileReport) -> Option<String> {
    let first = report.failed.first()?;
    let users: Vec<u64> = report.failed.iter().flat_map(|step| step.user_ids.iter().copied()).collect();
    let mut named = users.iter().take(FAILED_USERS_NAMED).map(u64::to_string).collect::<Vec<_>>().join(", ");
    if users.len() > FAILED_USERS_NAMED {
        named.push_str(&format!(
            " and {} more (every one under \"failed\" in the report)",
            users.len() - FAILED_USERS_NAMED
        ));
    }
    Some(format!(
        "{} users could not be reconciled ({} failed {}; the first: {}): {named}. \
         The other users were reconciled. Fix the cause, then reconcile these again \
         (`countersink reconcile --user ID ...`, or `--all`)",
        users.len(),
        report.failed.len(),
        if report.failed.len() == 1 { "step" } else { "steps" },
        first.error
    ))
}

/// `command` with the environment binding of every argument whose variable is set but empty
/// removed, in every subcommand.
fn without_empty_env(
    command: clap::Command,
    lookup: &impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
) -> clap::Command {
    let command = command.mut_args(|arg| match arg.get_env() {
        Some(name) if lookup(name).is_some_and(|value| value.is_empty()) => arg.env(None::<&'static str>),
        _ => arg,
    });
    let names: Vec<String> = command.get_subcommands().map(|sub| sub.get_name().to_string()).collect();
    names.iter().fold(command, |command, name| command.mut_subcommand(name, |sub| without_empty_env(sub, lookup)))
}

/// Writes a command's answer to stdout. A closed stdout (`countersink flush | head -1`) is not a
/// failure of the command: what was asked was done, and nobody reads the rest.
fn print_line(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(e).context("writing to stdout")),
        _ => Ok(()),
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let empty = ["COUNTERSINK_SOURCE_TABLE", "COUNTERSINK_READ_TOKEN", "COUNTERSINK_REDIS_PREFIX"];
        let lookup = |name: &std::ffi::OsStr| empty.iter().any(|e| name == *e).then(std::ffi::OsString::new);
        let cli = Cli::try_parse_with(["countersink", "serve"], lookup).expect("parses");
        assert_eq!(cli.core.source.source_table, None);
        assert_eq!(cli.core.redis_prefix, "countersink");
        let Command::Serve(serve) = cli.command else { panic!("not serve") };
        assert_eq!(serve.read_token, None);
    }

    #[test]
    fn quiet_dependencies_stay_at_warn_unless_named() {
        let filter = |spec| log_filter(spec).0.to_string();
        assert_eq!(filter(None), "tokio_cron_scheduler=warn,info");
        assert_eq!(filter(Some("debug")), "tokio_cron_scheduler=warn,debug");
        assert_eq!(filter(Some("tokio_cron_scheduler=debug")), "tokio_cron_scheduler=debug");
        let (filter, problem) = log_filter(Some("countersink=loud"));
        assert_eq!(filter.to_string(), "tokio_cron_scheduler=warn,info");
        assert!(problem.is_some_and(|p| p.contains("COUNTERSINK_LOG")));
    }
}
