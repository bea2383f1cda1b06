//! [`QuantizedEmbedding`]: the token embedding table kept in its quantized form.
//!
//! The table (`token_embd.weight`, `[vocab, n_embd]`) is the largest single tensor of a small
//! model; expanding it to f32 would cost `vocab * n_embd * 4` bytes (113 MiB for SmolLM2-135M,
//! more than the whole quantized file). Instead the [`QTensor`] is kept as loaded and only the
//! rows of the tokens being embedded are dequantized, block by block, on each call.
//!
//! Row gathering is candle's [`QTensor::embedding`], which dequantizes exactly the blocks of
//! the requested rows for every GGML block type (Q4_0/Q4_1/Q5_x/Q8_x, all K-quants, F16, BF16,
//! F32) on CPU, CUDA and Metal, with the same per-block arithmetic as a full dequantization, so
//! the rows are bit-identical to the rows of [`QTensor::dequantize`]. No type needs a
//! full-dequantization fallback.
//!
//! Models with tied embeddings (no `output.weight`) use the same table as their output head:
//! [`QuantizedEmbedding::output_head`] wraps the shared tensor in a [`QMatMul`] without copying
//! it.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};

use super::linear::Linear;
use candle_core::{Device, Tensor};

use super::error::{LlamaError, Result};

/// A `[vocab, n_embd]` embedding table whose rows are dequantized on demand.
#[derive(Debug, Clone)]
pub struct QuantizedEmbedding {
    table: Arc<QTensor>,
    vocab_size: usize,
    n_embd: usize,
}

impl QuantizedEmbedding {
    /// Wraps a `[vocab, n_embd]` quantized table.
    pub fn new(table: Arc<QTensor>) -> Result<Self> {
        let (vocab_size, n_embd) = table.shape().dims2()?;
        Ok(Self {
            table,
            vocab_size,
            n_embd,
        })
    }

    /// Number of rows (tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Width of a row.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Block type of the stored table.
    pub fn dtype(&self) -> GgmlDType {
        self.table.dtype()
    }

    /// Device the table lives on.
    pub fn device(&self) -> Device {
        self.table.device()
    }

    /// The shared quantized table.
    pub fn table(&self) -> &Arc<QTensor> {
        &self.table
    }

    /// Embeds `tokens` into a `[tokens.len(), n_embd]` f32 tensor, dequantizing only their rows.
    ///
    /// Fails with [`LlamaError::TokenOutOfRange`] for ids outside the vocabulary and with
    /// [`LlamaError::EmptyInput`] for no tokens at all.
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(LlamaError::EmptyInput);
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(LlamaError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        let ids = Tensor::new(tokens, &self.table.device())?;
        Ok(self.table.embedding(&ids)?)
    }

    /// The table as a tied output head: a [`QMatMul`] computing `x @ tableᵀ` (logits), sharing
    /// the table's memory.
    pub fn output_head(&self) -> Result<Linear> {
        Ok(Linear::from_arc(Arc::clone(&self.table))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random `[rows, cols]` tensor.
    fn table(rows: usize, cols: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let x = (i as u64)
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn gathered_rows_equal_full_dequantization_for_every_common_type() {
        let dtypes = [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        let src = table(12, 512);
        for dtype in dtypes {
            let q = QTensor::quantize(&src, dtype).expect("quantize");
            let full = q.dequantize(&Device::Cpu).expect("dequantize");
            let emb = QuantizedEmbedding::new(Arc::new(q)).expect("embedding");
            let tokens = [3u32, 0, 11, 3];
            let rows = emb.forward(&tokens).expect("forward");
            assert_eq!(rows.dims(), &[4, 512]);
            for (i, &t) in tokens.iter().enumerate() {
                let got: Vec<f32> = rows.get(i).and_then(|r| r.to_vec1()).expect("row");
                let want: Vec<f32> = full.get(t as usize).and_then(|r| r.to_vec1()).expect("row");
                assert_eq!(got, want, "{dtype:?} row {t}");
            }
        }
    }

    #[test]
    fn rejects_out_of_range_and_empty_input() {
        let q = QTensor::quantize(&table(4, 64), GgmlDType::Q8_0).expect("quantize");
        let emb = QuantizedEmbedding::new(Arc::new(q)).expect("embedding");
        assert!(matches!(
            emb.forward(&[1, 4]),
            Err(LlamaError::TokenOutOfRange {
                token: 4,
                vocab_size: 4
            })
        ));
        assert!(matches!(emb.forward(&[]), Err(LlamaError::EmptyInput)));
    }

    #[test]
    fn tied_head_multiplies_by_the_transposed_table() {
        let src = table(8, 64);
        let q = QTensor::quantize(&src, GgmlDType::F32).expect("quantize");
        let emb = QuantizedEmbedding::new(Arc::new(q)).expect("embedding");
        let head = emb.output_head().expect("head");
        let x = table(1, 64);
        let logits = candle_core::Module::forward(&head, &x).expect("logits");
        let want = x.matmul(&src.t().expect("t")).expect("matmul");
        let diff = (logits - want)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-5, "{diff}");
    }
}
