//! [`Linear`]: a quantized linear map `x -> x Wᵀ`, computed by the fastest exact kernel.
//!
//! On a CPU, Q4_1 weights go through [`Q41Matrix`] (SIMD, bit-identical to candle), built
//! straight from the file's bytes: it is the weights' only copy in memory. Q8_0 weights go
//! through [`Q80Matrix`] (the same instructions as candle's AVX2 path, so the same bits, on
//! candle's own tensor) where candle would take that path. Everything else goes through
//! candle's `QMatMul`. Set `CANOPY_Q4_1_KERNEL=candle` to force candle's path everywhere
//! (benchmarks and accuracy checks compare the two).

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::error::{LlamaError, Result};
use super::q4_1::Q41Matrix;
use super::q8_0::Q80Matrix;
use super::weights::WeightReader;

/// A linear map over quantized weights.
#[derive(Debug, Clone)]
pub enum Linear {
    /// candle's quantized matmul.
    Candle(QMatMul),
    /// Canopy's Q4_1 CPU kernel.
    Q41(Arc<Q41Matrix>),
    /// Canopy's Q8_0 CPU kernel.
    Q80(Arc<Q80Matrix>),
}

/// Whether Canopy's own kernels may run on `device` (CPU, not switched off).
pub fn own_kernel_enabled(device: &Device) -> bool {
    device.is_cpu() && std::env::var("CANOPY_Q4_1_KERNEL").map_or(true, |v| v != "candle")
}

impl Linear {
    /// The map for `tensor` (`[out, in]`).
    pub fn from_qtensor(tensor: QTensor) -> candle_core::Result<Self> {
        Self::from_arc(Arc::new(tensor))
    }

    /// The map for a shared tensor (e.g. a tied embedding table used as the output head). A
    /// Q4_1 table is repacked into a [`Q41Matrix`], a copy: prefer
    /// [`QuantizedEmbedding`](super::QuantizedEmbedding)'s own head, which shares its table.
    /// Any other type shares `tensor`.
    pub fn from_arc(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        if own_kernel_enabled(&tensor.device()) {
            if let Some(m) = Q41Matrix::from_qtensor(&tensor) {
                return Ok(Self::Q41(Arc::new(m)));
            }
            if let Some(m) = Q80Matrix::new(Arc::clone(&tensor)) {
                return Ok(Self::Q80(Arc::new(m)));
            }
        }
        QMatMul::from_arc(tensor).map(Self::Candle)
    }

    /// Loads the `[rows, cols]` matrix `name`.
    pub fn load<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        Self::load_stacked(weights, &[(name, rows)], cols)?.ok_or_else(|| LlamaError::TensorRead {
            name: name.to_string(),
            reason: "no block type".into(),
        })
    }

    /// Loads matrices `parts` (`(name, rows_i)`, each `[rows_i, cols]`) stacked row-wise into
    /// one `[Σ rows_i, cols]` map; `None` when their block types differ.
    pub fn load_stacked<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        parts: &[(&str, usize)],
        cols: usize,
    ) -> Result<Option<Self>> {
        let Some(dtype) = weights.common_dtype(parts, cols)? else {
            return Ok(None);
        };
        let rows: usize = parts.iter().map(|(_, rows)| rows).sum();
        if dtype == GgmlDType::Q4_1 && own_kernel_enabled(weights.device()) {
            let Some((_, bytes)) = weights.stacked_raw(parts, cols)? else {
                return Ok(None);
            };
            if let Some(m) = Q41Matrix::from_bytes(rows, cols, &bytes) {
                return Ok(Some(Self::Q41(Arc::new(m))));
            }
        }
        let tensor = match parts {
            [(name, rows)] => weights.qtensor(name, &[*rows, cols])?,
            _ => match weights.stacked_rows(parts, cols)? {
                Some(tensor) => tensor,
                None => return Ok(None),
            },
        };
        Ok(Some(Self::from_qtensor(tensor)?))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Q41(m) => m.forward(x),
            Linear::Q80(m) => m.forward(x),
        }
    }
}
