//! The OpenAPI 3.1 document, generated from the handlers and types (utoipa), served at
//! `/openapi.json` and checked into `docs/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "countersink",
        description = "Exact, fast unread-notification counters for Django: events in, real-time counts out."
    ),
    paths(
        super::events::post_events,
        super::counts::get_unread_count,
        super::counts::get_unread_counts,
        super::live::get_stream,
        super::flush::post_flush,
        super::reconcile::post_reconcile,
        super::status::get_status,
        super::status::get_healthz,
        super::status::get_readyz,
        super::metrics::get_metrics,
    ),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let signature = ApiKeyValue::with_description(
            "webhook-signature",
            "Standard Webhooks: with webhook-id and webhook-timestamp; see the README",
        );
        components.add_security_scheme("webhook_signature", SecurityScheme::ApiKey(ApiKey::Header(signature)));
        components.add_security_scheme("admin_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme("read_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        let stream = ApiKeyValue::with_description(
            "token",
            "A per-user stream token minted by the Django side with the webhook secret; see the README",
        );
        components.add_security_scheme("stream_token", SecurityScheme::ApiKey(ApiKey::Query(stream)));
    }
}

/// The document as pretty JSON, as checked into `docs/openapi.json`.
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `GET /openapi.json`
pub async fn get_openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
