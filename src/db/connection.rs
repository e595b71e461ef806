//! The connection type over every backend.
// diesel's MultiConnection derive generates public items without docs.
#![allow(missing_docs)]

use diesel::mysql::MysqlConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;

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
