//! Tool calls with the real default model through `CandleEngine`: a forced call (the
//! `Constraint::ToolCall` grammar) is always one well-formed call of an offered tool whose
//! arguments validate, and the tools reach the prompt of a template that knows none.

mod common;

use common::{Collect, chat};

use std::sync::Mutex;

use canopy_engine::tools::{self, ParsedCall};
use canopy_engine::{CandleEngine, Engine, EngineError};
use canopy_proto::{Constraint, FinishReason, GenerateParams, GenerateRequest, ToolSpec};

fn engine() -> &'static Mutex<CandleEngine> {
    common::shared_engine()
}

fn lock() -> std::sync::MutexGuard<'static, CandleEngine> {
    match engine().lock() {
        Ok(e) => e,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn generate(request: &GenerateRequest) -> Result<(FinishReason, Collect), EngineError> {
    let mut sink = Collect::default();
    let outcome = lock().generate(request, &mut sink)?;
    Ok((outcome.finish_reason, sink))
}

fn weather() -> ToolSpec {
    ToolSpec {
        name: "get_weather".into(),
        description: Some("The current weather in a city.".into()),
        parameters: r#"{"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}"#
            .into(),
    }
}

fn add() -> ToolSpec {
    ToolSpec {
        name: "add".into(),
        description: Some("Adds two integers.".into()),
        parameters: r#"{"type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": false}"#
            .into(),
    }
}

fn forced(
    user: &str,
    offered: Vec<ToolSpec>,
    allowed: Vec<ToolSpec>,
    seed: u64,
) -> GenerateRequest {
    let mut request = chat(
        user,
        GenerateParams {
            max_tokens: 120,
            temperature: 1.3,
            seed,
            constraint: Some(Constraint::ToolCall(allowed)),
            ..GenerateParams::default()
        },
    );
    request.tools = offered;
    request
}

fn the_call(text: &str, names: &[&str]) -> ParsedCall {
    let parsed = tools::parse(text, names);
    assert_eq!(parsed.content, "", "{text:?}");
    assert_eq!(parsed.calls.len(), 1, "{text:?}");
    parsed.calls.into_iter().next().expect("one call")
}

#[test]
fn a_forced_call_is_always_one_valid_call_of_an_offered_tool() {
    // Sampled at a high temperature, so that the grammar, not the model, keeps it valid.
    for seed in 0..4 {
        let request = forced(
            "What is the weather in Paris, and what is 2 + 3?",
            vec![weather(), add()],
            vec![weather(), add()],
            seed,
        );
        let (finish, sink) = generate(&request).expect("generates");
        let text = sink.text();
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        assert!(text.starts_with(tools::CALL_OPEN), "{text:?}");
        let call = the_call(&text, &["get_weather", "add"]);
        let args = call.arguments.as_object().expect("an object");
        match call.name.as_str() {
            "get_weather" => {
                assert!(
                    args["city"]
                        .as_str()
                        .is_some_and(|c| c.chars().count() <= 30)
                );
                assert!(matches!(
                    args["unit"].as_str(),
                    Some("celsius" | "fahrenheit")
                ));
                assert_eq!(args.len(), 2, "{text}");
            }
            "add" => {
                assert!(args["a"].is_i64() && args["b"].is_i64(), "{text}");
                assert_eq!(args.len(), 2, "{text}");
            }
            other => panic!("called {other}"),
        }
    }
}

#[test]
fn a_named_call_calls_that_tool_and_is_repeatable_greedy() {
    let mut request = forced("Add 2 and 3.", vec![weather(), add()], vec![add()], 0);
    request.params.temperature = 0.0;
    let (finish, first) = generate(&request).expect("generates");
    assert_eq!(finish, FinishReason::Stop);
    let call = the_call(&first.text(), &["get_weather", "add"]);
    assert_eq!(call.name, "add");
    let (_, again) = generate(&request).expect("generates");
    assert_eq!(first.ids(), again.ids());
}

#[test]
fn tools_reach_the_prompt_of_a_template_that_knows_none() {
    let engine = lock();
    let prompt = engine
        .prompt_text(
            &chat("Weather?", GenerateParams::default()).prompt,
            &[weather()],
        )
        .expect("renders");
    assert!(prompt.contains("<tools>"), "{prompt}");
    assert!(prompt.contains(r#""name": "get_weather""#), "{prompt}");
    assert!(prompt.contains(tools::CALL_OPEN), "{prompt}");
    let plain = engine
        .prompt_text(&chat("Weather?", GenerateParams::default()).prompt, &[])
        .expect("renders");
    assert!(!plain.contains("<tools>"));
}

#[test]
fn a_tool_with_a_bad_schema_is_refused() {
    let mut bad = add();
    bad.parameters = "[1, 2]".into();
    let request = forced("Add.", vec![bad.clone()], vec![bad], 0);
    let err = generate(&request).expect_err("refused");
    assert!(
        matches!(&err, EngineError::InvalidRequest(m) if m.contains("tool 'add'")),
        "{err}"
    );
}
