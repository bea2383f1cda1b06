//! A Canopy node: the root of one `canopy node` / `canopy up` process.
//!
//! ```text
//! node      (Supervisor, kind "node", one_for_one)
//! ├── worker (Supervisor, kind "worker", one_for_one)
//! │   └── runner:<instance>  (RunnerSupervisor) -> process (ProcessActor) -> `canopy runner`
//! ├── api    (ApiActor: the OpenAI-compatible HTTP API)
//! └── ...    user actors added with NodeBuilder::child (given a NodeContext)
//! ```
//!
//! [`Node::builder`] assembles the tree; [`NodeHandle`] is what the binary (or a test, or an
//! embedding program) holds: the API address, the router, placement, and an ordered shutdown
//! (children stop in reverse start order: user actors, then the API, then the worker, whose
//! runners are asked to exit and are killed only if they do not). A user actor gets a
//! [`NodeContext`] from [`NodeBuilder::context`]: the node's placer, router, metrics and
//! event log, its introspection registration, and an event subscription that resumes, in
//! each incarnation, after the last event the actor acknowledged.
//!
//! Decisions where docs/ARCHITECTURE.md is silent: runner supervisors are *transient*
//! children of the worker, each with its own restart budget ([`INSTANCE_INTENSITY`], 3 restarts
//! in 5 minutes). One that gives up (its runner died too often, or its model cannot load) is
//! started afresh by the worker within that budget; past it the instance alone is given up:
//! it stays in the router as Failed with the reason, `/state` and `canopy inspect` show it,
//! and in a cluster the agent stops it and reports the error so that the planner places it on
//! another node. A failing instance never spends the worker's own budget, so it cannot take
//! the node's other instances down with it.

mod builder;
mod config;
mod context;
mod describe;
mod router;

pub use builder::{INSTANCE_INTENSITY, Node, NodeBuilder, NodeError, NodeHandle, Placer};
pub use config::{NodeConfig, Placement, RunnerDefaults};
pub use context::{Following, NodeContext};
pub use router::{LocalInstance, ModelRouter, Remote, runner_actor_name};
