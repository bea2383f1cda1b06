//! A fast CPU matmul for Q4_1 weights, bit-identical to candle's own.
//!
//! candle has SIMD kernels for Q4_0 and Q8_0 but computes Q4_1 dot products with scalar code,
//! which makes the default model (SmolLM2-135M, Q4_1) about three times slower than llama.cpp.
//! [`Q41Matrix`] holds the weight's raw Q4_1 blocks and multiplies them the way candle does:
//! each input row is quantized to Q8_1 with candle's own `BlockQ8_1::from_float`, and each
//! output is `Σ_blocks (sumi · d_w · d_x + m_w · s_x)` accumulated in block order, where `sumi`
//! is the exact integer dot product of a block. Only `sumi` is computed differently (AVX2
//! `maddubs`/`madd` when the CPU has AVX2, chosen at run time; the scalar loop otherwise): it
//! is an integer, so the float results are the same bits as candle's scalar path, and the
//! shard-equivalence and snapshot tests keep holding.
//!
//! Output rows are split across candle's CPU thread pool; every output element is computed by
//! one thread start to end, so results do not depend on the thread count.

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::f16;

/// Values per Q4_1 / Q8_1 block.
const QK: usize = 32;

/// One Q4_1 weight block, its scale and minimum widened to f32 at load (an exact conversion,
/// done once instead of at every dot product).
#[derive(Clone, Copy, Debug)]
struct BlockQ41 {
    d: f32,
    m: f32,
    qs: [u8; QK / 2],
}

/// One quantized input block with its f16 scale and sum widened to f32 (exact).
#[derive(Clone, Copy)]
struct InputBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// One Q8_1 block, laid out exactly as candle's `BlockQ8_1`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ81 {
    d: f16,
    s: f16,
    qs: [i8; QK],
}

const Q4_1_BLOCK_BYTES: usize = 20;
const _: () = assert!(std::mem::size_of::<BlockQ81>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

/// A `[rows, cols]` Q4_1 weight matrix, multiplied on the right: `x @ Wᵀ`.
#[derive(Debug)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ41>,
}

/// Whether this CPU runs the AVX2 kernel.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Q41Matrix {
    /// Takes the blocks of a 2-D Q4_1 tensor; `None` for any other type or shape.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        if tensor.dtype() != GgmlDType::Q4_1 {
            return None;
        }
        let (rows, cols) = tensor.shape().dims2().ok()?;
        if cols % QK != 0 {
            return None;
        }
        let data = tensor.data().ok()?;
        let n_blocks = rows * cols / QK;
        if data.len() != n_blocks * Q4_1_BLOCK_BYTES {
            return None;
        }
        let blocks = data
            .chunks_exact(Q4_1_BLOCK_BYTES)
            .map(|b| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&b[4..20]);
                BlockQ41 {
                    d: f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    m: f16::from_le_bytes([b[2], b[3]]).to_f32(),
                    qs,
                }
            })
            .collect();
        Some(Self { rows, cols, blocks })
    }

    /// `x @ Wᵀ` for `x` of shape `[..., cols]` (f32, CPU).
    pub fn forward(self: &Arc<Self>, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op1_no_bwd(&Q41MatMul(Arc::clone(self)))
    }

    fn row(&self, r: usize) -> &[BlockQ41] {
        let per_row = self.cols / QK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }
}

/// Quantizes one input row to Q8_1 with candle's own code.
fn quantize_row(x: &[f32]) -> Vec<InputBlock> {
    let mut candle_blocks = vec![BlockQ8_1::zeros(); x.len() / QK];
    BlockQ8_1::from_float(x, &mut candle_blocks);
    candle_blocks
        .iter()
        .map(|b| {
            // SAFETY: BlockQ8_1 and BlockQ81 are both repr(C) {f16, f16, [i8; 32]} (asserted
            // sizes above); this reads the bytes of a valid block.
            let b = unsafe { std::mem::transmute_copy::<BlockQ8_1, BlockQ81>(b) };
            InputBlock {
                d: b.d.to_f32(),
                s: b.s.to_f32(),
                qs: b.qs,
            }
        })
        .collect()
}

fn sumi_scalar(w: &BlockQ41, x: &InputBlock) -> i32 {
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        let v0 = (w.qs[j] & 0x0F) as i32;
        let v1 = (w.qs[j] >> 4) as i32;
        sumi += v0 * x.qs[j] as i32 + v1 * x.qs[j + QK / 2] as i32;
    }
    sumi
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sumi_avx2(w: &BlockQ41, x: &InputBlock) -> i32 {
    // SAFETY: this function only runs where AVX2 is available.
    unsafe { sumi_unpacked_avx2(unpack_avx2(w), x) }
}

/// The 32 weights of a block as bytes: element j is the low nibble of qs[j], element j + 16
/// the high nibble (ggml's order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn unpack_avx2(w: &BlockQ41) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: qs is 16 readable bytes; unaligned load.
    unsafe {
        let packed = _mm_loadu_si128(w.qs.as_ptr() as *const __m128i);
        let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        _mm256_set_m128i(high, low)
    }
}

/// The exact integer dot product of unpacked weights with an input block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sumi_unpacked_avx2(w8: std::arch::x86_64::__m256i, x: &InputBlock) -> i32 {
    use std::arch::x86_64::*;
    // SAFETY: x.qs is 32 readable bytes; unaligned load.
    unsafe {
        let x8 = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
        let pairs = _mm256_maddubs_epi16(w8, x8);
        let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        let sum128 = _mm_add_epi32(
            _mm256_castsi256_si128(quads),
            _mm256_extracti128_si256(quads, 1),
        );
        let sum64 = _mm_add_epi32(sum128, _mm_unpackhi_epi64(sum128, sum128));
        let sum32 = _mm_add_epi32(sum64, _mm_shuffle_epi32(sum64, 0b01));
        _mm_cvtsi128_si32(sum32)
    }
}

/// One output: candle's float accumulation over exact integer block dots.
fn dot(row: &[BlockQ41], xs: &[InputBlock], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 was detected at run time.
        return unsafe { dot_avx2(row, xs) };
    }
    let _ = simd;
    let mut sumf = 0f32;
    for (w, x) in row.iter().zip(xs) {
        sumf += sumi_scalar(w, x) as f32 * w.d * x.d + w.m * x.s;
    }
    sumf
}

/// [`dot`] with the integer part in AVX2, compiled as one function so it inlines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(row: &[BlockQ41], xs: &[InputBlock]) -> f32 {
    let mut sumf = 0f32;
    for (w, x) in row.iter().zip(xs) {
        // SAFETY: this function only runs where AVX2 is available.
        let sumi = unsafe { sumi_avx2(w, x) };
        sumf += sumi as f32 * w.d * x.d + w.m * x.s;
    }
    sumf
}

/// Four outputs at once: one weight row against four input rows, each weight block unpacked
/// once. Each output is accumulated exactly as [`dot`] does, so the bits are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot4_avx2(row: &[BlockQ41], xs: [&[InputBlock]; 4]) -> [f32; 4] {
    let mut sums = [0f32; 4];
    for (b, w) in row.iter().enumerate() {
        // SAFETY: this function only runs where AVX2 is available.
        let w8 = unsafe { unpack_avx2(w) };
        for (sum, x) in sums.iter_mut().zip(xs) {
            let x = &x[b];
            // SAFETY: as above.
            let sumi = unsafe { sumi_unpacked_avx2(w8, x) };
            *sum += sumi as f32 * w.d * x.d + w.m * x.s;
        }
    }
    sums
}

/// A pointer to the output buffer that threads write disjoint ranges of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every thread writes a disjoint set of indices, and the buffer outlives the pool call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is in bounds and no other thread writes it.
    unsafe fn write(&self, index: usize, value: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(index) = value };
    }
}

struct Q41MatMul(Arc<Q41Matrix>);

impl CustomOp1 for Q41MatMul {
    fn name(&self) -> &'static str {
        "q4_1-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4_1 matmul expects f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4_1 matmul expects a contiguous input");
        };
        let x = &data[start..end];
        let dims = layout.shape().dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("q4_1 matmul expects at least one dimension");
        };
        if k != w.cols {
            candle_core::bail!("q4_1 matmul: input width {k}, weight width {}", w.cols);
        }
        let m: usize = batch.iter().product();
        let n = w.rows;
        let xq: Vec<Vec<InputBlock>> = x.chunks_exact(k).map(quantize_row).collect();
        let mut out = vec![0f32; m * n];
        let ptr = OutPtr(out.as_mut_ptr());
        let simd = simd_available();
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            for r in range {
                let row = w.row(r);
                let mut i = 0;
                #[cfg(target_arch = "x86_64")]
                if simd {
                    while i + 4 <= xq.len() {
                        let xs = [&xq[i][..], &xq[i + 1][..], &xq[i + 2][..], &xq[i + 3][..]];
                        // SAFETY: `simd` is only true when AVX2 was detected at run time.
                        let v = unsafe { dot4_avx2(row, xs) };
                        for (j, v) in v.into_iter().enumerate() {
                            // SAFETY: index (i + j) * n + r is written only by the thread
                            // owning row r.
                            unsafe { ptr.write((i + j) * n + r, v) };
                        }
                        i += 4;
                    }
                }
                for (i, xs) in xq.iter().enumerate().skip(i) {
                    let v = dot(row, xs, simd);
                    // SAFETY: index i * n + r is written by the one thread owning row r.
                    unsafe { ptr.write(i * n + r, v) };
                }
            }
        });
        let mut shape = batch.to_vec();
        shape.push(n);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    fn random(n: usize, seed: u64) -> Vec<f32> {
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

    #[test]
    fn matches_candle_bit_for_bit() {
        let dev = Device::Cpu;
        let (rows, cols) = (96, 256);
        let w = Tensor::from_vec(random(rows * cols, 1), (rows, cols), &dev).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
        let ours = Arc::new(Q41Matrix::from_qtensor(&q).expect("q4_1"));
        let theirs = QMatMul::from_qtensor(q).expect("qmatmul");
        for m in [1, 3, 17] {
            let x =
                Tensor::from_vec(random(m * cols, 7 + m as u64), (1, m, cols), &dev).expect("x");
            let a: Vec<f32> = ours
                .forward(&x)
                .expect("ours")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            let b: Vec<f32> = theirs
                .forward(&x)
                .expect("theirs")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            assert_eq!(a, b, "m = {m}");
        }
    }

    #[test]
    fn simd_and_scalar_block_dots_agree() {
        let w = BlockQ41 {
            d: 0.5,
            m: -1.0,
            qs: std::array::from_fn(|i| (i * 37 % 256) as u8),
        };
        let x = InputBlock {
            d: 0.1,
            s: 3.0,
            qs: std::array::from_fn(|i| (i as i32 * 53 % 255 - 127) as i8),
        };
        if simd_available() {
            #[cfg(target_arch = "x86_64")]
            assert_eq!(unsafe { sumi_avx2(&w, &x) }, sumi_scalar(&w, &x));
        }
    }

    #[test]
    fn other_types_are_not_taken() {
        let w = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q");
        assert!(Q41Matrix::from_qtensor(&q).is_none());
    }
}
