//! The queries countersink runs. Each takes a connection, so callers decide the transaction.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use diesel::dsl::DuplicatedKeys;
use diesel::prelude::*;
use diesel::upsert::excluded;

use super::schema::{
    countersink_flush_batches as batches, countersink_lease_fence as fence,
    countersink_usernotificationscount as counts, COUNTS_TABLE,
};
use super::{DbConnection, DbError};

/// Runs `$body` with `$c` bound to the concrete connection, for statements that diesel's
/// MultiConnection cannot express (upserts): the same query builder, compiled for PostgreSQL and
/// SQLite (`ON CONFLICT ... DO UPDATE`, `excluded`), and `$mysql` for MySQL, whose
/// `ON DUPLICATE KEY UPDATE` names neither a conflict target nor `excluded`.
macro_rules! per_backend {
    ($conn:expr, $c:ident => $body:expr, mysql: $m:ident => $mysql:expr) => {
        match $conn {
            DbConnection::Pg($c) => $body,
            DbConnection::Sqlite($c) => $body,
            DbConnection::Mysql($m) => $mysql,
        }
    };
}

/// MySQL's name for the value a row of `INSERT ... ON DUPLICATE KEY UPDATE` tried to insert
/// (`excluded.unread_count` elsewhere). `VALUES()` is what MariaDB knows; MySQL 8 still accepts it.
fn mysql_inserted_count() -> diesel::expression::SqlLiteral<diesel::sql_types::BigInt> {
    diesel::dsl::sql("VALUES(unread_count)")
}

/// A flush batch as recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize, utoipa::ToSchema)]
pub struct BatchRecord {
    /// The batch id.
    pub batch_id: String,
    /// Users the batch changed.
    pub users: i64,
    /// The sum of its deltas.
    pub delta_sum: i64,
    /// When it was committed: RFC 3339 in UTC, with its offset (`Z`). Stored without a time zone
    /// (always UTC); the offset is added when it is written out.
    #[schema(value_type = String, format = DateTime, example = "2026-11-22T23:55:04.111478Z")]
    #[serde(serialize_with = "utc_rfc3339")]
    pub applied_at: NaiveDateTime,
    /// The Redis hand-off sequence number of the batch (0 for a batch recovered after a crash).
    pub handoff_seq: i64,
}

/// Writes a UTC timestamp stored without a zone as RFC 3339 with its offset, in microseconds.
fn utc_rfc3339<S: serde::Serializer>(at: &NaiveDateTime, serializer: S) -> Result<S::Ok, S::Error> {
    let at = chrono::DateTime::<chrono::Utc>::from_naive_utc_and_offset(*at, chrono::Utc);
    serializer.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// Records `batch_id` as applied; `false` if it already was (then nothing else may be written).
///
/// Written first in the flush transaction: a second flusher of the same batch waits on the
/// primary key until the first commits, then finds it recorded.
pub fn claim_batch(
    conn: &mut DbConnection,
    batch_id: &str,
    handoff_seq: u64,
    now: NaiveDateTime,
) -> Result<bool, DbError> {
    let claim = diesel::insert_into(batches::table).values((
        batches::batch_id.eq(batch_id),
        batches::applied_at.eq(now),
        batches::handoff_seq.eq(handoff_seq as i64),
    ));
    let inserted = per_backend!(conn, c => claim.on_conflict_do_nothing().execute(c)?, mysql: c => {
        // diesel connects with CLIENT_FOUND_ROWS, under which `ON DUPLICATE KEY UPDATE` reports
        // a duplicate as one row, like an insert. A plain INSERT tells them apart: MySQL fails
        // only that statement on a duplicate key, and the transaction goes on.
        match claim.execute(c) {
            Ok(rows) => rows,
            Err(diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)) => 0,
            Err(e) => return Err(e.into()),
        }
    });
    Ok(inserted == 1)
}

/// Raises the lease fence to `token` inside the caller's transaction, unless a later holder of
/// the flush lease has raised it further: `false` means the caller's lease has passed to another
/// process, and the transaction must write nothing. The row stays locked until the commit, so a
/// later holder's fenced transaction waits for this one and then sees its token.
pub fn pass_lease_fence(conn: &mut DbConnection, token: i64) -> Result<bool, DbError> {
    let raised = diesel::update(fence::table.filter(fence::id.eq(1)).filter(fence::token.le(token)))
        .set(fence::token.eq(token))
        .execute(conn)?;
    Ok(raised == 1)
}

/// The highest fencing token a lease holder wrote with (0 before the first): new tokens start
/// above it, even after Redis lost the counter that numbers them.
pub fn lease_fence(conn: &mut DbConnection) -> Result<i64, DbError> {
    Ok(fence::table.filter(fence::id.eq(1)).select(fence::token).first(conn).optional()?.unwrap_or(0))
}

/// Up to `limit` users with a stored count after `after`, in order.
pub fn stored_users_after(conn: &mut DbConnection, after: Option<u64>, limit: usize) -> Result<Vec<u64>, DbError> {
    let floor = after.map_or(-1, |a| a as i64);
    let users: Vec<i64> = counts::table
        .select(counts::user_id)
        .filter(counts::user_id.gt(floor))
        .order(counts::user_id)
        .limit(limit as i64)
        .load(conn)?;
    Ok(users.into_iter().map(|u| u as u64).collect())
}

/// Stores the totals of a claimed batch.
pub fn complete_batch(conn: &mut DbConnection, batch_id: &str, users: i64, delta_sum: i64) -> Result<(), DbError> {
    diesel::update(batches::table.find(batch_id))
        .set((batches::users.eq(users), batches::delta_sum.eq(delta_sum)))
        .execute(conn)?;
    Ok(())
}

/// Adds each delta to its user's stored count, inserting users seen for the first time.
///
/// The caller keeps a chunk within the backends' bind limit ([`crate::config::MAX_FLUSH_CHUNK_USERS`]).
pub fn add_deltas(conn: &mut DbConnection, deltas: &[(u64, i64)]) -> Result<(), DbError> {
    if let DbConnection::Pg(c) = conn {
        // PostgreSQL: two array binds, where the multi-row VALUES form has two per row (10,000
        // parameters for a 5,000-user chunk, built by diesel and parsed by PostgreSQL each time).
        let (users, values): (Vec<i64>, Vec<i64>) = deltas.iter().map(|(user, delta)| (*user as i64, *delta)).unzip();
        diesel::sql_query(format!(
            "INSERT INTO {COUNTS_TABLE} (user_id, unread_count) SELECT * FROM unnest($1::bigint[], $2::bigint[]) \
             ON CONFLICT (user_id) DO UPDATE SET unread_count = {COUNTS_TABLE}.unread_count + EXCLUDED.unread_count"
        ))
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&users)
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&values)
        .execute(c)?;
        return Ok(());
    }
    let rows: Vec<_> = deltas
        .iter()
        .map(|(user, delta)| (counts::user_id.eq(*user as i64), counts::unread_count.eq(*delta)))
        .collect();
    let insert = diesel::insert_into(counts::table).values(&rows);
    // The affected-row count is not returned: MySQL reports 2 for each updated row.
    per_backend!(conn, c => insert
        .on_conflict(counts::user_id)
        .do_update()
        .set(counts::unread_count.eq(counts::unread_count + excluded(counts::unread_count)))
        .execute(c)?,
    mysql: c => insert
        .on_conflict(DuplicatedKeys)
        .do_update()
        .set(counts::unread_count.eq(counts::unread_count + mysql_inserted_count()))
        .execute(c)?);
    Ok(())
}

/// Sets every stored count to the given absolute values, and every other user's to zero, in
/// the caller's transaction (a bootstrap's final write; running it twice changes nothing).
pub fn replace_all_counts(conn: &mut DbConnection, counts: &[(u64, i64)], chunk_users: usize) -> Result<(), DbError> {
    diesel::update(counts::table.filter(counts::unread_count.ne(0))).set(counts::unread_count.eq(0)).execute(conn)?;
    for chunk in counts.chunks(chunk_users) {
        let rows: Vec<_> =
            chunk.iter().map(|(user, n)| (counts::user_id.eq(*user as i64), counts::unread_count.eq(*n))).collect();
        let insert = diesel::insert_into(counts::table).values(&rows);
        per_backend!(conn, c => insert
            .on_conflict(counts::user_id)
            .do_update()
            .set(counts::unread_count.eq(excluded(counts::unread_count)))
            .execute(c)?,
        mysql: c => insert
            .on_conflict(DuplicatedKeys)
            .do_update()
            .set(counts::unread_count.eq(mysql_inserted_count()))
            .execute(c)?);
    }
    Ok(())
}

/// Stored counts of `users`, and which of `batch_ids` are committed, from one snapshot.
///
/// Both must come from the same snapshot: a batch committing between two separate reads
/// would otherwise be missed or counted twice. Without batches it is a single statement.
pub fn stored_counts(
    conn: &mut DbConnection,
    users: &[u64],
    batch_ids: &[String],
) -> Result<(HashMap<u64, i64>, HashSet<String>), DbError> {
    let user_keys: Vec<i64> = users.iter().map(|u| *u as i64).collect();
    let read = |conn: &mut DbConnection| -> Result<_, diesel::result::Error> {
        let stored: Vec<(i64, i64)> = counts::table
            .filter(counts::user_id.eq_any(&user_keys))
            .select((counts::user_id, counts::unread_count))
            .load(conn)?;
        let committed: Vec<String> = if batch_ids.is_empty() {
            Vec::new()
        } else {
            batches::table.filter(batches::batch_id.eq_any(batch_ids)).select(batches::batch_id).load(conn)?
        };
        Ok((stored, committed))
    };
    if batch_ids.is_empty() {
        // The usual case, no flush under way: one statement sees one snapshot by itself, so the
        // transaction (three more round trips) is only needed when batches must be read too.
        let (stored, _) = read(conn)?;
        return Ok((stored.into_iter().map(|(u, n)| (u as u64, n)).collect(), HashSet::new()));
    }
    if let DbConnection::Mysql(_) = conn {
        // MySQL: REPEATABLE READ (InnoDB's default, but a server may be set to READ COMMITTED)
        // reads one snapshot from the first read on. Set before BEGIN: it applies to the next
        // transaction, and may not be changed inside one. Sent as plain text, not prepared.
        diesel::connection::SimpleConnection::batch_execute(
            conn,
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        )?;
    }
    let (stored, committed) = conn.transaction(|c| {
        if let DbConnection::Pg(_) = c {
            // PostgreSQL: READ COMMITTED gives each statement its own snapshot; ask for one.
            diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(c)?;
        }
        // SQLite: a transaction sees one snapshot from its first read (WAL mode).
        read(c)
    })?;
    Ok((stored.into_iter().map(|(u, n)| (u as u64, n)).collect(), committed.into_iter().collect()))
}

/// Bounds each following statement of the current transaction to `limit`, so a flush against a
/// slow or locked database ends at its deadline instead of holding its lock for as long as the
/// database takes. PostgreSQL cancels the statement; SQLite, in-process, waits at most its
/// busy timeout, and the flush checks its deadline between statements. MySQL bounds only waits
/// for row locks (`innodb_lock_wait_timeout`), in whole seconds, for the session:
/// [`end_statement_time_limit`] lifts it.
pub fn limit_statement_time(conn: &mut DbConnection, limit: std::time::Duration) -> Result<(), DbError> {
    match conn {
        DbConnection::Pg(c) => {
            // Rounded up, so the cancel comes at the deadline, not before; at least 1 ms:
            // PostgreSQL reads 0 as "no limit".
            let ms = limit.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128);
            diesel::sql_query(format!("SET LOCAL statement_timeout = {ms}")).execute(c)?;
        }
        DbConnection::Sqlite(_) => {}
        DbConnection::Mysql(c) => {
            // Whole seconds, rounded up, so the wait ends at the deadline, not before.
            let secs = limit.as_millis().div_ceil(1000).max(1);
            diesel::sql_query(format!("SET SESSION innodb_lock_wait_timeout = {secs}")).execute(c)?;
        }
    }
    Ok(())
}

/// Lifts what [`limit_statement_time`] set for the session (MySQL), so the pooled connection's
/// next user waits as long as the server's default. PostgreSQL's limit ended with the transaction.
pub fn end_statement_time_limit(conn: &mut DbConnection) -> Result<(), DbError> {
    if let DbConnection::Mysql(c) = conn {
        diesel::sql_query("SET SESSION innodb_lock_wait_timeout = DEFAULT").execute(c)?;
    }
    Ok(())
}

/// The highest hand-off sequence number recorded (0 when none is).
pub fn max_handoff_seq(conn: &mut DbConnection) -> Result<u64, DbError> {
    let max: Option<i64> = batches::table.select(diesel::dsl::max(batches::handoff_seq)).first(conn)?;
    Ok(max.unwrap_or(0).max(0) as u64)
}

/// The most recent applied batch, if any.
pub fn last_batch(conn: &mut DbConnection) -> Result<Option<BatchRecord>, DbError> {
    Ok(batches::table.order(batches::applied_at.desc()).first(conn).optional()?)
}

/// Deletes batch records applied before `before`. Only safe once every batch handed off
/// before then has been dropped from Redis, which a flush ensures by recovering leftovers first.
pub fn prune_batches(conn: &mut DbConnection, before: NaiveDateTime) -> Result<usize, DbError> {
    Ok(diesel::delete(batches::table.filter(batches::applied_at.lt(before))).execute(conn)?)
}
