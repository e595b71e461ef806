//! Redis memory per tracked notification and per user whose count is held, measured with
//! Redis's own `MEMORY USAGE`.
//!
//! Run `cargo test --release --test memory -- --nocapture` to print the figure quoted in the README.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestEnv;
use countersink::counts::unread_counts;
use countersink::events::Event;
use countersink::store::SHARD_BITS;

const NOTIFICATIONS: u64 = 1_000_000;
/// Users read once; the bytes per user do not depend on how many (128 per bucket key).
const USERS: u64 = 250_000;

/// Sum of `MEMORY USAGE` over this test's keys containing `part`, and how many there are.
fn memory_of(env: &TestEnv, part: &str) -> (u64, usize) {
    let mut redis = env.redis();
    let keys: Vec<String> = env.redis_keys().into_iter().filter(|k| k.contains(part)).collect();
    let bytes = keys
        .iter()
        .map(|key| -> u64 {
            redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query(&mut redis).unwrap()
        })
        .sum();
    (bytes, keys.len())
}

#[tokio::test]
async fn dense_ids_cost_at_most_one_byte_per_notification() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let events: Vec<Event> = (1..=NOTIFICATIONS).map(|id| Event::save(id, id % 1_000, id % 3 == 0, true)).collect();
    for chunk in events.chunks(1_000) {
        state.store.apply(chunk).await.unwrap();
    }
    let (bytes, keys) = memory_of(&env, ":state:");
    assert_eq!(keys as u64, NOTIFICATIONS / (1 << SHARD_BITS) + 1);
    let per_notification = bytes as f64 / NOTIFICATIONS as f64;
    println!("{NOTIFICATIONS} notifications in {keys} state keys: {bytes} bytes, {per_notification:.3} bytes per notification");
    assert!(per_notification <= 1.0, "{per_notification} bytes per notification");
}

#[tokio::test]
async fn a_held_count_costs_a_few_bytes_per_user() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    // 0 to 3 unread per user (a count up to 127 takes the same one byte in a listpack), then
    // every user is read once.
    let ids = std::sync::atomic::AtomicU64::new(1);
    let events: Vec<Event> = (1..=USERS)
        .flat_map(|user| (0..user % 4).map(move |_| user))
        .map(|user| Event::save(ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed), user, true, true))
        .collect();
    for chunk in events.chunks(1_000) {
        state.store.apply(chunk).await.unwrap();
    }
    let users: Vec<u64> = (1..=USERS).collect();
    for chunk in users.chunks(1_000) {
        let counts = unread_counts(&state.store, &state.db, chunk).await.unwrap();
        assert!(counts.iter().all(|c| c.unread_count == (c.user_id % 4) as i64));
    }
    let (bytes, keys) = memory_of(&env, ":counts:");
    let per_user = bytes as f64 / USERS as f64;
    println!("{USERS} users' counts in {keys} bucket keys: {bytes} bytes, {per_user:.2} bytes per user");
    assert!(per_user <= 8.0, "{per_user} bytes per user");
}

/// User ids far apart cost a bucket key each: a read holds a count for any id asked for, so a
/// deployment with sparse user ids (or a read-token holder asking for random ones) pays this.
#[tokio::test]
async fn a_held_count_of_a_sparse_user_id_costs_a_bucket_key() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let users: Vec<u64> = (1..=10_000u64).map(|u| u * 1_000_003).collect();
    for chunk in users.chunks(1_000) {
        unread_counts(&state.store, &state.db, chunk).await.unwrap();
    }
    let (bytes, keys) = memory_of(&env, ":counts:");
    let per_user = bytes as f64 / users.len() as f64;
    println!(
        "{} sparse user ids read once: {keys} bucket keys, {bytes} bytes, {per_user:.1} bytes per user",
        users.len()
    );
    assert_eq!(keys, users.len());
    assert!(per_user <= 128.0, "{per_user} bytes per sparse user");
}
