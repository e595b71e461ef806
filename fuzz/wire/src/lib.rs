//! The modules of countersink that decode and authenticate what senders send, compiled without
//! the rest of the crate so the fuzz targets build in seconds, not with the database clients.
//! They are the main crate's own files, not copies; `use countersink::events::…` in the targets
//! names this crate (fuzz/Cargo.toml renames it).

#[path = "../../../src/events.rs"]
pub mod events;
#[path = "../../../src/webhook.rs"]
pub mod webhook;
