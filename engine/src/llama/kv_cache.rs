//! [`KvCache`]: one attention layer's keys and values, preallocated and written in place.
//!
//! The cache holds `[1, n_kv_head, capacity, head_dim]` buffers allocated once when the shard
//! loads. A forward at positions `index_pos..index_pos + seq` writes its keys/values into those
//! rows with `slice_set` (no concatenation, no reallocation per step) and reads back the
//! `0..index_pos + seq` prefix as strided views. Writing at an `index_pos` below the cached
//! length rewinds the cache (later positions are dropped), which is how a caller restarts or
//! edits a sequence; writing past the cached length would leave a hole and is refused by the
//! shard.
//!
//! On CPU the buffers come from zeroed allocations, which the OS maps lazily: a 4096-position
//! cache only occupies memory as positions are written. On GPUs the full capacity is reserved
//! at load time, so running out of memory happens then rather than mid-generation.

use candle_core::{DType, Device, Tensor};

use super::error::{LlamaError, Result};

/// Keys and values of one attention layer for positions `0..len()`.
///
/// Not `Clone`: clones would share the buffers that [`KvCache::append`] writes in place.
#[derive(Debug)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Allocates a cache for `capacity` positions of `n_kv_head` heads of width `head_dim`.
    pub fn new(
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (1, n_kv_head, capacity, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            len: 0,
            capacity,
        })
    }

    /// Positions currently cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every cached position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes `k` and `v` (`[1, n_kv_head, seq, head_dim]`) at positions
    /// `index_pos..index_pos + seq` and returns views of the keys and values of positions
    /// `0..index_pos + seq`.
    ///
    /// Requires `index_pos <= len()` (no hole) and `index_pos + seq <= capacity()`.
    pub fn append(&mut self, index_pos: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq_len = k.dim(2)?;
        let end = index_pos + seq_len;
        if index_pos > self.len {
            return Err(LlamaError::PositionGap {
                index_pos,
                cached: self.len,
            });
        }
        if end > self.capacity {
            return Err(LlamaError::ContextFull {
                index_pos,
                end,
                capacity: self.capacity,
            });
        }
        self.k.slice_set(&k.contiguous()?, 2, index_pos)?;
        self.v.slice_set(&v.contiguous()?, 2, index_pos)?;
        self.len = end;
        Ok((self.k.narrow(2, 0, end)?, self.v.narrow(2, 0, end)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(value: f32, seq: usize) -> Tensor {
        Tensor::full(value, (1, 2, seq, 4), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn appends_in_place_and_rewinds() {
        let mut cache = KvCache::new(2, 4, 8, DType::F32, &Device::Cpu).expect("cache");
        let (k, v) = cache
            .append(0, &filled(1.0, 3), &filled(-1.0, 3))
            .expect("prefill");
        assert_eq!(k.dims(), &[1, 2, 3, 4]);
        assert_eq!(v.dims(), &[1, 2, 3, 4]);
        let (k, _) = cache
            .append(3, &filled(2.0, 1), &filled(-2.0, 1))
            .expect("decode");
        assert_eq!(cache.len(), 4);
        let row: Vec<f32> = k
            .get(0)
            .and_then(|h| h.get(0))
            .and_then(|h| h.flatten_all())
            .and_then(|h| h.to_vec1())
            .expect("row");
        assert_eq!(
            row,
            [
                1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0
            ]
        );
        // Rewind to position 1.
        let (k, _) = cache
            .append(1, &filled(5.0, 1), &filled(-5.0, 1))
            .expect("rewind");
        assert_eq!(cache.len(), 2);
        let row: Vec<f32> = k
            .get(0)
            .and_then(|h| h.get(1))
            .and_then(|h| h.flatten_all())
            .and_then(|h| h.to_vec1())
            .expect("row");
        assert_eq!(row, [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]);
    }

    #[test]
    fn refuses_holes_and_overflow() {
        let mut cache = KvCache::new(2, 4, 4, DType::F32, &Device::Cpu).expect("cache");
        assert!(matches!(
            cache.append(1, &filled(1.0, 1), &filled(1.0, 1)),
            Err(LlamaError::PositionGap {
                index_pos: 1,
                cached: 0
            })
        ));
        assert!(matches!(
            cache.append(0, &filled(1.0, 5), &filled(1.0, 5)),
            Err(LlamaError::ContextFull {
                end: 5,
                capacity: 4,
                ..
            })
        ));
        cache
            .append(0, &filled(1.0, 4), &filled(1.0, 4))
            .expect("fits exactly");
        cache.clear();
        assert!(cache.is_empty());
    }
}
