//! End-to-end: a real `canopy up` process with the scripted test engine, driven over HTTP.
//! Chaos (runner deaths injected with `CANOPY_RUNNER_FAULT`), bad input, introspection and
//! shutdown. The scripted engine keeps these fast and exact; the real model's path is
//! covered by `node_model.rs`.

use crate::common;
use std::time::{Duration, Instant};

use crate::common::{NodeProcess, chat_body, eventually};
use serde_json::Value;

fn scripted_node(fault: Option<&str>) -> (NodeProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fault =
        fault.map(|f| f.replace("{marker}", &dir.path().join("fired").display().to_string()));
    let mut env = Vec::new();
    if let Some(f) = &fault {
        env.push(("CANOPY_RUNNER_FAULT", f.as_str()));
    }
    let node = NodeProcess::start(
        &["up", "--engine", "scripted", "--model", "scripted"],
        &env,
        true,
    );
    (node, dir)
}

fn wait_ready(node: &NodeProcess) {
    eventually(
        Duration::from_secs(30),
        "the node to be ready again",
        || matches!(node.get("/ready"), Ok((200, _))),
    )
    .expect("ready");
}

fn metric(node: &NodeProcess, name: &str) -> f64 {
    let (_, text) = node.get("/metrics").expect("metrics");
    common::metric(&text, name)
}

#[test]
fn serves_streams_inspects_and_shuts_down_cleanly() {
    let (node, _dir) = scripted_node(None);
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=4", 64, false),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "0 1 2 3 ");
    assert_eq!(body["usage"]["completion_tokens"], 4);

    let mut events = Vec::new();
    let status = node.stream(&chat_body("scripted", "tokens=3", 64, true), |data, _| {
        events.push(data.to_string())
    });
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "0 1 2 ");

    let (status, models) = node.get("/v1/models").expect("models");
    assert_eq!(status, 200);
    assert!(models.contains("\"scripted\""), "{models}");
    assert_eq!(node.get("/health").expect("health").0, 200);
    assert!(metric(&node, "canopy_tokens_generated_total") >= 7.0);

    // `canopy inspect --json` shows the runner with its pid.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["inspect", "--json", "--url", &node.base])
        .output()
        .expect("inspect runs");
    assert!(out.status.success());
    let tree: Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    let pids = node.runner_pids();
    assert_eq!(pids.len(), 1);
    assert!(common::alive(pids[0]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("\"pid\": {}", pids[0])),
        "{tree}"
    );
    node.interrupt_and_check();
}

#[test]
fn a_runner_killed_mid_stream_ends_the_stream_with_an_error_and_restarts() {
    let (node, _dir) = scripted_node(Some("crash-after-tokens=3,once={marker}"));
    let mut chunks = 0;
    let mut last_chunk_at = None;
    let mut error_at = None;
    let mut done = false;
    let status = node.stream(
        &chat_body("scripted", "tokens=50 delay_ms=20", 64, true),
        |data, at| {
            if data == "[DONE]" {
                done = true;
                return;
            }
            let event: Value = serde_json::from_str(data).expect("json event");
            if event.get("error").is_some() {
                error_at = Some(at);
            } else if event["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                chunks += 1;
                last_chunk_at = Some(at);
            }
        },
    );
    assert_eq!(status, 200);
    assert_eq!(chunks, 3);
    assert!(done, "the stream ends with [DONE]");
    let gap = error_at.expect("an error event") - last_chunk_at.expect("chunks");
    // The death is seen by the process's exit, not by the 60-s decode stall timeout; the
    // bound leaves room for a loaded machine and still tells the two apart.
    assert!(gap < Duration::from_secs(20), "error after {gap:?}");
    wait_ready(&node);
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=2", 64, false),
    );
    assert_eq!(status, 200, "{body}");
    assert!(metric(&node, "canopy_runner_restarts_total") >= 1.0);
    node.interrupt_and_check();
}

#[test]
fn a_runner_killed_before_the_first_token_is_retried_transparently() {
    let (node, _dir) = scripted_node(Some("crash-on-generate,once={marker}"));
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=3", 64, false),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "0 1 2 ");
    node.interrupt_and_check();
}

#[test]
fn a_runner_killed_after_tokens_fails_a_plain_request_with_502_then_recovers() {
    let (node, _dir) = scripted_node(Some("crash-after-tokens=2,once={marker}"));
    let started = Instant::now();
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=50 delay_ms=20", 64, false),
    );
    assert_eq!(status, 502, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    // Seen by the runner's exit, not the 60-s decode stall timeout (see above).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 502 took {:?}",
        started.elapsed()
    );
    wait_ready(&node);
    assert_eq!(
        node.post(
            "/v1/chat/completions",
            &chat_body("scripted", "tokens=1", 64, false)
        )
        .0,
        200
    );
    node.interrupt_and_check();
}

#[test]
fn bad_input_gets_the_right_4xx_and_the_node_keeps_serving() {
    let (node, _dir) = scripted_node(None);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid json", b"{not json".to_vec(), 400),
        ("missing messages", br#"{"model":"scripted"}"#.to_vec(), 400),
        (
            "missing model",
            br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            400,
        ),
        (
            "wrong type",
            br#"{"model":"scripted","messages":"hi"}"#.to_vec(),
            400,
        ),
        (
            "negative max_tokens",
            br#"{"model":"scripted","messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#
                .to_vec(),
            400,
        ),
        (
            "unknown model",
            br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
        ),
    ];
    for (what, body, expected) in cases {
        let (status, text) = node.post_raw("/v1/chat/completions", &body);
        assert_eq!(status, expected, "{what}: {text}");
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            parsed["error"]["message"].is_string(),
            "{what}: not OpenAI-shaped: {text}"
        );
        assert_eq!(
            node.post(
                "/v1/chat/completions",
                &chat_body("scripted", "tokens=1", 64, false)
            )
            .0,
            200,
            "after {what}"
        );
    }
    // A huge body that the client stops sending: the server answers 413 once the client
    // pauses (it reads an oversized body only so that a client sending all of it first still
    // sees the answer).
    {
        use std::io::{Read, Write};
        let addr = node.base.trim_start_matches("http://");
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{{\"model\":",
            64 * 1024 * 1024
        )
        .expect("send headers");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("\"error\""), "not OpenAI-shaped: {answer}");
    }
    assert_eq!(
        node.post(
            "/v1/chat/completions",
            &chat_body("scripted", "tokens=1", 64, false)
        )
        .0,
        200
    );
    node.interrupt_and_check();
}

#[test]
fn requests_beyond_capacity_get_429() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(
        &[
            "up",
            "--engine",
            "scripted",
            "--model",
            "scripted",
            "--max-queue",
            "1",
        ],
        &[],
        true,
    );
    let base = node.base.clone();
    let slow = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .post(format!("{base}/v1/chat/completions"))
            .send_json(chat_body("scripted", "tokens=40 delay_ms=50", 64, false))
            .map(|r| r.status().as_u16())
    });
    // Wait until the slow request holds the runner (its status turns Running), then probe.
    eventually(Duration::from_secs(20), "the slow request to run", || {
        let (_, state) = node.get("/state").expect("state");
        let state: Value = serde_json::from_str(&state).expect("json state");
        state["instances"][0]["status"] == "Running"
    })
    .expect("the slow request runs");
    let (status, _) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=1", 64, false),
    );
    assert_eq!(status, 429);
    assert_eq!(slow.join().expect("slow request").expect("answered"), 200);
    drop(dir);
    node.interrupt_and_check();
}

#[test]
fn up_with_a_model_that_cannot_load_says_why_at_once_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("broken.gguf");
    std::fs::write(&garbage, b"GGUF this is not a model").expect("write");
    let tag = common::unique_tag("cannot-load");
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args([
            "up",
            "--standalone",
            "--port",
            &common::free_port().to_string(),
        ])
        .arg("--model")
        .arg(&garbage)
        .env("CANOPY_TEST_TAG", &tag)
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("canopy up runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("Error: cannot load broken"), "{last}");
    assert!(last.contains(&garbage.display().to_string()), "{last}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(common::processes_with_env("CANOPY_TEST_TAG", &tag).is_empty());
}

/// The details of the node's (only) runner supervisor in its actor tree.
fn runner_details(node: &NodeProcess) -> Value {
    fn find(actor: &Value) -> Option<Value> {
        if actor["kind"] == "runner-supervisor" {
            return Some(actor["details"].clone());
        }
        actor["children"].as_array()?.iter().find_map(find)
    }
    let (_, body) = node.get("/v1/actors").expect("actors");
    let tree: Value = serde_json::from_str(&body).expect("json tree");
    find(&tree).unwrap_or_else(|| panic!("no runner supervisor in {tree}"))
}

#[test]
fn a_prompt_longer_than_the_context_is_a_400_and_the_runner_stays_up() {
    let (node, _dir) = scripted_node(None);
    let pids = node.runner_pids();
    // Four words against a context of two positions (the scripted engine counts words).
    for stream in [false, true] {
        let (status, body) = node.post(
            "/v1/chat/completions",
            &chat_body("scripted", "one two three max_context=2", 64, stream),
        );
        assert_eq!(status, 400, "stream={stream}: {body}");
        let error = &body["error"];
        assert_eq!(error["code"], "context_length_exceeded", "{body}");
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"], "messages", "{body}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("4 tokens") && message.contains("at most 2"),
            "{body}"
        );
    }
    // Not a runner failure: same runner, no restart, no retry; and it serves on.
    assert_eq!(node.runner_pids(), pids);
    assert_eq!(metric(&node, "canopy_runner_failures_total"), 0.0);
    assert_eq!(metric(&node, "canopy_request_retries_total"), 0.0);
    assert_eq!(runner_details(&node)["restarts"], 0);
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=2", 64, false),
    );
    assert_eq!(status, 200, "{body}");
    node.interrupt_and_check();
}

#[test]
fn parallel_out_of_range_is_refused_with_a_clear_message() {
    for (args, env) in [
        (vec!["up", "--standalone", "--parallel", "0"], None),
        (vec!["node", "--standalone", "--parallel", "257"], None),
        (vec!["node", "--standalone"], Some("0")),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"));
        cmd.args(&args)
            .args([
                "--engine",
                "scripted",
                "--port",
                &common::free_port().to_string(),
            ])
            .stdin(std::process::Stdio::null());
        if let Some(value) = env {
            cmd.env("CANOPY_PARALLEL", value);
        }
        let out = cmd.output().expect("canopy runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("between 1 and 256"),
            "{args:?} {env:?}: {stderr}"
        );
    }
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["up", "--help"])
        .output()
        .expect("canopy runs");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--parallel") && help.contains("continuous batching"),
        "{help}"
    );
}

#[test]
fn parallel_reaches_the_runner_and_inspect_shows_its_batch() {
    let node = NodeProcess::start(
        &[
            "up",
            "--engine",
            "scripted",
            "--model",
            "scripted",
            "--parallel",
            "3",
        ],
        &[],
        true,
    );
    assert_eq!(runner_details(&node)["parallel_requested"], 3);
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=3", 64, false),
    );
    assert_eq!(status, 200, "{body}");
    // The runner reports its batch after loading and as tasks come and go; the scripted
    // engine cannot batch, so it runs one sequence at a time.
    let batch = common::eventually_some(Duration::from_secs(20), "the runner's batch", || {
        let details = runner_details(&node);
        details["batch"]
            .is_object()
            .then(|| details["batch"].clone())
    })
    .expect("the runner reports its batch");
    assert_eq!(batch["parallel"], 1, "{batch}");
    for key in [
        "running",
        "queued",
        "kv_bytes",
        "kv_capacity_bytes",
        "prefix_hits",
        "prefix_reused_tokens",
    ] {
        assert!(batch[key].is_u64(), "{key} in {batch}");
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["inspect", "--json", "--url", &node.base])
        .output()
        .expect("inspect runs");
    assert!(out.status.success());
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains("\"batch\"") && json.contains("\"kv_capacity_bytes\""),
        "{json}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["inspect", "--url", &node.base])
        .output()
        .expect("inspect runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("running=") && text.contains("MiB"), "{text}");

    let (_, metrics) = node.get("/metrics").expect("metrics");
    for name in [
        "canopy_batch_running",
        "canopy_batch_queued",
        "canopy_batch_parallel",
        "canopy_batch_last_step_rows",
        "canopy_kv_cache_bytes",
        "canopy_kv_cache_capacity_bytes",
        "canopy_prefix_cache_hits_total",
        "canopy_prefix_cache_reused_tokens_total",
        "canopy_prefilled_tokens_total",
    ] {
        assert!(
            metrics.contains(&format!("{name}{{instance=")),
            "missing {name} in:\n{metrics}"
        );
    }
    node.interrupt_and_check();
}

/// Issue #10: an instance whose runner keeps dying is given up alone. Its runner supervisor
/// gives up after its restart intensity; the instance is stopped on its node and reported
/// failed with the reason, while another instance on the same node keeps its runner (the same
/// pid) and serves throughout. Before, the worker restarted the failing supervisor against
/// its own budget, and a fourth give-up failed the worker and killed every runner of the node.
#[test]
fn an_instance_whose_runner_keeps_dying_is_given_up_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster_port = common::free_port().to_string();
    let node = NodeProcess::start(
        &[
            "up",
            "--engine",
            "scripted",
            "--model",
            "scripted",
            "--no-discovery",
            "--cluster-host",
            "127.0.0.1",
            "--cluster-port",
            &cluster_port,
            "--data-dir",
        ]
        .into_iter()
        .chain([dir.path().to_str().expect("utf-8 path")])
        .collect::<Vec<_>>(),
        &[("CANOPY_STANDALONE", "false")],
        true,
    );
    let flaky = "scripted:layers=2";
    let (status, placed) = node.post(
        "/instances",
        &serde_json::json!({"model": flaky, "wait": 60}),
    );
    assert_eq!(status, 201, "{placed}");
    let instance = |model: &str| -> Value {
        let (_, body) = node.get("/state").expect("state");
        let state: Value = serde_json::from_str(&body).expect("json");
        state["instances"]
            .as_array()
            .and_then(|list| list.iter().find(|i| i["model"] == model).cloned())
            .unwrap_or(Value::Null)
    };
    let healthy_pid = instance("scripted")["pid"].as_u64().expect("a healthy pid");

    // Every request to the flaky model kills its runner before the first token (and the
    // transparent retry kills the next one). Keep going while it is still served.
    // Each round of deaths gives its supervisor up; the planner places it again after a
    // backoff (1, 2, 4, 8 s) and, as it never stays Ready, fails it once its budget is spent.
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let (status, _) = node.post(
            "/v1/chat/completions",
            &chat_body(flaky, "abort_after=0", 3, false),
        );
        answers.push(status);
        let i = instance(flaky);
        if i.is_null() || i["state"].as_str().is_some_and(|s| s.starts_with("failed")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let given_up = eventually(
        Duration::from_secs(30),
        "the flaky instance to be failed",
        || {
            instance(flaky)["state"]
                .as_str()
                .is_some_and(|s| s.starts_with("failed") && s.contains("kept dying"))
        },
    );
    assert!(
        given_up.is_ok(),
        "answers {answers:?}; the flaky instance: {}\n{}",
        instance(flaky),
        common::tail(&node.log_text(), 40)
    );
    // The healthy instance never noticed.
    let healthy = instance("scripted");
    assert_eq!(healthy["pid"].as_u64(), Some(healthy_pid), "{healthy}");
    assert_eq!(healthy["restarts"].as_u64(), Some(0), "{healthy}");
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body("scripted", "tokens=2", 2, false),
    );
    assert_eq!(status, 200, "{body}");
    // The failed one is refused with a clear answer, not a hang.
    let (status, body) = node.post(
        "/v1/chat/completions",
        &chat_body(flaky, "tokens=2", 2, false),
    );
    assert!(status == 503 || status == 404, "{status} {body}");
    node.interrupt_and_check();
}
