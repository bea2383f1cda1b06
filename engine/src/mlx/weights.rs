//! Reading GGUF tensors into MLX arrays: [`TensorReader`] and the matrices it makes,
//! [`MlxLinear`].
//!
//! Tensors are read one at a time through the crate's validated
//! [`GgufFile`] (so a truncated or malformed file fails with the same
//! messages as for the candle engine), then converted:
//!
//! - **Q4_0, Q4_1, Q8_0** stay quantized. ggml stores blocks of 32 weights with an f16 scale
//!   `d` (and, for Q4_1, an f16 minimum `m`); MLX's affine quantization stores the same
//!   groups as packed unsigned integers plus a scale and a bias per group, `w = scale * q +
//!   bias`. The repacking is exact: Q4_0 `d * (q - 8)` is scale `d`, bias `-8 d`; Q4_1 `d * q +
//!   m` is scale `d`, bias `m`; Q8_0 `d * q` with signed `q` is `d * (q + 128) - 128 d`.
//!   Scales and biases are kept in f32, the activations' type, so no conversion runs per
//!   matmul and every value is the one ggml would compute (the cost: 8 bytes per 32 weights
//!   instead of ggml's 2 or 4).
//! - **F32, F16, BF16** are used as stored (1-D norm weights are widened to f32).
//! - Anything else (K-quants, Q5_0/Q5_1, Q8_1, …) is refused with an error that names the
//!   tensor and its type: dequantizing it would silently multiply the model's memory.
//!
//! 4-bit values are packed eight to a `u32`, element `i` of a word at bits `4 i`; 8-bit values
//! four to a `u32`, at bits `8 i` (MLX's layout). Rows are the output dimension: a matrix
//! `[out, in]` multiplies `x [.., in]` with `quantized_matmul(x, w, scales, biases,
//! transpose = true, 32, bits)`.

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::take_axis;
use mlx_rs::{Array, Dtype, ops};

use crate::EngineError;
use crate::gguf::GgufFile;
use crate::llama::LlamaError;

/// Weights per quantization group, in ggml's blocks and in MLX's groups alike.
pub const GROUP_SIZE: usize = 32;

/// A GGUF block type in the affine form MLX multiplies with: packed integers, a scale and a
/// bias per [`GROUP_SIZE`] weights.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineBlocks {
    /// Bits per weight (4 or 8).
    pub bits: u32,
    /// The weights, packed `32 / bits` to a word.
    pub packed: Vec<u32>,
    /// One scale per group.
    pub scales: Vec<f32>,
    /// One bias per group.
    pub biases: Vec<f32>,
}

/// Converts ggml blocks of type `dtype` (raw bytes, as stored in the file) to
/// [`AffineBlocks`]; `None` for a type that is not Q4_0, Q4_1 or Q8_0, or for bytes that are
/// not a whole number of blocks.
pub fn affine_from_ggml(dtype: GgmlDType, bytes: &[u8]) -> Option<AffineBlocks> {
    // (block size in bytes, bits, has a minimum)
    let (block_len, bits) = match dtype {
        GgmlDType::Q4_0 => (2 + 16, 4),
        GgmlDType::Q4_1 => (2 + 2 + 16, 4),
        GgmlDType::Q8_0 => (2 + 32, 8),
        _ => return None,
    };
    if bytes.len() % block_len != 0 {
        return None;
    }
    let n_blocks = bytes.len() / block_len;
    let mut out = AffineBlocks {
        bits,
        packed: Vec::with_capacity(n_blocks * GROUP_SIZE * bits as usize / 32),
        scales: Vec::with_capacity(n_blocks),
        biases: Vec::with_capacity(n_blocks),
    };
    let half_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    for block in bytes.chunks_exact(block_len) {
        let d = half_at(block, 0);
        match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                let (bias, qs) = if dtype == GgmlDType::Q4_0 {
                    (-8.0 * d, &block[2..])
                } else {
                    (half_at(block, 2), &block[4..])
                };
                // ggml: byte j holds weight j (low nibble) and weight j + 16 (high nibble).
                let mut q = [0u8; GROUP_SIZE];
                for (j, byte) in qs.iter().enumerate() {
                    q[j] = byte & 0x0f;
                    q[j + 16] = byte >> 4;
                }
                for word in q.chunks_exact(8) {
                    let packed = word
                        .iter()
                        .enumerate()
                        .fold(0u32, |acc, (i, &v)| acc | (u32::from(v) << (4 * i)));
                    out.packed.push(packed);
                }
                out.scales.push(d);
                out.biases.push(bias);
            }
            _ => {
                // Q8_0: signed bytes, shifted to 0..=255.
                for word in block[2..].chunks_exact(4) {
                    let packed = word.iter().enumerate().fold(0u32, |acc, (i, &v)| {
                        acc | (u32::from((v as i8 as i16 + 128) as u8) << (8 * i))
                    });
                    out.packed.push(packed);
                }
                out.scales.push(d);
                out.biases.push(-128.0 * d);
            }
        }
    }
    Some(out)
}

/// A weight matrix `[out, in]` that maps activations `[.., in]` to `[.., out]`.
#[derive(Debug, Clone)]
pub enum MlxLinear {
    /// Affine-quantized (from Q4_0, Q4_1 or Q8_0).
    Quantized {
        /// Packed weights, `[out, in * bits / 32]` u32.
        weight: Array,
        /// `[out, in / 32]` f32.
        scales: Array,
        /// `[out, in / 32]` f32.
        biases: Array,
        /// Bits per weight (4 or 8).
        bits: i32,
    },
    /// Stored densely (F32, F16 or BF16), `[out, in]`.
    Dense {
        /// The matrix.
        weight: Array,
    },
}

impl MlxLinear {
    /// `x @ W^T`.
    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        match self {
            MlxLinear::Quantized {
                weight,
                scales,
                biases,
                bits,
            } => ops::quantized_matmul(x, weight, scales, biases, true, GROUP_SIZE as i32, *bits),
            MlxLinear::Dense { weight } => ops::matmul(x, weight.t()),
        }
    }

    /// Rows `ids` of the matrix as f32 `[ids.len(), in]` (a token embedding lookup).
    pub fn rows(&self, ids: &Array) -> Result<Array, Exception> {
        match self {
            MlxLinear::Quantized {
                weight,
                scales,
                biases,
                bits,
            } => {
                let weight = take_axis(weight, ids, 0)?;
                let scales = take_axis(scales, ids, 0)?;
                let biases = take_axis(biases, ids, 0)?;
                ops::dequantize(&weight, &scales, &biases, GROUP_SIZE as i32, *bits)?
                    .as_dtype(Dtype::Float32)
            }
            MlxLinear::Dense { weight } => take_axis(weight, ids, 0)?.as_dtype(Dtype::Float32),
        }
    }

    /// Stacks matrices with the same input width and storage along the output dimension, so
    /// that one matmul computes all of them (`None` when their storage differs).
    pub fn concat(parts: &[&MlxLinear]) -> Result<Option<MlxLinear>, Exception> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        match first {
            MlxLinear::Quantized { bits, .. } => {
                let mut weights = Vec::new();
                let mut scales = Vec::new();
                let mut biases = Vec::new();
                for part in parts {
                    match part {
                        MlxLinear::Quantized {
                            weight,
                            scales: s,
                            biases: b,
                            bits: other,
                        } if other == bits => {
                            weights.push(weight);
                            scales.push(s);
                            biases.push(b);
                        }
                        _ => return Ok(None),
                    }
                }
                Ok(Some(MlxLinear::Quantized {
                    weight: ops::concatenate(&weights, 0)?,
                    scales: ops::concatenate(&scales, 0)?,
                    biases: ops::concatenate(&biases, 0)?,
                    bits: *bits,
                }))
            }
            MlxLinear::Dense { weight } => {
                let dtype = weight.dtype();
                let mut weights = Vec::new();
                for part in parts {
                    match part {
                        MlxLinear::Dense { weight } if weight.dtype() == dtype => {
                            weights.push(weight)
                        }
                        _ => return Ok(None),
                    }
                }
                Ok(Some(MlxLinear::Dense {
                    weight: ops::concatenate(&weights, 0)?,
                }))
            }
        }
    }

    /// Forces the arrays into memory (MLX is lazy; loading should not leave work for the
    /// first forward).
    pub fn eval(&self) -> Result<(), Exception> {
        match self {
            MlxLinear::Quantized {
                weight,
                scales,
                biases,
                ..
            } => mlx_rs::transforms::eval([weight, scales, biases]),
            MlxLinear::Dense { weight } => weight.eval(),
        }
    }
}

/// The GGUF name of a ggml type (`Q4_K`, not candle's `Q4K`).
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Reads named, shape-checked tensors of one open GGUF file into MLX arrays.
pub struct TensorReader<'a> {
    file: &'a GgufFile,
    model: &'a str,
}

impl<'a> TensorReader<'a> {
    /// A reader of `file`; errors name the model as `model` (the load spec's string).
    pub fn new(file: &'a GgufFile, model: &'a str) -> Self {
        Self { file, model }
    }

    /// Whether the file has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }

    /// The matrix `name`, which must be `[rows, cols]`.
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<MlxLinear, EngineError> {
        let (dtype, bytes) = self.raw(name, &[rows, cols])?;
        let shape = [rows as i32, cols as i32];
        let linear = match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 => {
                let blocks = affine_from_ggml(dtype, &bytes)
                    .filter(|b| {
                        cols % GROUP_SIZE == 0 && b.scales.len() * GROUP_SIZE == rows * cols
                    })
                    .ok_or_else(|| self.read_error(name, "its data is not whole blocks"))?;
                let groups = (cols / GROUP_SIZE) as i32;
                let words = (cols * blocks.bits as usize / 32) as i32;
                MlxLinear::Quantized {
                    weight: Array::from_slice(&blocks.packed, &[rows as i32, words]),
                    scales: Array::from_slice(&blocks.scales, &[rows as i32, groups]),
                    biases: Array::from_slice(&blocks.biases, &[rows as i32, groups]),
                    bits: blocks.bits as i32,
                }
            }
            GgmlDType::F32 => MlxLinear::Dense {
                weight: Array::from_slice(&le_values(&bytes, f32::from_le_bytes), &shape),
            },
            GgmlDType::F16 => MlxLinear::Dense {
                weight: Array::from_slice(&le_values(&bytes, f16::from_le_bytes), &shape),
            },
            GgmlDType::BF16 => MlxLinear::Dense {
                weight: Array::from_slice(&le_values(&bytes, bf16::from_le_bytes), &shape),
            },
            other => return Err(self.unsupported(name, other)),
        };
        linear
            .eval()
            .map_err(|e| self.read_error(name, &super::mlx_error("building the array", e)))?;
        Ok(linear)
    }

    /// The vector `name` (a norm's weights), which must have `len` elements, as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Array, EngineError> {
        Ok(Array::from_slice(
            &self.vector_values(name, len)?,
            &[len as i32],
        ))
    }

    /// The values of the vector `name`, which must have `len` elements, as f32.
    pub fn vector_values(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let (dtype, bytes) = self.raw(name, &[len])?;
        match dtype {
            GgmlDType::F32 => Ok(le_values(&bytes, f32::from_le_bytes)),
            GgmlDType::F16 => Ok(le_values(&bytes, f16::from_le_bytes)
                .into_iter()
                .map(f32::from)
                .collect()),
            GgmlDType::BF16 => Ok(le_values(&bytes, bf16::from_le_bytes)
                .into_iter()
                .map(f32::from)
                .collect()),
            other => Err(self.unsupported(name, other)),
        }
    }

    /// The stored type and raw bytes of `name`, after checking its shape.
    fn raw(&self, name: &str, shape: &[usize]) -> Result<(GgmlDType, Vec<u8>), EngineError> {
        let info = self.file.tensor_info(name).ok_or_else(|| {
            LlamaError::MissingTensor {
                name: name.to_string(),
            }
            .into_load_error(self.model)
        })?;
        if info.shape.dims() != shape {
            return Err(LlamaError::BadTensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            }
            .into_load_error(self.model));
        }
        let dtype = info.ggml_dtype;
        let supported = matches!(
            dtype,
            GgmlDType::F32
                | GgmlDType::F16
                | GgmlDType::BF16
                | GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q8_0
        );
        if !supported {
            return Err(self.unsupported(name, dtype));
        }
        let tensor = self.file.tensor(name, &candle_core::Device::Cpu)?;
        let bytes = tensor
            .data()
            .map_err(|e| self.read_error(name, &e.to_string()))?;
        Ok((dtype, bytes.into_owned()))
    }

    fn unsupported(&self, name: &str, dtype: GgmlDType) -> EngineError {
        EngineError::InvalidModel {
            model: self.model.to_string(),
            reason: format!(
                "tensor `{name}` is stored as {}, which the mlx engine does not read; it reads \
                 F32, F16, BF16, Q4_0, Q4_1 and Q8_0 tensors (use a file quantized to Q4_0, \
                 Q4_1 or Q8_0, or `--engine candle`, which reads K-quants too)",
                ggml_type_name(dtype)
            ),
        }
    }

    fn read_error(&self, name: &str, reason: &str) -> EngineError {
        LlamaError::TensorRead {
            name: name.to_string(),
            reason: reason.to_string(),
        }
        .into_load_error(self.model)
    }
}

/// Little-endian values of a fixed width from raw bytes.
fn le_values<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            from(b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_0_block(d: f32, q: [u8; 32]) -> Vec<u8> {
        let mut b = f16::from_f32(d).to_le_bytes().to_vec();
        b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
        b
    }

    /// Dequantizes affine blocks the way MLX defines them.
    fn dequant(a: &AffineBlocks) -> Vec<f32> {
        let per_word = 32 / a.bits as usize;
        let mask = (1u32 << a.bits) - 1;
        let mut out = Vec::new();
        for (g, words) in a.packed.chunks_exact(GROUP_SIZE / per_word).enumerate() {
            for w in words {
                for i in 0..per_word {
                    let q = (w >> (a.bits as usize * i)) & mask;
                    out.push(a.scales[g] * q as f32 + a.biases[g]);
                }
            }
        }
        out
    }

    #[test]
    fn q4_0_repacks_exactly() {
        let q: [u8; 32] = std::array::from_fn(|i| (i * 7 % 16) as u8);
        let a = affine_from_ggml(GgmlDType::Q4_0, &q4_0_block(0.5, q)).expect("converts");
        assert_eq!(a.bits, 4);
        assert_eq!(a.packed.len(), 4);
        let want: Vec<f32> = q.iter().map(|&v| 0.5 * (f32::from(v) - 8.0)).collect();
        assert_eq!(dequant(&a), want);
    }

    #[test]
    fn q4_1_and_q8_0_repack_exactly() {
        let q: [u8; 32] = std::array::from_fn(|i| (15 - i % 16) as u8);
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.5).to_le_bytes());
        b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
        let a = affine_from_ggml(GgmlDType::Q4_1, &b).expect("converts");
        let want: Vec<f32> = q.iter().map(|&v| 0.25 * f32::from(v) - 1.5).collect();
        assert_eq!(dequant(&a), want);

        let q8: [i8; 32] = std::array::from_fn(|i| (i as i8 - 16) * 8);
        let mut b = f16::from_f32(0.125).to_le_bytes().to_vec();
        b.extend(q8.iter().map(|&v| v as u8));
        let a = affine_from_ggml(GgmlDType::Q8_0, &b).expect("converts");
        assert_eq!(a.bits, 8);
        assert_eq!(a.packed.len(), 8);
        let want: Vec<f32> = q8.iter().map(|&v| 0.125 * f32::from(v)).collect();
        assert_eq!(dequant(&a), want);
    }

    #[test]
    fn refuses_other_types_and_partial_blocks() {
        assert!(affine_from_ggml(GgmlDType::Q4K, &[0; 144]).is_none());
        assert!(affine_from_ggml(GgmlDType::Q4_0, &[0; 17]).is_none());
    }
}
