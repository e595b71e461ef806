//! Real-time reads: every user's `stored + pending` count, held in Redis.
//!
//! The scripts that change a user's pending delta change the count Redis holds for that user in
//! the same step (`apply_events.lua`, `reconcile_truth.lua`, `reconcile_finish.lua`), and a flush
//! moves deltas from pending to stored without changing the sum, so a read is one Redis round trip
//! and SQL is not on the read path.
//!
//! A user whose count is not held yet (never read, or counts cleared by a rebuild) is *loaded*:
//!
//! 1. one script takes every open batch's delta for the user, the hand-off sequence and the
//!    ready marker;
//! 2. one database snapshot gives the stored count and which of those batches are committed;
//!    `base` = stored + the deltas of batches not committed: everything outside the pending set;
//! 3. one script installs `base + the pending delta at that instant`, unless the hand-off
//!    sequence or the marker moved since step 1 (a new batch, a rebuild or a rollback resync
//!    would make `base` wrong): then the load starts over (at most 5 times, then 503).
//!
//! Events that land between the steps change only the pending delta (a count not held is left
//! alone), which step 3 reads as it is then; a batch committing between steps 1 and 3 moves a
//! delta from an uncommitted batch to the stored count, and `base` holds it either way.

use std::collections::{BTreeSet, HashMap};

use tracing::warn;

use crate::db::{queries, Db, DbError};
use crate::store::{MergedReads, Store, StoreError};

/// Attempts before a load gives up; each retry means a flush handed off during the load.
const MAX_LOAD_ATTEMPTS: usize = 5;

/// A read failure.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Flushes kept handing off while a count was loaded.
    #[error("the count kept changing during the read; try again")]
    Contended,
}

impl ReadError {
    /// Whether a dependency was unreachable or busy (worth a retry).
    pub fn is_unavailable(&self) -> bool {
        match self {
            ReadError::Store(e) => e.is_unavailable(),
            ReadError::Db(e) => e.is_unavailable(),
            ReadError::Contended => true,
        }
    }
}

/// One user's real-time unread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UnreadCount {
    /// The user.
    pub user_id: u64,
    /// What the user should see: the stored count plus every delta not yet flushed.
    pub unread_count: i64,
}

/// Reads real-time unread counts: held counts through [`MergedReads`] (concurrent reads share
/// one Redis call), a load (above) for users whose count is not held.
#[derive(Clone)]
pub struct Reader {
    store: Store,
    db: Db,
    held: MergedReads,
}

impl Reader {
    /// Reads through `store` and `db`, with at most `calls_in_flight` Redis calls for held counts
    /// at once, each for at most `max_users_per_call` users.
    pub fn new(store: Store, db: Db, calls_in_flight: usize, max_users_per_call: usize) -> Self {
        let held = MergedReads::new(store.clone(), calls_in_flight, max_users_per_call);
        Reader { store, db, held }
    }

    /// The real-time unread counts of `user_ids`, in the same order: one Redis round trip (shared
    /// with the reads waiting with it) when every count is held, a load for those that are not.
    pub async fn unread_counts(&self, user_ids: &[u64]) -> Result<Vec<UnreadCount>, ReadError> {
        let held = self.held.held_counts(user_ids.to_vec()).await?;
        let cold: Vec<u64> = user_ids
            .iter()
            .zip(&held)
            .filter(|(_, count)| count.is_none())
            .map(|(u, _)| *u)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let loaded = if cold.is_empty() { HashMap::new() } else { load(&self.store, &self.db, &cold).await? };
        user_ids
            .iter()
            .zip(held)
            .map(|(user_id, count)| {
                let unread_count = count
                    .or_else(|| loaded.get(user_id).copied())
                    .ok_or_else(|| StoreError::Unexpected(format!("no count was loaded for user {user_id}")))?;
                Ok(UnreadCount { user_id: *user_id, unread_count })
            })
            .collect()
    }
}

/// Steps 1 to 3 for distinct `user_ids`: their counts, now held.
async fn load(store: &Store, db: &Db, user_ids: &[u64]) -> Result<HashMap<u64, i64>, ReadError> {
    for attempt in 1..=MAX_LOAD_ATTEMPTS {
        let snapshot = store.batches_snapshot(user_ids).await?;
        let users = user_ids.to_vec();
        let batch_ids = snapshot.batch_ids.clone();
        let (stored, committed) = db.run(move |conn| queries::stored_counts(conn, &users, &batch_ids)).await?;
        let bases: Vec<(u64, i64)> = user_ids
            .iter()
            .zip(&snapshot.deltas)
            .map(|(user, in_batches)| {
                let uncommitted: i64 = snapshot
                    .batch_ids
                    .iter()
                    .zip(in_batches)
                    .filter(|(id, _)| !committed.contains(*id))
                    .map(|(_, delta)| delta)
                    .sum();
                (*user, stored.get(user).copied().unwrap_or(0) + uncommitted)
            })
            .collect();
        match store.install_counts(&snapshot, &bases).await? {
            Some(counts) => {
                crate::metrics::counts_loaded(user_ids.len(), attempt - 1);
                return Ok(user_ids.iter().copied().zip(counts).collect());
            }
            None => warn!(attempt, "a flush handed off while a count was loaded; loading again"),
        }
    }
    crate::metrics::counts_loaded(0, MAX_LOAD_ATTEMPTS);
    Err(ReadError::Contended)
}
