//! Live counts: the fan-out behind `GET /v1/users/{user_id}/unread-count/stream`.
//!
//! The scripts that change a user's visible count (`apply_events.lua`, `reconcile_truth.lua`,
//! `reconcile_finish.lua`, and the end of a bootstrap) publish, in the same atomic step, one
//! message on the deployment's channel ([`crate::store::Keys::live_channel`]) naming the users
//! whose count moved, or `*` for every user. A flush moves pending into stored without changing a total, so it publishes nothing.
//!
//! Each process holds ONE dedicated pub/sub connection ([`Live`]'s subscriber task, started by the
//! first stream and reconnecting with backoff). For the users that have streams here, it re-reads
//! the counts with the ordinary real-time read ([`crate::counts`]), one bulk read for all the users
//! of the messages waiting, and hands each reading to that user's streams through a
//! [`tokio::sync::watch`]; a stream sends it only if it differs from what that stream last sent.
//!
//! Ordering: every reading takes a sequence number before it starts, and a stream only sends a
//! reading newer than the last one it sent, so a slow read can never overwrite a newer count.
//! The change that published a message is in Redis before the message leaves, so the reading it
//! triggers sees it: the last reading a stream gets is the current count.
//!
//! While the subscription is down, messages are lost; on every (re)subscribe the task re-reads all
//! local users, so streams catch up with whatever changed meanwhile.

pub mod caps;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::counts::{ReadError, Reader};
use crate::store::{RedisConnection, Store, ALL_USERS};

/// First wait before resubscribing after the connection was lost; doubles up to the maximum.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait between resubscribe attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long connecting and subscribing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the idle subscription is pinged, so a silently dead TCP connection is noticed.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// How long a ping may take before the connection is taken for dead.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before reading again after a read failed (Redis or the database down).
const READ_RETRY: Duration = Duration::from_secs(1);
/// Users per bulk read: the read endpoint's default limit.
const READ_CHUNK: usize = 1_000;

/// One reading of a user's count by this process. `seq` orders readings: a larger one started later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// When the read started, in this process's reading order (0: never read).
    pub seq: u64,
    /// The user's unread count (stored + pending).
    pub count: i64,
}

/// The live-count hub of one process. Cheap to clone.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    channel: String,
    store: Store,
    reader: Reader,
    /// Per user with at least one stream here: the latest reading, watched by those streams.
    watchers: Mutex<HashMap<u64, watch::Sender<Reading>>>,
    read_seq: AtomicU64,
    started: AtomicBool,
    closing: watch::Sender<bool>,
    subscribed: watch::Sender<bool>,
    /// Where the subscriber runs (the service's jobs' runtime, not the HTTP thread of the first
    /// stream).
    jobs: tokio::runtime::Handle,
}

impl Live {
    /// A hub over `store`'s deployment; its subscriber starts on `jobs` with the first stream.
    pub fn new(store: Store, reader: Reader, jobs: tokio::runtime::Handle) -> Live {
        let channel = store.keys().live_channel();
        Live {
            inner: Arc::new(Inner {
                channel,
                store,
                reader,
                watchers: Mutex::new(HashMap::new()),
                read_seq: AtomicU64::new(0),
                started: AtomicBool::new(false),
                closing: watch::channel(false).0,
                subscribed: watch::channel(false).0,
                jobs,
            }),
        }
    }

    /// Starts watching `user_id`'s count (and the subscriber, if this is the first stream).
    pub fn watch(&self, user_id: u64) -> Watch {
        self.ensure_started();
        let rx = self
            .inner
            .watchers()
            .entry(user_id)
            .or_insert_with(|| watch::channel(Reading { seq: 0, count: 0 }).0)
            .subscribe();
        Watch { user_id, rx, inner: self.inner.clone() }
    }

    /// Reads `user_id`'s count now through `reader` (the HTTP thread's), numbered in this
    /// process's reading order.
    pub async fn read(&self, reader: &Reader, user_id: u64) -> Result<Reading, ReadError> {
        let seq = self.inner.next_seq();
        let counts = reader.unread_counts(&[user_id]).await?;
        let count = counts.first().map(|c| c.unread_count).unwrap_or(0);
        Ok(Reading { seq, count })
    }

    /// Ends every stream and the subscriber (at shutdown, so open streams do not hold it up).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves when [`Live::close`] is called (at once if it was).
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    /// Whether the subscriber holds its subscription right now.
    pub fn is_subscribed(&self) -> bool {
        *self.inner.subscribed.borrow()
    }

    /// Waits until the subscriber holds its subscription, up to `limit`; `false` if it did not.
    pub async fn wait_subscribed(&self, limit: Duration) -> bool {
        let mut rx = self.inner.subscribed.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|subscribed| *subscribed)).await.is_ok_and(|r| r.is_ok())
    }

    /// Users with a stream in this process.
    pub fn watched_users(&self) -> usize {
        self.inner.watchers().len()
    }

    fn ensure_started(&self) {
        if !self.inner.started.swap(true, Ordering::AcqRel) {
            let closing = self.inner.closing.subscribe();
            self.inner.jobs.spawn(run_subscriber(
                Arc::downgrade(&self.inner),
                self.inner.store.connection().clone(),
                self.inner.channel.clone(),
                closing,
            ));
        }
    }
}

/// One stream's view of a user's readings; unregisters itself when dropped.
pub struct Watch {
    user_id: u64,
    rx: watch::Receiver<Reading>,
    inner: Arc<Inner>,
}

impl Watch {
    /// The next reading taken after this call started waiting; `None` if the hub is gone.
    pub async fn changed(&mut self) -> Option<Reading> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watchers = self.inner.watchers();
        // Our receiver is still alive here: 1 means this was the user's last stream.
        if watchers.get(&self.user_id).is_some_and(|tx| tx.receiver_count() <= 1) {
            watchers.remove(&self.user_id);
        }
    }
}

impl Inner {
    fn watchers(&self) -> MutexGuard<'_, HashMap<u64, watch::Sender<Reading>>> {
        // A panic while holding the lock leaves the map consistent (single inserts and removes).
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_seq(&self) -> u64 {
        self.read_seq.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Adds the local users a message names to `dirty`.
    fn mark(&self, message: &redis::Msg, dirty: &mut HashSet<u64>) {
        let Ok(payload) = message.get_payload::<String>() else {
            warn!(channel = %self.channel, "live: a message that is not text; ignored");
            return;
        };
        let watchers = self.watchers();
        if payload == ALL_USERS {
            dirty.extend(watchers.keys());
            return;
        }
        dirty.extend(payload.split(',').filter_map(|id| id.parse::<u64>().ok()).filter(|id| watchers.contains_key(id)));
    }

    /// Reads the users of `dirty` that still have streams, and hands each reading to them.
    async fn refresh(&self, dirty: &HashSet<u64>) -> Result<(), ReadError> {
        let users: Vec<u64> = {
            let watchers = self.watchers();
            dirty.iter().copied().filter(|user| watchers.contains_key(user)).collect()
        };
        for chunk in users.chunks(READ_CHUNK) {
            let seq = self.next_seq();
            let counts = self.reader.unread_counts(chunk).await?;
            let watchers = self.watchers();
            for count in counts {
                if let Some(tx) = watchers.get(&count.user_id) {
                    tx.send_replace(Reading { seq, count: count.unread_count });
                }
            }
        }
        Ok(())
    }
}

/// The subscriber task: subscribes, relays, and resubscribes with backoff until closed or the
/// hub is dropped.
async fn run_subscriber(
    inner: Weak<Inner>,
    redis: RedisConnection,
    channel: String,
    mut closing: watch::Receiver<bool>,
) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let ended = subscription(&inner, &redis, &channel, &mut closing, &mut backoff).await;
        if let Some(hub) = inner.upgrade() {
            hub.subscribed.send_replace(false);
        }
        match ended {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "live: no pub/sub subscription; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = closing.changed() => return,
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// One subscription, until the connection fails (`Err`) or the hub closes (`Ok`).
async fn subscription(
    inner: &Weak<Inner>,
    redis: &RedisConnection,
    channel: &str,
    closing: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    if *closing.borrow() {
        return Ok(());
    }
    // Asked at every (re)subscription: under Sentinel, the master may have changed.
    let client = tokio::time::timeout(CONNECT_TIMEOUT, redis.client())
        .await
        .context("finding the redis master timed out")?
        .context("finding the redis master")?;
    let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .context("connecting to redis timed out")?
        .context("connecting to redis")?;
    let (mut sink, mut messages) = pubsub.split();
    tokio::time::timeout(CONNECT_TIMEOUT, sink.subscribe(channel))
        .await
        .context("subscribing timed out")?
        .context("subscribing")?;
    *backoff = RECONNECT_MIN;
    let Some(hub) = inner.upgrade() else { return Ok(()) };
    hub.subscribed.send_replace(true);
    info!(channel, "live: subscribed");
    // Whatever changed while we were not subscribed was missed: re-read every local user.
    let mut dirty: HashSet<u64> = hub.watchers().keys().copied().collect();
    drop(hub);
    let mut retry_at = Instant::now();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        if !dirty.is_empty() && Instant::now() >= retry_at {
            let Some(hub) = inner.upgrade() else { return Ok(()) };
            match hub.refresh(&dirty).await {
                Ok(()) => dirty.clear(),
                Err(e) => {
                    warn!(error = %e, users = dirty.len(), "live: reading counts failed; retrying");
                    retry_at = Instant::now() + READ_RETRY;
                }
            }
        }
        tokio::select! {
            _ = closing.changed() => return Ok(()),
            message = messages.next() => {
                let message = message.context("the pub/sub connection closed")?;
                let Some(hub) = inner.upgrade() else { return Ok(()) };
                hub.mark(&message, &mut dirty);
                // Everything already waiting goes into the same bulk read.
                while let Some(Some(message)) = messages.next().now_or_never() {
                    hub.mark(&message, &mut dirty);
                }
            }
            _ = tokio::time::sleep_until(retry_at), if !dirty.is_empty() => {}
            _ = ping.tick() => {
                let _: redis::Value = tokio::time::timeout(PING_TIMEOUT, sink.ping())
                    .await
                    .context("a ping timed out")?
                    .context("a ping failed")?;
            }
        }
    }
}
