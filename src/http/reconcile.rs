//! `POST /v1/reconcile`: recount users from the Notification table and report what was wrong.

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;

use crate::app::AppState;
use crate::error::AppError;
use crate::events::MAX_ID;
use crate::reconcile::ReconcileReport;

/// The request: `{"user_ids": [1, 2, 3]}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconcileRequest {
    user_ids: Vec<u64>,
}

/// Recounts up to `--max-read-users` users now. A reconcile of every user is the CLI's
/// `countersink reconcile --all` or the scheduled reconcile: it outlives any request.
pub async fn post_reconcile(State(state): State<AppState>, body: Bytes) -> Result<Json<ReconcileReport>, AppError> {
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
    Ok(Json(state.reconciler.reconcile_users(&request.user_ids).await?))
}
