//! `POST /v1/flush`: flush now and say what was written.

use std::time::Duration;

use axum::extract::State;
use axum::Json;

use crate::app::AppState;
use crate::error::AppError;
use crate::flush::{FlushReport, WhenBusy};

/// How long an HTTP flush waits for a running flush to finish before answering 409.
const WAIT_FOR_RUNNING_FLUSH: Duration = Duration::from_secs(20);

/// Runs a flush, waiting for one already running, so the caller's earlier events are written on return.
pub async fn post_flush(State(state): State<AppState>) -> Result<Json<FlushReport>, AppError> {
    Ok(Json(state.flusher.flush(WhenBusy::Wait(WAIT_FOR_RUNNING_FLUSH)).await?))
}
