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
//! - [`CandleEngine`] (`candle`, the default): llama-family GGUF models run with candle,
//!   through Canopy's own layer-shardable llama forward ([`llama`]).
//! - `MlxEngine` (`mlx`, with the `mlx` feature): the same GGUF models run with Apple's MLX
//!   (mlx-rs) on an Apple Silicon Mac's GPU. Only macOS on Apple Silicon builds the real
//!   engine; on other targets the feature builds a stand-in whose `load` says so (see the
//!   `mlx` module).
//!
//! [`FaultHooks`] is the small handle a host shares with its engine so that the test engine can
//! reach host-level faults (freezing the heartbeat) without depending on the host.

#![warn(missing_docs)]

pub mod batch;
pub mod candle_engine;
pub mod chat;
pub mod engine;
pub mod error;
mod generation;
pub mod gguf;
mod grammar;
pub mod hooks;
pub mod kind;
pub mod llama;
#[cfg(feature = "mlx")]
pub mod mlx;
pub mod sampling;
pub mod scripted;
mod stop;
pub mod tokenizer;
pub mod tools;

pub use batch::{Admission, BatchEngine, BatchReport, BatchSink, Finished, SeqId};
pub use candle_engine::CandleEngine;
pub use engine::{Engine, GenerateOutcome, GenerateSink};
pub use error::EngineError;
pub use hooks::FaultHooks;
pub use kind::EngineKind;
pub use scripted::ScriptedEngine;
