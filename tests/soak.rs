//! The soak test: steady load from several "Django workers" for a bounded time while faults hit
//! the service in turn (the sidecar SIGKILLed, SIGKILLed in the middle of a flush, its Redis
//! killed and restarted empty, its database connection cut), then a final flush and a count of
//! the users whose stored count differs from the Notification table. It must print 0. A second
//! test runs the same load while Redis goes back in time (restarted from a snapshot taken at a
//! random moment), loses everything (`FLUSHALL`) and restarts with AOF on; a third runs two
//! sidecar processes under random SIGKILL and SIGSTOP.
//!
//! `COUNTERSINK_SOAK_SECS` sets the load time (default 30; docs/testing.md has a longer run's
//! result), `COUNTERSINK_SOAK_SEED` replays a run's load:
//!
//! ```text
//! COUNTERSINK_SOAK_SECS=600 cargo test --release --test soak -- --nocapture
//! ```
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use support::proxy::Proxy;
use support::sidecar::{admin_post, post_until_accepted, Sidecar, SidecarOptions};
use support::world::{wrong_users, World};
use support::{free_port, OwnRedis, TestEnv};

const USERS: u64 = 2_000;
const WORKERS: u64 = 4;
const OPERATIONS_PER_REQUEST: usize = 40;
/// Time between faults.
const FAULT_EVERY: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillSidecar,
    KillSidecarDuringFlush,
    /// Redis killed and started again empty (no persistence).
    LoseRedis,
    CutDatabase,
    /// Redis killed and started again from a snapshot (`SAVE`) taken at a random moment since the
    /// last fault: it has lost the writes since, and comes back with an older state.
    RestartFromSnapshot,
    /// `FLUSHALL`: every key gone, the server still the same.
    FlushAll,
    /// The append-only file turned on (`appendfsync always`), then Redis killed and started again
    /// from it: nothing lost, but a new server all the same.
    RestartWithAof,
}

const FAULTS: [Fault; 4] = [Fault::KillSidecar, Fault::LoseRedis, Fault::KillSidecarDuringFlush, Fault::CutDatabase];

/// The faults of the Redis soak (issue #14): two restarts from a snapshot for each `FLUSHALL` and
/// each restart with AOF on.
const REDIS_FAULTS: [Fault; 4] =
    [Fault::RestartFromSnapshot, Fault::FlushAll, Fault::RestartFromSnapshot, Fault::RestartWithAof];

fn soak_secs() -> u64 {
    std::env::var("COUNTERSINK_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_load_with_periodic_faults_ends_with_zero_wrong_users() {
    let secs = soak_secs();
    println!("soak: {secs} s of load");
    let faults = soak(&FAULTS, false, |elapsed, _| elapsed >= Duration::from_secs(secs)).await;
    assert!(faults.len() as u64 >= secs / FAULT_EVERY.as_secs() / 2, "too few faults were injected");
}

/// Issue #14's target: 0 wrong users, stored and read, after restarts of Redis from a snapshot
/// taken at a random point of the load (each one a rollback the sidecar must notice and rebuild
/// from), `FLUSHALL`s and restarts with AOF on. `COUNTERSINK_SOAK_SNAPSHOT_ROUNDS` sets the
/// restarts from a snapshot (default 4; docs/testing.md has the 25-round run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarts_from_snapshots_flushall_and_aof_end_with_zero_wrong_users() {
    let rounds: usize =
        std::env::var("COUNTERSINK_SOAK_SNAPSHOT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    println!("soak (Redis): {rounds} restarts from a snapshot");
    let faults = soak(&REDIS_FAULTS, true, |_, faults| {
        faults.iter().filter(|f| **f == Fault::RestartFromSnapshot).count() >= rounds
    })
    .await;
    assert!(faults.contains(&Fault::FlushAll) && faults.contains(&Fault::RestartWithAof), "{faults:?}");
}

/// Runs the load with `faults` in turn, one every [`FAULT_EVERY`], until `enough` (given the time
/// since the load began and the faults so far) says so; then checks that no user is wrong, and
/// returns the faults injected. With `check_each_fault`, the load also pauses after each fault
/// (the workers finish the request they are sending) until the sidecar has recovered, and no user
/// may be wrong then either: a later fault's rebuild would otherwise hide an earlier one's damage.
async fn soak(
    fault_cycle: &[Fault],
    check_each_fault: bool,
    enough: impl Fn(Duration, &[Fault]) -> bool,
) -> Vec<Fault> {
    let seed: u64 =
        std::env::var("COUNTERSINK_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("soak: seed {seed} (COUNTERSINK_SOAK_SEED replays it)");

    let env = Arc::new(TestEnv::postgres_with_source().await);
    let redis_port = free_port();
    let snapshots = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start_with_snapshots(redis_port, snapshots.path());
    let proxy_address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = Proxy::start(proxy_address, "127.0.0.1:5432").await;
    let options = SidecarOptions {
        port: Some(free_port()),
        redis_url: Some(redis.url()),
        database_url: Some(proxy.url_through(&env.core.database_url)),
        // A SIGKILLed flusher's lock expires after 10 s (the shortest allowed).
        serve_args: vec!["--flush-lock-ttl-secs".into(), "10".into(), "--db-timeout-secs".into(), "2".into()],
        ..SidecarOptions::default()
    };
    let mut sidecar = Sidecar::start(&env, options.clone()).await;
    let base = sidecar.base.clone();

    // The workers: each writes the table and sends what its signals would, retrying on 503
    // and on no answer as the Django package does, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    // Each worker holds it for reading while it writes and sends; a check after a fault takes it
    // for writing, so the load pauses between requests.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let events_sent = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (env, stop, events_sent, base) = (env.clone(), stop.clone(), events_sent.clone(), base.clone());
        let gate = gate.clone();
        workers.push(tokio::spawn(async move {
            let site = env.state();
            let client = reqwest::Client::new();
            let mut world = World::new(seed.wrapping_add(worker), USERS, 1 + worker * 1_000_000_000);
            while !stop.load(Ordering::Relaxed) {
                let _turn = gate.read().await;
                let events = world.write(&site.db, OPERATIONS_PER_REQUEST).await;
                assert!(
                    post_until_accepted(&client, &base, &events, Duration::from_secs(120)).await,
                    "worker {worker}: events not accepted within 120 s"
                );
                events_sent.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
            world
        }));
    }

    // A reader, as page views are: every user's count is read again and again, so the counts
    // Redis holds are kept (and checked at the end) through every fault.
    let reader = tokio::spawn({
        let (stop, base) = (stop.clone(), base.clone());
        async move {
            let client = reqwest::Client::new();
            let ids = (1..=USERS).map(|u| u.to_string()).collect::<Vec<_>>();
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for chunk in ids.chunks(1_000) {
                    let url = format!("{base}/v1/unread-counts?user_ids={}", chunk.join(","));
                    let read = client.get(url).timeout(Duration::from_secs(5)).send().await;
                    answered += u64::from(read.is_ok_and(|r| r.status().is_success()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answered
        }
    });

    let started = Instant::now();
    let mut faults = Vec::new();
    while !enough(started.elapsed(), &faults) {
        let fault = fault_cycle[faults.len() % fault_cycle.len()];
        if fault == Fault::RestartFromSnapshot {
            let at = FAULT_EVERY.mul_f64(rand::random_range(0.0..1.0));
            tokio::time::sleep(at).await;
            redis.save();
            tokio::time::sleep(FAULT_EVERY - at).await;
        } else {
            tokio::time::sleep(FAULT_EVERY).await;
        }
        match fault {
            Fault::KillSidecar => {
                sidecar.kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                sidecar = Sidecar::start(&env, options.clone()).await;
            }
            Fault::KillSidecarDuringFlush => {
                let flush = tokio::spawn(admin_flush(base.clone()));
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..40))).await;
                sidecar.kill();
                let _ = flush.await;
                sidecar = Sidecar::start(&env, options.clone()).await;
            }
            Fault::LoseRedis => {
                // No persistence: a restarted Redis is empty, and the sidecar rebuilds from the table.
                redis.kill();
                tokio::time::sleep(Duration::from_millis(500)).await;
                redis = OwnRedis::start(redis_port);
            }
            Fault::RestartFromSnapshot => redis.restart_from_snapshot(),
            Fault::FlushAll => redis::cmd("FLUSHALL")
                .exec(&mut redis::Client::open(redis.url()).unwrap().get_connection().unwrap())
                .unwrap(),
            Fault::RestartWithAof => {
                redis.enable_aof();
                tokio::time::sleep(Duration::from_millis(500)).await;
                redis.restart();
            }
            Fault::CutDatabase => {
                proxy.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy = Proxy::start(proxy_address, "127.0.0.1:5432").await;
            }
        }
        println!("soak: {:>5.1} s  {fault:?}", started.elapsed().as_secs_f64());
        faults.push(fault);
        if check_each_fault {
            let _paused = gate.write().await;
            let (stored, read) = wrong_now(&env, &redis, &sidecar).await;
            println!("soak:          after it: wrong users {} stored, {} read", stored.len(), read.len());
            assert_no_wrong_users(seed, &stored, &read, &[]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut worlds = Vec::new();
    for worker in workers {
        worlds.push(worker.await.unwrap());
    }
    let reads_answered = reader.await.unwrap();

    let (wrong, read_wrong) = wrong_now(&env, &redis, &sidecar).await;
    let truth = env.true_counts().await;
    let users: Vec<u64> = (1..=USERS).collect();
    println!(
        "soak: {:.0} s, {} events from {WORKERS} workers, {} faults",
        started.elapsed().as_secs_f64(),
        events_sent.load(Ordering::Relaxed),
        faults.len()
    );
    println!(
        "soak: {} users checked, {} unread in all; wrong users: {} stored, {} read ({reads_answered} batch reads \
         answered during the load)",
        users.len(),
        truth.values().sum::<i64>(),
        wrong.len(),
        read_wrong.len()
    );
    assert_no_wrong_users(seed, &wrong, &read_wrong, &worlds);
    assert!(reads_answered > 0, "no read was answered during the load");
    faults
}

/// With nothing being sent: waits for the queued recounts (events a rebuild could not judge wait
/// for one, which the sidecar runs by itself) and a successful flush (after any lease a killed
/// flusher left expires), then gives the users whose stored count and whose read differ from the
/// Notification table, as `(user, counted, true)`.
async fn wrong_now(env: &TestEnv, redis: &OwnRedis, sidecar: &Sidecar) -> (Vec<(u64, i64, i64)>, Vec<(u64, i64, i64)>) {
    let mut redis_conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    wait_for_queued_recounts(env, &mut redis_conn, sidecar).await;
    final_flush(sidecar).await;
    let truth = env.true_counts().await;
    let stored = env.stored_counts().await;
    let users: Vec<u64> = (1..=USERS).collect();
    let read: HashMap<u64, i64> = sidecar.read_counts(&users).await.into_iter().collect();
    (wrong_users(&users, &stored, &truth), wrong_users(&users, &read, &truth))
}

/// Waits until no recount is queued or claimed (60 s at most).
async fn wait_for_queued_recounts(env: &TestEnv, redis: &mut redis::Connection, sidecar: &Sidecar) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = redis::cmd("SCARD").arg(env.key("recounts")).query(redis).unwrap_or(1);
        let claimed: i64 = redis::cmd("ZCARD").arg(env.key("recount_claims")).query(redis).unwrap_or(1);
        if waiting + claimed == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} recounts waiting and {claimed} claimed 60 s after the load\n{}",
            sidecar.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flushes through `sidecar` until a flush succeeds (60 s at most), and returns its report.
async fn final_flush(sidecar: &Sidecar) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match admin_flush(sidecar.base.clone()).await {
            Some((200, report)) => return report,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the final flush kept failing: {other:?}\n{}",
                    sidecar.stderr_text()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Prints up to five wrong users with what each worker did to them; asserts there are none.
fn assert_no_wrong_users(seed: u64, stored: &[(u64, i64, i64)], read: &[(u64, i64, i64)], worlds: &[World]) {
    for (user, stored, truth) in stored.iter().take(5) {
        println!("soak: user {user}: stored {stored}, true {truth}");
        for world in worlds {
            println!("{}", world.describe(*user));
        }
    }
    assert!(stored.is_empty(), "seed {seed}: e.g. (user, stored, true) {:?}", &stored[..stored.len().min(5)]);
    assert!(read.is_empty(), "seed {seed}: e.g. (user, read, true) {:?}", &read[..read.len().min(5)]);
}

async fn admin_flush(base: String) -> Option<(u16, serde_json::Value)> {
    admin_post(&reqwest::Client::new(), &base, "/v1/flush", serde_json::Value::Null, Duration::from_secs(30)).await
}

/// Sends one request to whichever of `bases` answers, trying them in turn with the same
/// `webhook-id` (the idempotency record is in the shared Redis), as a load balancer in front of
/// several sidecars would; whether it was accepted within `limit`.
async fn post_to_any(
    client: &reqwest::Client,
    bases: &[String],
    events: &[serde_json::Value],
    limit: Duration,
) -> bool {
    let webhook_id = support::sidecar::new_webhook_id();
    let deadline = Instant::now() + limit;
    let mut attempt = rand::random_range(0..bases.len());
    while Instant::now() < deadline {
        let base = &bases[attempt % bases.len()];
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            support::sidecar::post_signed(client, base, &webhook_id, events),
        )
        .await;
        match sent {
            Ok(Some((200, _))) => return true,
            Ok(Some((status, body))) if status != 503 => panic!("events refused: {status} {body}"),
            _ => attempt += 1,
        }
    }
    false
}

/// Two sidecar processes over one Redis and one database, both flushing every second with a
/// 3 s lease and recounting what the site's bulk updates ask for, while either is SIGKILLed
/// (and restarted) or SIGSTOPped for up to 6 s at random: a holder that stalls past its lease
/// must not corrupt anything, a dead one must not block the other, and no queued recount may be
/// lost. At the end: 0 users wrong, stored or read, and nothing left queued.
/// `COUNTERSINK_SOAK_SECS` sets the load time here too (default 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_under_random_sigkill_and_sigstop_end_with_zero_wrong_users() {
    let secs: u64 = std::env::var("COUNTERSINK_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let seed: u64 =
        std::env::var("COUNTERSINK_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("soak (two processes): {secs} s of load, seed {seed} (COUNTERSINK_SOAK_SEED replays it)");
    let env = Arc::new(TestEnv::postgres_with_source().await);
    let options = |port| SidecarOptions {
        port: Some(port),
        serve_args: vec!["--flush-lock-ttl-secs".into(), "3".into()],
        ..SidecarOptions::default()
    };
    let ports = [free_port(), free_port()];
    let mut sidecars =
        vec![Sidecar::start(&env, options(ports[0])).await, Sidecar::start(&env, options(ports[1])).await];
    let bases: Vec<String> = sidecars.iter().map(|s| s.base.clone()).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (events_sent, recounts_sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (env, stop, bases) = (env.clone(), stop.clone(), bases.clone());
        let (events_sent, recounts_sent) = (events_sent.clone(), recounts_sent.clone());
        workers.push(tokio::spawn(async move {
            let site = env.state();
            let client = reqwest::Client::new();
            let first_id = 1 + worker * 1_000_000_000;
            let mut world = World::new(seed.wrapping_add(worker), USERS, first_id);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(100 + worker));
            while !stop.load(Ordering::Relaxed) {
                let events = world.write(&site.db, OPERATIONS_PER_REQUEST).await;
                assert!(
                    post_to_any(&client, &bases, &events, Duration::from_secs(120)).await,
                    "worker {worker}: events not accepted within 120 s"
                );
                events_sent.fetch_add(events.len() as u64, Ordering::Relaxed);
                if rng.random_bool(0.2) {
                    // A bulk "mark all read" of this worker's notifications of one user, which
                    // sends no signal: only the recount that follows it makes the count right.
                    let user = rng.random_range(1..=USERS);
                    env.sql(&format!(
                        "UPDATE notifications_notification SET unread = FALSE \
                         WHERE recipient_id = {user} AND id >= {first_id} AND id < {}",
                        first_id + 1_000_000_000
                    ))
                    .await;
                    let recount = [serde_json::json!({"kind": "recount", "user_id": user})];
                    assert!(post_to_any(&client, &bases, &recount, Duration::from_secs(120)).await);
                    recounts_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            world
        }));
    }

    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults: Vec<String> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        let which = rng.random_range(0..2);
        // The first two faults are one of each kind, so every run (30 s gives about ten) tests
        // both; the rest are drawn at random.
        let coin = rng.random_bool(0.5);
        let kill = match faults.len() {
            0 => true,
            1 => false,
            _ => coin,
        };
        if kill {
            sidecars.remove(which).kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            sidecars.insert(which, Sidecar::start(&env, options(ports[which])).await);
            faults.push(format!("SIGKILL {which}"));
        } else {
            let pause = Duration::from_millis(rng.random_range(500..6_000));
            sidecars[which].signal("STOP");
            tokio::time::sleep(pause).await;
            sidecars[which].signal("CONT");
            faults.push(format!("SIGSTOP {which} for {:.1} s", pause.as_secs_f64()));
        }
        println!("soak (two processes): {:>5.1} s  {}", started.elapsed().as_secs_f64(), faults.last().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let mut worlds = Vec::new();
    for worker in workers {
        worlds.push(worker.await.unwrap());
    }

    // Every recount asked for runs, whichever process took it and whatever happened to it.
    wait_for_queued_recounts(&env, &mut env.redis(), &sidecars[0]).await;
    let report = final_flush(&sidecars[0]).await;
    let truth = env.true_counts().await;
    let stored = env.stored_counts().await;
    let users: Vec<u64> = (1..=USERS).collect();
    let wrong = wrong_users(&users, &stored, &truth);
    let read: HashMap<u64, i64> = sidecars[1].read_counts(&users).await.into_iter().collect();
    let read_wrong = wrong_users(&users, &read, &truth);
    println!(
        "soak (two processes): {secs} s, {} events and {} recounts from {WORKERS} workers, {} faults, final flush {report}",
        events_sent.load(Ordering::Relaxed),
        recounts_sent.load(Ordering::Relaxed),
        faults.len()
    );
    println!(
        "soak (two processes): {} users checked, {} unread in all; wrong users: {} stored, {} read; 0 recounts left",
        users.len(),
        truth.values().sum::<i64>(),
        wrong.len(),
        read_wrong.len()
    );
    assert_no_wrong_users(seed, &wrong, &read_wrong, &worlds);
    assert!(recounts_sent.load(Ordering::Relaxed) > 0, "no recount was asked for");
    assert!(faults.iter().any(|f| f.starts_with("SIGSTOP")) && faults.iter().any(|f| f.starts_with("SIGKILL")));
}
