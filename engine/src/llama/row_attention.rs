//! The attention kernel of the batched forward: each query row attends to its own sequence's
//! cached positions, one row and head at a time, in a fixed order.
//!
//! The batched forward ([`LlamaShard::forward_batch`](super::LlamaShard::forward_batch)) puts
//! the rows of many sequences (prefill chunks and decode rows) through one set of matmuls; the
//! attention of each row reads only its own sequence's keys and values. This kernel computes,
//! for every query row `r` at position `p` of its sequence and every query head `h` (reading
//! key/value head `h / n_rep`):
//!
//! ```text
//! s_j = (q_r,h · k_j) · (1/√d)      for j in 0..=p
//! w_j = exp(s_j − max s) / Σ exp(s − max s)
//! y_r,h = Σ_j w_j · v_j
//! ```
//!
//! Every output `y_r,h` is computed by one thread, start to end, in the same order whatever
//! else is in the batch, however the prompt was split into chunks and however many threads
//! run: a row's result depends only on its query and its sequence's cache. That is the batch
//! invariance the scheduler relies on (a sequence's tokens do not depend on what it was
//! batched with). No score matrix is materialised: a row's scores are one `p + 1` buffer, so
//! a long prompt costs memory linear in its length.
//!
//! The dot products use eight independent partial sums combined in a fixed tree (separate
//! multiplies and adds, never fused), which the compiler vectorises; an AVX2 build of the same
//! code runs where the CPU has it, and gives the same bits because the arithmetic is the same.

use super::cpu_matmul::SharedPtr;
use super::sequence::LayerKv;

/// Where one sequence's rows sit in a batched forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First row of the batch that belongs to the sequence.
    pub start: usize,
    /// Rows of the sequence in this forward.
    pub len: usize,
    /// Position of the sequence's first row (the positions it already has cached).
    pub pos: usize,
}

/// Head counts and width of one attention layer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) head_dim: usize,
}

/// Query rows of one sequence attended together in one task (they share each key and value
/// they read).
const ROW_TILE: usize = 8;

/// `y[r, h, :]` for every row `r` of every span and head `h` (see the module docs); `q` is
/// `[rows][n_head * head_dim]` (already rotated), `caches[i]` holds span `i`'s keys and values
/// for positions `0..spans[i].pos + spans[i].len`, and `y` has `q`'s shape.
///
/// Work is split into tasks of up to [`ROW_TILE`] rows of one sequence and one key/value head
/// with all the query heads that read it, so each key and value is loaded once for up to
/// `ROW_TILE * n_rep` queries. Each query still runs its own scores, softmax and weighted sum
/// over positions `0..=p` in order, so the tiling (which depends on the batch) never changes a
/// query's arithmetic.
pub(super) fn attend(q: &[f32], spans: &[Span], caches: &[&LayerKv], heads: Heads, y: &mut [f32]) {
    let Heads {
        n_head,
        n_kv_head,
        head_dim,
    } = heads;
    let q_row = n_head * head_dim;
    let rows: usize = spans.iter().map(|s| s.len).sum();
    assert!(
        q.len() == rows * q_row && y.len() == q.len(),
        "row attention: shapes"
    );
    // (span, first row within the span, rows, kv head)
    let mut tasks = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        for start in (0..span.len).step_by(ROW_TILE) {
            for kv_h in 0..n_kv_head {
                tasks.push((i, start, ROW_TILE.min(span.len - start), kv_h));
            }
        }
    }
    let out = SharedPtr(y.as_mut_ptr());
    let avx2 = avx2_available();
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        let mut scratch = Scratch::default();
        for t in range {
            let (i, start, n, kv_h) = tasks[t];
            let tile = Tile {
                q,
                span: spans[i],
                start,
                rows: n,
                kv_h,
                cache: caches[i],
                heads,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected at run time.
                unsafe { tile.run_avx2(&mut scratch, out) };
            } else {
                tile.run(&mut scratch, out);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx2;
                tile.run(&mut scratch, out);
            }
        }
    });
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Buffers a thread reuses across its tasks.
#[derive(Default)]
struct Scratch {
    /// One row of scores per query of the tile.
    scores: Vec<f32>,
    /// One output per query of the tile.
    acc: Vec<f32>,
}

/// Up to [`ROW_TILE`] rows of one sequence, and the query heads that read key/value head
/// `kv_h`.
struct Tile<'a> {
    q: &'a [f32],
    span: Span,
    /// First row of the tile within the span.
    start: usize,
    rows: usize,
    kv_h: usize,
    cache: &'a LayerKv,
    heads: Heads,
}

impl Tile<'_> {
    /// Computes the tile's outputs and writes them through `out` (the whole `y`).
    #[inline(always)]
    fn run(&self, scratch: &mut Scratch, out: SharedPtr<f32>) {
        self.run_with(scratch, out, dot);
    }

    /// [`Tile::run`] with the dot product `dot` (which must compute [`dot`]'s bits).
    #[inline(always)]
    fn run_with(
        &self,
        scratch: &mut Scratch,
        out: SharedPtr<f32>,
        dot: impl Fn(&[f32], &[f32]) -> f32,
    ) {
        let Heads {
            n_head,
            n_kv_head,
            head_dim: d,
        } = self.heads;
        let n_rep = n_head / n_kv_head;
        let (q_row, kv_row) = (n_head * d, n_kv_head * d);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let first = self.span.pos + self.start;
        // Queries, row-major then head: query `r * n_rep + k` is row `first + r`, head
        // `kv_h * n_rep + k`; it attends to positions `0..=first + r`.
        let n_q = self.rows * n_rep;
        let width = first + self.rows; // positions of the last row, plus one
        scratch.scores.clear();
        scratch.scores.resize(n_q * width, 0.0);
        scratch.acc.clear();
        scratch.acc.resize(n_q * d, 0.0);
        let query = |qi: usize| {
            let (r, k) = (qi / n_rep, qi % n_rep);
            let row = self.span.start + self.start + r;
            let h = self.kv_h * n_rep + k;
            &self.q[row * q_row + h * d..][..d]
        };
        let offset = self.kv_h * d;
        // Scores: each key once, for every query that sees it.
        for j in 0..width {
            let key = &self.cache.k[j * kv_row + offset..][..d];
            let seen_from = j.saturating_sub(first); // rows r >= seen_from see position j
            for qi in seen_from * n_rep..n_q {
                scratch.scores[qi * width + j] = dot(query(qi), key) * scale;
            }
        }
        // Softmax, per query, in position order.
        for qi in 0..n_q {
            let len = first + qi / n_rep + 1;
            let s = &mut scratch.scores[qi * width..qi * width + len];
            let mut max = f32::NEG_INFINITY;
            for &x in s.iter() {
                max = max.max(x);
            }
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in s.iter_mut() {
                *x *= inv;
            }
        }
        // Weighted values: each value once, for every query that sees it.
        for j in 0..width {
            let value = &self.cache.v[j * kv_row + offset..][..d];
            let seen_from = j.saturating_sub(first);
            for qi in seen_from * n_rep..n_q {
                let w = scratch.scores[qi * width + j];
                let acc = &mut scratch.acc[qi * d..(qi + 1) * d];
                for (a, &v) in acc.iter_mut().zip(value) {
                    *a += w * v;
                }
            }
        }
        for qi in 0..n_q {
            let (r, k) = (qi / n_rep, qi % n_rep);
            let row = self.span.start + self.start + r;
            let base = row * q_row + (self.kv_h * n_rep + k) * d;
            for (e, &value) in scratch.acc[qi * d..(qi + 1) * d].iter().enumerate() {
                // SAFETY: base + e < rows * q_row = y.len(); this tile is the only writer of
                // row `row`, head `kv_h * n_rep + k`.
                unsafe { out.write(base + e, value) };
            }
        }
    }

    /// [`Tile::run`] compiled for AVX2 (the same arithmetic, wider registers).
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, scratch: &mut Scratch, out: SharedPtr<f32>) {
        // SAFETY: this function only runs where AVX2 was detected.
        self.run_with(scratch, out, |a, b| unsafe { dot_avx2(a, b) });
    }
}

/// `a · b` with eight partial sums combined in a fixed tree.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .fold(0.0, |s, p| s + p);
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// [`dot`] with AVX2 intrinsics: the same eight partial sums (lane `l` accumulates elements
/// `8i + l` with a separate multiply and add) and the same final tree, so the same bits.
///
/// # Safety
/// The CPU supports AVX2; `a` and `b` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n: the eight floats at i are in bounds of both slices.
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let tail: f32 = a[i..n]
        .iter()
        .zip(&b[i..n])
        .map(|(x, y)| x * y)
        .fold(0.0, |s, p| s + p);
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

#[cfg(test)]
mod tests {
    use super::super::cpu_matmul::testing::random;
    use super::*;

    /// The textbook formula in f64, for comparison.
    fn reference(q: &[f32], k: &[f32], v: &[f32], pos: usize, heads: Heads) -> Vec<f32> {
        let Heads {
            n_head,
            n_kv_head,
            head_dim: d,
        } = heads;
        let mut y = vec![0f32; n_head * d];
        for h in 0..n_head {
            let kv = h / (n_head / n_kv_head);
            let s: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..d)
                        .map(|i| {
                            f64::from(q[h * d + i]) * f64::from(k[(j * n_kv_head + kv) * d + i])
                        })
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                y[h * d + i] = (0..=pos)
                    .map(|j| e[j] / sum * f64::from(v[(j * n_kv_head + kv) * d + i]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_dot_gives_the_portable_dots_bits() {
        if !avx2_available() {
            return;
        }
        for n in [1usize, 7, 8, 9, 63, 64, 65, 128] {
            let (a, b) = (random(n, n as u64), random(n, 99 + n as u64));
            // SAFETY: AVX2 was detected.
            let fast = unsafe { dot_avx2(&a, &b) };
            assert_eq!(fast.to_bits(), dot(&a, &b).to_bits(), "n = {n}");
        }
    }

    #[test]
    fn matches_the_formula_and_ignores_the_rest_of_the_batch() {
        let heads = Heads {
            n_head: 6,
            n_kv_head: 2,
            head_dim: 20,
        };
        let (q_row, kv_row) = (6 * 20, 2 * 20);
        // Two sequences: 5 rows from position 3, and 1 row at position 9.
        let a = LayerKv {
            k: random(8 * kv_row, 1),
            v: random(8 * kv_row, 2),
        };
        let b = LayerKv {
            k: random(10 * kv_row, 3),
            v: random(10 * kv_row, 4),
        };
        let spans = [
            Span {
                start: 0,
                len: 5,
                pos: 3,
            },
            Span {
                start: 5,
                len: 1,
                pos: 9,
            },
        ];
        let q = random(6 * q_row, 5);
        let mut y = vec![0f32; q.len()];
        attend(&q, &spans, &[&a, &b], heads, &mut y);
        for r in 0..6 {
            let (cache, pos) = if r < 5 { (&a, 3 + r) } else { (&b, 9) };
            let want = reference(&q[r * q_row..][..q_row], &cache.k, &cache.v, pos, heads);
            for (got, want) in y[r * q_row..][..q_row].iter().zip(&want) {
                assert!((got - want).abs() < 1e-5, "row {r}: {got} vs {want}");
            }
        }
        // The second sequence alone gives the same bits.
        let mut alone = vec![0f32; q_row];
        let single = [Span {
            start: 0,
            len: 1,
            pos: 9,
        }];
        attend(&q[5 * q_row..], &single, &[&b], heads, &mut alone);
        assert_eq!(alone, y[5 * q_row..]);
        // And so does a row of the first sequence computed on its own.
        let mut row2 = vec![0f32; q_row];
        let single = [Span {
            start: 0,
            len: 1,
            pos: 5,
        }];
        attend(&q[2 * q_row..3 * q_row], &single, &[&a], heads, &mut row2);
        assert_eq!(row2, y[2 * q_row..3 * q_row]);
    }
}
