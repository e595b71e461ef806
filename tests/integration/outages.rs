//! Outages of real dependencies: a Redis server of the test's own that is killed and
//! restarted, a PostgreSQL or MySQL connection cut by a TCP proxy, a database too slow for a
//! flush. The service answers 503 while a dependency is gone (held counts still answer) and
//! recovers by itself, without a restart. `tests/soak.rs` runs these faults over and over under
//! load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use countersink::app::AppState;
use countersink::events::Event;
use countersink::flush::WhenBusy;
use support::proxy::Proxy;
use support::{free_port, OwnRedis, TestEnv};

const WAIT: WhenBusy = WhenBusy::Wait(Duration::from_secs(10));

#[tokio::test]
async fn redis_outage_is_answered_503_and_recovers_without_a_restart() {
    let env = TestEnv::sqlite().await;
    let mut redis = OwnRedis::start(free_port());
    let mut core = env.core.clone();
    core.redis_url = redis.url();
    let state = AppState::new(&core, None).unwrap();

    state.store.apply(&[Event::save(1, 9, true, true)]).await.unwrap();
    redis.kill();
    let during = state.store.apply(&[Event::save(2, 9, true, true)]).await.unwrap_err();
    assert!(during.is_unavailable(), "{during}");
    let read = state.reader.unread_counts(&[9]).await.unwrap_err();
    assert!(read.is_unavailable(), "{read}");

    let _redis = OwnRedis::start(redis.port);
    // The sender retries; the same state object reconnects by itself.
    let mut recovered = None;
    for _ in 0..50 {
        match state.store.apply(&[Event::save(2, 9, true, true)]).await {
            Ok(outcome) => {
                recovered = Some(outcome);
                break;
            }
            Err(e) => assert!(e.is_unavailable(), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recovered.map(|o| o.changed), Some(1));
    // A second retry of the same event is harmless.
    assert_eq!(state.store.apply(&[Event::save(2, 9, true, true)]).await.unwrap().changed, 0);
    // This Redis keeps nothing on disk: the first event was lost with it (the reconcile
    // repairs that); what arrived after the restart is counted once.
    assert_eq!(state.reader.unread_counts(&[9]).await.unwrap()[0].unread_count, 1);
}

#[tokio::test]
async fn database_outage_during_a_flush_keeps_the_deltas_for_the_next_flush() {
    for (env, server) in [(TestEnv::postgres().await, "127.0.0.1:5432"), (TestEnv::mysql().await, "127.0.0.1:3306")] {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut proxy = Proxy::start(address, server).await;
        let mut core = env.core.clone();
        core.database_url = proxy.url_through(&env.core.database_url);
        core.db_timeout_secs = 1;
        let state = AppState::new(&core, None).unwrap();

        state.store.apply(&[Event::save(1, 3, true, true), Event::save(2, 3, true, true)]).await.unwrap();
        state.flusher.flush(WAIT).await.unwrap();
        state.store.apply(&[Event::save(3, 3, true, true)]).await.unwrap();

        proxy.cut();
        let failed = state.flusher.flush(WAIT).await.unwrap_err();
        assert!(failed.is_unavailable(), "{failed} on {server}");
        assert!(state.reader.unread_counts(&[3]).await.unwrap_err().is_unavailable());

        let _proxy = Proxy::start(address, server).await;
        let report = state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(report.users_written, 1, "{report:?} on {server}");
        assert_eq!(state.reader.unread_counts(&[3]).await.unwrap()[0].unread_count, 3, "on {server}");
        assert_eq!(env.stored_counts().await.get(&3), Some(&3), "on {server}");
    }
}

/// A read is one Redis lookup once a user's count is held: the database is not on the read path.
#[tokio::test]
async fn held_counts_answer_and_stay_exact_while_the_database_is_down() {
    let env = TestEnv::postgres().await;
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = Proxy::start(address, "127.0.0.1:5432").await;
    let mut core = env.core.clone();
    core.database_url = proxy.url_through(&env.core.database_url);
    core.db_timeout_secs = 1;
    let state = AppState::new(&core, None).unwrap();
    state.store.apply(&[Event::save(1, 4, true, true), Event::save(2, 5, true, true)]).await.unwrap();
    state.flusher.flush(WAIT).await.unwrap();
    // The first read loads user 4's count from the table and Redis; user 5 is never read.
    assert_eq!(state.reader.unread_counts(&[4]).await.unwrap()[0].unread_count, 1);

    proxy.cut();
    state.store.apply(&[Event::save(3, 4, true, true), Event::save(1, 4, false, false)]).await.unwrap();
    state.store.apply(&[Event::save(4, 4, true, true)]).await.unwrap();
    assert_eq!(state.reader.unread_counts(&[4]).await.unwrap()[0].unread_count, 2);
    assert_eq!(state.reader.unread_counts(&[4, 4]).await.unwrap()[1].unread_count, 2);
    // A count not held yet needs the database.
    assert!(state.reader.unread_counts(&[4, 5]).await.unwrap_err().is_unavailable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_times_the_flush_out_without_overlap_and_reads_still_answer() {
    let env = TestEnv::postgres().await;
    let mut core = env.core.clone();
    core.flush_timeout_secs = 2;
    let state = AppState::new(&core, None).unwrap();
    let other_process = AppState::new(&core, None).unwrap();
    state.store.apply(&[Event::save(1, 5, true, true), Event::save(2, 6, true, true)]).await.unwrap();
    state.flusher.flush(WAIT).await.unwrap();
    state.store.apply(&[Event::save(3, 5, true, true), Event::save(4, 7, true, true)]).await.unwrap();

    // Another session locks the count table against writes (readers pass), as a long
    // migration or a stuck transaction would, and holds it for 4 s.
    let url = env.core.database_url.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let locker = std::thread::spawn(move || {
        use diesel::{Connection, RunQueryDsl};
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            diesel::sql_query("LOCK TABLE countersink_usernotificationscount IN EXCLUSIVE MODE").execute(conn)?;
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(4));
            Ok(())
        })
        .unwrap();
    });
    locked_rx.recv().unwrap();

    let started = std::time::Instant::now();
    let slow = tokio::spawn({
        let state = state.clone();
        async move { state.flusher.flush(WAIT).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No second flush runs beside it, in this process or another.
    let here = state.flusher.flush(WhenBusy::Skip).await.unwrap();
    assert!(here.skipped.is_some(), "{here:?}");
    let there = other_process.flusher.flush(WhenBusy::Skip).await.unwrap();
    assert!(there.skipped.is_some(), "{there:?}");
    // Reads answer at once, counting the batch being written.
    let read_started = std::time::Instant::now();
    let counts = state.reader.unread_counts(&[5, 6, 7]).await.unwrap();
    assert!(read_started.elapsed() < Duration::from_millis(500), "a read waited {:?}", read_started.elapsed());
    assert_eq!(counts.iter().map(|c| c.unread_count).collect::<Vec<_>>(), [2, 1, 1]);

    let failed = slow.await.unwrap().unwrap_err();
    assert!(matches!(failed, countersink::flush::FlushError::TimedOut(_)), "{failed}");
    assert!(failed.is_unavailable());
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(3), "the flush ended after {took:?}");
    assert_eq!(state.reader.unread_counts(&[5, 7]).await.unwrap()[0].unread_count, 2);

    locker.join().unwrap();
    let report = state.flusher.flush(WAIT).await.unwrap();
    assert!(report.batches.iter().any(|b| b.recovered && !b.already_applied), "{report:?}");
    let counts = state.reader.unread_counts(&[5, 6, 7]).await.unwrap();
    assert_eq!(counts.iter().map(|c| c.unread_count).collect::<Vec<_>>(), [2, 1, 1]);
    assert_eq!(env.stored_counts().await, HashMap::from([(5, 2), (6, 1), (7, 1)]));
}
