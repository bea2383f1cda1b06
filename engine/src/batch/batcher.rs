//! [`Batcher`]: the sequences of a batch, what each step runs, and the KV budget.
//!
//! Each sequence keeps the tokens it has (prompt, then every sampled token) and a cache of the
//! positions already computed; what it still has to run is the tail past its cache: the rest of
//! its prompt while prefilling, its one new token while decoding. A step gives every decoding
//! sequence its row first, then spends the rest of the row budget on prompts: the oldest
//! prefilling sequence is always given a share (so a stream of short prompts cannot starve a
//! long one), then the shortest remaining prompts first (so a short request reaches its first
//! token soon). Only sequences whose tail is fed completely get logits, and only those rows go
//! through the output head.
//!
//! A joining request starts from the longest prefix of its prompt that is already computed:
//! a kept cache of a finished sequence (taken over), or a running sequence's cache (its
//! positions copied, when at least [`MIN_COPIED_PREFIX`] are shared).

use std::ops::ControlFlow;

use candle_core::Tensor;
use canopy_proto::{GenerateParams, Phase, TokenChunk};

use super::pool::{PrefixCache, common_prefix};
use super::{Admission, BatchReport, BatchSink, Finished, SeqId};
use crate::generation::{Decoder, Next};
use crate::llama::{SequenceCache, Span};
use crate::tokenizer::GgufTokenizer;
use crate::{EngineError, GenerateOutcome, GenerateSink};

/// Rows one step runs at most (decode rows always run, even past it).
pub(crate) const DEFAULT_STEP_ROWS: usize = 512;

/// Shortest prefix worth copying from a running sequence's cache.
const MIN_COPIED_PREFIX: usize = 16;

/// The model side of a batch: a forward over many sequences at once.
pub(crate) trait BatchModel {
    /// An empty cache for one sequence.
    fn new_cache(&self) -> SequenceCache;

    /// Positions one sequence may hold (prompt and completion).
    fn max_context(&self) -> usize;

    /// Runs `tokens` (every span's rows, in order) and returns the logits of the last row of
    /// each span listed in `want` (`[want.len(), vocab]`).
    fn forward(
        &mut self,
        tokens: &[u32],
        spans: &[Span],
        caches: &mut [&mut SequenceCache],
        want: &[usize],
    ) -> Result<Tensor, EngineError>;
}

/// One sequence in the batch.
struct Sequence {
    id: SeqId,
    /// Prompt, then every sampled token.
    tokens: Vec<u32>,
    prompt_len: usize,
    cache: SequenceCache,
    /// Decodes it; its [`Decoder::max_positions`] is what the sequence reserves in the KV
    /// budget.
    decoder: Decoder,
    /// Whether its first step has been reported (the prefill phase).
    started: bool,
}

impl Sequence {
    /// Rows it still has to run.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

/// The batch; see the module docs.
pub(crate) struct Batcher {
    parallel: usize,
    step_rows: usize,
    /// KV budget in positions (across all sequences and the prefix cache).
    capacity: usize,
    bytes_per_position: usize,
    seqs: Vec<Sequence>,
    prefix: PrefixCache,
    report: BatchReport,
}

impl Batcher {
    /// A batch of at most `parallel` sequences within `capacity` KV positions.
    pub(crate) fn new(
        parallel: usize,
        capacity: usize,
        bytes_per_position: usize,
        step_rows: usize,
    ) -> Self {
        let parallel = parallel.max(1);
        Self {
            parallel,
            step_rows: step_rows.max(1),
            capacity,
            bytes_per_position,
            seqs: Vec::new(),
            prefix: PrefixCache::new(parallel),
            report: BatchReport {
                parallel,
                kv_capacity_bytes: (capacity * bytes_per_position) as u64,
                ..BatchReport::default()
            },
        }
    }

    /// Most sequences at once.
    pub(crate) fn parallel(&self) -> usize {
        self.parallel
    }

    /// Sequences in the batch.
    pub(crate) fn active(&self) -> usize {
        self.seqs.len()
    }

    /// What the batch holds now.
    pub(crate) fn report(&self) -> BatchReport {
        BatchReport {
            running: self.seqs.len(),
            kv_bytes: self.live_bytes() + self.prefix.bytes(),
            ..self.report
        }
    }

    /// KV bytes the running sequences' caches hold.
    fn live_bytes(&self) -> u64 {
        self.seqs
            .iter()
            .map(|s| s.cache.allocated_bytes() as u64)
            .sum()
    }

    /// Adds a sequence for `prompt`; see [`BatchEngine::join`](super::BatchEngine::join).
    pub(crate) fn join(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: &GenerateParams,
        tokenizer: &GgufTokenizer,
        model: &dyn BatchModel,
    ) -> Result<Admission, EngineError> {
        if self.seqs.iter().any(|s| s.id == id) {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {id} is already in the batch"
            )));
        }
        let decoder = Decoder::new(prompt.len(), model.max_context(), params, tokenizer)?;
        if self.seqs.len() >= self.parallel {
            return Ok(Admission::Wait);
        }
        let need = decoder.max_positions();
        let reserved: usize = self.seqs.iter().map(|s| s.decoder.max_positions()).sum();
        if reserved + need > self.capacity {
            return Ok(Admission::Wait);
        }
        let (mut cache, mut reused) = match self.prefix.take(&prompt) {
            Some(reuse) => (reuse.cache, reuse.positions),
            None => (model.new_cache(), 0),
        };
        // A running sequence may hold a longer shared prefix (concurrent requests with the
        // same system prompt): copy its positions.
        let limit = prompt.len().saturating_sub(1);
        let shared = self
            .seqs
            .iter()
            .map(|s| {
                let n = common_prefix(&s.tokens[..s.cache.len()], &prompt);
                (n.min(limit), s)
            })
            .max_by_key(|(n, _)| *n);
        if let Some((n, running)) = shared
            && n >= MIN_COPIED_PREFIX
            && n > reused
        {
            cache.copy_prefix_from(&running.cache, n);
            reused = n;
        }
        if reused > 0 {
            self.report.prefix_hits += 1;
            self.report.prefix_reused_tokens += reused as u64;
        }
        // Kept caches give way to reservations.
        let budget = (self.capacity * self.bytes_per_position) as u64;
        let live = self.live_bytes();
        let reserved_bytes = ((reserved + need) * self.bytes_per_position) as u64;
        while reserved_bytes.max(live) + self.prefix.bytes() > budget && self.prefix.evict_lru() {}
        tracing::debug!(
            id,
            prompt = prompt.len(),
            reused,
            "sequence joined the batch"
        );
        self.seqs.push(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            cache,
            decoder,
            started: false,
        });
        Ok(Admission::Joined)
    }

    /// Takes sequence `id` out (cancelled), keeping its cache for its prefix.
    pub(crate) fn leave(&mut self, id: SeqId) -> Option<GenerateOutcome> {
        let at = self.seqs.iter().position(|s| s.id == id)?;
        let mut seq = self.seqs.remove(at);
        let outcome = seq.decoder.cancel();
        self.keep(seq);
        Some(outcome)
    }

    fn keep(&mut self, seq: Sequence) {
        self.prefix.put(seq.tokens, seq.cache);
    }

    /// Rows each sequence runs this step (see the module docs).
    fn plan(&self) -> Vec<usize> {
        let mut take = vec![0usize; self.seqs.len()];
        let mut budget = self.step_rows;
        let mut prefilling = Vec::new();
        for (i, seq) in self.seqs.iter().enumerate() {
            match seq.pending() {
                0 => {}
                1 => {
                    take[i] = 1;
                    budget = budget.saturating_sub(1);
                }
                _ => prefilling.push(i),
            }
        }
        // The oldest prompt always advances.
        if let Some(&oldest) = prefilling.first()
            && budget > 0
        {
            let share = (budget / 4).max(1).min(self.seqs[oldest].pending());
            take[oldest] = share;
            budget -= share;
        }
        prefilling.sort_by_key(|&i| (self.seqs[i].pending() - take[i], i));
        for i in prefilling {
            let more = (self.seqs[i].pending() - take[i]).min(budget);
            take[i] += more;
            budget -= more;
        }
        take
    }

    /// One step; see [`BatchEngine::step`](super::BatchEngine::step).
    pub(crate) fn step(
        &mut self,
        model: &mut dyn BatchModel,
        tokenizer: &GgufTokenizer,
        sink: &mut dyn BatchSink,
    ) -> Vec<Finished> {
        let mut finished = Vec::new();
        // Cancelled sequences and empty token budgets end before running.
        let mut i = 0;
        while i < self.seqs.len() {
            let seq = &mut self.seqs[i];
            let id = seq.id;
            let mut seq_sink = SeqSink {
                id,
                sink: &mut *sink,
            };
            let outcome = if seq_sink.cancelled() {
                Some(seq.decoder.cancel())
            } else if !seq.started {
                seq.started = true;
                seq_sink.phase(Phase::Prefill);
                seq.decoder.finished_before_start(&mut seq_sink)
            } else {
                None
            };
            match outcome {
                Some(outcome) => {
                    let seq = self.seqs.remove(i);
                    self.keep(seq);
                    finished.push(Finished {
                        id,
                        result: Ok(outcome),
                    });
                }
                None => i += 1,
            }
        }
        let take = self.plan();
        let mut tokens = Vec::new();
        let mut spans = Vec::new();
        let mut want = Vec::new();
        let mut members = Vec::new();
        let mut prefill_rows = 0;
        for (i, (seq, &n)) in self.seqs.iter().zip(&take).enumerate() {
            if n == 0 {
                continue;
            }
            let pos = seq.cache.len();
            if pos + n == seq.tokens.len() {
                want.push(spans.len());
            }
            if pos < seq.prompt_len {
                prefill_rows += n.min(seq.prompt_len - pos);
            }
            spans.push(Span {
                start: tokens.len(),
                len: n,
                pos,
            });
            tokens.extend_from_slice(&seq.tokens[pos..pos + n]);
            members.push(i);
        }
        if spans.is_empty() {
            return finished;
        }
        self.report.last_step_rows = tokens.len();
        let result = {
            let mut caches: Vec<&mut SequenceCache> = self
                .seqs
                .iter_mut()
                .zip(&take)
                .filter(|(_, n)| **n > 0)
                .map(|(s, _)| &mut s.cache)
                .collect();
            model.forward(&tokens, &spans, &mut caches, &want)
        };
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                // Every sequence of the step fails; their caches may be half written.
                tracing::error!(%err, rows = tokens.len(), "batched forward failed");
                let message = err.to_string();
                for &i in members.iter().rev() {
                    let seq = self.seqs.remove(i);
                    finished.push(Finished {
                        id: seq.id,
                        result: Err(EngineError::Generate(message.clone())),
                    });
                }
                return finished;
            }
        };
        self.report.prefilled_tokens += prefill_rows as u64;
        let mut ended = Vec::new();
        for (k, &span) in want.iter().enumerate() {
            let i = members[span];
            let seq = &mut self.seqs[i];
            let id = seq.id;
            let next = logits
                .get(k)
                .map_err(|e| EngineError::Generate(format!("unusable logits: {e}")))
                .and_then(|row| {
                    seq.decoder.advance(
                        &row,
                        tokenizer,
                        &mut SeqSink {
                            id,
                            sink: &mut *sink,
                        },
                    )
                });
            match next {
                Ok(Next::Feed(token)) => seq.tokens.push(token),
                Ok(Next::Finished(outcome)) => ended.push((i, Ok(outcome))),
                Err(err) => ended.push((i, Err(err))),
            }
        }
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, result) in ended {
            let seq = self.seqs.remove(i);
            let id = seq.id;
            if result.is_ok() {
                self.keep(seq);
            }
            finished.push(Finished { id, result });
        }
        finished
    }
}

/// One sequence's view of the batch's sink.
struct SeqSink<'a> {
    id: SeqId,
    sink: &'a mut dyn BatchSink,
}

impl GenerateSink for SeqSink<'_> {
    fn phase(&mut self, phase: Phase) {
        self.sink.phase(self.id, phase);
    }

    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
        self.sink.chunk(self.id, chunk)
    }

    fn cancelled(&self) -> bool {
        self.sink.cancelled(self.id)
    }
}
