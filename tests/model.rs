//! Model-based property test of the whole pipeline: random sequences of what a Django site does
//! (create, mark read and unread, soft and hard delete, duplicated and late deliveries, two
//! requests marking the same notification read at once, a lost signal) interleaved with flushes
//! (some racing an event), reconciles, hard deletes whose events arrive much later (after the
//! reconciled picture of a reconcile since has expired), the loss of Redis (rebuilt from the
//! table), Redis restarted from a snapshot taken at an earlier step (noticed, and rebuilt) and
//! Redis full (an event refused whole, then retried), run against
//! the real Redis and database, and compared after every step with a reference model: the
//! Notification table itself. Queued recounts run before each comparison, as `serve`'s worker
//! runs them within a second.
//!
//! Invariant: no real-time count is ever below zero; every user's real-time count equals the
//! table's count of their unread, undeleted notifications, except users whose signal was lost
//! since their last reconcile, whose delete is still held back, or whose delete arrived after
//! their reconciled picture expired; after a final flush and reconcile, every stored count equals
//! the table's.
//!
//! Cases run on PostgreSQL, MySQL/MariaDB and SQLite, against one database and one Redis server
//! of its own per backend (a `redis-server` the test starts, saves and restarts), and on
//! PostgreSQL against a Redis Cluster of its own (without the snapshot steps), each case on ids
//! of its own. `COUNTERSINK_MODEL_CASES` sets the cases per backend
//! (default 700). A failure shrinks to a minimal sequence of operations, printed in full.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use countersink::app::AppState;
use countersink::bootstrap::{Batching, Rebuild};
use countersink::events::Event;
use countersink::flush::WhenBusy;
use countersink::store::Idempotency;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use support::cluster::ClusterSetup;
use support::{free_port, OwnRedis, TestEnv};

/// Users and notifications per case: few, so sequences revisit them often.
const USERS: u64 = 3;
const NOTIFICATIONS: u64 = 8;

#[derive(Debug, Clone)]
enum Op {
    Create {
        n: u64,
        unread: bool,
    },
    Mark {
        n: u64,
        unread: bool,
    },
    SoftDelete {
        n: u64,
    },
    HardDelete {
        n: u64,
    },
    /// The last request delivered again (a sender's retry, with the same `webhook-id`).
    Redeliver,
    /// A notification's creation event delivered again, after whatever came since.
    LateCreateRetry {
        n: u64,
    },
    /// Two requests mark the same notification read at the same moment.
    RacedMarkRead {
        n: u64,
    },
    /// The table changes but the signal never reaches the sidecar.
    LostSignal {
        n: u64,
        unread: bool,
    },
    Flush,
    /// A flush racing an event of the same user.
    FlushRacingMark {
        n: u64,
        unread: bool,
    },
    Reconcile {
        users: Vec<u64>,
    },
    /// Redis loses everything and the state is rebuilt from the table.
    LoseRedis,
    /// A hard delete whose event is held back until [`Op::DeliverDelayed`] (a sender that
    /// stalled, a retry queue).
    DelayedHardDelete {
        n: u64,
    },
    /// The held-back events arrive; `late`: after the reconciled picture of any reconcile since
    /// has expired (its 2 minutes).
    DeliverDelayed {
        late: bool,
    },
    /// Redis is full (`maxmemory` reached; it evicts nothing, `noeviction`): the event of a mark
    /// is refused whole, and the sender's retry (the same `webhook-id`) arrives once memory is
    /// freed.
    MarkWhileRedisFull {
        n: u64,
        unread: bool,
    },
    /// Redis writes a snapshot (`SAVE`).
    Snapshot,
    /// Redis dies and starts again from its last snapshot (taken at an earlier step, in an earlier
    /// case, or never: then empty); the sidecar notices and rebuilds from the table.
    RestartFromSnapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NOTIFICATIONS;
    prop_oneof![
        4 => (n.clone(), any::<bool>()).prop_map(|(n, unread)| Op::Create { n, unread }),
        5 => (n.clone(), any::<bool>()).prop_map(|(n, unread)| Op::Mark { n, unread }),
        1 => n.clone().prop_map(|n| Op::SoftDelete { n }),
        1 => n.clone().prop_map(|n| Op::HardDelete { n }),
        1 => Just(Op::Redeliver),
        1 => n.clone().prop_map(|n| Op::LateCreateRetry { n }),
        2 => n.clone().prop_map(|n| Op::RacedMarkRead { n }),
        1 => (n.clone(), any::<bool>()).prop_map(|(n, unread)| Op::LostSignal { n, unread }),
        2 => Just(Op::Flush),
        1 => (n.clone(), any::<bool>()).prop_map(|(n, unread)| Op::FlushRacingMark { n, unread }),
        1 => proptest::collection::vec(0..USERS, 1..=3).prop_map(|users| Op::Reconcile { users }),
        1 => Just(Op::LoseRedis),
        1 => n.prop_map(|n| Op::DelayedHardDelete { n }),
        1 => any::<bool>().prop_map(|late| Op::DeliverDelayed { late }),
        1 => (0..NOTIFICATIONS, any::<bool>()).prop_map(|(n, unread)| Op::MarkWhileRedisFull { n, unread }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::RestartFromSnapshot),
    ]
}

/// A notification's row in the table, as the model holds it.
#[derive(Debug, Clone, Copy)]
struct Row {
    user: u64,
    unread: bool,
    soft_deleted: bool,
}

/// The reference model: the Notification table, and what the sidecar was told.
#[derive(Default)]
struct Model {
    rows: HashMap<u64, Row>,
    /// Hard-deleted notifications never come back (primary keys are not reused).
    hard_deleted: HashSet<u64>,
    creations: HashMap<u64, Event>,
    /// The last request sent: its `webhook-id` and event.
    last_delivery: Option<(String, Event)>,
    /// Users whose count may be off until their next reconcile (a signal was lost).
    drifted: HashSet<u64>,
    /// Held-back delete events, each with whether a reconcile of its user ran since.
    delayed: Vec<(Event, bool)>,
}

impl Model {
    fn unread(&self, user: u64) -> i64 {
        self.rows.values().filter(|r| r.user == user && r.unread && !r.soft_deleted).count() as i64
    }

    /// A live (created, not deleted) notification's row.
    fn live(&self, n: u64) -> Option<Row> {
        self.rows.get(&n).copied().filter(|row| !row.soft_deleted)
    }
}

/// One case's id space: its own users and notifications, so cases share a database.
struct Ids {
    base: u64,
}

impl Ids {
    fn notification(&self, n: u64) -> u64 {
        self.base * NOTIFICATIONS + n + 1
    }
    fn user_of(&self, n: u64) -> u64 {
        self.user(n % USERS)
    }
    fn user(&self, u: u64) -> u64 {
        self.base * USERS + u + 1
    }
    fn users(&self) -> Vec<u64> {
        (0..USERS).map(|u| self.user(u)).collect()
    }
}

async fn sql(state: &AppState, statement: String) {
    state.db.run(move |conn| Ok(diesel::RunQueryDsl::execute(diesel::sql_query(statement), conn)?)).await.unwrap();
}

/// How long the sidecar remembers a request's `webhook-id` in these tests.
const IDEMPOTENCY_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Delivers one event in a request of its own, as the Django package sends it.
async fn apply(state: &AppState, event: &Event) {
    deliver(state, &format!("msg_{:032x}", rand::random::<u128>()), event).await;
}

/// An event stamped with the moment it happened, as the Django package stamps every event.
fn stamped(event: Event) -> Event {
    Event { occurred_at: Some(chrono::Utc::now()), ..event }
}

async fn deliver(state: &AppState, webhook_id: &str, event: &Event) {
    state
        .store
        .apply_once(
            std::slice::from_ref(event),
            Some(Idempotency::new(webhook_id, webhook_id.as_bytes(), IDEMPOTENCY_TTL)),
        )
        .await
        .unwrap();
}

impl Model {
    /// Sends `event` in a new request, remembered for [`Op::Redeliver`].
    async fn send(&mut self, state: &AppState, event: Event) {
        let webhook_id = format!("msg_{:032x}", rand::random::<u128>());
        deliver(state, &webhook_id, &event).await;
        self.last_delivery = Some((webhook_id, event));
    }
}

/// Runs one case; `Err` names the first step where the sidecar and the model disagree.
async fn run_case(
    env: &TestEnv,
    redis: &Mutex<ModelRedis>,
    state: &AppState,
    ids: &Ids,
    ops: &[Op],
) -> Result<(), String> {
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Create { n, unread } => {
                if model.rows.contains_key(&n) || model.hard_deleted.contains(&n) {
                    continue;
                }
                let (id, user) = (ids.notification(n), ids.user_of(n));
                sql(state, format!("INSERT INTO notifications_notification VALUES ({id}, {user}, {unread}, FALSE)"))
                    .await;
                model.rows.insert(n, Row { user, unread, soft_deleted: false });
                let event = stamped(Event::save(id, user, unread, true));
                model.creations.insert(n, event.clone());
                model.send(state, event).await;
            }
            Op::Mark { n, unread } | Op::LostSignal { n, unread } => {
                let Some(row) = model.live(n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("UPDATE notifications_notification SET unread = {unread} WHERE id = {id}")).await;
                model.rows.insert(n, Row { unread, ..row });
                if matches!(op, Op::LostSignal { .. }) {
                    model.drifted.insert(row.user);
                } else {
                    model.send(state, stamped(Event::save(id, row.user, unread, false))).await;
                }
            }
            Op::SoftDelete { n } => {
                let Some(row) = model.live(n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("UPDATE notifications_notification SET deleted = TRUE WHERE id = {id}")).await;
                model.rows.insert(n, Row { soft_deleted: true, ..row });
                model.send(state, stamped(Event::delete(id, row.user))).await;
            }
            Op::HardDelete { n } => {
                let Some(row) = model.rows.remove(&n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("DELETE FROM notifications_notification WHERE id = {id}")).await;
                model.hard_deleted.insert(n);
                model.send(state, stamped(Event::delete(id, row.user))).await;
            }
            Op::Redeliver => {
                if let Some((webhook_id, event)) = &model.last_delivery {
                    deliver(state, webhook_id, event).await;
                }
            }
            Op::LateCreateRetry { n } => {
                if let Some(event) = model.creations.get(&n) {
                    apply(state, event).await;
                }
            }
            Op::RacedMarkRead { n } => {
                let Some(row) = model.live(n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("UPDATE notifications_notification SET unread = FALSE WHERE id = {id}")).await;
                model.rows.insert(n, Row { unread: false, ..row });
                let event = stamped(Event::save(id, row.user, false, false));
                // Two requests (two clicks), so two webhook ids.
                tokio::join!(apply(state, &event), apply(state, &event));
            }
            Op::Flush => {
                state.flusher.flush(WhenBusy::Wait(std::time::Duration::from_secs(10))).await.unwrap();
            }
            Op::FlushRacingMark { n, unread } => {
                let Some(row) = model.live(n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("UPDATE notifications_notification SET unread = {unread} WHERE id = {id}")).await;
                model.rows.insert(n, Row { unread, ..row });
                let event = stamped(Event::save(id, row.user, unread, false));
                let (flushed, ()) = tokio::join!(
                    state.flusher.flush(WhenBusy::Wait(std::time::Duration::from_secs(10))),
                    apply(state, &event)
                );
                flushed.unwrap();
            }
            Op::DelayedHardDelete { n } => {
                let Some(row) = model.rows.remove(&n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("DELETE FROM notifications_notification WHERE id = {id}")).await;
                model.hard_deleted.insert(n);
                model.delayed.push((stamped(Event::delete(id, row.user)), false));
            }
            Op::DeliverDelayed { late } => {
                deliver_delayed(env, state, &mut model, late).await;
            }
            Op::MarkWhileRedisFull { n, unread } => {
                let Some(row) = model.live(n) else { continue };
                let id = ids.notification(n);
                sql(state, format!("UPDATE notifications_notification SET unread = {unread} WHERE id = {id}")).await;
                model.rows.insert(n, Row { unread, ..row });
                let event = stamped(Event::save(id, row.user, unread, false));
                let webhook_id = format!("msg_{:032x}", rand::random::<u128>());
                let mut conn = env.redis();
                // Far below the memory in use (it evicts nothing: `noeviction`). Redis judges "full"
                // when the script's call arrives, and its use can shrink by then: a limit just under
                // the use read from INFO let the call pass now and then, by 64 KiB on a cluster
                // node (its replica's link buffers drain).
                redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1).exec(&mut conn).unwrap();
                let full = state
                    .store
                    .apply_once(
                        std::slice::from_ref(&event),
                        Some(Idempotency::new(&webhook_id, webhook_id.as_bytes(), IDEMPOTENCY_TTL)),
                    )
                    .await;
                redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").exec(&mut conn).unwrap();
                match full {
                    Err(e) if e.is_unavailable() => {}
                    other => {
                        return Err(format!("step {step}: a full Redis answered {other:?}, not a refusal to retry"))
                    }
                }
                deliver(state, &webhook_id, &event).await;
                model.last_delivery = Some((webhook_id, event));
            }
            Op::Snapshot => match &*redis.lock().unwrap() {
                ModelRedis::Own(redis) => redis.save(),
                ModelRedis::Cluster { .. } => continue,
            },
            Op::RestartFromSnapshot => {
                match &mut *redis.lock().unwrap() {
                    ModelRedis::Own(redis) => redis.restart(),
                    ModelRedis::Cluster { .. } => continue,
                }
                recover_from_restart(state).await;
                forget_what_a_rebuild_repaired(&mut model);
            }
            Op::LoseRedis => {
                let keys = env.redis_keys();
                redis::cmd("DEL").arg(keys).exec(&mut env.redis()).unwrap();
                state.bootstrapper.bootstrap(Batching::default(), Rebuild::Always, |_| {}).await.unwrap();
                forget_what_a_rebuild_repaired(&mut model);
            }
            Op::Reconcile { ref users } => {
                let users: Vec<u64> = users.iter().map(|u| ids.user(*u)).collect();
                state.reconciler.reconcile_users(&users).await.unwrap();
                for user in &users {
                    model.drifted.remove(user);
                }
                for (event, reconciled) in &mut model.delayed {
                    *reconciled |= users.contains(&event.user_id);
                }
            }
        }
        // Events a rebuild could not judge queue a recount; serve's worker runs it within a second.
        // A recount is a reconcile: a delete held back across it may arrive after its picture.
        let queued: Vec<u64> = redis::cmd("SMEMBERS").arg(env.key("recounts")).query(&mut env.redis()).unwrap();
        state.reconciler.run_queued_recounts().await.unwrap();
        for (event, reconciled) in &mut model.delayed {
            *reconciled |= queued.contains(&event.user_id);
        }
        check_reads(state, ids, &model).await.map_err(|e| format!("after step {step} ({op:?}): {e}"))?;
    }
    // The end of the day: every event arrives, flush, reconcile everyone, and the table holds the truth.
    deliver_delayed(env, state, &mut model, true).await;
    state.reconciler.reconcile_users(&ids.users()).await.unwrap();
    state.flusher.flush(WhenBusy::Wait(std::time::Duration::from_secs(10))).await.unwrap();
    model.drifted.clear();
    check_reads(state, ids, &model).await.map_err(|e| format!("after the final reconcile: {e}"))?;
    let (stored, _) = state
        .db
        .run({
            let users = ids.users();
            move |conn| countersink::db::queries::stored_counts(conn, &users, &[])
        })
        .await
        .unwrap();
    for user in ids.users() {
        let (got, want) = (stored.get(&user).copied().unwrap_or(0), model.unread(user));
        if got != want {
            return Err(format!("user {user}: stored {got}, the table says {want}"));
        }
    }
    Ok(())
}

/// After a rebuild, which read the table: requests sent before it are taken as done (a retry of
/// one after the rebuild and after a newer lost signal is out of scope), no count is off, and the
/// held-back deletes of notifications the rebuild left out change nothing.
fn forget_what_a_rebuild_repaired(model: &mut Model) {
    model.drifted.clear();
    model.last_delivery = None;
    for (_, reconciled) in &mut model.delayed {
        *reconciled = false;
    }
}

/// What `serve`'s Redis watch does after a restart: once Redis answers again, the state it
/// restored is not vouched for, so it is set aside and rebuilt from the table.
async fn recover_from_restart(state: &AppState) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match state.flusher.recover_if_redis_restarted().await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                // The connection is re-established on the next call.
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no recovery from the restart: {e}"),
        }
    }
    state.bootstrapper.bootstrap(Batching::default(), Rebuild::IfMissing, |_| {}).await.unwrap();
}

/// Delivers the held-back deletes. One that arrives after a reconcile of its user whose
/// reconciled picture has expired (`late`) finds the notification unread in Redis though the
/// reconcile already left it out: its user's count may be one too low (never below zero) until
/// the next reconcile.
async fn deliver_delayed(env: &TestEnv, state: &AppState, model: &mut Model, late: bool) {
    if late {
        env.expire_reconciled_pictures();
    }
    for (event, reconciled) in std::mem::take(&mut model.delayed) {
        model.send(state, event.clone()).await;
        if late && reconciled {
            model.drifted.insert(event.user_id);
        }
    }
}

/// Every count is never below zero, and exact unless its user may be off (a lost signal since
/// the last reconcile, a delete still held back).
async fn check_reads(state: &AppState, ids: &Ids, model: &Model) -> Result<(), String> {
    let counts = state.reader.unread_counts(&ids.users()).await.unwrap();
    for count in counts {
        if count.unread_count < 0 {
            return Err(format!("user {}: read {}, below zero", count.user_id, count.unread_count));
        }
        if model.drifted.contains(&count.user_id) || model.delayed.iter().any(|(e, _)| e.user_id == count.user_id) {
            continue;
        }
        let want = model.unread(count.user_id);
        if count.unread_count != want {
            return Err(format!("user {}: read {}, the table says {want}", count.user_id, count.unread_count));
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("COUNTERSINK_MODEL_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(700)
}

/// Runs the property over `env`; panics with the minimal failing sequence.
fn check_model(runtime: &tokio::runtime::Runtime, env: &TestEnv, redis: &Mutex<ModelRedis>) {
    let state = {
        let _entered = runtime.enter();
        env.state()
    };
    let next_case = AtomicU64::new(0);
    let config = Config { cases: cases(), max_shrink_iters: 4096, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let ids = Ids { base: next_case.fetch_add(1, Ordering::Relaxed) };
        runtime.block_on(run_case(env, redis, &state, &ids, &ops)).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => println!("{} cases passed", cases()),
        Err(TestError::Fail(reason, ops)) => panic!("{reason}\nminimal failing sequence: {ops:#?}"),
        Err(e) => panic!("{e}"),
    }
}

/// Runs the model on a database from `make_env` with the Notification table, over a Redis of its
/// own (the model restarts it) that keeps its snapshots in a directory of its own.
fn run_model<F: std::future::Future<Output = TestEnv>>(make_env: impl FnOnce() -> F) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let snapshots = tempfile::tempdir().unwrap();
    let redis = OwnRedis::start_with_snapshots(free_port(), snapshots.path());
    let mut env = runtime.block_on(make_env());
    env.core.redis_url = redis.url();
    let redis = Mutex::new(ModelRedis::Own(redis));
    runtime.block_on(env.add_notification_table());
    check_model(&runtime, &env, &redis);
    runtime.block_on(async move { drop(env) });
}

/// The Redis of a model run: a server of its own, which the model snapshots and restarts, or a
/// Redis Cluster of its own (3 masters, 3 replicas), the deployment in the slot its hash tag
/// names (`--redis-cluster-nodes`). On the cluster the snapshot steps are skipped: a cluster
/// node's restart is a failover, which `tests/integration/cluster.rs` covers.
enum ModelRedis {
    Own(OwnRedis),
    /// Held so its processes run as long as the model does.
    Cluster {
        _nodes: ClusterSetup,
    },
}

#[test]
fn the_pipeline_matches_the_model_on_postgres() {
    run_model(TestEnv::postgres);
}

#[test]
fn the_pipeline_matches_the_model_on_sqlite() {
    run_model(TestEnv::sqlite);
}

#[test]
fn the_pipeline_matches_the_model_on_mysql() {
    run_model(TestEnv::mysql);
}

/// The model on a Redis Cluster (issue #16), on PostgreSQL: every script, pipeline and check runs
/// on the master of the deployment's slot, found through the cluster's nodes. The test's own
/// inspection of Redis (`TestEnv::redis`) goes to that master directly.
#[test]
fn the_pipeline_matches_the_model_on_a_redis_cluster() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = ClusterSetup::start();
    let mut env = runtime.block_on(TestEnv::postgres());
    let master = cluster.master_of(&format!("{{{}}}", env.core.redis_prefix)).expect("a master serves the slot");
    env.core.redis_cluster_nodes = cluster.addresses().split(',').map(String::from).collect();
    env.core.redis_url = format!("redis://127.0.0.1:{master}");
    let redis = Mutex::new(ModelRedis::Cluster { _nodes: cluster });
    runtime.block_on(env.add_notification_table());
    check_model(&runtime, &env, &redis);
    runtime.block_on(async move { drop(env) });
}
