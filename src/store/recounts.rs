//! Recounts: a reconcile's fence, truth chunks and repair under the flush lease
//! (`reconcile_begin.lua`, `reconcile_truth.lua`, `reconcile_finish.lua`), and the queue of users
//! waiting for a recount with the workers' claims on them (`take_recounts.lua`, `renew_recounts.lua`).

use std::time::Duration;

use redis::AsyncCommands;

use super::scripts;
use super::{Keys, Lease, Store, StoreError};

/// How often at most a reconcile queues another recount of the same user (an event older than its
/// fence may have undone a change the table read saw; see `reconcile_finish.lua`): a sender whose
/// clock runs behind Redis's would otherwise have a busy user recounted back to back.
pub const RECOUNT_AGAIN_AT_MOST_EVERY: Duration = Duration::from_secs(600);

/// The most notification states one [`Store::reconcile_truth`] call writes: each call is a short
/// script (about 3 ms; 6 ms at 1,000, see docs/design.md *Reconcile*), however many notifications
/// a user has.
pub const TRUTH_STATES_PER_CALL: usize = 500;

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
        let mut invocation = scripts::ReconcileBegin {
            lease: self.keys.flush_lock(),
            reconciling: self.keys.reconciling(),
            token: lease.fence_token(),
            journal_prefix: self.keys.journal(""),
            fence_ms: fence.as_millis() as u64,
            draft_prefix: self.keys.reconcile_draft(""),
            tally_prefix: self.keys.reconcile_tally(""),
        }
        .prepare();
        for user in users {
            invocation.arg(*user);
        }
        let mut conn = self.conn.clone();
        let _fenced: u64 = scripts::ReconcileBegin::run(invocation, &mut conn).await?;
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
        let mut invocation = scripts::ReconcileTruth {
            lease: self.keys.flush_lock(),
            reconciling: self.keys.reconciling(),
            pending: self.keys.pending(),
            token: lease.fence_token(),
            journal_prefix: self.keys.journal(""),
            draft_prefix: self.keys.reconcile_draft(""),
            tally_prefix: self.keys.reconcile_tally(""),
            reconciled_prefix: self.keys.reconciled(""),
            live_channel: self.keys.live_channel(),
            fence_ms: fence.as_millis() as u64,
        }
        .prepare();
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
        scripts::ReconcileTruth::run(invocation, &mut conn).await
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
        let mut invocation = scripts::ReconcileFinish {
            lease: self.keys.flush_lock(),
            pending: self.keys.pending(),
            reconciling: self.keys.reconciling(),
            recounts: self.keys.recounts(),
            token: lease.fence_token(),
            journal_prefix: self.keys.journal(""),
            reconciled_prefix: self.keys.reconciled(""),
            grace_ms: grace.as_millis() as u64,
            live_channel: self.keys.live_channel(),
            draft_prefix: self.keys.reconcile_draft(""),
            tally_prefix: self.keys.reconcile_tally(""),
            recounted_again_prefix: self.keys.recounted_again(""),
            recount_again_ms: RECOUNT_AGAIN_AT_MOST_EVERY.as_millis() as u64,
        }
        .prepare();
        for (user, stored) in stored {
            let (bucket, field) = Keys::count_slot(*user);
            invocation.arg(*user).arg(*stored).arg(self.keys.counts(bucket)).arg(field);
        }
        let mut conn = self.conn.clone();
        let repairs = scripts::ReconcileFinish::run(invocation, &mut conn).await?;
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
        let users = scripts::TakeRecounts {
            recounts: self.keys.recounts(),
            recount_claims: self.keys.recount_claims(),
            recounts_taken: self.keys.recounts_taken(),
            claim_id: id.clone(),
            limit: limit.max(1),
            ttl_ms: ttl.as_millis() as u64,
        }
        .invoke(&mut conn)
        .await?;
        Ok(RecountClaim { id, users })
    }

    /// Extends `claim` by `ttl` from now; returns how many of its users it still holds (fewer when
    /// some lapsed and were given back to waiting: they are recounted again, which is harmless).
    pub async fn renew_recounts(&self, claim: &RecountClaim, ttl: Duration) -> Result<u64, StoreError> {
        let mut invocation =
            scripts::RenewRecounts { recount_claims: self.keys.recount_claims(), ttl_ms: ttl.as_millis() as u64 }
                .prepare();
        for member in claim.members() {
            invocation.arg(member);
        }
        let mut conn = self.conn.clone();
        scripts::RenewRecounts::run(invocation, &mut conn).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `take_recounts.lua` gives a lapsed claim's user back by parsing its member with
    /// `string.match(member, ':(%d+)$')`: a member ends with `:` and the user id, and the claim
    /// id (which `take_recounts` makes) has no `:` of its own.
    #[test]
    fn a_claim_member_ends_with_its_user_as_take_recounts_parses_it() {
        let claim = RecountClaim { id: format!("{:032x}", u128::MAX), users: vec![0, 42, u64::MAX >> 1] };
        assert!(!claim.id.contains(':'));
        for (member, user) in claim.members().iter().zip(&claim.users) {
            assert_eq!(member.rsplit_once(':'), Some((claim.id.as_str(), user.to_string().as_str())));
        }
    }
}
