//! The row attention of one tile with AVX2, FMA and F16C: the tile's queries sit in the lanes
//! of up to three 8-float registers, so every step of the arithmetic is a vertical operation
//! on eight queries at once, and each lane runs exactly the operations of
//! [`attend_query`](super::scalar::attend_query) for its query (the tests check the bits).
//!
//! A task is a few tiles of one sequence and key/value head. Per block of [`BLOCK`] positions
//! (aligned to position 0):
//!
//! 1. the block's keys and values are converted from f16 into f32 scratch (`[pos][dim]`),
//!    once for all the task's tiles; then for each tile that reads the block, with its queries
//!    `Q` (transposed, `[dim][lane]`, pre-scaled):
//! 2. scores `S[pos][lane] = Σ_i Q[i][lane] · K[pos][i]`: one broadcast key element times a
//!    register of queries, `KU` keys at a time (one fused multiply-add chain per score, `i` in
//!    order);
//! 3. in a block that reaches past some query's own position (the causal diagonal) those
//!    scores become `-inf`;
//! 4. the online softmax: block maximum, rescale factor `2^(m - m')` of the running sum and
//!    output, weights `2^(s - m')`, all per lane;
//! 5. outputs `Y[dim][lane] += W[pos][lane] · V[pos][dim]`, `DG` dimensions at a time; in a
//!    diagonal block a hidden position leaves a lane's output untouched (a select, not the
//!    addition of a zero, which could turn a `-0` into `+0`).
//!
//! A lane for which a whole block is hidden (a later row of the tile needs it) goes through
//! it unchanged: its maximum stays, the rescale factor is exactly `2^0 = 1`, its weights are
//! exactly `0` and its outputs are selected away. So a query gives the same bits in any tile.

use std::arch::x86_64::*;

use half::f16;

use super::exp2::exp2_avx2;
use super::{BLOCK, MAX_LANES, Scratch, Tile, score_scale};
use crate::llama::cpu_matmul::SharedPtr;

/// Lanes of a register.
const W: usize = 8;

/// Runs `tiles` (each of at most [`MAX_LANES`] queries, all reading the same key/value head of
/// the same cache) and writes their outputs through `out`. Each block of keys and values is
/// converted once for all of them.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `out` points to the output the tiles' offsets index.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_tiles(tiles: &[Tile<'_>], s: &mut Scratch, out: SharedPtr<f32>) {
    let Some(first) = tiles.first() else {
        return;
    };
    let (head, d) = (first.head, first.d);
    let scale = score_scale(d);
    if s.groups.len() < tiles.len() {
        s.groups.resize_with(tiles.len(), Group::default);
    }
    for (t, g) in tiles.iter().zip(&mut s.groups) {
        debug_assert!(t.lanes() <= MAX_LANES && t.d == d);
        g.start(t, scale);
    }
    s.kb.resize(BLOCK * d, 0.0);
    s.vb.resize(BLOCK * d, 0.0);
    s.pb.resize(BLOCK * MAX_LANES, 0.0);
    let width = tiles.iter().map(Tile::width).max().unwrap_or(0);
    let mut lo = 0;
    while lo < width {
        let n = BLOCK.min(width - lo);
        // SAFETY: F16C is enabled; the buffers hold `BLOCK` positions of `d` values, and
        // positions `lo..lo + n` (< width) of the cache are written.
        unsafe {
            load_block(&head.kv.k, head.kv_row, head.kv_off, lo, n, d, &mut s.kb);
            load_block(&head.kv.v, head.kv_row, head.kv_off, lo, n, d, &mut s.vb);
        }
        for (t, g) in tiles.iter().zip(&mut s.groups) {
            if lo >= t.width() {
                continue;
            }
            let block = Block {
                kb: &s.kb,
                vb: &s.vb,
                lo,
                n: BLOCK.min(t.width() - lo),
                d,
            };
            // SAFETY: the features are enabled; the group was started for this tile and
            // the scratch sized above.
            unsafe {
                match t.lanes().div_ceil(W) {
                    1 => g.step::<1, 8, 8>(t, &block, &mut s.pb),
                    2 => g.step::<2, 4, 4>(t, &block, &mut s.pb),
                    _ => g.step::<3, 3, 3>(t, &block, &mut s.pb),
                }
            }
        }
        lo += n;
    }
    for (t, g) in tiles.iter().zip(&s.groups) {
        g.finish(t, out);
    }
}

/// One block of positions, converted to f32.
struct Block<'a> {
    /// Keys and values, `[pos][dim]`.
    kb: &'a [f32],
    vb: &'a [f32],
    /// First position and positions of the block (for the tile at hand).
    lo: usize,
    n: usize,
    d: usize,
}

/// The running state of one tile's queries.
#[derive(Default)]
pub(super) struct Group {
    /// Queries, transposed and scaled: `[dim][lane]`, `NV * 8` lanes a dimension.
    qt: Vec<f32>,
    /// Running outputs: `[dim][lane]`.
    yt: Vec<f32>,
    /// Running maximum and sum of weights per lane.
    m: [f32; MAX_LANES],
    l: [f32; MAX_LANES],
}

impl Group {
    /// Lanes a dimension takes in `qt` and `yt` for `tile`.
    fn stride(tile: &Tile<'_>) -> usize {
        tile.lanes().div_ceil(W).max(1) * W
    }

    /// Resets the state for `tile`'s queries.
    fn start(&mut self, t: &Tile<'_>, scale: f32) {
        let (d, stride) = (t.d, Self::stride(t));
        self.qt.clear();
        self.qt.resize(d * stride, 0.0);
        for lane in 0..t.lanes() {
            for (i, &x) in t.q[t.offset(lane)..][..d].iter().enumerate() {
                self.qt[i * stride + lane] = x * scale;
            }
        }
        self.yt.clear();
        self.yt.resize(d * stride, 0.0);
        self.m = [f32::NEG_INFINITY; MAX_LANES];
        self.l = [0.0; MAX_LANES];
    }

    /// Writes `y = acc / l` of every lane through `out`.
    fn finish(&self, t: &Tile<'_>, out: SharedPtr<f32>) {
        let stride = Self::stride(t);
        for (lane, &sum) in self.l.iter().enumerate().take(t.lanes()) {
            let base = t.offset(lane);
            for e in 0..t.d {
                // SAFETY: `base + e` is within the output (the queries' shape); this tile is
                // the only writer of this query's row and head.
                unsafe { out.write(base + e, self.yt[e * stride + lane] / sum) };
            }
        }
    }

    /// Runs positions `block.lo..block.lo + block.n` for the tile's `NV * 8` lanes, with `KU`
    /// keys per score step and `DG` output dimensions per weighted-sum step (chosen so that
    /// the accumulators, operands and a broadcast fit the 16 registers).
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `NV * 8` is [`Group::stride`] of `t`, the group was
    /// started for `t`, `block` holds `block.n` positions and `pb` `BLOCK * NV * 8` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn step<const NV: usize, const KU: usize, const DG: usize>(
        &mut self,
        t: &Tile<'_>,
        block: &Block<'_>,
        pb: &mut [f32],
    ) {
        let (lo, n, d) = (block.lo, block.n, block.d);
        let stride = NV * W;
        debug_assert_eq!(stride, Self::stride(t));
        assert!(pb.len() >= n * stride && block.kb.len() >= n * d && block.vb.len() >= n * d);
        assert!(self.qt.len() >= d * stride && self.yt.len() >= d * stride);
        // Each lane's position (padding lanes: the first row's), for the causal mask.
        let mut pos = [_mm256_setzero_si256(); NV];
        for (v, p) in pos.iter_mut().enumerate() {
            let mut lane_pos = [t.pos0 as i32; W];
            for (x, lp) in lane_pos.iter_mut().enumerate() {
                if v * W + x < t.lanes() {
                    *lp = t.position(v * W + x) as i32;
                }
            }
            // SAFETY: `lane_pos` holds eight i32.
            *p = unsafe { _mm256_loadu_si256(lane_pos.as_ptr().cast()) };
        }
        let diagonal = lo + n - 1 > t.pos0;
        // SAFETY (all the pointer arithmetic below): the lengths were asserted above.
        unsafe {
            let mut j = 0;
            while j + KU <= n {
                score_keys::<NV, KU>(&self.qt, block.kb, pb, j, d);
                j += KU;
            }
            while j < n {
                score_keys::<NV, 1>(&self.qt, block.kb, pb, j, d);
                j += 1;
            }
            let pp = pb.as_mut_ptr();
            if diagonal {
                let hidden = _mm256_set1_ps(f32::NEG_INFINITY);
                for j in 0..n {
                    let at = _mm256_set1_epi32((lo + j) as i32);
                    for (v, &p) in pos.iter().enumerate() {
                        let mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(at, p));
                        let x = pp.add(j * stride + v * W);
                        _mm256_storeu_ps(x, _mm256_blendv_ps(_mm256_loadu_ps(x), hidden, mask));
                    }
                }
            }
            let mut block_max = [_mm256_set1_ps(f32::NEG_INFINITY); NV];
            for j in 0..n {
                for (v, bm) in block_max.iter_mut().enumerate() {
                    *bm = _mm256_max_ps(*bm, _mm256_loadu_ps(pp.add(j * stride + v * W)));
                }
            }
            let mut m = [_mm256_setzero_ps(); NV];
            let mut l = [_mm256_setzero_ps(); NV];
            let mut alpha = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                let old = _mm256_loadu_ps(self.m.as_ptr().add(v * W));
                let new = _mm256_max_ps(old, block_max[v]);
                alpha[v] = exp2_avx2(_mm256_sub_ps(old, new));
                l[v] = _mm256_mul_ps(_mm256_loadu_ps(self.l.as_ptr().add(v * W)), alpha[v]);
                m[v] = new;
            }
            for j in 0..n {
                for v in 0..NV {
                    let x = pp.add(j * stride + v * W);
                    let w = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(x), m[v]));
                    _mm256_storeu_ps(x, w);
                    l[v] = _mm256_add_ps(l[v], w);
                }
            }
            for v in 0..NV {
                _mm256_storeu_ps(self.m.as_mut_ptr().add(v * W), m[v]);
                _mm256_storeu_ps(self.l.as_mut_ptr().add(v * W), l[v]);
            }
            let weights = Weights {
                pb,
                vb: block.vb,
                alpha: &alpha,
                pos: &pos,
                lo,
                n,
                d,
            };
            let mut e = 0;
            while e + DG <= d {
                weights.add_dims::<DG>(&mut self.yt, e, diagonal);
                e += DG;
            }
            while e < d {
                weights.add_dims::<1>(&mut self.yt, e, diagonal);
                e += 1;
            }
        }
    }
}

/// Converts the `d` values at `kv_off` of positions `lo..lo + n` from `src` (`kv_row` values
/// per position) into `dst` (`[pos][dim]`).
///
/// # Safety
/// F16C is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_block(
    src: &[f16],
    kv_row: usize,
    kv_off: usize,
    lo: usize,
    n: usize,
    d: usize,
    dst: &mut [f32],
) {
    for j in 0..n {
        let row = &src[(lo + j) * kv_row + kv_off..][..d];
        let to = &mut dst[j * d..][..d];
        let mut i = 0;
        while i + W <= d {
            // SAFETY: `i + 8 <= d`: eight halves of `row` and eight floats of `to` at `i`.
            unsafe {
                let h = _mm_loadu_si128(row.as_ptr().add(i).cast());
                _mm256_storeu_ps(to.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += W;
        }
        for (t, h) in to[i..].iter_mut().zip(&row[i..]) {
            *t = h.to_f32();
        }
    }
}

/// Scores of keys `j..j + KU` of the block for every lane: `pb[(j + u) * stride + lane] =
/// Σ_i qt[i * stride + lane] · kb[(j + u) * d + i]`, one fused chain per score, `i` in order.
///
/// # Safety
/// AVX2 and FMA are available; `qt` holds `d * NV * 8` floats, `kb` `(j + KU) * d` and `pb`
/// `(j + KU) * NV * 8`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn score_keys<const NV: usize, const KU: usize>(
    qt: &[f32],
    kb: &[f32],
    pb: &mut [f32],
    j: usize,
    d: usize,
) {
    let stride = NV * W;
    debug_assert!(qt.len() >= d * stride && kb.len() >= (j + KU) * d);
    debug_assert!(pb.len() >= (j + KU) * stride);
    let mut acc = [[_mm256_setzero_ps(); NV]; KU];
    let (qp, kp) = (qt.as_ptr(), kb.as_ptr());
    for i in 0..d {
        let mut q = [_mm256_setzero_ps(); NV];
        for (v, q) in q.iter_mut().enumerate() {
            // SAFETY: i * stride + v * 8 + 8 <= d * stride.
            *q = unsafe { _mm256_loadu_ps(qp.add(i * stride + v * W)) };
        }
        for (u, acc) in acc.iter_mut().enumerate() {
            // SAFETY: (j + u) * d + i < (j + KU) * d.
            let k = unsafe { _mm256_broadcast_ss(&*kp.add((j + u) * d + i)) };
            for (a, &q) in acc.iter_mut().zip(&q) {
                *a = _mm256_fmadd_ps(q, k, *a);
            }
        }
    }
    for (u, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            // SAFETY: (j + u) * stride + v * 8 + 8 <= (j + KU) * stride.
            unsafe { _mm256_storeu_ps(pb.as_mut_ptr().add((j + u) * stride + v * W), a) };
        }
    }
}

/// One block's weights and values, added into the outputs.
struct Weights<'a, const NV: usize> {
    /// Weights, `[pos][lane]`.
    pb: &'a [f32],
    /// Values, `[pos][dim]`.
    vb: &'a [f32],
    /// Rescale factor of each lane's running output.
    alpha: &'a [__m256; NV],
    /// Each lane's position.
    pos: &'a [__m256i; NV],
    /// The block's first position and length.
    lo: usize,
    n: usize,
    d: usize,
}

impl<const NV: usize> Weights<'_, NV> {
    /// [`Weights::add`], masked in a `diagonal` block.
    ///
    /// # Safety
    /// As for [`Weights::add`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn add_dims<const DG: usize>(&self, yt: &mut [f32], e0: usize, diagonal: bool) {
        // SAFETY: as promised by the caller.
        unsafe {
            if diagonal {
                self.add::<DG, true>(yt, e0);
            } else {
                self.add::<DG, false>(yt, e0);
            }
        }
    }

    /// `yt[e][lane] = yt[e][lane] · alpha[lane]`, then `+= w[pos][lane] · v[pos][e]` for every
    /// position of the block in order, for dimensions `e0..e0 + DG`; with `MASKED`, positions
    /// past a lane's own leave that lane untouched.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `yt` holds `d * NV * 8` floats, `pb` `n * NV * 8`, `vb`
    /// `n * d`, and `e0 + DG <= d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn add<const DG: usize, const MASKED: bool>(&self, yt: &mut [f32], e0: usize) {
        let stride = NV * W;
        debug_assert!(yt.len() >= self.d * stride && e0 + DG <= self.d);
        debug_assert!(self.pb.len() >= self.n * stride && self.vb.len() >= self.n * self.d);
        let (yp, pp, vp) = (yt.as_mut_ptr(), self.pb.as_ptr(), self.vb.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); NV]; DG];
        for (g, acc) in acc.iter_mut().enumerate() {
            for (v, a) in acc.iter_mut().enumerate() {
                // SAFETY: (e0 + g) * stride + v * 8 + 8 <= d * stride.
                let y = unsafe { _mm256_loadu_ps(yp.add((e0 + g) * stride + v * W)) };
                *a = _mm256_mul_ps(y, self.alpha[v]);
            }
        }
        for j in 0..self.n {
            let mut w = [_mm256_setzero_ps(); NV];
            let mut hidden = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                // SAFETY: j * stride + v * 8 + 8 <= n * stride.
                w[v] = unsafe { _mm256_loadu_ps(pp.add(j * stride + v * W)) };
                if MASKED {
                    let at = _mm256_set1_epi32((self.lo + j) as i32);
                    hidden[v] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(at, self.pos[v]));
                }
            }
            for (g, acc) in acc.iter_mut().enumerate() {
                // SAFETY: j * d + e0 + g < n * d.
                let x = unsafe { _mm256_broadcast_ss(&*vp.add(j * self.d + e0 + g)) };
                for v in 0..NV {
                    let next = _mm256_fmadd_ps(w[v], x, acc[v]);
                    acc[v] = if MASKED {
                        _mm256_blendv_ps(next, acc[v], hidden[v])
                    } else {
                        next
                    };
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (v, &a) in acc.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { _mm256_storeu_ps(yp.add((e0 + g) * stride + v * W), a) };
            }
        }
    }
}
