//! Extending Canopy with your own actor: a failure log.
//!
//! [`FailureLog`] is an ordinary `ractor` actor that a node supervises like its own children.
//! It is added with `Node::builder(config).child(spec)`, follows the node's runner events, and
//! appends every `RunnerFailed` (a runner that crashed, froze, stalled or exited unasked) to a
//! JSON-lines file, one object a line:
//!
//! ```json
//! {"failed_tasks":1,"instance":"smollm2-135m-instruct-0","pid":4124,
//!  "reason":{"kind":"signaled","message":"killed by signal 9 (SIGKILL)","signal":9},
//!  "stderr_tail":["..."],"time_unix_ms":1795755231000,"will_restart":true}
//! ```
//!
//! It registers itself with `canopy_runtime::introspect` (kind `failure-log`, details: the
//! file, whether it is subscribed yet, the failures seen, the last one), so `canopy inspect`
//! shows it in the tree, and its restart type is `Permanent`: if it fails (say, the disk is
//! full) the node restarts it, and it reopens the file and subscribes again.
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
//!
//! How the actor gets the events: `NodeBuilder::runner_events()` hands out the node's
//! runner-event channel before the node starts; the spec holds a [`RunnerEventFeed`] made from
//! it, and every incarnation of the actor subscribes through it (failures that happen while
//! the actor is being restarted are not seen). A feed can also be connected later to a running
//! node ([`RunnerEventFeed::connect`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy_actors::api::ApiConfig;
use canopy_actors::node::{Node, NodeConfig, NodeHandle, Placement, RunnerDefaults};
use canopy_actors::runner::{RunnerCommand, RunnerEvent};
use canopy_proto::LoadSpec;
use canopy_runtime::introspect::{self, Registration};
use canopy_runtime::process::{CommandLine, FailureReason};
use canopy_runtime::supervisor::{ChildSpec, Restart};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// The kind the actor registers under (what `canopy inspect` shows).
pub const KIND: &str = "failure-log";

/// The child id of the actor under the node.
pub const CHILD_ID: &str = "failure-log";

/// Where every incarnation of a [`FailureLog`] subscribes to runner events. Cheap to clone.
#[derive(Clone)]
pub struct RunnerEventFeed {
    source: Arc<watch::Sender<Option<Arc<broadcast::Receiver<RunnerEvent>>>>>,
}

impl Default for RunnerEventFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl RunnerEventFeed {
    /// A feed that is not connected yet: subscribers wait for [`RunnerEventFeed::connect`].
    pub fn new() -> Self {
        let (source, _) = watch::channel(None);
        Self {
            source: Arc::new(source),
        }
    }

    /// A feed already connected to a node's runner-event channel
    /// (`NodeBuilder::runner_events()`).
    pub fn from_sender(events: &broadcast::Sender<RunnerEvent>) -> Self {
        let feed = Self::new();
        feed.source.send_replace(Some(Arc::new(events.subscribe())));
        feed
    }

    /// Connects the feed to a running node's runner events.
    pub fn connect(&self, node: &NodeHandle) {
        self.source
            .send_replace(Some(Arc::new(node.runner_events())));
    }

    /// A receiver of the events from now on, once the feed is connected.
    async fn subscribe(&self) -> Option<broadcast::Receiver<RunnerEvent>> {
        let mut source = self.source.subscribe();
        let connected = source.wait_for(Option::is_some).await.ok()?;
        connected.as_ref().map(|events| events.resubscribe())
    }
}

/// What a [`FailureLog`] is started with; cloned into every restart.
#[derive(Clone)]
pub struct FailureLogArgs {
    /// The JSON-lines file failures are appended to (created if missing).
    pub path: PathBuf,
    /// Where the runner events come from.
    pub feed: RunnerEventFeed,
    /// Failures logged since the node started, across restarts of the actor.
    pub seen: Arc<AtomicU64>,
}

impl FailureLogArgs {
    /// Args for a log at `path` fed by `feed`.
    pub fn new(path: impl Into<PathBuf>, feed: RunnerEventFeed) -> Self {
        Self {
            path: path.into(),
            feed,
            seen: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The child spec to give `NodeBuilder::child`: a permanent child, restarted whatever
    /// the reason it stopped.
    pub fn child_spec(self) -> ChildSpec {
        ChildSpec::actor(CHILD_ID, || FailureLog, self).with_restart(Restart::Permanent)
    }
}

/// The actor's messages.
#[derive(RactorMessage)]
pub enum FailureLogMsg {
    /// A runner died: append it to the file.
    Failed(RunnerEvent),
    /// The subscription fell behind and `n` events were dropped: say so in the file.
    Missed(u64),
}

/// Appends runner failures to a JSON-lines file.
pub struct FailureLog;

/// Aborts the event forwarder when the actor's state is dropped, however the actor ends.
struct Forwarder(JoinHandle<()>);

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The state of one incarnation.
pub struct FailureLogState {
    file: std::fs::File,
    path: PathBuf,
    seen: Arc<AtomicU64>,
    last: Arc<Mutex<Option<String>>>,
    _forwarder: Forwarder,
    _registration: Registration,
}

impl Actor for FailureLog {
    type Msg = FailureLogMsg;
    type State = FailureLogState;
    type Arguments = FailureLogArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FailureLogMsg>,
        args: FailureLogArgs,
    ) -> Result<FailureLogState, ActorProcessingErr> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.path)
            .map_err(|err| format!("cannot open the failure log {}: {err}", args.path.display()))?;

        let registration = introspect::register(&myself.get_cell(), KIND);
        let last = Arc::new(Mutex::new(None::<String>));
        let subscribed = Arc::new(AtomicBool::new(false));
        {
            let path = args.path.display().to_string();
            let seen = args.seen.clone();
            let last = last.clone();
            let subscribed = subscribed.clone();
            registration.set_details(Arc::new(move || {
                json!({
                    "path": path,
                    "subscribed": subscribed.load(Ordering::Relaxed),
                    "failures_seen": seen.load(Ordering::Relaxed),
                    "last_failure": last.lock().ok().and_then(|l| l.clone()),
                })
            }));
        }

        // Events are forwarded to the mailbox by a task of this incarnation; the file is only
        // ever written by the actor itself, one message at a time.
        let feed = args.feed.clone();
        let forwarder = tokio::spawn(async move {
            let Some(mut events) = feed.subscribe().await else {
                return;
            };
            subscribed.store(true, Ordering::Relaxed);
            loop {
                let message = match events.recv().await {
                    Ok(event @ RunnerEvent::RunnerFailed { .. }) => FailureLogMsg::Failed(event),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => FailureLogMsg::Missed(n),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if myself.cast(message).is_err() {
                    return;
                }
            }
        });

        Ok(FailureLogState {
            file,
            path: args.path,
            seen: args.seen,
            last,
            _forwarder: Forwarder(forwarder),
            _registration: registration,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<FailureLogMsg>,
        message: FailureLogMsg,
        state: &mut FailureLogState,
    ) -> Result<(), ActorProcessingErr> {
        let record = match &message {
            FailureLogMsg::Failed(event) => match failure_record(event) {
                Some(record) => record,
                None => return Ok(()),
            },
            FailureLogMsg::Missed(n) => json!({
                "time_unix_ms": now_ms(),
                "missed_events": n,
            }),
        };
        let mut line = record.to_string();
        line.push('\n');
        // One write per line, so concurrent readers never see half a record. An error fails
        // the actor; the node restarts it and it reopens the file.
        state.file.write_all(line.as_bytes()).map_err(|err| {
            format!(
                "cannot append to the failure log {}: {err}",
                state.path.display()
            )
        })?;
        if let FailureLogMsg::Failed(RunnerEvent::RunnerFailed {
            instance, reason, ..
        }) = &message
        {
            state.seen.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = state.last.lock() {
                *last = Some(format!("{instance}: {reason}"));
            }
            tracing::info!(%instance, %reason, path = %state.path.display(), "runner failure logged");
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The JSON record of a `RunnerFailed` event (`None` for other events).
pub fn failure_record(event: &RunnerEvent) -> Option<Value> {
    let RunnerEvent::RunnerFailed {
        instance,
        reason,
        pid,
        stderr_tail,
        failed_tasks,
        will_restart,
    } = event
    else {
        return None;
    };
    Some(json!({
        "time_unix_ms": now_ms(),
        "instance": instance,
        "pid": pid,
        "reason": reason_json(reason),
        "failed_tasks": failed_tasks,
        "will_restart": will_restart,
        "stderr_tail": stderr_tail,
    }))
}

/// A failure reason as JSON: a machine-readable `kind`, its fields, and the human message.
fn reason_json(reason: &FailureReason) -> Value {
    let mut value = match reason {
        FailureReason::Exited { code } => json!({ "kind": "exited", "code": code }),
        FailureReason::Signaled { signal } => json!({ "kind": "signaled", "signal": signal }),
        FailureReason::UnexpectedExit => json!({ "kind": "unexpected_exit" }),
        FailureReason::HeartbeatMissed { last_seen } => json!({
            "kind": "heartbeat_missed",
            "last_seen_ms": last_seen.as_millis() as u64,
        }),
        FailureReason::Stalled { phase } => json!({ "kind": "stalled", "phase": phase }),
        FailureReason::Killed { why } => json!({ "kind": "killed", "why": why }),
    };
    value["message"] = Value::String(reason.to_string());
    value
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
    let feed = RunnerEventFeed::from_sender(&builder.runner_events());
    let node = builder
        .child(FailureLogArgs::new(&options.log, feed).child_spec())
        .start()
        .await;
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
