//! Tool calling, shared by the OpenAI, Anthropic and Ollama APIs.
//!
//! A request's tools reach the engine with the prompt, which shows them to the model (through
//! the chat template, or a system message for a template that knows no tools; see the
//! engine's `tools`). What the model may do is the [`ToolChoice`]:
//!
//! - `None`: the tools are not shown and the answer is text;
//! - `Auto`: the model decides; calls it writes (`<tool_call>` blocks, or an answer that is
//!   one call's JSON) are taken out of the text and answered as calls;
//! - `Required` / `Named`: the answer is exactly one call, of any tool or of the named one,
//!   under a grammar (the engine's `Constraint::ToolCall`), so even a model never trained on
//!   tools returns a call whose arguments validate against the tool's parameter schema.
//!
//! [`split_calls`] applies this to a task's [`Output`]s: text passes through until a call
//! may begin, and the calls come as one [`Output::Calls`] just before the end.

use canopy_engine::tools::{CallScanner, ParsedCall};
use canopy_proto::{Constraint, GenerateRequest, ToolSpec};
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::error::ApiError;
use super::output::Output;

/// Longest tool name (OpenAI's and Anthropic's limit).
const MAX_NAME_LEN: usize = 64;

/// Most tools one request may carry.
pub(crate) const MAX_TOOLS: usize = 128;

/// What the model may do with a request's tools (see the module's notes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum ToolChoice {
    /// No calls: the tools are not shown.
    None,
    /// The model decides.
    #[default]
    Auto,
    /// Exactly one call, of any of the tools.
    Required,
    /// Exactly one call, of this tool.
    Named(String),
}

/// A request's tools and what the model may do with them.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Tools {
    /// The tools, checked.
    pub(crate) specs: Vec<ToolSpec>,
    /// The choice, checked against them.
    pub(crate) choice: ToolChoice,
}

impl Tools {
    /// `specs` with `choice` (checked: a named tool must be one of them; `param` names the
    /// choice's field in errors). Without tools, `auto` and `none` ask for nothing, and a
    /// forced call is a 400.
    pub(crate) fn new(
        specs: Vec<ToolSpec>,
        choice: Option<ToolChoice>,
        param: &str,
    ) -> Result<Self, ApiError> {
        let choice = match choice {
            Some(choice) => choice,
            None if specs.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
        };
        if specs.is_empty() && matches!(choice, ToolChoice::None | ToolChoice::Auto) {
            return Ok(Self {
                specs,
                choice: ToolChoice::None,
            });
        }
        if specs.is_empty() {
            return Err(ApiError::invalid_param(
                param,
                format!("'{param}' is only allowed when 'tools' are specified."),
                "invalid_value",
            ));
        }
        if let ToolChoice::Named(name) = &choice
            && !specs.iter().any(|t| &t.name == name)
        {
            return Err(ApiError::invalid_param(
                param,
                format!("'{param}' names the function '{name}', which is not among 'tools'."),
                "invalid_value",
            ));
        }
        Ok(Self { specs, choice })
    }

    /// Whether the answer is read for calls.
    pub(crate) fn active(&self) -> bool {
        !self.specs.is_empty() && self.choice != ToolChoice::None
    }

    /// The names of the tools an answer may call.
    pub(crate) fn names(&self) -> Vec<String> {
        if self.active() {
            self.specs.iter().map(|t| t.name.clone()).collect()
        } else {
            Vec::new()
        }
    }

    /// Puts the tools into `request`: shown to the model unless the choice is `None`, and a
    /// forced call's grammar for `Required` and `Named`. A forced call cannot also follow a
    /// `response_format` (`format_param` names that field in the 400).
    pub(crate) fn apply(
        &self,
        request: &mut GenerateRequest,
        format_param: &str,
    ) -> Result<(), ApiError> {
        if !self.active() {
            return Ok(());
        }
        request.tools = self.specs.clone();
        let forced = match &self.choice {
            ToolChoice::Required => self.specs.clone(),
            ToolChoice::Named(name) => self
                .specs
                .iter()
                .filter(|t| &t.name == name)
                .cloned()
                .collect(),
            ToolChoice::None | ToolChoice::Auto => return Ok(()),
        };
        if request.params.constraint.is_some() {
            return Err(ApiError::invalid_param(
                format_param,
                format!(
                    "'{format_param}' cannot be combined with a forced tool call: the answer \
                     is the call."
                ),
                "invalid_value",
            ));
        }
        request.params.constraint = Some(Constraint::ToolCall(forced));
        Ok(())
    }
}

/// A tool checked: its name (letters, digits, `_` and `-`, 1 to 64 of them), its
/// description, and its parameters' JSON schema (an object; none means an object of
/// anything). `param` is the tool's path in errors (`tools[2]`).
pub(crate) fn tool_spec(
    param: &str,
    name: &str,
    description: Option<String>,
    parameters: Option<Value>,
) -> Result<ToolSpec, ApiError> {
    let valid_name = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        return Err(ApiError::invalid_param(
            format!("{param}.name"),
            format!(
                "Invalid '{param}.name': '{name}'. A function name is 1 to {MAX_NAME_LEN} \
                 letters, digits, underscores and dashes."
            ),
            "invalid_value",
        ));
    }
    let parameters = match parameters {
        None | Some(Value::Null) => serde_json::json!({"type": "object"}),
        Some(schema @ Value::Object(_)) => schema,
        Some(other) => {
            return Err(ApiError::invalid_param(
                format!("{param}.parameters"),
                format!(
                    "Invalid type for '{param}.parameters': expected a JSON Schema object, got \
                     {}.",
                    super::request::json_type(&other)
                ),
                "invalid_type",
            ));
        }
    };
    Ok(ToolSpec {
        name: name.to_string(),
        description: description.filter(|d| !d.is_empty()),
        parameters: parameters.to_string(),
    })
}

/// Checks that no two tools share a name and that there are at most [`MAX_TOOLS`].
pub(crate) fn check_tool_list(param: &str, specs: &[ToolSpec]) -> Result<(), ApiError> {
    if specs.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "'{param}' holds {} tools; at most {MAX_TOOLS} are allowed.",
                specs.len()
            ),
            "invalid_value",
        ));
    }
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|t| t.name == spec.name) {
            return Err(ApiError::invalid_param(
                format!("{param}[{i}].name"),
                format!("'{param}' names the function '{}' twice.", spec.name),
                "invalid_value",
            ));
        }
    }
    Ok(())
}

/// A call's arguments as JSON text (compact, as OpenAI sends them).
pub(crate) fn arguments_text(call: &ParsedCall) -> String {
    call.arguments.to_string()
}

/// `outputs` with the calls the answer holds taken out of its text (see the module's
/// notes); with no names (tools inactive), `outputs` unchanged. At most `limit` calls are
/// kept (`parallel_tool_calls: false` is 1), in the order written.
pub(crate) fn split_calls<S>(
    outputs: S,
    names: Vec<String>,
    limit: usize,
) -> impl Stream<Item = Output> + Send + 'static
where
    S: Stream<Item = Output> + Send + 'static,
{
    async_stream::stream! {
        let mut outputs = std::pin::pin!(outputs);
        if names.is_empty() {
            while let Some(output) = outputs.next().await {
                yield output;
            }
            return;
        }
        let mut scanner = CallScanner::new();
        let mut held_logprobs = Vec::new();
        while let Some(output) = outputs.next().await {
            match output {
                Output::Text { text, logprobs } => {
                    let shown = scanner.push(&text);
                    if shown.is_empty() {
                        held_logprobs.extend(logprobs);
                    } else {
                        let mut all = std::mem::take(&mut held_logprobs);
                        all.extend(logprobs);
                        yield Output::Text { text: shown, logprobs: all };
                    }
                }
                Output::Done { reason, usage, timings } => {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let parsed = std::mem::take(&mut scanner).finish(&names);
                    if !parsed.content.is_empty() || !held_logprobs.is_empty() {
                        yield Output::Text {
                            text: parsed.content,
                            logprobs: std::mem::take(&mut held_logprobs),
                        };
                    }
                    let mut calls = parsed.calls;
                    calls.truncate(limit);
                    if !calls.is_empty() {
                        yield Output::Calls(calls);
                    }
                    yield Output::Done { reason, usage, timings };
                    return;
                }
                other @ (Output::Failed(_) | Output::Calls(_)) => {
                    yield other;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use canopy_proto::{FinishReason, Usage};

    use super::*;
    use crate::api::task::Timings;

    fn spec(name: &str) -> ToolSpec {
        tool_spec("tools[0]", name, None, None).expect("valid")
    }

    #[test]
    fn names_and_schemas_are_checked() {
        assert!(tool_spec("tools[0]", "get_weather-2", None, None).is_ok());
        for bad in ["", "has space", "dot.ted", &"x".repeat(65)] {
            let err = tool_spec("tools[0]", bad, None, None).expect_err(bad);
            assert_eq!(err.param(), Some("tools[0].name"));
        }
        let err = tool_spec("tools[1]", "f", None, Some(Value::from(3))).expect_err("number");
        assert_eq!(err.param(), Some("tools[1].parameters"));
        let err = check_tool_list("tools", &[spec("f"), spec("g"), spec("f")]).expect_err("dup");
        assert_eq!(err.param(), Some("tools[2].name"));
    }

    #[test]
    fn the_choice_decides_what_the_request_carries() {
        let tools = vec![spec("f"), spec("g")];
        let request = || GenerateRequest {
            prompt: canopy_proto::Prompt::Text(String::new()),
            params: Default::default(),
            tools: Vec::new(),
        };

        let mut auto = request();
        Tools::new(tools.clone(), None, "tool_choice")
            .expect("auto")
            .apply(&mut auto, "response_format")
            .expect("applies");
        assert_eq!(auto.tools.len(), 2);
        assert_eq!(auto.params.constraint, None);

        let mut none = request();
        let off = Tools::new(tools.clone(), Some(ToolChoice::None), "tool_choice").expect("none");
        off.apply(&mut none, "response_format").expect("applies");
        assert!(none.tools.is_empty() && off.names().is_empty());

        let mut named = request();
        Tools::new(
            tools.clone(),
            Some(ToolChoice::Named("g".into())),
            "tool_choice",
        )
        .expect("named")
        .apply(&mut named, "response_format")
        .expect("applies");
        assert_eq!(
            named.params.constraint,
            Some(Constraint::ToolCall(vec![spec("g")]))
        );

        let err = Tools::new(
            tools.clone(),
            Some(ToolChoice::Named("h".into())),
            "tool_choice",
        )
        .expect_err("unknown");
        assert_eq!(err.param(), Some("tool_choice"));
        let err = Tools::new(Vec::new(), Some(ToolChoice::Required), "tool_choice")
            .expect_err("no tools");
        assert_eq!(err.param(), Some("tool_choice"));

        let mut both = request();
        both.params.constraint = Some(Constraint::JsonObject);
        let err = Tools::new(tools, Some(ToolChoice::Required), "tool_choice")
            .expect("required")
            .apply(&mut both, "response_format")
            .expect_err("conflict");
        assert_eq!(err.param(), Some("response_format"));
    }

    fn text(t: &str) -> Output {
        Output::Text {
            text: t.into(),
            logprobs: Vec::new(),
        }
    }

    fn done() -> Output {
        Output::Done {
            reason: FinishReason::Stop,
            usage: Usage::default(),
            timings: Timings::default(),
        }
    }

    async fn split(pieces: Vec<Output>, names: &[&str], limit: usize) -> Vec<Output> {
        let names = names.iter().map(|n| n.to_string()).collect();
        split_calls(futures::stream::iter(pieces), names, limit)
            .collect()
            .await
    }

    #[tokio::test]
    async fn calls_come_out_of_the_text_before_the_end() {
        let call = |n: u32| {
            format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"n\": {n}}}}}\n</tool_call>")
        };
        let pieces = vec![text("Checking. "), text(&call(1)), text(&call(2)), done()];
        let out = split(pieces.clone(), &["f"], 8).await;
        assert_eq!(out[0], text("Checking. "));
        let Output::Calls(calls) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments, serde_json::json!({"n": 2}));
        assert_eq!(out[2], done());
        assert_eq!(out.len(), 3);

        let one = split(pieces.clone(), &["f"], 1).await;
        assert!(matches!(&one[1], Output::Calls(c) if c.len() == 1));

        // Unknown tool: the answer is text, whole.
        let out = split(pieces.clone(), &["g"], 8).await;
        let shown: String = out
            .iter()
            .filter_map(|o| match o {
                Output::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(shown, format!("Checking. {}{}", call(1), call(2)));
        assert!(!out.iter().any(|o| matches!(o, Output::Calls(_))));

        // Inactive: unchanged.
        assert_eq!(split(pieces.clone(), &[], 8).await, pieces);
    }
}
