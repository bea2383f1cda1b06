//! The body of `POST /v1/messages` (Anthropic's Messages API) and its validation into an
//! engine request, with Anthropic's field names.
//!
//! Decisions (see the module `anthropic` for the API as a whole):
//!
//! - `max_tokens` is required, as in Anthropic's API, and must be at least 1 (the engine
//!   also ends a generation when the instance's context is full).
//! - `temperature` defaults to 1.0 and must lie in `[0, 1]` (Anthropic's range); `top_p`
//!   defaults to 1.0 and must lie in `[0, 1]`; `top_k` (absent or 0: disabled) must be a
//!   positive integer. The seed is random, so repeated requests differ as with Anthropic.
//! - `stop_sequences`: an array of at most 16 strings; empty ones are ignored.
//! - `system`: a string, or an array of `text` blocks (joined by newlines); it becomes the
//!   conversation's system turn, rendered by the model's chat template.
//! - `messages`: at least one; roles `user` and `assistant` (a `system` role is a 400 that
//!   points at the top-level `system`). Content is a string or an array of content blocks:
//!   `text` blocks are joined by newlines; an assistant's `tool_use` blocks (`id`, `name`,
//!   `input` object; a `caller` of type `direct` and a null `toolset_name`, which the
//!   clients echo, are accepted) are its calls, and a user's `tool_result` blocks (`tool_use_id`,
//!   `content` a string or text blocks, `is_error`) are tool turns before the user's text;
//!   `image`, `document`, `thinking`, `redacted_thinking`, `search_result` and the server
//!   tools' blocks are a 400 naming the block (the models take only text). A block's
//!   `cache_control` is accepted with no effect (there is no prompt cache to steer);
//!   non-empty `citations` are refused. Consecutive turns of the same role are combined into
//!   one (joined by a newline), as Anthropic combines them. A conversation that ends with an `assistant` turn (prefilling
//!   the answer) is a 400: the chat template would close that turn instead of continuing
//!   it, so the answer would not continue the prefill as Anthropic's does.
//! - accepted with no effect: `metadata` (an object, e.g. `user_id`), `service_tier` `auto`
//!   or `standard_only` (there is one tier), `speed` `standard`, a top-level
//!   `cache_control`, `user_profile_id` and `workspace_id` (the newer clients' fields).
//! - `tools`: custom tools (`name`, `description`, `input_schema`; `type` absent or
//!   `custom`; `cache_control` accepted), at most 128; Anthropic's server tools (`bash_...`,
//!   `web_search_...`, ...) are a 400 naming the tool's `type`. `tool_choice`: `auto` (the
//!   default), `any` (exactly one call of some tool, under a grammar), `tool` with `name`
//!   (exactly one call of it), `none`; `disable_parallel_tool_use: true` keeps the first of
//!   an `auto` answer's calls. See the OpenAI API's `tools` for how calls are made and read.
//! - refused, naming the field: `thinking` other than `disabled`, non-empty `mcp_servers`, `container`,
//!   `context_management`, `output_format`, `output_config`, `inference_geo`, `diagnostics`,
//!   `speed` `fast`; any other field is an unknown
//!   field, also a 400 naming it.

use std::collections::BTreeMap;

use canopy_proto::{ChatMessage, GenerateParams, GenerateRequest, Prompt, ToolCall, ToolSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::request::{checked_stop, in_range, json_type, positive_u32};
use crate::api::tools::{ToolChoice, Tools, check_tool_list, tool_spec};

/// Most stop sequences a request may carry.
const MAX_STOP_SEQUENCES: usize = 16;

/// The body of `POST /v1/messages`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct MessagesBody {
    model: String,
    messages: Vec<Value>,
    max_tokens: i64,
    system: Option<Value>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stop_sequences: Option<Value>,
    stream: Option<bool>,
    metadata: Option<Value>,
    service_tier: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    #[schema(ignore)]
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// The body of `POST /v1/messages/count_tokens`: what a message request's prompt is made of.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct CountTokensBody {
    model: String,
    messages: Vec<Value>,
    system: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    #[schema(ignore)]
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

impl CountTokensBody {
    /// Checks the body as a message request's and builds the request that counts its
    /// prompt: a token budget of 0, which the engine answers after rendering and tokenizing
    /// the prompt, without running the model.
    pub(crate) fn into_job(self) -> Result<MessagesJob, ApiError> {
        let mut job = MessagesBody {
            model: self.model,
            messages: self.messages,
            max_tokens: 1,
            system: self.system,
            temperature: None,
            top_p: None,
            top_k: None,
            stop_sequences: None,
            stream: None,
            metadata: None,
            service_tier: None,
            tools: self.tools,
            tool_choice: self.tool_choice,
            other: self.other,
        }
        .into_job(|| 0)?;
        job.request.params.max_tokens = 0;
        Ok(job)
    }
}

/// A validated Messages request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MessagesJob {
    /// The model asked for.
    pub(crate) model: String,
    /// What to ask the runner.
    pub(crate) request: GenerateRequest,
    /// Whether to answer with an SSE stream.
    pub(crate) stream: bool,
    /// The tools and the choice (already applied to `request`).
    pub(crate) tools: Tools,
    /// Most calls an answer may make (`disable_parallel_tool_use` is 1).
    pub(crate) max_calls: usize,
}

/// A 400 for a field Canopy does not support, naming it.
fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::invalid_param(
        field,
        format!("{field}: '{field}' is not supported by this server: {why}."),
        "unsupported_parameter",
    )
}

fn invalid_type(field: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid_param(
        field,
        format!(
            "{field}: Invalid type for '{field}': expected {expected}, got {}.",
            json_type(got)
        ),
        "invalid_type",
    )
}

/// Whether a JSON value is `null`, `[]` or `{}`.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The `type` of an object, when it has a string one.
fn type_of(value: &Value) -> Option<&str> {
    value.get("type").and_then(Value::as_str)
}

/// Checks a field that is not one of the supported ones: refused by name (or accepted when
/// it asks for nothing), or unknown.
fn check_other(field: &str, value: &Value) -> Result<(), ApiError> {
    match field {
        "mcp_servers" if is_empty(value) => Ok(()),
        "mcp_servers" => Err(unsupported(field, "Canopy connects to no MCP servers")),
        "thinking" if value.is_null() || type_of(value) == Some("disabled") => Ok(()),
        "thinking" => Err(unsupported(
            field,
            "extended thinking needs a model that thinks; the models Canopy serves do not",
        )),
        // A prompt-caching hint (there is no prompt cache to steer), and ids for the
        // client's own bookkeeping: accepted with no effect.
        "cache_control" => Ok(()),
        "user_profile_id" | "workspace_id" if value.is_null() || value.is_string() => Ok(()),
        "speed" if value.is_null() || value.as_str() == Some("standard") => Ok(()),
        "speed" => Err(unsupported(field, "Canopy has one speed, 'standard'")),
        "container" | "context_management" | "output_format" | "output_config"
        | "inference_geo" | "diagnostics"
            if value.is_null() =>
        {
            Ok(())
        }
        "container" => Err(unsupported(
            field,
            "Canopy has no code-execution containers",
        )),
        "context_management" => Err(unsupported(
            field,
            "Canopy does not edit the context of a conversation",
        )),
        "inference_geo" => Err(unsupported(
            field,
            "Canopy runs where its cluster's nodes are and cannot pin a region",
        )),
        "diagnostics" => Err(unsupported(field, "Canopy reports no diagnostics")),
        "output_format" | "output_config" => Err(unsupported(
            field,
            "structured output needs constrained decoding, which Canopy's engines do not have \
             yet",
        )),
        _ => Err(ApiError::invalid_param(
            field,
            format!("{field}: Extra inputs are not permitted (unknown field '{field}')."),
            "unknown_parameter",
        )),
    }
}

/// One content block of a message.
#[derive(Debug)]
enum Block {
    /// A `text` block.
    Text(String),
    /// An assistant's `tool_use` block: a call it made.
    ToolUse(ToolCall),
    /// A user's `tool_result` block: a tool's answer to a call.
    ToolResult {
        /// The call answered.
        id: String,
        /// The answer's text.
        content: String,
    },
}

/// The text of a content block list (or a string): `text` blocks joined by newlines.
fn text_of(param: &str, content: Value) -> Result<String, ApiError> {
    blocks_of(param, content)?
        .into_iter()
        .enumerate()
        .map(|(i, block)| match block {
            Block::Text(text) => Ok(text),
            Block::ToolUse(_) | Block::ToolResult { .. } => Err(ApiError::invalid_param(
                format!("{param}[{i}]"),
                format!("{param}[{i}]: only 'text' blocks are allowed here."),
                "invalid_value",
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|texts| texts.join("\n"))
}

/// The blocks of a content block list (a string is one text block).
fn blocks_of(param: &str, content: Value) -> Result<Vec<Block>, ApiError> {
    match content {
        Value::String(text) => Ok(vec![Block::Text(text)]),
        Value::Array(blocks) => blocks
            .into_iter()
            .enumerate()
            .map(|(i, block)| content_block(&format!("{param}[{i}]"), block))
            .collect(),
        other => Err(invalid_type(
            param,
            "a string or an array of content blocks",
            &other,
        )),
    }
}

/// A required field of a block.
fn required(
    map: &mut serde_json::Map<String, Value>,
    param: &str,
    field: &str,
) -> Result<Value, ApiError> {
    map.remove(field).ok_or_else(|| {
        ApiError::invalid_param(
            format!("{param}.{field}"),
            format!("{param}.{field}: Field required."),
            "missing_required_parameter",
        )
    })
}

/// A required string field of a block.
fn required_string(
    map: &mut serde_json::Map<String, Value>,
    param: &str,
    field: &str,
) -> Result<String, ApiError> {
    match required(map, param, field)? {
        Value::String(s) => Ok(s),
        other => Err(invalid_type(
            &format!("{param}.{field}"),
            "a string",
            &other,
        )),
    }
}

/// One content block: `text`, `tool_use` or `tool_result` (which role may hold which is
/// checked by the message).
fn content_block(param: &str, block: Value) -> Result<Block, ApiError> {
    let Value::Object(mut map) = block else {
        return Err(invalid_type(param, "a content block object", &block));
    };
    let kind = match map.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => {
            return Err(ApiError::invalid_param(
                format!("{param}.type"),
                format!("{param}.type: Field required (a string naming the block's type)."),
                "missing_required_parameter",
            ));
        }
    };
    let why = match kind.as_str() {
        "text" | "tool_use" | "tool_result" => None,
        "image" | "document" => Some("the models Canopy serves read only text"),
        "server_tool_use"
        | "web_search_tool_result"
        | "web_fetch_tool_result"
        | "code_execution_tool_result"
        | "mcp_tool_use"
        | "mcp_tool_result"
        | "container_upload" => Some("Canopy runs no server tools"),
        "thinking" | "redacted_thinking" => Some("the models Canopy serves do not think"),
        "search_result" => Some("Canopy does not cite search results"),
        other => {
            return Err(ApiError::invalid_param(
                format!("{param}.type"),
                format!(
                    "{param}.type: Invalid content block type '{other}'; the supported types \
                     are 'text', 'tool_use' and 'tool_result'."
                ),
                "invalid_value",
            ));
        }
    };
    if let Some(why) = why {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "{param}: content blocks of type '{kind}' are not supported by this server: \
                 {why}."
            ),
            "unsupported_parameter",
        ));
    }
    let block = match kind.as_str() {
        "tool_use" => {
            let id = required_string(&mut map, param, "id")?;
            let name = required_string(&mut map, param, "name")?;
            let input = match required(&mut map, param, "input")? {
                input @ Value::Object(_) => input,
                other => return Err(invalid_type(&format!("{param}.input"), "an object", &other)),
            };
            Block::ToolUse(ToolCall {
                id,
                name,
                arguments: input.to_string(),
            })
        }
        "tool_result" => {
            let id = required_string(&mut map, param, "tool_use_id")?;
            let content = match map.remove("content") {
                None | Some(Value::Null) => String::new(),
                Some(content) => text_of(&format!("{param}.content"), content)?,
            };
            let content = match map.remove("is_error") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => content,
                Some(Value::Bool(true)) => format!("Error: {content}"),
                Some(other) => {
                    return Err(invalid_type(
                        &format!("{param}.is_error"),
                        "a boolean",
                        &other,
                    ));
                }
            };
            Block::ToolResult { id, content }
        }
        _ => Block::Text(required_string(&mut map, param, "text")?),
    };
    for (field, value) in map {
        let at = format!("{param}.{field}");
        match field.as_str() {
            // A prompt-caching hint: there is no prompt cache to steer.
            "cache_control" => {}
            "citations" if is_empty(&value) => {}
            "citations" => {
                return Err(unsupported(&at, "Canopy does not cite sources"));
            }
            // What the clients echo of a `tool_use` block they were given: a direct call.
            "caller" | "toolset_name" if kind == "tool_use" && value.is_null() => {}
            "caller" if kind == "tool_use" && type_of(&value) == Some("direct") => {}
            "caller" | "toolset_name" if kind == "tool_use" => {
                return Err(unsupported(&at, "Canopy runs no server tools or toolsets"));
            }
            _ => {
                return Err(ApiError::invalid_param(
                    at.clone(),
                    format!("{at}: Extra inputs are not permitted (unknown field '{at}')."),
                    "unknown_parameter",
                ));
            }
        }
    }
    Ok(block)
}

/// One message as turns: a user's tool results (one tool turn each) and then its text, or an
/// assistant's text with its calls.
fn message(index: usize, value: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let param = format!("messages[{index}]");
    let Value::Object(mut map) = value else {
        return Err(invalid_type(&param, "an object", &value));
    };
    let role = match map.remove("role") {
        Some(Value::String(role)) => role,
        None => {
            return Err(ApiError::invalid_param(
                format!("{param}.role"),
                format!("{param}.role: Field required."),
                "missing_required_parameter",
            ));
        }
        Some(other) => return Err(invalid_type(&format!("{param}.role"), "a string", &other)),
    };
    match role.as_str() {
        "user" | "assistant" => {}
        "system" => {
            return Err(ApiError::invalid_param(
                format!("{param}.role"),
                format!(
                    "{param}.role: Unexpected role 'system'. The Messages API takes the system \
                     prompt in the top-level 'system' parameter."
                ),
                "invalid_value",
            ));
        }
        other => {
            return Err(ApiError::invalid_param(
                format!("{param}.role"),
                format!(
                    "{param}.role: Invalid role '{other}'; the roles are 'user' and \
                     'assistant'."
                ),
                "invalid_value",
            ));
        }
    }
    let content = required(&mut map, &param, "content")?;
    let blocks = blocks_of(&format!("{param}.content"), content)?;
    if let Some(field) = map.keys().next() {
        let at = format!("{param}.{field}");
        return Err(ApiError::invalid_param(
            at.clone(),
            format!("{at}: Extra inputs are not permitted (unknown field '{at}')."),
            "unknown_parameter",
        ));
    }
    let mut turns = Vec::new();
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        let wrong_role = |kind: &str, owner: &str| {
            ApiError::invalid_param(
                format!("{param}.content[{i}]"),
                format!("{param}.content[{i}]: '{kind}' blocks belong in {owner} turns."),
                "invalid_value",
            )
        };
        match block {
            Block::Text(text) => texts.push(text),
            Block::ToolUse(call) if role == "assistant" => calls.push(call),
            Block::ToolUse(_) => return Err(wrong_role("tool_use", "assistant")),
            Block::ToolResult { id, content } if role == "user" => {
                let mut turn = ChatMessage::new("tool", content);
                turn.tool_call_id = Some(id);
                turns.push(turn);
            }
            Block::ToolResult { .. } => return Err(wrong_role("tool_result", "user")),
        }
    }
    if !texts.is_empty() || !calls.is_empty() || turns.is_empty() {
        let mut turn = ChatMessage::new(role, texts.join("\n"));
        turn.tool_calls = calls;
        turns.push(turn);
    }
    Ok(turns)
}

/// `messages` checked, consecutive turns of one role combined.
fn conversation(messages: Vec<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages: at least one message is required.",
            "invalid_value",
        ));
    }
    let count = messages.len();
    let mut turns: Vec<ChatMessage> = Vec::with_capacity(count);
    for (i, value) in messages.into_iter().enumerate() {
        for message in message(i, value)? {
            match turns.last_mut() {
                Some(last) if last.role == message.role && message.role != "tool" => {
                    if !message.content.is_empty() {
                        if !last.content.is_empty() {
                            last.content.push('\n');
                        }
                        last.content.push_str(&message.content);
                    }
                    last.tool_calls.extend(message.tool_calls);
                }
                _ => turns.push(message),
            }
        }
    }
    if turns.last().is_some_and(|m| m.role == "assistant") {
        return Err(unsupported(
            &format!("messages[{}]", count - 1),
            "a final assistant turn (prefilling the answer) cannot be continued: the model's \
             chat template closes the turn instead; end the conversation with a user turn",
        ));
    }
    Ok(turns)
}

/// `system`: absent, null, a string, or an array of text blocks.
fn system(system: Option<Value>) -> Result<Option<String>, ApiError> {
    let text = match system {
        None | Some(Value::Null) => return Ok(None),
        Some(value @ (Value::String(_) | Value::Array(_))) => text_of("system", value)?,
        Some(other) => {
            return Err(invalid_type(
                "system",
                "a string or an array of text blocks",
                &other,
            ));
        }
    };
    Ok((!text.is_empty()).then_some(text))
}

/// `tools` checked: custom tools only.
fn tools(value: Value) -> Result<Vec<ToolSpec>, ApiError> {
    let Value::Array(items) = value else {
        return Err(invalid_type("tools", "an array of tools", &value));
    };
    let specs = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let param = format!("tools[{i}]");
            let Value::Object(mut map) = item else {
                return Err(invalid_type(&param, "a tool object", &item));
            };
            match map.remove("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(kind)) if kind == "custom" => {}
                Some(other) => {
                    return Err(unsupported(
                        &format!("{param}.type"),
                        &format!(
                            "Anthropic's server tools ({other}) do not run here; only custom \
                             tools (a name and an input_schema) do"
                        ),
                    ));
                }
            }
            let name = required_string(&mut map, &param, "name")?;
            let description = match map.remove("description") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) => Some(d),
                Some(other) => {
                    return Err(invalid_type(
                        &format!("{param}.description"),
                        "a string",
                        &other,
                    ));
                }
            };
            let schema = required(&mut map, &param, "input_schema")?;
            if !schema.is_object() {
                return Err(invalid_type(
                    &format!("{param}.input_schema"),
                    "an object",
                    &schema,
                ));
            }
            for field in map.keys() {
                if field != "cache_control" {
                    let at = format!("{param}.{field}");
                    return Err(ApiError::invalid_param(
                        at.clone(),
                        format!("{at}: Extra inputs are not permitted (unknown field '{at}')."),
                        "unknown_parameter",
                    ));
                }
            }
            // Anthropic's messages begin with the field they blame.
            tool_spec(&param, &name, description, Some(schema)).map_err(|e| {
                let message = format!("{}: {}", e.param().unwrap_or(&param), e.message());
                e.with_message(message)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_tool_list("tools", &specs)?;
    Ok(specs)
}

/// `tool_choice` checked: `{"type": "auto" | "any" | "tool" | "none", "name",
/// "disable_parallel_tool_use"}`; with whether calls are limited to one.
fn tool_choice(value: Value) -> Result<(Option<ToolChoice>, bool), ApiError> {
    let Value::Object(mut map) = value else {
        return Err(invalid_type("tool_choice", "an object", &value));
    };
    let single = match map.remove("disable_parallel_tool_use") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(invalid_type(
                "tool_choice.disable_parallel_tool_use",
                "a boolean",
                &other,
            ));
        }
    };
    let kind = required_string(&mut map, "tool_choice", "type")?;
    let choice = match kind.as_str() {
        "auto" => ToolChoice::Auto,
        "any" => ToolChoice::Required,
        "none" => ToolChoice::None,
        "tool" => ToolChoice::Named(required_string(&mut map, "tool_choice", "name")?),
        other => {
            return Err(ApiError::invalid_param(
                "tool_choice.type",
                format!(
                    "tool_choice.type: Invalid value '{other}'; it must be 'auto', 'any', \
                     'tool' or 'none'."
                ),
                "invalid_value",
            ));
        }
    };
    if let Some(field) = map.keys().next() {
        let at = format!("tool_choice.{field}");
        return Err(ApiError::invalid_param(
            at.clone(),
            format!("{at}: Extra inputs are not permitted (unknown field '{at}')."),
            "unknown_parameter",
        ));
    }
    Ok((Some(choice), single))
}

impl MessagesBody {
    /// Checks the values and builds the job.
    pub(crate) fn into_job(
        self,
        default_seed: impl FnOnce() -> u64,
    ) -> Result<MessagesJob, ApiError> {
        if self.model.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "model",
                "model: 'model' must name a model (GET /v1/models lists them).",
                "invalid_value",
            ));
        }
        for (field, value) in &self.other {
            check_other(field, value)?;
        }
        match &self.metadata {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(other) => return Err(invalid_type("metadata", "an object", other)),
        }
        match &self.service_tier {
            None | Some(Value::Null) => {}
            Some(Value::String(tier)) if tier == "auto" || tier == "standard_only" => {}
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "service_tier",
                    format!(
                        "service_tier: Invalid value {other}; it must be 'auto' or \
                         'standard_only'."
                    ),
                    "invalid_value",
                ));
            }
        }
        let max_tokens = positive_u32("max_tokens", self.max_tokens)?;
        let temperature = in_range("temperature", self.temperature, 1.0, 1.0)?;
        let top_p = in_range("top_p", self.top_p, 1.0, 1.0)?;
        let top_k = match self.top_k {
            None | Some(0) => None,
            Some(k) => Some(positive_u32("top_k", k)?),
        };
        let stop = match self.stop_sequences {
            None | Some(Value::Null) => Vec::new(),
            Some(value @ Value::Array(_)) => {
                checked_stop("stop_sequences", Some(value), MAX_STOP_SEQUENCES)?
            }
            Some(other) => {
                return Err(invalid_type(
                    "stop_sequences",
                    "an array of strings",
                    &other,
                ));
            }
        };
        let mut turns = Vec::new();
        if let Some(system) = system(self.system)? {
            turns.push(ChatMessage::new("system", system));
        }
        turns.extend(conversation(self.messages)?);
        let specs = self.tools.map(tools).transpose()?.unwrap_or_default();
        let (choice, single) = match self.tool_choice {
            None | Some(Value::Null) => (None, false),
            Some(value) => tool_choice(value)?,
        };
        let tools = Tools::new(specs, choice, "tool_choice")?;
        let mut request = GenerateRequest {
            prompt: Prompt::Chat(turns),
            params: GenerateParams {
                max_tokens,
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                seed: default_seed(),
                stop,
                ..GenerateParams::default()
            },
            tools: Vec::new(),
        };
        tools.apply(&mut request, "output_format")?;
        Ok(MessagesJob {
            model: self.model,
            request,
            stream: self.stream.unwrap_or(false),
            tools,
            max_calls: if single { 1 } else { usize::MAX },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse;

    fn job(body: &str) -> Result<MessagesJob, ApiError> {
        parse::<MessagesBody>(body.as_bytes())?.into_job(|| 7)
    }

    fn chat(job: &MessagesJob) -> Vec<(String, String)> {
        let Prompt::Chat(messages) = &job.request.prompt else {
            panic!("a chat prompt");
        };
        messages
            .iter()
            .map(|m| (m.role.clone(), m.content.clone()))
            .collect()
    }

    fn pair(role: &str, content: &str) -> (String, String) {
        (role.to_string(), content.to_string())
    }

    #[test]
    fn defaults_are_anthropics() {
        let job =
            job(r#"{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#)
                .expect("valid");
        assert!(!job.stream);
        assert_eq!(chat(&job), vec![pair("user", "hi")]);
        let p = &job.request.params;
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_p, p.top_k),
            (9, 1.0, 1.0, None)
        );
        assert_eq!(p.seed, 7);
        assert!(p.stop.is_empty());
    }

    #[test]
    fn every_supported_field_is_carried() {
        let full = job(
            r#"{"model":"m","max_tokens":5,"stream":true,"temperature":0,"top_p":0.5,"top_k":3,
               "stop_sequences":["\n\nHuman:","","END"],"metadata":{"user_id":"u1"},
               "service_tier":"auto","tools":[],"tool_choice":{"type":"auto"},
               "thinking":{"type":"disabled"},"cache_control":{"type":"ephemeral"},"speed":"standard",
               "user_profile_id":"p","workspace_id":null,"inference_geo":null,
               "system":[{"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral"}},{"type":"text","text":"Be kind."}],
               "messages":[{"role":"user","content":"a"},{"role":"user","content":[{"type":"text","text":"b"},{"type":"text","text":"c","citations":null}]},
                           {"role":"assistant","content":"d"},{"role":"user","content":"e"}]}"#,
        )
        .expect("valid");
        assert!(full.stream);
        let p = &full.request.params;
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_p, p.top_k),
            (5, 0.0, 0.5, Some(3))
        );
        assert_eq!(p.stop, vec!["\n\nHuman:".to_string(), "END".to_string()]);
        assert_eq!(
            chat(&full),
            vec![
                pair("system", "Be brief.\nBe kind."),
                pair("user", "a\nb\nc"),
                pair("assistant", "d"),
                pair("user", "e"),
            ],
            "the system turn first, consecutive user turns combined"
        );
        let plain = job(r#"{"model":"m","max_tokens":1,"system":"S","messages":[{"role":"user","content":"x"}]}"#)
            .expect("valid");
        assert_eq!(chat(&plain)[0], pair("system", "S"));
        let empty = job(r#"{"model":"m","max_tokens":1,"system":"","messages":[{"role":"user","content":"x"}]}"#)
            .expect("valid");
        assert_eq!(chat(&empty), vec![pair("user", "x")]);
    }

    #[test]
    fn tools_calls_and_results_are_carried() {
        let job = job(r#"{"model":"m","max_tokens":9,
               "tools":[{"name":"add","description":"Adds.","input_schema":{"type":"object"},
                         "cache_control":{"type":"ephemeral"}}],
               "tool_choice":{"type":"any","disable_parallel_tool_use":true},
               "messages":[{"role":"user","content":"1+2?"},
                 {"role":"assistant","content":[{"type":"text","text":"Adding."},
                   {"type":"tool_use","id":"toolu_1","name":"add","input":{"a":1}}]},
                 {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1",
                   "content":[{"type":"text","text":"3"}]},{"type":"text","text":"And?"}]}]}"#)
        .expect("valid");
        assert_eq!(job.tools.choice, ToolChoice::Required);
        assert_eq!(job.max_calls, 1);
        assert!(matches!(
            job.request.params.constraint,
            Some(canopy_proto::Constraint::ToolCall(ref t)) if t[0].name == "add"
        ));
        let Prompt::Chat(turns) = &job.request.prompt else {
            panic!("a chat prompt")
        };
        let roles: Vec<_> = turns.iter().map(|t| t.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "user"]);
        assert_eq!(turns[1].content, "Adding.");
        assert_eq!(turns[1].tool_calls[0].id, "toolu_1");
        assert_eq!(turns[1].tool_calls[0].arguments, r#"{"a":1}"#);
        assert_eq!(turns[2].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(turns[2].content, "3");
        assert_eq!(turns[3].content, "And?");
    }

    #[test]
    fn refused_and_bad_fields_are_named() {
        let user = r#""messages":[{"role":"user","content":"x"}]"#;
        let cases = [
            (format!(r#"{{"model":"m",{user}}}"#), "max_tokens"),
            (format!(r#"{{"model":"m","max_tokens":0,{user}}}"#), "max_tokens"),
            (format!(r#"{{"model":"","max_tokens":1,{user}}}"#), "model"),
            (format!(r#"{{"max_tokens":1,{user}}}"#), "model"),
            (r#"{"model":"m","max_tokens":1,"messages":[]}"#.to_string(), "messages"),
            (format!(r#"{{"model":"m","max_tokens":1,"temperature":1.5,{user}}}"#), "temperature"),
            (format!(r#"{{"model":"m","max_tokens":1,"top_p":-0.1,{user}}}"#), "top_p"),
            (format!(r#"{{"model":"m","max_tokens":1,"top_k":-1,{user}}}"#), "top_k"),
            (format!(r#"{{"model":"m","max_tokens":1,"stop_sequences":"x",{user}}}"#), "stop_sequences"),
            (format!(r#"{{"model":"m","max_tokens":1,"stop_sequences":[1],{user}}}"#), "stop_sequences"),
            (format!(r#"{{"model":"m","max_tokens":1,"metadata":"x",{user}}}"#), "metadata"),
            (format!(r#"{{"model":"m","max_tokens":1,"service_tier":"priority",{user}}}"#), "service_tier"),
            (format!(r#"{{"model":"m","max_tokens":1,"tools":[{{"type":"bash_20250124","name":"bash"}}],{user}}}"#), "tools[0].type"),
            (format!(r#"{{"model":"m","max_tokens":1,"tools":[{{"name":"t"}}],{user}}}"#), "tools[0].input_schema"),
            (format!(r#"{{"model":"m","max_tokens":1,"tools":[{{"name":"a b","input_schema":{{}}}}],{user}}}"#), "tools[0].name"),
            (format!(r#"{{"model":"m","max_tokens":1,"tools":[{{"name":"t","input_schema":{{}}}}],"tool_choice":{{"type":"tool","name":"u"}},{user}}}"#), "tool_choice"),
            (format!(r#"{{"model":"m","max_tokens":1,"tools":[{{"name":"t","input_schema":{{}}}}],"tool_choice":{{"type":"some"}},{user}}}"#), "tool_choice.type"),
            (format!(r#"{{"model":"m","max_tokens":1,"tool_choice":{{"type":"any"}},{user}}}"#), "tool_choice"),
            (format!(r#"{{"model":"m","max_tokens":1,"thinking":{{"type":"enabled","budget_tokens":1024}},{user}}}"#), "thinking"),
            (format!(r#"{{"model":"m","max_tokens":1,"mcp_servers":[{{"url":"x"}}],{user}}}"#), "mcp_servers"),
            (format!(r#"{{"model":"m","max_tokens":1,"container":"c1",{user}}}"#), "container"),
            (format!(r#"{{"model":"m","max_tokens":1,"mystery":1,{user}}}"#), "mystery"),
            (format!(r#"{{"model":"m","max_tokens":1,"speed":"fast",{user}}}"#), "speed"),
            (format!(r#"{{"model":"m","max_tokens":1,"inference_geo":"us",{user}}}"#), "inference_geo"),
            (format!(r#"{{"model":"m","max_tokens":1,"system":3,{user}}}"#), "system"),
            (r#"{"model":"m","max_tokens":1,"system":[{"type":"image"}],"messages":[{"role":"user","content":"x"}]}"#.to_string(), "system[0]"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"system","content":"x"}]}"#.to_string(), "messages[0].role"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"tool","content":"x"}]}"#.to_string(), "messages[0].role"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"content":"x"}]}"#.to_string(), "messages[0].role"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user"}]}"#.to_string(), "messages[0].content"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":3}]}"#.to_string(), "messages[0].content"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x","name":"n"}]}"#.to_string(), "messages[0].name"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image","source":{}}]}]}"#.to_string(), "messages[0].content[1]"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_use","id":"t","name":"n","input":{}}]}]}"#.to_string(), "messages[0].content[0]"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","content":"r"}]}]}"#.to_string(), "messages[0].content[0].tool_use_id"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#.to_string(), "messages[0].content[0]"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n","input":[]}]},{"role":"user","content":"y"}]}"#.to_string(), "messages[1].content[0].input"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"sparkle"}]}]}"#.to_string(), "messages[0].content[0].type"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"text":"a"}]}]}"#.to_string(), "messages[0].content[0].type"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text"}]}]}"#.to_string(), "messages[0].content[0].text"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":"a","extra":1}]}]}"#.to_string(), "messages[0].content[0].extra"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":"a","citations":[{"type":"x"}]}]}]}"#.to_string(), "messages[0].content[0].citations"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"The answer is"}]}"#.to_string(), "messages[1]"),
        ];
        for (body, param) in cases {
            let err = job(&body).expect_err(&body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.param(), Some(param), "{body}: {err}");
            assert!(err.message().contains(param), "the message names it: {err}");
        }
    }
}
