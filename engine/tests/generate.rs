//! Generation with the real default model through `CandleEngine`: the determinism snapshots
//! (greedy and seeded sampling, as exo's e2e suite has them), UTF-8-safe streaming, stop
//! sequences, max tokens and cancellation.
//!
//! The snapshots live in `tests/data/generation_snapshots.json`; run with
//! `CANOPY_UPDATE_SNAPSHOTS=1` to rewrite them after a deliberate change (and say why in the
//! commit).

mod common;

use common::{Collect, chat};

use std::sync::Mutex;

use canopy_engine::{CandleEngine, Engine};
use canopy_proto::{FinishReason, GenerateParams, GenerateRequest, Phase};
use serde_json::{Value, json};

/// One engine for the whole file (loading takes a moment); tests take turns.
fn engine() -> &'static Mutex<CandleEngine> {
    common::shared_engine()
}

fn run(request: &GenerateRequest, sink: &mut Collect) -> FinishReason {
    let mut engine = match engine().lock() {
        Ok(e) => e,
        Err(poisoned) => poisoned.into_inner(),
    };
    engine
        .generate(request, sink)
        .expect("generation succeeds")
        .finish_reason
}

const QUESTION: &str = "What is 2+2? Reply with just the number.";

fn snapshot_case(name: &str, question: &str, temperature: f32) {
    let request = chat(
        question,
        GenerateParams {
            max_tokens: 32,
            temperature,
            seed: 42,
            ..GenerateParams::default()
        },
    );
    let mut sink = Collect::default();
    let finish = run(&request, &mut sink);
    let got = json!({
        "text": sink.text(),
        "token_ids": sink.ids(),
        "finish_reason": format!("{finish:?}"),
    });

    // The same request again gives the same tokens.
    let mut again = Collect::default();
    run(&request, &mut again);
    assert_eq!(again.ids(), sink.ids(), "{name}: not deterministic");

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/generation_snapshots.json"
    );
    let mut all: Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    if std::env::var_os("CANOPY_UPDATE_SNAPSHOTS").is_some() {
        all[name] = got;
        let text = serde_json::to_string_pretty(&all).expect("json");
        std::fs::write(path, text + "\n").expect("snapshot written");
        return;
    }
    assert_eq!(
        got, all[name],
        "{name}: differs from the committed snapshot"
    );
}

#[test]
fn greedy_snapshot() {
    snapshot_case("greedy_seed42_t0", QUESTION, 0.0);
}

#[test]
fn seeded_sampling_snapshot() {
    snapshot_case("sampled_seed42_t0.7", QUESTION, 0.7);
    // An open question, where sampling really picks among many tokens.
    snapshot_case(
        "sampled_haiku_seed42_t0.7",
        "Write a haiku about trees.",
        0.7,
    );
}

#[test]
fn streamed_text_is_whole_utf8_and_equals_the_decoded_tokens() {
    let request = chat(
        "Write three words in Japanese, then three emoji.",
        GenerateParams {
            max_tokens: 40,
            ..GenerateParams::default()
        },
    );
    let mut sink = Collect::default();
    run(&request, &mut sink);
    let engine = engine().lock().expect("engine");
    let decoded = engine
        .tokenizer()
        .expect("loaded")
        .decode(&sink.ids())
        .expect("decodes");
    assert_eq!(sink.text(), decoded);
    assert_eq!(sink.phases, vec![Phase::Prefill, Phase::Decode]);
}

#[test]
fn max_tokens_ends_with_length() {
    let request = chat(
        "Count from one to one hundred in words.",
        GenerateParams {
            max_tokens: 5,
            ..GenerateParams::default()
        },
    );
    let mut sink = Collect::default();
    assert_eq!(run(&request, &mut sink), FinishReason::Length);
    assert_eq!(sink.ids().len(), 5);
}

#[test]
fn a_stop_sequence_ends_generation_before_it() {
    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let prompt = "Write one sentence about the sea.";
    let mut full = Collect::default();
    run(&chat(prompt, params.clone()), &mut full);
    let text = full.text();
    // Stop at the third word the model writes.
    let stop = text
        .split_whitespace()
        .nth(2)
        .expect("the model writes at least three words")
        .to_string();
    let mut sink = Collect::default();
    let finish = run(
        &chat(
            prompt,
            GenerateParams {
                stop: vec![stop.clone()],
                ..params
            },
        ),
        &mut sink,
    );
    assert_eq!(finish, FinishReason::StopSequence(0));
    let cut = sink.text();
    assert!(!cut.contains(&stop), "{cut:?} contains {stop:?}");
    assert!(
        text.starts_with(&cut),
        "{cut:?} is not a prefix of {text:?}"
    );
}

#[test]
fn cancellation_stops_between_tokens() {
    let request = chat(
        "Tell me a long story.",
        GenerateParams {
            max_tokens: 64,
            ..GenerateParams::default()
        },
    );
    let mut sink = Collect {
        cancel_after: Some(3),
        ..Collect::default()
    };
    assert_eq!(run(&request, &mut sink), FinishReason::Cancelled);
    assert_eq!(sink.chunks.len(), 3);
}
