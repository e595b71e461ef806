//! Reads of held counts: concurrent reads share one Redis call (`store::MergedReads`), and each
//! still gets its own users' counts, in its own order.

use std::time::Duration;

use countersink::store::{MergedReads, Store};

/// How many `EXISTS` commands Redis has run: each read call checks the reload flag, and the
/// ready marker too when its store must rebuild a lost state (`requiring_bootstrap`).
fn exists_calls(admin: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(admin).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_exists:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// Three reads that arrive while the only read call is held in a paused Redis wait, then share
/// the next call: one marker check for the three (a store with no table to rebuild from checks
/// the reload flag alone), and each answer is its own users' counts in
/// its own order (a user read by two of them, a user whose count is not held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_waiting_for_a_call_share_the_next_one_and_each_gets_its_own_counts() {
    let redis = support::OwnRedis::start(support::free_port());
    let store = Store::connect(&redis.url(), "merged_reads").unwrap();
    let bases = [(1, 10), (2, 20), (3, 30)];
    let snapshot = store.batches_snapshot(&[1, 2, 3]).await.unwrap();
    assert_eq!(store.install_counts(&snapshot, &bases).await.unwrap(), Some(vec![10, 20, 30]));
    let reads = MergedReads::new(store, 1, 1_000);
    let mut admin = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let before = exists_calls(&mut admin);

    // Every client waits while Redis is paused, so the first read's call is held in flight.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(500).arg("ALL").query(&mut admin).unwrap();
    let read = |users: Vec<u64>| {
        let reads = reads.clone();
        tokio::spawn(async move { reads.held_counts(users).await })
    };
    let first = read(vec![1]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = [read(vec![2, 3]), read(vec![3, 1]), read(vec![4])];

    assert_eq!(first.await.unwrap().unwrap(), [Some(10)]);
    let [a, b, c] = waiting;
    assert_eq!(a.await.unwrap().unwrap(), [Some(20), Some(30)]);
    assert_eq!(b.await.unwrap().unwrap(), [Some(30), Some(10)]);
    assert_eq!(c.await.unwrap().unwrap(), [None], "user 4's count is not held");
    // Two calls: the first read's, and one for the three that waited (four without merging).
    assert_eq!(exists_calls(&mut admin) - before, 2, "the waiting reads did not share a call");
}

/// A merged read call that fails answers each of its reads with the failure: here the ready marker
/// is missing where a lost state must be rebuilt (the reads would answer 503), for the read held in
/// the paused Redis and the two that waited for it alike. With the marker back, the same reads
/// answer (each checks the reload flag and the marker, in that order, once per call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shared_read_call_answers_each_of_its_reads_with_the_failure() {
    use countersink::store::{Keys, StoreError};

    let redis = support::OwnRedis::start(support::free_port());
    let store = Store::connect(&redis.url(), "failed_reads").unwrap().requiring_bootstrap();
    let reads = MergedReads::new(store, 1, 1_000);
    let mut admin = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let read = |users: Vec<u64>| {
        let reads = reads.clone();
        tokio::spawn(async move { reads.held_counts(users).await })
    };
    let before = exists_calls(&mut admin);
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(500).arg("ALL").query(&mut admin).unwrap();
    let first = read(vec![1]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = [read(vec![2]), read(vec![3, 1])];
    for answer in [first].into_iter().chain(waiting) {
        let answer = answer.await.unwrap();
        assert!(matches!(answer, Err(StoreError::StateMissing)), "{answer:?}");
    }
    assert_eq!(exists_calls(&mut admin) - before, 4, "two calls, two markers each");

    let _: () = redis::cmd("SET").arg(Keys::new("failed_reads").ready()).arg("rebuilt").query(&mut admin).unwrap();
    assert_eq!(read(vec![2, 1]).await.unwrap().unwrap(), [None, None], "nothing is held yet");
}
