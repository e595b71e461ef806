//! The Notification table: the truth that reconcile reads. Configuration names the table and
//! its columns; identifiers are validated (letters, digits, `_`, an optional `schema.` prefix)
//! and quoted, so configuration cannot inject SQL.

use clap::Args;
use diesel::sql_types::{BigInt, Integer};
use diesel::{QueryableByName, RunQueryDsl};

use crate::config::ConfigError;
use crate::db::{DbConnection, DbError};

/// Where the notifications are. Optional: without `--source-table`, reconcile and recount are off.
#[derive(Debug, Clone, Args)]
pub struct SourceConfig {
    /// The Notification table (Django's `db_table`, e.g. `notifications_notification`).
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_TABLE")]
    pub source_table: Option<String>,

    /// Its primary-key column.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_ID_COLUMN", default_value = "id")]
    pub source_id_column: String,

    /// Its recipient column (a foreign key's column, e.g. `recipient_id`).
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_USER_COLUMN", default_value = "recipient_id")]
    pub source_user_column: String,

    /// Its read-state column.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_UNREAD_COLUMN", default_value = "unread")]
    pub source_unread_column: String,

    /// The value of the read-state column that means unread: `true` for `unread`, `false` for `is_read`.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_UNREAD_WHEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub source_unread_when: bool,

    /// A soft-delete column, if any: a true value counts as deleted.
    #[arg(long, global = true, env = "COUNTERSINK_SOURCE_DELETED_COLUMN")]
    pub source_deleted_column: Option<String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            source_table: None,
            source_id_column: "id".into(),
            source_user_column: "recipient_id".into(),
            source_unread_column: "unread".into(),
            source_unread_when: true,
            source_deleted_column: None,
        }
    }
}

/// A validated mapping of the Notification table, ready to build queries.
#[derive(Debug, Clone)]
pub struct Source {
    table: String,
    id: String,
    user: String,
    unread: String,
    unread_when: bool,
    deleted: Option<String>,
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

impl SourceConfig {
    /// The validated mapping, or `None` when no table is configured.
    pub fn resolve(&self) -> Result<Option<Source>, ConfigError> {
        let Some(table) = &self.source_table else { return Ok(None) };
        let table = quote_identifier(table, true)
            .map_err(|p| ConfigError::new("--source-table", "COUNTERSINK_SOURCE_TABLE", p))?;
        let column =
            |value: &str, flag, env| quote_identifier(value, false).map_err(|p| ConfigError::new(flag, env, p));
        Ok(Some(Source {
            table,
            id: column(&self.source_id_column, "--source-id-column", "COUNTERSINK_SOURCE_ID_COLUMN")?,
            user: column(&self.source_user_column, "--source-user-column", "COUNTERSINK_SOURCE_USER_COLUMN")?,
            unread: column(&self.source_unread_column, "--source-unread-column", "COUNTERSINK_SOURCE_UNREAD_COLUMN")?,
            unread_when: self.source_unread_when,
            deleted: self
                .source_deleted_column
                .as_deref()
                .map(|c| column(c, "--source-deleted-column", "COUNTERSINK_SOURCE_DELETED_COLUMN"))
                .transpose()?,
        }))
    }
}

/// Checks an identifier and returns it double-quoted (`"schema"."table"` where allowed).
fn quote_identifier(name: &str, allow_schema: bool) -> Result<String, String> {
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
    Ok(parts.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join("."))
}

impl Source {
    /// The expression giving a row's state (see [`crate::store::state`]).
    fn state_expression(&self) -> String {
        use crate::store::state::{DELETED, READ, UNREAD};
        let deleted = self.deleted.as_ref().map(|d| format!("WHEN {d} THEN {DELETED} ")).unwrap_or_default();
        let unread = if self.unread_when { self.unread.clone() } else { format!("NOT {}", self.unread) };
        format!("CASE {deleted}WHEN {unread} THEN {UNREAD} ELSE {READ} END")
    }

    fn select_rows(&self) -> String {
        format!(
            "SELECT CAST({id} AS BIGINT) AS id, CAST({user} AS BIGINT) AS user_id, {state} AS state FROM {table}",
            id = self.id,
            user = self.user,
            state = self.state_expression(),
            table = self.table,
        )
    }

    /// Fails with a message naming the missing table or column.
    pub fn check(&self, conn: &mut DbConnection) -> Result<(), String> {
        let probe = |conn: &mut DbConnection, what: &str| -> Result<(), String> {
            diesel::sql_query(format!("SELECT 1 AS one FROM {} WHERE 1 = 0", self.table))
                .load::<Probe>(conn)
                .map(|_| ())
                .map_err(|e| format!("{what}: {e}"))
        };
        probe(conn, &format!("the source table {} cannot be read", self.table))?;
        let mut columns = vec![("--source-id-column", &self.id), ("--source-user-column", &self.user)];
        columns.push(("--source-unread-column", &self.unread));
        if let Some(deleted) = &self.deleted {
            columns.push(("--source-deleted-column", deleted));
        }
        for (flag, column) in columns {
            diesel::sql_query(format!("SELECT 1 AS one FROM {} WHERE 1 = 0 AND {column} IS NULL", self.table))
                .load::<Probe>(conn)
                .map_err(|e| format!("column {column} ({flag}) is not in {}: {e}", self.table))?;
        }
        diesel::sql_query(format!("{} WHERE 1 = 0", self.select_rows()))
            .load::<SourceRow>(conn)
            .map_err(|e| format!("the columns of {} cannot be read as id, user and read state: {e}", self.table))?;
        Ok(())
    }

    /// Every notification of `users`. User ids are integers, written into the SQL as numbers.
    pub fn rows_of_users(&self, conn: &mut DbConnection, users: &[u64]) -> Result<Vec<SourceRow>, DbError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let list = users.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let sql = format!("{} WHERE {} IN ({list})", self.select_rows(), self.user);
        Ok(diesel::sql_query(sql).load(conn)?)
    }

    /// Up to `limit` notifications with ids above `after`, in id order (bootstrap's chunks).
    pub fn rows_after(
        &self,
        conn: &mut DbConnection,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<SourceRow>, DbError> {
        let floor = after.map(|a| format!(" WHERE {} > {a}", self.id)).unwrap_or_default();
        let sql = format!("{}{floor} ORDER BY {} LIMIT {limit}", self.select_rows(), self.id);
        Ok(diesel::sql_query(sql).load(conn)?)
    }

    /// How many notifications have ids above `after` (for progress).
    pub fn rows_after_count(&self, conn: &mut DbConnection, after: Option<i64>) -> Result<u64, DbError> {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let floor = after.map(|a| format!(" WHERE {} > {a}", self.id)).unwrap_or_default();
        let sql = format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {}{floor}", self.table);
        let rows: Vec<Count> = diesel::sql_query(sql).load(conn)?;
        Ok(rows.first().map_or(0, |c| c.n as u64))
    }

    /// Up to `limit` user ids after `after`, in order: every user with a notification or a stored count.
    pub fn users_after(&self, conn: &mut DbConnection, after: Option<u64>, limit: usize) -> Result<Vec<u64>, DbError> {
        let floor = after.map(|a| a as i64).unwrap_or(-1);
        let sql = format!(
            "SELECT user_id FROM (SELECT CAST({user} AS BIGINT) AS user_id FROM {table} \
             UNION SELECT user_id FROM countersink_usernotificationscount) AS users \
             WHERE user_id > {floor} ORDER BY user_id LIMIT {limit}",
            user = self.user,
            table = self.table,
        );
        let rows: Vec<UserRow> = diesel::sql_query(sql).load(conn)?;
        Ok(rows.into_iter().map(|r| r.user_id as u64).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_injection_is_refused() {
        assert_eq!(quote_identifier("notifications_notification", true), Ok("\"notifications_notification\"".into()));
        assert_eq!(quote_identifier("app.notification", true), Ok("\"app\".\"notification\"".into()));
        for bad in ["", "a.b.c", "1abc", "n; DROP TABLE x", "n\"x", "a b", "unread--"] {
            assert!(quote_identifier(bad, true).is_err(), "{bad}");
        }
        assert!(quote_identifier("app.notification", false).is_err());
    }

    #[test]
    fn state_follows_polarity_and_soft_delete() {
        let mut config = SourceConfig { source_table: Some("n".into()), ..SourceConfig::default() };
        let source = config.resolve().ok().flatten().map(|s| s.state_expression());
        assert_eq!(source.as_deref(), Some("CASE WHEN \"unread\" THEN 2 ELSE 1 END"));
        config.source_unread_column = "is_read".into();
        config.source_unread_when = false;
        config.source_deleted_column = Some("deleted".into());
        let source = config.resolve().ok().flatten().map(|s| s.state_expression());
        assert_eq!(source.as_deref(), Some("CASE WHEN \"deleted\" THEN 3 WHEN NOT \"is_read\" THEN 2 ELSE 1 END"));
    }
}
