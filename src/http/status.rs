//! `GET /healthz` (the process answers) and `GET /v1/status` (what is pending, the last flush).

use axum::extract::State;
use axum::Json;

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
    /// Users being recounted right now.
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
