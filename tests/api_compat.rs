//! The APIs other tools speak, end to end with the real default model: OpenAI's legacy
//! completions (`/v1/completions`) driven by the official `openai` Python client, Ollama's API
//! (`/api/...`) driven by the official `ollama` Python client, and what the node reports
//! about its model file over Ollama's `/api/tags` (read from the GGUF file itself, and the
//! file's sha256, which must be the store catalogue's).
//!
//! The clients are installed into virtual environments under `target/` on first use
//! (`common::python_venv`); a test is skipped, saying so, only when there is no `python3` or
//! pip cannot reach the package index. The tests take turns with `node_model`'s on the real
//! model (`common::real_model_turn`) and keep generations short (at most 16 tokens).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, MODEL, NodeProcess, OPENAI_REQUIREMENT, real_model_turn};

/// The `ollama` client the test installs.
const OLLAMA_REQUIREMENT: &str = "ollama==0.6.3";

#[test]
fn the_official_openai_client_speaks_legacy_completions() {
    let Some(python) = common::python_venv("py-openai", OPENAI_REQUIREMENT) else {
        return;
    };
    let _turn = real_model_turn();
    let started = Instant::now();
    let node = NodeProcess::start(&["up"], &[], true);
    let base_url = format!("{}/v1", node.base);
    common::run_python_checks(
        &python,
        "openai_completions.py",
        &["--base-url", &base_url, "--model", MODEL],
        Duration::from_secs(300),
        &node,
    );
    node.interrupt_and_check();
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn the_official_ollama_client_works_against_the_node() {
    let Some(python) = common::python_venv("py-ollama", OLLAMA_REQUIREMENT) else {
        return;
    };
    let _turn = real_model_turn();
    let started = Instant::now();
    let node = NodeProcess::start(&["up"], &[], true);
    common::run_python_checks(
        &python,
        "ollama_client.py",
        &["--host", &node.base, "--model", MODEL],
        Duration::from_secs(300),
        &node,
    );

    // The digest the node reports is the file's sha256, which the store checked against its
    // catalogue when it downloaded the model (hashed in the background: poll for it).
    let expected = canopy_store::CatalogueEntry::default_model().sha256;
    let entry = common::eventually_some(Duration::from_secs(60), "the model's digest", || {
        let (status, body) = node.get("/api/tags").ok()?;
        assert_eq!(status, 200, "{body}");
        let tags: Value = serde_json::from_str(&body).expect("tags JSON");
        tags["models"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == MODEL && m["digest"].is_string())
            .cloned()
    })
    .unwrap_or_else(|why| panic!("{why}"));
    assert_eq!(entry["digest"], expected.as_str(), "{entry}");
    assert_eq!(
        entry["size"].as_u64(),
        Some(canopy_store::CatalogueEntry::default_model().size_bytes)
    );

    // A raw Ollama stream over plain HTTP: NDJSON lines, the last one `done`.
    let (status, body) = node.post_raw(
        "/api/generate",
        json!({"model": MODEL, "prompt": "Hello", "options": {"num_predict": 4, "temperature": 0}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let last = lines.last().expect("lines");
    assert_eq!(last["done"], true, "{body}");
    assert!(
        (1..=4).contains(&last["eval_count"].as_u64().unwrap_or(0)),
        "{last}"
    );
    node.interrupt_and_check();
    eprintln!("total {:?}", started.elapsed());
}
