//! [`RunnerArgs`]: the command line (and environment) of `canopy runner`.

use std::time::Duration;

use canopy_engine::EngineKind;

use super::fault::FaultSpec;

/// Arguments of the hidden `canopy runner` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct RunnerArgs {
    /// The inference engine to host: `candle` (llama-family GGUF on the CPU), `candle-cuda`
    /// in `cuda` builds, `mlx` in `mlx` builds (Apple MLX; macOS on Apple Silicon), or
    /// `scripted`, the deterministic test engine.
    #[arg(long, value_name = "ENGINE", default_value = "candle")]
    pub engine: EngineKind,

    /// Milliseconds between heartbeat frames.
    #[arg(
        long,
        value_name = "MS",
        env = "CANOPY_RUNNER_HEARTBEAT_MS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub heartbeat_ms: u64,

    /// Arms fault injection for chaos tests, e.g. `crash-after-tokens=3,once=/tmp/marker`
    /// (off unless given).
    #[arg(long, value_name = "SPEC", env = "CANOPY_RUNNER_FAULT")]
    pub fault: Option<FaultSpec>,
}

impl RunnerArgs {
    /// The heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}
