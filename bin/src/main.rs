//! The `canopy` binary.
//!
//! Subcommands: `up` (a node serving the default model), `node` (a node), `inspect` (the
//! live actor tree of a node), `chat` (a terminal client), `model` (the model store), `cluster
//! certs` (TLS certificates for the cluster), and the
//! hidden `runner`: the child process that a `RunnerSupervisor` spawns to host one inference
//! engine (see [`runner`]).
//!
//! Logs go to **stderr** through `tracing`, filtered by `CANOPY_LOG` (any
//! `tracing-subscriber` env-filter directive works); without it, `up` and `node` print only
//! warnings and their event lines (`-v` for INFO, `-vv` DEBUG), the other commands INFO.
//! `--log-format json` writes one JSON object per line. Stdout is reserved for protocol frames in
//! runner mode; nothing else writes to it.

mod certs;
mod chat;
mod client;
mod events;
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
    /// More logs: -v for every INFO line, -vv for DEBUG (CANOPY_LOG, if set, wins).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// How logs are written to stderr: `text`, or `json` (one object per line, for log
    /// shippers).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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
    /// Prints the event stream of a running node (every node's, on a cluster member):
    /// restarts, runner deaths, membership, elections, placements.
    Events(events::EventsArgs),
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
    // A node's terminal shows warnings and its own event lines (failures, restarts,
    // membership) unless asked for more; the other commands log at INFO as before.
    let quiet = matches!(cli.command, Command::Up(_) | Command::Node(_)) && cli.verbose == 0;
    init_logging(cli.verbose, quiet, cli.log_format);
    let json = cli.log_format == LogFormat::Json;
    match cli.command {
        Command::Runner(args) => {
            let exit = runner::run(args)?;
            // Exit explicitly: a wedged worker thread (an injected fault) must not keep us alive.
            std::process::exit(exit.code());
        }
        Command::Model(args) => model::run(args),
        Command::Cluster(args) => certs::run(args),
        Command::Up(args) => serve::run(args, Some(canopy_store::DEFAULT_MODEL), json),
        Command::Node(args) => serve::run(args, None, json),
        Command::Inspect(args) => inspect::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Events(args) => events::run(args),
    }
}

/// What a quiet node logs: warnings and errors, but not those of the supervisors, whose
/// restarts, deaths and give-ups the node prints as event lines instead (one line each).
const QUIET_FILTER: &str = "warn,canopy_runtime::supervisor=off,canopy_runtime::process=error,canopy_actors::runner::supervisor=off";

/// Sends `tracing` output to stderr, filtered by `CANOPY_LOG` if set, else by the verbosity
/// (quiet: [`QUIET_FILTER`]; `-v` INFO; `-vv` DEBUG; `-vvv` TRACE), as text or JSON lines.
fn init_logging(verbose: u8, quiet: bool, format: LogFormat) {
    let level = match verbose {
        0 | 1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let builder = EnvFilter::builder()
        .with_default_directive(level.into())
        .with_env_var(LOG_ENV);
    let filter = match std::env::var(LOG_ENV) {
        Ok(value) if !value.is_empty() => builder.from_env_lossy(),
        _ if quiet => builder.parse_lossy(QUIET_FILTER),
        _ => builder.parse_lossy(""),
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
