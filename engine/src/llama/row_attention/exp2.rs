//! `2^x` for the softmax of the row attention, the same bits in scalar code and in AVX2.
//!
//! The attention computes its scores in base 2 (the queries are pre-multiplied by `log2 e`),
//! so every weight is `2^(s - max)` with a non-positive argument. libm's `expf` is exact to
//! within an ulp but scalar and costs a call per score, which at a 4,000-token prompt is a few
//! billion calls. This is the classic range reduction `2^x = 2^n · 2^f` (`n` the nearest
//! integer, `|f| <= 1/2`) with Cephes' degree-6 polynomial for `2^f` (relative error about
//! 2e-7, a couple of ulps), evaluated with fused multiply-adds in a fixed order, and `2^n` built
//! from the exponent bits. [`exp2`] (scalar, `f32::mul_add`) and [`exp2_avx2`] (eight lanes)
//! run the same operations, so they give the same bits for every input, lane by lane.
//!
//! Defined for `x <= 0` (what the softmax needs): `2^0` is exactly `1` (so a block that brings
//! no new maximum rescales nothing), and arguments below `-126.5`, `-inf` included, give
//! exactly `0`.

/// Cephes `exp2f` coefficients: `2^f ≈ 1 + f·(P0 f⁵ + P1 f⁴ + … + P5)` on `[-1/2, 1/2]`.
const P: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// Lowest argument kept: below it the result is 0 (`2^-127` has no normal exponent).
const FLOOR: f32 = -127.0;

/// `a > b ? a : b`, the exact semantics of `maxps` (the second operand when they are equal or
/// unordered), so that scalar and vector code pick the same value, sign of zero included.
#[inline(always)]
pub(super) fn max_ps(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// `2^x` for `x <= 0`; see the module docs.
#[inline(always)]
pub(super) fn exp2(x: f32) -> f32 {
    let x = max_ps(x, FLOOR);
    let n = x.round_ties_even();
    let f = x - n;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p.mul_add(f, c);
    }
    let p = p.mul_add(f, 1.0);
    // n is an integer in -127..=0: its biased exponent is 0..=127, and 0 makes the scale 0.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// [`exp2`] on eight lanes.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn exp2_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(x, _mm256_set1_ps(FLOOR));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm256_sub_ps(x, n);
    let mut p = _mm256_set1_ps(P[0]);
    for &c in &P[1..] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
    let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased));
    _mm256_mul_ps(p, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments from 0 down to -130: a fine grid, the integers and their neighbours.
    fn arguments() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=130_000).map(|i| -(i as f32) / 1000.0).collect();
        for n in 0..=130 {
            let n = -(n as f32);
            xs.extend([n, n - 0.5, n + 0.5, n.next_down(), n.next_up()]);
        }
        xs.retain(|x| *x <= 0.0);
        xs.extend([-0.0, f32::NEG_INFINITY, f32::MIN, -1e-30]);
        xs
    }

    #[test]
    fn is_accurate_exact_at_zero_and_zero_below_the_floor() {
        assert_eq!(exp2(0.0).to_bits(), 1f32.to_bits());
        assert_eq!(exp2(-0.0).to_bits(), 1f32.to_bits());
        assert_eq!(exp2(f32::NEG_INFINITY).to_bits(), 0);
        assert_eq!(exp2(-127.0).to_bits(), 0);
        assert_eq!(exp2(-1.0), 0.5);
        let mut worst = 0f64;
        for x in arguments() {
            let got = f64::from(exp2(x));
            let want = f64::from(x).exp2();
            if x < -126.5 {
                assert_eq!(got, 0.0, "2^{x}");
            } else if x >= -125.0 {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_version_gives_the_scalar_bits() {
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let xs = arguments();
        for chunk in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected; both arrays hold eight floats.
            unsafe {
                let v = exp2_avx2(_mm256_loadu_ps(lanes.as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), v);
            }
            for (x, got) in lanes.iter().zip(out) {
                assert_eq!(got.to_bits(), exp2(*x).to_bits(), "2^{x}");
            }
        }
    }
}
