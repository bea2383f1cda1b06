//! [`WeightReader`]: reads a shard's tensors out of a GGUF file by name, checking each
//! tensor's shape against the model's metadata before reading its data.
//!
//! Only the tensors a shard asks for are read: the reader seeks to each one, so a shard of
//! layers `i..j` touches the bytes of its own blocks (plus the embedding or head when it owns
//! them) and nothing else. Shapes are candle's (row-major, `[out, in]` for matrices), i.e. the
//! reverse of the order GGUF lists them in.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::{GgmlDType, QTensor, ggml_file};
use candle_core::{Device, Tensor};

use super::error::{LlamaError, Result};

/// Reads named tensors of one GGUF file onto one device.
pub struct WeightReader<'a, R> {
    content: &'a Content,
    reader: &'a mut R,
    device: Device,
}

impl<'a, R: Read + Seek> WeightReader<'a, R> {
    /// A reader over `content` (the parsed header) and `reader` (the file), loading onto
    /// `device`.
    pub fn new(content: &'a Content, reader: &'a mut R, device: &Device) -> Self {
        Self {
            content,
            reader,
            device: device.clone(),
        }
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The header entry of `name`, after checking that its shape is `expected`.
    pub fn info(&self, name: &str, expected: &[usize]) -> Result<&'a TensorInfo> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| LlamaError::MissingTensor {
                    name: name.to_string(),
                })?;
        if info.shape.dims() != expected {
            return Err(LlamaError::BadTensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        Ok(info)
    }

    /// Reads tensor `name`, which must have shape `expected`, in its stored (quantized) form.
    pub fn qtensor(&mut self, name: &str, expected: &[usize]) -> Result<QTensor> {
        self.info(name, expected)?;
        self.content
            .tensor(self.reader, name, &self.device)
            .map_err(|e| read_error(name, e))
    }

    /// Reads the vector `name` (`[len]`) dequantized to f32 (norm weights, rope factors).
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let q = self.qtensor(name, &[len])?;
        q.dequantize(&self.device).map_err(|e| read_error(name, e))
    }

    /// The raw block bytes of `name` (shape `expected`) and their block type.
    pub fn raw(&mut self, name: &str, expected: &[usize]) -> Result<(GgmlDType, Vec<u8>)> {
        let info = self.info(name, expected)?;
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        if elems % dtype.block_size() != 0 {
            return Err(LlamaError::TensorRead {
                name: name.to_string(),
                reason: format!("{elems} elements do not fill whole {dtype:?} blocks"),
            });
        }
        let size = elems / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let io = |e: std::io::Error| LlamaError::TensorRead {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let file_size = self.reader.seek(SeekFrom::End(0)).map_err(io)?;
        if start.saturating_add(size as u64) > file_size {
            return Err(LlamaError::TensorRead {
                name: name.to_string(),
                reason: format!(
                    "needs {size} bytes at offset {start}, but the file ends at {file_size}"
                ),
            });
        }
        let mut bytes = vec![0u8; size];
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        self.reader.read_exact(&mut bytes).map_err(io)?;
        Ok((dtype, bytes))
    }

    /// Reads matrices `[rows_i, cols]` that share one block type and stacks their rows into one
    /// `[Σ rows_i, cols]` quantized tensor; `None` when their block types differ.
    ///
    /// Stacking is exact: a quantized matrix is stored row by row, whole blocks per row, so
    /// the stacked tensor holds each part's blocks unchanged.
    pub fn stacked_rows(
        &mut self,
        parts: &[(&str, usize)],
        cols: usize,
    ) -> Result<Option<QTensor>> {
        let mut dtype = None;
        for (name, rows) in parts {
            let info = self.info(name, &[*rows, cols])?;
            match dtype {
                None => dtype = Some(info.ggml_dtype),
                Some(d) if d != info.ggml_dtype => return Ok(None),
                Some(_) => {}
            }
        }
        let Some(dtype) = dtype else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        for (name, rows) in parts {
            let (_, part) = self.raw(name, &[*rows, cols])?;
            bytes.extend_from_slice(&part);
        }
        let rows: usize = parts.iter().map(|(_, rows)| rows).sum();
        let names = parts.iter().map(|(n, _)| *n).collect::<Vec<_>>().join("+");
        ggml_file::qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &self.device)
            .map(Some)
            .map_err(|e| read_error(&names, e))
    }
}

fn read_error(name: &str, err: candle_core::Error) -> LlamaError {
    LlamaError::TensorRead {
        name: name.to_string(),
        reason: err.to_string(),
    }
}
