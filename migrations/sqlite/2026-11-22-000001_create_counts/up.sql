-- The table Django reads through the unmanaged model `countersink.UserNotificationsCount`
-- (the name is Django's default for that app label and model name).
CREATE TABLE countersink_usernotificationscount (
    user_id INTEGER PRIMARY KEY,
    unread_count BIGINT NOT NULL DEFAULT 0
);

-- One row per flush batch applied, written in the same transaction as its deltas:
-- a batch found here is never applied again.
CREATE TABLE countersink_flush_batches (
    batch_id TEXT PRIMARY KEY,
    users BIGINT NOT NULL DEFAULT 0,
    delta_sum BIGINT NOT NULL DEFAULT 0,
    applied_at TIMESTAMP NOT NULL
);
CREATE INDEX countersink_flush_batches_applied_at ON countersink_flush_batches (applied_at);
