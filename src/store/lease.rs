//! The flush lease: one process at a time flushes, reconciles, recounts or bootstraps.
//!
//! A holder takes the lease with a fresh **fencing token** and renews it while it works (see
//! [`crate::flush::Flusher::exclusive`]); a holder that dies stops renewing, and the lease
//! expires for the next process within its time to live. A holder that only *stalls* (paused,
//! swapped out, a long GC of its host) may wake up after its lease passed to another process:
//! every Redis write it makes under the lease goes through a script that first checks the token
//! (`lease.lua`, or `fenced.lua` for plain commands), so the stale holder changes nothing and
//! fails with [`StoreError::LeaseLost`].
//!
//! Only [`Store::try_acquire_lease`] makes a [`Lease`], and the writes that need one take it as
//! an argument: holding the lease is checked by the compiler as well as by Redis.

use std::time::Duration;

use redis::ToRedisArgs;

use super::scripts::{self, AcquireReply};
use super::{Store, StoreError};

/// Proof of holding the flush lease, with its fencing token. Not `Clone` outside this module:
/// only the store makes one.
#[derive(Debug)]
pub struct Lease {
    token: String,
}

impl Lease {
    /// The fencing token, `n:random`: unique, with `n` increasing from one holder to the next.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The token's `n`, which the database's fence compares (`queries::pass_lease_fence`).
    pub fn fence(&self) -> i64 {
        self.token.split(':').next().and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// What the renewal task needs: the token, to renew with.
    pub fn renewal(&self) -> LeaseRenewal {
        LeaseRenewal { token: self.token.clone() }
    }
}

/// A lease's fencing token as the argument of a fenced script (`lease.lua` checks it). Only a
/// [`Lease`] gives one, so the contract of a script that writes under the lease
/// (`store::scripts`) cannot be filled in without holding it.
#[derive(Debug)]
pub(super) struct FenceToken(String);

impl Lease {
    /// The token for a fenced script's `ARGV[1]`.
    pub(super) fn fence_token(&self) -> FenceToken {
        FenceToken(self.token.clone())
    }
}

impl ToRedisArgs for FenceToken {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        self.0.write_redis_args(out)
    }
}

/// The renewal side of a [`Lease`]: it can renew the lease, not write under it.
#[derive(Debug)]
pub struct LeaseRenewal {
    token: String,
}

/// The answer of [`Store::try_acquire_lease`].
#[derive(Debug)]
pub enum Acquired {
    /// The lease is this caller's until it is released or expires.
    Held(Lease),
    /// Another holder has it.
    Busy(LeaseHolder),
}

/// Who holds the lease, and for how long at most unless it renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The holder's fencing token.
    pub token: String,
    /// When the lease expires unless renewed (a holder that died never renews it).
    pub expires_in: Duration,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "another process holds the flush lease (token {}); if it stopped, the lease expires in {:.1} s",
            self.token,
            self.expires_in.as_secs_f64()
        )
    }
}

impl Store {
    /// Takes the flush lease for `ttl` if nobody holds it, with a token numbered above `floor`
    /// (the database's fence: Redis may have lost its counter).
    pub async fn try_acquire_lease(&self, ttl: Duration, floor: i64) -> Result<Acquired, StoreError> {
        let mut conn = self.conn.clone();
        let reply = scripts::AcquireLease {
            lease: self.keys.flush_lock(),
            lease_tokens: self.keys.lease_tokens(),
            ttl_ms: ttl.as_millis() as u64,
            random_id: format!("{:016x}", rand::random::<u64>()),
            floor,
        }
        .invoke(&mut conn)
        .await?;
        Ok(match reply {
            AcquireReply::Taken(token) => Acquired::Held(Lease { token }),
            AcquireReply::Busy(token, ms_left) => Acquired::Busy(LeaseHolder {
                token,
                expires_in: Duration::from_millis(ms_left.unwrap_or(0).max(0) as u64),
            }),
        })
    }

    /// Renews the lease for `ttl` if `renewal`'s holder still has it; `false` if it is gone.
    pub async fn renew_lease(&self, renewal: &LeaseRenewal, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        scripts::ExtendLease {
            lease: self.keys.flush_lock(),
            token: renewal.token.clone(),
            ttl_ms: ttl.as_millis() as u64,
        }
        .invoke(&mut conn)
        .await
    }

    /// Gives the lease back, if it is still this holder's.
    pub async fn release_lease(&self, lease: Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _released: bool = scripts::ReleaseLease { lease: self.keys.flush_lock(), token: lease.fence_token() }
            .invoke(&mut conn)
            .await?;
        Ok(())
    }

    /// Commands for [`Store::run_fenced`].
    pub(super) fn fenced_writes(&self) -> FencedWrites {
        FencedWrites { keys: Vec::new(), commands: Vec::new(), on_claimed_instance: false }
    }

    /// Commands for [`Store::run_fenced`] that also require the instance a rebuild claimed
    /// (`claimed.lua`): a Redis restarted since gets none of them.
    pub(super) fn fenced_writes_on_claimed_instance(&self) -> FencedWrites {
        FencedWrites { keys: Vec::new(), commands: Vec::new(), on_claimed_instance: true }
    }

    /// Runs `writes` atomically if `lease` is still held (`fenced.lua`).
    pub(super) async fn run_fenced(&self, lease: &Lease, writes: FencedWrites) -> Result<(), StoreError> {
        if writes.commands.is_empty() {
            return Ok(());
        }
        let (lease_key, token) = (self.keys.flush_lock(), lease.fence_token());
        let mut invocation = if writes.on_claimed_instance {
            scripts::FencedOnClaimedInstance { lease: lease_key, instance: self.keys.instance(), token }.prepare()
        } else {
            scripts::Fenced { lease: lease_key, token }.prepare()
        };
        for key in &writes.keys {
            invocation.key(key);
        }
        for words in &writes.commands {
            invocation.arg(words.len());
            for word in words {
                invocation.arg(word.as_slice());
            }
        }
        let mut conn = self.conn.clone();
        let _run: u64 = scripts::Fenced::run(invocation, &mut conn).await?;
        Ok(())
    }
}

/// Plain commands to run under the lease, in order and atomically (see `fenced.lua`).
pub(super) struct FencedWrites {
    keys: Vec<String>,
    commands: Vec<Vec<Vec<u8>>>,
    /// Whether `claimed.lua` checks the instance key before the commands run.
    on_claimed_instance: bool,
}

impl FencedWrites {
    /// Adds the command `name key args...`; `args` is one value or a tuple of them.
    pub(super) fn command(&mut self, name: &str, key: String, args: impl ToRedisArgs) -> &mut Self {
        self.words(name, key, args.to_redis_args())
    }

    /// Adds `DEL key`.
    pub(super) fn delete(&mut self, key: String) -> &mut Self {
        self.words("DEL", key, Vec::new())
    }

    fn words(&mut self, name: &str, key: String, args: Vec<Vec<u8>>) -> &mut Self {
        let mut words = vec![name.as_bytes().to_vec(), key.as_bytes().to_vec()];
        words.extend(args);
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
        self.commands.push(words);
        self
    }
}
