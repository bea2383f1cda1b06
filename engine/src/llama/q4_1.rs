//! A fast CPU matmul for Q4_1 weights, bit-identical to candle's own, over the weights' only
//! copy.
//!
//! candle has SIMD kernels for Q4_0 and Q8_0 but computes Q4_1 dot products with scalar code,
//! which makes the default model (SmolLM2-135M, Q4_1) about three times slower than llama.cpp.
//! [`Q41Matrix`] multiplies Q4_1 weights the way candle does: each input row is quantized to
//! Q8_1 with candle's own `BlockQ8_1::from_float`, and each output is
//! `Σ_blocks (sumi · d_w · d_x + m_w · s_x)` accumulated in block order, where `sumi` is the
//! exact integer dot product of a block. Only `sumi` is computed differently (AVX2
//! `maddubs`/`madd`), and it is an integer, so the float results are the same bits as candle's
//! scalar path, and the shard-equivalence and snapshot tests keep holding.
//!
//! # Layout (one copy, 20 bytes per block)
//!
//! The matrix is built straight from the GGUF bytes and is the only copy of the weights: no
//! candle `QTensor` is kept next to it. Rows are stored in groups of eight ([`GROUP`]); for
//! each block column a group holds the eight rows' f16 scales, their eight f16 minimums and
//! their eight 16-byte nibble arrays, 160 bytes, exactly the size of the eight GGUF blocks.
//! The nibble arrays are ordered so that one 32-byte load holds rows `p` and `p + 4`, and the
//! integer dot products of all eight rows come out of three horizontal adds in row order. The
//! float part then runs with eight rows in the eight lanes of one register: each lane does
//! exactly the scalar `sum += sumi * d_w * d_x + m_w * s_x` (separate multiplies and adds, no
//! FMA, f16 → f32 conversions are exact), so every output keeps candle's accumulation order
//! bit for bit. A last partial group is padded with zero rows whose outputs are discarded.
//!
//! # Kernels
//!
//! - **AVX2 + F16C** (chosen at run time): one group of eight rows against a tile of eight
//!   input rows at a time, so a prompt's rows share each unpacked weight block (prefill), or
//!   against the single input row (decode). The integer dot products use `maddubs`/`madd`.
//! - **AVX-VNNI** (chosen at run time where the CPU has it, e.g. AMD Zen 4, Intel Alder Lake
//!   and later): the same kernel with `vpdpbusd` for the integer step, about 10% faster
//!   (`CANOPY_Q4_1_NO_VNNI=1` turns it off, for comparisons).
//! - **scalar**: any other CPU; reads the same layout, one row at a time, with the same float
//!   expression, so it gives the same bits as the SIMD kernels (checked in the unit tests,
//!   which run every kernel the CPU has).
//!
//! Work is split across candle's CPU thread pool by groups of output rows; every output
//! element is computed by one thread start to end, so results do not depend on the thread
//! count. The input rows are quantized once per call, in parallel across the same pool (each
//! row by one thread, with candle's code).

use std::sync::Arc;

use candle_core::Tensor;
use candle_core::quantized::k_quants::{BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::cpu_matmul::{self, CpuMatMul, SharedPtr};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Values per Q4_1 / Q8_1 block.
const QK: usize = 32;

/// Output rows stored (and computed) together.
pub const GROUP: usize = 8;

/// Bytes of one Q4_1 block in a GGUF file: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;

/// Input rows that share one unpacked weight block in the SIMD prefill kernels (8 was a little
/// faster than 2 or 4 in `time_layer_matmuls`).
const TILE: usize = 8;

/// One block column of a group of [`GROUP`] rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GroupBlock {
    /// The rows' scales (f16 bits), in row order.
    d: [u16; GROUP],
    /// The rows' minimums (f16 bits), in row order.
    m: [u16; GROUP],
    /// The rows' nibbles (GGUF order: element `j` is the low nibble of byte `j`, element
    /// `j + 16` its high nibble), in slot order (see [`slot`]).
    qs: [[u8; QK / 2]; GROUP],
}

const _: () = assert!(std::mem::size_of::<GroupBlock>() == GROUP * BLOCK_BYTES);

/// Where row `r` (of its group) keeps its nibbles: rows `p` and `p + 4` are adjacent, so one
/// 32-byte load reads both.
const fn slot(r: usize) -> usize {
    if r < GROUP / 2 {
        2 * r
    } else {
        2 * (r - GROUP / 2) + 1
    }
}

/// One quantized input block with its f16 scale and sum widened to f32 (exact).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
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

const _: () = assert!(std::mem::size_of::<BlockQ81>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

/// Which kernel computes the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    /// AVX2 + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 + F16C + AVX-VNNI (`vpdpbusd`, 256-bit VEX form).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs (decided once per process).
    fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if simd_available() {
                if std::env::var_os("CANOPY_Q4_1_NO_VNNI").is_none()
                    && std::arch::is_x86_feature_detected!("avxvnni")
                {
                    return Self::AvxVnni;
                }
                return Self::Avx2;
            }
            Self::Scalar
        })
    }

    /// Every kernel this CPU can run (the unit tests compare them).
    #[cfg(test)]
    fn all_available() -> Vec<Self> {
        let mut all = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        if simd_available() {
            all.push(Self::Avx2);
            if std::arch::is_x86_feature_detected!("avxvnni") {
                all.push(Self::AvxVnni);
            }
        }
        all
    }
}

/// Whether this CPU runs the SIMD kernel (x86-64 with AVX2 and F16C).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[rows, cols]` Q4_1 weight matrix, multiplied on the right: `x @ Wᵀ`.
#[derive(Debug)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    /// `cols / 32`.
    blocks_per_row: usize,
    /// Group `g`'s block column `b` at `g * blocks_per_row + b`.
    groups: Vec<GroupBlock>,
}

impl Q41Matrix {
    /// Takes `rows` rows of `cols` values from their GGUF bytes (row-major Q4_1 blocks);
    /// `None` when `cols` is not a multiple of 32 or the byte count does not match.
    pub fn from_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        if !cols.is_multiple_of(QK) || rows == 0 || cols == 0 {
            return None;
        }
        let blocks_per_row = cols / QK;
        if bytes.len() != rows * blocks_per_row * BLOCK_BYTES {
            return None;
        }
        let n_groups = rows.div_ceil(GROUP);
        let mut groups = vec![GroupBlock::default(); n_groups * blocks_per_row];
        for (r, row) in bytes.chunks_exact(blocks_per_row * BLOCK_BYTES).enumerate() {
            let (g, i) = (r / GROUP, r % GROUP);
            for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let dst = &mut groups[g * blocks_per_row + b];
                dst.d[i] = u16::from_le_bytes([block[0], block[1]]);
                dst.m[i] = u16::from_le_bytes([block[2], block[3]]);
                dst.qs[slot(i)].copy_from_slice(&block[4..BLOCK_BYTES]);
            }
        }
        Some(Self {
            rows,
            cols,
            blocks_per_row,
            groups,
        })
    }

    /// Takes the blocks of a 2-D Q4_1 tensor; `None` for any other type or shape.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        if tensor.dtype() != GgmlDType::Q4_1 {
            return None;
        }
        let (rows, cols) = tensor.shape().dims2().ok()?;
        Self::from_bytes(rows, cols, &tensor.data().ok()?)
    }

    /// Number of rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held by the weights.
    pub fn size_in_bytes(&self) -> usize {
        self.groups.len() * std::mem::size_of::<GroupBlock>()
    }

    /// `x @ Wᵀ` for `x` of shape `[..., cols]` (f32, CPU).
    pub fn forward(self: &Arc<Self>, x: &Tensor) -> candle_core::Result<Tensor> {
        cpu_matmul::forward(self, x)
    }

    /// Row `r` dequantized into `out` (`cols` values) exactly as candle's Q4_1 `to_float`
    /// does (`q · d + m`), for using the matrix as an embedding table.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} or width out of range"
        );
        let (g, i) = (r / GROUP, r % GROUP);
        let blocks = &self.groups[g * self.blocks_per_row..(g + 1) * self.blocks_per_row];
        for (w, out) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = f16::from_bits(w.d[i]).to_f32();
            let m = f16::from_bits(w.m[i]).to_f32();
            for (j, &q) in w.qs[slot(i)].iter().enumerate() {
                out[j] = ((q & 0x0F) as f32) * d + m;
                out[j + QK / 2] = ((q >> 4) as f32) * d + m;
            }
        }
    }

    /// The block columns of group `g`.
    fn group(&self, g: usize) -> &[GroupBlock] {
        &self.groups[g * self.blocks_per_row..(g + 1) * self.blocks_per_row]
    }

    /// `out[i * rows + r] = x_i · w_r` for the `m` rows of `x` (`m * cols` values).
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], kernel: Kernel) {
        let (nb, n) = (self.blocks_per_row, self.rows);
        assert!(
            x.len() == m * self.cols && out.len() == m * n,
            "matmul shapes"
        );
        let mut xq = vec![InputBlock::default(); m * nb];
        quantize_rows(x, &mut xq, self.cols);
        let xq = &xq[..];
        let ptr = SharedPtr(out.as_mut_ptr());
        let n_groups = n.div_ceil(GROUP);
        candle_core::utils::barrier_pool().execute_chunked(n_groups, |range| {
            for g in range {
                let blocks = self.group(g);
                let valid = GROUP.min(n - g * GROUP);
                let store = |i: usize, values: &[f32; GROUP]| {
                    for (r, &v) in values.iter().enumerate().take(valid) {
                        // SAFETY: row i < m, column g * GROUP + r < n: in bounds; only the
                        // thread owning group g writes these columns.
                        unsafe { ptr.write(i * n + g * GROUP + r, v) };
                    }
                };
                match kernel {
                    // SAFETY: the SIMD kernels are only chosen where their CPU features were
                    // detected at run time.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe {
                        tiles(
                            m,
                            nb,
                            xq,
                            blocks,
                            store,
                            group_avx2::<TILE>,
                            group_avx2::<1>,
                        )
                    },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::AvxVnni => unsafe {
                        tiles(
                            m,
                            nb,
                            xq,
                            blocks,
                            store,
                            group_avx_vnni::<TILE>,
                            group_avx_vnni::<1>,
                        )
                    },
                    Kernel::Scalar => {
                        for i in 0..m {
                            let xs = &xq[i * nb..(i + 1) * nb];
                            store(i, &std::array::from_fn(|r| dot_scalar(blocks, r, xs)));
                        }
                    }
                }
            }
        });
    }
}

/// Quantizes the rows of `x` (each `cols` wide) to Q8_1 with candle's own code, rows split
/// across the thread pool.
fn quantize_rows(x: &[f32], xq: &mut [InputBlock], cols: usize) {
    let nb = cols / QK;
    let m = x.len() / cols;
    let ptr = SharedPtr(xq.as_mut_ptr());
    let quantize = |i: usize| {
        let mut blocks = vec![BlockQ8_1::zeros(); nb];
        BlockQ8_1::from_float(&x[i * cols..(i + 1) * cols], &mut blocks);
        for (b, block) in blocks.iter().enumerate() {
            // SAFETY: BlockQ8_1 and BlockQ81 are both repr(C) {f16, f16, [i8; 32]} (asserted
            // sizes above); this reads the bytes of a valid block.
            let q = unsafe { std::mem::transmute_copy::<BlockQ8_1, BlockQ81>(block) };
            let v = InputBlock {
                d: q.d.to_f32(),
                s: q.s.to_f32(),
                qs: q.qs,
            };
            // SAFETY: index i * nb + b < m * nb = xq.len(); row i is quantized by one thread.
            unsafe { ptr.write(i * nb + b, v) };
        }
    };
    if m == 1 {
        quantize(0);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(m, |range| range.for_each(quantize));
    }
}

/// One output of the scalar kernel: row `r` of a group against one input row, candle's float
/// accumulation over exact integer block dots.
fn dot_scalar(blocks: &[GroupBlock], r: usize, xs: &[InputBlock]) -> f32 {
    let s = slot(r);
    let mut sumf = 0f32;
    for (w, x) in blocks.iter().zip(xs) {
        let mut sumi = 0i32;
        for (j, &q) in w.qs[s].iter().enumerate() {
            sumi += (q & 0x0F) as i32 * x.qs[j] as i32 + (q >> 4) as i32 * x.qs[j + QK / 2] as i32;
        }
        let d = f16::from_bits(w.d[r]).to_f32();
        let m = f16::from_bits(w.m[r]).to_f32();
        sumf += sumi as f32 * d * x.d + m * x.s;
    }
    sumf
}

/// A SIMD group kernel for `T` input rows at a time (see [`group_kernel!`]).
#[cfg(target_arch = "x86_64")]
type GroupKernel<const T: usize> =
    unsafe fn(&[GroupBlock], [&[InputBlock]; T]) -> [[f32; GROUP]; T];

/// Runs a SIMD group kernel over the `m` input rows: tiles of [`TILE`] rows, then single rows.
///
/// # Safety
/// The CPU supports the kernels' features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tiles(
    m: usize,
    nb: usize,
    xq: &[InputBlock],
    blocks: &[GroupBlock],
    store: impl Fn(usize, &[f32; GROUP]),
    tile: GroupKernel<TILE>,
    single: GroupKernel<1>,
) {
    let mut i = 0;
    while i + TILE <= m {
        let xs = std::array::from_fn(|t| &xq[(i + t) * nb..(i + t + 1) * nb]);
        // SAFETY: guaranteed by the caller; every slice is one row of `nb` blocks.
        let v = unsafe { tile(blocks, xs) };
        for (t, v) in v.iter().enumerate() {
            store(i + t, v);
        }
        i += TILE;
    }
    while i < m {
        // SAFETY: as above.
        let [v] = unsafe { single(blocks, [&xq[i * nb..(i + 1) * nb]]) };
        store(i, &v);
        i += 1;
    }
}

/// Defines a SIMD group kernel: the eight outputs of a group against each of `T` input rows
/// (`T` slices of one row's blocks each); each lane accumulates exactly as [`dot_scalar`].
/// `$pair` computes, for the unpacked low/high nibbles of rows `p` and `p + 4` and the input's
/// two broadcast halves, eight `i32` partial sums (lane 0: row `p`, lane 1: row `p + 4`); only
/// this integer step differs between kernels.
#[cfg(target_arch = "x86_64")]
macro_rules! group_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $pair:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU supports the features enabled on the function; every slice of `xs` is as
        /// long as `blocks`.
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(
            blocks: &[GroupBlock],
            xs: [&[InputBlock]; T],
        ) -> [[f32; GROUP]; T] {
            for x in &xs {
                assert_eq!(x.len(), blocks.len());
            }
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); T];
            for (b, w) in blocks.iter().enumerate() {
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for p in 0..4 {
                    // SAFETY: slots 2p and 2p + 1 are 32 adjacent bytes of `w`.
                    let v = unsafe { _mm256_loadu_si256(w.qs[2 * p].as_ptr() as *const __m256i) };
                    lo[p] = _mm256_and_si256(v, mask);
                    hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
                // SAFETY: d and m are 16 bytes each; unaligned loads.
                let (d8, m8) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr() as *const __m128i)),
                        _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr() as *const __m128i)),
                    )
                };
                for t in 0..T {
                    // SAFETY: b < blocks.len() == xs[t].len() (asserted above).
                    let x = unsafe { xs[t].get_unchecked(b) };
                    // SAFETY: x.qs is 32 bytes; two unaligned 16-byte loads.
                    let (xlo, xhi) = unsafe {
                        (
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                x.qs.as_ptr() as *const __m128i
                            )),
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                x.qs.as_ptr().add(QK / 2) as *const __m128i,
                            )),
                        )
                    };
                    let pair = $pair;
                    let s: [__m256i; 4] = std::array::from_fn(|p| pair(lo[p], hi[p], xlo, xhi));
                    let sumi = _mm256_hadd_epi32(
                        _mm256_hadd_epi32(s[0], s[1]),
                        _mm256_hadd_epi32(s[2], s[3]),
                    );
                    // sumi * d_w * d_x + m_w * s_x, then added to the sum: the scalar
                    // expression, lane by lane (separate multiplies and adds, no FMA).
                    let scaled = _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), d8),
                        _mm256_set1_ps(x.d),
                    );
                    let offset = _mm256_mul_ps(m8, _mm256_set1_ps(x.s));
                    acc[t] = _mm256_add_ps(acc[t], _mm256_add_ps(scaled, offset));
                }
            }
            let mut out = [[0f32; GROUP]; T];
            for (o, a) in out.iter_mut().zip(acc) {
                // SAFETY: o is 8 f32s; unaligned store.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
            }
            out
        }
    };
}

#[cfg(target_arch = "x86_64")]
group_kernel!(
    /// AVX2: `maddubs` pairs of u8·i8 products into i16 (no saturation: each pair is at most
    /// 2 · 15 · 128 in magnitude, and two pairs added stay below 2^15), `madd` widens to i32.
    group_avx2,
    "avx2,f16c",
    |lo, hi, xlo, xhi| {
        let s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
        _mm256_madd_epi16(s16, _mm256_set1_epi16(1))
    }
);

#[cfg(target_arch = "x86_64")]
group_kernel!(
    /// AVX-VNNI: `vpdpbusd` sums four u8·i8 products straight into i32 (exact, no
    /// saturation).
    group_avx_vnni,
    "avx2,f16c,avxvnni",
    |lo: __m256i, hi: __m256i, xlo: __m256i, xhi: __m256i| {
        let mut acc = _mm256_setzero_si256();
        // `_mm256_dpbusd_avx_epi32` needs Rust 1.89 (the workspace's MSRV is 1.85), so the one
        // instruction is written out; `{vex}` selects the AVX-VNNI encoding.
        // SAFETY: register-only arithmetic; the CPU supports AVX-VNNI (the function's
        // features).
        unsafe {
            std::arch::asm!(
                "{{vex}} vpdpbusd {acc}, {lo}, {xlo}",
                "{{vex}} vpdpbusd {acc}, {hi}, {xhi}",
                acc = inout(ymm_reg) acc,
                lo = in(ymm_reg) lo,
                xlo = in(ymm_reg) xlo,
                hi = in(ymm_reg) hi,
                xhi = in(ymm_reg) xhi,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }
);

impl CpuMatMul for Q41Matrix {
    const NAME: &'static str = "q4_1-matmul";

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()> {
        self.matmul(x, m, out, Kernel::detect());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu_matmul::testing::{random, to_vec};
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    fn quantized(rows: usize, cols: usize) -> QTensor {
        let w = Tensor::from_vec(random(rows * cols, 1), (rows, cols), &Device::Cpu).expect("w");
        QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize")
    }

    /// Rows that fill whole groups and rows that leave a partial one; input row counts below,
    /// at and above the prefill tile, with a remainder.
    #[test]
    fn matches_candle_bit_for_bit() {
        let cols = 256;
        for rows in [96, 100, 3] {
            let q = quantized(rows, cols);
            let ours = Arc::new(Q41Matrix::from_qtensor(&q).expect("q4_1"));
            let theirs = QMatMul::from_qtensor(q).expect("qmatmul");
            for m in [1, 3, 4, 17] {
                let x =
                    Tensor::from_vec(random(m * cols, 7 + m as u64), (1, m, cols), &Device::Cpu)
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
    fn scalar_and_simd_kernels_agree_bit_for_bit() {
        let (rows, cols) = (40, 512);
        let w = Q41Matrix::from_qtensor(&quantized(rows, cols)).expect("q4_1");
        for m in [1, 5, 8] {
            let x = random(m * cols, 11 + m as u64);
            let mut scalar = vec![0f32; m * rows];
            w.matmul(&x, m, &mut scalar, Kernel::Scalar);
            for kernel in Kernel::all_available() {
                let mut other = vec![0f32; m * rows];
                w.matmul(&x, m, &mut other, kernel);
                let same = scalar
                    .iter()
                    .zip(&other)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{kernel:?}, m {m}");
            }
        }
    }

    #[test]
    fn rows_dequantize_like_candle() {
        let (rows, cols) = (13, 128);
        let q = quantized(rows, cols);
        let full = to_vec(q.dequantize(&Device::Cpu).expect("dequantize"));
        let w = Q41Matrix::from_qtensor(&q).expect("q4_1");
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut row);
            assert_eq!(row, full[r * cols..(r + 1) * cols], "row {r}");
        }
    }

    #[test]
    fn other_types_and_shapes_are_not_taken() {
        let w = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q");
        assert!(Q41Matrix::from_qtensor(&q).is_none());
        assert!(Q41Matrix::from_bytes(2, 48, &[0; 60]).is_none());
        assert!(Q41Matrix::from_bytes(2, 32, &[0; 39]).is_none());
    }

    #[test]
    fn weights_take_the_file_size() {
        let w = Q41Matrix::from_qtensor(&quantized(16, 64)).expect("q4_1");
        assert_eq!(w.size_in_bytes(), 16 * 2 * BLOCK_BYTES);
    }

    /// Prints the time of one layer's matmuls (SmolLM2-135M shapes) per SIMD kernel, for
    /// decode (1 row) and prefill (128 rows), the best of 15 rounds:
    /// `CANDLE_NUM_THREADS=1 cargo test --release -p canopy-engine --lib q4_1 -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn time_layer_matmuls() {
        let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
        let mats: Vec<_> = shapes
            .iter()
            .map(|&(r, c)| Q41Matrix::from_qtensor(&quantized(r, c)).expect("q4_1"))
            .collect();
        for m in [1, 128] {
            let reps = if m == 1 { 200 } else { 3 };
            let mut line = format!("m {m:3}:");
            for kernel in Kernel::all_available().into_iter().skip(1) {
                let mut best = std::time::Duration::MAX;
                let xs: Vec<_> = shapes.iter().map(|&(_, c)| random(m * c, 5)).collect();
                for _ in 0..15 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        for ((w, &(r, _)), x) in mats.iter().zip(&shapes).zip(&xs) {
                            let mut out = vec![0f32; m * r];
                            w.matmul(x, m, &mut out, kernel);
                        }
                    }
                    best = best.min(t.elapsed() / reps);
                }
                line += &format!("  {kernel:?} {best:?}");
            }
            println!("{line}");
        }
    }
}
