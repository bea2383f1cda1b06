//! The APIs other tools speak, end to end with the real default model: OpenAI's legacy
//! completions (`/v1/completions`) driven by the official `openai` Python client, Ollama's API
//! (`/api/...`) driven by the official `ollama` Python client, Anthropic's Messages API
//! (`/v1/messages`) driven by the official `anthropic` Python client on a node with an API
//! key (sent as `x-api-key`), chat, streaming, logprobs, `n`, a JSON schema, a required tool
//! call and legacy completions driven by the official `openai` Node client (npm), and what
//! the node reports
//! about its model file over Ollama's `/api/tags` (read from the GGUF file itself, and the
//! file's sha256, which must be the store catalogue's).
//!
//! The clients are installed into virtual environments under `target/` on first use
//! (`common::python_venv`, `common::node_package`); a test is skipped, saying so, only when
//! there is no `python3` (`node`) or pip (npm) cannot reach the package index (registry). The tests take turns with `node_model`'s on the real
//! model (`common::real_model_turn`) and keep generations short (at most 16 tokens).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, MODEL, NodeProcess, OPENAI_REQUIREMENT, real_model_turn};

/// The `ollama` client the test installs.
const OLLAMA_REQUIREMENT: &str = "ollama==0.6.3";

/// The `anthropic` client the test installs.
const ANTHROPIC_REQUIREMENT: &str = "anthropic==2.10.0";

/// The `openai` Node client the test installs.
const OPENAI_NODE_PACKAGE: &str = "openai@7.60.0";

#[test]
fn the_official_openai_node_client_works_against_the_node() {
    let Some(prefix) = common::node_package("node-openai", OPENAI_NODE_PACKAGE) else {
        return;
    };
    let _turn = real_model_turn();
    let started = Instant::now();
    let node = NodeProcess::start(&["up"], &[], true);
    let base_url = format!("{}/v1", node.base);
    common::run_node_checks(
        &prefix,
        "openai_client.cjs",
        &["--base-url", &base_url, "--model", MODEL],
        Duration::from_secs(300),
        &node,
    );
    node.interrupt_and_check();
    eprintln!("total {:?}", started.elapsed());
}

/// The API key of the node the `anthropic` client talks to.
const ANTHROPIC_KEY: &str = "anthropic-e2e-key-0123456789abcdef";

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

#[test]
fn the_official_anthropic_client_speaks_messages() {
    let Some(python) = common::python_venv("py-anthropic", ANTHROPIC_REQUIREMENT) else {
        return;
    };
    let _turn = real_model_turn();
    let started = Instant::now();
    // With a key, `/ready` needs it too: wait for it here, sending it as Anthropic's
    // clients do.
    let node = NodeProcess::start(&["up"], &[("CANOPY_API_KEY", ANTHROPIC_KEY)], false);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    common::eventually(Duration::from_secs(600), "the node is ready", || {
        agent
            .get(format!("{}/ready", node.base))
            .header("x-api-key", ANTHROPIC_KEY)
            .call()
            .is_ok_and(|r| r.status() == 200)
    })
    .unwrap_or_else(|why| panic!("{why}; log:\n{}", node.log_text()));
    common::run_python_checks(
        &python,
        "anthropic_client.py",
        &[
            "--base-url",
            &node.base,
            "--model",
            MODEL,
            "--api-key",
            ANTHROPIC_KEY,
        ],
        Duration::from_secs(300),
        &node,
    );

    // The stream's framing as it goes over the wire: named events, in Anthropic's order.
    let mut reply = agent
        .post(format!("{}/v1/messages", node.base))
        .header("x-api-key", ANTHROPIC_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("Content-Type", "application/json")
        .send(
            json!({"model": MODEL, "max_tokens": 4, "stream": true,
                   "messages": [{"role": "user", "content": "Hello"}]})
            .to_string(),
        )
        .expect("request sent");
    assert_eq!(reply.status(), 200);
    let body = reply.body_mut().read_to_string().expect("body");
    let names: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .filter(|n| *n != "ping")
        .collect();
    let (first, rest) = names.split_at(2);
    assert_eq!(first, ["message_start", "content_block_start"], "{body}");
    let (deltas, end) = rest.split_at(rest.len() - 3);
    assert!(
        !deltas.is_empty() && deltas.iter().all(|n| *n == "content_block_delta"),
        "{body}"
    );
    assert_eq!(
        end,
        ["content_block_stop", "message_delta", "message_stop"],
        "{body}"
    );
    node.interrupt_and_check();
    eprintln!("total {:?}", started.elapsed());
}
