//! [`LlamaShard`]: a contiguous range of a llama model's layers, with its own KV cache — the
//! unit of pipeline-parallel inference.
//!
//! A shard owns layers `i..j`, plus the token embedding if `i == 0` (it is *first*) and the
//! final norm and output head if `j == n_layer` (it is *last*). Chaining shards `0..k` and
//! `k..n` — feeding the hidden states the first returns into the second — computes exactly
//! what one shard `0..n` computes, bit for bit: each block's arithmetic depends only on its
//! input, its weights and its own cache, never on which shard it sits in. The whole model is
//! the one-shard case.
//!
//! Loading reads only the tensors the shard needs (see [`WeightReader`]). The embedding stays
//! quantized ([`QuantizedEmbedding`]); a tied output head reuses it.
//!
//! Positions: a forward of `seq` positions at `index_pos` writes them into every block's cache
//! and attends to positions `0..index_pos + seq`. `index_pos` may equal the number of cached
//! positions (continue), be smaller (rewind: later positions are dropped, e.g. `0` starts a
//! new sequence), but not larger (a hole). Every shard of a pipeline must see the same
//! `index_pos` sequence. [`LlamaShard::forward`] runs one sequence in the shard's own cache,
//! with candle's attention (bit-identical to `quantized_llama`); [`LlamaShard::forward_batch`]
//! runs many sequences at once, each in a [`SequenceCache`] of the caller's.

use std::io::{Read, Seek};
use std::ops::Range;

use super::linear::Linear;
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::block::TransformerBlock;
use super::config::LlamaConfig;
use super::embedding::QuantizedEmbedding;
use super::error::{LlamaError, Result};
use super::head::OutputHead;
use super::options::{DEFAULT_MAX_CONTEXT, LoadOptions};
use super::rope::RotaryEmbedding;
use super::row_attention::Span;
use super::sequence::{LayerKv, SequenceCache};
use super::weights::WeightReader;

/// What a shard's forward consumes.
#[derive(Debug, Clone)]
pub enum ShardInput<'a> {
    /// Token ids; only the first shard (which owns the embedding) accepts them.
    Tokens(&'a [u32]),
    /// Hidden states `[1, seq, n_embd]` (f32) from the previous shard; every other shard
    /// accepts them.
    Hidden(Tensor),
}

impl ShardInput<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::Tokens(_) => "token ids",
            Self::Hidden(_) => "hidden states",
        }
    }
}

/// Layers `i..j` of a llama model, with the embedding if first and the head if last.
///
/// Not `Clone` (the KV caches are written in place); load a second shard instead.
#[derive(Debug)]
pub struct LlamaShard {
    config: LlamaConfig,
    layers: Range<usize>,
    embedding: Option<QuantizedEmbedding>,
    blocks: Vec<TransformerBlock>,
    head: Option<OutputHead>,
    max_context: usize,
    position: usize,
    device: Device,
}

impl LlamaShard {
    /// Loads layers `layers` of the model in `content` (read from `reader`) onto `device`,
    /// with default [`LoadOptions`]; calls `progress(done_layers, total_layers)` as blocks load.
    pub fn load(
        content: &Content,
        reader: &mut (impl Read + Seek),
        layers: Range<usize>,
        device: &Device,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<Self> {
        Self::load_with_options(
            content,
            reader,
            layers,
            device,
            &LoadOptions::default(),
            progress,
        )
    }

    /// [`LlamaShard::load`] with explicit options.
    pub fn load_with_options(
        content: &Content,
        reader: &mut (impl Read + Seek),
        layers: Range<usize>,
        device: &Device,
        options: &LoadOptions,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content)?;
        if layers.start >= layers.end || layers.end > config.n_layer {
            return Err(LlamaError::BadLayerRange {
                start: layers.start,
                end: layers.end,
                n_layer: config.n_layer,
            });
        }
        let max_context = options
            .max_context
            .unwrap_or(config.context_length.min(DEFAULT_MAX_CONTEXT));
        if max_context == 0 {
            return Err(LlamaError::InvalidOptions(
                "max_context must be at least 1 position".into(),
            ));
        }
        if max_context > config.context_length {
            tracing::warn!(
                max_context,
                context_length = config.context_length,
                "KV cache capacity exceeds the model's training context; quality may degrade past it"
            );
        }
        let is_first = layers.start == 0;
        let is_last = layers.end == config.n_layer;
        let (vocab, n_embd) = (config.vocab_size, config.n_embd);
        let mut weights = WeightReader::new(content, reader, device);

        let embedding = if is_first {
            Some(QuantizedEmbedding::load(
                &mut weights,
                "token_embd.weight",
                vocab,
                n_embd,
            )?)
        } else {
            None
        };

        let freq_factors = if weights.contains("rope_freqs.weight") {
            let factors = weights.vector("rope_freqs.weight", config.rope_dim / 2)?;
            Some(factors.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = RotaryEmbedding::new(&config, freq_factors.as_deref(), max_context, device)?;

        let total = (layers.end - layers.start) as u32;
        progress(0, total);
        let mut blocks = Vec::with_capacity(layers.len());
        for (done, layer) in layers.clone().enumerate() {
            blocks.push(TransformerBlock::load(
                &mut weights,
                &config,
                layer,
                &rope,
                options,
            )?);
            progress(done as u32 + 1, total);
        }

        let head = if is_last {
            let norm = RmsNorm::from_qtensor(
                weights.qtensor("output_norm.weight", &[n_embd])?,
                config.rms_norm_eps,
            )?;
            let projection = if weights.contains("output.weight") {
                Linear::load(&mut weights, "output.weight", vocab, n_embd)?
            } else {
                tracing::debug!("no output.weight: the output head is tied to token_embd.weight");
                match &embedding {
                    Some(embedding) => embedding.output_head()?,
                    None => Linear::load(&mut weights, "token_embd.weight", vocab, n_embd)?,
                }
            };
            Some(OutputHead::new(norm, projection))
        } else {
            None
        };

        tracing::info!(
            layers = ?layers,
            n_layer = config.n_layer,
            is_first,
            is_last,
            max_context,
            fused = options.fuse_projections,
            gqa = ?options.gqa,
            "loaded llama shard"
        );
        Ok(Self {
            config,
            layers,
            embedding,
            blocks,
            head,
            max_context,
            position: 0,
            device: device.clone(),
        })
    }

    /// Runs the shard's layers on `input` at positions `index_pos..index_pos + seq`.
    ///
    /// Returns hidden states `[1, seq, n_embd]` (f32) from a non-last shard, to be fed to the
    /// next shard as [`ShardInput::Hidden`], and the logits of the last position (`[vocab]`,
    /// f32) from the last shard.
    pub fn forward(&mut self, input: ShardInput<'_>, index_pos: usize) -> Result<Tensor> {
        let x = self.input_rows(input)?;
        let seq_len = x.dim(1)?;
        if seq_len == 0 {
            return Err(LlamaError::EmptyInput);
        }
        if index_pos > self.position {
            return Err(LlamaError::PositionGap {
                index_pos,
                cached: self.position,
            });
        }
        let end = index_pos + seq_len;
        if end > self.max_context {
            return Err(LlamaError::ContextFull {
                index_pos,
                end,
                capacity: self.max_context,
            });
        }
        let mask = if seq_len > 1 {
            Some(candle_transformers::utils::build_causal_mask(
                seq_len,
                index_pos,
                &self.device,
            )?)
        } else {
            None
        };
        let mut x = x;
        for block in &mut self.blocks {
            x = block.forward(&x, mask.as_ref(), index_pos)?;
        }
        self.position = end;
        match &self.head {
            Some(head) => head.forward(&x),
            None => Ok(x),
        }
    }

    /// An empty cache shaped for this shard's layers, holding up to [`LlamaShard::max_context`]
    /// positions, for [`LlamaShard::forward_batch`].
    pub fn new_sequence_cache(&self) -> SequenceCache {
        SequenceCache::new(
            self.blocks.len(),
            self.config.n_head_kv * self.config.head_dim,
            self.max_context,
        )
    }

    /// The batched forward: runs the rows of several sequences through the shard's layers at
    /// once. `spans` tile the input's rows in order (span `i` is sequence `i`'s rows, from row
    /// `spans[i].start`, at positions `spans[i].pos..`), and `caches[i]` is sequence `i`'s
    /// cache, which must hold exactly `spans[i].pos` positions (truncate it first to rewind);
    /// the rows' keys and values are appended to it.
    ///
    /// Every linear map runs once over all rows; attention is per sequence. A row's result
    /// depends only on its own sequence, never on the other rows (see
    /// [`row_attention`](super::row_attention)), so a sequence gives the same bits alone or
    /// batched, and a prompt the same bits whole or in chunks.
    ///
    /// Returns the logits of the last row of each span listed in `want` (`[want.len(), vocab]`,
    /// f32) from the last shard, and the hidden states of all rows (`[1, rows, n_embd]`) from
    /// any other. CPU only.
    pub fn forward_batch(
        &self,
        input: ShardInput<'_>,
        spans: &[Span],
        caches: &mut [&mut SequenceCache],
        want: &[usize],
    ) -> Result<Tensor> {
        if !self.device.is_cpu() {
            return Err(LlamaError::InvalidOptions(
                "the batched forward runs on the CPU only".into(),
            ));
        }
        let x = self.input_rows(input)?;
        let rows = x.dim(1)?;
        self.check_spans(rows, spans, caches)?;
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut layer: Vec<&mut LayerKv> =
                caches.iter_mut().map(|c| &mut c.layers_mut()[i]).collect();
            x = block.forward_batch(&x, spans, &mut layer)?;
        }
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            cache.set_len(span.pos + span.len);
        }
        match &self.head {
            Some(head) => {
                if want.is_empty() {
                    return Ok(Tensor::zeros(
                        (0, self.config.vocab_size),
                        DType::F32,
                        &self.device,
                    )?);
                }
                let mut last = Vec::with_capacity(want.len());
                for &i in want {
                    let Some(span) = spans.get(i) else {
                        return Err(LlamaError::InvalidOptions(format!(
                            "batched forward: logits wanted for span {i} of {}",
                            spans.len()
                        )));
                    };
                    last.push((span.start + span.len - 1) as u32);
                }
                let index = Tensor::new(last.as_slice(), &self.device)?;
                let x = x.squeeze(0)?.index_select(&index, 0)?;
                head.forward_rows(&x)
            }
            None => Ok(x),
        }
    }

    /// Checks that `spans` tile `rows` rows in order and fit their caches.
    fn check_spans(
        &self,
        rows: usize,
        spans: &[Span],
        caches: &[&mut SequenceCache],
    ) -> Result<()> {
        if rows == 0 || spans.is_empty() {
            return Err(LlamaError::EmptyInput);
        }
        let bad = |why: String| {
            Err(LlamaError::InvalidOptions(format!(
                "batched forward: {why}"
            )))
        };
        if spans.len() != caches.len() {
            return bad(format!("{} spans but {} caches", spans.len(), caches.len()));
        }
        let row = self.config.n_head_kv * self.config.head_dim;
        let mut next = 0;
        for (span, cache) in spans.iter().zip(caches) {
            if span.start != next || span.len == 0 {
                return bad(format!("span {span:?} does not follow row {next}"));
            }
            next += span.len;
            if cache.layers_len() != self.blocks.len() || cache.row() != row {
                return bad("a sequence cache was made for another shard".into());
            }
            if span.pos != cache.len() {
                return Err(LlamaError::PositionGap {
                    index_pos: span.pos,
                    cached: cache.len(),
                });
            }
            let end = span.pos + span.len;
            if end > self.max_context.min(cache.capacity()) {
                return Err(LlamaError::ContextFull {
                    index_pos: span.pos,
                    end,
                    capacity: self.max_context.min(cache.capacity()),
                });
            }
        }
        if next != rows {
            return bad(format!("spans cover {next} rows of {rows}"));
        }
        Ok(())
    }

    /// The input as rows `[1, rows, n_embd]`: token ids embedded (first shard) or hidden
    /// states checked (any other).
    fn input_rows(&self, input: ShardInput<'_>) -> Result<Tensor> {
        match (input, &self.embedding) {
            (ShardInput::Tokens(tokens), Some(embedding)) => {
                Ok(embedding.forward(tokens)?.unsqueeze(0)?)
            }
            (ShardInput::Hidden(hidden), None) => self.check_hidden(hidden),
            (input, _) => Err(LlamaError::WrongInput {
                layers: format!("{}..{}", self.layers.start, self.layers.end),
                expected: if self.is_first() {
                    "token ids"
                } else {
                    "hidden states"
                },
                got: input.kind(),
            }),
        }
    }

    fn check_hidden(&self, hidden: Tensor) -> Result<Tensor> {
        let ok = matches!(hidden.dims(), [1, _, n] if *n == self.config.n_embd)
            && hidden.dtype() == DType::F32;
        if !ok {
            return Err(LlamaError::BadHidden {
                actual: hidden.dims().to_vec(),
                dtype: format!("{:?}", hidden.dtype()),
                n_embd: self.config.n_embd,
            });
        }
        Ok(hidden.to_device(&self.device)?)
    }

    /// Forgets every cached position; the next forward must start at `index_pos == 0`.
    pub fn clear_kv_cache(&mut self) {
        for block in &mut self.blocks {
            block.clear_cache();
        }
        self.position = 0;
    }

    /// The model layers this shard owns.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Whether the shard owns the embedding (takes token ids).
    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether the shard owns the output head (returns logits).
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Capacity of the KV cache, in positions.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Positions currently cached (where a continuing forward starts).
    pub fn position(&self) -> usize {
        self.position
    }

    /// The device the shard's weights and caches live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The token embedding, if the shard is first.
    pub fn embedding(&self) -> Option<&QuantizedEmbedding> {
        self.embedding.as_ref()
    }
}
