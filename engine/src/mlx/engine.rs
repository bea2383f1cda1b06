//! [`MlxEngine`]: the [`Engine`] that runs an [`MlxLlama`].
//!
//! Loading and generating follow the candle engine step for step, so that the two behave the
//! same to a runner: chat prompts are rendered with the model's template, prefill runs the
//! whole prompt at once, then tokens are sampled one by one and streamed as chunks of whole
//! UTF-8 text; generation stops at an end-of-generation token, at `max_tokens`, or before a
//! stop sequence (never emitted); cancellation is checked between tokens.

use candle_core::Tensor;
use canopy_proto::{GenerateRequest, LoadSpec, Prompt, ToolSpec};

use super::model::MlxLlama;
use crate::generation::{self, prompt_text, run_generation};
use crate::chat::ChatTemplate;
use crate::gguf::GgufFile;
use crate::llama::LlamaConfig;
use crate::tokenizer::GgufTokenizer;
use crate::{Engine, EngineError, GenerateOutcome, GenerateSink};

struct Loaded {
    model: MlxLlama,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
}

/// The MLX GGUF engine. See the [module docs](super).
#[derive(Default)]
pub struct MlxEngine {
    loaded: Option<Loaded>,
}

impl std::fmt::Debug for MlxEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlxEngine")
            .field("loaded", &self.loaded.is_some())
            .finish()
    }
}

impl MlxEngine {
    /// An engine with no model loaded. MLX computes on its default device: the GPU where
    /// Metal is available, else the CPU.
    pub fn new() -> Self {
        Self::default()
    }

    /// The loaded model's tokenizer, if any.
    pub fn tokenizer(&self) -> Option<&GgufTokenizer> {
        self.loaded.as_ref().map(|l| &l.tokenizer)
    }

    /// The loaded model, if any (for tests and tools that drive the forward directly).
    pub fn model_mut(&mut self) -> Option<&mut MlxLlama> {
        self.loaded.as_mut().map(|l| &mut l.model)
    }

    /// The text a prompt is fed to the model as (chat turns rendered with the template,
    /// which shows the model `tools`).
    pub fn prompt_text(&self, prompt: &Prompt, tools: &[ToolSpec]) -> Result<String, EngineError> {
        let loaded = self.loaded.as_ref().ok_or(EngineError::NotLoaded)?;
        prompt_text(&loaded.template, prompt, tools)
    }
}

fn logits_tensor(logits: Vec<f32>) -> Result<Tensor, EngineError> {
    let n = logits.len();
    Tensor::from_vec(logits, n, &candle_core::Device::Cpu)
        .map_err(|e| EngineError::Generate(format!("unusable logits: {e}")))
}

impl Engine for MlxEngine {
    fn load(
        &mut self,
        spec: &LoadSpec,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<(), EngineError> {
        self.loaded = None;
        if let Some(threads) = spec.threads {
            tracing::debug!(
                threads,
                "the mlx engine has no thread-count setting; ignored"
            );
        }
        let file = GgufFile::open(&spec.model)?;
        let config =
            LlamaConfig::from_gguf(file.content()).map_err(|e| e.into_load_error(&spec.model))?;
        let start = spec.layer_start.map_or(0, |s| s as usize);
        let end = spec.layer_end.map_or(config.n_layer, |e| e as usize);
        if (start, end) != (0, config.n_layer) {
            return Err(EngineError::InvalidModel {
                model: spec.model.clone(),
                reason: format!(
                    "the mlx engine loads whole models only (layers 0..{}), not the layer range \
                     {start}..{end}; pipeline shards run on `--engine candle`",
                    config.n_layer
                ),
            });
        }
        let tokenizer = GgufTokenizer::from_gguf(&file)?;
        let template = ChatTemplate::from_gguf_or_chatml(&file)?;
        let model = MlxLlama::load(&file, &spec.model, progress)?;
        tracing::info!(
            model = %spec.model,
            layers = model.config().n_layer,
            vocab = tokenizer.vocab_size(),
            "model loaded (mlx)"
        );
        self.loaded = Some(Loaded {
            model,
            tokenizer,
            template,
        });
        Ok(())
    }

    fn warm_up(&mut self) -> Result<(), EngineError> {
        if self.loaded.is_none() {
            return Err(EngineError::NotLoaded);
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
        let prompt = loaded.tokenizer.encode(&text, true)?;
        loaded.model.clear_kv_cache();
        let model = &mut loaded.model;
        let room = model.max_context();
        run_generation(
            &prompt,
            room,
            &request.params,
            &loaded.tokenizer,
            sink,
            |tokens, pos| logits_tensor(model.forward(tokens, pos)?),
        )
    }
}
