//! Request authentication: the bearer tokens of [`crate::credentials`], required on the admin
//! routes by a middleware and on the read routes by an extractor. Webhook signatures are checked
//! by the events handler, which needs the body.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::app::AppState;
use crate::error::AppError;

/// Middleware: the admin token, when one is configured.
pub async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, AppError> {
    state.auth.check_bearer(request.headers(), &[&state.auth.admin_token])?;
    Ok(next.run(request).await)
}

/// Extractor: the read token (or the admin token), when a read token is configured; a read
/// handler takes it first. An extractor rather than a layer: a `from_fn` layer costs each request
/// of its routes a cloned service and a boxed future, on the path every page view takes.
pub struct ReadAccess;

impl FromRequestParts<AppState> for ReadAccess {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if state.auth.read_token.is_some() {
            state.auth.check_bearer(&parts.headers, &[&state.auth.read_token, &state.auth.admin_token])?;
        }
        Ok(ReadAccess)
    }
}
