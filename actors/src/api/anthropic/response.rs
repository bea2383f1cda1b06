//! The JSON shapes of Anthropic's Messages API answers: the `message` object (the whole
//! answer, or the start of a stream with empty content), the events of a stream, and the
//! error body `{"type": "error", "error": {"type", "message"}}`.
//!
//! `stop_reason` maps `Length -> "max_tokens"`, `Stop -> "end_turn"`, `StopSequence ->
//! "stop_sequence"` (with `stop_sequence` the matched string, which is cut out of the text)
//! and `Cancelled -> "end_turn"` (as on OpenAI's routes, a task is only cancelled under a
//! listening client by the node itself, and what came so far is a complete, if short,
//! answer).

use axum::http::StatusCode;
use canopy_proto::{FinishReason, Usage};
use serde::Serialize;

use canopy_engine::tools::ParsedCall;

use crate::api::response::random_id;

/// Anthropic's `stop_reason` for the engine's finish reason.
pub(crate) fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "end_turn",
        FinishReason::StopSequence(_) => "stop_sequence",
        FinishReason::Length => "max_tokens",
    }
}

/// The stop sequence of `stops` that ended a generation, if one did.
pub(crate) fn matched_stop(reason: FinishReason, stops: &[String]) -> Option<&str> {
    match reason {
        FinishReason::StopSequence(i) => stops.get(i as usize).map(String::as_str),
        _ => None,
    }
}

/// Anthropic's error `type` for an HTTP status.
pub(crate) fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// A fresh message id: `msg_` and 24 random alphanumerics.
pub(crate) fn message_id() -> String {
    random_id("msg_")
}

/// The error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = AnthropicError)]
pub(crate) struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorObject<'a>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = AnthropicErrorObject)]
struct ErrorObject<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

impl<'a> ErrorBody<'a> {
    /// The body of an error of `status` saying `message`.
    pub(crate) fn new(status: StatusCode, message: &'a str) -> Self {
        Self {
            kind: "error",
            error: ErrorObject {
                kind: error_type(status),
                message,
            },
        }
    }
}

/// Token counts as Anthropic reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = AnthropicUsage)]
pub(crate) struct UsageBody {
    input_tokens: u32,
    output_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(usage: Usage) -> Self {
        Self {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        }
    }
}

/// One content block of an answer: text, or a call of a tool.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ContentBlock<'a> {
    /// Text.
    Text {
        /// The text.
        text: &'a str,
    },
    /// A call of a tool.
    ToolUse {
        /// The call's id (`toolu_...`), which the tool's `tool_result` names.
        id: String,
        /// The tool called.
        name: &'a str,
        /// Its arguments (in a stream's `content_block_start`, `{}`: they follow as
        /// `input_json_delta`).
        input: &'a serde_json::Value,
    },
}

/// The empty arguments of a `tool_use` block's start.
static NO_INPUT: std::sync::LazyLock<serde_json::Value> =
    std::sync::LazyLock::new(|| serde_json::json!({}));

/// Anthropic's `stop_reason` of an answer that made calls (`tool_use`) or not.
fn stop_reason_of(reason: FinishReason, called: bool) -> &'static str {
    if called {
        "tool_use"
    } else {
        stop_reason(reason)
    }
}

/// The `message` object: a whole answer, or (empty, with no stop reason yet) the start of a
/// stream.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = AnthropicMessage)]
pub(crate) struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<ContentBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'a str>,
    usage: UsageBody,
}

impl<'a> Message<'a> {
    /// A finished answer: a text block holding `text` (left out when it is empty and there
    /// are calls), then a `tool_use` block per call; `stops` are the request's stop
    /// sequences.
    pub(crate) fn finished(
        id: &'a str,
        model: &'a str,
        (text, calls): (&'a str, &'a [ParsedCall]),
        (reason, stops): (FinishReason, &'a [String]),
        usage: Usage,
    ) -> Self {
        let mut content = Vec::with_capacity(calls.len() + 1);
        if !text.is_empty() || calls.is_empty() {
            content.push(ContentBlock::Text { text });
        }
        content.extend(calls.iter().map(ContentBlock::tool_use));
        Self {
            id,
            kind: "message",
            role: "assistant",
            model,
            content,
            stop_reason: Some(stop_reason_of(reason, !calls.is_empty())),
            stop_sequence: matched_stop(reason, stops),
            usage: usage.into(),
        }
    }

    /// The message of `message_start`: no content and no stop reason yet. Its token counts
    /// are 0: the prompt's count is known only when the task ends, and `message_delta`
    /// carries it then (as `usage.input_tokens`, which Anthropic's clients take over).
    pub(crate) fn started(id: &'a str, model: &'a str) -> Self {
        Self {
            id,
            kind: "message",
            role: "assistant",
            model,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: Usage::default().into(),
        }
    }
}

/// The events of a stream, each the `data:` of the SSE event named by its `type`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum StreamEvent<'a> {
    /// The message begins (empty).
    MessageStart {
        /// The message so far.
        message: Message<'a>,
    },
    /// A block begins (empty): the text block (index 0), or a call's.
    ContentBlockStart {
        /// The block's index.
        index: u32,
        /// The block so far.
        content_block: ContentBlock<'a>,
    },
    /// Anthropic's keep-alive.
    Ping,
    /// A piece of a block: text of the text block, or a call's arguments.
    ContentBlockDelta {
        /// The block's index.
        index: u32,
        /// The piece.
        delta: BlockDelta<'a>,
    },
    /// A block is complete.
    ContentBlockStop {
        /// The block's index.
        index: u32,
    },
    /// Why the message ended, and its token counts.
    MessageDelta {
        /// The stop reason and sequence.
        delta: StopDelta,
        /// The final token counts.
        usage: UsageBody,
    },
    /// The message is complete; nothing follows.
    MessageStop,
}

/// The `delta` of `content_block_delta`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum BlockDelta<'a> {
    /// A piece of text.
    TextDelta {
        /// The piece.
        text: &'a str,
    },
    /// A call's arguments (here all of them, in one piece).
    InputJsonDelta {
        /// The arguments as JSON text.
        partial_json: String,
    },
}

impl<'a> ContentBlock<'a> {
    /// The `tool_use` block of `call`, with a fresh id.
    fn tool_use(call: &'a ParsedCall) -> Self {
        ContentBlock::ToolUse {
            id: random_id("toolu_"),
            name: &call.name,
            input: &call.arguments,
        }
    }
}

/// The `delta` of `message_delta`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<String>,
}

impl<'a> StreamEvent<'a> {
    /// The SSE event name (the `type`).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::Ping => "ping",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
        }
    }

    /// `content_block_start` of the text block (index 0).
    pub(crate) fn block_start() -> Self {
        StreamEvent::ContentBlockStart {
            index: 0,
            content_block: ContentBlock::Text { text: "" },
        }
    }

    /// A `content_block_delta` of `text`.
    pub(crate) fn text(text: &'a str) -> Self {
        StreamEvent::ContentBlockDelta {
            index: 0,
            delta: BlockDelta::TextDelta { text },
        }
    }

    /// The three events of `call` as block `index`: its start (with `input: {}`), its
    /// arguments as one `input_json_delta`, its stop.
    pub(crate) fn call(index: u32, call: &'a ParsedCall) -> [Self; 3] {
        [
            StreamEvent::ContentBlockStart {
                index,
                content_block: ContentBlock::ToolUse {
                    id: random_id("toolu_"),
                    name: &call.name,
                    input: &NO_INPUT,
                },
            },
            StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta {
                    partial_json: crate::api::tools::arguments_text(call),
                },
            },
            StreamEvent::ContentBlockStop { index },
        ]
    }

    /// The `message_delta` of a finished task whose stop sequences were `stops` (stop
    /// reason `tool_use` when it `called`).
    pub(crate) fn finished(
        reason: FinishReason,
        called: bool,
        stops: &[String],
        usage: Usage,
    ) -> Self {
        StreamEvent::MessageDelta {
            delta: StopDelta {
                stop_reason: stop_reason_of(reason, called),
                stop_sequence: matched_stop(reason, stops).map(str::to_string),
            },
            usage: usage.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_message_is_anthropic_shaped() {
        let usage = Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
        };
        let message = Message::finished(
            "msg_x",
            "m",
            ("Hi", &[]),
            (FinishReason::Length, &[]),
            usage,
        );
        assert_eq!(
            serde_json::to_value(&message).expect("json"),
            json!({
                "id": "msg_x", "type": "message", "role": "assistant", "model": "m",
                "content": [{"type": "text", "text": "Hi"}],
                "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 2}
            })
        );
        let start = serde_json::to_value(StreamEvent::MessageStart {
            message: Message::started("msg_x", "m"),
        })
        .expect("json");
        assert_eq!(start["type"], "message_start");
        assert_eq!(start["message"]["content"], json!([]));
        assert_eq!(start["message"]["stop_reason"], json!(null));
        let stops = ["\n\nHuman:".to_string(), "END".to_string()];
        let stopped = Message::finished(
            "msg_x",
            "m",
            ("Hi", &[]),
            (FinishReason::StopSequence(1), &stops),
            usage,
        );
        let stopped = serde_json::to_value(&stopped).expect("json");
        assert_eq!(stopped["stop_reason"], "stop_sequence");
        assert_eq!(stopped["stop_sequence"], "END");
        assert!(message_id().starts_with("msg_"));
        assert_eq!(message_id().len(), 28);
    }

    #[test]
    fn stream_events_are_tagged_by_their_name() {
        let events = [
            StreamEvent::block_start(),
            StreamEvent::Ping,
            StreamEvent::text("a\nb"),
            StreamEvent::ContentBlockStop { index: 0 },
            StreamEvent::finished(FinishReason::Stop, false, &[], Usage::default()),
            StreamEvent::MessageStop,
            StreamEvent::finished(
                FinishReason::StopSequence(0),
                false,
                &["x".into()],
                Usage::default(),
            ),
        ];
        for event in &events {
            let value = serde_json::to_value(event).expect("json");
            assert_eq!(value["type"], event.name(), "{value}");
        }
        assert_eq!(
            serde_json::to_value(&events[2]).expect("json"),
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": "a\nb"}})
        );
        assert_eq!(
            serde_json::to_value(&events[0]).expect("json"),
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}})
        );
        assert_eq!(
            serde_json::to_value(&events[4]).expect("json"),
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"input_tokens": 0, "output_tokens": 0}})
        );
        assert_eq!(
            serde_json::to_value(&events[6]).expect("json")["delta"],
            json!({"stop_reason": "stop_sequence", "stop_sequence": "x"})
        );
    }

    #[test]
    fn statuses_map_to_anthropics_error_types() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (415, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
        ] {
            let status = StatusCode::from_u16(status).expect("status");
            assert_eq!(error_type(status), kind, "{status}");
        }
        let body =
            serde_json::to_value(ErrorBody::new(StatusCode::NOT_FOUND, "gone")).expect("json");
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": "not_found_error", "message": "gone"}})
        );
    }
}
