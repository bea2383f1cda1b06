//! How a runner is started, watched and restarted.

use std::path::PathBuf;
use std::time::Duration;

use canopy_proto::LoadSpec;
use canopy_runtime::process::{CommandLine, HeartbeatPolicy};
use canopy_runtime::restart::{Backoff, Intensity};

/// Constructors of the command line that starts a runner process (`canopy runner`).
#[derive(Debug, Clone, Copy)]
pub struct RunnerCommand;

impl RunnerCommand {
    /// `program runner` with no extra flags (`program` is the `canopy` executable).
    pub fn canopy(program: impl Into<PathBuf>) -> CommandLine {
        CommandLine::new(program).args(["runner"])
    }

    /// `canopy runner` using the executable of the current process.
    pub fn current_exe() -> std::io::Result<CommandLine> {
        Ok(Self::canopy(std::env::current_exe()?))
    }
}

/// How long a runner may go without progress in each phase before it is killed as stalled.
///
/// These catch a runner whose heartbeat thread is alive but whose work loop is wedged; the
/// heartbeat catches the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallTimeouts {
    /// From spawn to the runner's handshake, and from a task's submission to its ack.
    pub handshake: Duration,
    /// Between two loading progress reports (one per layer).
    pub loading: Duration,
    /// From a task's start to its first token.
    pub prefill: Duration,
    /// Between two tokens.
    pub decode: Duration,
    /// How often the timers are checked.
    pub check_every: Duration,
}

impl Default for StallTimeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(30),
            loading: Duration::from_secs(300),
            prefill: Duration::from_secs(300),
            decode: Duration::from_secs(60),
            check_every: Duration::from_millis(100),
        }
    }
}

/// When a dead runner is restarted (default: more than 3 restarts in 60 s gives up; delays
/// start at 100 ms and double up to 10 s).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RestartPolicy {
    /// More restarts than this within the window: the supervisor gives up and fails.
    pub intensity: Intensity,
    /// Delay before each restart.
    pub backoff: Backoff,
}

/// Tasks a runner may hold waiting for a place in its batch, beyond the `parallel` it runs,
/// when no explicit limit ([`RunnerConfig::max_tasks`]) is set.
pub const DEFAULT_QUEUE: usize = 16;

/// Everything a [`super::RunnerSupervisor`] needs to run one instance.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The instance's name (shows in logs, events and introspection).
    pub instance: String,
    /// How to start the runner.
    pub command: CommandLine,
    /// What the runner loads.
    pub load: LoadSpec,
    /// The heartbeat watchdog.
    pub heartbeat: HeartbeatPolicy,
    /// Per-phase stall timeouts.
    pub stall: StallTimeouts,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// How long a runner may take to exit after being asked, before SIGTERM.
    pub shutdown_grace: Duration,
    /// Most tasks queued or running at once; more are refused with `QueueFull`. `None`: the
    /// runner's `parallel` (as it reports it in its batch, else `load.parallel`, else 1)
    /// plus [`DEFAULT_QUEUE`] tasks waiting for a place in the batch.
    pub max_tasks: Option<usize>,
    /// Lines of the runner's stderr kept for failure reports.
    pub stderr_tail_lines: usize,
}

impl RunnerConfig {
    /// The task limit given the runner's `parallel` (its batch report's, or `None` before
    /// it sent one): the explicit [`max_tasks`](Self::max_tasks), else `parallel` plus
    /// [`DEFAULT_QUEUE`].
    pub fn task_limit(&self, reported_parallel: Option<u32>) -> usize {
        self.max_tasks.unwrap_or_else(|| {
            let parallel = reported_parallel
                .filter(|p| *p > 0)
                .or(self.load.parallel)
                .unwrap_or(1);
            (parallel as usize).saturating_add(DEFAULT_QUEUE)
        })
    }

    /// A config with default timeouts and policy.
    pub fn new(instance: impl Into<String>, command: CommandLine, load: LoadSpec) -> Self {
        Self {
            instance: instance.into(),
            command,
            load,
            heartbeat: HeartbeatPolicy::default(),
            stall: StallTimeouts::default(),
            restart: RestartPolicy::default(),
            shutdown_grace: Duration::from_secs(5),
            max_tasks: None,
            stderr_tail_lines: 40,
        }
    }
}
