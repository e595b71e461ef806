//! The HTTP API in-process (`Router::oneshot`), on SQLite: answers, error shapes, that a rejected
//! request applies nothing, 503s while Redis or the database is unreachable, a flush cut short by
//! the request deadline, bulk-read parameters; and one round trip through the database on each
//! backend.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use countersink::app::{AppState, Limits};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::TestEnv;
use tower::ServiceExt;

fn router(state: AppState) -> Router {
    countersink::http::router(state)
}

async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, Value, Option<String>) {
    let request = Request::builder().method(method).uri(uri).body(body.into()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json, retry_after)
}

#[tokio::test]
async fn events_are_applied_and_counted_in_the_answer() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    let batch = json!([
        {"kind": "post_save", "notification_id": 1, "user_id": 5, "unread": true, "created": true},
        {"kind": "post_save", "notification_id": 2, "user_id": 5, "unread": true, "created": true,
         "occurred_at": "2026-11-22T10:00:00Z"},
        {"kind": "post_save", "notification_id": 2, "user_id": 5, "unread": true, "created": true},
        {"kind": "post_delete", "notification_id": 1, "user_id": 5},
    ]);
    let (status, body, _) = call(&app, "POST", "/v1/events", batch.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["received"].as_u64(), body["changed"].as_u64(), body["noops"].as_u64()),
        (Some(4), Some(3), Some(1))
    );
    assert_eq!(body["outcomes"]["stale"], 1);

    let (status, body, _) = call(&app, "GET", "/v1/users/5/unread-count", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"user_id": 5, "unread_count": 1}));

    let (_, flushed, _) = call(&app, "POST", "/v1/flush", Body::empty()).await;
    assert_eq!(flushed["users_written"], 1);
    let (status, body, _) = call(&app, "GET", "/v1/unread-counts?user_ids=5,6", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["counts"],
        json!([
            {"user_id": 5, "unread_count": 1},
            {"user_id": 6, "unread_count": 0},
        ])
    );
    let (_, status_body, _) = call(&app, "GET", "/v1/status", Body::empty()).await;
    assert_eq!(status_body["pending_users"], 0);
    assert_eq!(status_body["last_flush"]["users"], 1);
}

/// What the API does in the database differs by backend (the flush's upsert, the read of a count
/// no Redis holds): one round trip on each.
#[tokio::test]
async fn a_count_flushed_through_the_api_reads_back_on_every_backend() {
    for env in TestEnv::each_backend().await {
        let app = router(env.state());
        let created =
            json!([{"kind": "post_save", "notification_id": 1, "user_id": 5, "unread": true, "created": true}]);
        let (status, body, _) = call(&app, "POST", "/v1/events", created.to_string()).await;
        assert_eq!((status, &body["changed"]), (StatusCode::OK, &json!(1)), "{:?}: {body}", env.backend());
        let (_, flushed, _) = call(&app, "POST", "/v1/flush", Body::empty()).await;
        assert_eq!(flushed["users_written"], 1, "{:?}: {flushed}", env.backend());
        assert_eq!(env.stored_counts().await, [(5, 1)].into(), "{:?}", env.backend());
        // Neither user was read before: both counts are loaded from the count table.
        let (status, body, _) = call(&app, "GET", "/v1/unread-counts?user_ids=5,6", Body::empty()).await;
        assert_eq!(status, StatusCode::OK, "{:?}: {body}", env.backend());
        assert_eq!(
            body["counts"],
            json!([{"user_id": 5, "unread_count": 1}, {"user_id": 6, "unread_count": 0}]),
            "{:?}",
            env.backend()
        );
    }
}

#[tokio::test]
async fn bad_input_is_rejected_with_the_field_named_and_nothing_applied() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    let valid = json!({"kind": "post_save", "notification_id": 1, "user_id": 2, "unread": true, "created": true});
    let cases: Vec<(String, StatusCode, &str, Option<&str>)> = vec![
        ("{\"kind\": ".into(), StatusCode::BAD_REQUEST, "malformed_json", None),
        ("[]".into(), StatusCode::BAD_REQUEST, "invalid_batch", None),
        ("\"post_save\"".into(), StatusCode::BAD_REQUEST, "invalid_event", None),
        (
            json!([valid, {"kind": "post_rename", "notification_id": 1, "user_id": 2}]).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_event",
            Some("events[1].kind"),
        ),
        (
            json!([valid, valid, {"kind": "post_delete", "notification_id": 1}]).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_event",
            Some("events[2].user_id"),
        ),
        (
            json!([valid, {"kind": "post_delete", "notification_id": -1, "user_id": 2}]).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_event",
            Some("events[1].notification_id"),
        ),
        (
            json!([valid, {"kind": "post_delete", "notification_id": 1, "user_id": 2.5}]).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_event",
            Some("events[1].user_id"),
        ),
        (serde_json::to_string(&vec![valid.clone(); 1_001]).unwrap(), StatusCode::BAD_REQUEST, "invalid_batch", None),
        (
            format!("[{valid}, {}]", " ".repeat(Limits::default().max_body_bytes)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            None,
        ),
    ];
    for (body, want_status, want_code, want_field) in cases {
        let (status, answer, _) = call(&app, "POST", "/v1/events", body.clone()).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(status, want_status, "{shown}: {answer}");
        assert_eq!(answer["error"]["code"], want_code, "{shown}");
        assert_eq!(answer["error"]["field"].as_str(), want_field, "{shown}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(env.redis_keys(), Vec::<String>::new(), "a rejected request applied something");
}

#[tokio::test]
async fn bad_read_parameters_are_rejected() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    for uri in [
        "/v1/users/abc/unread-count",
        "/v1/users/-1/unread-count",
        "/v1/users/9223372036854775808/unread-count",
        "/v1/unread-counts",
        "/v1/unread-counts?user_ids=",
        "/v1/unread-counts?user_ids=1,x",
    ] {
        let (status, body, _) = call(&app, "GET", uri, Body::empty()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{uri}");
    }
    let too_many = (0..1_001).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let (status, _, _) = call(&app, "GET", &format!("/v1/unread-counts?user_ids={too_many}"), Body::empty()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body, _) = call(&app, "GET", "/v1/nothing-here", Body::empty()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
}

#[tokio::test]
async fn unreachable_redis_is_503_with_retry_after() {
    let env = TestEnv::sqlite().await;
    let mut core = env.core.clone();
    // Nothing listens on port 1.
    core.redis_url = "redis://127.0.0.1:1".into();
    let app = router(AppState::new(&core, None).unwrap());
    let event = json!({"kind": "post_delete", "notification_id": 1, "user_id": 2}).to_string();
    for (method, uri, body) in [
        ("POST", "/v1/events", event),
        ("GET", "/v1/users/2/unread-count", String::new()),
        ("POST", "/v1/flush", String::new()),
    ] {
        let (status, answer, retry_after) = call(&app, method, uri, body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {answer}");
        assert_eq!(answer["error"]["code"], "unavailable");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
}

#[tokio::test]
async fn unreachable_database_is_503_and_keeps_the_pending_deltas() {
    let env = TestEnv::sqlite().await;
    let state = env.state();
    let app = router(state.clone());
    let event = json!({"kind": "post_save", "notification_id": 1, "user_id": 2, "unread": true, "created": true});
    assert_eq!(call(&app, "POST", "/v1/events", event.to_string()).await.0, StatusCode::OK);

    let mut core = env.core.clone();
    core.database_url = "postgres://postgres@127.0.0.1:1/test".into();
    core.db_timeout_secs = 1;
    let broken = router(AppState::new(&core, None).unwrap());
    for (method, uri) in [("GET", "/v1/users/2/unread-count"), ("POST", "/v1/flush")] {
        let (status, answer, retry_after) = call(&broken, method, uri, Body::empty()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {answer}");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    // The failed flush left its batch in Redis; a flush with the database back applies it.
    let (_, body, _) = call(&app, "POST", "/v1/flush", Body::empty()).await;
    assert_eq!(body["users_written"], 1, "{body}");
    let (_, body, _) = call(&app, "GET", "/v1/users/2/unread-count", Body::empty()).await;
    assert_eq!(body["unread_count"], 1);
    assert_eq!(env.stored_counts().await.get(&2), Some(&1));
}

#[tokio::test]
async fn wrong_methods_get_the_common_error_shape() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    for (method, uri) in [("GET", "/v1/events"), ("DELETE", "/v1/flush"), ("POST", "/v1/unread-counts")] {
        let (status, body, _) = call(&app, method, uri, Body::empty()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }
}

#[tokio::test]
async fn a_flush_cut_short_by_the_request_deadline_says_so_still_finishes_and_frees_the_lease() {
    let env = TestEnv::sqlite().await;
    let state = env.state().with_limits(Limits { request_timeout: Duration::from_millis(1), ..Limits::default() });
    state.store.apply(&[countersink::events::Event::save(1, 4, true, true)]).await.unwrap();
    let app = router(state.clone());
    let (status, body, retry_after) = call(&app, "POST", "/v1/flush", Body::empty()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Says what happened, not that "the request deadline is unavailable".
    assert_eq!(body["error"]["code"], "timed_out", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--request-timeout-secs"), "{body}");
    // The flush went on without the request, and released the lock when done.
    let report = state.flusher.flush(countersink::flush::WhenBusy::Wait(Duration::from_secs(3))).await.unwrap();
    assert!(report.skipped.is_none());
    assert_eq!(env.stored_counts().await.get(&4), Some(&1));
}

#[tokio::test]
async fn bulk_reads_take_percent_encoded_commas_and_repeated_keys() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    let events = json!([
        {"kind": "post_save", "notification_id": 1, "user_id": 42, "unread": true, "created": true},
        {"kind": "post_save", "notification_id": 2, "user_id": 43, "unread": true, "created": true},
        {"kind": "post_save", "notification_id": 3, "user_id": 43, "unread": true, "created": true},
    ]);
    assert_eq!(call(&app, "POST", "/v1/events", events.to_string()).await.0, StatusCode::OK);
    // What Python's urlencode({"user_ids": "42,43"}) sends, and urlencode(..., doseq=True) of a list.
    for uri in ["/v1/unread-counts?user_ids=42%2C43", "/v1/unread-counts?user_ids=42&user_ids=43"] {
        let (status, body, _) = call(&app, "GET", uri, Body::empty()).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        let counts: Vec<(u64, u64)> = body["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["user_id"].as_u64().unwrap(), c["unread_count"].as_u64().unwrap()))
            .collect();
        assert_eq!(counts, vec![(42, 1), (43, 2)], "{uri}");
    }
    // A parameter the endpoint does not take is refused, not ignored.
    let (status, body, _) = call(&app, "GET", "/v1/unread-counts?user_ids=42&user_id=43", Body::empty()).await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("user_id")), "{body}");
}

#[tokio::test]
async fn duplicate_json_keys_are_refused_and_apply_nothing() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    // serde_json keeps the last of repeated keys: this read as "read", and nothing was counted.
    let body = r#"[{"kind": "post_save", "notification_id": 1, "user_id": 5, "unread": true, "unread": false,
                    "created": true}]"#;
    let (status, answer, _) = call(&app, "POST", "/v1/events", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["code"], "malformed_json");
    assert!(answer["error"]["message"].as_str().unwrap().contains("duplicate key \"unread\""), "{answer}");
    let (status, answer, _) = call(&app, "POST", "/v1/reconcile", r#"{"user_ids": [1], "user_ids": [2]}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(env.redis_keys(), Vec::<String>::new(), "a rejected request applied something");
}

#[tokio::test]
async fn last_flush_time_is_rfc3339_with_an_offset() {
    let env = TestEnv::sqlite().await;
    let app = router(env.state());
    let event = json!({"kind": "post_save", "notification_id": 1, "user_id": 5, "unread": true, "created": true});
    assert_eq!(call(&app, "POST", "/v1/events", event.to_string()).await.0, StatusCode::OK);
    assert_eq!(call(&app, "POST", "/v1/flush", Body::empty()).await.0, StatusCode::OK);
    let (status, body, _) = call(&app, "GET", "/v1/status", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    let applied_at = body["last_flush"]["applied_at"].as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(applied_at).unwrap_or_else(|e| panic!("{applied_at}: {e}"));
    assert_eq!(parsed.offset().local_minus_utc(), 0, "{applied_at}");
    assert!((chrono::Utc::now() - parsed.to_utc()).num_seconds().abs() < 60, "{applied_at}");
}
