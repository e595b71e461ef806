//! Bootstraps from a Notification table of 10,000,000 rows for 1,000,000 users in PostgreSQL
//! and prints how long it took (the target: under 60 seconds on the 2-core machine).
//!
//! ```sh
//! cargo run --release --example bootstrap_bench                 # 10,000,000 notifications
//! cargo run --release --example bootstrap_bench -- 1000000      # another size
//! ```
//! Uses PostgreSQL at `COUNTERSINK_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! in a schema of its own, and Redis at `COUNTERSINK_TEST_REDIS_URL` under a prefix of its own;
//! both are removed at the end. Making the table takes longer than the bootstrap.

use std::time::Instant;

use anyhow::Context;
use countersink::app::AppState;
use countersink::config::SourceConfig;
use countersink::config::{CoreConfig, LogFormat};
use diesel::{Connection, PgConnection, RunQueryDsl};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows: u64 =
        std::env::args().nth(1).map(|s| s.parse()).transpose().context("rows must be a number")?.unwrap_or(10_000_000);
    let users = (rows / 10).max(1);
    let postgres = std::env::var("COUNTERSINK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis_url = std::env::var("COUNTERSINK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let name = format!("csbench_{:08x}", rand::random::<u32>());
    let schema_url = format!("{postgres}?options=-csearch_path%3D{name}");

    let mut admin = PgConnection::establish(&postgres)?;
    diesel::sql_query(format!("CREATE SCHEMA {name}")).execute(&mut admin)?;
    let result = run(&schema_url, &redis_url, &name, rows, users).await;

    diesel::sql_query(format!("DROP SCHEMA {name} CASCADE")).execute(&mut admin)?;
    let mut redis = redis::Client::open(redis_url)?.get_connection()?;
    let keys: Vec<String> =
        redis::Commands::scan_match(&mut redis, format!("{{{name}}}:*"))?.filter_map(Result::ok).collect();
    for chunk in keys.chunks(1_000) {
        redis::Commands::del::<_, ()>(&mut redis, chunk)?;
    }
    result
}

async fn run(database_url: &str, redis_url: &str, prefix: &str, rows: u64, users: u64) -> anyhow::Result<()> {
    println!("making {rows} notifications for {users} users...");
    let made = Instant::now();
    let mut conn = PgConnection::establish(database_url)?;
    diesel::sql_query(
        "CREATE TABLE notifications_notification (id BIGINT NOT NULL, recipient_id BIGINT NOT NULL, unread BOOLEAN NOT NULL)",
    )
    .execute(&mut conn)?;
    diesel::sql_query(format!(
        "INSERT INTO notifications_notification SELECT g, g % {users}, g % 3 <> 0 FROM generate_series(1, {rows}) AS g"
    ))
    .execute(&mut conn)?;
    diesel::sql_query("ALTER TABLE notifications_notification ADD PRIMARY KEY (id)").execute(&mut conn)?;
    diesel::sql_query("ANALYZE notifications_notification").execute(&mut conn)?;
    println!("table ready in {:.1} s", made.elapsed().as_secs_f64());

    let core = CoreConfig {
        redis_url: redis_url.to_string(),
        redis_prefix: prefix.to_string(),
        redis_sentinels: Vec::new(),
        redis_sentinel_master: None,
        redis_cluster_nodes: Vec::new(),
        database_url: database_url.to_string(),
        db_pool_size: 4,
        db_timeout_secs: 30,
        flush_chunk_users: 5_000,
        flush_lock_ttl_secs: 600,
        flush_timeout_secs: 600,
        source: SourceConfig { source_table: Some("notifications_notification".into()), ..SourceConfig::default() },
        worker_threads: None,
        log_format: LogFormat::Text,
    };
    let state = AppState::new(&core, None)?;
    state.db.migrate().await?;
    let started = Instant::now();
    let report = state
        .bootstrapper
        .bootstrap(
            countersink::bootstrap::Batching::default(),
            countersink::bootstrap::Rebuild::Always,
            countersink::bootstrap::progress_printer(),
        )
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "bootstrap: {} notifications, {} users written, in {seconds:.1} s ({:.0} notifications/s; reading and states {:.1} s, writing counts {:.1} s)",
        report.notifications,
        report.users_written,
        report.notifications as f64 / seconds,
        report.states_ms as f64 / 1000.0,
        seconds - report.states_ms as f64 / 1000.0,
    );
    let pending = state.store.pending_users().await?;
    anyhow::ensure!(report.notifications == rows && pending == 0, "bootstrap incomplete");
    Ok(())
}
