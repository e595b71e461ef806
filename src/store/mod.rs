//! The Redis side: the per-notification state machine, the pending sorted set, flush batches
//! and the flush lease ([`lease`]). Every multi-key change is one Lua script, so it is atomic and costs one
//! round trip per request, however many events the request holds.

mod connection;
mod group_commit;
mod keys;
mod lease;

use std::collections::HashMap;
use std::time::Duration;

use redis::{AsyncCommands, Script};
use tracing::instrument;

use crate::events::{Event, EventKind};
pub use connection::{RedisConnection, RedisTarget};
pub use group_commit::GroupCommit;
pub use keys::{Keys, SHARD_BITS};
pub use lease::{Acquired, Lease, LeaseHolder, LeaseRenewal};

/// How often at most a reconcile queues another recount of the same user (an event older than its
/// fence may have undone a change the table read saw; see `reconcile_finish.lua`): a sender whose
/// clock runs behind Redis's would otherwise have a busy user recounted back to back.
pub const RECOUNT_AGAIN_AT_MOST_EVERY: Duration = Duration::from_secs(600);

/// The 2-bit states of a notification, as `transition.lua` defines them (0 is unseen).
pub mod state {
    /// Seen, read.
    pub const READ: u8 = 1;
    /// Seen, unread: counts for its recipient.
    pub const UNREAD: u8 = 2;
    /// Deleted: final.
    pub const DELETED: u8 = 3;
}

/// The payload on [`Keys::live_channel`] that means "every user's count may have changed".
pub const ALL_USERS: &str = "*";

/// States per `BITFIELD` of [`Store::write_states`]: a script passes a command's words through
/// Lua's `unpack`, which takes at most a few thousand.
const STATES_PER_COMMAND: usize = 1000;

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
    /// Redis answered something the scripts never return: a bug or a foreign key clash.
    #[error("unexpected reply from redis: {0}")]
    Unexpected(String),
}

impl From<redis::RedisError> for StoreError {
    /// Every Redis failure passes here, so this is where it is counted.
    fn from(e: redis::RedisError) -> Self {
        if e.code() == Some("LEASE_LOST") {
            // A fenced script's refusal (lease.lua): Redis is fine, the caller is late.
            return StoreError::LeaseLost(e.detail().unwrap_or("the flush lease was lost").to_string());
        }
        if e.code() == Some("UNVOUCHED") {
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
                // A Redis loading its data, failing over or read-only answers again soon.
                let passing = matches!(
                    e.kind(),
                    ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::ReadOnly
                            | ServerErrorKind::ClusterDown
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
            StoreError::StateMissing | StoreError::CountsReloading | StoreError::RedisRestarted => true,
            StoreError::LeaseLost(_) | StoreError::IdempotencyKeyReused | StoreError::Unexpected(_) => false,
        }
    }
}

/// What one request's events did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ApplyOutcome {
    /// Events that changed a user's count.
    pub changed: u64,
    /// Events that changed only the recorded state (a first sight of a read notification,
    /// the delete of a read one).
    pub recorded: u64,
    /// Events that repeated the state already recorded (retries, a second mark-as-read).
    pub duplicate: u64,
    /// `created` events for a notification already seen: late retries.
    pub stale: u64,
    /// Events that arrived after the notification was deleted; with a Notification table, the
    /// users of such saves are queued for a recount (only the table knows if the row is back).
    pub after_delete: u64,
}

impl ApplyOutcome {
    /// Events that changed no count.
    pub fn noops(&self) -> u64 {
        self.recorded + self.duplicate + self.stale + self.after_delete
    }
}

/// What makes a request idempotent: its `webhook-id`, a digest of its body (a reuse of the id
/// with another body is refused), and how long both are remembered.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The `webhook-id`.
    pub key: String,
    /// The first 8 bytes of the body's SHA-256, in hex: enough to tell two bodies apart (the
    /// sender signs both), 16 bytes of Redis per request.
    pub body_digest: String,
    /// How long the key is remembered.
    pub ttl: Duration,
}

impl Idempotency {
    /// The idempotency of a request with id `key` and `body`, remembered for `ttl`.
    pub fn new(key: &str, body: &[u8], ttl: Duration) -> Self {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(body);
        let body_digest = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        Idempotency { key: key.to_string(), body_digest, ttl }
    }
}

/// One request's events and what makes it idempotent, for [`Store::apply_many`].
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The request's events, in order.
    pub events: &'a [Event],
    /// Its `webhook-id`, if it has one.
    pub idempotency: Option<Idempotency>,
}

/// The result of [`Store::apply_once`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// What the events did (for a replay: what they did the first time).
    pub outcome: ApplyOutcome,
    /// The request's idempotency key was seen before: nothing was applied now.
    pub replayed: bool,
}

/// What loading some users' counts reads from Redis besides their pending deltas (see
/// [`crate::counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchesSnapshot {
    /// The hand-off sequence when the snapshot was taken.
    pub handoff_seq: u64,
    /// The ready marker's value then (empty when there was none): a rebuild or a rollback
    /// resync writes a new one.
    pub ready: String,
    /// Batches handed off and not yet dropped; committed ones are already in the database.
    pub batch_ids: Vec<String>,
    /// Per user (in request order): the delta in each batch of `batch_ids`.
    pub deltas: Vec<Vec<i64>>,
}

/// The Redis store of one deployment (one key prefix).
#[derive(Clone)]
pub struct Store {
    conn: RedisConnection,
    keys: Keys,
    scripts: &'static Scripts,
    requires_bootstrap: bool,
}

struct Scripts {
    apply_events: Script,
    reconcile_begin: Script,
    reconcile_truth: Script,
    reconcile_finish: Script,
    take_recounts: Script,
    renew_recounts: Script,
    handoff: Script,
    vouch: Script,
    check_instance: Script,
    check_batch: Script,
    drop_batch: Script,
    read_batches: Script,
    install_counts: Script,
    acquire_lease: Script,
    extend_lease: Script,
    release_lease: Script,
    fenced: Script,
    fenced_on_claimed_instance: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        apply_events: Script::new(concat!(
            include_str!("transition.lua"),
            include_str!("instance.lua"),
            include_str!("move_counts.lua"),
            include_str!("apply_events.lua")
        )),
        reconcile_begin: Script::new(concat!(
            include_str!("lease.lua"),
            include_str!("transition.lua"),
            include_str!("reconcile_begin.lua")
        )),
        reconcile_truth: Script::new(concat!(
            include_str!("lease.lua"),
            include_str!("transition.lua"),
            include_str!("move_counts.lua"),
            include_str!("reconcile_truth.lua")
        )),
        reconcile_finish: Script::new(concat!(
            include_str!("lease.lua"),
            include_str!("transition.lua"),
            include_str!("reconcile_finish.lua")
        )),
        take_recounts: Script::new(include_str!("take_recounts.lua")),
        renew_recounts: Script::new(include_str!("renew_recounts.lua")),
        handoff: Script::new(concat!(
            include_str!("lease.lua"),
            include_str!("instance.lua"),
            include_str!("handoff.lua")
        )),
        vouch: Script::new(concat!(include_str!("lease.lua"), include_str!("instance.lua"), include_str!("vouch.lua"))),
        check_instance: Script::new(concat!(include_str!("instance.lua"), include_str!("check_instance.lua"))),
        check_batch: Script::new(concat!(include_str!("instance.lua"), include_str!("check_batch.lua"))),
        drop_batch: Script::new(concat!(include_str!("lease.lua"), include_str!("drop_batch.lua"))),
        read_batches: Script::new(include_str!("read_batches.lua")),
        install_counts: Script::new(include_str!("install_counts.lua")),
        acquire_lease: Script::new(include_str!("acquire_lease.lua")),
        extend_lease: Script::new(include_str!("extend_lease.lua")),
        release_lease: Script::new(include_str!("release_lease.lua")),
        fenced: Script::new(concat!(include_str!("lease.lua"), include_str!("fenced.lua"))),
        fenced_on_claimed_instance: Script::new(concat!(
            include_str!("lease.lua"),
            include_str!("instance.lua"),
            include_str!("claimed.lua"),
            include_str!("fenced.lua")
        )),
    })
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
        Ok(Self { conn, keys: Keys::new(prefix), scripts: scripts(), requires_bootstrap: false })
    }

    /// The connection to the master, for what needs a connection of its own (pub/sub).
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
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

    /// Applies a validated batch of events in one atomic script.
    pub async fn apply(&self, events: &[Event]) -> Result<ApplyOutcome, StoreError> {
        Ok(self.apply_once(events, None).await?.outcome)
    }

    /// Applies a batch unless a request with the same idempotency key (its `webhook-id`) was
    /// applied within its TTL; then answers with that first delivery's outcome, or
    /// [`StoreError::IdempotencyKeyReused`] if that delivery had another body. The check, the
    /// transitions and remembering the key are one atomic script.
    #[instrument(level = "debug", skip_all, fields(events = events.len()))]
    pub async fn apply_once(&self, events: &[Event], idempotency: Option<Idempotency>) -> Result<Applied, StoreError> {
        let request = Request { events, idempotency };
        match self.apply_many(std::slice::from_ref(&request)).await?.pop() {
            Some(applied) => applied,
            None => Err(StoreError::Unexpected("apply_events answered no request".into())),
        }
    }

    /// Applies the events of several requests in one atomic script, in order: a group commit.
    /// Each request keeps its own idempotency record and gets its own answer, as if it had been
    /// applied alone by [`Store::apply_once`] just after the ones before it. The outer error is
    /// the call's, for every request (the state missing or unvouched: nothing was applied; Redis
    /// unreachable or gone during the call: unknown, a retry finds out by its id); an inner one
    /// is that request's ([`StoreError::IdempotencyKeyReused`]).
    #[instrument(level = "debug", skip_all, fields(requests = requests.len()))]
    pub async fn apply_many(&self, requests: &[Request<'_>]) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let mut invocation = self.scripts.apply_events.prepare_invoke();
        let ttl = requests.iter().filter_map(|r| r.idempotency.as_ref()).map(|i| i.ttl).max().unwrap_or_default();
        invocation
            .key(self.keys.pending())
            .key(self.keys.reconciling())
            .key(self.keys.ready())
            .key(self.keys.rebuilt())
            .key(self.keys.recounts())
            .key(self.keys.instance())
            .key(self.keys.handoff_seq())
            .arg(ttl.as_secs())
            .arg(self.keys.journal(""))
            .arg(self.keys.reconciled(""))
            .arg(u8::from(self.requires_bootstrap))
            .arg(self.keys.live_channel())
            .arg(requests.len())
            .arg(self.keys.reconcile_draft(""))
            .arg(self.keys.reconcile_tally(""));
        // KEYS[1..7] are taken; each idempotency key, distinct state shard and count bucket gets
        // the next index.
        let mut next_key = 8;
        for request in requests {
            match &request.idempotency {
                Some(i) => {
                    invocation.key(self.keys.webhook(&i.key));
                    invocation.arg(next_key).arg(&i.body_digest);
                    next_key += 1;
                }
                None => {
                    invocation.arg(0).arg("");
                }
            }
            invocation.arg(request.events.len());
        }
        let mut shard_index: HashMap<u64, usize> = HashMap::new();
        let mut bucket_index: HashMap<u64, usize> = HashMap::new();
        for event in requests.iter().flat_map(|r| r.events) {
            let (shard, index_in_shard) = Keys::state_slot(event.notification_id);
            let state_key = *shard_index.entry(shard).or_insert_with(|| {
                invocation.key(self.keys.state(shard));
                next_key += 1;
                next_key - 1
            });
            let (bucket, field) = Keys::count_slot(event.user_id);
            let count_key = *bucket_index.entry(bucket).or_insert_with(|| {
                invocation.key(self.keys.counts(bucket));
                next_key += 1;
                next_key - 1
            });
            let occurred_ms = event.occurred_at.map_or(0, |at| at.timestamp_millis().max(0));
            invocation
                .arg(op_code(event))
                .arg(state_key)
                .arg(index_in_shard)
                .arg(event.user_id)
                .arg(occurred_ms)
                .arg(count_key)
                .arg(field);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        match reply[..] {
            [-1] => return Err(StoreError::StateMissing),
            [-4] => return Err(StoreError::RedisRestarted),
            _ if reply.len() != 6 * requests.len() => {
                return Err(StoreError::Unexpected(format!("apply_events returned {reply:?}")))
            }
            _ => {}
        }
        Ok(reply
            .chunks(6)
            .map(|answer| match *answer {
                [-3, ..] => Err(StoreError::IdempotencyKeyReused),
                [changed, recorded, duplicate, stale, after_delete, replayed] => {
                    let count = |n: i64| n as u64;
                    Ok(Applied {
                        outcome: ApplyOutcome {
                            changed: count(changed),
                            recorded: count(recorded),
                            duplicate: count(duplicate),
                            stale: count(stale),
                            after_delete: count(after_delete),
                        },
                        replayed: replayed == 1,
                    })
                }
                _ => Err(StoreError::Unexpected(format!("apply_events returned {answer:?}"))),
            })
            .collect())
    }

    /// How many of the state shards `shards` do not exist yet (an event in one would create it).
    pub async fn missing_state_shards(&self, shards: &[u64]) -> Result<usize, StoreError> {
        if shards.is_empty() {
            return Ok(0);
        }
        let mut exists = redis::cmd("EXISTS");
        for shard in shards {
            exists.arg(self.keys.state(*shard));
        }
        let mut conn = self.conn.clone();
        let existing: usize = exists.query_async(&mut conn).await?;
        Ok(shards.len().saturating_sub(existing))
    }

    /// The users' deltas in batches not yet dropped, with the hand-off sequence and the ready
    /// marker, atomically: what loading their counts needs besides the database.
    pub async fn batches_snapshot(&self, user_ids: &[u64]) -> Result<BatchesSnapshot, StoreError> {
        let mut invocation = self.scripts.read_batches.prepare_invoke();
        invocation
            .key(self.keys.batches())
            .key(self.keys.handoff_seq())
            .key(self.keys.ready())
            .arg(self.keys.batch(""))
            .arg(u8::from(self.requires_bootstrap));
        for user in user_ids {
            invocation.arg(*user);
        }
        let mut conn = self.conn.clone();
        let reply: redis::Value = invocation.invoke_async(&mut conn).await?;
        if let redis::Value::Array(items) = &reply {
            if let [redis::Value::Int(-1)] = items[..] {
                return Err(StoreError::StateMissing);
            }
        }
        let (seq, ready, batch_ids, rows): (u64, String, Vec<String>, Vec<Vec<String>>) =
            redis::FromRedisValue::from_redis_value(reply).map_err(|e| StoreError::Unexpected(e.to_string()))?;
        let deltas = rows
            .iter()
            .map(|row| row.iter().map(|s| parse_score(s)).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, StoreError>>()?;
        if deltas.len() != user_ids.len() {
            return Err(StoreError::Unexpected("read_batches returned the wrong number of rows".into()));
        }
        Ok(BatchesSnapshot { handoff_seq: seq, ready, batch_ids, deltas })
    }

    /// The real-time counts Redis holds for `user_ids`, in the same order; `None` for a user
    /// whose count is not held yet (see [`Store::install_counts`]). One round trip: the two
    /// markers a read depends on, then one `HMGET` per count bucket, pipelined.
    pub async fn held_counts(&self, user_ids: &[u64]) -> Result<Vec<Option<i64>>, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.exists(self.keys.counts_stale()).exists(self.keys.ready());
        // Users of one bucket are asked for together; `places` says where each answer goes.
        let mut buckets: Vec<(u64, Vec<usize>)> = Vec::new();
        let mut bucket_of: HashMap<u64, usize> = HashMap::new();
        for (place, user) in user_ids.iter().enumerate() {
            let (bucket, _) = Keys::count_slot(*user);
            let at = *bucket_of.entry(bucket).or_insert_with(|| {
                buckets.push((bucket, Vec::new()));
                buckets.len() - 1
            });
            buckets[at].1.push(place);
        }
        for (bucket, places) in &buckets {
            let command = pipeline.cmd("HMGET").arg(self.keys.counts(*bucket));
            for place in places {
                command.arg(Keys::count_slot(user_ids[*place]).1);
            }
        }
        let mut conn = self.conn.clone();
        let mut replies: Vec<redis::Value> = pipeline.query_async(&mut conn).await?;
        if replies.len() != buckets.len() + 2 {
            return Err(StoreError::Unexpected("the read pipeline returned the wrong number of replies".into()));
        }
        let values = replies.split_off(2);
        let [stale, ready]: [redis::Value; 2] =
            replies.try_into().map_err(|_| StoreError::Unexpected("the read pipeline lost its markers".into()))?;
        if typed::<bool>(stale)? {
            return Err(StoreError::CountsReloading);
        }
        // A lost or rolled-back state is the bootstrap's: its counts are not to be trusted.
        if self.requires_bootstrap && !typed::<bool>(ready)? {
            return Err(StoreError::StateMissing);
        }
        let mut counts = vec![None; user_ids.len()];
        for ((_, places), values) in buckets.iter().zip(values) {
            let values: Vec<Option<i64>> = typed(values)?;
            if values.len() != places.len() {
                return Err(StoreError::Unexpected("HMGET returned the wrong number of values".into()));
            }
            for (place, value) in places.iter().zip(values) {
                counts[*place] = value;
            }
        }
        Ok(counts)
    }

    /// Starts holding the real-time counts of `bases` (user, stored count + deltas of batches
    /// not yet committed, as read with `snapshot`): each becomes base + the pending delta at
    /// this instant, unless a count is already held. `None` when a hand-off, a rebuild or a
    /// rollback resync happened since `snapshot` was taken: read the bases again.
    pub async fn install_counts(
        &self,
        snapshot: &BatchesSnapshot,
        bases: &[(u64, i64)],
    ) -> Result<Option<Vec<i64>>, StoreError> {
        let mut invocation = self.scripts.install_counts.prepare_invoke();
        invocation
            .key(self.keys.handoff_seq())
            .key(self.keys.ready())
            .key(self.keys.pending())
            .key(self.keys.counts_stale());
        invocation.arg(snapshot.handoff_seq).arg(&snapshot.ready);
        let mut bucket_index: HashMap<u64, usize> = HashMap::new();
        for (user, base) in bases {
            let (bucket, field) = Keys::count_slot(*user);
            let next = bucket_index.len() + 5;
            let index = *bucket_index.entry(bucket).or_insert_with(|| {
                invocation.key(self.keys.counts(bucket));
                next
            });
            invocation.arg(*user).arg(index).arg(field).arg(*base);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        match reply.split_first() {
            Some((0, [])) => Ok(None),
            Some((2, [])) => Err(StoreError::CountsReloading),
            Some((1, counts)) if counts.len() == bases.len() => Ok(Some(counts.to_vec())),
            _ => Err(StoreError::Unexpected(format!("install_counts returned {reply:?}"))),
        }
    }

    /// Stops holding every real-time count (each is loaded again by its next read): after the
    /// stored counts or the pending deltas were rewritten outside the scripts that keep them.
    pub async fn clear_held_counts(&self) -> Result<u64, StoreError> {
        self.unlink_matching("counts:*").await
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

    /// The current hand-off sequence number.
    pub async fn handoff_seq(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let seq: Option<u64> = conn.get(self.keys.handoff_seq()).await?;
        Ok(seq.unwrap_or(0))
    }

    /// Users with a pending delta.
    pub async fn pending_users(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(self.keys.pending()).await?)
    }

    /// Renames the pending set to the batch `batch_id` and returns the hand-off's sequence
    /// number; `None` if nothing was pending.
    pub async fn handoff(&self, lease: &Lease, batch_id: &str) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let seq: u64 = self
            .fenced_invocation(&self.scripts.handoff, lease)
            .key(self.keys.pending())
            .key(self.keys.batch(batch_id))
            .key(self.keys.batches())
            .key(self.keys.handoff_seq())
            .key(self.keys.instance())
            .arg(batch_id)
            .invoke_async(&mut conn)
            .await?;
        Ok((seq > 0).then_some(seq))
    }

    /// Whether this Redis server vouches for the state, and what the last recovery from a restart
    /// did (see `instance.lua`).
    pub async fn check_instance(&self) -> Result<InstanceCheck, StoreError> {
        let mut conn = self.conn.clone();
        let (server, vouched_by, last_restart, new): (String, String, String, u8) = self
            .scripts
            .check_instance
            .key(self.keys.instance())
            .key(self.keys.last_restart())
            .key(self.keys.handoff_seq())
            .key(self.keys.pending())
            .invoke_async(&mut conn)
            .await?;
        let vouched_by = (!vouched_by.is_empty()).then_some(vouched_by);
        let last_restart = (!last_restart.is_empty()).then_some(last_restart);
        let vouched = vouched_by.as_deref() == Some(server.as_str());
        Ok(InstanceCheck { vouched, new: new == 1, server, vouched_by, last_restart })
    }

    /// Whether the batch `batch_id` still holds `users` users on a Redis server that vouches for
    /// the state: what a flush checks before it commits what it read of the batch.
    pub async fn batch_intact(&self, batch_id: &str, users: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let (held, vouched): (u64, u8) = self
            .scripts
            .check_batch
            .key(self.keys.batch(batch_id))
            .key(self.keys.instance())
            .invoke_async(&mut conn)
            .await?;
        Ok(held == users && vouched == 1)
    }

    /// Vouches for the state on this Redis server, from now on.
    pub async fn claim_instance(&self, lease: &Lease) -> Result<(), StoreError> {
        self.vouch(lease, "claim").await
    }

    /// Keeps what a recovery from a Redis restart did (a JSON document), for `/readyz`.
    pub async fn record_restart(&self, lease: &Lease, record: &str) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.command("SET", self.keys.last_restart(), record);
        self.run_fenced(lease, writes).await
    }

    /// Vouches for the state as [`Store::claim_instance`] did, if this is still the server that
    /// claimed it; [`StoreError::RedisRestarted`] if Redis restarted since.
    pub async fn confirm_instance(&self, lease: &Lease) -> Result<(), StoreError> {
        self.vouch(lease, "confirm").await
    }

    async fn vouch(&self, lease: &Lease, mode: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .fenced_invocation(&self.scripts.vouch, lease)
            .key(self.keys.instance())
            .arg(mode)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Whether the ready marker exists (whether or not this store requires it).
    pub async fn has_ready_marker(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.keys.ready()).await?)
    }

    /// Deletes the ready marker: with a Notification table, events wait for a bootstrap.
    pub async fn drop_ready_marker(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.delete(self.keys.ready());
        self.run_fenced(lease, writes).await
    }

    /// Raises the hand-off sequence to at least `seq`, and deletes the pending deltas and open
    /// batches if `discard_pending`: what a Redis that went back in time holds was flushed already.
    pub async fn resync_after_rollback(
        &self,
        lease: &Lease,
        seq: u64,
        discard_pending: bool,
    ) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.command("SET", self.keys.handoff_seq(), seq);
        if discard_pending {
            writes.delete(self.keys.pending());
        }
        // The held counts were kept against the old pending deltas: they are dropped, each to be
        // loaded again. The flag, set in the same step, stops reads and loads from trusting them
        // until that is done, whoever finishes it; the new marker value keeps loads that read
        // before the resync from installing stale bases.
        writes.command("SET", self.keys.ready(), chrono::Utc::now().to_rfc3339()).command(
            "SET",
            self.keys.counts_stale(),
            1,
        );
        self.run_fenced(lease, writes).await?;
        self.finish_reloading_counts().await?;
        Ok(())
    }

    /// Finishes dropping the held counts after a rollback resync, if a resync flagged them (this
    /// process's, or one that died before it was done); `true` if there was anything to do.
    pub async fn finish_reloading_counts(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        if !conn.exists(self.keys.counts_stale()).await? {
            return Ok(false);
        }
        self.clear_held_counts().await?;
        // Every count may have moved: live streams re-read all their users, now that a read
        // answers the reloaded count.
        let mut transaction = redis::pipe();
        transaction
            .atomic()
            .del(self.keys.counts_stale())
            .ignore()
            .publish(self.keys.live_channel(), ALL_USERS)
            .ignore();
        let _: () = transaction.query_async(&mut conn).await?;
        Ok(true)
    }

    /// Whether this store refuses events until a bootstrap (a Notification table is configured).
    pub fn requires_bootstrap(&self) -> bool {
        self.requires_bootstrap
    }

    /// Batches handed off and not yet dropped: normally none between flushes; any found at the
    /// start of a flush were left by a process that stopped mid-flush.
    pub async fn batch_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = conn.smembers(self.keys.batches()).await?;
        ids.sort();
        Ok(ids)
    }

    /// Users `start..start + count` of a batch (by rank: the batch no longer changes) with their deltas.
    pub async fn batch_chunk(&self, batch_id: &str, start: usize, count: usize) -> Result<Vec<(u64, i64)>, StoreError> {
        let mut conn = self.conn.clone();
        let stop = (start + count) as isize - 1;
        let rows: Vec<(String, String)> =
            conn.zrange_withscores(self.keys.batch(batch_id), start as isize, stop).await?;
        rows.iter()
            .map(|(user, score)| {
                let user = user
                    .parse::<u64>()
                    .map_err(|_| StoreError::Unexpected(format!("batch member {user:?} is not a user id")))?;
                Ok((user, parse_score(score)?))
            })
            .collect()
    }

    /// Deletes a batch whose deltas are committed.
    pub async fn drop_batch(&self, lease: &Lease, batch_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .fenced_invocation(&self.scripts.drop_batch, lease)
            .key(self.keys.batch(batch_id))
            .key(self.keys.batches())
            .arg(batch_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// The most notification states one [`Store::reconcile_truth`] call writes: each call is a short
/// script (about 3 ms; 6 ms at 1,000, see docs/design.md *Reconcile*), however many notifications
/// a user has.
pub const TRUTH_STATES_PER_CALL: usize = 500;

/// How Redis keeps its data ([`Store::persistence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RedisPersistence {
    /// `none`, `rdb` (snapshots), `aof_everysec`, `aof_always` or `aof_no_fsync` (the append-only
    /// file, with its `appendfsync`).
    pub mode: &'static str,
    /// Replicas connected to this Redis.
    pub replicas: u64,
}

/// Whether the Redis server vouches for the state ([`Store::check_instance`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCheck {
    /// The instance key names this server: the state is the one written to it.
    pub vouched: bool,
    /// Nothing was ever vouched for, handed off or left pending: a new state (a new deployment,
    /// or a Redis that lost everything), which the first event or flush vouches for.
    pub new: bool,
    /// This server's run id.
    pub server: String,
    /// The run id in the instance key (`None`: never vouched for, or lost).
    pub vouched_by: Option<String>,
    /// What the last recovery from a restart did, as it recorded it.
    pub last_restart: Option<String>,
}

/// A user's notifications as the Notification table holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTruth {
    /// The user.
    pub user_id: u64,
    /// The user's stored count (read while no flush can run).
    pub stored: i64,
    /// Each notification's id and state (1 read, 2 unread, 3 deleted).
    pub notifications: Vec<(u64, u8)>,
}

/// Some of one user's notifications as the table holds them: one piece of a truth chunk.
pub type TruthPiece<'a> = (u64, &'a [(u64, u8)]);

/// What a reconcile found for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UserDrift {
    /// The user.
    pub user_id: u64,
    /// What countersink counted before (stored + pending).
    pub stored: i64,
    /// The true count, now in effect.
    pub actual: i64,
}

/// How [`Store::reconcile_finish`] left one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserRepair {
    /// The user's count is the table's truth now; `drift` says what it was before.
    Repaired(UserDrift),
    /// Repaired as [`UserRepair::Repaired`], and queued for another recount: an event journaled
    /// during the fence occurred before the fence began, so it may be older than the table's read
    /// and its replay may have undone a change the read saw (see `reconcile_finish.lua`).
    RepairedRecountQueued(UserDrift),
    /// The fence expired before the repair (the reconcile took too long). The states and counts
    /// the truth chunks wrote agree with each other; the user is not repaired: try again.
    Unfinished,
}

impl redis::FromRedisValue for UserRepair {
    /// `{user, 'repaired', before, actual, queued again (0 or 1)}` or `{user, 'unfinished'}` (see
    /// `reconcile_finish.lua`).
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        let reply: Vec<redis::Value> = redis::from_redis_value(value)?;
        let mut fields = reply.into_iter();
        let mut next = || fields.next().ok_or_else(|| redis::ParsingError::from("a reconcile result cut short"));
        let user_id: u64 = redis::from_redis_value(next()?)?;
        let outcome: String = redis::from_redis_value(next()?)?;
        match outcome.as_str() {
            "repaired" => {
                let drift = UserDrift {
                    user_id,
                    stored: redis::from_redis_value(next()?)?,
                    actual: redis::from_redis_value(next()?)?,
                };
                let queued_again: i64 = redis::from_redis_value(next()?)?;
                Ok(if queued_again == 1 {
                    UserRepair::RepairedRecountQueued(drift)
                } else {
                    UserRepair::Repaired(drift)
                })
            }
            "unfinished" => Ok(UserRepair::Unfinished),
            other => Err(format!("an unknown reconcile result {other:?}").into()),
        }
    }
}

impl Store {
    /// Fences `users` for `fence`: until it is lifted or expires, their events are journaled.
    pub async fn reconcile_begin(&self, lease: &Lease, users: &[u64], fence: Duration) -> Result<(), StoreError> {
        let mut invocation = self.fenced_invocation(&self.scripts.reconcile_begin, lease);
        invocation
            .key(self.keys.reconciling())
            .arg(self.keys.journal(""))
            .arg(fence.as_millis() as u64)
            .arg(self.keys.reconcile_draft(""))
            .arg(self.keys.reconcile_tally(""));
        for user in users {
            invocation.arg(*user);
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Writes one chunk of the table's truth (at most [`TRUTH_STATES_PER_CALL`] notifications in
    /// all) for fenced users: each state becomes the table's with the journal replayed on top, and
    /// the users' counts move with them, so states and counts agree after every chunk. The users'
    /// fences are moved `fence` ahead; users whose fence had expired are skipped. Returns how many
    /// states were written.
    pub async fn reconcile_truth(
        &self,
        lease: &Lease,
        chunk: &[TruthPiece<'_>],
        fence: Duration,
    ) -> Result<u64, StoreError> {
        let total: usize = chunk.iter().map(|(_, piece)| piece.len()).sum();
        if total > TRUTH_STATES_PER_CALL {
            return Err(StoreError::Unexpected(format!(
                "a truth chunk of {total} states (at most {TRUTH_STATES_PER_CALL})"
            )));
        }
        let mut invocation = self.fenced_invocation(&self.scripts.reconcile_truth, lease);
        invocation
            .key(self.keys.reconciling())
            .key(self.keys.pending())
            .arg(self.keys.journal(""))
            .arg(self.keys.reconcile_draft(""))
            .arg(self.keys.reconcile_tally(""))
            .arg(self.keys.reconciled(""))
            .arg(self.keys.live_channel())
            .arg(fence.as_millis() as u64);
        for (user, piece) in chunk {
            let (bucket, field) = Keys::count_slot(*user);
            let mut by_shard: std::collections::BTreeMap<u64, Vec<(u64, u8)>> = Default::default();
            for (id, state) in piece.iter() {
                let (shard, index) = Keys::state_slot(*id);
                by_shard.entry(shard).or_default().push((index, *state));
            }
            for (shard, states) in by_shard {
                invocation
                    .arg(*user)
                    .arg(self.keys.counts(bucket))
                    .arg(field)
                    .arg(self.keys.state(shard))
                    .arg(states.len());
                for (index, state) in states {
                    invocation.arg(index).arg(state);
                }
            }
        }
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    /// Repairs fenced users whose truth is written ([`Store::reconcile_truth`]): sets each one's
    /// pending delta so that `stored` (per user, read while no flush can run) plus pending is the
    /// true count, holds that count, and lifts the fence. Its work is bounded by the journals.
    ///
    /// For `grace` afterwards, an event for a notification Redis knew but the table did not hold
    /// (deleted before the read, its event still on the way) counts nothing; one journaled during
    /// the fence is not counted either. A user whose journal holds an event that changed a state
    /// and occurred before the fence began is queued for another recount, at most once per
    /// [`RECOUNT_AGAIN_AT_MOST_EVERY`].
    pub async fn reconcile_finish(
        &self,
        lease: &Lease,
        stored: &[(u64, i64)],
        grace: Duration,
    ) -> Result<Vec<(u64, UserRepair)>, StoreError> {
        let mut invocation = self.fenced_invocation(&self.scripts.reconcile_finish, lease);
        invocation
            .key(self.keys.pending())
            .key(self.keys.reconciling())
            .key(self.keys.recounts())
            .arg(self.keys.journal(""))
            .arg(self.keys.reconciled(""))
            .arg(grace.as_millis() as u64)
            .arg(self.keys.live_channel())
            .arg(self.keys.reconcile_draft(""))
            .arg(self.keys.reconcile_tally(""))
            .arg(self.keys.recounted_again(""))
            .arg(RECOUNT_AGAIN_AT_MOST_EVERY.as_millis() as u64);
        for (user, stored) in stored {
            let (bucket, field) = Keys::count_slot(*user);
            invocation.arg(*user).arg(*stored).arg(self.keys.counts(bucket)).arg(field);
        }
        let mut conn = self.conn.clone();
        let repairs: Vec<UserRepair> = invocation.invoke_async(&mut conn).await?;
        Ok(stored.iter().map(|(user, _)| *user).zip(repairs).collect())
    }

    /// Asks for users to be recounted (the bulk paths); repeated asks for a user coalesce.
    pub async fn queue_recounts(&self, users: &[u64]) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: i64 = conn.sadd(self.keys.recounts(), users).await?;
        Ok(())
    }

    /// Claims up to `limit` users waiting for a recount for `ttl`, for one worker: renew the
    /// claim while recounting ([`Store::renew_recounts`]) and end it with
    /// [`Store::recounts_done`]. Claims whose worker let them lapse (it died) are waiting again
    /// first, so this take or a later one claims them again.
    pub async fn take_recounts(&self, limit: usize, ttl: Duration) -> Result<RecountClaim, StoreError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let mut conn = self.conn.clone();
        let users: Vec<u64> = self
            .scripts
            .take_recounts
            .key(self.keys.recounts())
            .key(self.keys.recount_claims())
            .key(self.keys.recounts_taken())
            .arg(&id)
            .arg(limit.max(1))
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(RecountClaim { id, users })
    }

    /// Extends `claim` by `ttl` from now; returns how many of its users it still holds (fewer when
    /// some lapsed and were given back to waiting: they are recounted again, which is harmless).
    pub async fn renew_recounts(&self, claim: &RecountClaim, ttl: Duration) -> Result<u64, StoreError> {
        let mut invocation = self.scripts.renew_recounts.prepare_invoke();
        invocation.key(self.keys.recount_claims()).arg(ttl.as_millis() as u64);
        for member in claim.members() {
            invocation.arg(member);
        }
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    /// Ends `claim`: its users are done, except those of `requeue`, which wait again (a recount
    /// that could not finish them). Only this claim's entries go; another worker's claim on the
    /// same users stays. One `MULTI`/`EXEC`, so no user is both dropped and not re-queued.
    pub async fn recounts_done(&self, claim: &RecountClaim, requeue: &[u64]) -> Result<(), StoreError> {
        if claim.users.is_empty() && requeue.is_empty() {
            return Ok(());
        }
        let mut transaction = redis::pipe();
        transaction.atomic();
        if !claim.users.is_empty() {
            transaction.zrem(self.keys.recount_claims(), claim.members()).ignore();
        }
        if !requeue.is_empty() {
            transaction.sadd(self.keys.recounts(), requeue).ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = transaction.query_async(&mut conn).await?;
        Ok(())
    }

    /// Users waiting for a recount (those left taken by an older version included: the next take
    /// re-queues them), and claims held by workers and not yet done (a lapsed claim counts until a
    /// take gives it back; a user claimed by two workers counts twice).
    pub async fn recounts_queued(&self) -> Result<(u64, u64), StoreError> {
        let mut conn = self.conn.clone();
        let (waiting, taken, claimed): (u64, u64, u64) = redis::pipe()
            .scard(self.keys.recounts())
            .scard(self.keys.recounts_taken())
            .zcard(self.keys.recount_claims())
            .query_async(&mut conn)
            .await?;
        Ok((waiting + taken, claimed))
    }
}

/// One worker's claim on users waiting for a recount (see [`Store::take_recounts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecountClaim {
    /// Names this take's claims, so that its worker renews and ends only its own.
    pub id: String,
    /// The users claimed (none when nobody was waiting).
    pub users: Vec<u64>,
}

impl RecountClaim {
    /// The claims' members in [`Keys::recount_claims`].
    fn members(&self) -> Vec<String> {
        self.users.iter().map(|user| format!("{}:{user}", self.id)).collect()
    }
}

impl Store {
    /// Whether a bootstrap has marked the state complete (always true when none is required).
    pub async fn is_ready(&self) -> Result<bool, StoreError> {
        if !self.requires_bootstrap {
            return Ok(true);
        }
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.keys.ready()).await?)
    }

    /// Where an interrupted bootstrap stopped: `None` when none is under way, `Some(None)` when
    /// one started and wrote no chunk yet, `Some(Some(id))` after the chunk ending at `id`.
    pub async fn bootstrap_cursor(&self) -> Result<Option<Option<i64>>, StoreError> {
        let mut conn = self.conn.clone();
        let cursor: Option<String> = conn.get(self.keys.bootstrap_cursor()).await?;
        match cursor.as_deref() {
            None => Ok(None),
            Some("") => Ok(Some(None)),
            Some(id) => id
                .parse()
                .map(|id| Some(Some(id)))
                .map_err(|_| StoreError::Unexpected(format!("bootstrap cursor {id:?} is not an id"))),
        }
    }

    /// Records that a bootstrap has cleared the state and started reading.
    pub async fn start_bootstrap(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.command("SET", self.keys.bootstrap_cursor(), "");
        self.run_fenced(lease, writes).await
    }

    /// Writes the states of one chunk of notifications `(id, user, state)`: `BITFIELD`s of at
    /// most [`STATES_PER_COMMAND`] states, in one fenced script. Writing a state twice is
    /// harmless, so a resumed bootstrap may redo chunks.
    pub async fn write_states(&self, lease: &Lease, rows: &[(u64, u64, u8)]) -> Result<(), StoreError> {
        let mut by_shard: HashMap<u64, Vec<(u64, u8)>> = HashMap::new();
        for (id, _, state) in rows {
            let (shard, index) = Keys::state_slot(*id);
            by_shard.entry(shard).or_default().push((index, *state));
        }
        let mut writes = self.fenced_writes_on_claimed_instance();
        for (shard, states) in by_shard {
            for piece in states.chunks(STATES_PER_COMMAND) {
                // A plain bit offset (2 bits per notification) spares formatting a `#index` per row.
                let args: Vec<(&str, &str, u64, u8)> =
                    piece.iter().map(|(index, state)| ("SET", "u2", index * 2, *state)).collect();
                writes.command("BITFIELD", self.keys.state(shard), args);
            }
        }
        self.run_fenced(lease, writes).await
    }

    /// Saves a bootstrap's progress: the unread count of every user so far and the last id read,
    /// in one `MULTI`/`EXEC`, so a resumed bootstrap starts from a count that matches its cursor.
    pub async fn checkpoint_bootstrap(
        &self,
        lease: &Lease,
        last_id: i64,
        counts: &HashMap<u64, i64>,
    ) -> Result<(), StoreError> {
        let mut packed = Vec::with_capacity(counts.len() * 16);
        for (user, count) in counts {
            packed.extend_from_slice(&user.to_le_bytes());
            packed.extend_from_slice(&count.to_le_bytes());
        }
        let mut writes = self.fenced_writes_on_claimed_instance();
        writes.command("SET", self.keys.bootstrap_counts(), packed).command(
            "SET",
            self.keys.bootstrap_cursor(),
            last_id,
        );
        self.run_fenced(lease, writes).await
    }

    /// The counts saved by the last checkpoint (empty when none was saved).
    pub async fn bootstrap_counts(&self) -> Result<HashMap<u64, i64>, StoreError> {
        let mut conn = self.conn.clone();
        let packed: Option<Vec<u8>> = conn.get(self.keys.bootstrap_counts()).await?;
        let packed = packed.unwrap_or_default();
        if packed.len() % 16 != 0 {
            return Err(StoreError::Unexpected("the bootstrap checkpoint is truncated".into()));
        }
        Ok(packed
            .chunks_exact(16)
            .map(|pair| {
                let (user, count) = pair.split_at(8);
                let user = u64::from_le_bytes(user.try_into().unwrap_or_default());
                let count = i64::from_le_bytes(count.try_into().unwrap_or_default());
                (user, count)
            })
            .collect())
    }

    /// Ends a bootstrap: drops the resume point and the checkpoint, raises the hand-off sequence
    /// to the highest the database recorded, remembers the highest notification it read (see
    /// `apply_events.lua`), and writes the marker, so events apply again.
    pub async fn finish_bootstrap(
        &self,
        lease: &Lease,
        handoff_seq: u64,
        highest_read: Option<u64>,
    ) -> Result<(), StoreError> {
        let slot = match highest_read.map(Keys::state_slot) {
            Some((shard, index)) => format!("{shard} {index}"),
            None => "-1 -1".to_string(),
        };
        // Redis's clock, the one the event script reads `occurred_at` against, whichever host
        // runs the bootstrap.
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn.clone()).await?;
        let finished_ms = secs * 1000 + micros / 1000;
        let mut writes = self.fenced_writes_on_claimed_instance();
        writes
            .command("SET", self.keys.rebuilt(), format!("{slot} {finished_ms}"))
            .command("SET", self.keys.handoff_seq(), handoff_seq)
            .delete(self.keys.bootstrap_cursor())
            .delete(self.keys.bootstrap_counts())
            .command("SET", self.keys.ready(), chrono::Utc::now().to_rfc3339())
            // Every stored count was rewritten: live streams re-read all their users.
            .command("PUBLISH", self.keys.live_channel(), ALL_USERS);
        self.run_fenced(lease, writes).await
    }

    /// Deletes the whole state: the marker first (events are refused from then on), then every
    /// held count, state shard, the pending set, open batches, reconcile fences, journals and
    /// pictures.
    pub async fn clear_state(&self, lease: &Lease) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        // Fenced, so a holder that lost its lease stops here; the deletes after it are not (a
        // SCAN cannot run in a script), and the lease lasts far longer than they take.
        self.drop_ready_marker(lease).await?;
        let mut deleted = 0;
        // With the marker gone, no process started with a Notification table (as every process of
        // a deployment that bootstraps must be) installs or changes a count, so none comes back.
        for pattern in
            ["counts:*", "state:*", "batch:*", "journal:*", "reconciled:*", "reconcile_draft:*", "reconcile_tally:*"]
        {
            deleted += self.unlink_matching(pattern).await?;
        }
        let singles = [
            self.keys.pending(),
            self.keys.batches(),
            self.keys.reconciling(),
            self.keys.bootstrap_cursor(),
            self.keys.bootstrap_counts(),
        ];
        let n: u64 = conn.unlink(&singles).await?;
        Ok(deleted + n)
    }
}

/// A reply of a pipeline or script as the type the caller expects.
fn typed<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError::Unexpected(e.to_string()))
}

/// The script's op code for an event (see `apply_events.lua`).
fn op_code(event: &Event) -> &'static str {
    match (event.kind, event.created, event.unread) {
        (EventKind::PostDelete, _, _) => "D",
        (EventKind::PostSave, true, true) => "C1",
        (EventKind::PostSave, true, false) => "C0",
        (EventKind::PostSave, false, true) => "S1",
        (EventKind::PostSave, false, false) => "S0",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `transition.lua` declares the states and reads the op codes; this side names them too
    /// (`state`, `op_code`). Nothing else ties the two languages together.
    #[test]
    fn the_state_and_op_codes_agree_with_the_lua_state_machine() {
        let lua = include_str!("transition.lua");
        assert!(
            lua.contains(&format!(
                "local UNSEEN, READ, UNREAD, DELETED = 0, {}, {}, {}",
                state::READ,
                state::UNREAD,
                state::DELETED
            )),
            "transition.lua's states differ from store::state"
        );
        let events = [
            Event::delete(1, 1),
            Event::save(1, 1, true, true),
            Event::save(1, 1, false, true),
            Event::save(1, 1, true, false),
            Event::save(1, 1, false, false),
        ];
        let ops: Vec<&str> = events.iter().map(op_code).collect();
        assert_eq!(ops, ["D", "C1", "C0", "S1", "S0"]);
        // The header documents every op, and the function reads their two characters.
        assert!(lua.contains("Ops: C1 created unread, C0 created read, S1 saved unread, S0 saved read, D deleted"));
        assert!(
            lua.contains("if op == 'D'")
                && lua.contains("string.sub(op, 1, 1) == 'C'")
                && lua.contains("string.sub(op, 2, 2) == '1'")
        );
    }
}
