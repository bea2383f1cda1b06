//! `canopy-actors`: Canopy's domain actors, joining the generic runtime to the engine.
//!
//! - [`node`]: a node's supervision tree (worker, API, user actors), its router and handle.
//! - [`runner`]: the `RunnerSupervisor`, which owns one runner process (`canopy runner`),
//!   submits tasks to it, tracks them, and turns the runner's death into typed errors for every
//!   waiter, a `RunnerFailed` event, and a restart under its policy (or an escalation).
//! - [`api`]: the `ApiActor`, the node's HTTP server: OpenAI-compatible chat completions
//!   (JSON and SSE), models, health, readiness, Prometheus metrics and introspection, talking
//!   to the rest of the node through the `Backend` trait.
//! - [`cluster`]: the cluster layer: reports, the replicated plan, the master's placement
//!   and re-placement, and routing requests to instances on other nodes.
//! - [`events`]: the node's event stream: runner events, restarts, membership, elections
//!   and placements of every node of the cluster, in one bounded, resumable log.
//! - [`placement`]: what a placement request, its answer and its errors are, shared by the
//!   API, the node and the cluster layer.

pub mod api;
pub mod cluster;
pub mod events;
pub mod node;
pub mod placement;
pub mod runner;
