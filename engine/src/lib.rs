//! `canopy-engine`: Canopy's inference engines, behind one trait.
//!
//! A runner process (`canopy runner`) hosts exactly one [`Engine`]. The runner owns the
//! protocol, threads and supervision concerns; the engine only loads a model and turns a
//! [`GenerateRequest`](canopy_proto::GenerateRequest) into a stream of
//! [`TokenChunk`](canopy_proto::TokenChunk)s through a [`GenerateSink`]. This crate knows
//! nothing about actors, pipes or processes (apart from the deliberate process-level faults of
//! the test engine).
//!
//! Engines on offer are named by [`EngineKind`]:
//!
//! - [`ScriptedEngine`] (`scripted`): a deterministic **test** engine without a model, whose
//!   behaviour (token count, delays, errors, crashes, hangs) is scripted by the prompt. It exists
//!   for supervision and chaos tests.
//! - the candle GGUF engine arrives later and becomes the default.
//!
//! [`FaultHooks`] is the small handle a host shares with its engine so that the test engine can
//! reach host-level faults (freezing the heartbeat) without depending on the host.

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod hooks;
pub mod kind;
pub mod scripted;

pub use engine::{Engine, GenerateOutcome, GenerateSink};
pub use error::EngineError;
pub use hooks::FaultHooks;
pub use kind::EngineKind;
pub use scripted::ScriptedEngine;
