//! [`Linear`]: a quantized linear map `x -> x Wᵀ`, computed by the fastest exact kernel.
//!
//! Q4_1 weights on a CPU go through [`Q41Matrix`](super::q4_1::Q41Matrix) (SIMD, bit-identical
//! to candle); everything else through candle's `QMatMul`. Set `CANOPY_Q4_1_KERNEL=candle` to
//! force candle's path everywhere (benchmarks and accuracy checks compare the two).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

use super::q4_1::Q41Matrix;

/// A linear map over quantized weights.
#[derive(Debug, Clone)]
pub enum Linear {
    /// candle's quantized matmul.
    Candle(QMatMul),
    /// Canopy's Q4_1 CPU kernel.
    Q41(Arc<Q41Matrix>),
}

fn use_own_kernel(tensor: &QTensor) -> bool {
    tensor.device().is_cpu() && std::env::var("CANOPY_Q4_1_KERNEL").map_or(true, |v| v != "candle")
}

impl Linear {
    /// The map for `tensor` (`[out, in]`).
    pub fn from_qtensor(tensor: QTensor) -> candle_core::Result<Self> {
        if use_own_kernel(&tensor)
            && let Some(m) = Q41Matrix::from_qtensor(&tensor)
        {
            return Ok(Self::Q41(Arc::new(m)));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(tensor)?))
    }

    /// The map for a shared tensor (e.g. a tied embedding table used as the output head).
    pub fn from_arc(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        if use_own_kernel(&tensor)
            && let Some(m) = Q41Matrix::from_qtensor(&tensor)
        {
            return Ok(Self::Q41(Arc::new(m)));
        }
        Ok(Self::Candle(QMatMul::from_arc(tensor)?))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Q41(m) => m.forward(x),
        }
    }
}
