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
    let outcome = cli.runtime().and_then(|runtime| runtime.block_on(cli.run()));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "countersink: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
