//! [`GgufFile`]: one GGUF model file, opened, checked and ready to be read.
//!
//! Opening a file checks, in this order and before anything is trusted: that the path exists
//! and is a regular file, that it is not empty, that it starts with the magic bytes `GGUF`,
//! that its version is one this crate reads (1, 2 or 3, little-endian), that the header and
//! metadata parse (with candle's [`gguf_file::Content::read`]), that every tensor's data lies
//! inside the file (a download cut short is reported as *truncated*, not as a parse error
//! deep in a tensor read), and that `general.architecture` is one of
//! [`SUPPORTED_ARCHITECTURES`]. Every failure is a [`GgufError`] whose message names the file
//! and says what is wrong with it.
//!
//! Decisions:
//!
//! - Only the `llama` architecture is accepted by [`GgufFile::open`]. That is the family the
//!   candle engine runs (Llama 1/2/3, SmolLM, TinyLlama, Mistral files converted as `llama`).
//!   Qwen2/Qwen3 and others have different tensors (biases, norms) and would load and then
//!   produce garbage, so they are refused up front. [`GgufFile::open_any_architecture`] skips
//!   that one check, for tools that only need the metadata (a tokenizer, a chat template).
//! - Metadata accessors are lenient about integer widths (GGUF writers disagree on whether a
//!   token id is `u32` or `i32`) and strict about everything else; a missing or mistyped key
//!   is an error naming the key and the file.
//! - The open `std::fs::File` stays inside; [`GgufFile::tensor`] reads one tensor at a time
//!   through it, and [`GgufFile::into_parts`] hands content and reader to code that wants to
//!   drive candle's loaders directly.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Content, TensorInfo, Value, VersionedMagic};

use crate::error::EngineError;

/// The `general.architecture` values [`GgufFile::open`] accepts.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The four magic bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";

/// The smallest possible GGUF header: magic, version, tensor count and metadata count
/// (the counts are 8 bytes each from version 2 on).
const MIN_HEADER_LEN: u64 = 24;

/// A GGUF file could not be opened or read; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("model file {}: {problem}", path.display())]
pub struct GgufError {
    /// The file the problem is about.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: GgufProblem,
}

impl GgufError {
    fn new(path: &Path, problem: GgufProblem) -> Self {
        Self {
            path: path.to_path_buf(),
            problem,
        }
    }

    /// Whether the file itself is unusable (as opposed to an I/O failure reading it).
    fn is_invalid_model(&self) -> bool {
        !matches!(self.problem, GgufProblem::Io(_))
    }
}

impl From<GgufError> for EngineError {
    fn from(err: GgufError) -> Self {
        let model = err.path.display().to_string();
        let reason = err.problem.to_string();
        if err.is_invalid_model() {
            EngineError::InvalidModel { model, reason }
        } else {
            EngineError::LoadFailed { model, reason }
        }
    }
}

/// What is wrong with a GGUF file (the part of a [`GgufError`] without the path).
#[derive(Debug, thiserror::Error)]
pub enum GgufProblem {
    /// Nothing exists at the path.
    #[error("no such file; check the path, or download the model first")]
    NotFound,
    /// The path is a directory or something else that is not a regular file.
    #[error("not a regular file (a directory?); give the path of the .gguf file itself")]
    NotAFile,
    /// The file has zero bytes.
    #[error("the file is empty (0 bytes); it is not a GGUF model (an interrupted download?)")]
    Empty,
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: it starts with {found} instead of the magic bytes \"GGUF\"{hint}")]
    BadMagic {
        /// The first bytes, escaped for printing.
        found: String,
        /// A hint about what the file might be instead, or empty.
        hint: String,
    },
    /// The GGUF version is not 1, 2 or 3.
    #[error("unsupported GGUF version {version}; this build reads versions 1, 2 and 3{hint}")]
    UnsupportedVersion {
        /// The version number in the header.
        version: u32,
        /// A hint (big-endian files), or empty.
        hint: String,
    },
    /// The file ends before the data it declares.
    #[error("the file is truncated: {detail} (an interrupted download? fetch the file again)")]
    Truncated {
        /// Where it ends and what was expected.
        detail: String,
    },
    /// The header or metadata could not be parsed.
    #[error("malformed GGUF header or metadata: {detail}")]
    Malformed {
        /// The parser's message.
        detail: String,
    },
    /// `general.architecture` is missing.
    #[error("no general.architecture in the metadata; supported architectures: {supported}")]
    NoArchitecture {
        /// The accepted architectures, comma-separated.
        supported: String,
    },
    /// `general.architecture` is not one this crate runs.
    #[error("unsupported architecture {found:?}; supported architectures: {supported}")]
    UnsupportedArchitecture {
        /// The architecture the file declares.
        found: String,
        /// The accepted architectures, comma-separated.
        supported: String,
    },
    /// A metadata key that is needed is not there.
    #[error("missing metadata key {key:?}")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key has a type other than the one needed.
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What it holds, e.g. `a string`.
        found: String,
        /// What was needed, e.g. `an unsigned integer`.
        expected: &'static str,
    },
    /// No tensor of that name is in the file.
    #[error("no tensor named {name:?}")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor's data could not be read or converted.
    #[error("cannot read tensor {name:?}: {detail}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What went wrong.
        detail: String,
    },
    /// An I/O error while reading the file.
    #[error("read error: {0}")]
    Io(#[source] std::io::Error),
}

/// An open, validated GGUF file: its parsed header and metadata, and a reader for tensors.
pub struct GgufFile {
    path: PathBuf,
    file_len: u64,
    content: Content,
    reader: Mutex<BufReader<File>>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("architecture", &self.architecture())
            .field("metadata_keys", &self.content.metadata.len())
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file whose architecture is one of [`SUPPORTED_ARCHITECTURES`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let file = Self::open_any_architecture(path)?;
        let supported = SUPPORTED_ARCHITECTURES.join(", ");
        match file.architecture() {
            None => Err(file.error(GgufProblem::NoArchitecture { supported })),
            Some(arch) if SUPPORTED_ARCHITECTURES.contains(&arch) => Ok(file),
            Some(arch) => {
                let found = arch.to_string();
                Err(file.error(GgufProblem::UnsupportedArchitecture { found, supported }))
            }
        }
    }

    /// Opens and validates a GGUF file like [`open`](Self::open), but accepts any
    /// architecture (for reading a tokenizer or chat template only).
    pub fn open_any_architecture(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let err = |problem| GgufError::new(path, problem);
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err(GgufProblem::NotFound),
            _ => err(GgufProblem::Io(e)),
        })?;
        if !meta.is_file() {
            return Err(err(GgufProblem::NotAFile));
        }
        let file_len = meta.len();
        if file_len == 0 {
            return Err(err(GgufProblem::Empty));
        }
        let mut file = File::open(path).map_err(|e| err(GgufProblem::Io(e)))?;
        check_header(&mut file, file_len).map_err(err)?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| err(GgufProblem::Io(e)))?;
        let mut reader = BufReader::new(file);
        // candle's parser panics on some corrupt headers (`general.alignment = 0` divides by
        // zero); a bad file must be an error, not a crash of the runner.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => return Err(err(classify_parse_error(&e))),
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the parser panicked".to_string());
                return Err(err(GgufProblem::Malformed { detail }));
            }
        };
        check_tensor_extents(&content, file_len).map_err(err)?;
        tracing::debug!(
            path = %path.display(),
            architecture = ?content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()),
            tensors = content.tensor_infos.len(),
            metadata = content.metadata.len(),
            "opened GGUF file"
        );
        Ok(Self {
            path: path.to_path_buf(),
            file_len,
            content,
            reader: Mutex::new(reader),
        })
    }

    fn error(&self, problem: GgufProblem) -> GgufError {
        GgufError::new(&self.path, problem)
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The GGUF format version (1, 2 or 3).
    pub fn version(&self) -> u32 {
        match self.content.magic {
            VersionedMagic::GgufV1 => 1,
            VersionedMagic::GgufV2 => 2,
            VersionedMagic::GgufV3 => 3,
        }
    }

    /// The parsed header: metadata, tensor infos and where tensor data starts.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The metadata value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// `general.architecture`, if the file has one that is a string.
    pub fn architecture(&self) -> Option<&str> {
        match self.get("general.architecture") {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The key `<architecture>.<suffix>`, e.g. `llama.block_count` for `block_count`.
    pub fn arch_key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.architecture().unwrap_or("general"))
    }

    fn required<'a>(&'a self, key: &str) -> Result<&'a Value, GgufError> {
        self.get(key).ok_or_else(|| {
            self.error(GgufProblem::MissingKey {
                key: key.to_string(),
            })
        })
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &'static str) -> GgufError {
        self.error(GgufProblem::WrongType {
            key: key.to_string(),
            found: describe_value(value),
            expected,
        })
    }

    /// A non-negative integer that fits `u32` (any integer width is accepted).
    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        let value = self.required(key)?;
        value_to_u32(value).ok_or_else(|| self.wrong_type(key, value, "an integer in 0..2^32"))
    }

    /// Like [`u32`](Self::u32), but `None` when the key is absent.
    pub fn u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.u32(key).map(Some),
        }
    }

    /// A floating-point number (`f32`, `f64` or an integer).
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.required(key)?;
        value_to_f32(value).ok_or_else(|| self.wrong_type(key, value, "a number"))
    }

    /// Like [`f32`](Self::f32), but `None` when the key is absent.
    pub fn f32_opt(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.f32(key).map(Some),
        }
    }

    /// A boolean (an integer 0/1 is accepted too).
    pub fn bool(&self, key: &str) -> Result<bool, GgufError> {
        let value = self.required(key)?;
        match value {
            Value::Bool(b) => Ok(*b),
            other => match value_to_u32(other) {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                _ => Err(self.wrong_type(key, value, "a boolean")),
            },
        }
    }

    /// Like [`bool`](Self::bool), but `None` when the key is absent.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.bool(key).map(Some),
        }
    }

    /// A string.
    pub fn string(&self, key: &str) -> Result<&str, GgufError> {
        match self.required(key)? {
            Value::String(s) => Ok(s.as_str()),
            other => Err(self.wrong_type(key, other, "a string")),
        }
    }

    /// Like [`string`](Self::string), but `None` when the key is absent.
    pub fn string_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    fn array<'a>(&'a self, key: &str, expected: &'static str) -> Result<&'a [Value], GgufError> {
        match self.required(key)? {
            Value::Array(items) => Ok(items.as_slice()),
            other => Err(self.wrong_type(key, other, expected)),
        }
    }

    /// An array of strings.
    pub fn string_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        const EXPECTED: &str = "an array of strings";
        let items = self.array(key, EXPECTED)?;
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.wrong_type(key, v, EXPECTED)),
            })
            .collect()
    }

    /// An array of integers, each fitting `i32` (token types, for instance).
    pub fn i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        const EXPECTED: &str = "an array of 32-bit integers";
        let items = self.array(key, EXPECTED)?;
        items
            .iter()
            .map(|v| value_to_i32(v).ok_or_else(|| self.wrong_type(key, v, EXPECTED)))
            .collect()
    }

    /// An array of numbers, as `f32` (token scores, for instance).
    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        const EXPECTED: &str = "an array of numbers";
        let items = self.array(key, EXPECTED)?;
        items
            .iter()
            .map(|v| value_to_f32(v).ok_or_else(|| self.wrong_type(key, v, EXPECTED)))
            .collect()
    }

    /// The names of all tensors in the file (in no particular order).
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// The shape, type and offset of the tensor `name`, if the file has it.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.content.tensor_infos.get(name)
    }

    /// Whether the file has a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The number of weights in the file: every tensor's element count, added up.
    pub fn parameter_count(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|info| info.shape.elem_count() as u64)
            .sum()
    }

    /// The scalar metadata (numbers, booleans, strings) as JSON values, by key; arrays (the
    /// tokenizer's vocabulary, for instance) are left out.
    pub fn scalar_metadata(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.content
            .metadata
            .iter()
            .filter_map(|(key, value)| Some((key.clone(), scalar_json(value)?)))
            .collect()
    }

    /// Reads the tensor `name` onto `device`, in its stored (quantized) type.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor, GgufError> {
        let info = self.tensor_info(name).ok_or_else(|| {
            self.error(GgufProblem::MissingTensor {
                name: name.to_string(),
            })
        })?;
        // A poisoned lock only means another reader panicked mid-read; every read seeks to
        // an absolute offset first, so the reader is still usable.
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        info.read(&mut *reader, self.content.tensor_data_offset, device)
            .map_err(|e| {
                self.error(GgufProblem::Tensor {
                    name: name.to_string(),
                    detail: e.to_string(),
                })
            })
    }

    /// Gives up the wrapper: the parsed content and a reader positioned anywhere, for
    /// candle's own loaders (`ModelWeights::from_gguf(content, &mut reader, device)`).
    pub fn into_parts(self) -> (Content, BufReader<File>) {
        let reader = self
            .reader
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (self.content, reader)
    }
}

/// Checks the magic, the version and that the fixed-size header is all there.
fn check_header(file: &mut File, file_len: u64) -> Result<(), GgufProblem> {
    let mut head = [0u8; 8];
    let have = read_up_to(file, &mut head).map_err(GgufProblem::Io)?;
    let head = &head[..have];
    if head.len() < 4 || &head[..4] != MAGIC {
        if head.len() < 4 && MAGIC.starts_with(head) {
            return Err(GgufProblem::Truncated {
                detail: format!(
                    "only {file_len} bytes, a GGUF header needs at least {MIN_HEADER_LEN}"
                ),
            });
        }
        return Err(GgufProblem::BadMagic {
            found: escape_bytes(&head[..head.len().min(4)]),
            hint: magic_hint(head),
        });
    }
    if head.len() < 8 {
        return Err(GgufProblem::Truncated {
            detail: format!("only {file_len} bytes, a GGUF header needs at least {MIN_HEADER_LEN}"),
        });
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(1..=3).contains(&version) {
        let swapped = version.swap_bytes();
        let hint = if (1..=3).contains(&swapped) {
            " (this looks like a big-endian GGUF file, which is not supported)".to_string()
        } else {
            String::new()
        };
        return Err(GgufProblem::UnsupportedVersion { version, hint });
    }
    let min_len = if version == 1 { 16 } else { MIN_HEADER_LEN };
    if file_len < min_len {
        return Err(GgufProblem::Truncated {
            detail: format!("only {file_len} bytes, a GGUF header needs at least {min_len}"),
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Turns candle's parse error into a problem: running out of bytes is truncation.
fn classify_parse_error(err: &candle_core::Error) -> GgufProblem {
    let detail = err.to_string();
    let out_of_bytes = detail.contains("failed to fill whole buffer")
        || detail.contains("remaining")
        || detail.contains("unexpected end of file");
    if out_of_bytes {
        GgufProblem::Truncated {
            detail: format!("the header or metadata runs past the end of the file ({detail})"),
        }
    } else {
        GgufProblem::Malformed { detail }
    }
}

/// Checks that every tensor's bytes lie inside the file.
fn check_tensor_extents(content: &Content, file_len: u64) -> Result<(), GgufProblem> {
    if content.tensor_infos.is_empty() {
        return Ok(());
    }
    let mut furthest: Option<(u64, &str)> = None;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count() as u64;
        let block = info.ggml_dtype.block_size() as u64;
        if block == 0 || !elems.is_multiple_of(block) {
            return Err(GgufProblem::Malformed {
                detail: format!(
                    "tensor {name:?} has {elems} elements, not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                ),
            });
        }
        let size = (elems / block).saturating_mul(info.ggml_dtype.type_size() as u64);
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(size);
        if furthest.is_none_or(|(e, _)| end > e) {
            furthest = Some((end, name.as_str()));
        }
    }
    match furthest {
        Some((end, name)) if end > file_len => Err(GgufProblem::Truncated {
            detail: format!(
                "the file has {file_len} bytes but its tensor data runs to byte {end} \
                 (tensor {name:?}), {} bytes missing",
                end - file_len
            ),
        }),
        _ => Ok(()),
    }
}

fn escape_bytes(bytes: &[u8]) -> String {
    let escaped: String = bytes
        .iter()
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    format!("\"{escaped}\"")
}

/// Recognises a few things that are often mistaken for a GGUF model.
fn magic_hint(head: &[u8]) -> String {
    let lower: Vec<u8> = head.iter().map(u8::to_ascii_lowercase).collect();
    let hint = if lower.starts_with(b"<!do")
        || lower.starts_with(b"<htm")
        || lower.starts_with(b"<?xm")
    {
        "; it looks like an HTML/XML page (a failed download?)"
    } else if head.starts_with(b"PK\x03\x04") {
        "; it looks like a zip archive (a wheel?); extract the .gguf file from it"
    } else if head.starts_with(b"\x1f\x8b") {
        "; it looks like a gzip archive; extract the .gguf file from it"
    } else if head.starts_with(b"lmgg") || head.starts_with(b"fmgg") || head.starts_with(b"tjgg") {
        "; it looks like an old GGML/GGJT model; convert it to GGUF with llama.cpp"
    } else if head.starts_with(b"{") {
        "; it looks like JSON (a config or tokenizer file?)"
    } else {
        ""
    };
    hint.to_string()
}

fn value_to_u32(value: &Value) -> Option<u32> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::U32(v) => Some(v),
        Value::U64(v) => u32::try_from(v).ok(),
        Value::I8(v) => u32::try_from(v).ok(),
        Value::I16(v) => u32::try_from(v).ok(),
        Value::I32(v) => u32::try_from(v).ok(),
        Value::I64(v) => u32::try_from(v).ok(),
        _ => None,
    }
}

fn value_to_i32(value: &Value) -> Option<i32> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::U32(v) => i32::try_from(v).ok(),
        Value::U64(v) => i32::try_from(v).ok(),
        Value::I8(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::I32(v) => Some(v),
        Value::I64(v) => i32::try_from(v).ok(),
        _ => None,
    }
}

fn value_to_f32(value: &Value) -> Option<f32> {
    match *value {
        Value::F32(v) => Some(v),
        Value::F64(v) => Some(v as f32),
        _ => value_to_i32(value).map(|v| v as f32),
    }
}

/// `a string`, `an array of 3 strings`, ... for error messages.
/// A scalar metadata value as JSON (`None` for arrays and non-finite floats).
fn scalar_json(value: &Value) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match value {
        Value::U8(v) => J::from(*v),
        Value::I8(v) => J::from(*v),
        Value::U16(v) => J::from(*v),
        Value::I16(v) => J::from(*v),
        Value::U32(v) => J::from(*v),
        Value::I32(v) => J::from(*v),
        Value::U64(v) => J::from(*v),
        Value::I64(v) => J::from(*v),
        Value::F32(v) => serde_json::Number::from_f64(f64::from(*v)).map(J::Number)?,
        Value::F64(v) => serde_json::Number::from_f64(*v).map(J::Number)?,
        Value::Bool(v) => J::Bool(*v),
        Value::String(v) => J::String(v.clone()),
        Value::Array(_) => return None,
    })
}

fn describe_value(value: &Value) -> String {
    fn name(value: &Value) -> &'static str {
        match value {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
    match value {
        Value::Array(items) => match items.first() {
            Some(first) => format!("an array of {} {} values", items.len(), name(first)),
            None => "an empty array".to_string(),
        },
        Value::String(_) => "a string".to_string(),
        Value::Bool(b) => format!("a bool ({b})"),
        other => format!("a {} ({})", name(other), scalar_text(other)),
    }
}

fn scalar_text(value: &Value) -> String {
    match *value {
        Value::U8(v) => v.to_string(),
        Value::I8(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
        Value::F32(v) => v.to_string(),
        Value::F64(v) => v.to_string(),
        _ => String::new(),
    }
}

/// Writes a GGUF file from metadata and tensors with candle's writer (version 2).
///
/// A small convenience for tests and tools that need a synthetic file.
pub fn write_file(
    path: impl AsRef<Path>,
    metadata: &[(&str, &Value)],
    tensors: &[(&str, &QTensor)],
) -> Result<(), GgufError> {
    let path = path.as_ref();
    let err = |problem| GgufError::new(path, problem);
    let mut file =
        std::io::BufWriter::new(File::create(path).map_err(|e| err(GgufProblem::Io(e)))?);
    gguf_file::write(&mut file, metadata, tensors).map_err(|e| {
        err(GgufProblem::Malformed {
            detail: format!("cannot write: {e}"),
        })
    })?;
    std::io::Write::flush(&mut file).map_err(|e| err(GgufProblem::Io(e)))?;
    Ok(())
}
