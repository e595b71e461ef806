//! The Redis side: the per-notification state machine, the pending sorted set, flush batches
//! and the flush lease ([`lease`]). Every multi-key change is one Lua script, so it is atomic and
//! costs one round trip per request, however many events the request holds.
//!
//! [`Store`] owns the connection, the key layout ([`Keys`]) and [`StoreError`]; `scripts.rs` owns
//! the loaded scripts and their contract (one typed wrapper per script: named keys and arguments,
//! typed replies). The store's methods are grouped by concept, one file each:
//!
//! | file             | owns                                                                     |
//! |------------------|--------------------------------------------------------------------------|
//! | `events.rs`      | applying events (`apply_events.lua`), idempotency, the op codes          |
//! | `held_counts.rs` | the real-time counts held per user: reads, installs, the reload          |
//! | `batches.rs`     | the pending set, hand-offs, batches read and dropped by a flush          |
//! | `instance.rs`    | which server vouches for the state, restarts, the ready marker, resyncs  |
//! | `recounts.rs`    | a reconcile's fence, truth and repair; the recount queue and its claims  |
//! | `bootstrap.rs`   | rebuilding the state from the table, its checkpoints, clearing the state |
//! | `lease.rs`       | the flush lease and its guard [`Lease`], the fenced writes               |
//! | `merged_calls.rs`| concurrent requests merged into shared calls: group commit, merged reads |
//! | `connection.rs`  | the connection to the master: one address, or found through Sentinel     |
//! | `keys.rs`        | the key names                                                            |
//! | `scripts.rs`     | one typed wrapper per Lua script, checked against the script's header    |
//!
//! Each file adds an `impl Store` block rather than a type of its own reached from the store
//! (`store.batches().handoff(..)`): a caller holds one `Store` and calls what it needs, the
//! concepts share the connection and the keys, and the call sites (the domain modules, the HTTP
//! layer and the integration tests) stay as they were. The grouping shows where a method lives;
//! what protects the writes is the guard: every write made under the flush lease takes a
//! [`&Lease`](Lease), so a caller that does not hold the lease cannot make it. The writes that
//! take none are not the lease holder's: events, the installs of held counts and their reload
//! (any process), and the recount queue and claims (each worker holds its own claim).

mod batches;
mod bootstrap;
mod connection;
mod events;
mod held_counts;
mod instance;
mod keys;
mod lease;
mod merged_calls;
mod recounts;
mod scripts;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use redis::AsyncCommands;

pub use batches::BatchesSnapshot;
pub use connection::{RedisConnection, RedisTarget};
pub use events::{Applied, ApplyOutcome, Idempotency, Request};
pub use instance::InstanceCheck;
pub use keys::{Keys, SHARD_BITS};
pub use lease::{Acquired, Lease, LeaseHolder, LeaseRenewal};
pub use merged_calls::{GroupCommit, MergedReads};
pub use recounts::{
    RecountClaim, TruthPiece, UserDrift, UserRepair, UserTruth, RECOUNT_AGAIN_AT_MOST_EVERY, TRUTH_STATES_PER_CALL,
};

/// The 2-bit states of a notification, as `transition.lua` defines them (0 is unseen).
pub mod state {
    /// Never seen (a bitmap's zero).
    pub const UNSEEN: u8 = 0;
    /// Seen, read.
    pub const READ: u8 = 1;
    /// Seen, unread: counts for its recipient.
    pub const UNREAD: u8 = 2;
    /// Deleted: final.
    pub const DELETED: u8 = 3;
}

/// The payload on [`Keys::live_channel`] that means "every user's count may have changed".
pub const ALL_USERS: &str = "*";

/// A Redis failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or could not be reached.
    #[error("redis: {0}")]
    Redis(#[source] redis::RedisError),
    /// The state is missing (Redis lost its data) and must be bootstrapped before events apply.
    #[error("the Redis state is missing; it is being rebuilt from the Notification table")]
    StateMissing,
    /// The held counts are being dropped after a Redis rollback; reads answer again once they are.
    #[error("the counts held in Redis are being reloaded after a Redis rollback; retry shortly")]
    CountsReloading,
    /// A write under the flush lease was refused: the lease expired while its holder stalled,
    /// and another process may hold it now. Nothing was written; the work is the next holder's.
    #[error("{0}; nothing was written, the next holder of the lease does this work")]
    LeaseLost(String),
    /// The Redis server restarted (from a snapshot, empty, or a replica promoted) since the state
    /// was vouched for: nothing applies or flushes until it is rebuilt or resynced.
    #[error(
        "Redis restarted since its state was vouched for (it may be an older snapshot); nothing was applied: the \
         state is being rebuilt or resynced, retry shortly"
    )]
    RedisRestarted,
    /// A request reused a `webhook-id` applied before with another body; nothing was applied.
    #[error(
        "this webhook-id was applied before with another body; nothing was applied: give every request its own \
         webhook-id (a retry resends the same body under the same id)"
    )]
    IdempotencyKeyReused,
    /// The record kept for a request's `webhook-id` is not one countersink wrote; nothing was
    /// applied.
    #[error(
        "the idempotency record kept in Redis for this webhook-id is not one countersink wrote (a damaged value, or \
         another program's key under the deployment's prefix); nothing was applied: send the request under a new \
         webhook-id, and look for what else writes to Redis under --redis-prefix"
    )]
    IdempotencyRecordUnreadable,
    /// Redis answered something the scripts never return: a bug or a foreign key clash.
    #[error("unexpected reply from redis: {0}")]
    Unexpected(String),
    /// Events were applied on the master, but fewer replicas than `--redis-wait-replicas` had
    /// them within `--redis-wait-timeout-ms`: not acknowledged, since a failover could lose them.
    /// A retry with the same `webhook-id` is answered as replayed once a replica has them.
    #[error("applied on the Redis master, but only {acknowledged} of {wanted} replicas had it in time")]
    NotReplicated {
        /// Replicas that had the change when the wait ended.
        acknowledged: u64,
        /// Replicas required.
        wanted: u32,
    },
}

impl From<redis::RedisError> for StoreError {
    /// Every Redis failure passes here, so this is where it is counted.
    fn from(e: redis::RedisError) -> Self {
        if e.code() == Some(scripts::error_code::LEASE_LOST) {
            // A fenced script's refusal (lease.lua): Redis is fine, the caller is late.
            return StoreError::LeaseLost(e.detail().unwrap_or("the flush lease was lost").to_string());
        }
        if e.code() == Some(scripts::error_code::UNVOUCHED) {
            // A guarded script's refusal (instance.lua): Redis answers, its state is unvouched.
            return StoreError::RedisRestarted;
        }
        crate::metrics::dependency_error(crate::metrics::Dependency::Redis);
        StoreError::Redis(e)
    }
}

impl StoreError {
    /// Whether Redis was unreachable or too slow (worth a retry), rather than a logic error.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                use redis::{ErrorKind, ServerErrorKind};
                // A Redis loading its data, failing over or read-only answers again soon; so does
                // a cluster whose slot moved to another master (`MOVED`, `ASK`: the next command
                // asks the nodes where it is).
                let passing = matches!(
                    e.kind(),
                    ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::ReadOnly
                            | ServerErrorKind::ClusterDown
                            | ServerErrorKind::Moved
                            | ServerErrorKind::Ask
                            // A script missing again right after it was loaded: a new master
                            // or a reconnection came between the two.
                            | ServerErrorKind::NoScript
                    )
                ) || matches!(
                    // Sentinel does not name a master (yet): a failover is under way.
                    e.kind(),
                    ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel
                );
                // A full Redis (`maxmemory` under `noeviction`) refuses a script at its first write,
                // before it changed anything: the request can be sent again once memory is freed.
                let full = e.code() == Some("OOM");
                passing
                    || full
                    || e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
            }
            StoreError::StateMissing
            | StoreError::CountsReloading
            | StoreError::RedisRestarted
            | StoreError::NotReplicated { .. } => true,
            StoreError::LeaseLost(_)
            | StoreError::IdempotencyKeyReused
            | StoreError::IdempotencyRecordUnreadable
            | StoreError::Unexpected(_) => false,
        }
    }
}

/// The Redis store of one deployment (one key prefix).
#[derive(Clone)]
pub struct Store {
    conn: RedisConnection,
    keys: Keys,
    requires_bootstrap: bool,
    replicas: Option<ReplicaWait>,
    /// Whether this process's apply calls have opened the window in which the former version's
    /// idempotency keys are read (`records.lua`): its first successful call does.
    former_window_opened: Arc<AtomicBool>,
}

/// How many replicas must have a request's events before it is acknowledged, and for how long
/// to wait for them (`--redis-wait-replicas`, `--redis-wait-timeout-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaWait {
    /// Replicas that must have the change.
    pub replicas: u32,
    /// How long to wait for them.
    pub timeout: std::time::Duration,
}

impl Store {
    /// A store that connects lazily and reconnects by itself, so the service starts and
    /// recovers while Redis is down.
    pub fn connect(redis_url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::open(&RedisTarget::Address(redis_url.to_string()), prefix)
    }

    /// [`Store::connect`] to wherever `target` says the master is (under Sentinel, followed
    /// across failovers).
    pub fn open(target: &RedisTarget, prefix: &str) -> Result<Self, StoreError> {
        let conn = RedisConnection::open(target)?;
        Ok(Self {
            conn,
            keys: Keys::new(prefix),
            requires_bootstrap: false,
            replicas: None,
            former_window_opened: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The connection to the master, for what needs a connection of its own (pub/sub).
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
    }

    /// The same store on a Redis connection of its own (an HTTP thread's: the tasks driving it and
    /// waiting on it then run on that one thread); under Sentinel or on a cluster, on this store's
    /// connection ([`RedisConnection::another`] says why).
    pub fn with_own_connection(&self) -> Result<Self, StoreError> {
        Ok(Store { conn: self.conn.another()?, ..self.clone() })
    }

    /// The same store, acknowledging events only once `wait` says replicas have them.
    pub fn waiting_for_replicas(mut self, wait: ReplicaWait) -> Self {
        self.replicas = Some(wait);
        self
    }

    /// The same store, refusing events until a bootstrap has marked the state complete.
    /// Used when the Notification table is configured, so a lost state can be rebuilt.
    pub fn requiring_bootstrap(mut self) -> Self {
        self.requires_bootstrap = true;
        self
    }

    /// The key layout of this store.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Answers whether Redis is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Redis's `maxmemory-policy`; `None` when Redis does not say (a managed Redis that disables
    /// `CONFIG`).
    pub async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        self.config("maxmemory-policy").await
    }

    /// One of Redis's settings (`CONFIG GET`); `None` when Redis does not say.
    async fn config(&self, name: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: Result<Vec<String>, redis::RedisError> =
            redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut conn).await;
        match reply {
            Ok(pair) => Ok(pair.into_iter().nth(1)),
            // Refused, renamed or not permitted (an error reply, not a failure to reach Redis):
            // the caller says it could not check.
            Err(e) if e.code().is_some() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// How Redis keeps its data across a restart, and to how many replicas it is copied (what a
    /// restart or a failover can lose, see docs/deployment.md); `None` when Redis does not say.
    pub async fn persistence(&self) -> Result<Option<RedisPersistence>, StoreError> {
        let (Some(appendonly), Some(appendfsync), Some(save)) =
            (self.config("appendonly").await?, self.config("appendfsync").await?, self.config("save").await?)
        else {
            return Ok(None);
        };
        let mode = match (appendonly.as_str(), appendfsync.as_str()) {
            ("yes", "always") => "aof_always",
            ("yes", "everysec") => "aof_everysec",
            ("yes", _) => "aof_no_fsync",
            _ if !save.trim().is_empty() => "rdb",
            _ => "none",
        };
        let mut conn = self.conn.clone();
        let replication: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await?;
        let replicas = replication
            .lines()
            .find_map(|line| line.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        Ok(Some(RedisPersistence { mode, replicas }))
    }

    /// Unlinks every key of this deployment matching `glob` (e.g. `state:*`), 1,000 at a time.
    async fn unlink_matching(&self, glob: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let pattern = self.keys.pattern(glob);
        let keys: Vec<String> = {
            let mut scan = conn.scan_match::<_, String>(&pattern).await?;
            let mut keys = Vec::new();
            while let Some(key) = scan.next_item().await {
                keys.push(key?);
            }
            keys
        };
        let mut deleted = 0;
        for chunk in keys.chunks(1_000) {
            let n: u64 = conn.unlink(chunk).await?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// Whether this store refuses events until a bootstrap (a Notification table is configured).
    pub fn requires_bootstrap(&self) -> bool {
        self.requires_bootstrap
    }
}

/// How Redis keeps its data ([`Store::persistence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RedisPersistence {
    /// `none`, `rdb` (snapshots), `aof_everysec`, `aof_always` or `aof_no_fsync` (the append-only
    /// file, with its `appendfsync`).
    pub mode: &'static str,
    /// Replicas connected to this Redis.
    pub replicas: u64,
}

/// A reply of a pipeline or script as the type the caller expects.
fn typed<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError::Unexpected(e.to_string()))
}

/// Sorted-set scores are integral deltas, sent by Redis as decimal strings.
fn parse_score(score: &str) -> Result<i64, StoreError> {
    score
        .parse::<f64>()
        .ok()
        .filter(|s| s.fract() == 0.0 && s.abs() < 2f64.powi(53))
        .map(|s| s as i64)
        .ok_or_else(|| StoreError::Unexpected(format!("score {score:?} is not an integral delta")))
}
