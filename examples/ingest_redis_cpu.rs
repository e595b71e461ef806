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
//! COUNTERSINK_BENCH_CLUSTER=1 cargo run --release --example ingest_redis_cpu   # on a Redis Cluster
//! ```
//! Keys go under a prefix of its own, deleted at the end.
//!
//! With `COUNTERSINK_BENCH_CLUSTER=1` the program starts a Redis Cluster of its own (3 masters and
//! 3 replicas on loopback ports, the tests' harness) and the store finds its master as
//! `--redis-cluster-nodes` does; it then prints each node's Redis CPU and keys: how the load and the
//! keys spread over the masters (issue #16's target: the busiest master at most 40% of the Redis
//! CPU of an ingest run; printed as its share of the masters' CPU and of all nodes'), and the
//! commands of the deployment's master. A node's CPU includes its share of the cluster's gossip, measured first with the cluster
//! idle for 5 s (the last column).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use countersink::events::Event;
use countersink::store::{Idempotency, Keys, RedisTarget, Request, Store};

/// Events per script call, as the bench's batched scenario sends (a second argument sets another).
const DEFAULT_BATCH: u64 = 100;
/// Concurrent callers, as the bench's connections.
const TASKS: u64 = 32;
/// Users the events are spread over.
const USERS: u64 = 1_000_000;
/// How long a cluster's nodes are watched idle before the load.
const IDLE: Duration = Duration::from_secs(5);

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
    let name = format!("csbench_{:08x}", rand::random::<u32>());
    let redis_url = std::env::var("COUNTERSINK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let cluster = std::env::var_os("COUNTERSINK_BENCH_CLUSTER").is_some().then(support::cluster::ClusterSetup::start);
    let (store, mut nodes) = match &cluster {
        None => (Store::connect(&redis_url, &name)?, vec![Node::open(&redis_url)?]),
        Some(cluster) => {
            let target = RedisTarget::Cluster {
                nodes: cluster.addresses().split(',').map(str::to_string).collect(),
                hash_tag: Keys::new(&name).hash_tag().to_string(),
                url: "redis://127.0.0.1".into(),
            };
            let nodes: anyhow::Result<Vec<Node>> =
                cluster.ports.iter().map(|port| Node::open(&format!("redis://127.0.0.1:{port}"))).collect();
            (Store::open(&target, &name)?, nodes?)
        }
    };
    // Each node's CPU while nothing is sent (a cluster's gossip), to tell from what the load costs.
    let mut idle = Vec::new();
    if cluster.is_some() {
        let before: Vec<f64> = nodes.iter_mut().map(|node| redis_cpu(&mut node.conn)).collect::<anyhow::Result<_>>()?;
        tokio::time::sleep(IDLE).await;
        for (node, before) in nodes.iter_mut().zip(before) {
            idle.push((redis_cpu(&mut node.conn)? - before) / IDLE.as_secs_f64());
        }
    }
    let mut cpu_before = Vec::new();
    for node in &mut nodes {
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut node.conn)?;
        cpu_before.push(redis_cpu(&mut node.conn)?);
    }

    let calls = events / (batch * merged);
    let next_call = Arc::new(AtomicU64::new(0));
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
    let mut cpus = Vec::new();
    for (node, before) in nodes.iter_mut().zip(&cpu_before) {
        cpus.push(redis_cpu(&mut node.conn)? - before);
    }
    let cpu: f64 = cpus.iter().sum();
    let pending_key = format!("{{{name}}}:pending");
    let own = nodes.iter_mut().position(|node| node.role == "master" && node.owns(&pending_key)).unwrap_or(0);
    let pending: u64 = redis::cmd("ZCARD").arg(&pending_key).query(&mut nodes[own].conn)?;
    // The commands of the deployment's master only: its replica runs the script's effects again.
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut nodes[own].conn)?;
    let stats = commandstats(&info);

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
    if nodes.len() > 1 {
        println!(
            "{:<7} {:<8} {:>10} {:>12} {:>14} {:>8} {:>14}",
            "node", "role", "CPU s", "µs/event", "share of CPU", "keys", "idle CPU ms/s"
        );
        for ((node, node_cpu), idle) in nodes.iter_mut().zip(&cpus).zip(&idle) {
            let keys: u64 = redis::cmd("DBSIZE").query(&mut node.conn)?;
            println!(
                "{:<7} {:<8} {node_cpu:>10.2} {:>12.2} {:>13.0}% {keys:>8} {:>14.1}",
                node.port,
                node.role,
                node_cpu * 1e6 / applied as f64,
                node_cpu * 100.0 / cpu,
                idle * 1e3
            );
        }
        let masters: Vec<f64> = nodes.iter().zip(&cpus).filter(|(n, _)| n.role == "master").map(|(_, c)| *c).collect();
        let busiest = masters.iter().copied().fold(0.0, f64::max);
        println!(
            "busiest master: {:.0}% of the {} masters' Redis CPU, {:.0}% of all nodes'",
            busiest * 100.0 / masters.iter().sum::<f64>(),
            masters.len(),
            busiest * 100.0 / cpu
        );
        println!("commands of the deployment's master ({}):", nodes[own].port);
    }
    println!("{:<14} {:>10} {:>10} {:>12}", "command", "calls", "per event", "µs/event");
    for (command, (count, usec)) in stats {
        println!(
            "{command:<14} {count:>10} {:>10.2} {:>12.2}",
            count as f64 / applied as f64,
            usec as f64 / applied as f64
        );
    }

    // A cluster of the program's own goes with it.
    if cluster.is_none() {
        let redis = &mut nodes[0].conn;
        let keys: Vec<String> =
            redis::Commands::scan_match(redis, format!("{{{name}}}:*"))?.filter_map(Result::ok).collect();
        for chunk in keys.chunks(1_000) {
            redis::Commands::unlink::<_, ()>(redis, chunk)?;
        }
    }
    Ok(())
}

/// One Redis server measured: the single one, or a node of the cluster.
struct Node {
    conn: redis::Connection,
    port: u16,
    /// `master` or `slave`, as `INFO replication` says.
    role: String,
}

impl Node {
    fn open(url: &str) -> anyhow::Result<Node> {
        let client = redis::Client::open(url)?;
        let port = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(_, port) => *port,
            _ => 0,
        };
        let mut conn = client.get_connection()?;
        let info: String = redis::cmd("INFO").arg("replication").query(&mut conn)?;
        let role = info.lines().find_map(|l| l.strip_prefix("role:")).unwrap_or("master").trim().to_string();
        Ok(Node { conn, port, role })
    }

    /// Whether this node serves `key`'s slot (always, outside a cluster).
    fn owns(&mut self, key: &str) -> bool {
        redis::cmd("EXISTS").arg(key).query::<u64>(&mut self.conn).is_ok()
    }
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
