//! The real binary, end to end: a random stream of 100,000+ events for 1,000 users, with
//! duplicates, late retries of creations and concurrent double mark-as-read, sent by several
//! concurrent senders while scheduled and on-demand flushes run. At the end, every user's
//! stored count must equal the count computed from the final state of the notifications. Also the
//! group commit: concurrent requests share script calls and each gets its own answer, and a
//! failed shared call answers each of its requests 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::sidecar::{Sidecar, SidecarOptions, ADMIN_TOKEN};
use support::TestEnv;

const USERS: u64 = 1_000;
const BASE_EVENTS: usize = 100_000;
const LANES: usize = 8;
const MAX_BATCH: usize = 100;

#[derive(Clone, Copy, PartialEq)]
enum State {
    Read,
    Unread,
    Deleted,
}

/// Each notification's recipient and final state.
type Truth = HashMap<u64, (u64, State)>;

/// One request a lane sends, and whether a concurrent duplicate of its last event races it.
struct Request {
    events: Vec<Value>,
    race_last: bool,
}

/// Builds the stream: per lane, the requests in order. Each notification belongs to one lane,
/// so its events keep their order, as Django's on-commit hooks send them.
fn build_stream(rng: &mut StdRng) -> (Vec<Vec<Request>>, Truth) {
    let mut truth = Truth::new();
    let mut live: Vec<u64> = Vec::new();
    let mut lanes: Vec<Vec<(Value, bool)>> = (0..LANES).map(|_| Vec::new()).collect();
    let mut late_retries: Vec<Vec<Value>> = (0..LANES).map(|_| Vec::new()).collect();
    let mut next_id = 1u64;
    for _ in 0..BASE_EVENTS {
        let (id, event, race) = if live.is_empty() || rng.random_bool(0.4) {
            let (id, user, unread) = (next_id, rng.random_range(1..=USERS), rng.random_bool(0.9));
            next_id += 1;
            live.push(id);
            truth.insert(id, (user, if unread { State::Unread } else { State::Read }));
            let event =
                json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": unread, "created": true});
            if rng.random_bool(0.05) {
                late_retries[id as usize % LANES].push(event.clone());
            }
            (id, event, false)
        } else {
            let slot = rng.random_range(0..live.len());
            let id = live[slot];
            let (user, _) = truth[&id];
            match rng.random_range(0..10) {
                0..=4 => {
                    truth.insert(id, (user, State::Read));
                    let event = json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": false});
                    (id, event, rng.random_bool(0.2))
                }
                5..=7 => {
                    truth.insert(id, (user, State::Unread));
                    (id, json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": true}), false)
                }
                _ => {
                    truth.insert(id, (user, State::Deleted));
                    live.swap_remove(slot);
                    (id, json!({"kind": "post_delete", "notification_id": id, "user_id": user}), false)
                }
            }
        };
        let lane = &mut lanes[id as usize % LANES];
        lane.push((event.clone(), race));
        if rng.random_bool(0.05) {
            // An immediate retry, before any newer event of that notification.
            lane.push((event, false));
        }
        // Late retries of creations land long after newer events of the same notification.
        let retries = &mut late_retries[id as usize % LANES];
        if retries.len() > 20 && rng.random_bool(0.1) {
            lane.extend(retries.drain(..).map(|event| (event, false)));
        }
    }
    for (lane, retries) in lanes.iter_mut().zip(late_retries) {
        lane.extend(retries.into_iter().map(|event| (event, false)));
    }
    let requests = lanes
        .into_iter()
        .map(|events| {
            let mut requests = Vec::new();
            let mut current = Vec::new();
            for (event, race) in events {
                current.push(event);
                // A raced mark-as-read ends its request, so the duplicate races nothing newer.
                if race || current.len() == MAX_BATCH || rng.random_bool(0.02) {
                    requests.push(Request { events: std::mem::take(&mut current), race_last: race });
                }
            }
            if !current.is_empty() {
                requests.push(Request { events: current, race_last: false });
            }
            requests
        })
        .collect();
    (requests, truth)
}

/// Posts events signed as the Django package signs them; they must be accepted.
async fn post_events(sidecar: &Sidecar, events: &[Value]) {
    match sidecar.post_events(events).await {
        Some((200, _)) => {}
        other => panic!("events not accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_stream_with_retries_and_races_ends_with_exact_stored_counts() {
    let seed: u64 =
        std::env::var("COUNTERSINK_E2E_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (set COUNTERSINK_E2E_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let (lanes, truth) = build_stream(&mut rng);
    let total: usize = lanes.iter().flatten().map(|r| r.events.len() + usize::from(r.race_last)).sum();
    assert!(total >= BASE_EVENTS);

    // PostgreSQL in CI (the stream takes half a minute); COUNTERSINK_E2E_BACKEND=mysql or sqlite
    // runs the same stream on another backend.
    let env = match std::env::var("COUNTERSINK_E2E_BACKEND").as_deref() {
        Ok("mysql") => TestEnv::mysql().await,
        Ok("sqlite") => TestEnv::sqlite().await,
        _ => TestEnv::postgres().await,
    };
    println!("backend {:?}", env.backend());
    let sidecar = Arc::new(Sidecar::start(&env, SidecarOptions::default()).await);
    let client = reqwest::Client::new();

    // On-demand flushes beside the scheduled one.
    let streaming = Arc::new(AtomicBool::new(true));
    let flusher = {
        let (client, base, streaming) = (client.clone(), sidecar.base.clone(), streaming.clone());
        tokio::spawn(async move {
            let mut flushes = 0;
            while streaming.load(Ordering::Relaxed) {
                let response = client.post(format!("{base}/v1/flush")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                flushes += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            flushes
        })
    };
    let mut senders = Vec::new();
    for requests in lanes {
        let sidecar = sidecar.clone();
        senders.push(tokio::spawn(async move {
            for request in requests {
                if request.race_last {
                    let duplicate = vec![request.events[request.events.len() - 1].clone()];
                    tokio::join!(post_events(&sidecar, &request.events), post_events(&sidecar, &duplicate));
                } else {
                    post_events(&sidecar, &request.events).await;
                }
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    streaming.store(false, Ordering::Relaxed);
    assert!(flusher.await.unwrap() > 0);
    let response = client.post(format!("{}/v1/flush", sidecar.base)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert!(response.status().is_success());

    let mut want: HashMap<i64, i64> = HashMap::new();
    for (user, state) in truth.values() {
        if *state == State::Unread {
            *want.entry(*user as i64).or_default() += 1;
        }
    }
    let stored: HashMap<i64, i64> = env.stored_counts().await.into_iter().map(|(u, n)| (u as i64, n)).collect();
    let wrong: Vec<_> = (1..=USERS as i64)
        .filter(|u| stored.get(u) != want.get(u))
        .map(|u| (u, stored.get(&u).copied(), want.get(&u).copied()))
        .collect();
    assert!(
        wrong.is_empty(),
        "seed {seed}: {} users wrong, e.g. (user, stored, true): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    // The read API agrees.
    let users: Vec<u64> = (1..=USERS).collect();
    for entry in sidecar.read_entries(&users).await {
        let user = entry["user_id"].as_i64().unwrap();
        assert_eq!(entry["unread_count"].as_i64(), Some(want.get(&user).copied().unwrap_or(0)), "user {user}");
    }
    println!("{total} events, {} users checked", USERS);
}

/// A counter from the sidecar's `/metrics` (no read token is set).
async fn metric(sidecar: &Sidecar, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", sidecar.base)).await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Issue #12's group commit: concurrent single-event requests share script calls (one call in
/// flight, so all that arrive meanwhile wait for the next), and each is still answered with its
/// own outcome. Every request is sent twice at once under its `webhook-id`: one copy applies, the
/// other is a replay with the same answer, whether the two share a call or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_script_calls_and_each_gets_its_own_answer() {
    // Sent twice each: under the 256 requests a sidecar handles at once.
    const REQUESTS: u64 = 120;
    let env = TestEnv::sqlite().await;
    let options = SidecarOptions {
        flush_cron: "off".into(),
        serve_args: vec!["--apply-calls-in-flight".into(), "1".into()],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&env, options).await;
    let client = reqwest::Client::new();
    let mut sends = Vec::new();
    for n in 1..=REQUESTS {
        // Notification n of user n % 10: unread, except every fifth, created read.
        let event = [
            json!({"kind": "post_save", "notification_id": n, "user_id": n % 10, "unread": n % 5 != 0, "created": true}),
        ];
        let id = support::sidecar::new_webhook_id();
        for _ in 0..2 {
            let (client, base, id, event) = (client.clone(), sidecar.base.clone(), id.clone(), event.clone());
            sends.push(tokio::spawn(async move {
                (n, support::sidecar::post_signed(&client, &base, &id, &event).await.unwrap())
            }));
        }
    }
    let mut answers: HashMap<u64, Vec<Value>> = HashMap::new();
    for send in sends {
        let (n, (status, body)) = send.await.unwrap();
        assert_eq!(status, 200, "{body}");
        answers.entry(n).or_default().push(body);
    }
    for (n, pair) in &answers {
        let (changed, recorded) = if n % 5 != 0 { (1, 0) } else { (0, 1) };
        let replays = pair.iter().filter(|a| a["replayed"] == json!(true)).count();
        assert_eq!(replays, 1, "request {n}: {pair:?}");
        for answer in pair {
            assert_eq!(
                (&answer["outcomes"]["changed"], &answer["outcomes"]["recorded"]),
                (&json!(changed), &json!(recorded)),
                "request {n}: {pair:?}"
            );
        }
    }
    let expected: Vec<(u64, i64)> =
        (0..10).map(|user| (user, (1..=REQUESTS).filter(|n| n % 10 == user && n % 5 != 0).count() as i64)).collect();
    assert_eq!(sidecar.read_counts(&(0..10).collect::<Vec<_>>()).await, expected);
    let (calls, requests) = (
        metric(&sidecar, "countersink_apply_calls_total").await,
        metric(&sidecar, "countersink_apply_requests_total").await,
    );
    println!("{requests} requests in {calls} script calls");
    assert_eq!(requests, 2 * REQUESTS);
    assert!(calls < requests, "no request shared a call: {calls} calls for {requests} requests");
}

/// When a shared call fails, every request in it is answered with the failure (503, retry), and
/// none is answered as applied: here Redis is gone while 100 requests wait on one call in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shared_call_answers_each_of_its_requests_unavailable() {
    let mut redis = support::OwnRedis::start(support::free_port());
    let env = TestEnv::sqlite().await;
    let options = SidecarOptions {
        flush_cron: "off".into(),
        serve_args: vec!["--apply-calls-in-flight".into(), "1".into()],
        redis_url: Some(redis.url()),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&env, options).await;
    let event = |n: u64| {
        vec![json!({"kind": "post_save", "notification_id": n, "user_id": 1, "unread": true, "created": true})]
    };
    assert_eq!(sidecar.post_events(&event(1_000)).await.map(|(status, _)| status), Some(200));
    redis.kill();
    let client = reqwest::Client::new();
    let sends: Vec<_> = (1..=100u64)
        .map(|n| {
            let (client, base, events) = (client.clone(), sidecar.base.clone(), event(n));
            tokio::spawn(async move {
                support::sidecar::post_signed(&client, &base, &support::sidecar::new_webhook_id(), &events).await
            })
        })
        .collect();
    for send in sends {
        let (status, body) = send.await.unwrap().expect("every request is answered");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    let (calls, requests) = (
        metric(&sidecar, "countersink_apply_calls_total").await,
        metric(&sidecar, "countersink_apply_requests_total").await,
    );
    println!("{requests} requests in {calls} script calls");
    assert!(calls < requests, "no request shared a call: {calls} calls for {requests} requests");
}
