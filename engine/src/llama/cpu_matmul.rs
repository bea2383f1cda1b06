//! What the hand-written quantized CPU matmuls ([`Q41Matrix`](super::q4_1::Q41Matrix) and
//! [`Q80Matrix`](super::q8_0::Q80Matrix)) share: the candle custom op that checks the input and
//! shapes the output around a kernel, and the pointer their pool threads write through.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// A weight matrix `[rows, cols]` with a CPU kernel for `x @ Wᵀ`.
pub(super) trait CpuMatMul: Send + Sync + 'static {
    /// The op's name in candle's errors and traces (`"q4_1-matmul"`).
    const NAME: &'static str;

    /// Output features.
    fn rows(&self) -> usize;

    /// Input features.
    fn cols(&self) -> usize;

    /// `out[i * rows + r] = x_i · w_r` for the `m` rows of `x` (`m * cols` values; `out` holds
    /// `m * rows`).
    fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()>;
}

/// `x @ Wᵀ` for `x` of shape `[..., cols]` (f32, CPU), through `w`'s kernel.
pub(super) fn forward<W: CpuMatMul>(w: &Arc<W>, x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MatMulOp(Arc::clone(w)))
}

/// The custom op: validates the input, runs the kernel, shapes the output `[..., rows]`.
struct MatMulOp<W>(Arc<W>);

impl<W: CpuMatMul> CustomOp1 for MatMulOp<W> {
    fn name(&self) -> &'static str {
        W::NAME
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let name = W::NAME;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{name} expects f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{name} expects a contiguous input");
        };
        let dims = layout.shape().dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("{name} expects at least one dimension");
        };
        if k != w.cols() {
            candle_core::bail!("{name}: input width {k}, weight width {}", w.cols());
        }
        let m: usize = batch.iter().product();
        let mut out = vec![0f32; m * w.rows()];
        w.matmul_into(&data[start..end], m, &mut out)?;
        let mut shape = batch.to_vec();
        shape.push(w.rows());
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// A pointer to a buffer that pool threads write disjoint elements of.
#[derive(Clone, Copy)]
pub(super) struct SharedPtr<T>(pub(super) *mut T);

// SAFETY: every thread writes a disjoint set of indices, and the buffer outlives the pool call.
unsafe impl<T> Send for SharedPtr<T> {}
unsafe impl<T> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is in bounds and no other thread writes it.
    pub(super) unsafe fn write(&self, index: usize, value: T) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(index) = value };
    }
}

/// Helpers the kernels' tests share.
#[cfg(test)]
pub(super) mod testing {
    use candle_core::Tensor;

    /// `n` values in [-0.5, 0.5) from a fixed LCG: the same for a seed on every machine.
    pub(in crate::llama) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// A tensor's values, flattened.
    pub(in crate::llama) fn to_vec(t: Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("vec")
    }
}
