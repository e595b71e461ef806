//! Held counts: the real-time counts Redis holds per user, read on every count request, installed
//! by a first read (`install_counts.lua`) and dropped after a rollback resync.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::scripts::{self, InstallReply};
use super::{typed, BatchesSnapshot, Keys, Store, StoreError, ALL_USERS};

impl Store {
    /// The real-time counts Redis holds for `user_ids`, in the same order; `None` for a user
    /// whose count is not held yet (see [`Store::install_counts`]). One round trip: the markers a
    /// read depends on (the reload flag; the ready marker too when a lost state must be rebuilt),
    /// then one `HMGET` per count bucket, pipelined.
    pub async fn held_counts(&self, user_ids: &[u64]) -> Result<Vec<Option<i64>>, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.exists(self.keys.counts_stale());
        // Without a table to rebuild from, a lost state is not refused (`requiring_bootstrap`).
        let markers = if self.requires_bootstrap {
            pipeline.exists(self.keys.ready());
            2
        } else {
            1
        };
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
        let mut replies: Vec<redis::Value> = match pipeline.query_async(&mut conn).await {
            // A connection that was open and was lost (Redis restarted, or closed it) fails its next
            // command, and the connection manager reconnects meanwhile; this pipeline changes
            // nothing, so it is sent again once. Each HTTP thread's connection meets a restart on
            // its own, at its first read. A refused connection (Redis down) is not asked twice.
            Err(e) if e.is_connection_dropped() && !e.is_connection_refusal() => {
                tracing::debug!(error = %e, "the Redis connection was lost; reading again on a new one");
                pipeline.query_async(&mut conn).await?
            }
            replies => replies?,
        };
        if replies.len() != buckets.len() + markers {
            return Err(StoreError::Unexpected("the read pipeline returned the wrong number of replies".into()));
        }
        let values = replies.split_off(markers);
        // `replies` now holds the markers alone: [stale] or [stale, ready].
        let ready = if self.requires_bootstrap { replies.pop() } else { None };
        let stale = replies.pop().ok_or_else(|| StoreError::Unexpected("the read pipeline lost its markers".into()))?;
        if typed::<bool>(stale)? {
            return Err(StoreError::CountsReloading);
        }
        // A lost or rolled-back state is the bootstrap's: its counts are not to be trusted.
        if let Some(ready) = ready {
            if !typed::<bool>(ready)? {
                return Err(StoreError::StateMissing);
            }
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
        let mut invocation = scripts::InstallCounts {
            handoff_seq: self.keys.handoff_seq(),
            ready: self.keys.ready(),
            pending: self.keys.pending(),
            counts_stale: self.keys.counts_stale(),
            read_seq: snapshot.handoff_seq,
            read_ready: snapshot.ready.clone(),
        }
        .prepare();
        // The buckets follow the named keys (Lua's index, from 1).
        let first_bucket = scripts::InstallCounts::CONTRACT.keys.fixed.len() + 1;
        let mut bucket_index: HashMap<u64, usize> = HashMap::new();
        for (user, base) in bases {
            let (bucket, field) = Keys::count_slot(*user);
            let next = bucket_index.len() + first_bucket;
            let index = *bucket_index.entry(bucket).or_insert_with(|| {
                invocation.key(self.keys.counts(bucket));
                next
            });
            invocation.arg(*user).arg(index).arg(field).arg(*base);
        }
        let mut conn = self.conn.clone();
        match scripts::InstallCounts::run(invocation, &mut conn).await? {
            InstallReply::Moved => Ok(None),
            InstallReply::Refused(refusal) => Err(refusal.into()),
            InstallReply::Installed(counts) if counts.len() == bases.len() => Ok(Some(counts)),
            InstallReply::Installed(counts) => Err(StoreError::Unexpected(format!(
                "install_counts returned {} counts for {} users",
                counts.len(),
                bases.len()
            ))),
        }
    }

    /// Stops holding every real-time count (each is loaded again by its next read): after the
    /// stored counts or the pending deltas were rewritten outside the scripts that keep them.
    pub async fn clear_held_counts(&self) -> Result<u64, StoreError> {
        self.unlink_matching("counts:*").await
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
}
