//! Reconcile: recount users from the Notification table and repair both their Redis state and
//! their stored count, safely while events keep arriving.
//!
//! For each batch of users, holding the flush lease (so no flush runs and no batch is open):
//!
//! 1. **Fence.** One script marks the users as being reconciled; from then on, their events
//!    are applied as usual *and* journaled.
//! 2. **Read the truth.** Their notifications (id, read state, soft delete) and stored counts.
//! 3. **Write the truth**, a chunk of at most [`TRUTH_STATES_PER_CALL`] notifications per script
//!    (a heavy user's million take two thousand short scripts, not one that blocks Redis): each
//!    notification's state becomes the table's with the journal so far replayed on top (events
//!    that arrived after step 1 may be newer than the read), and the user's pending delta and
//!    held count move with it. States and counts agree after every chunk, so a reconcile that
//!    stops between two leaves nothing wrong. Events keep applying meanwhile.
//! 4. **Repair.** One script counts the unread (the chunks' count, kept by later events, plus the
//!    notifications created after the read, which only the journal names), sets the pending delta
//!    to `true − stored`, and lifts the fence. Its work is bounded by the journal.
//! 5. **Flush**, so the stored count is right at once.
//!
//! An event that lands during the reconcile is either in the truth (committed before the read;
//! replaying it changes nothing) or journaled and replayed: it is neither lost nor counted twice.
//! See `docs/design.md`, *Reconcile*, for why writing the truth in chunks is exact.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, instrument, warn};

use crate::crash_point;
use crate::db::{queries, Db, DbConnection, DbError};
use crate::flush::{FlushError, Flusher, WhenBusy};
use crate::source::Source;
use crate::store::{
    Lease, RecountClaim, Store, StoreError, TruthPiece, UserDrift, UserRepair, UserTruth, TRUTH_STATES_PER_CALL,
};

/// Users recounted per step: bounds the memory of one read and the time the flush lease is held.
pub const USERS_PER_STEP: usize = 200;
/// How long a user's events are journaled without progress: the fence expires this long after the
/// step began or after its last truth chunk. A step takes well under a second; a user with a million
/// notifications about 11 s (most of it reading them from the table).
const FENCE: Duration = Duration::from_secs(60);
/// How long after a reconcile an in-flight event for a notification the table no longer held is
/// recognised (see `apply_events.lua`): longer than any sender takes to deliver an event.
const GRACE: Duration = Duration::from_secs(120);
/// How long a reconcile waits for a running flush.
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// Failing steps in a row after which `reconcile_all` stops: by then a dependency is down, not
/// one step's users at fault, and every further step would fail the same way.
const FAILED_STEPS_IN_A_ROW: usize = 5;
/// Users one recount worker claims at a time: five steps, the most a worker that dies leaves for
/// the others to redo.
const RECOUNTS_PER_CLAIM: usize = 5 * USERS_PER_STEP;
/// How long a worker's claim on queued recounts lasts unless renewed: how long the users of a
/// worker that died (or stopped mid-recount) wait before another worker claims them.
pub const RECOUNT_CLAIM_TTL: Duration = Duration::from_secs(10);
/// How often a worker renews its claim while it recounts (or waits for the flush lease): three
/// chances before the claim lapses.
const RECOUNT_CLAIM_RENEWAL: Duration = Duration::from_secs(3);

/// Up to `limit` user ids after `after`, in order: every user with a notification or a stored
/// count (a user whose notifications are all gone may still have a count to repair).
fn users_after(
    conn: &mut DbConnection,
    source: &Source,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<u64>, DbError> {
    let mut users = source.users_after(conn, after, limit)?;
    users.extend(queries::stored_users_after(conn, after, limit)?);
    users.sort_unstable();
    users.dedup();
    users.truncate(limit);
    Ok(users)
}

/// A reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// No `--source-table`: there is no truth to recount from.
    #[error("reconcile needs the Notification table: set --source-table (COUNTERSINK_SOURCE_TABLE)")]
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

/// What a reconcile found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ReconcileReport {
    /// Users recounted.
    pub users_checked: u64,
    /// Users whose count was wrong: what countersink had, and the truth now in effect.
    pub drift: Vec<UserDrift>,
    /// Users whose fence expired before their repair (too slow a step); reconcile them again.
    pub unfinished: Vec<u64>,
    /// Users repaired and queued for another recount, which runs on its own: an event that
    /// occurred before the reconcile began arrived during it, so it may be older than the table's
    /// read (a sender that lagged behind a bulk update, say).
    pub recount_queued: Vec<u64>,
    /// Steps that failed (only a reconcile of every user goes on past one; any other answers the
    /// error instead): their users were not reconciled. Reconcile them again once the cause is fixed.
    pub failed: Vec<FailedStep>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// One step of a reconcile of every user that failed as a unit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FailedStep {
    /// The step's users (up to 200, in id order), none of them reconciled.
    pub user_ids: Vec<u64>,
    /// What failed: the database or Redis error.
    pub error: String,
}

/// Why users are recounted: it decides whether a difference found is drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A reconcile (`POST /v1/reconcile`, `countersink reconcile`, the cron): a difference means
    /// an event was lost or a bulk write went unreported, and is counted and logged as drift.
    Reconcile,
    /// A queued `recount` event: the sender said the user's notifications changed unseen (a bulk
    /// update, an un-soft-delete, events it dropped), so a difference is expected; it is counted
    /// apart (`countersink_recount_corrected_users_total`) and is not drift.
    Recount,
}

/// Runs reconciles. Cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    store: Store,
    db: Db,
    flusher: Flusher,
    source: Option<Arc<Source>>,
    recounts_queued: Arc<tokio::sync::Notify>,
}

impl Reconciler {
    /// A reconciler over `source`; without one, every reconcile answers [`ReconcileError::NotConfigured`].
    pub fn new(store: Store, db: Db, flusher: Flusher, source: Option<Arc<Source>>) -> Self {
        Self { store, db, flusher, source, recounts_queued: Arc::new(tokio::sync::Notify::new()) }
    }

    /// Whether a Notification table is configured.
    pub fn is_configured(&self) -> bool {
        self.source.is_some()
    }

    /// Checks the mapping against the database, naming what is missing.
    pub async fn check_source(&self) -> Result<(), anyhow::Error> {
        let source = self.source.clone().ok_or(ReconcileError::NotConfigured)?;
        self.db.run(move |conn| Ok(source.check(conn))).await?.map_err(anyhow::Error::msg)
    }

    /// Recounts `users` (duplicates are coalesced); a difference found is drift.
    pub async fn reconcile_users(&self, users: &[u64]) -> Result<ReconcileReport, ReconcileError> {
        self.recount(users, Trigger::Reconcile).await
    }

    /// Recounts `users` (duplicates are coalesced) for `trigger`.
    #[instrument(skip_all, fields(users = users.len(), trigger = ?trigger))]
    async fn recount(&self, users: &[u64], trigger: Trigger) -> Result<ReconcileReport, ReconcileError> {
        let started = Instant::now();
        let users: Vec<u64> = users.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        let mut report = ReconcileReport::default();
        for step in users.chunks(USERS_PER_STEP) {
            self.step(step, &mut report).await?;
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        log_report(&report, trigger);
        Ok(report)
    }

    /// Recounts every user with a notification or a stored count, in id order, at most
    /// `users_per_second` (0: no limit), calling `progress` after each step with the users done.
    ///
    /// A step that fails (a database or Redis error) is recorded in the report's `failed` and the
    /// walk goes on with the next users. It stops with the error when the state is missing (the
    /// bootstrap's to rebuild), when the list of users cannot be read, and after
    /// [`FAILED_STEPS_IN_A_ROW`] failing steps in a row.
    pub async fn reconcile_all(
        &self,
        users_per_second: u32,
        mut progress: impl FnMut(&ReconcileReport),
    ) -> Result<ReconcileReport, ReconcileError> {
        let source = self.source.clone().ok_or(ReconcileError::NotConfigured)?;
        let started = Instant::now();
        let mut report = ReconcileReport::default();
        let mut after = None;
        let mut failed_in_a_row = 0;
        loop {
            let step_started = Instant::now();
            let source = source.clone();
            let users = self.db.run(move |conn| users_after(conn, &source, after, USERS_PER_STEP)).await?;
            let Some(last) = users.last() else { break };
            after = Some(*last);
            match self.step(&users, &mut report).await {
                Ok(()) => failed_in_a_row = 0,
                // Every further step would repair into a state the bootstrap rebuilds.
                Err(e @ ReconcileError::Store(StoreError::StateMissing)) => return Err(e),
                Err(e) => {
                    failed_in_a_row += 1;
                    let (first, last) = (users[0], *last);
                    if failed_in_a_row == FAILED_STEPS_IN_A_ROW {
                        warn!(error = %e, first, last, failed_steps = report.failed.len() + 1,
                            "reconcile stopped: {FAILED_STEPS_IN_A_ROW} steps in a row failed");
                        report.duration_ms = started.elapsed().as_millis() as u64;
                        log_report(&report, Trigger::Reconcile);
                        return Err(e);
                    }
                    warn!(error = %e, first, last, "reconcile step failed; going on with the next users");
                    report.failed.push(FailedStep { user_ids: users.clone(), error: e.to_string() });
                }
            }
            report.duration_ms = started.elapsed().as_millis() as u64;
            progress(&report);
            if users_per_second > 0 {
                let budget = Duration::from_secs_f64(users.len() as f64 / f64::from(users_per_second));
                tokio::time::sleep(budget.saturating_sub(step_started.elapsed())).await;
            }
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        log_report(&report, Trigger::Reconcile);
        Ok(report)
    }

    /// Queues users for a recount (repeated asks coalesce) and wakes this process's worker.
    pub async fn queue_recounts(&self, users: &[u64]) -> Result<(), ReconcileError> {
        if users.is_empty() {
            return Ok(());
        }
        if self.source.is_none() {
            return Err(ReconcileError::NotConfigured);
        }
        self.store.queue_recounts(users).await?;
        self.recounts_queued.notify_one();
        Ok(())
    }

    /// Wakes this process's recount worker for users a script queued (a save after a delete).
    pub fn wake_recount_worker(&self) {
        if self.source.is_some() {
            self.recounts_queued.notify_one();
        }
    }

    /// Runs queued recounts until the process stops: at once when this process queued some,
    /// and every `interval` for those queued by other processes (or left by a worker that died),
    /// until none is waiting. Any number of processes may run one.
    pub async fn run_recount_worker(self, interval: Duration) {
        loop {
            tokio::select! {
                _ = self.recounts_queued.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
            loop {
                match self.run_queued_recounts().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        // The claimed users are waiting again (or will be, once the claim lapses).
                        warn!(error = %e, "queued recounts failed; retrying");
                        tokio::time::sleep(interval).await;
                        break;
                    }
                }
            }
        }
    }

    /// Claims up to [`RECOUNTS_PER_CLAIM`] users queued by `recount` events and recounts them;
    /// `None` when nobody was waiting. The claim is this worker's own and renewed while it works:
    /// users stay queued until their recount succeeds, whatever happens to any worker. Users the
    /// recount could not finish wait again; after a failure all of them do. A worker that dies
    /// stops renewing, and its users are claimed again [`RECOUNT_CLAIM_TTL`] later.
    pub async fn run_queued_recounts(&self) -> Result<Option<ReconcileReport>, ReconcileError> {
        let claim = self.store.take_recounts(RECOUNTS_PER_CLAIM, RECOUNT_CLAIM_TTL).await?;
        if claim.users.is_empty() {
            return Ok(None);
        }
        match self.renewing(&claim, self.recount(&claim.users, Trigger::Recount)).await {
            Ok(report) => {
                self.store.recounts_done(&claim, &report.unfinished).await?;
                Ok(Some(report))
            }
            Err(e) => {
                // Given back at once; if Redis is what failed, the claim lapses instead.
                if let Err(release) = self.store.recounts_done(&claim, &claim.users).await {
                    warn!(error = %release, users = claim.users.len(),
                        "could not give back the claimed recounts; they are retried once the claim lapses");
                }
                Err(e)
            }
        }
    }

    /// Runs `work`, renewing `claim` every [`RECOUNT_CLAIM_RENEWAL`] until it is done.
    async fn renewing<T>(&self, claim: &RecountClaim, work: impl std::future::Future<Output = T>) -> T {
        let mut renewal = tokio::time::interval(RECOUNT_CLAIM_RENEWAL);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: the claim was just taken.
        renewal.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = renewal.tick() => match self.store.renew_recounts(claim, RECOUNT_CLAIM_TTL).await {
                    Ok(held) if held < claim.users.len() as u64 => {
                        // Lapsed and claimed by another worker: recounted twice, which is harmless.
                        warn!(lapsed = claim.users.len() as u64 - held, "some claimed recounts lapsed before they were done");
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "could not renew the claim on queued recounts; it is retried"),
                },
            }
        }
    }

    /// Reconciles one step of users under the flush lease, then flushes.
    async fn step(&self, users: &[u64], report: &mut ReconcileReport) -> Result<(), ReconcileError> {
        let source = self.source.clone().ok_or(ReconcileError::NotConfigured)?;
        let repaired = self
            .flusher
            .exclusive(WhenBusy::Wait(LOCK_WAIT), async |lease| {
                // A lost state is the bootstrap's to rebuild; repairing a few users into it would
                // be counted again by the bootstrap.
                if !self.store.is_ready().await? {
                    return Err(ReconcileError::Store(StoreError::StateMissing));
                }
                self.flusher.recover_open_batches(lease).await?;
                let repaired = self.repair(lease, &source, users).await?;
                crash_point::reach(crash_point::RECONCILE_AFTER_REPAIR);
                self.flusher.flush_locked(lease, None).await?;
                Ok(repaired)
            })
            .await?
            .map_err(|reason| ReconcileError::Flush(FlushError::Skipped(reason)))?;
        report.users_checked += users.len() as u64;
        for (user_id, repair) in repaired {
            match repair {
                UserRepair::Repaired(drift) | UserRepair::RepairedRecountQueued(drift) => {
                    if matches!(repair, UserRepair::RepairedRecountQueued(_)) {
                        report.recount_queued.push(user_id);
                    }
                    if drift.stored != drift.actual {
                        report.drift.push(drift);
                    }
                }
                UserRepair::Unfinished => report.unfinished.push(user_id),
            }
        }
        Ok(())
    }

    /// Steps 1 to 4 for `users`.
    async fn repair(
        &self,
        lease: &Lease,
        source: &Arc<Source>,
        users: &[u64],
    ) -> Result<Vec<(u64, UserRepair)>, ReconcileError> {
        self.store.reconcile_begin(lease, users, FENCE).await?;
        crash_point::reach(crash_point::RECONCILE_AFTER_FENCE);
        let (source, wanted) = (source.clone(), users.to_vec());
        let (rows, stored) = self
            .db
            .run(move |conn| {
                let rows = source.rows_of_users(conn, &wanted)?;
                let (stored, _) = queries::stored_counts(conn, &wanted, &[])?;
                Ok((rows, stored))
            })
            .await?;
        crash_point::reach(crash_point::RECONCILE_AFTER_RECOUNT);
        let mut by_user: HashMap<u64, Vec<(u64, u8)>> = HashMap::new();
        for row in rows {
            by_user.entry(row.user_id as u64).or_default().push((row.id as u64, row.state as u8));
        }
        let truths: Vec<UserTruth> = users
            .iter()
            .map(|user| UserTruth {
                user_id: *user,
                stored: stored.get(user).copied().unwrap_or(0),
                notifications: by_user.remove(user).unwrap_or_default(),
            })
            .collect();
        for (n, chunk) in truth_chunks(&truths, TRUTH_STATES_PER_CALL).iter().enumerate() {
            self.store.reconcile_truth(lease, chunk, FENCE).await?;
            if n == 0 {
                crash_point::reach(crash_point::RECONCILE_AFTER_TRUTH_CHUNK);
            }
        }
        let stored: Vec<(u64, i64)> = truths.iter().map(|truth| (truth.user_id, truth.stored)).collect();
        Ok(self.store.reconcile_finish(lease, &stored, GRACE).await?)
    }
}

/// The notifications of `truths` cut into chunks of at most `limit`, in order: each chunk lists
/// `(user, some of the user's notifications)`, a heavy user's spread over many chunks and light
/// users sharing one.
fn truth_chunks(truths: &[UserTruth], limit: usize) -> Vec<Vec<TruthPiece<'_>>> {
    let limit = limit.max(1);
    let mut chunks = Vec::new();
    let (mut chunk, mut room) = (Vec::new(), limit);
    for truth in truths {
        let mut rest = &truth.notifications[..];
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(rest.len().min(room));
            chunk.push((truth.user_id, piece));
            (rest, room) = (after, room - piece.len());
            if room == 0 {
                chunks.push(std::mem::take(&mut chunk));
                room = limit;
            }
        }
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// `(drifted, corrected)`: the users of `report` whose count differed, as drift for a reconcile
/// and as expected corrections for a queued recount.
fn classify(report: &ReconcileReport, trigger: Trigger) -> (u64, u64) {
    let differed = report.drift.len() as u64;
    match trigger {
        Trigger::Reconcile => (differed, 0),
        Trigger::Recount => (0, differed),
    }
}

fn log_report(report: &ReconcileReport, trigger: Trigger) {
    let (drifted, corrected) = classify(report, trigger);
    crate::metrics::reconcile_finished(report.users_checked, drifted, corrected);
    if trigger == Trigger::Recount {
        // What the sender asked for: a correction is the expected outcome, not drift.
        info!(
            users_checked = report.users_checked,
            corrected_users = corrected,
            duration_ms = report.duration_ms,
            "queued recounts done"
        );
    } else if report.drift.is_empty() {
        info!(users_checked = report.users_checked, duration_ms = report.duration_ms, "reconcile found no drift");
    } else {
        // Drift means an event was lost or a bulk path went unreported: worth a look.
        warn!(
            users_checked = report.users_checked,
            drifted_users = report.drift.len(),
            net_drift = report.drift.iter().map(|d| d.stored - d.actual).sum::<i64>(),
            "reconcile repaired drift"
        );
    }
    if !report.unfinished.is_empty() {
        warn!(users = ?report.unfinished, "reconcile did not finish some users in time; reconcile them again");
    }
    if !report.recount_queued.is_empty() {
        info!(users = ?report.recount_queued,
            "an event older than the reconcile arrived during it; these users are recounted again");
    }
    for step in &report.failed {
        let users = step.user_ids.len();
        let (first, last) = (step.user_ids.first(), step.user_ids.last());
        warn!(users, first = ?first, last = ?last, error = %step.error,
            "reconcile could not recount these users; reconcile them again once the cause is fixed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_chunks_hold_every_notification_once_and_none_holds_more_than_the_limit() {
        let truth = |user_id, n: u64| UserTruth {
            user_id,
            stored: 0,
            notifications: (0..n).map(|id| (user_id * 1000 + id, 2)).collect(),
        };
        let truths = vec![truth(1, 2), truth(2, 0), truth(3, 7), truth(4, 1)];
        let chunks = truth_chunks(&truths, 3);
        let sizes: Vec<usize> = chunks.iter().map(|c| c.iter().map(|(_, p)| p.len()).sum()).collect();
        assert_eq!(sizes, vec![3, 3, 3, 1]);
        let flat: Vec<(u64, u64)> =
            chunks.iter().flatten().flat_map(|(user, piece)| piece.iter().map(|(id, _)| (*user, *id))).collect();
        let expected: Vec<(u64, u64)> =
            truths.iter().flat_map(|t| t.notifications.iter().map(|(id, _)| (t.user_id, *id))).collect();
        assert_eq!(flat, expected);
    }

    #[test]
    fn only_a_reconcile_counts_differences_as_drift() {
        let report = ReconcileReport {
            users_checked: 2,
            drift: vec![UserDrift { user_id: 7, stored: 5, actual: 0 }],
            ..ReconcileReport::default()
        };
        assert_eq!(classify(&report, Trigger::Reconcile), (1, 0));
        assert_eq!(classify(&report, Trigger::Recount), (0, 1));
    }
}
