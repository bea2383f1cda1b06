//! Chat templates rendered with minijinja against the reference implementation: Python
//! `jinja2` configured as Hugging Face's `apply_chat_template`
//! (tests/data/chat_reference.json, made by tests/data/gen_chat_reference.py).

mod common;

use canopy_engine::EngineError;
use canopy_engine::chat::{CHATML_TEMPLATE, ChatTemplate, ChatTemplateError};
use canopy_engine::gguf::GgufFile;
use canopy_proto::ChatMessage;
use serde_json::Value;

fn reference() -> Value {
    let path = common::data_path("chat_reference.json");
    let text = std::fs::read_to_string(&path).expect("read the chat reference");
    serde_json::from_str(&text).expect("parse the chat reference")
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().expect("role").to_string(),
                m["content"].as_str().expect("content").to_string(),
            )
        })
        .collect()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role.to_string(), content.to_string())
}

#[test]
fn renders_like_the_reference() {
    let file = GgufFile::open(common::model_path()).expect("open the default model");
    let model_template = ChatTemplate::from_gguf(&file)
        .expect("compile the model's template")
        .expect("the model has a template");
    let reference = reference();
    assert_eq!(
        model_template.source(),
        reference["model_template"]
            .as_str()
            .expect("model template"),
        "the reference was made from this model's template"
    );
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let source = case["template"].as_str().expect("template");
        let bos = case["bos_token"].as_str().expect("bos");
        let eos = case["eos_token"].as_str().expect("eos");
        let own;
        let template = if source == "model" {
            assert_eq!(model_template.bos_token(), bos, "{name}: bos_token");
            assert_eq!(model_template.eos_token(), eos, "{name}: eos_token");
            &model_template
        } else {
            own = ChatTemplate::new(source, bos, eos).expect("compile");
            &own
        };
        let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("flag");
        let rendered = template.render(&messages(case), add_generation_prompt);
        match (case.get("expected"), case.get("error")) {
            (Some(expected), _) => {
                let rendered = rendered.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(rendered, expected.as_str().expect("expected"), "{name}");
            }
            (None, Some(error)) => {
                let err = rendered.expect_err(name);
                let error = error.as_str().expect("error");
                assert!(
                    matches!(&err, ChatTemplateError::Raised(m) if m == error),
                    "{name}: expected the template to raise {error:?}, got {err:?}"
                );
            }
            (None, None) => panic!("{name}: case has neither expected nor error"),
        }
    }
}

#[test]
fn default_model_system_user_assistant_prompt() {
    let file = GgufFile::open(common::model_path()).expect("open the default model");
    let template = ChatTemplate::from_gguf_or_chatml(&file).expect("template");
    let text = template
        .render(
            &[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "Hello."),
            ],
            true,
        )
        .expect("render");
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chatml_fallback() {
    let template = ChatTemplate::chatml("", "<|im_end|>").expect("chatml");
    assert_eq!(template.source(), CHATML_TEMPLATE);
    let text = template.render(&[msg("user", "Hi")], true).expect("render");
    assert_eq!(
        text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = template
        .render(&[msg("user", "Hi")], false)
        .expect("render");
    assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n");
}

#[test]
fn syntax_error_is_reported_at_compile_time() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "")
        .expect_err("unclosed tags");
    let msg = err.to_string();
    assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err:?}");
    assert!(msg.contains("does not compile"), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");

    let engine: EngineError = err.into();
    assert!(matches!(engine, EngineError::InvalidModel { .. }));
}

#[test]
fn raise_exception_surfaces_the_message() {
    let template =
        ChatTemplate::new("{{ raise_exception('no system role, please') }}", "", "").expect("ok");
    let err = template.render(&[], false).expect_err("raises");
    assert!(
        matches!(&err, ChatTemplateError::Raised(m) if m == "no system role, please"),
        "{err:?}"
    );
    assert!(err.to_string().contains("no system role, please"));
    let engine: EngineError = err.into();
    assert!(matches!(engine, EngineError::InvalidRequest(_)));
}

#[test]
fn python_string_methods_work() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{{ m.content.strip().upper() }}|\
         {{ m.content.startswith(' he') }}|{{ m.content.split()|join(',') }}{% endfor %}",
        "",
        "",
    )
    .expect("compile");
    let text = template
        .render(&[msg("user", " hello world  ")], false)
        .expect("render");
    assert_eq!(text, "HELLO WORLD|True|hello,world");
}

#[test]
fn special_token_texts_come_from_the_file() {
    let file = GgufFile::open(common::model_path()).expect("open the default model");
    let template = ChatTemplate::from_gguf(&file)
        .expect("compile")
        .expect("has a template");
    assert_eq!(template.bos_token(), "<|im_start|>");
    assert_eq!(template.eos_token(), "<|im_end|>");
}

/// A synthetic llama GGUF with the given metadata added to a minimal vocabulary.
fn synthetic_model(dir: &tempfile::TempDir, template: Option<&str>) -> std::path::PathBuf {
    use candle_core::quantized::gguf_file::Value as G;
    let path = dir.path().join("tiny.gguf");
    let arch = G::String("llama".to_string());
    let tokens = G::Array(
        ["<s>", "</s>", "a"]
            .iter()
            .map(|t| G::String(t.to_string()))
            .collect(),
    );
    let bos = G::U32(0);
    let eos = G::U32(1);
    let template = template.map(|t| G::String(t.to_string()));
    let mut metadata: Vec<(&str, &G)> = vec![
        ("general.architecture", &arch),
        ("tokenizer.ggml.tokens", &tokens),
        ("tokenizer.ggml.bos_token_id", &bos),
        ("tokenizer.ggml.eos_token_id", &eos),
    ];
    if let Some(template) = &template {
        metadata.push(("tokenizer.chat_template", template));
    }
    canopy_engine::gguf::write_file(&path, &metadata, &[]).expect("write gguf");
    path
}

#[test]
fn a_broken_template_in_a_file_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic_model(&dir, Some("{% if messages %}unterminated"));
    let file = GgufFile::open(&path).expect("open");
    let err = ChatTemplate::from_gguf(&file).expect_err("does not compile");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("does not compile"), "{msg}");
}

#[test]
fn a_file_without_a_template_falls_back_to_chatml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic_model(&dir, None);
    let file = GgufFile::open(&path).expect("open");
    assert!(ChatTemplate::from_gguf(&file).expect("no error").is_none());
    let template = ChatTemplate::from_gguf_or_chatml(&file).expect("fallback");
    assert_eq!(template.source(), CHATML_TEMPLATE);
    assert_eq!(template.bos_token(), "<s>");
    assert_eq!(template.eos_token(), "</s>");
    let text = template.render(&[msg("user", "a")], true).expect("render");
    assert_eq!(
        text,
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// A small template in the style of Qwen's, which renders tools, calls and tool turns (its
/// `{%-` tags eat the newline before them, as Jinja's do).
const TOOL_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\n# Tools\n\
{%- for tool in tools %}\n{{ tool | tojson }}{% endfor %}<|im_end|>\n{% endif %}\
{%- for message in messages %}\
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n\
{%- for call in message.tool_calls %}<tool_call>{{ {'name': call.function.name, \
'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}<|im_end|>\n\
{%- elif message.role == 'tool' %}<|im_start|>tool\n{{ message.tool_call_id }}: \
{{ message.content }}<|im_end|>\n\
{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}\
{%- endfor %}";

fn tool_turns() -> (Vec<ChatMessage>, Vec<canopy_proto::ToolSpec>) {
    let mut call = msg("assistant", "");
    call.tool_calls.push(canopy_proto::ToolCall {
        id: "call_1".into(),
        name: "add".into(),
        arguments: r#"{"a": 1, "b": 2}"#.into(),
    });
    let mut answer = msg("tool", "3");
    answer.tool_call_id = Some("call_1".into());
    let tool = canopy_proto::ToolSpec {
        name: "add".into(),
        description: Some("Adds.".into()),
        parameters: r#"{"type": "object"}"#.into(),
    };
    (vec![msg("user", "1+2?"), call, answer], vec![tool])
}

#[test]
fn a_template_that_knows_tools_renders_them_its_own_way() {
    let template = ChatTemplate::new(TOOL_TEMPLATE, "", "").expect("compiles");
    assert!(template.knows_tools());
    let (turns, tools) = tool_turns();
    let text = template
        .render_with_tools(&turns, &tools, false)
        .expect("renders");
    assert_eq!(
        text,
        "<|im_start|>system\n# Tools{\"type\": \"function\", \"function\": {\"name\": \"add\", \
         \"description\": \"Adds.\", \"parameters\": {\"type\": \"object\"}}}<|im_end|>\n\
         <|im_start|>user\n1+2?<|im_end|>\n\
         <|im_start|>assistant<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\
         </tool_call><|im_end|><|im_start|>tool\ncall_1: 3<|im_end|>"
    );
}

#[test]
fn a_template_that_knows_no_tools_gets_them_as_plain_turns() {
    let template = ChatTemplate::new(CHATML_TEMPLATE, "", "").expect("compiles");
    assert!(!template.knows_tools());
    let (turns, tools) = tool_turns();
    let text = template
        .render_with_tools(&turns, &tools, true)
        .expect("renders");
    assert!(
        text.starts_with("<|im_start|>system\nYou can call functions"),
        "{text}"
    );
    assert!(
        text.contains("\"name\": \"add\", \"description\": \"Adds.\""),
        "{text}"
    );
    assert!(
        text.contains(
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": \
             {\"a\": 1, \"b\": 2}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        ),
        "{text}"
    );
    // Without tools, and without tool turns, the render is the plain one.
    let plain = template.render(&turns[..1], true).expect("renders");
    assert_eq!(
        plain,
        "<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n"
    );
}
