//! [`SequenceCache`]: one sequence's keys and values in every layer of a shard, owned by the
//! caller of the batched forward ([`LlamaShard::forward_batch`](super::LlamaShard::forward_batch)).
//!
//! The batched forward runs many sequences through one set of weights, so the caches live
//! outside the layers: each sequence brings its own. Each layer keeps two plain buffers laid
//! out position-major (`[position][kv_head][head_dim]`), so appending a position writes one
//! contiguous row and growing is a `Vec` resize that never reorders what is kept. A cache can
//! be truncated (a prefix kept, e.g. when a new request shares a prompt prefix with the
//! sequence that filled it) and its first positions copied into another cache.
//!
//! Keys and values are stored as IEEE half floats (`f16`, rounded to nearest even from the
//! f32 the projections compute), as llama.cpp stores them by default: half the memory of f32,
//! and half the bytes the attention reads per position. The rounding is a pure function of
//! the value, so a position's keys and values still do not depend on which forward (or which
//! chunk of a prompt) wrote them. (A value beyond f16's range, ±65504, would become infinite,
//! as in llama.cpp; a llama layer's keys and values stay orders of magnitude below it.)

use half::f16;

/// Keys and values of one layer, position-major.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub(super) k: Vec<f16>,
    pub(super) v: Vec<f16>,
}

/// One sequence's cache across the layers of one shard.
#[derive(Debug, Clone)]
pub struct SequenceCache {
    layers: Vec<LayerKv>,
    /// Floats per position and layer (`n_kv_head * head_dim`).
    row: usize,
    len: usize,
    capacity: usize,
}

impl SequenceCache {
    /// An empty cache for `n_layers` layers of `row` floats per position (`n_kv_head *
    /// head_dim`), holding at most `capacity` positions. Nothing is allocated until written.
    pub fn new(n_layers: usize, row: usize, capacity: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); n_layers],
            row,
            len: 0,
            capacity,
        }
    }

    /// A cache holding `len` zero positions (for tests of what holds caches).
    #[cfg(test)]
    pub(crate) fn zeroed(n_layers: usize, row: usize, capacity: usize, len: usize) -> Self {
        let mut cache = Self::new(n_layers, row, capacity);
        for layer in &mut cache.layers {
            layer.k.resize(len * row, f16::ZERO);
            layer.v.resize(len * row, f16::ZERO);
        }
        cache.len = len;
        cache
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions the cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps the first `len` positions (no-op if fewer are cached); the buffers are kept.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            for layer in &mut self.layers {
                layer.k.truncate(len * self.row);
                layer.v.truncate(len * self.row);
            }
        }
    }

    /// Forgets every position and frees the buffers.
    pub fn release(&mut self) {
        self.len = 0;
        for layer in &mut self.layers {
            *layer = LayerKv::default();
        }
    }

    /// Replaces this cache's contents with the first `len` positions of `other` (which must
    /// have the same shape and hold at least `len` positions).
    pub fn copy_prefix_from(&mut self, other: &SequenceCache, len: usize) {
        assert!(
            other.layers.len() == self.layers.len() && other.row == self.row && len <= other.len,
            "copy_prefix_from: mismatched caches"
        );
        let n = len * self.row;
        for (dst, src) in self.layers.iter_mut().zip(&other.layers) {
            dst.k.clear();
            dst.k.extend_from_slice(&src.k[..n]);
            dst.v.clear();
            dst.v.extend_from_slice(&src.v[..n]);
        }
        self.len = len;
    }

    /// Bytes the buffers hold now (allocated, not only used).
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f16>())
            .sum()
    }

    /// Bytes one position takes across the layers.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.layers.len() * self.row * std::mem::size_of::<f16>()
    }

    /// Layers of the cache.
    pub(super) fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// Layers of the cache.
    pub(super) fn layers_len(&self) -> usize {
        self.layers.len()
    }

    /// Floats per position and layer.
    pub(super) fn row(&self) -> usize {
        self.row
    }

    /// Records that positions up to `len` are now written in every layer.
    pub(super) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(cache: &mut SequenceCache, len: usize, value: f32) {
        let row = cache.row();
        for layer in cache.layers_mut() {
            layer.k.resize(len * row, f16::from_f32(value));
            layer.v.resize(len * row, f16::from_f32(-value));
        }
        cache.set_len(len);
    }

    #[test]
    fn truncates_copies_and_releases() {
        let mut a = SequenceCache::new(2, 4, 16);
        filled(&mut a, 5, 1.0);
        assert_eq!(a.len(), 5);
        assert_eq!(a.bytes_per_position(), 2 * 2 * 4 * 2);
        let mut b = SequenceCache::new(2, 4, 16);
        b.copy_prefix_from(&a, 3);
        assert_eq!(b.len(), 3);
        assert_eq!(b.layers[1].k, vec![f16::ONE; 12]);
        assert_eq!(b.layers[1].v, vec![f16::NEG_ONE; 12]);
        a.truncate(2);
        assert_eq!(a.len(), 2);
        assert_eq!(a.layers[0].k.len(), 8);
        a.truncate(4);
        assert_eq!(a.len(), 2, "truncate never grows");
        assert!(a.allocated_bytes() > 0);
        a.release();
        assert!(a.is_empty());
        assert_eq!(a.allocated_bytes(), 0);
    }
}
