//! [`Projection`]: several quantized linear maps of the same input, fused into one matmul when
//! that cannot change the results.
//!
//! Attention computes Q, K and V from the same normed input, and the MLP computes its gate and
//! up projections from the same input. Stacking those weight matrices row-wise turns three (or
//! two) matmuls into one: the input is quantized once and the thread pool is entered once,
//! which matters in decode where each matmul is a small matrix-vector product.
//!
//! Fusion must not change a single bit: candle's quantized matmul computes every output as a
//! dot product of one weight row with the quantized input, in groups of four columns. The
//! parts are therefore only fused when they share a quantized block type and each part's
//! width is a multiple of 16, so that every column lands in a group of the same shape as when
//! computed alone. Float weights (F32/F16/BF16, which candle multiplies with a dense gemm whose
//! blocking depends on the width) are never fused. The unit tests check bit equality.

use std::io::{Read, Seek};

use candle_core::quantized::GgmlDType;

use super::linear::Linear;
use candle_core::{D, Module, Tensor};

use super::error::Result;
use super::weights::WeightReader;

/// Width granularity that keeps fused columns in the same dot-product groups.
const FUSE_ALIGN: usize = 16;

/// Linear maps `x -> x Wᵢᵀ` of one input, fused or not.
#[derive(Debug, Clone)]
pub enum Projection {
    /// One matmul over the stacked weights; outputs are split by width.
    Fused {
        /// The stacked weights.
        matmul: Linear,
        /// Output width of each part, in order.
        widths: Vec<usize>,
    },
    /// One matmul per part.
    Separate(Vec<Linear>),
}

impl Projection {
    /// Loads the matrices `parts` (`(name, out_width)`, each `[out_width, in_width]`), fusing
    /// them when `fuse` is set and fusion is exact (see the module docs).
    pub fn load<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        parts: &[(&str, usize)],
        in_width: usize,
        fuse: bool,
    ) -> Result<Self> {
        if fuse
            && parts.len() > 1
            && Self::fusable(weights, parts, in_width)?
            && let Some(matmul) = Linear::load_stacked(weights, parts, in_width)?
        {
            return Ok(Self::Fused {
                matmul,
                widths: parts.iter().map(|(_, w)| *w).collect(),
            });
        }
        let matmuls = parts
            .iter()
            .map(|(name, out)| Linear::load(weights, name, *out, in_width))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Separate(matmuls))
    }

    fn fusable<R: Read + Seek>(
        weights: &WeightReader<'_, R>,
        parts: &[(&str, usize)],
        in_width: usize,
    ) -> Result<bool> {
        let mut dtype = None;
        for (name, out) in parts {
            let info = weights.info(name, &[*out, in_width])?;
            let d = info.ggml_dtype;
            if matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
                || out % FUSE_ALIGN != 0
                || dtype.is_some_and(|first| first != d)
            {
                return Ok(false);
            }
            dtype = Some(d);
        }
        Ok(true)
    }

    /// Whether the parts run as one matmul.
    pub fn is_fused(&self) -> bool {
        matches!(self, Self::Fused { .. })
    }

    /// Applies every part to `x` (`[.., in_width]`), returning one `[.., out_width]` tensor per
    /// part, in order. Fused outputs are views into one buffer (not contiguous).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused { matmul, widths } => {
                let y = matmul.forward(x)?;
                let mut start = 0;
                let mut outs = Vec::with_capacity(widths.len());
                for &w in widths {
                    outs.push(y.narrow(D::Minus1, start, w)?);
                    start += w;
                }
                Ok(outs)
            }
            Self::Separate(matmuls) => Ok(matmuls
                .iter()
                .map(|m| m.forward(x))
                .collect::<candle_core::Result<_>>()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_core::quantized::QTensor;

    use super::*;

    fn tensor(rows: usize, cols: usize, seed: u64) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let x = (i as u64 + seed * 1_000_003)
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor")
    }

    /// Fused and separate matmuls agree bit for bit, in decode (1 row) and prefill (7 rows).
    #[test]
    fn fused_outputs_are_bit_identical_to_separate_ones() {
        let k = 512;
        let widths = [512usize, 128, 128];
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let parts: Vec<QTensor> = widths
                .iter()
                .enumerate()
                .map(|(i, &w)| QTensor::quantize(&tensor(w, k, i as u64), dtype).expect("quantize"))
                .collect();
            let mut bytes = Vec::new();
            for p in &parts {
                bytes.extend_from_slice(&p.data().expect("data"));
            }
            let stacked = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                &bytes,
                vec![widths.iter().sum(), k],
                &Device::Cpu,
            )
            .expect("stack");
            let fused = Projection::Fused {
                matmul: Linear::from_qtensor(stacked).expect("qmm"),
                widths: widths.to_vec(),
            };
            let separate = Projection::Separate(
                parts
                    .into_iter()
                    .map(|p| Linear::from_qtensor(p).expect("qmm"))
                    .collect(),
            );
            for rows in [1, 7] {
                let x = tensor(rows, k, 99).reshape((1, rows, k)).expect("reshape");
                let a = fused.forward(&x).expect("fused");
                let b = separate.forward(&x).expect("separate");
                for (a, b) in a.iter().zip(&b) {
                    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
                    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
                    assert_eq!(a, b, "{dtype:?}, {rows} rows");
                }
            }
        }
    }
}
