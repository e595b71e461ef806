//! The connection to the Redis master: at one address (`--redis-url`), or found by name through
//! Redis Sentinel (`--redis-sentinels`, `--redis-sentinel-master`) and followed across failovers
//! without a restart.
//!
//! Under Sentinel, a command that fails the way a failover makes commands fail (the connection
//! refused or dropped, a timeout, `READONLY` from a demoted master, `MASTERDOWN`) forgets the
//! master it went to, and the next command asks Sentinel again. The failed command itself is
//! answered as Redis being unavailable (503 with `Retry-After` for a request): it is not retried
//! here, because a script whose reply was lost may have run. A promoted replica does not vouch
//! for the state (its run id is not the one in the instance key), so what it lacks is recovered
//! like after any restart (docs/design.md, *Redis restarts*).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};

use crate::config::CoreConfig;

/// How long one Redis command may take before the request fails over to 503.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting (or asking Sentinel for the master) may take; short, so an outage is
/// answered quickly.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed question to Sentinel is answered for the commands behind it without asking
/// again: Sentinels that do not answer would otherwise hold every command for the connect timeout
/// in turn.
const SENTINEL_RETRY_AFTER: Duration = Duration::from_millis(250);

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
}

impl RedisTarget {
    /// The target the settings name.
    pub fn from_config(core: &CoreConfig) -> RedisTarget {
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
    /// The master in use; `None` under Sentinel until the next command asks who it is.
    current: Mutex<Option<Master>>,
    /// Masters found so far: a failure forgets the master it met only if no later one was found.
    found: AtomicU64,
    sentinel: Option<tokio::sync::Mutex<Sentinel>>,
}

/// The Sentinel client, and its last failure while no master is known.
struct Sentinel {
    client: SentinelClient,
    failed: Option<(Instant, RedisError)>,
}

#[derive(Clone)]
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
                let master = Master::new(client, 0)?;
                let shared = Shared { current: Mutex::new(Some(master)), found: AtomicU64::new(0), sentinel: None };
                Ok(RedisConnection { shared: Arc::new(shared), db })
            }
            RedisTarget::Sentinel { sentinels, master, url } => {
                let settings = url.as_str().into_connection_info()?.redis_settings().clone();
                let db = settings.db();
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
                let addresses: Vec<String> = sentinels.iter().map(|address| format!("redis://{address}")).collect();
                let client = SentinelClient::build(addresses, master.clone(), Some(node), SentinelServerType::Master)?;
                let shared = Shared {
                    current: Mutex::new(None),
                    found: AtomicU64::new(0),
                    sentinel: Some(tokio::sync::Mutex::new(Sentinel { client, failed: None })),
                };
                Ok(RedisConnection { shared: Arc::new(shared), db })
            }
        }
    }

    /// A client for the current master, for what needs a connection of its own (pub/sub).
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        Ok(self.master().await?.client)
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

    /// The master in use, asking Sentinel first when none is.
    async fn master(&self) -> Result<Master, RedisError> {
        if let Some(master) = self.current() {
            return Ok(master);
        }
        let Some(sentinel) = &self.shared.sentinel else {
            // A connection to one address keeps its master from the start.
            return Err(RedisError::from((redis::ErrorKind::Client, "no Redis master is known")));
        };
        // One question to Sentinel at a time; who waited for it uses its answer.
        let mut sentinel = sentinel.lock().await;
        if let Some(master) = self.current() {
            return Ok(master);
        }
        if let Some((at, error)) = &sentinel.failed {
            if at.elapsed() < SENTINEL_RETRY_AFTER {
                return Err(error.clone());
            }
        }
        let asked = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, sentinel.client.async_get_client())
            .await
            .unwrap_or_else(|_| Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))));
        let client = match asked {
            Ok(client) => client,
            Err(error) => {
                sentinel.failed = Some((Instant::now(), error.clone()));
                return Err(error);
            }
        };
        sentinel.failed = None;
        tracing::info!(master = %client.get_connection_info().addr(), "redis: the master, as Sentinel says");
        crate::metrics::redis_master_found();
        let generation = self.shared.found.fetch_add(1, Ordering::Relaxed) + 1;
        let master = Master::new(client, generation)?;
        *self.lock_current() = Some(master.clone());
        Ok(master)
    }

    fn current(&self) -> Option<Master> {
        self.lock_current().clone()
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Master>> {
        // The lock guards a plain swap: a panic cannot leave it half done.
        self.shared.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a command to `master` failed with `error`: under Sentinel, a failure a failover
    /// causes makes the next command ask for the master again (unless one already did).
    fn failed(&self, master: &Master, error: &RedisError) {
        if looks_like_failover(error) {
            self.forget(master, &error.to_string());
        }
    }

    /// Under Sentinel, makes the next command ask for the master again, unless one already did
    /// since `master` was found.
    fn forget(&self, master: &Master, why: &str) {
        if self.shared.sentinel.is_none() {
            return;
        }
        let mut current = self.lock_current();
        if current.as_ref().is_some_and(|m| m.generation == master.generation) {
            tracing::warn!(error = why, "redis: the master failed; asking Sentinel for the master again");
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
        || matches!(error.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown))
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
            if let Err(error) = &result {
                self.failed(&master, error);
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
            if let Err(error) = &result {
                self.failed(&master, error);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
