//! The error policy, and the one place errors become HTTP responses.
//!
//! - Start-up and jobs use `anyhow` with context: a person reads those.
//! - Data code has typed errors per layer: [`crate::events::EventError`],
//!   [`crate::store::StoreError`], [`crate::db::DbError`], [`crate::flush::FlushError`],
//!   [`crate::counts::ReadError`]. Each says whether a dependency was unavailable.
//! - Handlers return [`AppError`]. Every error body has one shape:
//!   `{"error": {"code": "...", "message": "...", "field": "..."}}`.
//! - An unreachable Redis or database, or too many requests at once, is 503 with `Retry-After`,
//!   never 500: the sender retries.
//! - 401 says which credential is missing or wrong, never what the secret is.
//! - A 500 is logged with its cause and answered without internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::error;

use crate::counts::ReadError;
use crate::db::DbError;
use crate::events::EventError;
use crate::flush::FlushError;
use crate::reconcile::ReconcileError;
use crate::store::StoreError;

/// The body of every error response.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong, for programs (`code`) and people (`message`).
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `invalid_event`, `malformed_json`, `invalid_batch`, `invalid_parameter`,
    /// `unauthorized`, `payload_too_large`, `not_found`, `conflict`, `unavailable`, `timed_out`, `overloaded`,
    /// `body_timeout`, `too_many_streams`, ...
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
    /// The JSON path or parameter at fault, where there is one (`events[3].user_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The `code` of an error response, kept on the response for the metrics middleware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: u32 = 1;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is wrong; `field` names the offending part where there is one.
    #[error("{message}")]
    BadRequest {
        /// A stable machine-readable code.
        code: &'static str,
        /// What is wrong, for a person.
        message: String,
        /// The JSON path or parameter at fault.
        field: Option<String>,
    },
    /// The body is larger than allowed.
    #[error("the request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Missing or wrong credentials: a webhook signature or a bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// Too many requests in flight: retry later.
    #[error("the server is busy; retry later")]
    Overloaded,
    /// The body did not arrive within `--body-timeout-secs`: nothing was applied; retry.
    #[error("the request body did not arrive within {} s (--body-timeout-secs); nothing was applied; retry", .0.as_secs())]
    BodyTimedOut(std::time::Duration),
    /// A per-user or per-address cap on live streams: close one, or retry later.
    #[error("{0}")]
    TooManyStreams(String),
    /// Nothing at this path.
    #[error("no such endpoint")]
    NotFound,
    /// The path exists, not with this method.
    #[error("this endpoint does not take this method")]
    MethodNotAllowed,
    /// Another operation holds what this one needs.
    #[error("{0}")]
    Conflict(String),
    /// A dependency is unreachable or overloaded: retry later.
    #[error("{dependency} is unavailable; retry later")]
    Unavailable {
        /// Which dependency.
        dependency: &'static str,
    },
    /// The request outlived `--request-timeout-secs`: retry later. A flush or reconcile it
    /// started runs on in the background (they are spawned), so a retry may find it done.
    #[error("the request took longer than {} s (--request-timeout-secs); a flush or reconcile it started runs on; retry later", .0.as_secs())]
    TimedOut(std::time::Duration),
    /// A bug or an unexpected state: logged, not echoed.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl AppError {
    /// A 400 for a named parameter.
    pub fn bad_parameter(field: &str, message: impl Into<String>) -> Self {
        AppError::BadRequest { code: "invalid_parameter", message: message.into(), field: Some(field.to_string()) }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code, field) = match &self {
            AppError::BadRequest { code, field, .. } => (StatusCode::BAD_REQUEST, *code, field.clone()),
            AppError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            AppError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            AppError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", None),
            AppError::BodyTimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout", None),
            AppError::TooManyStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams", None),
            AppError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            AppError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            AppError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            AppError::TimedOut(_) => (StatusCode::SERVICE_UNAVAILABLE, "timed_out", None),
            AppError::Internal(cause) => {
                error!(error = ?cause, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
            }
        };
        let body = ErrorBody { error: ErrorDetail { code: code.to_string(), message: self.to_string(), field } };
        let mut response = (status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(code));
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<EventError> for AppError {
    fn from(e: EventError) -> Self {
        let code = match e {
            EventError::Malformed(_) => "malformed_json",
            EventError::TooMany { .. } | EventError::Empty { .. } => "invalid_batch",
            EventError::NotAnEventOrArray | EventError::Field { .. } => "invalid_event",
        };
        AppError::BadRequest { code, field: e.field().map(str::to_string), message: e.to_string() }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        if matches!(e, StoreError::StateMissing) {
            return AppError::Unavailable { dependency: "the Redis state (it is being rebuilt)" };
        }
        if matches!(e, StoreError::RedisRestarted) {
            return AppError::Unavailable {
                dependency: "the Redis state (Redis restarted; it is being rebuilt or resynced)",
            };
        }
        if matches!(e, StoreError::CountsReloading) {
            return AppError::Unavailable { dependency: "the held counts (being reloaded after a Redis rollback)" };
        }
        if let StoreError::NotReplicated { .. } = &e {
            tracing::warn!(error = %e, "events not acknowledged: too few replicas had them in time");
            return AppError::Unavailable {
                dependency: "Redis replicas (the events are applied on the master; a retry with the same webhook-id is answered once a replica has them)",
            };
        }
        if let StoreError::IdempotencyKeyReused = &e {
            return AppError::Conflict(e.to_string());
        }
        if let StoreError::IdempotencyRecordUnreadable = &e {
            tracing::warn!(error = %e, "a request refused: its idempotency record is unreadable");
            return AppError::Conflict(e.to_string());
        }
        if let StoreError::LeaseLost(_) = &e {
            // This process stalled past its lease; another holds it: the caller may try again.
            return AppError::Conflict(e.to_string());
        }
        if e.is_unavailable() {
            error!(error = %e, "redis unavailable");
            AppError::Unavailable { dependency: "redis" }
        } else {
            AppError::Internal(e.into())
        }
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            error!(error = %e, "database unavailable");
            AppError::Unavailable { dependency: "database" }
        } else {
            AppError::Internal(e.into())
        }
    }
}

impl From<FlushError> for AppError {
    fn from(e: FlushError) -> Self {
        match e {
            FlushError::Store(e) => e.into(),
            FlushError::Db(e) => e.into(),
            FlushError::Busy(_) | FlushError::BusyHere | FlushError::Skipped(_) => AppError::Conflict(e.to_string()),
            FlushError::TimedOut(_) => AppError::Unavailable { dependency: "database (the flush timed out)" },
            FlushError::Stopped(_) => AppError::Internal(e.into()),
        }
    }
}

impl From<ReadError> for AppError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Store(e) => e.into(),
            ReadError::Db(e) => e.into(),
            ReadError::Contended => AppError::Unavailable { dependency: "flush" },
        }
    }
}

impl From<ReconcileError> for AppError {
    fn from(e: ReconcileError) -> Self {
        match e {
            ReconcileError::NotConfigured => AppError::Conflict(e.to_string()),
            ReconcileError::Store(e) => e.into(),
            ReconcileError::Db(e) => e.into(),
            ReconcileError::Flush(e) => e.into(),
        }
    }
}
