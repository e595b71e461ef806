//! `GET /metrics` (Prometheus), and the middleware that times every request.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::warn;

use crate::app::AppState;
use crate::error::{AppError, ErrorBody, ErrorCode};
use crate::http::auth::ReadAccess;
use crate::metrics::{self, Dependency};

/// How long a scrape waits for Redis to count the pending users: a scrape must not hang on a
/// slow Redis, and an answer without that gauge beats none.
const PENDING_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// The route label of requests that matched no route (their paths are unbounded).
const UNMATCHED: &str = "unmatched";

/// Every metric, in the OpenMetrics text format. Redis being down does not fail the scrape:
/// the error is counted and `countersink_pending_users` keeps its last value.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text)", body = String,
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (status = 401, description = "A read token is configured and was not sent", body = ErrorBody),
    ),
    security((), ("read_token" = []))
)]
pub async fn get_metrics(_: ReadAccess, State(state): State<AppState>) -> Response {
    match tokio::time::timeout(PENDING_READ_TIMEOUT, state.store.pending_users()).await {
        Ok(Ok(users)) => metrics::set_pending_users(users),
        // Counted where the Redis error arose.
        Ok(Err(e)) => warn!(error = %e, "metrics: cannot count the pending users"),
        Err(_) => {
            metrics::dependency_error(Dependency::Redis);
            warn!("metrics: counting the pending users timed out");
        }
    }
    match metrics::encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => AppError::Internal(e.into()).into_response(),
    }
}

/// Records each request's latency by route, and why a `POST /v1/events` was rejected.
pub async fn record(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let response = next.run(request).await;
    let route = route.as_deref().unwrap_or(UNMATCHED);
    metrics::request_finished(method, route, response.status().as_u16(), started.elapsed());
    if route == "/v1/events" {
        if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
            metrics::event_request_rejected(code);
        }
    }
    response
}

/// The method as a label; methods are open-ended, so unusual ones share one label (a client must
/// not be able to grow the number of series).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
