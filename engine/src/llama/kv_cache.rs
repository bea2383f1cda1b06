//! [`KvCache`]: one attention layer's keys and values, written in place.
//!
//! The cache holds `[1, n_kv_head, allocated, head_dim]` buffers. A forward at positions
//! `index_pos..index_pos + seq` writes its keys/values into those rows with `slice_set` (no
//! concatenation per step) and reads back the `0..index_pos + seq` prefix as strided views.
//! Writing at an `index_pos` below the cached length rewinds the cache (later positions are
//! dropped), which is how a caller restarts or edits a sequence; writing past the cached length
//! would leave a hole and is refused by the shard.
//!
//! On CPU the buffers start small ([`INITIAL_POSITIONS`]) and double, up to the capacity, when
//! a forward needs more rows (the kept prefix is copied once per doubling, so the cost per
//! position stays constant). Memory then follows the positions actually in use instead of
//! relying on the allocator handing out lazily-mapped zero pages for a full-capacity buffer:
//! a recycled heap block is zeroed eagerly, which made every layer's whole 4096-position cache
//! resident (tens of MiB for a small model) as soon as a model was loaded a second time in the
//! same process. Values are copied exactly, so growth cannot change any result. On GPUs the
//! full capacity is reserved at load time, so running out of memory happens then rather than
//! mid-generation.

use candle_core::{DType, Device, Tensor};

use super::error::{LlamaError, Result};

/// Positions a CPU cache allocates at first (it doubles from there, up to its capacity).
pub const INITIAL_POSITIONS: usize = 256;

/// Keys and values of one attention layer for positions `0..len()`.
///
/// Not `Clone`: clones would share the buffers that [`KvCache::append`] writes in place.
#[derive(Debug)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
    capacity: usize,
    allocated: usize,
}

impl KvCache {
    /// A cache for up to `capacity` positions of `n_kv_head` heads of width `head_dim`: all of
    /// it allocated now on a GPU, [`INITIAL_POSITIONS`] of it (growing on demand) on CPU.
    pub fn new(
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let allocated = if device.is_cpu() {
            capacity.min(INITIAL_POSITIONS)
        } else {
            capacity
        };
        let shape = (1, n_kv_head, allocated, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            len: 0,
            capacity,
            allocated,
        })
    }

    /// Positions the buffers hold now (at most [`KvCache::capacity`]).
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Reallocates the buffers for at least `positions` positions (doubling), keeping the
    /// first `keep` positions.
    fn grow(&mut self, positions: usize, keep: usize) -> Result<()> {
        let allocated = positions
            .max(self.allocated.saturating_mul(2))
            .min(self.capacity);
        let (_, n_kv_head, _, head_dim) = self.k.dims4()?;
        let shape = (1, n_kv_head, allocated, head_dim);
        let (dtype, device) = (self.k.dtype(), self.k.device().clone());
        let k = Tensor::zeros(shape, dtype, &device)?;
        let v = Tensor::zeros(shape, dtype, &device)?;
        if keep > 0 {
            k.slice_set(&self.k.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
            v.slice_set(&self.v.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
        }
        (self.k, self.v, self.allocated) = (k, v, allocated);
        Ok(())
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
        if end > self.allocated {
            self.grow(end, index_pos)?;
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
    fn grows_on_cpu_and_keeps_the_prefix() {
        let mut cache = KvCache::new(2, 4, 1000, DType::F32, &Device::Cpu).expect("cache");
        assert_eq!(cache.allocated(), INITIAL_POSITIONS);
        let first = Tensor::arange(0f32, (2 * 200 * 4) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((1, 2, 200, 4)))
            .expect("first");
        cache.append(0, &first, &first).expect("prefill");
        let (k, v) = cache
            .append(200, &filled(7.0, 100), &filled(-7.0, 100))
            .expect("grow");
        assert_eq!(cache.allocated(), 2 * INITIAL_POSITIONS);
        assert_eq!(k.dims(), &[1, 2, 300, 4]);
        let prefix = |t: &Tensor| {
            t.narrow(2, 0, 200)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("prefix")
        };
        let want = first
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("want");
        assert_eq!(prefix(&k), want);
        assert_eq!(prefix(&v), want);
        let tail: Vec<f32> = v
            .narrow(2, 200, 100)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("tail");
        assert!(tail.iter().all(|&x| x == -7.0));
        cache
            .append(300, &filled(1.0, 700), &filled(1.0, 700))
            .expect("up to the capacity");
        assert_eq!(cache.allocated(), 1000);
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
