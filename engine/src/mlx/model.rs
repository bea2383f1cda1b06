//! [`MlxLlama`]: the llama forward pass on MLX, over a whole model.
//!
//! Per block: RMS norm, Q/K/V projections (one fused matmul when the three are stored alike),
//! rotary embeddings, grouped-query attention over the [`KvCache`], the output projection and
//! the residual; then RMS norm, the SwiGLU feed-forward (gate and up fused likewise) and the
//! residual. The final norm and the output head (tied to the token embedding when the file has
//! no `output.weight`) run on the last position only.
//!
//! RoPE: llama GGUF files store the Q and K weights permuted for llama.cpp's
//! `LLAMA_ROPE_TYPE_NORM`, which rotates *adjacent* pairs `(2i, 2i + 1)` — MLX's
//! `traditional = true` (the candle engine uses `rope_i` for the same reason). Linear scaling
//! divides positions by the factor (MLX's `scale = 1 / factor`); llama-3's
//! `rope_freqs.weight` divides each frequency `θ_i = base^(-2i/d)` by its factor, which MLX
//! takes as the periods `1 / θ_i`.
//!
//! Positions follow [`LlamaShard`](crate::llama::LlamaShard): a forward of `seq` tokens at
//! `index_pos` writes positions `index_pos..index_pos + seq`, where `index_pos` may continue
//! the cached positions or rewind, but not leave a hole; the cache holds at most
//! `min(context_length, 4096)` positions.

use mlx_rs::error::Exception;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype, ops};

use super::kv_cache::KvCache;
use super::weights::{MlxLinear, TensorReader};
use crate::EngineError;
use crate::gguf::GgufFile;
use crate::llama::{DEFAULT_MAX_CONTEXT, LlamaConfig, LlamaError, RopeScaling};

/// Rotary embedding parameters, as `fast::rope` takes them.
#[derive(Debug, Clone)]
struct Rope {
    dims: i32,
    base: Option<f32>,
    scale: f32,
    periods: Option<Array>,
}

impl Rope {
    fn apply(&self, x: &Array, offset: usize) -> Result<Array, Exception> {
        fast::rope(
            x,
            self.dims,
            true,
            self.base,
            self.scale,
            offset as i32,
            self.periods.as_ref(),
        )
    }
}

/// Projections of one attention layer: fused `[q; k; v]`, or separate.
#[derive(Debug, Clone)]
enum Qkv {
    Fused(MlxLinear),
    Separate(MlxLinear, MlxLinear, MlxLinear),
}

/// Projections of one feed-forward layer: fused `[gate; up]`, or separate.
#[derive(Debug, Clone)]
enum GateUp {
    Fused(MlxLinear),
    Separate(MlxLinear, MlxLinear),
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Array,
    qkv: Qkv,
    attn_output: MlxLinear,
    ffn_norm: Array,
    gate_up: GateUp,
    down: MlxLinear,
}

/// Sizes the forward needs, as MLX's `i32`s.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n_embd: i32,
    n_head: i32,
    n_head_kv: i32,
    head_dim: i32,
    n_ff: i32,
    eps: f32,
}

impl Block {
    fn load(
        reader: &TensorReader<'_>,
        config: &LlamaConfig,
        layer: usize,
    ) -> Result<Self, EngineError> {
        let name = |suffix: &str| format!("blk.{layer}.{suffix}");
        let (n_embd, n_ff) = (config.n_embd, config.n_ff);
        let q_rows = config.n_head * config.head_dim;
        let kv_rows = config.n_head_kv * config.head_dim;
        let q = reader.linear(&name("attn_q.weight"), q_rows, n_embd)?;
        let k = reader.linear(&name("attn_k.weight"), kv_rows, n_embd)?;
        let v = reader.linear(&name("attn_v.weight"), kv_rows, n_embd)?;
        let gate = reader.linear(&name("ffn_gate.weight"), n_ff, n_embd)?;
        let up = reader.linear(&name("ffn_up.weight"), n_ff, n_embd)?;
        let fuse = |what: &str, parts: &[&MlxLinear]| {
            let fused = MlxLinear::concat(parts).map_err(|e| EngineError::LoadFailed {
                model: String::new(),
                reason: super::mlx_error(&format!("fusing {what} of layer {layer}"), e),
            })?;
            if let Some(fused) = &fused {
                fused.eval().map_err(|e| EngineError::LoadFailed {
                    model: String::new(),
                    reason: super::mlx_error(&format!("fusing {what} of layer {layer}"), e),
                })?;
            }
            Ok::<_, EngineError>(fused)
        };
        let qkv = match fuse("q/k/v", &[&q, &k, &v])? {
            Some(fused) => Qkv::Fused(fused),
            None => Qkv::Separate(q, k, v),
        };
        let gate_up = match fuse("gate/up", &[&gate, &up])? {
            Some(fused) => GateUp::Fused(fused),
            None => GateUp::Separate(gate, up),
        };
        Ok(Self {
            attn_norm: reader.vector(&name("attn_norm.weight"), n_embd)?,
            qkv,
            attn_output: reader.linear(&name("attn_output.weight"), n_embd, q_rows)?,
            ffn_norm: reader.vector(&name("ffn_norm.weight"), n_embd)?,
            gate_up,
            down: reader.linear(&name("ffn_down.weight"), n_embd, n_ff)?,
        })
    }

    /// `x` is `[1, seq, n_embd]`; positions `index_pos..index_pos + seq`.
    fn forward(
        &self,
        x: &Array,
        cache: &mut KvCache,
        rope: &Rope,
        index_pos: usize,
        d: Dims,
    ) -> Result<Array, Exception> {
        let seq = x.dim(1);
        let h = fast::rms_norm(x, Some(&self.attn_norm), d.eps)?;
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(qkv) => {
                let qkv = qkv.forward(&h)?;
                let q_end = d.n_head * d.head_dim;
                let k_end = q_end + d.n_head_kv * d.head_dim;
                let parts = ops::split_at_indices(&qkv, &[q_end, k_end], -1)?;
                let mut parts = parts.into_iter();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(q), Some(k), Some(v)) => (q, k, v),
                    _ => return Err(Exception::custom("splitting q/k/v")),
                }
            }
            Qkv::Separate(q, k, v) => (q.forward(&h)?, k.forward(&h)?, v.forward(&h)?),
        };
        let heads = |t: Array, n: i32| -> Result<Array, Exception> {
            t.reshape(&[1, seq, n, d.head_dim])?
                .transpose_axes(&[0, 2, 1, 3])
        };
        let q = rope.apply(&heads(q, d.n_head)?, index_pos)?;
        let k = rope.apply(&heads(k, d.n_head_kv)?, index_pos)?;
        let v = heads(v, d.n_head_kv)?;
        let (k, v) = cache.update(index_pos, &k, &v)?;
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let mask = (seq > 1).then_some(ScaledDotProductAttentionMask::Causal);
        let attn = fast::scaled_dot_product_attention(&q, &k, &v, scale, mask, None)?;
        let attn = attn
            .transpose_axes(&[0, 2, 1, 3])?
            .reshape(&[1, seq, d.n_head * d.head_dim])?;
        let x = ops::add(x, self.attn_output.forward(&attn)?)?;

        let h = fast::rms_norm(&x, Some(&self.ffn_norm), d.eps)?;
        let (gate, up) = match &self.gate_up {
            GateUp::Fused(gate_up) => {
                let both = gate_up.forward(&h)?;
                let parts = ops::split_at_indices(&both, &[d.n_ff], -1)?;
                let mut parts = parts.into_iter();
                match (parts.next(), parts.next()) {
                    (Some(g), Some(u)) => (g, u),
                    _ => return Err(Exception::custom("splitting gate/up")),
                }
            }
            GateUp::Separate(gate, up) => (gate.forward(&h)?, up.forward(&h)?),
        };
        let act = ops::multiply(mlx_rs::nn::silu(gate)?, up)?;
        ops::add(&x, self.down.forward(&act)?)
    }
}

/// A whole llama model on MLX, with its KV caches. See the module docs.
///
/// Not `Clone` (the caches belong to one sequence); load another instead.
#[derive(Debug)]
pub struct MlxLlama {
    config: LlamaConfig,
    dims: Dims,
    embedding: MlxLinear,
    blocks: Vec<Block>,
    caches: Vec<KvCache>,
    output_norm: Array,
    /// `None`: tied to the embedding.
    output: Option<MlxLinear>,
    rope: Rope,
    max_context: usize,
    position: usize,
}

impl MlxLlama {
    /// Loads every layer of the llama model in `file`, calling `progress(done, total)` after
    /// each block; `model` names the model in errors.
    pub fn load(
        file: &GgufFile,
        model: &str,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<Self, EngineError> {
        #[cfg(all(mlx_linux, not(target_os = "macos")))]
        super::linux_shim::keep_linked();
        let config =
            LlamaConfig::from_gguf(file.content()).map_err(|e| e.into_load_error(model))?;
        let reader = TensorReader::new(file, model);
        let (vocab, n_embd) = (config.vocab_size, config.n_embd);
        let in_load = |e: EngineError| match e {
            EngineError::LoadFailed { reason, .. } => EngineError::LoadFailed {
                model: model.to_string(),
                reason,
            },
            other => other,
        };

        let embedding = reader.linear("token_embd.weight", vocab, n_embd)?;
        let rope = rope(&reader, &config)?;
        let total = config.n_layer as u32;
        progress(0, total);
        let mut blocks = Vec::with_capacity(config.n_layer);
        for layer in 0..config.n_layer {
            blocks.push(Block::load(&reader, &config, layer).map_err(in_load)?);
            progress(layer as u32 + 1, total);
        }
        let output_norm = reader.vector("output_norm.weight", n_embd)?;
        let output = if reader.contains("output.weight") {
            Some(reader.linear("output.weight", vocab, n_embd)?)
        } else {
            tracing::debug!("no output.weight: the output head is tied to token_embd.weight");
            None
        };
        let max_context = config.context_length.min(DEFAULT_MAX_CONTEXT);
        let dims = Dims {
            n_embd: n_embd as i32,
            n_head: config.n_head as i32,
            n_head_kv: config.n_head_kv as i32,
            head_dim: config.head_dim as i32,
            n_ff: config.n_ff as i32,
            eps: config.rms_norm_eps as f32,
        };
        tracing::info!(
            n_layer = config.n_layer,
            max_context,
            device = ?mlx_rs::Device::try_default().ok().and_then(|d| d.get_type().ok()),
            "loaded llama model on MLX"
        );
        Ok(Self {
            caches: vec![KvCache::new(max_context); config.n_layer],
            config,
            dims,
            embedding,
            blocks,
            output_norm,
            output,
            rope,
            max_context,
            position: 0,
        })
    }

    /// Runs `tokens` at positions `index_pos..index_pos + tokens.len()` and returns the logits
    /// of the last position (`vocab_size` of them).
    pub fn forward(&mut self, tokens: &[u32], index_pos: usize) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(LlamaError::EmptyInput.into());
        }
        let vocab_size = self.config.vocab_size;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(LlamaError::TokenOutOfRange { token, vocab_size }.into());
        }
        if index_pos > self.position {
            return Err(LlamaError::PositionGap {
                index_pos,
                cached: self.position,
            }
            .into());
        }
        let end = index_pos + tokens.len();
        if end > self.max_context {
            return Err(LlamaError::ContextFull {
                index_pos,
                end,
                capacity: self.max_context,
            }
            .into());
        }
        // A failed forward may have written some layers' caches: forget the sequence.
        self.position = 0;
        let logits = self
            .forward_graph(tokens, index_pos)
            .and_then(|logits| {
                logits.eval()?;
                Ok(logits.as_slice::<f32>().to_vec())
            })
            .map_err(|e| EngineError::Generate(super::mlx_error("the forward pass failed", e)))?;
        self.position = end;
        Ok(logits)
    }

    fn forward_graph(&mut self, tokens: &[u32], index_pos: usize) -> Result<Array, Exception> {
        let d = self.dims;
        let seq = tokens.len() as i32;
        let ids = Array::from_slice(tokens, &[seq]);
        let mut x = self.embedding.rows(&ids)?.reshape(&[1, seq, d.n_embd])?;
        for (block, cache) in self.blocks.iter().zip(self.caches.iter_mut()) {
            x = block.forward(&x, cache, &self.rope, index_pos, d)?;
        }
        let last = x.try_index((.., seq - 1.., ..))?;
        let h = fast::rms_norm(&last, Some(&self.output_norm), d.eps)?;
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        head.forward(&h)?
            .reshape(&[self.config.vocab_size as i32])?
            .as_dtype(Dtype::Float32)
    }

    /// Forgets every cached position; the next forward must start at `index_pos == 0`.
    pub fn clear_kv_cache(&mut self) {
        for cache in &mut self.caches {
            cache.clear();
        }
        self.position = 0;
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
}

/// The rotary embedding of `config`, with `rope_freqs.weight` if the file has it.
fn rope(reader: &TensorReader<'_>, config: &LlamaConfig) -> Result<Rope, EngineError> {
    let scale = match config.rope_scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => 1.0 / factor,
    };
    let dims = config.rope_dim;
    let periods = if reader.contains("rope_freqs.weight") {
        let factors = reader.vector_values("rope_freqs.weight", dims / 2)?;
        // θ_i / f_i as a period: base^(2i/d) * f_i.
        let periods: Vec<f32> = factors
            .iter()
            .enumerate()
            .map(|(i, f)| config.rope_freq_base.powf((2 * i) as f32 / dims as f32) * f)
            .collect();
        Some(Array::from_slice(&periods, &[periods.len() as i32]))
    } else {
        None
    };
    Ok(Rope {
        dims: dims as i32,
        base: periods.is_none().then_some(config.rope_freq_base),
        scale,
        periods,
    })
}
