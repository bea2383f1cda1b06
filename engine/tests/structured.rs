//! Shaped sampling with the real default model through `CandleEngine`: grammar-constrained
//! output (a JSON schema, any JSON object), log-probabilities, and the checks on what a
//! request may shape.

mod common;

use common::{Collect, chat};

use std::sync::Mutex;

use canopy_engine::{CandleEngine, Engine, EngineError};
use canopy_proto::{Constraint, FinishReason, GenerateParams, GenerateRequest};
use serde_json::Value;

fn engine() -> &'static Mutex<CandleEngine> {
    common::shared_engine()
}

fn generate(request: &GenerateRequest) -> Result<(FinishReason, Collect), EngineError> {
    let mut engine = match engine().lock() {
        Ok(e) => e,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut sink = Collect::default();
    let outcome = engine.generate(request, &mut sink)?;
    Ok((outcome.finish_reason, sink))
}

const PERSON: &str = r#"{"type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                            "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": false}"#;

#[test]
fn json_schema_output_always_parses_and_validates() {
    // Sampled at a high temperature, so that the grammar, not the model, keeps it valid.
    for seed in 0..4 {
        let request = chat(
            "Describe a person.",
            GenerateParams {
                max_tokens: 120,
                temperature: 1.3,
                seed,
                constraint: Some(Constraint::JsonSchema(PERSON.into())),
                ..GenerateParams::default()
            },
        );
        let (finish, sink) = generate(&request).expect("generates");
        let text = sink.text();
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("seed {seed}: not JSON ({e}): {text:?}");
        });
        let object = value.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["age", "name", "pets"], "{text}");
        assert!(
            object["name"]
                .as_str()
                .is_some_and(|n| n.chars().count() <= 20)
        );
        assert!(object["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
        let pets = object["pets"].as_array().expect("pets is an array");
        assert!(pets.len() <= 3);
        assert!(
            pets.iter()
                .all(|p| matches!(p.as_str(), Some("cat" | "dog" | "fish"))),
            "{text}"
        );
    }
}

#[test]
fn constrained_output_is_the_same_every_run() {
    for (temperature, seed) in [(0.0, 0), (0.9, 11)] {
        let request = chat(
            "Describe a person.",
            GenerateParams {
                max_tokens: 48,
                temperature,
                seed,
                constraint: Some(Constraint::JsonSchema(PERSON.into())),
                ..GenerateParams::default()
            },
        );
        let (_, first) = generate(&request).expect("generates");
        let (_, again) = generate(&request).expect("generates");
        assert_eq!(first.ids(), again.ids(), "temperature {temperature}");
    }
}

#[test]
fn json_object_output_is_an_object() {
    let request = chat(
        "List three colours.",
        GenerateParams {
            max_tokens: 160,
            temperature: 0.8,
            seed: 3,
            constraint: Some(Constraint::JsonObject),
            ..GenerateParams::default()
        },
    );
    let (finish, sink) = generate(&request).expect("generates");
    let text = sink.text();
    if finish == FinishReason::Stop {
        let value: Value = serde_json::from_str(&text).expect("JSON");
        assert!(value.is_object(), "{text}");
    } else {
        // Cut by the budget: still the start of an object.
        assert_eq!(finish, FinishReason::Length);
        assert!(text.trim_start().starts_with('{'), "{text}");
    }
}

#[test]
fn a_bad_schema_is_the_clients_error() {
    for schema in ["not json", "[1, 2]", r#"{"type": "no-such-type"}"#] {
        let request = chat(
            "x",
            GenerateParams {
                constraint: Some(Constraint::JsonSchema(schema.into())),
                ..GenerateParams::default()
            },
        );
        assert!(
            matches!(generate(&request), Err(EngineError::InvalidRequest(_))),
            "{schema}"
        );
    }
}

#[test]
fn logprobs_leave_greedy_tokens_alone_and_name_the_argmax() {
    let params = GenerateParams {
        max_tokens: 16,
        ..GenerateParams::default()
    };
    let (_, plain) = generate(&chat("Name a fruit.", params.clone())).expect("generates");
    let (_, with) = generate(&chat(
        "Name a fruit.",
        GenerateParams {
            logprobs: Some(3),
            ..params
        },
    ))
    .expect("generates");
    let ids =
        |c: &Collect| -> Vec<u32> { c.chunks.iter().flat_map(|c| c.token_ids.clone()).collect() };
    assert_eq!(ids(&plain), ids(&with));
    let entries: Vec<_> = with
        .chunks
        .iter()
        .flat_map(|c| c.logprobs.clone())
        .collect();
    assert_eq!(entries.len(), ids(&with).len());
    for e in &entries {
        assert_eq!(e.top.len(), 3);
        assert_eq!(
            e.top[0].token, e.token,
            "greedy picks the most likely token"
        );
        assert_eq!(e.top[0].logprob, e.logprob);
        assert!(e.logprob <= 0.0 && e.top[1].logprob <= e.logprob);
    }
}

#[test]
fn a_bias_outside_the_vocabulary_is_refused() {
    let request = chat(
        "x",
        GenerateParams {
            logit_bias: vec![(10_000_000, 1.0)],
            ..GenerateParams::default()
        },
    );
    assert!(matches!(
        generate(&request),
        Err(EngineError::InvalidRequest(_))
    ));
}
