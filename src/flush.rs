//! The flush: pending deltas into `UserNotificationsCount`, exactly once, in batches.
//!
//! The protocol (`docs/design.md` says what a crash after each step leaves behind):
//!
//! 1. **Lease.** One flush at a time: a local mutex (the scheduler may start overlapping runs)
//!    and the flush lease in Redis (several sidecar processes may share one Redis): renewed
//!    while the flush runs, expiring soon after a holder dies, and fencing every Redis write
//!    of a holder that stalled past it ([`crate::store::lease`]).
//! 2. **Recover.** Batches left by a process that stopped mid-flush are applied first, each
//!    only if the database has no record of it.
//! 3. **Hand off.** The pending set is renamed to a batch key with a fresh random batch id, in
//!    one script: new events start a new pending set at once.
//! 4. **Apply.** One database transaction records the batch id, then streams the batch from
//!    Redis in chunks and adds each chunk with one upsert, reading the next chunk while the
//!    current one is written. A batch already recorded is skipped.
//! 5. **Drop.** Once committed, the batch key is deleted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::Connection;
use tokio::runtime::Handle;
use tracing::{debug, error, info, instrument, warn};

use crate::crash_point;
use crate::db::{queries, Db, DbError};
use crate::metrics;
use crate::store::{Acquired, InstanceCheck, Lease, LeaseHolder, LeaseRenewal, Store, StoreError};

/// How long batch records are kept. Records only need to outlive the batch keys they guard,
/// and every flush recovers leftover batches before it prunes.
const BATCH_RECORD_RETENTION: chrono::TimeDelta = chrono::TimeDelta::days(7);
/// How soon a failed renewal of the lease is tried again.
const RENEWAL_RETRY: Duration = Duration::from_millis(250);
/// How often a flush waiting for another process's lease looks again.
const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a recovery from a Redis restart waits for the flush lease (a flush, a reconcile step).
const RECOVERY_LEASE_WAIT: Duration = Duration::from_secs(60);

/// A flush failure.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Redis failed; whatever was handed off stays in Redis for the next flush.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database failed; the transaction rolled back and the batch stays in Redis.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Another process held the lease for longer than this caller would wait.
    #[error("{0}; try again then")]
    Busy(LeaseHolder),
    /// Another flush of this process ran for longer than this caller would wait.
    #[error("a flush is already running in this process; try again when it is done")]
    BusyHere,
    /// The lock was taken and the caller chose not to wait (never with [`WhenBusy::Wait`]).
    #[error("skipped: {0}")]
    Skipped(&'static str),
    /// Writing a batch took longer than `--flush-timeout-secs`; the transaction rolled back and
    /// the batch stays in Redis for the next flush.
    #[error("writing the batch took longer than {0:?} (--flush-timeout-secs); rolled back, the next flush applies it")]
    TimedOut(Duration),
    /// A test asked the flush to stop at a crash point, as if the process had died there.
    #[error("flush {0}")]
    Stopped(#[from] crash_point::Stopped),
}

impl FlushError {
    /// Whether a dependency was unreachable (worth a retry).
    pub fn is_unavailable(&self) -> bool {
        match self {
            FlushError::Store(e) => e.is_unavailable(),
            FlushError::Db(e) => e.is_unavailable(),
            FlushError::TimedOut(_) => true,
            FlushError::Busy(_) | FlushError::BusyHere | FlushError::Skipped(_) | FlushError::Stopped(_) => false,
        }
    }
}

/// What to do when another flush is running.
#[derive(Debug, Clone, Copy)]
pub enum WhenBusy {
    /// Return a skipped report at once (the scheduler: the running flush does the work).
    Skip,
    /// Wait up to this long for it to finish, then flush (a person or a script asked).
    Wait(Duration),
}

/// What one batch did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct BatchReport {
    /// The batch id.
    pub batch_id: String,
    /// Users whose stored count changed.
    pub users: u64,
    /// The sum of the deltas written.
    pub delta_sum: i64,
    /// Left by an earlier flush that stopped part-way.
    pub recovered: bool,
    /// Already recorded in the database, so nothing was written again.
    pub already_applied: bool,
}

/// What a flush did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FlushReport {
    /// The batches applied (recovered ones first).
    pub batches: Vec<BatchReport>,
    /// Rows upserted into the count table.
    pub users_written: u64,
    /// Why nothing was done, if it was skipped.
    pub skipped: Option<String>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// What a recovery from a Redis restart did, kept in Redis for `/readyz` (every process shows the
/// last one, whichever process recovered).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RedisRestart {
    /// When a process noticed it.
    pub detected_at: chrono::DateTime<Utc>,
    /// The run id of the Redis server that holds the state now.
    pub server: String,
    /// The run id of the server that had vouched for the state (`None`: the state did not say).
    pub vouched_by: Option<String>,
    /// What was done about it.
    pub recovery: RestartRecovery,
}

/// How the state was recovered after a Redis restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RestartRecovery {
    /// Rebuilt from the Notification table (`--source-table`): nothing acknowledged is lost.
    Rebuilt,
    /// No Notification table: the hand-off sequence was resynced with the database, and the
    /// restored pending deltas dropped if they were stored already (`pending_dropped`), else kept.
    /// Events acknowledged after the snapshot Redis restarted from are not counted.
    Resynced {
        /// Whether the restored pending deltas were dropped as stored already.
        pending_dropped: bool,
    },
}

impl RestartRecovery {
    fn label(&self) -> &'static str {
        match self {
            RestartRecovery::Rebuilt => "rebuilt",
            RestartRecovery::Resynced { .. } => "resynced",
        }
    }
}

/// Runs flushes. Cheap to clone; clones share the local lock.
#[derive(Clone)]
pub struct Flusher {
    store: Store,
    db: Db,
    chunk_users: usize,
    lock_ttl: Duration,
    timeout: Duration,
    local: Arc<tokio::sync::Mutex<()>>,
}

impl Flusher {
    /// A flusher writing `chunk_users` users per upsert, holding the flush lease for at most
    /// `lock_ttl` between renewals, and rolling a batch back that takes longer than `timeout`.
    pub fn new(store: Store, db: Db, chunk_users: usize, lock_ttl: Duration, timeout: Duration) -> Self {
        Self { store, db, chunk_users, lock_ttl, timeout, local: Arc::new(tokio::sync::Mutex::new(())) }
    }

    /// Runs one complete flush.
    #[instrument(skip(self))]
    pub async fn flush(&self, when_busy: WhenBusy) -> Result<FlushReport, FlushError> {
        self.run(when_busy, None).await
    }

    /// Recovers from a Redis restart if this Redis server does not vouch for the state (see
    /// `check_redis_state`), under the lease; `true` if it was vouched for already. The serve
    /// process calls it every few seconds, and at once when an event was refused for it.
    pub async fn recover_if_redis_restarted(&self) -> Result<bool, FlushError> {
        let instance = self.store.check_instance().await?;
        metrics::redis_state_vouched(instance.vouched || instance.new);
        if instance.vouched || instance.new {
            // A new state is vouched for by its first event or flush: an idle process writes nothing.
            return Ok(true);
        }
        let recovered =
            self.exclusive(WhenBusy::Wait(RECOVERY_LEASE_WAIT), async |lease| self.check_redis_state(lease).await);
        // With a Notification table the state is now missing: the bootstrap rebuilds it.
        match recovered.await {
            Ok(_) | Err(FlushError::Store(StoreError::StateMissing)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Runs a flush that stops at crash point `point` (one of `crash_point::FLUSH_*`) as if the
    /// process had died there. For tests of the exactly-once protocol; the lease is released as
    /// its expiry would.
    pub async fn flush_stopping_after(&self, point: &'static str) -> Result<FlushReport, FlushError> {
        let flush_points =
            [crash_point::FLUSH_AFTER_HANDOFF, crash_point::FLUSH_MID_WRITE, crash_point::FLUSH_AFTER_COMMIT];
        debug_assert!(flush_points.contains(&point), "{point} is not a crash point of a flush");
        self.run(WhenBusy::Wait(Duration::from_secs(30)), Some(point)).await
    }

    async fn run(&self, when_busy: WhenBusy, stop: Option<&'static str>) -> Result<FlushReport, FlushError> {
        let started = Instant::now();
        let outcome =
            self.exclusive(when_busy, async |lease| self.flush_locked(lease, stop).await).await.inspect_err(|e| {
                if !matches!(e, FlushError::Skipped(_)) {
                    metrics::flush_failed();
                }
            });
        let mut report = match outcome? {
            Ok(report) => report,
            Err(reason) => return Ok(skipped(reason, started)),
        };
        metrics::flush_succeeded(report.users_written, report.batches.len(), started.elapsed());
        report.duration_ms = started.elapsed().as_millis() as u64;
        // An idle service flushes nothing every 10 s: that is no news at info.
        if report.batches.is_empty() {
            debug!(duration_ms = report.duration_ms, "flush done: nothing pending");
        } else {
            info!(
                batches = report.batches.len(),
                users_written = report.users_written,
                duration_ms = report.duration_ms,
                "flush done"
            );
        }
        Ok(report)
    }

    /// Runs `work` holding the local lock and the flush lease, so no flush runs beside it
    /// (reconcile and bootstrap need this); `work` makes its writes under the lease with it.
    /// `Err(reason)` when `when_busy` is [`WhenBusy::Skip`] and a flush is running.
    pub async fn exclusive<T, E: From<FlushError>>(
        &self,
        when_busy: WhenBusy,
        work: impl AsyncFnOnce(&Lease) -> Result<T, E>,
    ) -> Result<Result<T, &'static str>, E> {
        let _local = match when_busy {
            WhenBusy::Skip => match self.local.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(Err("a flush is already running in this process")),
            },
            WhenBusy::Wait(limit) => {
                tokio::time::timeout(limit, self.local.lock()).await.map_err(|_| FlushError::BusyHere)?
            }
        };
        let Some(lease) = self.acquire_lease(when_busy).await.map_err(E::from)? else {
            return Ok(Err("another process holds the flush lease"));
        };
        // Long work (a bootstrap of a big table) keeps the lease alive; a process that dies
        // stops renewing it, and the lease expires for the next one.
        let _renewal = AbortOnDrop(tokio::spawn(renew_lease(self.store.clone(), lease.renewal(), self.lock_ttl)));
        let result = work(&lease).await;
        if let Err(e) = self.store.release_lease(lease).await {
            // The lease expires by itself; the next flush only waits longer.
            warn!(error = %e, "could not release the flush lease");
        }
        result.map(Ok)
    }

    async fn acquire_lease(&self, when_busy: WhenBusy) -> Result<Option<Lease>, FlushError> {
        let deadline = match when_busy {
            WhenBusy::Skip => None,
            WhenBusy::Wait(limit) => Some(Instant::now() + limit),
        };
        let floor = self.db.run(queries::lease_fence).await?;
        loop {
            let holder = match self.store.try_acquire_lease(self.lock_ttl, floor).await? {
                Acquired::Held(lease) => return Ok(Some(lease)),
                Acquired::Busy(holder) => holder,
            };
            match deadline {
                None => return Ok(None),
                Some(deadline) if Instant::now() >= deadline => return Err(FlushError::Busy(holder)),
                Some(_) => tokio::time::sleep(LOCK_POLL_INTERVAL).await,
            }
        }
    }

    /// A flush, for a caller holding the lease ([`Flusher::exclusive`]).
    pub async fn flush_locked(&self, lease: &Lease, stop: Option<&'static str>) -> Result<FlushReport, FlushError> {
        self.check_redis_state(lease).await?;
        let mut report = self.recover_open_batches(lease).await?;
        let batch_id = random_id();
        if let Some(seq) = self.store.handoff(lease, &batch_id).await? {
            crash_point::reach_or_stop(crash_point::FLUSH_AFTER_HANDOFF, stop)?;
            let batch = self.apply_and_drop(lease, &batch_id, seq, false, stop).await?;
            report.users_written += batch.users;
            report.batches.push(batch);
        }
        let cutoff = (Utc::now() - BATCH_RECORD_RETENTION).naive_utc();
        self.db.run(move |conn| queries::prune_batches(conn, cutoff)).await?;
        Ok(report)
    }

    /// Notices a Redis that restarted or went back in time, and recovers (docs/design.md, *Redis
    /// restarts*): a state this Redis server does not vouch for (restored from a snapshot, on a
    /// promoted replica, or lost) is rebuilt from the Notification table, or without one resynced
    /// with the database's record of hand-offs. A hand-off sequence below the highest one the
    /// database recorded means the same: the pending deltas may already be stored.
    async fn check_redis_state(&self, lease: &Lease) -> Result<(), FlushError> {
        // A resync that died before it dropped the held counts is finished here, by any process.
        if self.store.finish_reloading_counts().await? {
            warn!("finished dropping the counts held before a Redis rollback; each is loaded again");
        }
        let instance = self.store.check_instance().await?;
        let redis_seq = self.store.handoff_seq().await?;
        let db_seq = self.recorded_handoff_seq(lease).await?;
        if !instance.vouched {
            return self.recover_from_restart(lease, &instance, redis_seq, db_seq).await;
        }
        if redis_seq >= db_seq {
            return Ok(());
        }
        let rolled_back = self.store.has_ready_marker().await?;
        if self.store.requires_bootstrap() {
            if rolled_back {
                error!(
                    redis_seq,
                    db_seq, "Redis went back in time (an older snapshot?); rebuilding from the Notification table"
                );
                self.store.drop_ready_marker(lease).await?;
            }
            // The bootstrap rebuilds the state and the sequence; until then nothing is flushed.
            return Err(FlushError::Store(StoreError::StateMissing));
        }
        if rolled_back {
            // Without a Notification table nothing can be rebuilt: of two wrongs, dropping the
            // restored pending deltas (already stored) beats adding them a second time.
            error!(
                redis_seq,
                db_seq,
                "Redis went back in time (an older snapshot?); its pending deltas were stored already and are dropped; \
                 counts may drift: configure --source-table to rebuild and reconcile"
            );
        } else {
            warn!(redis_seq, db_seq, "Redis lost its data; continuing from the recorded sequence");
        }
        self.store.resync_after_rollback(lease, db_seq, rolled_back).await?;
        Ok(())
    }

    /// The highest hand-off the database recorded, read behind the lease's fence: passing it waits
    /// for a flush of an earlier holder that is still committing (it holds the fence row), so a
    /// batch it commits after this read cannot make the restored deltas look unstored.
    async fn recorded_handoff_seq(&self, lease: &Lease) -> Result<u64, FlushError> {
        let (fence, token) = (lease.fence(), lease.token().to_string());
        self.db
            .run(move |conn| {
                conn.transaction(|conn| {
                    if !queries::pass_lease_fence(conn, fence)? {
                        return Ok(None);
                    }
                    queries::max_handoff_seq(conn).map(Some)
                })
            })
            .await?
            .ok_or_else(|| {
                let lost = format!("the flush lease {token} passed to a later holder before Redis's state was checked");
                FlushError::Store(StoreError::LeaseLost(lost))
            })
    }

    /// Recovers from a state this Redis server does not vouch for (see `check_redis_state`).
    async fn recover_from_restart(
        &self,
        lease: &Lease,
        instance: &InstanceCheck,
        redis_seq: u64,
        db_seq: u64,
    ) -> Result<(), FlushError> {
        let pending = self.store.pending_users().await? > 0 || !self.store.batch_ids().await?.is_empty();
        let marker = self.store.has_ready_marker().await?;
        let vouched_by = match instance.vouched_by.as_deref() {
            Some(server) => server,
            // Never vouched for: a new deployment, a Redis that lost everything, or a state an
            // older version wrote (upgrading to instance records). A sequence below the
            // database's is a rollback all the same, if there is anything to distrust: pending
            // deltas, or a built state (the marker) with a table to rebuild it from.
            None if redis_seq < db_seq && (pending || (marker && self.store.requires_bootstrap())) => "none",
            None => return self.vouch_for_unrecorded_state(lease, redis_seq, db_seq, pending, marker).await,
        };
        if self.store.requires_bootstrap() {
            if marker {
                error!(
                    server = instance.server,
                    vouched_by,
                    "Redis restarted since its state was vouched for (it may be an older snapshot that lost writes); \
                     rebuilding it from the Notification table, events answer 503 meanwhile"
                );
                self.store.drop_ready_marker(lease).await?;
                self.record_restart(lease, instance, RestartRecovery::Rebuilt).await?;
            }
            // The bootstrap rebuilds the state and vouches for it; until then nothing is flushed.
            return Err(FlushError::Store(StoreError::StateMissing));
        }
        self.resync_after_restart(lease, instance, vouched_by, redis_seq, db_seq).await
    }

    /// A state no server ever vouched for (see `recover_from_restart`): claimed as it is.
    async fn vouch_for_unrecorded_state(
        &self,
        lease: &Lease,
        redis_seq: u64,
        db_seq: u64,
        pending: bool,
        marker: bool,
    ) -> Result<(), FlushError> {
        if self.store.requires_bootstrap() && !marker {
            // A bootstrap is due (it vouches for what it builds).
            return if redis_seq < db_seq { Err(FlushError::Store(StoreError::StateMissing)) } else { Ok(()) };
        }
        if redis_seq < db_seq {
            // Nothing pending: nothing to flush twice, only the sequence to carry on.
            warn!(redis_seq, db_seq, "Redis lost its data; continuing from the recorded sequence");
            self.store.resync_after_rollback(lease, db_seq, false).await?;
        } else if redis_seq > 0 || pending {
            warn!("the Redis state has no instance record (written by an older version); vouching for it as it is");
        }
        self.store.claim_instance(lease).await?;
        Ok(())
    }

    /// Without a Notification table: resyncs a state restored from a snapshot (see
    /// `check_redis_state`) and vouches for it.
    async fn resync_after_restart(
        &self,
        lease: &Lease,
        instance: &InstanceCheck,
        vouched_by: &str,
        redis_seq: u64,
        db_seq: u64,
    ) -> Result<(), FlushError> {
        // Restored from a snapshot (or a replica): every pending delta it holds was handed off
        // later if the database recorded a later hand-off, so it is stored already.
        let stored_already = redis_seq < db_seq;
        error!(
            server = instance.server,
            vouched_by,
            redis_seq,
            db_seq,
            pending_deltas = if stored_already { "dropped: stored already" } else { "kept: not stored yet" },
            "Redis restarted since its state was vouched for (it may be an older snapshot): events acknowledged after \
             that snapshot are not counted; configure --source-table to rebuild and reconcile"
        );
        self.store.resync_after_rollback(lease, db_seq.max(redis_seq), stored_already).await?;
        let recovery = RestartRecovery::Resynced { pending_dropped: stored_already };
        self.record_restart(lease, instance, recovery).await?;
        self.store.claim_instance(lease).await?;
        Ok(())
    }

    async fn record_restart(
        &self,
        lease: &Lease,
        instance: &InstanceCheck,
        recovery: RestartRecovery,
    ) -> Result<(), FlushError> {
        metrics::redis_restart_detected(recovery.label());
        let record = RedisRestart {
            detected_at: Utc::now(),
            server: instance.server.clone(),
            vouched_by: instance.vouched_by.clone(),
            recovery,
        };
        let json = serde_json::to_string(&record).map_err(|e| StoreError::Unexpected(e.to_string()))?;
        self.store.record_restart(lease, &json).await?;
        Ok(())
    }

    /// Step 2: applies and drops batches left by a process that stopped mid-flush, for a caller
    /// holding the lease. Afterwards no batch is open.
    pub async fn recover_open_batches(&self, lease: &Lease) -> Result<FlushReport, FlushError> {
        let mut report = FlushReport::default();
        for batch_id in self.store.batch_ids().await? {
            warn!(batch_id, "recovering a batch left by an interrupted flush");
            let batch = self.apply_and_drop(lease, &batch_id, 0, true, None).await?;
            report.users_written += if batch.already_applied { 0 } else { batch.users };
            report.batches.push(batch);
        }
        Ok(report)
    }

    async fn apply_and_drop(
        &self,
        lease: &Lease,
        batch_id: &str,
        seq: u64,
        recovered: bool,
        stop: Option<&'static str>,
    ) -> Result<BatchReport, FlushError> {
        let mut report = self.apply_batch(lease, batch_id, seq, stop).await?;
        report.recovered = recovered;
        crash_point::reach_or_stop(crash_point::FLUSH_AFTER_COMMIT, stop)?;
        self.store.drop_batch(lease, batch_id).await?;
        Ok(report)
    }

    /// Step 4: applies one batch in one transaction, unless it is already recorded.
    #[instrument(skip(self, stop))]
    async fn apply_batch(
        &self,
        lease: &Lease,
        batch_id: &str,
        seq: u64,
        stop: Option<&'static str>,
    ) -> Result<BatchReport, FlushError> {
        let store = self.store.clone();
        let db = self.db.clone();
        let (chunk_users, timeout) = (self.chunk_users, self.timeout);
        let deadline = Instant::now() + timeout;
        let batch_id = batch_id.to_string();
        let (fence, token) = (lease.fence(), lease.token().to_string());
        let handle = Handle::current();
        // The transaction is synchronous (diesel); Redis reads inside it run on the runtime
        // through `handle.block_on`, which is allowed on a blocking-pool thread.
        tokio::task::spawn_blocking(move || -> Result<BatchReport, FlushError> {
            let mut conn = db.get()?;
            let applied = conn.transaction(|conn| {
                let mut report = BatchReport {
                    batch_id: batch_id.clone(),
                    users: 0,
                    delta_sum: 0,
                    recovered: false,
                    already_applied: false,
                };
                queries::limit_statement_time(conn, deadline.saturating_duration_since(Instant::now()))?;
                if !queries::pass_lease_fence(conn, fence)? {
                    return Err(FlushError::Store(StoreError::LeaseLost(format!(
                        "the flush lease {token} passed to a later holder before this batch was written"
                    ))));
                }
                if !queries::claim_batch(conn, &batch_id, seq, Utc::now().naive_utc())? {
                    report.already_applied = true;
                    return Ok(report);
                }
                // The batch no longer changes (it was renamed), so the next chunk is read from
                // Redis while this one is written; the transaction still sees the chunks in order,
                // and a read ahead that is not needed (a stop, a failure) is aborted.
                let mut start = 0;
                let mut chunk = handle.block_on(store.batch_chunk(&batch_id, start, chunk_users))?;
                while !chunk.is_empty() {
                    let next = (chunk.len() == chunk_users).then(|| {
                        let (store, batch_id) = (store.clone(), batch_id.clone());
                        let from = start + chunk_users;
                        AbortOnDrop(handle.spawn(async move { store.batch_chunk(&batch_id, from, chunk_users).await }))
                    });
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(FlushError::TimedOut(timeout));
                    }
                    queries::limit_statement_time(conn, left)?;
                    queries::add_deltas(conn, &chunk)?;
                    report.users += chunk.len() as u64;
                    report.delta_sum += chunk.iter().map(|(_, delta)| delta).sum::<i64>();
                    crash_point::reach_or_stop(crash_point::FLUSH_MID_WRITE, stop)?;
                    let Some(mut next) = next else { break };
                    chunk = handle
                        .block_on(&mut next.0)
                        .map_err(|e| FlushError::Db(DbError::Task(format!("reading the next chunk: {e}"))))??;
                    start += chunk_users;
                }
                // Read whole from the server the flush checked, or not committed: a Redis restarted
                // from an older snapshot under the flush may have lost the batch mid-read.
                if !handle.block_on(store.batch_intact(&batch_id, report.users))? {
                    return Err(FlushError::Store(StoreError::RedisRestarted));
                }
                queries::complete_batch(conn, &batch_id, report.users as i64, report.delta_sum)?;
                Ok(report)
            });
            if let Err(e) = queries::end_statement_time_limit(&mut conn) {
                warn!(error = %e, "could not lift the flush's lock-wait limit on its connection");
            }
            match applied {
                // The database cancelled a statement at the deadline (PostgreSQL's statement_timeout).
                Err(FlushError::Db(_)) if Instant::now() >= deadline => Err(FlushError::TimedOut(timeout)),
                Err(FlushError::Db(DbError::Query(e))) => {
                    // Pool and Redis failures are counted where they happen; a failed statement here.
                    metrics::dependency_error(metrics::Dependency::Database);
                    Err(FlushError::Db(DbError::Query(e)))
                }
                other => other,
            }
        })
        .await
        .map_err(|e| FlushError::Db(DbError::Task(e.to_string())))?
    }
}

impl From<diesel::result::Error> for FlushError {
    fn from(e: diesel::result::Error) -> Self {
        FlushError::Db(DbError::Query(e))
    }
}

/// Renews the lease every third of its time to live, until aborted or the lease is gone (the
/// holder's next fenced write then fails).
/// A failed renewal is tried again soon, not a third of the TTL later: a Redis reply can take as
/// long as that third (its 5 s timeout), and two slow attempts in a row would lose the lease.
async fn renew_lease(store: Store, renewal: LeaseRenewal, ttl: Duration) {
    let mut wait = ttl / 3;
    loop {
        tokio::time::sleep(wait).await;
        wait = ttl / 3;
        match store.renew_lease(&renewal, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                error!(
                    "the flush lease expired under running work (this process stalled for longer than \
                     --flush-lock-ttl-secs?); another process may hold it, and this one's next write is refused"
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, "could not renew the flush lease; trying again");
                wait = RENEWAL_RETRY;
            }
        }
    }
}

/// Aborts a task when dropped, so the lease renewal (or a read ahead) ends with the work, however
/// it ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn skipped(reason: &str, started: Instant) -> FlushReport {
    FlushReport {
        skipped: Some(reason.to_string()),
        duration_ms: started.elapsed().as_millis() as u64,
        ..FlushReport::default()
    }
}

/// A random 128-bit id in hex: batch ids must never repeat, even after Redis loses its data
/// (a counter in Redis would restart and collide with ids already recorded in the database).
fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
