//! The trust boundary: signed events, replays, a `webhook-id` reused with another body, forged
//! requests with thousands of signatures, bearer tokens, load shedding and slow bodies. Every
//! rejection must leave Redis untouched: no state, no pending delta, no idempotency key. In-process
//! (`Router::oneshot`) on SQLite, and the real binary where a socket or a CPU figure matters.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::Router;
use countersink::app::{AppState, Limits};
use countersink::credentials::{Auth, BearerToken};
use countersink::webhook::WebhookSecret;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::TestEnv;
use tower::ServiceExt;

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";

fn secret() -> WebhookSecret {
    WebhookSecret::from_key(b"the current webhook secret key")
}

fn old_secret() -> WebhookSecret {
    WebhookSecret::from_key(b"the previous webhook secret key")
}

fn secured(state: AppState) -> Router {
    let auth = Auth {
        webhook_secrets: vec![secret(), old_secret()],
        admin_token: Some(BearerToken::new(ADMIN)),
        read_token: Some(BearerToken::new(READ)),
    };
    countersink::http::router(state.with_auth(auth))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn body() -> String {
    json!([{"kind": "post_save", "notification_id": 1, "user_id": 2, "unread": true, "created": true}]).to_string()
}

/// A request signed with `signer` as the Standard Webhooks scheme says.
fn signed(signer: &WebhookSecret, id: &str, timestamp: i64, body: &str) -> Request<Body> {
    Request::post("/v1/events")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signer.sign(id, timestamp, body.as_bytes()))
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn get(uri: &str, token: Option<&str>) -> Request<Body> {
    let builder = Request::get(uri);
    let builder = match token {
        Some(token) => builder.header("authorization", format!("Bearer {token}")),
        None => builder,
    };
    builder.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn unsigned_forged_stale_and_future_events_are_refused_and_change_nothing() {
    let env = TestEnv::sqlite().await;
    let app = secured(env.state());
    let forger = WebhookSecret::from_key(b"a secret the sender does not have");
    let mut tampered = signed(&secret(), "msg_1", now(), &body());
    *tampered.body_mut() = Body::from(body().replace("\"unread\":true", "\"unread\":false"));
    let cases = [
        ("unsigned", Request::post("/v1/events").body(Body::from(body())).unwrap()),
        ("forged", signed(&forger, "msg_1", now(), &body())),
        ("tampered body", tampered),
        ("stale", signed(&secret(), "msg_1", now() - 301, &body())),
        // Well past the 300 s tolerance: the cases are signed before any is sent, and with whole
        // seconds a second passing in between turned `now() + 301` into exactly 300 ahead (accepted).
        ("future-dated", signed(&secret(), "msg_1", now() + 330, &body())),
        ("id with a space", signed(&secret(), "msg 1", now(), &body())),
    ];
    for (what, request) in cases {
        let (status, answer) = send(&app, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], "unauthorized", "{what}");
        assert!(!answer.to_string().contains("webhook secret key"), "{what}: the secret leaked");
    }
    assert_eq!(env.redis_keys(), Vec::<String>::new(), "a refused request applied something");
}

#[tokio::test]
async fn signed_events_apply_once_per_webhook_id_with_either_rotated_secret() {
    let env = TestEnv::sqlite().await;
    let app = secured(env.state());
    let (status, first) = send(&app, signed(&secret(), "msg_a", now(), &body())).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((first["changed"].as_u64(), first["replayed"].as_bool()), (Some(1), Some(false)));

    // The same delivery again (a sender's retry): answered as already applied.
    let (status, replay) = send(&app, signed(&secret(), "msg_a", now(), &body())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((replay["changed"].as_u64(), replay["replayed"].as_bool()), (Some(1), Some(true)));

    // The old secret still verifies during a rotation.
    let read_it = json!([{"kind": "post_save", "notification_id": 1, "user_id": 2, "unread": false}]).to_string();
    let (status, answer) = send(&app, signed(&old_secret(), "msg_b", now(), &read_it)).await;
    assert_eq!((status, answer["changed"].as_u64()), (StatusCode::OK, Some(1)));

    let (_, count) = send(&app, get("/v1/users/2/unread-count", Some(READ))).await;
    assert_eq!(count["unread_count"], 0);
    assert!(env.idempotency_bucket_of("msg_a").is_some(), "msg_a's record");
}

#[tokio::test]
async fn admin_and_read_endpoints_require_their_tokens() {
    let env = TestEnv::sqlite().await;
    let app = secured(env.state());
    for (request, want) in [
        (Request::post("/v1/flush").body(Body::empty()).unwrap(), StatusCode::UNAUTHORIZED),
        (get("/v1/status", None), StatusCode::UNAUTHORIZED),
        (get("/v1/status", Some(READ)), StatusCode::UNAUTHORIZED),
        (get("/v1/status", Some(ADMIN)), StatusCode::OK),
        (
            Request::post("/v1/flush").header("authorization", format!("Bearer {ADMIN}")).body(Body::empty()).unwrap(),
            StatusCode::OK,
        ),
        (get("/v1/users/2/unread-count", None), StatusCode::UNAUTHORIZED),
        (get("/v1/users/2/unread-count", Some("not-the-read-token")), StatusCode::UNAUTHORIZED),
        (get("/v1/users/2/unread-count", Some(READ)), StatusCode::OK),
        (get("/v1/unread-counts?user_ids=2", Some(ADMIN)), StatusCode::OK),
        // The token is checked before the request is read: no word on what it got wrong.
        (get("/v1/users/not-a-user/unread-count", None), StatusCode::UNAUTHORIZED),
        (get("/v1/unread-counts?user_ids=x", None), StatusCode::UNAUTHORIZED),
        (get("/metrics", None), StatusCode::UNAUTHORIZED),
        (get("/metrics", Some(READ)), StatusCode::OK),
        (get("/healthz", None), StatusCode::OK),
    ] {
        let uri = request.uri().to_string();
        let (status, answer) = send(&app, request).await;
        assert_eq!(status, want, "{uri}: {answer}");
        if status == StatusCode::UNAUTHORIZED {
            assert!(!answer.to_string().contains(ADMIN) && !answer.to_string().contains(READ));
        }
    }
}

#[tokio::test]
async fn requests_beyond_the_concurrency_cap_are_shed_with_503() {
    let env = TestEnv::sqlite().await;
    let state = env.state().with_limits(Limits { max_concurrent_requests: 1, ..Limits::default() });
    let app = countersink::http::router(state);
    // Another process holds the flush lock, so this flush waits and keeps its permit.
    let mut redis = env.redis();
    let _: () = redis::Commands::set(&mut redis, env.key("flush_lock"), "someone-else").unwrap();
    let waiting = tokio::spawn({
        let app = app.clone();
        async move { send(&app, Request::post("/v1/flush").body(Body::empty()).unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = app.clone().oneshot(Request::post("/v1/events").body(Body::from(body())).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let _: () = redis::Commands::del(&mut redis, env.key("flush_lock")).unwrap();
    assert_eq!(waiting.await.unwrap().0, StatusCode::OK);
    assert!(env.redis_keys().iter().all(|k| !k.contains(":state:")), "the shed request applied something");
}

/// A body that stops half-way meets `--body-timeout-secs` (408, retried by the Django package),
/// while it holds no request permit: the one permit here stays free for another request.
#[tokio::test]
async fn a_body_that_never_finishes_meets_the_body_timeout_without_holding_a_permit() {
    let env = TestEnv::sqlite().await;
    let limits = Limits { body_timeout: Duration::from_millis(500), max_concurrent_requests: 1, ..Limits::default() };
    let app = countersink::http::router(env.state().with_limits(limits));
    let first = Bytes::from(body()[..20].to_string());
    let stalled = futures_util::stream::iter([Ok::<_, std::io::Error>(first)]).chain(futures_util::stream::pending());
    let request = Request::post("/v1/events").body(Body::from_stream(stalled)).unwrap();
    let slow = tokio::spawn({
        let app = app.clone();
        async move { tokio::time::timeout(Duration::from_secs(5), send(&app, request)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A request behind the permit that touches no Redis key.
    let (status, answer) = send(&app, get("/openapi.json", None)).await;
    assert_eq!(status, StatusCode::OK, "the slow body held the only permit: {answer}");
    let (status, answer) = slow.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{answer}");
    assert_eq!(answer["error"]["code"], "body_timeout");
    assert_eq!(env.redis_keys(), Vec::<String>::new());
}

/// Issue #15's first reproduction, against the real binary: a forged request whose
/// `webhook-signature` holds 10,000 candidates cost one HMAC of the body each (seconds of a
/// worker) before its 401. Now the header is refused before any HMAC.
#[tokio::test]
async fn a_forged_request_with_thousands_of_signatures_costs_next_to_no_cpu() {
    let env = TestEnv::sqlite().await;
    let sidecar = support::sidecar::Sidecar::start(&env, support::sidecar::SidecarOptions::default()).await;
    let client = reqwest::Client::new();
    let before = sidecar.cpu_time();
    for n in 0..2 {
        let answer = support::sidecar::forged_amplification(&client, &sidecar.base, n).send().await.unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::UNAUTHORIZED);
        let error: Value = answer.json().await.unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains("more than 8 signatures"), "{error}");
    }
    let used = sidecar.cpu_time() - before;
    assert!(used < Duration::from_millis(200), "two forged requests cost {used:?} of CPU");
    assert_eq!(env.redis_keys(), Vec::<String>::new());
}

/// Issue #15's fifth reproduction: a reused `webhook-id` with another, validly signed body was
/// answered 200 `"replayed": true` and its events were dropped without a word. Now it is refused
/// (409) with nothing applied; a retry of the same body is still a replay.
#[tokio::test]
async fn a_webhook_id_reused_with_another_body_is_refused_and_applies_nothing() {
    let env = TestEnv::sqlite().await;
    let sidecar = support::sidecar::Sidecar::start(&env, support::sidecar::SidecarOptions::default()).await;
    let (client, id) = (reqwest::Client::new(), support::sidecar::new_webhook_id());
    let first = [json!({"kind": "post_save", "notification_id": 1, "user_id": 9, "unread": true, "created": true})];
    let other = [json!({"kind": "post_save", "notification_id": 2, "user_id": 9, "unread": true, "created": true})];
    let (status, _) = support::sidecar::post_signed(&client, &sidecar.base, &id, &first).await.unwrap();
    assert_eq!(status, 200);
    let (status, body) = support::sidecar::post_signed(&client, &sidecar.base, &id, &other).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("webhook-id"), "{body}");
    let (status, body) = support::sidecar::post_signed(&client, &sidecar.base, &id, &first).await.unwrap();
    assert_eq!((status, &body["replayed"]), (200, &json!(true)), "{body}");
    assert_eq!(sidecar.read_counts(&[9]).await, [(9, 1)], "the second body's event was applied");
}
