//! [`WeightReader`]: reads a shard's tensors out of a GGUF file by name, checking each
//! tensor's shape against the model's metadata before reading its data.
//!
//! Only the tensors a shard asks for are read: the reader seeks to each one, so a shard of
//! layers `i..j` touches the bytes of its own blocks (plus the embedding or head when it owns
//! them) and nothing else. Shapes are candle's (row-major, `[out, in]` for matrices), i.e. the
//! reverse of the order GGUF lists them in.
//!
//! On CPU a tensor's bytes are read straight into its final block vector (candle's own path
//! reads them into a byte buffer and then copies that into the blocks, two copies of the
//! tensor at once: 60 MB for the embedding table of SmolLM2-135M).

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
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

    /// The header entry of `name`.
    fn lookup(&self, name: &str) -> Result<&'a TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LlamaError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// The header entry of `name`, after checking that its shape is `expected`.
    pub fn info(&self, name: &str, expected: &[usize]) -> Result<&'a TensorInfo> {
        let info = self.lookup(name)?;
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
        let info = self.info(name, expected)?;
        if self.device.is_cpu() {
            let n = info.shape.elem_count();
            let direct = match info.ggml_dtype {
                GgmlDType::F32 => self.read_blocks::<f32>(name, n)?,
                GgmlDType::F16 => self.read_blocks::<half::f16>(name, n)?,
                GgmlDType::BF16 => self.read_blocks::<half::bf16>(name, n)?,
                GgmlDType::Q4_0 => self.read_blocks::<k_quants::BlockQ4_0>(name, n)?,
                GgmlDType::Q4_1 => self.read_blocks::<k_quants::BlockQ4_1>(name, n)?,
                GgmlDType::Q5_0 => self.read_blocks::<k_quants::BlockQ5_0>(name, n)?,
                GgmlDType::Q5_1 => self.read_blocks::<k_quants::BlockQ5_1>(name, n)?,
                GgmlDType::Q8_0 => self.read_blocks::<k_quants::BlockQ8_0>(name, n)?,
                GgmlDType::Q2K => self.read_blocks::<k_quants::BlockQ2K>(name, n)?,
                GgmlDType::Q3K => self.read_blocks::<k_quants::BlockQ3K>(name, n)?,
                GgmlDType::Q4K => self.read_blocks::<k_quants::BlockQ4K>(name, n)?,
                GgmlDType::Q5K => self.read_blocks::<k_quants::BlockQ5K>(name, n)?,
                GgmlDType::Q6K => self.read_blocks::<k_quants::BlockQ6K>(name, n)?,
                _ => None,
            };
            if let Some(storage) = direct {
                return QTensor::new(storage, info.shape.clone()).map_err(|e| read_error(name, e));
            }
        }
        self.content
            .tensor(self.reader, name, &self.device)
            .map_err(|e| read_error(name, e))
    }

    /// The `elems` values of `name` read straight into a vector of `T` blocks (CPU storage);
    /// `None` when `T`'s size is not the file's block size (then candle's path reads it).
    fn read_blocks<T: GgmlType + 'static>(
        &mut self,
        name: &str,
        elems: usize,
    ) -> Result<Option<QStorage>> {
        let dtype = T::DTYPE;
        if std::mem::size_of::<T>() != dtype.type_size()
            || !elems.is_multiple_of(dtype.block_size())
        {
            return Ok(None);
        }
        let mut blocks = vec![T::zeros(); elems / dtype.block_size()];
        // SAFETY: GGML block types are `repr(C)` structs of f16/bf16/f32 scalars and byte
        // arrays with no padding (their size equals the file's block size, checked above), so
        // every byte pattern is a valid value; the slice covers exactly the vector's elements.
        // candle's own loader reinterprets file bytes as these types the same way.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                blocks.as_mut_ptr() as *mut u8,
                blocks.len() * std::mem::size_of::<T>(),
            )
        };
        self.read_into(name, bytes)?;
        Ok(Some(QStorage::Cpu(Box::new(blocks))))
    }

    /// Reads the data of `name` (exactly `buf.len()` bytes) into `buf`, checking that it lies
    /// inside the file.
    fn read_into(&mut self, name: &str, buf: &mut [u8]) -> Result<()> {
        let info = self.lookup(name)?;
        let size = buf.len();
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
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        self.reader.read_exact(buf).map_err(io)
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
        let mut bytes = vec![0u8; size];
        self.read_into(name, &mut bytes)?;
        Ok((dtype, bytes))
    }

    /// The block type shared by matrices `parts` (`(name, rows_i)`, each `[rows_i, cols]`), or
    /// `None` when their types differ (or there are none).
    pub fn common_dtype(&self, parts: &[(&str, usize)], cols: usize) -> Result<Option<GgmlDType>> {
        let mut dtype = None;
        for (name, rows) in parts {
            let info = self.info(name, &[*rows, cols])?;
            match dtype {
                None => dtype = Some(info.ggml_dtype),
                Some(d) if d != info.ggml_dtype => return Ok(None),
                Some(_) => {}
            }
        }
        Ok(dtype)
    }

    /// Reads matrices `[rows_i, cols]` that share one block type and stacks their bytes into
    /// those of one `[Σ rows_i, cols]` matrix; `None` when their block types differ.
    ///
    /// Stacking is exact: a quantized matrix is stored row by row, whole blocks per row, so
    /// the stacked bytes hold each part's blocks unchanged.
    pub fn stacked_raw(
        &mut self,
        parts: &[(&str, usize)],
        cols: usize,
    ) -> Result<Option<(GgmlDType, Vec<u8>)>> {
        let Some(dtype) = self.common_dtype(parts, cols)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        for (name, rows) in parts {
            let (_, part) = self.raw(name, &[*rows, cols])?;
            if bytes.is_empty() {
                bytes = part;
            } else {
                bytes.extend_from_slice(&part);
            }
        }
        Ok(Some((dtype, bytes)))
    }

    /// Reads matrices `[rows_i, cols]` that share one block type and stacks their rows into one
    /// `[Σ rows_i, cols]` quantized tensor; `None` when their block types differ.
    pub fn stacked_rows(
        &mut self,
        parts: &[(&str, usize)],
        cols: usize,
    ) -> Result<Option<QTensor>> {
        let Some((dtype, bytes)) = self.stacked_raw(parts, cols)? else {
            return Ok(None);
        };
        let rows: usize = parts.iter().map(|(_, rows)| rows).sum();
        let names = parts.iter().map(|(n, _)| *n).collect::<Vec<_>>().join("+");
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![rows, cols],
            &self.device,
        )
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
