//! `countersink::events::parse_batch` on arbitrary request bodies.
//!
//! The input is the raw body of `POST /v1/events`. Checked, for every input:
//!
//! - `parse_batch` never panics (with the default limit of 1,000 events and with a small one);
//! - whenever it returns `Ok`, the batch holds 1 to `max_events` events, every id is at most
//!   `MAX_ID` (2^63 - 1), and a `post_delete` has `created == false` and `unread == false`;
//! - the limit only ever turns an `Ok` into `TooMany`: a body accepted under one limit is
//!   accepted, identically, under any limit that still holds its events;
//! - an accepted batch, written back in the documented wire format, parses to the same batch.
#![no_main]

mod common;

use common::check_invariants;
use countersink::events::{parse_batch, Batch, EventError, EventKind};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// `--max-batch-events`' default.
const DEFAULT_MAX: usize = 1_000;

fuzz_target!(|body: &[u8]| {
    // A small limit too, so the TooMany boundary is reached with short inputs (0 is refused by config).
    let small_max = 1 + body.len() % 3;
    let big = parse_batch(body, DEFAULT_MAX);
    let small = parse_batch(body, small_max);
    check_invariants(body, &big, DEFAULT_MAX);
    check_invariants(body, &small, small_max);

    match (&big, &small) {
        (Ok(b), Ok(s)) => assert_eq!(b, s, "the limit changed an accepted batch"),
        (Ok(b), Err(e)) => assert!(
            b.len() > small_max && *e == EventError::TooMany { count: b.len(), max: small_max },
            "accepted under {DEFAULT_MAX} ({} events) but refused under {small_max} with {e:?}",
            b.len()
        ),
        (Err(e), Ok(s)) => panic!("refused under {DEFAULT_MAX} with {e:?} but accepted under {small_max}: {s:?}"),
        (Err(_), Err(_)) => {}
    }

    if let Ok(batch) = &big {
        let again = parse_batch(&to_wire(batch), DEFAULT_MAX);
        assert_eq!(again.as_ref(), Ok(batch), "the batch does not survive a round trip through the wire format");
    }
});

/// The batch as a sender would write it: transitions first, then recounts (the order `Batch` keeps).
fn to_wire(batch: &Batch) -> Vec<u8> {
    let mut events: Vec<Value> = batch
        .transitions
        .iter()
        .map(|e| {
            let mut object = match e.kind {
                EventKind::PostSave => json!({
                    "kind": "post_save", "notification_id": e.notification_id, "user_id": e.user_id,
                    "unread": e.unread, "created": e.created,
                }),
                EventKind::PostDelete => json!({
                    "kind": "post_delete", "notification_id": e.notification_id, "user_id": e.user_id,
                }),
            };
            if let Some(at) = e.occurred_at {
                object["occurred_at"] = Value::String(at.to_rfc3339());
            }
            object
        })
        .collect();
    events.extend(batch.recounts.iter().map(|user| json!({"kind": "recount", "user_id": user})));
    serde_json::to_vec(&Value::Array(events)).expect("a JSON value serializes")
}
