//! [`ChatTemplate`]: turn chat turns into the prompt text a model was trained on.
//!
//! The template is the Jinja source in the GGUF key `tokenizer.chat_template`, rendered with
//! [minijinja] set up the way Hugging Face's `apply_chat_template` sets up `jinja2`:
//!
//! - `trim_blocks` and `lstrip_blocks` on, a single trailing newline of the template dropped;
//! - the context holds `messages` (a list of `{role, content}` maps; an assistant turn's
//!   calls as `tool_calls: [{id, type: "function", function: {name, arguments}}]` with the
//!   arguments an object, a tool turn's `tool_call_id` and `name`), `add_generation_prompt`,
//!   `bos_token` and `eos_token` (the texts of the file's BOS and EOS tokens), `tools` (a list
//!   of `{type: "function", function: {name, description, parameters}}`, or `none`) and
//!   `documents` (`none`), as Hugging Face passes them;
//! - a template that does not render `tools` (it does not show a probe tool's name; see
//!   [`ChatTemplate::knows_tools`]) is given plain turns instead, with the tools described in
//!   the system message (see [`crate::tools`]);
//! - `raise_exception(message)` fails the render with that message (templates use it to
//!   reject conversations they cannot express, e.g. roles that do not alternate);
//! - `tojson` behaves like Python's `json.dumps(..., ensure_ascii=False)` (`", "` and `": "`
//!   separators, optional `indent` and `sort_keys`), not minijinja's HTML-safe variant;
//! - Python string, list and dict methods (`.strip()`, `.startswith()`, `.split()`,
//!   `.items()`, ...) come from `minijinja-contrib`'s `pycompat`; `loop_controls` gives
//!   `{% break %}` and `{% continue %}`.
//!
//! A file without a template gets [`ChatTemplate::chatml`] from
//! [`ChatTemplate::from_gguf_or_chatml`]: the ChatML format (`<|im_start|>role\n...<|im_end|>`)
//! that Hugging Face itself used as the default template. It is right for ChatML-trained
//! models and a reasonable guess for others; a warning is logged when it is used.
//!
//! A template that does not compile is an error when the [`ChatTemplate`] is made, so a bad
//! model fails at load time and not on its first request. `strftime_now` is not provided
//! (templates that use it test `is defined` first and fall back on their own).

use std::path::{Path, PathBuf};

use canopy_proto::{ChatMessage, ToolSpec};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, context};

use crate::error::EngineError;
use crate::gguf::{GgufError, GgufFile};

/// The GGUF metadata key holding the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// The ChatML template used when a file has none (Hugging Face's former default template).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The name the template is registered under (it shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// A chat template could not be loaded, compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// Reading the template or the BOS/EOS tokens from the file failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The template source is not valid Jinja.
    #[error("the chat template{} does not compile: {detail}", of_file(.path.as_deref()))]
    Syntax {
        /// The GGUF file the template came from, if it came from one.
        path: Option<PathBuf>,
        /// minijinja's message, with the line.
        detail: String,
    },
    /// The template called `raise_exception(message)`.
    #[error("the chat template rejected the conversation: {0}")]
    Raised(String),
    /// Rendering failed for another reason (an undefined attribute, a type error, ...).
    #[error("rendering the chat template failed: {0}")]
    Render(String),
}

impl From<ChatTemplateError> for EngineError {
    fn from(err: ChatTemplateError) -> Self {
        match err {
            ChatTemplateError::Gguf(e) => e.into(),
            ChatTemplateError::Syntax { path, detail } => EngineError::InvalidModel {
                model: path.map_or_else(
                    || "(chat template)".to_string(),
                    |p| p.display().to_string(),
                ),
                reason: format!("the chat template does not compile: {detail}"),
            },
            e @ (ChatTemplateError::Raised(_) | ChatTemplateError::Render(_)) => {
                EngineError::InvalidRequest(e.to_string())
            }
        }
    }
}

/// ` of model file PATH`, or nothing.
fn of_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" of model file {}", p.display()))
        .unwrap_or_default()
}

/// Marks an error as raised by the template's own `raise_exception`.
#[derive(Debug, thiserror::Error)]
#[error("raised by the template")]
struct RaisedByTemplate;

/// A compiled chat template with its BOS and EOS token texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    knows_tools: bool,
}

/// The name of the tool [`ChatTemplate::knows_tools`] probes a template with.
const PROBE_TOOL: &str = "canopy_probe_tool";

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("knows_tools", &self.knows_tools)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` with the given BOS and EOS token texts.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatTemplateError> {
        Self::compile(source.into(), bos_token.into(), eos_token.into(), None)
    }

    fn compile(
        source: String,
        bos_token: String,
        eos_token: String,
        path: Option<&Path>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatTemplateError::Syntax {
                path: path.map(Path::to_path_buf),
                detail: describe(&e),
            })?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatTemplateError::Syntax {
                path: path.map(Path::to_path_buf),
                detail: describe(&e),
            })?;
        let mut template = Self {
            env,
            source,
            bos_token,
            eos_token,
            knows_tools: false,
        };
        template.knows_tools = template.probe_tools();
        Ok(template)
    }

    /// Whether the template shows a tool it is given (a render with a probe tool holds the
    /// tool's name).
    fn probe_tools(&self) -> bool {
        let probe = ToolSpec {
            name: PROBE_TOOL.to_string(),
            description: Some("Probes the template.".to_string()),
            parameters: r#"{"type": "object", "properties": {}}"#.to_string(),
        };
        let tools = json_value([crate::tools::tool_value(&probe)]);
        self.render_value(
            messages_value(&[ChatMessage::new("user", "hi")]),
            tools,
            true,
        )
        .is_ok_and(|text| text.contains(PROBE_TOOL))
    }

    /// Whether the template renders `tools` itself; if not, [`render_with_tools`] describes
    /// them in the system message.
    ///
    /// [`render_with_tools`]: Self::render_with_tools
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// The file's template (`tokenizer.chat_template`), or `None` if it has none. BOS and
    /// EOS come from the file's token ids (empty text if it names none).
    pub fn from_gguf(file: &GgufFile) -> Result<Option<Self>, ChatTemplateError> {
        let Some(source) = file.string_opt(CHAT_TEMPLATE_KEY)? else {
            return Ok(None);
        };
        let (bos, eos) = special_token_texts(file)?;
        Self::compile(source.to_string(), bos, eos, Some(file.path())).map(Some)
    }

    /// The file's template, or [`chatml`](Self::chatml) (with a warning) if it has none.
    pub fn from_gguf_or_chatml(file: &GgufFile) -> Result<Self, ChatTemplateError> {
        if let Some(template) = Self::from_gguf(file)? {
            return Ok(template);
        }
        tracing::warn!(
            path = %file.path().display(),
            "model file has no {CHAT_TEMPLATE_KEY}; using the ChatML template"
        );
        let (bos, eos) = special_token_texts(file)?;
        Self::compile(CHATML_TEMPLATE.to_string(), bos, eos, None)
    }

    /// The ChatML template, with the given BOS and EOS texts.
    pub fn chatml(
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatTemplateError> {
        Self::new(CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// Renders the conversation. With `add_generation_prompt`, the template appends the
    /// start of an assistant turn for the model to complete.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders the conversation with `tools` shown to the model: as the template renders
    /// them if it [knows tools](Self::knows_tools), else described in the system message and
    /// the turns' calls and tool answers written as text (see [`crate::tools`]).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let has_tool_turns = messages
            .iter()
            .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        if self.knows_tools || (tools.is_empty() && !has_tool_turns) {
            let tools = if tools.is_empty() {
                Value::from(())
            } else {
                json_value(
                    tools
                        .iter()
                        .map(crate::tools::tool_value)
                        .collect::<Vec<_>>(),
                )
            };
            self.render_value(messages_value(messages), tools, add_generation_prompt)
        } else {
            let turns = crate::tools::as_plain_turns(messages, tools);
            self.render_value(
                messages_value(&turns),
                Value::from(()),
                add_generation_prompt,
            )
        }
    }

    fn render_value(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => tools,
            documents => Value::from(()),
        };
        template.render(ctx).map_err(|e| {
            if is_raised(&e) {
                ChatTemplateError::Raised(e.detail().unwrap_or_default().to_string())
            } else {
                ChatTemplateError::Render(describe(&e))
            }
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token text the template sees as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token text the template sees as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// The messages as the template sees them: a list of `{role, content}` maps, with
/// `tool_calls` on an assistant turn that made calls and `tool_call_id` / `name` on a tool
/// turn that has them.
fn messages_value(messages: &[ChatMessage]) -> Value {
    messages
        .iter()
        .map(|m| {
            let mut pairs = vec![
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(m.content.as_str())),
            ];
            if !m.tool_calls.is_empty() {
                let calls: Vec<serde_json::Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id,
                            "type": "function",
                            "function": {
                                "name": c.name,
                                "arguments": crate::tools::json_or_string(&c.arguments),
                            },
                        })
                    })
                    .collect();
                pairs.push(("tool_calls", json_value(calls)));
            }
            if let Some(id) = &m.tool_call_id {
                pairs.push(("tool_call_id", Value::from(id.as_str())));
            }
            if let Some(name) = &m.name {
                pairs.push(("name", Value::from(name.as_str())));
            }
            Value::from_pairs(pairs)
        })
        .collect()
}

/// The texts of the file's BOS and EOS tokens (empty when it names none).
fn special_token_texts(file: &GgufFile) -> Result<(String, String), GgufError> {
    let tokens = match file.get("tokenizer.ggml.tokens") {
        Some(_) => file.string_array("tokenizer.ggml.tokens")?,
        None => Vec::new(),
    };
    let text = |key: &str| -> Result<String, GgufError> {
        Ok(file
            .u32_opt(key)?
            .and_then(|id| tokens.get(id as usize))
            .map(|t| t.to_string())
            .unwrap_or_default())
    };
    Ok((
        text("tokenizer.ggml.bos_token_id")?,
        text("tokenizer.ggml.eos_token_id")?,
    ))
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message).with_source(RaisedByTemplate))
}

fn is_raised(err: &minijinja::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if s.is::<RaisedByTemplate>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// minijinja's message with the template line, on one line.
fn describe(err: &minijinja::Error) -> String {
    let mut text = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    if let Some(line) = err.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=..., sort_keys=...)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent must be an integer or a string, not {v}"),
                    )
                })?;
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            }
        },
    };
    let mut out = String::new();
    let style = JsonStyle {
        indent: indent.as_deref(),
        sort_keys: sort_keys.unwrap_or(false),
    };
    write_python_json(&mut out, &value, style, 0)?;
    Ok(Value::from_safe_string(out))
}

/// How [`write_python_json`] lays out its output.
#[derive(Clone, Copy)]
struct JsonStyle<'a> {
    indent: Option<&'a str>,
    sort_keys: bool,
}

/// Writes `value` as Python's `json.dumps` does with `ensure_ascii=False`, keeping the
/// order of map keys (unless sorting).
fn write_python_json(
    out: &mut String,
    value: &Value,
    style: JsonStyle<'_>,
    depth: usize,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(unit) = style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(unit);
            }
        }
    };
    let item_sep = if style.indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value)),
        ValueKind::String | ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid => {
            let text = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            out.push_str(&serde_json::Value::String(text).to_string());
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key_text = key.as_str().map_or_else(|| key.to_string(), str::to_string);
                out.push_str(&serde_json::Value::String(key_text).to_string());
                out.push_str(": ");
                let item = value.get_item(key)?;
                write_python_json(out, &item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            let text = value.to_string();
            out.push_str(&serde_json::Value::String(text).to_string());
        }
    }
    Ok(())
}

/// A number as Python prints it in JSON (`1`, `1.0`, `0.5`).
fn python_number(value: &Value) -> String {
    if let Ok(i) = i64::try_from(value.clone())
        && value.as_i64().is_some()
    {
        return i.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => format!("{f:.1}"),
        Ok(f) if f.is_nan() => "NaN".to_string(),
        Ok(f) if f.is_infinite() => if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string(),
        Ok(f) => f.to_string(),
        Err(_) => value.to_string(),
    }
}

/// `value` as the template's `tojson` writes it (Python's `json.dumps` layout, keys in
/// order).
pub(crate) fn python_json_text(value: &serde_json::Value) -> String {
    let style = JsonStyle {
        indent: None,
        sort_keys: false,
    };
    let mut out = String::new();
    // A JSON value has no kind `write_python_json` refuses.
    let _ = write_python_json(&mut out, &json_value(value), style, 0);
    out
}

/// A serializable value (JSON) as the template sees it.
fn json_value(value: impl serde::Serialize) -> Value {
    Value::from(minijinja::value::Serde(value))
}
