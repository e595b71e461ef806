//! The Rust↔Lua contract: one typed wrapper per Lua script under `store/`.
//!
//! Each wrapper is a struct with one named field per `KEYS` and per `ARGV` entry, declared once
//! in [`scripts!`], which builds the invocation in that order; a script that takes a variable
//! tail (`KEYS[8..]`, `ARGV[10..]`) names it too, and its caller pushes the tail after the named
//! entries. Each script's header declares the same names on two lines,
//!
//! ```text
//! -- KEYS: lease pending batch batches handoff_seq instance
//! -- ARGV: token batch_id
//! ```
//!
//! (`..name` for a tail, `(none)` for nothing), and so does each prelude prepended to it, for the
//! entries it reads: the unit tests below check that the names and their order agree with the
//! wrapper's, and that every `.lua` file here belongs to a wrapper. Replies are typed: the
//! sentinel replies (`{-1}`, `{-3, ...}`, `{-4}`, `{2}`) become [`Refusal`]s, mapped to
//! [`StoreError`] in one place (`impl From<Refusal> for StoreError`), as the `error_reply`
//! codes ([`error_code`]) are in `From<redis::RedisError>`. A script that writes under the flush
//! lease takes its token as a [`FenceToken`], which only a [`Lease`](super::Lease) gives.

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, ParsingError, Value};

use super::events::Applied;
use super::lease::FenceToken;
use super::{ApplyOutcome, StoreError, UserRepair};

/// The reply codes the scripts answer with, named as each script names them in a `local` line
/// (checked by `the_reply_codes_agree_with_the_scripts`).
pub(super) mod reply {
    /// `apply_events.lua`, `read_batches.lua`: the ready marker is required and missing.
    pub const STATE_MISSING: i64 = -1;
    /// `apply_events.lua`: a request's idempotency key was seen with another body.
    pub const ID_REUSED: i64 = -3;
    /// `apply_events.lua`: this Redis server does not vouch for the state.
    pub const UNVOUCHED: i64 = -4;
    /// `apply_events.lua`: a request's stored idempotency record is not one the script wrote.
    pub const RECORD_UNREADABLE: i64 = -5;
    /// `install_counts.lua`: the hand-off sequence or the ready marker moved since the snapshot.
    pub const MOVED: i64 = 0;
    /// `install_counts.lua`: the counts are installed (and follow).
    pub const INSTALLED: i64 = 1;
    /// `install_counts.lua`: the held counts are being dropped after a rollback resync.
    pub const RELOADING: i64 = 2;
    /// `acquire_lease.lua`: the lease was taken.
    pub const TAKEN: i64 = 1;
    /// `acquire_lease.lua`: another holder has the lease.
    pub const BUSY: i64 = 0;
}

/// The codes of the scripts' `redis.error_reply('CODE ...')` refusals, as `RedisError::code`
/// reads them.
pub(super) mod error_code {
    /// `lease.lua`: the flush lease expired or passed to another process.
    pub const LEASE_LOST: &str = "LEASE_LOST";
    /// `handoff.lua`, `vouch.lua`, `claimed.lua`: this Redis server does not vouch for the state.
    pub const UNVOUCHED: &str = "UNVOUCHED";
    /// Every code a script answers with.
    #[cfg(test)]
    pub const ALL: &[&str] = &[LEASE_LOST, UNVOUCHED];
}

/// A script's refusal, answered by a sentinel reply: nothing was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// [`reply::STATE_MISSING`].
    StateMissing,
    /// [`reply::UNVOUCHED`].
    Unvouched,
    /// [`reply::ID_REUSED`].
    IdReused,
    /// [`reply::RECORD_UNREADABLE`].
    RecordUnreadable,
    /// [`reply::RELOADING`].
    CountsReloading,
}

impl From<Refusal> for StoreError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::StateMissing => StoreError::StateMissing,
            Refusal::Unvouched => StoreError::RedisRestarted,
            Refusal::IdReused => StoreError::IdempotencyKeyReused,
            Refusal::RecordUnreadable => StoreError::IdempotencyRecordUnreadable,
            Refusal::CountsReloading => StoreError::CountsReloading,
        }
    }
}

/// The names a script takes in `KEYS` or `ARGV`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Names {
    /// The named entries, from index 1.
    pub fixed: &'static [&'static str],
    /// The variable tail after them, if any.
    pub tail: Option<&'static str>,
}

/// One script's declared contract (the callers read the number of named keys; the tests, all).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(test), allow(dead_code))]
pub(super) struct Contract {
    /// The wrapper's name.
    pub name: &'static str,
    /// The files concatenated, preludes first.
    pub files: &'static [&'static str],
    /// Its `KEYS`.
    pub keys: Names,
    /// Its `ARGV`.
    pub args: Names,
}

macro_rules! tail {
    () => {
        None
    };
    ($tail:ident) => {
        Some(stringify!($tail))
    };
}

/// Declares the scripts: per script its files (preludes first), its named `KEYS` and `ARGV` (with
/// their Rust types) and an optional tail of each, and its reply type.
macro_rules! scripts {
    ($(
        $(#[$meta:meta])*
        $name:ident = [$($file:literal),+] {
            keys: [$($key:ident),* $(; ..$key_tail:ident)?],
            args: [$($arg:ident: $arg_ty:ty),* $(; ..$arg_tail:ident)?],
            reply: $reply:ty $(,)?
        }
    )*) => {
        $(
            $(#[$meta])*
            pub(super) struct $name {
                $(pub $key: String,)*
                $(pub $arg: $arg_ty,)*
            }

            impl $name {
                /// This script's contract.
                #[allow(dead_code)]
                pub const CONTRACT: Contract = Contract {
                    name: stringify!($name),
                    files: &[$($file),+],
                    keys: Names { fixed: &[$(stringify!($key)),*], tail: tail!($($key_tail)?) },
                    args: Names { fixed: &[$(stringify!($arg)),*], tail: tail!($($arg_tail)?) },
                };

                fn script() -> &'static redis::Script {
                    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
                    SCRIPT.get_or_init(|| redis::Script::new(concat!($(include_str!($file)),+)))
                }

                /// The invocation with the named keys and arguments in the script's order; a
                /// tail, if the script takes one, is pushed after them.
                pub fn prepare(self) -> redis::ScriptInvocation<'static> {
                    #[allow(unused_mut)]
                    let mut invocation = Self::script().prepare_invoke();
                    $(invocation.key(self.$key);)*
                    $(invocation.arg(self.$arg);)*
                    invocation
                }

                /// Runs `invocation` (made by [`Self::prepare`]) and reads its typed reply.
                #[allow(dead_code)]
                pub async fn run(
                    invocation: redis::ScriptInvocation<'static>,
                    conn: &mut impl ConnectionLike,
                ) -> Result<$reply, StoreError> {
                    // A reply of another shape is a bug or a foreign key clash, not an outage.
                    super::typed(invocation.invoke_async::<Value>(conn).await?)
                }

                /// Runs the script with no tail.
                #[allow(dead_code)]
                pub async fn invoke(self, conn: &mut impl ConnectionLike) -> Result<$reply, StoreError> {
                    Self::run(self.prepare(), conn).await
                }
            }
        )*

        /// Every script's contract.
        #[cfg(test)]
        pub(super) const ALL: &[Contract] = &[$($name::CONTRACT),*];
    };
}

scripts! {
    /// `acquire_lease.lua`: takes the flush lease if nobody holds it.
    AcquireLease = ["acquire_lease.lua"] {
        keys: [lease, lease_tokens],
        args: [ttl_ms: u64, random_id: String, floor: i64],
        reply: AcquireReply,
    }

    /// `extend_lease.lua`: renews the lease if this holder still has it; `true` if renewed.
    ExtendLease = ["extend_lease.lua"] {
        keys: [lease],
        args: [token: String, ttl_ms: u64],
        reply: bool,
    }

    /// `release_lease.lua`: gives the lease back if it is still this holder's; `true` if released.
    ReleaseLease = ["release_lease.lua"] {
        keys: [lease],
        args: [token: FenceToken],
        reply: bool,
    }

    /// `fenced.lua`: plain commands under the lease; the tails are the keys the commands write
    /// and the commands (word count, then words); answers how many ran.
    Fenced = ["lease.lua", "fenced.lua"] {
        keys: [lease; ..written],
        args: [token: FenceToken; ..commands],
        reply: u64,
    }

    /// [`Fenced`] on the instance a rebuild claimed (`claimed.lua`).
    FencedOnClaimedInstance = ["lease.lua", "instance.lua", "claimed.lua", "fenced.lua"] {
        keys: [lease, instance; ..written],
        args: [token: FenceToken; ..commands],
        reply: u64,
    }

    /// `apply_events.lua`: the events of one or more requests; the tails are each request's
    /// former idempotency key, state shard and count bucket, and per request then per event their
    /// values (see the script).
    ApplyEvents = ["transition.lua", "instance.lua", "move_counts.lua", "records.lua", "apply_events.lua"] {
        keys: [pending, reconciling, ready, rebuilt, recounts, instance, handoff_seq, former_window; ..webhooks_states_buckets],
        args: [
            idempotency_ttl: u64,
            journal_prefix: String,
            reconciled_prefix: String,
            requires_bootstrap: u8,
            live_channel: String,
            requests: usize,
            draft_prefix: String,
            tally_prefix: String,
            records_prefix: String,
            open_former_window: u8;
            ..requests_then_events
        ],
        reply: ApplyReply,
    }

    /// `check_batch.lua`: (users in the batch, 1 if this server vouches for the state).
    CheckBatch = ["instance.lua", "check_batch.lua"] {
        keys: [batch, instance],
        args: [],
        reply: (u64, u8),
    }

    /// `check_instance.lua`: (this server's run id, the vouching one or '', the last restart's
    /// record or '', 1 for a new state).
    CheckInstance = ["instance.lua", "check_instance.lua"] {
        keys: [instance, last_restart, handoff_seq, pending],
        args: [],
        reply: (String, String, String, u8),
    }

    /// `drop_batch.lua`: deletes a committed batch.
    DropBatch = ["lease.lua", "drop_batch.lua"] {
        keys: [lease, batch, batches],
        args: [token: FenceToken, batch_id: String],
        reply: (),
    }

    /// `handoff.lua`: renames the pending set to a batch.
    Handoff = ["lease.lua", "instance.lua", "handoff.lua"] {
        keys: [lease, pending, batch, batches, handoff_seq, instance],
        args: [token: FenceToken, batch_id: String],
        reply: HandoffReply,
    }

    /// `install_counts.lua`: starts holding users' counts; the tails are the count buckets and 4
    /// values per user.
    InstallCounts = ["install_counts.lua"] {
        keys: [handoff_seq, ready, pending, counts_stale; ..buckets],
        args: [read_seq: u64, read_ready: String; ..users],
        reply: InstallReply,
    }

    /// `read_batches.lua`: the users' deltas in open batches, with the sequence and the marker.
    ReadBatches = ["read_batches.lua"] {
        keys: [batches, handoff_seq, ready],
        args: [batch_prefix: String, requires_bootstrap: u8; ..users],
        reply: ReadBatchesReply,
    }

    /// `reconcile_begin.lua`: fences users; answers how many.
    ReconcileBegin = ["lease.lua", "transition.lua", "reconcile_begin.lua"] {
        keys: [lease, reconciling],
        args: [token: FenceToken, journal_prefix: String, fence_ms: u64, draft_prefix: String, tally_prefix: String; ..users],
        reply: u64,
    }

    /// `reconcile_truth.lua`: one chunk of the table's truth; answers the states written.
    ReconcileTruth = ["lease.lua", "transition.lua", "move_counts.lua", "reconcile_truth.lua"] {
        keys: [lease, reconciling, pending],
        args: [
            token: FenceToken,
            journal_prefix: String,
            draft_prefix: String,
            tally_prefix: String,
            reconciled_prefix: String,
            live_channel: String,
            fence_ms: u64;
            ..pieces
        ],
        reply: u64,
    }

    /// `reconcile_finish.lua`: repairs fenced users, one [`UserRepair`] each.
    ReconcileFinish = ["lease.lua", "transition.lua", "reconcile_finish.lua"] {
        keys: [lease, pending, reconciling, recounts],
        args: [
            token: FenceToken,
            journal_prefix: String,
            reconciled_prefix: String,
            grace_ms: u64,
            live_channel: String,
            draft_prefix: String,
            tally_prefix: String,
            recounted_again_prefix: String,
            recount_again_ms: u64;
            ..users
        ],
        reply: Vec<UserRepair>,
    }

    /// `renew_recounts.lua`: renews a claim's members; answers how many are still held.
    RenewRecounts = ["renew_recounts.lua"] {
        keys: [recount_claims],
        args: [ttl_ms: u64; ..members],
        reply: u64,
    }

    /// `take_recounts.lua`: claims users waiting for a recount.
    TakeRecounts = ["take_recounts.lua"] {
        keys: [recounts, recount_claims, recounts_taken],
        args: [claim_id: String, limit: usize, ttl_ms: u64],
        reply: Vec<u64>,
    }

    /// `vouch.lua`: vouches for the state on this server; answers its run id.
    Vouch = ["lease.lua", "instance.lua", "vouch.lua"] {
        keys: [lease, instance],
        args: [token: FenceToken, mode: &'static str],
        reply: String,
    }
}

/// What `acquire_lease.lua` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AcquireReply {
    /// Taken, with this token ([`reply::TAKEN`]).
    Taken(String),
    /// Another holder's token and its time left in ms ([`reply::BUSY`]).
    Busy(String, Option<i64>),
}

impl FromRedisValue for AcquireReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let (code, token, ms_left): (i64, String, Option<i64>) = redis::from_redis_value(value)?;
        match code {
            reply::TAKEN => Ok(AcquireReply::Taken(token)),
            reply::BUSY => Ok(AcquireReply::Busy(token, ms_left)),
            other => Err(format!("acquire_lease answered {other}").into()),
        }
    }
}

/// What `handoff.lua` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandoffReply {
    /// Nothing was pending (0).
    NothingPending,
    /// Handed off with this sequence number.
    HandedOff(u64),
}

impl FromRedisValue for HandoffReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let seq: u64 = redis::from_redis_value(value)?;
        Ok(if seq == 0 { HandoffReply::NothingPending } else { HandoffReply::HandedOff(seq) })
    }
}

/// What `apply_events.lua` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ApplyReply {
    /// Nothing was applied ([`reply::STATE_MISSING`], [`reply::UNVOUCHED`]).
    Refused(Refusal),
    /// One answer per request, in order: applied (or replayed), or refused
    /// ([`reply::ID_REUSED`], [`reply::RECORD_UNREADABLE`]).
    Requests(Vec<Result<Applied, Refusal>>),
}

/// The numbers per request in an [`ApplyReply`].
const APPLY_ANSWER_LEN: usize = 6;

impl FromRedisValue for ApplyReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let reply: Vec<i64> = redis::from_redis_value(value)?;
        match reply[..] {
            [reply::STATE_MISSING] => return Ok(ApplyReply::Refused(Refusal::StateMissing)),
            [reply::UNVOUCHED] => return Ok(ApplyReply::Refused(Refusal::Unvouched)),
            _ if reply.len() % APPLY_ANSWER_LEN != 0 => return Err(format!("apply_events returned {reply:?}").into()),
            _ => {}
        }
        let count = |n: i64| n as u64;
        let answers = reply.chunks_exact(APPLY_ANSWER_LEN).map(|answer| match *answer {
            [reply::ID_REUSED, ..] => Ok(Err(Refusal::IdReused)),
            [reply::RECORD_UNREADABLE, ..] => Ok(Err(Refusal::RecordUnreadable)),
            [changed, recorded, duplicate, stale, after_delete, replayed] => Ok(Ok(Applied {
                outcome: ApplyOutcome {
                    changed: count(changed),
                    recorded: count(recorded),
                    duplicate: count(duplicate),
                    stale: count(stale),
                    after_delete: count(after_delete),
                },
                replayed: replayed == 1,
            })),
            _ => Err(ParsingError::from(format!("apply_events returned {answer:?}"))),
        });
        Ok(ApplyReply::Requests(answers.collect::<Result<_, _>>()?))
    }
}

/// What `install_counts.lua` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InstallReply {
    /// The sequence or the marker moved: read the bases again ([`reply::MOVED`]).
    Moved,
    /// Refused ([`reply::RELOADING`]).
    Refused(Refusal),
    /// The count per user, in order ([`reply::INSTALLED`]).
    Installed(Vec<i64>),
}

impl FromRedisValue for InstallReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let reply: Vec<i64> = redis::from_redis_value(value)?;
        match reply.split_first() {
            Some((&reply::MOVED, [])) => Ok(InstallReply::Moved),
            Some((&reply::RELOADING, [])) => Ok(InstallReply::Refused(Refusal::CountsReloading)),
            Some((&reply::INSTALLED, counts)) => Ok(InstallReply::Installed(counts.to_vec())),
            _ => Err(format!("install_counts returned {reply:?}").into()),
        }
    }
}

/// What `read_batches.lua` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReadBatchesReply {
    /// Refused ([`reply::STATE_MISSING`]).
    Refused(Refusal),
    /// The hand-off sequence, the ready marker ('' for none), the open batches' ids and per user
    /// one delta (as text) per batch.
    Snapshot(u64, String, Vec<String>, Vec<Vec<String>>),
}

impl FromRedisValue for ReadBatchesReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        if let Value::Array(items) = &value {
            if let [Value::Int(reply::STATE_MISSING)] = items[..] {
                return Ok(ReadBatchesReply::Refused(Refusal::StateMissing));
            }
        }
        let (seq, ready, batch_ids, rows) = redis::from_redis_value(value)?;
        Ok(ReadBatchesReply::Snapshot(seq, ready, batch_ids, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script's header line `-- KEYS: ...` or `-- ARGV: ...`, parsed.
    fn header(file: &str, lua: &str, label: &str) -> (Vec<String>, Option<String>) {
        let prefix = format!("-- {label}:");
        let lines: Vec<&str> = lua.lines().filter_map(|line| line.strip_prefix(&prefix)).collect();
        assert_eq!(lines.len(), 1, "{file} has {} `{prefix}` lines, not one", lines.len());
        let line = lines[0].trim();
        if line == "(none)" {
            return (Vec::new(), None);
        }
        let mut fixed = Vec::new();
        let mut tail = None;
        for word in line.split_whitespace() {
            assert!(tail.is_none(), "{file}: `{prefix}` names {word} after its tail");
            match word.strip_prefix("..") {
                Some(rest) => tail = Some(rest.to_string()),
                None => fixed.push(word.to_string()),
            }
        }
        (fixed, tail)
    }

    fn lua_source(file: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store").join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The names a composed script reads, merged from its files' headers: each file names the
    /// entries it reads from index 1 (a prelude only its own), and the names at one index agree;
    /// the tail is the last file's.
    fn merged(contract: &Contract, label: &str) -> Names {
        let mut fixed: Vec<String> = Vec::new();
        let mut tail: Option<String> = None;
        for file in contract.files {
            let (names, file_tail) = header(file, &lua_source(file), label);
            for (i, name) in names.iter().enumerate() {
                match fixed.get(i) {
                    Some(earlier) => assert_eq!(
                        earlier,
                        name,
                        "{}: {file} names {label}[{}] {name}, an earlier file {earlier}",
                        contract.name,
                        i + 1
                    ),
                    None => fixed.push(name.clone()),
                }
            }
            if file_tail.is_some() {
                tail = file_tail;
            }
        }
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        Names { fixed: Box::leak(fixed.into_iter().map(leak).collect()), tail: tail.map(leak) }
    }

    /// Issue #19: the KEYS and ARGV each wrapper sends are, by name and in order, those its script's
    /// header (and its preludes') declares.
    #[test]
    fn every_wrapper_sends_the_keys_and_arguments_its_script_declares() {
        for contract in ALL {
            assert_eq!(merged(contract, "KEYS"), contract.keys, "{}'s KEYS", contract.name);
            assert_eq!(merged(contract, "ARGV"), contract.args, "{}'s ARGV", contract.name);
        }
    }

    /// Every script under `src/store` is some wrapper's (a new script needs its contract), and each
    /// wrapper's own script is its last file.
    #[test]
    fn every_lua_file_belongs_to_a_wrapper() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
        let mut found = 0;
        for entry in std::fs::read_dir(&dir).expect("src/store") {
            let name = entry.expect("an entry").file_name().to_string_lossy().into_owned();
            if name.ends_with(".lua") {
                found += 1;
                assert!(ALL.iter().any(|c| c.files.contains(&name.as_str())), "{name} has no wrapper in scripts.rs");
            }
        }
        assert!(found > 10, "found only {found} scripts in {}", dir.display());
    }

    /// The sentinel replies are named alike on both sides: each script declares the codes it
    /// answers with in one `local` line, equal to [`reply`]'s.
    #[test]
    fn the_reply_codes_agree_with_the_scripts() {
        let lines = [
            (
                "apply_events.lua",
                format!(
                    "local STATE_MISSING, ID_REUSED, UNVOUCHED, RECORD_UNREADABLE = {}, {}, {}, {}",
                    reply::STATE_MISSING,
                    reply::ID_REUSED,
                    reply::UNVOUCHED,
                    reply::RECORD_UNREADABLE
                ),
            ),
            ("read_batches.lua", format!("local STATE_MISSING = {}", reply::STATE_MISSING)),
            (
                "install_counts.lua",
                format!(
                    "local MOVED, INSTALLED, RELOADING = {}, {}, {}",
                    reply::MOVED,
                    reply::INSTALLED,
                    reply::RELOADING
                ),
            ),
            ("acquire_lease.lua", format!("local TAKEN, BUSY = {}, {}", reply::TAKEN, reply::BUSY)),
        ];
        for (file, line) in lines {
            assert!(lua_source(file).lines().any(|l| l == line), "{file} does not declare `{line}`");
        }
    }

    /// The `error_reply` codes the scripts answer with are the ones [`StoreError`] reads, and
    /// every code it reads is answered by some script.
    #[test]
    fn the_error_codes_agree_with_the_scripts() {
        let mut answered = std::collections::BTreeSet::new();
        for contract in ALL {
            for file in contract.files {
                let lua = lua_source(file);
                for (at, _) in lua.match_indices("redis.error_reply('") {
                    let rest = &lua[at + "redis.error_reply('".len()..];
                    let code = rest.split(' ').next().unwrap_or_default();
                    assert!(error_code::ALL.contains(&code), "{file} answers {code}, which StoreError does not read");
                    answered.insert(code.to_string());
                }
            }
        }
        for code in error_code::ALL {
            assert!(answered.contains(*code), "no script answers {code}");
        }
    }
}
