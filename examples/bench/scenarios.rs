//! The run: sets up, measures every scenario, tears down. Returns the numbers; `report.rs`
//! writes them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use countersink::app::AppState;
use countersink::config::{CoreConfig, LogFormat};
use countersink::events::Event;
use countersink::flush::WhenBusy;
use countersink::store::{Idempotency, Store};
use countersink::webhook::WebhookSecret;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::{Connection, PgConnection, RunQueryDsl};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;

use crate::load::{self, CheckAnswer, MakeRequest, Measured};
use crate::procs::{self, Watched};
use crate::Args;

/// Users the spread scenarios pick from at random (and rows of the SQL peer's table).
const USERS: u64 = 1_000_000;
/// The hot user of the one-hot-user scenarios.
const HOT_USER: u64 = 7;
/// Events per request in the batched scenarios.
const BATCH: usize = 100;
/// Users per request in the batch-read scenario.
const READ_BATCH: usize = 100;
/// Notifications per user in the `SELECT count(*)` table; half of them unread (5,000).
const ROWS_PER_USER: u64 = 10_000;

/// One load scenario's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadResult {
    /// Short id (`ingest_single_spread`, ...), used by the report and the plot.
    pub id: String,
    /// What was measured.
    pub label: String,
    /// Connections (or tasks) used.
    pub connections: usize,
    /// The measurement.
    pub measured: Measured,
    /// Percent of one core used by each process during the scenario.
    pub cpu: BTreeMap<String, f64>,
}

/// Rows written to PostgreSQL per event, from `pg_stat_user_tables`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RowsWritten {
    /// Events sent.
    pub events: u64,
    /// Rows inserted or updated.
    pub rows: u64,
    /// Users the flush wrote (sidecar only).
    pub users_flushed: Option<u64>,
    /// Rows written into the count table (sidecar only).
    pub count_table_rows: Option<u64>,
}

/// One flush size's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlushResult {
    /// Dirty users.
    pub users: u64,
    /// The sidecar's flush (Redis hand-off, chunked reads, upserts, batch record).
    pub flush_users_per_s: f64,
    /// The same upsert statement (diesel, 5,000 rows per statement) from memory, one transaction.
    pub raw_upsert_users_per_s: f64,
    /// `INSERT ... SELECT unnest($1), unnest($2) ON CONFLICT DO UPDATE` from memory, one transaction.
    pub raw_unnest_users_per_s: f64,
}

/// `SELECT count(*)` for one user with 5,000 unread, one setting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CountResult {
    /// `enable_indexonlyscan`.
    pub index_only_scans: bool,
    /// Queries timed.
    pub queries: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Queries per second on one connection.
    pub per_s: f64,
    /// The plan's scan node and buffers, from `EXPLAIN (ANALYZE, BUFFERS)`.
    pub plan: String,
}

/// Everything a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    /// Machine and software.
    pub machine: BTreeMap<String, String>,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// Seconds measured per load scenario.
    pub seconds: u64,
    /// Load scenarios, in the order run.
    pub loads: Vec<LoadResult>,
    /// The sidecar's rows written.
    pub sidecar_rows: RowsWritten,
    /// The SQL peer's rows written.
    pub peer_rows: RowsWritten,
    /// Flush sizes.
    pub flushes: Vec<FlushResult>,
    /// Rows in the Notification table of the count scenario.
    pub count_table_rows: u64,
    /// `SELECT count(*)`, with and without index-only scans.
    pub counts: Vec<CountResult>,
    /// Redis bytes per tracked notification (state bitmaps, `MEMORY USAGE`).
    pub redis_bytes_per_notification: f64,
    /// Notifications tracked when that was measured.
    pub notifications_tracked: u64,
    /// Redis bytes of the pending set per dirty user.
    pub redis_pending_bytes_per_user: f64,
    /// Redis bytes of the held real-time counts per user (every user read once).
    pub redis_count_bytes_per_user: f64,
    /// Users read for the first time before the read scenarios.
    pub first_reads_users: u64,
    /// First reads (loads from SQL and Redis) of every user, 1,000 per request, 4 connections: users/s.
    pub first_reads_users_per_s: f64,
    /// Bytes per idempotency record (`webhook-id`, kept 1 h by default), packed in hashes.
    pub redis_webhook_record_bytes: f64,
    /// The sidecar's resident memory when idle before the load, MiB.
    pub sidecar_rss_idle_mib: f64,
    /// The sidecar's peak resident memory over the ingest and read scenarios, MiB.
    pub sidecar_rss_peak_mib: f64,
    /// CPU profiles (perf, when it can sample here).
    pub profiles: Vec<Profile>,
}

/// A flat CPU profile of one process during one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    /// The process sampled.
    pub process: String,
    /// The scenario it served.
    pub scenario: String,
    /// `perf report --sort dso`.
    pub by_object: String,
    /// `perf report --sort sym`.
    pub by_symbol: String,
}

/// `perf record` of `pid` for `seconds` while `load` runs (a repeat of `scenario` that is not counted).
async fn profiled(
    process: &str,
    pid: u32,
    scenario: &str,
    seconds: u64,
    load: impl std::future::Future<Output = anyhow::Result<load::Measured>>,
) -> anyhow::Result<Profile> {
    let data = std::path::PathBuf::from(format!(
        "target/bench/perf-{process}-{}.data",
        scenario.replace([' ', ',', '/'], "_")
    ));
    let mut perf = procs::start_perf(pid, seconds, &data)?;
    load.await?;
    perf.wait()?;
    let (by_object, by_symbol) = procs::perf_summary(&data)?;
    Ok(Profile { process: process.into(), scenario: scenario.into(), by_object, by_symbol })
}

/// What a run owns; dropped at the end (or on an error): children killed, keys and schemas removed.
struct Env {
    name: String,
    postgres_url: String,
    redis_url: String,
    children: Vec<Child>,
}

impl Env {
    fn schema_url(&self, schema: &str) -> String {
        format!("{}?options=-csearch_path%3D{schema}", self.postgres_url)
    }

    fn admin(&self) -> anyhow::Result<PgConnection> {
        PgConnection::establish(&self.postgres_url).context("connecting to PostgreSQL")
    }

    fn sql(&self, schema: &str, statement: &str) -> anyhow::Result<()> {
        let mut conn = PgConnection::establish(&self.schema_url(schema))?;
        diesel::sql_query(statement).execute(&mut conn).with_context(|| format!("running {statement}"))?;
        Ok(())
    }

    fn core(&self, prefix: &str, schema: &str) -> CoreConfig {
        CoreConfig {
            redis_url: self.redis_url.clone(),
            redis_prefix: prefix.to_string(),
            redis_sentinels: Vec::new(),
            redis_sentinel_master: None,
            redis_cluster_nodes: Vec::new(),
            database_url: self.schema_url(schema),
            db_pool_size: 8,
            db_timeout_secs: 30,
            flush_chunk_users: 5_000,
            flush_lock_ttl_secs: 600,
            flush_timeout_secs: 600,
            source: countersink::config::SourceConfig::default(),
            worker_threads: None,
            log_format: LogFormat::Text,
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(mut redis) = redis::Client::open(self.redis_url.as_str()).and_then(|c| c.get_connection()) {
            let _ = delete_keys(&mut redis, &format!("{{{}*", self.name));
        }
        if let Ok(mut admin) = PgConnection::establish(&self.postgres_url) {
            let _ = diesel::sql_query(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)).execute(&mut admin);
        }
    }
}

/// Runs every scenario.
pub async fn run(args: &Args) -> anyhow::Result<Results> {
    let seconds = args.seconds.unwrap_or(if args.quick { 2 } else { 10 });
    let measure = Duration::from_secs(seconds);
    let warmup = measure / 5;
    let c = args.connections;
    // The profiles are written here whatever --out says.
    std::fs::create_dir_all("target/bench")?;
    let mut env = Env {
        name: format!("csbench_{:08x}", rand::random::<u32>()),
        postgres_url: args.postgres_url.clone(),
        redis_url: args.redis_url.clone().unwrap_or_default(),
        children: Vec::new(),
    };
    if args.redis_url.is_none() {
        let port = free_addr()?.port();
        // A folder of its own: in the working directory it would load a stray dump.rdb.
        let dir = std::env::temp_dir().join(format!("countersink-bench-redis-{port}"));
        std::fs::create_dir_all(&dir).context("creating the bench Redis's folder")?;
        let redis = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (install it, or pass --redis-url)")?;
        env.children.push(redis);
        env.redis_url = format!("redis://127.0.0.1:{port}");
        wait_listening(([127, 0, 0, 1], port).into()).await?;
    }
    let name = env.name.clone();
    let machine = machine_info(&env)?;
    println!("bench {name}: {} connections, {seconds} s per scenario", c);

    diesel::sql_query(format!("CREATE SCHEMA {name}")).execute(&mut env.admin()?)?;
    env.sql(&name, "CREATE TABLE peer_counts (user_id BIGINT PRIMARY KEY, unread_count BIGINT NOT NULL)")?;
    env.sql(&name, &format!("INSERT INTO peer_counts SELECT g, 0 FROM generate_series(1, {USERS}) AS g"))?;
    env.sql(&name, "VACUUM ANALYZE peer_counts")?;

    // The processes under test.
    let key: [u8; 32] = rand::random();
    let secret_text = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let secret = Arc::new(WebhookSecret::from_key(&key));
    let sidecar_bin = sibling_binary("countersink")?;
    let (sidecar_addr, minimal_addr, peer_addr) = (free_addr()?, free_addr()?, free_addr()?);
    let sidecar = Command::new(&sidecar_bin)
        .arg("serve")
        .env("COUNTERSINK_LISTEN", sidecar_addr.to_string())
        .env("COUNTERSINK_REDIS_URL", &env.redis_url)
        .env("COUNTERSINK_REDIS_PREFIX", &name)
        .env("COUNTERSINK_DATABASE_URL", env.schema_url(&name))
        .env("COUNTERSINK_WEBHOOK_SECRET", &secret_text)
        .env("COUNTERSINK_ADMIN_TOKEN", format!("bench-admin-{:016x}", rand::random::<u64>()))
        .env("COUNTERSINK_FLUSH_CRON", "off")
        // Its default log level (info: a line per request) is kept; the lines are discarded.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", sidecar_bin.display()))?;
    let sidecar_pid = sidecar.id();
    env.children.push(sidecar);
    let me = std::env::current_exe()?;
    let minimal = Command::new(&me).args(["serve-minimal", "--port", &minimal_addr.port().to_string()]).spawn()?;
    let minimal_pid = minimal.id();
    env.children.push(minimal);
    let peer = Command::new(&me)
        .args(["serve-sql-peer", "--port", &peer_addr.port().to_string(), "--pool", &c.to_string()])
        .args(["--database-url", &env.schema_url(&name)])
        .spawn()?;
    let peer_pid = peer.id();
    env.children.push(peer);
    for addr in [sidecar_addr, minimal_addr, peer_addr] {
        wait_listening(addr).await?;
    }
    let mut redis = redis::Client::open(env.redis_url.as_str())?.get_connection()?;
    let redis_pid: u32 = redis::cmd("INFO")
        .arg("server")
        .query::<String>(&mut redis)
        .ok()
        .and_then(|info| info.lines().find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok()))
        .unwrap_or(0);
    let watched: Vec<(String, Watched)> = vec![
        ("load generator".into(), Watched::Pid(std::process::id())),
        ("sidecar".into(), Watched::Pid(sidecar_pid)),
        ("minimal axum".into(), Watched::Pid(minimal_pid)),
        ("SQL peer".into(), Watched::Pid(peer_pid)),
        ("redis-server".into(), Watched::Pid(redis_pid)),
        ("postgres".into(), Watched::Command("postgres")),
    ];
    let sidecar_rss_idle_mib = procs::status_kib(sidecar_pid, "VmRSS")? as f64 / 1024.0;

    let mut loads = Vec::new();
    let mut scenario = |id: &str, label: &str, connections: usize, measured: Measured, cpu| {
        println!(
            "  {label:<48} {:>10.0} events/s {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            measured.events_per_s, measured.requests_per_s, measured.p50_ms, measured.p99_ms, measured.errors
        );
        loads.push(LoadResult { id: id.into(), label: label.into(), connections, measured, cpu });
    };

    // 1. Ingest, through the sidecar (signed like Django's sender), and the machine's limits.
    let sidecar_ids = Arc::new(AtomicU64::new(1));
    let other_ids = Arc::new(AtomicU64::new(1));
    let ingest = [
        ("ingest_single_spread", "ingest, 1 event/request, spread users", 1, None),
        ("ingest_single_hot", "ingest, 1 event/request, one hot user", 1, Some(HOT_USER)),
        ("ingest_batch_spread", "ingest, 100 events/request, spread users", BATCH, None),
        ("ingest_batch_hot", "ingest, 100 events/request, one hot user", BATCH, Some(HOT_USER)),
    ];
    for (id, label, per_request, hot) in ingest {
        let make = signed_events(secret.clone(), sidecar_ids.clone(), per_request, hot);
        let before = procs::sample(&watched);
        let m = load::run_http(sidecar_addr, c, warmup, measure, per_request as u64, make).await?;
        scenario(id, label, c, m, procs::cpu_percent(&before, &procs::sample(&watched)));
    }
    // Profiles of the two ingest scenarios' busiest processes, in repeats that are not counted.
    let mut profiles = Vec::new();
    if procs::perf_available() {
        for (process, pid, scenario, per_request) in [
            ("sidecar", sidecar_pid, "ingest, 1 event/request, spread users", 1),
            ("redis-server", redis_pid, "ingest, 100 events/request, spread users", BATCH),
        ] {
            let make = signed_events(secret.clone(), sidecar_ids.clone(), per_request, None);
            let load = load::run_http(sidecar_addr, c, Duration::ZERO, measure, per_request as u64, make);
            profiles.push(profiled(process, pid, scenario, seconds, load).await?);
        }
    } else {
        println!("  perf cannot sample here: no profiles");
    }
    let sidecar_hwm_ingest = procs::status_kib(sidecar_pid, "VmHWM")?;
    for (id, label, per_request) in [
        ("minimal_single", "minimal axum endpoint, 1 event/request", 1),
        ("minimal_batch", "minimal axum endpoint, 100 events/request", BATCH),
    ] {
        let make = plain_events(other_ids.clone(), per_request, None, Arc::new(AtomicU64::new(0)));
        let before = procs::sample(&watched);
        let m = load::run_http(minimal_addr, c, warmup, measure, per_request as u64, make).await?;
        scenario(id, label, c, m, procs::cpu_percent(&before, &procs::sample(&watched)));
    }
    let raw_store = Store::connect(&env.redis_url, &format!("{name}_raw"))?;
    for (id, label, per_op) in [
        ("redis_single", "Redis script alone (EVALSHA), 1 event/call", 1),
        ("redis_batch", "Redis script alone (EVALSHA), 100 events/call", BATCH),
    ] {
        let store = raw_store.clone();
        let ids = other_ids.clone();
        let calls = Arc::new(AtomicU64::new(0));
        // Unique across scenarios: a reused idempotency key would be a replay, applying nothing.
        let run: u32 = rand::random();
        let before = procs::sample(&watched);
        let m = load::run_loops(c, warmup, measure, per_op as u64, move |_| {
            let (store, ids, calls) = (store.clone(), ids.clone(), calls.clone());
            async move {
                let first = ids.fetch_add(per_op as u64, Ordering::Relaxed);
                let events: Vec<Event> =
                    (first..first + per_op as u64).map(|n| Event::save(n, spread_user(), true, true)).collect();
                let webhook_id = format!("raw_{run:08x}_{}", calls.fetch_add(1, Ordering::Relaxed));
                let applied = store
                    .apply_once(
                        &events,
                        Some(Idempotency::new(&webhook_id, webhook_id.as_bytes(), Duration::from_secs(86_400))),
                    )
                    .await?;
                anyhow::ensure!(
                    !applied.replayed && applied.outcome.changed == per_op as u64,
                    "the raw script applied {applied:?}"
                );
                Ok(())
            }
        })
        .await?;
        scenario(id, label, c, m, procs::cpu_percent(&before, &procs::sample(&watched)));
    }

    // 2. The per-event SQL peer, then its rows written (its backends report on exit).
    // Settled: the connection that filled the table reports its rows as it exits.
    let peer_before = settled_rows(&env, &name, "peer_counts").await?;
    let peer_events = Arc::new(AtomicU64::new(0));
    for (id, label, hot) in [
        ("peer_spread", "SQL peer (UPDATE per event), spread users", None),
        ("peer_hot", "SQL peer (UPDATE per event), one hot user", Some(HOT_USER)),
    ] {
        let make = plain_events(other_ids.clone(), 1, hot, peer_events.clone());
        let before = procs::sample(&watched);
        let m = load::run_http(peer_addr, c, warmup, measure, 1, make).await?;
        scenario(id, label, c, m, procs::cpu_percent(&before, &procs::sample(&watched)));
    }
    // The peer idles (it costs no CPU) until its read scenario.
    let peer_rows = RowsWritten {
        events: peer_events.load(Ordering::Relaxed),
        rows: settled_rows(&env, &name, "peer_counts").await?.saturating_sub(peer_before),
        users_flushed: None,
        count_table_rows: None,
    };

    // 5. Memory: Redis bytes per tracked notification, before the flush empties the pending set.
    let notifications_tracked = sidecar_ids.load(Ordering::Relaxed) - 1;
    let state_bytes = memory_usage(&mut redis, &format!("{{{name}}}:state:*"))?;
    let pending_bytes = memory_usage(&mut redis, &format!("{{{name}}}:pending"))?;
    let pending_users: u64 = redis::cmd("ZCARD").arg(format!("{{{name}}}:pending")).query(&mut redis)?;
    // The packed idempotency records (`records.lua`): every key under `{P}:webhooks:` over the
    // records their buckets (the hashes; the epochs' lists are strings) hold.
    let record_keys: Vec<String> =
        redis::Commands::scan_match::<_, String>(&mut redis, format!("{{{name}}}:webhooks:*"))?
            .filter_map(Result::ok)
            .collect();
    let mut records = 0u64;
    for key in &record_keys {
        if redis::cmd("TYPE").arg(key).query::<String>(&mut redis)? == "hash" {
            records += redis::cmd("HLEN").arg(key).query::<u64>(&mut redis)?;
        }
    }
    let record_bytes = memory_usage(&mut redis, &format!("{{{name}}}:webhooks:*"))?;
    let redis_webhook_record_bytes = record_bytes as f64 / records.max(1) as f64;

    // The sidecar's flush of what was ingested, by the CLI (its backends report on exit).
    let tables = ["countersink_usernotificationscount", "countersink_flush_batches"];
    let flushed = Command::new(&sidecar_bin)
        .arg("flush")
        .env("COUNTERSINK_REDIS_URL", &env.redis_url)
        .env("COUNTERSINK_REDIS_PREFIX", &name)
        .env("COUNTERSINK_DATABASE_URL", env.schema_url(&name))
        .env("COUNTERSINK_LOG", "warn")
        .output()?;
    if !flushed.status.success() {
        bail!("countersink flush failed: {}", String::from_utf8_lossy(&flushed.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&flushed.stdout).context("reading the flush report")?;
    let users_flushed = report["users_written"].as_u64().context("no users_written in the flush report")?;
    let count_rows = settled_rows(&env, &name, tables[0]).await?;
    let batch_rows = settled_rows(&env, &name, tables[1]).await?;
    // Exactness under load: every event created one unread notification, so the stored counts
    // must add up to the events sent.
    let mut conn = PgConnection::establish(&env.schema_url(&name))?;
    let stored: Count =
        diesel::sql_query("SELECT COALESCE(SUM(unread_count), 0)::bigint AS n FROM countersink_usernotificationscount")
            .get_result(&mut conn)?;
    anyhow::ensure!(
        stored.n as u64 == notifications_tracked,
        "the stored counts add up to {}, but {notifications_tracked} unread notifications were sent",
        stored.n
    );
    let sidecar_rows = RowsWritten {
        events: notifications_tracked,
        rows: count_rows + batch_rows,
        users_flushed: Some(users_flushed),
        count_table_rows: Some(count_rows),
    };
    println!(
        "  rows written: sidecar {} rows for {} events ({} users flushed); SQL peer {} rows for {} events",
        sidecar_rows.rows, sidecar_rows.events, users_flushed, peer_rows.rows, peer_rows.events
    );

    // 4. Reads. After the flush nothing is pending, so the model of every user's count is the
    // stored one; every answer of every read scenario is checked against it.
    let expected: Arc<HashMap<u64, i64>> = {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            user_id: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            unread_count: i64,
        }
        let rows: Vec<Row> = diesel::sql_query("SELECT user_id, unread_count FROM countersink_usernotificationscount")
            .load(&mut conn)?;
        Arc::new(rows.into_iter().map(|r| (r.user_id as u64, r.unread_count)).collect())
    };
    let check: CheckAnswer = {
        let expected = expected.clone();
        Arc::new(move |body: &[u8]| {
            let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
            let entries = answer.get("counts").and_then(|c| c.as_array().cloned()).unwrap_or_else(|| vec![answer]);
            entries.iter().all(|entry| {
                let user = entry["user_id"].as_u64().unwrap_or(u64::MAX);
                entry["unread_count"].as_i64() == Some(expected.get(&user).copied().unwrap_or(0))
            })
        })
    };
    // First reads load each user's count (SQL + Redis) and hold it in Redis; the scenarios after
    // measure the held counts, as a site sees them once its users have been seen once.
    let first_reads_started = std::time::Instant::now();
    let first_reads = {
        let next = Arc::new(AtomicU64::new(1));
        let make: MakeRequest = Arc::new(move |_| {
            let first = next.fetch_add(1_000, Ordering::Relaxed).min(USERS);
            let ids: Vec<String> = (first..(first + 1_000).min(USERS + 1)).map(|u| u.to_string()).collect();
            Request::get(format!("/v1/unread-counts?user_ids={}", ids.join(",")))
                .body(Full::new(Bytes::new()))
                .unwrap_or_else(|_| unreachable!("a list of ids is a valid request"))
        });
        let rounds = USERS.div_ceil(1_000) as usize;
        load::run_requests(sidecar_addr, 4, rounds, make, Some(check.clone())).await?
    };
    let first_reads_users_per_s = USERS as f64 / first_reads_started.elapsed().as_secs_f64();
    println!("  first reads (loads) of {USERS} users: {first_reads_users_per_s:.0} users/s, wrong {first_reads}");
    anyhow::ensure!(first_reads == 0, "{first_reads} first reads answered a count other than the stored one");
    let count_bytes = memory_usage(&mut redis, &format!("{{{name}}}:counts:*"))?;

    let single_read: MakeRequest = Arc::new(|_| {
        Request::get(format!("/v1/users/{}/unread-count", spread_user()))
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| unreachable!("a user id is a valid path"))
    });
    let batch_read: MakeRequest = Arc::new(|_| {
        let ids: Vec<String> = (0..READ_BATCH).map(|_| spread_user().to_string()).collect();
        Request::get(format!("/v1/unread-counts?user_ids={}", ids.join(",")))
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| unreachable!("a list of ids is a valid request"))
    });
    let healthz: MakeRequest = Arc::new(|_| {
        Request::get("/healthz").body(Full::new(Bytes::new())).unwrap_or_else(|_| unreachable!("a constant request"))
    });
    let reads = [
        ("reads_healthz", "sidecar `GET /healthz`", sidecar_addr, c, 1, healthz, None),
        ("reads_c", "unread-count reads", sidecar_addr, c, 1, single_read.clone(), Some(check.clone())),
        ("reads_1", "unread-count reads, 1 connection", sidecar_addr, 1, 1, single_read.clone(), Some(check.clone())),
        (
            "reads_batch",
            "batch reads, 100 users/request",
            sidecar_addr,
            c,
            READ_BATCH as u64,
            batch_read,
            Some(check.clone()),
        ),
        (
            "reads_peer",
            "SQL peer: primary-key SELECT per read",
            peer_addr,
            c,
            1,
            single_read.clone(),
            Some(check.clone()),
        ),
    ];
    for (id, label, addr, connections, per_request, make, check) in reads {
        let before = procs::sample(&watched);
        let m = load::run_http_checked(addr, connections, warmup, measure, per_request, make, check).await?;
        anyhow::ensure!(m.wrong == 0, "{label}: {} answers differ from the stored counts", m.wrong);
        scenario(id, label, connections, m, procs::cpu_percent(&before, &procs::sample(&watched)));
    }
    // The read is the product: its profile too, in a repeat that is not counted.
    if procs::perf_available() {
        let load = load::run_http_checked(
            sidecar_addr,
            c,
            Duration::ZERO,
            measure,
            1,
            single_read.clone(),
            Some(check.clone()),
        );
        profiles.push(profiled("sidecar", sidecar_pid, "unread-count reads", seconds, load).await?);
    }
    let sidecar_rss_peak_mib = procs::status_kib(sidecar_pid, "VmHWM")?.max(sidecar_hwm_ingest) as f64 / 1024.0;
    stop_child(&mut env, sidecar_pid);
    stop_child(&mut env, minimal_pid);
    stop_child(&mut env, peer_pid);

    // 3. Flush against the raw upsert rate.
    let sizes: &[u64] = if args.quick { &[10_000, 100_000] } else { &[100_000, 1_000_000] };
    let mut flushes = Vec::new();
    for &users in sizes {
        flushes.push(flush_scenario(&env, users).await?);
    }

    // 4b. SELECT count(*) on the Notification table.
    let count_table_rows = if args.quick { 1_000_000 } else { 10_000_000 };
    let counts = count_scenario(&env, count_table_rows, if args.quick { 50 } else { 300 }).await?;

    Ok(Results {
        machine,
        quick: args.quick,
        seconds,
        loads,
        sidecar_rows,
        peer_rows,
        flushes,
        count_table_rows,
        counts,
        redis_bytes_per_notification: state_bytes as f64 / notifications_tracked.max(1) as f64,
        notifications_tracked,
        redis_pending_bytes_per_user: pending_bytes as f64 / pending_users.max(1) as f64,
        redis_count_bytes_per_user: count_bytes as f64 / USERS as f64,
        first_reads_users: USERS,
        first_reads_users_per_s,
        redis_webhook_record_bytes,
        sidecar_rss_idle_mib,
        sidecar_rss_peak_mib,
        profiles,
    })
}

/// A random user of the spread scenarios.
fn spread_user() -> u64 {
    rand::random_range(1..=USERS)
}

/// The JSON of `n` new-notification events, numbered from `ids`.
fn events_body(ids: &AtomicU64, n: usize, hot: Option<u64>) -> String {
    let first = ids.fetch_add(n as u64, Ordering::Relaxed);
    let one = |id: u64| {
        let user = hot.unwrap_or_else(spread_user);
        format!(r#"{{"kind":"post_save","notification_id":{id},"user_id":{user},"unread":true,"created":true}}"#)
    };
    if n == 1 {
        one(first)
    } else {
        let events: Vec<String> = (first..first + n as u64).map(one).collect();
        format!("[{}]", events.join(","))
    }
}

/// Requests to the sidecar, signed as Django's sender signs them (Standard Webhooks).
fn signed_events(secret: Arc<WebhookSecret>, ids: Arc<AtomicU64>, n: usize, hot: Option<u64>) -> MakeRequest {
    let sent = Arc::new(AtomicU64::new(0));
    // Unique across scenarios: a reused webhook-id would be answered as a replay, applying nothing.
    let run: u32 = rand::random();
    Arc::new(move |_| {
        let body = events_body(&ids, n, hot);
        let webhook_id = format!("msg_{run:08x}_{}", sent.fetch_add(1, Ordering::Relaxed));
        let timestamp = chrono::Utc::now().timestamp();
        let signature = secret.sign(&webhook_id, timestamp, body.as_bytes());
        Request::post("/v1/events")
            .header("content-type", "application/json")
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| unreachable!("headers made of ASCII are valid"))
    })
}

/// The same events, unsigned, for the comparison servers; `sent` counts the events.
fn plain_events(ids: Arc<AtomicU64>, n: usize, hot: Option<u64>, sent: Arc<AtomicU64>) -> MakeRequest {
    Arc::new(move |_| {
        sent.fetch_add(n as u64, Ordering::Relaxed);
        Request::post("/v1/events")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(events_body(&ids, n, hot))))
            .unwrap_or_else(|_| unreachable!("a constant request is valid"))
    })
}

/// Flushes `users` dirty users, then upserts the same rows from memory two ways.
async fn flush_scenario(env: &Env, users: u64) -> anyhow::Result<FlushResult> {
    let schema = format!("{}_f{users}", env.name);
    let raw_schema = format!("{}_r{users}", env.name);
    let mut admin = env.admin()?;
    for s in [&schema, &raw_schema] {
        diesel::sql_query(format!("CREATE SCHEMA {s}")).execute(&mut admin)?;
    }
    let result = async {
        let state = AppState::new(&env.core(&schema, &schema), None)?;
        state.db.migrate().await?;
        println!("  flush: making {users} users dirty...");
        let events: Vec<Event> = (1..=users).map(|u| Event::save(u, u, true, true)).collect();
        for group in events.chunks(1_000 * 8) {
            let applied = group.chunks(1_000).map(|chunk| state.store.apply(chunk));
            for outcome in futures_util::future::join_all(applied).await {
                outcome?;
            }
        }
        let started = Instant::now();
        let report = state.flusher.flush(WhenBusy::Wait(Duration::from_secs(60))).await?;
        let flush_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(report.users_written == users, "flushed {} of {users} users", report.users_written);

        let raw = AppState::new(&env.core(&raw_schema, &raw_schema), None)?;
        raw.db.migrate().await?;
        let rows: Vec<(u64, i64)> = (1..=users).map(|u| (u, 1)).collect();
        let started = Instant::now();
        let chunked = rows.clone();
        raw.db
            .run(move |conn| {
                conn.transaction(|conn| {
                    for chunk in chunked.chunks(5_000) {
                        countersink::db::queries::add_deltas(conn, chunk)?;
                    }
                    Ok(())
                })
            })
            .await?;
        let upsert_s = started.elapsed().as_secs_f64();

        env.sql(&raw_schema, "TRUNCATE countersink_usernotificationscount")?;
        let mut conn = PgConnection::establish(&env.schema_url(&raw_schema))?;
        let started = Instant::now();
        conn.transaction(|conn| {
            for chunk in rows.chunks(5_000) {
                let ids: Vec<i64> = chunk.iter().map(|(u, _)| *u as i64).collect();
                let deltas: Vec<i64> = chunk.iter().map(|(_, d)| *d).collect();
                diesel::sql_query(
                    "INSERT INTO countersink_usernotificationscount (user_id, unread_count) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[]) \
                     ON CONFLICT (user_id) DO UPDATE SET unread_count = \
                     countersink_usernotificationscount.unread_count + excluded.unread_count",
                )
                .bind::<Array<BigInt>, _>(ids)
                .bind::<Array<BigInt>, _>(deltas)
                .execute(conn)?;
            }
            diesel::QueryResult::Ok(())
        })?;
        let unnest_s = started.elapsed().as_secs_f64();
        let r = FlushResult {
            users,
            flush_users_per_s: users as f64 / flush_s,
            raw_upsert_users_per_s: users as f64 / upsert_s,
            raw_unnest_users_per_s: users as f64 / unnest_s,
        };
        println!(
            "  flush {users} users: {:.0} users/s; raw upsert {:.0} users/s; raw unnest upsert {:.0} users/s",
            r.flush_users_per_s, r.raw_upsert_users_per_s, r.raw_unnest_users_per_s
        );
        Ok(r)
    }
    .await;
    for s in [&schema, &raw_schema] {
        diesel::sql_query(format!("DROP SCHEMA {s} CASCADE")).execute(&mut admin)?;
    }
    result
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(diesel::QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
    line: String,
}

/// `SELECT count(*)` of one user's unread on a table of `rows` notifications (5,000 unread each).
async fn count_scenario(env: &Env, rows: u64, queries: u64) -> anyhow::Result<Vec<CountResult>> {
    let users = rows / ROWS_PER_USER;
    let started = Instant::now();
    println!("  count: making {rows} notifications ({users} users, 5,000 unread each)...");
    let mut conn = PgConnection::establish(&env.schema_url(&env.name))?;
    for statement in [
        "SET maintenance_work_mem = '256MB'".to_string(),
        "CREATE TABLE notifications_notification (id BIGINT NOT NULL, recipient_id BIGINT NOT NULL, \
         unread BOOLEAN NOT NULL)"
            .into(),
        // Each user's rows are spread over the whole table, as they are when users are active at once.
        format!(
            "INSERT INTO notifications_notification \
             SELECT g, g % {users}, (g / {users}) % 2 = 0 FROM generate_series(0, {rows} - 1) AS g"
        ),
        "ALTER TABLE notifications_notification ADD PRIMARY KEY (id)".into(),
        "CREATE INDEX notification_unread ON notifications_notification (recipient_id) WHERE unread".into(),
        "VACUUM ANALYZE notifications_notification".into(),
    ] {
        diesel::sql_query(statement).execute(&mut conn)?;
    }
    println!("  count: table ready in {:.1} s", started.elapsed().as_secs_f64());
    let query = "SELECT count(*) AS n FROM notifications_notification WHERE recipient_id = $1 AND unread";
    let mut results = Vec::new();
    for index_only in [true, false] {
        diesel::sql_query(format!("SET enable_indexonlyscan = {}", if index_only { "on" } else { "off" }))
            .execute(&mut conn)?;
        let plan: Vec<PlanLine> =
            diesel::sql_query(format!("EXPLAIN (ANALYZE, BUFFERS) {}", query.replace("$1", "1"))).load(&mut conn)?;
        let plan = plan
            .iter()
            .map(|l| l.line.trim().trim_start_matches("->").trim())
            .filter(|l| l.contains("Scan") || l.starts_with("Buffers") || l.starts_with("Heap Fetches"))
            .map(|l| l.split("  (").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("; ");
        let mut hist = load::histogram();
        let started = Instant::now();
        for _ in 0..queries {
            let user = rand::random_range(0..users) as i64;
            let t = Instant::now();
            let counted: Count = diesel::sql_query(query).bind::<BigInt, _>(user).get_result(&mut conn)?;
            hist.record(t.elapsed().as_micros().max(1) as u64)?;
            anyhow::ensure!(counted.n == (ROWS_PER_USER / 2) as i64, "user {user} has {} unread", counted.n);
        }
        let r = CountResult {
            index_only_scans: index_only,
            queries,
            p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
            per_s: queries as f64 / started.elapsed().as_secs_f64(),
            plan,
        };
        println!("  count, index-only scans {index_only}: p50 {:.2} ms, p99 {:.2} ms ({})", r.p50_ms, r.p99_ms, r.plan);
        results.push(r);
    }
    diesel::sql_query("DROP TABLE notifications_notification").execute(&mut conn)?;
    Ok(results)
}

#[derive(diesel::QueryableByName)]
struct Written {
    #[diesel(sql_type = BigInt)]
    rows: i64,
}

/// Rows inserted, updated or deleted in a table, as PostgreSQL's statistics say.
fn rows_written(env: &Env, schema: &str, table: &str) -> anyhow::Result<u64> {
    let mut admin = env.admin()?;
    let w: Option<Written> = diesel::sql_query(
        "SELECT (n_tup_ins + n_tup_upd + n_tup_del)::bigint AS rows FROM pg_stat_user_tables \
         WHERE schemaname = $1 AND relname = $2",
    )
    .bind::<Text, _>(schema)
    .bind::<Text, _>(table)
    .get_result(&mut admin)
    .ok();
    Ok(w.map_or(0, |w| w.rows as u64))
}

/// The rows written once the statistics stop moving (backends report them when they exit).
async fn settled_rows(env: &Env, schema: &str, table: &str) -> anyhow::Result<u64> {
    let mut last = rows_written(env, schema, table)?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rows_written(env, schema, table)?;
        if now == last && now > 0 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Sum of `MEMORY USAGE` over the keys matching `pattern`.
fn memory_usage(redis: &mut redis::Connection, pattern: &str) -> anyhow::Result<u64> {
    let keys: Vec<String> = redis::Commands::scan_match::<_, String>(redis, pattern)?.filter_map(Result::ok).collect();
    let mut bytes = 0;
    for key in keys {
        let usage: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(&key).arg("SAMPLES").arg(0).query(redis)?;
        bytes += usage.unwrap_or(0);
    }
    Ok(bytes)
}

/// Unlinks every key matching `pattern`, a thousand at a time.
fn delete_keys(redis: &mut redis::Connection, pattern: &str) -> anyhow::Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(10_000).query(redis)?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(keys).query::<()>(redis)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn stop_child(env: &mut Env, pid: u32) {
    if let Some(child) = env.children.iter_mut().find(|c| c.id() == pid) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A binary built beside this example (`target/release/countersink`).
fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.parent().and_then(|examples| examples.parent()).map(|dir| dir.join(name));
    match path {
        Some(path) if path.exists() => Ok(path),
        _ => bail!(
            "{name} is not built beside the bench: run `cargo build --release --bin {name}` (scripts/bench.sh does)"
        ),
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr} after 10 s")
}

/// CPU, cores, versions, the commit: what a reader needs to compare runs.
fn machine_info(env: &Env) -> anyhow::Result<BTreeMap<String, String>> {
    let mut info = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1)).unwrap_or("?");
    info.insert("cpu".into(), model.trim().to_string());
    info.insert("cores (nproc)".into(), std::thread::available_parallelism().map_or(0, |n| n.get()).to_string());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 =
        mem.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix(" kB")?.parse().ok()).unwrap_or(0);
    info.insert("memory".into(), format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0));
    info.insert("date".into(), chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string());
    let mut redis = redis::Client::open(env.redis_url.as_str())?.get_connection()?;
    let server: String = redis::cmd("INFO").arg("server").query(&mut redis)?;
    let version = server.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?");
    info.insert("redis".into(), version.trim().to_string());
    #[derive(diesel::QueryableByName)]
    struct Version {
        #[diesel(sql_type = Text)]
        server_version: String,
    }
    let pg: Version = diesel::sql_query("SHOW server_version").get_result(&mut env.admin()?)?;
    info.insert("postgresql".into(), pg.server_version);
    let commit = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok();
    let commit = commit.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    info.insert("commit".into(), commit);
    Ok(info)
}
