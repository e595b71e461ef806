//! The Redis server that vouches for the state (`instance.lua`, `vouch.lua`), the record of the
//! last recovery from a restart, and the ready marker a rebuild or a rollback resync writes.

use redis::AsyncCommands;

use super::scripts;
use super::{Lease, Store, StoreError};

/// How `vouch.lua` vouches: whatever the instance key holds, or only if it names this server.
#[derive(Debug, Clone, Copy)]
enum VouchMode {
    Claim,
    Confirm,
}

impl VouchMode {
    /// The word `vouch.lua` reads.
    fn as_str(self) -> &'static str {
        match self {
            VouchMode::Claim => "claim",
            VouchMode::Confirm => "confirm",
        }
    }
}

/// Whether the Redis server vouches for the state ([`Store::check_instance`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCheck {
    /// The instance key names this server: the state is the one written to it.
    pub vouched: bool,
    /// Nothing was ever vouched for, handed off or left pending: a new state (a new deployment,
    /// or a Redis that lost everything), which the first event or flush vouches for.
    pub new: bool,
    /// This server's run id.
    pub server: String,
    /// The run id in the instance key (`None`: never vouched for, or lost).
    pub vouched_by: Option<String>,
    /// What the last recovery from a restart did, as it recorded it.
    pub last_restart: Option<String>,
}

impl Store {
    /// Whether this Redis server vouches for the state, and what the last recovery from a restart
    /// did (see `instance.lua`).
    pub async fn check_instance(&self) -> Result<InstanceCheck, StoreError> {
        let mut conn = self.conn.clone();
        let (server, vouched_by, last_restart, new) = scripts::CheckInstance {
            instance: self.keys.instance(),
            last_restart: self.keys.last_restart(),
            handoff_seq: self.keys.handoff_seq(),
            pending: self.keys.pending(),
        }
        .invoke(&mut conn)
        .await?;
        let vouched_by = (!vouched_by.is_empty()).then_some(vouched_by);
        let last_restart = (!last_restart.is_empty()).then_some(last_restart);
        let vouched = vouched_by.as_deref() == Some(server.as_str());
        Ok(InstanceCheck { vouched, new: new == 1, server, vouched_by, last_restart })
    }

    /// Vouches for the state on this Redis server, from now on.
    pub async fn claim_instance(&self, lease: &Lease) -> Result<(), StoreError> {
        self.vouch(lease, VouchMode::Claim).await
    }

    /// Keeps what a recovery from a Redis restart did (a JSON document), for `/readyz`.
    pub async fn record_restart(&self, lease: &Lease, record: &str) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.command("SET", self.keys.last_restart(), record);
        self.run_fenced(lease, writes).await
    }

    /// Vouches for the state as [`Store::claim_instance`] did, if this is still the server that
    /// claimed it; [`StoreError::RedisRestarted`] if Redis restarted since.
    pub async fn confirm_instance(&self, lease: &Lease) -> Result<(), StoreError> {
        self.vouch(lease, VouchMode::Confirm).await
    }

    async fn vouch(&self, lease: &Lease, mode: VouchMode) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _server: String = scripts::Vouch {
            lease: self.keys.flush_lock(),
            instance: self.keys.instance(),
            token: lease.fence_token(),
            mode: mode.as_str(),
        }
        .invoke(&mut conn)
        .await?;
        Ok(())
    }

    /// Whether the ready marker exists (whether or not this store requires it).
    pub async fn has_ready_marker(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.keys.ready()).await?)
    }

    /// Deletes the ready marker: with a Notification table, events wait for a bootstrap.
    pub async fn drop_ready_marker(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.delete(self.keys.ready());
        self.run_fenced(lease, writes).await
    }

    /// Raises the hand-off sequence to at least `seq`, and deletes the pending deltas and open
    /// batches if `discard_pending`: what a Redis that went back in time holds was flushed already.
    pub async fn resync_after_rollback(
        &self,
        lease: &Lease,
        seq: u64,
        discard_pending: bool,
    ) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.command("SET", self.keys.handoff_seq(), seq);
        if discard_pending {
            writes.delete(self.keys.pending());
        }
        // The held counts were kept against the old pending deltas: they are dropped, each to be
        // loaded again. The flag, set in the same step, stops reads and loads from trusting them
        // until that is done, whoever finishes it; the new marker value keeps loads that read
        // before the resync from installing stale bases.
        writes.command("SET", self.keys.ready(), chrono::Utc::now().to_rfc3339()).command(
            "SET",
            self.keys.counts_stale(),
            1,
        );
        self.run_fenced(lease, writes).await?;
        self.finish_reloading_counts().await?;
        Ok(())
    }
}
