//! The [`Engine`] trait: what a runner process hosts.
//!
//! An engine is driven from one worker thread of the runner, one call at a time: `load`,
//! then `warm_up`, then any number of `generate`s (and possibly another `load` to replace the
//! model). Calls block; an engine reports what it is doing through callbacks so that the
//! runner can forward progress to its supervisor as it happens:
//!
//! - loading reports `(done_layers, total_layers)` through a progress closure;
//! - generating reports phase changes and output chunks through a [`GenerateSink`], and polls
//!   the sink for cancellation between tokens;
//! - an engine that batches ([`Engine::batching`]) runs many generations at once, each
//!   reported through a [`BatchSink`](crate::BatchSink) under its own id.
//!
//! Engines never write to stdout (it carries protocol frames) and never panic on bad input;
//! they return an [`EngineError`] instead.

use std::ops::ControlFlow;

use canopy_proto::{FinishReason, GenerateRequest, LoadSpec, Phase, TokenChunk, Usage};

use crate::{BatchEngine, EngineError};

/// An inference engine: loads one model and generates from it.
///
/// `Send` so that a runner can move it onto its worker thread; it is never shared between
/// threads.
pub trait Engine: Send {
    /// Loads the model; calls `progress(done_layers, total_layers)` as it goes.
    ///
    /// Loading again replaces the previous model. On error the engine is left without a
    /// usable model.
    fn load(
        &mut self,
        spec: &LoadSpec,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<(), EngineError>;

    /// Runs once after load (e.g. a 1-token generation); default no-op.
    fn warm_up(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Generates; reports phases and chunks through the sink; stops early
    /// ([`FinishReason::Cancelled`]) when [`GenerateSink::chunk`] returns
    /// [`ControlFlow::Break`] or [`GenerateSink::cancelled`] is true between tokens.
    ///
    /// Returns [`EngineError::NotLoaded`] when no model is loaded.
    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn GenerateSink,
    ) -> Result<GenerateOutcome, EngineError>;

    /// The engine's batch, when it runs many sequences at once (continuous batching; see
    /// [`crate::batch`]); `None` (the default) when it generates one request at a time, and
    /// then the runner calls [`Engine::generate`] for one task after another.
    ///
    /// While a batch has sequences, the runner drives it only through the batch (never
    /// `generate`).
    fn batching(&mut self) -> Option<&mut dyn BatchEngine> {
        None
    }
}

/// Where an engine reports a running generation.
///
/// Implemented by the runner (which turns the calls into protocol frames) and by tests.
pub trait GenerateSink {
    /// The generation entered `phase` (prefill before the first token, decode after it).
    fn phase(&mut self, phase: Phase);

    /// A piece of output; returning [`ControlFlow::Break`] asks the engine to stop and finish
    /// with [`FinishReason::Cancelled`].
    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()>;

    /// Whether the task was cancelled; engines poll this between tokens (and during long
    /// waits).
    fn cancelled(&self) -> bool;
}

/// How a generation ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerateOutcome {
    /// Why the generation ended.
    pub finish_reason: FinishReason,
    /// Prompt and completion token counts.
    pub usage: Usage,
}
