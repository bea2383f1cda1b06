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

/// The event ids of the lines of the failure log at `path`, in file order.
fn logged_ids(path: &Path) -> Vec<u64> {
    log_lines(path)
        .iter()
        .map(|l| {
            l["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("a line with no id: {l}"))
        })
        .collect()
}

/// The ids of the `runner_failed` events the node's event log holds, oldest first.
fn runner_failures(node: &canopy_actors::node::NodeHandle) -> Vec<u64> {
    use canopy_actors::events::EventBody;
    let held = node.events().read(0, usize::MAX);
    assert_eq!(held.missed, 0, "the node's event history dropped events");
    held.events
        .iter()
        .filter(|e| matches!(e.body, EventBody::RunnerFailed { .. }))
        .map(|e| e.id)
        .collect()
}

/// `spec` with every restart of its child (not its first start) held until a permit is added
/// to `gate`: a supervisor waits for its child's start, so the child stays down meanwhile.
fn with_held_restarts(
    mut spec: canopy_runtime::supervisor::ChildSpec,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
) -> canopy_runtime::supervisor::ChildSpec {
    let start = spec.start.clone();
    let started = std::sync::atomic::AtomicBool::new(false);
    spec.start = std::sync::Arc::new(move |supervisor| {
        let (start, gate) = (start.clone(), gate.clone());
        let restart = started.swap(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if restart {
                gate.acquire()
                    .await
                    .expect("the gate is never closed")
                    .forget();
            }
            start(supervisor).await
        })
    });
    spec
}

/// Waits for the node's runner to be ready, then sends a request that kills it (the runner
/// has `CANOPY_RUNNER_FAULT=crash-after-tokens=2`).
async fn kill_the_runner(base: &str) {
    eventually("a ready runner", async || {
        (http("GET", format!("{base}/ready"), None).await.0 == 200).then_some(())
    })
    .await;
    let request = json!({
        "model": "scripted",
        "messages": [{"role": "user", "content": "tokens=20"}],
    });
    let (status, body) = http("POST", format!("{base}/v1/chat/completions"), Some(request)).await;
    assert_eq!(status, 502, "the runner dies mid-answer: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_log_example_records_runner_deaths_and_survives_its_own_restart() {
    use canopy_actors::node::Node;
    use canopy_actors::runner::RunnerCommand;
    use failure_log::FailureLog;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("failures.jsonl");
    // The scripted engine, killed by fault injection after 2 tokens of every request.
    let command = RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy"))
        .args(["--engine", "scripted"])
        .env("CANOPY_RUNNER_FAULT", "crash-after-tokens=2");
    let builder = Node::builder(failure_log::node_config(command, "scripted", "scripted", 0));
    let restarts = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let logger = with_held_restarts(FailureLog::spec(&path, builder.context()), restarts.clone());
    let node = builder
        .child(logger)
        .start()
        .await
        .expect("the node starts");
    let base = format!("http://{}", node.api_addr().await.expect("api addr"));

    let first = eventually("the logger", async || failure_log_report(&node)).await;
    assert_eq!(first["child_id"], failure_log::CHILD_ID, "{first}");
    assert_eq!(
        first["details"]["path"],
        path.display().to_string(),
        "{first}"
    );

    // A runner death while the logger runs: in the file, as the event log holds it. (A
    // request normally costs one death; when the runner is killed before its supervisor read
    // what it wrote, the request is retried once, transparently: two.)
    kill_the_runner(&base).await;
    let before = eventually("the failure in the file", async || {
        let failures = runner_failures(&node);
        (!failures.is_empty() && logged_ids(&path) == failures).then_some(failures)
    })
    .await;
    let record = log_lines(&path).pop().expect("a line");
    assert_eq!(record["kind"], "runner_failed", "{record}");
    assert_eq!(record["instance"], "scripted-0", "{record}");
    assert_eq!(record["path"], "worker/scripted-0", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("killed by signal 9")),
        "{record}"
    );
    assert_eq!(record["will_restart"], true, "{record}");
    assert_eq!(record["failed_tasks"], 1, "{record}");
    assert!(record["pid"].as_u64().unwrap_or(0) > 0, "{record}");
    assert!(record["time_ms"].as_u64().unwrap_or(0) > 0, "{record}");
    assert!(
        record["stderr_tail"].as_array().is_some_and(|t| t
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("fault")))),
        "{record}"
    );
    let last = *before.last().expect("a failure");
    let report = eventually("the logger to acknowledge it", async || {
        failure_log_report(&node).filter(|r| {
            r["details"]["events_acked"]
                .as_u64()
                .is_some_and(|a| a >= last)
        })
    })
    .await;

    // Kill the logger (no post_stop, its mailbox gone). It is permanent, so the node restarts
    // it, but the test holds that restart until a runner has died while no logger runs.
    let old_id = report["id"].clone();
    let cell = node
        .root()
        .get_children()
        .into_iter()
        .find(|c| Value::String(c.get_id().to_string()) == old_id)
        .expect("the logger is a child of the node");
    cell.kill();
    eventually("the logger to be gone", async || {
        failure_log_report(&node).is_none().then_some(())
    })
    .await;
    kill_the_runner(&base).await;
    let during = eventually("a failure while the logger is down", async || {
        let failures = runner_failures(&node);
        (failures.len() > before.len()).then_some(failures)
    })
    .await;
    assert!(
        failure_log_report(&node).is_none(),
        "the logger runs again already"
    );
    assert_eq!(logged_ids(&path), before, "written while no logger ran");

    // The next incarnation resumes after the last event the first acknowledged: the failure
    // that happened while it was down is logged, and none before it twice.
    restarts.add_permits(1);
    let again = eventually("the restarted logger", async || {
        failure_log_report(&node).filter(|r| r["id"] != old_id)
    })
    .await;
    assert_eq!(again["child_id"], failure_log::CHILD_ID, "{again}");
    assert_eq!(again["restarts"], 1, "{again}");
    let settled = common::eventually_async(
        Duration::from_secs(20),
        "every failure in the file exactly once, in order",
        async || {
            let logged = logged_ids(&path);
            (logged.len() > before.len() && logged == runner_failures(&node)).then_some(())
        },
    )
    .await;
    if let Err(why) = settled {
        panic!(
            "{why}: the file holds {:?}, the node's log {:?} (before the kill {before:?}, \
             while the logger was down {during:?})",
            logged_ids(&path),
            runner_failures(&node)
        );
    }
    node.shutdown(Duration::from_secs(30))
        .await
        .expect("the node stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_actor_that_cannot_start_fails_the_node_start_and_leaves_no_runner() {
    use canopy_actors::node::Node;
    use canopy_actors::runner::RunnerCommand;
    use failure_log::FailureLog;

    let tag = common::unique_tag("failed-start");
    let command = RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy"))
        .args(["--engine", "scripted"])
        .env("CANOPY_TEST_TAG", &tag);
    // Its own model id: runner supervisors are named after their instance in ractor's
    // process-wide registry, so two nodes in one process cannot both serve "scripted".
    let builder = Node::builder(failure_log::node_config(command, "doomed", "scripted", 0));
    let logger = FailureLog::spec("/nonexistent/dir/failures.jsonl", builder.context());
    let started = builder.child(logger).start().await;
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

/// A batch step that never ends (the runner's work loop wedged while its heartbeat goes on)
/// is caught by `--stall-timeout`: every stream of the batch gets its error and `[DONE]`, the
/// runner is killed and restarted, and the node answers as before.
#[test]
fn a_wedged_batch_step_fails_every_stream_after_the_stall_timeout() {
    let _turn = real_model_turn();
    let tag = common::unique_tag("wedge");
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 streams share the batch; the 20th chunk sent wedges the step, once.
    let fault = format!(
        "stall-after-tokens=20,once={}",
        dir.path().join("wedged").display()
    );
    let node = NodeProcess::start(
        &["up", "--parallel", "4", "--stall-timeout", "2"],
        &[("CANOPY_TEST_TAG", &tag), ("CANOPY_RUNNER_FAULT", &fault)],
        true,
    );
    let pids = node.runner_pids();
    assert_eq!(pids.len(), 1, "one runner: {pids:?}");
    let t0 = Instant::now();
    let outcomes: Vec<(Seen, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = QUESTIONS
            .iter()
            .map(|q| {
                let node = &node;
                s.spawn(move || (stream_chat(node, q, 400, &|| {}), t0.elapsed()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    for (seen, _) in &outcomes {
        assert!(seen.error, "a stream did not get its error: {seen:?}");
        assert!(seen.done, "a stream did not end: {seen:?}");
    }
    let last = outcomes.iter().map(|(_, at)| *at).max().unwrap_or_default();
    eprintln!("wedged step: every stream ended {last:?} after they started");
    assert!(
        last < Duration::from_secs(50),
        "the 2 s stall timeout ended the streams, not the 60 s default: {last:?}"
    );
    // The wedged runner was replaced and the node serves again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(node.get("/ready"), Ok((200, _))) {
        assert!(Instant::now() < deadline, "not ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = node.runner_pids();
    assert_eq!(after.len(), 1, "one runner again: {after:?}");
    assert_ne!(after, pids, "the wedged runner was replaced");
    let again = stream_chat(&node, QUESTIONS[0], 24, &|| {});
    assert!(again.done && !again.error, "after the restart: {again:?}");
    let (_, metrics) = node.get("/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("canopy_runner_failures_total{")
                && l.contains("reason=\"stalled\"")),
        "the failure is counted as a stall: {metrics}"
    );
    node.interrupt_and_check();
}
