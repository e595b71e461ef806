//! Real-time unread counts: one user, or many in one call.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;

use crate::app::AppState;
use crate::counts::UnreadCount;
use crate::error::{AppError, ErrorBody};
use crate::events::MAX_ID;
use crate::http::auth::ReadAccess;
use crate::http::user_ids::UserIds;

/// `GET /v1/users/{user_id}/unread-count`
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/unread-count",
    tag = "reads",
    params(("user_id" = String, Path, description = "An integer from 0 to 2^63-1")),
    responses(
        (status = 200, description = "stored + pending, real time", body = UnreadCount),
        (status = 400, description = "Not a user id", body = ErrorBody),
        (status = 401, description = "A read token is configured and was not sent", body = ErrorBody),
        (status = 503, description = "Redis or the database unavailable: retry", body = ErrorBody),
    ),
    security((), ("read_token" = []))
)]
pub async fn get_unread_count(
    _: ReadAccess,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UnreadCount>, AppError> {
    let Path(user_id) = path.map_err(|e| AppError::bad_parameter("user_id", e.body_text()))?;
    let user_id = parse_user_id(&user_id, "user_id")?;
    let mut counts = state.reader.unread_counts(&[user_id]).await?;
    counts.pop().map(Json).ok_or_else(|| AppError::Internal(anyhow::anyhow!("a read returned no row")))
}

/// The answer of a bulk read.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UnreadCounts {
    /// One entry per requested user, in request order.
    pub counts: Vec<UnreadCount>,
}

/// `GET /v1/unread-counts?user_ids=1,2,3`
#[utoipa::path(
    get,
    path = "/v1/unread-counts",
    tag = "reads",
    params(("user_ids" = String, Query, description = "1 to 1,000 comma-separated user ids (percent-encoded commas too); the key may repeat, and its ids are read in order")),
    responses(
        (status = 200, description = "One entry per user, in request order", body = UnreadCounts),
        (status = 400, description = "Missing or bad user ids", body = ErrorBody),
        (status = 401, description = "A read token is configured and was not sent", body = ErrorBody),
        (status = 503, description = "Redis or the database unavailable: retry", body = ErrorBody),
    ),
    security((), ("read_token" = []))
)]
pub async fn get_unread_counts(
    _: ReadAccess,
    State(state): State<AppState>,
    UserIds(user_ids): UserIds,
) -> Result<Json<UnreadCounts>, AppError> {
    let counts = state.reader.unread_counts(&user_ids).await?;
    Ok(Json(UnreadCounts { counts }))
}

pub(crate) fn parse_user_id(raw: &str, field: &str) -> Result<u64, AppError> {
    raw.parse::<u64>().ok().filter(|id| *id <= MAX_ID).ok_or_else(|| {
        AppError::bad_parameter(field, format!("{raw:?} is not a user id (an integer from 0 to {MAX_ID})"))
    })
}
