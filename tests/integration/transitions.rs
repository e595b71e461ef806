//! The per-notification state machine, against the real Redis: each event changes a count
//! only on a real transition, however it is repeated, raced or reordered (proptests over event
//! sequences); a request of thousands of events, and a group commit, count as the events one by
//! one; the apply script writes the state codes Rust reads.

use countersink::app::AppState;
use countersink::events::{Event, MAX_ID};
use proptest::prelude::*;
use support::TestEnv;

async fn count(state: &AppState, user: u64) -> i64 {
    state.reader.unread_counts(&[user]).await.unwrap()[0].unread_count
}

async fn apply(state: &AppState, events: &[Event]) -> countersink::store::ApplyOutcome {
    state.store.apply(events).await.unwrap()
}

#[tokio::test]
async fn duplicate_event_is_counted_once() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let create = Event::save(1, 10, true, true);
    apply(&state, std::slice::from_ref(&create)).await;
    apply(&state, std::slice::from_ref(&create)).await;
    assert_eq!(count(&state, 10).await, 1, "delivered twice");

    let mark_read = Event::save(2, 11, false, false);
    apply(&state, &[Event::save(2, 11, true, true)]).await;
    for _ in 0..10 {
        apply(&state, std::slice::from_ref(&mark_read)).await;
    }
    assert_eq!(count(&state, 11).await, 0, "a mark-as-read delivered ten times");

    // Duplicates inside one batch are no-ops too, and are reported as such.
    let outcome = apply(&state, &vec![Event::save(3, 12, true, true); 10]).await;
    assert_eq!((outcome.changed, outcome.noops()), (1, 9));
    assert_eq!(count(&state, 12).await, 1);
}

#[tokio::test]
async fn concurrent_double_mark_as_read_decrements_once() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let user = 20;
    let notifications: Vec<u64> = (1..=200).collect();
    let creates: Vec<Event> = notifications.iter().map(|n| Event::save(*n, user, true, true)).collect();
    apply(&state, &creates).await;
    assert_eq!(count(&state, user).await, 200);

    // Two requests mark each notification read at the same moment.
    let mut racers = Vec::new();
    for n in &notifications {
        for _ in 0..2 {
            let store = state.store.clone();
            let event = Event::save(*n, user, false, false);
            racers.push(tokio::spawn(async move { store.apply(&[event]).await.unwrap().changed }));
        }
    }
    let mut changed = 0;
    for racer in racers {
        changed += racer.await.unwrap();
    }
    assert_eq!(changed, 200, "exactly one of each pair changed the count");
    assert_eq!(count(&state, user).await, 0);
}

#[tokio::test]
async fn lifecycle_transitions_change_the_count_by_exactly_one() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let user = 30;
    let steps: [(&str, Event, i64); 7] = [
        ("create unread", Event::save(1, user, true, true), 1),
        ("mark read", Event::save(1, user, false, false), 0),
        ("mark unread again", Event::save(1, user, true, false), 1),
        ("delete unread", Event::delete(1, user), 0),
        ("save after delete", Event::save(1, user, true, false), 0),
        ("create read", Event::save(2, user, false, true), 0),
        ("delete read", Event::delete(2, user), 0),
    ];
    for (what, event, expected) in steps {
        apply(&state, &[event]).await;
        assert_eq!(count(&state, user).await, expected, "after {what}");
    }
}

#[tokio::test]
async fn deleted_notification_never_comes_back() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    apply(&state, &[Event::save(5, 31, true, true), Event::delete(5, 31)]).await;
    let outcome =
        apply(&state, &[Event::save(5, 31, true, true), Event::save(5, 31, true, false), Event::delete(5, 31)]).await;
    assert_eq!((outcome.changed, outcome.after_delete, outcome.duplicate), (0, 2, 1));
    assert_eq!(count(&state, 31).await, 0);
}

#[tokio::test]
async fn late_creation_retry_does_not_undo_a_newer_state() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let create = Event::save(7, 40, true, true);
    apply(&state, &[create.clone(), Event::save(7, 40, false, false)]).await;
    // The sender's retry of the creation arrives after the mark-as-read.
    let outcome = apply(&state, &[create]).await;
    assert_eq!(outcome.stale, 1);
    assert_eq!(count(&state, 40).await, 0);

    // A mark-as-read that overtakes its creation: the creation arrives stale, the count stays right.
    apply(&state, &[Event::save(8, 40, false, false)]).await;
    apply(&state, &[Event::save(8, 40, true, true)]).await;
    assert_eq!(count(&state, 40).await, 0);
}

#[tokio::test]
async fn extreme_ids_are_tracked() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    apply(&state, &[Event::save(MAX_ID, MAX_ID, true, true), Event::save(0, MAX_ID, true, true)]).await;
    assert_eq!(count(&state, MAX_ID).await, 2);
    apply(&state, &[Event::delete(MAX_ID, MAX_ID)]).await;
    assert_eq!(count(&state, MAX_ID).await, 1);
}

/// One step of a notification's life, as the sender could deliver it.
#[derive(Debug, Clone)]
enum Step {
    Create { unread: bool },
    Save { unread: bool },
    Delete,
}

fn step() -> impl Strategy<Value = (u64, u64, Step)> {
    let kind = prop_oneof![
        any::<bool>().prop_map(|unread| Step::Create { unread }),
        any::<bool>().prop_map(|unread| Step::Save { unread }),
        Just(Step::Delete),
    ];
    // Few notifications and users, so sequences revisit them often.
    (0u64..12, kind).prop_map(|(notification, kind)| (notification, notification % 3, kind))
}

/// The reference model: the state of each notification under the documented rules.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Unseen,
    Read,
    Unread,
    Deleted,
}

fn model_next(state: Model, step: &Step) -> Model {
    match (state, step) {
        (Model::Deleted, _) => Model::Deleted,
        (_, Step::Delete) => Model::Deleted,
        (Model::Unseen, Step::Create { unread }) | (_, Step::Save { unread }) => {
            if *unread {
                Model::Unread
            } else {
                Model::Read
            }
        }
        (seen, Step::Create { .. }) => seen,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Invariant: after any sequence of events, split into any batches, every user's count
    /// equals the number of that user's notifications the model holds as unread, and so is
    /// never below zero.
    #[test]
    fn no_sequence_of_events_drives_a_count_below_zero(
        steps in proptest::collection::vec(step(), 1..60),
        batch in 1usize..8,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let env = TestEnv::sqlite().await;
            let state = env.state();
            let mut model = [Model::Unseen; 12];
            let events: Vec<Event> = steps.iter().map(|(n, user, step)| {
                model[*n as usize] = model_next(model[*n as usize], step);
                match step {
                    Step::Create { unread } => Event::save(*n, *user, *unread, true),
                    Step::Save { unread } => Event::save(*n, *user, *unread, false),
                    Step::Delete => Event::delete(*n, *user),
                }
            }).collect();
            for chunk in events.chunks(batch) {
                apply(&state, chunk).await;
                for user in 0..3 {
                    prop_assert!(count(&state, user).await >= 0);
                }
            }
            for user in 0..3u64 {
                let expected = (0..12u64).filter(|n| n % 3 == user && model[*n as usize] == Model::Unread).count() as i64;
                prop_assert_eq!(count(&state, user).await, expected, "user {}", user);
            }
            Ok(())
        })?;
    }
}

/// A request with more states in one shard than one `BITFIELD` of the script takes (1,000 GETs,
/// 750 SETs): every state is read and written, in several calls.
#[tokio::test]
async fn a_request_with_thousands_of_events_in_one_shard_reads_and_writes_every_state() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let (user_a, user_b) = (30, 31);
    let creates: Vec<Event> =
        (1..=2_500u64).map(|n| Event::save(n, if n % 2 == 0 { user_a } else { user_b }, true, true)).collect();
    assert_eq!(apply(&state, &creates).await.changed, 2_500);
    assert_eq!((count(&state, user_a).await, count(&state, user_b).await), (1_250, 1_250));
    // Every state written above is read back: each mark-as-read changes a count.
    let reads: Vec<Event> =
        (1..=2_500u64).map(|n| Event::save(n, if n % 2 == 0 { user_a } else { user_b }, false, false)).collect();
    assert_eq!(apply(&state, &reads).await.changed, 2_500);
    assert_eq!((count(&state, user_a).await, count(&state, user_b).await), (0, 0));
    assert_eq!(apply(&state, &reads).await.duplicate, 2_500);
}

fn any_event() -> impl Strategy<Value = Event> {
    // Three notifications in each of three shards (shard = id >> 16), two of them far apart, and
    // three users: a request revisits the same notification and the same shard often.
    let id = (prop_oneof![Just(0u64), Just(1), Just(40)], 0u64..3).prop_map(|(shard, n)| (shard << 16) + n);
    (id, 0u64..3, 0u8..5).prop_map(|(id, user, kind)| match kind {
        0 => Event::save(id, user, true, true),
        1 => Event::save(id, user, false, true),
        2 => Event::save(id, user, true, false),
        3 => Event::save(id, user, false, false),
        _ => Event::delete(id, user),
    })
}

fn add(total: &mut countersink::store::ApplyOutcome, one: countersink::store::ApplyOutcome) {
    total.changed += one.changed;
    total.recorded += one.recorded;
    total.duplicate += one.duplicate;
    total.stale += one.stale;
    total.after_delete += one.after_delete;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Invariant: the apply script reads the states of a shard that several of a request's events
    /// touch once, runs the transitions on a local copy and writes it back once (a shard one event
    /// touches is read and written directly); a request whose events touch the same notifications
    /// several times, across shards, has exactly the outcomes, counts and states of the same events
    /// applied one request each. One user's count is held in Redis beforehand, so the held-count
    /// update is checked too.
    #[test]
    fn a_request_touching_a_notification_many_times_equals_its_events_one_by_one(
        before in proptest::collection::vec(any_event(), 0..12),
        events in proptest::collection::vec(any_event(), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (batched_env, single_env) = (TestEnv::sqlite().await, TestEnv::sqlite().await);
            let (batched, single) = (batched_env.state(), single_env.state());
            for state in [&batched, &single] {
                apply(state, &before).await;
                // Holds user 0's count in Redis (a first read installs it).
                count(state, 0).await;
            }
            let together = apply(&batched, &events).await;
            let mut one_by_one = countersink::store::ApplyOutcome::default();
            for event in &events {
                add(&mut one_by_one, apply(&single, std::slice::from_ref(event)).await);
            }
            prop_assert_eq!(together, one_by_one);
            for user in 0..3u64 {
                prop_assert_eq!(count(&batched, user).await, count(&single, user).await, "user {}", user);
            }
            let pending = |state: &AppState| {
                let store = state.store.clone();
                async move { store.pending_users().await.unwrap() }
            };
            prop_assert_eq!(pending(&batched).await, pending(&single).await);
            // The states written back: what later events would find.
            let states = |env: &TestEnv| {
                let mut redis = env.redis();
                [0u64, 1, 40].map(|shard| {
                    let key = env.state().store.keys().state(shard);
                    redis::cmd("GET").arg(key).query::<Option<Vec<u8>>>(&mut redis).unwrap()
                })
            };
            prop_assert_eq!(states(&batched_env), states(&single_env));
            Ok(())
        })?;
    }
}

/// One request of the group-commit property: its events and its `webhook-id` (of a few, so ids
/// repeat), and which of two bodies it claims (the same id with the other body is a reuse).
#[derive(Debug, Clone)]
struct Sent {
    events: Vec<Event>,
    webhook_id: Option<u8>,
    body: u8,
}

fn sent() -> impl Strategy<Value = Sent> {
    let event = (0u64..8, 0u8..3).prop_map(|(notification, kind)| match kind {
        0 => Event::save(notification, notification % 3, true, true),
        1 => Event::save(notification, notification % 3, false, false),
        _ => Event::delete(notification, notification % 3),
    });
    (prop::collection::vec(event, 0..4), prop::option::of(0u8..4), 0u8..2).prop_map(|(events, webhook_id, body)| Sent {
        events,
        webhook_id,
        body,
    })
}

/// A request's answer as comparable text: its outcome, or its refusal.
fn answer(applied: Result<countersink::store::Applied, countersink::store::StoreError>) -> String {
    match applied {
        Ok(applied) => format!("{applied:?}"),
        Err(e) => format!("refused: {e}"),
    }
}

fn idempotency(sent: &Sent) -> Option<countersink::store::Idempotency> {
    // The body is the events' and the claimed body's: another body under one id is a reuse.
    let body = format!("{:?}/{}", sent.events, sent.body);
    let ttl = std::time::Duration::from_secs(600);
    sent.webhook_id.map(|id| countersink::store::Idempotency::new(&format!("msg_{id}"), body.as_bytes(), ttl))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A group commit changes nothing but the number of script calls: requests applied together
    /// by `apply_many`, in groups of any size, get the answers they get applied one by one
    /// (outcomes, replays of ids seen earlier in the same call or before it, refusals of an id
    /// reused with another body), and leave every user's count the same.
    #[test]
    fn a_group_commit_answers_and_counts_as_the_requests_one_by_one(
        requests in prop::collection::vec(sent(), 1..12),
        cuts in prop::collection::vec(1usize..5, 1..12),
    ) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (alone, grouped) = (TestEnv::sqlite().await, TestEnv::sqlite().await);
            let (alone, grouped) = (alone.state(), grouped.state());
            let mut one_by_one = Vec::new();
            for request in &requests {
                one_by_one.push(answer(alone.store.apply_once(&request.events, idempotency(request)).await));
            }
            let mut together = Vec::new();
            let mut rest = &requests[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (group, after) = rest.split_at((*cut).min(rest.len()));
                let group: Vec<countersink::store::Request> = group
                    .iter()
                    .map(|r| countersink::store::Request { events: &r.events, idempotency: idempotency(r) })
                    .collect();
                together.extend(grouped.store.apply_many(&group).await.unwrap().into_iter().map(answer));
                rest = after;
            }
            assert_eq!(together, one_by_one);
            for user in 0..3 {
                assert_eq!(count(&grouped, user).await, count(&alone, user).await, "user {user}");
            }
        });
    }
}

/// A request whose handler gave up while it waited for a call (the request deadline answered it
/// 503, or its client left) is dropped from the queue unapplied: a 503 never hides a change that
/// was applied after all. Here the only call in flight is held in a paused Redis while the second
/// request gives up; its retry, with the same `webhook-id`, is then applied as a first delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_while_queued_for_a_call_is_not_applied() {
    use std::time::Duration;

    use countersink::store::{GroupCommit, Idempotency, Keys, Store};
    use redis::Commands;

    let redis = support::OwnRedis::start(support::free_port());
    let store = Store::connect(&redis.url(), "given_up").unwrap();
    let ingest = GroupCommit::new(store, 1, 1_000);
    let mut admin = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let pending =
        |admin: &mut redis::Connection| -> Option<i64> { admin.zscore(Keys::new("given_up").pending(), 7).unwrap() };
    let ttl = Duration::from_secs(3_600);
    let once = |id: &str, notification: u64| {
        (vec![Event::save(notification, 7, true, true)], Some(Idempotency::new(id, id.as_bytes(), ttl)))
    };

    let (events, id) = once("first", 1);
    ingest.apply(events, id).await.unwrap();
    // Writes wait while Redis is paused, so the next call is held in flight.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1_000).arg("WRITE").query(&mut admin).unwrap();
    let held = {
        let ingest = ingest.clone();
        let (events, id) = once("held", 2);
        tokio::spawn(async move { ingest.apply(events, id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (events, id) = once("given-up", 3);
    let gave_up = tokio::time::timeout(Duration::from_millis(200), ingest.apply(events, id)).await;
    assert!(gave_up.is_err(), "the request was answered although the only call was held: {gave_up:?}");
    assert!(!held.await.unwrap().unwrap().replayed);
    // Time for a call the given-up request would have had after the held one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pending(&mut admin), Some(2), "the given-up request was applied");

    let (events, id) = once("given-up", 3);
    let retry = ingest.apply(events, id).await.unwrap();
    assert!(!retry.replayed, "the retry found the given-up request applied");
    assert_eq!((retry.outcome.changed, pending(&mut admin)), (1, Some(3)));
}

/// Issue #19, codes copied across languages: the state codes Rust reads and writes
/// (`store::state`, used by bootstrap and reconcile) are the ones the apply script writes. Each
/// kind of event leaves, in Redis, the state its Rust constant names. (That `transition.lua`
/// declares the same numbers is the unit test `the_state_and_op_codes_agree_with_the_lua_state_machine`.)
#[tokio::test]
async fn the_apply_script_writes_the_state_codes_rust_reads() {
    use countersink::store::{state, Keys};

    let env = TestEnv::sqlite().await;
    let app = env.state();
    let mut redis = env.redis();
    let keys = Keys::new(&env.core.redis_prefix);
    let cases = [
        (Event::save(1, 5, true, true), state::UNREAD),
        (Event::save(2, 5, false, true), state::READ),
        (Event::save(3, 5, true, false), state::UNREAD),
        (Event::save(4, 5, false, false), state::READ),
        (Event::delete(5, 5), state::DELETED),
    ];
    for (event, expected) in cases {
        apply(&app, std::slice::from_ref(&event)).await;
        let (shard, index) = Keys::state_slot(event.notification_id);
        let written: Vec<u8> = redis::cmd("BITFIELD")
            .arg(keys.state(shard))
            .arg("GET")
            .arg("u2")
            .arg(format!("#{index}"))
            .query(&mut redis)
            .unwrap();
        assert_eq!(written, [expected], "{event:?}");
    }
}

/// Issue #15: a `webhook-id` whose stored record is not one the script wrote (a damaged value in
/// its bucket, another program's value under the former one-key-per-id name) is refused for its
/// own request (409, nothing applied, a message of its own), and the requests merged with it in one
/// group-commit call are applied as usual. Before, its record parsed into a short answer and the
/// whole call failed: every merged request was answered 500.
#[tokio::test]
async fn a_malformed_idempotency_record_refuses_its_request_alone() {
    use countersink::store::{Idempotency, Request, StoreError};
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let ttl = std::time::Duration::from_secs(3600);
    let damaged = Idempotency::new("msg_damaged", b"a", ttl);
    state.store.apply_once(&[Event::save(1, 10, true, true)], Some(damaged.clone())).await.unwrap();
    let bucket = env.idempotency_bucket_of("msg_damaged").expect("the first delivery's record");
    let mut redis = env.redis();
    redis::cmd("HSET").arg(&bucket).arg(&damaged.record_field[..]).arg("a damaged value").exec(&mut redis).unwrap();
    redis::cmd("SET").arg(state.store.keys().webhook("msg_foreign")).arg("not a record").exec(&mut redis).unwrap();

    let retried = [Event::save(3, 10, true, true)];
    let foreign = [Event::save(4, 10, true, true)];
    let other = [Event::save(2, 11, true, true)];
    let requests = [
        Request { events: &retried, idempotency: Some(damaged) },
        Request { events: &foreign, idempotency: Some(Idempotency::new("msg_foreign", b"c", ttl)) },
        Request { events: &other, idempotency: Some(Idempotency::new("msg_fine", b"b", ttl)) },
    ];
    let answers = state.store.apply_many(&requests).await.expect("the call as a whole succeeds");
    assert!(matches!(answers[0], Err(StoreError::IdempotencyRecordUnreadable)), "{:?}", answers[0]);
    assert!(matches!(answers[1], Err(StoreError::IdempotencyRecordUnreadable)), "{:?}", answers[1]);
    assert!(answers[2].as_ref().is_ok_and(|a| a.outcome.changed == 1 && !a.replayed), "{:?}", answers[2]);
    assert_eq!((count(&state, 10).await, count(&state, 11).await), (1, 1));
}

/// Writes `id`'s record as the former version did, a key of its own ("hex body digest:outcomes",
/// one event changed), for 10 minutes.
fn write_former_record(env: &TestEnv, state: &AppState, id: &countersink::store::Idempotency) {
    let hex: String = id.body_digest.iter().map(|b| format!("{b:02x}")).collect();
    redis::cmd("SET")
        .arg(state.store.keys().webhook(&id.key))
        .arg(format!("{hex}:1 0 0 0 0"))
        .arg("EX")
        .arg(600)
        .exec(&mut env.redis())
        .unwrap();
}

/// Issue #15: records are packed into hashes now; one that the former version wrote, a key per
/// `webhook-id` holding "hex body digest:outcomes", is still honoured until it expires: its
/// replay is answered with its first outcome and applies nothing, a reuse with another body is
/// refused. A sidecar upgraded under load would otherwise apply again the retries of requests its
/// predecessor had applied.
#[tokio::test]
async fn a_record_the_former_version_wrote_is_honoured() {
    use countersink::store::{Idempotency, StoreError};
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let ttl = std::time::Duration::from_secs(3600);
    let replayed = Idempotency::new("msg_before_upgrade", b"the body", ttl);
    write_former_record(&env, &state, &replayed);
    let events = [Event::save(1, 10, true, true)];
    let applied = state.store.apply_once(&events, Some(replayed)).await.unwrap();
    assert!(applied.replayed && applied.outcome.changed == 1, "{applied:?}");
    assert_eq!(count(&state, 10).await, 0, "a replay applies nothing");
    let reused = state.store.apply_once(&events, Some(Idempotency::new("msg_before_upgrade", b"another", ttl))).await;
    assert!(matches!(reused, Err(StoreError::IdempotencyKeyReused)), "{reused:?}");
    assert_eq!(env.idempotency_buckets(), Vec::<String>::new(), "nothing was written for them");
}

/// Issue #15: an epoch's records are a linear hash table that grows a bucket at a time
/// (`records.lua`), moving records as buckets split. After 3,000 requests every one of their ids
/// is still found, wherever its record moved: each retry is answered as replayed with its first
/// outcome and applies nothing. The buckets stay small enough for Redis's compact encoding.
#[tokio::test]
async fn every_record_is_found_after_its_epoch_grew() {
    use countersink::store::{Idempotency, Request};
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let ttl = std::time::Duration::from_secs(3600);
    let requests = 3_000u64;
    let events: Vec<[Event; 1]> = (1..=requests).map(|n| [Event::save(n, 1 + n % 7, true, true)]).collect();
    let ids: Vec<Idempotency> =
        (1..=requests).map(|n| Idempotency::new(&format!("msg_grow_{n}"), n.to_string().as_bytes(), ttl)).collect();
    let batch = |range: std::ops::Range<usize>| -> Vec<Request<'_>> {
        range.map(|i| Request { events: &events[i], idempotency: Some(ids[i].clone()) }).collect()
    };
    for start in (0..requests as usize).step_by(100) {
        let answers = state.store.apply_many(&batch(start..start + 100)).await.unwrap();
        assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|a| !a.replayed && a.outcome.changed == 1)));
    }
    assert_eq!(env.idempotency_records(), requests);
    let buckets = env.idempotency_buckets();
    assert!(buckets.len() >= 50, "the table grew: {} buckets", buckets.len());
    let mut redis = env.redis();
    for bucket in &buckets {
        let encoding: String = redis::cmd("OBJECT").arg("ENCODING").arg(bucket).query(&mut redis).unwrap();
        assert_eq!(encoding, "listpack", "{bucket}");
    }
    // Every key of the records expires, within two ttls (an epoch's keys at its end + 1 ttl).
    for key in env.redis_keys().iter().filter(|k| k.contains(":webhooks:")) {
        let expires_in: i64 = redis::cmd("TTL").arg(key).query(&mut redis).unwrap();
        assert!((1..=7_200).contains(&expires_in), "{key} expires in {expires_in} s");
    }

    for start in (0..requests as usize).step_by(100) {
        let answers = state.store.apply_many(&batch(start..start + 100)).await.unwrap();
        for (i, answer) in answers.iter().enumerate() {
            assert!(
                answer.as_ref().is_ok_and(|a| a.replayed && a.outcome.changed == 1),
                "msg_grow_{}: {answer:?}",
                start + i + 1
            );
        }
    }
    let total: i64 = futures_util::future::join_all((1..=7).map(|u| count(&state, u))).await.iter().sum();
    assert_eq!(total, requests as i64, "the retries applied nothing");
}

/// Issue #15: a record lives at least its ttl and less than twice it (records expire by epoch);
/// the keys the former version wrote are read for a ttl after this process's first call, not
/// after: an upgrade stops the former version first, so none of its keys outlives that window,
/// and the lookup stops paying a `GET` for each new request. With a 2-second ttl.
#[tokio::test]
async fn records_live_between_one_and_two_ttls_and_former_keys_are_read_for_one() {
    use countersink::store::Idempotency;
    use std::time::{Duration, Instant};
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let ttl = Duration::from_secs(2);
    let former = Idempotency::new("msg_former", b"former", ttl);
    write_former_record(&env, &state, &former);
    let written = Instant::now();
    let new = Idempotency::new("msg_new", b"new", ttl);
    let first = state.store.apply_once(&[Event::save(1, 10, true, true)], Some(new.clone())).await.unwrap();
    assert!(!first.replayed && first.outcome.changed == 1, "{first:?}");
    let read = state.store.apply_once(&[Event::save(2, 10, true, true)], Some(former.clone())).await.unwrap();
    assert!(read.replayed, "the former version's key is read in the window: {read:?}");

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let retry = state.store.apply_once(&[Event::save(1, 10, true, true)], Some(new.clone())).await.unwrap();
    assert!(retry.replayed && retry.outcome.changed == 1, "1.5 s after, within the ttl: {retry:?}");

    tokio::time::sleep(Duration::from_millis(4_500).saturating_sub(written.elapsed())).await;
    let late = state.store.apply_once(&[Event::save(1, 10, true, true)], Some(new)).await.unwrap();
    // Applied again: a late creation retry, stale.
    assert!(!late.replayed && late.outcome.stale == 1, "past twice the ttl the record is gone: {late:?}");
    let after_window = state.store.apply_once(&[Event::save(2, 10, true, true)], Some(former)).await.unwrap();
    assert!(!after_window.replayed && after_window.outcome.changed == 1, "{after_window:?}");
    assert_eq!(count(&state, 10).await, 2);
}
