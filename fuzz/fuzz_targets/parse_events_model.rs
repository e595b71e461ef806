//! `countersink::events::parse_batch` against a model of the documented wire format.
//!
//! Byte-level mutation of JSON text rarely builds a second valid event, so the raw target
//! (`parse_events`) mostly exercises rejections. This one turns the fuzzer's bytes into a JSON
//! batch built from the pieces that matter (the three kinds and near misses, ids at and past the
//! limits, booleans and non-booleans, RFC 3339 timestamps and near misses, unknown fields,
//! non-object items, 0 to 8 events, one object or an array) and checks `parse_batch` against
//! an independent model of the README's event table:
//!
//! - a batch the model accepts is accepted, and parses to exactly the events the model expects;
//! - a batch the model refuses is refused with the right error: `Empty`, `TooMany`, or a field
//!   error naming the first bad event (`events[i]…`, or no index for a single object);
//! - the invariants of `parse_events` hold whatever the verdict.
//!
//! Whether a timestamp string is valid RFC 3339 is chrono's decision, in the model as in the code.
#![no_main]

mod common;

use chrono::{DateTime, Utc};
use common::check_invariants;
use countersink::events::{parse_batch, Batch, Event, EventError, EventKind, MAX_ID};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((body, max_events)) = generate(&mut u) else { return };
    let bytes = if max_events % 2 == 0 { serde_json::to_vec_pretty(&body) } else { serde_json::to_vec(&body) };
    let bytes = bytes.expect("a JSON value serializes");
    let got = parse_batch(&bytes, max_events);
    check_invariants(&bytes, &got, max_events);
    let text = String::from_utf8_lossy(&bytes);
    match (model_batch(&body, max_events), &got) {
        (Expect::Either, _) => {}
        (Expect::Accept(want), got) => assert_eq!(got, &Ok(want), "max_events {max_events}, body {text}"),
        (Expect::Empty, got) => assert_eq!(got, &Err(EventError::Empty { max: max_events }), "body {text}"),
        (Expect::TooMany(count), got) => {
            assert_eq!(got, &Err(EventError::TooMany { count, max: max_events }), "body {text}")
        }
        (Expect::BadField(index), Err(EventError::Field { field, .. })) => match index {
            Some(i) => assert!(
                field == &format!("events[{i}]") || field.starts_with(&format!("events[{i}].")),
                "the error names {field:?}, the first bad event is events[{i}]: {text}"
            ),
            None => assert!(!field.starts_with("events"), "a single event's error names {field:?}: {text}"),
        },
        (Expect::BadField(index), got) => panic!("want a field error at {index:?}, got {got:?}: {text}"),
    }
});

/// What the model says about a body.
enum Expect {
    Accept(Batch),
    Empty,
    TooMany(usize),
    /// Refused for a field of the event at this index (`None`: the body is one event object).
    BadField(Option<usize>),
    /// The documentation does not settle it; only the invariants are checked.
    Either,
}

/// What the model says about one event object.
enum One {
    Transition(Event),
    Recount(u64),
    Bad,
    Either,
}

fn model_batch(body: &Value, max_events: usize) -> Expect {
    match body {
        Value::Object(object) => match model_event(object) {
            One::Transition(e) => Expect::Accept(Batch { transitions: vec![e], recounts: vec![] }),
            One::Recount(user) => Expect::Accept(Batch { transitions: vec![], recounts: vec![user] }),
            One::Bad => Expect::BadField(None),
            One::Either => Expect::Either,
        },
        Value::Array(items) if items.is_empty() => Expect::Empty,
        Value::Array(items) if items.len() > max_events => Expect::TooMany(items.len()),
        Value::Array(items) => {
            let mut batch = Batch::default();
            for (i, item) in items.iter().enumerate() {
                let one = match item {
                    Value::Object(object) => model_event(object),
                    _ => One::Bad,
                };
                match one {
                    One::Transition(e) => batch.transitions.push(e),
                    One::Recount(user) => batch.recounts.push(user),
                    One::Bad => return Expect::BadField(Some(i)),
                    One::Either => return Expect::Either,
                }
            }
            Expect::Accept(batch)
        }
        _ => unreachable!("the generator makes objects and arrays"),
    }
}

/// The README's event table, written independently of `src/events.rs`.
fn model_event(object: &Map<String, Value>) -> One {
    let kind = match object.get("kind").and_then(Value::as_str) {
        Some("post_save") => EventKind::PostSave,
        Some("post_delete") => EventKind::PostDelete,
        Some("recount") => {
            // {"kind": "recount", "user_id": 42}; occurred_at is allowed beside it.
            if object.keys().any(|k| !["kind", "user_id", "occurred_at"].contains(&k.as_str())) {
                return One::Bad;
            }
            let Some(user) = id(object.get("user_id")) else { return One::Bad };
            // The README says occurred_at is validated; a recount does not validate it today.
            // Either behaviour is accepted here (see docs/fuzzing.md).
            return match time(object.get("occurred_at")) {
                Some(_) => One::Recount(user),
                None => One::Either,
            };
        }
        _ => return One::Bad, // missing, not a string, or another kind
    };
    let known = ["kind", "notification_id", "user_id", "unread", "created", "occurred_at"];
    if object.keys().any(|k| !known.contains(&k.as_str())) {
        return One::Bad; // unknown fields are rejected, so a misspelt `unread` cannot count as read
    }
    let (Some(notification_id), Some(user_id)) = (id(object.get("notification_id")), id(object.get("user_id"))) else {
        return One::Bad;
    };
    let (Some(unread), Some(created)) = (boolean(object.get("unread")), boolean(object.get("created"))) else {
        return One::Bad;
    };
    let Some(occurred_at) = time(object.get("occurred_at")) else { return One::Bad };
    let created = created.unwrap_or(false);
    let unread = match kind {
        EventKind::PostSave => match unread {
            Some(unread) => unread,
            None => return One::Bad, // required for post_save
        },
        EventKind::PostDelete if created => return One::Bad, // a deletion creates nothing
        EventKind::PostDelete => false,
    };
    One::Transition(Event { kind, notification_id, user_id, unread, created, occurred_at })
}

/// An id: a JSON integer from 0 to 2^63 - 1.
fn id(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) if n.is_u64() => n.as_u64().filter(|id| *id <= MAX_ID),
        _ => None,
    }
}

/// `Some(None)` when absent, `Some(Some(b))` for a boolean, `None` (refused) for anything else.
fn boolean(value: Option<&Value>) -> Option<Option<bool>> {
    match value {
        None => Some(None),
        Some(Value::Bool(b)) => Some(Some(*b)),
        Some(_) => None,
    }
}

/// `Some(None)` when absent or null, `Some(Some(t))` for an RFC 3339 string, `None` otherwise.
fn time(value: Option<&Value>) -> Option<Option<DateTime<Utc>>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s).ok().map(|t| Some(t.with_timezone(&Utc))),
        Some(_) => None,
    }
}

// ---- the generator: interesting JSON, mostly well-formed, from the fuzzer's bytes ----

fn generate(u: &mut Unstructured<'_>) -> Result<(Value, usize)> {
    let max_events = if u.ratio(1, 4)? { 1_000 } else { u.int_in_range(1..=8)? };
    let single = u.ratio(1, 4)?;
    let body = if single {
        Value::Object(event(u)?)
    } else {
        let n = u.int_in_range(0..=9)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(if u.ratio(1, 16)? { scalar(u)? } else { Value::Object(event(u)?) });
        }
        Value::Array(items)
    };
    Ok((body, max_events))
}

fn event(u: &mut Unstructured<'_>) -> Result<Map<String, Value>> {
    let mut object = Map::new();
    let kind = match u.int_in_range(0..=9)? {
        0..=2 => Some(Value::from("post_save")),
        3..=5 => Some(Value::from("post_delete")),
        6..=7 => Some(Value::from("recount")),
        8 => Some(near_miss(u, &["post_save", "post_delete", "recount", "Post_Save", "post-delete", ""])?),
        _ => None,
    };
    let is_recount = kind.as_ref().and_then(Value::as_str) == Some("recount");
    if let Some(kind) = kind {
        object.insert("kind".into(), kind);
    }
    // Each field: usually present and right for the kind, sometimes absent or wrong.
    if !is_recount || u.ratio(1, 8)? {
        maybe(u, &mut object, "notification_id", id_value)?;
    }
    maybe(u, &mut object, "user_id", id_value)?;
    if !is_recount || u.ratio(1, 8)? {
        maybe(u, &mut object, "unread", bool_value)?;
        if u.ratio(1, 2)? {
            maybe(u, &mut object, "created", bool_value)?;
        }
    }
    if u.ratio(1, 3)? {
        maybe(u, &mut object, "occurred_at", time_value)?;
    }
    if u.ratio(1, 12)? {
        let name = near_miss(u, &["unraed", "Unread", "user", "notificationId", "kind ", "occurred"])?;
        object.insert(name.as_str().unwrap_or("x").to_owned(), scalar(u)?);
    }
    Ok(object)
}

/// Inserts `name` with a generated value, or (one time in eight) leaves it out.
fn maybe(
    u: &mut Unstructured<'_>,
    object: &mut Map<String, Value>,
    name: &str,
    value: fn(&mut Unstructured<'_>) -> Result<Value>,
) -> Result<()> {
    if !u.ratio(1, 8)? {
        object.insert(name.to_owned(), value(u)?);
    }
    Ok(())
}

fn id_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=11)? {
        0..=3 => Value::from(u.int_in_range(0..=1_000u64)?),
        4 => Value::from(*u.choose(&[0, 1, MAX_ID - 1, MAX_ID, MAX_ID + 1, u64::MAX])?),
        5..=6 => Value::from(u.int_in_range(0..=MAX_ID)?),
        7 => Value::from(u.int_in_range(MAX_ID + 1..=u64::MAX)?),
        8 => Value::from(u.int_in_range(i64::MIN..=-1)?),
        9 => Number::from_f64(*u.choose(&[0.0, 1.0, 17.5, -0.0, 1e19, 9.223372036854776e18])?)
            .map_or(Value::Null, Value::Number),
        _ => scalar(u)?,
    })
}

fn bool_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(if u.ratio(7, 8)? { Value::Bool(u.arbitrary()?) } else { scalar(u)? })
}

fn time_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=7)? {
        0 => Value::Null,
        1 => scalar(u)?,
        2 => Value::from(u.arbitrary::<&str>()?),
        _ => {
            // An RFC 3339 timestamp from parts, most of them valid, some just outside.
            let year = u.int_in_range(0..=9999)?;
            let (month, day) = (u.int_in_range(0..=13)?, u.int_in_range(0..=32)?);
            let (hour, minute, second) = (u.int_in_range(0..=24)?, u.int_in_range(0..=60)?, u.int_in_range(0..=61)?);
            let separator = *u.choose(&['T', 't', ' '])?;
            let digits = u.int_in_range(0..=10)?;
            let fraction = if digits == 0 {
                String::new()
            } else {
                format!(".{:0digits$}", u.int_in_range(0..=999_999_999u32)? % 10u32.pow(digits.min(9) as u32))
            };
            let offset = match u.int_in_range(0..=3)? {
                0 => "Z".to_owned(),
                1 => "z".to_owned(),
                _ => format!(
                    "{}{:02}:{:02}",
                    if u.arbitrary()? { '+' } else { '-' },
                    u.int_in_range(0..=24)?,
                    u.int_in_range(0..=60)?
                ),
            };
            Value::from(format!(
                "{year:04}-{month:02}-{day:02}{separator}{hour:02}:{minute:02}:{second:02}{fraction}{offset}"
            ))
        }
    })
}

/// One of `words`, or one of them with a byte changed, or an arbitrary string.
fn near_miss(u: &mut Unstructured<'_>, words: &[&str]) -> Result<Value> {
    let word = *u.choose(words)?;
    Ok(Value::from(match u.int_in_range(0..=2)? {
        0 => word.to_owned(),
        1 => {
            let mut bytes = word.as_bytes().to_vec();
            if !bytes.is_empty() {
                let i = u.choose_index(bytes.len())?;
                bytes[i] = u.int_in_range(b' '..=b'~')?;
            }
            String::from_utf8(bytes).unwrap_or_default()
        }
        _ => u.arbitrary::<&str>()?.to_owned(),
    }))
}

/// A JSON value of another type than expected.
fn scalar(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=6)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::from(u.arbitrary::<&str>()?),
        4 => Value::from("true"),
        5 => Value::Array(vec![Value::from(1)]),
        _ => Value::Object(Map::new()),
    })
}
