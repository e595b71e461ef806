//! Redis CPU per event of ingest: a fixed load of `apply_events.lua` calls (100 events each by
//! default, new unread notifications with dense ids, users spread over 1,000,000) from 32 tasks,
//! with `INFO cpu` and `INFO commandstats` read before and after. A focused measurement of the
//! script alone (no HTTP), so a change to the script can be compared on a busy machine: the Redis
//! CPU per event moves far less with other load than the rate does.
//!
//! ```sh
//! redis-server --port 6391 --save '' --appendonly no &   # a private Redis, so no one else's commands count
//! COUNTERSINK_TEST_REDIS_URL=redis://127.0.0.1:6391 cargo run --release --example ingest_redis_cpu
//! cargo run --release --example ingest_redis_cpu -- 2000000   # another number of events
//! cargo run --release --example ingest_redis_cpu -- 100000 1   # single-event calls, as Django sends
//! cargo run --release --example ingest_redis_cpu -- 100000 1 16   # 16 single-event requests per call (group commit)
//! ```
//! Keys go under a prefix of its own, deleted at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use countersink::events::Event;
use countersink::store::{Idempotency, Request, Store};

/// Events per script call, as the bench's batched scenario sends (a second argument sets another).
const DEFAULT_BATCH: u64 = 100;
/// Concurrent callers, as the bench's connections.
const TASKS: u64 = 32;
/// Users the events are spread over.
const USERS: u64 = 1_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: u64 =
        std::env::args().nth(1).map(|s| s.parse()).transpose().context("events must be a number")?.unwrap_or(1_000_000);
    let batch: u64 = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()
        .context("events per call must be a number")?
        .unwrap_or(DEFAULT_BATCH);
    let merged: u64 = std::env::args()
        .nth(3)
        .map(|s| s.parse())
        .transpose()
        .context("requests per call must be a number")?
        .unwrap_or(1);
    anyhow::ensure!(
        batch >= 1 && merged >= 1 && events >= batch * merged,
        "give at least one event per request and one request per call, and no fewer events than a call holds"
    );
    let redis_url = std::env::var("COUNTERSINK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let name = format!("csbench_{:08x}", rand::random::<u32>());
    let store = Store::connect(&redis_url, &name)?;
    let mut redis = redis::Client::open(redis_url.as_str())?.get_connection()?;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut redis)?;

    let calls = events / (batch * merged);
    let next_call = Arc::new(AtomicU64::new(0));
    let cpu_before = redis_cpu(&mut redis)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, next_call) = (store.clone(), next_call.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let call = next_call.fetch_add(1, Ordering::Relaxed);
                if call >= calls {
                    return anyhow::Ok(());
                }
                // `merged` requests of `batch` events each, applied in one call as a group commit does.
                let requests: Vec<(Vec<Event>, String)> = (0..merged)
                    .map(|r| {
                        let first = (call * merged + r) * batch + 1;
                        let events = (first..first + batch)
                            .map(|n| Event::save(n, rand::random_range(1..=USERS), true, true))
                            .collect();
                        (events, format!("cpu_{call}_{r}"))
                    })
                    .collect();
                let requests: Vec<Request> = requests
                    .iter()
                    .map(|(events, id)| Request {
                        events,
                        idempotency: Some(Idempotency::new(id, id.as_bytes(), Duration::from_secs(600))),
                    })
                    .collect();
                for applied in store.apply_many(&requests).await? {
                    let applied = applied?;
                    anyhow::ensure!(applied.outcome.changed == batch, "applied {applied:?}");
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let cpu = redis_cpu(&mut redis)? - cpu_before;
    let stats: String = redis::cmd("INFO").arg("commandstats").query(&mut redis)?;
    let pending: u64 = redis::cmd("ZCARD").arg(format!("{{{name}}}:pending")).query(&mut redis)?;

    let applied = calls * merged * batch;
    println!(
        "{applied} events in {calls} calls of {merged} requests of {batch}, {TASKS} tasks, {pending} users pending at the end"
    );
    println!(
        "wall {:.2} s = {:.0} events/s; redis CPU {:.2} s = {:.2} µs per event",
        elapsed.as_secs_f64(),
        applied as f64 / elapsed.as_secs_f64(),
        cpu,
        cpu * 1e6 / applied as f64
    );
    println!("{:<14} {:>10} {:>10} {:>12}", "command", "calls", "per event", "µs/event");
    for (command, (count, usec)) in commandstats(&stats) {
        println!(
            "{command:<14} {count:>10} {:>10.2} {:>12.2}",
            count as f64 / applied as f64,
            usec as f64 / applied as f64
        );
    }

    let keys: Vec<String> =
        redis::Commands::scan_match(&mut redis, format!("{{{name}}}:*"))?.filter_map(Result::ok).collect();
    for chunk in keys.chunks(1_000) {
        redis::Commands::unlink::<_, ()>(&mut redis, chunk)?;
    }
    Ok(())
}

/// Seconds of CPU (user + system) the Redis server has used.
fn redis_cpu(redis: &mut redis::Connection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query(redis)?;
    let field =
        |name: &str| -> f64 { info.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0) };
    Ok(field("used_cpu_user:") + field("used_cpu_sys:"))
}

/// `cmdstat_NAME:calls=N,usec=U,...` lines: calls and microseconds per command.
fn commandstats(info: &str) -> BTreeMap<String, (u64, u64)> {
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let value =
            |key: &str| -> u64 { rest.split(',').find_map(|kv| kv.strip_prefix(key)?.parse().ok()).unwrap_or(0) };
        stats.insert(name.to_string(), (value("calls="), value("usec=")));
    }
    stats
}
