//! [`Attention`]: one layer's grouped-query self-attention with rotary positions and its own
//! [`KvCache`].
//!
//! Semantics follow candle's `quantized_llama` (the reference this forward is tested against):
//! Q/K/V projections, interleaved rotary embedding of Q and K, scores `QKᵀ/√d` in f32, causal
//! mask applied by replacing masked scores with `-inf`, softmax over the last dimension,
//! weighted sum of V, output projection.
//!
//! Grouped-query attention (query head `h` reads key/value head `h / n_rep`) comes in two
//! flavours, chosen by [`GqaMode`]:
//!
//! - [`GqaMode::RepeatKv`] (default) expands the cached keys/values to one copy per query
//!   head, as candle's `repeat_kv` does, so every matmul has the shapes and strides of the
//!   reference: the logits are bit-identical to candle's `quantized_llama`. The copy costs
//!   `n_head * positions * head_dim * 2` floats per layer and token.
//! - [`GqaMode::Grouped`] copies nothing: the query heads that share a key/value head are
//!   stacked (`[1, n_head, seq, d] -> [1, n_kv_head, n_rep * seq, d]`, a free reshape) and
//!   multiplied by that head once. Same mathematics, fewer bytes moved per token (the gap grows
//!   with the context), but the matmuls have other shapes, so the float rounding differs from
//!   the reference; quantized activations amplify such rounding differences to a few tenths of
//!   a logit, as much as candle's own cached-versus-recomputed difference.
//!
//! Either way, chained shards stay bit-identical to one shard: the mode is per layer, and
//! every shard of a pipeline should use the same one.

use std::io::{Read, Seek};

use super::linear::Linear;
use candle_core::{DType, Module, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::config::LlamaConfig;
use super::error::Result;
use super::kv_cache::KvCache;
use super::options::LoadOptions;
use super::projection::Projection;
use super::rope::RotaryEmbedding;
use super::row_attention::{self, Heads, Span};
use super::sequence::LayerKv;
use super::weights::WeightReader;

/// How query heads are paired with shared key/value heads; see the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GqaMode {
    /// Expand keys/values per query head: bit-identical to candle's `quantized_llama`.
    #[default]
    RepeatKv,
    /// Stack query heads per key/value head: no copy, faster at long contexts.
    Grouped,
}

/// Self-attention of one transformer block.
#[derive(Debug)]
pub struct Attention {
    qkv: Projection,
    output: Linear,
    rope: RotaryEmbedding,
    cache: KvCache,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    gqa: GqaMode,
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
        options: &LoadOptions,
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
        let qkv = Projection::load(weights, &parts, config.n_embd, options.fuse_projections)?;
        let output = Linear::load(
            weights,
            &format!("blk.{layer}.attn_output.weight"),
            config.n_embd,
            q_width,
        )?;
        let device = weights.device().clone();
        Ok(Self {
            qkv,
            output,
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
            gqa: options.gqa,
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

    /// The query, key and value projections of `x`.
    fn project_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mut qkv = self.qkv.forward(x)?.into_iter();
        let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(candle_core::Error::Msg(
                "the QKV projection returned fewer than three tensors".into(),
            )
            .into());
        };
        Ok((q, k, v))
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
        let (q, k, v) = self.project_qkv(x)?;

        let q = q.reshape((batch, seq_len, n_head, hd))?.transpose(1, 2)?;
        let k = k.reshape((batch, seq_len, n_kv, hd))?.transpose(1, 2)?;
        let v = v
            .reshape((batch, seq_len, n_kv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.rope.apply(&q, index_pos)?;
        let k = self.rope.apply(&k, index_pos)?;

        let (k, v) = self.cache.append(index_pos, &k, &v)?;
        let y = match self.gqa {
            GqaMode::RepeatKv => self.attend_repeated(&q, &k, &v, mask)?,
            GqaMode::Grouped => self.attend_grouped(&q, &k, &v, mask)?,
        };
        let y = y.transpose(1, 2)?.reshape((batch, seq_len, n_head * hd))?;
        Ok(self.output.forward(&y)?)
    }

    /// The batched forward's attention: `x` (`[1, rows, n_embd]`, normed) holds the rows of
    /// several sequences, `spans[i]` says where sequence `i`'s rows are and at which position
    /// they start, and `caches[i]` is that sequence's cache of this layer, holding exactly
    /// `spans[i].pos` positions; their keys and values are appended. Each row attends only to
    /// its own sequence (see [`row_attention`](super::row_attention)); CPU only.
    pub fn forward_batch(
        &self,
        x: &Tensor,
        spans: &[Span],
        caches: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let (_, rows, _) = x.dims3()?;
        let (hd, n_head, n_kv) = (self.head_dim, self.n_head, self.n_kv_head);
        let (q_row, kv_row) = (n_head * hd, n_kv * hd);
        let (q, k, v) = self.project_qkv(x)?;
        let host = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (mut q, mut k, v) = (host(q)?, host(k)?, host(v)?);
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let end = span.pos + span.len;
            cache.k.resize(end * kv_row, f16::ZERO);
            cache.v.resize(end * kv_row, f16::ZERO);
            for r in 0..span.len {
                let (row, pos) = (span.start + r, span.pos + r);
                self.rope
                    .rotate_row(&mut q[row * q_row..(row + 1) * q_row], pos);
                let key = &mut k[row * kv_row..(row + 1) * kv_row];
                self.rope.rotate_row(key, pos);
                // Stored as f16, rounded to nearest (see `SequenceCache`).
                cache.k[pos * kv_row..(pos + 1) * kv_row].convert_from_f32_slice(key);
                cache.v[pos * kv_row..(pos + 1) * kv_row]
                    .convert_from_f32_slice(&v[row * kv_row..(row + 1) * kv_row]);
            }
        }
        let mut y = vec![0f32; rows * q_row];
        let shared: Vec<&LayerKv> = caches.iter().map(|c| &**c).collect();
        row_attention::attend(
            &q,
            spans,
            &shared,
            Heads {
                n_head,
                n_kv_head: n_kv,
                head_dim: hd,
            },
            &mut y,
        );
        let y = Tensor::from_vec(y, (1, rows, q_row), x.device())?;
        Ok(self.output.forward(&y)?)
    }

    /// Attention with keys/values expanded per query head (`q`: `[1, n_head, seq, d]`, `k`/`v`:
    /// `[1, n_kv_head, kv_len, d]` views); returns `[1, n_head, seq, d]`.
    fn attend_repeated(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let k = self.repeat_heads(k)?;
        let v = self.repeat_heads(v)?;
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = self.masked_softmax(att, mask)?;
        Ok(att.matmul(&v)?)
    }

    /// Attention with query heads stacked per key/value head; returns `[1, n_head, seq, d]`.
    fn attend_grouped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, n_head, seq_len, hd) = q.dims4()?;
        let (n_kv, n_rep, kv_len) = (self.n_kv_head, n_head / self.n_kv_head, k.dim(2)?);
        let q = q.reshape((batch, n_kv, n_rep * seq_len, hd))?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = att.reshape((batch, n_head, seq_len, kv_len))?;
        let att = self.masked_softmax(att, mask)?;
        let att = att.reshape((batch, n_kv, n_rep * seq_len, kv_len))?;
        Ok(att.matmul(v)?.reshape((batch, n_head, seq_len, hd))?)
    }

    /// `[1, n_kv_head, len, d]` -> contiguous `[1, n_head, len, d]`, head `h` a copy of head
    /// `h / n_rep` (what candle's `repeat_kv` produces, in one copy).
    fn repeat_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, n_kv, len, hd) = x.dims4()?;
        let n_rep = self.n_head / n_kv;
        if n_rep == 1 {
            return Ok(x.clone());
        }
        Ok(x.unsqueeze(2)?
            .broadcast_as((batch, n_kv, n_rep, len, hd))?
            .contiguous()?
            .reshape((batch, self.n_head, len, hd))?)
    }

    /// Hides masked scores (`-inf`) and normalises each row with a softmax.
    fn masked_softmax(&self, att: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let att = match mask {
            None => att,
            Some(mask) => {
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&self.neg_inf.broadcast_as(att.shape())?, &att)?
            }
        };
        Ok(candle_nn::ops::softmax_last_dim(&att)?)
    }
}
