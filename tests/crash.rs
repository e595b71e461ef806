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

use std::collections::HashMap;
use std::time::Duration;

use countersink::crash_point;
use serde_json::json;
use support::sidecar::{Sidecar, SidecarOptions};
use support::world::{wrong_users, World};
use support::TestEnv;

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
                .bearer_auth(support::sidecar::ADMIN_TOKEN)
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
async fn sigkill_between_the_truth_chunks_of_a_reconcile_loses_nothing() {
    crash_repeatedly_at(crash_point::RECONCILE_AFTER_TRUTH_CHUNK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_reconcile_repaired_redis_loses_nothing() {
    crash_repeatedly_at(crash_point::RECONCILE_AFTER_REPAIR).await;
}

/// Inserts unread notifications `ids` of `user` into the table and returns their creation events.
async fn create_unread(env: &TestEnv, user: u64, ids: std::ops::RangeInclusive<u64>) -> Vec<serde_json::Value> {
    let rows: Vec<String> = ids.clone().map(|id| format!("({id}, {user}, TRUE, FALSE)")).collect();
    env.sql(&format!(
        "INSERT INTO notifications_notification (id, recipient_id, unread, deleted) VALUES {}",
        rows.join(", ")
    ))
    .await;
    ids.map(|id| json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": true, "created": true}))
        .collect()
}

/// The first target: with the default lease, a process killed while it holds the lease
/// (here: mid-flush) blocks another process's flushes and recounts for at most two lease TTLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_lease_holder_is_killed_another_process_flushes_and_recounts_within_two_ttls() {
    let ttl = Duration::from_secs(countersink::config::DEFAULT_FLUSH_LOCK_TTL_SECS);
    assert!(ttl <= Duration::from_secs(15), "the default lease is at most 15 s");
    let env = TestEnv::postgres_with_source().await;
    let clean = SidecarOptions { flush_cron: "off".into(), ..SidecarOptions::default() };
    let holder =
        Sidecar::start(&env, SidecarOptions { crash_point: Some(crash_point::FLUSH_AFTER_HANDOFF), ..clean.clone() })
            .await;
    let other = Sidecar::start(&env, clean).await;
    holder.post_events_until_accepted(&create_unread(&env, 1, 1..=5).await).await;
    other.post_events_until_accepted(&create_unread(&env, 2, 6..=8).await).await;

    let base = holder.base.clone();
    tokio::spawn(async move {
        support::sidecar::admin_post(&reqwest::Client::new(), &base, "/v1/flush", json!(null), Duration::from_secs(60))
            .await
    });
    assert!(holder.reached_crash_point(Duration::from_secs(30)).await, "{}", holder.stderr_text());
    holder.kill();
    let killed = std::time::Instant::now();
    // Marked read by a bulk update, which only a recount notices.
    env.sql("UPDATE notifications_notification SET unread = FALSE WHERE recipient_id = 2").await;
    other.post_events_until_accepted(&[json!({"kind": "recount", "user_id": 2})]).await;

    let limit = 2 * ttl;
    let mut flushed = None;
    let mut recounted = None;
    while killed.elapsed() < limit && (flushed.is_none() || recounted.is_none()) {
        if recounted.is_none() && other.read_counts(&[2]).await == [(2, 0)] {
            recounted = Some(killed.elapsed());
        }
        if flushed.is_none() {
            let left = limit.saturating_sub(killed.elapsed()).max(Duration::from_millis(100));
            if let Some((200, _)) = other.admin_post("/v1/flush", json!(null), left).await {
                flushed = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stderr = other.stderr_text();
    assert!(flushed.is_some(), "no flush within {limit:?} of the kill; stderr:\n{stderr}");
    assert!(recounted.is_some(), "no recount within {limit:?} of the kill; stderr:\n{stderr}");
    println!("after the kill: flushed after {flushed:?}, recounted after {recounted:?} (lease {ttl:?})");
    // The batch the dead process handed off was recovered, once.
    assert_eq!(env.stored_counts().await, env.true_counts().await);
    assert_eq!(other.read_counts(&[1, 2]).await, [(1, 5), (2, 0)]);
}

/// The first reproduction: a reconcile that stalls (SIGSTOP) after reading the table,
/// until its lease expires and another process flushes, must not write its stale stored count
/// back when it wakes up (before: a permanent double count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_stalled_past_its_lease_changes_nothing_when_it_wakes_up() {
    let env = TestEnv::postgres_with_source().await;
    let resume = std::env::temp_dir().join(format!("countersink-resume-{:x}", rand::random::<u64>()));
    let short_lease = vec!["--flush-lock-ttl-secs".to_string(), "3".to_string()];
    let clean = SidecarOptions { flush_cron: "off".into(), serve_args: short_lease, ..SidecarOptions::default() };
    let stalling = Sidecar::start(
        &env,
        SidecarOptions {
            crash_point: Some(crash_point::RECONCILE_AFTER_RECOUNT),
            resume_file: Some(resume.clone()),
            ..clean.clone()
        },
    )
    .await;
    let other = Sidecar::start(&env, clean).await;
    other.post_events_until_accepted(&create_unread(&env, 7, 1..=1).await).await;
    other.flush().await;

    let base = stalling.base.clone();
    let reconcile = tokio::spawn(async move {
        let body = json!({ "user_ids": [7] });
        support::sidecar::admin_post(&reqwest::Client::new(), &base, "/v1/reconcile", body, Duration::from_secs(60))
            .await
    });
    assert!(stalling.reached_crash_point(Duration::from_secs(30)).await, "{}", stalling.stderr_text());
    // It read the table (1 unread) and the stored count (1); now it stalls, renewals and all.
    stalling.signal("STOP");
    std::fs::write(&resume, b"").unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Meanwhile a second notification arrives and another process flushes it under the lease.
    other.post_events_until_accepted(&create_unread(&env, 7, 2..=2).await).await;
    other.flush().await;
    assert_eq!(env.stored_counts().await.get(&7), Some(&2));

    stalling.signal("CONT");
    let (status, body) = reconcile.await.unwrap().expect("the stalled reconcile answers once it wakes up");
    let _ = std::fs::remove_file(&resume);
    assert_eq!(status, 409, "the stale reconcile must be refused: {body}");
    assert!(body.to_string().contains("lease"), "{body}");
    assert_eq!(other.read_counts(&[7]).await, [(7, 2)], "the stale repair was written");
    other.flush().await;
    assert_eq!(env.stored_counts().await, env.true_counts().await);
    let (status, report) =
        other.admin_post("/v1/reconcile", json!({ "user_ids": [7] }), Duration::from_secs(30)).await.unwrap();
    assert_eq!((status, &report["drift"]), (200, &json!([])), "{report}");
    drop(stalling);
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
