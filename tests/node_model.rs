//! End-to-end with the real default model (SmolLM2-135M-Instruct, from the model store's
//! cache or downloaded into it on first use): `canopy up` as a process, driven over HTTP and
//! by the official `openai` Python client, then stopped with SIGINT, leaving no process
//! behind. Also the extension example (`actors/examples/failure_log.rs`) as a user actor in an
//! in-process node.
//!
//! The tests that run the real model take turns (`common::real_model_turn`, shared with
//! `api_compat`): two models decoding at once on a small machine only slow each other down.
//! The Python test installs the client into a virtual environment under `target/py-openai`
//! on first use (`common::python_venv`: `python3 -m venv`, then `pip install openai`); it is
//! skipped, saying so, only when there is no `python3` or pip cannot reach the package
//! index.

// The example, compiled into this test so that its actor is exercised, not just built.
#[path = "../actors/examples/failure_log.rs"]
#[allow(dead_code)]
mod failure_log;

use crate::common;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{MODEL, NodeProcess, OPENAI_REQUIREMENT, metric, real_model_turn};
use serde_json::{Value, json};

fn find_kind<'a>(actor: &'a Value, kind: &str, out: &mut Vec<&'a Value>) {
    if actor["kind"] == kind {
        out.push(actor);
    }
    for child in actor["children"].as_array().into_iter().flatten() {
        find_kind(child, kind, out);
    }
}

fn content_of(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {body}"))
        .to_string()
}

#[test]
fn canopy_up_serves_the_real_model_and_stops_without_leftovers() {
    let _turn = real_model_turn();
    let tag = common::unique_tag("node-model");
    let started = Instant::now();
    let node = NodeProcess::start(&["up"], &[("CANOPY_TEST_TAG", &tag)], true);
    eprintln!("ready in {:?}", started.elapsed());

    // Non-streaming, twice: greedy with a fixed seed gives the same answer.
    let request = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 2+2? Reply with just the number."}],
        "seed": 42,
        "temperature": 0,
        "max_tokens": 32,
    });
    let t = Instant::now();
    let (status, first) = node.post("/v1/chat/completions", &request);
    eprintln!("completion in {:?}: {first}", t.elapsed());
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], MODEL);
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    let answer = content_of(&first);
    assert!(!answer.trim().is_empty(), "{first}");
    assert!(answer.contains('4'), "2+2 answered {answer:?}");
    let finish = first["choices"][0]["finish_reason"].as_str();
    assert!(matches!(finish, Some("stop" | "length")), "{first}");
    let usage = &first["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
    assert!((1..=32).contains(&completion_tokens), "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap_or(0) > 10, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + completion_tokens)
    );

    let (status, second) = node.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        content_of(&second),
        answer,
        "same seed, temperature 0: same content"
    );

    // Streaming: SSE chunks of one id, a role first, deltas that join to the same answer, one
    // finish reason, then [DONE].
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let mut events = Vec::new();
    let t = Instant::now();
    let mut first_delta_after = None;
    let status = node.stream(&streaming, |data, at| {
        if first_delta_after.is_none()
            && serde_json::from_str::<Value>(data).is_ok_and(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
        {
            first_delta_after = Some(at - t);
        }
        events.push(data.to_string());
    });
    eprintln!(
        "stream in {:?} ({} events, first delta after {:?})",
        t.elapsed(),
        events.len(),
        first_delta_after
    );
    assert_eq!(status, 200);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("not JSON: {e}")))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, answer,
        "the stream says what the plain answer said"
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes.len(), 1, "{events:?}");

    // The other endpoints.
    let (status, models) = node.get("/v1/models").expect("models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).expect("models JSON");
    assert_eq!(models["object"], "list");
    assert!(
        models["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == MODEL && m["object"] == "model")),
        "{models}"
    );
    let (status, health) = node.get("/health").expect("health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(node.get("/ready").expect("ready").0, 200);
    let (status, metrics) = node.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE"), "not Prometheus text: {metrics}");
    assert!(
        metric(&metrics, "canopy_tokens_generated_total") >= (3 * completion_tokens) as f64,
        "{metrics}"
    );
    assert!(metric(&metrics, "canopy_prompt_tokens_total") > 0.0);
    assert!(metric(&metrics, "canopy_time_to_first_token_seconds_count") >= 3.0);

    // `canopy inspect --json` shows the runner, with the pid of a live `canopy runner`.
    let out = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["inspect", "--json", "--url", &node.base])
        .output()
        .expect("inspect runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree: Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    let mut runners = Vec::new();
    find_kind(&tree, "runner-supervisor", &mut runners);
    assert_eq!(runners.len(), 1, "{tree}");
    assert_eq!(runners[0]["details"]["status"], "Ready", "{tree}");
    let pid = runners[0]["details"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no runner pid: {tree}")) as u32;
    assert!(common::alive(pid));
    assert_eq!(node.runner_pids(), vec![pid]);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("runner cmdline");
    assert!(
        cmdline.split(|&b| b == 0).any(|a| a == b"runner"),
        "pid {pid} is not a runner: {}",
        String::from_utf8_lossy(&cmdline)
    );

    // Every process the node started carries the tag; after SIGINT none is left.
    let mut tagged = common::processes_with_env("CANOPY_TEST_TAG", &tag);
    tagged.sort_unstable();
    let mut expected = vec![node.pid(), pid];
    expected.sort_unstable();
    assert_eq!(tagged, expected, "the node and its runner");
    let t = Instant::now();
    node.interrupt_and_check();
    eprintln!("stopped in {:?}", t.elapsed());
    common::eventually(Duration::from_secs(5), "no canopy process left", || {
        common::processes_with_env("CANOPY_TEST_TAG", &tag).is_empty()
    })
    .unwrap_or_else(|why| {
        let left = common::processes_with_env("CANOPY_TEST_TAG", &tag);
        panic!("{why}: {left:?}")
    });
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn the_official_openai_python_client_works_against_the_node() {
    // Installing (first run only) overlaps with the other test's turn.
    let Some(python) = common::python_venv("py-openai", OPENAI_REQUIREMENT) else {
        return;
    };
    let _turn = real_model_turn();
    let started = Instant::now();
    let node = NodeProcess::start(&["up"], &[], true);
    let base_url = format!("{}/v1", node.base);
    common::run_python_checks(
        &python,
        "openai_client.py",
        &["--base-url", &base_url, "--model", MODEL],
        Duration::from_secs(300),
        &node,
    );
    node.interrupt_and_check();
    eprintln!("total {:?}", started.elapsed());
}

/// Blocking HTTP from async code: (status, JSON body).
async fn http(method: &'static str, url: String, body: Option<Value>) -> (u16, Value) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let response = match (method, body) {
            ("POST", Some(body)) => agent.post(&url).send_json(body),
            _ => agent.get(&url).call(),
        };
        let mut response = response.expect("request sent");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
    .await
    .expect("request thread")
}

/// The failure-log actor's report in the node's live tree.
fn failure_log_report(node: &canopy_actors::node::NodeHandle) -> Option<Value> {
    let tree = serde_json::to_value(canopy_runtime::introspect::tree(&node.root().get_cell()))
        .expect("tree JSON");
    let mut found = Vec::new();
    find_kind(&tree, failure_log::KIND, &mut found);
    found.first().map(|v| (*v).clone())
}

/// Waits up to 20 s for `probe` to give a value; panics naming `what` after that.
async fn eventually<T>(what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    common::eventually_async(Duration::from_secs(20), what, probe)
        .await
        .unwrap_or_else(|why| panic!("{why}"))
}

fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_log_example_records_runner_deaths_and_survives_its_own_restart() {
    use canopy_actors::node::Node;
    use canopy_actors::runner::RunnerCommand;
    use failure_log::{FailureLogArgs, RunnerEventFeed};

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("failures.jsonl");
    // The scripted engine, killed by fault injection after 2 tokens of every request.
    let command = RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy"))
        .args(["--engine", "scripted"])
        .env("CANOPY_RUNNER_FAULT", "crash-after-tokens=2");
    let feed = RunnerEventFeed::new();
    let node = Node::builder(failure_log::node_config(command, "scripted", "scripted", 0))
        .child(FailureLogArgs::new(&path, feed.clone()).child_spec())
        .start()
        .await
        .expect("the node starts");
    feed.connect(&node);
    let base = format!("http://{}", node.api_addr().await.expect("api addr"));
    let request = json!({
        "model": "scripted",
        "messages": [{"role": "user", "content": "tokens=20"}],
    });

    let first = eventually("the logger to subscribe", async || {
        failure_log_report(&node).filter(|r| r["details"]["subscribed"] == true)
    })
    .await;
    assert_eq!(first["child_id"], failure_log::CHILD_ID);
    assert_eq!(first["details"]["path"], path.display().to_string());
    assert_eq!(first["details"]["failures_seen"], 0);

    // Failures logged so far. A request normally costs one runner death, but when the
    // runner is killed before the supervisor has read the chunks it wrote, the request had
    // produced nothing as far as anyone saw and is retried once, transparently: two deaths.
    let mut seen = 0usize;
    for round in 1..=2u64 {
        eventually("a ready runner", async || {
            (http("GET", format!("{base}/ready"), None).await.0 == 200).then_some(())
        })
        .await;
        let (status, body) = http(
            "POST",
            format!("{base}/v1/chat/completions"),
            Some(request.clone()),
        )
        .await;
        assert_eq!(status, 502, "the runner dies mid-answer: {body}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let lines = loop {
            let lines = log_lines(&path);
            let counted = failure_log_report(&node)
                .and_then(|r| r["details"]["failures_seen"].as_u64())
                .unwrap_or(0);
            if lines.len() > seen && counted == lines.len() as u64 {
                break lines;
            }
            assert!(
                Instant::now() < deadline && lines.len() <= seen + 2,
                "waiting for failure {} in the log; it holds {lines:?}; the logger: {:?}; \
                 the 502's body: {body}",
                seen + 1,
                failure_log_report(&node)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        seen = lines.len();
        let record = &lines[seen - 1];
        assert_eq!(record["instance"], "scripted-0", "{record}");
        assert_eq!(record["reason"]["kind"], "signaled", "{record}");
        assert_eq!(record["reason"]["signal"], 9, "{record}");
        assert_eq!(record["will_restart"], true, "{record}");
        assert_eq!(record["failed_tasks"], 1, "{record}");
        assert!(record["pid"].as_u64().unwrap_or(0) > 0, "{record}");
        assert!(record["time_unix_ms"].as_u64().unwrap_or(0) > 0, "{record}");
        assert!(
            record["stderr_tail"].as_array().is_some_and(|t| t
                .iter()
                .any(|l| l.as_str().is_some_and(|l| l.contains("fault")))),
            "{record}"
        );
        let report = eventually("the count in the details", async || {
            failure_log_report(&node).filter(|r| r["details"]["failures_seen"] == seen as u64)
        })
        .await;
        assert!(
            report["details"]["last_failure"]
                .as_str()
                .is_some_and(|l| l.starts_with("scripted-0: killed by signal 9")),
            "{report}"
        );

        if round == 1 {
            // Stop the logger: it is permanent, so the node starts it again, and the new
            // incarnation subscribes through the feed.
            let old_id = report["id"].clone();
            let cell = node
                .root()
                .get_children()
                .into_iter()
                .find(|c| Value::String(c.get_id().to_string()) == old_id)
                .expect("the logger is a child of the node");
            cell.stop(Some("test".into()));
            let again = eventually("the restarted logger", async || {
                // Annotated by its supervisor (child id, restart count) and subscribed.
                failure_log_report(&node).filter(|r| {
                    r["id"] != old_id
                        && r["child_id"] == failure_log::CHILD_ID
                        && r["details"]["subscribed"] == true
                })
            })
            .await;
            assert_eq!(again["restarts"], 1, "{again}");
            assert_eq!(again["details"]["failures_seen"], seen as u64, "{again}");
        }
    }
    node.shutdown(Duration::from_secs(30))
        .await
        .expect("the node stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_actor_that_cannot_start_fails_the_node_start_and_leaves_no_runner() {
    use canopy_actors::node::Node;
    use canopy_actors::runner::RunnerCommand;
    use failure_log::{FailureLogArgs, RunnerEventFeed};

    let tag = common::unique_tag("failed-start");
    let command = RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy"))
        .args(["--engine", "scripted"])
        .env("CANOPY_TEST_TAG", &tag);
    let feed = RunnerEventFeed::new();
    // Its own model id: runner supervisors are named after their instance in ractor's
    // process-wide registry, so two nodes in one process cannot both serve "scripted".
    let started = Node::builder(failure_log::node_config(command, "doomed", "scripted", 0))
        .child(FailureLogArgs::new("/nonexistent/dir/failures.jsonl", feed).child_spec())
        .start()
        .await;
    let Err(err) = started else {
        panic!("the node started although its failure log cannot be opened");
    };
    let message = err.to_string();
    assert!(
        message.contains("cannot open the failure log /nonexistent/dir/failures.jsonl"),
        "{message}"
    );
    // The runner started before the failing child is stopped with the rest of the tree.
    common::eventually_async(Duration::from_secs(10), "no runner left", async || {
        common::processes_with_env("CANOPY_TEST_TAG", &tag)
            .is_empty()
            .then_some(())
    })
    .await
    .unwrap_or_else(|why| {
        let left = common::processes_with_env("CANOPY_TEST_TAG", &tag);
        panic!("{why}: {left:?}")
    });
}

/// What one streaming client saw: the content, whether an error event came, whether the
/// stream ended with `[DONE]`, and when its first content arrived.
#[derive(Debug, Default)]
struct Seen {
    content: String,
    error: bool,
    done: bool,
}

fn stream_chat(node: &NodeProcess, question: &str, max_tokens: u32, first: &dyn Fn()) -> Seen {
    let mut seen = Seen::default();
    let mut told = false;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    });
    node.stream(&body, |data, _| {
        if data == "[DONE]" {
            seen.done = true;
            return;
        }
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if event.get("error").is_some() {
            seen.error = true;
        }
        if let Some(text) = event["choices"][0]["delta"]["content"].as_str() {
            seen.content.push_str(text);
            if !told && !text.is_empty() {
                told = true;
                first();
            }
        }
    });
    seen
}

const QUESTIONS: [&str; 4] = [
    "What is 2+2? Reply with just the number.",
    "Name a colour of the sky.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
];

/// Concurrent streams share the runner's batch and each says exactly what it says alone; a
/// runner killed (kill -9) or frozen (SIGSTOP) with a batch in flight gives every stream its
/// error at once (no hang), the runner restarts, and the node serves again.
#[test]
fn concurrent_streams_are_batch_invariant_and_a_runner_death_mid_batch_fails_each_stream() {
    let _turn = real_model_turn();
    let tag = common::unique_tag("batch");
    let node = NodeProcess::start(
        &["up", "--parallel", "4"],
        &[("CANOPY_TEST_TAG", &tag)],
        true,
    );

    // Alone, one after another.
    let solo: Vec<String> = QUESTIONS
        .iter()
        .map(|q| stream_chat(&node, q, 24, &|| {}).content)
        .collect();
    // Together.
    let together: Vec<Seen> = std::thread::scope(|s| {
        let handles: Vec<_> = QUESTIONS
            .iter()
            .map(|q| s.spawn(|| stream_chat(&node, q, 24, &|| {})))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    for ((q, alone), batched) in QUESTIONS.iter().zip(&solo).zip(&together) {
        assert!(batched.done && !batched.error, "{q}: {batched:?}");
        assert_eq!(&batched.content, alone, "{q}: batched differs from alone");
    }
    let (_, metrics) = node.get("/metrics").expect("metrics");
    assert!(
        metric(&metrics, "canopy_prefix_cache_hits_total") >= 1.0,
        "the repeated prompts reused cached positions: {metrics}"
    );
    assert!(
        metric(&metrics, "canopy_batch_parallel") >= 4.0,
        "{metrics}"
    );

    for (signal, what) in [
        (nix::sys::signal::Signal::SIGKILL, "kill -9"),
        (nix::sys::signal::Signal::SIGSTOP, "SIGSTOP"),
    ] {
        let pids = node.runner_pids();
        assert_eq!(pids.len(), 1, "one runner: {pids:?}");
        let (started, ready) = std::sync::mpsc::channel::<()>();
        let t0 = Instant::now();
        let node_ref = &node;
        let outcomes: Vec<(Seen, Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = QUESTIONS
                .iter()
                .map(|q| {
                    let started = started.clone();
                    let node = node_ref;
                    s.spawn(move || {
                        let seen = stream_chat(node, q, 400, &|| {
                            let _ = started.send(());
                        });
                        (seen, t0.elapsed())
                    })
                })
                .collect();
            // Every stream has produced output: the batch is in flight.
            for _ in 0..QUESTIONS.len() {
                ready
                    .recv_timeout(Duration::from_secs(60))
                    .expect("every stream started");
            }
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), signal)
                .expect("signal the runner");
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        for (seen, _) in &outcomes {
            assert!(
                seen.error,
                "{what}: a stream did not get its error: {seen:?}"
            );
            assert!(seen.done, "{what}: a stream did not end: {seen:?}");
        }
        let last = outcomes.iter().map(|(_, at)| *at).max().unwrap_or_default();
        eprintln!("{what}: every stream ended {last:?} after the batch started");
        // Recovery: a new runner serves the same answer.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(node.get("/ready"), Ok((200, _))) {
            assert!(Instant::now() < deadline, "{what}: not ready again");
            std::thread::sleep(Duration::from_millis(100));
        }
        let again = stream_chat(&node, QUESTIONS[0], 24, &|| {});
        assert!(again.done && !again.error, "{what}: {again:?}");
        assert_eq!(again.content, solo[0], "{what}: after the restart");
    }
    node.interrupt_and_check();
}
