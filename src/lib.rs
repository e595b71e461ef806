//! countersink keeps Django's "unread notifications" counters exact and fast.
//!
//! Django's `post_save` / `post_delete` signals arrive as HTTP events; each event becomes an
//! exact state transition in Redis; per-user pending deltas wait in a Redis sorted set; a
//! flush moves them into the `UserNotificationsCount` table exactly once, in batches.
//!
//! A map of the crate, one owner per concept:
//!
//! | module        | owns                                                                     |
//! |---------------|--------------------------------------------------------------------------|
//! | [`cli`]       | the command line: subcommands and their flags                             |
//! | [`config`]    | every setting, as a flag and a `COUNTERSINK_*` variable, validated once   |
//! | [`error`]     | the error policy and the one mapping from errors to HTTP responses        |
//! | [`events`]    | the wire format of an event and its validation                            |
//! | [`store`]     | the Redis side: key layout, Lua scripts, the flush lease; one file per concept (events, held counts, batches, instance, recounts, bootstrap) |
//! | [`db`]        | the SQL side: diesel schema, backends (PostgreSQL, MySQL, SQLite), migrations |
//! | [`flush`]     | the exactly-once hand-off of pending deltas into the count table         |
//! | [`counts`]    | real-time reads: the counts held in Redis, and a user's first load       |
//! | [`source`]    | the Notification table: mapping, validation, the queries that read it     |
//! | [`reconcile`] | recounting users from that table, safely beside live events               |
//! | [`bootstrap`] | rebuilding the whole state from that table (day one, or Redis lost), and the watch for Redis restarts |
//! | [`schedule`]  | the only module that knows tokio-cron-scheduler                           |
//! | [`app`]       | the shared state handed to handlers and jobs                              |
//! | [`http`]      | the axum router, one file per endpoint group, request authentication      |
//! | [`live`]      | live counts: the pub/sub subscriber and fan-out behind the SSE stream     |
//! | [`credentials`] | who may call what: webhook secrets, bearer tokens, their checks       |
//! | [`webhook`]   | the Standard Webhooks signature scheme                                    |
//! | [`metrics`]   | the Prometheus registry and the name of every metric                      |
//! | [`crash_point`] | named steps where a test stops the work as a crash would: in process, or the real binary SIGKILLed |
//!
//! `docs/architecture.md` shows the layers (no module cycle, metrics and config at the bottom:
//! `src/layering.rs` checks) and the data flow; `docs/design.md` describes the Redis key layout, the state machine
//! and the flush protocol.

pub mod app;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod counts;
pub mod crash_point;
pub mod credentials;
pub mod db;
pub mod error;
pub mod events;
pub mod flush;
pub mod http;
pub mod live;
pub mod metrics;
pub mod reconcile;
pub mod schedule;
pub mod source;
pub mod store;
pub mod webhook;

#[cfg(test)]
mod layering;
