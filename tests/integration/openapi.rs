//! The contracts with the outside: the OpenAPI document is generated from the code and the copy in
//! docs/ must match it; the Python client agrees with the sidecar on the codes both spell.

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

/// The Django package hard-codes what the sidecar defines: the largest id, the event kinds and
/// the default batch limit. Nothing but this test ties the two languages together.
#[test]
fn the_python_client_agrees_with_the_sidecar_on_ids_kinds_and_limits() {
    let python =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/python_client/src/countersink/events.py"))
            .unwrap();
    let constant = |name: &str| {
        python
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("events.py defines no {name}"))
            .trim()
            .to_string()
    };
    assert_eq!(constant("MAX_ID"), "2**63 - 1");
    assert_eq!(countersink::events::MAX_ID, 2u64.pow(63) - 1);
    assert_eq!(
        constant("MAX_EVENTS_PER_REQUEST").replace('_', "").parse::<usize>().unwrap(),
        countersink::app::Limits::default().max_batch_events,
        "the sender's merged requests must fit the sidecar's default --max-batch-events"
    );
    for (name, kind) in [("POST_SAVE", "post_save"), ("POST_DELETE", "post_delete"), ("RECOUNT", "recount")] {
        assert_eq!(constant(name), format!("\"{kind}\""));
        let body = match kind {
            "recount" => format!(r#"{{"kind":"{kind}","user_id":1}}"#),
            _ => format!(r#"{{"kind":"{kind}","notification_id":1,"user_id":1,"unread":true}}"#),
        };
        assert!(countersink::events::parse_batch(body.as_bytes(), 10).is_ok(), "the sidecar does not take {kind}");
    }
}
