//! Request ids: an incoming `X-Request-Id` is kept when it is sane, otherwise one is made up;
//! it is echoed in the response and recorded in the request's tracing span, so every log line
//! of the request carries it (Django can log the same id on its side).

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Span;

/// The header carrying the id, both ways.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id accepted from a client: long enough for a UUID or a trace id, short enough to
/// keep log lines small.
const MAX_LEN: usize = 128;

/// The id of the request being served (a request extension).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Whether a client's id can go into logs and headers as it is: printable ASCII without spaces
/// or quotes, so it cannot forge log fields or lines.
fn is_sane(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// A new id: 128 random bits in hex.
fn generate() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Assigns the request its id and echoes it in the response.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| is_sane(id))
        .map_or_else(generate, str::to_owned);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER.clone(), value);
    }
    response
}

/// The tracing span of a request, with its id (used by the trace layer).
pub fn span<B>(request: &axum::http::Request<B>) -> Span {
    let id = request.extensions().get::<RequestId>().map_or("", |id| id.0.as_str());
    // The path only: a query string can hold a credential (the live stream's `?token=`), and
    // secrets never reach the logs.
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sane_ids_are_kept() {
        assert!(is_sane("0b6e1c0e-8f9a-4a53-9a4e-3c2b1d0e9f8a"));
        assert!(is_sane("django:web-1/abc+def="));
        for bad in ["", "a b", "a\"b", "line\nbreak", "é", &"x".repeat(MAX_LEN + 1)] {
            assert!(!is_sane(bad), "{bad:?}");
        }
        assert_eq!(generate().len(), 32);
        assert!(is_sane(&generate()));
    }
}
