//! Redis memory per tracked notification, measured with Redis's own `MEMORY USAGE`.
//!
//! Run `cargo test --release --test memory -- --nocapture` to print the figure quoted in the README.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestEnv;
use countersink::events::Event;
use countersink::store::SHARD_BITS;

const NOTIFICATIONS: u64 = 1_000_000;

#[tokio::test]
async fn dense_ids_cost_at_most_one_byte_per_notification() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let events: Vec<Event> = (1..=NOTIFICATIONS).map(|id| Event::save(id, id % 1_000, id % 3 == 0, true)).collect();
    for chunk in events.chunks(1_000) {
        state.store.apply(chunk).await.unwrap();
    }
    let mut redis = env.redis();
    let state_keys: Vec<String> = env.redis_keys().into_iter().filter(|k| k.contains(":state:")).collect();
    assert_eq!(state_keys.len() as u64, NOTIFICATIONS / (1 << SHARD_BITS) + 1);
    let mut bytes = 0u64;
    for key in &state_keys {
        let usage: u64 = redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query(&mut redis).unwrap();
        bytes += usage;
    }
    let per_notification = bytes as f64 / NOTIFICATIONS as f64;
    println!(
        "{NOTIFICATIONS} notifications in {} state keys: {bytes} bytes, {per_notification:.3} bytes per notification",
        state_keys.len()
    );
    assert!(per_notification <= 1.0, "{per_notification} bytes per notification");
}
