//! `POST /v1/events`: one event or a batch, validated whole, applied in one Redis script.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use tracing::debug;

use crate::app::AppState;
use crate::error::AppError;
use crate::error::ErrorBody;
use crate::events::{parse_batch, Event, WireBatch};
use crate::metrics;
use crate::store::{Applied, ApplyOutcome, Idempotency, Keys, StoreError};

/// What a request's events did.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct EventsResponse {
    /// Events in the request.
    pub received: u64,
    /// Events that changed a count.
    pub changed: u64,
    /// Events that changed no count.
    pub noops: u64,
    /// The no-ops by reason, and the changes.
    pub outcomes: ApplyOutcome,
    /// This request's `webhook-id` was applied before; the counts are those of that delivery.
    pub replayed: bool,
    /// Users queued for a recount by `recount` events (repeated asks coalesce).
    pub recounts_queued: u64,
}

/// Checks the signature, validates the whole batch, then applies it atomically, once per `webhook-id`.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    request_body(content = WireBatch, description = "One event, or an array of 1 to 1,000 (at most 1 MiB)."),
    params(
        ("webhook-id" = Option<String>, Header, description = "Unique per request, reused on retries (with the same body): the idempotency key."),
        ("webhook-timestamp" = Option<String>, Header, description = "Unix seconds, within 5 minutes of the server's clock."),
        ("webhook-signature" = Option<String>, Header, description = "`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."),
    ),
    responses(
        (status = 200, description = "Applied (or a replay of a request applied before)", body = EventsResponse),
        (status = 400, description = "The batch is invalid, or would create more state shards than `--max-new-state-shards` (`too_sparse`); nothing was applied", body = ErrorBody),
        (status = 401, description = "Missing, forged, stale or future-dated signature; nothing was applied", body = ErrorBody),
        (status = 409, description = "The webhook-id was applied before with another body, or its stored record is not one countersink wrote; nothing was applied", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 408, description = "The body did not arrive within `--body-timeout-secs`; nothing was applied: retry", body = ErrorBody),
        (status = 503, description = "Redis unavailable, state being rebuilt, or overloaded: retry", body = ErrorBody),
    ),
    security((), ("webhook_signature" = []))
)]
pub async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EventsResponse>, AppError> {
    let body = super::read_body(body, state.limits.max_body_bytes)?;
    let webhook_id = state.auth.verify_webhook(&headers, &body)?;
    let batch = parse_batch(&body, state.limits.max_batch_events)?;
    metrics::events_received(batch.len());
    if !batch.recounts.is_empty() && !state.reconciler.is_configured() {
        return Err(AppError::BadRequest {
            code: "recount_not_configured",
            message: "recount events need the sidecar's --source-table (COUNTERSINK_SOURCE_TABLE)".into(),
            field: None,
        });
    }
    refuse_too_sparse(&state, &batch.transitions).await?;
    // Recounts first: asking twice is harmless, and a replayed request finds them queued already.
    state.reconciler.queue_recounts(&batch.recounts).await?;
    metrics::recounts_queued(batch.recounts.len());
    let idempotency = webhook_id.map(|id| Idempotency::new(id, &body, state.limits.idempotency_ttl));
    let received = batch.len() as u64;
    let recounts_queued = batch.recounts.len() as u64;
    let applied = match state.ingest.apply(batch.transitions, idempotency).await {
        Err(StoreError::RedisRestarted) => {
            // The watch recovers at once rather than at its next check.
            state.bootstrapper.wake_redis_watch();
            return Err(StoreError::RedisRestarted.into());
        }
        applied => applied?,
    };
    count_outcomes(&applied);
    let outcomes = applied.outcome;
    if outcomes.after_delete > 0 {
        // The script queued the users of saves that came after a delete (apply_events.lua).
        state.reconciler.wake_recount_worker();
    }
    // Per request, so at debug: /metrics counts them; at 10,000 requests/s an info line each
    // costs more CPU than the rest of the handler.
    debug!(
        received,
        recounts = recounts_queued,
        changed = outcomes.changed,
        noops = outcomes.noops(),
        replayed = applied.replayed,
        "events applied"
    );
    Ok(Json(EventsResponse {
        received,
        changed: outcomes.changed,
        noops: outcomes.noops(),
        outcomes,
        replayed: applied.replayed,
        recounts_queued,
    }))
}

/// Counts what a request's events did in `/metrics` (a replay: all of them as `replayed`).
fn count_outcomes(applied: &Applied) {
    let ApplyOutcome { changed, recorded, duplicate, stale, after_delete } = applied.outcome;
    if applied.replayed {
        metrics::events_duplicate("replayed", changed + recorded + duplicate + stale + after_delete);
        return;
    }
    metrics::events_applied("changed", changed);
    metrics::events_applied("recorded", recorded);
    metrics::events_duplicate("duplicate", duplicate);
    metrics::events_duplicate("stale", stale);
    metrics::events_duplicate("after_delete", after_delete);
}

/// Refuses a request whose events would create more than `--max-new-state-shards` state shards.
///
/// A shard is a Redis string of up to 16 KiB for 65,536 consecutive notification ids: dense ids
/// cost 2 bits each, but ids far apart cost a shard each, 291 times the request's size in Redis.
/// A request may create at most the cap, so every shard's 16 KiB was paid for by a request that
/// created few. Redis is asked only when the events touch more shards than the cap, which dense
/// ids never do.
async fn refuse_too_sparse(state: &AppState, events: &[Event]) -> Result<(), AppError> {
    let cap = state.limits.max_new_state_shards;
    let mut shards: Vec<u64> = events.iter().map(|e| Keys::state_slot(e.notification_id).0).collect();
    shards.sort_unstable();
    shards.dedup();
    if shards.len() <= cap {
        return Ok(());
    }
    let new = state.store.missing_state_shards(&shards).await?;
    if new <= cap {
        return Ok(());
    }
    Err(AppError::BadRequest {
        code: "too_sparse",
        field: Some("events".into()),
        message: format!(
            "the events would create {new} state shards in Redis (one per 65,536 notification ids, up to 16 KiB \
             each); a request may create at most {cap} (--max-new-state-shards, COUNTERSINK_MAX_NEW_STATE_SHARDS): \
             nothing was applied. Send notifications whose ids are far apart in separate requests"
        ),
    })
}
