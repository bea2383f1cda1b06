//! [`LlamaError`]: what can go wrong while reading a llama GGUF file into a shard or running
//! a shard's forward pass.
//!
//! The llama modules return this error so that their messages can name the exact metadata key,
//! tensor or position at fault. The engine turns it into an [`EngineError`] at its boundary:
//! load-time errors with [`LlamaError::into_load_error`] (which needs the model's name), and
//! forward-time errors with the `From` conversion.

use crate::EngineError;

/// Result alias of the llama modules.
pub type Result<T> = std::result::Result<T, LlamaError>;

/// Why a llama model could not be read, a shard could not be built, or a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// The GGUF file's architecture is not one this forward implements.
    #[error(
        "GGUF architecture {arch:?} is not supported; only llama-architecture models \
         (`general.architecture = \"llama\"`) can be loaded"
    )]
    UnsupportedArchitecture {
        /// The `general.architecture` value.
        arch: String,
    },
    /// A metadata key that the model needs is absent.
    #[error("GGUF metadata key `{key}` is missing; the file is not a complete llama model")]
    MissingMetadata {
        /// The missing key.
        key: String,
    },
    /// A metadata key is present but its value cannot be used.
    #[error("GGUF metadata key `{key}` is unusable: {reason}")]
    BadMetadata {
        /// The offending key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// A tensor that the shard needs is absent from the file.
    #[error("tensor `{name}` is missing from the GGUF file")]
    MissingTensor {
        /// The tensor's GGUF name.
        name: String,
    },
    /// A tensor's shape disagrees with the model's metadata.
    #[error("tensor `{name}` has shape {actual:?}, but the metadata implies {expected:?}")]
    BadTensorShape {
        /// The tensor's GGUF name.
        name: String,
        /// The shape the metadata implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        actual: Vec<usize>,
    },
    /// Reading or decoding a tensor's data failed.
    #[error("reading tensor `{name}` failed: {reason}")]
    TensorRead {
        /// The tensor's GGUF name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The requested layer range is empty or exceeds the model's layers.
    #[error(
        "layer range {start}..{end} is invalid: a shard needs a non-empty range within the \
         model's {n_layer} layers"
    )]
    BadLayerRange {
        /// First layer asked for.
        start: usize,
        /// One past the last layer asked for.
        end: usize,
        /// Layers in the model.
        n_layer: usize,
    },
    /// The load options cannot be honoured.
    #[error("invalid load options: {0}")]
    InvalidOptions(String),
    /// The shard was given the wrong kind of input (tokens to a non-first shard, or hidden
    /// states to the first shard).
    #[error("shard {layers} expects {expected} as input, got {got}")]
    WrongInput {
        /// The shard's layer range, as `i..j`.
        layers: String,
        /// The input kind the shard accepts.
        expected: &'static str,
        /// The input kind it received.
        got: &'static str,
    },
    /// The input holds no positions.
    #[error("empty input: a forward needs at least one position")]
    EmptyInput,
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending token id.
        token: u32,
        /// Size of the vocabulary.
        vocab_size: usize,
    },
    /// Hidden states handed to a shard have the wrong shape or type.
    #[error(
        "hidden states have shape {actual:?} and dtype {dtype}, expected [1, seq, {n_embd}] f32"
    )]
    BadHidden {
        /// The shape received.
        actual: Vec<usize>,
        /// The dtype received.
        dtype: String,
        /// The model's embedding width.
        n_embd: usize,
    },
    /// The forward would write past the KV cache's capacity.
    #[error(
        "context is full: positions {index_pos}..{end} exceed the KV cache's capacity of \
         {capacity} positions"
    )]
    ContextFull {
        /// First position of the input.
        index_pos: usize,
        /// One past the input's last position.
        end: usize,
        /// Positions the KV cache holds.
        capacity: usize,
    },
    /// The forward starts past the positions already cached, leaving a hole.
    #[error(
        "index_pos {index_pos} skips positions: only {cached} positions are cached, so the \
         input must start at or before {cached}"
    )]
    PositionGap {
        /// First position of the input.
        index_pos: usize,
        /// Positions currently cached.
        cached: usize,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl LlamaError {
    /// Whether the error is the model file's fault (metadata or tensors), as opposed to a
    /// failure to read it or a bad request.
    pub fn is_model_problem(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedArchitecture { .. }
                | Self::MissingMetadata { .. }
                | Self::BadMetadata { .. }
                | Self::MissingTensor { .. }
                | Self::BadTensorShape { .. }
        )
    }

    /// Converts a load-time error into an [`EngineError`] about `model`: problems with the
    /// file's contents become [`EngineError::InvalidModel`], everything else
    /// [`EngineError::LoadFailed`].
    pub fn into_load_error(self, model: &str) -> EngineError {
        let model = model.to_string();
        let reason = self.to_string();
        if self.is_model_problem() {
            EngineError::InvalidModel { model, reason }
        } else {
            EngineError::LoadFailed { model, reason }
        }
    }
}

/// Forward-time conversion: bad inputs become [`EngineError::InvalidRequest`], everything
/// else [`EngineError::Generate`]. Use [`LlamaError::into_load_error`] while loading.
impl From<LlamaError> for EngineError {
    fn from(err: LlamaError) -> Self {
        match err {
            LlamaError::TokenOutOfRange { .. }
            | LlamaError::EmptyInput
            | LlamaError::ContextFull { .. } => EngineError::InvalidRequest(err.to_string()),
            other => EngineError::Generate(other.to_string()),
        }
    }
}
