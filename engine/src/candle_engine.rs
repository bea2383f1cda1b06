//! [`CandleEngine`]: the real engine: a llama-family GGUF model run with candle.
//!
//! Loading opens and validates the file ([`GgufFile`]), builds the tokenizer and the chat
//! template from its metadata, and loads the layers this runner owns into a [`LlamaShard`]
//! (the whole model unless the [`LoadSpec`] names a layer range), reporting progress per
//! layer. Generation renders chat prompts with the model's template, runs prefill, then
//! samples token by token ([`Sampler`]: greedy at temperature 0, otherwise seeded), streaming
//! every token as a chunk whose text is whole UTF-8 ([`TokenStream`] holds back partial
//! characters). It stops at an end-of-generation token, at `max_tokens`, or before a stop
//! sequence, whose text is never emitted (text that could still become a stop sequence is held
//! back until it cannot). Cancellation is checked between tokens.
//!
//! A whole model on the CPU is served through a [`Batcher`] (continuous batching: many
//! sequences per forward, a prefix cache; see [`crate::batch`]); a single request runs through
//! the same batch, alone, so its tokens are the same whether it was batched or not. On a GPU,
//! requests run one at a time through the shard's own cache.
//!
//! A runner holding only some layers can load them, but cannot generate on its own: that
//! takes a pipeline of shards across runners. [`LlamaShard`] runs one shard's forward pass;
//! nothing in the node or the cluster chains shards into a pipeline yet.
//!
//! [`Sampler`]: crate::sampling::Sampler
//! [`TokenStream`]: crate::tokenizer::TokenStream

use std::ops::Range;

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use canopy_proto::{GenerateRequest, LoadSpec, Phase, Prompt, TokenChunk, ToolSpec};

use crate::batch::{
    Admission, BatchEngine, BatchModel, BatchReport, BatchSink, Batcher, DEFAULT_STEP_ROWS,
    Finished, SeqId, available_memory, size_batch,
};
use crate::chat::ChatTemplate;
use crate::generation::{self, prompt_text, run_generation};
use crate::gguf::GgufFile;
use crate::llama::config::LlamaConfig;
use crate::llama::shard::{LlamaShard, ShardInput};
use crate::llama::{SequenceCache, Span};
use crate::tokenizer::GgufTokenizer;
use crate::{Engine, EngineError, GenerateOutcome, GenerateSink};

/// Which device candle computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
}

impl Backend {
    fn device(self, model: &str) -> Result<Device, EngineError> {
        match self {
            Backend::Cpu => Ok(Device::Cpu),
            Backend::Cuda => Device::new_cuda(0).map_err(|e| EngineError::LoadFailed {
                model: model.to_string(),
                reason: format!(
                    "cannot use CUDA ({e}); is this build made with the `cuda` feature and is \
                     a GPU visible?"
                ),
            }),
        }
    }
}

struct Loaded {
    model: String,
    shard: LlamaShard,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    /// The batch, for a whole model on the CPU (`None`: one request at a time through the
    /// shard's own cache).
    batch: Option<Batcher>,
}

/// The id the single-request path ([`Engine::generate`]) runs under in the batch.
const SOLO: SeqId = SeqId::MAX;

impl BatchModel for LlamaShard {
    fn new_cache(&self) -> SequenceCache {
        self.new_sequence_cache()
    }

    fn max_context(&self) -> usize {
        LlamaShard::max_context(self)
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        spans: &[Span],
        caches: &mut [&mut SequenceCache],
        want: &[usize],
    ) -> Result<Tensor, EngineError> {
        Ok(self.forward_batch(ShardInput::Tokens(tokens), spans, caches, want)?)
    }
}

/// The candle GGUF engine. See the module docs.
pub struct CandleEngine {
    backend: Backend,
    loaded: Option<Loaded>,
}

impl CandleEngine {
    /// An engine computing on `backend`, with no model loaded.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            loaded: None,
        }
    }

    /// The loaded model's tokenizer, if any.
    pub fn tokenizer(&self) -> Option<&GgufTokenizer> {
        self.loaded.as_ref().map(|l| &l.tokenizer)
    }

    /// The text a prompt is fed to the model as (chat turns rendered with the template,
    /// which shows the model `tools`).
    pub fn prompt_text(&self, prompt: &Prompt, tools: &[ToolSpec]) -> Result<String, EngineError> {
        let loaded = self.loaded.as_ref().ok_or(EngineError::NotLoaded)?;
        prompt_text(&loaded.template, prompt, tools)
    }
}

fn layer_range(spec: &LoadSpec, n_layer: usize) -> Range<usize> {
    let start = spec.layer_start.map_or(0, |s| s as usize);
    let end = spec.layer_end.map_or(n_layer, |e| e as usize);
    start..end
}

impl Engine for CandleEngine {
    fn load(
        &mut self,
        spec: &LoadSpec,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<(), EngineError> {
        self.loaded = None;
        let device = self.backend.device(&spec.model)?;
        let file = GgufFile::open(&spec.model)?;
        let tokenizer = GgufTokenizer::from_gguf(&file)?;
        let template = ChatTemplate::from_gguf_or_chatml(&file)?;
        let config = LlamaConfig::from_gguf(file.content())?;
        let range = layer_range(spec, config.n_layer);
        let mut reader = std::fs::File::open(&spec.model).map_err(|e| EngineError::LoadFailed {
            model: spec.model.clone(),
            reason: e.to_string(),
        })?;
        let shard = LlamaShard::load(file.content(), &mut reader, range, &device, progress)?;
        let batch = (device.is_cpu() && shard.is_first() && shard.is_last()).then(|| {
            let per_position = shard.new_sequence_cache().bytes_per_position();
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let size = size_batch(
                spec.parallel.map(|n| n as usize),
                shard.max_context(),
                per_position,
                available_memory(),
                cores,
            );
            if size.capacity_positions < size.parallel * shard.max_context() {
                tracing::warn!(
                    parallel = size.parallel,
                    kv_positions = size.capacity_positions,
                    "the KV budget holds fewer full contexts than parallel sequences; \
                     requests wait for room when it is full"
                );
            }
            Batcher::new(
                size.parallel,
                size.capacity_positions,
                per_position,
                DEFAULT_STEP_ROWS,
            )
        });
        tracing::info!(
            model = %spec.model,
            layers = ?shard.layers(),
            vocab = tokenizer.vocab_size(),
            parallel = batch.as_ref().map_or(1, Batcher::parallel),
            "model loaded"
        );
        self.loaded = Some(Loaded {
            model: spec.model.clone(),
            shard,
            tokenizer,
            template,
            batch,
        });
        Ok(())
    }

    fn warm_up(&mut self) -> Result<(), EngineError> {
        let Some(loaded) = &self.loaded else {
            return Err(EngineError::NotLoaded);
        };
        if !(loaded.shard.is_first() && loaded.shard.is_last()) {
            return Ok(());
        }
        generation::warm_up(self)
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn GenerateSink,
    ) -> Result<GenerateOutcome, EngineError> {
        let text = self.prompt_text(&request.prompt, &request.tools)?;
        let loaded = self.loaded.as_mut().ok_or(EngineError::NotLoaded)?;
        if !(loaded.shard.is_first() && loaded.shard.is_last()) {
            return Err(EngineError::InvalidRequest(format!(
                "this runner holds layers {:?} of {}; generating needs the whole model \
                 (chaining shards across runners is not supported yet)",
                loaded.shard.layers(),
                loaded.model
            )));
        }
        let prompt = loaded.tokenizer.encode(&text, true)?;
        if let Some(batch) = &mut loaded.batch {
            // The same path as a batched request, alone.
            if batch.active() > 0 {
                return Err(EngineError::Generate(
                    "generate called while the batch has sequences".into(),
                ));
            }
            let admission = batch.join(
                SOLO,
                prompt,
                &request.params,
                &loaded.tokenizer,
                &loaded.shard,
            )?;
            if admission != Admission::Joined {
                return Err(EngineError::Generate(
                    "an empty batch refused a request".into(),
                ));
            }
            let mut solo = Solo(sink);
            loop {
                let finished = batch.step(&mut loaded.shard, &loaded.tokenizer, &mut solo);
                if let Some(done) = finished.into_iter().find(|f| f.id == SOLO) {
                    return done.result;
                }
            }
        }
        loaded.shard.clear_kv_cache();
        let shard = &mut loaded.shard;
        let room = shard.max_context();
        run_generation(
            &prompt,
            room,
            &request.params,
            &loaded.tokenizer,
            sink,
            |tokens, pos| Ok(shard.forward(ShardInput::Tokens(tokens), pos)?),
        )
    }

    fn batching(&mut self) -> Option<&mut dyn BatchEngine> {
        match &self.loaded {
            Some(Loaded { batch: Some(_), .. }) => Some(self),
            _ => None,
        }
    }
}

impl BatchEngine for CandleEngine {
    fn parallel(&self) -> usize {
        self.loaded
            .as_ref()
            .and_then(|l| l.batch.as_ref())
            .map_or(1, Batcher::parallel)
    }

    fn join(&mut self, id: SeqId, request: &GenerateRequest) -> Result<Admission, EngineError> {
        let text = self.prompt_text(&request.prompt, &request.tools)?;
        let loaded = self.loaded.as_mut().ok_or(EngineError::NotLoaded)?;
        let batch = loaded.batch.as_mut().ok_or(EngineError::NotLoaded)?;
        let prompt = loaded.tokenizer.encode(&text, true)?;
        batch.join(
            id,
            prompt,
            &request.params,
            &loaded.tokenizer,
            &loaded.shard,
        )
    }

    fn step(&mut self, sink: &mut dyn BatchSink) -> Vec<Finished> {
        match &mut self.loaded {
            Some(Loaded {
                batch: Some(batch),
                shard,
                tokenizer,
                ..
            }) => batch.step(shard, tokenizer, sink),
            _ => Vec::new(),
        }
    }

    fn leave(&mut self, id: SeqId) -> Option<GenerateOutcome> {
        self.loaded.as_mut()?.batch.as_mut()?.leave(id)
    }

    fn active(&self) -> usize {
        self.loaded
            .as_ref()
            .and_then(|l| l.batch.as_ref())
            .map_or(0, Batcher::active)
    }

    fn report(&self) -> BatchReport {
        self.loaded
            .as_ref()
            .and_then(|l| l.batch.as_ref())
            .map(Batcher::report)
            .unwrap_or_default()
    }
}

/// A single request's sink as the batch's (the batch holds only that request).
struct Solo<'a>(&'a mut dyn GenerateSink);

impl BatchSink for Solo<'_> {
    fn phase(&mut self, _: SeqId, phase: Phase) {
        self.0.phase(phase);
    }

    fn chunk(&mut self, _: SeqId, chunk: TokenChunk) -> ControlFlow<()> {
        self.0.chunk(chunk)
    }

    fn cancelled(&self, _: SeqId) -> bool {
        self.0.cancelled()
    }
}
