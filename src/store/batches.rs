//! Batches: the pending set, its hand-off to a batch under the flush lease (`handoff.lua`), the
//! batches' reads by a flush and by a first read of a count (`read_batches.lua`), and their drop.

use redis::AsyncCommands;

use super::scripts::{self, HandoffReply, ReadBatchesReply};
use super::{parse_score, Lease, Store, StoreError};

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

impl Store {
    /// The users' deltas in batches not yet dropped, with the hand-off sequence and the ready
    /// marker, atomically: what loading their counts needs besides the database.
    pub async fn batches_snapshot(&self, user_ids: &[u64]) -> Result<BatchesSnapshot, StoreError> {
        let mut invocation = scripts::ReadBatches {
            batches: self.keys.batches(),
            handoff_seq: self.keys.handoff_seq(),
            ready: self.keys.ready(),
            batch_prefix: self.keys.batch(""),
            requires_bootstrap: u8::from(self.requires_bootstrap),
        }
        .prepare();
        for user in user_ids {
            invocation.arg(*user);
        }
        let mut conn = self.conn.clone();
        let (seq, ready, batch_ids, rows) = match scripts::ReadBatches::run(invocation, &mut conn).await? {
            ReadBatchesReply::Refused(refusal) => return Err(refusal.into()),
            ReadBatchesReply::Snapshot(seq, ready, batch_ids, rows) => (seq, ready, batch_ids, rows),
        };
        let deltas = rows
            .iter()
            .map(|row| row.iter().map(|s| parse_score(s)).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, StoreError>>()?;
        if deltas.len() != user_ids.len() {
            return Err(StoreError::Unexpected("read_batches returned the wrong number of rows".into()));
        }
        Ok(BatchesSnapshot { handoff_seq: seq, ready, batch_ids, deltas })
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
        let reply = scripts::Handoff {
            lease: self.keys.flush_lock(),
            pending: self.keys.pending(),
            batch: self.keys.batch(batch_id),
            batches: self.keys.batches(),
            handoff_seq: self.keys.handoff_seq(),
            instance: self.keys.instance(),
            token: lease.fence_token(),
            batch_id: batch_id.to_owned(),
        }
        .invoke(&mut conn)
        .await?;
        Ok(match reply {
            HandoffReply::NothingPending => None,
            HandoffReply::HandedOff(seq) => Some(seq),
        })
    }

    /// Whether the batch `batch_id` still holds `users` users on a Redis server that vouches for
    /// the state: what a flush checks before it commits what it read of the batch.
    pub async fn batch_intact(&self, batch_id: &str, users: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let (held, vouched) = scripts::CheckBatch { batch: self.keys.batch(batch_id), instance: self.keys.instance() }
            .invoke(&mut conn)
            .await?;
        Ok(held == users && vouched == 1)
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
        scripts::DropBatch {
            lease: self.keys.flush_lock(),
            batch: self.keys.batch(batch_id),
            batches: self.keys.batches(),
            token: lease.fence_token(),
            batch_id: batch_id.to_owned(),
        }
        .invoke(&mut conn)
        .await
    }
}
