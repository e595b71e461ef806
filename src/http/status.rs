//! `GET /healthz` (the process answers) and `GET /v1/status` (what is pending, the last flush).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::db::queries::{self, BatchRecord};
use crate::error::AppError;

/// The process is alive.
pub async fn get_healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The sidecar's state.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// Users with a delta waiting for the next flush.
    pub pending_users: u64,
    /// Batches handed off and not yet dropped (non-zero only during a flush or after a crash).
    pub open_batches: usize,
    /// Users waiting for a recount asked by `recount` events.
    pub recounts_waiting: u64,
    /// The last batch written to the database.
    pub last_flush: Option<BatchRecord>,
}

/// Pending users, open batches and the last flush.
pub async fn get_status(State(state): State<AppState>) -> Result<Json<Status>, AppError> {
    let pending_users = state.store.pending_users().await?;
    let open_batches = state.store.batch_ids().await?.len();
    let recounts_waiting = state.store.recounts_waiting().await?;
    let last_flush = state.db.run(queries::last_batch).await?;
    Ok(Json(Status { pending_users, open_batches, recounts_waiting, last_flush }))
}
