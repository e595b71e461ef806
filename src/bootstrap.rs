//! Bootstrap: rebuild the whole Redis state and every stored count from the Notification table,
//! on day one (a database full of notifications the sidecar never saw) or after Redis lost its
//! data (the marker `{P}:ready` is gone).
//!
//! 1. Take the flush lock; delete the marker, so events are answered 503 (senders retry) and
//!    nothing is applied against a half-built state; clear the old state.
//! 2. In one database transaction, whose first statement zeroes the stored counts (on SQLite
//!    that takes the write lock, on PostgreSQL the transaction is REPEATABLE READ, so both read
//!    one unchanging snapshot): stream the table in id order, in chunks, writing each
//!    notification's 2-bit state; then write every user's true count with one
//!    `INSERT … SELECT … GROUP BY`.
//! 3. Commit, then set the marker: events flow again. Retried events of changes the snapshot
//!    already holds find their state and change nothing; later ones apply on top.
//!
//! An interrupted bootstrap is not resumed: the marker is still missing, so the next one starts
//! over (resuming would mix two snapshots). Memory is one chunk.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use diesel::{Connection, RunQueryDsl};
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::db::{Backend, Db, DbError};
use crate::flush::{FlushError, Flusher, WhenBusy};
use crate::reconcile::ReconcileError;
use crate::source::Source;
use crate::store::Store;

/// Notifications read per chunk: large enough for few round trips, small enough to bound memory
/// (a chunk is about 1.5 MB in flight).
pub const CHUNK_ROWS: usize = 50_000;
/// How long a bootstrap waits for a running flush.
const LOCK_WAIT: Duration = Duration::from_secs(120);
/// How often progress is reported when not on a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// What a bootstrap did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BootstrapReport {
    /// Notifications whose state was written.
    pub notifications: u64,
    /// Users given a non-zero stored count.
    pub users_with_unread: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Progress of a running bootstrap.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Notifications done.
    pub done: u64,
    /// Notifications in the snapshot.
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
pub async fn bootstrap(
    store: &Store,
    db: &Db,
    flusher: &Flusher,
    source: &Source,
    progress: impl FnMut(Progress) + Send + 'static,
) -> Result<BootstrapReport, ReconcileError> {
    let started = Instant::now();
    let outcome = flusher
        .exclusive(WhenBusy::Wait(LOCK_WAIT), async || {
            let cleared = store.clear_state().await?;
            info!(keys = cleared, "bootstrap: cleared the old state; events wait until it is rebuilt");
            let report = rebuild(store, db, source, progress, started).await?;
            store.mark_ready().await?;
            Ok(report)
        })
        .await;
    let mut report = match outcome {
        Ok(Ok(report)) => report,
        Ok(Err(reason)) => unreachable!("a waiting lock is never skipped: {reason}"),
        Err(FlushError::Db(e)) => return Err(ReconcileError::Db(e)),
        Err(FlushError::Store(e)) => return Err(ReconcileError::Store(e)),
        Err(e) => return Err(ReconcileError::Flush(e)),
    };
    report.duration_ms = started.elapsed().as_millis() as u64;
    info!(
        notifications = report.notifications,
        users_with_unread = report.users_with_unread,
        duration_ms = report.duration_ms,
        "bootstrap done; events apply again"
    );
    Ok(report)
}

/// Step 2: the snapshot transaction, on a blocking thread; Redis writes go through the runtime.
async fn rebuild(
    store: &Store,
    db: &Db,
    source: &Source,
    mut progress: impl FnMut(Progress) + Send + 'static,
    started: Instant,
) -> Result<BootstrapReport, FlushError> {
    let (store, db, source) = (store.clone(), db.clone(), source.clone());
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || -> Result<BootstrapReport, FlushError> {
        let mut conn = db.get()?;
        let backend = db.backend();
        conn.transaction(|conn| {
            if backend == Backend::Postgres {
                diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .execute(conn)
                    .map_err(DbError::from)?;
            }
            Source::zero_stored_counts(conn)?;
            let total = source.row_count(conn)?;
            let mut report = BootstrapReport::default();
            let mut after = None;
            loop {
                let rows = source.rows_after(conn, after, CHUNK_ROWS)?;
                let Some(last) = rows.last() else { break };
                after = Some(last.id);
                let states: Vec<(u64, u8)> = rows.iter().map(|r| (r.id as u64, r.state as u8)).collect();
                handle.block_on(store.write_states(&states)).map_err(FlushError::Store)?;
                report.notifications += rows.len() as u64;
                progress(Progress { done: report.notifications, total, elapsed: started.elapsed() });
            }
            report.users_with_unread = source.write_true_counts(conn)? as u64;
            Ok(report)
        })
    })
    .await
    .map_err(|e| FlushError::Db(DbError::Task(e.to_string())))?
}

/// Progress output for people: a line redrawn in place on a terminal, a log line every few
/// seconds otherwise.
pub fn progress_printer() -> impl FnMut(Progress) + Send + 'static {
    let terminal = std::io::stderr().is_terminal();
    let mut last = Instant::now();
    move |p: Progress| {
        let percent = if p.total == 0 { 100.0 } else { p.done as f64 * 100.0 / p.total as f64 };
        if terminal {
            let filled = (percent / 5.0) as usize;
            eprint!(
                "\r[{}{}] {percent:5.1}% {}/{} notifications, {:.0}/s, ETA {}s   ",
                "#".repeat(filled),
                " ".repeat(20 - filled.min(20)),
                p.done,
                p.total,
                p.rate(),
                p.eta().as_secs()
            );
            if p.done >= p.total {
                eprintln!();
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

/// Watches for a lost state and rebuilds it, every `interval`, for `countersink serve`.
pub async fn watch(store: Store, db: Db, flusher: Flusher, source: Source, interval: Duration) {
    loop {
        match store.is_ready().await {
            Ok(true) => {}
            Ok(false) => {
                warn!("the Redis state is missing (new deployment or Redis lost its data); bootstrapping");
                match bootstrap(&store, &db, &flusher, &source, progress_printer()).await {
                    Ok(_) => continue,
                    Err(e) => warn!(error = %e, "bootstrap failed; trying again"),
                }
            }
            Err(e) if e.is_unavailable() => {}
            Err(e) => warn!(error = %e, "cannot check the Redis state"),
        }
        tokio::time::sleep(interval).await;
    }
}
