//! The connection to the Redis master: at one address (`--redis-url`), found by name through
//! Redis Sentinel (`--redis-sentinels`, `--redis-sentinel-master`), or, on a Redis Cluster
//! (`--redis-cluster-nodes`), the master of the one slot every key of the deployment hashes to
//! (its `{prefix}` hash tag); under Sentinel and on a cluster, followed across failovers without
//! a restart.
//!
//! Under Sentinel or on a cluster, a command that fails the way a failover makes commands fail
//! (the connection refused or dropped, a timeout, `READONLY` from a demoted master, `MASTERDOWN`;
//! on a cluster also `MOVED`, `ASK`, `TRYAGAIN` and `CLUSTERDOWN`, a slot that moved or is moving)
//! forgets the master it went to, and the next command asks again. The failed command itself is
//! answered as Redis being unavailable (503 with `Retry-After` for a request): it is not retried
//! here, because a script whose reply was lost may have run. A promoted replica does not vouch
//! for the state (its run id is not the one in the instance key), so what it lacks is recovered
//! like after any restart (docs/design.md, *Redis restarts*).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};

use crate::config::CoreConfig;

/// How long one Redis command may take before the request fails over to 503.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting (or asking Sentinel for the master) may take; short, so an outage is
/// answered quickly.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed question to Sentinel (or the cluster) is answered for the commands behind it
/// without asking again: Sentinels that do not answer would otherwise hold every command for the
/// connect timeout in turn.
const FIND_RETRY_AFTER: Duration = Duration::from_millis(250);

/// Where the Redis master is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// At this URL.
    Address(String),
    /// Wherever the Sentinels say the master is.
    Sentinel {
        /// The Sentinels' `host:port` addresses.
        sentinels: Vec<String>,
        /// The name they monitor the master under.
        master: String,
        /// The database number and the credentials of the master (its address is ignored).
        url: String,
    },
    /// On a Redis Cluster, wherever its nodes say the slot of `hash_tag` is served.
    Cluster {
        /// Some of the cluster's nodes, `host:port`.
        nodes: Vec<String>,
        /// The deployment's hash tag (`{prefix}`): every key of it is in this one slot.
        hash_tag: String,
        /// The credentials of the nodes (the address is ignored).
        url: String,
    },
}

impl RedisTarget {
    /// The target the settings name.
    pub fn from_config(core: &CoreConfig) -> RedisTarget {
        if !core.redis_cluster_nodes.is_empty() {
            return RedisTarget::Cluster {
                nodes: core.redis_cluster_nodes.clone(),
                hash_tag: super::Keys::new(&core.redis_prefix).hash_tag().to_string(),
                url: core.redis_url.clone(),
            };
        }
        match &core.redis_sentinel_master {
            Some(master) if !core.redis_sentinels.is_empty() => RedisTarget::Sentinel {
                sentinels: core.redis_sentinels.clone(),
                master: master.clone(),
                url: core.redis_url.clone(),
            },
            _ => RedisTarget::Address(core.redis_url.clone()),
        }
    }
}

/// A connection to the current Redis master, cheap to clone: clones share the connection (and,
/// under Sentinel, what is known of the master).
#[derive(Clone)]
pub struct RedisConnection {
    shared: Arc<Shared>,
    db: i64,
}

struct Shared {
    /// Where the master is, as the settings say (for [`RedisConnection::another`]).
    target: RedisTarget,
    /// The master in use; `None` under Sentinel or on a cluster until the next command asks who
    /// it is.
    /// An `Arc`: every command takes the current master, which would otherwise clone its client
    /// (the connection settings, with their strings) each time.
    current: Mutex<Option<Arc<Master>>>,
    /// Masters found so far: a failure forgets the master it met only if no later one was found.
    found: AtomicU64,
    /// Who says where the master is, under Sentinel or on a cluster.
    finder: Option<tokio::sync::Mutex<Finder>>,
}

/// Who says where the master is, and the last failure to find it while none is known.
struct Finder {
    locator: Locator,
    failed: Option<(Instant, RedisError)>,
}

enum Locator {
    Sentinel(SentinelClient),
    Cluster {
        /// The nodes asked, in turn, from the last one that answered (a node that is down and
        /// silent costs each question the connect timeout).
        nodes: Vec<ConnectionInfo>,
        answered: usize,
        hash_tag: String,
    },
}

impl Locator {
    /// A client for the master, as Sentinel or the cluster says now.
    async fn find(&mut self) -> Result<redis::Client, RedisError> {
        match self {
            Locator::Sentinel(client) => tokio::time::timeout(REDIS_CONNECT_TIMEOUT, client.async_get_client())
                .await
                .unwrap_or_else(|_| Err(timed_out())),
            Locator::Cluster { nodes, answered, hash_tag } => {
                let mut last_error = None;
                for at in (0..nodes.len()).map(|i| (*answered + i) % nodes.len()) {
                    let node = &nodes[at];
                    let asked = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, slot_master(node, hash_tag))
                        .await
                        .unwrap_or_else(|_| Err(timed_out()));
                    match asked {
                        Ok(master) => {
                            *answered = at;
                            return redis::Client::open(node.clone().set_addr(master));
                        }
                        Err(error) => last_error = Some(error),
                    }
                }
                Err(last_error
                    .unwrap_or_else(|| RedisError::from((redis::ErrorKind::Client, "no cluster node to ask"))))
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Locator::Sentinel(_) => "Sentinel",
            Locator::Cluster { .. } => "the cluster",
        }
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// Asks the cluster node `node` which master serves the slot of `hash_tag` (`CLUSTER KEYSLOT`,
/// then `CLUSTER SLOTS`: `[start, end, [host, port, id, ...], replicas...]` per range).
async fn slot_master(node: &ConnectionInfo, hash_tag: &str) -> Result<ConnectionAddr, RedisError> {
    let mut conn = redis::Client::open(node.clone())?.get_multiplexed_async_connection().await?;
    let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(hash_tag).query_async(&mut conn).await?;
    let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await?;
    for range in ranges {
        let (Some(start), Some(end), Some(master)) = (range.first(), range.get(1), range.get(2)) else { continue };
        let (start, end): (i64, i64) = (redis::from_redis_value_ref(start)?, redis::from_redis_value_ref(end)?);
        if !(start..=end).contains(&slot) {
            continue;
        }
        let master: Vec<Value> = redis::from_redis_value_ref(master)?;
        let (Some(host), Some(port)) = (master.first(), master.get(1)) else { break };
        let port: u16 = redis::from_redis_value_ref(port)?;
        // Nil (`cluster-preferred-endpoint-type unknown-endpoint`), empty or unspecified: the
        // node asked, as redis-rs's cluster client reads it. "?" (a hostname wanted and none
        // announced): this node cannot say; the next one is asked.
        let host: Option<String> = redis::from_redis_value_ref(host)?;
        let host = match host.as_deref() {
            Some("?") => {
                return Err(RedisError::from((redis::ErrorKind::Client, "the node knows no address for the master")))
            }
            None | Some("" | "0.0.0.0" | "::") => match node.addr() {
                ConnectionAddr::Tcp(host, _) => host.clone(),
                _ => return Err(RedisError::from((redis::ErrorKind::Client, "a cluster node is not a TCP address"))),
            },
            Some(host) => host.to_string(),
        };
        // Plain TCP: TLS is not built in (start-up refuses `rediss://`).
        return Ok(ConnectionAddr::Tcp(host, port));
    }
    Err(RedisError::from((redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown), "no master serves the slot")))
}

struct Master {
    client: redis::Client,
    manager: ConnectionManager,
    /// For pipelines that end in `WAIT` (see [`RedisConnection::invoke_and_wait`]).
    waits: ConnectionManager,
    generation: u64,
}

impl RedisConnection {
    /// A connection that connects lazily and reconnects by itself, so the service starts and
    /// recovers while Redis (or Sentinel) is down.
    pub fn open(target: &RedisTarget) -> Result<RedisConnection, RedisError> {
        match target {
            RedisTarget::Address(url) => {
                let client = redis::Client::open(url.as_str())?;
                let db = client.get_connection_info().redis_settings().db();
                let master = Arc::new(Master::new(client, 0)?);
                let shared = Shared {
                    target: target.clone(),
                    current: Mutex::new(Some(master)),
                    found: AtomicU64::new(0),
                    finder: None,
                };
                Ok(RedisConnection { shared: Arc::new(shared), db })
            }
            RedisTarget::Sentinel { sentinels, master, url } => {
                let settings = url.as_str().into_connection_info()?.redis_settings().clone();
                let db = settings.db();
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
                // `host:port`, or a `redis://` URL with the Sentinels' own credentials.
                let addresses: Vec<String> = sentinels
                    .iter()
                    .map(|a| if a.starts_with("redis://") { a.clone() } else { format!("redis://{a}") })
                    .collect();
                let client = SentinelClient::build(addresses, master.clone(), Some(node), SentinelServerType::Master)?;
                Ok(RedisConnection::found_by(target, Locator::Sentinel(client), db))
            }
            RedisTarget::Cluster { nodes, hash_tag, url } => {
                let info = url.as_str().into_connection_info()?;
                let nodes = nodes
                    .iter()
                    .map(|address| {
                        let (host, port) = crate::config::parse_host_port(address).ok_or_else(|| {
                            RedisError::from((redis::ErrorKind::Client, "a cluster node is not host:port"))
                        })?;
                        Ok(info.clone().set_addr(ConnectionAddr::Tcp(host, port)))
                    })
                    .collect::<Result<Vec<_>, RedisError>>()?;
                let locator = Locator::Cluster { nodes, answered: 0, hash_tag: hash_tag.clone() };
                Ok(RedisConnection::found_by(target, locator, 0))
            }
        }
    }

    /// A connection whose master `locator` finds, at its first command.
    fn found_by(target: &RedisTarget, locator: Locator, db: i64) -> RedisConnection {
        let shared = Shared {
            target: target.clone(),
            current: Mutex::new(None),
            found: AtomicU64::new(0),
            finder: Some(tokio::sync::Mutex::new(Finder { locator, failed: None })),
        };
        RedisConnection { shared: Arc::new(shared), db }
    }

    /// A connection of its own to the same address, connecting lazily like [`Self::open`]. Under
    /// Sentinel or on a cluster, this connection itself (a clone): what is known of the master,
    /// and the forgetting of it after a failover, is per connection, and connections of their own
    /// would each find a new master on their own (each asking, logging and failing its first
    /// command) and might go on reading from a demoted one after another has moved on.
    pub fn another(&self) -> Result<RedisConnection, RedisError> {
        match &self.shared.target {
            RedisTarget::Address(_) => RedisConnection::open(&self.shared.target),
            RedisTarget::Sentinel { .. } | RedisTarget::Cluster { .. } => Ok(self.clone()),
        }
    }

    /// A client for the current master, for what needs a connection of its own (pub/sub).
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        Ok(self.master().await?.client.clone())
    }

    /// Runs `invocation`, then `WAIT` for `replicas` replicas for at most `timeout`, in one
    /// pipeline on one connection: `WAIT` then covers the script's writes (it waits for what this
    /// connection wrote, and a replica that has that has everything before it), which a `WAIT`
    /// sent after a reconnection would not. Returns the script's reply and how many replicas
    /// acknowledged it. A script Redis does not hold yet is loaded and the pipeline sent again.
    ///
    /// `WAIT` blocks the connection it is sent on, so these pipelines have a connection of their
    /// own: reads, the lease and the flush go on beside a wait. Under Sentinel, too few replicas
    /// makes the next command ask for the master again (this one may be cut off from the rest).
    pub async fn invoke_and_wait<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(T, u64), RedisError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipeline = redis::pipe();
        pipeline.invoke_script(invocation).cmd("WAIT").arg(replicas).arg(timeout_ms);
        let master = self.master().await?;
        let mut conn = master.waits.clone();
        let answer: Result<(T, u64), RedisError> = match pipeline.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                invocation.load_async(&mut conn).await?;
                pipeline.query_async(&mut conn).await
            }
            answer => answer,
        };
        match &answer {
            Err(error) => self.failed(&master, error),
            Ok((_, acknowledged)) if *acknowledged < u64::from(replicas) => {
                self.forget(&master, "too few replicas acknowledged a write")
            }
            Ok(_) => {}
        }
        answer
    }

    /// The master in use, asking Sentinel or the cluster first when none is.
    async fn master(&self) -> Result<Arc<Master>, RedisError> {
        match self.current() {
            Some(master) => Ok(master),
            // Boxed: finding the master is rare, and its future holds redis-rs's Sentinel client
            // futures, about 25 deep. Inline, it was part of every command's future, and a build
            // from scratch of a crate that calls the store overflowed rustc's query depth
            // computing that layout ("queries overflow the depth limit!").
            None => Box::pin(self.find_master()).await,
        }
    }

    /// [`Self::master`] when none is known: asks Sentinel or the cluster.
    async fn find_master(&self) -> Result<Arc<Master>, RedisError> {
        let Some(finder) = &self.shared.finder else {
            // A connection to one address keeps its master from the start.
            return Err(RedisError::from((redis::ErrorKind::Client, "no Redis master is known")));
        };
        // One question at a time; who waited for it uses its answer.
        let mut finder = finder.lock().await;
        if let Some(master) = self.current() {
            return Ok(master);
        }
        if let Some((at, error)) = &finder.failed {
            if at.elapsed() < FIND_RETRY_AFTER {
                return Err(error.clone());
            }
        }
        let client = match finder.locator.find().await {
            Ok(client) => client,
            Err(error) => {
                finder.failed = Some((Instant::now(), error.clone()));
                return Err(error);
            }
        };
        finder.failed = None;
        tracing::info!(master = %client.get_connection_info().addr(), "redis: the master, as {} says", finder.locator.name());
        crate::metrics::redis_master_found();
        let generation = self.shared.found.fetch_add(1, Ordering::Relaxed) + 1;
        let master = Arc::new(Master::new(client, generation)?);
        *self.lock_current() = Some(master.clone());
        Ok(master)
    }

    fn current(&self) -> Option<Arc<Master>> {
        self.lock_current().clone()
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Master>>> {
        // The lock guards a plain swap: a panic cannot leave it half done.
        self.shared.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a command to `master` failed with `error`: under Sentinel or on a cluster, a failure
    /// a failover causes makes the next command ask for the master again (unless one already did).
    fn failed(&self, master: &Master, error: &RedisError) {
        if looks_like_failover(error) {
            self.forget(master, &error.to_string());
        }
    }

    /// Under Sentinel or on a cluster, makes the next command ask for the master again, unless one
    /// already did since `master` was found.
    fn forget(&self, master: &Master, why: &str) {
        if self.shared.finder.is_none() {
            return;
        }
        let mut current = self.lock_current();
        if current.as_ref().is_some_and(|m| m.generation == master.generation) {
            tracing::warn!(error = why, "redis: the master failed; asking for the master again");
            *current = None;
        }
    }
}

/// Whether `error` is what a command meets when the master went away or stepped down.
fn looks_like_failover(error: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
            )
        )
}

fn manager(client: redis::Client, response_timeout: Duration) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client, config)
}

impl Master {
    /// The master `client` connects to: a connection for commands, and one for pipelines that
    /// end in `WAIT`, which may take up to the longest wait more (connected at its first use).
    fn new(client: redis::Client, generation: u64) -> Result<Master, RedisError> {
        let wait = Duration::from_millis(crate::config::MAX_REDIS_WAIT_TIMEOUT_MS);
        Ok(Master {
            manager: manager(client.clone(), REDIS_RESPONSE_TIMEOUT)?,
            waits: manager(client.clone(), REDIS_RESPONSE_TIMEOUT + wait)?,
            client,
            generation,
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let master = self.master().await?;
            let result = master.manager.clone().req_packed_command(cmd).await;
            match &result {
                Err(error) => self.failed(&master, error),
                // An error reply (`MOVED`, `READONLY`...) arrives as a value, made an error later.
                Ok(Value::ServerError(error)) => self.failed(&master, &error.clone().into()),
                Ok(_) => {}
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let master = self.master().await?;
            let result = master.manager.clone().req_packed_commands(pipeline, offset, count).await;
            match &result {
                Err(error) => self.failed(&master, error),
                Ok(values) => {
                    if let Some(Value::ServerError(error)) = values.iter().find(|v| matches!(v, Value::ServerError(_)))
                    {
                        self.failed(&master, &error.clone().into());
                    }
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding the master stays out of line of every command's future: inline, redis-rs's Sentinel
    /// client futures made it 3,160 bytes (32 boxed) and about 25 futures deep, which overflowed
    /// rustc's query depth in builds from scratch of the crates that call the store.
    #[test]
    fn a_command_does_not_carry_the_master_finder_inline() {
        let target = RedisTarget::Sentinel {
            sentinels: vec!["127.0.0.1:1".into()],
            master: "mymaster".into(),
            url: "redis://127.0.0.1".into(),
        };
        let conn = RedisConnection::open(&target).unwrap();
        let master = conn.master();
        let size = std::mem::size_of_val(&master);
        println!("RedisConnection::master() future: {size} bytes");
        assert!(size <= 256, "the future of RedisConnection::master() is {size} bytes: is the finder inline again?");
    }
}
