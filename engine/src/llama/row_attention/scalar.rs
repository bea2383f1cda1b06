//! The row attention of one query, in plain scalar code: the definition of the arithmetic
//! (see the parent module's docs) that the vector kernel reproduces bit for bit, and the
//! kernel itself on CPUs without AVX2 and FMA.

use super::exp2::{exp2, max_ps};
use super::{BLOCK, Scratch, Tile, score_scale};
use crate::llama::cpu_matmul::SharedPtr;
use crate::llama::sequence::LayerKv;

/// Where one query's keys and values are: its sequence's cache of the layer, `kv_row` values
/// per position, its key/value head starting at `kv_off` within a position.
#[derive(Clone, Copy)]
pub(super) struct Head<'a> {
    pub(super) kv: &'a LayerKv,
    pub(super) kv_row: usize,
    pub(super) kv_off: usize,
}

/// Buffers [`attend_query`] reuses.
#[derive(Default)]
pub(super) struct QueryBuffers {
    qs: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

/// `y = Σ_j softmax(s)_j · v_j` over positions `0..=pos` for query `q` (`y` has `q`'s width).
pub(super) fn attend_query(
    q: &[f32],
    pos: usize,
    head: Head<'_>,
    buffers: &mut QueryBuffers,
    y: &mut [f32],
) {
    let d = q.len();
    let scale = score_scale(d);
    let QueryBuffers { qs, scores, acc } = buffers;
    qs.clear();
    qs.extend(q.iter().map(|&x| x * scale));
    acc.clear();
    acc.resize(d, 0.0);
    scores.clear();
    scores.resize(BLOCK, 0.0);
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    let at = |j: usize| j * head.kv_row + head.kv_off;
    let mut lo = 0;
    while lo <= pos {
        let hi = (lo + BLOCK).min(pos + 1);
        let s = &mut scores[..hi - lo];
        for (j, score) in (lo..hi).zip(s.iter_mut()) {
            let key = &head.kv.k[at(j)..][..d];
            let mut dot = 0f32;
            for (&a, &b) in qs.iter().zip(key) {
                dot = a.mul_add(b.to_f32(), dot);
            }
            *score = dot;
        }
        let mut block_max = f32::NEG_INFINITY;
        for &x in s.iter() {
            block_max = max_ps(block_max, x);
        }
        let new_max = max_ps(m, block_max);
        let alpha = exp2(m - new_max);
        l *= alpha;
        for a in acc.iter_mut() {
            *a *= alpha;
        }
        m = new_max;
        for x in s.iter_mut() {
            *x = exp2(*x - m);
            l += *x;
        }
        for (j, &w) in (lo..hi).zip(s.iter()) {
            let value = &head.kv.v[at(j)..][..d];
            for (a, &v) in acc.iter_mut().zip(value) {
                *a = w.mul_add(v.to_f32(), *a);
            }
        }
        lo = hi;
    }
    for (out, &a) in y.iter_mut().zip(acc.iter()) {
        *out = a / l;
    }
}

/// Every query of `tile`, one after another, written through `out` (the whole output).
pub(super) fn run_tile(tile: &Tile<'_>, scratch: &mut Scratch, out: SharedPtr<f32>) {
    let d = tile.d;
    scratch.y.resize(d, 0.0);
    for lane in 0..tile.lanes() {
        let base = tile.offset(lane);
        attend_query(
            &tile.q[base..][..d],
            tile.position(lane),
            tile.head,
            &mut scratch.query,
            &mut scratch.y,
        );
        let y = &scratch.y;
        for (e, &value) in y.iter().enumerate() {
            // SAFETY: `base + e` is within the output, which has the queries' shape; this
            // tile is the only writer of this query's row and head.
            unsafe { out.write(base + e, value) };
        }
    }
}
