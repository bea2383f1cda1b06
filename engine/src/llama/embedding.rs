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
//! A Q4_1 table on CPU is held as a [`Q41Matrix`] instead (Canopy's kernel layout, read
//! straight from the file), whose rows dequantize with candle's `to_float` arithmetic.
//!
//! Models with tied embeddings (no `output.weight`) use the same table as their output head:
//! [`QuantizedEmbedding::output_head`] wraps the shared table in a [`Linear`] without copying
//! it, so the table is in memory once.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

use super::linear::{Linear, own_kernel_enabled};
use super::q4_1::Q41Matrix;
use super::weights::WeightReader;
use candle_core::{Device, Tensor};

use super::error::{LlamaError, Result};

/// The stored table.
#[derive(Debug, Clone)]
enum Table {
    /// Any block type, gathered by candle.
    Candle(Arc<QTensor>),
    /// Q4_1 in Canopy's kernel layout (CPU).
    Q41(Arc<Q41Matrix>),
}

/// A `[vocab, n_embd]` embedding table whose rows are dequantized on demand.
#[derive(Debug, Clone)]
pub struct QuantizedEmbedding {
    table: Table,
    vocab_size: usize,
    n_embd: usize,
}

impl QuantizedEmbedding {
    /// Wraps a `[vocab, n_embd]` quantized table.
    pub fn new(table: Arc<QTensor>) -> Result<Self> {
        let (vocab_size, n_embd) = table.shape().dims2()?;
        Ok(Self {
            table: Table::Candle(table),
            vocab_size,
            n_embd,
        })
    }

    /// Wraps a `[vocab, n_embd]` Q4_1 table in Canopy's kernel layout.
    pub fn from_q4_1(table: Arc<Q41Matrix>) -> Self {
        Self {
            vocab_size: table.rows(),
            n_embd: table.cols(),
            table: Table::Q41(table),
        }
    }

    /// Loads the `[vocab, n_embd]` table `name`: a Q4_1 table on CPU straight into Canopy's
    /// kernel layout, any other as a candle tensor.
    pub fn load<R: Read + Seek>(
        weights: &mut WeightReader<'_, R>,
        name: &str,
        vocab: usize,
        n_embd: usize,
    ) -> Result<Self> {
        let dtype = weights.info(name, &[vocab, n_embd])?.ggml_dtype;
        if dtype == GgmlDType::Q4_1 && own_kernel_enabled(weights.device()) {
            let (_, bytes) = weights.raw(name, &[vocab, n_embd])?;
            if let Some(table) = Q41Matrix::from_bytes(vocab, n_embd, &bytes) {
                return Ok(Self::from_q4_1(Arc::new(table)));
            }
        }
        Self::new(Arc::new(weights.qtensor(name, &[vocab, n_embd])?))
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
        match &self.table {
            Table::Candle(t) => t.dtype(),
            Table::Q41(_) => GgmlDType::Q4_1,
        }
    }

    /// Device the table lives on.
    pub fn device(&self) -> Device {
        match &self.table {
            Table::Candle(t) => t.device(),
            Table::Q41(_) => Device::Cpu,
        }
    }

    /// The shared quantized table when candle holds it (`None` for a Q4_1 table in Canopy's
    /// kernel layout).
    pub fn candle_table(&self) -> Option<&Arc<QTensor>> {
        match &self.table {
            Table::Candle(t) => Some(t),
            Table::Q41(_) => None,
        }
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
        match &self.table {
            Table::Candle(table) => {
                let ids = Tensor::new(tokens, &table.device())?;
                Ok(table.embedding(&ids)?)
            }
            Table::Q41(table) => {
                let mut out = vec![0f32; tokens.len() * self.n_embd];
                for (&t, row) in tokens.iter().zip(out.chunks_exact_mut(self.n_embd)) {
                    table.dequantize_row(t as usize, row);
                }
                Ok(Tensor::from_vec(
                    out,
                    (tokens.len(), self.n_embd),
                    &Device::Cpu,
                )?)
            }
        }
    }

    /// The table as a tied output head: a [`Linear`] computing `x @ tableᵀ` (logits), sharing
    /// the table's memory.
    pub fn output_head(&self) -> Result<Linear> {
        Ok(match &self.table {
            // A Q4_1 table held by candle stays with candle's matmul (same bits): repacking it
            // for Canopy's kernel would be a second copy.
            Table::Candle(table) if table.dtype() == GgmlDType::Q4_1 => {
                Linear::Candle(QMatMul::from_arc(Arc::clone(table))?)
            }
            Table::Candle(table) => Linear::from_arc(Arc::clone(table))?,
            Table::Q41(table) => Linear::Q41(Arc::clone(table)),
        })
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
    fn q4_1_table_embeds_like_candle_and_shares_its_head() {
        let src = table(20, 256);
        let q = QTensor::quantize(&src, GgmlDType::Q4_1).expect("quantize");
        let ours =
            QuantizedEmbedding::from_q4_1(Arc::new(Q41Matrix::from_qtensor(&q).expect("q41")));
        let candle = QuantizedEmbedding::new(Arc::new(q)).expect("candle");
        assert_eq!(ours.dtype(), GgmlDType::Q4_1);
        assert!(ours.candle_table().is_none());
        let tokens = [19u32, 0, 7, 7];
        let a: Vec<f32> = ours
            .forward(&tokens)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("ours");
        let b: Vec<f32> = candle
            .forward(&tokens)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("candle");
        assert_eq!(a, b);
        let (Ok(Linear::Q41(head)), Table::Q41(table)) = (ours.output_head(), &ours.table) else {
            panic!("a Q4_1 table's head is the Q4_1 kernel");
        };
        assert!(Arc::ptr_eq(&head, table), "the head shares the table");
        assert!(matches!(
            ours.forward(&[20]),
            Err(LlamaError::TokenOutOfRange { .. })
        ));
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
