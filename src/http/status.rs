//! `GET /healthz` (the process answers), `GET /readyz` (its dependencies answer) and
//! `GET /v1/status` (what is pending, the last flush).

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tracing::warn;

use crate::app::AppState;
use crate::db::queries::{self, BatchRecord};
use crate::error::{AppError, ErrorBody};

/// The answer of `/healthz`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn get_healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The sidecar's state.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Status {
    /// Users with a delta waiting for the next flush.
    pub pending_users: u64,
    /// Batches handed off and not yet dropped (non-zero only during a flush or after a crash).
    pub open_batches: usize,
    /// Users waiting for a recount asked by `recount` events.
    pub recounts_waiting: u64,
    /// Users claimed by a recount worker and not yet done. A worker that died holds its users
    /// until its claim lapses (10 s), then another recounts them; both fields are 0 only once
    /// every queued recount is done.
    pub recounts_running: u64,
    /// The last batch written to the database.
    pub last_flush: Option<BatchRecord>,
}

/// Pending users, open batches and the last flush.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "admin",
    responses(
        (status = 200, body = Status),
        (status = 401, description = "The admin token is missing or wrong", body = ErrorBody),
        (status = 503, description = "Redis or the database unavailable: retry", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn get_status(State(state): State<AppState>) -> Result<Json<Status>, AppError> {
    let pending_users = state.store.pending_users().await?;
    let open_batches = state.store.batch_ids().await?.len();
    let (recounts_waiting, recounts_running) = state.store.recounts_queued().await?;
    let last_flush = state.db.run(queries::last_batch).await?;
    Ok(Json(Status { pending_users, open_batches, recounts_waiting, recounts_running, last_flush }))
}

/// How long each readiness check may take: a probe must answer fast, and a dependency that
/// needs longer is not ready.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer of `/readyz`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` when every check passed, else `not_ready`.
    pub status: &'static str,
    /// Each check: `redis`, `database`, `migrations`, and `redis_state` when Redis answered (not ok
    /// while the state is rebuilt or resynced after Redis lost it or restarted: events and reads
    /// answer 503 meanwhile).
    pub checks: Vec<ReadyCheck>,
    /// What the last recovery from a Redis restart did (any process's), if Redis ever restarted
    /// under a vouched-for state: without a Notification table, events acknowledged after the
    /// snapshot it restarted from are not counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_last_restart: Option<crate::flush::RedisRestart>,
    /// How Redis keeps its data across a restart, if it says (`CONFIG` may be disabled): what a
    /// restart can lose (docs/deployment.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_persistence: Option<crate::store::RedisPersistence>,
}

/// One readiness check.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ReadyCheck {
    /// What was checked.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// Why not, when it failed (the cause is in the log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Ready to serve: Redis and the database answer, every migration is applied and the Redis state
/// is not being rebuilt. Read-only.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Every check passed", body = Readiness),
        (status = 503, description = "A check failed; the body says which", body = Readiness),
    )
)]
pub async fn get_readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (redis, database, migrations, persistence, rebuilt) = tokio::join!(
        timed(state.store.check_instance()),
        timed(state.db.ping()),
        timed(state.db.pending_migrations()),
        timed(state.store.persistence()),
        timed(state.store.is_ready())
    );
    // Information, not a check: a Redis that answers the others answers this.
    let redis_persistence = persistence.ok().flatten();
    if let Some(persistence) = redis_persistence {
        crate::metrics::redis_persistence(persistence.mode, persistence.replicas);
    }
    let (instance, redis) = match redis {
        Ok(instance) => (Some(instance), Ok(())),
        Err(e) => (None, Err(e)),
    };
    let mut checks = vec![check("redis", redis), check("database", database.map(|_| ()))];
    checks.push(match migrations {
        Ok(pending) if pending.is_empty() => ReadyCheck { name: "migrations", ok: true, error: None },
        Ok(pending) => ReadyCheck {
            name: "migrations",
            ok: false,
            error: Some(format!("not applied: {} (run `countersink migrate`)", pending.join(", "))),
        },
        Err(e) => check("migrations", Err(e)),
    });
    if let Some(instance) = &instance {
        // Not a dependency's fault, and nothing secret: answered as it is.
        let error = if !(instance.vouched || instance.new) {
            Some("Redis restarted since its state was vouched for; the state is being rebuilt or resynced")
        } else if rebuilt == Ok(false) {
            // Events and reads answer 503 until a bootstrap marks the state complete.
            Some("the Redis state is being rebuilt from the Notification table (a bootstrap), or waits for `countersink bootstrap`")
        } else {
            None
        };
        checks.push(ReadyCheck { name: "redis_state", ok: error.is_none(), error: error.map(String::from) });
    }
    let redis_last_restart = instance
        .and_then(|i| i.last_restart)
        .and_then(|record| serde_json::from_str::<crate::flush::RedisRestart>(&record).ok());
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" },
            checks,
            redis_last_restart,
            redis_persistence,
        }),
    )
}

/// A check's result, or "timed out" after [`READY_CHECK_TIMEOUT`].
async fn timed<T, E: std::fmt::Display>(check: impl Future<Output = Result<T, E>>) -> Result<T, String> {
    match tokio::time::timeout(READY_CHECK_TIMEOUT, check).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {} s", READY_CHECK_TIMEOUT.as_secs())),
    }
}

fn check(name: &'static str, result: Result<(), String>) -> ReadyCheck {
    match result {
        Ok(()) => ReadyCheck { name, ok: true, error: None },
        Err(cause) => {
            // The cause may name hosts: logged, not answered on an open endpoint.
            warn!(check = name, error = %cause, "readiness check failed");
            ReadyCheck { name, ok: false, error: Some("unavailable".to_string()) }
        }
    }
}
