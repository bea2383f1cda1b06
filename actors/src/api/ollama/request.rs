//! The bodies of Ollama's `POST /api/chat`, `POST /api/generate` and `POST /api/show`, and
//! their validation into engine requests, with Ollama's field names.
//!
//! Decisions (see the module `ollama` for the API as a whole):
//!
//! - `stream` defaults to `true`, as in Ollama.
//! - `options`: `num_predict` (at least 1; `-1` and `-2` mean "until the context is full"),
//!   `temperature` (0 or more; default 0.8), `top_p` (0 to 1; default 0.9), `top_k` (0
//!   disables; default 40), `seed` (default random), `stop` (a string or strings),
//!   `presence_penalty` and `frequency_penalty` (-2 to 2, over the generated tokens). These
//!   defaults are Ollama's; without `num_predict` the node's `default_max_tokens` applies
//!   (Ollama's default is unlimited). Any other option is a 400 naming it
//!   (`options.num_ctx`, ...): the engine cannot honour it, and Ollama itself only warns.
//! - `format`: `"json"` (any JSON object) or a JSON schema object, through the engine's
//!   grammar-constrained decoding, so the output always parses (and validates); absent,
//!   `null` or `""` is free text; anything else is a 400 naming `format`.
//! - `tools` (`[{"type": "function", "function": {name, description, parameters}}]`, as
//!   OpenAI's): the model decides whether to call them (Ollama has no `tool_choice`); calls
//!   come in `message.tool_calls` (`[{"function": {"index", "name", "arguments"}}]`, the
//!   arguments an object), streamed as one object before the final one. An assistant
//!   message's `tool_calls` (arguments an object or JSON text) and `tool` messages (with
//!   `tool_name`) carry a round trip back.
//! - `logprobs: true` reports each generated token's log-probability as a top-level
//!   `logprobs` list of each object (`token`, `logprob`, `bytes`, `top_logprobs`), with
//!   `top_logprobs` (0 to 20, only with `logprobs`) alternatives per position: from the
//!   distribution the sampler drew from, as on the OpenAI routes.
//! - Refused with a 400 naming the field: `images` (vision), `think: true`, and on
//!   `/api/generate` `suffix`, `template`, `context`, and the image-generation fields
//!   `width`, `height`, `steps`.
//! - `keep_alive` is accepted and has no effect: a placed instance stays loaded until it is
//!   deleted, whatever the client asks.
//! - `/api/generate`: the prompt (with `system` before it) is rendered with the model's chat
//!   template, as Ollama renders it with its template; `raw: true` sends the prompt as raw
//!   text instead (then `system` is a 400, since raw text has nowhere to put it). An absent
//!   or empty `prompt` (and `/api/chat` with no messages) only checks that the model is
//!   there: Ollama's way of loading a model, answered with `done_reason: "load"`.
//! - message roles: `system`, `user`, `assistant`, `tool`.
//! - a model named `NAME:latest` is served by the model `NAME` when no model has the longer
//!   name (Ollama's tools add the tag).
//! - unknown fields are a 400 naming them, at the top level and in messages.

use std::collections::BTreeMap;

use canopy_proto::{
    ChatMessage, Constraint, GenerateParams, GenerateRequest as EngineRequest, Prompt, ToolCall,
    ToolSpec,
};
use serde::Deserialize;
use serde_json::Value;

use crate::api::config::ApiConfig;
use crate::api::error::ApiError;
use crate::api::request::{checked_stop, json_type, logprobs, penalty, positive_u32};
use crate::api::tools::{Tools, check_tool_list, tool_spec};

/// Ollama's default `temperature`.
pub(crate) const DEFAULT_TEMPERATURE: f64 = 0.8;
/// Ollama's default `top_p`.
pub(crate) const DEFAULT_TOP_P: f64 = 0.9;
/// Ollama's default `top_k`.
pub(crate) const DEFAULT_TOP_K: u32 = 40;
/// Most stop sequences a request may carry.
const MAX_STOP: usize = 16;

/// The fields `/api/chat` and `/api/generate` share.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct Common {
    model: String,
    stream: Option<bool>,
    options: Option<Value>,
    format: Option<Value>,
    #[allow(dead_code, reason = "accepted with no effect: instances stay loaded")]
    keep_alive: Option<Value>,
    think: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

/// The body of `POST /api/chat`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct ChatBody {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    messages: Vec<Value>,
    tools: Option<Value>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// The body of `POST /api/generate`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct GenerateBody {
    #[serde(flatten)]
    common: Common,
    prompt: Option<String>,
    system: Option<String>,
    raw: Option<bool>,
    suffix: Option<String>,
    template: Option<String>,
    context: Option<Value>,
    images: Option<Value>,
    width: Option<Value>,
    height: Option<Value>,
    steps: Option<Value>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// The body of `POST /api/show`: `model` (or the older `name`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct ShowBody {
    model: Option<String>,
    name: Option<String>,
    verbose: Option<bool>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// What a validated `/api/chat` or `/api/generate` asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OllamaJob {
    /// The model asked for.
    pub(crate) model: String,
    /// What to ask the runner; `None` for a request that only loads the model.
    pub(crate) request: Option<EngineRequest>,
    /// Whether to answer with an NDJSON stream.
    pub(crate) stream: bool,
    /// The tools (already applied to `request`); none for `/api/generate`.
    pub(crate) tools: Tools,
}

/// A 400 for a field Canopy does not support, naming it.
pub(crate) fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::invalid_param(
        field,
        format!("'{field}' is not supported by this server: {why}."),
        "unsupported_parameter",
    )
}

fn refuse_unknown(unknown: &BTreeMap<String, Value>, prefix: &str) -> Result<(), ApiError> {
    match unknown.keys().next() {
        Some(field) => Err(ApiError::invalid_param(
            format!("{prefix}{field}"),
            format!("Unknown field '{prefix}{field}'."),
            "unknown_parameter",
        )),
        None => Ok(()),
    }
}

/// Whether an optional JSON value is absent, `null`, `false`, `""`, `[]` or `{}`.
fn is_empty(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Number(_)) | Some(Value::Bool(true)) => false,
    }
}

impl Common {
    /// Checks the shared fields; the sampling parameters from `options`.
    fn check(&self, config: &ApiConfig) -> Result<GenerateParams, ApiError> {
        if self.model.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "model",
                "'model' must name a model (GET /api/tags lists them).",
                "invalid_value",
            ));
        }
        let constraint = match &self.format {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s == "json" => Some(Constraint::JsonObject),
            Some(schema @ Value::Object(_)) => Some(Constraint::JsonSchema(schema.to_string())),
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "format",
                    format!(
                        "Invalid 'format': expected \"json\" or a JSON schema object, got {}.",
                        json_type(other)
                    ),
                    "invalid_value",
                ));
            }
        };
        if !is_empty(self.think.as_ref()) {
            return Err(unsupported(
                "think",
                "the models Canopy serves do not think",
            ));
        }
        let logprobs = logprobs(self.logprobs, self.top_logprobs)?;
        let params = options(self.options.clone(), config)?;
        Ok(GenerateParams {
            constraint,
            logprobs,
            ..params
        })
    }
}

/// `options` checked into the engine's parameters.
fn options(options: Option<Value>, config: &ApiConfig) -> Result<GenerateParams, ApiError> {
    let map = match options {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "options",
                format!(
                    "Invalid type for 'options': expected an object, got {}.",
                    json_type(&other)
                ),
                "invalid_type",
            ));
        }
    };
    let mut params = GenerateParams {
        max_tokens: config.default_max_tokens,
        temperature: DEFAULT_TEMPERATURE as f32,
        top_p: DEFAULT_TOP_P as f32,
        top_k: Some(DEFAULT_TOP_K),
        seed: rand::random::<u64>(),
        stop: Vec::new(),
        ..GenerateParams::default()
    };
    for (key, value) in map {
        let name = format!("options.{key}");
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "num_predict" => {
                params.max_tokens = match integer(&name, &value)? {
                    // Ollama: -1 is "no limit", -2 "fill the context"; both end when the
                    // context is full (the engine caps every task at its room).
                    -1 | -2 => u32::MAX,
                    n => positive_u32(&name, n)?,
                }
            }
            "temperature" => params.temperature = non_negative(&name, &value, f64::MAX)? as f32,
            "top_p" => params.top_p = non_negative(&name, &value, 1.0)? as f32,
            "top_k" => {
                params.top_k = match integer(&name, &value)? {
                    0 => None,
                    k => Some(positive_u32(&name, k)?),
                }
            }
            // Bit-for-bit: distinct seeds stay distinct.
            "seed" => params.seed = integer(&name, &value)? as u64,
            "stop" => params.stop = checked_stop(&name, Some(value), MAX_STOP)?,
            "presence_penalty" => params.presence_penalty = penalty(&name, number(&name, &value)?)?,
            "frequency_penalty" => {
                params.frequency_penalty = penalty(&name, number(&name, &value)?)?
            }
            _ => {
                return Err(unsupported(
                    &name,
                    "Canopy honours only num_predict, temperature, top_p, top_k, seed, stop, \
                     presence_penalty and frequency_penalty",
                ));
            }
        }
    }
    Ok(params)
}

fn number(name: &str, value: &Value) -> Result<Option<f64>, ApiError> {
    value.as_f64().map(Some).ok_or_else(|| {
        ApiError::invalid_param(
            name,
            format!(
                "Invalid type for '{name}': expected a number, got {}.",
                json_type(value)
            ),
            "invalid_type",
        )
    })
}

fn integer(name: &str, value: &Value) -> Result<i64, ApiError> {
    value.as_i64().ok_or_else(|| {
        ApiError::invalid_param(
            name,
            format!(
                "Invalid type for '{name}': expected an integer, got {}.",
                json_type(value)
            ),
            "invalid_type",
        )
    })
}

fn non_negative(name: &str, value: &Value, max: f64) -> Result<f64, ApiError> {
    match value.as_f64() {
        Some(v) if v.is_finite() && (0.0..=max).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid_param(
            name,
            format!("Invalid value for '{name}': {v}. It must be between 0 and {max}."),
            "invalid_value",
        )),
        None => Err(ApiError::invalid_param(
            name,
            format!(
                "Invalid type for '{name}': expected a number, got {}.",
                json_type(value)
            ),
            "invalid_type",
        )),
    }
}

/// One `/api/chat` message.
fn message(index: usize, value: Value) -> Result<ChatMessage, ApiError> {
    let at = |field: &str| format!("messages[{index}].{field}");
    let Value::Object(mut map) = value else {
        return Err(ApiError::invalid_param(
            format!("messages[{index}]"),
            format!(
                "Invalid type for 'messages[{index}]': expected an object, got {}.",
                json_type(&value)
            ),
            "invalid_type",
        ));
    };
    let role = match map.remove("role") {
        Some(Value::String(role)) => role,
        _ => {
            return Err(ApiError::invalid_param(
                at("role"),
                format!("'{}' must be a string.", at("role")),
                "missing_required_parameter",
            ));
        }
    };
    let role = match role.as_str() {
        "system" | "user" | "assistant" | "tool" => role,
        other => {
            return Err(ApiError::invalid_param(
                at("role"),
                format!(
                    "Invalid value for '{}': '{other}'. Supported roles are 'system', 'user', \
                     'assistant' and 'tool'.",
                    at("role")
                ),
                "invalid_value",
            ));
        }
    };
    let content = match map.remove("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        Some(other) => {
            return Err(ApiError::invalid_param(
                at("content"),
                format!(
                    "Invalid type for '{}': expected a string, got {}.",
                    at("content"),
                    json_type(&other)
                ),
                "invalid_type",
            ));
        }
    };
    let mut turn = ChatMessage::new(role, content);
    for (field, value) in map {
        let why = match field.as_str() {
            "tool_calls" if turn.role == "assistant" => {
                turn.tool_calls = message_calls(index, value)?;
                continue;
            }
            "tool_name" if turn.role == "tool" => {
                match value {
                    Value::Null => {}
                    Value::String(name) => turn.name = Some(name),
                    other => {
                        return Err(ApiError::invalid_param(
                            at(&field),
                            format!(
                                "Invalid type for '{}': expected a string, got {}.",
                                at(&field),
                                json_type(&other)
                            ),
                            "invalid_type",
                        ));
                    }
                }
                continue;
            }
            "images" => "the models Canopy serves take no images",
            "tool_calls" => "only assistant messages carry calls",
            "tool_name" => "only tool messages name a tool",
            "thinking" => "the models Canopy serves do not think",
            _ => {
                return Err(ApiError::invalid_param(
                    at(&field),
                    format!("Unknown field '{}'.", at(&field)),
                    "unknown_parameter",
                ));
            }
        };
        if !is_empty(Some(&value)) {
            return Err(unsupported(&at(&field), why));
        }
    }
    Ok(turn)
}

/// An assistant message's `tool_calls`: `[{"function": {"name", "arguments"}, "id"?}]`, the
/// arguments an object (Ollama's) or JSON text (OpenAI's).
fn message_calls(index: usize, value: Value) -> Result<Vec<ToolCall>, ApiError> {
    let param = format!("messages[{index}].tool_calls");
    let invalid = |at: String, what: &str| {
        ApiError::invalid_param(
            at.clone(),
            format!("Invalid '{at}': expected {what}."),
            "invalid_value",
        )
    };
    let calls = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(calls) => calls,
        _ => return Err(invalid(param, "an array of calls")),
    };
    calls
        .into_iter()
        .enumerate()
        .map(|(c, call)| {
            let at = format!("{param}[{c}]");
            let function = call
                .get("function")
                .ok_or_else(|| invalid(format!("{at}.function"), "an object with 'name'"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{at}.function.name"), "a string"))?;
            let arguments = match function.get("arguments") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(Value::String(text)) => text.clone(),
                Some(args @ Value::Object(_)) => args.to_string(),
                Some(_) => {
                    return Err(invalid(
                        format!("{at}.function.arguments"),
                        "an object (or JSON text)",
                    ));
                }
            };
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| format!("call_{index}_{c}"), str::to_string);
            Ok(ToolCall {
                id,
                name: name.to_string(),
                arguments,
            })
        })
        .collect()
}

/// `/api/chat`'s `tools`, as OpenAI's: `[{"type": "function", "function": {...}}]`.
fn chat_tools(value: Option<Value>) -> Result<Vec<ToolSpec>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "tools",
                format!(
                    "Invalid type for 'tools': expected an array of tools, got {}.",
                    json_type(&other)
                ),
                "invalid_type",
            ));
        }
    };
    let specs = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let param = format!("tools[{i}]");
            match item.get("type").and_then(Value::as_str) {
                None | Some("function") => {}
                Some(other) => {
                    return Err(ApiError::invalid_param(
                        format!("{param}.type"),
                        format!(
                            "Invalid value for '{param}.type': '{other}'. Only 'function' tools \
                             are supported."
                        ),
                        "invalid_value",
                    ));
                }
            }
            let function = item.get("function").ok_or_else(|| {
                ApiError::invalid_param(
                    format!("{param}.function"),
                    format!("Missing required parameter: '{param}.function'."),
                    "missing_required_parameter",
                )
            })?;
            let name = function.get("name").and_then(Value::as_str).unwrap_or("");
            let description = function
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string);
            tool_spec(
                &format!("{param}.function"),
                name,
                description,
                function.get("parameters").cloned(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_tool_list("tools", &specs)?;
    Ok(specs)
}

impl ChatBody {
    /// Checks the values and builds the job.
    pub(crate) fn into_job(self, config: &ApiConfig) -> Result<OllamaJob, ApiError> {
        refuse_unknown(&self.unknown, "")?;
        let params = self.common.check(config)?;
        let tools = Tools::new(chat_tools(self.tools)?, None, "tools")?;
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let mut request = (!messages.is_empty()).then_some(EngineRequest {
            prompt: Prompt::Chat(messages),
            params,
            tools: Vec::new(),
        });
        if let Some(request) = &mut request {
            tools.apply(request, "format")?;
        }
        Ok(OllamaJob {
            model: self.common.model,
            request,
            stream: self.common.stream.unwrap_or(true),
            tools,
        })
    }
}

impl GenerateBody {
    /// Checks the values and builds the job.
    pub(crate) fn into_job(self, config: &ApiConfig) -> Result<OllamaJob, ApiError> {
        refuse_unknown(&self.unknown, "")?;
        let params = self.common.check(config)?;
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported(
                "suffix",
                "inserting text before a suffix needs a fill-in-the-middle model",
            ));
        }
        if self.template.as_deref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported(
                "template",
                "prompts are rendered with the model's own chat template (or sent as they \
                 are with raw: true)",
            ));
        }
        if !is_empty(self.context.as_ref()) {
            return Err(unsupported(
                "context",
                "send the conversation so far with /api/chat instead",
            ));
        }
        if !is_empty(self.images.as_ref()) {
            return Err(unsupported(
                "images",
                "the models Canopy serves take no images",
            ));
        }
        for (field, value) in [
            ("width", &self.width),
            ("height", &self.height),
            ("steps", &self.steps),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(unsupported(field, "Canopy generates text, not images"));
            }
        }
        let raw = self.raw.unwrap_or(false);
        let system = self.system.filter(|s| !s.is_empty());
        if raw && system.is_some() {
            return Err(ApiError::invalid_param(
                "system",
                "'system' cannot be used with 'raw': true (a raw prompt is sent to the model \
                 as it is, with no template to place a system prompt in).",
                "invalid_value",
            ));
        }
        let prompt = self.prompt.unwrap_or_default();
        let request = (!prompt.is_empty()).then(|| {
            let prompt = if raw {
                Prompt::Text(prompt)
            } else {
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", prompt));
                Prompt::Chat(messages)
            };
            EngineRequest {
                prompt,
                params,
                tools: Vec::new(),
            }
        });
        Ok(OllamaJob {
            model: self.common.model,
            request,
            stream: self.common.stream.unwrap_or(true),
            tools: Tools::default(),
        })
    }
}

impl ShowBody {
    /// The model asked for.
    pub(crate) fn into_model(self) -> Result<String, ApiError> {
        refuse_unknown(&self.unknown, "")?;
        if self.verbose == Some(true) {
            return Err(unsupported(
                "verbose",
                "model_info never holds the file's arrays (the vocabulary); leave verbose out",
            ));
        }
        match self.model.or(self.name) {
            Some(model) if !model.trim().is_empty() => Ok(model),
            _ => Err(ApiError::invalid_param(
                "model",
                "Missing required parameter: 'model'.",
                "missing_required_parameter",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse;

    fn chat(body: &str) -> Result<OllamaJob, ApiError> {
        parse::<ChatBody>(body.as_bytes())?.into_job(&ApiConfig::default())
    }

    fn generate(body: &str) -> Result<OllamaJob, ApiError> {
        parse::<GenerateBody>(body.as_bytes())?.into_job(&ApiConfig::default())
    }

    #[test]
    fn chat_defaults_are_ollamas() {
        let job = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[]}"#)
            .expect("valid");
        assert!(job.stream, "Ollama streams by default");
        let request = job.request.expect("a generation");
        assert_eq!(
            request.prompt,
            Prompt::Chat(vec![ChatMessage::new("user", "hi")])
        );
        let p = request.params;
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.8, 0.9, Some(40)));
        assert_eq!(p.max_tokens, ApiConfig::default().default_max_tokens);
    }

    #[test]
    fn options_are_carried() {
        let job = chat(
            r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u","images":[]}],
               "stream":false,"keep_alive":"5m","format":"","think":false,
               "options":{"num_predict":7,"temperature":0,"top_p":0.5,"top_k":0,"seed":-1,"stop":["\n","END"]}}"#,
        )
        .expect("valid");
        assert!(!job.stream);
        let p = job.request.expect("a generation").params;
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_p, p.top_k),
            (7, 0.0, 0.5, None)
        );
        assert_eq!(p.seed, u64::MAX);
        assert_eq!(p.stop, vec!["\n".to_string(), "END".to_string()]);
        let unlimited = chat(r#"{"model":"m","messages":[{"role":"user","content":"u"}],"options":{"num_predict":-1}}"#)
            .expect("valid");
        assert_eq!(
            unlimited.request.expect("generation").params.max_tokens,
            u32::MAX
        );
    }

    #[test]
    fn format_is_a_constraint() {
        let constraint = |body: &str| {
            chat(body)
                .expect(body)
                .request
                .expect("a generation")
                .params
                .constraint
        };
        let user = r#""messages":[{"role":"user","content":"u"}]"#;
        assert_eq!(constraint(&format!(r#"{{"model":"m",{user}}}"#)), None);
        assert_eq!(
            constraint(&format!(r#"{{"model":"m",{user},"format":"json"}}"#)),
            Some(Constraint::JsonObject)
        );
        let Some(Constraint::JsonSchema(schema)) = constraint(&format!(
            r#"{{"model":"m",{user},"format":{{"type":"object","required":["a"]}}}}"#
        )) else {
            panic!("a schema");
        };
        let schema: Value = serde_json::from_str(&schema).expect("JSON");
        assert_eq!(schema["required"][0], "a");
        let raw = generate(r#"{"model":"m","prompt":"x","format":"json"}"#).expect("valid");
        assert_eq!(
            raw.request.expect("a generation").params.constraint,
            Some(Constraint::JsonObject)
        );
    }

    #[test]
    fn generate_renders_system_and_prompt_as_chat_or_sends_raw_text() {
        let job = generate(r#"{"model":"m","prompt":"Why?","system":"Be brief."}"#).expect("valid");
        let Some(EngineRequest {
            prompt: Prompt::Chat(messages),
            ..
        }) = job.request
        else {
            panic!("a chat prompt");
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].content, "Why?");
        let raw = generate(r#"{"model":"m","prompt":"Once upon","raw":true}"#).expect("valid");
        assert_eq!(
            raw.request.expect("a generation").prompt,
            Prompt::Text("Once upon".into())
        );
        let load = generate(r#"{"model":"m"}"#).expect("valid");
        assert_eq!(load.request, None, "no prompt: only a load");
        let load = chat(r#"{"model":"m","messages":[]}"#).expect("valid");
        assert_eq!(load.request, None);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let chats = [
            (r#"{"model":"m","messages":[],"format":"yaml"}"#, "format"),
            (r#"{"model":"m","messages":[],"format":[1]}"#, "format"),
            (
                r#"{"model":"m","messages":[],"options":{"num_ctx":4096}}"#,
                "options.num_ctx",
            ),
            (
                r#"{"model":"m","messages":[],"options":{"temperature":-1}}"#,
                "options.temperature",
            ),
            (
                r#"{"model":"m","messages":[],"options":{"num_predict":0}}"#,
                "options.num_predict",
            ),
            (
                r#"{"model":"m","messages":[],"options":{"top_k":"x"}}"#,
                "options.top_k",
            ),
            (r#"{"model":"m","messages":[],"options":[]}"#, "options"),
            (
                r#"{"model":"m","messages":[],"tools":[{"type":"function"}]}"#,
                "tools[0].function",
            ),
            (r#"{"model":"m","messages":[],"tools":{"a":1}}"#, "tools"),
            (
                r#"{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":"a b"}}]}"#,
                "tools[0].function.name",
            ),
            (r#"{"model":"m","messages":[],"think":true}"#, "think"),
            (
                r#"{"model":"m","messages":[],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"m","messages":[],"top_logprobs":2}"#,
                "top_logprobs",
            ),
            (r#"{"model":"m","messages":[],"mystery":1}"#, "mystery"),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","tool_calls":[{"function":{"name":"f"}}]}]}"#,
                "messages[0].tool_calls",
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":[1]}}]}]}"#,
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","images":["aGk="]}]}"#,
                "messages[0].images",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":3}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","colour":1}]}"#,
                "messages[0].colour",
            ),
            (r#"{"model":"","messages":[]}"#, "model"),
            (r#"{"messages":[]}"#, "model"),
        ];
        for (body, param) in chats {
            let err = chat(body).expect_err(body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.param(), Some(param), "{body}: {err}");
        }
        let generates = [
            (
                r#"{"model":"m","prompt":"x","template":"{{ .Prompt }}"}"#,
                "template",
            ),
            (r#"{"model":"m","prompt":"x","context":[1,2]}"#, "context"),
            (r#"{"model":"m","prompt":"x","suffix":"end"}"#, "suffix"),
            (r#"{"model":"m","prompt":"x","images":["aGk="]}"#, "images"),
            (
                r#"{"model":"m","prompt":"x","raw":true,"system":"s"}"#,
                "system",
            ),
            (r#"{"model":"m","prompt":"x","width":64}"#, "width"),
            (r#"{"model":"m","prompt":"x","format":5}"#, "format"),
        ];
        for (body, param) in generates {
            let err = generate(body).expect_err(body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.param(), Some(param), "{body}: {err}");
        }
    }

    #[test]
    fn show_takes_model_or_name() {
        let show = |body: &str| parse::<ShowBody>(body.as_bytes()).and_then(ShowBody::into_model);
        assert_eq!(show(r#"{"model":"a"}"#).expect("model"), "a");
        assert_eq!(show(r#"{"name":"b"}"#).expect("name"), "b");
        assert_eq!(show("{}").expect_err("none").param(), Some("model"));
        assert_eq!(
            show(r#"{"model":"a","verbose":true}"#)
                .expect_err("verbose")
                .param(),
            Some("verbose")
        );
    }
}
