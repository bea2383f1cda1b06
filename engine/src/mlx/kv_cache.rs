//! [`KvCache`]: one attention layer's keys and values, as MLX arrays written in place.
//!
//! The buffers are `[1, kv_heads, capacity, head_dim]` and grow in steps of [`STEP`]
//! positions (as mlx-lm's cache does) up to the model instance's `max_context`, so a decode
//! step writes one position with a slice update instead of copying the whole cache. Writing at
//! a position before the end rewinds (later positions are forgotten); a hole is refused by the
//! model before it gets here.

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::{Array, ops};

/// Positions the buffers grow by.
pub const STEP: usize = 256;

/// Keys and values of one layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    buffers: Option<(Array, Array)>,
    len: usize,
    capacity: usize,
    max_context: usize,
}

impl KvCache {
    /// An empty cache that will hold at most `max_context` positions.
    pub fn new(max_context: usize) -> Self {
        Self {
            buffers: None,
            len: 0,
            capacity: 0,
            max_context,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (keeps the buffers).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes `keys` and `values` (`[1, kv_heads, seq, head_dim]`) at positions
    /// `start..start + seq` and returns all cached keys and values `0..start + seq`.
    ///
    /// The caller guarantees `start <= len()` and `start + seq <= max_context`.
    pub fn update(
        &mut self,
        start: usize,
        keys: &Array,
        values: &Array,
    ) -> Result<(Array, Array), Exception> {
        let seq = keys.dim(2) as usize;
        let end = start + seq;
        if end > self.capacity || self.buffers.is_none() {
            self.grow(end, keys)?;
        }
        let (k, v) = self
            .buffers
            .as_mut()
            .ok_or_else(|| Exception::custom("KV cache buffers missing after growing"))?;
        let (s, e) = (start as i32, end as i32);
        k.try_index_mut((.., .., s..e, ..), keys)?;
        v.try_index_mut((.., .., s..e, ..), values)?;
        self.len = end;
        Ok((
            k.try_index((.., .., ..e, ..))?,
            v.try_index((.., .., ..e, ..))?,
        ))
    }

    /// Reallocates the buffers to hold at least `end` positions, keeping the cached ones.
    fn grow(&mut self, end: usize, like: &Array) -> Result<(), Exception> {
        let capacity = end
            .div_ceil(STEP)
            .saturating_mul(STEP)
            .min(self.max_context)
            .max(end);
        let shape = like.shape();
        let (batch, heads, head_dim) = (shape[0], shape[1], shape[3]);
        let kept = self.len.min(self.capacity);
        let zeros = |positions: usize| {
            ops::zeros_dtype(&[batch, heads, positions as i32, head_dim], like.dtype())
        };
        let regrow = |old: &Array| -> Result<Array, Exception> {
            let old = old.try_index((.., .., ..kept as i32, ..))?;
            ops::concatenate(&[old, zeros(capacity - kept)?], 2)
        };
        self.buffers = Some(match &self.buffers {
            Some((k, v)) if kept > 0 => (regrow(k)?, regrow(v)?),
            _ => (zeros(capacity)?, zeros(capacity)?),
        });
        self.capacity = capacity;
        Ok(())
    }
}
