//! The `canopy` binary.
//!
//! Only the hidden `canopy runner` subcommand exists so far: the child process that a
//! `RunnerSupervisor` spawns to host one inference engine (see [`runner`]). The user-facing
//! subcommands (`up`, `node`, `inspect`, `chat`, `model`) join the [`Command`] enum as they
//! are built.
//!
//! Logs go to **stderr** through `tracing`, filtered by `CANOPY_LOG` (default `info`, any
//! `tracing-subscriber` env-filter directive works). Stdout is reserved for protocol frames in
//! runner mode; nothing else writes to it.

mod runner;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The environment variable holding the log filter.
const LOG_ENV: &str = "CANOPY_LOG";

/// Canopy: an actor-model cluster runtime for distributed LLM inference.
#[derive(Debug, Parser)]
#[command(name = "canopy", version)]
struct Cli {
    /// What to run.
    #[command(subcommand)]
    command: Command,
}

/// The `canopy` subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Hosts one inference engine for a supervisor, speaking frames on stdin/stdout (internal:
    /// spawned by `canopy node`, not run by hand).
    #[command(hide = true)]
    Runner(runner::RunnerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Runner(args) => {
            let exit = runner::run(args)?;
            // Exit explicitly: a wedged worker thread (an injected fault) must not keep us alive.
            std::process::exit(exit.code());
        }
    }
}

/// Sends `tracing` output to stderr, filtered by `CANOPY_LOG` (default `info`).
fn init_logging() {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .with_env_var(LOG_ENV)
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
