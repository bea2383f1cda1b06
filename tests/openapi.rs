//! `GET /openapi.json` end to end: the document describes what a real node answers.
//! `schemathesis` (installed from PyPI into a venv under `target/` on first use) generates a
//! bounded number of requests per operation from the document, fixed by a seed, against a
//! node serving the scripted engine, and checks that no answer is a 5xx other than the
//! documented 502/503, that every status, content type, header and body matches the
//! document, and the test then checks that the node still serves. The event stream
//! (`/v1/events`, which never ends) is left out of the run; the checks that want the
//! document to be a complete validator of the bodies (`positive_data_acceptance`,
//! `negative_data_rejection`) are too: the document gives the fields and their types, and
//! the values' ranges are the handlers' (see each API's `request` module). So is the
//! dashboard's login form, a `key=...` form for people, whose free-text body the fuzzer
//! cannot shape.

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

use crate::common::{self, NodeProcess};

/// The `schemathesis` the test installs.
const SCHEMATHESIS_REQUIREMENT: &str = "schemathesis==4.32.5";

#[test]
fn schemathesis_finds_every_answer_in_the_document_and_the_node_keeps_serving() {
    let Some(python) = common::python_venv("py-schemathesis", SCHEMATHESIS_REQUIREMENT) else {
        return;
    };
    let node = NodeProcess::start(
        &[
            "up",
            "--engine",
            "scripted",
            "--model",
            "scripted",
            "--standalone",
        ],
        &[],
        true,
    );
    let (status, body) = node.get("/openapi.json").expect("the document");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());

    let started = Instant::now();
    let schemathesis = python.with_file_name("schemathesis");
    let out = Command::new(&schemathesis)
        .args(["run", &format!("{}/openapi.json", node.base)])
        .args(["--max-examples", "30", "--seed", "1", "--workers", "2"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args([
            "--exclude-path",
            "/v1/events",
            "--exclude-path",
            "/dashboard/login",
        ])
        .args(["--request-timeout", "30", "--generation-database", "none"])
        // Nothing of the run lands in the source tree.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}\nschemathesis took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "schemathesis found answers the document does not describe:\n{report}\nnode log:\n{}",
        node.log_text()
    );
    assert!(report.contains("passed"), "{report}");

    // The node still serves.
    let (status, _) = node.get("/health").expect("health");
    assert_eq!(status, 200);
    let (status, answer) = node.post(
        "/v1/chat/completions",
        &json!({"model": "scripted", "max_tokens": 3,
                "messages": [{"role": "user", "content": "tokens=3"}]}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    node.interrupt_and_check();
}
