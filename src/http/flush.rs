//! `POST /v1/flush`: flush now and say what was written.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use tracing::Instrument;

use crate::app::AppState;
use crate::error::{AppError, ErrorBody};
use crate::flush::{FlushReport, WhenBusy};

/// How long an HTTP flush waits for a running flush to finish before answering 409.
const WAIT_FOR_RUNNING_FLUSH: Duration = Duration::from_secs(20);

/// Runs a flush, waiting for one already running, so the caller's earlier events are written on return.
#[utoipa::path(
    post,
    path = "/v1/flush",
    tag = "admin",
    responses(
        (status = 200, description = "What was written", body = FlushReport),
        (status = 401, description = "The admin token is missing or wrong", body = ErrorBody),
        (status = 409, description = "Another flush ran for longer than 20 s", body = ErrorBody),
        (status = 503, description = "Redis or the database unavailable: retry", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn post_flush(State(state): State<AppState>) -> Result<Json<FlushReport>, AppError> {
    // Spawned: a client that hangs up or a request deadline must not cancel a flush half-way
    // (it would keep the flush lease until it expires).
    // In the request's span, so its log lines carry the request id.
    // On the jobs' runtime: a flush holds its HTTP thread for no one else.
    let flush = state
        .jobs
        .clone()
        .spawn(async move { state.flusher.flush(WhenBusy::Wait(WAIT_FOR_RUNNING_FLUSH)).await }.in_current_span());
    let report = flush.await.map_err(|e| AppError::Internal(e.into()))??;
    Ok(Json(report))
}
