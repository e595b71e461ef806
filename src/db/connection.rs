//! The connection type over every backend, and the pool's manager that opens one.
// diesel's MultiConnection derive generates public items without docs.
#![allow(missing_docs)]

use std::path::Path;

use diesel::mysql::MysqlConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, ConnectionError};

use super::Backend;

/// A connection to whichever backend the URL named.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    /// PostgreSQL, for production.
    Pg(PgConnection),
    /// SQLite, the embedded default.
    Sqlite(SqliteConnection),
    /// MySQL or MariaDB.
    Mysql(MysqlConnection),
}

impl DbConnection {
    /// The backend this connection talks to.
    pub fn backend(&self) -> Backend {
        match self {
            DbConnection::Pg(_) => Backend::Postgres,
            DbConnection::Sqlite(_) => Backend::Sqlite,
            DbConnection::Mysql(_) => Backend::Mysql,
        }
    }
}

/// Opens connections for the pool to the one backend the URL's scheme named.
///
/// diesel's own `ConnectionManager<DbConnection>` goes through the derived
/// `MultiConnection::establish`, which tries every backend in turn and throws each one's error
/// away, so every failure read `Invalid connection url for multiconnection` (and SQLite, tried
/// on a PostgreSQL URL, could create a stray file). This manager opens only the named backend
/// and keeps what its client library said.
#[derive(Debug)]
pub struct Manager {
    backend: Backend,
    /// What the backend's client takes: the URL, or SQLite's file path.
    target: String,
}

impl Manager {
    /// A manager for `target` (as [`super::Db::connect`] rewrote it for the backend).
    pub fn new(backend: Backend, target: String) -> Self {
        Self { backend, target }
    }
}

impl diesel::r2d2::ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<DbConnection, Self::Error> {
        let connection = match self.backend {
            Backend::Postgres => PgConnection::establish(&self.target).map(DbConnection::Pg),
            Backend::Mysql => MysqlConnection::establish(&self.target).map(|mut c| {
                // The bundled libmysqlclient keeps a prepared statement's last error after a later
                // run succeeds, and diesel reads the error text to judge each run: a cached
                // statement that failed once (the batch claim's duplicate key, a lock wait timeout)
                // would fail on that connection from then on. Statements are prepared afresh.
                c.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
                DbConnection::Mysql(c)
            }),
            Backend::Sqlite => {
                // SQLite says only "unable to open database file" when the folder is missing.
                let path = self.target.strip_prefix("file:").unwrap_or(&self.target);
                let path = path.split('?').next().unwrap_or(path);
                match Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(folder) if path != ":memory:" && !folder.is_dir() => Err(ConnectionError::BadConnection(
                        format!("the folder {} does not exist (create it, or name another path)", folder.display()),
                    )),
                    _ => SqliteConnection::establish(&self.target).map(DbConnection::Sqlite),
                }
            }
        };
        connection.map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        std::thread::panicking() || conn.is_broken()
    }
}
