//! The integration tests: one binary, one module per area, against the real Redis, PostgreSQL,
//! MySQL/MariaDB and SQLite (docs/testing.md). `cargo test --test integration flush::` runs one
//! module. The helpers every test binary shares are the `support` crate (tests/support).
//!
//! Apart, each in a binary of its own: `model` (the model-based property test, 2,100 cases:
//! minutes), `crash` (the real binary SIGKILLed at every crash point, round after round), `soak`
//! (30 s of load per test by default), `memory` (Redis bytes per notification, the figures the
//! docs quote; run with `--release`) and `heavy_user` (times Redis scripts, so nothing may run
//! beside it). Their length is set by an environment variable each (`COUNTERSINK_MODEL_CASES`,
//! `COUNTERSINK_CRASH_ROUNDS`, `COUNTERSINK_SOAK_SECS`, `COUNTERSINK_TEST_HEAVY_NOTIFICATIONS`).
// A test that cannot set up or read what it checks fails: it panics.
#![allow(clippy::unwrap_used)]

mod auth;
mod bootstrap;
mod cli;
mod cluster;
mod end_to_end;
mod first_run;
mod flush;
mod hostile;
mod http_api;
mod http_threads;
mod live;
mod openapi;
mod ops;
mod outages;
mod reads;
mod reconcile;
mod restarts;
mod sentinel;
mod transitions;
