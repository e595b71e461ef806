//! Bootstrap: rebuilding the state from the Notification table under the flush lease (its resume
//! point, state writes and checkpoints), the ready marker it writes, and clearing the state.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::{Keys, Lease, Store, StoreError, ALL_USERS};

/// States per `BITFIELD` of [`Store::write_states`]: a script passes a command's words through
/// Lua's `unpack`, which takes at most a few thousand.
const STATES_PER_COMMAND: usize = 1000;

impl Store {
    /// Whether a bootstrap has marked the state complete (always true when none is required).
    pub async fn is_ready(&self) -> Result<bool, StoreError> {
        if !self.requires_bootstrap {
            return Ok(true);
        }
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.keys.ready()).await?)
    }

    /// Where an interrupted bootstrap stopped: `None` when none is under way, `Some(None)` when
    /// one started and wrote no chunk yet, `Some(Some(id))` after the chunk ending at `id`.
    pub async fn bootstrap_cursor(&self) -> Result<Option<Option<i64>>, StoreError> {
        let mut conn = self.conn.clone();
        let cursor: Option<String> = conn.get(self.keys.bootstrap_cursor()).await?;
        match cursor.as_deref() {
            None => Ok(None),
            Some("") => Ok(Some(None)),
            Some(id) => id
                .parse()
                .map(|id| Some(Some(id)))
                .map_err(|_| StoreError::Unexpected(format!("bootstrap cursor {id:?} is not an id"))),
        }
    }

    /// Records that a bootstrap has cleared the state and started reading.
    pub async fn start_bootstrap(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut writes = self.fenced_writes();
        writes.command("SET", self.keys.bootstrap_cursor(), "");
        self.run_fenced(lease, writes).await
    }

    /// Writes the states of one chunk of notifications `(id, user, state)`: `BITFIELD`s of at
    /// most [`STATES_PER_COMMAND`] states, in one fenced script. Writing a state twice is
    /// harmless, so a resumed bootstrap may redo chunks.
    pub async fn write_states(&self, lease: &Lease, rows: &[(u64, u64, u8)]) -> Result<(), StoreError> {
        let mut by_shard: HashMap<u64, Vec<(u64, u8)>> = HashMap::new();
        for (id, _, state) in rows {
            let (shard, index) = Keys::state_slot(*id);
            by_shard.entry(shard).or_default().push((index, *state));
        }
        let mut writes = self.fenced_writes_on_claimed_instance();
        for (shard, states) in by_shard {
            for piece in states.chunks(STATES_PER_COMMAND) {
                // A plain bit offset (2 bits per notification) spares formatting a `#index` per row.
                let args: Vec<(&str, &str, u64, u8)> =
                    piece.iter().map(|(index, state)| ("SET", "u2", index * 2, *state)).collect();
                writes.command("BITFIELD", self.keys.state(shard), args);
            }
        }
        self.run_fenced(lease, writes).await
    }

    /// Saves a bootstrap's progress: the unread count of every user so far and the last id read,
    /// in one `MULTI`/`EXEC`, so a resumed bootstrap starts from a count that matches its cursor.
    pub async fn checkpoint_bootstrap(
        &self,
        lease: &Lease,
        last_id: i64,
        counts: &HashMap<u64, i64>,
    ) -> Result<(), StoreError> {
        let mut packed = Vec::with_capacity(counts.len() * 16);
        for (user, count) in counts {
            packed.extend_from_slice(&user.to_le_bytes());
            packed.extend_from_slice(&count.to_le_bytes());
        }
        let mut writes = self.fenced_writes_on_claimed_instance();
        writes.command("SET", self.keys.bootstrap_counts(), packed).command(
            "SET",
            self.keys.bootstrap_cursor(),
            last_id,
        );
        self.run_fenced(lease, writes).await
    }

    /// The counts saved by the last checkpoint (empty when none was saved).
    pub async fn bootstrap_counts(&self) -> Result<HashMap<u64, i64>, StoreError> {
        let mut conn = self.conn.clone();
        let packed: Option<Vec<u8>> = conn.get(self.keys.bootstrap_counts()).await?;
        let packed = packed.unwrap_or_default();
        if packed.len() % 16 != 0 {
            return Err(StoreError::Unexpected("the bootstrap checkpoint is truncated".into()));
        }
        Ok(packed
            .chunks_exact(16)
            .map(|pair| {
                let (user, count) = pair.split_at(8);
                let user = u64::from_le_bytes(user.try_into().unwrap_or_default());
                let count = i64::from_le_bytes(count.try_into().unwrap_or_default());
                (user, count)
            })
            .collect())
    }

    /// Ends a bootstrap: drops the resume point and the checkpoint, raises the hand-off sequence
    /// to the highest the database recorded, remembers the highest notification it read (see
    /// `apply_events.lua`), and writes the marker, so events apply again.
    pub async fn finish_bootstrap(
        &self,
        lease: &Lease,
        handoff_seq: u64,
        highest_read: Option<u64>,
    ) -> Result<(), StoreError> {
        let slot = match highest_read.map(Keys::state_slot) {
            Some((shard, index)) => format!("{shard} {index}"),
            None => "-1 -1".to_string(),
        };
        // Redis's clock, the one the event script reads `occurred_at` against, whichever host
        // runs the bootstrap.
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn.clone()).await?;
        let finished_ms = secs * 1000 + micros / 1000;
        let mut writes = self.fenced_writes_on_claimed_instance();
        writes
            .command("SET", self.keys.rebuilt(), format!("{slot} {finished_ms}"))
            .command("SET", self.keys.handoff_seq(), handoff_seq)
            .delete(self.keys.bootstrap_cursor())
            .delete(self.keys.bootstrap_counts())
            .command("SET", self.keys.ready(), chrono::Utc::now().to_rfc3339())
            // Every stored count was rewritten: live streams re-read all their users.
            .command("PUBLISH", self.keys.live_channel(), ALL_USERS);
        self.run_fenced(lease, writes).await
    }

    /// Deletes the whole state: the marker first (events are refused from then on), then every
    /// held count, state shard, the pending set, open batches, reconcile fences, journals and
    /// pictures.
    pub async fn clear_state(&self, lease: &Lease) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        // Fenced, so a holder that lost its lease stops here; the deletes after it are not (a
        // SCAN cannot run in a script), and the lease lasts far longer than they take.
        self.drop_ready_marker(lease).await?;
        let mut deleted = 0;
        // With the marker gone, no process started with a Notification table (as every process of
        // a deployment that bootstraps must be) installs or changes a count, so none comes back.
        for pattern in
            ["counts:*", "state:*", "batch:*", "journal:*", "reconciled:*", "reconcile_draft:*", "reconcile_tally:*"]
        {
            deleted += self.unlink_matching(pattern).await?;
        }
        let singles = [
            self.keys.pending(),
            self.keys.batches(),
            self.keys.reconciling(),
            self.keys.bootstrap_cursor(),
            self.keys.bootstrap_counts(),
        ];
        let n: u64 = conn.unlink(&singles).await?;
        Ok(deleted + n)
    }
}
