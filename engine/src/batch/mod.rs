//! Continuous batching: many generations through one model at once.
//!
//! A runner that hosts a batching engine does not run one task at a time: it hands each task
//! to the engine as a *sequence* ([`BatchEngine::join`]) and calls [`BatchEngine::step`] in a
//! loop. Each step is one batched forward over every active sequence: one row per decoding
//! sequence (its last token) plus chunks of the prompts still being prefilled, up to a row
//! budget per step (chunked prefill, so that a long prompt never stalls the decoding sequences
//! for its whole length). Sequences join at any step and leave when they finish or are
//! cancelled ([`BatchEngine::leave`]), so a new request gets its first token after at most a
//! few steps however long the others run.
//!
//! **Batch invariance.** A sequence's tokens do not depend on what it was batched with, where
//! in the batch it sat, when it joined, or how its prompt was chunked: every row of the forward
//! is computed by the same arithmetic in the same order whatever the other rows are (exact
//! integer dot products in the quantized matmuls, one thread per output, and an attention that
//! reads only the row's own sequence; see [`crate::llama::row_attention`]), and every sequence
//! is decoded by its own [`Decoder`](crate::generation::Decoder). The engine's single-request
//! [`Engine::generate`](crate::Engine::generate) runs through the same batch, so a request
//! served alone and one served beside fifteen others give the same bits.
//!
//! **Memory.** Each sequence has its own KV cache. The batch holds at most `parallel`
//! sequences, and reserves for each the positions it may reach (prompt plus its token
//! budget); the reservations never exceed the KV capacity fixed at load, so a sequence never
//! runs out of cache mid-generation: a request that does not fit now waits
//! ([`Admission::Wait`]) until others finish.
//!
//! **Prefix cache.** A finished sequence's cache is kept (with the tokens it holds) while
//! memory allows; a new request whose prompt starts with the same tokens (a shared system
//! prompt, a chat that continues) takes that cache and prefills only the rest. Kept caches
//! are evicted least recently used first whenever a reservation needs their memory. See
//! [`pool`].

mod batcher;
pub mod pool;

use std::ops::ControlFlow;

use canopy_proto::{GenerateRequest, Phase, TokenChunk};

use crate::{EngineError, GenerateOutcome};

pub(crate) use batcher::{BatchModel, Batcher, DEFAULT_STEP_ROWS};

/// Identifies a sequence in a batch (the runner uses its task ids).
pub type SeqId = u64;

/// Where a batching engine reports its sequences' progress.
pub trait BatchSink {
    /// Sequence `id` entered `phase`.
    fn phase(&mut self, id: SeqId, phase: Phase);

    /// A piece of sequence `id`'s output; [`ControlFlow::Break`] ends it as cancelled.
    fn chunk(&mut self, id: SeqId, chunk: TokenChunk) -> ControlFlow<()>;

    /// Whether sequence `id` was cancelled; polled before every step.
    fn cancelled(&self, id: SeqId) -> bool;
}

/// What [`BatchEngine::join`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The sequence is in the batch; it runs from the next step.
    Joined,
    /// The batch is full (`parallel` sequences, or not enough KV memory for this request's
    /// positions right now); try again after a sequence leaves.
    Wait,
}

/// A sequence that left the batch at a step.
#[derive(Debug)]
pub struct Finished {
    /// The sequence.
    pub id: SeqId,
    /// How it ended, or why it failed.
    pub result: Result<GenerateOutcome, EngineError>,
}

/// What a batch holds, for the runner's reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Most sequences in the batch at once.
    pub parallel: usize,
    /// Sequences in the batch.
    pub running: usize,
    /// Rows of the last step's forward.
    pub last_step_rows: usize,
    /// Bytes of KV cache held, by running sequences and by the prefix cache.
    pub kv_bytes: u64,
    /// Bytes of KV cache the batch may hold at most.
    pub kv_capacity_bytes: u64,
    /// Requests that reused cached prompt positions.
    pub prefix_hits: u64,
    /// Prompt positions reused instead of prefilled.
    pub prefix_reused_tokens: u64,
    /// Prompt positions prefilled.
    pub prefilled_tokens: u64,
}

/// An engine that runs many sequences at once; see the module docs.
pub trait BatchEngine {
    /// Most sequences in the batch at once.
    fn parallel(&self) -> usize;

    /// Adds request `id` to the batch. Fails (the task's error, nothing else is affected) when
    /// the request is unusable: a prompt longer than the context, bad parameters.
    fn join(&mut self, id: SeqId, request: &GenerateRequest) -> Result<Admission, EngineError>;

    /// Runs one batched forward over the active sequences and returns those that ended.
    /// Cancelled sequences (per [`BatchSink::cancelled`]) end first, without running.
    fn step(&mut self, sink: &mut dyn BatchSink) -> Vec<Finished>;

    /// Takes sequence `id` out of the batch (cancelled); `None` if it is not in it.
    fn leave(&mut self, id: SeqId) -> Option<GenerateOutcome>;

    /// Sequences in the batch.
    fn active(&self) -> usize;

    /// What the batch holds now.
    fn report(&self) -> BatchReport;
}

/// Most sequences a batch holds when the load spec does not say.
pub const MAX_DEFAULT_PARALLEL: usize = 16;

/// Share of the memory available at load time that a batch's KV caches may take.
const KV_MEMORY_SHARE: f64 = 0.5;

/// How a batch is sized: sequences at once and the KV budget in positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchSize {
    pub(crate) parallel: usize,
    pub(crate) capacity_positions: usize,
}

/// Sizes a batch for sequences of up to `context` positions of `bytes_per_position` each,
/// with `available` bytes of memory free (`None`: unknown) and `cores` CPU cores.
///
/// The default `parallel` is four sequences a core, between 4 and [`MAX_DEFAULT_PARALLEL`],
/// and no more than [`KV_MEMORY_SHARE`] of the free memory holds at full context. The KV
/// budget is `parallel` full contexts, capped by that share of memory (an explicit `parallel`
/// larger than memory allows is kept, and admission then waits for room) but never less than
/// one full context, so any single request that fits the context can run.
pub(crate) fn size_batch(
    requested: Option<usize>,
    context: usize,
    bytes_per_position: usize,
    available: Option<u64>,
    cores: usize,
) -> BatchSize {
    let per_sequence = (context * bytes_per_position).max(1) as u64;
    let fit = available
        .map(|bytes| ((bytes as f64 * KV_MEMORY_SHARE) as u64 / per_sequence).max(1) as usize)
        .unwrap_or(usize::MAX);
    let parallel = match requested {
        Some(n) => n.max(1),
        None => (4 * cores).clamp(4, MAX_DEFAULT_PARALLEL).min(fit),
    };
    BatchSize {
        parallel,
        capacity_positions: parallel.min(fit) * context,
    }
}

/// Bytes of memory available now (Linux `MemAvailable`); `None` elsewhere.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_follow_cores_memory_and_requests() {
        let gib = 1u64 << 30;
        // 2 cores, plenty of memory: 8 sequences of 4096 positions.
        let size = size_batch(None, 4096, 46_080, Some(16 * gib), 2);
        assert_eq!(size.parallel, 8);
        assert_eq!(size.capacity_positions, 8 * 4096);
        // Many cores: capped.
        assert_eq!(size_batch(None, 4096, 46_080, None, 64).parallel, 16);
        // Little memory: as many full contexts as half of it holds, at least one.
        let size = size_batch(None, 4096, 46_080, Some(gib), 8);
        assert_eq!(size.parallel, 2);
        let size = size_batch(None, 4096, 46_080, Some(1 << 20), 8);
        assert_eq!(size.parallel, 1);
        assert_eq!(size.capacity_positions, 4096);
        // An explicit request is kept, the budget still follows memory.
        let size = size_batch(Some(32), 4096, 46_080, Some(gib), 2);
        assert_eq!(size.parallel, 32);
        assert_eq!(size.capacity_positions, 2 * 4096);
        assert_eq!(size_batch(Some(0), 16, 4, None, 2).parallel, 1);
    }
}
