//! Every setting, as a CLI flag with a `COUNTERSINK_*` environment variable as fallback.
//!
//! clap parses; [`CoreConfig::validate`] and [`ServeConfig::validate`] check what clap's types
//! cannot, once at start-up, with messages that name both the flag and the variable. The
//! Notification table's names ([`SourceConfig`]) are parsed once, into the checked mapping, by
//! `Source::from_config` when the state is built: this module imports no domain module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, FromArgMatches, ValueEnum};

use crate::db::{Backend, MAX_BINDS};

/// The most users a flush writes in one upsert statement.
///
/// Each row binds two parameters; SQLite allows 32,766 binds per statement, PostgreSQL and
/// MySQL 65,535, so 16,383 rows is the largest chunk every backend accepts.
pub const MAX_FLUSH_CHUNK_USERS: usize = MAX_BINDS / 2;

/// The most users one read (`--max-read-users`) may ask for: the stored counts are read with
/// one bind per user (and one per open batch), well under every backend's bind limit.
pub const MAX_READ_USERS: usize = 10_000;

/// How long the flush lease lasts unless renewed (`--flush-lock-ttl-secs`): a holder that dies
/// blocks flushes, reconciles and recounts of the other processes for at most this long.
pub const DEFAULT_FLUSH_LOCK_TTL_SECS: u64 = 15;

/// The shortest lifetime `--max-stream-token-secs` may allow: a page must get a minute to connect.
pub const MIN_STREAM_TOKEN_SECS: u64 = 60;

/// The longest lifetime `--max-stream-token-secs` may allow: a token leaked from a URL (a proxy's
/// access log) must be useless within a day.
pub const MAX_STREAM_TOKEN_SECS: u64 = 24 * 60 * 60;

/// The most `--worker-threads` or `--http-threads`: each is an OS thread started with its
/// runtime, and a sidecar that mostly waits on Redis has no use for more.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Settings every subcommand needs: where Redis and the database are.
#[derive(Debug, Clone, Args)]
pub struct CoreConfig {
    /// Redis URL (`redis://`; TLS, `rediss://`, is not built in: reach a Redis across a network
    /// through a TLS tunnel).
    #[arg(long, global = true, env = "COUNTERSINK_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Redis Sentinel addresses (`host:port`, comma-separated; or `redis://[user]:password@host:port`
    /// URLs for Sentinels that require a password): the master is then found through them by
    /// `--redis-sentinel-master` and followed across failovers, and `--redis-url` gives only the
    /// database number and the credentials of the master.
    #[arg(long, global = true, env = "COUNTERSINK_REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,

    /// The name Sentinel monitors the master under (its `sentinel monitor <name> ...` line).
    #[arg(long, global = true, env = "COUNTERSINK_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Redis Cluster nodes (`host:port`, comma-separated; a few are enough): the master of the
    /// slot the deployment's keys hash to is then found through them and followed across
    /// failovers, and `--redis-url` gives only the credentials. Every key of a deployment is in
    /// that one slot (docs/deployment.md, *Redis Cluster*: stop the sidecars to move it).
    #[arg(long, global = true, env = "COUNTERSINK_REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,

    /// Prefix of every Redis key; several deployments can share one Redis under different prefixes.
    /// Letters, digits and `_ - . :` only (braces are added by countersink as a Redis Cluster hash tag).
    #[arg(long, global = true, env = "COUNTERSINK_REDIS_PREFIX", default_value = "countersink")]
    pub redis_prefix: String,

    /// Database URL. The scheme picks the backend: `postgres://` / `postgresql://` for PostgreSQL,
    /// `mysql://` / `mariadb://` for MySQL or MariaDB, `sqlite://PATH` (or a bare file path) for
    /// SQLite, the embedded default.
    #[arg(long, global = true, env = "COUNTERSINK_DATABASE_URL", default_value = "sqlite://countersink.sqlite3")]
    pub database_url: String,

    /// Database connections kept in the pool.
    #[arg(long, global = true, env = "COUNTERSINK_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,

    /// Seconds to wait for a database connection before answering 503.
    #[arg(long, global = true, env = "COUNTERSINK_DB_TIMEOUT_SECS", default_value_t = 5)]
    pub db_timeout_secs: u64,

    /// Users written per upsert statement during a flush (at most 16383: two binds each, within
    /// SQLite's limit of 32766 per statement).
    #[arg(long, global = true, env = "COUNTERSINK_FLUSH_CHUNK_USERS", default_value_t = 5_000)]
    pub flush_chunk_users: usize,

    /// Seconds the flush lease lasts unless renewed. Its holder (a flush, reconcile, recount or
    /// bootstrap) renews it every third of that while it works, so this bounds how long a process
    /// that died blocks the others; a holder that stalls longer loses it, and its writes are refused.
    #[arg(long, global = true, env = "COUNTERSINK_FLUSH_LOCK_TTL_SECS", default_value_t = DEFAULT_FLUSH_LOCK_TTL_SECS)]
    pub flush_lock_ttl_secs: u64,

    /// Seconds a flush may spend writing one batch before it is rolled back (a slow or locked
    /// database); the batch stays in Redis and the next flush applies it.
    #[arg(long, global = true, env = "COUNTERSINK_FLUSH_TIMEOUT_SECS", default_value_t = 120)]
    pub flush_timeout_secs: u64,

    /// Where the Notification table is, for reconcile and recounts.
    #[command(flatten)]
    pub source: SourceConfig,

    /// Threads that run the service's work besides answering HTTP (1 to 1024): accepting
    /// connections, the schedule, flushes and reconciles (also those asked over HTTP), the live
    /// streams' subscriber, the watch on Redis, and the commands other than `serve`; unset: one per
    /// core. `serve` answers requests on --http-threads.
    #[arg(long, global = true, env = "COUNTERSINK_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Log format: `text` for people, `json` for log shippers.
    #[arg(long, global = true, env = "COUNTERSINK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where the notifications are. Optional: without `--source-table`, reconcile and recount are off.
#[derive(Debug, Clone, Args)]
pub struct SourceConfig {
    /// The Notification table (Django's `db_table`, e.g. `notifications_notification`).
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_TABLE")]
    pub source_table: Option<String>,

    /// Its primary-key column.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_ID_COLUMN", default_value = "id")]
    pub source_id_column: String,

    /// Its recipient column (a foreign key's column, e.g. `recipient_id`).
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_USER_COLUMN", default_value = "recipient_id")]
    pub source_user_column: String,

    /// Its read-state column.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_UNREAD_COLUMN", default_value = "unread")]
    pub source_unread_column: String,

    /// The value of the read-state column that means unread: `true` for `unread`, `false` for `is_read`.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_UNREAD_WHEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub source_unread_when: bool,

    /// A soft-delete column, if any: a true value counts as deleted.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_DELETED_COLUMN")]
    pub source_deleted_column: Option<String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            source_table: None,
            source_id_column: "id".into(),
            source_user_column: "recipient_id".into(),
            source_unread_column: "unread".into(),
            source_unread_when: true,
            source_deleted_column: None,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings of `countersink serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address the HTTP server listens on. Keep it on a private interface: see the README.
    #[arg(long, env = "COUNTERSINK_LISTEN", default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,

    /// When the scheduled flush runs: a cron expression with seconds (`sec min hour day month weekday`),
    /// or `off` to flush only on demand.
    #[arg(long, env = "COUNTERSINK_FLUSH_CRON", default_value = "*/10 * * * * *")]
    pub flush_cron: String,

    /// When the scheduled reconcile of all users runs (cron with seconds), or `off`. It needs
    /// --source-table and walks users at --reconcile-rate; drift found is logged.
    #[arg(long, env = "COUNTERSINK_RECONCILE_CRON", default_value = "off")]
    pub reconcile_cron: String,

    /// Users per second a reconcile of all users checks at most (0: no limit).
    #[arg(long, env = "COUNTERSINK_RECONCILE_RATE", default_value_t = 2_000)]
    pub reconcile_rate: u32,

    /// With --source-table: when the Redis state is missing (first start, or Redis lost its
    /// data), rebuild it from the table by itself. Otherwise events wait (503) for `countersink bootstrap`.
    #[arg(long, env = "COUNTERSINK_AUTO_BOOTSTRAP", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_bootstrap: bool,

    /// Start even if Redis may evict keys (a `maxmemory-policy` other than `noeviction`). Evicted
    /// state or pending deltas are counts silently lost: for tests and experiments only.
    #[arg(long, env = "COUNTERSINK_ALLOW_REDIS_EVICTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_redis_eviction: bool,

    /// Apply pending database migrations at start-up (`countersink migrate` does it on its own).
    #[arg(long, env = "COUNTERSINK_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "COUNTERSINK_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most events accepted in one request.
    #[arg(long, env = "COUNTERSINK_MAX_BATCH_EVENTS", default_value_t = 1_000)]
    pub max_batch_events: usize,

    /// Most state shards one request may create. A shard is a Redis string of up to 16 KiB that
    /// holds 65,536 consecutive notification ids; events with ids far apart would each create one
    /// (docs/security.md, *Redis memory*). A request over the cap is refused with 400 `too_sparse`.
    #[arg(long, env = "COUNTERSINK_MAX_NEW_STATE_SHARDS", default_value_t = 16)]
    pub max_new_state_shards: usize,

    /// Most calls of the Redis apply script at once, per --http-threads thread. Event requests
    /// that arrive while they all run wait for the next call and share it (a group commit, at most
    /// --max-batch-events events a call). Redis runs scripts one at a time, so on loopback a second
    /// call in flight only waits in Redis for single events and one at a time merges the most
    /// (docs/design.md; for 100-event requests a second call did better); with Redis across
    /// a network, 2 should hide the round trip (not measured).
    #[arg(long, env = "COUNTERSINK_APPLY_CALLS_IN_FLIGHT", default_value_t = 1)]
    pub apply_calls_in_flight: usize,

    /// Most Redis calls reading held counts at once, per --http-threads thread. Reads that arrive
    /// while they all run wait for the next call and share it (one pipeline: the marker checks
    /// once, then every merged read's users, at most --max-read-users a call); docs/design.md,
    /// *Merged reads*.
    #[arg(long, env = "COUNTERSINK_READ_CALLS_IN_FLIGHT", default_value_t = 1)]
    pub read_calls_in_flight: usize,

    /// Threads that serve HTTP connections (1 to 1024); unset: one per core. Each is a runtime of
    /// its own with its own Redis connection (under Sentinel or on a cluster, one shared), and
    /// serves the connections handed to it start to end: the events and reads of a request, and
    /// their Redis calls, run on its thread. --apply-calls-in-flight and --read-calls-in-flight
    /// count per thread. The rest (the schedule, flushes and reconciles, also those asked over
    /// HTTP, the live streams' subscriber, the watch on Redis) runs on the --worker-threads;
    /// status, readiness and metrics answer on the HTTP threads through the shared connection.
    #[arg(long, env = "COUNTERSINK_HTTP_THREADS")]
    pub http_threads: Option<usize>,

    /// Most users in one bulk read (at most 10000: the stored counts are read with one bind each).
    #[arg(long, env = "COUNTERSINK_MAX_READ_USERS", default_value_t = 1_000)]
    pub max_read_users: usize,

    /// Most requests handled at once; more are answered 503 with `Retry-After` instead of queueing.
    /// A request takes its slot once its body has arrived; /healthz and /readyz take none.
    #[arg(long, env = "COUNTERSINK_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Most live-count streams (`GET /v1/users/{id}/unread-count/stream`) open at once; more are
    /// answered 503. Each holds a connection and a little memory, not a request slot.
    #[arg(long, env = "COUNTERSINK_MAX_LIVE_STREAMS", default_value_t = 1_000)]
    pub max_live_streams: usize,

    /// Most live streams one user may have open at once in this process (tabs, devices); more are
    /// answered 429.
    #[arg(long, env = "COUNTERSINK_MAX_LIVE_STREAMS_PER_USER", default_value_t = 16)]
    pub max_live_streams_per_user: usize,

    /// Most live streams one client address may have open at once in this process; more are
    /// answered 429. Behind a reverse proxy, set --live-address-header, or the proxy's own address
    /// is what counts.
    #[arg(long, env = "COUNTERSINK_MAX_LIVE_STREAMS_PER_ADDRESS", default_value_t = 100)]
    pub max_live_streams_per_address: usize,

    /// A request header holding the client's address for --max-live-streams-per-address (e.g.
    /// `x-real-ip`, as set by the reverse proxy in front of the streams). Only when every stream
    /// comes through that proxy: a client reaching the port directly could forge it. Unset: the
    /// connection's peer address.
    #[arg(long, env = "COUNTERSINK_LIVE_ADDRESS_HEADER")]
    pub live_address_header: Option<String>,

    /// Longest lifetime a stream token may claim, in seconds (60 to 86400); a token minted to live
    /// longer is refused (401). The Django package mints tokens for STREAM_TOKEN_TTL (3600 by default).
    #[arg(long, env = "COUNTERSINK_MAX_STREAM_TOKEN_SECS", default_value_t = 3_600)]
    pub max_stream_token_secs: u64,

    /// Most client connections open at once (live streams, requests in flight and idle
    /// keep-alive connections together); further clients wait in the listen queue. Each is a
    /// file descriptor: keep it under the open-file limit (LimitNOFILE).
    #[arg(long, env = "COUNTERSINK_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,

    /// Seconds a connection may take to send a request's line and headers, counted from when it
    /// opens or from its previous response: a slow or idle (keep-alive) connection is closed after it.
    #[arg(long, env = "COUNTERSINK_HEADER_TIMEOUT_SECS", default_value_t = 15)]
    pub header_timeout_secs: u64,

    /// Seconds a request may take to send its whole body after its headers; a slower one is
    /// answered 408 and closed. The body is received before the request takes a slot of
    /// --max-concurrent-requests, so slow senders cannot hold those.
    #[arg(long, env = "COUNTERSINK_BODY_TIMEOUT_SECS", default_value_t = 10)]
    pub body_timeout_secs: u64,

    /// Accepted webhook signing secrets (`whsec_…`, space-separated while rotating). Prefer the
    /// environment variable or the file: command lines are visible to other users of the machine.
    #[arg(long, env = "COUNTERSINK_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// A file holding the webhook secrets, instead of --webhook-secret.
    #[arg(long, env = "COUNTERSINK_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Bearer token for the admin endpoints (flush, reconcile, status); at least 16 characters.
    #[arg(long, env = "COUNTERSINK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the admin token, instead of --admin-token.
    #[arg(long, env = "COUNTERSINK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Bearer token required to read counts; reads are open when unset. At least 16 characters.
    #[arg(long, env = "COUNTERSINK_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,

    /// A file holding the read token, instead of --read-token.
    #[arg(long, env = "COUNTERSINK_READ_TOKEN_FILE")]
    pub read_token_file: Option<PathBuf>,

    /// Run without a webhook secret or an admin token: anyone who reaches the port can change
    /// counts. For local development only; logged as a warning at start-up.
    #[arg(long, env = "COUNTERSINK_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Seconds a request's `webhook-id` is remembered, so a replay is answered as already applied.
    /// Must cover the sender's retry window (the Django package's is under 2 minutes), and at
    /// least 600 (the signature's validity window). Each record costs about 37 bytes of Redis for
    /// 1 to 2 times this long (1.5 on average): at 1,000 requests/s, 200 MB for an hour, 4.8 GB
    /// for a day.
    #[arg(long, env = "COUNTERSINK_IDEMPOTENCY_TTL_SECS", default_value_t = 3_600)]
    pub idempotency_ttl_secs: u64,

    /// Replicas that must hold an event request's changes before it is answered 200 (Redis `WAIT`
    /// after the apply script, on the same connection): an acknowledged event is then on a replica
    /// that a failover can promote. 0: answered once the master has applied it.
    #[arg(long, env = "COUNTERSINK_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// Milliseconds to wait for `--redis-wait-replicas`; past it the request is answered 503 with
    /// `Retry-After` (applied on the master: the sender's retry is recognised by its `webhook-id`).
    #[arg(long, env = "COUNTERSINK_REDIS_WAIT_TIMEOUT_MS", default_value_t = 1_000)]
    pub redis_wait_timeout_ms: u64,

    /// Seconds a request may take, once its body has arrived, before it is answered 503.
    #[arg(long, env = "COUNTERSINK_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Seconds to wait on SIGTERM or SIGINT: first for requests in flight (new connections are
    /// refused at once), then for a running flush; the final flush then runs to its end. Give
    /// the process manager's stop timeout more than this (systemd: TimeoutStopSec).
    #[arg(long, env = "COUNTERSINK_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20)]
    pub shutdown_timeout_secs: u64,
}

/// The longest `--redis-wait-timeout-ms`: a request waits that long for replicas before its
/// answer, and the connection that waits allows it on top of its response timeout.
pub const MAX_REDIS_WAIT_TIMEOUT_MS: u64 = 10_000;

/// The setting declared as field `$field` of `$config` (e.g. `setting!(CoreConfig.redis_url)`),
/// for [`ConfigError::new`]: the compiler checks that the field exists, and the flag and the
/// variable an error names are read from its `#[arg]`, so no message retypes them.
macro_rules! setting {
    ($config:ident . $field:ident) => {{
        let _declared = |config: $crate::config::$config| {
            let _ = config.$field;
        };
        $crate::config::Setting(stringify!($field))
    }};
}
pub(crate) use setting;

/// A setting, by its field name (clap's id for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting(pub &'static str);

impl Setting {
    /// The flag and the variable declared for this setting.
    pub fn names(self) -> (String, String) {
        let command = ServeConfig::augment_args(CoreConfig::augment_args(clap::Command::new("countersink")));
        let arg = command.get_arguments().find(|arg| arg.get_id() == self.0);
        debug_assert!(arg.is_some(), "{} is not a setting (a field with #[arg])", self.0);
        let flag = arg.and_then(|arg| arg.get_long()).map_or_else(|| self.0.to_string(), |long| format!("--{long}"));
        let env = arg.and_then(|arg| arg.get_env()).map_or_else(String::new, |env| env.to_string_lossy().into_owned());
        (flag, env)
    }
}

/// A setting that failed validation; the message names the flag and the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {flag} ({env}): {problem}")]
pub struct ConfigError {
    flag: String,
    env: String,
    problem: String,
}

impl ConfigError {
    /// A problem with one setting.
    pub fn new(setting: Setting, problem: impl Into<String>) -> Self {
        let (flag, env) = setting.names();
        Self { flag, env, problem: problem.into() }
    }
}

/// A number of threads: 1 to [`MAX_WORKER_THREADS`], or refused naming the setting.
fn thread_count(threads: usize, setting: Setting) -> Result<(), ConfigError> {
    at_least_one(threads, setting)?;
    if threads > MAX_WORKER_THREADS {
        return Err(ConfigError::new(setting, format!("at most {MAX_WORKER_THREADS}, got {threads}")));
    }
    Ok(())
}

/// A count or a duration of which 0 means nothing would work: refused, naming the setting.
fn at_least_one<T: Default + PartialEq>(value: T, setting: Setting) -> Result<(), ConfigError> {
    if value == T::default() {
        return Err(ConfigError::new(setting, "must be at least 1"));
    }
    Ok(())
}

impl CoreConfig {
    /// The runtime the service runs on, with `--worker-threads` threads; checked before anything
    /// else, since everything else runs on it.
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = self.worker_threads {
            thread_count(threads, setting!(CoreConfig.worker_threads))?;
            builder.worker_threads(threads);
        }
        Ok(builder.enable_all().build()?)
    }

    /// Checks what clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_url.starts_with("rediss://") {
            return Err(ConfigError::new(
                setting!(CoreConfig.redis_url),
                "TLS to Redis (rediss://) is not built into this binary: give a redis:// URL, and reach a Redis across \
                 a network through a TLS tunnel (stunnel, spiped) on this host",
            ));
        }
        if !self.redis_url.starts_with("redis://") {
            return Err(ConfigError::new(
                setting!(CoreConfig.redis_url),
                format!("expected a redis:// URL, got {:?}", self.redis_url),
            ));
        }
        let redis_url = redis::IntoConnectionInfo::into_connection_info(self.redis_url.as_str()).map_err(|e| {
            ConfigError::new(setting!(CoreConfig.redis_url), format!("{:?} is not a Redis URL: {e}", self.redis_url))
        })?;
        // A Sentinel may also be a `redis://` URL, with the password it requires.
        let sentinel_url =
            |a: &str| a.starts_with("redis://") && redis::IntoConnectionInfo::into_connection_info(a).is_ok();
        if let Some(address) = self.redis_sentinels.iter().find(|a| !sentinel_url(a) && parse_host_port(a).is_none()) {
            return Err(ConfigError::new(
                setting!(CoreConfig.redis_sentinels),
                format!("expected host:port addresses or redis:// URLs, comma-separated; got {address:?}"),
            ));
        }
        if let Some(address) = self.redis_cluster_nodes.iter().find(|a| parse_host_port(a).is_none()) {
            return Err(ConfigError::new(
                setting!(CoreConfig.redis_cluster_nodes),
                format!("expected host:port addresses, comma-separated; got {address:?}"),
            ));
        }
        if !self.redis_cluster_nodes.is_empty() {
            if !self.redis_sentinels.is_empty() {
                let (flag, env) = setting!(CoreConfig.redis_sentinels).names();
                return Err(ConfigError::new(
                    setting!(CoreConfig.redis_cluster_nodes),
                    format!("is used without {flag} ({env}): a deployment is on a Redis Cluster or behind Sentinel"),
                ));
            }
            let db = redis_url.redis_settings().db();
            if db != 0 {
                let (flag, env) = setting!(CoreConfig.redis_url).names();
                return Err(ConfigError::new(
                    setting!(CoreConfig.redis_cluster_nodes),
                    format!("a Redis Cluster has database 0 only; {flag} ({env}) names database {db}"),
                ));
            }
        }
        match (self.redis_sentinels.is_empty(), &self.redis_sentinel_master) {
            (false, None) => {
                let (flag, env) = setting!(CoreConfig.redis_sentinel_master).names();
                return Err(ConfigError::new(
                    setting!(CoreConfig.redis_sentinels),
                    format!("also set {flag} ({env}): the name Sentinel monitors the master under"),
                ));
            }
            (true, Some(_)) => {
                let (flag, env) = setting!(CoreConfig.redis_sentinels).names();
                return Err(ConfigError::new(
                    setting!(CoreConfig.redis_sentinel_master),
                    format!("is used only with {flag} ({env}): set both or neither"),
                ));
            }
            (false, Some(name)) if name.is_empty() || name.contains(char::is_whitespace) => {
                return Err(ConfigError::new(
                    setting!(CoreConfig.redis_sentinel_master),
                    "must be a name without spaces",
                ));
            }
            _ => {}
        }
        let prefix_ok = !self.redis_prefix.is_empty()
            && self.redis_prefix.len() <= 64
            && self.redis_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
        if !prefix_ok {
            return Err(ConfigError::new(
                setting!(CoreConfig.redis_prefix),
                "use 1 to 64 letters, digits, '_', '-', '.' or ':'",
            ));
        }
        Backend::from_url(&self.database_url)
            .map_err(|problem| ConfigError::new(setting!(CoreConfig.database_url), problem))?;
        at_least_one(self.db_pool_size, setting!(CoreConfig.db_pool_size))?;
        at_least_one(self.db_timeout_secs, setting!(CoreConfig.db_timeout_secs))?;
        if self.flush_chunk_users == 0 || self.flush_chunk_users > MAX_FLUSH_CHUNK_USERS {
            return Err(ConfigError::new(
                setting!(CoreConfig.flush_chunk_users),
                format!("must be from 1 to {MAX_FLUSH_CHUNK_USERS}"),
            ));
        }
        at_least_one(self.flush_timeout_secs, setting!(CoreConfig.flush_timeout_secs))?;
        if self.flush_lock_ttl_secs < 3 {
            return Err(ConfigError::new(
                setting!(CoreConfig.flush_lock_ttl_secs),
                "must be at least 3 seconds: the lease is renewed every third of it, and a shorter one \
                 passes to another process on any pause of its holder",
            ));
        }
        Ok(())
    }

    /// How long to wait for a pooled database connection.
    pub fn db_timeout(&self) -> Duration {
        Duration::from_secs(self.db_timeout_secs)
    }
}

impl ServeConfig {
    /// `--http-threads`, or one per core.
    pub fn http_threads(&self) -> usize {
        self.http_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1))
    }

    /// `countersink serve` with no flag and no variable set: the defaults declared above, for code
    /// that runs without a command line (in-process servers, tests).
    pub fn defaults() -> ServeConfig {
        let command = ServeConfig::augment_args(clap::Command::new("serve")).mut_args(|arg| arg.env(None::<&str>));
        let parsed =
            command.try_get_matches_from(["serve"]).and_then(|matches| ServeConfig::from_arg_matches(&matches));
        parsed.expect("every setting of serve has a default or is optional")
    }

    /// Checks what clap's types cannot. The cron expression is checked by [`crate::schedule`],
    /// which owns the cron dialect.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::new(setting!(ServeConfig.max_body_bytes), "must be at least 1024"));
        }
        at_least_one(self.max_batch_events, setting!(ServeConfig.max_batch_events))?;
        at_least_one(self.max_new_state_shards, setting!(ServeConfig.max_new_state_shards))?;
        at_least_one(self.apply_calls_in_flight, setting!(ServeConfig.apply_calls_in_flight))?;
        at_least_one(self.read_calls_in_flight, setting!(ServeConfig.read_calls_in_flight))?;
        if let Some(threads) = self.http_threads {
            thread_count(threads, setting!(ServeConfig.http_threads))?;
        }
        if self.max_read_users == 0 || self.max_read_users > MAX_READ_USERS {
            return Err(ConfigError::new(
                setting!(ServeConfig.max_read_users),
                format!("must be from 1 to {MAX_READ_USERS}"),
            ));
        }
        at_least_one(self.max_concurrent_requests, setting!(ServeConfig.max_concurrent_requests))?;
        at_least_one(self.max_live_streams, setting!(ServeConfig.max_live_streams))?;
        at_least_one(self.max_live_streams_per_user, setting!(ServeConfig.max_live_streams_per_user))?;
        at_least_one(self.max_live_streams_per_address, setting!(ServeConfig.max_live_streams_per_address))?;
        if let Some(name) = &self.live_address_header {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    setting!(ServeConfig.live_address_header),
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        if !(MIN_STREAM_TOKEN_SECS..=MAX_STREAM_TOKEN_SECS).contains(&self.max_stream_token_secs) {
            return Err(ConfigError::new(
                setting!(ServeConfig.max_stream_token_secs),
                format!("must be from {MIN_STREAM_TOKEN_SECS} to {MAX_STREAM_TOKEN_SECS}"),
            ));
        }
        let streams_and_requests = self.max_live_streams.saturating_add(self.max_concurrent_requests);
        if self.max_connections < streams_and_requests {
            return Err(ConfigError::new(
                setting!(ServeConfig.max_connections),
                format!(
                    "must be at least --max-live-streams plus --max-concurrent-requests ({streams_and_requests}): \
                     each stream and each request in flight holds a connection"
                ),
            ));
        }
        at_least_one(self.header_timeout_secs, setting!(ServeConfig.header_timeout_secs))?;
        at_least_one(self.body_timeout_secs, setting!(ServeConfig.body_timeout_secs))?;
        // A signed request is accepted while its timestamp is within the tolerance either way of
        // the clock, so a copy can be replayed up to twice the tolerance after the first delivery:
        // its webhook-id must be remembered at least that long.
        let replayable_secs = 2 * crate::webhook::TIMESTAMP_TOLERANCE_SECS as u64;
        if self.idempotency_ttl_secs < replayable_secs {
            return Err(ConfigError::new(
                setting!(ServeConfig.idempotency_ttl_secs),
                format!(
                    "must be at least {replayable_secs} seconds: a signed request stays valid for that long \
                     (its timestamp may be {} s either side of the clock), and a replay within it must be \
                     recognised",
                    crate::webhook::TIMESTAMP_TOLERANCE_SECS
                ),
            ));
        }
        at_least_one(self.redis_wait_timeout_ms, setting!(ServeConfig.redis_wait_timeout_ms))?;
        if self.redis_wait_timeout_ms > MAX_REDIS_WAIT_TIMEOUT_MS {
            return Err(ConfigError::new(
                setting!(ServeConfig.redis_wait_timeout_ms),
                format!("at most {MAX_REDIS_WAIT_TIMEOUT_MS}: events wait that long before they are answered"),
            ));
        }
        at_least_one(self.shutdown_timeout_secs, setting!(ServeConfig.shutdown_timeout_secs))?;
        at_least_one(self.request_timeout_secs, setting!(ServeConfig.request_timeout_secs))?;
        Ok(())
    }
}

/// The host and port of a `host:port` address (`[::1]:6379` for IPv6).
pub fn parse_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|port| *port > 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty() && !host.contains('/')).then(|| (host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_the_flag_and_the_variable_declared_for_its_setting() {
        let error = ConfigError::new(setting!(CoreConfig.redis_url), "bad");
        assert_eq!(error.to_string(), "invalid setting --redis-url (COUNTERSINK_REDIS_URL): bad");
        let error = ConfigError::new(setting!(SourceConfig.source_table), "bad");
        assert_eq!(error.to_string(), "invalid setting --source-table (COUNTERSINK_SOURCE_TABLE): bad");
        let error = ConfigError::new(setting!(ServeConfig.max_connections), "bad");
        assert_eq!(error.to_string(), "invalid setting --max-connections (COUNTERSINK_MAX_CONNECTIONS): bad");
    }

    /// What lets every error name both: each setting has a flag and a variable of its own name.
    #[test]
    fn every_setting_is_a_flag_and_a_variable_of_the_same_name() {
        let command = ServeConfig::augment_args(CoreConfig::augment_args(clap::Command::new("countersink")));
        let mut settings = 0;
        for arg in command.get_arguments() {
            let long = arg.get_long().unwrap_or_else(|| panic!("{} has no flag", arg.get_id()));
            let env = arg.get_env().unwrap_or_else(|| panic!("--{long} has no variable")).to_string_lossy();
            assert_eq!(env, format!("COUNTERSINK_{}", long.replace('-', "_").to_uppercase()));
            assert_eq!(Setting(arg.get_id().as_str().to_owned().leak()).names(), (format!("--{long}"), env.into()));
            settings += 1;
        }
        assert!(settings > 40, "{settings} settings");
    }

    /// A merging queue with no call allowed would answer nothing: 0 is refused, naming the flag.
    #[test]
    fn calls_in_flight_of_zero_are_refused_naming_the_flag() {
        for (flag, variable) in [
            ("--apply-calls-in-flight", "COUNTERSINK_APPLY_CALLS_IN_FLIGHT"),
            ("--read-calls-in-flight", "COUNTERSINK_READ_CALLS_IN_FLIGHT"),
        ] {
            let command = ServeConfig::augment_args(clap::Command::new("serve")).mut_args(|arg| arg.env(None::<&str>));
            let matches = command.try_get_matches_from(["serve", flag, "0"]).expect("parses");
            let serve = ServeConfig::from_arg_matches(&matches).expect("parses");
            let error = serve.validate().expect_err("0 calls in flight is refused").to_string();
            assert_eq!(error, format!("invalid setting {flag} ({variable}): must be at least 1"));
        }
    }

    #[test]
    fn http_threads_are_one_to_1024_and_one_per_core_when_unset() {
        let serve = |args: &[&str]| {
            let command = ServeConfig::augment_args(clap::Command::new("serve")).mut_args(|arg| arg.env(None::<&str>));
            let matches = command.try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()));
            ServeConfig::from_arg_matches(&matches.expect("parses")).expect("parses")
        };
        let named = "invalid setting --http-threads (COUNTERSINK_HTTP_THREADS)";
        let zero = serve(&["--http-threads", "0"]).validate().expect_err("0 threads is refused").to_string();
        assert_eq!(zero, format!("{named}: must be at least 1"));
        let many = serve(&["--http-threads", "1025"]).validate().expect_err("1025 threads is refused").to_string();
        assert_eq!(many, format!("{named}: at most 1024, got 1025"));
        assert_eq!(serve(&["--http-threads", "3"]).http_threads(), 3);
        let cores = std::thread::available_parallelism().expect("the test machine knows its cores").get();
        assert_eq!(serve(&[]).http_threads(), cores);
    }

    fn core(args: &[&str]) -> CoreConfig {
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            core: CoreConfig,
        }
        let args = std::iter::once("countersink").chain(args.iter().copied());
        <Args as clap::Parser>::try_parse_from(args).map(|a| a.core).expect("parses")
    }

    #[test]
    fn sentinel_addresses_need_a_master_name_and_the_other_way_round() {
        let both = core(&["--redis-sentinels", "127.0.0.1:26379,[::1]:26380", "--redis-sentinel-master", "m"]);
        assert!(both.validate().is_ok());
        assert_eq!(both.redis_sentinels, ["127.0.0.1:26379", "[::1]:26380"]);
        let no_name = core(&["--redis-sentinels", "127.0.0.1:26379"]).validate().unwrap_err().to_string();
        assert!(no_name.starts_with("invalid setting --redis-sentinels (COUNTERSINK_REDIS_SENTINELS): also set --redis-sentinel-master (COUNTERSINK_REDIS_SENTINEL_MASTER)"), "{no_name}");
        let no_sentinels = core(&["--redis-sentinel-master", "m"]).validate().unwrap_err().to_string();
        assert!(no_sentinels.contains("is used only with --redis-sentinels"), "{no_sentinels}");
        let no_port = core(&["--redis-sentinels", "127.0.0.1", "--redis-sentinel-master", "m"]).validate().unwrap_err();
        assert!(no_port.to_string().contains("expected host:port"), "{no_port}");
        let with_password =
            core(&["--redis-sentinels", "redis://:secret@127.0.0.1:26379", "--redis-sentinel-master", "m"]);
        assert!(with_password.validate().is_ok());
        let tls = core(&["--redis-sentinels", "rediss://127.0.0.1:26379", "--redis-sentinel-master", "m"]);
        assert!(tls.validate().unwrap_err().to_string().contains("expected host:port"));
    }

    #[test]
    fn cluster_nodes_are_host_ports_on_database_0_and_not_behind_sentinel() {
        let nodes = core(&["--redis-cluster-nodes", "127.0.0.1:7000,[::1]:7001"]);
        assert!(nodes.validate().is_ok());
        assert_eq!(nodes.redis_cluster_nodes, ["127.0.0.1:7000", "[::1]:7001"]);
        assert_eq!(parse_host_port("[::1]:7001"), Some(("::1".to_string(), 7001)));
        let no_port = core(&["--redis-cluster-nodes", "127.0.0.1"]).validate().unwrap_err().to_string();
        assert!(
            no_port.starts_with(
                "invalid setting --redis-cluster-nodes (COUNTERSINK_REDIS_CLUSTER_NODES): expected host:port"
            ),
            "{no_port}"
        );
        let both = core(&[
            "--redis-cluster-nodes",
            "127.0.0.1:7000",
            "--redis-sentinels",
            "127.0.0.1:26379",
            "--redis-sentinel-master",
            "m",
        ]);
        let both = both.validate().unwrap_err().to_string();
        assert!(both.contains("is used without --redis-sentinels (COUNTERSINK_REDIS_SENTINELS)"), "{both}");
        let bad_url = core(&["--redis-url", "redis://127.0.0.1:port"]).validate().unwrap_err().to_string();
        assert!(bad_url.starts_with("invalid setting --redis-url (COUNTERSINK_REDIS_URL)"), "{bad_url}");
        assert!(bad_url.contains("is not a Redis URL"), "{bad_url}");
        let db = core(&["--redis-cluster-nodes", "127.0.0.1:7000", "--redis-url", "redis://127.0.0.1/2"]);
        let db = db.validate().unwrap_err().to_string();
        assert!(db.contains("database 0 only; --redis-url (COUNTERSINK_REDIS_URL) names database 2"), "{db}");
    }
}
