//! Named points where a test stops the work as a crash would: the one failpoint mechanism.
//!
//! A point is reached with [`reach_or_stop`], in two ways a test chooses:
//! - **in process**: the caller passes the point it wants as `stop` (`Flusher::flush_stopping_after`);
//!   the work returns [`Stopped`] there, leaving Redis and the database as a process that died
//!   there would (the flush tests and the model);
//! - **the real binary**, as follows.
//!
//! Built only with the `failpoints` feature, which the test suite turns on (a dev-dependency of
//! the crate on itself); a normal build compiles [`reach`] to nothing. With the feature, a process
//! started with `COUNTERSINK_CRASH_POINT=<name>` announces on stderr that it reached `<name>`
//! and then blocks the thread that reached it for good (the rest of the process runs on), so the
//! test can SIGKILL it with that step half done (`tests/crash.rs`). With
//! `COUNTERSINK_CRASH_RESUME_FILE=<path>` too, the thread goes on once that file exists: the test
//! SIGSTOPs the process meanwhile, to stall it there (the lease tests). Cargo turns the feature on for
//! every build that includes tests or examples (`--all-targets`); `cargo build --bin` and
//! `cargo install` leave it off, and without `COUNTERSINK_CRASH_POINT` it does nothing.

/// The work stopped at a point because an in-process test asked it to, as if the process had
/// died there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped at {0} on request, as a crash there would")]
pub struct Stopped(pub &'static str);

/// Reaches `point`: answers [`Stopped`] when it is the point an in-process test asked for
/// (`stop`), and otherwise [`reach`]es it.
pub fn reach_or_stop(point: &'static str, stop: Option<&'static str>) -> Result<(), Stopped> {
    if stop == Some(point) {
        return Err(Stopped(point));
    }
    reach(point);
    Ok(())
}

/// Stops the process at `point` for the crash tests; does nothing in a normal build.
pub fn reach(point: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("COUNTERSINK_CRASH_POINT").is_ok_and(|wanted| wanted == point) {
        eprintln!("{REACHED} {point}");
        // Stop this thread, whatever else runs: the test's SIGKILL (or its resume file) is the
        // only way out.
        let resume = std::env::var_os("COUNTERSINK_CRASH_RESUME_FILE").map(std::path::PathBuf::from);
        while !resume.as_ref().is_some_and(|file| file.exists()) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = point;
}

/// The line a process prints on stderr when it reaches its crash point.
pub const REACHED: &str = "countersink: reached crash point";

/// Every crash point, in the order a flush and a reconcile reach them.
pub const ALL: &[&str] = &[
    FLUSH_AFTER_HANDOFF,
    FLUSH_MID_WRITE,
    FLUSH_AFTER_COMMIT,
    RECONCILE_AFTER_FENCE,
    RECONCILE_AFTER_RECOUNT,
    RECONCILE_AFTER_TRUTH_CHUNK,
    RECONCILE_AFTER_REPAIR,
];

/// The pending set became a batch; nothing is written yet.
pub const FLUSH_AFTER_HANDOFF: &str = "flush-after-handoff";
/// Inside the transaction, after the first chunk of rows was written.
pub const FLUSH_MID_WRITE: &str = "flush-mid-write";
/// The transaction committed; the batch is still in Redis.
pub const FLUSH_AFTER_COMMIT: &str = "flush-after-commit";
/// A reconcile fenced its users; nothing was read yet.
pub const RECONCILE_AFTER_FENCE: &str = "reconcile-after-fence";
/// A reconcile read the Notification table; Redis is not repaired yet.
pub const RECONCILE_AFTER_RECOUNT: &str = "reconcile-after-recount";
/// A reconcile wrote the first chunk of the table's truth into Redis; the fence is still up.
pub const RECONCILE_AFTER_TRUTH_CHUNK: &str = "reconcile-after-truth-chunk";
/// A reconcile repaired Redis; its flush has not run.
pub const RECONCILE_AFTER_REPAIR: &str = "reconcile-after-repair";
