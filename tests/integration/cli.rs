//! The binary's subcommands (`migrate` on a fresh database of each backend, `flush`) and the
//! settings that stop start-up, naming the flag and the variable: invalid values, zero counts and
//! timeouts, an idempotency TTL shorter than the signature window, a Redis that may evict keys.

use std::process::{Command, Output};

use countersink::events::Event;
use support::{MysqlDatabase, TestEnv};

fn countersink(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_countersink"))
        .env("COUNTERSINK_REDIS_URL", &env.core.redis_url)
        .env("COUNTERSINK_REDIS_PREFIX", &env.core.redis_prefix)
        .env("COUNTERSINK_DATABASE_URL", &env.core.database_url)
        .env("COUNTERSINK_LOG", "warn")
        .env_remove("COUNTERSINK_WEBHOOK_SECRET")
        .env_remove("COUNTERSINK_ADMIN_TOKEN")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_flush_prints_what_it_wrote() {
    let env = TestEnv::postgres().await;
    let migrate = countersink(&env, &["migrate"]);
    assert!(migrate.status.success());
    assert_eq!(String::from_utf8_lossy(&migrate.stdout).trim(), "no migrations to apply");

    let state = env.state();
    state.store.apply(&[Event::save(1, 8, true, true), Event::save(2, 9, true, true)]).await.unwrap();
    let flush = countersink(&env, &["flush"]);
    assert!(flush.status.success(), "{}", String::from_utf8_lossy(&flush.stderr));
    let report: serde_json::Value = serde_json::from_slice(&flush.stdout).unwrap();
    assert_eq!(report["users_written"], 2);
    let counts = state.reader.unread_counts(&[8, 9]).await.unwrap();
    assert!(counts.iter().all(|c| c.unread_count == 1), "{counts:?}");
    assert_eq!(env.stored_counts().await, std::collections::HashMap::from([(8, 1), (9, 1)]));
}

#[tokio::test]
async fn fresh_sqlite_database_is_migrated_by_the_migrate_command() {
    let env = TestEnv::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fresh.sqlite3").display());
    let output = countersink(&env, &["--database-url", &url, "migrate"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("applied: "));
}

#[tokio::test]
async fn fresh_mysql_database_is_migrated_by_the_migrate_command() {
    let env = TestEnv::sqlite().await;
    let database = MysqlDatabase::create();
    let output = countersink(&env, &["--database-url", &database.url, "migrate"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("applied: "));
    // The tables are there, with the latest migration's column.
    let db = countersink::db::Db::connect(&database.url, 1, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(db.run(countersink::db::queries::max_handoff_seq).await.unwrap(), 0);
    // The mariadb:// scheme names the same backend; everything is applied already.
    let mariadb = database.url.replacen("mysql://", "mariadb://", 1);
    let again = countersink(&env, &["--database-url", &mariadb, "migrate"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "no migrations to apply");
}

#[tokio::test]
async fn invalid_settings_stop_start_up_naming_the_variable() {
    let env = TestEnv::sqlite().await;
    let cases: [(&[&str], &str); 17] = [
        (&["serve"], "COUNTERSINK_WEBHOOK_SECRET"),
        (&["serve", "--webhook-secret", "not-a-whsec-secret"], "COUNTERSINK_WEBHOOK_SECRET"),
        (&["--database-url", "sqlite://", "migrate"], "COUNTERSINK_DATABASE_URL"),
        (&["--database-url", "http://example", "migrate"], "COUNTERSINK_DATABASE_URL"),
        (&["--redis-url", "localhost:6379", "flush"], "COUNTERSINK_REDIS_URL"),
        // TLS is not built in: refused with a word on what to do, not at the first connection.
        (
            &["--redis-url", "rediss://127.0.0.1:6380", "flush"],
            "TLS to Redis (rediss://) is not built into this binary",
        ),
        (&["--redis-cluster-nodes", "127.0.0.1", "flush"], "COUNTERSINK_REDIS_CLUSTER_NODES"),
        (
            &["--redis-cluster-nodes", "127.0.0.1:7000", "--redis-url", "redis://127.0.0.1/3", "flush"],
            "database 0 only",
        ),
        (&["--worker-threads", "100000", "flush"], "COUNTERSINK_WORKER_THREADS"),
        (&["--flush-chunk-users", "20000", "flush"], "COUNTERSINK_FLUSH_CHUNK_USERS"),
        (&["serve", "--flush-cron", "every minute"], "COUNTERSINK_FLUSH_CRON"),
        (&["serve", "--insecure-no-auth", "--max-read-users", "20000"], "COUNTERSINK_MAX_READ_USERS"),
        (&["serve", "--insecure-no-auth", "--max-connections", "1000"], "COUNTERSINK_MAX_CONNECTIONS"),
        (&["serve", "--insecure-no-auth", "--max-stream-token-secs", "90000"], "COUNTERSINK_MAX_STREAM_TOKEN_SECS"),
        (&["serve", "--insecure-no-auth", "--reconcile-cron", "0 * * * * *"], "COUNTERSINK_SOURCE_TABLE"),
        (&["--redis-sentinels", "127.0.0.1:26379", "flush"], "COUNTERSINK_REDIS_SENTINEL_MASTER"),
        (&["serve", "--insecure-no-auth", "--redis-wait-timeout-ms", "60000"], "COUNTERSINK_REDIS_WAIT_TIMEOUT_MS"),
    ];
    for (args, variable) in cases {
        let output = countersink(&env, args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{args:?}: {stderr}");
    }
}

/// What a `serve` that should stop at start-up printed: it is given 10 s to exit, then killed (a
/// service that starts instead fails the test's assertions, not its time).
fn output_within_10_s(mut serve: std::process::Child) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while serve.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = serve.kill();
    serve.wait_with_output().unwrap()
}

/// A count or a timeout of 0, given as a flag or as its variable, stops start-up with an error
/// naming both (`at_least_one` in config.rs holds them all).
#[tokio::test]
async fn a_zero_count_or_timeout_stops_start_up_naming_the_flag_and_the_variable() {
    let env = TestEnv::sqlite().await;
    for (flag, variable) in [
        ("--header-timeout-secs", "COUNTERSINK_HEADER_TIMEOUT_SECS"),
        ("--max-live-streams-per-user", "COUNTERSINK_MAX_LIVE_STREAMS_PER_USER"),
        ("--db-pool-size", "COUNTERSINK_DB_POOL_SIZE"),
        ("--worker-threads", "COUNTERSINK_WORKER_THREADS"),
    ] {
        for by_variable in [false, true] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_countersink"));
            command
                .env("COUNTERSINK_DATABASE_URL", &env.core.database_url)
                .args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0"])
                .stderr(std::process::Stdio::piped());
            if by_variable {
                command.env(variable, "0");
            } else {
                command.args([flag, "0"]);
            }
            let output = output_within_10_s(command.spawn().unwrap());
            assert!(!output.status.success(), "{flag} 0 started");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains(flag) && stderr.contains(variable) && stderr.contains("at least 1"), "{stderr}");
        }
    }
}

/// Issue #15: with a 60 s idempotency TTL inside the 300 s signature tolerance, a captured request
/// resent after 62 s was applied again. Such a setting no longer starts.
#[tokio::test]
async fn an_idempotency_ttl_shorter_than_the_signature_window_stops_start_up() {
    let env = TestEnv::sqlite().await;
    let serve = Command::new(env!("CARGO_BIN_EXE_countersink"))
        .env("COUNTERSINK_DATABASE_URL", &env.core.database_url)
        .args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0", "--idempotency-ttl-secs", "599"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Before the check, such a setting started the service.
    let output = output_within_10_s(serve);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("COUNTERSINK_IDEMPOTENCY_TTL_SECS") && stderr.contains("at least 600"), "{stderr}");
}

/// Issue #14's third reproduction, at its root: with `maxmemory` and an evicting policy Redis
/// dropped state and pending keys, and counts went wrong without a word. A Redis that may evict
/// now stops start-up, saying what to set; the flag for tests lets it start.
#[tokio::test]
async fn a_redis_that_may_evict_keys_stops_start_up() {
    let env = TestEnv::sqlite().await;
    let redis = support::OwnRedis::start(support::free_port());
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("allkeys-lru").query(&mut conn).unwrap();
    let serve = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_countersink"))
            .env("COUNTERSINK_DATABASE_URL", &env.core.database_url)
            .env("COUNTERSINK_REDIS_URL", redis.url())
            .args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Before the check it started and ran.
    let refused = output_within_10_s(serve(&[]));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("maxmemory-policy allkeys-lru") && stderr.contains("noeviction"), "{stderr}");
    assert!(stderr.contains("COUNTERSINK_ALLOW_REDIS_EVICTION"), "{stderr}");

    // Allowed, it starts (and runs until stopped).
    let mut allowed = serve(&["--allow-redis-eviction", "true"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(allowed.try_wait().unwrap().is_none(), "it should be running");
    allowed.kill().unwrap();
    let output = allowed.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("may evict keys"));
}
