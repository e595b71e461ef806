//! A stand-in for a Django site: random notification writes to the Notification table
//! (PostgreSQL's: the writes are upserts in its dialect), each followed by the event its signal handler would send, with retries and races.
//! The table is the truth the tests compare the counts against.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use countersink::db::Db;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Read,
    Unread,
    SoftDeleted,
    HardDeleted,
}

/// The site: its notifications and the randomness that drives it.
pub struct World {
    rng: StdRng,
    users: u64,
    next_id: u64,
    notifications: HashMap<u64, (u64, State)>,
    live: Vec<u64>,
    /// Creation events held back, to be sent again long after newer events (late retries).
    late: Vec<Value>,
    /// Notifications whose creation was retried after they were hard-deleted.
    retried_after_delete: std::collections::HashSet<u64>,
    /// Whether a late retry may arrive after its notification was deleted (the sidecar then
    /// queues a recount of its user).
    retries_after_delete: bool,
}

impl World {
    /// A site with `users` users; ids start at `first_id` so several worlds can share a table.
    pub fn new(seed: u64, users: u64, first_id: u64) -> World {
        World {
            rng: StdRng::seed_from_u64(seed),
            users,
            next_id: first_id,
            notifications: HashMap::new(),
            live: Vec::new(),
            late: Vec::new(),
            retried_after_delete: Default::default(),
            retries_after_delete: true,
        }
    }

    /// The same site, whose late retries all arrive before their notification is deleted: none
    /// sets off a background recount, so a test decides when every recount runs.
    pub fn without_retries_after_delete(mut self) -> World {
        self.retries_after_delete = false;
        self
    }

    /// Performs `n` random operations: writes them to the table in one statement (as committed
    /// transactions would leave it), and returns the events their on-commit hooks send, in
    /// order, with immediate duplicates, a few late creation retries and doubled mark-as-reads.
    pub async fn write(&mut self, db: &Db, n: usize) -> Vec<Value> {
        let mut events = Vec::new();
        let mut touched = Vec::new();
        for _ in 0..n {
            let (id, event) = self.operation();
            touched.push(id);
            if self.rng.random_bool(0.05) {
                events.push(event.clone());
            }
            events.push(event);
        }
        if !self.retries_after_delete {
            let notifications = &self.notifications;
            self.late.retain(|event| {
                let id = event["notification_id"].as_u64().unwrap();
                matches!(notifications[&id].1, State::Read | State::Unread)
            });
        }
        if self.late.len() > 10 && self.rng.random_bool(0.3) {
            for event in &self.late {
                let id = event["notification_id"].as_u64().unwrap();
                if self.notifications[&id].1 == State::HardDeleted {
                    self.retried_after_delete.insert(id);
                }
            }
            events.append(&mut self.late);
        }
        self.save(db, &touched).await;
        events
    }

    fn operation(&mut self) -> (u64, Value) {
        if self.live.is_empty() || self.rng.random_bool(0.35) {
            let (id, user, unread) = (self.next_id, self.rng.random_range(1..=self.users), self.rng.random_bool(0.9));
            self.next_id += 1;
            self.live.push(id);
            self.notifications.insert(id, (user, if unread { State::Unread } else { State::Read }));
            let event = json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": unread, "created": true, "occurred_at": now()});
            if self.rng.random_bool(0.05) {
                self.late.push(event.clone());
            }
            return (id, event);
        }
        let slot = self.rng.random_range(0..self.live.len());
        let id = self.live[slot];
        let user = self.notifications[&id].0;
        let (state, event) = match self.rng.random_range(0..20) {
            0..=9 => (
                State::Read,
                json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": false, "occurred_at": now()}),
            ),
            10..=16 => (
                State::Unread,
                json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": true, "occurred_at": now()}),
            ),
            17..=18 => (
                State::SoftDeleted,
                json!({"kind": "post_delete", "notification_id": id, "user_id": user, "occurred_at": now()}),
            ),
            _ => (
                State::HardDeleted,
                json!({"kind": "post_delete", "notification_id": id, "user_id": user, "occurred_at": now()}),
            ),
        };
        if matches!(state, State::SoftDeleted | State::HardDeleted) {
            self.live.swap_remove(slot);
        }
        self.notifications.insert(id, (user, state));
        (id, event)
    }

    /// Writes the current state of `ids` to the table: one upsert, one delete.
    async fn save(&self, db: &Db, ids: &[u64]) {
        let mut rows = Vec::new();
        let mut gone = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in ids.iter().filter(|id| seen.insert(**id)) {
            match self.notifications[id] {
                (_, State::HardDeleted) => gone.push(id.to_string()),
                (user, state) => {
                    rows.push(format!("({id}, {user}, {}, {})", state == State::Unread, state == State::SoftDeleted))
                }
            }
        }
        if !rows.is_empty() {
            execute(
                db,
                format!(
                    "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES {} \
                     ON CONFLICT (id) DO UPDATE SET unread = EXCLUDED.unread, deleted = EXCLUDED.deleted",
                    rows.join(",")
                ),
            )
            .await;
        }
        if !gone.is_empty() {
            execute(db, format!("DELETE FROM notifications_notification WHERE id IN ({})", gone.join(","))).await;
        }
    }

    /// What this site did to `user`'s notifications, for a failure message.
    pub fn describe(&self, user: u64) -> String {
        let mut lines: Vec<String> = self
            .notifications
            .iter()
            .filter(|(_, (owner, _))| *owner == user)
            .map(|(id, (_, state))| {
                let state = match state {
                    State::Read => "read",
                    State::Unread => "unread",
                    State::SoftDeleted => "soft-deleted",
                    State::HardDeleted => "hard-deleted",
                };
                let retried =
                    if self.retried_after_delete.contains(id) { ", creation retried after delete" } else { "" };
                format!("  notification {id}: {state}{retried}")
            })
            .collect();
        lines.sort();
        lines.join("\n")
    }

    /// Every user id the site has.
    pub fn user_ids(&self) -> Vec<u64> {
        (1..=self.users).collect()
    }

    /// A few random users (for a reconcile request).
    pub fn some_users(&mut self, n: usize) -> Vec<u64> {
        (0..n).map(|_| self.rng.random_range(1..=self.users)).collect()
    }

    /// The unread count each user should see, from the site's own record of its writes.
    pub fn expected_counts(&self) -> HashMap<u64, i64> {
        let mut counts = HashMap::new();
        for (user, state) in self.notifications.values() {
            if *state == State::Unread {
                *counts.entry(*user).or_default() += 1;
            }
        }
        counts
    }
}

/// The moment an event happened, as the Django package stamps it.
fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

async fn execute(db: &Db, statement: String) {
    db.run(move |conn| Ok(diesel::RunQueryDsl::execute(diesel::sql_query(statement), conn)?)).await.unwrap();
}

/// Users whose count in `got` differs from `want` (absent means 0), as `(user, got, want)`.
pub fn wrong_users(users: &[u64], got: &HashMap<u64, i64>, want: &HashMap<u64, i64>) -> Vec<(u64, i64, i64)> {
    users
        .iter()
        .map(|u| (*u, got.get(u).copied().unwrap_or(0), want.get(u).copied().unwrap_or(0)))
        .filter(|(_, got, want)| got != want)
        .collect()
}
