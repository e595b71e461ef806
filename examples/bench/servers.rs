//! The two comparison servers, each run in a process of its own (`bench serve-minimal`,
//! `bench serve-sql-peer`) so it competes for the cores like the sidecar does.
//!
//! - **minimal**: an axum endpoint that only parses the same JSON with the same parser
//!   (`countersink::events::parse_batch`): no signature, no Redis. The ceiling of this machine
//!   for an axum JSON endpoint.
//! - **SQL peer**: the design article's direct approach. It parses the same JSON, then runs one
//!   atomic `UPDATE ... SET unread_count = unread_count + 1` per event (autocommit) through a
//!   pool against PostgreSQL. It also answers the sidecar's read, `GET /v1/users/{id}/unread-count`,
//!   with the primary-key `SELECT` of the sidecar's count table in the same database: what a site
//!   without countersink's read would run.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use countersink::db::Db;
use countersink::events::{parse_batch, EventKind};
use diesel::sql_types::BigInt;
use diesel::RunQueryDsl;

/// The most events a request may hold, as in the sidecar.
const MAX_BATCH_EVENTS: usize = 1_000;

type Answer = Result<Json<serde_json::Value>, (StatusCode, String)>;

/// Serves the minimal endpoint on `port` until killed.
pub async fn serve_minimal(port: u16) -> anyhow::Result<()> {
    let app = Router::new().route("/v1/events", post(minimal_events));
    serve(app, port).await
}

async fn minimal_events(body: Bytes) -> Answer {
    let batch = parse_batch(&body, MAX_BATCH_EVENTS).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Json(serde_json::json!({ "received": batch.len() })))
}

/// Serves the SQL peer on `port` until killed, with `pool` connections to `database_url`.
pub async fn serve_sql_peer(port: u16, database_url: &str, pool: u32) -> anyhow::Result<()> {
    let db = Db::connect(database_url, pool, Duration::from_secs(30))?;
    let app = Router::new()
        .route("/v1/events", post(peer_events))
        .route("/v1/users/{user_id}/unread-count", get(peer_read))
        .with_state(db);
    serve(app, port).await
}

async fn peer_events(State(db): State<Db>, body: Bytes) -> Answer {
    let batch = parse_batch(&body, MAX_BATCH_EVENTS).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let received = batch.len();
    // What the signal handlers of the direct approach do: +1 on an unread creation, -1 on a
    // mark-as-read or a delete (without knowing the previous state, as that approach does).
    let updates: Vec<(i64, i64)> = batch
        .transitions
        .iter()
        .filter_map(|e| {
            let delta = match e.kind {
                EventKind::PostSave if e.created && e.unread => 1,
                EventKind::PostSave if !e.created && !e.unread => -1,
                EventKind::PostDelete => -1,
                EventKind::PostSave => return None,
            };
            Some((delta, e.user_id as i64))
        })
        .collect();
    db.run(move |conn| {
        for (delta, user) in updates {
            diesel::sql_query("UPDATE peer_counts SET unread_count = unread_count + $1 WHERE user_id = $2")
                .bind::<BigInt, _>(delta)
                .bind::<BigInt, _>(user)
                .execute(conn)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(serde_json::json!({ "received": received })))
}

#[derive(diesel::QueryableByName)]
struct Stored {
    #[diesel(sql_type = BigInt)]
    unread_count: i64,
}

async fn peer_read(State(db): State<Db>, Path(user_id): Path<i64>) -> Answer {
    let stored: Vec<Stored> = db
        .run(move |conn| {
            Ok(diesel::sql_query("SELECT unread_count FROM countersink_usernotificationscount WHERE user_id = $1")
                .bind::<BigInt, _>(user_id)
                .load(conn)?)
        })
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let unread_count = stored.first().map_or(0, |s| s.unread_count);
    Ok(Json(serde_json::json!({ "user_id": user_id, "unread_count": unread_count })))
}

async fn serve(app: Router, port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
