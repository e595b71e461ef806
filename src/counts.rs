//! Real-time reads: stored count + pending delta + deltas in batches not yet committed.
//!
//! Redis and the database change at different moments during a flush, so a naive read can
//! see a batch twice (already stored, still in Redis) or not at all. A read therefore:
//!
//! 1. takes, in one script, the users' pending deltas, every open batch's deltas for them and
//!    the hand-off sequence number;
//! 2. reads stored counts and which of those batches are committed, in one database snapshot;
//! 3. reads the hand-off sequence again. If a hand-off happened in between, the pending deltas
//!    of step 1 may have been committed by step 2: the read starts over (a sequence lock).
//!
//! Open batches count only if not committed. Hand-offs happen once per flush, so retries are rare.

use tracing::warn;

use crate::db::{queries, Db, DbError};
use crate::store::{Store, StoreError};

/// Attempts before a read gives up; each retry means a flush handed off during the read.
const MAX_READ_ATTEMPTS: usize = 5;

/// A read failure.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Flushes kept handing off during the read.
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

/// One user's unread count and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UnreadCount {
    /// The user.
    pub user_id: u64,
    /// What the user should see: `stored + pending`.
    pub unread_count: i64,
    /// In the count table.
    pub stored: i64,
    /// In Redis, not yet flushed (including batches being flushed right now).
    pub pending: i64,
}

/// Reads the real-time unread counts of `user_ids`, in the same order.
pub async fn unread_counts(store: &Store, db: &Db, user_ids: &[u64]) -> Result<Vec<UnreadCount>, ReadError> {
    for attempt in 1..=MAX_READ_ATTEMPTS {
        let snapshot = store.pending_snapshot(user_ids).await?;
        let users = user_ids.to_vec();
        let batch_ids = snapshot.batch_ids.clone();
        let (stored, committed) = db.run(move |conn| queries::stored_counts(conn, &users, &batch_ids)).await?;
        if store.handoff_seq().await? != snapshot.handoff_seq {
            warn!(attempt, "a flush handed off during a read; reading again");
            continue;
        }
        let counts = user_ids
            .iter()
            .zip(&snapshot.deltas)
            .map(|(user_id, (pending, in_batches))| {
                let uncommitted: i64 = snapshot
                    .batch_ids
                    .iter()
                    .zip(in_batches)
                    .filter(|(id, _)| !committed.contains(*id))
                    .map(|(_, delta)| delta)
                    .sum();
                let stored = stored.get(user_id).copied().unwrap_or(0);
                let pending = pending + uncommitted;
                UnreadCount { user_id: *user_id, unread_count: stored + pending, stored, pending }
            })
            .collect();
        return Ok(counts);
    }
    Err(ReadError::Contended)
}
