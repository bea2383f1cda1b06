//! [`OutputHead`]: the last shard's final RMS norm and vocabulary projection, turning the
//! residual stream at the last position into logits.
//!
//! The projection is `output.weight` when the file has one, or the token embedding table
//! when the model ties them (SmolLM2 does); the tied table stays quantized and is shared with
//! the embedding when one shard owns both ends.

use super::linear::Linear;
use candle_core::{DType, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::error::{LlamaError, Result};

/// Final norm plus vocabulary projection.
#[derive(Debug, Clone)]
pub struct OutputHead {
    norm: RmsNorm,
    projection: Linear,
}

impl OutputHead {
    /// A head from its norm and its `[vocab, n_embd]` projection.
    pub fn new(norm: RmsNorm, projection: Linear) -> Self {
        Self { norm, projection }
    }

    /// The f32 logits (`[n, vocab]`) of each row of `x` (`[n, n_embd]`).
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.projection.forward(&self.norm.forward(x)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The f32 logits (`[vocab]`) of the last position of `x` (`[1, seq, n_embd]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let seq_len = x.dim(1)?;
        let Some(last) = seq_len.checked_sub(1) else {
            return Err(LlamaError::EmptyInput);
        };
        let x = x.narrow(1, last, 1)?;
        let logits = self.projection.forward(&self.norm.forward(&x)?)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }
}
