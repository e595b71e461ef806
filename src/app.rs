//! The shared state handed to HTTP handlers and jobs.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::bootstrap::Bootstrapper;
use crate::config::{CoreConfig, ServeConfig};
use crate::counts::Reader;
use crate::credentials::Auth;
use crate::db::Db;
use crate::flush::Flusher;
use crate::live::caps::StreamCaps;
use crate::live::Live;
use crate::reconcile::Reconciler;
use crate::source::Source;
use crate::store::{GroupCommit, RedisTarget, ReplicaWait, Store};

/// Everything a handler needs: one shared [`App`], so the clone that every middleware layer and
/// extractor makes is one reference count, not a copy of each part.
#[derive(Clone)]
pub struct AppState(Arc<App>);

impl Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

/// The parts of the service, each shared by handlers and jobs.
#[derive(Clone)]
pub struct App {
    /// The Redis side.
    pub store: Store,
    /// Applies event requests, merging concurrent ones into shared script calls.
    pub ingest: GroupCommit,
    /// Reads real-time counts, merging concurrent reads into shared Redis calls.
    pub reader: Reader,
    /// The SQL side.
    pub db: Db,
    /// Runs flushes; shared so HTTP, the scheduler and shutdown use one local lock.
    pub flusher: Flusher,
    /// Recounts users from the Notification table.
    pub reconciler: Reconciler,
    /// Rebuilds the state from that table, and watches Redis for restarts.
    pub bootstrapper: Bootstrapper,
    /// The HTTP limits.
    pub limits: Arc<Limits>,
    /// Who may call what.
    pub auth: Arc<Auth>,
    /// Permits for requests in flight (`--max-concurrent-requests`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Live counts: the pub/sub fan-out behind the SSE streams.
    pub live: Live,
    /// Permits for open live streams (`--max-live-streams`); a stream holds one until it ends.
    pub live_streams: Arc<tokio::sync::Semaphore>,
    /// Open live streams per user and per client address (`--max-live-streams-per-*`).
    pub stream_caps: StreamCaps,
    /// The runtime the state was made on (`--worker-threads`): what a request starts that holds the
    /// flush lease or outlives it (a flush, a reconcile) runs there, not on the HTTP thread that
    /// answers it, which would serve nothing else meanwhile and ends before the final flush.
    pub jobs: tokio::runtime::Handle,
}

/// Request limits, from [`ServeConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most events per request.
    pub max_batch_events: usize,
    /// Most state shards one request may create.
    pub max_new_state_shards: usize,
    /// Most calls of the apply script at once; requests arriving meanwhile are merged.
    pub apply_calls_in_flight: usize,
    /// Most Redis calls reading held counts at once; reads arriving meanwhile are merged.
    pub read_calls_in_flight: usize,
    /// Most users per bulk read, and per merged read call.
    pub max_read_users: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a request may take.
    pub request_timeout: Duration,
    /// How long a request's `webhook-id` is remembered.
    pub idempotency_ttl: Duration,
    /// Most requests in flight.
    pub max_concurrent_requests: usize,
    /// Most live streams open at once.
    pub max_live_streams: usize,
    /// Most live streams per user.
    pub max_live_streams_per_user: usize,
    /// Most live streams per client address.
    pub max_live_streams_per_address: usize,
    /// The header holding the client's address for the per-address cap; `None`: the peer's.
    pub live_address_header: Option<axum::http::HeaderName>,
    /// The longest lifetime a stream token may claim.
    pub max_stream_token_lifetime: Duration,
    /// How long a request's body may take to arrive.
    pub body_timeout: Duration,
}

impl From<&ServeConfig> for Limits {
    fn from(serve: &ServeConfig) -> Self {
        Limits {
            max_batch_events: serve.max_batch_events,
            max_new_state_shards: serve.max_new_state_shards,
            apply_calls_in_flight: serve.apply_calls_in_flight,
            read_calls_in_flight: serve.read_calls_in_flight,
            max_read_users: serve.max_read_users,
            max_body_bytes: serve.max_body_bytes,
            request_timeout: Duration::from_secs(serve.request_timeout_secs),
            idempotency_ttl: Duration::from_secs(serve.idempotency_ttl_secs),
            max_concurrent_requests: serve.max_concurrent_requests,
            max_live_streams: serve.max_live_streams,
            max_live_streams_per_user: serve.max_live_streams_per_user,
            max_live_streams_per_address: serve.max_live_streams_per_address,
            // Validated in ServeConfig::validate; an invalid name cannot reach here.
            live_address_header: serve
                .live_address_header
                .as_deref()
                .and_then(|name| axum::http::HeaderName::from_bytes(name.as_bytes()).ok()),
            max_stream_token_lifetime: Duration::from_secs(serve.max_stream_token_secs),
            body_timeout: Duration::from_secs(serve.body_timeout_secs),
        }
    }
}

impl Default for Limits {
    /// The defaults of `countersink serve`, as its settings declare them.
    fn default() -> Self {
        Limits::from(&ServeConfig::defaults())
    }
}

impl AppState {
    /// Builds the state; connects lazily, so this succeeds while Redis or the database is down.
    /// Without `serve` (the CLI), requests are not authenticated.
    pub fn new(core: &CoreConfig, serve: Option<&ServeConfig>) -> anyhow::Result<Self> {
        let jobs = tokio::runtime::Handle::try_current()
            .map_err(|e| anyhow::anyhow!("the service's state is made inside its runtime: {e}"))?;
        let source = Source::from_config(&core.source)?.map(Arc::new);
        let store = Store::open(&RedisTarget::from_config(core), &core.redis_prefix)?;
        // With a Notification table to rebuild from, a lost state is refused until rebuilt.
        let store = if source.is_some() { store.requiring_bootstrap() } else { store };
        let store = match serve {
            Some(serve) if serve.redis_wait_replicas > 0 => store.waiting_for_replicas(ReplicaWait {
                replicas: serve.redis_wait_replicas,
                timeout: Duration::from_millis(serve.redis_wait_timeout_ms),
            }),
            _ => store,
        };
        let db = Db::connect(&core.database_url, core.db_pool_size, core.db_timeout())?;
        let flusher = Flusher::new(
            store.clone(),
            db.clone(),
            core.flush_chunk_users,
            Duration::from_secs(core.flush_lock_ttl_secs),
            Duration::from_secs(core.flush_timeout_secs),
        );
        let reconciler = Reconciler::new(store.clone(), db.clone(), flusher.clone(), source.clone());
        let bootstrapper = Bootstrapper::new(store.clone(), db.clone(), flusher.clone(), source);
        let limits = serve.map(Limits::from).unwrap_or_default();
        let (ingest, reader) = request_paths(&store, &db, &limits);
        let live = Live::new(store.clone(), reader.clone(), jobs.clone());
        let auth = match serve {
            Some(serve) => Auth::from_config(serve)?,
            None => Auth::open(),
        };
        Ok(Self(Arc::new(App {
            ingest,
            reader,
            store,
            db,
            flusher,
            reconciler,
            bootstrapper,
            in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests)),
            live,
            live_streams: Arc::new(tokio::sync::Semaphore::new(limits.max_live_streams)),
            stream_caps: StreamCaps::new(limits.max_live_streams_per_user, limits.max_live_streams_per_address),
            limits: Arc::new(limits),
            auth: Arc::new(auth),
            jobs,
        })))
    }

    /// The state an HTTP thread serves with (`http::server::HttpThreads`): events and reads on a
    /// Redis connection of its own, merged with the thread's other requests. The rest is shared,
    /// `store` too: status, readiness and metrics are the process's, not a thread's.
    pub fn for_http_thread(&self) -> Result<Self, crate::store::StoreError> {
        let (ingest, reader) = request_paths(&self.store.with_own_connection()?, &self.db, &self.limits);
        Ok(self.clone().changed(|app| {
            app.ingest = ingest;
            app.reader = reader;
        }))
    }

    /// The same state with other limits (tests).
    pub fn with_limits(self, limits: Limits) -> Self {
        self.changed(|app| {
            (app.ingest, app.reader) = request_paths(&app.store, &app.db, &limits);
            // Streams read through the same queue (the hub starts nothing until its first stream).
            app.live = Live::new(app.store.clone(), app.reader.clone(), app.jobs.clone());
            app.in_flight = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests));
            app.live_streams = Arc::new(tokio::sync::Semaphore::new(limits.max_live_streams));
            app.stream_caps = StreamCaps::new(limits.max_live_streams_per_user, limits.max_live_streams_per_address);
            app.limits = Arc::new(limits);
        })
    }

    /// The same state with other credentials (tests).
    pub fn with_auth(self, auth: Auth) -> Self {
        self.changed(|app| app.auth = Arc::new(auth))
    }

    /// A copy of the parts with `change` made (the parts themselves stay shared).
    fn changed(self, change: impl FnOnce(&mut App)) -> Self {
        let mut app = Arc::unwrap_or_clone(self.0);
        change(&mut app);
        Self(Arc::new(app))
    }
}

/// The group commit and the reader over `store`, sized by `limits`: what a request's events and
/// reads go through.
fn request_paths(store: &Store, db: &Db, limits: &Limits) -> (GroupCommit, Reader) {
    let ingest = GroupCommit::new(store.clone(), limits.apply_calls_in_flight, limits.max_batch_events);
    let reader = Reader::new(store.clone(), db.clone(), limits.read_calls_in_flight, limits.max_read_users);
    (ingest, reader)
}
