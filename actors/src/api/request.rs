//! The body of `POST /v1/chat/completions` and its validation into an engine request.
//!
//! Parsing (types, required fields) happens in the `OpenAiJson` extractor; the checks here
//! are about values. Decisions where OpenAI and the engine differ:
//!
//! - `max_completion_tokens` wins over `max_tokens` when both are given; with neither, the
//!   API's `default_max_tokens` applies (256 by default, as `GenerateParams`). Values must be
//!   at least 1.
//! - `temperature` defaults to 1.0 as in OpenAI's API (the engine's own default is greedy,
//!   0.0); it must lie in `[0, 2]`. `top_p` defaults to 1.0 and must lie in `[0, 1]`.
//!   `top_k` is a Canopy extension (0 or absent disables it).
//! - `seed` defaults to a random one, so that repeated requests differ as with OpenAI; a
//!   negative seed is used by its two's-complement bits.
//! - `stop`: a string or an array of at most 4 strings; empty strings are ignored.
//! - roles: `system`, `developer` (treated as `system`), `user`, `assistant`, `tool`; any
//!   other is a 400. Content is a string or an array of `{"type": "text", "text": ...}` parts
//!   (joined by newlines); `null` content is allowed (as empty) for `assistant` turns only.
//!   An assistant turn may carry `tool_calls` (`[{id, type: "function", function: {name,
//!   arguments}}]`, the arguments JSON text); a `tool` turn needs `tool_call_id`.
//! - `tools`: at most 128 functions (`{"type": "function", "function": {name, description,
//!   parameters, strict}}`; names of letters, digits, `_` and `-`, unique); `tool_choice`
//!   `none`, `auto` (the default with tools), `required` or `{"type": "function",
//!   "function": {"name"}}`; a forced call (required or named) is one call under a grammar, so
//!   its arguments validate against the tool's schema (see `tools`); `required` or a named
//!   function cannot be combined with `response_format`. `parallel_tool_calls: false` keeps
//!   the first of the calls an `auto` answer makes.
//! - `n` (1 to [`MAX_CHOICES`]) choices are that many tasks of the same prompt, choice `i`
//!   seeded with `seed + i`, so that sampled choices differ and a seeded request repeats.
//! - `presence_penalty` and `frequency_penalty` lie in `[-2, 2]` and count the generated
//!   tokens only (not the prompt's); `logit_bias` maps token ids (as strings, OpenAI's shape)
//!   to biases in `[-100, 100]`, at most [`MAX_LOGIT_BIAS`] of them; -100 bans the token, and
//!   an id outside the model's vocabulary is a 400 from the engine.
//! - `logprobs: true` reports each generated token's log-probability, `top_logprobs` (0 to
//!   20, only with `logprobs`) as many alternatives per position: from the distribution the
//!   sampler drew from (after bias and penalties, over the temperature; see the engine's
//!   `sampling`).
//! - `response_format`: `{"type": "text"}` (the default), `{"type": "json_object"}` (any
//!   JSON object) or `{"type": "json_schema", "json_schema": {"name", "schema", "strict",
//!   "description"}}`: grammar-constrained decoding (the engine's `grammar`), so the output
//!   parses and validates whatever the model would have said; a schema the grammar compiler
//!   cannot use is a 400 from the engine. `strict` is accepted either way: the output is
//!   always held to the schema.
//! - Accepted with no effect: `user`, `metadata`, `safety_identifier` and `prompt_cache_key`
//!   (identifiers; the prefix cache needs no key), `store: false`, `service_tier` `auto` or
//!   `default`, `parallel_tool_calls` and `tool_choice: "none"`. Refused with a 400 naming
//!   the field, until the engine can honour them: `tools`, any other `tool_choice`,
//!   `functions`/`function_call`, `audio`, `modalities` other than text, `prediction`,
//!   `reasoning_effort`, `verbosity`, `web_search_options`, `store: true`. Any other field is
//!   a 400 naming it, as OpenAI's own API answers ("Unrecognized request argument").

use std::collections::BTreeMap;

use canopy_proto::{
    ChatMessage, Constraint, GenerateParams, GenerateRequest, Prompt, ToolCall, ToolSpec,
};
use serde::Deserialize;
use serde_json::Value;

use super::config::ApiConfig;
use super::error::ApiError;
use super::tools::{ToolChoice, Tools, check_tool_list, tool_spec};

/// Most stop sequences a request may carry (OpenAI's limit).
pub(crate) const MAX_STOP_SEQUENCES: usize = 4;

/// Most choices (`n`) one request may ask for: each is a task that takes a sequence slot.
pub(crate) const MAX_CHOICES: u32 = 16;

/// Most entries of `logit_bias` (OpenAI's limit).
pub(crate) const MAX_LOGIT_BIAS: usize = 300;

/// Most alternatives per position in chat's `top_logprobs` (OpenAI's limit).
pub(crate) const MAX_TOP_LOGPROBS: i64 = 20;

/// The JSON body of a chat completion request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct ChatCompletionRequest {
    model: String,
    messages: Vec<RequestMessage>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    n: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    response_format: Option<Value>,
    tools: Option<Vec<RequestTool>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    /// Every other field: accepted, refused or unknown by name (see the module's notes).
    #[schema(ignore)]
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct RequestMessage {
    role: String,
    /// A string, an array of content parts, or null: checked in `into_chat`.
    content: Option<Value>,
    /// An assistant turn's calls.
    tool_calls: Option<Vec<RequestToolCall>>,
    /// A tool turn's answer to this call.
    tool_call_id: Option<String>,
    /// A participant's name (accepted; the templates take none).
    #[allow(dead_code)]
    name: Option<String>,
}

/// One of `tools`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct RequestTool {
    #[serde(rename = "type")]
    kind: String,
    function: Option<RequestFunction>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct RequestFunction {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
    /// Accepted either way: a forced call always follows the schema.
    #[allow(dead_code)]
    strict: Option<bool>,
}

/// One of an assistant turn's `tool_calls`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct RequestToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    function: RequestCalled,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct RequestCalled {
    name: String,
    arguments: String,
}

/// `stream_options` (chat and legacy completions).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct StreamOptions {
    /// End the stream with a usage chunk.
    pub(crate) include_usage: Option<bool>,
}

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatJob {
    /// The model asked for.
    pub(crate) model: String,
    /// What to ask the runner (for choice 0; see [`ChatJob::requests`]).
    pub(crate) request: GenerateRequest,
    /// How many choices (`n`).
    pub(crate) choices: u32,
    /// Whether to answer with an SSE stream.
    pub(crate) stream: bool,
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub(crate) include_usage: bool,
    /// The tools and the choice (already applied to `request`); the answer is read for
    /// calls when they are active.
    pub(crate) tools: Tools,
    /// Most calls an answer may make (`parallel_tool_calls: false` is 1).
    pub(crate) max_calls: usize,
}

impl ChatJob {
    /// The engine requests of the choices, in order (choice `i` seeded with `seed + i`).
    pub(crate) fn requests(&self) -> Vec<GenerateRequest> {
        (0..self.choices)
            .map(|i| GenerateRequest {
                tools: self.request.tools.clone(),
                prompt: self.request.prompt.clone(),
                params: choice_params(&self.request.params, i),
            })
            .collect()
    }
}

/// The parameters of choice `i` of a request of several (`n`): its own seed.
pub(crate) fn choice_params(params: &GenerateParams, i: u32) -> GenerateParams {
    GenerateParams {
        seed: params.seed.wrapping_add(u64::from(i)),
        ..params.clone()
    }
}

/// A 400 for a field this server cannot honour.
pub(crate) fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::invalid_param(
        field,
        format!("'{field}' is not supported by this server: {why}."),
        "unsupported_parameter",
    )
}

/// Checks one of chat's other fields (see the module's notes).
fn check_other(field: &str, value: &Value) -> Result<(), ApiError> {
    let empty = match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match field {
        "user" | "metadata" | "safety_identifier" | "prompt_cache_key" => Ok(()),
        "store" if matches!(value, Value::Null | Value::Bool(false)) => Ok(()),
        "store" => Err(unsupported(field, "Canopy does not store completions")),
        "service_tier" if value.is_null() || matches!(value.as_str(), Some("auto" | "default")) => {
            Ok(())
        }
        "service_tier" => Err(unsupported(field, "Canopy has one tier, 'default'")),
        "functions" if empty => Ok(()),
        "function_call" if value.is_null() || value.as_str() == Some("none") => Ok(()),
        "functions" | "function_call" => Err(unsupported(
            field,
            "it is deprecated; send 'tools' and 'tool_choice' instead",
        )),
        "modalities"
            if value.is_null()
                || value
                    .as_array()
                    .is_some_and(|m| m.iter().all(|v| v.as_str() == Some("text"))) =>
        {
            Ok(())
        }
        "audio" | "prediction" | "reasoning_effort" | "verbosity" | "web_search_options"
            if value.is_null() =>
        {
            Ok(())
        }
        "modalities" | "audio" => Err(unsupported(
            field,
            "the models Canopy serves take and give text only",
        )),
        "prediction" => Err(unsupported(field, "predicted outputs are not implemented")),
        "reasoning_effort" | "verbosity" => Err(unsupported(
            field,
            "the models Canopy serves do not reason at adjustable lengths",
        )),
        "web_search_options" => Err(unsupported(field, "Canopy does not search the web")),
        _ => Err(ApiError::invalid_param(
            field,
            format!("Unrecognized request argument supplied: '{field}'."),
            "unknown_parameter",
        )),
    }
}

/// `logprobs` and `top_logprobs` (chat's and Ollama's) checked: how many alternatives per
/// position to report (`Some(0)`: only each token's own), or `None`. `top_logprobs` (0 to
/// [`MAX_TOP_LOGPROBS`]) needs `logprobs: true`, unless it is 0.
pub(crate) fn logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<u8>, ApiError> {
    match (logprobs.unwrap_or(false), top) {
        (false, None | Some(0)) => Ok(None),
        (false, Some(_)) => Err(ApiError::invalid_param(
            "top_logprobs",
            "'top_logprobs' needs 'logprobs' set to true.",
            "invalid_value",
        )),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as u8)),
        (true, Some(k)) => Err(ApiError::invalid_param(
            "top_logprobs",
            format!(
                "Invalid value for 'top_logprobs': {k}. It must be between 0 and \
                 {MAX_TOP_LOGPROBS}."
            ),
            "invalid_value",
        )),
    }
}

/// `n` checked: 1 to [`MAX_CHOICES`], 1 when absent.
pub(crate) fn choices(value: Option<i64>) -> Result<u32, ApiError> {
    match value {
        None => Ok(1),
        Some(n) if (1..=i64::from(MAX_CHOICES)).contains(&n) => Ok(n as u32),
        Some(n) => Err(ApiError::invalid_param(
            "n",
            format!("Invalid value for 'n': {n}. It must be between 1 and {MAX_CHOICES}."),
            "invalid_value",
        )),
    }
}

impl ChatCompletionRequest {
    /// Checks the values and builds the engine request.
    pub(crate) fn into_job(self, config: &ApiConfig) -> Result<ChatJob, ApiError> {
        for (field, value) in &self.other {
            check_other(field, value)?;
        }
        if self.model.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "model",
                "'model' must name a model (GET /v1/models lists them).",
                "invalid_value",
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "'messages' must contain at least one message.",
                "invalid_value",
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_chat(i))
            .collect::<Result<Vec<_>, _>>()?;
        let choices = choices(self.n)?;
        let logprobs = logprobs(self.logprobs, self.top_logprobs)?;
        let constraint = response_format(self.response_format)?;
        let tools = self.tools.map(chat_tools).transpose()?.unwrap_or_default();
        let choice = self.tool_choice.map(tool_choice).transpose()?.flatten();
        let tools = Tools::new(tools, choice, "tool_choice")?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            (None, None) => None,
        };
        let params = Sampling {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            logprobs,
        }
        .into_params(config)?;
        let params = GenerateParams {
            constraint,
            ..params
        };
        let mut request = GenerateRequest {
            prompt: Prompt::Chat(messages),
            params,
            tools: Vec::new(),
        };
        tools.apply(&mut request, "response_format")?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream
            && self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(ChatJob {
            model: self.model,
            request,
            choices,
            stream,
            include_usage,
            tools,
            max_calls: if self.parallel_tool_calls == Some(false) {
                1
            } else {
                usize::MAX
            },
        })
    }
}

/// The sampling fields OpenAI's chat and legacy completions share, as the client sent them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sampling {
    /// The token limit and the name of the field it came from.
    pub(crate) max_tokens: Option<(&'static str, i64)>,
    /// `temperature`.
    pub(crate) temperature: Option<f64>,
    /// `top_p`.
    pub(crate) top_p: Option<f64>,
    /// `top_k` (a Canopy extension; 0 disables it).
    pub(crate) top_k: Option<i64>,
    /// `seed`.
    pub(crate) seed: Option<i64>,
    /// `stop`: a string or an array of strings.
    pub(crate) stop: Option<Value>,
    /// `presence_penalty`.
    pub(crate) presence_penalty: Option<f64>,
    /// `frequency_penalty`.
    pub(crate) frequency_penalty: Option<f64>,
    /// `logit_bias`: an object of token ids (as strings) to biases.
    pub(crate) logit_bias: Option<Value>,
    /// How many alternatives per position to report log-probabilities for (already
    /// checked by the endpoint, whose field names differ); `None`: no log-probabilities.
    pub(crate) logprobs: Option<u8>,
}

impl Sampling {
    /// Checks the values (see the module's notes) and builds the engine's parameters.
    pub(crate) fn into_params(self, config: &ApiConfig) -> Result<GenerateParams, ApiError> {
        let max_tokens = match self.max_tokens {
            Some((name, v)) => positive_u32(name, v)?,
            None => config.default_max_tokens,
        };
        let temperature = in_range("temperature", self.temperature, 1.0, 2.0)?;
        let top_p = in_range("top_p", self.top_p, 1.0, 1.0)?;
        let top_k = match self.top_k {
            None | Some(0) => None,
            Some(k) => Some(positive_u32("top_k", k)?),
        };
        let stop = checked_stop("stop", self.stop, MAX_STOP_SEQUENCES)?;
        // Bit-for-bit: distinct seeds stay distinct.
        let seed = self.seed.map_or_else(rand::random::<u64>, |s| s as u64);
        Ok(GenerateParams {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed,
            stop,
            presence_penalty: penalty("presence_penalty", self.presence_penalty)?,
            frequency_penalty: penalty("frequency_penalty", self.frequency_penalty)?,
            logit_bias: logit_bias(self.logit_bias)?,
            logprobs: self.logprobs,
            constraint: None,
        })
    }
}

/// OpenAI's `response_format` checked into a constraint (see the module's notes).
pub(crate) fn response_format(value: Option<Value>) -> Result<Option<Constraint>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Value::Object(format) = value else {
        return Err(ApiError::invalid_param(
            "response_format",
            format!(
                "Invalid type for 'response_format': expected an object, got {}.",
                json_type(&value)
            ),
            "invalid_type",
        ));
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let spec = format
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "response_format.json_schema",
                        "Missing required parameter: 'response_format.json_schema' (an object with \
                     'name' and 'schema').",
                        "missing_required_parameter",
                    )
                })?;
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(Constraint::JsonSchema("{}".into()))),
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(Some(Constraint::JsonSchema(schema.to_string())))
                }
                Some(other) => Err(ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    format!(
                        "Invalid type for 'response_format.json_schema.schema': expected an \
                         object, got {}.",
                        json_type(other)
                    ),
                    "invalid_type",
                )),
            }
        }
        other => Err(ApiError::invalid_param(
            "response_format.type",
            format!(
                "Invalid value for 'response_format.type': {}. Supported values are 'text', \
                 'json_object' and 'json_schema'.",
                other.map_or_else(|| "none".to_string(), |t| format!("'{t}'"))
            ),
            "invalid_value",
        )),
    }
}

/// A penalty (`presence_penalty`, `frequency_penalty`) checked to lie in `[-2, 2]`; 0 when
/// absent.
pub(crate) fn penalty(name: &str, value: Option<f64>) -> Result<f32, ApiError> {
    match value {
        None => Ok(0.0),
        Some(v) if v.is_finite() && (-2.0..=2.0).contains(&v) => Ok(v as f32),
        Some(v) => Err(ApiError::invalid_param(
            name,
            format!("Invalid value for '{name}': {v}. It must be between -2 and 2."),
            "invalid_value",
        )),
    }
}

/// `logit_bias` checked: null, or an object of token ids (decimal strings) to numbers in
/// `[-100, 100]`, at most [`MAX_LOGIT_BIAS`] entries; in ascending id order.
pub(crate) fn logit_bias(value: Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("logit_bias", message, "invalid_value");
    let map = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!(
                    "Invalid type for 'logit_bias': expected an object of token ids to \
                     numbers, got {}.",
                    json_type(&other)
                ),
                "invalid_type",
            ));
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(invalid(format!(
            "'logit_bias' holds {} tokens; at most {MAX_LOGIT_BIAS} are allowed.",
            map.len()
        )));
    }
    let mut bias = map
        .into_iter()
        .map(|(key, value)| {
            let id = key.parse::<u32>().map_err(|_| {
                invalid(format!(
                    "Invalid key in 'logit_bias': '{key}' is not a token id (a decimal integer)."
                ))
            })?;
            match value.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(invalid(format!(
                    "Invalid value in 'logit_bias' for token {id}: {value}. It must be a number \
                     between -100 and 100."
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    bias.sort_by_key(|&(id, _)| id);
    Ok(bias)
}

/// `stop` (named `name` in messages) checked: a string or an array of at most `max`
/// strings, empty ones dropped.
pub(crate) fn checked_stop(
    name: &str,
    stop: Option<Value>,
    max: usize,
) -> Result<Vec<String>, ApiError> {
    let stop: Vec<String> = stop_sequences(name, stop)?
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if stop.len() > max {
        return Err(ApiError::invalid_param(
            name,
            format!(
                "'{name}' holds {} sequences; at most {max} are allowed.",
                stop.len()
            ),
            "invalid_value",
        ));
    }
    Ok(stop)
}

impl RequestMessage {
    fn into_chat(self, index: usize) -> Result<ChatMessage, ApiError> {
        let role = match self.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid_param(
                    format!("messages[{index}].role"),
                    format!(
                        "Invalid value for 'messages[{index}].role': '{other}'. Supported \
                         roles are 'system', 'developer', 'user', 'assistant' and 'tool'."
                    ),
                    "invalid_value",
                ));
            }
        };
        let tool_calls = match (role, self.tool_calls) {
            (_, None) => Vec::new(),
            ("assistant", Some(calls)) => calls
                .into_iter()
                .enumerate()
                .map(|(c, call)| call.into_call(&format!("messages[{index}].tool_calls[{c}]")))
                .collect::<Result<_, _>>()?,
            (_, Some(_)) => {
                return Err(ApiError::invalid_param(
                    format!("messages[{index}].tool_calls"),
                    format!("'messages[{index}].tool_calls' is only allowed on assistant turns."),
                    "invalid_value",
                ));
            }
        };
        let tool_call_id = match (role, self.tool_call_id) {
            ("tool", Some(id)) => Some(id),
            ("tool", None) => {
                return Err(ApiError::invalid_param(
                    format!("messages[{index}].tool_call_id"),
                    format!(
                        "Missing required parameter: 'messages[{index}].tool_call_id' (a tool \
                         turn answers a call)."
                    ),
                    "missing_required_parameter",
                ));
            }
            (_, _) => None,
        };
        let param = format!("messages[{index}].content");
        let content = match self.content {
            Some(Value::String(text)) => text,
            Some(Value::Array(parts)) => parts
                .into_iter()
                .enumerate()
                .map(|(p, part)| text_part(&format!("{param}[{p}]"), part))
                .collect::<Result<Vec<_>, _>>()?
                .join("\n"),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid_param(
                    param.clone(),
                    format!("Missing required parameter: '{param}'."),
                    "missing_required_parameter",
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid_param(
                    param.clone(),
                    format!(
                        "Invalid type for '{param}': expected a string or an array of text \
                         parts, got {}.",
                        json_type(&other)
                    ),
                    "invalid_type",
                ));
            }
        };
        Ok(ChatMessage {
            role: role.to_string(),
            content,
            tool_calls,
            tool_call_id,
            name: None,
        })
    }
}

impl RequestToolCall {
    fn into_call(self, param: &str) -> Result<ToolCall, ApiError> {
        if self.kind.as_deref().is_some_and(|k| k != "function") {
            return Err(ApiError::invalid_param(
                format!("{param}.type"),
                format!("Invalid value for '{param}.type': only 'function' calls are supported."),
                "invalid_value",
            ));
        }
        Ok(ToolCall {
            id: self.id,
            name: self.function.name,
            arguments: self.function.arguments,
        })
    }
}

/// `tools` checked into the engine's tools.
fn chat_tools(tools: Vec<RequestTool>) -> Result<Vec<ToolSpec>, ApiError> {
    let specs = tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            let param = format!("tools[{i}]");
            match (tool.kind.as_str(), tool.function) {
                ("function", Some(f)) => tool_spec(
                    &format!("{param}.function"),
                    &f.name,
                    f.description,
                    f.parameters,
                ),
                ("function", None) => Err(ApiError::invalid_param(
                    format!("{param}.function"),
                    format!("Missing required parameter: '{param}.function'."),
                    "missing_required_parameter",
                )),
                (other, _) => Err(ApiError::invalid_param(
                    format!("{param}.type"),
                    format!(
                        "Invalid value for '{param}.type': '{other}'. Only 'function' tools \
                         are supported."
                    ),
                    "invalid_value",
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_tool_list("tools", &specs)?;
    Ok(specs)
}

/// `tool_choice` checked: `none`, `auto`, `required` or `{"type": "function", "function":
/// {"name": ...}}`; null is absent.
fn tool_choice(value: Value) -> Result<Option<ToolChoice>, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "tool_choice",
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or \
             {\"type\": \"function\", \"function\": {\"name\": ...}}.",
            "invalid_value",
        )
    };
    match &value {
        Value::Null => Ok(None),
        Value::String(s) => match s.as_str() {
            "none" => Ok(Some(ToolChoice::None)),
            "auto" => Ok(Some(ToolChoice::Auto)),
            "required" => Ok(Some(ToolChoice::Required)),
            _ => Err(invalid()),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| Some(ToolChoice::Named(name.to_string())))
            .ok_or_else(invalid),
        _ => Err(invalid()),
    }
}

/// The text of a content part `{"type": "text", "text": ...}`.
fn text_part(param: &str, part: Value) -> Result<String, ApiError> {
    if part.get("type").and_then(Value::as_str) == Some("text")
        && let Some(text) = part.get("text").and_then(Value::as_str)
    {
        return Ok(text.to_string());
    }
    Err(ApiError::invalid_param(
        param,
        format!(
            "Invalid content part '{param}': only parts of type 'text' with a string 'text' \
             field are supported."
        ),
        "invalid_value",
    ))
}

/// `stop`: absent, null, a string, or an array of strings.
fn stop_sequences(name: &str, stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let invalid = |got: &str| {
        ApiError::invalid_param(
            name,
            format!(
                "Invalid type for '{name}': expected a string or an array of strings, got {got}."
            ),
            "invalid_type",
        )
    };
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(invalid(&format!("an array holding {}", json_type(&other)))),
            })
            .collect(),
        Some(other) => Err(invalid(json_type(&other))),
    }
}

/// The JSON type of `value`, for messages.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `value` as a u32 of at least 1.
pub(crate) fn positive_u32(name: &str, value: i64) -> Result<u32, ApiError> {
    match u32::try_from(value) {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(ApiError::invalid_param(
            name,
            format!(
                "Invalid value for '{name}': {value}. It must be an integer between 1 and {}.",
                u32::MAX
            ),
            "invalid_value",
        )),
    }
}

/// `value` (or `default`) checked to lie in `[0, max]`.
pub(crate) fn in_range(
    name: &str,
    value: Option<f64>,
    default: f64,
    max: f64,
) -> Result<f64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && (0.0..=max).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid_param(
            name,
            format!("Invalid value for '{name}': {v}. It must be between 0 and {max}."),
            "invalid_value",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse;

    fn job(body: &str) -> Result<ChatJob, ApiError> {
        parse::<ChatCompletionRequest>(body.as_bytes())?.into_job(&ApiConfig::default())
    }

    #[test]
    fn defaults_apply() {
        let job = job(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
            .expect("valid request");
        assert_eq!(job.model, "m");
        assert!(!job.stream);
        assert_eq!(job.request.params.max_tokens, 256);
        assert_eq!(job.request.params.temperature, 1.0);
        assert_eq!(job.request.params.top_p, 1.0);
        assert_eq!(
            job.request.prompt,
            Prompt::Chat(vec![ChatMessage::new("user", "hi")])
        );
    }

    #[test]
    fn parameters_are_carried() {
        let job = job(
            r#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"assistant","content":null}],
               "stream":true,"stream_options":{"include_usage":true},"max_tokens":9,
               "max_completion_tokens":7,"temperature":0,"top_p":0.5,"seed":-1,"stop":"x"}"#,
        )
        .expect("valid request");
        assert!(job.stream && job.include_usage);
        let p = &job.request.params;
        assert_eq!((p.max_tokens, p.temperature, p.top_p), (7, 0.0, 0.5));
        assert_eq!(p.seed, u64::MAX);
        assert_eq!(p.stop, vec!["x".to_string()]);
        let Prompt::Chat(messages) = &job.request.prompt else {
            panic!("chat prompt expected");
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[0].content, "a\nb");
        assert_eq!(messages[1].content, "");
    }

    #[test]
    fn choices_penalties_bias_and_logprobs_are_carried() {
        let job = job(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":3,"seed":5,
               "presence_penalty":0.5,"frequency_penalty":-1,"logit_bias":{"20":-100,"7":2.5},
               "logprobs":true,"top_logprobs":4}"#,
        )
        .expect("valid request");
        assert_eq!(job.choices, 3);
        let p = &job.request.params;
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.5, -1.0));
        assert_eq!(p.logit_bias, vec![(7, 2.5), (20, -100.0)]);
        assert_eq!(p.logprobs, Some(4));
        let seeds: Vec<u64> = job.requests().iter().map(|r| r.params.seed).collect();
        assert_eq!(seeds, vec![5, 6, 7]);
        let plain = |extra: &str| {
            job_of(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#
            ))
        };
        assert_eq!(
            plain(r#","logprobs":true"#).request.params.logprobs,
            Some(0)
        );
        assert_eq!(plain(r#","logprobs":false"#).request.params.logprobs, None);
        // What OpenAI's clients send with no effect here is accepted.
        let quiet = plain(
            r#","user":"u","metadata":{"a":"b"},"store":false,"service_tier":"auto",
               "parallel_tool_calls":true,"tools":[],"tool_choice":"none",
               "response_format":{"type":"text"},"modalities":["text"],"logit_bias":null"#,
        );
        assert_eq!(quiet.choices, 1);
        assert!(quiet.request.params.logit_bias.is_empty());
        assert_eq!(quiet.request.params.constraint, None);
        let json = plain(r#","response_format":{"type":"json_object"}"#);
        assert_eq!(json.request.params.constraint, Some(Constraint::JsonObject));
        let schema = plain(
            r#","response_format":{"type":"json_schema","json_schema":{"name":"p","strict":true,
               "schema":{"type":"object","properties":{"a":{"type":"integer"}}}}}"#,
        );
        let Some(Constraint::JsonSchema(text)) = schema.request.params.constraint else {
            panic!("a schema constraint");
        };
        let parsed: Value = serde_json::from_str(&text).expect("the schema as JSON");
        assert_eq!(parsed["properties"]["a"]["type"], "integer");
    }

    fn job_of(body: &str) -> ChatJob {
        job(body).expect(body)
    }

    #[test]
    fn tools_and_tool_turns_reach_the_engine_request() {
        let job = job_of(
            r#"{"model":"m","tools":[{"type":"function","function":{"name":"add",
                "description":"Adds.","parameters":{"type":"object"}}}],
               "messages":[{"role":"user","content":"1+2?"},
                 {"role":"assistant","content":null,"tool_calls":[{"id":"call_1",
                   "type":"function","function":{"name":"add","arguments":"{\"a\": 1}"}}]},
                 {"role":"tool","tool_call_id":"call_1","content":"3"}]}"#,
        );
        assert_eq!(job.tools.choice, ToolChoice::Auto);
        assert_eq!(job.tools.names(), ["add"]);
        assert_eq!(job.request.tools[0].description.as_deref(), Some("Adds."));
        assert_eq!(job.request.params.constraint, None);
        let Prompt::Chat(turns) = &job.request.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(
            turns[1].tool_calls,
            [ToolCall {
                id: "call_1".into(),
                name: "add".into(),
                arguments: r#"{"a": 1}"#.into()
            }]
        );
        assert_eq!(turns[2].role, "tool");
        assert_eq!(turns[2].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(job.max_calls, usize::MAX);

        let forced = job_of(
            r#"{"model":"m","tools":[{"type":"function","function":{"name":"add"}}],
               "tool_choice":{"type":"function","function":{"name":"add"}},
               "parallel_tool_calls":false,"messages":[{"role":"user","content":"x"}]}"#,
        );
        assert!(matches!(
            forced.request.params.constraint,
            Some(Constraint::ToolCall(ref t)) if t.len() == 1
        ));
        assert_eq!(forced.max_calls, 1);
        // Every choice of `n` carries the tools.
        assert!(forced.requests().iter().all(|r| r.tools.len() == 1));
    }

    #[test]
    fn bad_values_name_their_parameter() {
        let cases = [
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":2.5}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (r#"{"messages":[]}"#, "model"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"9"}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#,
                "n",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":17}"#,
                "n",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"presence_penalty":2.5}"#,
                "presence_penalty",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"frequency_penalty":-3}"#,
                "frequency_penalty",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"5":-101}}"#,
                "logit_bias",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":[1]}"#,
                "logit_bias",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"bad name"}}]}"#,
                "tools[0].function.name",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"custom","custom":{"name":"f"}}]}"#,
                "tools[0].type",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":[]}}]}"#,
                "tools[0].function.parameters",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"always"}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required","response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","tool_calls":[]}]}"#,
                "messages[0].tool_calls",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"tool","content":"3"}]}"#,
                "messages[1].tool_call_id",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"functions":[{"name":"f"}]}"#,
                "functions",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}}"#,
                "response_format.type",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#,
                "response_format.json_schema",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"a","schema":[1]}}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":"json"}"#,
                "response_format",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"modalities":["text","audio"]}"#,
                "modalities",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"store":true}"#,
                "store",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"min_p":0.1}"#,
                "min_p",
            ),
        ];
        for (body, param) in cases {
            let err = job(body).expect_err(body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.param(), Some(param), "{body}");
        }
    }
}
