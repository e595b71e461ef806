//! The wire format of an event and its validation.
//!
//! A request body is one event object or a JSON array of them:
//!
//! ```json
//! {"kind": "post_save", "notification_id": 17, "user_id": 42, "unread": true, "created": true,
//!  "occurred_at": "2026-11-22T10:00:00Z"}
//! ```
//!
//! A third kind, `{"kind": "recount", "user_id": 42}`, says that a user's notifications changed
//! through a path that sends no signal (`QuerySet.update()`, bulk writes, raw SQL): the sidecar
//! recounts that user from the Notification table.
//!
//! The whole batch is validated before anything is applied; the first problem is reported
//! with the event's index and the field, and nothing of that request is applied.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// The largest id accepted: Django's `BigAutoField` is a signed 64-bit integer.
pub const MAX_ID: u64 = i64::MAX as u64;

/// What happened to a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Django's `post_save`: the notification was created or updated.
    PostSave,
    /// Django's `post_delete`: the notification is gone (a soft delete is sent as this too).
    PostDelete,
}

/// One validated event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The notification's primary key.
    pub notification_id: u64,
    /// The recipient's user id. A notification's recipient is assumed never to change.
    pub user_id: u64,
    /// Whether the notification is unread after this save (always `false` for a delete).
    pub unread: bool,
    /// Whether this save created the notification (Django's `created` argument).
    pub created: bool,
    /// When it happened, as the sender saw it. Informational: ordering is by arrival (see the README).
    pub occurred_at: Option<DateTime<Utc>>,
}

impl Event {
    /// A `post_save` event.
    pub fn save(notification_id: u64, user_id: u64, unread: bool, created: bool) -> Self {
        Self { kind: EventKind::PostSave, notification_id, user_id, unread, created, occurred_at: None }
    }

    /// A `post_delete` event.
    pub fn delete(notification_id: u64, user_id: u64) -> Self {
        Self { kind: EventKind::PostDelete, notification_id, user_id, unread: false, created: false, occurred_at: None }
    }
}

/// A validated request body: transitions to apply, and users to recount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// `post_save` and `post_delete` events, in order.
    pub transitions: Vec<Event>,
    /// Users named by `recount` events.
    pub recounts: Vec<u64>,
}

impl Batch {
    /// Events in the request.
    pub fn len(&self) -> usize {
        self.transitions.len() + self.recounts.len()
    }

    /// Whether the request held no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One parsed event object.
enum Parsed {
    Transition(Event),
    Recount(u64),
}

/// One event as it travels, for the OpenAPI document. [`parse_batch`] is the parser (it gives
/// better errors than serde would); a test checks that the two accept the same examples.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WireEvent {
    /// Django's `post_save`.
    PostSave {
        /// The notification's primary key.
        #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
        notification_id: u64,
        /// The recipient.
        #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
        user_id: u64,
        /// Whether the notification is unread after this save.
        unread: bool,
        /// Django's `created` argument.
        #[serde(default)]
        created: bool,
        /// When it happened (RFC 3339); informational.
        #[serde(default)]
        occurred_at: Option<DateTime<Utc>>,
    },
    /// Django's `post_delete`, or a soft delete.
    PostDelete {
        /// The notification's primary key.
        #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
        notification_id: u64,
        /// The recipient.
        #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
        user_id: u64,
        /// When it happened (RFC 3339); informational.
        #[serde(default)]
        occurred_at: Option<DateTime<Utc>>,
    },
    /// The user's notifications changed in bulk: recount them from the Notification table.
    Recount {
        /// The user to recount.
        #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
        user_id: u64,
    },
}

/// A request body of `POST /v1/events`: one event, or an array of 1 to 1,000.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum WireBatch {
    /// One event.
    One(WireEvent),
    /// 1 to 1,000 events (`--max-batch-events`), applied atomically.
    Many(Vec<WireEvent>),
}

/// Why a request body was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    Malformed(String),
    /// The body is JSON but neither an event object nor an array of them.
    #[error("the body must be an event object or a JSON array of event objects")]
    NotAnEventOrArray,
    /// An empty array.
    #[error("the batch is empty: send 1 to {max} events")]
    Empty {
        /// The configured maximum.
        max: usize,
    },
    /// More events than allowed.
    #[error("the batch holds {count} events; at most {max} are accepted per request")]
    TooMany {
        /// Events in the batch.
        count: usize,
        /// The configured maximum.
        max: usize,
    },
    /// One field of one event is wrong.
    #[error("{field}: {problem}")]
    Field {
        /// Where, as `events[3].user_id` (or `user_id` for a single event).
        field: String,
        /// What is wrong.
        problem: String,
    },
}

impl EventError {
    /// The JSON path of the offending field, where there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            EventError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Parses and validates a request body holding one event or an array of at most `max_events`.
pub fn parse_batch(body: &[u8], max_events: usize) -> Result<Batch, EventError> {
    let UniqueKeys(value) = serde_json::from_slice(body).map_err(|e| EventError::Malformed(e.to_string()))?;
    let parsed = match value {
        Value::Object(object) => vec![parse_event(&object, None)?],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(EventError::Empty { max: max_events });
            }
            if items.len() > max_events {
                return Err(EventError::TooMany { count: items.len(), max: max_events });
            }
            items
                .iter()
                .enumerate()
                .map(|(index, item)| match item {
                    Value::Object(object) => parse_event(object, Some(index)),
                    _ => Err(field_error(Some(index), None, "must be an event object")),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => return Err(EventError::NotAnEventOrArray),
    };
    let mut batch = Batch::default();
    for event in parsed {
        match event {
            Parsed::Transition(event) => batch.transitions.push(event),
            Parsed::Recount(user) => batch.recounts.push(user),
        }
    }
    Ok(batch)
}

/// A JSON value whose objects repeat no key. `serde_json::Value` keeps the last of repeated
/// keys silently, so `{"unread": true, "unread": false}` would read as "read"; RFC 8259 leaves
/// repeated names to the parser, and a sender that repeats one has a bug worth a 400.
struct UniqueKeys(Value);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {key:?} (each key may appear once in an object)"
                )));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The `kind` of each event, as the Django package names them too (`events.POST_SAVE`, ...,
/// compared by `tests/first_run.rs`).
pub mod kind {
    /// Django's `post_save`.
    pub const POST_SAVE: &str = "post_save";
    /// Django's `post_delete`.
    pub const POST_DELETE: &str = "post_delete";
    /// A recount of one user from the Notification table.
    pub const RECOUNT: &str = "recount";
}

const KNOWN_FIELDS: [&str; 6] = ["kind", "notification_id", "user_id", "unread", "created", "occurred_at"];

fn parse_event(object: &Map<String, Value>, index: Option<usize>) -> Result<Parsed, EventError> {
    let kind = match object.get("kind") {
        Some(Value::String(s)) if s == kind::POST_SAVE => EventKind::PostSave,
        Some(Value::String(s)) if s == kind::POST_DELETE => EventKind::PostDelete,
        Some(Value::String(s)) if s == kind::RECOUNT => return parse_recount(object, index),
        Some(_) => {
            return Err(field_error(index, Some("kind"), "must be \"post_save\", \"post_delete\" or \"recount\""))
        }
        None => return Err(field_error(index, Some("kind"), "is required")),
    };
    // Unknown fields are rejected: a misspelt `unread` must not silently count as "read".
    if let Some(unknown) = object.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(field_error(index, Some(unknown), "unknown field"));
    }
    let notification_id = parse_id(object, index, "notification_id")?;
    let user_id = parse_id(object, index, "user_id")?;
    let unread = parse_bool(object, index, "unread")?;
    let created = parse_bool(object, index, "created")?.unwrap_or(false);
    let unread = match (kind, unread) {
        (EventKind::PostSave, Some(unread)) => unread,
        (EventKind::PostSave, None) => return Err(field_error(index, Some("unread"), "is required for post_save")),
        (EventKind::PostDelete, _) => false,
    };
    if kind == EventKind::PostDelete && created {
        return Err(field_error(index, Some("created"), "must not be true for post_delete"));
    }
    let occurred_at = parse_occurred_at(object, index)?;
    Ok(Parsed::Transition(Event { kind, notification_id, user_id, unread, created, occurred_at }))
}

fn parse_recount(object: &Map<String, Value>, index: Option<usize>) -> Result<Parsed, EventError> {
    if let Some(unknown) = object.keys().find(|k| !["kind", "user_id", "occurred_at"].contains(&k.as_str())) {
        return Err(field_error(index, Some(unknown), "unknown field for recount (it takes user_id)"));
    }
    parse_occurred_at(object, index)?;
    Ok(Parsed::Recount(parse_id(object, index, "user_id")?))
}

fn parse_occurred_at(object: &Map<String, Value>, index: Option<usize>) -> Result<Option<DateTime<Utc>>, EventError> {
    match object.get("occurred_at") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| field_error(index, Some("occurred_at"), "must be an RFC 3339 timestamp"))?
                .with_timezone(&Utc),
        )),
        Some(_) => Err(field_error(index, Some("occurred_at"), "must be an RFC 3339 timestamp string")),
    }
}

fn parse_id(object: &Map<String, Value>, index: Option<usize>, name: &'static str) -> Result<u64, EventError> {
    match object.get(name) {
        None => Err(field_error(index, Some(name), "is required")),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|id| *id <= MAX_ID)
            .ok_or_else(|| field_error(index, Some(name), &format!("must be an integer from 0 to {MAX_ID}"))),
        Some(_) => Err(field_error(index, Some(name), &format!("must be an integer from 0 to {MAX_ID}"))),
    }
}

fn parse_bool(
    object: &Map<String, Value>,
    index: Option<usize>,
    name: &'static str,
) -> Result<Option<bool>, EventError> {
    match object.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(field_error(index, Some(name), "must be true or false")),
    }
}

fn field_error(index: Option<usize>, name: Option<&str>, problem: &str) -> EventError {
    let field = match (index, name) {
        (Some(i), Some(name)) => format!("events[{i}].{name}"),
        (Some(i), None) => format!("events[{i}]"),
        (None, Some(name)) => name.to_string(),
        (None, None) => "event".to_string(),
    };
    EventError::Field { field, problem: problem.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<Event>, EventError> {
        parse_batch(body.as_bytes(), 1_000).map(|batch| batch.transitions)
    }

    #[test]
    fn the_documented_wire_format_and_the_parser_agree() {
        let accepted = [
            r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":true}"#,
            r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":false,"created":true,"occurred_at":"2026-11-22T10:00:00Z"}"#,
            r#"[{"kind":"post_delete","notification_id":1,"user_id":2},{"kind":"recount","user_id":3}]"#,
        ];
        for body in accepted {
            assert!(serde_json::from_str::<WireBatch>(body).is_ok(), "{body}");
            assert!(parse_batch(body.as_bytes(), 1_000).is_ok(), "{body}");
        }
        let refused = [
            r#"{"kind":"post_save","notification_id":1,"user_id":2}"#,
            r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":true,"extra":1}"#,
            r#"{"kind":"recount"}"#,
            r#"{"kind":"post_update","notification_id":1,"user_id":2}"#,
        ];
        for body in refused {
            assert!(serde_json::from_str::<WireBatch>(body).is_err(), "{body}");
            assert!(parse_batch(body.as_bytes(), 1_000).is_err(), "{body}");
        }
    }

    #[test]
    fn recount_names_a_user_and_nothing_else() {
        let body = r#"[{"kind":"recount","user_id":7},{"kind":"post_delete","notification_id":1,"user_id":2}]"#;
        let batch = parse_batch(body.as_bytes(), 10);
        assert_eq!(batch, Ok(Batch { transitions: vec![Event::delete(1, 2)], recounts: vec![7] }));
        let extra = parse_batch(br#"[{"kind":"recount","user_id":7,"notification_id":1}]"#, 10);
        assert_eq!(extra.unwrap_err().field(), Some("events[0].notification_id"));
        let missing = parse_batch(br#"{"kind":"recount"}"#, 10);
        assert_eq!(missing.unwrap_err().field(), Some("user_id"));
        // Found by the parse_events fuzzer: a recount's occurred_at is validated like any other.
        let bad_time = parse_batch(br#"{"kind":"recount","user_id":7,"occurred_at":42}"#, 10);
        assert_eq!(bad_time.unwrap_err().field(), Some("occurred_at"));
    }

    #[test]
    fn single_event_object_is_a_batch_of_one() {
        let events = parse(r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":true,"created":true}"#);
        assert_eq!(events, Ok(vec![Event::save(1, 2, true, true)]));
    }

    #[test]
    fn delete_needs_no_unread_flag() {
        let events = parse(r#"[{"kind":"post_delete","notification_id":9,"user_id":3}]"#);
        assert_eq!(events, Ok(vec![Event::delete(9, 3)]));
    }

    #[test]
    fn largest_bigautofield_id_is_accepted_and_one_more_is_not() {
        let ok = parse(r#"{"kind":"post_delete","notification_id":9223372036854775807,"user_id":1}"#);
        assert_eq!(ok.map(|e| e[0].notification_id), Ok(MAX_ID));
        let too_big = parse(r#"{"kind":"post_delete","notification_id":9223372036854775808,"user_id":1}"#);
        assert_eq!(too_big.unwrap_err().field(), Some("notification_id"));
    }

    #[test]
    fn bad_event_names_its_index_and_field() {
        let body = r#"[{"kind":"post_save","notification_id":1,"user_id":2,"unread":true},
                       {"kind":"post_save","notification_id":-4,"user_id":2,"unread":true}]"#;
        assert_eq!(parse(body).unwrap_err().field(), Some("events[1].notification_id"));
    }

    #[test]
    fn each_malformed_field_is_named() {
        let cases = [
            (r#"{"kind":"post_update","notification_id":1,"user_id":2}"#, "kind"),
            (r#"{"notification_id":1,"user_id":2}"#, "kind"),
            (r#"{"kind":"post_save","notification_id":1.5,"user_id":2,"unread":true}"#, "notification_id"),
            (r#"{"kind":"post_save","notification_id":"1","user_id":2,"unread":true}"#, "notification_id"),
            (r#"{"kind":"post_save","notification_id":1,"unread":true}"#, "user_id"),
            (r#"{"kind":"post_save","notification_id":1,"user_id":2}"#, "unread"),
            (r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":"yes"}"#, "unread"),
            (r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":true,"created":1}"#, "created"),
            (r#"{"kind":"post_delete","notification_id":1,"user_id":2,"created":true}"#, "created"),
            (
                r#"{"kind":"post_save","notification_id":1,"user_id":2,"unread":true,"occurred_at":"yesterday"}"#,
                "occurred_at",
            ),
            (r#"{"kind":"post_save","notification_id":1,"user_id":2,"unraed":true}"#, "unraed"),
        ];
        for (body, field) in cases {
            assert_eq!(parse(body).unwrap_err().field(), Some(field), "body: {body}");
        }
    }

    #[test]
    fn batch_limits_are_enforced() {
        assert_eq!(parse("[]"), Err(EventError::Empty { max: 1_000 }));
        let one = r#"{"kind":"post_delete","notification_id":1,"user_id":2}"#;
        let body = format!("[{}]", [one; 3].join(","));
        assert_eq!(parse_batch(body.as_bytes(), 2).map(|b| b.len()), Err(EventError::TooMany { count: 3, max: 2 }));
        assert!(matches!(parse("{not json"), Err(EventError::Malformed(_))));
        assert_eq!(parse("42"), Err(EventError::NotAnEventOrArray));
    }

    #[test]
    fn occurred_at_is_parsed_as_utc() {
        let body =
            r#"{"kind":"post_delete","notification_id":1,"user_id":2,"occurred_at":"2026-11-22T10:00:00+01:00"}"#;
        let at = parse(body).map(|e| e[0].occurred_at.map(|t| t.to_rfc3339()));
        assert_eq!(at, Ok(Some("2026-11-22T09:00:00+00:00".to_string())));
    }
}
