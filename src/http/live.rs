//! `GET /v1/users/{user_id}/unread-count/stream`: the count pushed as Server-Sent Events.
//!
//! Semantics (see the README, *Live counts*):
//! - every event is `event: count`, `data: {"user_id":..,"unread_count":..}`, `id: <unread_count>`;
//! - the first event after every (re)connect is the current count, whatever `Last-Event-ID` says,
//!   so a reconnect resumes cleanly: the events are states, not deltas, and nothing needs replaying;
//! - later events come only when the count differs from the one this stream sent last;
//! - the first event carries `retry:` (how long a browser waits before reconnecting), and a
//!   comment every 15 s keeps proxies from closing an idle stream.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::stream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::counts::parse_user_id;
use crate::app::AppState;
use crate::error::{AppError, ErrorBody};
use crate::live::caps::StreamSlot;
use crate::live::{Reading, Watch};

/// How long a browser waits before reconnecting a dropped stream (the `retry:` field).
const RECONNECT_HINT: Duration = Duration::from_secs(2);
/// How often an idle stream sends a keep-alive comment; under common proxies' 30–60 s idle limits.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/users/{user_id}/unread-count/stream`
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/unread-count/stream",
    tag = "reads",
    params(
        ("user_id" = String, Path, description = "An integer from 0 to 2^63-1"),
        ("token" = Option<String>, Query, description = "A stream token for this user, minted by the Django side (browsers cannot send headers)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Sent by browsers on reconnect; the first event is the current count either way"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `event: count`, `data: {\"user_id\":..,\"unread_count\":..}`, `id: <unread_count>`; the current count first, then each change", content_type = "text/event-stream", body = String),
        (status = 400, description = "Not a user id", body = ErrorBody),
        (status = 401, description = "No valid stream token or bearer token", body = ErrorBody),
        (status = 429, description = "This user (`--max-live-streams-per-user`) or this client address (`--max-live-streams-per-address`) has too many streams open", body = ErrorBody),
        (status = 503, description = "Too many streams (`--max-live-streams`), or Redis or the database unavailable: retry", body = ErrorBody),
    ),
    security((), ("stream_token" = []), ("read_token" = []))
)]
pub async fn get_stream(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Path(user_id) = path.map_err(|e| AppError::bad_parameter("user_id", e.body_text()))?;
    let user_id = parse_user_id(&user_id, "user_id")?;
    let token = query.as_deref().unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("token="));
    let now = chrono::Utc::now().timestamp();
    state.auth.check_stream(&headers, token, user_id, now, state.limits.max_stream_token_lifetime)?;
    let address = client_address(&state, &headers, peer.map(|Extension(ConnectInfo(peer))| peer.ip()));
    // The per-user and per-address caps first: one client must not take every slot of the process.
    let slot = state.stream_caps.try_open(user_id, address).map_err(|e| AppError::TooManyStreams(e.to_string()))?;
    let permit = state.live_streams.clone().try_acquire_owned().map_err(|_| AppError::Overloaded)?;
    // Watch before reading, so a change between the read and the first wait is not missed.
    let watch = state.live.watch(user_id);
    let first = state.live.read(&state.reader, user_id).await?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    debug!(
        user_id,
        resumed = last_event_id.is_some(),
        changed_meanwhile = last_event_id.is_some_and(|id| id != first.count),
        "live stream opened"
    );
    let stream = CountStream {
        user_id,
        watch,
        last: first,
        first: Some(count_event(user_id, first.count).retry(RECONNECT_HINT)),
        closed: Box::pin(state.live.closed()),
        _permit: permit,
        _slot: slot,
    };
    let events = stream::unfold(stream, CountStream::next);
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response();
    let headers = response.headers_mut();
    // Authentication is the token in the URL, never a cookie: any page may open the stream.
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    // nginx buffers responses by default, which would hold events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One open stream: what it sent last, and what it waits on.
struct CountStream {
    user_id: u64,
    watch: Watch,
    last: Reading,
    first: Option<Event>,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Counts against `--max-live-streams` until the stream ends.
    _permit: OwnedSemaphorePermit,
    /// Counts against the per-user and per-address caps until the stream ends.
    _slot: StreamSlot,
}

/// The address the per-address cap counts: the configured header's (set by the reverse proxy)
/// when present and an address, else the connection's peer; `None` when neither is known
/// (in-process tests), and then only the per-user cap applies.
fn client_address(state: &AppState, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
    let forwarded = state.limits.live_address_header.as_ref().and_then(|name| headers.get(name));
    // X-Forwarded-For may list several: the last is the one the proxy itself saw.
    let from_header = forwarded
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.rsplit(',').next())
        .and_then(|value| value.trim().parse::<IpAddr>().ok());
    from_header.or(peer)
}

impl CountStream {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        if let Some(first) = self.first.take() {
            return Some((Ok(first), self));
        }
        loop {
            let reading = tokio::select! {
                reading = self.watch.changed() => reading?,
                _ = &mut self.closed => return None,
            };
            // Older than what we sent (a slow read), or no change: nothing to say.
            if reading.seq > self.last.seq && reading.count != self.last.count {
                self.last = reading;
                return Some((Ok(count_event(self.user_id, reading.count)), self));
            }
            self.last.seq = self.last.seq.max(reading.seq);
        }
    }
}

fn count_event(user_id: u64, count: i64) -> Event {
    Event::default()
        .event("count")
        .id(count.to_string())
        .data(format!(r#"{{"user_id":{user_id},"unread_count":{count}}}"#))
}
