//! The supervisor <-> runner messages.
//!
//! A runner is a child OS process (`canopy runner`) that hosts one model instance or shard.
//! Its supervisor writes [`ToRunner`] frames to the runner's stdin and reads [`FromRunner`]
//! frames from its stdout; the runner's stderr is free text (logs) that the supervisor keeps
//! the tail of. The first frame each way is a [`Handshake`].
//!
//! Task lifecycle, as seen on the wire: `Generate` down; `Ack` up as soon as the runner has
//! queued it; `Started` when work begins; `Progress` at each phase change; `Chunk`s while
//! tokens are produced; exactly one of `Done` or `TaskError` to end it. `Cancel` may arrive at
//! any time and ends the task with `Done { finish_reason: Cancelled }` if it was still known.

use serde::{Deserialize, Serialize};

use crate::{HANDSHAKE_MAGIC, PROTOCOL_VERSION, ProtoError};

/// Identifies one task for the lifetime of one supervisor.
pub type TaskId = u64;

/// The first frame in each direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// Always [`HANDSHAKE_MAGIC`].
    pub magic: String,
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The sender's OS process id.
    pub pid: u32,
}

impl Handshake {
    /// Our own handshake.
    pub fn ours() -> Self {
        Self {
            magic: HANDSHAKE_MAGIC.to_string(),
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        }
    }

    /// Checks a peer's handshake: magic string first, then version.
    pub fn check(&self) -> Result<(), ProtoError> {
        if self.magic != HANDSHAKE_MAGIC {
            return Err(ProtoError::BadHandshake(format!(
                "expected magic {HANDSHAKE_MAGIC:?}, got {:?}",
                self.magic
            )));
        }
        if self.version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        Ok(())
    }
}

/// What a runner should load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSpec {
    /// A model file path, or an engine-specific model name.
    pub model: String,
    /// First layer this runner owns (inclusive); `None` means from the first layer.
    pub layer_start: Option<u32>,
    /// Last layer this runner owns (exclusive); `None` means through the last layer.
    pub layer_end: Option<u32>,
    /// Worker threads the engine may use; `None` lets the engine choose.
    pub threads: Option<u32>,
    /// Sequences the runner may generate at once (continuous batching); `None` lets the
    /// engine choose from the machine's memory and cores. Engines that cannot batch run one.
    #[serde(default)]
    pub parallel: Option<u32>,
}

/// Sampling and stopping parameters of a generate task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Sampling temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling threshold (1.0 disables it).
    pub top_p: f32,
    /// Top-k cut-off (`None` disables it).
    pub top_k: Option<u32>,
    /// Seed for the sampler.
    pub seed: u64,
    /// Stop sequences: generation ends before any of them would be emitted.
    pub stop: Vec<String>,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`, -2 to 2).
    #[serde(default)]
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, -2 to 2).
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids before sampling (OpenAI's `logit_bias`, -100 to
    /// 100; -100 bans a token).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(k)`: report each generated token's log-probability and the `k` most likely
    /// tokens at its position ([`TokenChunk::logprobs`]); `None`: none.
    #[serde(default)]
    pub logprobs: Option<u8>,
    /// Constrains the output to a grammar (structured output); `None`: free text.
    #[serde(default)]
    pub constraint: Option<Constraint>,
}

/// A grammar the output must follow: the engine masks every token that would leave it, and
/// ends the generation when the grammar is complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON Schema (given as JSON text).
    JsonSchema(String),
    /// Exactly one call of one of these tools, in the format [`ToolSpec`] describes:
    /// `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`, the arguments valid
    /// against the tool's parameter schema (a `tool_choice` of `required` or a named
    /// function). The list is not empty.
    ToolCall(Vec<ToolSpec>),
}

/// A function the model may call (OpenAI's `tools[].function`, Anthropic's `tools[]`).
///
/// The chat template shows the tools to the model: a template that takes `tools` renders
/// them its own way, and for one that does not, the engine adds a system message that
/// describes them and asks for calls as `<tool_call>\n{"name": ..., "arguments": {...}}\n
/// </tool_call>` (the Hermes format, which Qwen's and Hermes' templates also use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The function's name (letters, digits, `_` and `-`, at most 64; checked by the API).
    pub name: String,
    /// What the function does, for the model.
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON Schema of its arguments object, as JSON text.
    pub parameters: String,
}

/// A call the assistant made in an earlier turn (OpenAI's `tool_calls[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the tool's answer names (`tool_call_id`).
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
            constraint: None,
        }
    }
}

/// One chat message of a generate request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool` (a tool's answer).
    pub role: String,
    /// The message text.
    pub content: String,
    /// The calls an `assistant` turn made.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// On a `tool` turn: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// On a `tool` turn: the name of the function that answered.
    #[serde(default)]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain message: a role and its text, no tool calls.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// The input of a generate task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, fed to the model as is.
    Text(String),
    /// Chat turns, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// The prompt as plain text: raw text as is, chat turns joined one per line.
    pub fn to_plain_text(&self) -> String {
        match self {
            Prompt::Text(text) => text.clone(),
            Prompt::Chat(messages) => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A generate request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// How to sample and when to stop.
    pub params: GenerateParams,
    /// The tools a chat prompt's template shows the model (see [`ToolSpec`]); ignored for
    /// raw text.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
}

/// A message from the supervisor to the runner (stdin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToRunner {
    /// Opens the conversation; must be the first frame.
    Handshake(Handshake),
    /// Load a model (answered by `Status` changes and `LoadProgress`, then `Loaded`).
    Load(LoadSpec),
    /// Start a generate task.
    Generate {
        /// The task's id, chosen by the supervisor.
        task_id: TaskId,
        /// What to generate.
        request: GenerateRequest,
    },
    /// Cancel a task; harmless if it already ended.
    Cancel {
        /// The task to cancel.
        task_id: TaskId,
    },
    /// Finish the current task's token, stop, and exit 0.
    Shutdown,
}

/// The runner's status, mirrored by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunnerStatus {
    /// Process started, nothing loaded.
    Idle,
    /// Loading a model.
    Loading,
    /// Model loaded, warming up.
    Loaded,
    /// Ready for tasks and not running one.
    Ready,
    /// Running a task.
    Running,
    /// Asked to shut down, finishing.
    ShuttingDown,
    /// Shut down cleanly.
    Shutdown,
    /// Failed (the process died, or loading failed).
    Failed,
}

impl std::fmt::Display for RunnerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The phase a task or the runner is in; each has its own stall timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Loading the model (progress resets the timer layer by layer).
    Loading,
    /// Processing the prompt.
    Prefill,
    /// Producing tokens (the timer is per token).
    Decode,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Loading => "loading",
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        })
    }
}

/// Why a task ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model produced its end-of-sequence token (or completed its grammar).
    Stop,
    /// The output reached one of the request's stop sequences (its index in
    /// [`GenerateParams::stop`]).
    StopSequence(u32),
    /// `max_tokens` was reached.
    Length,
    /// The task was cancelled.
    Cancelled,
}

/// Token counts of a finished task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// A piece of generated output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenChunk {
    /// Index of this chunk within its task, from 0.
    pub index: u32,
    /// Text (always whole UTF-8; may be empty while a character is incomplete).
    pub text: String,
    /// The token ids this chunk covers.
    pub token_ids: Vec<u32>,
    /// One entry per token of `token_ids`, when the request asked for log-probabilities.
    #[serde(default)]
    pub logprobs: Vec<TokenLogprob>,
}

/// A generated token's log-probability, and the most likely tokens at its position.
///
/// The distribution is the one the sampler drew from before its top-k/top-p cut: the model's
/// logits after `logit_bias`, the penalties and the grammar's mask, divided by the temperature
/// (by 1 for greedy decoding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token id.
    pub token: u32,
    /// The bytes the token decodes to (possibly part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Its natural log-probability.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first (as many as asked for).
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token id.
    pub token: u32,
    /// The bytes the token decodes to.
    pub bytes: Vec<u8>,
    /// Its natural log-probability.
    pub logprob: f32,
}

/// A message from the runner to the supervisor (stdout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromRunner {
    /// Answers the supervisor's handshake; always the first frame.
    Handshake(Handshake),
    /// Liveness beat, sent from a thread independent of the work loop.
    Heartbeat {
        /// Increments by one per beat.
        seq: u64,
    },
    /// The runner's status changed.
    Status(RunnerStatus),
    /// Loading progress.
    LoadProgress {
        /// Layers loaded so far.
        done: u32,
        /// Layers to load.
        total: u32,
    },
    /// Loading failed; the runner stays up in `Failed` status and can be told to load again.
    LoadFailed {
        /// What went wrong.
        error: String,
    },
    /// The task was received and queued.
    Ack {
        /// The task.
        task_id: TaskId,
    },
    /// The task started running.
    Started {
        /// The task.
        task_id: TaskId,
    },
    /// The task entered a phase (resets that phase's stall timer).
    Progress {
        /// The task.
        task_id: TaskId,
        /// The new phase.
        phase: Phase,
    },
    /// Output of a task.
    Chunk {
        /// The task.
        task_id: TaskId,
        /// The output.
        chunk: TokenChunk,
    },
    /// The task finished normally.
    Done {
        /// The task.
        task_id: TaskId,
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The task failed inside the runner (the runner itself is still healthy).
    TaskError {
        /// The task.
        task_id: TaskId,
        /// What went wrong.
        error: String,
        /// Whose fault it was, for the API's status code.
        #[serde(default)]
        kind: TaskErrorKind,
    },
    /// The runner's batch, as it stands (sent when it changes, at most a few times a second).
    Batch(BatchStats),
}

/// Why a task failed inside a healthy runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskErrorKind {
    /// Something went wrong in the engine (a server error).
    #[default]
    Internal,
    /// The request cannot be served as asked (a client error, e.g. bad parameters).
    InvalidRequest,
    /// The prompt is longer than the instance's context (OpenAI's `context_length_exceeded`).
    ContextLengthExceeded,
}

/// What a runner's batch scheduler holds: the sequences, their KV memory, the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Most sequences the runner generates at once (its `parallel` setting).
    pub parallel: u32,
    /// Sequences in the running batch.
    pub running: u32,
    /// Tasks accepted and waiting for a place in the batch.
    pub queued: u32,
    /// Rows (prefill and decode) of the last batched step.
    pub last_step_rows: u32,
    /// Bytes of KV cache in use, by running sequences and by the prefix cache.
    pub kv_bytes: u64,
    /// Bytes of KV cache the runner may use at most.
    pub kv_capacity_bytes: u64,
    /// Requests whose prompt reused cached positions (since the runner started).
    pub prefix_hits: u64,
    /// Prompt positions reused from the prefix cache instead of prefilled (since start).
    pub prefix_reused_tokens: u64,
    /// Prompt positions prefilled (since start).
    pub prefilled_tokens: u64,
}
