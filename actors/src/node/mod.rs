//! A Canopy node: the root of one `canopy node` / `canopy up` process.
//!
//! ```text
//! node      (Supervisor, kind "node", one_for_one)
//! ├── worker (Supervisor, kind "worker", one_for_one)
//! │   └── runner:<instance>  (RunnerSupervisor) -> process (ProcessActor) -> `canopy runner`
//! ├── api    (ApiActor: the OpenAI-compatible HTTP API)
//! └── ...    user actors added with NodeBuilder::child
//! ```
//!
//! [`Node::builder`] assembles the tree; [`NodeHandle`] is what the binary (or a test, or an
//! embedding program) holds: the API address, the router, placement, and an ordered shutdown
//! (children stop in reverse start order: user actors, then the API, then the worker, whose
//! runners are asked to exit and are killed only if they do not).
//!
//! Decisions where docs/ARCHITECTURE.md is silent: runner supervisors are *transient* children of the
//! worker, so one that gives up (its runner died too often, or its model cannot load) is
//! restarted afresh by the worker, within the worker's own intensity (3 restarts in 5
//! minutes); past that the worker fails, the node restarts it, and a node that keeps failing
//! stops: the failure has climbed to the top, and `canopy up` exits with it.

mod builder;
mod config;
mod describe;
mod router;

pub use builder::{Node, NodeBuilder, NodeError, NodeHandle, Placer};
pub use config::{NodeConfig, Placement, RunnerDefaults};
pub use router::{LocalInstance, ModelRouter, Remote, runner_actor_name};
