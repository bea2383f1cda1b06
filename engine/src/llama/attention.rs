//! [`Attention`]: one layer's grouped-query self-attention with rotary positions and its own
//! [`KvCache`].
//!
//! Semantics follow candle's `quantized_llama` (the reference this forward is tested against):
//! Q/K/V projections, interleaved rotary embedding of Q and K, scores `QKᵀ/√d` in f32, causal
//! mask applied by replacing masked scores with `-inf`, softmax over the last dimension,
//! weighted sum of V, output projection.
//!
//! Grouped-query attention does not copy K and V `n_rep` times (`repeat_kv`): Q's heads are
//! regrouped instead, `[1, n_head, seq, d] -> [1, n_kv_head, n_rep * seq, d]` (a free reshape:
//! query head `h` uses key/value head `h / n_rep`, and heads sharing a key/value head are
//! adjacent), so each key/value head is multiplied once by all its query heads. That computes
//! the same dot products as `repeat_kv` and keeps the per-token cost independent of the copy
//! of the whole cache that `repeat_kv` would make.

use std::io::{Read, Seek};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use super::config::LlamaConfig;
use super::error::Result;
use super::kv_cache::KvCache;
use super::projection::Projection;
use super::rope::RotaryEmbedding;
use super::weights::WeightReader;

/// Self-attention of one transformer block.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Projection,
    output: QMatMul,
    rope: RotaryEmbedding,
    cache: KvCache,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    neg_inf: Tensor,
}

impl Attention {
    /// Loads the attention weights of block `layer` (`blk.{layer}.attn_{q,k,v,output}.weight`)
    /// and allocates its cache for `rope.max_positions()` positions.
    pub fn load<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        config: &LlamaConfig,
        layer: usize,
        rope: &RotaryEmbedding,
        fuse: bool,
    ) -> Result<Self> {
        let q_width = config.n_head * config.head_dim;
        let kv_width = config.n_head_kv * config.head_dim;
        let q = format!("blk.{layer}.attn_q.weight");
        let k = format!("blk.{layer}.attn_k.weight");
        let v = format!("blk.{layer}.attn_v.weight");
        let parts = [
            (q.as_str(), q_width),
            (k.as_str(), kv_width),
            (v.as_str(), kv_width),
        ];
        let qkv = Projection::load(weights, &parts, config.n_embd, fuse)?;
        let output = weights.qtensor(
            &format!("blk.{layer}.attn_output.weight"),
            &[config.n_embd, q_width],
        )?;
        let device = weights.device().clone();
        Ok(Self {
            qkv,
            output: QMatMul::from_qtensor(output)?,
            rope: rope.clone(),
            cache: KvCache::new(
                config.n_head_kv,
                config.head_dim,
                rope.max_positions(),
                DType::F32,
                &device,
            )?,
            n_head: config.n_head,
            n_kv_head: config.n_head_kv,
            head_dim: config.head_dim,
            neg_inf: Tensor::new(f32::NEG_INFINITY, &device)?,
        })
    }

    /// The layer's KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Forgets the cached positions.
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Attends `x` (`[1, seq, n_embd]`, normed) at positions `index_pos..index_pos + seq` to
    /// itself and to the cached positions before it; `mask` (`[seq, index_pos + seq]`, u8, 1 =
    /// hidden) is required when `seq > 1`.
    pub fn forward(
        &mut self,
        x: &Tensor,
        mask: Option<&Tensor>,
        index_pos: usize,
    ) -> Result<Tensor> {
        let (batch, seq_len, _) = x.dims3()?;
        let (hd, n_head, n_kv) = (self.head_dim, self.n_head, self.n_kv_head);
        let n_rep = n_head / n_kv;
        let mut qkv = self.qkv.forward(x)?.into_iter();
        let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(candle_core::Error::Msg(
                "the QKV projection returned fewer than three tensors".into(),
            )
            .into());
        };

        let q = q.reshape((batch, seq_len, n_head, hd))?.transpose(1, 2)?;
        let k = k.reshape((batch, seq_len, n_kv, hd))?.transpose(1, 2)?;
        let v = v
            .reshape((batch, seq_len, n_kv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.rope.apply(&q, index_pos)?;
        let k = self.rope.apply(&k, index_pos)?;

        let (k, v) = self.cache.append(index_pos, &k, &v)?;
        let kv_len = k.dim(2)?;

        if std::env::var_os("CANOPY_EXP_REPEAT_KV").is_some() {
            let k = candle_transformers::utils::repeat_kv(k.contiguous()?, n_rep)?;
            let v = candle_transformers::utils::repeat_kv(v.contiguous()?, n_rep)?;
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let att = match mask {
                None => att,
                Some(mask) => {
                    let mask = mask.broadcast_as(att.shape())?;
                    mask.where_cond(&self.neg_inf.broadcast_as(att.shape())?, &att)?
                }
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v.contiguous()?)?;
            let y = y.transpose(1, 2)?.reshape((batch, seq_len, n_head * hd))?;
            return Ok(self.output.forward(&y)?);
        }
        // [1, n_kv, n_rep * seq, hd] x [1, n_kv, hd, kv_len]
        let q = q.reshape((batch, n_kv, n_rep * seq_len, hd))?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = att.reshape((batch, n_head, seq_len, kv_len))?;
        let att = match mask {
            None => att,
            Some(mask) => {
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&self.neg_inf.broadcast_as(att.shape())?, &att)?
            }
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let att = att.reshape((batch, n_kv, n_rep * seq_len, kv_len))?;
        let y = att.matmul(&v)?; // [1, n_kv, n_rep * seq, hd]
        let y = y
            .reshape((batch, n_head, seq_len, hd))?
            .transpose(1, 2)?
            .reshape((batch, seq_len, n_head * hd))?;
        Ok(self.output.forward(&y)?)
    }
}
