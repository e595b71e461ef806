//! The flush, exactly once, on every backend: stopped after each step, run by several flushers at
//! once, chunked past what one statement carries, and read from while it runs; its lease renewed
//! during long work and fenced in the database against an older holder; Redis restored from an
//! older snapshot or rolled back (no batch flushed twice, reads wait for the rebuild).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use countersink::app::AppState;
use countersink::config::MAX_FLUSH_CHUNK_USERS;
use countersink::crash_point::{self, Stopped};
use countersink::db::queries;
use countersink::events::Event;
use countersink::flush::{FlushError, WhenBusy};
use countersink::store::Acquired;
use diesel::prelude::*;
use support::TestEnv;

const WAIT: WhenBusy = WhenBusy::Wait(Duration::from_secs(30));

/// Creates `per_user[i]` unread notifications for user `i + 1`, ids continuing from `first_id`.
async fn create_unread(state: &AppState, first_id: u64, per_user: &[u64]) -> u64 {
    let mut events = Vec::new();
    let mut id = first_id;
    for (i, n) in per_user.iter().enumerate() {
        for _ in 0..*n {
            events.push(Event::save(id, i as u64 + 1, true, true));
            id += 1;
        }
    }
    for chunk in events.chunks(1_000) {
        state.store.apply(chunk).await.unwrap();
    }
    id
}

/// The count table as a map.
async fn stored(state: &AppState) -> HashMap<u64, i64> {
    use countersink::db::schema::countersink_usernotificationscount::dsl::*;
    state
        .db
        .run(|conn| {
            let rows: Vec<(i64, i64)> =
                countersink_usernotificationscount.select((user_id, unread_count)).load(conn)?;
            Ok(rows.into_iter().map(|(u, n)| (u as u64, n)).collect())
        })
        .await
        .unwrap()
}

fn expected(per_user: &[u64]) -> HashMap<u64, i64> {
    per_user.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (i as u64 + 1, *n as i64)).collect()
}

#[tokio::test]
async fn flush_writes_every_pending_delta_once_and_empties_the_pending_set() {
    for env in TestEnv::each_backend().await {
        let state = env.state();
        // 250 users with chunks of 100: three upsert statements.
        let per_user: Vec<u64> = (0..250).map(|i| i % 4 + 1).collect();
        create_unread(&state, 1, &per_user).await;
        let report = state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(report.users_written, 250, "{:?}", env.backend());
        assert_eq!(stored(&state).await, expected(&per_user));
        assert_eq!(state.store.pending_users().await.unwrap(), 0);

        // A second flush with nothing pending writes nothing; a third adds on top.
        assert_eq!(state.flusher.flush(WAIT).await.unwrap().users_written, 0);
        state.store.apply(&[Event::save(1, 1, false, false)]).await.unwrap();
        state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(stored(&state).await[&1], per_user[0] as i64 - 1);
    }
}

/// One upsert statement carries at most 65,535 binds on PostgreSQL and MySQL (32,767 users at two
/// binds each) and 32,766 on SQLite: a flush of more users than that is split into statements
/// of at most `MAX_FLUSH_CHUNK_USERS`, and the largest chunk is accepted by every backend.
#[tokio::test]
async fn a_flush_of_more_users_than_one_statement_can_carry_is_chunked() {
    let users = 65_535 / 2 + 1;
    for mut env in TestEnv::each_backend().await {
        env.core.flush_chunk_users = MAX_FLUSH_CHUNK_USERS;
        let state = env.state();
        // Users 1..=users get a pending delta of 1, every tenth of 2, written straight into the
        // pending set (events would only take longer to put the same deltas there).
        let per_user: Vec<u64> = (0..users).map(|i| 1 + u64::from(i % 10 == 0)).collect();
        let pending: Vec<(u64, u64)> = per_user.iter().enumerate().map(|(i, n)| (*n, i as u64 + 1)).collect();
        let _: () = redis::Commands::zadd_multiple(&mut env.redis(), env.key("pending"), &pending).unwrap();
        let report = state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(report.users_written, users as u64, "{:?}", env.backend());
        assert_eq!(report.batches[0].delta_sum, per_user.iter().sum::<u64>() as i64);
        assert_eq!(stored(&state).await, expected(&per_user), "{:?}", env.backend());
    }
}

#[tokio::test]
async fn a_flush_stopped_after_any_step_loses_nothing_and_applies_nothing_twice() {
    for step in [crash_point::FLUSH_AFTER_HANDOFF, crash_point::FLUSH_MID_WRITE, crash_point::FLUSH_AFTER_COMMIT] {
        for env in TestEnv::each_backend().await {
            let state = env.state();
            let per_user: Vec<u64> = (0..230).map(|i| i % 3 + 1).collect();
            let next_id = create_unread(&state, 1, &per_user).await;
            let stopped = state.flusher.flush_stopping_after(step).await;
            assert!(matches!(stopped, Err(FlushError::Stopped(Stopped(s))) if s == step), "{step:?}");

            // Reads stay exact while the batch is stranded.
            let read = state.reader.unread_counts(&[1, 2, 3]).await.unwrap();
            assert_eq!(read.iter().map(|c| c.unread_count).collect::<Vec<_>>(), vec![1, 2, 3], "{step:?}");

            // Events keep arriving, then a new process flushes.
            let more = vec![0, 5];
            create_unread(&state, next_id, &more).await;
            let report = env.state().flusher.flush(WAIT).await.unwrap();
            let recovered = &report.batches[0];
            assert!(recovered.recovered, "{step:?}: {report:?}");
            assert_eq!(recovered.already_applied, step == crash_point::FLUSH_AFTER_COMMIT, "{step:?}");

            let mut want = expected(&per_user);
            *want.get_mut(&2).unwrap() += 5;
            assert_eq!(stored(&state).await, want, "{step:?} on {:?}", env.backend());
            assert!(state.store.batch_ids().await.unwrap().is_empty());
        }
    }
}

#[tokio::test]
async fn concurrent_flushers_apply_each_delta_exactly_once() {
    for env in TestEnv::each_backend().await {
        // Four "processes", each with its own state and local lock, share Redis and the database.
        let flushers: Vec<AppState> = (0..4).map(|_| env.state()).collect();
        let writer = env.state();
        let mut id = 1;
        let mut per_user = vec![0u64; 50];
        for round in 0..20 {
            let add: Vec<u64> = (0..50).map(|u| (u + round) % 3).collect();
            id = create_unread(&writer, id, &add).await;
            for (total, n) in per_user.iter_mut().zip(&add) {
                *total += n;
            }
            let mut running = Vec::new();
            for state in &flushers {
                let flusher = state.flusher.clone();
                let when = if round % 2 == 0 { WhenBusy::Skip } else { WAIT };
                running.push(tokio::spawn(async move { flusher.flush(when).await.unwrap() }));
            }
            for run in running {
                run.await.unwrap();
            }
        }
        flushers[0].flusher.flush(WAIT).await.unwrap();
        assert_eq!(stored(&writer).await, expected(&per_user), "{:?}", env.backend());
    }
}

#[tokio::test]
async fn scheduled_flush_skips_while_another_process_holds_the_lock() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    create_unread(&state, 1, &[2]).await;
    let mut redis = env.redis();
    let _: () = redis::Commands::set(&mut redis, env.key("flush_lock"), "someone-else").unwrap();
    let report = state.flusher.flush(WhenBusy::Skip).await.unwrap();
    assert!(report.skipped.is_some());
    assert!(matches!(state.flusher.flush(WhenBusy::Wait(Duration::from_millis(300))).await, Err(FlushError::Busy(_))));
    assert_eq!(state.store.pending_users().await.unwrap(), 1, "nothing was handed off");
    let _: () = redis::Commands::del(&mut redis, env.key("flush_lock")).unwrap();
    assert_eq!(state.flusher.flush(WhenBusy::Skip).await.unwrap().users_written, 1);
}

#[tokio::test]
async fn reads_during_flushes_neither_miss_nor_double_count_the_batch_in_flight() {
    for env in TestEnv::each_backend().await {
        let state = env.state();
        let users: Vec<u64> = (1..=300).collect();
        let mut per_user = vec![0u64; users.len()];
        let mut id = 1;
        let mut last_round_users = 0;
        for round in 0..8u64 {
            let add: Vec<u64> = users.iter().map(|u| (u + round) % 4).collect();
            last_round_users = add.iter().filter(|n| **n > 0).count() as i64;
            id = create_unread(&state, id, &add).await;
            for (total, n) in per_user.iter_mut().zip(&add) {
                *total += n;
            }
            // Readers check every user while a flush moves the deltas from Redis to the database.
            // Two read the counts Redis holds; one drops them before each read, so every read of
            // it loads them from the database and the batches in flight.
            let want: Vec<i64> = per_user.iter().map(|n| *n as i64).collect();
            let done = Arc::new(AtomicBool::new(false));
            let mut readers = Vec::new();
            for cold in [false, false, true] {
                let (reader, users, want, done) = (env.state(), users.clone(), want.clone(), done.clone());
                readers.push(tokio::spawn(async move {
                    let mut reads = 0;
                    while !done.load(Ordering::Relaxed) || reads == 0 {
                        if cold {
                            reader.store.clear_held_counts().await.unwrap();
                        }
                        let got: Vec<i64> =
                            reader.reader.unread_counts(&users).await.unwrap().iter().map(|c| c.unread_count).collect();
                        assert_eq!(got, want);
                        reads += 1;
                    }
                    reads
                }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            state.flusher.flush(WAIT).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            done.store(true, Ordering::Relaxed);
            for reader in readers {
                assert!(reader.await.unwrap() > 0);
            }
        }
        let last = state.db.run(queries::last_batch).await.unwrap().unwrap();
        assert_eq!(last.users, last_round_users);
    }
}

/// A Redis restarted from an older snapshot brings back pending deltas that were flushed since.
#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_does_not_flush_twice() {
    for with_source in [false, true] {
        let mut env = TestEnv::postgres().await;
        if with_source {
            env.add_notification_table().await;
            env.sql(
                "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES (1, 5, TRUE, FALSE)",
            )
            .await;
        }
        let state = env.state();
        state.store.apply(&[Event::save(1, 5, true, true)]).await.unwrap();
        state.flusher.flush(WAIT).await.unwrap();
        // The "snapshot" is older than that flush: pending held user 5's delta, the sequence was 0.
        let mut redis = env.redis();
        let _: () = redis::Commands::zadd(&mut redis, env.key("pending"), "5", 1).unwrap();
        let _: () = redis::Commands::set(&mut redis, env.key("handoff_seq"), 0).unwrap();
        let _: () = redis::Commands::set(&mut redis, env.key("ready"), "restored").unwrap();

        let outcome = state.flusher.flush(WAIT).await;
        if with_source {
            // Events and flushes wait for a rebuild from the table.
            assert!(
                matches!(outcome, Err(FlushError::Store(countersink::store::StoreError::StateMissing))),
                "{outcome:?}"
            );
            state
                .bootstrapper
                .bootstrap(countersink::bootstrap::Batching::default(), countersink::bootstrap::Rebuild::Always, |_| {})
                .await
                .unwrap();
            state.flusher.flush(WAIT).await.unwrap();
        } else {
            outcome.unwrap();
        }
        assert_eq!(stored(&state).await, HashMap::from([(5, 1)]), "with source: {with_source}");
        // Later flushes go on normally from the recorded sequence.
        state.store.apply(&[Event::save(2, 5, true, true)]).await.unwrap();
        state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(stored(&state).await, HashMap::from([(5, 2)]), "with source: {with_source}");
    }
}

#[tokio::test]
async fn the_flush_lock_is_renewed_while_long_work_holds_it() {
    let mut env = TestEnv::sqlite().await;
    env.core.flush_lock_ttl_secs = 1;
    let (holder, other) = (env.state(), env.state());
    let work = tokio::spawn(async move {
        holder
            .flusher
            .exclusive(WAIT, async |_lease| -> Result<(), FlushError> {
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                Ok(())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let report = other.flusher.flush(WhenBusy::Skip).await.unwrap();
    assert!(report.skipped.is_some(), "the lock outlived its first second");
    work.await.unwrap().unwrap().unwrap();
    assert!(other.flusher.flush(WhenBusy::Skip).await.unwrap().skipped.is_none(), "released when done");
}

/// A rollback resync that dies after its transaction, before it dropped the held counts: the
/// next flush finds the sequence right and must still finish the job, or the held count keeps
/// the restored (already stored) delta for good and new events move the wrong count.
#[tokio::test]
async fn a_resync_interrupted_before_the_held_counts_are_dropped_is_finished_by_the_next_flush() {
    let env = TestEnv::postgres().await;
    let state = env.state();
    state.store.apply(&[Event::save(1, 5, true, true)]).await.unwrap();
    assert_eq!(state.reader.unread_counts(&[5]).await.unwrap()[0].unread_count, 1);
    state.store.apply(&[Event::save(2, 5, true, true)]).await.unwrap();
    state.flusher.flush(WAIT).await.unwrap();
    env.restore_snapshot_of_one_unread();
    // What `resync_after_rollback(1, true)` writes in its transaction; then the process dies.
    let _: () = redis::pipe()
        .atomic()
        .set(env.key("handoff_seq"), 1)
        .ignore()
        .del(env.key("pending"))
        .ignore()
        .set(env.key("ready"), "after the resync")
        .ignore()
        .set(env.key("counts_stale"), 1)
        .ignore()
        .query(&mut env.redis())
        .unwrap();
    let read = state.reader.unread_counts(&[5]).await.unwrap_err();
    assert!(read.is_unavailable(), "a held count that may be stale is not answered: {read}");
    state.flusher.flush(WAIT).await.unwrap();
    state.store.apply(&[Event::save(3, 5, true, true)]).await.unwrap();
    state.flusher.flush(WAIT).await.unwrap();
    assert_eq!(env.stored_counts().await, HashMap::from([(5, 3)]));
    assert_eq!(state.reader.unread_counts(&[5]).await.unwrap()[0].unread_count, 3);
}

/// With a Notification table, a flush that notices a rollback drops the ready marker for a
/// rebuild; from then on reads must not answer the snapshot's held counts.
#[tokio::test]
async fn after_a_flush_noticed_a_rollback_reads_wait_for_the_rebuild() {
    let env = TestEnv::postgres_with_source().await;
    env.sql(
        "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) \
         VALUES (1, 5, TRUE, FALSE), (2, 5, TRUE, FALSE)",
    )
    .await;
    let state = env.state();
    state
        .bootstrapper
        .bootstrap(countersink::bootstrap::Batching::default(), countersink::bootstrap::Rebuild::Always, |_| {})
        .await
        .unwrap();
    assert_eq!(state.reader.unread_counts(&[5]).await.unwrap()[0].unread_count, 2);
    env.sql("INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES (3, 5, TRUE, FALSE)")
        .await;
    state.store.apply(&[Event::save(3, 5, true, true)]).await.unwrap();
    state.flusher.flush(WAIT).await.unwrap();
    // Redis comes back from a snapshot taken before notification 3: held count 2, sequence 0.
    let mut redis = env.redis();
    let _: () = redis::Commands::set(&mut redis, env.key("handoff_seq"), 0).unwrap();
    let _: () = redis::Commands::set(&mut redis, env.key("ready"), "restored").unwrap();
    let _: () = redis::Commands::hset(&mut redis, env.key("counts:0"), "5", 2).unwrap();
    redis::cmd("BITFIELD").arg(env.key("state:0")).arg("SET").arg("u2").arg("#3").arg(0).exec(&mut redis).unwrap();
    assert!(state.flusher.flush(WAIT).await.is_err(), "the flush notices the rollback");
    let read = state.reader.unread_counts(&[5]).await.unwrap_err();
    assert!(read.is_unavailable(), "{read}");
    state
        .bootstrapper
        .bootstrap(countersink::bootstrap::Batching::default(), countersink::bootstrap::Rebuild::Always, |_| {})
        .await
        .unwrap();
    assert_eq!(state.reader.unread_counts(&[5]).await.unwrap()[0].unread_count, 3);
}

/// The database side of the lease's fencing: every flush raises the fence to its token inside its
/// transaction, an older token is refused from then on, and tokens keep rising even when Redis
/// loses the counter that numbers them (a new holder starts above the database's fence).
#[tokio::test]
async fn the_database_fence_refuses_a_lease_older_than_the_last_writer() {
    for env in TestEnv::each_backend().await {
        let state = env.state();
        let Acquired::Held(stale) = state.store.try_acquire_lease(Duration::from_secs(30), 0).await.unwrap() else {
            panic!("nothing else holds this test's lease")
        };
        // Its holder stalls; the lease expires, and another flush takes it and writes.
        let mut redis = env.redis();
        let _: () = redis::Commands::del(&mut redis, env.key("flush_lock")).unwrap();
        state.store.apply(&[Event::save(1, 5, true, true)]).await.unwrap();
        assert_eq!(state.flusher.flush(WAIT).await.unwrap().users_written, 1);
        let fence = state.db.run(queries::lease_fence).await.unwrap();
        assert!(fence > stale.fence(), "{:?}: the flush raised the fence above the stale token", env.backend());
        let stale_fence = stale.fence();
        let refused = state.db.run(move |conn| queries::pass_lease_fence(conn, stale_fence)).await.unwrap();
        assert!(!refused, "{:?}: the database let an older token write", env.backend());

        // Redis loses the counter: the next holder still starts above the database's fence.
        let _: () = redis::Commands::del(&mut redis, env.key("lease_tokens")).unwrap();
        state.store.apply(&[Event::save(2, 5, true, true)]).await.unwrap();
        assert_eq!(state.flusher.flush(WAIT).await.unwrap().users_written, 1, "{:?}", env.backend());
        assert!(state.db.run(queries::lease_fence).await.unwrap() > fence);
        assert_eq!(env.stored_counts().await.get(&5), Some(&2));
    }
}
