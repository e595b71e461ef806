//! The Notification table: the truth that reconcile reads. Configuration names the table and
//! its columns; identifiers are validated (letters, digits, `_`, an optional `schema.` prefix)
//! and quoted, so configuration cannot inject SQL. The SQL is written when a query runs, for the
//! connection's backend ([`Backend::quote`], [`Backend::bigint`]).

use diesel::sql_types::{BigInt, Integer};
use diesel::{QueryableByName, RunQueryDsl};

use crate::config::{setting, ConfigError, SourceConfig};
use crate::db::{Backend, DbConnection, DbError};

/// A validated mapping of the Notification table, ready to build queries.
#[derive(Debug, Clone)]
pub struct Source {
    table: Identifier,
    id: Identifier,
    user: Identifier,
    unread: Identifier,
    unread_when: bool,
    deleted: Option<Identifier>,
}

/// A checked identifier: one part, or `schema.table`. Each part is letters, digits and `_`, so
/// quoting it needs no escaping.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identifier(Vec<String>);

impl std::fmt::Display for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// One notification as the table holds it, in the state-machine's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
pub struct SourceRow {
    /// The notification's id.
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// Its recipient.
    #[diesel(sql_type = BigInt)]
    pub user_id: i64,
    /// 1 read, 2 unread, 3 deleted (as in `apply_events.lua`).
    #[diesel(sql_type = Integer)]
    pub state: i32,
}

#[derive(QueryableByName)]
struct UserRow {
    #[diesel(sql_type = BigInt)]
    user_id: i64,
}

#[derive(QueryableByName)]
struct Probe {
    #[diesel(sql_type = Integer)]
    #[allow(dead_code)]
    one: i32,
}

/// `name` quoted for `backend`, each part of `schema.table` on its own.
fn quote(backend: Backend, name: &Identifier) -> String {
    name.0.iter().map(|part| backend.quote(part)).collect::<Vec<_>>().join(".")
}

impl Source {
    /// The mapping `config` describes, its names checked, or `None` when no table is configured.
    pub fn from_config(config: &SourceConfig) -> Result<Option<Source>, ConfigError> {
        let Some(table) = &config.source_table else { return Ok(None) };
        let table = identifier(table, true).map_err(|p| ConfigError::new(setting!(SourceConfig.source_table), p))?;
        let column = |value: &str, setting| identifier(value, false).map_err(|p| ConfigError::new(setting, p));
        Ok(Some(Source {
            table,
            id: column(&config.source_id_column, setting!(SourceConfig.source_id_column))?,
            user: column(&config.source_user_column, setting!(SourceConfig.source_user_column))?,
            unread: column(&config.source_unread_column, setting!(SourceConfig.source_unread_column))?,
            unread_when: config.source_unread_when,
            deleted: config
                .source_deleted_column
                .as_deref()
                .map(|c| column(c, setting!(SourceConfig.source_deleted_column)))
                .transpose()?,
        }))
    }
}

/// Checks an identifier (`schema.table` where allowed).
fn identifier(name: &str, allow_schema: bool) -> Result<Identifier, String> {
    let parts: Vec<&str> = name.split('.').collect();
    let valid_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if parts.len() > if allow_schema { 2 } else { 1 } || !parts.iter().all(|p| valid_part(p)) {
        return Err(format!(
            "{name:?} is not a plain SQL identifier (letters, digits and _, starting with a letter or _{})",
            if allow_schema { "; optionally schema.table" } else { "" }
        ));
    }
    Ok(Identifier(parts.iter().map(|p| p.to_string()).collect()))
}

impl Source {
    /// The expression giving a row's state (see [`crate::store::state`]).
    fn state_expression(&self, backend: Backend) -> String {
        use crate::store::state::{DELETED, READ, UNREAD};
        let deleted =
            self.deleted.as_ref().map(|d| format!("WHEN {} THEN {DELETED} ", quote(backend, d))).unwrap_or_default();
        let unread = quote(backend, &self.unread);
        let unread = if self.unread_when { unread } else { format!("NOT {unread}") };
        format!("CASE {deleted}WHEN {unread} THEN {UNREAD} ELSE {READ} END")
    }

    fn select_rows(&self, backend: Backend) -> String {
        format!(
            "SELECT {id} AS id, {user} AS user_id, {state} AS state FROM {table}",
            id = backend.bigint(&quote(backend, &self.id)),
            user = backend.bigint(&quote(backend, &self.user)),
            state = self.state_expression(backend),
            table = quote(backend, &self.table),
        )
    }

    /// Fails with a message naming the missing table or column.
    pub fn check(&self, conn: &mut DbConnection) -> Result<(), String> {
        let backend = conn.backend();
        let table = quote(backend, &self.table);
        diesel::sql_query(format!("SELECT 1 AS one FROM {table} WHERE 1 = 0"))
            .load::<Probe>(conn)
            .map_err(|e| format!("the source table {} cannot be read: {e}", self.table))?;
        let mut columns = vec![("--source-id-column", &self.id), ("--source-user-column", &self.user)];
        columns.push(("--source-unread-column", &self.unread));
        if let Some(deleted) = &self.deleted {
            columns.push(("--source-deleted-column", deleted));
        }
        for (flag, column) in columns {
            diesel::sql_query(format!(
                "SELECT 1 AS one FROM {table} WHERE 1 = 0 AND {} IS NULL",
                quote(backend, column)
            ))
            .load::<Probe>(conn)
            .map_err(|e| format!("column {column} ({flag}) is not in {}: {e}", self.table))?;
        }
        diesel::sql_query(format!("{} WHERE 1 = 0", self.select_rows(backend)))
            .load::<SourceRow>(conn)
            .map_err(|e| format!("the columns of {} cannot be read as id, user and read state: {e}", self.table))?;
        // The walk of every user compares and orders the recipient column itself: PostgreSQL
        // refuses that for a column that is not an integer, here rather than mid-reconcile.
        diesel::sql_query(self.users_after_sql(backend, -1, 0))
            .load::<UserRow>(conn)
            .map_err(|e| format!("the recipient column {} (--source-user-column) is not an integer: {e}", self.user))?;
        Ok(())
    }

    /// Every notification of `users`. User ids are integers, written into the SQL as numbers.
    pub fn rows_of_users(&self, conn: &mut DbConnection, users: &[u64]) -> Result<Vec<SourceRow>, DbError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let backend = conn.backend();
        let list = users.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let sql = format!("{} WHERE {} IN ({list})", self.select_rows(backend), quote(backend, &self.user));
        Ok(diesel::sql_query(sql).load(conn)?)
    }

    /// Up to `limit` notifications with ids above `after`, in id order (bootstrap's chunks).
    pub fn rows_after(
        &self,
        conn: &mut DbConnection,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<SourceRow>, DbError> {
        let backend = conn.backend();
        let id = quote(backend, &self.id);
        let floor = after.map(|a| format!(" WHERE {id} > {a}")).unwrap_or_default();
        let sql = format!("{}{floor} ORDER BY {id} LIMIT {limit}", self.select_rows(backend));
        Ok(diesel::sql_query(sql).load(conn)?)
    }

    /// How many notifications have ids above `after` (for progress).
    pub fn rows_after_count(&self, conn: &mut DbConnection, after: Option<i64>) -> Result<u64, DbError> {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let backend = conn.backend();
        let floor = after.map(|a| format!(" WHERE {} > {a}", quote(backend, &self.id))).unwrap_or_default();
        let sql = format!("SELECT {} AS n FROM {}{floor}", backend.bigint("COUNT(*)"), quote(backend, &self.table));
        let rows: Vec<Count> = diesel::sql_query(sql).load(conn)?;
        Ok(rows.first().map_or(0, |c| c.n as u64))
    }

    /// Up to `limit` recipients after `after`, in order. Grouped on the column itself, so an
    /// index on it is walked in order and the scan stops after `limit` users.
    pub fn users_after(&self, conn: &mut DbConnection, after: Option<u64>, limit: usize) -> Result<Vec<u64>, DbError> {
        let floor = after.map(|a| a as i64).unwrap_or(-1);
        let rows: Vec<UserRow> = diesel::sql_query(self.users_after_sql(conn.backend(), floor, limit)).load(conn)?;
        Ok(rows.into_iter().map(|r| r.user_id as u64).collect())
    }

    fn users_after_sql(&self, backend: Backend, floor: i64, limit: usize) -> String {
        let user = quote(backend, &self.user);
        format!(
            "SELECT {cast} AS user_id FROM {table} WHERE {user} > {floor} GROUP BY {user} ORDER BY {user} LIMIT {limit}",
            cast = backend.bigint(&user),
            table = quote(backend, &self.table),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_per_backend_and_injection_is_refused() {
        let table = identifier("notifications_notification", true);
        assert_eq!(table.as_ref().map(|t| quote(Backend::Postgres, t)), Ok("\"notifications_notification\"".into()));
        assert_eq!(table.as_ref().map(|t| quote(Backend::Mysql, t)), Ok("`notifications_notification`".into()));
        let qualified = identifier("app.notification", true);
        assert_eq!(qualified.as_ref().map(|t| quote(Backend::Postgres, t)), Ok("\"app\".\"notification\"".into()));
        assert_eq!(qualified.as_ref().map(|t| quote(Backend::Mysql, t)), Ok("`app`.`notification`".into()));
        assert_eq!(qualified.as_ref().map(|t| quote(Backend::Sqlite, t)), Ok("`app`.`notification`".into()));
        for bad in ["", "a.b.c", "1abc", "n; DROP TABLE x", "n\"x", "n`x", "a b", "unread--"] {
            assert!(identifier(bad, true).is_err(), "{bad}");
        }
        assert!(identifier("app.notification", false).is_err());
    }

    #[test]
    fn state_follows_polarity_and_soft_delete() {
        let mut config = SourceConfig { source_table: Some("n".into()), ..SourceConfig::default() };
        let source = Source::from_config(&config).ok().flatten().map(|s| s.state_expression(Backend::Postgres));
        assert_eq!(source.as_deref(), Some("CASE WHEN \"unread\" THEN 2 ELSE 1 END"));
        config.source_unread_column = "is_read".into();
        config.source_unread_when = false;
        config.source_deleted_column = Some("deleted".into());
        let source = Source::from_config(&config).ok().flatten().map(|s| s.state_expression(Backend::Mysql));
        assert_eq!(source.as_deref(), Some("CASE WHEN `deleted` THEN 3 WHEN NOT `is_read` THEN 2 ELSE 1 END"));
    }
}
