//! A heavy user: reconciling (or recounting) a user with a million notifications must never
//! block Redis for long (issue #13), and must end exact. A binary of its own, apart from
//! `tests/integration/reconcile.rs`, because it is slow (20-30 s, most of it PostgreSQL writing and
//! reading the million rows) and because it times Redis scripts, which other tests running beside
//! it would slow down.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use countersink::events::Event;
use countersink::store::UserDrift;
use support::TestEnv;

/// Notifications of the heavy user in `a_heavy_user_is_reconciled_in_short_redis_scripts`:
/// `COUNTERSINK_TEST_HEAVY_NOTIFICATIONS`, 1,000,000 by default (the bound of issue #13). Before
/// reconciles were chunked, one script took 11-15 s at a million here (issue #13 saw 4-7 s at
/// 320,000), so a smaller number still shows the difference on a slower machine.
fn heavy_notifications() -> u64 {
    std::env::var("COUNTERSINK_TEST_HEAVY_NOTIFICATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000)
}

/// The longest any script may block Redis (issue #13: unrelated events must not wait on a reconcile).
const LONGEST_SCRIPT: Duration = Duration::from_millis(50);

#[tokio::test]
async fn a_heavy_user_is_reconciled_in_short_redis_scripts() {
    // A Redis of the test's own: its slow log is reconfigured and read, which would see (and
    // disturb) the tests running beside it on the shared one.
    let redis = support::OwnRedis::start(support::free_port());
    let mut env = TestEnv::postgres().await;
    env.core.redis_url = redis.url();
    env.add_notification_table().await;
    let n = heavy_notifications();
    // User 42: two in three unread, one in ten soft-deleted; user 43 beside it, with one unread.
    env.sql(&format!(
        "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) \
         SELECT g, 42, g % 3 <> 0, g % 10 = 0 FROM generate_series(1, {n}) AS g"
    ))
    .await;
    env.sql(&format!("INSERT INTO notifications_notification (id, recipient_id, unread) VALUES ({}, 43, TRUE)", n + 1))
        .await;
    let state = env.state();
    // Redis heard of a few of them only: the reconcile writes every state.
    state.store.apply(&[Event::save(3, 42, false, true), Event::save(n + 1, 43, true, true)]).await.unwrap();

    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    // Every command slower than 1 ms is logged, so the longest script is known, not only whether
    // one passed the bound.
    redis::cmd("CONFIG").arg("SET").arg("slowlog-log-slower-than").arg(1000).exec(&mut conn).unwrap();
    redis::cmd("CONFIG").arg("SET").arg("slowlog-max-len").arg(100_000).exec(&mut conn).unwrap();
    redis::cmd("SLOWLOG").arg("RESET").exec(&mut conn).unwrap();

    let started = std::time::Instant::now();
    let reconciled = state.reconciler.reconcile_users(&[42, 43]).await;
    let took = started.elapsed();

    // Read once Redis is free again (a script that outlived the client's timeout still runs).
    // Entries: id, when, microseconds, command words, client address, client name.
    type Entry = (i64, i64, u64, Vec<String>, String, String);
    let slow: Vec<Entry> = loop {
        match redis::cmd("SLOWLOG").arg("GET").arg(-1).query(&mut conn) {
            Err(e) if e.code() == Some("BUSY") => std::thread::sleep(Duration::from_millis(100)),
            answer => break answer.unwrap(),
        }
    };
    let scripts: Vec<(u64, String)> = slow
        .iter()
        .filter(|(_, _, _, words, _, _)| words.first().is_some_and(|w| w.to_ascii_uppercase().starts_with("EVAL")))
        .map(|(_, _, micros, words, _, _)| (*micros, words[..words.len().min(3)].join(" ")))
        .collect();
    let longest = scripts.iter().map(|(micros, _)| *micros).max().unwrap_or(0);
    let mut times: Vec<u64> = scripts.iter().map(|(micros, _)| *micros).collect();
    times.sort_unstable();
    let at =
        |share: f64| times.get(((times.len() as f64 * share) as usize).min(times.len().saturating_sub(1))).copied();
    println!(
        "{n} notifications reconciled in {took:?}; {} scripts over 1 ms, median {:?} µs, 99th percentile {:?} µs, \
         longest {longest} µs, {} over {LONGEST_SCRIPT:?}",
        times.len(),
        at(0.5),
        at(0.99),
        times.iter().filter(|t| **t >= LONGEST_SCRIPT.as_micros() as u64).count()
    );
    // The bound is the issue's: no script over 50 ms (one script doing a heavy user's whole repair
    // took 11 s at a million notifications). A script's time in the slow log is wall time, so on a
    // machine busy with other work a script may also count a wait for a CPU: chunks of 500 take
    // about 3 ms (longest 13 ms) on this 2-core machine when quiet, which leaves that margin. The
    // 99th percentile is held to half the bound: on a slow day of the same machine (2026-12-03,
    // its Redis about half as fast as usual) it was 12.5 ms with a median of 2.9 ms and a longest
    // of 23 ms, while one unchunked script takes seconds.
    let p99 = at(0.99).unwrap_or(0);
    assert!(p99 < LONGEST_SCRIPT.as_micros() as u64 / 2, "1 script in 100 blocked Redis for {p99} µs or more");
    assert!(
        longest < LONGEST_SCRIPT.as_micros() as u64,
        "a script blocked Redis for {longest} µs: {:?}",
        scripts.iter().filter(|(micros, _)| *micros >= LONGEST_SCRIPT.as_micros() as u64).collect::<Vec<_>>()
    );

    // Exact: the stored counts are the table's, and so is the real-time read.
    let report = reconciled.unwrap();
    let truth = env.true_counts().await;
    assert_eq!(env.stored_counts().await, truth);
    assert_eq!(report.drift, vec![UserDrift { user_id: 42, stored: 0, actual: truth[&42] }]);
    let counts = state.reader.unread_counts(&[42, 43]).await.unwrap();
    assert_eq!(counts.iter().map(|c| c.unread_count).collect::<Vec<_>>(), vec![truth[&42], 1]);
    // The state was repaired too: a later mark-as-read of a notification only the table knew counts.
    state.store.apply(&[Event::save(1, 42, false, false)]).await.unwrap();
    let counts = state.reader.unread_counts(&[42]).await.unwrap();
    assert_eq!(counts[0].unread_count, truth[&42] - 1);
}
