//! HTTP threads (`http::server::HttpThreads`): the accept loop hands each connection to the next
//! thread in turn, a connection stays on its thread, and each thread's state reaches Redis on a
//! connection of its own, with events and reads through it exact.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use countersink::app::AppState;
use countersink::http::server::{serve, ConnectionLimits, HttpThreads};
use serde_json::{json, Value};

const LIMITS: ConnectionLimits = ConnectionLimits { header_timeout: Duration::from_secs(10), max_connections: 64 };

/// Serves `threads` on an ephemeral port, as `countersink serve` does, until the test ends.
async fn serve_on(threads: HttpThreads) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, threads, LIMITS, std::future::pending()));
    address
}

/// A client that keeps one connection: its requests go one after the other on it.
fn one_connection() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap()
}

/// Four connections over two threads: two each, taken in turn, and every request of a connection
/// answered by the thread that took it (never the test's runtime, which runs the accept loop).
#[tokio::test]
async fn connections_are_handed_to_the_threads_in_turn_and_stay_on_theirs() {
    let router = || {
        Ok(Router::new()
            .route("/thread", get(|| async { std::thread::current().name().unwrap_or_default().to_string() })))
    };
    let address = serve_on(HttpThreads::start(2, router).unwrap()).await;

    // Kept open together, so each client's first request opens a connection of its own.
    let clients: Vec<reqwest::Client> = (0..4).map(|_| one_connection()).collect();
    let mut served_by = Vec::new();
    for client in &clients {
        let mut names = BTreeSet::new();
        for _ in 0..3 {
            let answer = client.get(format!("http://{address}/thread")).send().await.unwrap();
            names.insert(answer.text().await.unwrap());
        }
        assert_eq!(names.len(), 1, "one connection's requests were served by several threads: {names:?}");
        served_by.push(names.into_iter().next().unwrap());
    }
    let mut per_thread: HashMap<&str, usize> = HashMap::new();
    for name in &served_by {
        *per_thread.entry(name.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_thread,
        HashMap::from([("countersink-http-0", 2), ("countersink-http-1", 2)]),
        "connections in order went to {served_by:?}"
    );
}

/// Clients of a Redis server other than `admin` itself.
fn redis_clients(admin: &mut redis::Connection) -> usize {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(admin).unwrap();
    list.lines().filter(|line| !line.contains(" cmd=client|list ")).count()
}

/// Each HTTP thread's state has a Redis connection of its own (connected at its first command):
/// events and reads over four connections on two threads open two, not one shared, and every
/// count read back, single and bulk, is what the events made it.
#[tokio::test]
async fn each_thread_reaches_redis_on_a_connection_of_its_own_and_counts_stay_exact() {
    let redis = support::OwnRedis::start(support::free_port());
    let mut env = support::TestEnv::postgres().await;
    env.core.redis_url = redis.url();
    let state = AppState::new(&env.core, None).unwrap();
    let mut admin = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    assert_eq!(redis_clients(&mut admin), 0, "nothing connected before the first request");

    let address =
        serve_on(HttpThreads::start(2, || Ok(countersink::http::router(state.for_http_thread()?))).unwrap()).await;
    let clients: Vec<reqwest::Client> = (0..4).map(|_| one_connection()).collect();
    let mut expected: HashMap<u64, i64> = HashMap::new();
    for (i, client) in clients.iter().enumerate() {
        for n in 0..5u64 {
            let (notification, user) = (i as u64 * 100 + n, 1 + (n % 3));
            let event = json!({"kind": "post_save", "notification_id": notification, "user_id": user, "unread": true, "created": true});
            let answer = client.post(format!("http://{address}/v1/events")).json(&event).send().await.unwrap();
            assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
            *expected.entry(user).or_default() += 1;
        }
    }
    for client in &clients {
        for (user, count) in &expected {
            let answer: Value = client
                .get(format!("http://{address}/v1/users/{user}/unread-count"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(answer["unread_count"], *count, "user {user}");
        }
        let bulk: Value = client
            .get(format!("http://{address}/v1/unread-counts?user_ids=3,1,2"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let counts: Vec<i64> =
            bulk["counts"].as_array().unwrap().iter().map(|c| c["unread_count"].as_i64().unwrap()).collect();
        assert_eq!(counts, [expected[&3], expected[&1], expected[&2]]);
    }
    // One per thread: its commands' (the connection for `WAIT` pipelines opens only at its first
    // use, with --redis-wait-replicas).
    assert_eq!(redis_clients(&mut admin), 2, "the two threads did not each open a Redis connection of their own");
}
