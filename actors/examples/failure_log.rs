//! Extending Canopy with your own actor: a failure log.
//!
//! [`FailureLog`] is an ordinary `ractor` actor that the node supervises like its own
//! children. It follows the node's event log through the [`NodeContext`] the node gives it
//! and appends every `runner_failed` event (a runner that crashed, froze, stalled or exited
//! unasked) to a JSON-lines file, one event a line, as `GET /v1/events` serves it:
//!
//! ```json
//! {"failed_tasks":1,"failure":true,"id":9,"incarnation":4102,"instance":"scripted-0",
//!  "kind":"runner_failed","message":"runner of scripted-0 (pid 4124) killed by signal 9
//!  (SIGKILL); 1 task failed; restarting it","node":"local","path":"worker/scripted-0",
//!  "pid":4124,"reason":"killed by signal 9 (SIGKILL)","seq":9,"stderr_tail":["..."],
//!  "time_ms":1795755231000,"will_restart":true}
//! ```
//!
//! It registers with introspection (kind `failure-log`, details: the file and the last event
//! id it acknowledged), so `canopy inspect` shows it in the tree, and it is `Permanent`: if
//! it fails (say, the disk is full) the node restarts it. It loses no failure across its own
//! restarts: the context keeps, outside the actor, the id of the last event it acknowledged,
//! and every incarnation resumes after it, so a runner that dies while the logger is down or
//! restarting is logged by the next incarnation. It acknowledges an event once its line is
//! written: at least once, so an incarnation that dies between the write and the
//! acknowledgement leaves that one line twice in the file (an `id` repeated), never none.
//!
//! Run it (the runners it starts are `canopy runner` processes, so build `canopy` first):
//!
//! ```sh
//! cargo build -p canopy
//! # a quick try with the scripted test engine; every request kills its runner after 2 tokens
//! CANOPY_RUNNER_FAULT=crash-after-tokens=2 \
//!   cargo run -p canopy-actors --example failure_log -- --engine scripted --log /tmp/failures.jsonl
//! # the real default model
//! cargo run -p canopy-actors --example failure_log -- \
//!   ~/.cache/canopy/models/SmolLM2-135M-Instruct.Q4_1.gguf --port 52416
//! ```
//!
//! Options: `MODEL` (a GGUF file) or `--engine scripted`; `--port N` (default 52415);
//! `--log PATH` (or `$CANOPY_FAILURE_LOG`, default `failures.jsonl`); `--canopy PATH` (or
//! `$CANOPY_BIN`; default: the `canopy` binary next to this example's build directory, else
//! `canopy` on `PATH`). Ctrl-C stops the node in order.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use canopy_actors::api::ApiConfig;
use canopy_actors::events::{EventBody, Followed};
use canopy_actors::node::{Following, Node, NodeConfig, NodeContext, Placement, RunnerDefaults};
use canopy_actors::runner::RunnerCommand;
use canopy_proto::LoadSpec;
use canopy_runtime::introspect::Registration;
use canopy_runtime::process::CommandLine;
use canopy_runtime::supervisor::{ChildSpec, Restart};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;

/// The kind the actor registers under (what `canopy inspect` shows).
pub const KIND: &str = "failure-log";
/// The child id of the actor under the node.
pub const CHILD_ID: &str = "failure-log";

/// Appends the node's runner failures to a JSON-lines file.
pub struct FailureLog;

impl FailureLog {
    /// The child spec for `NodeBuilder::child`: a log at `path`, following the node's events
    /// through `node` (every incarnation gets a clone); permanent, restarted whatever the
    /// reason it stopped.
    pub fn spec(path: impl Into<PathBuf>, node: NodeContext) -> ChildSpec {
        ChildSpec::actor(CHILD_ID, || FailureLog, (path.into(), node))
            .with_restart(Restart::Permanent)
    }
}

/// One incarnation's state: the open file, and its subscription and registration.
pub struct FailureLogState {
    file: File,
    path: String,
    node: NodeContext,
    _following: Following,
    _registration: Registration,
}

impl Actor for FailureLog {
    type Msg = Followed;
    type State = FailureLogState;
    type Arguments = (PathBuf, NodeContext);

    async fn pre_start(
        &self,
        myself: ActorRef<Followed>,
        (log, node): (PathBuf, NodeContext),
    ) -> Result<FailureLogState, ActorProcessingErr> {
        let path = log.display().to_string();
        let file = File::options().create(true).append(true).open(&log);
        let file = file.map_err(|err| format!("cannot open the failure log {path}: {err}"))?;
        let registration = node.register(&myself, KIND);
        let (shown, acked) = (path.clone(), node.clone());
        registration.set_details(Arc::new(
            move || json!({ "path": shown, "events_acked": acked.acked() }),
        ));
        Ok(FailureLogState {
            file,
            path,
            _following: node.follow(&myself, Some),
            node,
            _registration: registration,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Followed>,
        item: Followed,
        state: &mut FailureLogState,
    ) -> Result<(), ActorProcessingErr> {
        let record = match &item {
            Followed::Event(e) if matches!(e.body, EventBody::RunnerFailed { .. }) => e.to_json(),
            Followed::Event(_) => serde_json::Value::Null,
            Followed::Missed(n) => json!({ "missed_events": n }),
        };
        if !record.is_null() {
            // One write a line, so that a reader never sees half of one. An error fails the
            // actor; the node restarts it, and the next incarnation writes this event again.
            let written = state.file.write_all(format!("{record}\n").as_bytes());
            written
                .map_err(|err| format!("cannot append to the failure log {}: {err}", state.path))?;
        }
        if let Followed::Event(event) = &item {
            state.node.ack(event.id);
        }
        Ok(())
    }
}

/// The command line of the example.
struct Options {
    /// A GGUF path, or the scripted engine's model.
    model: String,
    scripted: bool,
    port: u16,
    log: PathBuf,
    canopy: PathBuf,
}

const USAGE: &str = "usage: failure_log (MODEL.gguf | --engine scripted) [--port N] \
                     [--log PATH] [--canopy PATH]";

fn parse_options() -> Result<Options, String> {
    let mut model = None;
    let mut scripted = false;
    let mut port = 52415;
    let mut log = std::env::var_os("CANOPY_FAILURE_LOG").map(PathBuf::from);
    let mut canopy = std::env::var_os("CANOPY_BIN").map(PathBuf::from);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--engine" => match value("--engine")?.as_str() {
                "scripted" => scripted = true,
                "candle" => scripted = false,
                other => return Err(format!("unknown engine {other:?}")),
            },
            "--port" => {
                port = value("--port")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?;
            }
            "--log" => log = Some(value("--log")?.into()),
            "--canopy" => canopy = Some(value("--canopy")?.into()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            path => model = Some(path.to_string()),
        }
    }
    let model = match (model, scripted) {
        (Some(path), false) => path,
        (None, true) => "scripted".to_string(),
        (Some(_), true) => return Err("give a MODEL or --engine scripted, not both".into()),
        (None, false) => return Err(USAGE.to_string()),
    };
    Ok(Options {
        model,
        scripted,
        port,
        log: log.unwrap_or_else(|| PathBuf::from("failures.jsonl")),
        canopy: canopy.unwrap_or_else(default_canopy),
    })
}

/// `target/<profile>/canopy` when this runs from `target/<profile>/examples/`, else `canopy`
/// on `PATH`.
fn default_canopy() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("canopy")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("canopy"))
}

/// The node of the example: one instance of the model, the API on loopback, and the failure
/// log as a user actor.
pub fn node_config(command: CommandLine, model: &str, load: &str, port: u16) -> NodeConfig {
    NodeConfig {
        api: ApiConfig {
            addr: ([127, 0, 0, 1], port).into(),
            ..ApiConfig::default()
        },
        runners: RunnerDefaults::new(command),
        placements: vec![Placement {
            model: model.to_string(),
            load: LoadSpec {
                model: load.to_string(),
                layer_start: None,
                layer_end: None,
                threads: None,
                parallel: None,
            },
            instances: 1,
        }],
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let mut command = RunnerCommand::canopy(&options.canopy);
    let id = if options.scripted {
        command = command.args(["--engine", "scripted"]);
        "scripted".to_string()
    } else {
        Path::new(&options.model).file_stem().map_or_else(
            || options.model.clone(),
            |s| s.to_string_lossy().into_owned(),
        )
    };
    let config = node_config(command, &id, &options.model, options.port);
    let builder = Node::builder(config);
    let failure_log = FailureLog::spec(&options.log, builder.context());
    let node = builder.child(failure_log).start().await;
    let mut node = match node {
        Ok(node) => node,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    match node.api_addr().await {
        Ok(addr) => println!("serving {id} at http://{addr}/v1"),
        Err(err) => eprintln!("{err}"),
    }
    println!(
        "runner failures are appended to {}; Ctrl-C stops",
        options.log.display()
    );
    tokio::select! {
        outcome = node.wait() => {
            if let Err(reason) = outcome {
                eprintln!("the node failed: {reason}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        _ = tokio::signal::ctrl_c() => {
            println!("shutting down...");
            match node.shutdown(Duration::from_secs(60)).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
