//! The shared state handed to HTTP handlers and jobs.

use std::sync::Arc;

use crate::config::{CoreConfig, ServeConfig};
use crate::db::Db;
use crate::flush::Flusher;
use crate::store::Store;

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The Redis side.
    pub store: Store,
    /// The SQL side.
    pub db: Db,
    /// Runs flushes; shared so HTTP, the scheduler and shutdown use one local lock.
    pub flusher: Flusher,
    /// The HTTP limits.
    pub limits: Arc<Limits>,
}

/// Request limits, from [`ServeConfig`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most events per request.
    pub max_batch_events: usize,
    /// Most users per bulk read.
    pub max_read_users: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl AppState {
    /// Builds the state; connects lazily, so this succeeds while Redis or the database is down.
    pub fn new(core: &CoreConfig, serve: Option<&ServeConfig>) -> anyhow::Result<Self> {
        let store = Store::connect(&core.redis_url, &core.redis_prefix)?;
        let db = Db::connect(&core.database_url, core.db_pool_size, core.db_timeout())?;
        let flusher = Flusher::new(
            store.clone(),
            db.clone(),
            core.flush_chunk_users,
            std::time::Duration::from_secs(core.flush_lock_ttl_secs),
        );
        let limits = Limits {
            max_batch_events: serve.map_or(1_000, |s| s.max_batch_events),
            max_read_users: serve.map_or(1_000, |s| s.max_read_users),
            max_body_bytes: serve.map_or(1024 * 1024, |s| s.max_body_bytes),
        };
        Ok(Self {
            store,
            db,
            flusher,
            limits: Arc::new(limits),
        })
    }
}
