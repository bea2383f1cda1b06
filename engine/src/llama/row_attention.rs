//! The attention kernel of the batched forward: each query row attends to its own sequence's
//! cached positions, in blocks of positions with an online softmax, with an arithmetic fixed
//! per query.
//!
//! The batched forward ([`LlamaShard::forward_batch`](super::LlamaShard::forward_batch)) puts
//! the rows of many sequences (prefill chunks and decode rows) through one set of matmuls; the
//! attention of each row reads only its own sequence's keys and values (f16, see
//! [`SequenceCache`](super::SequenceCache)). For every query row at position `p` of its
//! sequence and every query head (reading key/value head `h / n_rep`) it computes
//! `y = Σ_{j<=p} softmax(q·k_j/√d)_j · v_j`, as follows (the definition is
//! [`scalar::attend_query`]):
//!
//! ```text
//! q' = q · (log2 e / √d)                               (scores in base 2)
//! m = -inf, l = 0, acc = 0
//! for each block of BLOCK positions [lo, hi), lo = 0, BLOCK, 2·BLOCK, …, hi <= p + 1:
//!     s_j   = fma-chain over i in order of q'_i · k_j,i
//!     m'    = max(m, max_j s_j)
//!     α     = 2^(m − m');  l = l·α;  acc = acc·α;  m = m'
//!     w_j   = 2^(s_j − m);  l += w_j            (j in order)
//!     acc   = fma(w_j, v_j, acc)                (j in order)
//! y = acc / l
//! ```
//!
//! with [`exp2`]'s `2^x`. The blocks are aligned to position 0, so where a prompt was cut into
//! chunks, what else is in the batch, which tile a query lands in and how many threads run
//! never change a query's operations: a row's result depends only on its query and its
//! sequence's cache. That is the batch invariance the scheduler relies on (a sequence's
//! tokens do not depend on what it was batched with). No score matrix is materialised: memory
//! is a few blocks of scratch per thread, whatever the prompt's length.
//!
//! Work is split into tiles: up to [`MAX_LANES`] queries of one sequence (consecutive rows,
//! and the query heads of one key/value head), which read each key and value once for all of
//! them. With AVX2, FMA and F16C the tile runs in [`avx2`], the queries in the lanes of vector
//! registers (scores, softmax and weighted sums all vertical, no horizontal reductions, no
//! libm calls); elsewhere [`scalar`] runs the definition query by query. Both give the same
//! bits (the tests check it), so the choice never changes a result either.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod exp2;
mod scalar;

use std::ops::Range;

use super::cpu_matmul::SharedPtr;
use super::sequence::LayerKv;
use scalar::{Head, QueryBuffers};

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

/// Positions per softmax block (blocks start at multiples of it).
const BLOCK: usize = 64;

/// Most queries in one tile (three registers of eight lanes).
const MAX_LANES: usize = 24;

/// Most tiles in one task (which converts each block of keys and values once for them all).
const TASK_TILES: usize = 4;

/// The factor queries are multiplied by: `log2 e / √d`, rounded once to f32.
fn score_scale(d: usize) -> f32 {
    (std::f64::consts::LOG2_E / (d as f64).sqrt()) as f32
}

/// Queries of one tile: rows `row0..row0 + rows` of the batch (positions `pos0..`) of one
/// sequence, and for each the query heads `head0..head0 + reps`, all reading one key/value
/// head. Lane `r * reps + k` is row `row0 + r`, head `head0 + k`.
#[derive(Clone, Copy)]
struct Tile<'a> {
    /// All queries, `[rows][n_head * d]`.
    q: &'a [f32],
    q_row: usize,
    row0: usize,
    pos0: usize,
    rows: usize,
    head0: usize,
    reps: usize,
    head: Head<'a>,
    d: usize,
}

impl Tile<'_> {
    fn lanes(&self) -> usize {
        self.rows * self.reps
    }

    /// Offset of lane `lane`'s query in `q` (and of its output in `y`).
    fn offset(&self, lane: usize) -> usize {
        let (r, k) = (lane / self.reps, lane % self.reps);
        (self.row0 + r) * self.q_row + (self.head0 + k) * self.d
    }

    /// Position of lane `lane`'s row.
    fn position(&self, lane: usize) -> usize {
        self.pos0 + lane / self.reps
    }

    /// Positions the tile reads: those of its last row and before.
    fn width(&self) -> usize {
        self.pos0 + self.rows
    }
}

/// Buffers a thread reuses across its tasks (a few blocks' worth, whatever the context).
#[derive(Default)]
struct Scratch {
    /// The block's keys and values in f32: `[pos][dim]`.
    kb: Vec<f32>,
    vb: Vec<f32>,
    /// The block's scores, then weights: `[pos][lane]`.
    pb: Vec<f32>,
    /// The vector kernel's state of each tile of the task.
    #[cfg(target_arch = "x86_64")]
    groups: Vec<avx2::Group>,
    /// The scalar path's buffers.
    query: QueryBuffers,
    y: Vec<f32>,
}

/// Which implementation runs the tiles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        Self::Scalar
    }

    /// Runs `tiles` (of one sequence and key/value head) and writes through `out`.
    fn run(self, tiles: &[Tile<'_>], scratch: &mut Scratch, out: SharedPtr<f32>) {
        match self {
            Self::Scalar => {
                for tile in tiles {
                    scalar::run_tile(tile, scratch, out);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2, FMA and F16C were detected; `out` is the output the tiles index.
            Self::Avx2 => unsafe { avx2::run_tiles(tiles, scratch, out) },
        }
    }
}

/// `y[r, h, :]` for every row `r` of every span and head `h` (see the module docs); `q` is
/// `[rows][n_head * head_dim]` (already rotated), `caches[i]` holds span `i`'s keys and values
/// for positions `0..spans[i].pos + spans[i].len`, and `y` has `q`'s shape.
pub(super) fn attend(q: &[f32], spans: &[Span], caches: &[&LayerKv], heads: Heads, y: &mut [f32]) {
    attend_with(Kernel::detect(), q, spans, caches, heads, y);
}

/// [`attend`] with a chosen kernel.
fn attend_with(
    kernel: Kernel,
    q: &[f32],
    spans: &[Span],
    caches: &[&LayerKv],
    heads: Heads,
    y: &mut [f32],
) {
    let Heads {
        n_head,
        n_kv_head,
        head_dim: d,
    } = heads;
    let q_row = n_head * d;
    let kv_row = n_kv_head * d;
    let n_rep = n_head / n_kv_head;
    let rows: usize = spans.iter().map(|s| s.len).sum();
    assert!(
        q.len() == rows * q_row && y.len() == q.len() && caches.len() == spans.len(),
        "row attention: shapes"
    );
    for (span, cache) in spans.iter().zip(caches) {
        let end = span.pos + span.len;
        assert!(
            cache.k.len() >= end * kv_row && cache.v.len() >= end * kv_row,
            "row attention: a cache holds fewer positions than its span reads"
        );
    }
    // A tile: all query heads of a key/value head for as many rows as fit in its lanes (or,
    // with more heads per key/value head than lanes, one row and a share of them).
    let (tile_rows, tile_reps) = if n_rep >= MAX_LANES {
        (1, MAX_LANES)
    } else {
        (MAX_LANES / n_rep, n_rep)
    };
    // Tasks: up to TASK_TILES consecutive tiles of one sequence and key/value head, which
    // share every block of keys and values they read.
    let mut tiles = Vec::new();
    let mut tasks = Vec::new();
    for (span, cache) in spans.iter().zip(caches) {
        for kv_h in 0..n_kv_head {
            for rep in (0..n_rep).step_by(tile_reps) {
                for r in (0..span.len).step_by(tile_rows) {
                    if r % (TASK_TILES * tile_rows) == 0 {
                        tasks.push(tiles.len()..tiles.len());
                    }
                    tiles.push(Tile {
                        q,
                        q_row,
                        row0: span.start + r,
                        pos0: span.pos + r,
                        rows: tile_rows.min(span.len - r),
                        head0: kv_h * n_rep + rep,
                        reps: tile_reps.min(n_rep - rep),
                        head: Head {
                            kv: cache,
                            kv_row,
                            kv_off: kv_h * d,
                        },
                        d,
                    });
                    if let Some(task) = tasks.last_mut() {
                        task.end = tiles.len();
                    }
                }
            }
        }
    }
    // Most work first, so that the threads' shares even out at the end.
    let work = |task: &Range<usize>| -> usize {
        tiles[task.clone()]
            .iter()
            .map(|t| t.width() * t.lanes())
            .sum()
    };
    tasks.sort_by_key(|task| std::cmp::Reverse(work(task)));
    let out = SharedPtr(y.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        let mut scratch = Scratch::default();
        for task in &tasks[range] {
            kernel.run(&tiles[task.clone()], &mut scratch, out);
        }
    });
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::cpu_matmul::testing::random;
    use super::*;

    fn kv(values: &[f32]) -> Vec<f16> {
        values.iter().map(|&x| f16::from_f32(x)).collect()
    }

    /// A layer cache of `positions` random positions.
    fn cache(positions: usize, heads: Heads, seed: u64) -> LayerKv {
        let n = positions * heads.n_kv_head * heads.head_dim;
        // Keys with a larger spread than values, so that the softmax is not flat.
        let k: Vec<f32> = random(n, seed).iter().map(|x| x * 6.0).collect();
        LayerKv {
            k: kv(&k),
            v: kv(&random(n, seed + 1)),
        }
    }

    /// The textbook formula in f64 (on the f16 keys and values), for comparison.
    fn reference(q: &[f32], cache: &LayerKv, pos: usize, heads: Heads) -> Vec<f32> {
        let Heads {
            n_head,
            n_kv_head,
            head_dim: d,
        } = heads;
        let at = |x: &[f16], j: usize, kv: usize, i: usize| {
            f64::from(x[(j * n_kv_head + kv) * d + i].to_f32())
        };
        let mut y = vec![0f32; n_head * d];
        for h in 0..n_head {
            let kv = h / (n_head / n_kv_head);
            let s: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..d)
                        .map(|i| f64::from(q[h * d + i]) * at(&cache.k, j, kv, i))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                y[h * d + i] = (0..=pos)
                    .map(|j| e[j] / sum * at(&cache.v, j, kv, i))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Each query alone through the definition ([`scalar::attend_query`]).
    fn by_definition(q: &[f32], spans: &[Span], caches: &[&LayerKv], heads: Heads) -> Vec<f32> {
        let Heads {
            n_head,
            n_kv_head,
            head_dim: d,
        } = heads;
        let n_rep = n_head / n_kv_head;
        let mut y = vec![0f32; q.len()];
        let mut buffers = QueryBuffers::default();
        for (span, cache) in spans.iter().zip(caches) {
            for r in 0..span.len {
                let row = span.start + r;
                for h in 0..n_head {
                    let at = (row * n_head + h) * d;
                    let head = Head {
                        kv: cache,
                        kv_row: n_kv_head * d,
                        kv_off: (h / n_rep) * d,
                    };
                    scalar::attend_query(
                        &q[at..at + d],
                        span.pos + r,
                        head,
                        &mut buffers,
                        &mut y[at..at + d],
                    );
                }
            }
        }
        y
    }

    #[test]
    fn matches_the_formula() {
        for (n_head, n_kv_head, head_dim) in [(6, 2, 20), (9, 3, 64), (4, 4, 16)] {
            let heads = Heads {
                n_head,
                n_kv_head,
                head_dim,
            };
            let q_row = n_head * head_dim;
            // Positions crossing several blocks, a prefill chunk starting mid-block.
            let a = cache(200, heads, 1);
            let spans = [Span {
                start: 0,
                len: 11,
                pos: 189,
            }];
            let q = random(11 * q_row, 5);
            let mut y = vec![0f32; q.len()];
            attend(&q, &spans, &[&a], heads, &mut y);
            for r in 0..11 {
                let want = reference(&q[r * q_row..][..q_row], &a, 189 + r, heads);
                for (got, want) in y[r * q_row..][..q_row].iter().zip(&want) {
                    assert!(
                        (got - want).abs() < 2e-5,
                        "{heads:?} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Every kernel gives every query the bits of the definition, whatever the batch, the
    /// tiles and the blocks around it.
    #[test]
    fn every_kernel_gives_each_query_the_bits_of_the_definition() {
        let mut kernels = vec![Kernel::Scalar];
        if Kernel::detect() != Kernel::Scalar {
            kernels.push(Kernel::detect());
        }
        // (heads, kv heads, width): tiles of 1 to 3 registers, tails of keys and dimensions,
        // and more query heads per key/value head than a tile has lanes.
        for (n_head, n_kv_head, head_dim) in [
            (9, 3, 64),
            (6, 2, 20),
            (4, 4, 12),
            (2, 1, 8),
            (30, 1, 8),
            (8, 2, 7),
        ] {
            let heads = Heads {
                n_head,
                n_kv_head,
                head_dim,
            };
            let q_row = n_head * head_dim;
            // A prefill chunk crossing block boundaries, a decode row at a block's first
            // position, a chunk from position 0, a single row at position 0.
            let spans = [
                Span {
                    start: 0,
                    len: 37,
                    pos: 100,
                },
                Span {
                    start: 37,
                    len: 1,
                    pos: 128,
                },
                Span {
                    start: 38,
                    len: 70,
                    pos: 0,
                },
                Span {
                    start: 108,
                    len: 1,
                    pos: 0,
                },
            ];
            let caches: Vec<LayerKv> = spans
                .iter()
                .enumerate()
                .map(|(i, s)| cache(s.pos + s.len, heads, 10 + 2 * i as u64))
                .collect();
            let refs: Vec<&LayerKv> = caches.iter().collect();
            let q = random(109 * q_row, 3);
            let want = by_definition(&q, &spans, &refs, heads);
            for &kernel in &kernels {
                let mut y = vec![0f32; q.len()];
                attend_with(kernel, &q, &spans, &refs, heads, &mut y);
                assert!(
                    bits(&y) == bits(&want),
                    "{heads:?}: a kernel differs from the definition"
                );
                // A span alone, and one row of it alone, give the same bits again.
                let mut alone = vec![0f32; 37 * q_row];
                let single = [Span {
                    start: 0,
                    len: 37,
                    pos: 100,
                }];
                attend_with(
                    kernel,
                    &q[..37 * q_row],
                    &single,
                    &refs[..1],
                    heads,
                    &mut alone,
                );
                assert!(
                    bits(&alone) == bits(&want[..37 * q_row]),
                    "{heads:?}: alone"
                );
                let mut row = vec![0f32; q_row];
                let single = [Span {
                    start: 0,
                    len: 1,
                    pos: 120,
                }];
                let at = 20 * q_row..21 * q_row;
                attend_with(kernel, &q[at.clone()], &single, &refs[..1], heads, &mut row);
                assert!(bits(&row) == bits(&want[at]), "{heads:?}: one row");
            }
        }
    }

    #[test]
    fn a_hidden_position_never_changes_a_query() {
        // A cache whose later positions hold values that would change every output (huge
        // keys, NaN-free): a query must not see positions after its own, not even as zeros.
        let heads = Heads {
            n_head: 3,
            n_kv_head: 1,
            head_dim: 8,
        };
        let mut a = cache(80, heads, 7);
        for x in &mut a.k[70 * 8..] {
            *x = f16::from_f32(1000.0);
        }
        for x in &mut a.v[70 * 8..] {
            *x = f16::from_f32(-0.0);
        }
        let q = random(12 * 24, 9);
        let spans = [Span {
            start: 0,
            len: 12,
            pos: 68,
        }];
        let mut y = vec![0f32; q.len()];
        attend(&q, &spans, &[&a], heads, &mut y);
        let want = by_definition(&q, &spans, &[&a], heads);
        assert!(bits(&y) == bits(&want));
        // Rows 0 and 1 (positions 68 and 69) do not see position 70.
        let mut clean = cache(80, heads, 7);
        clean.k.truncate(70 * 8);
        clean.v.truncate(70 * 8);
        let mut first = vec![0f32; 2 * 24];
        let spans = [Span {
            start: 0,
            len: 2,
            pos: 68,
        }];
        attend(&q[..48], &spans, &[&clean], heads, &mut first);
        assert!(bits(&first) == bits(&y[..48]));
    }

    /// A hidden position must leave a query's output as it is, even an output of `-0`
    /// (adding `0 · v` would make it `+0`).
    #[test]
    fn a_hidden_position_keeps_the_sign_of_a_zero() {
        let heads = Heads {
            n_head: 1,
            n_kv_head: 1,
            head_dim: 8,
        };
        let d = 8;
        let f = f16::from_f32;
        let mut k = vec![f(0.0); 66 * d];
        let mut v = vec![f(-0.0); 66 * d];
        // Block 0: position 0 gets a weight of about 2^-120 next to position 1 and adds
        // -2^-120 to the output; block 1's larger score at position 64 rescales that by
        // 2^-30, to -0; position 64 adds -0 · w, keeping it -0.
        for j in 0..64 {
            k[j * d] = f(-117.0);
        }
        k[d] = f(118.0);
        k[64 * d] = f(178.0);
        for x in &mut v[..d] {
            *x = f(-1.0);
        }
        // Position 65, which the first row does not see: a positive value.
        for x in &mut v[65 * d..] {
            *x = f(1.0);
        }
        let a = LayerKv { k, v };
        let mut q = vec![0f32; 2 * d];
        q[0] = 1.0;
        q[d] = 1.0;
        let spans = [Span {
            start: 0,
            len: 2,
            pos: 64,
        }];
        let want = by_definition(&q, &spans, &[&a], heads);
        assert!(
            want[..d].iter().all(|x| x.to_bits() == (-0f32).to_bits()),
            "the case this test is for: {:?}",
            &want[..d]
        );
        let mut y = vec![0f32; q.len()];
        attend(&q, &spans, &[&a], heads, &mut y);
        assert!(bits(&y) == bits(&want), "{y:?} vs {want:?}");
    }
}
