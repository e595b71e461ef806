//! The real sidecar binary for end-to-end tests: started on a free port over a test's prefix and
//! database, fed signed events the way the Django package sends them, and killed with SIGKILL
//! (a crash) or dropped (stopped).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use countersink::webhook::WebhookSecret;
use serde_json::Value;

use super::TestEnv;

/// The signing secret every test sidecar uses.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The admin token every test sidecar uses.
pub const ADMIN_TOKEN: &str = "end-to-end-admin-token";

/// How a sidecar is started.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// `--flush-cron` (`off` for none).
    pub flush_cron: String,
    /// A crash point to stop at (`COUNTERSINK_CRASH_POINT`, see src/crash_point.rs).
    pub crash_point: Option<&'static str>,
    /// A file whose existence lets the process go on past its crash point
    /// (`COUNTERSINK_CRASH_RESUME_FILE`).
    pub resume_file: Option<std::path::PathBuf>,
    /// Flags added after `serve`.
    pub serve_args: Vec<String>,
    /// The port to listen on (a free one if `None`); a restart can keep its predecessor's.
    pub port: Option<u16>,
    /// Redis and database URLs other than the test's (a test-owned server, a proxy).
    pub redis_url: Option<String>,
    /// See `redis_url`.
    pub database_url: Option<String>,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            flush_cron: "*/1 * * * * *".into(),
            crash_point: None,
            resume_file: None,
            serve_args: Vec::new(),
            port: None,
            redis_url: None,
            database_url: None,
        }
    }
}

/// The binary to start: `COUNTERSINK_TEST_BINARY` when set (a release build, for measurements
/// such as tests/integration/hostile.rs's; it has no crash points, so tests/crash.rs needs the
/// default), else the one cargo built for the tests. This crate is not a test of countersink's, so
/// `env!("CARGO_BIN_EXE_countersink")` is not set when it compiles: cargo sets that variable when
/// it runs a test (cargo 1.94 and later, rust-lang/cargo#16421), and a test executable started by hand (or by an older cargo)
/// finds the binary where cargo puts both, `target/<profile>/` above its own `deps/`.
pub fn binary() -> std::ffi::OsString {
    if let Some(binary) =
        std::env::var_os("COUNTERSINK_TEST_BINARY").or_else(|| std::env::var_os("CARGO_BIN_EXE_countersink"))
    {
        return binary;
    }
    let test = std::env::current_exe().unwrap();
    let beside = test.parent().and_then(std::path::Path::parent).map(|profile| profile.join("countersink"));
    match beside {
        Some(binary) if binary.is_file() => binary.into_os_string(),
        _ => panic!(
            "no countersink binary beside {}: run the tests with cargo, or set COUNTERSINK_TEST_BINARY",
            test.display()
        ),
    }
}

/// A running sidecar process, killed when dropped.
pub struct Sidecar {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stderr: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

impl Sidecar {
    /// Starts the binary over `env` (its source mapping included) and waits until it answers.
    pub async fn start(env: &TestEnv, options: SidecarOptions) -> Sidecar {
        let port = options.port.unwrap_or_else(super::free_port);
        let mut command = Command::new(binary());
        command
            .args(["--redis-url", options.redis_url.as_ref().unwrap_or(&env.core.redis_url)])
            .args(["--redis-prefix", &env.core.redis_prefix])
            .args(["--database-url", options.database_url.as_ref().unwrap_or(&env.core.database_url)])
            .args(["--flush-chunk-users", "300"]);
        let source = &env.core.source;
        if let Some(table) = &source.source_table {
            command.args(["--source-table", table]);
        }
        if let Some(column) = &source.source_deleted_column {
            command.args(["--source-deleted-column", column]);
        }
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--flush-cron", &options.flush_cron])
            .args(&options.serve_args)
            .env("COUNTERSINK_LOG", "warn")
            .env("COUNTERSINK_WEBHOOK_SECRET", SECRET)
            .env("COUNTERSINK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("COUNTERSINK_CRASH_POINT")
            .env_remove("COUNTERSINK_CRASH_RESUME_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(point) = options.crash_point {
            command.env("COUNTERSINK_CRASH_POINT", point);
        }
        if let Some(file) = &options.resume_file {
            command.env("COUNTERSINK_CRASH_RESUME_FILE", file);
        }
        let mut child = command.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().unwrap();
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let sidecar =
            Sidecar { child, base: format!("http://127.0.0.1:{port}"), stderr, client: reqwest::Client::new() };
        for _ in 0..400 {
            let health = sidecar.client.get(format!("{}/healthz", sidecar.base)).send().await;
            if health.is_ok_and(|response| response.status().is_success()) {
                return sidecar;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the sidecar did not answer /healthz; stderr:\n{}", sidecar.stderr_text());
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until the process announces that it stopped at its crash point.
    pub async fn reached_crash_point(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.stderr.lock().unwrap().iter().any(|line| line.starts_with(countersink::crash_point::REACHED)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// The CPU time the process has used so far (user + system), from `/proc/{pid}/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces) start after its closing paren.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // The kernel's USER_HZ is 100 on every Linux this runs on.
        Duration::from_millis(ticks * 10)
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILL: the process dies wherever it is, with no clean-up of any kind.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Posts signed events; the response status and body. Connection failures are `None`.
    pub async fn post_events(&self, events: &[Value]) -> Option<(u16, Value)> {
        post_signed(&self.client, &self.base, &new_webhook_id(), events).await
    }

    /// Posts signed events, retrying like the Django package until they are accepted.
    pub async fn post_events_until_accepted(&self, events: &[Value]) {
        if !post_until_accepted(&self.client, &self.base, events, Duration::from_secs(10)).await {
            panic!("events were not accepted within 10 s; stderr:\n{}", self.stderr_text());
        }
    }

    /// `POST` to an admin endpoint; status and body, `None` if the connection failed.
    pub async fn admin_post(&self, path: &str, body: Value, limit: Duration) -> Option<(u16, Value)> {
        admin_post(&self.client, &self.base, path, body, limit).await
    }

    /// Flushes now and asserts it worked.
    pub async fn flush(&self) -> Value {
        match self.admin_post("/v1/flush", Value::Null, Duration::from_secs(60)).await {
            Some((200, report)) => report,
            other => panic!("flush failed: {other:?}; stderr:\n{}", self.stderr_text()),
        }
    }

    /// The real-time counts the read API gives for `users`, as `(user, unread_count)`.
    pub async fn read_counts(&self, users: &[u64]) -> Vec<(u64, i64)> {
        let entries = self.read_entries(users).await;
        entries.iter().map(|e| (e["user_id"].as_u64().unwrap(), e["unread_count"].as_i64().unwrap())).collect()
    }

    /// What the read API answers for `users`: one `{user_id, unread_count}` each.
    pub async fn read_entries(&self, users: &[u64]) -> Vec<Value> {
        let mut entries = Vec::new();
        for chunk in users.chunks(500) {
            let ids = chunk.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            let read: Value = self
                .client
                .get(format!("{}/v1/unread-counts?user_ids={ids}", self.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let counts = read["counts"].as_array().unwrap_or_else(|| panic!("unexpected read answer {read}"));
            entries.extend(counts.iter().cloned());
        }
        entries
    }
}

/// `POST` with the admin token to the sidecar at `base`; status and body, `None` if no answer came.
pub async fn admin_post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
    limit: Duration,
) -> Option<(u16, Value)> {
    let response =
        client.post(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN).json(&body).timeout(limit).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// A fresh `webhook-id`.
pub fn new_webhook_id() -> String {
    format!("msg_{:032x}", rand::random::<u128>())
}

/// Posts `events` to the sidecar at `base`, signed as the Django package signs them; the status
/// and body, or `None` if no answer came (refused, reset, timed out).
pub async fn post_signed(
    client: &reqwest::Client,
    base: &str,
    webhook_id: &str,
    events: &[Value],
) -> Option<(u16, Value)> {
    let body = serde_json::to_vec(events).unwrap();
    let timestamp = chrono::Utc::now().timestamp();
    let secret: WebhookSecret = SECRET.parse().unwrap();
    let response = client
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/json")
        .header("webhook-id", webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", secret.sign(webhook_id, timestamp, &body))
        .timeout(Duration::from_secs(10))
        .body(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// Issue #15's signature-amplification request: a 1,000-event body under a `webhook-signature`
/// of 10,000 forged `v1,` candidates (one HMAC of the body each, before the fix), as
/// `webhook-id` `msg_forged_{n}`. The sidecar must refuse it (401) before any HMAC.
pub fn forged_amplification(client: &reqwest::Client, base: &str, n: usize) -> reqwest::RequestBuilder {
    let forged = vec!["v1,AAAA"; 10_000].join(" ");
    let body = format!("[{}]", vec![r#"{"kind":"post_delete","notification_id":1,"user_id":2}"#; 1_000].join(","));
    client
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/json")
        .header("webhook-id", format!("msg_forged_{n}"))
        .header("webhook-timestamp", chrono::Utc::now().timestamp().to_string())
        .header("webhook-signature", forged)
        .body(body)
        .timeout(Duration::from_secs(10))
}

/// Sends one request, retrying it (same `webhook-id`, as the Django package does) on 503 and on
/// no answer, for up to `limit`; whether it was accepted. Any other refusal panics.
pub async fn post_until_accepted(client: &reqwest::Client, base: &str, events: &[Value], limit: Duration) -> bool {
    let webhook_id = new_webhook_id();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match post_signed(client, base, &webhook_id, events).await {
            Some((200, _)) => return true,
            Some((status, body)) if status != 503 => panic!("events refused: {status} {body}"),
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    false
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
