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

/// `y[r, h, :]` for every row `r` of every span and head `h` (see the module docs); `q` is
/// `[rows][n_head * head_dim]` (already rotated), `caches[i]` holds span `i`'s keys and values
/// for positions `0..spans[i].pos + spans[i].len`, and `y` has `q`'s shape.
pub(super) fn attend(q: &[f32], spans: &[Span], caches: &[&LayerKv], heads: Heads, y: &mut [f32]) {
    let Heads {
        n_head,
        n_kv_head,
        head_dim,
    } = heads;
    let q_row = n_head * head_dim;
    let kv_row = n_kv_head * head_dim;
    let n_rep = n_head / n_kv_head;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scale = scale as f32;
    // Row -> (span, position).
    let rows: Vec<(usize, usize)> = spans
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.len).map(move |r| (i, s.pos + r)))
        .collect();
    assert!(
        q.len() == rows.len() * q_row && y.len() == q.len(),
        "row attention: shapes"
    );
    let out = SharedPtr(y.as_mut_ptr());
    let avx2 = avx2_available();
    candle_core::utils::barrier_pool().execute_chunked(rows.len() * n_head, |range| {
        let mut scores = Vec::new();
        let mut acc = vec![0f32; head_dim];
        for task in range {
            let (row, h) = (task / n_head, task % n_head);
            let (seq, pos) = rows[row];
            let cache = caches[seq];
            let kv_h = h / n_rep;
            let query = &q[row * q_row + h * head_dim..][..head_dim];
            scores.clear();
            scores.resize(pos + 1, 0.0);
            let job = Job {
                query,
                keys: &cache.k,
                values: &cache.v,
                offset: kv_h * head_dim,
                kv_row,
                scale,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected at run time.
                unsafe { job.run_avx2(&mut scores, &mut acc) };
            } else {
                job.run(&mut scores, &mut acc);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx2;
                job.run(&mut scores, &mut acc);
            }
            let base = row * q_row + h * head_dim;
            for (d, &value) in acc.iter().enumerate() {
                // SAFETY: base + d < rows * q_row = y.len(); task (row, h) is the only writer
                // of these elements.
                unsafe { out.write(base + d, value) };
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

/// One row and head: the query, its sequence's cache, and where the head sits in a cache row.
struct Job<'a> {
    query: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    offset: usize,
    kv_row: usize,
    scale: f32,
}

impl Job<'_> {
    /// Scores into `scores` (one per cached position), output into `acc`.
    #[inline(always)]
    fn run(&self, scores: &mut [f32], acc: &mut [f32]) {
        let d = self.query.len();
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let key = &self.keys[j * self.kv_row + self.offset..][..d];
            *s = dot(self.query, key) * self.scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        acc.fill(0.0);
        for (j, &s) in scores.iter().enumerate() {
            let w = s * inv;
            let value = &self.values[j * self.kv_row + self.offset..][..d];
            for (a, &v) in acc.iter_mut().zip(value) {
                *a += w * v;
            }
        }
    }

    /// [`Job::run`] compiled for AVX2 (the same arithmetic, wider registers).
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, scores: &mut [f32], acc: &mut [f32]) {
        self.run(scores, acc);
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
