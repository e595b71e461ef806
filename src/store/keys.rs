//! The Redis key layout. Every key of one deployment shares the hash tag `{prefix}`, so a
//! script's keys always live in one Redis Cluster slot (see `docs/design.md`).

/// Notifications per state shard: 2^16 ids × 2 bits = a 16 KiB string per shard key.
pub const SHARD_BITS: u32 = 16;

/// Users per bucket of held counts: 2^7 = 128, Redis's default `hash-max-listpack-entries`, so
/// a full bucket stays a compact listpack (about 5.7 bytes per user, measured in
/// `tests/memory.rs`) rather than growing into a hash table.
pub const COUNT_BUCKET_BITS: u32 = 7;

/// Builds the key names of one deployment.
#[derive(Debug, Clone)]
pub struct Keys {
    tag: String,
}

impl Keys {
    /// Keys under `prefix` (already validated: no braces).
    pub fn new(prefix: &str) -> Self {
        Self { tag: format!("{{{prefix}}}") }
    }

    /// The deployment's hash tag, `{prefix}`, that every key begins with: one Redis Cluster slot.
    pub fn hash_tag(&self) -> &str {
        &self.tag
    }

    /// The shard of notification `id` and its index inside the shard.
    pub fn state_slot(id: u64) -> (u64, u64) {
        (id >> SHARD_BITS, id & ((1 << SHARD_BITS) - 1))
    }

    /// The 2-bit-per-notification state bitmap of one shard.
    pub fn state(&self, shard: u64) -> String {
        format!("{}:state:{shard}", self.tag)
    }

    /// The count bucket of user `user` and the user's field inside it.
    pub fn count_slot(user: u64) -> (u64, u64) {
        (user >> COUNT_BUCKET_BITS, user & ((1 << COUNT_BUCKET_BITS) - 1))
    }

    /// A bucket of real-time counts held in Redis: a hash, field = user within the bucket,
    /// value = `stored + pending` for that user (see `docs/design.md`, *Real-time reads*).
    pub fn counts(&self, bucket: u64) -> String {
        format!("{}:counts:{bucket}", self.tag)
    }

    /// Set while the held counts are being dropped after a rollback resync: reads answer 503 and
    /// no count is installed until every bucket is gone (any process finishes the job).
    pub fn counts_stale(&self) -> String {
        format!("{}:counts_stale", self.tag)
    }

    /// The sorted set of pending deltas: member = user id, score = delta not yet in the database.
    pub fn pending(&self) -> String {
        format!("{}:pending", self.tag)
    }

    /// A batch handed off for flushing: the former pending set, renamed.
    pub fn batch(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}", self.tag)
    }

    /// The set of batch ids handed off and not yet dropped.
    pub fn batches(&self) -> String {
        format!("{}:batches", self.tag)
    }

    /// Counts hand-offs; readers use it as a sequence lock.
    pub fn handoff_seq(&self) -> String {
        format!("{}:handoff_seq", self.tag)
    }

    /// Where a request's `webhook-id` was remembered before records were packed: still read, so
    /// a replay of a request the former version applied is recognised until its key expires.
    pub fn webhook(&self, webhook_id: &str) -> String {
        format!("{}:webhook:{webhook_id}", self.tag)
    }

    /// The prefix of the packed idempotency records' keys: `<prefix><ttl>:<epoch>` holds an
    /// epoch's bucket count, `<prefix><ttl>:<epoch>:n` its record count and
    /// `<prefix><ttl>:<epoch>:<bucket>` is a hash of records (see `records.lua`).
    pub fn webhook_records(&self) -> String {
        format!("{}:webhooks:", self.tag)
    }

    /// While it exists, an idempotency key the former version wrote ([`Keys::webhook`]) may
    /// still live, and is read: each process opens it for a ttl with its first apply call.
    pub fn webhook_former_window(&self) -> String {
        format!("{}:webhooks:former_window", self.tag)
    }

    /// Users being reconciled: member = user id, score = the fence's deadline (ms).
    pub fn reconciling(&self) -> String {
        format!("{}:reconciling", self.tag)
    }

    /// Events of a user that arrived while the user was reconciled.
    pub fn journal(&self, user: &str) -> String {
        format!("{}:journal:{user}", self.tag)
    }

    /// The notifications the Notification table held for a user at their last reconcile
    /// (kept for [`crate::reconcile`]'s grace period).
    pub fn reconciled(&self, user: &str) -> String {
        format!("{}:reconciled:{user}", self.tag)
    }

    /// The picture of a user being reconciled, while `reconcile_truth.lua` writes it a chunk at a
    /// time; it becomes [`Keys::reconciled`] when the reconcile finishes.
    pub fn reconcile_draft(&self, user: &str) -> String {
        format!("{}:reconcile_draft:{user}", self.tag)
    }

    /// A reconcile's tally for a user (a hash): `unread`, how many notifications of the user's
    /// [`Keys::reconcile_draft`] are unread now (kept by the truth chunks and by the events after
    /// them), and `corrected`, how far the chunks moved the user's count.
    pub fn reconcile_tally(&self, user: &str) -> String {
        format!("{}:reconcile_tally:{user}", self.tag)
    }

    /// The run id of the Redis server that vouches for the state: every server start has a new one,
    /// so another (or none) means the state was restored, failed over or lost since (see
    /// `instance.lua`).
    pub fn instance(&self) -> String {
        format!("{}:instance", self.tag)
    }

    /// What the last recovery from a Redis restart did, for `/readyz` (see `vouch.lua`).
    pub fn last_restart(&self) -> String {
        format!("{}:last_restart", self.tag)
    }

    /// Written by a bootstrap once the state is complete; its absence means the state was lost.
    pub fn ready(&self) -> String {
        format!("{}:ready", self.tag)
    }

    /// Where a bootstrap under way has got to (the last notification id written).
    pub fn bootstrap_cursor(&self) -> String {
        format!("{}:bootstrap_cursor", self.tag)
    }

    /// A bootstrap's checkpoint: every user's unread count up to the cursor, packed.
    pub fn bootstrap_counts(&self) -> String {
        format!("{}:bootstrap_counts", self.tag)
    }

    /// Users waiting for a recount.
    pub fn recounts(&self) -> String {
        format!("{}:recounts", self.tag)
    }

    /// Set while a user's recount queued by a reconcile itself is recent (`reconcile_finish.lua`
    /// queues at most one per user in that time).
    pub fn recounted_again(&self, user: &str) -> String {
        format!("{}:recounted_again:{user}", self.tag)
    }

    /// Workers' claims on users they are recounting: member = `"<claim id>:<user id>"`, score =
    /// the claim's deadline (ms, Redis time), renewed while the worker works.
    pub fn recount_claims(&self) -> String {
        format!("{}:recount_claims", self.tag)
    }

    /// The users taken for a recount by versions before claims (one set shared by every worker);
    /// a take re-queues and deletes it.
    pub fn recounts_taken(&self) -> String {
        format!("{}:recounts_taken", self.tag)
    }

    /// What the last bootstrap read: `"shard index finished_ms"`, the highest notification slot
    /// it read (`-1 -1` for none) and when it finished.
    pub fn rebuilt(&self) -> String {
        format!("{}:rebuilt", self.tag)
    }

    /// The flush lease: one process at a time flushes, reconciles, recounts or bootstraps; its
    /// value is the holder's fencing token (see `store::lease`).
    pub fn flush_lock(&self) -> String {
        format!("{}:flush_lock", self.tag)
    }

    /// The counter that numbers the lease's fencing tokens.
    pub fn lease_tokens(&self) -> String {
        format!("{}:lease_tokens", self.tag)
    }

    /// The pub/sub channel on which the scripts name users whose visible count changed
    /// (payload: comma-separated user ids, or `*` for every user); see [`crate::live`].
    pub fn live_channel(&self) -> String {
        format!("{}:live", self.tag)
    }

    /// A `SCAN` pattern under this deployment's tag, e.g. `state:*`.
    pub fn pattern(&self, glob: &str) -> String {
        format!("{}:{glob}", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #19: the scripts rebuild some keys from a prefix passed in ARGV (`prefix .. user id`,
    /// `prefix .. batch id`), so each such key must be its prefix (the key for "") followed by the
    /// id: a change of the format here that broke it would leave the scripts writing other keys.
    #[test]
    fn the_keys_scripts_build_from_a_prefix_are_that_prefix_and_the_id() {
        let keys = Keys::new("deploy-7");
        type PerId = fn(&Keys, &str) -> String;
        let built_in_lua: [(&str, PerId); 6] = [
            ("journal", Keys::journal),
            ("reconciled", Keys::reconciled),
            ("reconcile_draft", Keys::reconcile_draft),
            ("reconcile_tally", Keys::reconcile_tally),
            ("recounted_again", Keys::recounted_again),
            ("batch", Keys::batch),
        ];
        for (name, key) in built_in_lua {
            for id in ["42", "18446744073709551615", "20261203-183500-abc"] {
                assert_eq!(key(&keys, id), format!("{}{id}", key(&keys, "")), "Keys::{name}");
            }
        }
    }

    /// `apply_events.lua` reads a state key's shard with `string.match(key, ':(%d+)$')`, and the
    /// journal entries that `reconcile_truth.lua` and `reconcile_finish.lua` parse hold the key
    /// between spaces: a state key ends with `:` and its shard, and has no space.
    #[test]
    fn a_state_key_ends_with_its_shard_as_the_scripts_parse_it() {
        let keys = Keys::new("deploy-7");
        for id in [0, 1, (1 << SHARD_BITS) - 1, 1 << SHARD_BITS, 5_000_000_000, u64::MAX >> 1] {
            let (shard, _) = Keys::state_slot(id);
            let key = keys.state(shard);
            let digits = key.rsplit_once(':').map(|(_, digits)| digits);
            assert_eq!(digits, Some(shard.to_string().as_str()), "{key}");
            assert!(!key.contains(char::is_whitespace), "{key}");
        }
    }
}
