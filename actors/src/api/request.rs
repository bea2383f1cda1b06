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
//! - roles: `system`, `developer` (treated as `system`), `user`, `assistant`; any other is a
//!   400. Content is a string or an array of `{"type": "text", "text": ...}` parts (joined by
//!   newlines); `null` content is allowed (as empty) for `assistant` turns only.
//! - `n` other than 1 is a 400. Unknown fields are ignored, as OpenAI's clients send many.

use canopy_proto::{ChatMessage, GenerateParams, GenerateRequest, Prompt};
use serde::Deserialize;
use serde_json::Value;

use super::config::ApiConfig;
use super::error::ApiError;

/// Most stop sequences a request may carry (OpenAI's limit).
pub(crate) const MAX_STOP_SEQUENCES: usize = 4;

/// The JSON body of a chat completion request.
#[derive(Debug, Clone, Deserialize)]
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
}

#[derive(Debug, Clone, Deserialize)]
struct RequestMessage {
    role: String,
    /// A string, an array of content parts, or null: checked in `into_chat`.
    content: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatJob {
    /// The model asked for.
    pub(crate) model: String,
    /// What to ask the runner.
    pub(crate) request: GenerateRequest,
    /// Whether to answer with an SSE stream.
    pub(crate) stream: bool,
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub(crate) include_usage: bool,
}

impl ChatCompletionRequest {
    /// Checks the values and builds the engine request.
    pub(crate) fn into_job(self, config: &ApiConfig) -> Result<ChatJob, ApiError> {
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
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid_param(
                "n",
                format!("Invalid value for 'n': {n}. Only n = 1 is supported."),
                "invalid_value",
            ));
        }
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
        }
        .into_params(config)?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream
            && self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(ChatJob {
            model: self.model,
            request: GenerateRequest {
                prompt: Prompt::Chat(messages),
                params,
            },
            stream,
            include_usage,
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
        })
    }
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
            other => {
                return Err(ApiError::invalid_param(
                    format!("messages[{index}].role"),
                    format!(
                        "Invalid value for 'messages[{index}].role': '{other}'. Supported \
                         roles are 'system', 'developer', 'user' and 'assistant'."
                    ),
                    "invalid_value",
                ));
            }
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
        })
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
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into()
            }])
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
        ];
        for (body, param) in cases {
            let err = job(body).expect_err(body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.param(), Some(param), "{body}");
        }
    }
}
