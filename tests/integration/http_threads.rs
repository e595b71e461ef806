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
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

const LIMITS: ConnectionLimits = ConnectionLimits { header_timeout: Duration::from_secs(10), max_connections: 64 };

/// Serves `threads` on an ephemeral port, as `countersink serve` does, until the test ends.
async fn serve_on(threads: HttpThreads) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, threads, LIMITS, std::future::pending()));
    address
}

/// One keep-alive HTTP/1.1 connection (hyper's client, as the bench's load generator), its
/// requests sent one after another (a pooling client may open a second connection when a request
/// follows the previous answer closely). Dropped, it closes.
struct Connection(hyper::client::conn::http1::SendRequest<String>);

impl Connection {
    async fn open(address: SocketAddr) -> Connection {
        let stream = TcpStream::connect(address).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Connection(sender)
    }

    /// Sends a request and reads its answer: the status and the body.
    async fn send(&mut self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "test")
            .header("content-type", "application/json")
            .body(body.map(Value::to_string).unwrap_or_default())
            .unwrap();
        // Ready again once the previous answer's end has been read on the connection's task.
        self.0.ready().await.unwrap();
        let answer = self.0.send_request(request).await.unwrap();
        let status = answer.status().as_u16();
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get_json(&mut self, path: &str) -> Value {
        let (status, body) = self.send("GET", path, None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// Answers with the name of the thread that served it.
fn thread_router() -> anyhow::Result<Router> {
    Ok(Router::new().route("/thread", get(|| async { std::thread::current().name().unwrap_or_default().to_string() })))
}

/// The thread that serves `connection`, asked three times: always the same one.
async fn thread_of(connection: &mut Connection) -> String {
    let mut names = BTreeSet::new();
    for _ in 0..3 {
        let (status, name) = connection.send("GET", "/thread", None).await;
        assert_eq!(status, 200);
        names.insert(name);
    }
    assert_eq!(names.len(), 1, "one connection's requests were served by several threads: {names:?}");
    names.into_iter().next().unwrap()
}

/// Four connections over two threads with as many connections each: taken in turn, and every
/// request of a connection answered by the thread that took it (never the test's runtime, which
/// runs the accept loop).
#[tokio::test]
async fn connections_are_handed_to_the_threads_in_turn_and_stay_on_theirs() {
    let address = serve_on(HttpThreads::start(2, thread_router).unwrap()).await;
    let mut served_by = Vec::new();
    // Kept open together.
    let mut connections = Vec::new();
    for _ in 0..4 {
        let mut connection = Connection::open(address).await;
        served_by.push(thread_of(&mut connection).await);
        connections.push(connection);
    }
    assert_eq!(served_by, ["countersink-http-0", "countersink-http-1", "countersink-http-0", "countersink-http-1"]);
}

/// A new connection goes to the thread with the fewest open: after the two connections of thread
/// 0 close, the next two go there, where taking turns would have put one on thread 1.
#[tokio::test]
async fn a_new_connection_goes_to_the_thread_with_the_fewest_open() {
    let threads = HttpThreads::start(2, thread_router).unwrap();
    let address = serve_on(threads.clone()).await;
    let mut connections = Vec::new();
    for _ in 0..3 {
        let mut connection = Connection::open(address).await;
        thread_of(&mut connection).await;
        connections.push(connection);
    }
    assert_eq!(threads.connections(), [2, 1]);
    // The first and third connections were thread 0's.
    connections.remove(2);
    connections.remove(0);
    assert!(
        support::eventually(Duration::from_secs(5), || threads.connections() == [0, 1]).await,
        "the closed connections are still counted: {:?}",
        threads.connections()
    );
    let (mut fourth, mut fifth) = (Connection::open(address).await, Connection::open(address).await);
    assert_eq!(thread_of(&mut fourth).await, "countersink-http-0");
    assert_eq!(thread_of(&mut fifth).await, "countersink-http-0", "thread 0 had fewer connections open");
    assert_eq!(threads.connections(), [2, 1]);
}

/// Clients of a Redis server other than `admin` itself.
fn redis_clients(admin: &mut redis::Connection) -> usize {
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(admin).unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(admin).unwrap();
    list.lines().filter(|line| !line.starts_with(&format!("id={me} "))).count()
}

/// A sidecar's state over `redis`, served on two HTTP threads.
async fn served_on_two_threads(env: &mut support::TestEnv, redis: &support::OwnRedis) -> (HttpThreads, SocketAddr) {
    env.core.redis_url = redis.url();
    let state = AppState::new(&env.core, None).unwrap();
    let threads = HttpThreads::start(2, || Ok(countersink::http::router(state.for_http_thread()?))).unwrap();
    let address = serve_on(threads.clone()).await;
    (threads, address)
}

/// Reads every user of `expected` alone and all of them in bulk, in another order.
async fn assert_reads(connection: &mut Connection, expected: &HashMap<u64, i64>) {
    for (user, count) in expected {
        let answer = connection.get_json(&format!("/v1/users/{user}/unread-count")).await;
        assert_eq!(answer["unread_count"], *count, "user {user}");
    }
    let bulk = connection.get_json("/v1/unread-counts?user_ids=3,1,2").await;
    let counts: Vec<i64> =
        bulk["counts"].as_array().unwrap().iter().map(|c| c["unread_count"].as_i64().unwrap()).collect();
    assert_eq!(counts, [expected[&3], expected[&1], expected[&2]]);
}

/// Each HTTP thread's state has a Redis connection of its own (connected at its first command):
/// concurrent events and reads over four connections on two threads open two, not one shared;
/// every count read back, single and bulk, is what the events made it; and a flush asked through
/// an HTTP thread writes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_thread_reaches_redis_on_a_connection_of_its_own_and_counts_stay_exact() {
    let redis = support::OwnRedis::start(support::free_port());
    let mut env = support::TestEnv::postgres().await;
    let mut admin = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let (threads, address) = served_on_two_threads(&mut env, &redis).await;
    // The server's start-up check has just closed its connection.
    assert!(
        support::eventually(Duration::from_secs(5), || redis_clients(&mut admin) == 0).await,
        "nothing is connected before the first request"
    );
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(Connection::open(address).await);
    }
    // The connections send at once, each one request after another, for the same three users:
    // the two connections of a thread merge into its calls.
    let sends = connections.iter_mut().enumerate().map(|(i, connection)| async move {
        for n in 0..20u64 {
            let event = json!({"kind": "post_save", "notification_id": i as u64 * 100 + n, "user_id": 1 + n % 3, "unread": true, "created": true});
            let (status, answer) = connection.send("POST", "/v1/events", Some(&event)).await;
            assert_eq!(status, 200, "{answer}");
        }
    });
    futures_util::future::join_all(sends).await;
    assert_eq!(threads.connections(), [2, 2]);
    let expected: HashMap<u64, i64> = HashMap::from([(1, 28), (2, 28), (3, 24)]);
    futures_util::future::join_all(connections.iter_mut().map(|c| assert_reads(c, &expected))).await;
    // One per thread: its commands' (the connection for `WAIT` pipelines opens only at its first
    // use, with --redis-wait-replicas).
    assert_eq!(redis_clients(&mut admin), 2, "the two threads did not each open a Redis connection of their own");

    let (status, flushed) = connections[0].send("POST", "/v1/flush", None).await;
    assert_eq!(status, 200, "{flushed}");
    assert_eq!(serde_json::from_str::<Value>(&flushed).unwrap()["users_written"], 3, "{flushed}");
    assert_eq!(env.stored_counts().await, expected);
    futures_util::future::join_all(connections.iter_mut().map(|c| assert_reads(c, &expected))).await;
}

/// Redis restarted (from its snapshot) under threads that had read through their connections: the
/// first read on each thread afterwards answers, with the counts, rather than 503 for the
/// connection Redis closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threads_first_read_after_a_redis_restart_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = support::OwnRedis::start_with_snapshots(support::free_port(), dir.path());
    let mut env = support::TestEnv::postgres().await;
    let (threads, address) = served_on_two_threads(&mut env, &redis).await;
    let mut connections = [Connection::open(address).await, Connection::open(address).await];
    let event = json!({"kind": "post_save", "notification_id": 1, "user_id": 7, "unread": true, "created": true});
    assert_eq!(connections[0].send("POST", "/v1/events", Some(&event)).await.0, 200);
    let counted = (200, r#"{"user_id":7,"unread_count":1}"#.to_string());
    for connection in &mut connections {
        assert_eq!(connection.send("GET", "/v1/users/7/unread-count", None).await, counted);
    }
    assert_eq!(threads.connections(), [1, 1]);
    redis.save();
    redis.restart();
    for connection in &mut connections {
        assert_eq!(connection.send("GET", "/v1/users/7/unread-count", None).await, counted);
    }
}
