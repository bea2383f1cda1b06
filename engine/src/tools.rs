//! Tool calls as the model writes them: the format, the prompt that teaches it to a model
//! whose chat template knows no tools, and the parser that finds calls in an answer.
//!
//! The format is the Hermes one, which Qwen's and Hermes' own templates also teach:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! A chat template that renders `tools` itself (it shows a probe tool's name when given one;
//! see [`crate::chat::ChatTemplate::knows_tools`]) gets the tools, the assistant turns'
//! `tool_calls` and the `tool` turns as Hugging Face passes them. For any other template, the
//! engine adds [`system_prompt`] to the system message, writes earlier calls into the
//! assistant turns in this format and a tool's answer as a user turn
//! `<tool_response>\n...\n</tool_response>`.
//!
//! [`parse`] reads an answer: every `<tool_call>` block (the closing tag may be missing at
//! the very end) must hold a JSON object naming one of the request's tools, with its
//! `arguments` (or `parameters`, as Llama's templates say) an object; or, without blocks,
//! the whole answer may be one such object. An answer that holds a block that does not
//! parse, or names an unknown tool, has no calls: all of it is text, as the model wrote it.
//! [`CallScanner`] does the same for a stream, passing text through until a call may begin.

use canopy_proto::{ChatMessage, ToolSpec};
use serde_json::Value;

/// Opens a call.
pub const CALL_OPEN: &str = "<tool_call>";

/// Closes a call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// The text of one call of `name` with `arguments` (JSON text), as the model writes it.
pub fn call_text(name: &str, arguments: &str) -> String {
    let name = json_text(&Value::String(name.to_string()));
    format!("{CALL_OPEN}\n{{\"name\": {name}, \"arguments\": {arguments}}}\n{CALL_CLOSE}")
}

/// A tool as Hugging Face's templates take it: `{"type": "function", "function": {...}}`,
/// its parameters parsed (an unparsable schema, which the API refuses, shows as a string).
pub fn tool_value(tool: &ToolSpec) -> Value {
    let mut function = serde_json::Map::new();
    function.insert("name".into(), Value::String(tool.name.clone()));
    if let Some(description) = &tool.description {
        function.insert("description".into(), Value::String(description.clone()));
    }
    function.insert("parameters".into(), json_or_string(&tool.parameters));
    serde_json::json!({"type": "function", "function": function})
}

/// `value` as JSON text laid out as Python's `json.dumps` lays it out (`", "` and `": "`),
/// the layout of the tools' description and of a forced call's arguments: the chat
/// template's own `tojson`.
pub fn json_text(value: &Value) -> String {
    crate::chat::python_json_text(value)
}

/// `text` parsed as JSON, or as a JSON string if it is not JSON.
pub(crate) fn json_or_string(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// The system text that shows `tools` to a model whose template knows none.
pub fn system_prompt(tools: &[ToolSpec]) -> String {
    let mut text = String::from(
        "You can call functions to help answer. These are their JSON Schema signatures:\n\
         <tools>\n",
    );
    for tool in tools {
        text.push_str(&json_text(&tool_value(tool)));
        text.push('\n');
    }
    text.push_str(
        "</tools>\n\
         To call a function, answer with nothing but its name and arguments in this form:\n",
    );
    text.push_str(&call_text("function-name", "{\"argument\": \"value\"}"));
    text
}

/// `messages` rewritten for a template that knows no tools: the tools' description joined
/// to the system message (one is added first if there is none), earlier calls written into
/// their assistant turns, and each run of `tool` turns one user turn of
/// `<tool_response>` blocks.
pub(crate) fn as_plain_turns(messages: &[ChatMessage], tools: &[ToolSpec]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let (system, rest) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" && !tools.is_empty() => (Some(first), rest),
        _ => (None, messages),
    };
    if !tools.is_empty() {
        let prompt = system_prompt(tools);
        let content = match system {
            Some(first) if !first.content.is_empty() => format!("{}\n\n{prompt}", first.content),
            _ => prompt,
        };
        out.push(ChatMessage::new("system", content));
    }
    let mut previous_was_tool = false;
    for message in rest {
        match message.role.as_str() {
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", message.content);
                match out.last_mut() {
                    Some(last) if previous_was_tool => {
                        last.content.push('\n');
                        last.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", block)),
                }
                previous_was_tool = true;
            }
            _ => {
                let mut content = message.content.clone();
                for call in &message.tool_calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&call_text(&call.name, &call.arguments));
                }
                out.push(ChatMessage::new(message.role.clone(), content));
                previous_was_tool = false;
            }
        }
    }
    out
}

/// One call found in an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    /// The tool called (one of the request's).
    pub name: String,
    /// Its arguments: a JSON object.
    pub arguments: Value,
}

/// An answer split into its text and its calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// The text outside the calls (trimmed when there are calls).
    pub content: String,
    /// The calls, in order; empty when the answer holds none that parse.
    pub calls: Vec<ParsedCall>,
}

/// Splits `text` into its text and its calls of the tools named `names` (see the module's
/// notes).
pub fn parse(text: &str, names: &[&str]) -> Parsed {
    let plain = || Parsed {
        content: text.to_string(),
        calls: Vec::new(),
    };
    if !text.contains(CALL_OPEN) {
        return match call_of(text, names) {
            Some(call) => Parsed {
                content: String::new(),
                calls: vec![call],
            },
            None => plain(),
        };
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(CALL_OPEN) {
        content.push_str(&rest[..start]);
        let body = &rest[start + CALL_OPEN.len()..];
        let (inner, after) = match body.find(CALL_CLOSE) {
            Some(end) => (&body[..end], &body[end + CALL_CLOSE.len()..]),
            None => (body, ""),
        };
        match call_of(inner, names) {
            Some(call) => calls.push(call),
            None => return plain(),
        }
        rest = after;
    }
    content.push_str(rest);
    Parsed {
        content: content.trim().to_string(),
        calls,
    }
}

/// The call `text` holds: one JSON object naming a known tool, with an object of arguments.
fn call_of(text: &str, names: &[&str]) -> Option<ParsedCall> {
    let trimmed = text.trim();
    if !trimmed.starts_with('{') {
        return None;
    }
    let Value::Object(mut call) = serde_json::from_str::<Value>(trimmed).ok()? else {
        return None;
    };
    let name = call.get("name")?.as_str()?.to_string();
    if !names.contains(&name.as_str()) {
        return None;
    }
    let arguments = call
        .remove("arguments")
        .or_else(|| call.remove("parameters"))
        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    let arguments = match arguments {
        // Some models write the arguments as a JSON string.
        Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
        other => other,
    };
    arguments
        .is_object()
        .then_some(ParsedCall { name, arguments })
}

/// Finds calls in a streamed answer: [`CallScanner::push`] hands back the text that can be
/// shown now, and holds the rest from where a call may begin (a `<tool_call>` or a prefix of
/// one at the end, or an answer that so far is a `{` after blanks) to the end, where
/// [`CallScanner::finish`] parses it. Pieces shown plus the finished part equal [`parse`] of
/// the whole answer.
#[derive(Debug, Clone, Default)]
pub struct CallScanner {
    /// Text not shown yet.
    held: String,
    /// Whether anything but blanks was shown (a bare JSON call can then no longer begin).
    shown: bool,
    /// Whether a call began: everything from there on is held.
    holding: bool,
}

impl CallScanner {
    /// A scanner of a fresh answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next piece; returns what can be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.holding {
            return String::new();
        }
        if !self.shown {
            let rest = self.held.trim_start();
            if rest.is_empty() {
                return String::new();
            }
            if rest.starts_with('{') {
                self.holding = true;
                return String::new();
            }
        }
        if let Some(start) = self.held.find(CALL_OPEN) {
            self.holding = true;
            let shown: String = self.held.drain(..start).collect();
            self.shown |= !shown.trim().is_empty();
            return shown;
        }
        // Keep back the longest end that could still grow into `<tool_call>`.
        let keep = (1..CALL_OPEN.len())
            .rev()
            .find(|&n| self.held.ends_with(&CALL_OPEN[..n]))
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let shown: String = self.held.drain(..cut).collect();
        self.shown |= !shown.trim().is_empty();
        shown
    }

    /// Ends the answer: the held text split into text and calls of the tools named `names`.
    pub fn finish(self, names: &[&str]) -> Parsed {
        if self.holding {
            parse(&self.held, names)
        } else {
            Parsed {
                content: self.held,
                calls: Vec::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["get_weather", "add"];

    fn spec(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: Some("does it".into()),
            parameters: r#"{"type": "object", "properties": {"city": {"type": "string"}}}"#.into(),
        }
    }

    #[test]
    fn a_call_block_parses_with_its_surrounding_text() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Paris\"}}\n</tool_call>";
        let parsed = parse(text, NAMES);
        assert_eq!(parsed.content, "Let me look.");
        assert_eq!(
            parsed.calls,
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: serde_json::json!({"city": "Paris"}),
            }]
        );
    }

    #[test]
    fn several_blocks_a_missing_close_and_string_arguments_parse() {
        let text = "<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>\n\
                    <tool_call>{\"name\": \"add\", \"parameters\": {\"a\": 2}}";
        let parsed = parse(text, NAMES);
        assert_eq!(parsed.content, "");
        let args: Vec<_> = parsed.calls.iter().map(|c| c.arguments.clone()).collect();
        assert_eq!(
            args,
            vec![serde_json::json!({"a": 1}), serde_json::json!({"a": 2})]
        );
    }

    #[test]
    fn a_bare_json_call_parses_but_other_json_is_text() {
        let call = parse(r#" {"name": "add", "arguments": {"a": 1}} "#, NAMES);
        assert_eq!(call.calls.len(), 1);
        for text in [
            r#"{"name": "unknown", "arguments": {}}"#,
            r#"{"city": "Paris"}"#,
            r#"{"name": "add", "arguments": [1]}"#,
            "plain words",
        ] {
            let parsed = parse(text, NAMES);
            assert!(parsed.calls.is_empty(), "{text}");
            assert_eq!(parsed.content, text);
        }
    }

    #[test]
    fn a_broken_or_unknown_block_leaves_the_whole_answer_as_text() {
        for text in [
            "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": </tool_call>",
            "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
            "ok <tool_call>{\"name\": \"add\", \"arguments\": {}}</tool_call> \
             <tool_call>junk</tool_call>",
        ] {
            let parsed = parse(text, NAMES);
            assert!(parsed.calls.is_empty(), "{text}");
            assert_eq!(parsed.content, text);
        }
    }

    #[test]
    fn the_scanner_shows_text_and_holds_from_where_a_call_may_begin() {
        let answer = "Sure, <tool_ca? no. Then <tool_call>\n{\"name\": \"add\", \"arguments\": \
                      {\"a\": 1}}\n</tool_call>";
        for step in [1, 2, 3, 5, 7, 64] {
            let mut scanner = CallScanner::new();
            let mut shown = String::new();
            let chars: Vec<char> = answer.chars().collect();
            for piece in chars.chunks(step) {
                let piece: String = piece.iter().collect();
                let now = scanner.push(&piece);
                assert!(!now.contains('<') || now.contains("<tool_ca?"), "{now:?}");
                shown.push_str(&now);
            }
            assert_eq!(shown, "Sure, <tool_ca? no. Then ", "step {step}");
            let parsed = scanner.finish(NAMES);
            assert_eq!(parsed.calls.len(), 1, "step {step}");
            assert_eq!(parsed.content, "");
        }
    }

    #[test]
    fn the_scanner_holds_a_leading_json_object_and_passes_plain_answers() {
        let mut scanner = CallScanner::new();
        assert_eq!(scanner.push("  "), "");
        assert_eq!(scanner.push("{\"name\": \"add\", "), "");
        assert_eq!(scanner.push("\"arguments\": {}}"), "");
        assert_eq!(scanner.finish(NAMES).calls.len(), 1);

        let mut scanner = CallScanner::new();
        assert_eq!(scanner.push(" Hello"), " Hello");
        assert_eq!(scanner.push(" {not a call}"), " {not a call}");
        assert_eq!(scanner.finish(NAMES), Parsed::default());

        let mut scanner = CallScanner::new();
        assert_eq!(scanner.push("{\"x\": 1}"), "");
        let parsed = scanner.finish(NAMES);
        assert_eq!(parsed.content, "{\"x\": 1}");
        assert!(parsed.calls.is_empty());
    }

    #[test]
    fn plain_turns_carry_the_tools_calls_and_answers() {
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls.push(canopy_proto::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        });
        let mut answer = ChatMessage::new("tool", "sunny");
        answer.tool_call_id = Some("call_1".into());
        let messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            assistant,
            answer.clone(),
            answer,
        ];
        let turns = as_plain_turns(&messages, &[spec("get_weather")]);
        let roles: Vec<_> = turns.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(turns[0].content.starts_with("Be brief.\n\n"));
        assert!(turns[0].content.contains(r#""name": "get_weather""#));
        assert_eq!(
            turns[2].content,
            call_text("get_weather", r#"{"city": "Paris"}"#)
        );
        assert_eq!(
            turns[3].content,
            "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
        let no_system = as_plain_turns(&messages[1..2], &[spec("add")]);
        assert_eq!(no_system[0].role, "system");
        assert_eq!(no_system.len(), 2);
        assert_eq!(
            as_plain_turns(&messages[1..2], &[]),
            messages[1..2].to_vec()
        );
    }
}
