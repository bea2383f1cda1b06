//! [`TransformerBlock`]: one llama layer, pre-norm attention and pre-norm MLP, each added to
//! the residual stream.

use std::io::{Read, Seek};

use candle_core::{Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::attention::Attention;
use super::config::LlamaConfig;
use super::error::Result;
use super::mlp::Mlp;
use super::options::LoadOptions;
use super::rope::RotaryEmbedding;
use super::row_attention::Span;
use super::sequence::LayerKv;
use super::weights::WeightReader;

/// One transformer block (`blk.{layer}.*` in GGUF).
#[derive(Debug)]
pub struct TransformerBlock {
    attention_norm: RmsNorm,
    attention: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl TransformerBlock {
    /// Loads block `layer`.
    pub fn load<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        config: &LlamaConfig,
        layer: usize,
        rope: &RotaryEmbedding,
        options: &LoadOptions,
    ) -> Result<Self> {
        let norm = |weights: &mut WeightReader<'_, R>, name: &str| -> Result<RmsNorm> {
            let q = weights.qtensor(&format!("blk.{layer}.{name}.weight"), &[config.n_embd])?;
            Ok(RmsNorm::from_qtensor(q, config.rms_norm_eps)?)
        };
        Ok(Self {
            attention_norm: norm(weights, "attn_norm")?,
            attention: Attention::load(weights, config, layer, rope, options)?,
            ffn_norm: norm(weights, "ffn_norm")?,
            mlp: Mlp::load(weights, config, layer, options.fuse_projections)?,
        })
    }

    /// Forgets the block's cached positions.
    pub fn clear_cache(&mut self) {
        self.attention.clear_cache();
    }

    /// Positions in the block's KV cache.
    pub fn cached_positions(&self) -> usize {
        self.attention.cache().len()
    }

    /// Runs the block on the rows of several sequences (see [`Attention::forward_batch`]).
    pub fn forward_batch(
        &self,
        x: &Tensor,
        spans: &[Span],
        caches: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let h = self.attention_norm.forward(x)?;
        let h = self.attention.forward_batch(&h, spans, caches)?;
        self.feed_forward((h + x)?)
    }

    /// Runs the block on `x` (`[1, seq, n_embd]`) at positions `index_pos..index_pos + seq`.
    pub fn forward(
        &mut self,
        x: &Tensor,
        mask: Option<&Tensor>,
        index_pos: usize,
    ) -> Result<Tensor> {
        let h = self.attention_norm.forward(x)?;
        let h = self.attention.forward(&h, mask, index_pos)?;
        self.feed_forward((h + x)?)
    }

    /// The pre-norm feed-forward sublayer added to the residual stream `x`.
    fn feed_forward(&self, x: Tensor) -> Result<Tensor> {
        let h = self.mlp.forward(&self.ffn_norm.forward(&x)?)?;
        Ok((h + x)?)
    }
}
