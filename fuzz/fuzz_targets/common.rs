//! Checks shared by the event targets (`mod common;` in each).

use countersink::events::{Batch, EventError, EventKind, MAX_ID};

/// The invariants every accepted batch keeps: 1 to `max_events` events, every id at most
/// `MAX_ID`, and a `post_delete` neither created nor unread.
pub fn check_invariants(body: &[u8], result: &Result<Batch, EventError>, max_events: usize) {
    let Ok(batch) = result else { return };
    let body = String::from_utf8_lossy(body);
    assert!(!batch.is_empty(), "an empty batch was accepted: {body:?}");
    assert!(batch.len() <= max_events, "{} events accepted with max_events = {max_events}: {body:?}", batch.len());
    for event in &batch.transitions {
        assert!(event.notification_id <= MAX_ID, "notification_id above MAX_ID: {event:?}");
        assert!(event.user_id <= MAX_ID, "user_id above MAX_ID: {event:?}");
        if event.kind == EventKind::PostDelete {
            assert!(!event.created && !event.unread, "a post_delete that is created or unread: {event:?}");
        }
    }
    for user in &batch.recounts {
        assert!(*user <= MAX_ID, "recount user_id above MAX_ID: {user}");
    }
}
