//! `POST /v1/reconcile`: recount users from the Notification table and report what was wrong.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use tracing::Instrument;

use crate::app::AppState;
use crate::error::{AppError, ErrorBody};
use crate::events::MAX_ID;
use crate::reconcile::ReconcileReport;

/// The request: `{"user_ids": [1, 2, 3]}`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// 1 to 1,000 user ids.
    pub user_ids: Vec<u64>,
}

/// Recounts up to `--max-read-users` users now. A reconcile of every user is the CLI's
/// `countersink reconcile --all` or the scheduled reconcile: it outlives any request.
#[utoipa::path(
    post,
    path = "/v1/reconcile",
    tag = "admin",
    request_body = ReconcileRequest,
    responses(
        (status = 200, description = "Users checked, and each that was wrong", body = ReconcileReport),
        (status = 400, description = "Bad user ids", body = ErrorBody),
        (status = 401, description = "The admin token is missing or wrong", body = ErrorBody),
        (status = 409, description = "No Notification table is configured", body = ErrorBody),
        (status = 503, description = "Redis or the database unavailable, or the state is being rebuilt: retry", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn post_reconcile(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReconcileReport>, AppError> {
    let body = super::read_body(body, state.limits.max_body_bytes)?;
    let request: ReconcileRequest = serde_json::from_slice(&body).map_err(|e| AppError::BadRequest {
        code: "invalid_body",
        message: format!("expected {{\"user_ids\": [1, 2, 3]}}: {e}"),
        field: Some("user_ids".into()),
    })?;
    let max = state.limits.max_read_users;
    if request.user_ids.is_empty() || request.user_ids.len() > max {
        return Err(AppError::bad_parameter("user_ids", format!("give 1 to {max} user ids")));
    }
    if request.user_ids.iter().any(|id| *id > MAX_ID) {
        return Err(AppError::bad_parameter("user_ids", format!("user ids are integers from 0 to {MAX_ID}")));
    }
    // Spawned, like a flush: a dropped request must not cancel a reconcile holding the flush lease.
    // In the request's span, so its log lines carry the request id.
    // On the jobs' runtime, as a flush.
    let jobs = state.jobs.clone();
    let reconcile =
        jobs.spawn(async move { state.reconciler.reconcile_users(&request.user_ids).await }.in_current_span());
    Ok(Json(reconcile.await.map_err(|e| AppError::Internal(e.into()))??))
}
