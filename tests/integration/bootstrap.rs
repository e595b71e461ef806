//! Bootstrap from the Notification table, and losing Redis: events wait (503) until the state
//! is rebuilt, and counts end exact after a `FLUSHALL` in the middle of a stream of events; an
//! interrupted bootstrap resumes after its last chunk, a late creation retry of a notification
//! deleted before the loss counts nothing, and of several processes one rebuilds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use countersink::app::AppState;
use countersink::bootstrap::{Batching, Rebuild};
use countersink::events::Event;
use countersink::flush::WhenBusy;
use countersink::store::StoreError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{free_port, OwnRedis, TestEnv};

const WAIT: WhenBusy = WhenBusy::Wait(Duration::from_secs(30));

/// Fills the table behind the sidecar's back: `n` notifications for 50 users.
async fn existing_notifications(env: &TestEnv, n: u64) {
    let rows: Vec<String> =
        (1..=n).map(|id| format!("({id}, {}, {}, {})", id % 50, id % 3 != 0, id % 11 == 0)).collect();
    for chunk in rows.chunks(500) {
        env.sql(&format!(
            "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES {}",
            chunk.join(",")
        ))
        .await;
    }
}

#[tokio::test]
async fn bootstrap_on_an_existing_table_gives_exact_counts_and_state() {
    for env in TestEnv::each_backend_with_source().await {
        existing_notifications(&env, 3_000).await;
        // A stale stored count for a user with no notifications left.
        env.sql("INSERT INTO countersink_usernotificationscount (user_id, unread_count) VALUES (777, 4)").await;
        let state = env.state();
        let reported = Arc::new(std::sync::Mutex::new(Vec::new()));
        let progress = reported.clone();
        let report = state
            .bootstrapper
            .bootstrap(
                Batching { chunk_rows: 700, checkpoint_rows: 1_400 },
                Rebuild::Always,
                move |p: countersink::bootstrap::Progress| progress.lock().unwrap().push((p.done, p.total)),
            )
            .await
            .unwrap();
        assert_eq!(report.notifications, 3_000);
        assert_eq!(reported.lock().unwrap().last(), Some(&(3_000, 3_000)), "progress reached the end");
        assert_eq!(env.stored_counts().await, env.true_counts().await, "{:?}", env.backend());

        // The state matches the table: events on existing notifications are exact transitions.
        env.sql("UPDATE notifications_notification SET unread = NOT unread WHERE id IN (1, 3)").await;
        let outcome =
            state.store.apply(&[Event::save(1, 1, false, false), Event::save(3, 3, true, false)]).await.unwrap();
        assert_eq!(outcome.changed, 2);
        let duplicate = state.store.apply(&[Event::save(2, 2, true, false), Event::delete(11, 11)]).await.unwrap();
        assert_eq!(duplicate.changed, 0, "already unread / already deleted in the table");
        state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(env.stored_counts().await, env.true_counts().await);
    }
}

#[tokio::test]
async fn events_are_refused_until_the_state_is_bootstrapped() {
    let mut env = TestEnv::postgres_with_source().await;
    let mut redis = env.redis();
    let _: () = redis::Commands::del(&mut redis, env.key("ready")).unwrap();
    let state = env.state();
    let refused = state.store.apply(&[Event::save(1, 1, true, true)]).await.unwrap_err();
    assert!(matches!(refused, StoreError::StateMissing), "{refused}");
    assert!(refused.is_unavailable(), "answered 503 so the sender retries");
    // Reads too: the pending deltas are gone, so stored + pending would be wrong.
    let read = state.reader.unread_counts(&[1]).await.unwrap_err();
    assert!(read.is_unavailable(), "{read}");
    let app = countersink::http::router(state.clone());
    let response = tower::ServiceExt::oneshot(
        app,
        axum::http::Request::post("/v1/events")
            .body(axum::body::Body::from(r#"{"kind":"post_delete","notification_id":1,"user_id":1}"#))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(env.redis_keys().iter().all(|k| !k.contains(":state:")));

    env.core.source.source_table = Some("notifications_notification".into());
    state.bootstrapper.bootstrap(Batching::default(), Rebuild::Always, |_| {}).await.unwrap();
    assert_eq!(state.store.apply(&[Event::save(1, 1, true, true)]).await.unwrap().changed, 1);
}

/// Sends an event the way the Django package does: retried with backoff while refused.
async fn send(state: &AppState, event: Event) -> u32 {
    let mut refusals = 0;
    loop {
        match state.store.apply(std::slice::from_ref(&event)).await {
            Ok(_) => return refusals,
            Err(e) if e.is_unavailable() => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_in_the_middle_of_a_stream_is_recovered_with_exact_counts() {
    let seed: u64 = rand::random();
    let mut env = TestEnv::postgres().await;
    let redis = OwnRedis::start(free_port());
    env.core.redis_url = redis.url();
    env.add_notification_table().await;
    existing_notifications(&env, 500).await;
    let state = env.state();
    state.bootstrapper.bootstrap(Batching::default(), Rebuild::Always, |_| {}).await.unwrap();
    // The sidecar's watcher, as `serve` runs it.
    let watcher = tokio::spawn(state.bootstrapper.clone().watch_redis_state(Duration::from_millis(50), true, false));
    let flushing = Arc::new(AtomicBool::new(true));
    let flusher = tokio::spawn({
        let (state, flushing) = (state.clone(), flushing.clone());
        async move {
            while flushing.load(Ordering::Relaxed) {
                // Flushes may fail while the state is being rebuilt; the next one catches up.
                let _ = state.flusher.flush(WhenBusy::Skip).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    });

    let env = Arc::new(env);
    let mut writers = Vec::new();
    for lane in 0..4u64 {
        let (env, state) = (env.clone(), state.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed + lane);
            let mut refusals = 0;
            let mut next = 10_000 + lane;
            for step in 0..120u64 {
                let id = if step % 3 == 0 { next } else { rng.random_range(1..=125) * 4 + lane - 3 };
                let user = id % 50;
                if step % 3 == 0 {
                    next += 4;
                    env.sql(&format!(
                        "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES ({id}, {user}, TRUE, FALSE)"
                    ))
                    .await;
                    refusals += send(&state, Event::save(id, user, true, true)).await;
                } else {
                    let unread = rng.random_bool(0.5);
                    env.sql(&format!("UPDATE notifications_notification SET unread = {unread} WHERE id = {id}")).await;
                    refusals += send(&state, Event::save(id, user, unread, false)).await;
                }
            }
            refusals
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut admin = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("FLUSHALL").query(&mut admin).unwrap();
    let mut refusals = 0;
    for writer in writers {
        refusals += writer.await.unwrap();
    }
    flushing.store(false, Ordering::Relaxed);
    flusher.await.unwrap();
    watcher.abort();
    // Rows committed out of id order during the rebuild wait for a recount (apply_events.lua).
    state.reconciler.run_queued_recounts().await.unwrap();

    assert!(refusals > 0, "events were refused while the state was missing");
    assert!(state.store.is_ready().await.unwrap(), "the watcher rebuilt the state");
    state.flusher.flush(WAIT).await.unwrap();
    assert_eq!(env.stored_counts().await, env.true_counts().await, "seed {seed}, {refusals} refusals");
    let users: Vec<u64> = (0..50).collect();
    let reads = state.reader.unread_counts(&users).await.unwrap();
    let truth = env.true_counts().await;
    for read in reads {
        assert_eq!(read.unread_count, truth.get(&read.user_id).copied().unwrap_or(0));
    }
}

#[tokio::test]
async fn an_interrupted_bootstrap_resumes_after_its_last_chunk() {
    for env in TestEnv::each_backend_with_source().await {
        existing_notifications(&env, 2_000).await;
        let state = env.state();
        // The process dies after its second chunk: the future is dropped mid-way.
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::unbounded_channel();
        let interrupted = state.bootstrapper.bootstrap(
            Batching { chunk_rows: 300, checkpoint_rows: 600 },
            Rebuild::Always,
            move |p| {
                let _ = chunks_tx.send(p.done);
            },
        );
        tokio::select! {
            _ = interrupted => panic!("the bootstrap should have been interrupted"),
            _ = async { while chunks_rx.recv().await != Some(600) {} } => {}
        }
        // Its flush lock expires; events are still refused meanwhile.
        let mut redis = env.redis();
        let _: () = redis::Commands::del(&mut redis, env.key("flush_lock")).unwrap();
        assert!(!state.store.is_ready().await.unwrap());
        assert!(matches!(state.store.apply(&[Event::delete(1, 1)]).await, Err(StoreError::StateMissing)));

        let resumed = state
            .bootstrapper
            .bootstrap(Batching { chunk_rows: 300, checkpoint_rows: 600 }, Rebuild::Always, |_| {})
            .await
            .unwrap();
        assert!(resumed.resumed);
        assert!(resumed.notifications <= 1_400, "{} rows read again", resumed.notifications);
        assert_eq!(env.stored_counts().await, env.true_counts().await, "{:?}", env.backend());
        assert!(state.store.is_ready().await.unwrap());
    }
}

#[tokio::test]
async fn a_late_creation_retry_of_a_notification_deleted_before_redis_was_lost_counts_nothing() {
    for env in TestEnv::each_backend_with_source().await {
        let state = env.state();
        let recount_queued = |user: u64| -> bool {
            redis::cmd("SISMEMBER").arg(env.key("recounts")).arg(user).query(&mut env.redis()).unwrap()
        };
        // Notifications 5 and 7 of user 9; 6 of user 8 stays, so the rebuild reads up to id 6.
        env.sql(
            "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) \
             VALUES (5, 9, TRUE, FALSE), (6, 8, TRUE, FALSE), (7, 9, TRUE, FALSE)",
        )
        .await;
        let stamped = |id| Event { occurred_at: Some(chrono::Utc::now()), ..Event::save(id, 9, true, true) };
        let (five, seven) = (Event::save(5, 9, true, true), stamped(7));
        state.store.apply(&[five.clone(), Event::save(6, 8, true, true), seven.clone()]).await.unwrap();
        env.sql("DELETE FROM notifications_notification WHERE id IN (5, 7)").await;
        state.store.apply(&[Event::delete(5, 9), Event::delete(7, 9)]).await.unwrap();
        state.flusher.flush(WAIT).await.unwrap();

        // Redis loses everything; the rebuild cannot know notifications 5 and 7 ever existed.
        let keys = env.redis_keys();
        redis::cmd("DEL").arg(keys).exec(&mut env.redis()).unwrap();
        state.bootstrapper.bootstrap(Batching::default(), Rebuild::Always, |_| {}).await.unwrap();

        // The senders' retries of the creations arrive late, after the rebuild: 5 is below the
        // highest id the rebuild read (unstamped), 7 above it but stamped before the rebuild.
        for late in [&five, &seven] {
            let outcome = state.store.apply(std::slice::from_ref(late)).await.unwrap();
            assert_eq!(outcome.changed, 0, "{:?}: notification {} came back", env.backend(), late.notification_id);
            assert!(recount_queued(9), "{:?}: no recount queued for {}", env.backend(), late.notification_id);
            state.reconciler.run_queued_recounts().await.unwrap();
        }
        state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(state.reader.unread_counts(&[9]).await.unwrap()[0].unread_count, 0);
        assert_eq!(env.stored_counts().await.get(&9), None);

        // A row committed out of id order, which the rebuild could not see either, is counted
        // once its recount ran.
        env.sql(
            "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES (4, 9, TRUE, FALSE)",
        )
        .await;
        let outcome = state.store.apply(&[Event::save(4, 9, true, true)]).await.unwrap();
        assert_eq!(outcome.changed, 0);
        assert!(recount_queued(9));
        state.reconciler.run_queued_recounts().await.unwrap();
        assert_eq!(state.reader.unread_counts(&[9]).await.unwrap()[0].unread_count, 1, "{:?}", env.backend());
        // New notifications after the rebuild count at once, as ever.
        env.sql(
            "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES (8, 9, TRUE, FALSE)",
        )
        .await;
        assert_eq!(state.store.apply(&[stamped(8)]).await.unwrap().changed, 1);
        assert_eq!(state.reader.unread_counts(&[9]).await.unwrap()[0].unread_count, 2);
    }
}

/// A first read that took its base from the table before a rebuild rewrote the stored counts
/// must not install that base afterwards (the rebuild may leave the hand-off sequence as it was).
#[tokio::test]
async fn a_count_loaded_across_a_rebuild_is_loaded_again() {
    let env = TestEnv::postgres_with_source().await;
    env.sql("INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES (1, 5, TRUE, FALSE)")
        .await;
    let state = env.state();
    let snapshot = state.store.batches_snapshot(&[5]).await.unwrap();
    let (stored, _) = state.db.run(|conn| countersink::db::queries::stored_counts(conn, &[5], &[])).await.unwrap();
    assert_eq!(stored.get(&5), None, "the table's count before the rebuild");

    state.bootstrapper.bootstrap(Batching::default(), Rebuild::Always, |_| {}).await.unwrap();
    assert_eq!(state.store.install_counts(&snapshot, &[(5, 0)]).await.unwrap(), None);
    assert_eq!(state.reader.unread_counts(&[5]).await.unwrap()[0].unread_count, 1);
}

/// Several processes that find the state missing at once (a Redis that lost its data, seen by
/// every sidecar of a deployment): one rebuilds, the others wait for the lease and find it done.
/// Before, each rebuilt in turn, the second clearing the fresh state and doubling the time events
/// were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_several_processes_that_find_the_state_missing_one_rebuilds_it() {
    let env = TestEnv::postgres_with_source().await;
    existing_notifications(&env, 3_000).await;
    // Redis lost this deployment's data.
    let mut redis = env.redis();
    for key in env.redis_keys() {
        let _: () = redis::Commands::del(&mut redis, key).unwrap();
    }
    let processes = [env.state(), env.state(), env.state()];
    let batching = Batching { chunk_rows: 300, checkpoint_rows: 600 };
    let rebuilds = processes.iter().map(|state| state.bootstrapper.bootstrap(batching, Rebuild::IfMissing, |_| {}));
    let reports: Vec<_> = futures_util::future::join_all(rebuilds).await.into_iter().map(Result::unwrap).collect();
    let rebuilt: Vec<_> = reports.iter().filter(|r| !r.found_rebuilt).collect();
    assert_eq!(rebuilt.len(), 1, "{reports:?}");
    assert_eq!(rebuilt[0].notifications, 3_000);
    assert!(reports.iter().filter(|r| r.found_rebuilt).all(|r| r.notifications == 0));
    // An operator's bootstrap rebuilds even a complete state.
    let again = processes[0].bootstrapper.bootstrap(batching, Rebuild::Always, |_| {}).await.unwrap();
    assert_eq!((again.found_rebuilt, again.notifications), (false, 3_000));
    assert_eq!(env.stored_counts().await, env.true_counts().await);
}
