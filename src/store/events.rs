//! Events: applying requests' events to the per-notification states and the users' counts
//! (`apply_events.lua`), with their idempotency records, and the op code of each event.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::instrument;

use super::scripts::{self, ApplyReply};
use super::{Keys, Store, StoreError};
use crate::events::{Event, EventKind};

/// What one request's events did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ApplyOutcome {
    /// Events that changed a user's count.
    pub changed: u64,
    /// Events that changed only the recorded state (a first sight of a read notification,
    /// the delete of a read one).
    pub recorded: u64,
    /// Events that repeated the state already recorded (retries, a second mark-as-read).
    pub duplicate: u64,
    /// `created` events for a notification already seen: late retries.
    pub stale: u64,
    /// Events that arrived after the notification was deleted; with a Notification table, the
    /// users of such saves are queued for a recount (only the table knows if the row is back).
    pub after_delete: u64,
}

impl ApplyOutcome {
    /// Events that changed no count.
    pub fn noops(&self) -> u64 {
        self.recorded + self.duplicate + self.stale + self.after_delete
    }
}

/// What makes a request idempotent: its `webhook-id`, a digest of its body (a reuse of the id
/// with another body is refused), and how long both are remembered.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The `webhook-id`.
    pub key: String,
    /// The first 12 bytes of the id's SHA-256: the record's field in its bucket. 96 bits: the
    /// chance that two ids remembered at once share it is negligible (about 10^-11 with
    /// 10^9 records held).
    pub record_field: [u8; 12],
    /// The first 8 bytes of the body's SHA-256: enough to tell two bodies apart (the sender
    /// signs both).
    pub body_digest: [u8; 8],
    /// How long the record is remembered, at least.
    pub ttl: Duration,
}

impl Idempotency {
    /// The idempotency of a request with id `key` and `body`, remembered for `ttl`.
    pub fn new(key: &str, body: &[u8], ttl: Duration) -> Self {
        use sha2::Digest;
        let id = sha2::Sha256::digest(key.as_bytes());
        let body = sha2::Sha256::digest(body);
        let mut record_field = [0; 12];
        record_field.copy_from_slice(&id[..12]);
        let mut body_digest = [0; 8];
        body_digest.copy_from_slice(&body[..8]);
        Idempotency { key: key.to_string(), record_field, body_digest, ttl }
    }
}

/// One request's events and what makes it idempotent, for [`Store::apply_many`].
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The request's events, in order.
    pub events: &'a [Event],
    /// Its `webhook-id`, if it has one.
    pub idempotency: Option<Idempotency>,
}

/// The result of [`Store::apply_once`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// What the events did (for a replay: what they did the first time).
    pub outcome: ApplyOutcome,
    /// The request's idempotency key was seen before: nothing was applied now.
    pub replayed: bool,
}

impl Store {
    /// Applies a validated batch of events in one atomic script.
    pub async fn apply(&self, events: &[Event]) -> Result<ApplyOutcome, StoreError> {
        Ok(self.apply_once(events, None).await?.outcome)
    }

    /// Applies a batch unless a request with the same idempotency key (its `webhook-id`) was
    /// applied within its TTL; then answers with that first delivery's outcome, or
    /// [`StoreError::IdempotencyKeyReused`] if that delivery had another body. The check, the
    /// transitions and remembering the key are one atomic script.
    #[instrument(level = "debug", skip_all, fields(events = events.len()))]
    pub async fn apply_once(&self, events: &[Event], idempotency: Option<Idempotency>) -> Result<Applied, StoreError> {
        let request = Request { events, idempotency };
        match self.apply_many(std::slice::from_ref(&request)).await?.pop() {
            Some(applied) => applied,
            None => Err(StoreError::Unexpected("apply_events answered no request".into())),
        }
    }

    /// Applies the events of several requests in one atomic script, in order: a group commit.
    /// Each request keeps its own idempotency record and gets its own answer, as if it had been
    /// applied alone by [`Store::apply_once`] just after the ones before it. The outer error is
    /// the call's, for every request (the state missing or unvouched: nothing was applied; Redis
    /// unreachable or gone during the call: unknown, a retry finds out by its id); an inner one
    /// is that request's ([`StoreError::IdempotencyKeyReused`],
    /// [`StoreError::IdempotencyRecordUnreadable`]).
    #[instrument(level = "debug", skip_all, fields(requests = requests.len()))]
    pub async fn apply_many(&self, requests: &[Request<'_>]) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let ttl = requests.iter().filter_map(|r| r.idempotency.as_ref()).map(|i| i.ttl).max().unwrap_or_default();
        let mut invocation = scripts::ApplyEvents {
            pending: self.keys.pending(),
            reconciling: self.keys.reconciling(),
            ready: self.keys.ready(),
            rebuilt: self.keys.rebuilt(),
            recounts: self.keys.recounts(),
            instance: self.keys.instance(),
            handoff_seq: self.keys.handoff_seq(),
            former_window: self.keys.webhook_former_window(),
            idempotency_ttl: ttl.as_secs(),
            journal_prefix: self.keys.journal(""),
            reconciled_prefix: self.keys.reconciled(""),
            requires_bootstrap: u8::from(self.requires_bootstrap),
            live_channel: self.keys.live_channel(),
            requests: requests.len(),
            draft_prefix: self.keys.reconcile_draft(""),
            tally_prefix: self.keys.reconcile_tally(""),
            records_prefix: self.keys.webhook_records(),
            open_former_window: u8::from(!self.former_window_opened.load(Ordering::Relaxed)),
        }
        .prepare();
        // The named keys are taken; each former idempotency key, distinct state shard and count
        // bucket gets the next index (Lua's, from 1).
        let mut next_key = scripts::ApplyEvents::CONTRACT.keys.fixed.len() + 1;
        for request in requests {
            match &request.idempotency {
                Some(i) => {
                    invocation.key(self.keys.webhook(&i.key));
                    invocation.arg(next_key).arg(&i.record_field[..]).arg(&i.body_digest[..]);
                    next_key += 1;
                }
                None => {
                    invocation.arg(0).arg("").arg("");
                }
            }
            invocation.arg(request.events.len());
        }
        let mut shard_index: HashMap<u64, usize> = HashMap::new();
        let mut bucket_index: HashMap<u64, usize> = HashMap::new();
        for event in requests.iter().flat_map(|r| r.events) {
            let (shard, index_in_shard) = Keys::state_slot(event.notification_id);
            let state_key = *shard_index.entry(shard).or_insert_with(|| {
                invocation.key(self.keys.state(shard));
                next_key += 1;
                next_key - 1
            });
            let (bucket, field) = Keys::count_slot(event.user_id);
            let count_key = *bucket_index.entry(bucket).or_insert_with(|| {
                invocation.key(self.keys.counts(bucket));
                next_key += 1;
                next_key - 1
            });
            let occurred_ms = event.occurred_at.map_or(0, |at| at.timestamp_millis().max(0));
            invocation
                .arg(op_code(event))
                .arg(state_key)
                .arg(index_in_shard)
                .arg(event.user_id)
                .arg(occurred_ms)
                .arg(count_key)
                .arg(field);
        }
        let reply = match self.replicas {
            None => scripts::ApplyEvents::run(invocation, &mut self.conn.clone()).await?,
            Some(wait) => {
                let (reply, acknowledged): (redis::Value, u64) =
                    self.conn.invoke_and_wait(&invocation, wait.replicas, wait.timeout).await?;
                let reply: ApplyReply = super::typed(reply)?;
                // A refusal changed nothing: there is nothing for a replica to have.
                if !matches!(reply, ApplyReply::Refused(_)) && acknowledged < u64::from(wait.replicas) {
                    return Err(StoreError::NotReplicated { acknowledged, wanted: wait.replicas });
                }
                reply
            }
        };
        match reply {
            ApplyReply::Refused(refusal) => Err(refusal.into()),
            ApplyReply::Requests(answers) if answers.len() == requests.len() => {
                self.former_window_opened.store(true, Ordering::Relaxed);
                Ok(answers.into_iter().map(|answer| answer.map_err(StoreError::from)).collect())
            }
            ApplyReply::Requests(answers) => Err(StoreError::Unexpected(format!(
                "apply_events answered {} requests of {}",
                answers.len(),
                requests.len()
            ))),
        }
    }

    /// How many of the state shards `shards` do not exist yet (an event in one would create it).
    pub async fn missing_state_shards(&self, shards: &[u64]) -> Result<usize, StoreError> {
        if shards.is_empty() {
            return Ok(0);
        }
        let mut exists = redis::cmd("EXISTS");
        for shard in shards {
            exists.arg(self.keys.state(*shard));
        }
        let mut conn = self.conn.clone();
        let existing: usize = exists.query_async(&mut conn).await?;
        Ok(shards.len().saturating_sub(existing))
    }
}

/// The script's op code for an event (see `apply_events.lua`).
fn op_code(event: &Event) -> &'static str {
    match (event.kind, event.created, event.unread) {
        (EventKind::PostDelete, _, _) => "D",
        (EventKind::PostSave, true, true) => "C1",
        (EventKind::PostSave, true, false) => "C0",
        (EventKind::PostSave, false, true) => "S1",
        (EventKind::PostSave, false, false) => "S0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state;

    /// The `local NAME, ... = value, ...` line of a script that starts with `local first`.
    fn lua_locals(lua: &str, first: &str) -> Vec<(String, i64)> {
        let line = lua
            .lines()
            .find(|line| line.starts_with(&format!("local {first},")))
            .unwrap_or_else(|| panic!("no `local {first}, ...` line"));
        let (names, values) = line["local ".len()..].split_once('=').expect("an assignment");
        let names = names.split(',').map(|n| n.trim().to_string());
        let values = values.split(',').map(|v| v.trim().parse::<i64>().expect("an integer"));
        names.zip(values).collect()
    }

    /// Issue #19: `transition.lua` declares the states, and [`state`] names them for Rust (the
    /// bootstrap writes them, reconcile reads them from the table).
    #[test]
    fn the_states_agree_with_the_lua_state_machine() {
        let lua = include_str!("transition.lua");
        let rust =
            [("UNSEEN", state::UNSEEN), ("READ", state::READ), ("UNREAD", state::UNREAD), ("DELETED", state::DELETED)];
        let rust: Vec<(String, i64)> = rust.iter().map(|(name, code)| (name.to_string(), i64::from(*code))).collect();
        assert_eq!(lua_locals(lua, "UNSEEN"), rust, "transition.lua's states and store::state");
    }

    /// Issue #19: the op codes Rust sends ([`op_code`]) are the ones `transition.lua` lists, and
    /// read the way the function reads them (`D` deletes; `C` creates; a second `1` is unread),
    /// each meaning what its event says.
    #[test]
    fn the_op_codes_agree_with_the_lua_state_machine() {
        let lua = include_str!("transition.lua");
        let listed: std::collections::BTreeSet<&str> = lua
            .lines()
            .find_map(|line| line.strip_prefix("-- Ops: "))
            .expect("transition.lua lists its ops")
            .split(',')
            .filter_map(|op| op.split_whitespace().next())
            .collect();
        assert!(
            lua.contains("if op == 'D'")
                && lua.contains("string.sub(op, 1, 1) == 'C'")
                && lua.contains("string.sub(op, 2, 2) == '1'"),
            "transition.lua reads its ops otherwise"
        );
        let mut sent = std::collections::BTreeSet::new();
        for created in [false, true] {
            for unread in [false, true] {
                for event in [Event::save(1, 1, unread, created), Event::delete(1, 1)] {
                    let op = op_code(&event);
                    sent.insert(op);
                    let deletes = op == "D";
                    assert_eq!(deletes, event.kind == EventKind::PostDelete, "{op} for {event:?}");
                    if !deletes {
                        assert_eq!(op.starts_with('C'), event.created, "{op} for {event:?}");
                        assert_eq!(op.get(1..2) == Some("1"), event.unread, "{op} for {event:?}");
                    }
                }
            }
        }
        assert_eq!(sent, listed, "the ops Rust sends and those transition.lua lists");
    }
}
