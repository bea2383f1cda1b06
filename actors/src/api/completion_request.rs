//! The body of `POST /v1/completions` (OpenAI's legacy completions) and its validation into
//! engine requests, one per prompt.
//!
//! The prompt is raw text ([`Prompt::Text`]): it is tokenized as it is, never passed through
//! the model's chat template. Decisions where OpenAI and Canopy differ or OpenAI leaves room:
//!
//! - `prompt` is a string or a non-empty array of strings; each string is its own task and
//!   its own choice (`index` = its place in the array). Token-id prompts (an array of
//!   integers, or of arrays of integers) are a 400 naming `prompt`.
//! - `max_tokens` defaults to 16, as in OpenAI's API (the chat endpoint's default is the
//!   node's `default_max_tokens`); `temperature`, `top_p`, `top_k`, `seed` and `stop` are
//!   checked as for chat (see `request`).
//! - `echo: true` puts the prompt before the generated text of each choice (and, in a stream,
//!   sends it as each choice's first chunk).
//! - `stream_options.include_usage` ends a stream with a usage chunk (no choices); usage
//!   adds up the prompts' tasks.
//! - `n` choices per prompt (1 to `MAX_CHOICES`, choice `i` seeded with `seed + i`); choice
//!   `c` of prompt `p` has `index` `p * n + c`, as OpenAI numbers them. `best_of` is accepted
//!   only equal to `n` (or absent): ranking candidates is not implemented.
//! - `logprobs` (0 to 5, OpenAI's limit): each generated token's log-probability and as
//!   many alternatives, in the legacy shape (`tokens`, `token_logprobs`, `top_logprobs`,
//!   `text_offset`). With `echo`, OpenAI also scores the prompt's tokens, which the engine
//!   does not: that combination is a 400 naming `echo`.
//! - `presence_penalty`, `frequency_penalty` and `logit_bias` as for chat.
//! - Refused with a 400 naming the field, because the engine cannot honour it: `suffix`
//!   (insertion). `null` is the same as leaving a field out. `user` is accepted and not
//!   used (it only identifies the caller to OpenAI).
//! - Unknown fields are a 400 naming them, as OpenAI's own API answers
//!   ("Unrecognized request argument").

use std::collections::BTreeMap;

use canopy_proto::{GenerateParams, GenerateRequest, Prompt};
use serde::Deserialize;
use serde_json::Value;

use super::config::ApiConfig;
use super::error::ApiError;
use super::request::{Sampling, StreamOptions, choice_params, choices, json_type, unsupported};

/// Most alternatives per position in `logprobs` (OpenAI's limit for this endpoint).
const MAX_LOGPROBS: i64 = 5;

/// `max_tokens` when a completion request does not set it (OpenAI's default).
pub(crate) const DEFAULT_COMPLETION_TOKENS: i64 = 16;

/// The JSON body of a legacy completion request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub(crate) struct CompletionRequest {
    model: String,
    prompt: Value,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    echo: Option<bool>,
    n: Option<i64>,
    best_of: Option<i64>,
    suffix: Option<Value>,
    logprobs: Option<i64>,
    logit_bias: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    #[allow(
        dead_code,
        reason = "accepted and not used: it only identifies the caller"
    )]
    user: Option<Value>,
    /// Every other field: refused by name.
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// A validated completion request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CompletionJob {
    /// The model asked for.
    pub(crate) model: String,
    /// The prompts, in order; each has `choices` tasks and choices.
    pub(crate) prompts: Vec<String>,
    /// Choices per prompt (`n`).
    pub(crate) choices: u32,
    /// Sampling and stopping, the same for every prompt (choice `i` has seed `seed + i`).
    pub(crate) params: GenerateParams,
    /// Whether to answer with an SSE stream.
    pub(crate) stream: bool,
    /// Whether a stream ends with a usage chunk.
    pub(crate) include_usage: bool,
    /// Whether each choice's text starts with its prompt.
    pub(crate) echo: bool,
}

impl CompletionJob {
    /// The engine request of choice `index` (`prompt * n + choice`).
    pub(crate) fn request(&self, index: usize) -> GenerateRequest {
        let n = self.choices as usize;
        GenerateRequest {
            tools: Vec::new(),
            prompt: Prompt::Text(self.prompts[index / n].clone()),
            params: choice_params(&self.params, (index % n) as u32),
        }
    }

    /// How many choices the answer has (prompts times `n`).
    pub(crate) fn total_choices(&self) -> usize {
        self.prompts.len() * self.choices as usize
    }

    /// The prompt of choice `index`.
    pub(crate) fn prompt_of(&self, index: usize) -> &str {
        &self.prompts[index / self.choices as usize]
    }
}

impl CompletionRequest {
    /// Checks the values and builds the job.
    pub(crate) fn into_job(self, config: &ApiConfig) -> Result<CompletionJob, ApiError> {
        if let Some(field) = self.unknown.keys().next() {
            return Err(ApiError::invalid_param(
                field.clone(),
                format!("Unrecognized request argument supplied: '{field}'."),
                "unknown_parameter",
            ));
        }
        if self.model.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "model",
                "'model' must name a model (GET /v1/models lists them).",
                "invalid_value",
            ));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_null()) {
            return Err(unsupported(
                "suffix",
                "inserting text before a suffix needs a fill-in-the-middle model and prompt \
                 format, which Canopy's engines do not provide",
            ));
        }
        let logprobs = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as u8),
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    format!(
                        "Invalid value for 'logprobs': {k}. It must be between 0 and \
                         {MAX_LOGPROBS}."
                    ),
                    "invalid_value",
                ));
            }
        };
        let echo = self.echo.unwrap_or(false);
        if echo && logprobs.is_some() {
            return Err(unsupported(
                "echo",
                "with 'logprobs', 'echo' also scores the prompt's tokens, which the engine \
                 does not compute",
            ));
        }
        let n = choices(self.n)?;
        if let Some(best_of) = self.best_of
            && best_of != i64::from(n)
        {
            return Err(unsupported(
                "best_of",
                &format!(
                    "ranking candidates is not implemented: 'best_of' must equal 'n' ({n}), \
                     got {best_of}"
                ),
            ));
        }
        let prompts = prompts(self.prompt)?;
        let params = Sampling {
            max_tokens: Some((
                "max_tokens",
                self.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS),
            )),
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
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream
            && self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(CompletionJob {
            model: self.model,
            prompts,
            choices: n,
            params,
            stream,
            include_usage,
            echo,
        })
    }
}

/// `prompt`: a string or a non-empty array of strings.
fn prompts(prompt: Value) -> Result<Vec<String>, ApiError> {
    let tokens = || {
        ApiError::invalid_param(
            "prompt",
            "Token-id prompts are not supported: send the prompt as a string or an array of \
             strings.",
            "unsupported_parameter",
        )
    };
    match prompt {
        Value::String(text) => Ok(vec![text]),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid_param(
            "prompt",
            "'prompt' must hold at least one prompt.",
            "invalid_value",
        )),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(text),
                Value::Number(_) | Value::Array(_) => Err(tokens()),
                other => Err(ApiError::invalid_param(
                    format!("prompt[{i}]"),
                    format!(
                        "Invalid type for 'prompt[{i}]': expected a string, got {}.",
                        json_type(&other)
                    ),
                    "invalid_type",
                )),
            })
            .collect(),
        other => Err(ApiError::invalid_param(
            "prompt",
            format!(
                "Invalid type for 'prompt': expected a string or an array of strings, got {}.",
                json_type(&other)
            ),
            "invalid_type",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse;

    fn job(body: &str) -> Result<CompletionJob, ApiError> {
        parse::<CompletionRequest>(body.as_bytes())?.into_job(&ApiConfig::default())
    }

    #[test]
    fn a_string_prompt_is_raw_text_with_openai_defaults() {
        let job = job(r#"{"model":"m","prompt":"Once upon"}"#).expect("valid");
        assert_eq!(job.prompts, vec!["Once upon".to_string()]);
        assert_eq!(job.request(0).prompt, Prompt::Text("Once upon".into()));
        assert_eq!(job.params.max_tokens, 16);
        assert_eq!((job.params.temperature, job.params.top_p), (1.0, 1.0));
        assert!(!job.stream && !job.include_usage && !job.echo);
    }

    #[test]
    fn parameters_and_prompt_lists_are_carried() {
        let job = job(
            r#"{"model":"m","prompt":["a","b"],"max_tokens":5,"temperature":0,"top_p":0.5,
               "seed":7,"stop":["\n"],"echo":true,"stream":true,
               "stream_options":{"include_usage":true},"n":1,"best_of":1,"logprobs":null,
               "suffix":null,"logit_bias":{},"presence_penalty":0,"frequency_penalty":0,
               "user":"me"}"#,
        )
        .expect("valid");
        assert_eq!(job.prompts, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(job.request(1).prompt, Prompt::Text("b".into()));
        let p = &job.params;
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_p, p.seed),
            (5, 0.0, 0.5, 7)
        );
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert!(job.stream && job.include_usage && job.echo);
    }

    #[test]
    fn choices_are_numbered_prompt_major() {
        let job = job(
            r#"{"model":"m","prompt":["a","b"],"n":3,"best_of":3,"seed":10,"logprobs":2,
               "logit_bias":{"50256":-100},"presence_penalty":0.5,"frequency_penalty":1}"#,
        )
        .expect("valid");
        assert_eq!(job.total_choices(), 6);
        assert_eq!(job.prompt_of(2), "a");
        assert_eq!(job.prompt_of(3), "b");
        let r = job.request(4);
        assert_eq!(r.prompt, Prompt::Text("b".into()));
        assert_eq!(r.params.seed, 11);
        assert_eq!(r.params.logprobs, Some(2));
        assert_eq!(r.params.logit_bias, vec![(50256, -100.0)]);
        assert_eq!(
            (r.params.presence_penalty, r.params.frequency_penalty),
            (0.5, 1.0)
        );
    }

    #[test]
    fn unsupported_and_bad_fields_are_refused_by_name() {
        let cases = [
            (r#"{"model":"m","prompt":"x","suffix":"end"}"#, "suffix"),
            (r#"{"model":"m","prompt":"x","logprobs":6}"#, "logprobs"),
            (r#"{"model":"m","prompt":"x","logprobs":"2"}"#, "logprobs"),
            (
                r#"{"model":"m","prompt":"x","logprobs":1,"echo":true}"#,
                "echo",
            ),
            (r#"{"model":"m","prompt":"x","n":0}"#, "n"),
            (r#"{"model":"m","prompt":"x","best_of":3}"#, "best_of"),
            (r#"{"model":"m","prompt":"x","n":2,"best_of":3}"#, "best_of"),
            (
                r#"{"model":"m","prompt":"x","logit_bias":{"x":-100}}"#,
                "logit_bias",
            ),
            (
                r#"{"model":"m","prompt":"x","presence_penalty":2.5}"#,
                "presence_penalty",
            ),
            (
                r#"{"model":"m","prompt":"x","frequency_penalty":-2.1}"#,
                "frequency_penalty",
            ),
            (r#"{"model":"m","prompt":"x","mystery":1}"#, "mystery"),
            (r#"{"model":"m","prompt":[1,2,3]}"#, "prompt"),
            (r#"{"model":"m","prompt":[[1,2]]}"#, "prompt"),
            (r#"{"model":"m","prompt":[]}"#, "prompt"),
            (r#"{"model":"m","prompt":["a",{}]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":5}"#, "prompt"),
            (r#"{"model":"m"}"#, "prompt"),
            (r#"{"prompt":"x"}"#, "model"),
            (r#"{"model":"m","prompt":"x","max_tokens":0}"#, "max_tokens"),
            (
                r#"{"model":"m","prompt":"x","max_tokens":"9"}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","prompt":"x","temperature":3}"#,
                "temperature",
            ),
            (r#"{"model":"m","prompt":"x","stop":7}"#, "stop"),
        ];
        for (body, param) in cases {
            let err = job(body).expect_err(body);
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.param(), Some(param), "{body}: {err}");
        }
    }
}
