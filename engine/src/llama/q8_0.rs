//! A CPU matmul for Q8_0 weights that gives exactly candle's bits, a little faster.
//!
//! SmolLM2's GGUF stores the token embedding table as Q8_0 and ties the output head to it, so
//! every generated token multiplies the hidden state by a `[49152, 576]` Q8_0 matrix (30 MB,
//! about a third of the weight bytes read per token). candle computes each output with its AVX2
//! `vec_dot_q8_0_q8_0`: per block, the integer dot product as eight `i32` lanes converted to
//! f32, `acc = fma(d_w · d_x, lanes, acc)`, then one horizontal sum. [`Q80Matrix`] runs the
//! very same instruction sequence per output (so the results are the same bits), with the f16
//! scales converted inline by F16C (candle calls a conversion function, which checks the CPU's
//! features, twice per block) and the rows split across the pool in chunks: about 25% less time
//! per head-sized matvec on the development machine (0.98 ms against 1.29 ms). Computing
//! several rows per call to share the input's loads was slower (worse code generation).
//!
//! It reads the blocks of the candle tensor it wraps (borrowed, not copied), so a tied
//! embedding table and its output head stay one copy. It is only used where candle itself would
//! take its AVX2+FMA path (x86-64 with both, checked at run time); elsewhere candle's
//! `QMatMul` runs, so the bits never depend on which of the two computed them. Every output is
//! computed by one thread, so results do not depend on the thread count.

use std::sync::Arc;

use candle_core::Tensor;
use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::cpu_matmul::SharedPtr;
use super::cpu_matmul::{self, CpuMatMul};

/// Values per Q8_0 block.
const QK: usize = 32;

/// One Q8_0 block, laid out exactly as candle's `BlockQ8_0` (and the file's).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Block {
    d: f16,
    qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<Block>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// A `[rows, cols]` Q8_0 weight matrix, multiplied on the right: `x @ Wᵀ`.
#[derive(Debug)]
pub struct Q80Matrix {
    tensor: Arc<QTensor>,
    rows: usize,
    cols: usize,
}

/// Whether candle's Q8_0 dot product takes its AVX2+FMA path here, which is the one this kernel
/// reproduces.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Q80Matrix {
    /// Wraps a 2-D Q8_0 tensor on the CPU; `None` for anything else or where the kernel is not
    /// [`available`].
    pub fn new(tensor: Arc<QTensor>) -> Option<Self> {
        if !available() || tensor.dtype() != GgmlDType::Q8_0 || !tensor.device().is_cpu() {
            return None;
        }
        let (rows, cols) = tensor.shape().dims2().ok()?;
        if cols % QK != 0 || tensor.data().ok()?.len() != rows * cols / QK * 34 {
            return None;
        }
        Some(Self { tensor, rows, cols })
    }

    /// `x @ Wᵀ` for `x` of shape `[..., cols]` (f32, CPU).
    pub fn forward(self: &Arc<Self>, x: &Tensor) -> candle_core::Result<Tensor> {
        cpu_matmul::forward(self, x)
    }

    /// `out[i * rows + r] = x_i · w_r` for the `m` rows of `x`.
    #[cfg(target_arch = "x86_64")]
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()> {
        let (n, k) = (self.rows, self.cols);
        let nb = k / QK;
        let data = self.tensor.data()?;
        // SAFETY: the storage is `rows * nb` candle `BlockQ8_0`s (length checked in `new`),
        // which have `Block`'s layout (repr(C), asserted sizes); `Block` has alignment 2 like
        // `BlockQ8_0`, and the storage is a `Vec<BlockQ8_0>`, so the pointer is aligned.
        let w: &[Block] =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const Block, n * nb) };
        let mut xq = vec![BlockQ8_0::zeros(); m * nb];
        for (row, blocks) in x.chunks_exact(k).zip(xq.chunks_exact_mut(nb)) {
            BlockQ8_0::from_float(row, blocks);
        }
        // SAFETY: as above, `BlockQ8_0` and `Block` share their layout.
        let xq: &[Block] =
            unsafe { std::slice::from_raw_parts(xq.as_ptr() as *const Block, m * nb) };
        let ptr = SharedPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            for r in range {
                let row = &w[r * nb..(r + 1) * nb];
                let mut i = 0;
                // Four input rows at a time share each weight block's loads.
                while i + 4 <= m {
                    let xs: [&[Block]; 4] =
                        std::array::from_fn(|j| &xq[(i + j) * nb..(i + j + 1) * nb]);
                    // SAFETY: `new` only succeeds where AVX2 and FMA were detected.
                    let v = unsafe { dot4_avx2(row, xs) };
                    for (j, v) in v.into_iter().enumerate() {
                        // SAFETY: in bounds; only the thread owning row r writes column r.
                        unsafe { ptr.write((i + j) * n + r, v) };
                    }
                    i += 4;
                }
                for (j, x) in xq[i * nb..].chunks_exact(nb).enumerate() {
                    // SAFETY: `new` only succeeds where AVX2 and FMA were detected.
                    let v = unsafe { dot_avx2(row, x) };
                    // SAFETY: in bounds; only the thread owning row r writes column r.
                    unsafe { ptr.write((i + j) * n + r, v) };
                }
            }
        });
        Ok(())
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn matmul(&self, _: &[f32], _: usize, _: &mut [f32]) -> candle_core::Result<()> {
        candle_core::bail!("the Q8_0 kernel needs x86-64")
    }
}

/// One output: weight row `w` against input row `x`, exactly candle's `vec_dot_q8_0_q8_0`
/// (the same instructions in the same order).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w` is as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[Block], x: &[Block]) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (wb, y) in w.iter().zip(x) {
        let d = _mm256_set1_ps(f16_to_f32(wb.d) * f16_to_f32(y.d));
        // SAFETY: wb.qs and y.qs are 32 bytes each; unaligned loads.
        let (bx, by) = unsafe {
            (
                _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i),
                _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i),
            )
        };
        // candle's mul_sum_i8_pairs_float(bx, by).
        let ax = _mm256_sign_epi8(bx, bx);
        let sy = _mm256_sign_epi8(by, bx);
        let dot = _mm256_maddubs_epi16(ax, sy);
        let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
        acc = _mm256_fmadd_ps(d, q, acc);
    }
    // candle's hsum_float_8.
    let res = _mm256_extractf128_ps(acc, 1);
    let res = _mm_add_ps(res, _mm256_castps256_ps128(acc));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// [`dot_avx2`] of weight row `w` against four input rows at once: each output runs exactly
/// the single-row instruction sequence (its own accumulator, blocks in order, the same
/// horizontal sum), only the weight block's load, absolute value and scale are shared.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; every `x` is as long as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(w: &[Block], x: [&[Block]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, wb) in w.iter().enumerate() {
        let wd = f16_to_f32(wb.d);
        // SAFETY: wb.qs is 32 bytes; unaligned load.
        let bx = unsafe { _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i) };
        let ax = _mm256_sign_epi8(bx, bx);
        for (acc, x) in acc.iter_mut().zip(&x) {
            let y = &x[b];
            let d = _mm256_set1_ps(wd * f16_to_f32(y.d));
            // SAFETY: y.qs is 32 bytes; unaligned load.
            let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i) };
            let sy = _mm256_sign_epi8(by, bx);
            let dot = _mm256_maddubs_epi16(ax, sy);
            let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
            *acc = _mm256_fmadd_ps(d, q, *acc);
        }
    }
    let mut out = [0f32; 4];
    for (out, acc) in out.iter_mut().zip(acc) {
        let res = _mm256_extractf128_ps(acc, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(acc));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        *out = _mm_cvtss_f32(res);
    }
    out
}

/// `x` widened to f32 with F16C (exact, like any f16 → f32 conversion), inline.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
fn f16_to_f32(x: f16) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(x.to_bits()))))
}

impl CpuMatMul for Q80Matrix {
    const NAME: &'static str = "q8_0-matmul";

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()> {
        self.matmul(x, m, out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu_matmul::testing::{random, to_vec};
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_bit_for_bit() {
        let cols = 576;
        for rows in [64, 101] {
            let w =
                Tensor::from_vec(random(rows * cols, 3), (rows, cols), &Device::Cpu).expect("w");
            let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize"));
            let Some(ours) = Q80Matrix::new(Arc::clone(&q)).map(Arc::new) else {
                assert!(!available());
                return;
            };
            let theirs = QMatMul::from_arc(q).expect("qmatmul");
            for m in [1, 3, 4, 9] {
                let x =
                    Tensor::from_vec(random(m * cols, 5 + m as u64), (1, m, cols), &Device::Cpu)
                        .expect("x");
                let a = to_vec(ours.forward(&x).expect("ours"));
                let b = to_vec(theirs.forward(&x).expect("theirs"));
                assert_eq!(a.len(), b.len());
                let same = a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "rows {rows}, m {m}");
            }
        }
    }

    #[test]
    fn other_types_are_not_taken() {
        let w = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q4_0).expect("q");
        assert!(Q80Matrix::new(Arc::new(q)).is_none());
    }

    /// Prints the time of one output-head-sized matvec, ours and candle's:
    /// `cargo test --release -p canopy-engine --lib q8_0 -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn time_head_sized_matvec() {
        let (rows, cols) = (49152, 576);
        let w = Tensor::from_vec(random(rows * cols, 3), (rows, cols), &Device::Cpu).expect("w");
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize"));
        let ours = Arc::new(Q80Matrix::new(Arc::clone(&q)).expect("available"));
        let theirs = QMatMul::from_arc(q).expect("qmatmul");
        let x = Tensor::from_vec(random(cols, 9), (1, 1, cols), &Device::Cpu).expect("x");
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..50 {
                ours.forward(&x).expect("ours");
            }
            let a = t.elapsed() / 50;
            let t = std::time::Instant::now();
            for _ in 0..50 {
                theirs.forward(&x).expect("theirs");
            }
            println!("ours {a:?}, candle {:?}", t.elapsed() / 50);
        }
    }
}
