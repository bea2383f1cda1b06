//! The JSON shapes the API answers with, as OpenAI's clients expect them: a chat completion,
//! a chat completion chunk (one SSE event of a stream), a legacy text completion and its
//! chunk, and the model list.
//!
//! `finish_reason` maps `Stop -> "stop"`, `Length -> "length"` and `Cancelled -> "stop"`:
//! OpenAI has no value for a cancelled generation, and a task is only cancelled under a
//! client that is still listening when the node cancels it (e.g. while shutting down), in
//! which case what was generated so far is a complete, if short, answer.

use std::time::{SystemTime, UNIX_EPOCH};

use canopy_proto::{FinishReason, Usage};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;

use super::backend::ModelInfo;

/// OpenAI's `finish_reason` for the engine's.
pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Seconds since the unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What every object of one completion shares: id, creation time, model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompletionMeta {
    /// `chatcmpl-` and 24 random alphanumerics.
    pub(crate) id: String,
    /// Unix seconds.
    pub(crate) created: u64,
    /// The model, as the client named it.
    pub(crate) model: String,
}

impl CompletionMeta {
    /// A fresh id for a chat completion of `model`.
    pub(crate) fn new(model: &str) -> Self {
        Self::with_prefix("chatcmpl", model)
    }

    /// A fresh id for a legacy text completion of `model` (`cmpl-...`).
    pub(crate) fn text(model: &str) -> Self {
        Self::with_prefix("cmpl", model)
    }

    fn with_prefix(prefix: &str, model: &str) -> Self {
        let suffix: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(24)
            .map(char::from)
            .collect();
        Self {
            id: format!("{prefix}-{suffix}"),
            created: unix_now(),
            model: model.to_string(),
        }
    }
}

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct UsageBody {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
        }
    }
}

/// A non-streamed answer (`object: "chat.completion"`).
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: [Choice; 1],
    usage: UsageBody,
}

#[derive(Debug, Serialize)]
struct Choice {
    index: u32,
    message: AssistantMessage,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
}

impl ChatCompletion {
    /// The answer to a finished task.
    pub(crate) fn new(
        meta: CompletionMeta,
        content: String,
        reason: FinishReason,
        usage: Usage,
    ) -> Self {
        Self {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                },
                logprobs: None,
                finish_reason: finish_reason(reason),
            }],
            usage: usage.into(),
        }
    }
}

/// One event of a stream (`object: "chat.completion.chunk"`).
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    /// Absent unless usage was asked for; then `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageBody>>,
}

#[derive(Debug, Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

impl<'a> ChatCompletionChunk<'a> {
    fn with_choice(
        meta: &'a CompletionMeta,
        include_usage: bool,
        delta: Delta<'a>,
        finish: Option<&'static str>,
    ) -> Self {
        Self {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: include_usage.then_some(None),
        }
    }

    /// The first chunk: `delta.role = "assistant"` and empty content.
    pub(crate) fn role(meta: &'a CompletionMeta, include_usage: bool) -> Self {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        Self::with_choice(meta, include_usage, delta, None)
    }

    /// A piece of the answer.
    pub(crate) fn content(meta: &'a CompletionMeta, include_usage: bool, text: &'a str) -> Self {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        Self::with_choice(meta, include_usage, delta, None)
    }

    /// The chunk that ends the choice, with its `finish_reason` and an empty delta.
    pub(crate) fn finish(
        meta: &'a CompletionMeta,
        include_usage: bool,
        reason: FinishReason,
    ) -> Self {
        Self::with_choice(
            meta,
            include_usage,
            Delta::default(),
            Some(finish_reason(reason)),
        )
    }

    /// The usage chunk sent last when asked for: no choices, usage filled in.
    pub(crate) fn usage(meta: &'a CompletionMeta, usage: Usage) -> Self {
        Self {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: Vec::new(),
            usage: Some(Some(usage.into())),
        }
    }
}

impl UsageBody {
    /// The counts of several tasks added up (a completion of several prompts).
    pub(crate) fn add(self, usage: Usage) -> Self {
        let more = UsageBody::from(usage);
        Self {
            prompt_tokens: self.prompt_tokens.saturating_add(more.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(more.completion_tokens),
            total_tokens: self.total_tokens.saturating_add(more.total_tokens),
        }
    }
}

/// One choice of a legacy text completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TextChoice {
    /// The text (the prompt first, with `echo`).
    pub(crate) text: String,
    /// Why it ended.
    pub(crate) reason: FinishReason,
}

/// A non-streamed legacy completion (`object: "text_completion"`).
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<TextChoiceBody>,
    usage: UsageBody,
}

#[derive(Debug, Serialize)]
struct TextChoiceBody {
    text: String,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

impl TextCompletion {
    /// The answer: `choices` in prompt order, `usage` added up over them.
    pub(crate) fn new(meta: CompletionMeta, choices: Vec<TextChoice>, usage: UsageBody) -> Self {
        Self {
            id: meta.id,
            object: "text_completion",
            created: meta.created,
            model: meta.model,
            choices: choices
                .into_iter()
                .zip(0u32..)
                .map(|(c, index)| TextChoiceBody {
                    text: c.text,
                    index,
                    logprobs: None,
                    finish_reason: Some(finish_reason(c.reason)),
                })
                .collect(),
            usage,
        }
    }
}

/// One event of a legacy completion stream (`object: "text_completion"`, as OpenAI sends).
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<TextChoiceBody>,
    /// Absent unless usage was asked for; then `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageBody>>,
}

impl<'a> TextCompletionChunk<'a> {
    /// A piece of choice `index`'s text; `finish` on its last chunk.
    pub(crate) fn piece(
        meta: &'a CompletionMeta,
        include_usage: bool,
        index: u32,
        text: &str,
        finish: Option<FinishReason>,
    ) -> Self {
        Self {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: vec![TextChoiceBody {
                text: text.to_string(),
                index,
                logprobs: None,
                finish_reason: finish.map(finish_reason),
            }],
            usage: include_usage.then_some(None),
        }
    }

    /// The usage chunk sent last when asked for: no choices, usage filled in.
    pub(crate) fn usage(meta: &'a CompletionMeta, usage: UsageBody) -> Self {
        Self {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: Vec::new(),
            usage: Some(Some(usage)),
        }
    }
}

/// `GET /v1/models` (`object: "list"`).
#[derive(Debug, Serialize)]
pub(crate) struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

/// One model (`object: "model"`), with Canopy's `ready` extension.
#[derive(Debug, Serialize)]
pub(crate) struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
    ready: bool,
}

impl From<ModelInfo> for ModelObject {
    fn from(info: ModelInfo) -> Self {
        Self {
            id: info.id,
            object: "model",
            created: info.created,
            owned_by: info.owned_by,
            ready: info.ready,
        }
    }
}

impl ModelList {
    /// The list of `models`.
    pub(crate) fn new(models: Vec<ModelInfo>) -> Self {
        Self {
            object: "list",
            data: models.into_iter().map(ModelObject::from).collect(),
        }
    }
}
