//! Crash injection: the real binary is killed with SIGKILL at every step of a flush and of a
//! reconcile (src/crash_point.rs), round after round, and restarted over the same Redis and
//! database. After every other kill a clean process recovers what the dead one left; otherwise
//! the restarted process stops at the same point while it recovers, so recoveries die too. Reads must be exact before each crash and right after
//! each restart; at the end a clean process flushes, a full reconcile finds no drift, and every
//! stored count equals the Notification table.
//!
//! `COUNTERSINK_CRASH_ROUNDS` sets the kills per point (default 5); `COUNTERSINK_CRASH_SEED`
//! replays a run.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::sidecar::{Sidecar, SidecarOptions};
use common::world::{wrong_users, World};
use common::TestEnv;
use countersink::crash_point;
use serde_json::json;

const USERS: u64 = 200;
const OPERATIONS_PER_ROUND: usize = 400;

fn rounds() -> usize {
    std::env::var("COUNTERSINK_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5)
}

async fn assert_reads_exact(sidecar: &Sidecar, world: &World, when: &str) {
    let got: HashMap<u64, i64> = sidecar.read_counts(&world.user_ids()).await.into_iter().collect();
    let wrong = wrong_users(&world.user_ids(), &got, &world.expected_counts());
    assert!(wrong.is_empty(), "{when}: {} users read wrong, e.g. (user, read, true) {:?}", wrong.len(), &wrong[..1]);
}

/// Kills the sidecar at `point` `rounds()` times while a site writes, then checks every count.
async fn crash_repeatedly_at(point: &'static str) {
    let seed: u64 =
        std::env::var("COUNTERSINK_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("{point}: seed {seed} (set COUNTERSINK_CRASH_SEED to replay)");
    let env = TestEnv::postgres_with_source().await;
    // A background recount (a late save after a delete queues one) would reach the crash point
    // before the flush or reconcile this test starts.
    let mut world = World::new(seed, USERS, 1).without_retries_after_delete();
    let site = env.state();
    // No scheduled flush: the test decides when each flush or reconcile runs.
    let clean = SidecarOptions { flush_cron: "off".into(), ..SidecarOptions::default() };
    let crashing = SidecarOptions { crash_point: Some(point), ..clean.clone() };
    let mut sidecar = Sidecar::start(&env, crashing.clone()).await;
    for round in 0..rounds() {
        for _ in 0..4 {
            let events = world.write(&site.db, OPERATIONS_PER_ROUND / 4).await;
            sidecar.post_events_until_accepted(&events).await;
        }
        assert_reads_exact(&sidecar, &world, &format!("{point} round {round}, before the crash")).await;

        let (path, body) = if point.starts_with("flush") {
            ("/v1/flush", json!(null))
        } else {
            ("/v1/reconcile", json!({ "user_ids": world.some_users(25) }))
        };
        let base = sidecar.base.clone();
        let trigger = tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{base}{path}"))
                .bearer_auth(common::sidecar::ADMIN_TOKEN)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        assert!(
            sidecar.reached_crash_point(Duration::from_secs(30)).await,
            "{point} round {round}: the crash point was never reached; stderr:\n{}",
            sidecar.stderr_text()
        );
        sidecar.kill();
        // The request dies with the process; it must not have been answered.
        assert!(trigger.await.unwrap().is_err(), "{point}: a request was answered by a killed process");
        // A dead process stops renewing the flush lock; expire it now instead of in 10 s.
        redis::cmd("DEL").arg(env.key("flush_lock")).exec(&mut env.redis()).unwrap();

        if round % 2 == 1 {
            // Every other time a clean process recovers what the dead one left, so the next
            // round kills a fresh flush or reconcile, not the same recovery again.
            let clean = Sidecar::start(&env, clean.clone()).await;
            assert_reads_exact(&clean, &world, &format!("{point} round {round}, after the crash")).await;
            clean.flush().await;
            assert_reads_exact(&clean, &world, &format!("{point} round {round}, after the recovery")).await;
        }
        sidecar = Sidecar::start(&env, crashing.clone()).await;
        assert_reads_exact(&sidecar, &world, &format!("{point} round {round}, right after the restart")).await;
    }
    drop(sidecar);
    redis::cmd("DEL").arg(env.key("flush_lock")).exec(&mut env.redis()).unwrap();

    let sidecar = Sidecar::start(&env, clean).await;
    sidecar.flush().await;
    let want = world.expected_counts();
    assert_eq!(env.true_counts().await, want, "the site's own record disagrees with its table");
    let stored = env.stored_counts().await;
    let wrong = wrong_users(&world.user_ids(), &stored, &want);
    assert!(
        wrong.is_empty(),
        "{point}: {} users stored wrong, e.g. (user, stored, true) {:?}",
        wrong.len(),
        &wrong[..1]
    );

    // A full reconcile after all that finds nothing to repair.
    let (status, report) = sidecar
        .admin_post("/v1/reconcile", json!({ "user_ids": world.user_ids() }), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["drift"], json!([]), "{point}: the reconcile found drift");
    assert_reads_exact(&sidecar, &world, &format!("{point}, at the end")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_handoff_loses_nothing() {
    crash_repeatedly_at(crash_point::FLUSH_AFTER_HANDOFF).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_the_database_writes_loses_nothing() {
    crash_repeatedly_at(crash_point::FLUSH_MID_WRITE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_commit_before_the_redis_clean_up_applies_nothing_twice() {
    crash_repeatedly_at(crash_point::FLUSH_AFTER_COMMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_reconcile_fenced_its_users_loses_nothing() {
    crash_repeatedly_at(crash_point::RECONCILE_AFTER_FENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_reconcile_read_the_table_loses_nothing() {
    crash_repeatedly_at(crash_point::RECONCILE_AFTER_RECOUNT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_reconcile_repaired_redis_loses_nothing() {
    crash_repeatedly_at(crash_point::RECONCILE_AFTER_REPAIR).await;
}

#[test]
fn every_crash_point_has_a_test() {
    let source = include_str!("crash.rs");
    for point in crash_point::ALL {
        let constant = format!("crash_point::{}", constant_name(point));
        assert!(source.contains(&constant), "no test kills the sidecar at {point}");
    }
}

fn constant_name(point: &str) -> String {
    point.to_uppercase().replace('-', "_")
}
