//! The HTTP API: the router, with one file per endpoint group.
//!
//! | method and path                          | file         |
//! |------------------------------------------|--------------|
//! | `POST /v1/events` (signed)               | `events.rs`  |
//! | `GET /v1/users/{user_id}/unread-count`   | `counts.rs`  |
//! | `GET /v1/unread-counts?user_ids=1,2`     | `counts.rs`  |
//! | `GET /v1/users/{user_id}/unread-count/stream` (SSE) | `live.rs` |
//! | `POST /v1/flush`                         | `flush.rs`   |
//! | `POST /v1/reconcile`                     | `reconcile.rs` |
//! | `GET /v1/status`, `GET /healthz`         | `status.rs`  |
//! | `GET /readyz`                            | `status.rs`  |
//! | `GET /metrics` (read token, if set)      | `metrics.rs` |
//! | `GET /openapi.json`                      | `openapi.rs` |
//!
//! `server.rs` accepts connections (hyper's HTTP/1 with a header-read timeout and a connection
//! cap), in front of this router. `user_ids.rs` parses the bulk read's query. `auth.rs` holds the
//! bearer-token checks, a middleware for the admin routes and an extractor for the reads (the
//! tokens and their checks are [`crate::credentials`]): reads take the read token (when set),
//! flush and status the admin token; `events.rs` checks the webhook signature. `request_id.rs` gives every request an
//! id for its log lines; `metrics.rs` also times every request.

pub mod auth;
mod counts;
mod events;
mod flush;
mod live;
mod metrics;
pub mod openapi;
mod reconcile;
pub mod request_id;
pub mod server;
mod status;
pub mod user_ids;

use std::time::Duration;

use axum::body::HttpBody;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::error::AppError;

/// Builds the router over `state`, with its body limit and deadlines.
///
/// Outermost first: a request id, tracing and metrics; then its body is received, within
/// `--body-timeout-secs` and `--max-body-bytes`, before anything is held for it; then work routes
/// take a permit of `--max-concurrent-requests` and meet `--request-timeout-secs`. `/healthz` and
/// `/readyz` take no permit: a loaded or attacked service still answers its health checks.
pub fn router(state: AppState) -> Router {
    let max_body_bytes = state.limits.max_body_bytes;
    let request_timeout = state.limits.request_timeout;
    let body_limits = (state.limits.body_timeout, max_body_bytes);
    // Events authenticate by signature, inside the handler (the signature covers the body).
    let events = Router::new().route("/v1/events", post(events::post_events));
    let reads = Router::new()
        .route("/v1/users/{user_id}/unread-count", get(counts::get_unread_count))
        .route("/v1/unread-counts", get(counts::get_unread_counts))
        .route("/metrics", get(metrics::get_metrics));
    // Live streams check their own credentials (a stream token in the query, or the read token).
    // The deadline below only bounds the time to the response head, never the streamed body.
    let live = Router::new().route("/v1/users/{user_id}/unread-count/stream", get(live::get_stream));
    let admin = Router::new()
        .route("/v1/flush", post(flush::post_flush))
        .route("/v1/reconcile", post(reconcile::post_reconcile))
        .route("/v1/status", get(status::get_status))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
    let work = Router::new()
        .merge(events)
        .merge(reads)
        .merge(live)
        .merge(admin)
        .route("/openapi.json", get(openapi::get_openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    let health = Router::new()
        .route("/healthz", get(status::get_healthz))
        .route("/readyz", get(status::get_readyz))
        .route_layer(middleware::from_fn(move |request: Request, next: Next| deadline(request, next, request_timeout)));
    Router::new()
        .merge(work)
        .merge(health)
        .fallback(|| async { AppError::NotFound })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(move |request: Request, next: Next| receive_body(request, next, body_limits)))
        .layer(middleware::from_fn(metrics::record))
        .layer(TraceLayer::new_for_http().make_span_with(request_id::span))
        .layer(middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// Receives the whole body within `timeout` and at most `limit` bytes, before the request takes
/// a permit: a client that sends its headers and then stalls (or trickles) holds a connection
/// until `timeout`, never a slot meant for work. Past the limit: 413; too slow: 408, and hyper
/// closes the connection (its body was not read to the end).
async fn receive_body(request: Request, next: Next, (timeout, limit): (Duration, usize)) -> Response {
    if request.body().is_end_stream() {
        // Nothing to receive (a GET, or `Content-Length: 0`): no timer, no buffer.
        return next.run(request).await;
    }
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return AppError::PayloadTooLarge { limit }.into_response();
    }
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large = e.into_inner().downcast_ref::<http_body_util::LengthLimitError>().is_some();
            return if too_large {
                AppError::PayloadTooLarge { limit }.into_response()
            } else {
                // The client went away or sent a broken chunked body.
                AppError::BadRequest {
                    code: "unreadable_body",
                    message: "the request body could not be read".into(),
                    field: None,
                }
                .into_response()
            };
        }
        Err(_) => return AppError::BodyTimedOut(timeout).into_response(),
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Admits a request to a work route: a permit of `--max-concurrent-requests` (503 at once when
/// none is free: no unbounded queue), then `--request-timeout-secs`. One layer for both: each
/// `from_fn` layer costs every request a cloned service and a boxed future.
async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.in_flight.clone().try_acquire_owned() {
        Ok(_permit) => deadline(request, next, state.limits.request_timeout).await,
        Err(_) => AppError::Overloaded.into_response(),
    }
}

/// Answers 503 when a request outlives its deadline, in the common error shape.
async fn deadline(request: Request, next: Next, limit: Duration) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => AppError::TimedOut(limit).into_response(),
    }
}

/// A request body, or the common error shape when it could not be read (413 past the limit).
pub(crate) fn read_body(
    body: Result<axum::body::Bytes, BytesRejection>,
    limit: usize,
) -> Result<axum::body::Bytes, AppError> {
    body.map_err(|rejection| match rejection.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge { limit },
        _ => AppError::BadRequest { code: "unreadable_body", message: rejection.body_text(), field: None },
    })
}
