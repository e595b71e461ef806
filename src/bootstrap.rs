//! Bootstrap: rebuild the whole Redis state and every stored count from the Notification table,
//! on day one (a database full of notifications the sidecar never saw) or after Redis lost its
//! data (the marker `{P}:ready` is gone).
//!
//! 1. Under the flush lease, delete the marker (events are answered 503 from now; senders retry,
//!    and nothing is applied against a half-built state), delete the old state, and record that
//!    a bootstrap is under way.
//! 2. Read the table in id order, in chunks (the next read overlapping this write): write each
//!    notification's 2-bit state, and add its unread rows to per-user counts kept in memory.
//!    Every million rows ([`Batching`]), save those counts and the last id read, atomically.
//! 3. In one database transaction, set every stored count to the counted value (zero for
//!    everyone else); then write the marker: events flow again.
//!
//! Counts are built from the very rows whose states were written, so they agree whenever each
//! row was read. A change made during the bootstrap has its event refused and retried
//! afterwards: it finds its state already there (no-op) or applies as a real transition. No long
//! database transaction is held. An interrupted bootstrap resumes from its last checkpoint (the
//! marker is still missing, so events still wait): states after it are written again, which is
//! harmless, and counts continue from the saved ones. Memory is one chunk of rows plus one count
//! per user with unread notifications (16 bytes each, about 30 MB per million users).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::Connection;

use tracing::{error, info, warn};

use crate::config::MAX_FLUSH_CHUNK_USERS;
use crate::db::{queries, Db, DbError};
use crate::flush::{FlushError, Flusher, WhenBusy};
use crate::source::Source;
use crate::store::{state, Store, StoreError};

/// A bootstrap failure.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// No `--source-table`: there is nothing to rebuild from.
    #[error("bootstrap needs the Notification table: set --source-table (COUNTERSINK_SOURCE_TABLE)")]
    NotConfigured,
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Taking the flush lease or flushing failed.
    #[error(transparent)]
    Flush(#[from] FlushError),
}

/// Rebuilds the state from the Notification table, and watches Redis for a restart or a lost
/// state. Cheap to clone.
#[derive(Clone)]
pub struct Bootstrapper {
    store: Store,
    db: Db,
    flusher: Flusher,
    source: Option<Arc<Source>>,
    /// Wakes [`Bootstrapper::watch_redis_state`]: an event was refused because Redis restarted.
    redis_restarted: Arc<tokio::sync::Notify>,
}

impl Bootstrapper {
    /// A bootstrapper over `source`; without one, [`Bootstrapper::bootstrap`] answers
    /// [`BootstrapError::NotConfigured`] and the watch only recovers from Redis restarts.
    pub fn new(store: Store, db: Db, flusher: Flusher, source: Option<Arc<Source>>) -> Self {
        Self { store, db, flusher, source, redis_restarted: Arc::new(tokio::sync::Notify::new()) }
    }

    /// Rebuilds the whole state and every stored count from the table, calling `progress` after
    /// each chunk (see the module's documentation).
    pub async fn bootstrap(
        &self,
        batching: Batching,
        rebuild: Rebuild,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<BootstrapReport, BootstrapError> {
        let source = self.source.as_deref().ok_or(BootstrapError::NotConfigured)?;
        bootstrap(&self.store, &self.db, &self.flusher, source, batching, rebuild, progress).await
    }

    /// Checks the Notification table's mapping against the database, naming what is missing.
    pub async fn check_source(&self) -> Result<(), anyhow::Error> {
        let source = self.source.clone().ok_or(BootstrapError::NotConfigured)?;
        self.db.run(move |conn| Ok(source.check(conn))).await?.map_err(anyhow::Error::msg)
    }

    /// Watches the Redis state until the process stops, every `interval` and at once when
    /// [`Bootstrapper::wake_redis_watch`] is called: recovers from a Redis restart (see
    /// `Flusher::recover_if_redis_restarted`) and, with a Notification table and `rebuild`,
    /// rebuilds a state found missing. It also reads Redis's configuration again (a Redis that
    /// restarted or was reconfigured may evict keys now, unless `allow_eviction`, or persist less).
    pub async fn watch_redis_state(self, interval: Duration, rebuild: bool, allow_eviction: bool) {
        let mut policy_seen: Option<String> = None;
        loop {
            self.check_redis_config(allow_eviction, &mut policy_seen).await;
            match self.flusher.recover_if_redis_restarted().await {
                Ok(_) => {}
                Err(FlushError::Store(e)) if e.is_unavailable() => {}
                Err(e) => warn!(error = %e, "cannot check whether Redis restarted; trying again"),
            }
            if let (Some(source), true) = (&self.source, rebuild) {
                self.rebuild_if_missing(source).await;
            }
            tokio::select! {
                _ = self.redis_restarted.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Wakes this process's [`Bootstrapper::watch_redis_state`]: an event found Redis restarted.
    pub fn wake_redis_watch(&self) {
        self.redis_restarted.notify_one();
    }

    /// One look at Redis's configuration for [`Bootstrapper::watch_redis_state`]: an evicting
    /// policy is logged at ERROR when first seen (start-up refuses it; this is a Redis changed
    /// since), and the persistence mode goes to `/metrics`.
    async fn check_redis_config(&self, allow_eviction: bool, policy_seen: &mut Option<String>) {
        if let Ok(Some(policy)) = self.store.eviction_policy().await {
            if policy != "noeviction" && !allow_eviction && policy_seen.as_deref() != Some(policy.as_str()) {
                error!(
                    policy,
                    "Redis may evict keys now (maxmemory-policy {policy}): an evicted state or pending delta is a count \
                     silently lost; set `maxmemory-policy noeviction` on Redis"
                );
            }
            *policy_seen = Some(policy);
        }
        if let Ok(Some(persistence)) = self.store.persistence().await {
            crate::metrics::redis_persistence(persistence.mode, persistence.replicas);
        }
    }

    /// Rebuilds the state if it is missing (one check of the watch); failures are logged, to be
    /// tried again at the next check.
    async fn rebuild_if_missing(&self, source: &Source) {
        match self.store.is_ready().await {
            Ok(true) => {}
            Ok(false) => {
                warn!("the Redis state is missing (new deployment, Redis lost its data or restarted); bootstrapping");
                let (store, db, flusher) = (&self.store, &self.db, &self.flusher);
                let rebuilt =
                    bootstrap(store, db, flusher, source, Batching::default(), Rebuild::IfMissing, progress_printer());
                if let Err(e) = rebuilt.await {
                    warn!(error = %e, "bootstrap failed; trying again");
                }
            }
            Err(e) if e.is_unavailable() => {}
            Err(e) => warn!(error = %e, "cannot check the Redis state"),
        }
    }
}

/// How a bootstrap reads the table.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Notifications per chunk: large enough for few round trips, small enough to bound memory.
    pub chunk_rows: usize,
    /// Notifications between checkpoints: at most this many are read again after an interruption.
    pub checkpoint_rows: u64,
}

impl Default for Batching {
    fn default() -> Self {
        Batching { chunk_rows: 20_000, checkpoint_rows: 1_000_000 }
    }
}
/// How long a bootstrap waits for a running flush.
const LOCK_WAIT: Duration = Duration::from_secs(120);
/// How often progress is logged when not on a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// What a bootstrap did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BootstrapReport {
    /// Notifications whose state was written by this run.
    pub notifications: u64,
    /// Whether this run resumed an interrupted one.
    pub resumed: bool,
    /// Users given a non-zero stored count.
    pub users_written: u64,
    /// Milliseconds spent reading rows and writing states (the rest is writing the counts).
    pub states_ms: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Whether nothing was done: asked for [`Rebuild::IfMissing`], this run found the state
    /// rebuilt by another process by the time it held the lease.
    pub found_rebuilt: bool,
}

/// When a bootstrap rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// Always (`countersink bootstrap`: an operator asked).
    Always,
    /// Only if the state is still missing once the lease is held: of several processes that
    /// found it missing, the first rebuilds and the others find it done.
    IfMissing,
}

/// Progress of a running bootstrap.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Notifications done by this run.
    pub done: u64,
    /// Notifications this run has to do (counted at its start).
    pub total: u64,
    /// Since the start.
    pub elapsed: Duration,
}

impl Progress {
    /// Notifications per second so far.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(0.001)
    }

    /// Estimated time left.
    pub fn eta(&self) -> Duration {
        let rate = self.rate();
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.total.saturating_sub(self.done) as f64 / rate)
    }
}

/// Rebuilds the state from `source`, calling `progress` after each chunk.
async fn bootstrap(
    store: &Store,
    db: &Db,
    flusher: &Flusher,
    source: &Source,
    batching: Batching,
    rebuild: Rebuild,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<BootstrapReport, BootstrapError> {
    let started = Instant::now();
    let mut report = flusher
        .exclusive(WhenBusy::Wait(LOCK_WAIT), async |lease| -> Result<BootstrapReport, BootstrapError> {
            let mut report = BootstrapReport::default();
            let cursor = store.bootstrap_cursor().await?;
            if rebuild == Rebuild::IfMissing && cursor.is_none() && store.is_ready().await? {
                info!("bootstrap: another process rebuilt the state meanwhile; nothing to do");
                report.found_rebuilt = true;
                return Ok(report);
            }
            let (mut after, mut counts) = match cursor {
                Some(after) => {
                    info!(after_id = ?after, "bootstrap: resuming from its last checkpoint");
                    report.resumed = true;
                    (after, store.bootstrap_counts().await?)
                }
                None => {
                    let cleared = store.clear_state(lease).await?;
                    store.start_bootstrap(lease).await?;
                    info!(keys = cleared, "bootstrap: cleared the old state; events wait until it is rebuilt");
                    (None, HashMap::new())
                }
            };
            // This Redis server holds what is written from here on (a resumed rebuild's
            // checkpoint and states come from the same server, or the same snapshot of it); a
            // restart before the end is caught by the confirmation there.
            store.claim_instance(lease).await?;
            let counted = source.clone();
            let total = db.run(move |conn| counted.rows_after_count(conn, after)).await?;
            let read = |after: Option<i64>| {
                let (db, source) = (db.clone(), source.clone());
                tokio::spawn(
                    async move { db.run(move |conn| source.rows_after(conn, after, batching.chunk_rows)).await },
                )
            };
            // The next chunk is read from the database while this one is written to Redis.
            let mut next = read(after);
            let mut since_checkpoint = 0;
            loop {
                let rows = next.await.map_err(|e| DbError::Task(e.to_string()))??;
                let Some(last) = rows.last() else { break };
                after = Some(last.id);
                next = read(after);
                let rows: Vec<(u64, u64, u8)> =
                    rows.iter().map(|r| (r.id as u64, r.user_id as u64, r.state as u8)).collect();
                store.write_states(lease, &rows).await?;
                for (_, user, state) in &rows {
                    if *state == state::UNREAD {
                        *counts.entry(*user).or_default() += 1;
                    }
                }
                report.notifications += rows.len() as u64;
                since_checkpoint += rows.len() as u64;
                if since_checkpoint >= batching.checkpoint_rows {
                    store.checkpoint_bootstrap(lease, last.id, &counts).await?;
                    since_checkpoint = 0;
                }
                progress(Progress { done: report.notifications, total, elapsed: started.elapsed() });
            }
            report.states_ms = started.elapsed().as_millis() as u64;
            let counts: Vec<(u64, i64)> = counts.into_iter().collect();
            report.users_written = counts.len() as u64;
            let (fence, token) = (lease.fence(), lease.token().to_string());
            let seq = db
                .run(move |conn| {
                    let fenced = conn.transaction(|conn| {
                        // A bootstrap that stalled past its lease must not overwrite the counts
                        // of the holder after it.
                        if !queries::pass_lease_fence(conn, fence)? {
                            return Ok(false);
                        }
                        queries::replace_all_counts(conn, &counts, MAX_FLUSH_CHUNK_USERS)?;
                        Ok::<_, DbError>(true)
                    })?;
                    Ok((fenced, queries::max_handoff_seq(conn)?))
                })
                .await?;
            let seq = match seq {
                (true, seq) => seq,
                (false, _) => {
                    let lost =
                        format!("the flush lease {token} passed to a later holder before the counts were written");
                    return Err(StoreError::LeaseLost(lost).into());
                }
            };
            store.confirm_instance(lease).await?;
            store.finish_bootstrap(lease, seq, after.map(|id| id as u64)).await?;
            Ok(report)
        })
        .await?
        .map_err(|reason| BootstrapError::Flush(FlushError::Skipped(reason)))?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    info!(
        notifications = report.notifications,
        users_written = report.users_written,
        resumed = report.resumed,
        duration_ms = report.duration_ms,
        "bootstrap done; events apply again"
    );
    Ok(report)
}

/// Progress output for people: a bar redrawn in place on a terminal, a log line every few
/// seconds otherwise.
pub fn progress_printer() -> impl FnMut(Progress) + Send + 'static {
    let terminal = std::io::stderr().is_terminal();
    let mut last = Instant::now();
    move |p: Progress| {
        let percent = if p.total == 0 { 100.0 } else { p.done as f64 * 100.0 / p.total as f64 };
        if terminal {
            let filled = ((percent / 5.0) as usize).min(20);
            // Not eprint!: it panics when stderr is closed; a lost progress line is no failure.
            let _ = write!(
                std::io::stderr(),
                "\r[{}{}] {percent:5.1}% {}/{} notifications, {:.0}/s, ETA {}s   ",
                "#".repeat(filled),
                " ".repeat(20 - filled),
                p.done,
                p.total,
                p.rate(),
                p.eta().as_secs()
            );
            if p.done >= p.total {
                let _ = writeln!(std::io::stderr());
            }
        } else if last.elapsed() >= LOG_EVERY || p.done >= p.total {
            last = Instant::now();
            info!(
                done = p.done,
                total = p.total,
                rate = p.rate() as u64,
                eta_secs = p.eta().as_secs(),
                "bootstrap progress"
            );
        }
    }
}
