//! [`EngineError`]: everything that can go wrong inside an engine.
//!
//! The runner turns these into protocol messages: load errors into `LoadFailed`, generate
//! errors into `TaskError`, both with the error's `Display` text, so the messages are written
//! for the person reading the supervisor's logs.

/// Why an engine could not be selected, load a model, or generate.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine name is not one of the engines this build offers.
    #[error("unknown engine {name:?}; known engines: {known}")]
    UnknownEngine {
        /// The name that was asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The model named by the load spec is not something this engine can load.
    #[error("cannot load model {model:?}: {reason}")]
    InvalidModel {
        /// The `LoadSpec::model` string.
        model: String,
        /// What is wrong with it, and what would be accepted.
        reason: String,
    },
    /// Loading the model failed part-way.
    #[error("loading model {model:?} failed: {reason}")]
    LoadFailed {
        /// The `LoadSpec::model` string.
        model: String,
        /// What went wrong.
        reason: String,
    },
    /// A generate request arrived before a model was loaded (or after loading failed).
    #[error("model not loaded")]
    NotLoaded,
    /// The generate request itself is unusable.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt does not fit in the model instance's context (the client's error).
    #[error(
        "the prompt has {prompt_tokens} tokens; this model instance holds at most {max_context} \
         positions (prompt and completion together); shorten the prompt"
    )]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Positions the instance holds.
        max_context: usize,
    },
    /// Generation failed part-way.
    #[error("generation failed: {0}")]
    Generate(String),
}
