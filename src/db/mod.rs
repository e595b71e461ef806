//! The SQL side: backends, the connection pool, migrations and the queries countersink runs.
//!
//! diesel is synchronous, so every database call runs on tokio's blocking pool through
//! [`Db::run`]. The backend is picked from the URL's scheme, never by trial (SQLite would accept
//! any string as a file name). Backend-specific SQL lives in `match` arms labelled by backend.
//!
//! Bind limits: a statement may carry at most 65,535 parameters on PostgreSQL and MySQL, and
//! 32,766 on the bundled SQLite; [`MAX_BINDS`] is the smallest, and every statement that grows
//! with its input is chunked below it.

mod connection;
pub mod queries;
pub mod schema;

pub use connection::{DbConnection, Manager};

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::{CustomizeConnection, Pool, PooledConnection};
use diesel::RunQueryDsl;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const MYSQL_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");

/// The most bind parameters one statement may carry on every backend: SQLite's limit in the
/// bundled build (`SQLITE_MAX_VARIABLE_NUMBER` = 32,766); PostgreSQL and MySQL allow 65,535.
pub const MAX_BINDS: usize = 32_766;

/// How long SQLite waits for another writer before failing: a flush may hold the write lock
/// for a second or two.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 10_000;

/// The SQL backends countersink supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
    /// MySQL or MariaDB.
    Mysql,
}

impl Backend {
    /// A checked identifier (letters, digits and `_`: nothing to escape) quoted for this backend:
    /// `"name"` on PostgreSQL; `` `name` `` on MySQL, where double quotes are strings, and on
    /// SQLite, where a double-quoted name that matches no column is read as a string (a misspelt
    /// column would pass a check and count nothing).
    pub fn quote(self, identifier: &str) -> String {
        match self {
            Backend::Postgres => format!("\"{identifier}\""),
            Backend::Sqlite | Backend::Mysql => format!("`{identifier}`"),
        }
    }

    /// `expression` cast to a 64-bit integer: MySQL and MariaDB have no `CAST(x AS BIGINT)`.
    pub fn bigint(self, expression: &str) -> String {
        match self {
            Backend::Postgres | Backend::Sqlite => format!("CAST({expression} AS BIGINT)"),
            Backend::Mysql => format!("CAST({expression} AS SIGNED)"),
        }
    }

    /// Picks the backend from the URL's scheme.
    pub fn from_url(url: &str) -> Result<Backend, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Ok(Backend::Mysql)
        } else if url.starts_with("sqlite://") || url.starts_with("file:") || !url.contains("://") {
            if sqlite_path(url).is_empty() {
                Err("the SQLite URL names no file; use sqlite://PATH".to_string())
            } else {
                Ok(Backend::Sqlite)
            }
        } else {
            Err(format!("unknown scheme in {url:?}; use postgres://, postgresql://, mysql://, mariadb:// or sqlite://"))
        }
    }
}

/// The versions of a backend's embedded migrations.
fn versions<DB: diesel::backend::Backend>(source: &EmbeddedMigrations) -> Result<Vec<String>, DbError>
where
    EmbeddedMigrations: MigrationSource<DB>,
{
    let migrations = MigrationSource::<DB>::migrations(source).map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(migrations.iter().map(|m| m.name().version().to_string()).collect())
}

/// The URL diesel's MySQL client accepts: it knows only the `mysql://` scheme.
fn mysql_url(url: &str) -> String {
    match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_string(),
    }
}

/// The path (or `file:` URI) SQLite opens for a `sqlite://` URL.
fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

/// The URL with its password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no backend countersink knows.
    #[error("{0}")]
    BadUrl(String),
    /// No connection could be had from the pool in time: the database is down, refuses the
    /// credentials, or is saturated. `cause` is what the database (or its client library) said.
    #[error("cannot connect to the database {url}: {cause} ({hint})")]
    Unavailable {
        /// The database URL, without its password.
        url: String,
        /// What the database said, or that every pooled connection stayed busy.
        cause: String,
        /// What to check.
        hint: &'static str,
    },
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The blocking task running the query panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
}

impl DbError {
    /// Whether the database was unreachable (worth a retry) rather than a query being wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable { .. } => true,
            DbError::Query(diesel::result::Error::DatabaseError(kind, info)) => {
                use diesel::result::DatabaseErrorKind::{ClosedConnection, SerializationFailure, UnableToSendCommand};
                // SQLite's busy timeout, PostgreSQL shutting down, a MySQL server that went away
                // or restarts, and lock waits or deadlocks are passing states too.
                let message = info.message();
                matches!(kind, ClosedConnection | UnableToSendCommand | SerializationFailure)
                    || message.contains("database is locked")
                    || message.contains("terminating connection")
                    || message.contains("the database system is shutting down")
                    || message.contains("server has gone away")
                    || message.contains("Server has gone away")
                    || message.contains("Lost connection to")
                    || message.contains("Can't connect to")
                    || message.contains("shutdown in progress")
                    || message.contains("Lock wait timeout exceeded")
            }
            _ => false,
        }
    }
}

/// A pool timeout as a [`DbError`]: r2d2 says `timed out waiting for connection: CAUSE` when
/// the last attempt to connect failed, and only the first half when the pool stayed busy.
fn unavailable(backend: Backend, url: &str, error: &diesel::r2d2::PoolError) -> DbError {
    let text = error.to_string();
    let cause = match text.strip_prefix("timed out waiting for connection: ") {
        Some(cause) => cause.trim().to_string(),
        None => format!("{text}: every pooled connection stayed busy (see --db-pool-size)"),
    };
    let hint = match backend {
        Backend::Sqlite => "check --database-url / COUNTERSINK_DATABASE_URL",
        Backend::Postgres | Backend::Mysql => {
            "check --database-url / COUNTERSINK_DATABASE_URL, and that the server runs and takes these credentials"
        }
    };
    DbError::Unavailable { url: url.to_string(), cause, hint }
}

#[derive(Debug)]
struct SqliteSettings;

impl CustomizeConnection<DbConnection, diesel::r2d2::Error> for SqliteSettings {
    fn on_acquire(&self, conn: &mut DbConnection) -> Result<(), diesel::r2d2::Error> {
        if let DbConnection::Sqlite(conn) = conn {
            // WAL lets readers run beside the flush's write transaction.
            conn.batch_execute(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS};"
            ))
            .map_err(diesel::r2d2::Error::QueryError)?;
        }
        Ok(())
    }
}

/// The database: a pool of connections to one backend.
#[derive(Clone)]
pub struct Db {
    pool: Pool<Manager>,
    backend: Backend,
    /// The URL without its password, for error messages.
    url: String,
}

impl Db {
    /// A pool that connects lazily, so the service starts (and recovers) while the database is down.
    pub fn connect(url: &str, pool_size: u32, timeout: Duration) -> Result<Db, DbError> {
        let backend = Backend::from_url(url).map_err(DbError::BadUrl)?;
        let redacted = redact_url(url);
        let target = match backend {
            Backend::Postgres => url.to_string(),
            Backend::Sqlite => sqlite_path(url).to_string(),
            Backend::Mysql => mysql_url(url),
        };
        let pool = Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(0))
            .connection_timeout(timeout)
            .connection_customizer(Box::new(SqliteSettings))
            .build_unchecked(Manager::new(backend, target));
        Ok(Db { pool, backend, url: redacted })
    }

    /// The backend behind this pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `f` with a pooled connection on tokio's blocking pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let (backend, url) = (self.backend, self.url.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(|e| unavailable(backend, &url, &e))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))
        .and_then(|result| result);
        if result.is_err() {
            crate::metrics::dependency_error(crate::metrics::Dependency::Database);
        }
        result
    }

    /// A pooled connection for code already on a blocking thread.
    pub fn get(&self) -> Result<PooledConnection<Manager>, DbError> {
        self.pool.get().map_err(|e| {
            crate::metrics::dependency_error(crate::metrics::Dependency::Database);
            unavailable(self.backend, &self.url, &e)
        })
    }

    /// Answers whether the database takes a query.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.run(|conn| Ok(diesel::sql_query("SELECT 1").execute(conn).map(|_| ())?)).await
    }

    /// The embedded migrations not applied yet (their versions), without side effects: diesel's
    /// own check would create its bookkeeping table. A database never migrated has them all pending.
    pub async fn pending_migrations(&self) -> Result<Vec<String>, DbError> {
        #[derive(diesel::QueryableByName)]
        struct Applied {
            #[diesel(sql_type = diesel::sql_types::Text)]
            version: String,
        }
        self.run(|conn| {
            let embedded: Vec<String> = match conn {
                DbConnection::Pg(_) => versions::<diesel::pg::Pg>(&PG_MIGRATIONS)?,
                DbConnection::Sqlite(_) => versions::<diesel::sqlite::Sqlite>(&SQLITE_MIGRATIONS)?,
                DbConnection::Mysql(_) => versions::<diesel::mysql::Mysql>(&MYSQL_MIGRATIONS)?,
            };
            let applied: Vec<Applied> =
                match diesel::sql_query("SELECT version FROM __diesel_schema_migrations").load(conn) {
                    Ok(rows) => rows,
                    // No bookkeeping table: nothing was ever applied.
                    Err(diesel::result::Error::DatabaseError(_, info))
                        if ["does not exist", "doesn't exist", "no such table"]
                            .iter()
                            .any(|missing| info.message().contains(missing)) =>
                    {
                        Vec::new()
                    }
                    Err(e) => return Err(e.into()),
                };
            let applied: std::collections::HashSet<String> = applied.into_iter().map(|a| a.version).collect();
            Ok(embedded.into_iter().filter(|v| !applied.contains(v)).collect())
        })
        .await
    }

    /// Applies the migrations not yet applied; returns their names.
    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        self.run(|conn| {
            let applied = match conn {
                DbConnection::Pg(c) => c.run_pending_migrations(PG_MIGRATIONS),
                DbConnection::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS),
                // MySQL commits each DDL statement by itself, so its migrations are not
                // transactional: each is one statement, or written to be run again (IF NOT EXISTS).
                DbConnection::Mysql(c) => c.run_pending_migrations(MYSQL_MIGRATIONS),
            }
            .map_err(|e| DbError::Migration(e.to_string()))?;
            Ok(applied.iter().map(|v| v.to_string()).collect())
        })
        .await
    }
}
