//! Request authentication middleware: the bearer tokens of [`crate::credentials`] required on
//! the admin and read routes (webhook signatures are checked by the events handler, which needs
//! the body).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::app::AppState;
use crate::error::AppError;

/// Middleware: the admin token, when one is configured.
pub async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, AppError> {
    state.auth.check_bearer(request.headers(), &[&state.auth.admin_token])?;
    Ok(next.run(request).await)
}

/// Middleware: the read token (or the admin token), when a read token is configured.
pub async fn require_read(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, AppError> {
    if state.auth.read_token.is_some() {
        state.auth.check_bearer(request.headers(), &[&state.auth.read_token, &state.auth.admin_token])?;
    }
    Ok(next.run(request).await)
}
