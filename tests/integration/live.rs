//! Live counts over Server-Sent Events: two "processes" (two app states and servers on one
//! prefix) against the real Redis and PostgreSQL; an event posted to one moves the stream on the
//! other, duplicates push nothing, reconnects start with the current count, a reconcile's repair
//! is pushed, the stream cap and tokens, and streams catch up after a lost subscription or a
//! rollback resync.

use std::net::SocketAddr;
use std::time::Duration;

use countersink::app::{AppState, Limits};
use countersink::credentials::{Auth, BearerToken};
use countersink::live::token;
use countersink::webhook::WebhookSecret;
use serde_json::{json, Value};
use support::{OwnRedis, TestEnv};

/// Long enough for a change to cross Redis pub/sub and a read on a busy CI machine.
const PUSHED_WITHIN: Duration = Duration::from_secs(5);
/// How long we listen to be confident nothing more is coming.
const QUIET_FOR: Duration = Duration::from_millis(600);

/// Serves `state` on an ephemeral port, like `countersink serve` does.
async fn serve(state: AppState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = countersink::http::router(state);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    address
}

/// A server-sent event as a browser's `EventSource` would see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
    retry: Option<u64>,
}

impl SseEvent {
    fn count(&self) -> i64 {
        let data: Value = serde_json::from_str(&self.data).unwrap();
        data["unread_count"].as_i64().unwrap()
    }
}

/// A minimal SSE reader over a streaming response.
struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    /// Opens `/v1/users/{user}/unread-count/stream{query}`; panics unless it answers 200.
    async fn open(address: SocketAddr, user: u64, query: &str, last_event_id: Option<&str>) -> SseClient {
        let response = open_stream(address, user, query, last_event_id, None).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        SseClient { response, buffer: String::new() }
    }

    /// The next event (keep-alive comments skipped), or `None` if none comes within `limit`.
    async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                for line in frame.lines() {
                    match line.split_once(':') {
                        Some(("", _)) | None => {}
                        Some(("event", v)) => event.event = v.trim_start().to_string(),
                        Some(("id", v)) => event.id = Some(v.trim_start().to_string()),
                        Some(("data", v)) => event.data = v.trim_start().to_string(),
                        Some(("retry", v)) => event.retry = v.trim_start().parse().ok(),
                        Some(_) => {}
                    }
                }
                if !event.event.is_empty() {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await.ok()?.unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event's count; panics if none comes in time.
    async fn next_count(&mut self) -> i64 {
        self.next(PUSHED_WITHIN).await.expect("an event within the time limit").count()
    }
}

async fn open_stream(
    address: SocketAddr,
    user: u64,
    query: &str,
    last_event_id: Option<&str>,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut request =
        reqwest::Client::new().get(format!("http://{address}/v1/users/{user}/unread-count/stream{query}"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.send().await.unwrap()
}

/// Posts unsigned events to a process.
async fn post(address: SocketAddr, events: Value) -> Value {
    let response =
        reqwest::Client::new().post(format!("http://{address}/v1/events")).json(&events).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn created(notification: u64, user: u64) -> Value {
    json!({"kind": "post_save", "notification_id": notification, "user_id": user, "unread": true, "created": true})
}

fn deleted(notification: u64, user: u64) -> Value {
    json!({"kind": "post_delete", "notification_id": notification, "user_id": user})
}

#[tokio::test]
async fn an_event_posted_to_one_process_moves_the_stream_on_the_other() {
    let env = TestEnv::postgres().await;
    let (a, b) = (serve(env.state()).await, serve(env.state()).await);
    post(a, json!([created(1, 7), created(2, 7)])).await;
    let mut stream = SseClient::open(b, 7, "", None).await;
    let first = stream.next(PUSHED_WITHIN).await.unwrap();
    assert_eq!(first.event, "count");
    assert_eq!(serde_json::from_str::<Value>(&first.data).unwrap(), json!({"user_id": 7, "unread_count": 2}));
    assert_eq!(first.id.as_deref(), Some("2"));
    assert_eq!(first.retry, Some(2000), "the first event tells browsers how soon to reconnect");

    post(a, json!([created(3, 7)])).await;
    assert_eq!(stream.next_count().await, 3);
    // Another user's change is not this stream's business; this user's next one is.
    post(a, json!([created(4, 8)])).await;
    post(a, json!([deleted(1, 7)])).await;
    let next = stream.next(PUSHED_WITHIN).await.unwrap();
    assert_eq!((next.count(), next.id.as_deref()), (2, Some("2")));
    // A flush moves pending into stored: the total, and so the stream, stays put.
    env.state().flusher.flush(countersink::flush::WhenBusy::Wait(PUSHED_WITHIN)).await.unwrap();
    assert_eq!(stream.next(QUIET_FOR).await, None);
}

#[tokio::test]
async fn duplicates_and_changes_that_cancel_out_push_nothing() {
    let env = TestEnv::postgres().await;
    let (a, b) = (serve(env.state()).await, serve(env.state()).await);
    let mut stream = SseClient::open(b, 9, "", None).await;
    assert_eq!(stream.next_count().await, 0);
    post(a, json!([created(10, 9)])).await;
    assert_eq!(stream.next_count().await, 1);
    // A retried delivery, and a creation deleted in the same request: no count moves.
    post(a, json!([created(10, 9)])).await;
    post(a, json!([created(11, 9), deleted(11, 9)])).await;
    assert_eq!(stream.next(QUIET_FOR).await, None);
    post(a, json!([created(12, 9)])).await;
    assert_eq!(stream.next_count().await, 2);
}

#[tokio::test]
async fn only_requests_that_move_a_count_publish_and_they_name_the_users() {
    let env = TestEnv::postgres().await;
    let a = serve(env.state()).await;
    let mut redis = env.redis();
    let mut pubsub = redis.as_pubsub();
    pubsub.subscribe(env.key("live")).unwrap();
    pubsub.set_read_timeout(Some(QUIET_FOR)).unwrap();
    post(a, json!([created(1, 5), created(2, 6), created(3, 5)])).await;
    let payload: String = pubsub.get_message().unwrap().get_payload().unwrap();
    let mut users: Vec<&str> = payload.split(',').collect();
    users.sort();
    assert_eq!(users, ["5", "6"], "one message per request, each user once");
    post(a, json!([created(1, 5), created(4, 6), deleted(4, 6)])).await;
    assert!(pubsub.get_message().is_err(), "a request that moved no count publishes nothing");
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_the_current_count_first() {
    let env = TestEnv::postgres().await;
    let (a, b) = (serve(env.state()).await, serve(env.state()).await);
    let mut stream = SseClient::open(b, 11, "", None).await;
    let first = stream.next(PUSHED_WITHIN).await.unwrap();
    assert_eq!((first.count(), first.id.as_deref()), (0, Some("0")));
    drop(stream);
    // Changes while the browser is away: the reconnect starts with where the count is now.
    post(a, json!([created(1, 11), created(2, 11)])).await;
    let mut stream = SseClient::open(b, 11, "", Some("0")).await;
    let resumed = stream.next(PUSHED_WITHIN).await.unwrap();
    assert_eq!((resumed.count(), resumed.id.as_deref()), (2, Some("2")));
    // Nothing changed: the current count comes first all the same, then changes as usual.
    let mut again = SseClient::open(a, 11, "", Some("2")).await;
    assert_eq!(again.next_count().await, 2);
    post(b, json!([deleted(2, 11)])).await;
    assert_eq!(again.next_count().await, 1);
    // An id the server never sent is ignored, not an error.
    let mut odd = SseClient::open(a, 11, "", Some("not-a-count")).await;
    assert_eq!(odd.next_count().await, 1);
}

#[tokio::test]
async fn a_reconcile_that_repairs_a_count_pushes_it() {
    let env = TestEnv::postgres_with_source().await;
    let b = serve(env.state()).await;
    let mut stream = SseClient::open(b, 21, "", None).await;
    assert_eq!(stream.next_count().await, 0);
    // Rows written behind countersink's back (no events), then a reconcile from another process.
    env.sql("INSERT INTO notifications_notification (recipient_id, unread) VALUES (21, TRUE), (21, TRUE)").await;
    env.state().reconciler.reconcile_users(&[21]).await.unwrap();
    assert_eq!(stream.next_count().await, 2);
}

#[tokio::test]
async fn a_stream_outlives_the_request_deadline() {
    let env = TestEnv::postgres().await;
    let limits = Limits { request_timeout: Duration::from_secs(1), ..Limits::default() };
    let (a, b) = (serve(env.state()).await, serve(env.state().with_limits(limits)).await);
    let mut stream = SseClient::open(b, 31, "", None).await;
    assert_eq!(stream.next_count().await, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    post(a, json!([created(1, 31)])).await;
    assert_eq!(stream.next_count().await, 1);
}

#[tokio::test]
async fn streams_beyond_the_cap_are_refused_until_one_closes() {
    let env = TestEnv::postgres().await;
    let limits = Limits { max_live_streams: 1, ..Limits::default() };
    let state = env.state().with_limits(limits);
    let live = state.live.clone();
    let b = serve(state).await;
    let mut first = SseClient::open(b, 41, "", None).await;
    assert_eq!(first.next_count().await, 0);
    let refused = open_stream(b, 42, "", None, None).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    drop(first);
    assert!(support::eventually(PUSHED_WITHIN, || live.watched_users() == 0).await, "a closed stream unregisters");
    let mut next = SseClient::open(b, 42, "", None).await;
    assert_eq!(next.next_count().await, 0);
}

const READ: &str = "read-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn secret() -> WebhookSecret {
    WebhookSecret::from_key(b"the current webhook secret key")
}

#[tokio::test]
async fn streams_need_a_valid_token_for_their_own_user_or_the_read_token() {
    let env = TestEnv::postgres().await;
    let auth = Auth {
        webhook_secrets: vec![secret()],
        admin_token: Some(BearerToken::new(ADMIN)),
        read_token: Some(BearerToken::new(READ)),
    };
    let b = serve(env.state().with_auth(auth)).await;
    let now = chrono::Utc::now().timestamp();
    let valid = token::mint(&secret(), 51, now + 300);
    let refusals = [
        ("".to_string(), None, "no credential"),
        (format!("?token={}", token::mint(&secret(), 51, now - 1)), None, "expired"),
        (format!("?token={}", token::mint(&secret(), 52, now + 300)), None, "another user's token"),
        (
            format!("?token={}", token::mint(&WebhookSecret::from_key(b"not the sidecar's secret"), 51, now + 300)),
            None,
            "foreign secret",
        ),
        (format!("?token={}", token::mint(&secret(), 51, now + 3 * 86_400)), None, "lives too long"),
        ("?token=garbage".to_string(), None, "malformed"),
        (format!("?token={valid}"), Some("wrong-token-0123456789"), "a wrong bearer token is not ignored"),
    ];
    for (query, bearer, why) in refusals {
        let response = open_stream(b, 51, &query, None, bearer).await;
        assert_eq!(response.status(), 401, "{why}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{why}");
    }
    let bad_user = reqwest::get(format!("http://{b}/v1/users/-1/unread-count/stream")).await.unwrap();
    assert_eq!(bad_user.status(), 400);

    let mut browser = SseClient::open(b, 51, &format!("?token={valid}"), None).await;
    assert_eq!(browser.next_count().await, 0);
    assert_eq!(browser.response.headers()["access-control-allow-origin"], "*");
    for token in [READ, ADMIN] {
        let response = open_stream(b, 51, "", None, Some(token)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
    }
}

#[tokio::test]
async fn after_the_subscription_is_lost_streams_catch_up_with_what_changed_meanwhile() {
    let port = support::free_port();
    let own = OwnRedis::start(port);
    let mut env = TestEnv::postgres().await;
    env.core.redis_url = own.url();
    let state = env.state();
    let live = state.live.clone();
    let (a, b) = (serve(env.state()).await, serve(state).await);
    let mut stream = SseClient::open(b, 61, "", None).await;
    assert_eq!(stream.next_count().await, 0);
    assert!(live.wait_subscribed(PUSHED_WITHIN).await);

    // Cut the subscriber off and keep it off: it may not SUBSCRIBE until we allow it again.
    let mut admin = redis::Client::open(own.url()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "-subscribe"]).query(&mut admin).unwrap();
    let _: i64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "pubsub"]).query(&mut admin).unwrap();
    assert!(support::eventually(PUSHED_WITHIN, || !live.is_subscribed()).await);
    post(a, json!([created(1, 61)])).await;
    assert_eq!(stream.next(QUIET_FOR).await, None, "the message was published while no one listened");

    let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "+subscribe"]).query(&mut admin).unwrap();
    assert!(live.wait_subscribed(Duration::from_secs(10)).await, "the subscriber comes back by itself");
    assert_eq!(stream.next_count().await, 1, "a resubscribe re-reads every local stream's count");
}

/// A rollback resync (older snapshot, no Notification table) tells every stream to re-read only
/// once the held counts it dropped are gone, so the stream ends on what a read answers.
#[tokio::test]
async fn after_a_rollback_resync_the_stream_shows_what_a_read_answers() {
    let env = TestEnv::postgres().await;
    let state = env.state();
    let address = serve(state.clone()).await;
    state.store.apply(&[countersink::events::Event::save(1, 5, true, true)]).await.unwrap();
    let read = |state: AppState| async move { state.reader.unread_counts(&[5]).await.unwrap()[0].unread_count };
    assert_eq!(read(state.clone()).await, 1);
    state.store.apply(&[countersink::events::Event::save(2, 5, true, true)]).await.unwrap();
    let wait = countersink::flush::WhenBusy::Wait(PUSHED_WITHIN);
    state.flusher.flush(wait).await.unwrap();
    env.restore_snapshot_of_one_unread();
    // Other users' held counts, as a deployment has: dropping them takes a while.
    let mut pipe = redis::pipe();
    for bucket in 1..=20_000u64 {
        pipe.hset(env.key(&format!("counts:{bucket}")), "0", 0).ignore();
    }
    pipe.exec(&mut env.redis()).unwrap();

    let mut stream = SseClient::open(address, 5, "", None).await;
    assert_eq!(stream.next_count().await, 1, "the snapshot's count, before a flush noticed the rollback");
    assert!(state.live.wait_subscribed(PUSHED_WITHIN).await);
    state.flusher.flush(wait).await.unwrap();
    assert_eq!(read(state.clone()).await, 2);
    let mut last = None;
    while let Some(event) = stream.next(QUIET_FOR * 3).await {
        last = Some(event.count());
    }
    assert_eq!(last, Some(2), "the stream ends on what a read answers");
}
