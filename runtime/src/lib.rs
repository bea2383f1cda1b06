//! `canopy-runtime`: generic, model-agnostic actor machinery.
//!
//! - [`supervisor`]: an OTP-style supervisor (strategies, restart types, intensity,
//!   backoff, ordered shutdown) on top of ractor's links.
//! - [`process`]: an actor that owns one child OS process and turns everything that happens
//!   to it into the death signals of Canopy's contract.
//! - [`introspect`]: what every live actor says about itself, joined with ractor's real
//!   supervision links into the tree `canopy inspect` shows.
//! - [`restart`]: restart intensity windows and backoff, shared by every supervisor.

pub mod cluster;
pub mod introspect;
pub mod process;
pub mod restart;
pub mod supervisor;
