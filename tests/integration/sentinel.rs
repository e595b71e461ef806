//! Redis Sentinel (issue #16): the sidecar finds the master by name through Sentinel and follows
//! a failover without a restart; events during it answer 503 and are accepted once a master is
//! found again, and no user's count is wrong afterwards (a promoted replica does not vouch for
//! the state, so what it lacks is rebuilt from the Notification table, as after a restart).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use support::sentinel::SentinelSetup;
use support::sidecar::{new_webhook_id, post_signed, Sidecar, SidecarOptions};
use support::world::{wrong_users, World};
use support::{eventually_async, TestEnv};

const USERS: u64 = 200;
const OPERATIONS: usize = 150;

async fn reads_served(sidecar: &Sidecar) -> bool {
    let ready = reqwest::get(format!("{}/readyz", sidecar.base)).await.is_ok_and(|r| r.status() == 200);
    let read = reqwest::get(format!("{}/v1/unread-counts?user_ids=1", sidecar.base)).await;
    ready && read.is_ok_and(|r| r.status() == 200)
}

/// Posts `events` as the Django package does, retrying a 503 (and a lost answer) with the same
/// webhook-id for up to a minute; any other answer fails the test with the sidecar's log.
async fn post_until_accepted(sidecar: &Sidecar, events: &[Value], round: usize) {
    let client = reqwest::Client::new();
    let webhook_id = new_webhook_id();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match post_signed(&client, &sidecar.base, &webhook_id, events).await {
            Some((200, _)) => return,
            Some((status, body)) if status != 503 => {
                panic!("round {round}: events refused: {status} {body}\n{}", sidecar.stderr_text())
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("round {round}: events were not accepted within 60 s:\n{}", sidecar.stderr_text());
}

/// How the master goes away.
#[derive(Debug, Clone, Copy)]
enum Failover {
    /// SIGKILL: Sentinel promotes the replica a second later.
    MasterKilled,
    /// `SENTINEL FAILOVER`: the master is demoted to a replica of the promoted one and answers
    /// writes with `READONLY`.
    Requested,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_is_followed_without_a_restart_and_leaves_no_user_wrong() {
    failover_under_load(Failover::MasterKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_failover_is_followed_away_from_the_demoted_master() {
    failover_under_load(Failover::Requested).await;
}

/// Options for a sidecar that finds the master through the Sentinels `sentinels` (addresses or
/// URLs) only, under the set-up's master name `master`.
fn through_sentinels(sentinels: String, master: &str) -> SidecarOptions {
    SidecarOptions {
        flush_cron: "off".into(),
        // Nothing listens there: the master can only be found through Sentinel.
        redis_url: Some("redis://127.0.0.1:1".into()),
        serve_args: vec!["--redis-sentinels".into(), sentinels, "--redis-sentinel-master".into(), master.into()],
        ..SidecarOptions::default()
    }
}

/// Events in rounds, a flush, then the failover between two requests with deltas pending, more
/// rounds (retried through the 503s), and every user's count read and stored checked.
async fn failover_under_load(failover: Failover) {
    let seed: u64 = rand::random();
    println!("{failover:?}: seed {seed}");
    let env = TestEnv::postgres_with_source().await;
    let mut redis = SentinelSetup::start();
    let sidecar = Sidecar::start(&env, through_sentinels(redis.addresses(), &redis.master_name)).await;
    rounds_across_a_failover(&env, &sidecar, seed, async || match failover {
        Failover::MasterKilled => redis.kill_master(),
        Failover::Requested => {
            redis.request_failover();
            // The next write goes to the demoted master, still up: it must be left.
            let demoted = eventually_async(Duration::from_secs(30), || async {
                redis.master_port_now() == Some(redis.replica_port) && redis.old_master_is_a_replica()
            })
            .await;
            assert!(demoted, "Sentinel did not swap the master and the replica");
        }
    })
    .await;
    assert_eq!(redis.master_port_now(), Some(redis.replica_port), "Sentinel did not promote the replica");
}

/// Once the first bootstrap is done: events in 8 rounds, a flush after the second, `fail_over`
/// before the fifth, every event retried through the 503s until accepted; then every user's count
/// read and stored must be the table's, and the sidecar must have found a second master after
/// noticing the first one fail.
pub(crate) async fn rounds_across_a_failover(
    env: &TestEnv,
    sidecar: &Sidecar,
    seed: u64,
    fail_over: impl AsyncFnOnce(),
) {
    assert!(
        eventually_async(Duration::from_secs(30), || reads_served(sidecar)).await,
        "the first bootstrap did not finish:\n{}",
        sidecar.stderr_text()
    );
    let site = env.state();
    let mut world = World::new(seed, USERS, 1);
    let mut fail_over = Some(fail_over);
    for round in 0..8 {
        if round == 2 {
            sidecar.flush().await;
        }
        if round == 4 {
            if let Some(fail_over) = fail_over.take() {
                fail_over().await;
            }
        }
        let events: Vec<Value> = world.write(&site.db, OPERATIONS).await;
        for chunk in events.chunks(50) {
            post_until_accepted(sidecar, chunk, round).await;
        }
    }
    assert!(
        eventually_async(Duration::from_secs(60), || reads_served(sidecar)).await,
        "reads were not served again after the failover:\n{}",
        sidecar.stderr_text()
    );
    let want = world.expected_counts();
    let read: HashMap<u64, i64> = sidecar.read_counts(&world.user_ids()).await.into_iter().collect();
    let wrong = wrong_users(&world.user_ids(), &read, &want);
    assert!(wrong.is_empty(), "{} users read wrong, e.g. (user, read, true) {:?}", wrong.len(), &wrong[..1]);
    sidecar.flush().await;
    let stored = env.stored_counts().await;
    let wrong = wrong_users(&world.user_ids(), &stored, &want);
    assert!(wrong.is_empty(), "{} users stored wrong, e.g. (user, stored, true) {:?}", wrong.len(), &wrong[..1]);
    let metrics = reqwest::get(format!("{}/metrics", sidecar.base)).await.unwrap().text().await.unwrap();
    let found: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("countersink_redis_masters_found_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no countersink_redis_masters_found_total in\n{metrics}"));
    assert!(found >= 2, "{found} masters found: the first and the promoted replica at least");
    assert!(
        sidecar.stderr_text().contains("asking for the master again"),
        "the failover was not noticed as one:\n{}",
        sidecar.stderr_text()
    );
}

/// With no Sentinel answering (one takes connections and never replies, as a hung host does), the
/// sidecar still starts, and concurrent events and reads are all answered 503 within the one
/// question's timeout: the commands behind it take its failure rather than each waiting 2 s for
/// its own question in turn (without that, one of 20 concurrent requests went unanswered and the
/// test took 11.6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_sentinel_answering_requests_are_answered_503_without_queueing() {
    let env = TestEnv::postgres().await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let options = SidecarOptions {
        flush_cron: "off".into(),
        serve_args: vec![
            "--redis-sentinels".into(),
            silent.local_addr().unwrap().to_string(),
            "--redis-sentinel-master".into(),
            "countersink-test".into(),
        ],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&env, options).await;
    let started = std::time::Instant::now();
    let requests = (0..20u64).map(|user| {
        let base = sidecar.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            if user % 2 == 0 {
                let event = serde_json::json!({"kind": "post_save", "notification_id": user, "user_id": user, "unread": true, "created": true});
                post_signed(&client, &base, &new_webhook_id(), &[event]).await.map(|(status, _)| status)
            } else {
                let read = client.get(format!("{base}/v1/users/{user}/unread-count")).send().await;
                read.ok().map(|r| r.status().as_u16())
            }
        })
    });
    for request in requests.collect::<Vec<_>>() {
        assert_eq!(request.await.unwrap(), Some(503));
    }
    assert!(started.elapsed() < Duration::from_secs(6), "all answered after {:?}", started.elapsed());
    drop(silent);
}

/// `--redis-wait-replicas 1`: an event request is answered 200 only once a replica holds what it
/// changed. With the replica gone it is answered 503 (applied on the master alone, where a
/// failover would lose it), and its retry, with the same `webhook-id`, is answered 200 as replayed
/// once a replica has caught up. Before, the request was answered 200 with no replica at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_an_event_is_acknowledged_only_once_a_replica_holds_it() {
    let env = TestEnv::postgres().await;
    let mut redis = SentinelSetup::start();
    let options = SidecarOptions {
        flush_cron: "off".into(),
        redis_url: Some(format!("redis://127.0.0.1:{}", redis.master_port)),
        serve_args: vec!["--redis-wait-replicas".into(), "1".into(), "--redis-wait-timeout-ms".into(), "300".into()],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&env, options).await;
    let client = reqwest::Client::new();
    let event = |id: u64| serde_json::json!({"kind": "post_save", "notification_id": id, "user_id": 7, "unread": true, "created": true});
    post_until_accepted(&sidecar, &[event(1)], 0).await;

    redis.kill_replica();
    let webhook_id = new_webhook_id();
    let started = std::time::Instant::now();
    let answer = post_signed(&client, &sidecar.base, &webhook_id, &[event(2)]).await;
    assert_eq!(answer.as_ref().map(|(status, _)| *status), Some(503), "{answer:?}\n{}", sidecar.stderr_text());
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());

    redis.restart_replica();
    let body = post_until_answered(&sidecar, &webhook_id, &[event(2)]).await;
    assert_eq!(body["replayed"], serde_json::json!(true), "{body}");
    assert_eq!(sidecar.read_counts(&[7]).await, vec![(7, 2)]);
}

/// A retry that reaches another sidecar process (a connection that never wrote the first
/// delivery) is not acknowledged while the replica lags: `WAIT` on a connection that wrote
/// nothing would count the stopped replica at once, so the replay must write. (A review feared it
/// did not; it passed before the replay's explicit rewrite of its record too, so this holds the
/// behaviour rather than reproducing a bug.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_replay_through_another_process_waits_for_the_replica_too() {
    let env = TestEnv::postgres().await;
    let redis = SentinelSetup::start();
    let options = SidecarOptions {
        flush_cron: "off".into(),
        redis_url: Some(format!("redis://127.0.0.1:{}", redis.master_port)),
        serve_args: vec!["--redis-wait-replicas".into(), "1".into(), "--redis-wait-timeout-ms".into(), "300".into()],
        ..SidecarOptions::default()
    };
    let first = Sidecar::start(&env, options.clone()).await;
    let client = reqwest::Client::new();
    let event =
        serde_json::json!({"kind": "post_save", "notification_id": 1, "user_id": 7, "unread": true, "created": true});
    post_until_accepted(&first, &[serde_json::json!({"kind": "post_save", "notification_id": 2, "user_id": 8, "unread": true, "created": true})], 0).await;

    // Stopped, the replica stays connected but takes nothing more.
    redis.pause_replica();
    let webhook_id = new_webhook_id();
    let answer = post_signed(&client, &first.base, &webhook_id, std::slice::from_ref(&event)).await;
    assert_eq!(answer.as_ref().map(|(status, _)| *status), Some(503), "{answer:?}");
    let second = Sidecar::start(&env, options).await;
    let answer = post_signed(&client, &second.base, &webhook_id, std::slice::from_ref(&event)).await;
    assert_eq!(
        answer.as_ref().map(|(status, _)| *status),
        Some(503),
        "a replay acknowledged that no replica had: {answer:?}"
    );

    redis.resume_replica();
    let body = post_until_answered(&second, &webhook_id, std::slice::from_ref(&event)).await;
    assert_eq!(body["replayed"], serde_json::json!(true), "{body}");
}

/// Posts `events` under `webhook_id` until answered 200 (a replica may take a moment to catch
/// up after a resync); the answer's body.
async fn post_until_answered(sidecar: &Sidecar, webhook_id: &str, events: &[Value]) -> Value {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match post_signed(&client, &sidecar.base, webhook_id, events).await {
            Some((200, body)) => return body,
            Some((503, _)) | None if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("not accepted: {other:?}\n{}", sidecar.stderr_text()),
        }
    }
}

/// Issue #16: Sentinels that require a password (`requirepass`) are reached with the one in
/// their URLs (`--redis-sentinels redis://:password@host:port,...`); a client without it is
/// refused, so the sidecar's reads served prove it used it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_require_a_password_are_reached_with_the_one_in_their_urls() {
    let env = TestEnv::postgres_with_source().await;
    let redis = SentinelSetup::start_with_password("sentinel-secret");
    let mut plain = redis::Client::open(format!("redis://127.0.0.1:{}", redis.sentinel_ports[0]))
        .unwrap()
        .get_connection()
        .unwrap();
    let refused = redis::cmd("SENTINEL").arg("masters").query::<redis::Value>(&mut plain);
    assert!(refused.is_err(), "a Sentinel answered without its password: {refused:?}");
    let sidecar = Sidecar::start(&env, through_sentinels(redis.urls(), &redis.master_name)).await;
    assert!(
        eventually_async(Duration::from_secs(30), || reads_served(&sidecar)).await,
        "the master was not found through the Sentinels:\n{}",
        sidecar.stderr_text()
    );
}
