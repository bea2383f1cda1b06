//! Supervision of one runner process: the `RunnerSupervisor` actor and its vocabulary.
//!
//! A runner is a child process (`canopy runner`) hosting one model instance or shard; it
//! speaks the protocol of `canopy_proto::runner` on its stdin/stdout. The
//! [`RunnerSupervisor`] owns exactly one such process at a time (through a
//! `canopy_runtime::process::ProcessActor` linked to it) and:
//!
//! - opens the protocol (handshake), asks the runner to load its model and mirrors the
//!   runner's status: `Idle -> Loading -> Loaded -> Ready <-> Running -> ShuttingDown ->
//!   Shutdown`, or `Failed`;
//! - submits tasks and answers the submitter once the runner has acknowledged the task,
//!   with a [`TaskHandle`] whose stream yields the task's chunks and exactly one final item;
//! - watches liveness twice: heartbeats (sent by the runner on a thread of their own and fed
//!   straight to the process actor's watchdog, bypassing this actor's mailbox) catch a frozen
//!   process, and per-phase stall timeouts (handshake, loading, prefill, per-token decode)
//!   catch a runner whose heartbeat is alive but whose work is wedged;
//! - when the runner dies, fails every waiter at once with [`RunnerError::RunnerFailed`],
//!   broadcasts [`RunnerEvent::RunnerFailed`] with the reason and the runner's stderr tail,
//!   and restarts it after a backoff delay, unless restarts exceeded the intensity limit: then
//!   it fails itself with [`RunnerSupervisorError::GaveUp`], so the failure climbs the tree.
//!
//! Decisions where docs/ARCHITECTURE.md is silent: a runner that reports `LoadFailed` is not restarted
//! (a missing or corrupt model does not heal by retrying); the supervisor fails with
//! [`RunnerSupervisorError::LoadFailed`]. A runner that sends a malformed frame or a bad
//! handshake is killed and counts as a failure. Tasks are refused with
//! [`RunnerError::NotReady`] while no runner is Ready, rather than parked: whoever routes
//! requests can then pick another instance or answer 503.

mod config;
mod io;
mod messages;
mod supervisor;
mod tasks;

pub use config::{DEFAULT_QUEUE, RestartPolicy, RunnerCommand, RunnerConfig, StallTimeouts};
pub use messages::{
    RunnerError, RunnerEvent, RunnerMsg, RunnerSnapshot, RunnerSupervisorError, TaskEvent,
    TaskHandle,
};
pub use supervisor::{RunnerObserver, RunnerSupervisor, RunnerSupervisorArgs};
