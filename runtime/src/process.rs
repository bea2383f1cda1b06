//! An actor that owns one child OS process.
//!
//! [`ProcessActor`] spawns the child and turns everything that happens to it into the death
//! signals of Canopy's contract (the table in `docs/ARCHITECTURE.md`, "Death signals"),
//! delivered to its supervisor by ractor's links: a non-zero exit is
//! [`FailureReason::Exited`], death by a signal [`FailureReason::Signaled`], an exit 0 nobody
//! asked for [`FailureReason::UnexpectedExit`], silence past the heartbeat timeout a SIGKILL
//! and [`FailureReason::HeartbeatMissed`], a kill on request ([`ProcessMsg::Kill`]) a SIGKILL
//! and the reason given (e.g. [`FailureReason::Stalled`]); an exit after
//! [`ProcessMsg::Shutdown`] is a normal `ActorTerminated`.
//!
//! The failure value is a [`ProcessFailed`], which also carries the child's pid and the last
//! lines of its stderr; supervisors get it back with `err.downcast_ref::<ProcessFailed>()`.
//!
//! Exit detection is event-driven: one task owns the [`tokio::process::Child`] and awaits
//! `wait()`; it is also the only place that sends signals to the child, so a signal can never
//! reach a recycled pid. Heartbeats are fed in from outside ([`ProcessMsg::Heartbeat`]) by
//! whoever parses the child's output; a timer checks their age.
//!
//! No orphans, on any path: the child is started in its own process group with
//! `PR_SET_PDEATHSIG = SIGKILL` (so it dies if the node process dies, even by SIGKILL); if this
//! actor is stopped, its `post_stop` terminates the child (SIGTERM, grace, SIGKILL); if it is
//! killed, dropping its state closes the signal channel and the owning task SIGKILLs the child.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use ractor_cluster::RactorMessage;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A program, its arguments and extra environment variables.
#[derive(Debug, Clone)]
pub struct CommandLine {
    /// The program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
}

impl CommandLine {
    /// `program` with no arguments and no extra environment.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// How a child process is started and watched.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// What to run.
    pub command: CommandLine,
    /// Heartbeat watchdog; `None` disables it.
    pub heartbeat: Option<HeartbeatPolicy>,
    /// How many of the last stderr lines are kept for failure reports.
    pub stderr_tail_lines: usize,
    /// After SIGTERM, how long to wait before SIGKILL.
    pub term_grace: Duration,
}

impl ProcessSpec {
    /// A spec for `command` with no heartbeat, a 40-line stderr tail and a 2-second SIGTERM
    /// grace.
    pub fn new(command: CommandLine) -> Self {
        Self {
            command,
            heartbeat: None,
            stderr_tail_lines: 40,
            term_grace: Duration::from_secs(2),
        }
    }

    /// Enables the heartbeat watchdog.
    pub fn heartbeat(mut self, policy: HeartbeatPolicy) -> Self {
        self.heartbeat = Some(policy);
        self
    }
}

/// When a silent child is declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    /// A child whose last beat is older than this is SIGKILLed.
    pub timeout: Duration,
    /// Allowance for the very first beat, counted from spawn (start-up can be slow).
    pub startup_grace: Duration,
    /// How often the age of the last beat is checked.
    pub check_every: Duration,
}

impl Default for HeartbeatPolicy {
    /// Runners beat every 100 ms; one second of silence (ten missed beats) is death.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            startup_grace: Duration::from_secs(10),
            check_every: Duration::from_millis(50),
        }
    }
}

/// Why a child process is considered failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FailureReason {
    /// It exited with a non-zero code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// It was killed by a signal it did not expect (SIGKILL from outside, OOM, SIGSEGV...).
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// It exited 0 although nobody asked it to stop.
    UnexpectedExit,
    /// It stayed alive but sent no heartbeat for too long; it was SIGKILLed.
    HeartbeatMissed {
        /// Age of the last heartbeat when it was declared dead.
        last_seen: Duration,
    },
    /// Its owner saw it make no progress in a phase; it was SIGKILLed.
    Stalled {
        /// The phase it stalled in.
        phase: String,
    },
    /// Its owner killed it for another reason (e.g. a protocol violation).
    Killed {
        /// Why.
        why: String,
    },
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureReason::Exited { code } => write!(f, "exited with code {code}"),
            FailureReason::Signaled { signal } => {
                let name = Signal::try_from(*signal)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by signal {signal} ({name})")
            }
            FailureReason::UnexpectedExit => write!(f, "exited with code 0 without being asked"),
            FailureReason::HeartbeatMissed { last_seen } => {
                write!(
                    f,
                    "missed heartbeats (last seen {} ms ago)",
                    last_seen.as_millis()
                )
            }
            FailureReason::Stalled { phase } => write!(f, "stalled in phase {phase}"),
            FailureReason::Killed { why } => write!(f, "killed: {why}"),
        }
    }
}

/// The error a [`ProcessActor`] fails with; its supervisor receives it in `ActorFailed`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("child process {pid} {reason}")]
pub struct ProcessFailed {
    /// What happened.
    pub reason: FailureReason,
    /// The child's OS pid.
    pub pid: u32,
    /// The last lines the child wrote to stderr, oldest first.
    pub stderr_tail: Vec<String>,
}

/// The pipes of a freshly spawned child, handed to whoever spawned the actor.
#[derive(Debug)]
pub struct ChildIo {
    /// The child's OS pid.
    pub pid: u32,
    /// Its stdin.
    pub stdin: ChildStdin,
    /// Its stdout.
    pub stdout: ChildStdout,
}

/// Messages understood by a [`ProcessActor`].
#[derive(RactorMessage)]
pub enum ProcessMsg {
    /// The child showed a sign of life.
    Heartbeat,
    /// The owner has asked the child to exit (e.g. with a protocol message): wait `grace`
    /// for it to exit, then SIGTERM, wait [`ProcessSpec::term_grace`], then SIGKILL. However it
    /// ends, the actor then terminates normally.
    Shutdown {
        /// How long the child may take to exit on its own.
        grace: Duration,
    },
    /// SIGKILL the child now and fail with `reason` once it is gone.
    Kill {
        /// The reason reported to the supervisor.
        reason: FailureReason,
    },
    /// A snapshot of the child's state.
    Info(ractor::RpcReplyPort<ProcessInfo>),
    /// Internal: the child exited.
    #[doc(hidden)]
    Exited(ExitStatus),
    /// Internal: time to check the heartbeat's age.
    #[doc(hidden)]
    CheckHeartbeat,
    /// Internal: a shutdown escalation step is due.
    #[doc(hidden)]
    Escalate(u64, EscalationStep),
}

/// Steps of a graceful shutdown after the ask.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum EscalationStep {
    /// Send SIGTERM.
    Term,
    /// Send SIGKILL.
    Kill,
}

/// What [`ProcessMsg::Info`] answers.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// The child's OS pid.
    pub pid: u32,
    /// When the child was started.
    pub started_at: Instant,
    /// Age of the last heartbeat (`None` before the first one).
    pub last_heartbeat_age: Option<Duration>,
    /// The last stderr lines.
    pub stderr_tail: Vec<String>,
}

/// The actor that owns one child process. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessActor;

/// Start-up arguments of a [`ProcessActor`].
pub struct ProcessArgs {
    /// What to run.
    pub spec: ProcessSpec,
    /// Where to hand the child's pipes once it is running.
    pub io: oneshot::Sender<ChildIo>,
}

/// State of a running [`ProcessActor`].
pub struct ProcessState {
    spec: ProcessSpec,
    pid: u32,
    started_at: Instant,
    last_beat: Arc<Mutex<Option<Instant>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    signals: mpsc::UnboundedSender<Signal>,
    owner_task: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    /// Set when we killed the child on purpose and want that reason reported.
    kill_reason: Option<FailureReason>,
    /// Set once a shutdown was requested; the number identifies escalation timers.
    shutdown: Option<u64>,
    exited: bool,
    _registration: crate::introspect::Registration,
}

fn last_beat(shared: &Mutex<Option<Instant>>) -> Option<Instant> {
    match shared.lock() {
        Ok(beat) => *beat,
        Err(poisoned) => *poisoned.into_inner(),
    }
}

impl ProcessState {
    fn last_beat(&self) -> Option<Instant> {
        last_beat(&self.last_beat)
    }

    fn tail(&self) -> Vec<String> {
        match self.stderr_tail.lock() {
            Ok(tail) => tail.iter().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
        }
    }

    fn signal(&self, signal: Signal) {
        if !self.exited {
            // The owner task may already be gone if the child exited; that's fine.
            let _ = self.signals.send(signal);
        }
    }

    fn failed(&self, reason: FailureReason) -> ProcessFailed {
        ProcessFailed {
            reason,
            pid: self.pid,
            stderr_tail: self.tail(),
        }
    }
}

/// Spawns a [`ProcessActor`] linked to `supervisor` and returns it with the child's pipes.
pub async fn spawn_process(
    name: Option<String>,
    spec: ProcessSpec,
    supervisor: ActorCell,
) -> Result<(ActorRef<ProcessMsg>, ChildIo, JoinHandle<()>), SpawnErr> {
    let (io_tx, io_rx) = oneshot::channel();
    let (actor, handle) = Actor::spawn_linked(
        name,
        ProcessActor,
        ProcessArgs { spec, io: io_tx },
        supervisor,
    )
    .await?;
    let io = io_rx
        .await
        .map_err(|_| SpawnErr::StartupFailed("process actor dropped the child's pipes".into()))?;
    Ok((actor, io, handle))
}

/// The error when the child cannot be spawned at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {program}: {source}")]
pub struct SpawnFailed {
    /// The program that was run.
    pub program: String,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

fn build_command(spec: &ProcessSpec) -> Command {
    let mut cmd = Command::new(&spec.command.program);
    cmd.args(&spec.command.args)
        .envs(spec.command.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a Ctrl-C in the terminal reaches the node, which then
        // shuts runners down in order, instead of reaching every runner at once.
        .process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Owns the `Child`: waits for it, and is the only sender of signals to it.
async fn own_child(
    mut child: Child,
    pid: u32,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    stderr_done: JoinHandle<()>,
    actor: ActorRef<ProcessMsg>,
) {
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = signals.recv() => match signal {
                Some(signal) => {
                    tracing::debug!(pid, %signal, "signalling child");
                    if let Err(err) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal) {
                        tracing::warn!(pid, %signal, %err, "cannot signal child");
                    }
                }
                None => {
                    // The actor is gone without a clean stop: never leave the child behind.
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return;
                }
            },
        }
    };
    // Let the stderr reader drain what the child wrote before dying (the pipe closes at
    // exit, so this is immediate unless a grandchild holds it open).
    let _ = tokio::time::timeout(Duration::from_millis(50), stderr_done).await;
    match status {
        Ok(status) => {
            let _ = actor.send_message(ProcessMsg::Exited(status));
        }
        Err(err) => {
            tracing::error!(pid, %err, "waiting for child failed");
            // Treat as a kill by an unknown signal so the owner still gets a failure.
            use std::os::unix::process::ExitStatusExt;
            let _ = actor.send_message(ProcessMsg::Exited(ExitStatus::from_raw(
                Signal::SIGKILL as i32,
            )));
        }
    }
}

async fn read_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    keep: usize,
    pid: u32,
) {
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                tracing::debug!(target: "canopy::child_stderr", pid, "{line}");
                let mut tail = match tail.lock() {
                    Ok(tail) => tail,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if tail.len() == keep {
                    tail.pop_front();
                }
                if keep > 0 {
                    tail.push_back(line);
                }
            }
            Ok(None) => break,
            Err(err) => {
                // Non-UTF-8 output or a read error: keep reading is not possible with
                // `lines()`, so note it and stop collecting.
                tracing::debug!(pid, %err, "stopped reading child stderr");
                break;
            }
        }
    }
}

impl Actor for ProcessActor {
    type Msg = ProcessMsg;
    type State = ProcessState;
    type Arguments = ProcessArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ProcessMsg>,
        args: ProcessArgs,
    ) -> Result<ProcessState, ActorProcessingErr> {
        let ProcessArgs { spec, io } = args;
        let mut child = build_command(&spec).spawn().map_err(|source| SpawnFailed {
            program: spec.command.program.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("child was spawned without piped stdio".into());
        };
        tracing::info!(pid, program = %spec.command.program.display(), "child process started");

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(spec.stderr_tail_lines)));
        let stderr_done = tokio::spawn(read_stderr(
            stderr,
            tail.clone(),
            spec.stderr_tail_lines,
            pid,
        ));
        let (sig_tx, sig_rx) = mpsc::unbounded_channel();
        let owner_task = tokio::spawn(own_child(child, pid, sig_rx, stderr_done, myself.clone()));
        let watchdog = spec
            .heartbeat
            .map(|hb| myself.send_interval(hb.check_every, || ProcessMsg::CheckHeartbeat));

        if io.send(ChildIo { pid, stdin, stdout }).is_err() {
            tracing::warn!(pid, "nobody took the child's pipes");
        }
        let started_at = Instant::now();
        let beat = Arc::new(Mutex::new(None));
        let registration = crate::introspect::register(&myself.get_cell(), "process");
        {
            let beat = beat.clone();
            let program = spec.command.program.display().to_string();
            registration.set_details(Arc::new(move || {
                serde_json::json!({
                    "pid": pid,
                    "program": program,
                    "last_heartbeat_age_ms": last_beat(&beat).map(|b| b.elapsed().as_millis() as u64),
                })
            }));
        }
        Ok(ProcessState {
            spec,
            pid,
            started_at,
            last_beat: beat,
            stderr_tail: tail,
            signals: sig_tx,
            owner_task: Some(owner_task),
            watchdog,
            kill_reason: None,
            shutdown: None,
            exited: false,
            _registration: registration,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ProcessMsg>,
        msg: ProcessMsg,
        state: &mut ProcessState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProcessMsg::Heartbeat => {
                if let Ok(mut beat) = state.last_beat.lock() {
                    *beat = Some(Instant::now());
                }
            }
            ProcessMsg::CheckHeartbeat => {
                let (Some(policy), None, None) =
                    (state.spec.heartbeat, &state.kill_reason, state.shutdown)
                else {
                    return Ok(());
                };
                let (age, allowed) = match state.last_beat() {
                    Some(beat) => (beat.elapsed(), policy.timeout),
                    None => (state.started_at.elapsed(), policy.startup_grace),
                };
                if age > allowed && !state.exited {
                    tracing::warn!(
                        pid = state.pid,
                        age_ms = age.as_millis() as u64,
                        "child missed its heartbeats; killing it"
                    );
                    state.kill_reason = Some(FailureReason::HeartbeatMissed { last_seen: age });
                    state.signal(Signal::SIGKILL);
                    // SIGKILL also works on a SIGSTOPped process.
                }
            }
            ProcessMsg::Kill { reason } => {
                if state.kill_reason.is_none() && !state.exited {
                    tracing::warn!(pid = state.pid, %reason, "killing child");
                    state.kill_reason = Some(reason);
                    state.signal(Signal::SIGKILL);
                }
            }
            ProcessMsg::Shutdown { grace } => {
                if state.shutdown.is_none() && !state.exited {
                    let id = rand::random::<u64>();
                    state.shutdown = Some(id);
                    myself.send_after(grace, move || {
                        ProcessMsg::Escalate(id, EscalationStep::Term)
                    });
                }
            }
            ProcessMsg::Escalate(id, step) => {
                if state.shutdown == Some(id) && !state.exited {
                    match step {
                        EscalationStep::Term => {
                            tracing::info!(
                                pid = state.pid,
                                "child did not exit when asked; SIGTERM"
                            );
                            state.signal(Signal::SIGTERM);
                            let grace = state.spec.term_grace;
                            myself.send_after(grace, move || {
                                ProcessMsg::Escalate(id, EscalationStep::Kill)
                            });
                        }
                        EscalationStep::Kill => {
                            tracing::warn!(pid = state.pid, "child ignored SIGTERM; SIGKILL");
                            state.signal(Signal::SIGKILL);
                        }
                    }
                }
            }
            ProcessMsg::Info(reply) => {
                let _ = reply.send(ProcessInfo {
                    pid: state.pid,
                    started_at: state.started_at,
                    last_heartbeat_age: state.last_beat().map(|b| b.elapsed()),
                    stderr_tail: state.tail(),
                });
            }
            ProcessMsg::Exited(status) => {
                state.exited = true;
                if let Some(w) = state.watchdog.take() {
                    w.abort();
                }
                return self.on_exit(myself, status, state);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ProcessMsg>,
        state: &mut ProcessState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(w) = state.watchdog.take() {
            w.abort();
        }
        if state.exited {
            return Ok(());
        }
        // Stopped by our supervisor while the child runs: terminate it, in order.
        state.signal(Signal::SIGTERM);
        if let Some(mut owner) = state.owner_task.take()
            && tokio::time::timeout(state.spec.term_grace, &mut owner)
                .await
                .is_err()
        {
            state.signal(Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), owner).await;
        }
        Ok(())
    }
}

impl ProcessActor {
    fn on_exit(
        &self,
        myself: ActorRef<ProcessMsg>,
        status: ExitStatus,
        state: &mut ProcessState,
    ) -> Result<(), ActorProcessingErr> {
        use std::os::unix::process::ExitStatusExt;
        let pid = state.pid;
        if let Some(reason) = state.kill_reason.take() {
            tracing::warn!(pid, %reason, "child process failed");
            return Err(Box::new(state.failed(reason)));
        }
        if state.shutdown.is_some() {
            // Asked to stop: a clean exit, or our own SIGTERM/SIGKILL escalation, is normal.
            let ours =
                matches!(status.signal(), Some(s) if s == libc::SIGTERM || s == libc::SIGKILL);
            if status.success() || ours {
                tracing::info!(pid, %status, "child process shut down");
                myself.stop(Some("shutdown".to_string()));
                return Ok(());
            }
        }
        let reason = match (status.code(), status.signal()) {
            (Some(0), _) => FailureReason::UnexpectedExit,
            (Some(code), _) => FailureReason::Exited { code },
            (None, Some(signal)) => FailureReason::Signaled { signal },
            (None, None) => FailureReason::Exited { code: -1 },
        };
        tracing::warn!(pid, %reason, "child process failed");
        Err(Box::new(state.failed(reason)))
    }
}
