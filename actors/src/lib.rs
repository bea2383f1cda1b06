//! `canopy-actors`: Canopy's domain actors, joining the generic runtime to the engine.
//!
//! - [`runner`]: the `RunnerSupervisor`, which owns one runner process (`canopy runner`),
//!   submits tasks to it, tracks them, and turns the runner's death into typed errors for every
//!   waiter, a `RunnerFailed` event, and a restart under its policy (or an escalation).

pub mod runner;
