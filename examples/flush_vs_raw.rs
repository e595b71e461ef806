//! The flush against the raw `unnest` upsert of the same rows, for 100,000 and 1,000,000 dirty
//! users (or the sizes given): a focused form of the bench's flush scenario, for comparing flush
//! changes on a busy machine by the ratio, which moves less than either rate.
//!
//! ```sh
//! cargo run --release --example flush_vs_raw                  # 100,000 and 1,000,000 users
//! cargo run --release --example flush_vs_raw -- 100000 300000 # other sizes
//! ```
//! Uses PostgreSQL at `COUNTERSINK_TEST_POSTGRES_URL` and Redis at `COUNTERSINK_TEST_REDIS_URL`
//! (the test defaults) in a schema and a prefix of its own, removed at the end.
// clippy computes the layout of main's future (a flush and the store's connection types
// nested in it) past the default query depth of 128.
#![recursion_limit = "256"]

use std::time::{Duration, Instant};

use countersink::app::AppState;
use countersink::config::{CoreConfig, LogFormat};
use countersink::events::Event;
use countersink::flush::WhenBusy;
use diesel::sql_types::{Array, BigInt};
use diesel::{Connection, PgConnection, RunQueryDsl};

/// Rows per raw upsert statement, as the flush's default chunk.
const CHUNK: usize = 5_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<u64> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() { vec![100_000, 1_000_000] } else { sizes };
    let postgres = std::env::var("COUNTERSINK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis_url = std::env::var("COUNTERSINK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut admin = PgConnection::establish(&postgres)?;
    for users in sizes {
        let name = format!("csbench_{:08x}", rand::random::<u32>());
        diesel::sql_query(format!("CREATE SCHEMA {name}")).execute(&mut admin)?;
        let url = format!("{postgres}?options=-csearch_path%3D{name}");
        let core = CoreConfig {
            redis_url: redis_url.clone(),
            redis_prefix: name.clone(),
            redis_sentinels: Vec::new(),
            redis_sentinel_master: None,
            redis_cluster_nodes: Vec::new(),
            database_url: url.clone(),
            db_pool_size: 4,
            db_timeout_secs: 10,
            flush_chunk_users: CHUNK,
            flush_lock_ttl_secs: 600,
            flush_timeout_secs: 600,
            source: countersink::config::SourceConfig::default(),
            worker_threads: None,
            log_format: LogFormat::Text,
        };
        let result = run(&core, &url, users).await;
        diesel::sql_query(format!("DROP SCHEMA {name} CASCADE")).execute(&mut admin)?;
        let mut redis = redis::Client::open(redis_url.as_str())?.get_connection()?;
        let keys: Vec<String> =
            redis::Commands::scan_match(&mut redis, format!("{{{name}}}:*"))?.filter_map(Result::ok).collect();
        for chunk in keys.chunks(1_000) {
            redis::Commands::unlink::<_, ()>(&mut redis, chunk)?;
        }
        result?;
    }
    Ok(())
}

async fn run(core: &CoreConfig, url: &str, users: u64) -> anyhow::Result<()> {
    let state = AppState::new(core, None)?;
    state.db.migrate().await?;
    let events: Vec<Event> = (1..=users).map(|u| Event::save(u, u, true, true)).collect();
    for chunk in events.chunks(1_000) {
        state.store.apply(chunk).await?;
    }
    let started = Instant::now();
    let report = state.flusher.flush(WhenBusy::Wait(Duration::from_secs(60))).await?;
    let flush_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(report.users_written == users, "flushed {} of {users} users", report.users_written);

    // The same rows from memory into the emptied table, so both write new rows.
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query("TRUNCATE countersink_usernotificationscount").execute(&mut conn)?;
    let started = Instant::now();
    conn.transaction(|conn| {
        let ids: Vec<i64> = (1..=users as i64).collect();
        for chunk in ids.chunks(CHUNK) {
            diesel::sql_query(
                "INSERT INTO countersink_usernotificationscount (user_id, unread_count) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[]) \
                 ON CONFLICT (user_id) DO UPDATE SET unread_count = \
                 countersink_usernotificationscount.unread_count + excluded.unread_count",
            )
            .bind::<Array<BigInt>, _>(chunk.to_vec())
            .bind::<Array<BigInt>, _>(vec![1i64; chunk.len()])
            .execute(conn)?;
        }
        diesel::QueryResult::Ok(())
    })?;
    let raw_s = started.elapsed().as_secs_f64();
    println!(
        "{users} users: flush {:.0} users/s, raw unnest upsert {:.0} users/s, flush = {:.0}% of raw",
        users as f64 / flush_s,
        users as f64 / raw_s,
        100.0 * raw_s / flush_s
    );
    Ok(())
}
