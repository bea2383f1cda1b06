//! Cross-node streams end, whatever their host does (issue #10, "a cross-node stream can
//! hang"). A child of `hostile` for its rogue peer, which here plays a host that goes quiet.
//!
//! - [`a_quiet_host_ends_its_streams_at_the_deadline_and_progress_keeps_a_slow_one`]: a rogue
//!   member with the cookie reports a Ready instance of a model only it serves; three clients
//!   of the real node A ask for it. The rogue takes all three tasks; for two of them (one
//!   streamed, after one chunk; one not streamed) it then says nothing more while staying a
//!   member, and both clients get their error (an SSE error event and `[DONE]`; a 502) within
//!   the stream deadline plus a margin; for the third it sends only `Progress` for longer than
//!   the deadline and then its output, which the client gets whole. Late, duplicate and
//!   unknown-key events sent meanwhile change nothing.
//! - [`a_frozen_host_fails_the_stream_at_once_and_serves_again_when_resumed`]: two real nodes;
//!   a client of B streams from an instance on A; A is frozen (SIGSTOP) mid-stream: the
//!   client gets an error event and `[DONE]` within the deadline (B drops the frozen A from
//!   its view first, and fails the stream with `PeerLost`); a request sent to B for A's
//!   model just after the freeze is answered with an error in that time too, not after the
//!   65-s limit of B's call to A; once A is resumed (SIGCONT), B serves from A's instance
//!   again.
//! - [`a_frozen_origin_has_its_task_cancelled_on_the_host`]: the same, with the origin B
//!   frozen instead: A stops the task (its runner goes idle, without a restart) rather than
//!   run the rest of its work for nobody; resumed, B's client gets its error and `[DONE]`, and
//!   B serves again.
//!
//! Run: `cargo test -p canopy --test e2e stream_deadlines::`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use canopy_actors::cluster::shared::{PROGRESS_EVERY, STREAM_DEADLINE};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::*;

/// What a streamed request saw.
#[derive(Debug, Default)]
struct Seen {
    status: u16,
    text: String,
    /// The error event's `error` object and when it came.
    error: Option<(Value, Instant)>,
    /// Whether `[DONE]` was the last event.
    done_last: bool,
    /// Every `data:` payload.
    events: Vec<String>,
}

/// POSTs `body` to `base`'s chat completions (in a thread); the receiver gets the answer.
fn post_from(base: &str, body: Value) -> mpsc::Receiver<(u16, Value)> {
    let (tx, rx) = mpsc::channel();
    let node = NodeProcess::client(base.to_string());
    std::thread::spawn(move || {
        let _ = tx.send(node.post("/v1/chat/completions", &body));
    });
    rx
}

/// Streams `body` from `base` (in a thread); `chunks` counts the text chunks as they come.
fn stream_from(base: &str, body: Value, chunks: Arc<AtomicUsize>) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    let base = base.to_string();
    std::thread::spawn(move || {
        let node = NodeProcess::client(base);
        let mut seen = Seen::default();
        seen.status = node.stream(&body, |data, at| {
            seen.events.push(data.to_string());
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                if v.get("error").is_some() {
                    seen.error = Some((v["error"].clone(), at));
                } else if let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                    && !t.is_empty()
                {
                    seen.text.push_str(t);
                    chunks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        seen.done_last = seen.events.last().map(String::as_str) == Some("[DONE]");
        let _ = tx.send(seen);
    });
    rx
}

/// A chat request for `model`.
fn ask(model: &str, content: &str, max_tokens: u32, stream: bool) -> Value {
    common::chat_body(model, content, max_tokens, stream)
}

/// Sends `event` of stream `key` from the rogue to `to`, in the rogue's own name.
fn send_event(rogue: &Rogue, to: &NodeId, key: u64, event: TaskEvent) -> bool {
    send_app(rogue, to, &AppMsg::Event { key, event })
}

fn send_app(rogue: &Rogue, to: &NodeId, msg: &AppMsg) -> bool {
    let envelope = Envelope::App {
        from: rogue.id.clone(),
        payload: encode(msg).expect("encodes"),
    };
    cast_to(&rogue.sessions, to, &rogue.sessions, envelope)
}

fn chunk(text: &str) -> TaskEvent {
    TaskEvent::Chunk(TokenChunk {
        index: 0,
        text: text.into(),
        token_ids: vec![1],
        logprobs: Vec::new(),
    })
}

fn done() -> TaskEvent {
    TaskEvent::Done {
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
        },
    }
}

/// How long past the deadline a client may wait for its error: a loaded machine's
/// scheduling, and the margin that tells "at the deadline" from "never".
const MARGIN: Duration = Duration::from_secs(10);

#[test]
fn a_quiet_host_ends_its_streams_at_the_deadline_and_progress_keeps_a_slow_one() {
    let rt = runtime();
    let _guard = rt.enter();
    let a = Node::start(COOKIE, &[]);
    let a_id = a.id();
    let led = eventually(Duration::from_secs(15), "A to lead itself", || {
        let s = a.snapshot();
        s.master.as_deref() == Some(a_id.as_str()) && s.term > 0
    });
    assert!(led.is_ok(), "{}", tail(&a.log(), 30));
    let term = a.snapshot().term;
    let mut rogue = insider(&rt, &[(&a, a_id.clone())], &a_id, term);

    // The rogue reports a Ready instance of a model only it serves; the leader adopts it.
    report_ready_forever(&rt, &mut rogue, &a_id, "quiet-instance", "quiet-model");
    assert!(
        eventually(
            Duration::from_secs(10),
            "the rogue's instance in A's plan",
            || a.state().to_string().contains("quiet-instance")
        )
        .is_ok(),
        "{}",
        tail(&a.log(), 20)
    );
    let submits = rogue.submits.take().expect("the rogue's inbox");
    let next_key = |what: &str| {
        let (origin, key) = submits
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!(
                    "A did not send the rogue the {what} task ({e})\n{}",
                    tail(&a.log(), 20)
                )
            });
        assert_eq!(origin, a_id);
        key
    };

    // 1. A stream that gets one chunk, then nothing (the rogue stays a member).
    let quiet_chunks = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let quiet_stream = stream_from(
        &a.proc.base,
        ask("quiet-model", "quiet stream", 8, true),
        quiet_chunks.clone(),
    );
    let quiet_key = next_key("streamed");
    assert!(send_event(
        &rogue,
        &a_id,
        quiet_key,
        chunk("before the silence")
    ));

    // 2. A request that is not streamed, and nothing at all after the rogue took it.
    let quiet_json = post_from(&a.proc.base, ask("quiet-model", "quiet json", 8, false));
    let json_key = next_key("non-streamed");

    // 3. A stream whose host only says it is still working, for longer than the deadline,
    // then answers.
    let slow_stream = stream_from(
        &a.proc.base,
        ask("quiet-model", "slow but live", 8, true),
        Arc::default(),
    );
    let slow_key = next_key("slow");
    let slow_for = STREAM_DEADLINE + Duration::from_secs(5);
    let progress = {
        let (sessions, id, a_id) = (rogue.sessions.clone(), rogue.id.clone(), a_id.clone());
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + slow_for;
            while tokio::time::Instant::now() < until {
                let msg = Envelope::App {
                    from: id.clone(),
                    payload: encode(&AppMsg::Progress { key: slow_key }).expect("encodes"),
                };
                let _ = cast_to(&sessions, &a_id, &sessions, msg);
                tokio::time::sleep(PROGRESS_EVERY / 2).await;
            }
        })
    };

    // The quiet stream ends with an error event, then [DONE], at the deadline.
    let seen = quiet_stream
        .recv_timeout(STREAM_DEADLINE + MARGIN)
        .unwrap_or_else(|_| {
            panic!(
                "the quiet stream did not end within {:?}\n{}",
                STREAM_DEADLINE + MARGIN,
                tail(&a.log(), 30)
            )
        });
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(seen.text, "before the silence", "{seen:?}");
    let (error, at) = seen
        .error
        .clone()
        .unwrap_or_else(|| panic!("no error event: {seen:?}\n{}", tail(&a.log(), 30)));
    assert!(
        seen.done_last,
        "the stream did not end with [DONE]: {seen:?}"
    );
    assert_eq!(error["code"], "runner_failed", "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(rogue.id.as_str()) && message.contains("sent nothing about the task"),
        "{message}"
    );
    eprintln!(
        "the quiet stream failed {:?} after it began (deadline {STREAM_DEADLINE:?})",
        at - started
    );

    // The request that was not streamed: a 502 saying the same.
    let (status, body) = quiet_json
        .recv_timeout(STREAM_DEADLINE + MARGIN)
        .expect("the non-streamed request ended within the deadline");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "runner_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sent nothing about the task")),
        "{body}"
    );
    assert!(
        a.log()
            .contains("sent nothing about it within the deadline"),
        "A did not say why it failed the streams\n{}",
        tail(&a.log(), 30)
    );

    // Late and duplicate events of the ended streams, and events for keys A never sent, are
    // dropped; the slow stream, still open, is not disturbed by them.
    for (key, event) in [
        (quiet_key, chunk("LATE")),
        (quiet_key, done()),
        (quiet_key, done()),
        (json_key, chunk("LATE")),
        (json_key, done()),
        (quiet_key ^ 1, chunk("UNKNOWN")),
        (7, done()),
    ] {
        assert!(send_event(&rogue, &a_id, key, event));
    }
    assert!(send_app(&rogue, &a_id, &AppMsg::Progress { key: 7 }));

    // The slow stream outlives the deadline on progress alone, then gets its output.
    rt.block_on(progress).expect("progress");
    assert!(send_event(&rogue, &a_id, slow_key, chunk("slow but live")));
    assert!(send_event(&rogue, &a_id, slow_key, done()));
    let slow = slow_stream
        .recv_timeout(MARGIN)
        .expect("the slow stream ended once its host answered");
    assert_eq!(slow.status, 200, "{slow:?}");
    assert!(
        slow.error.is_none(),
        "a host that kept sending progress was cut off: {slow:?}\n{}",
        tail(&a.log(), 30)
    );
    assert_eq!(slow.text, "slow but live", "{slow:?}");
    assert!(slow.done_last, "{slow:?}");

    // Nothing else broke: A is healthy, the rogue is still a member, A still leads.
    assert!(a.healthy());
    let after = a.snapshot();
    assert!(after.members.contains_key(rogue.id.as_str()), "{after:?}");
    assert_eq!(after.master.as_deref(), Some(a_id.as_str()));
    rt.block_on(rogue.stop());
}

/// Two real nodes, A leading, with an instance of the scripted model on A that B routes to.
fn cluster_with_an_instance_on_a() -> (Node, Node) {
    let (a, b) = two_node_cluster();
    let (status, placed) = a.proc.post(
        "/instances",
        &json!({"model": "scripted", "node": a.id().to_string(), "wait": 30}),
    );
    assert_eq!(status, 201, "{placed}\n{}", logs(&[&a, &b]));
    assert!(
        eventually(
            Duration::from_secs(15),
            "B to route to A's instance",
            || { serves(&b) }
        )
        .is_ok(),
        "{}",
        logs(&[&a, &b])
    );
    (a, b)
}

/// Whether `node` answers a short chat request for the scripted model.
fn serves(node: &Node) -> bool {
    node.proc
        .post("/v1/chat/completions", &ask("scripted", "hi", 2, false))
        .0
        == 200
}

/// The tasks `node`'s runners say they are running.
fn running(node: &Node) -> Option<f64> {
    node.proc
        .get("/metrics")
        .ok()
        .map(|(_, text)| common::metric(&text, "canopy_batch_running"))
}

fn restarts(node: &Node) -> Option<f64> {
    node.proc
        .get("/metrics")
        .ok()
        .map(|(_, text)| common::metric(&text, "canopy_runner_restarts_total"))
}

/// Starts a long stream from `b` (2000 tokens, 20 ms apart: 40 s of work on A's instance)
/// and waits until its first chunks came and A's runner reports the task.
fn long_stream(a: &Node, b: &Node) -> mpsc::Receiver<Seen> {
    let chunks = Arc::new(AtomicUsize::new(0));
    let stream = stream_from(
        &b.proc.base,
        ask("scripted", "tokens=2000 delay_ms=20", 2000, true),
        chunks.clone(),
    );
    assert!(
        eventually(Duration::from_secs(10), "the first chunks", || chunks
            .load(Ordering::Relaxed)
            >= 3)
        .is_ok(),
        "{}",
        logs(&[a, b])
    );
    assert!(
        eventually(
            Duration::from_secs(10),
            "A's runner to report the task",
            || { running(a).is_some_and(|n| n >= 1.0) }
        )
        .is_ok(),
        "A's runner never reported a running task\n{}",
        logs(&[a, b])
    );
    stream
}

/// Asserts that `seen` ended with an error event naming `host`, then `[DONE]`.
fn assert_failed_naming(seen: &Seen, host: &NodeId, nodes: &[&Node]) {
    let (error, _) = seen
        .error
        .clone()
        .unwrap_or_else(|| panic!("no error event: {seen:?}\n{}", logs(nodes)));
    assert!(
        seen.done_last,
        "the stream did not end with [DONE]: {seen:?}"
    );
    assert_eq!(error["code"], "runner_failed", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains(host.as_str())),
        "the error does not name the host: {error}"
    );
}

#[test]
fn a_frozen_host_fails_the_stream_at_once_and_serves_again_when_resumed() {
    let (a, b) = cluster_with_an_instance_on_a();
    let stream = long_stream(&a, &b);
    let a_pid = Pid::from_raw(a.proc.pid() as i32);
    kill(a_pid, Signal::SIGSTOP).expect("SIGSTOP");
    let frozen = Instant::now();
    // A request sent to the frozen A before B noticed: B does not wait out the 65-s limit of
    // its call to A once A leaves its view.
    let late = post_from(
        &b.proc.base,
        ask("scripted", "sent to a frozen node", 2, false),
    );
    let seen = stream.recv_timeout(STREAM_DEADLINE + MARGIN);
    let late = late.recv_timeout(STREAM_DEADLINE + MARGIN);
    kill(a_pid, Signal::SIGCONT).expect("SIGCONT");
    let seen = seen.unwrap_or_else(|_| {
        panic!(
            "the stream did not end within {:?} of the freeze\n{}",
            STREAM_DEADLINE + MARGIN,
            logs(&[&a, &b])
        )
    });
    assert_failed_naming(&seen, &a.id(), &[&a, &b]);
    let (status, body) = late.unwrap_or_else(|_| {
        panic!(
            "a request to B for the frozen A's model was not answered within {:?}\n{}",
            STREAM_DEADLINE + MARGIN,
            logs(&[&a, &b])
        )
    });
    assert!(
        status == 503 || status == 502,
        "a request to B for the frozen A's model: {status} {body}"
    );
    if let Some((_, at)) = &seen.error {
        eprintln!("the stream failed {:?} after its host froze", *at - frozen);
    }
    let resumed = Instant::now();
    let again = eventually(Duration::from_secs(30), "B to serve from A again", || {
        serves(&b)
    });
    assert!(again.is_ok(), "{}", logs(&[&a, &b]));
    eprintln!(
        "B served from A again {:?} after A resumed",
        resumed.elapsed()
    );
}

#[test]
fn a_frozen_origin_has_its_task_cancelled_on_the_host() {
    let (a, b) = cluster_with_an_instance_on_a();
    let restarts_before = restarts(&a);
    let stream = long_stream(&a, &b);
    // B, the origin, freezes: A can no longer send it anything. A stops the task rather than
    // run the rest of its 40 s of work for nobody.
    let b_pid = Pid::from_raw(b.proc.pid() as i32);
    kill(b_pid, Signal::SIGSTOP).expect("SIGSTOP");
    let idle = eventually(Duration::from_secs(15), "A's runner to be idle", || {
        running(&a) == Some(0.0)
    });
    kill(b_pid, Signal::SIGCONT).expect("SIGCONT");
    assert!(
        idle.is_ok(),
        "A's runner still runs {:?} tasks for a frozen origin\n{}",
        running(&a),
        logs(&[&a, &b])
    );
    // Cancelled, not killed: A's runner never restarted.
    assert_eq!(restarts(&a), restarts_before, "{}", logs(&[&a, &b]));
    // Resumed, B's client is told (whatever B notices first: A gone from its view, or the
    // stream's deadline), and B serves from A again.
    let seen = stream
        .recv_timeout(STREAM_DEADLINE + MARGIN)
        .unwrap_or_else(|_| panic!("B's stream did not end once B resumed\n{}", logs(&[&a, &b])));
    assert_failed_naming(&seen, &a.id(), &[&a, &b]);
    assert!(
        eventually(Duration::from_secs(30), "B to serve from A again", || {
            serves(&b)
        })
        .is_ok(),
        "{}",
        logs(&[&a, &b])
    );
}
