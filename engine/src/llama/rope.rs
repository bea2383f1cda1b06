//! [`RotaryEmbedding`]: rotary position embeddings with precomputed cos/sin tables.
//!
//! The tables cover positions `0..max_positions` and are computed exactly as candle's
//! `quantized_llama` computes them (`θ_i = base^(-2i/d)`, angles from a `[positions, 1] x
//! [1, d/2]` matmul), so that positions embed bit-identically. On top of that it supports linear
//! position scaling and llama-3-style per-frequency factors (`rope_freqs.weight`, dividing each
//! `θ_i`).
//!
//! Llama GGUF files store Q/K weights permuted for the *interleaved* convention (pairs
//! `(2i, 2i+1)`, llama.cpp's `LLAMA_ROPE_TYPE_NORM`), hence [`candle_nn::rotary_emb::rope_i`].
//! The tables are cheap to clone (tensors share storage), so every block of a shard shares one.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, RopeScaling};
use super::error::{LlamaError, Result};

/// Cos/sin tables for positions `0..max_positions` and the rotation that applies them.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain floats (`[position][head_dim / 2]`) on the host, for the
    /// batched forward, which rotates rows itself.
    host: Arc<HostTables>,
    max_positions: usize,
}

#[derive(Debug)]
struct HostTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RotaryEmbedding {
    /// Builds the tables for `max_positions` positions of `config`'s heads, with optional
    /// per-frequency divisors (`head_dim / 2` of them, from `rope_freqs.weight`).
    pub fn new(
        config: &LlamaConfig,
        freq_factors: Option<&[f32]>,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let dim = config.rope_dim;
        let mut theta: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / config.rope_freq_base.powf(i as f32 / dim as f32))
            .collect();
        if let Some(factors) = freq_factors {
            if factors.len() != theta.len() || factors.iter().any(|f| !(f.is_finite() && *f > 0.0))
            {
                return Err(LlamaError::BadTensorShape {
                    name: "rope_freqs.weight".to_string(),
                    expected: vec![theta.len()],
                    actual: vec![factors.len()],
                });
            }
            for (t, f) in theta.iter_mut().zip(factors) {
                *t /= f;
            }
        }
        let n_freq = theta.len();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let positions = Tensor::arange(0, max_positions as u32, device)?.to_dtype(DType::F32)?;
        let positions = match config.rope_scaling {
            RopeScaling::None => positions,
            RopeScaling::Linear { factor } => (positions / f64::from(factor))?,
        };
        let angles = positions
            .reshape((max_positions, 1))?
            .matmul(&theta.reshape((1, n_freq))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let host = HostTables {
            cos: cos.flatten_all()?.to_vec1::<f32>()?,
            sin: sin.flatten_all()?.to_vec1::<f32>()?,
            half: n_freq,
        };
        Ok(Self {
            cos,
            sin,
            host: Arc::new(host),
            max_positions,
        })
    }

    /// Positions covered by the tables.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `heads` heads of width `2 * n_freq` laid out one after another in `row`, as
    /// position `pos`, in place: the same arithmetic as [`RotaryEmbedding::apply`] (candle's
    /// `rope_i`) on one row.
    pub(super) fn rotate_row(&self, row: &mut [f32], pos: usize) {
        let t = &*self.host;
        let cos = &t.cos[pos * t.half..(pos + 1) * t.half];
        let sin = &t.sin[pos * t.half..(pos + 1) * t.half];
        for head in row.chunks_exact_mut(2 * t.half) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) as positions `index_pos..index_pos + seq`.
    pub fn apply(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_batch, _heads, seq_len, _head_dim) = x.dims4()?;
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)?)
    }
}
