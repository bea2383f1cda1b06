//! The JSON shapes the API answers with, as OpenAI's clients expect them: a chat completion,
//! a chat completion chunk (one SSE event of a stream), a legacy text completion and its
//! chunk, and the model list.
//!
//! `finish_reason` maps `Stop` and `StopSequence -> "stop"`, `Length -> "length"` and
//! `Cancelled -> "stop"`:
//! OpenAI has no value for a cancelled generation, and a task is only cancelled under a
//! client that is still listening when the node cancels it (e.g. while shutting down), in
//! which case what was generated so far is a complete, if short, answer.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use canopy_proto::{FinishReason, TokenLogprob, Usage};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;

use super::backend::ModelInfo;
use super::tools;
use canopy_engine::tools::ParsedCall;

/// OpenAI's `finish_reason` for the engine's.
pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence(_) | FinishReason::Cancelled => "stop",
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
        Self {
            id: random_id(&format!("{prefix}-")),
            created: unix_now(),
            model: model.to_string(),
        }
    }
}

/// A fresh id: `prefix` and 24 random letters and digits (`chatcmpl-...`, `call_...`,
/// `msg_...`).
pub(crate) fn random_id(prefix: &str) -> String {
    let suffix: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{suffix}")
}

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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

/// The text OpenAI shows for a token: its bytes as UTF-8, or, for a token that holds part of
/// a character, `bytes:` and each byte as `\xNN`.
pub(crate) fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => {
            let mut out = String::from("bytes:");
            for b in bytes {
                out.push_str(&format!("\\x{b:02x}"));
            }
            out
        }
    }
}

/// A log-probability as JSON can carry it (OpenAI writes -9999 for an impossible token).
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// Chat's `logprobs` object: one entry per generated token.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ChatLogprobs {
    content: Vec<ChatTokenLogprob>,
    refusal: Option<()>,
}

/// One generated token's log-probability and its position's most likely tokens, in OpenAI's
/// shape (which Ollama's `logprobs` entries share).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ChatTokenLogprob {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
    top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
struct ChatTopLogprob {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
}

impl ChatLogprobs {
    /// The object of `entries`.
    pub(crate) fn new(entries: &[TokenLogprob]) -> Self {
        Self {
            content: ChatTokenLogprob::list(entries),
            refusal: None,
        }
    }
}

impl ChatTokenLogprob {
    /// One entry per token of `entries`.
    pub(crate) fn list(entries: &[TokenLogprob]) -> Vec<Self> {
        entries
            .iter()
            .map(|e| ChatTokenLogprob {
                token: token_text(&e.bytes),
                logprob: finite(e.logprob),
                bytes: e.bytes.clone(),
                top_logprobs: e
                    .top
                    .iter()
                    .map(|t| ChatTopLogprob {
                        token: token_text(&t.bytes),
                        logprob: finite(t.logprob),
                        bytes: t.bytes.clone(),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Character offsets of tokens in a text, for the legacy `text_offset`: the offset of a
/// token is the number of characters its text starts after. A character split over tokens
/// counts where it is completed; bytes that are not UTF-8 count one character each (the
/// replacement character they decode to).
#[derive(Debug, Clone, Default)]
pub(crate) struct TextOffsets {
    chars: usize,
    pending: Vec<u8>,
}

impl TextOffsets {
    /// The offset of a token of `bytes`, and moves past it.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> usize {
        let offset = self.chars;
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    self.chars += text.chars().count();
                    self.pending.clear();
                    break;
                }
                Err(err) => {
                    let valid = err.valid_up_to();
                    self.chars += std::str::from_utf8(&self.pending[..valid])
                        .map_or(0, |t| t.chars().count());
                    match err.error_len() {
                        // An unfinished character: wait for its next bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(bad) => {
                            self.chars += 1;
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        offset
    }
}

/// The legacy completions' `logprobs` object.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub(crate) struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<BTreeMap<String, f32>>,
    text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// The object of `entries`, their offsets taken from `offsets`.
    pub(crate) fn new(entries: &[TokenLogprob], offsets: &mut TextOffsets) -> Self {
        let mut out = Self::default();
        for e in entries {
            out.tokens.push(token_text(&e.bytes));
            out.token_logprobs.push(finite(e.logprob));
            out.top_logprobs.push(
                e.top
                    .iter()
                    .map(|t| (token_text(&t.bytes), finite(t.logprob)))
                    .collect(),
            );
            out.text_offset.push(offsets.push(&e.bytes));
        }
        out
    }
}

/// A non-streamed answer (`object: "chat.completion"`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ChatCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: UsageBody,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Choice {
    index: u32,
    message: AssistantMessage,
    logprobs: Option<ChatLogprobs>,
    finish_reason: &'static str,
}

/// One finished choice of a chat completion.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatChoice {
    /// The answer's text.
    pub(crate) text: String,
    /// The calls of tools it made.
    pub(crate) calls: Vec<ParsedCall>,
    /// Why it ended.
    pub(crate) reason: FinishReason,
    /// Its tokens' log-probabilities, when they were asked for.
    pub(crate) logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AssistantMessage {
    role: &'static str,
    /// `null` when the answer is calls only, as OpenAI sends it.
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallBody>,
}

/// One call of a tool, in OpenAI's shape (`index` only in stream deltas).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ToolCallBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionBody,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct FunctionBody {
    name: String,
    arguments: String,
}

impl ToolCallBody {
    /// `calls` with fresh ids, numbered when `indexed` (stream deltas).
    pub(crate) fn list(calls: &[ParsedCall], indexed: bool) -> Vec<Self> {
        calls
            .iter()
            .zip(0u32..)
            .map(|(call, i)| Self {
                index: indexed.then_some(i),
                id: random_id("call_"),
                kind: "function",
                function: FunctionBody {
                    name: call.name.clone(),
                    arguments: tools::arguments_text(call),
                },
            })
            .collect()
    }
}

/// OpenAI's `finish_reason` of an answer that made calls (`tool_calls`) or not.
pub(crate) fn chat_finish_reason(reason: FinishReason, called: bool) -> &'static str {
    if called {
        "tool_calls"
    } else {
        finish_reason(reason)
    }
}

impl ChatCompletion {
    /// The answer of finished choices, in order, with their usage added up.
    pub(crate) fn new(meta: CompletionMeta, choices: Vec<ChatChoice>, usage: UsageBody) -> Self {
        Self {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            choices: choices
                .into_iter()
                .zip(0u32..)
                .map(|(c, index)| Choice {
                    index,
                    finish_reason: chat_finish_reason(c.reason, !c.calls.is_empty()),
                    message: AssistantMessage {
                        role: "assistant",
                        content: (c.calls.is_empty() || !c.text.is_empty()).then_some(c.text),
                        tool_calls: ToolCallBody::list(&c.calls, false),
                    },
                    logprobs: c.logprobs.as_deref().map(ChatLogprobs::new),
                })
                .collect(),
            usage,
        }
    }
}

/// One event of a stream (`object: "chat.completion.chunk"`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallBody>>,
}

impl<'a> ChatCompletionChunk<'a> {
    fn with_choice(
        meta: &'a CompletionMeta,
        include_usage: bool,
        index: u32,
        (delta, logprobs): (Delta<'a>, Option<ChatLogprobs>),
        finish: Option<&'static str>,
    ) -> Self {
        Self {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: vec![ChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            usage: include_usage.then_some(None),
        }
    }

    /// The first chunk of choice `index`: `delta.role = "assistant"` and empty content.
    pub(crate) fn role(meta: &'a CompletionMeta, include_usage: bool, index: u32) -> Self {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            tool_calls: None,
        };
        Self::with_choice(meta, include_usage, index, (delta, None), None)
    }

    /// A piece of choice `index`'s answer, with its tokens' log-probabilities when they were
    /// asked for.
    pub(crate) fn content(
        meta: &'a CompletionMeta,
        include_usage: bool,
        index: u32,
        text: &'a str,
        logprobs: Option<&[TokenLogprob]>,
    ) -> Self {
        let delta = Delta {
            role: None,
            content: Some(text),
            tool_calls: None,
        };
        let logprobs = logprobs.map(ChatLogprobs::new);
        Self::with_choice(meta, include_usage, index, (delta, logprobs), None)
    }

    /// The calls of choice `index`, whole, in one delta (each with its `index`, id, name
    /// and all its arguments).
    pub(crate) fn calls(
        meta: &'a CompletionMeta,
        include_usage: bool,
        index: u32,
        calls: &[ParsedCall],
    ) -> Self {
        let delta = Delta {
            tool_calls: Some(ToolCallBody::list(calls, true)),
            ..Delta::default()
        };
        Self::with_choice(meta, include_usage, index, (delta, None), None)
    }

    /// The chunk that ends choice `index`, with its `finish_reason` (`tool_calls` when it
    /// `called`) and an empty delta.
    pub(crate) fn finish(
        meta: &'a CompletionMeta,
        include_usage: bool,
        index: u32,
        reason: FinishReason,
        called: bool,
    ) -> Self {
        Self::with_choice(
            meta,
            include_usage,
            index,
            (Delta::default(), None),
            Some(chat_finish_reason(reason, called)),
        )
    }

    /// The usage chunk sent last when asked for: no choices, usage filled in.
    pub(crate) fn usage(meta: &'a CompletionMeta, usage: UsageBody) -> Self {
        Self {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: Vec::new(),
            usage: Some(Some(usage)),
        }
    }
}

impl UsageBody {
    /// The counts of a request's choices added up: the completion tokens of each, the
    /// prompt's tokens once per prompt (`first_of_prompt` on the first choice of each), as
    /// OpenAI counts `n > 1`.
    pub(crate) fn add_choice(self, usage: Usage, first_of_prompt: bool) -> Self {
        let prompt = if first_of_prompt {
            usage.prompt_tokens
        } else {
            0
        };
        self.add(Usage {
            prompt_tokens: prompt,
            completion_tokens: usage.completion_tokens,
        })
    }

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
#[derive(Debug, Clone)]
pub(crate) struct TextChoice {
    /// The text (the prompt first, with `echo`).
    pub(crate) text: String,
    /// Why it ended.
    pub(crate) reason: FinishReason,
    /// Its tokens' log-probabilities, when they were asked for.
    pub(crate) logprobs: Option<TextLogprobs>,
}

/// A non-streamed legacy completion (`object: "text_completion"`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TextCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<TextChoiceBody>,
    usage: UsageBody,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TextChoiceBody {
    text: String,
    index: u32,
    logprobs: Option<TextLogprobs>,
    finish_reason: Option<&'static str>,
}

impl TextCompletion {
    /// The answer: `choices` in order (prompt-major), `usage` added up over them.
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
                    logprobs: c.logprobs,
                    finish_reason: Some(finish_reason(c.reason)),
                })
                .collect(),
            usage,
        }
    }
}

/// One event of a legacy completion stream (`object: "text_completion"`, as OpenAI sends).
#[derive(Debug, Serialize, utoipa::ToSchema)]
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
    /// A piece of choice `index`'s text (with its tokens' log-probabilities when they were
    /// asked for); `finish` on its last chunk.
    pub(crate) fn piece(
        meta: &'a CompletionMeta,
        include_usage: bool,
        index: u32,
        (text, logprobs): (&str, Option<TextLogprobs>),
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
                logprobs,
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

/// One model (`object: "model"`), with Canopy's `ready` extension.
#[derive(Debug, Serialize, utoipa::ToSchema)]
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

#[cfg(test)]
mod tests {
    use canopy_proto::TopLogprob;
    use serde_json::json;

    use super::*;

    fn entry(bytes: &[u8], logprob: f32, top: &[(&[u8], f32)]) -> TokenLogprob {
        TokenLogprob {
            token: 0,
            bytes: bytes.to_vec(),
            logprob,
            top: top
                .iter()
                .map(|&(b, l)| TopLogprob {
                    token: 1,
                    bytes: b.to_vec(),
                    logprob: l,
                })
                .collect(),
        }
    }

    #[test]
    fn tokens_show_as_text_or_as_their_bytes() {
        assert_eq!(token_text(b" Hello"), " Hello");
        assert_eq!(token_text(&[0xe2, 0x80]), "bytes:\\xe2\\x80");
    }

    #[test]
    fn chat_logprobs_are_openai_shaped() {
        let value = serde_json::to_value(ChatLogprobs::new(&[entry(
            b"Hi",
            -0.5,
            &[(b"Hi", -0.5), (b"Yo", f32::NEG_INFINITY)],
        )]))
        .expect("json");
        assert_eq!(
            value,
            json!({"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                 {"token": "Yo", "logprob": -9999.0, "bytes": [89, 111]}]}],
                   "refusal": null})
        );
    }

    #[test]
    fn legacy_logprobs_carry_character_offsets() {
        // "é" (2 bytes) split over two tokens: the second token starts inside it, so both
        // start at 1; the character counts once it is complete.
        let entries = [
            entry(b"a", -1.0, &[(b"a", -1.0)]),
            entry(&[0xc3], -2.0, &[]),
            entry(&[0xa9], -0.5, &[]),
            entry("日本".as_bytes(), -0.25, &[]),
            entry(b"!", -0.125, &[]),
        ];
        let mut offsets = TextOffsets::default();
        let lp = serde_json::to_value(TextLogprobs::new(&entries, &mut offsets)).expect("json");
        assert_eq!(lp["text_offset"], json!([0, 1, 1, 2, 4]));
        assert_eq!(lp["tokens"][0], "a");
        assert_eq!(lp["tokens"][1], "bytes:\\xc3");
        assert_eq!(
            lp["token_logprobs"],
            json!([-1.0, -2.0, -0.5, -0.25, -0.125])
        );
        assert_eq!(lp["top_logprobs"][0], json!({"a": -1.0}));
        // Offsets go on across the chunks of a stream.
        let more = TextLogprobs::new(&[entry(b"b", -1.0, &[])], &mut offsets);
        assert_eq!(
            serde_json::to_value(more).expect("json")["text_offset"],
            json!([5])
        );
    }

    #[test]
    fn usage_counts_a_prompt_once_for_its_choices() {
        let u = |p, c| Usage {
            prompt_tokens: p,
            completion_tokens: c,
        };
        let total = UsageBody::default()
            .add_choice(u(10, 3), true)
            .add_choice(u(10, 4), false);
        assert_eq!(
            serde_json::to_value(total).expect("json"),
            json!({"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17})
        );
    }
}
