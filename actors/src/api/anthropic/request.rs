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
//!   `text` blocks are joined by newlines; `image`, `document`, `tool_use`, `tool_result`,
//!   `thinking`, `redacted_thinking`, `search_result` and the server tools' blocks are a 400
//!   naming the block (the models take only text; tools need constrained decoding, which
//!   the engines do not have yet). A block's `cache_control` is accepted with no effect
//!   (there is no prompt cache to steer); non-empty `citations` are refused.
//!   Consecutive turns of the same role are combined into one (joined by a newline), as
//!   Anthropic combines them. A conversation that ends with an `assistant` turn (prefilling
//!   the answer) is a 400: the chat template would close that turn instead of continuing
//!   it, so the answer would not continue the prefill as Anthropic's does.
//! - accepted with no effect: `metadata` (an object, e.g. `user_id`), `service_tier` `auto`
//!   or `standard_only` (there is one tier), `speed` `standard`, a top-level
//!   `cache_control`, `user_profile_id` and `workspace_id` (the newer clients' fields).
//! - refused, naming the field: non-empty `tools`, `tool_choice` other than `auto` or `none`,
//!   `thinking` other than `disabled`, non-empty `mcp_servers`, `container`,
//!   `context_management`, `output_format`, `output_config`, `inference_geo`, `diagnostics`,
//!   `speed` `fast`; any other field is an unknown
//!   field, also a 400 naming it.

use std::collections::BTreeMap;

use canopy_proto::{ChatMessage, GenerateParams, GenerateRequest, Prompt};
use serde::Deserialize;
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::request::{checked_stop, in_range, json_type, positive_u32};

/// Most stop sequences a request may carry.
const MAX_STOP_SEQUENCES: usize = 16;

/// The body of `POST /v1/messages`.
#[derive(Debug, Clone, Deserialize)]
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
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
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
    let tools = "tool use needs constrained decoding, which Canopy's engines do not have yet";
    match field {
        "tools" | "mcp_servers" if is_empty(value) => Ok(()),
        "tools" | "mcp_servers" => Err(unsupported(field, tools)),
        "tool_choice"
            if value.is_null() || matches!(type_of(value), Some("auto") | Some("none")) =>
        {
            Ok(())
        }
        "tool_choice" => Err(unsupported(field, tools)),
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

/// The text of a content block list (or a string): `text` blocks joined by newlines.
fn text_of(param: &str, content: Value) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text),
        Value::Array(blocks) => Ok(blocks
            .into_iter()
            .enumerate()
            .map(|(i, block)| text_block(&format!("{param}[{i}]"), block))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n")),
        other => Err(invalid_type(
            param,
            "a string or an array of content blocks",
            &other,
        )),
    }
}

/// The text of one content block, which must be a `text` block.
fn text_block(param: &str, block: Value) -> Result<String, ApiError> {
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
        "text" => None,
        "image" | "document" => Some("the models Canopy serves read only text"),
        "tool_use"
        | "tool_result"
        | "server_tool_use"
        | "web_search_tool_result"
        | "web_fetch_tool_result"
        | "code_execution_tool_result"
        | "mcp_tool_use"
        | "mcp_tool_result"
        | "container_upload" => {
            Some("tool use needs constrained decoding, which Canopy's engines do not have yet")
        }
        "thinking" | "redacted_thinking" => Some("the models Canopy serves do not think"),
        "search_result" => Some("Canopy does not cite search results"),
        other => {
            return Err(ApiError::invalid_param(
                format!("{param}.type"),
                format!(
                    "{param}.type: Invalid content block type '{other}'; only 'text' blocks \
                     are supported."
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
    let text = match map.remove("text") {
        Some(Value::String(text)) => text,
        None => {
            return Err(ApiError::invalid_param(
                format!("{param}.text"),
                format!("{param}.text: Field required."),
                "missing_required_parameter",
            ));
        }
        Some(other) => return Err(invalid_type(&format!("{param}.text"), "a string", &other)),
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
            _ => {
                return Err(ApiError::invalid_param(
                    at.clone(),
                    format!("{at}: Extra inputs are not permitted (unknown field '{at}')."),
                    "unknown_parameter",
                ));
            }
        }
    }
    Ok(text)
}

/// One message: its role and text.
fn message(index: usize, value: Value) -> Result<ChatMessage, ApiError> {
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
    let content = match map.remove("content") {
        Some(content) => text_of(&format!("{param}.content"), content)?,
        None => {
            return Err(ApiError::invalid_param(
                format!("{param}.content"),
                format!("{param}.content: Field required."),
                "missing_required_parameter",
            ));
        }
    };
    if let Some(field) = map.keys().next() {
        let at = format!("{param}.{field}");
        return Err(ApiError::invalid_param(
            at.clone(),
            format!("{at}: Extra inputs are not permitted (unknown field '{at}')."),
            "unknown_parameter",
        ));
    }
    Ok(ChatMessage { role, content })
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
        let message = message(i, value)?;
        match turns.last_mut() {
            Some(last) if last.role == message.role => {
                last.content.push('\n');
                last.content.push_str(&message.content);
            }
            _ => turns.push(message),
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
            turns.push(ChatMessage {
                role: "system".to_string(),
                content: system,
            });
        }
        turns.extend(conversation(self.messages)?);
        Ok(MessagesJob {
            model: self.model,
            request: GenerateRequest {
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
            },
            stream: self.stream.unwrap_or(false),
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
            (format!(r#"{{"model":"m","max_tokens":1,"tools":[{{"name":"t","input_schema":{{}}}}],{user}}}"#), "tools"),
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
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"r"}]}]}"#.to_string(), "messages[0].content[0]"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#.to_string(), "messages[0].content[0]"),
            (r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n","input":{}}]}]}"#.to_string(), "messages[1].content[0]"),
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
