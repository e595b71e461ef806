//! The OpenAPI document is generated from the code; the copy in docs/ must match it.
#![allow(clippy::unwrap_used)]

#[test]
fn checked_in_openapi_document_matches_the_code() {
    let generated = countersink::http::openapi::document();
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    assert!(
        checked_in.trim_end() == generated.trim_end(),
        "docs/openapi.json is stale: run `cargo run -- openapi > docs/openapi.json`"
    );
    let document: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    for path in [
        "/v1/events",
        "/v1/users/{user_id}/unread-count",
        "/v1/unread-counts",
        "/v1/flush",
        "/v1/reconcile",
        "/v1/users/{user_id}/unread-count/stream",
    ] {
        assert!(document["paths"].get(path).is_some(), "{path} is documented");
    }
}
