//! The `countersink` binary: parses the command line and hands over to the library.

use std::io::{IsTerminal, Write};

use countersink::cli::{log_filter, Cli};
use countersink::config::LogFormat;

// Small, short-lived allocations on every request: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_args();
    let (filter, filter_problem) = log_filter(std::env::var("COUNTERSINK_LOG").ok().as_deref());
    // Colours only for a person at a terminal, not in journald or a log file.
    let colours = std::io::stderr().is_terminal();
    // A closed stderr (`countersink serve 2>&1 | head`) must not stop the service: by default
    // tracing-subscriber reports a failed write with `eprintln!`, which panics on that stderr.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .log_internal_errors(false);
    match cli.log_format() {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    if let Some(problem) = filter_problem {
        tracing::warn!("{problem}");
    }
    let runtime = match cli.core.runtime() {
        Ok(runtime) => runtime,
        Err(e) => return failed(&e),
    };
    // The outcome is reported before the runtime is dropped, which waits for blocking work.
    match runtime.block_on(cli.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

/// Reports a failed command on stderr.
fn failed(e: &anyhow::Error) -> std::process::ExitCode {
    // Not eprintln!: it panics when stderr is closed.
    let _ = writeln!(std::io::stderr(), "countersink: {e:#}");
    std::process::ExitCode::FAILURE
}
