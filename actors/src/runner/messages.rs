//! The messages, handles, events and errors of a `RunnerSupervisor`.

use std::time::Duration;

use canopy_proto::{
    BatchStats, FinishReason, FromRunner, GenerateRequest, RunnerStatus, TaskErrorKind, TaskId,
    TokenChunk, Usage,
};
use canopy_runtime::process::FailureReason;
use ractor::RpcReplyPort;
use ractor_cluster::RactorMessage;
use tokio::sync::mpsc;

/// Why a task could not be run or did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum RunnerError {
    /// No runner is Ready to take tasks (starting, loading, restarting, or shutting down).
    #[error("runner {instance} is not ready (status {status})")]
    NotReady {
        /// The instance.
        instance: String,
        /// Its status.
        status: RunnerStatus,
    },
    /// The runner already holds as many tasks as it may.
    #[error("runner {instance} is at capacity ({max} tasks)")]
    QueueFull {
        /// The instance.
        instance: String,
        /// The limit.
        max: usize,
    },
    /// The runner process died while the task was pending or running.
    #[error("runner {instance} failed: {reason}")]
    RunnerFailed {
        /// The instance.
        instance: String,
        /// How it died.
        reason: FailureReason,
        /// The last lines of its stderr.
        stderr_tail: Vec<String>,
        /// Whether the task had produced any output before the death.
        started: bool,
    },
    /// The runner reported an error for this task (the runner itself is fine).
    #[error("task failed in runner {instance}: {message}")]
    TaskFailed {
        /// The instance.
        instance: String,
        /// The runner's message.
        message: String,
        /// Whose fault it was: the client's ([`TaskErrorKind::InvalidRequest`],
        /// [`TaskErrorKind::ContextLengthExceeded`]: HTTP 400) or the engine's (500).
        #[serde(default)]
        kind: TaskErrorKind,
    },
    /// The supervisor is shutting down.
    #[error("runner {instance} is shutting down")]
    ShuttingDown {
        /// The instance.
        instance: String,
    },
    /// The supervisor itself is gone (its mailbox is closed).
    #[error("runner supervisor is gone")]
    SupervisorGone,
    /// The task ran on another node, and that node left the cluster (died, froze, or was cut
    /// off) before the task ended.
    #[error("node {node} serving the task left the cluster")]
    PeerLost {
        /// The node.
        node: String,
        /// Whether the task had produced any output before.
        started: bool,
    },
    /// The task ran on another node, which is still a member, but its stream broke: nothing
    /// came from that node about the task for longer than the stream's deadline, or that node
    /// could not send the task's output (and cancelled the task).
    #[error("the stream of the task on node {node} broke: {reason}")]
    StreamLost {
        /// The node.
        node: String,
        /// What happened.
        reason: String,
    },
}

/// One item of a task's stream. The stream ends after `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TaskEvent {
    /// A piece of output.
    Chunk(TokenChunk),
    /// The task finished.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The task failed.
    Failed(RunnerError),
}

/// A submitted, acknowledged task.
#[derive(Debug)]
pub struct TaskHandle {
    /// The task's id (use it to cancel).
    pub task_id: TaskId,
    /// Its events. Dropping the receiver cancels the task in the runner.
    pub events: mpsc::UnboundedReceiver<TaskEvent>,
}

impl TaskHandle {
    /// The next event, or `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<TaskEvent> {
        self.events.recv().await
    }
}

/// Events a `RunnerSupervisor` broadcasts about its runner.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerEvent {
    /// The runner's status changed.
    StatusChanged {
        /// The instance.
        instance: String,
        /// The new status.
        status: RunnerStatus,
    },
    /// A runner process started (first start or restart).
    Started {
        /// The instance.
        instance: String,
        /// The runner's pid.
        pid: u32,
        /// Restarts so far.
        restarts: u32,
    },
    /// The runner could not load its model (its supervisor fails next).
    LoadFailed {
        /// The instance.
        instance: String,
        /// The runner's message.
        error: String,
    },
    /// The runner process died.
    RunnerFailed {
        /// The instance.
        instance: String,
        /// How it died.
        reason: FailureReason,
        /// The pid that died.
        pid: u32,
        /// The last lines of its stderr.
        stderr_tail: Vec<String>,
        /// Tasks failed by this death.
        failed_tasks: usize,
        /// Whether a restart follows (false: the supervisor gives up).
        will_restart: bool,
    },
    /// The runner reported its batch (sent for every `Batch` frame, so at most a few times
    /// a second): sequences running and queued, KV memory, prefix cache. The counters in
    /// `stats` count from the runner process's start; a new process starts them at 0 again.
    BatchChanged {
        /// The instance.
        instance: String,
        /// The runner's report.
        stats: BatchStats,
    },
}

/// A point-in-time view of a runner, for introspection.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerSnapshot {
    /// The instance.
    pub instance: String,
    /// Its status.
    pub status: RunnerStatus,
    /// The runner's pid, while one runs.
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u32,
    /// Tasks submitted and not yet acknowledged.
    pub awaiting_ack: usize,
    /// Tasks acknowledged and not yet started.
    pub pending: usize,
    /// Tasks running.
    pub in_flight: usize,
    /// The task running now, if any.
    pub current_task: Option<TaskId>,
    /// Age of the runner's last heartbeat.
    pub last_heartbeat_age: Option<Duration>,
    /// How long the current runner process has been up.
    pub uptime: Option<Duration>,
    /// The current runner process's last report of its batch (`None` until it sends one,
    /// and again from the moment it dies).
    pub batch: Option<BatchStats>,
    /// Most tasks it takes (queued or running) before refusing with
    /// [`RunnerError::QueueFull`].
    pub max_tasks: usize,
}

/// Why a `RunnerSupervisor` failed (its parent receives this in `ActorFailed`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunnerSupervisorError {
    /// The runner died more often than the restart intensity allows.
    #[error("runner {instance} gave up after {restarts} restarts; last failure: {last}")]
    GaveUp {
        /// The instance.
        instance: String,
        /// Restarts in the window.
        restarts: u32,
        /// The last failure.
        last: FailureReason,
    },
    /// The runner could not load its model.
    #[error("runner {instance} could not load its model: {error}")]
    LoadFailed {
        /// The instance.
        instance: String,
        /// The runner's message.
        error: String,
    },
}

/// Messages of a `RunnerSupervisor`.
#[derive(RactorMessage)]
pub enum RunnerMsg {
    /// Submit a task; answered once the runner has acknowledged it.
    Submit {
        /// The request.
        request: GenerateRequest,
        /// Receives the task handle or why it was refused.
        reply: RpcReplyPort<Result<TaskHandle, RunnerError>>,
    },
    /// Cancel a task (no-op if it already ended).
    Cancel {
        /// The task.
        task_id: TaskId,
    },
    /// A snapshot of the runner's state.
    Snapshot(RpcReplyPort<RunnerSnapshot>),
    /// Internal: a frame from the runner of the given generation.
    #[doc(hidden)]
    FromRunner(u64, FromRunner),
    /// Internal: the runner of the given generation broke the protocol.
    #[doc(hidden)]
    ProtocolError(u64, String),
    /// Internal: time to start the runner of the given generation.
    #[doc(hidden)]
    Restart(u64),
    /// Internal: check the stall timers.
    #[doc(hidden)]
    CheckStalls,
    /// Internal: the reader of the given generation's output stopped (its stdout closed, or a
    /// bad frame); every frame it delivered came before this.
    #[doc(hidden)]
    OutputClosed(u64),
    /// Internal: the runner of the given generation died and its output did not close within
    /// the drain grace; fail its tasks now.
    #[doc(hidden)]
    DrainOver(u64),
}
