//! The `canopy` binary.
//!
//! Subcommands: `up` (a node serving the default model), `node` (a node), `inspect` (the
//! live actor tree of a node), `chat` (a terminal client), `model` (the model store), `cluster
//! certs` (TLS certificates for the cluster), and the
//! hidden `runner`: the child process that a `RunnerSupervisor` spawns to host one inference
//! engine (see [`runner`]).
//!
//! Logs go to **stderr** through `tracing`, filtered by `CANOPY_LOG` (default `info`, any
//! `tracing-subscriber` env-filter directive works). Stdout is reserved for protocol frames in
//! runner mode; nothing else writes to it.

mod certs;
mod chat;
mod client;
mod inspect;
mod local_cluster;
mod model;
mod runner;
mod security;
mod serve;

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
    /// Starts a node serving the default model (downloaded on first use) on
    /// http://127.0.0.1:52415: the OpenAI-compatible API. Ctrl-C stops it.
    Up(serve::ServeArgs),
    /// Starts a node without placing a model unless --model is given.
    Node(serve::ServeArgs),
    /// Prints the live actor tree of a running node.
    Inspect(inspect::InspectArgs),
    /// Chats with a running node in the terminal.
    Chat(chat::ChatArgs),
    /// Hosts one inference engine for a supervisor, speaking frames on stdin/stdout (internal:
    /// spawned by `canopy node`, not run by hand).
    #[command(hide = true)]
    Runner(runner::RunnerArgs),
    /// Downloads, lists, locates and removes models (`pull`, `list`, `path`, `verify`, `rm`).
    Model(model::ModelArgs),
    /// Cluster tools: `certs` makes a CA and node certificates for mutual TLS.
    Cluster(certs::ClusterArgs),
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
        Command::Model(args) => model::run(args),
        Command::Cluster(args) => certs::run(args),
        Command::Up(args) => serve::run(args, Some(canopy_store::DEFAULT_MODEL)),
        Command::Node(args) => serve::run(args, None),
        Command::Inspect(args) => inspect::run(args),
        Command::Chat(args) => chat::run(args),
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
