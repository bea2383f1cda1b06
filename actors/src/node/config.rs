//! What a node is started with: its API settings, how runners are started and watched, and
//! the model instances to place at start.

use canopy_proto::LoadSpec;
use canopy_runtime::process::HeartbeatPolicy;

use crate::api::ApiConfig;
use canopy_runtime::process::CommandLine;

use crate::runner::{RestartPolicy, RunnerConfig, StallTimeouts};

/// Settings shared by every runner this node starts.
#[derive(Debug, Clone)]
pub struct RunnerDefaults {
    /// How to start a runner process.
    pub command: CommandLine,
    /// The heartbeat watchdog.
    pub heartbeat: HeartbeatPolicy,
    /// Per-phase stall timeouts.
    pub stall: StallTimeouts,
    /// Runner restart policy.
    pub restart: RestartPolicy,
    /// Most tasks queued or running per runner; beyond it requests get 429. `None`: each
    /// runner's `parallel` plus [`DEFAULT_QUEUE`](crate::runner::DEFAULT_QUEUE) (see
    /// [`RunnerConfig::max_tasks`]).
    pub max_tasks: Option<usize>,
}

impl RunnerDefaults {
    /// Defaults for runners started with `command`.
    pub fn new(command: CommandLine) -> Self {
        Self {
            command,
            heartbeat: HeartbeatPolicy::default(),
            stall: StallTimeouts::default(),
            restart: RestartPolicy::default(),
            max_tasks: None,
        }
    }

    /// The full config of one instance.
    pub fn instance(&self, instance: &str, load: LoadSpec) -> RunnerConfig {
        let mut config = RunnerConfig::new(instance, self.command.clone(), load);
        config.heartbeat = self.heartbeat;
        config.stall = self.stall;
        config.restart = self.restart;
        config.max_tasks = self.max_tasks;
        config
    }
}

/// Instances of one model to place.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The model id clients use in requests.
    pub model: String,
    /// What the runner loads.
    pub load: LoadSpec,
    /// How many instances.
    pub instances: usize,
}

/// Everything a node is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The HTTP API.
    pub api: ApiConfig,
    /// How runners are started and watched.
    pub runners: RunnerDefaults,
    /// Instances placed at start.
    pub placements: Vec<Placement>,
}
