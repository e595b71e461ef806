//! Flushes 1,000,000 dirty users into PostgreSQL and reports the time taken and the peak
//! resident memory the flush added: a flush streams its batch in chunks, so memory stays flat.
//!
//! ```sh
//! cargo run --release --example flush_memory            # 1,000,000 users
//! cargo run --release --example flush_memory -- 100000  # another size
//! ```
//! Uses PostgreSQL at `COUNTERSINK_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! in a schema of its own, and Redis at `COUNTERSINK_TEST_REDIS_URL` under a prefix of its own;
//! both are removed at the end.
// clippy computes the layout of main's future (a flush and the store's connection types
// nested in it) past the default query depth of 128.
#![recursion_limit = "256"]

use std::time::{Duration, Instant};

use anyhow::Context;
use countersink::app::AppState;
use countersink::config::{CoreConfig, LogFormat};
use countersink::events::Event;
use countersink::flush::WhenBusy;
use diesel::{Connection, PgConnection, RunQueryDsl};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let users: u64 =
        std::env::args().nth(1).map(|s| s.parse()).transpose().context("users must be a number")?.unwrap_or(1_000_000);
    let postgres = std::env::var("COUNTERSINK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis_url = std::env::var("COUNTERSINK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let name = format!("csbench_{:08x}", rand::random::<u32>());

    let mut admin = PgConnection::establish(&postgres)?;
    diesel::sql_query(format!("CREATE SCHEMA {name}")).execute(&mut admin)?;
    let core = CoreConfig {
        redis_url: redis_url.clone(),
        redis_prefix: name.clone(),
        redis_sentinels: Vec::new(),
        redis_sentinel_master: None,
        redis_cluster_nodes: Vec::new(),
        database_url: format!("{postgres}?options=-csearch_path%3D{name}"),
        db_pool_size: 4,
        db_timeout_secs: 10,
        flush_chunk_users: 5_000,
        flush_lock_ttl_secs: 600,
        flush_timeout_secs: 600,
        source: countersink::config::SourceConfig::default(),
        worker_threads: None,
        log_format: LogFormat::Text,
    };
    let result = run(&core, users).await;

    diesel::sql_query(format!("DROP SCHEMA {name} CASCADE")).execute(&mut admin)?;
    let mut redis = redis::Client::open(redis_url)?.get_connection()?;
    let keys: Vec<String> =
        redis::Commands::scan_match(&mut redis, format!("{{{name}}}:*"))?.filter_map(Result::ok).collect();
    if !keys.is_empty() {
        redis::Commands::del::<_, ()>(&mut redis, keys)?;
    }
    result
}

async fn run(core: &CoreConfig, users: u64) -> anyhow::Result<()> {
    let state = AppState::new(core, None)?;
    state.db.migrate().await?;
    println!("making {users} users dirty (one unread notification each)...");
    let mut batch = Vec::with_capacity(1_000);
    for user in 1..=users {
        batch.push(Event::save(user, user, true, true));
        if batch.len() == 1_000 || user == users {
            state.store.apply(&batch).await?;
            batch.clear();
        }
    }
    let rss_before = status_kib("VmRSS")?;
    reset_peak_rss()?;
    let started = Instant::now();
    let report = state.flusher.flush(WhenBusy::Wait(Duration::from_secs(60))).await?;
    let elapsed = started.elapsed();
    let peak = status_kib("VmHWM")?;
    anyhow::ensure!(report.users_written == users, "flushed {} users, expected {users}", report.users_written);
    println!(
        "flushed {users} users in {:.2} s: {:.0} users/s",
        elapsed.as_secs_f64(),
        users as f64 / elapsed.as_secs_f64()
    );
    println!(
        "resident memory: {:.1} MiB before the flush, {:.1} MiB peak during it (+{:.1} MiB)",
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(rss_before) as f64 / 1024.0
    );
    Ok(())
}

/// A `/proc/self/status` field in KiB (Linux).
fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix(" kB")?.parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// Resets the peak resident set (VmHWM) to the current one (Linux: `echo 5 > clear_refs`).
fn reset_peak_rss() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")
}
