-- The table Django reads through the unmanaged model `countersink.UserNotificationsCount`
-- (the name is Django's default for that app label and model name).
-- MySQL commits each DDL statement by itself, so a run that fails part-way keeps what it did;
-- IF NOT EXISTS lets the migration run again from the start.
CREATE TABLE IF NOT EXISTS countersink_usernotificationscount (
    user_id BIGINT NOT NULL PRIMARY KEY,
    unread_count BIGINT NOT NULL DEFAULT 0
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per flush batch applied, written in the same transaction as its deltas:
-- a batch found here is never applied again. Batch ids compare byte for byte (utf8mb4_bin),
-- as on the other backends; DATETIME(6) keeps microseconds, as PostgreSQL's TIMESTAMP does.
CREATE TABLE IF NOT EXISTS countersink_flush_batches (
    batch_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    users BIGINT NOT NULL DEFAULT 0,
    delta_sum BIGINT NOT NULL DEFAULT 0,
    applied_at DATETIME(6) NOT NULL,
    INDEX countersink_flush_batches_applied_at (applied_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
