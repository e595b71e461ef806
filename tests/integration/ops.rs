//! Operability, against the real binary (metrics are per process): Prometheus counters that
//! move with the events, request ids in headers and logs, readiness, and a graceful shutdown
//! that finishes the request in flight, refuses new connections, flushes and exits 0, and that
//! stops waiting for a request at its deadline.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use countersink::app::AppState;
use countersink::webhook::WebhookSecret;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::{free_port, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN_TOKEN: &str = "ops-test-admin-token";
const READ_TOKEN: &str = "ops-test-read-token";

/// The sidecar binary on a port of its own, killed when dropped unless it exited.
struct Sidecar {
    child: Child,
    port: u16,
}

impl Sidecar {
    /// Starts `serve` with the scheduled flush off, so only the test flushes.
    async fn start(env: &TestEnv, redis_url: &str, extra: &[&str]) -> Sidecar {
        Self::start_logging(env, redis_url, extra, None).await
    }

    /// The same, writing JSON logs to `log` when given: info, and debug for the events handler
    /// (its per-request line).
    async fn start_logging(env: &TestEnv, redis_url: &str, extra: &[&str], log: Option<&std::path::Path>) -> Sidecar {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_countersink"));
        command.env("COUNTERSINK_LOG", "warn");
        if let Some(log) = log {
            command
                .env("COUNTERSINK_LOG", "info,countersink::http::events=debug")
                .env("COUNTERSINK_LOG_FORMAT", "json");
            command.stderr(std::fs::File::create(log).unwrap());
        }
        let child = command
            .args(["--redis-url", redis_url, "--redis-prefix", &env.core.redis_prefix])
            .args(["--database-url", &env.core.database_url])
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--flush-cron", "off"])
            .args(extra)
            .env("COUNTERSINK_WEBHOOK_SECRET", SECRET)
            .env("COUNTERSINK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("COUNTERSINK_READ_TOKEN", READ_TOKEN)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let sidecar = Sidecar { child, port };
        for _ in 0..200 {
            if reqwest::get(sidecar.url("/healthz")).await.is_ok() {
                return sidecar;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the sidecar did not answer /healthz");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A signed `POST /v1/events` request, as the Django package sends it.
fn signed_events(client: &reqwest::Client, url: String, body: &Value) -> reqwest::RequestBuilder {
    let body = serde_json::to_vec(body).unwrap();
    let id = format!("msg_{:032x}", rand::random::<u128>());
    let timestamp = chrono::Utc::now().timestamp();
    let secret: WebhookSecret = SECRET.parse().unwrap();
    client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", secret.sign(&id, timestamp, &body))
        .body(body)
}

/// The samples of a scrape: `name{labels}` → value.
async fn scrape(sidecar: &Sidecar) -> HashMap<String, f64> {
    let response = reqwest::Client::new().get(sidecar.url("/metrics")).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(name, value)| (name.to_string(), value.parse().unwrap()))
        .collect()
}

fn sample(samples: &HashMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

#[tokio::test]
async fn metrics_count_events_duplicates_rejections_and_flushes() {
    let env = TestEnv::postgres().await;
    let sidecar = Sidecar::start(&env, &env.core.redis_url, &[]).await;
    let client = reqwest::Client::new();
    let before = scrape(&sidecar).await;
    assert_eq!(sample(&before, "countersink_events_received_total"), 0.0);
    assert_eq!(sample(&before, "countersink_last_flush_success_timestamp_seconds"), 0.0);
    assert_eq!(sample(&before, "countersink_dependency_errors_total{dependency=\"redis\"}"), 0.0);

    // Three events: two creations and a duplicate delivery of the first.
    let created = |id: u64, user: u64| json!({"kind": "post_save", "notification_id": id, "user_id": user, "unread": true, "created": true});
    let batch = json!([created(1, 10), created(2, 11), created(1, 10)]);
    let response = signed_events(&client, sidecar.url("/v1/events"), &batch).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // A bad event and an unsigned request are rejected, each by its error code.
    let bad = json!([{"kind": "post_save", "notification_id": 3, "user_id": -1, "unread": true}]);
    let response = signed_events(&client, sidecar.url("/v1/events"), &bad).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let response = client.post(sidecar.url("/v1/events")).json(&batch).send().await.unwrap();
    assert_eq!(response.status(), 401);

    // The scrape needs the read token when one is set.
    assert_eq!(reqwest::get(sidecar.url("/metrics")).await.unwrap().status(), 401);
    let after = scrape(&sidecar).await;
    assert_eq!(sample(&after, "countersink_events_received_total"), 3.0);
    assert_eq!(sample(&after, "countersink_events_applied_total{outcome=\"changed\"}"), 2.0);
    assert_eq!(sample(&after, "countersink_events_duplicate_total{reason=\"stale\"}"), 1.0);
    assert_eq!(sample(&after, "countersink_event_requests_rejected_total{reason=\"invalid_event\"}"), 1.0);
    assert_eq!(sample(&after, "countersink_event_requests_rejected_total{reason=\"unauthorized\"}"), 1.0);
    assert_eq!(sample(&after, "countersink_pending_users"), 2.0);
    let events_ok =
        "countersink_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/events\",status=\"200\"}";
    assert_eq!(sample(&after, events_ok), 1.0);

    let response = client.post(sidecar.url("/v1/flush")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let flushed = scrape(&sidecar).await;
    assert_eq!(sample(&flushed, "countersink_flush_rows_total"), 2.0);
    assert_eq!(sample(&flushed, "countersink_flush_batches_total"), 1.0);
    assert_eq!(sample(&flushed, "countersink_flush_duration_seconds_count"), 1.0);
    assert_eq!(sample(&flushed, "countersink_pending_users"), 0.0);
    let last = sample(&flushed, "countersink_last_flush_success_timestamp_seconds");
    assert!((chrono::Utc::now().timestamp() as f64 - last).abs() < 60.0, "{last}");
}

#[tokio::test]
async fn a_sane_request_id_is_echoed_and_logged_and_others_are_replaced() {
    let env = TestEnv::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let sidecar = Sidecar::start_logging(&env, &env.core.redis_url, &[], Some(&log)).await;
    let client = reqwest::Client::new();
    let event = json!({"kind": "post_save", "notification_id": 1, "user_id": 1, "unread": true, "created": true});
    // A query string stands for one that carries a credential (the live stream's `?token=`).
    let url = sidecar.url("/v1/events?token=1700000000.c2VjcmV0LXRva2Vu");
    let request = signed_events(&client, url, &event).header("x-request-id", "django-7f3a:42");
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "django-7f3a:42");
    // The handler's own log line carries the id, through the request's span.
    let logged = support::eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).unwrap().lines().any(|line| {
            let line: Value = serde_json::from_str(line).unwrap_or_default();
            line["fields"]["message"] == "events applied"
                && line["span"]["request_id"] == "django-7f3a:42"
                && line["span"]["path"] == "/v1/events"
        })
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(logged, "{text}");
    assert!(!text.contains("c2VjcmV0LXRva2Vu"), "a query string reached the logs:\n{text}");
    for insane in ["has space", "quote\"d", &"x".repeat(200)] {
        let response = client.get(sidecar.url("/nowhere")).header("x-request-id", insane).send().await.unwrap();
        assert_eq!(response.status(), 404);
        let id = response.headers()["x-request-id"].to_str().unwrap();
        assert!(id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()), "{insane:?} became {id:?}");
    }
}

#[tokio::test]
async fn a_scrape_survives_redis_being_down_and_counts_the_error() {
    let env = TestEnv::sqlite().await;
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start(&env, &dead_redis, &[]).await;
    let samples = scrape(&sidecar).await;
    assert!(sample(&samples, "countersink_dependency_errors_total{dependency=\"redis\"}") >= 1.0);
    assert_eq!(sample(&samples, "countersink_dependency_errors_total{dependency=\"database\"}"), 0.0);
}

async fn readyz(state: AppState) -> (StatusCode, Value) {
    let request = Request::get("/readyz").body(Body::empty()).unwrap();
    let response = countersink::http::router(state).oneshot(request).await.unwrap();
    let status = response.status();
    (status, serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap())
}

fn failing_checks(body: &Value) -> Vec<&str> {
    body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn readyz_names_each_failing_check_without_side_effects() {
    let env = TestEnv::sqlite().await;
    let (status, body) = readyz(env.state()).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ready")), "{body}");

    // A database never migrated: not ready, and asking did not migrate it.
    let dir = tempfile::tempdir().unwrap();
    let mut fresh = env.core.clone();
    fresh.database_url = format!("sqlite://{}", dir.path().join("fresh.sqlite3").display());
    let (status, body) = readyz(AppState::new(&fresh, None).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failing_checks(&body), ["migrations"], "{body}");
    assert!(body["checks"][2]["error"].as_str().unwrap().contains("20261122000001"), "{body}");
    let (_, again) = readyz(AppState::new(&fresh, None).unwrap()).await;
    assert_eq!(failing_checks(&again), ["migrations"], "{again}");

    // Redis down.
    let mut no_redis = env.core.clone();
    no_redis.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let (status, body) = readyz(AppState::new(&no_redis, None).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failing_checks(&body), ["redis"], "{body}");
    assert_eq!(body["checks"][0]["error"], "unavailable");
}

/// While the Redis state waits for a rebuild from the Notification table (a bootstrap running, or
/// waiting for `countersink bootstrap`), events and reads answer 503: `/readyz` says so too, and
/// why, rather than sending traffic to a process that cannot serve it (issue #14).
#[tokio::test]
async fn readyz_is_not_ready_while_the_redis_state_waits_for_a_rebuild() {
    let env = TestEnv::sqlite_with_source().await;
    let (status, body) = readyz(env.state()).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ready")), "{body}");

    // The marker a bootstrap sets when it is done, gone: as when Redis lost its data.
    let _: () = redis::Commands::del(&mut env.redis(), env.key("ready")).unwrap();
    let (status, body) = readyz(env.state()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(failing_checks(&body), ["redis_state"], "{body}");
    let error = body["checks"][3]["error"].as_str().unwrap();
    assert!(error.contains("bootstrap"), "{body}");

    // Once rebuilt, ready again.
    env.state()
        .bootstrapper
        .bootstrap(countersink::bootstrap::Batching::default(), countersink::bootstrap::Rebuild::Always, |_| {})
        .await
        .unwrap();
    let (status, body) = readyz(env.state()).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ready")), "{body}");
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_refuses_new_ones_and_flushes() {
    let env = TestEnv::postgres().await;
    let sidecar = Sidecar::start(&env, &env.core.redis_url, &["--shutdown-timeout-secs", "10"]).await;
    let client = reqwest::Client::new();
    let batch = json!([
        {"kind": "post_save", "notification_id": 1, "user_id": 20, "unread": true, "created": true},
        {"kind": "post_save", "notification_id": 2, "user_id": 21, "unread": true, "created": true},
    ]);
    assert_eq!(signed_events(&client, sidecar.url("/v1/events"), &batch).send().await.unwrap().status(), 200);

    // A slow request: its headers and half its body are sent before SIGTERM, the rest after.
    let body = serde_json::to_vec(
        &json!([{"kind": "post_save", "notification_id": 3, "user_id": 22, "unread": true, "created": true}]),
    )
    .unwrap();
    let (id, timestamp) = ("msg_slow", chrono::Utc::now().timestamp());
    let signature = SECRET.parse::<WebhookSecret>().unwrap().sign(id, timestamp, &body);
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         webhook-id: {id}\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", sidecar.port)).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    sidecar.terminate();
    let refused = support::eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", sidecar.port)).is_err()
    })
    .await;
    assert!(refused, "new connections are still accepted after SIGTERM");

    slow.write_all(&body[10..]).await.unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"changed\":1"), "{answer}");

    let mut sidecar = sidecar;
    let status = tokio::task::spawn_blocking(move || {
        let status = sidecar.child.wait().unwrap();
        (sidecar, status)
    })
    .await
    .unwrap()
    .1;
    assert!(status.success(), "exit status {status}");
    // The final flush wrote every count, the slow request's too, and left nothing pending.
    assert_eq!(env.stored_counts().await, HashMap::from([(20, 1), (21, 1), (22, 1)]));
    assert_eq!(env.state().store.pending_users().await.unwrap(), 0);
}

#[tokio::test]
async fn a_request_slower_than_the_shutdown_deadline_does_not_hold_the_exit() {
    let env = TestEnv::sqlite().await;
    let mut sidecar = Sidecar::start(&env, &env.core.redis_url, &["--shutdown-timeout-secs", "1"]).await;
    // Headers promising a body that never comes.
    let mut stuck = tokio::net::TcpStream::connect(("127.0.0.1", sidecar.port)).await.unwrap();
    stuck.write_all(b"POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    sidecar.terminate();
    let exited = support::eventually(Duration::from_secs(10), || matches!(sidecar.child.try_wait(), Ok(Some(_)))).await;
    assert!(exited, "still running 10 s after SIGTERM");
    let status = sidecar.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() >= Duration::from_millis(900), "it did not wait for the request in flight");
}

#[tokio::test]
async fn readyz_reports_an_unmigrated_postgres_or_mysql_database() {
    use diesel::{Connection, RunQueryDsl};
    let env = TestEnv::sqlite().await;
    let name = format!("cstest_fresh_{:016x}", rand::random::<u64>());
    let mut pg = diesel::PgConnection::establish(&support::postgres_url()).unwrap();
    diesel::sql_query(format!("CREATE SCHEMA {name}")).execute(&mut pg).unwrap();
    let mut mysql = diesel::MysqlConnection::establish(&support::mysql_url()).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut mysql).unwrap();
    let urls = [
        format!("{}?options=-csearch_path%3D{name}", support::postgres_url()),
        format!("{}/{name}", support::mysql_url().rsplit_once('/').unwrap().0),
    ];
    for url in urls {
        let mut fresh = env.core.clone();
        fresh.database_url = url.clone();
        let (status, body) = readyz(AppState::new(&fresh, None).unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{url}: {body}");
        assert_eq!(failing_checks(&body), ["migrations"], "{url}: {body}");
        // Not a database error: the pending migrations, by name.
        assert!(body["checks"][2]["error"].as_str().unwrap().contains("20261122000001"), "{url}: {body}");
    }
    diesel::sql_query(format!("DROP SCHEMA {name} CASCADE")).execute(&mut pg).unwrap();
    diesel::sql_query(format!("DROP DATABASE {name}")).execute(&mut mysql).unwrap();
}
