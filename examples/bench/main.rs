//! The benchmark of issue #7: ingest, the per-event SQL peer, flush, reads and memory, each
//! beside the limit of this machine measured in the same run. It starts what it needs (the
//! release sidecar, a minimal axum endpoint and the SQL peer in processes of their own), uses the
//! real Redis and PostgreSQL under a prefix and schemas of its own, and removes them at the end.
//!
//! ```sh
//! scripts/bench.sh            # full run (about 8 minutes): writes docs/benchmarks.md and docs/benchmarks.png
//! scripts/bench.sh --quick    # smoke run (under a minute): writes target/bench/
//! ```
//! `scripts/bench.sh` builds the release binaries, installs matplotlib for the plot, and runs
//! `target/release/examples/bench` with the same arguments. `docs/benchmarks.md` explains
//! every row.

mod load;
mod procs;
mod report;
mod scenarios;
mod servers;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The benchmark driver, or one of its comparison servers.
#[derive(Debug, Parser)]
#[command(about = "countersink benchmarks (issue #7)")]
pub struct Cli {
    #[command(subcommand)]
    serve: Option<Serve>,
    #[command(flatten)]
    args: Args,
}

/// The settings of a run.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A smoke run: short scenarios and small tables (not for the docs).
    #[arg(long)]
    pub quick: bool,
    /// Keep-alive connections of the load generator (and tasks of the raw Redis loop).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Measured seconds per load scenario (after a warm-up of a fifth of it); default 10, quick 2.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// The markdown file whose results section is replaced; default docs/benchmarks.md,
    /// quick target/bench/benchmarks.md.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the raw results go (the plot script reads them).
    #[arg(long, default_value = "target/bench/results.json")]
    pub json: PathBuf,
    /// The command line to print in the docs.
    #[arg(long, default_value = "scripts/bench.sh")]
    pub command: String,
    /// PostgreSQL server (a schema of the bench's own is made there).
    #[arg(long, env = "COUNTERSINK_TEST_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// A Redis server to use (keys under a prefix of the bench's own). By default the bench starts
    /// a redis-server of its own, so no other user of a shared Redis takes its CPU or skews its profile.
    #[arg(long)]
    pub redis_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Serve {
    /// (internal) Serve the minimal axum endpoint.
    #[command(hide = true)]
    ServeMinimal {
        #[arg(long)]
        port: u16,
    },
    /// (internal) Serve the per-event SQL peer.
    #[command(hide = true)]
    ServeSqlPeer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        pool: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.serve {
        Some(Serve::ServeMinimal { port }) => servers::serve_minimal(port).await,
        Some(Serve::ServeSqlPeer { port, database_url, pool }) => {
            servers::serve_sql_peer(port, &database_url, pool).await
        }
        None => {
            let results = scenarios::run(&cli.args).await?;
            report::write(&cli.args, &results)
        }
    }
}
