//! Prometheus metrics: the one registry of the process, and every metric's name.
//!
//! The registry is process-wide (like Prometheus's own clients): errors are counted where they
//! happen (a Redis reply, a database call) without handing a registry through every layer.
//! Names are prefixed `countersink_` and carry their unit (`_seconds`, `_total`); counters get
//! their `_total` suffix from the encoder. `docs/deployment.md` lists them with what to alert on.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `countersink_events_received_total` | counter | |
//! | `countersink_events_applied_total` | counter | `outcome`: `changed`, `recorded`, `recount_queued` |
//! | `countersink_events_duplicate_total` | counter | `reason`: `duplicate`, `stale`, `after_delete`, `replayed` |
//! | `countersink_event_requests_rejected_total` | counter | `reason`: the error code answered |
//! | `countersink_apply_calls_total`, `countersink_apply_requests_total` | counter | |
//! | `countersink_read_calls_total`, `countersink_read_requests_total` | counter | |
//! | `countersink_http_request_duration_seconds` | histogram | `method`, `route`, `status` |
//! | `countersink_pending_users` | gauge | |
//! | `countersink_flush_duration_seconds` | histogram | |
//! | `countersink_flush_rows_total`, `countersink_flush_batches_total`, `countersink_flush_failures_total` | counter | |
//! | `countersink_last_flush_success_timestamp_seconds` | gauge | |
//! | `countersink_reconcile_users_checked_total`, `countersink_reconcile_drift_users_total` | counter | |
//! | `countersink_recount_corrected_users_total` | counter | |
//! | `countersink_dependency_errors_total` | counter | `dependency`: `redis`, `database` |
//! | `countersink_count_loads_total`, `countersink_count_load_retries_total` | counter | |
//! | `countersink_redis_restarts_total` | counter | `recovery`: `rebuilt`, `resynced` |
//! | `countersink_redis_state_vouched` | gauge | |
//! | `countersink_redis_persistence` | gauge | `mode`: `none`, `rdb`, `aof_everysec`, `aof_always`, `aof_no_fsync` |
//! | `countersink_redis_replicas` | gauge | |
//! | `countersink_redis_masters_found` | counter | |
//! | `countersink_http_connections_open` | gauge | |
//! | `countersink_http_header_timeouts_total` | counter | |

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s output (OpenMetrics text, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A dependency whose failures are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// Redis.
    Redis,
    /// The SQL database.
    Database,
}

impl Dependency {
    fn label(self) -> &'static str {
        match self {
            Dependency::Redis => "redis",
            Dependency::Database => "database",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabel {
    dependency: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// Request latencies from 1 ms to about 33 s (the request deadline is 30 s by default).
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

struct Metrics {
    registry: Registry,
    events_received: Counter,
    apply_calls: Counter,
    apply_requests: Counter,
    read_calls: Counter,
    read_requests: Counter,
    events_applied: Family<OutcomeLabel, Counter>,
    events_duplicate: Family<ReasonLabel, Counter>,
    event_requests_rejected: Family<ReasonLabel, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pending_users: Gauge,
    flush_duration: Histogram,
    flush_rows: Counter,
    flush_batches: Counter,
    flush_failures: Counter,
    last_flush_success: Gauge<f64, AtomicU64>,
    reconcile_users_checked: Counter,
    reconcile_drift_users: Counter,
    recount_corrected_users: Counter,
    dependency_errors: Family<DependencyLabel, Counter>,
    count_loads: Counter,
    count_load_retries: Counter,
    redis_restarts: Family<RecoveryLabel, Counter>,
    redis_state_vouched: Gauge,
    redis_persistence: Family<ModeLabel, Gauge>,
    redis_replicas: Gauge,
    redis_masters_found: Counter,
    connections_open: Gauge,
    header_timeouts: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecoveryLabel {
    recovery: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

/// Every persistence mode [`redis_persistence`] reports.
const PERSISTENCE_MODES: [&str; 5] = ["none", "rdb", "aof_everysec", "aof_always", "aof_no_fsync"];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("countersink");
        let metrics = Metrics {
            events_received: Counter::default(),
            apply_calls: Counter::default(),
            apply_requests: Counter::default(),
            read_calls: Counter::default(),
            read_requests: Counter::default(),
            events_applied: Family::default(),
            events_duplicate: Family::default(),
            event_requests_rejected: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram as fn() -> Histogram),
            pending_users: Gauge::default(),
            // Flushes take milliseconds to tens of seconds (a million users: about 10 s).
            flush_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            flush_rows: Counter::default(),
            flush_batches: Counter::default(),
            flush_failures: Counter::default(),
            last_flush_success: Gauge::default(),
            reconcile_users_checked: Counter::default(),
            reconcile_drift_users: Counter::default(),
            recount_corrected_users: Counter::default(),
            dependency_errors: Family::default(),
            count_loads: Counter::default(),
            count_load_retries: Counter::default(),
            redis_restarts: Family::default(),
            redis_state_vouched: Gauge::default(),
            redis_persistence: Family::default(),
            redis_replicas: Gauge::default(),
            redis_masters_found: Counter::default(),
            connections_open: Gauge::default(),
            header_timeouts: Counter::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "events_received",
            "Events in requests that passed validation (replays included)",
            m.events_received.clone(),
        );
        registry.register(
            "apply_calls",
            "Calls of the apply script: each applies one request or a group commit of several",
            m.apply_calls.clone(),
        );
        registry.register(
            "apply_requests",
            "Event requests applied by those calls (requests / calls = the mean group size)",
            m.apply_requests.clone(),
        );
        registry.register(
            "read_calls",
            "Redis calls reading held counts: each serves one read request or several merged",
            m.read_calls.clone(),
        );
        registry.register(
            "read_requests",
            "Read requests served by those calls (requests / calls = the mean merge size)",
            m.read_requests.clone(),
        );
        registry.register(
            "events_applied",
            "Events that changed the state: changed a count, recorded a state only, or queued a recount",
            m.events_applied.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events that changed nothing because they were applied already (or superseded by a delete)",
            m.events_duplicate.clone(),
        );
        registry.register(
            "event_requests_rejected",
            "POST /v1/events requests answered with an error, by error code; nothing of them was applied",
            m.event_requests_rejected.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route, method and status",
            m.request_duration.clone(),
        );
        registry.register(
            "pending_users",
            "Users with a delta waiting for the next flush (read from Redis at each scrape)",
            m.pending_users.clone(),
        );
        registry.register("flush_duration_seconds", "Duration of successful flushes", m.flush_duration.clone());
        registry.register("flush_rows", "Rows upserted into the count table by flushes", m.flush_rows.clone());
        registry.register(
            "flush_batches",
            "Batches applied by flushes (recovered ones included)",
            m.flush_batches.clone(),
        );
        registry.register(
            "flush_failures",
            "Flushes that failed (their deltas stay in Redis)",
            m.flush_failures.clone(),
        );
        registry.register(
            "last_flush_success_timestamp_seconds",
            "Unix time of the last successful flush by this process (0: none yet)",
            m.last_flush_success.clone(),
        );
        registry.register(
            "reconcile_users_checked",
            "Users recounted from the Notification table",
            m.reconcile_users_checked.clone(),
        );
        registry.register(
            "reconcile_drift_users",
            "Users a reconcile found with a wrong count (and repaired); should stay at zero. \
             Queued recounts are not counted here",
            m.reconcile_drift_users.clone(),
        );
        registry.register(
            "recount_corrected_users",
            "Users whose count a queued recount (a recount event: bulk write, un-soft-delete, repair) changed, as expected",
            m.recount_corrected_users.clone(),
        );
        registry.register("dependency_errors", "Failed Redis commands and database calls", m.dependency_errors.clone());
        registry.register(
            "count_loads",
            "Users whose real-time count a read loaded from the count table and Redis (a first read)",
            m.count_loads.clone(),
        );
        registry.register(
            "count_load_retries",
            "Loads started over because a flush handed off meanwhile",
            m.count_load_retries.clone(),
        );
        registry.register(
            "redis_restarts",
            "Redis restarts this process recovered from (the state rebuilt from the table, or resynced without one)",
            m.redis_restarts.clone(),
        );
        registry.register(
            "redis_state_vouched",
            "1 while the Redis server vouches for the state, 0 from a restart until it is rebuilt or resynced",
            m.redis_state_vouched.clone(),
        );
        registry.register(
            "redis_persistence",
            "1 for the persistence mode Redis reported at the last check (what a restart can lose), 0 for the others",
            m.redis_persistence.clone(),
        );
        registry.register("redis_replicas", "Replicas connected to Redis at the last check", m.redis_replicas.clone());
        registry.register(
            "redis_masters_found",
            "Times Sentinel was asked for the Redis master and named one (at start-up, then after each failover)",
            m.redis_masters_found.clone(),
        );
        for recovery in ["rebuilt", "resynced"] {
            m.redis_restarts.get_or_create(&RecoveryLabel { recovery }).inc_by(0);
        }
        registry.register(
            "http_connections_open",
            "Client connections open now (at most --max-connections)",
            m.connections_open.clone(),
        );
        registry.register(
            "http_header_timeouts",
            "Connections closed because no request head arrived within --header-timeout-secs (slow, half-sent or idle)",
            m.header_timeouts.clone(),
        );
        // Both series exist from the start, so an alert on their rate has something to compare.
        for dependency in [Dependency::Redis, Dependency::Database] {
            m.dependency_errors.get_or_create(&DependencyLabel { dependency: dependency.label() }).inc_by(0);
        }
        Metrics { registry, ..metrics }
    }

    fn record_reconcile(&self, users_checked: u64, drifted_users: u64, corrected_users: u64) {
        self.reconcile_users_checked.inc_by(users_checked);
        self.reconcile_drift_users.inc_by(drifted_users);
        self.recount_corrected_users.inc_by(corrected_users);
    }
}

/// Counts the events of a request that passed validation.
pub fn events_received(events: usize) {
    METRICS.events_received.inc_by(events as u64);
}

/// Counts one call of the apply script for `requests` requests (a group commit when more than one).
pub fn apply_call(requests: usize) {
    METRICS.apply_calls.inc();
    METRICS.apply_requests.inc_by(requests as u64);
}

/// Counts one Redis call reading held counts for `requests` read requests (merged when more than one).
pub fn read_call(requests: usize) {
    METRICS.read_calls.inc();
    METRICS.read_requests.inc_by(requests as u64);
}

/// Counts `recount` events whose users were queued.
pub fn recounts_queued(users: usize) {
    events_applied("recount_queued", users as u64);
}

/// Counts `n` events of a request by what they did (`changed`, `recorded`); a zero is not counted.
pub fn events_applied(outcome: &'static str, n: u64) {
    if n > 0 {
        METRICS.events_applied.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
    }
}

/// Counts `n` events that changed nothing by why (`duplicate`, `stale`, `after_delete`,
/// `replayed`); a zero is not counted.
pub fn events_duplicate(reason: &'static str, n: u64) {
    if n > 0 {
        METRICS.events_duplicate.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }
}

/// Counts a rejected `POST /v1/events` request by its error code.
pub fn event_request_rejected(reason: &'static str) {
    METRICS.event_requests_rejected.get_or_create(&ReasonLabel { reason }).inc();
}

/// Records one HTTP request's latency.
pub fn request_finished(method: &str, route: &str, status: u16, elapsed: Duration) {
    let labels = RequestLabels { method: method.to_string(), route: route.to_string(), status };
    METRICS.request_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
}

/// A client connection opened.
pub fn connection_opened() {
    METRICS.connections_open.inc();
}

/// Sentinel named the Redis master (at the first command, then after each failover).
pub fn redis_master_found() {
    METRICS.redis_masters_found.inc();
}

/// A client connection closed.
pub fn connection_closed() {
    METRICS.connections_open.dec();
}

/// Counts a connection closed because its request's head did not arrive in time.
pub fn header_timed_out() {
    METRICS.header_timeouts.inc();
}

/// Sets the number of users with a pending delta.
pub fn set_pending_users(users: u64) {
    METRICS.pending_users.set(i64::try_from(users).unwrap_or(i64::MAX));
}

/// Records a successful flush that wrote `users_written` rows from `batches` batches.
pub fn flush_succeeded(users_written: u64, batches: usize, elapsed: Duration) {
    let m = &*METRICS;
    m.flush_duration.observe(elapsed.as_secs_f64());
    m.flush_rows.inc_by(users_written);
    m.flush_batches.inc_by(batches as u64);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    m.last_flush_success.set(now.as_secs_f64());
}

/// Records a failed flush.
pub fn flush_failed() {
    METRICS.flush_failures.inc();
}

/// Records what a recount found: users recounted, users whose count was unexpectedly wrong
/// (drift, from a reconcile), and users an asked-for recount corrected (expected).
pub fn reconcile_finished(users_checked: u64, drifted_users: u64, corrected_users: u64) {
    METRICS.record_reconcile(users_checked, drifted_users, corrected_users);
}

/// Counts one failed Redis command or database call.
pub fn dependency_error(dependency: Dependency) {
    METRICS.dependency_errors.get_or_create(&DependencyLabel { dependency: dependency.label() }).inc();
}

/// Counts one recovery of this process from a Redis restart (`rebuilt` or `resynced`).
pub fn redis_restart_detected(recovery: &'static str) {
    METRICS.redis_restarts.get_or_create(&RecoveryLabel { recovery }).inc();
}

/// Redis's persistence mode and replicas, as last read (`/readyz`, the state watch).
pub fn redis_persistence(mode: &str, replicas: u64) {
    for known in PERSISTENCE_MODES {
        METRICS.redis_persistence.get_or_create(&ModeLabel { mode: known }).set(i64::from(known == mode));
    }
    METRICS.redis_replicas.set(replicas as i64);
}

/// Whether the Redis server vouched for the state at the last check (1) or not (0).
pub fn redis_state_vouched(vouched: bool) {
    METRICS.redis_state_vouched.set(i64::from(vouched));
}

/// Counts users whose real-time count was loaded (not held yet), and loads started over.
pub fn counts_loaded(users: usize, retries: usize) {
    METRICS.count_loads.inc_by(users as u64);
    METRICS.count_load_retries.inc_by(retries as u64);
}

/// Every metric in the OpenMetrics text format.
pub fn encode() -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &METRICS.registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn expected_recount_corrections_are_not_counted_as_drift() {
        let metrics = Metrics::new();
        metrics.record_reconcile(3, 0, 2); // queued recounts that corrected two users
        metrics.record_reconcile(4, 1, 0); // a reconcile that found one user wrong
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        assert_eq!(value(&text, "countersink_reconcile_users_checked_total"), 7);
        assert_eq!(value(&text, "countersink_reconcile_drift_users_total"), 1);
        assert_eq!(value(&text, "countersink_recount_corrected_users_total"), 2);
    }
}
