//! The diesel schema of the tables the migrations create (the same on every backend).

/// The count table's name, for the one statement diesel cannot build (PostgreSQL's `unnest`
/// upsert in `queries::add_deltas`); a test checks it is the table declared below.
pub const COUNTS_TABLE: &str = "countersink_usernotificationscount";

diesel::table! {
    /// user id → unread count; Django reads it through an unmanaged model.
    countersink_usernotificationscount (user_id) {
        /// The recipient's user id.
        user_id -> BigInt,
        /// Unread notifications as of the last flush.
        unread_count -> BigInt,
    }
}

diesel::table! {
    /// One row per flush batch applied: the exactly-once record.
    countersink_flush_batches (batch_id) {
        /// The batch id chosen at hand-off.
        batch_id -> Text,
        /// Users the batch changed.
        users -> BigInt,
        /// The sum of the batch's deltas.
        delta_sum -> BigInt,
        /// When the batch was committed (UTC).
        applied_at -> Timestamp,
        /// The Redis hand-off sequence number of the batch (0 when unknown: a recovered batch).
        handoff_seq -> BigInt,
    }
}

diesel::table! {
    /// The fencing token of the last flush-lease holder that wrote under the lease (one row, id 1):
    /// see `queries::pass_lease_fence`.
    countersink_lease_fence (id) {
        /// Always 1.
        id -> SmallInt,
        /// The numeric part of the holder's fencing token.
        token -> BigInt,
    }
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;

    #[test]
    fn the_count_table_name_is_the_declared_table() {
        use super::countersink_usernotificationscount as counts;
        let sql = diesel::debug_query::<diesel::pg::Pg, _>(&counts::table.select(counts::user_id)).to_string();
        assert!(sql.contains(&format!("FROM \"{}\"", super::COUNTS_TABLE)), "{sql}");
    }
}
