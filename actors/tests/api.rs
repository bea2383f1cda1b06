//! The HTTP API end to end: an `ApiActor` on a real listener (127.0.0.1, port 0) in front of
//! a scripted fake `Backend`, driven by a small hyper client.
//!
//! The fake's behaviour is chosen by the model name of a request:
//!
//! | model | behaviour |
//! |---|---|
//! | `scripted` | "Hello", ",", " world", then `Done(Stop)` with usage 7 + 3 |
//! | `caller` | "Let me check. " and a `<tool_call>` of `get_weather` (city Paris), then `Done(Stop)` |
//! | `slow` | the `scripted` output after 300 ms (keep-alives flow meanwhile) |
//! | `fail-mid` | two chunks, then the runner dies (`started: true`) |
//! | `flaky` | first attempt: the runner dies before any output; retry (`wait_ready`): `scripted` |
//! | `flaky-ack` | first submit is refused with a runner death; retry: `scripted` |
//! | `dead` | the runner dies before any output, every time |
//! | `task-error` | the runner reports a task error (`Internal`) |
//! | `too-long` | the runner reports `ContextLengthExceeded` as the task's first event |
//! | `too-long-late` | the same, 300 ms after the ack (the stream has begun by then) |
//! | `too-long-ack` | the submit is refused with `ContextLengthExceeded` |
//! | `invalid` | the runner reports `InvalidRequest` as the task's first event |
//! | `vanish` | one chunk, then the stream ends without a final event |
//! | `endless` | a chunk every 20 ms until the receiver is dropped (recorded as a cancellation) |
//! | `busy` / `full` | refused: `Busy` / `RunnerError::QueueFull` |
//! | `cold` | refused: `NoReadyInstance` |
//! | anything else | refused: `UnknownModel` |
//!
//! The legacy completions and Ollama endpoints are tested against the same fake in `compat`,
//! Anthropic's Messages API in `anthropic`, tool calls on all three in `tools`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_actors::api::{
    ApiActor, ApiArgs, ApiConfig, ApiMsg, Backend, LocalInstanceView, LocalState, Metrics,
    ModelInfo, StateView, SubmitError,
};
use canopy_actors::runner::{RunnerError, RunnerEvent, TaskEvent, TaskHandle};
use canopy_proto::{
    BatchStats, FinishReason, GenerateRequest, Prompt, TaskErrorKind, TokenChunk, Usage,
};
use canopy_runtime::introspect::ActorReport;
use canopy_runtime::process::FailureReason;
use futures::FutureExt;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

#[path = "api/anthropic.rs"]
mod anthropic;
#[path = "api/compat.rs"]
mod compat;
#[path = "api/tools.rs"]
mod tools;

/// Bound on every network step of a test, so a bug fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);
/// The retry wait the tests configure.
const RETRY_WAIT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// The fake backend

struct Fake {
    ready: AtomicBool,
    /// Every submit: model, `wait_ready`, request.
    submits: Mutex<Vec<(String, Option<Duration>, GenerateRequest)>>,
    /// Set when an `endless` task's receiver was dropped.
    cancelled: Arc<AtomicBool>,
}

impl Fake {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(true),
            submits: Mutex::new(Vec::new()),
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }

    fn submits(&self) -> Vec<(String, Option<Duration>, GenerateRequest)> {
        self.submits.lock().expect("lock").clone()
    }
}

fn chunk(index: u32, text: &str) -> TaskEvent {
    TaskEvent::Chunk(TokenChunk {
        index,
        text: text.to_string(),
        token_ids: vec![100 + index],
        logprobs: Vec::new(),
    })
}

fn scripted() -> Vec<TaskEvent> {
    vec![
        chunk(0, "Hello"),
        chunk(1, ","),
        // Part of a character: no text yet.
        TaskEvent::Chunk(TokenChunk {
            index: 2,
            text: String::new(),
            token_ids: vec![7],
            logprobs: Vec::new(),
        }),
        chunk(3, " world"),
        TaskEvent::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
            },
        },
    ]
}

/// The answer of the `caller` model: a sentence, then a call of `get_weather` cut into
/// pieces that split the `<tool_call>` tag.
fn calling() -> Vec<TaskEvent> {
    let pieces = [
        "Let me check. <tool",
        "_call>\n{\"name\": \"get_weather\", ",
        "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    ];
    let mut events: Vec<TaskEvent> = pieces
        .iter()
        .zip(0u32..)
        .map(|(text, i)| chunk(i, text))
        .collect();
    events.push(TaskEvent::Done {
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 9,
            completion_tokens: 20,
        },
    });
    events
}

fn died(started: bool) -> RunnerError {
    RunnerError::RunnerFailed {
        instance: "i0".to_string(),
        reason: FailureReason::Signaled { signal: 9 },
        stderr_tail: vec!["boom".to_string()],
        started,
    }
}

fn too_long() -> RunnerError {
    RunnerError::TaskFailed {
        instance: "i0".to_string(),
        message: "the prompt has 9000 tokens; this model instance holds at most 8192 positions"
            .to_string(),
        kind: TaskErrorKind::ContextLengthExceeded,
    }
}

fn handle_of(events: Vec<TaskEvent>) -> TaskHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    for event in events {
        let _ = tx.send(event);
    }
    TaskHandle {
        task_id: 1,
        events: rx,
    }
}

impl Backend for Fake {
    fn models(&self) -> Vec<ModelInfo> {
        ["scripted", "org/slashed", "cold"]
            .iter()
            .map(|id| ModelInfo {
                id: id.to_string(),
                created: 1_700_000_000,
                owned_by: "canopy".to_string(),
                ready: *id != "cold",
            })
            .collect()
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn submit(
        &self,
        model: &str,
        request: GenerateRequest,
        wait_ready: Option<Duration>,
    ) -> BoxFuture<'static, Result<TaskHandle, SubmitError>> {
        self.submits
            .lock()
            .expect("lock")
            .push((model.to_string(), wait_ready, request));
        let model = model.to_string();
        let cancelled = self.cancelled.clone();
        async move {
            match model.as_str() {
                "scripted" => Ok(handle_of(scripted())),
                "caller" => Ok(handle_of(calling())),
                "slow" => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        for event in scripted() {
                            let _ = tx.send(event);
                        }
                    });
                    Ok(TaskHandle {
                        task_id: 2,
                        events: rx,
                    })
                }
                "fail-mid" => Ok(handle_of(vec![
                    chunk(0, "Hel"),
                    chunk(1, "lo"),
                    TaskEvent::Failed(died(true)),
                ])),
                "flaky" if wait_ready.is_none() => {
                    Ok(handle_of(vec![TaskEvent::Failed(died(false))]))
                }
                "flaky" | "flaky-ack" if wait_ready.is_some() => Ok(handle_of(scripted())),
                "flaky-ack" => Err(SubmitError::Runner(died(false))),
                "dead" => Ok(handle_of(vec![TaskEvent::Failed(died(false))])),
                "task-error" => Ok(handle_of(vec![TaskEvent::Failed(
                    RunnerError::TaskFailed {
                        instance: "i0".to_string(),
                        message: "the engine broke".to_string(),
                        kind: TaskErrorKind::Internal,
                    },
                )])),
                "too-long" => Ok(handle_of(vec![TaskEvent::Failed(too_long())])),
                "too-long-late" => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = tx.send(TaskEvent::Failed(too_long()));
                    });
                    Ok(TaskHandle {
                        task_id: 4,
                        events: rx,
                    })
                }
                "too-long-ack" => Err(SubmitError::Runner(too_long())),
                "invalid" => Ok(handle_of(vec![TaskEvent::Failed(
                    RunnerError::TaskFailed {
                        instance: "i0".to_string(),
                        message: "invalid request: top_k must be positive".to_string(),
                        kind: TaskErrorKind::InvalidRequest,
                    },
                )])),
                "vanish" => Ok(handle_of(vec![chunk(0, "x")])),
                "endless" => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        let mut index = 0;
                        loop {
                            if tx.send(chunk(index, "tok ")).is_err() {
                                break;
                            }
                            index += 1;
                            tokio::select! {
                                _ = tx.closed() => break,
                                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                            }
                        }
                        cancelled.store(true, Ordering::SeqCst);
                    });
                    Ok(TaskHandle {
                        task_id: 3,
                        events: rx,
                    })
                }
                "busy" => Err(SubmitError::Busy(model)),
                "full" => Err(SubmitError::Runner(RunnerError::QueueFull {
                    instance: "i0".to_string(),
                    max: 4,
                })),
                "cold" => Err(SubmitError::NoReadyInstance(model)),
                _ => Err(SubmitError::UnknownModel(model)),
            }
        }
        .boxed()
    }

    fn state(&self) -> BoxFuture<'static, StateView> {
        let instance = LocalInstanceView {
            instance: "i0".into(),
            model: "scripted".into(),
            status: "Ready".into(),
            pid: Some(7),
            restarts: 0,
            last_failure: None,
        };
        let state = StateView::Local(LocalState {
            instances: vec![instance],
        });
        async { state }.boxed()
    }

    fn actors(&self) -> BoxFuture<'static, Option<ActorReport>> {
        let actor = |name: &str, children| ActorReport {
            id: "0.1".into(),
            name: Some(name.into()),
            child_id: None,
            kind: name.into(),
            status: "Running".into(),
            uptime_ms: Some(1),
            restarts: 0,
            details: Value::Null,
            children,
        };
        let tree = actor("node", vec![actor("api", vec![])]);
        async { Some(tree) }.boxed()
    }
}

// ---------------------------------------------------------------------------------------
// Starting the API

struct Api {
    actor: ActorRef<ApiMsg>,
    handle: JoinHandle<()>,
    addr: SocketAddr,
    fake: Arc<Fake>,
    metrics: Metrics,
}

fn config() -> ApiConfig {
    ApiConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        retry_wait: RETRY_WAIT,
        keepalive: Duration::from_millis(50),
        shutdown_timeout: Duration::from_secs(2),
        ..ApiConfig::default()
    }
}

async fn start() -> Api {
    start_with(config()).await
}

async fn start_with(config: ApiConfig) -> Api {
    let fake = Fake::new();
    let metrics = Metrics::new();
    let args = ApiArgs {
        config,
        backend: fake.clone(),
        metrics: metrics.clone(),
    };
    let (actor, handle) = Actor::spawn(None, ApiActor, args)
        .await
        .expect("the API actor starts");
    let addr = ractor::call_t!(actor, ApiMsg::LocalAddr, 5_000).expect("local address");
    assert_ne!(addr.port(), 0);
    Api {
        actor,
        handle,
        addr,
        fake,
        metrics,
    }
}

impl Api {
    async fn stop(self) {
        self.actor.stop(None);
        tokio::time::timeout(STEP, self.handle)
            .await
            .expect("the API actor stops in time")
            .expect("the API actor ends cleanly");
    }
}

// ---------------------------------------------------------------------------------------
// A small HTTP client

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {}", self.body))
    }
}

/// Sends one request on a fresh connection; returns the response (body unread) and the
/// connection's task (abort it to drop the connection).
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (Response<Incoming>, JoinHandle<()>) {
    let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("response in time")
        .expect("response");
    (response, conn)
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<String>) -> Reply {
    let (response, _conn) = send(addr, method, path, body).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn chat(addr: SocketAddr, body: Value) -> Reply {
    call(addr, "POST", "/v1/chat/completions", Some(body.to_string())).await
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "stream": stream,
    })
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
                .map(str::to_string)
        })
        .collect()
}

fn sse_json(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

/// Checks OpenAI's error shape and returns the error object.
fn openai_error(reply: &Reply) -> Value {
    let body = reply.json();
    let error = body
        .get("error")
        .unwrap_or_else(|| panic!("no error object: {}", reply.body))
        .clone();
    assert!(error["message"].is_string(), "{}", reply.body);
    assert!(error["type"].is_string(), "{}", reply.body);
    let object = error.as_object().expect("error is an object");
    assert!(object.contains_key("param"), "{}", reply.body);
    assert!(object.contains_key("code"), "{}", reply.body);
    error
}

// ---------------------------------------------------------------------------------------
// Chat completions

#[tokio::test]
async fn a_completion_is_answered_in_openai_shape() {
    let api = start().await;
    let mut body = chat_body("scripted", false);
    body["max_completion_tokens"] = json!(12);
    body["temperature"] = json!(0.2);
    body["seed"] = json!(42);
    body["stop"] = json!(["\n\n", "END"]);
    let reply = chat(api.addr, body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert!(
        json["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "scripted");
    assert!(json["created"].as_u64().is_some_and(|t| t > 1_600_000_000));
    assert_eq!(json["choices"][0]["index"], 0);
    assert_eq!(json["choices"][0]["message"]["role"], "assistant");
    assert_eq!(json["choices"][0]["message"]["content"], "Hello, world");
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );

    let submits = api.fake.submits();
    assert_eq!(submits.len(), 1);
    let (model, wait, request) = &submits[0];
    assert_eq!((model.as_str(), *wait), ("scripted", None));
    let Prompt::Chat(messages) = &request.prompt else {
        panic!("a chat prompt");
    };
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (messages[0].role.as_str(), messages[0].content.as_str()),
        ("system", "Be brief.")
    );
    assert_eq!(request.params.max_tokens, 12);
    assert_eq!(request.params.temperature, 0.2);
    assert_eq!(request.params.seed, 42);
    assert_eq!(
        request.params.stop,
        vec!["\n\n".to_string(), "END".to_string()]
    );
    api.stop().await;
}

#[tokio::test]
async fn a_stream_sends_role_content_finish_usage_and_done() {
    let api = start().await;
    let mut body = chat_body("scripted", true);
    body["stream_options"] = json!({"include_usage": true});
    let reply = chat(api.addr, body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/event-stream"))
    );
    let data = sse_data(&reply.body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        reply.body
    );
    let events = sse_json(&data);
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    let id = &events[0]["id"];
    assert!(
        events.iter().all(|e| &e["id"] == id),
        "one id for the whole stream"
    );
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello, world");
    let finish = &events[events.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &events[events.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
    // With include_usage, every other chunk carries `usage: null`.
    assert!(events[..events.len() - 1].iter().all(|e| e["usage"].is_null()
        && e.as_object().is_some_and(|o| o.contains_key("usage"))));
    api.stop().await;
}

#[tokio::test]
async fn a_stream_without_include_usage_has_no_usage() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("scripted", true)).await;
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events = sse_json(&data);
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "{}",
        reply.body
    );
    assert_eq!(
        events
            .last()
            .map(|e| e["choices"][0]["finish_reason"].clone()),
        Some(json!("stop"))
    );
    api.stop().await;
}

#[tokio::test]
async fn keepalive_comments_flow_while_waiting() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("slow", true)).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains(": keep-alive"), "{}", reply.body);
    assert_eq!(
        sse_data(&reply.body).last().map(String::as_str),
        Some("[DONE]")
    );
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Bad requests

#[tokio::test]
async fn every_bad_request_gets_an_openai_error_and_the_server_keeps_serving() {
    let api = start().await;
    let user = json!([{"role": "user", "content": "x"}]);
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{\"model\": ".to_string(), None),
        ("not json".to_string(), None),
        (String::new(), None),
        ("[]".to_string(), None),
        (
            r#"{"model":"scripted","messages":[]} trailing"#.to_string(),
            None,
        ),
        (json!({"messages": user}).to_string(), Some("model")),
        (json!({"model": "scripted"}).to_string(), Some("messages")),
        (
            json!({"model": 5, "messages": user}).to_string(),
            Some("model"),
        ),
        (
            json!({"model": "scripted", "messages": "hi"}).to_string(),
            Some("messages"),
        ),
        (
            json!({"model": "scripted", "messages": []}).to_string(),
            Some("messages"),
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "robot", "content": "x"}]})
                .to_string(),
            Some("messages[0].role"),
        ),
        (
            json!({"model": "scripted", "messages": [{"content": "x"}]}).to_string(),
            Some("messages[0].role"),
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": 5}]}).to_string(),
            Some("messages[0].content"),
        ),
        (
            json!({"model": "scripted", "messages": user, "max_tokens": "ten"}).to_string(),
            Some("max_tokens"),
        ),
        (
            json!({"model": "scripted", "messages": user, "max_tokens": 0}).to_string(),
            Some("max_tokens"),
        ),
        (
            json!({"model": "scripted", "messages": user, "max_tokens": -3}).to_string(),
            Some("max_tokens"),
        ),
        (
            json!({"model": "scripted", "messages": user, "max_completion_tokens": 0}).to_string(),
            Some("max_completion_tokens"),
        ),
        (
            json!({"model": "scripted", "messages": user, "temperature": 2.5}).to_string(),
            Some("temperature"),
        ),
        (
            json!({"model": "scripted", "messages": user, "temperature": -0.1}).to_string(),
            Some("temperature"),
        ),
        (
            json!({"model": "scripted", "messages": user, "top_p": 1.5}).to_string(),
            Some("top_p"),
        ),
        (
            json!({"model": "scripted", "messages": user, "stream": "yes"}).to_string(),
            Some("stream"),
        ),
        (
            json!({"model": "scripted", "messages": user, "stop": ["a","b","c","d","e"]})
                .to_string(),
            Some("stop"),
        ),
        (
            json!({"model": "scripted", "messages": user, "n": 17}).to_string(),
            Some("n"),
        ),
        (
            json!({"model": "scripted", "messages": user, "response_format": {"type": "xml"}})
                .to_string(),
            Some("response_format.type"),
        ),
        (
            json!({"model": "scripted", "messages": user, "frobnicate": 1}).to_string(),
            Some("frobnicate"),
        ),
        (
            json!({"model": "scripted", "messages": user, "stop": 5}).to_string(),
            Some("stop"),
        ),
        (
            json!({"model": "scripted", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]})
            .to_string(),
            Some("messages[0].content[0]"),
        ),
        (
            json!({"model": "scripted", "messages": [{"role": "user", "content": null}]})
                .to_string(),
            Some("messages[0].content"),
        ),
    ];
    for (body, param) in cases {
        let reply = call(api.addr, "POST", "/v1/chat/completions", Some(body.clone())).await;
        assert_eq!(reply.status, 400, "{body} -> {}", reply.body);
        let error = openai_error(&reply);
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"].as_str(), param, "{body} -> {}", reply.body);
    }
    assert!(
        api.fake.submits().is_empty(),
        "no bad request reached the backend"
    );

    let reply = chat(api.addr, chat_body("scripted", false)).await;
    assert_eq!(reply.status, 200, "the server still serves: {}", reply.body);
    api.stop().await;
}

#[tokio::test]
async fn a_huge_body_gets_413_in_openai_shape() {
    let api = start().await;
    // Announce 2 MiB and send none of it: the API refuses on the header alone.
    let mut stream = TcpStream::connect(api.addr).await.expect("connect");
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\ncontent-length: 2097152\r\n\r\n";
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    let (_, body) = raw.split_once("\r\n\r\n").expect("a body");
    let reply = Reply {
        status: 413,
        headers: HeaderMap::new(),
        body: body.to_string(),
    };
    assert_eq!(openai_error(&reply)["code"], "request_too_large");

    let reply = chat(api.addr, chat_body("scripted", false)).await;
    assert_eq!(reply.status, 200);
    api.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_openai_errors() {
    let api = start().await;
    let reply = call(api.addr, "GET", "/v1/nothing", None).await;
    assert_eq!(reply.status, 404);
    assert_eq!(openai_error(&reply)["code"], "unknown_url");
    let reply = call(api.addr, "GET", "/v1/chat/completions", None).await;
    assert_eq!(reply.status, 405);
    openai_error(&reply);
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Refusals by the node

#[tokio::test]
async fn refusals_map_to_404_503_and_429() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("no-such-model", false)).await;
    assert_eq!(reply.status, 404);
    let error = openai_error(&reply);
    assert_eq!(
        (error["code"].as_str(), error["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );

    let reply = chat(api.addr, chat_body("cold", true)).await;
    assert_eq!(reply.status, 503, "a stream is refused before it begins");
    assert_eq!(openai_error(&reply)["code"], "no_ready_instance");
    assert!(reply.headers.contains_key("retry-after"));

    for model in ["busy", "full"] {
        let reply = chat(api.addr, chat_body(model, false)).await;
        assert_eq!(reply.status, 429, "{model}");
        let error = openai_error(&reply);
        assert_eq!(error["type"], "rate_limit_error");
        assert_eq!(reply.headers["retry-after"], "1");
    }
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Runner failures

#[tokio::test]
async fn a_runner_death_mid_stream_ends_the_stream_with_an_error_at_once() {
    let api = start().await;
    let started = Instant::now();
    let reply = chat(api.addr, chat_body("fail-mid", true)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, 200);
    let data = sse_data(&reply.body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        reply.body
    );
    let events = sse_json(&data);
    let error = &events.last().expect("events")["error"];
    assert_eq!(error["code"], "runner_failed", "{}", reply.body);
    assert!(error["message"].as_str().is_some_and(|m| m.contains("i0")));
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello");
    assert_eq!(api.fake.submits().len(), 1, "output was sent: no retry");
    api.stop().await;
}

#[tokio::test]
async fn a_runner_death_after_output_is_a_502() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("fail-mid", false)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(openai_error(&reply)["code"], "runner_failed");
    assert_eq!(api.fake.submits().len(), 1);
    api.stop().await;
}

#[tokio::test]
async fn a_runner_death_before_output_is_retried_once() {
    let api = start().await;
    for model in ["flaky", "flaky-ack"] {
        let before = api.fake.submits().len();
        let reply = chat(api.addr, chat_body(model, false)).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.body);
        assert_eq!(
            reply.json()["choices"][0]["message"]["content"],
            "Hello, world"
        );
        let waits: Vec<_> = api.fake.submits()[before..].iter().map(|s| s.1).collect();
        assert_eq!(waits, vec![None, Some(RETRY_WAIT)], "{model}");
    }
    let metrics = call(api.addr, "GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("canopy_request_retries_total{model=\"flaky\"} 1"),
        "{metrics}"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_stream_whose_runner_dies_before_output_is_retried_once() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("flaky", true)).await;
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events = sse_json(&data);
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "{}",
        reply.body
    );
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello, world");
    assert_eq!(api.fake.submits().len(), 2);
    api.stop().await;
}

#[tokio::test]
async fn a_second_death_is_not_retried_again() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("dead", false)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(openai_error(&reply)["code"], "runner_failed");
    assert_eq!(api.fake.submits().len(), 2, "one retry, no more");

    let reply = chat(api.addr, chat_body("dead", true)).await;
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events = sse_json(&data);
    assert_eq!(
        events.last().expect("events")["error"]["code"],
        "runner_failed"
    );
    assert_eq!(api.fake.submits().len(), 4);
    api.stop().await;
}

#[tokio::test]
async fn task_errors_and_vanished_streams_are_answered() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("task-error", false)).await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert_eq!(openai_error(&reply)["code"], "task_failed");
    let reply = chat(api.addr, chat_body("vanish", false)).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    let reply = chat(api.addr, chat_body("vanish", true)).await;
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        sse_json(&data).last().expect("events")["error"]["code"],
        "runner_failed"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_a_400_not_retried() {
    let api = start().await;
    for (model, stream) in [
        ("too-long", false),
        ("too-long", true),
        ("too-long-ack", false),
        ("too-long-ack", true),
    ] {
        let before = api.fake.submits().len();
        let reply = chat(api.addr, chat_body(model, stream)).await;
        assert_eq!(reply.status, 400, "{model} stream={stream}: {}", reply.body);
        assert!(
            reply.headers["content-type"]
                .to_str()
                .is_ok_and(|t| t.starts_with("application/json")),
            "{model} stream={stream}: an error body, not a stream"
        );
        let error = openai_error(&reply);
        assert_eq!(error["type"], "invalid_request_error", "{}", reply.body);
        assert_eq!(error["code"], "context_length_exceeded", "{}", reply.body);
        assert_eq!(error["param"], "messages", "{}", reply.body);
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("9000 tokens") && m.contains("8192")),
            "{}",
            reply.body
        );
        assert_eq!(
            api.fake.submits().len(),
            before + 1,
            "{model}: a client error is never retried"
        );
    }
    let metrics = call(api.addr, "GET", "/metrics", None).await.body;
    assert!(
        !metrics.contains("canopy_request_retries_total{"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("canopy_runner_failures_total{"),
        "{metrics}"
    );
    api.stop().await;
}

#[tokio::test]
async fn an_invalid_request_found_by_the_runner_is_a_400() {
    let api = start().await;
    for stream in [false, true] {
        let reply = chat(api.addr, chat_body("invalid", stream)).await;
        assert_eq!(reply.status, 400, "stream={stream}: {}", reply.body);
        let error = openai_error(&reply);
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], "invalid_request");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("top_k"))
        );
    }
    assert_eq!(api.fake.submits().len(), 2, "no retries");
    api.stop().await;
}

#[tokio::test]
async fn a_context_error_after_the_stream_began_is_an_error_event() {
    let api = start().await;
    let reply = chat(api.addr, chat_body("too-long-late", true)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events = sse_json(&data);
    let error = &events.last().expect("events")["error"];
    assert_eq!(error["code"], "context_length_exceeded", "{}", reply.body);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(api.fake.submits().len(), 1, "not retried");
    api.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_its_task() {
    disconnect_mid_stream_cancels(
        "/v1/chat/completions",
        chat_body("endless", true).to_string(),
        |seen| sse_data(seen).len() >= 3,
    )
    .await;
}

/// Streams `body` from `path` on a fresh API until `enough` says what arrived is enough,
/// then disconnects: the task must be cancelled (and not before).
async fn disconnect_mid_stream_cancels(path: &str, body: String, enough: impl Fn(&str) -> bool) {
    let api = start().await;
    let (response, conn) = send(api.addr, "POST", path, Some(body)).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let mut seen = String::new();
    while !enough(&seen) {
        let frame = tokio::time::timeout(STEP, stream.frame())
            .await
            .expect("a frame in time")
            .expect("the stream goes on")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(!api.fake.cancelled.load(Ordering::SeqCst));
    drop(stream);
    conn.abort();
    let deadline = Instant::now() + STEP;
    while !api.fake.cancelled.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the task was never cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Probes, models, metrics, introspection

#[tokio::test]
async fn health_and_readiness() {
    let api = start().await;
    assert_eq!(call(api.addr, "GET", "/health", None).await.status, 200);
    assert_eq!(call(api.addr, "GET", "/ready", None).await.status, 200);
    api.fake.ready.store(false, Ordering::SeqCst);
    assert_eq!(call(api.addr, "GET", "/ready", None).await.status, 503);
    assert_eq!(call(api.addr, "GET", "/health", None).await.status, 200);
    api.stop().await;
}

#[tokio::test]
async fn models_are_listed_in_openai_shape() {
    let api = start().await;
    let reply = call(api.addr, "GET", "/v1/models", None).await;
    assert_eq!(reply.status, 200);
    let json = reply.json();
    assert_eq!(json["object"], "list");
    let ids: Vec<&str> = json["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["scripted", "org/slashed", "cold"]);
    assert_eq!(json["data"][0]["object"], "model");
    assert_eq!(json["data"][0]["owned_by"], "canopy");
    assert_eq!(json["data"][2]["ready"], false);

    let reply = call(api.addr, "GET", "/v1/models/org/slashed", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["id"], "org/slashed");
    let reply = call(api.addr, "GET", "/v1/models/nope", None).await;
    assert_eq!(reply.status, 404);
    assert_eq!(openai_error(&reply)["code"], "model_not_found");
    api.stop().await;
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text() {
    let api = start().await;
    api.metrics.runner_event(&RunnerEvent::RunnerFailed {
        instance: "i0".to_string(),
        reason: FailureReason::HeartbeatMissed {
            last_seen: Duration::from_secs(3),
        },
        pid: 1,
        stderr_tail: Vec::new(),
        failed_tasks: 0,
        will_restart: true,
    });
    api.metrics.runner_event(&RunnerEvent::Started {
        instance: "i0".to_string(),
        pid: 2,
        restarts: 1,
    });
    api.metrics.heartbeat_lag("i0", Duration::from_millis(250));
    let batch = |running, queued, hits, reused, prefilled| RunnerEvent::BatchChanged {
        instance: "i0".to_string(),
        stats: BatchStats {
            parallel: 8,
            running,
            queued,
            last_step_rows: running,
            kv_bytes: 3 << 20,
            kv_capacity_bytes: 64 << 20,
            prefix_hits: hits,
            prefix_reused_tokens: reused,
            prefilled_tokens: prefilled,
        },
    };
    api.metrics.runner_event(&batch(2, 1, 1, 10, 100));
    api.metrics.runner_event(&batch(3, 0, 2, 30, 150));
    assert_eq!(
        chat(api.addr, chat_body("scripted", false)).await.status,
        200
    );
    assert_eq!(
        chat(api.addr, chat_body("scripted", true)).await.status,
        200
    );
    assert_eq!(chat(api.addr, chat_body("busy", false)).await.status, 429);

    let reply = call(api.addr, "GET", "/metrics", None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/plain"))
    );
    let text = reply.body;
    for expected in [
        "canopy_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2",
        "canopy_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"429\"} 1",
        "canopy_http_request_duration_seconds_bucket",
        "canopy_tokens_generated_total{model=\"scripted\"} 8",
        "canopy_prompt_tokens_total{model=\"scripted\"} 14",
        "canopy_time_to_first_token_seconds_count{model=\"scripted\"} 2",
        "canopy_runner_restarts_total{instance=\"i0\"} 1",
        "canopy_runner_failures_total{instance=\"i0\",reason=\"heartbeat_missed\"} 1",
        "canopy_runner_heartbeat_lag_seconds{instance=\"i0\"} 0.25",
        "# TYPE canopy_batch_running gauge",
        "# HELP canopy_batch_running ",
        "canopy_batch_running{instance=\"i0\"} 3",
        "canopy_batch_queued{instance=\"i0\"} 0",
        "canopy_batch_parallel{instance=\"i0\"} 8",
        "canopy_batch_last_step_rows{instance=\"i0\"} 3",
        "# TYPE canopy_kv_cache_bytes gauge",
        "canopy_kv_cache_bytes{instance=\"i0\"} 3145728",
        "canopy_kv_cache_capacity_bytes{instance=\"i0\"} 67108864",
        "# TYPE canopy_prefix_cache_hits_total counter",
        "canopy_prefix_cache_hits_total{instance=\"i0\"} 2",
        "canopy_prefix_cache_reused_tokens_total{instance=\"i0\"} 30",
        "canopy_prefilled_tokens_total{instance=\"i0\"} 150",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    // The runner dies: its gauges drop to 0; the next process counts from 0 again, and the
    // counters here keep growing.
    api.metrics.runner_event(&RunnerEvent::RunnerFailed {
        instance: "i0".to_string(),
        reason: FailureReason::Signaled { signal: 9 },
        pid: 2,
        stderr_tail: Vec::new(),
        failed_tasks: 3,
        will_restart: true,
    });
    let text = call(api.addr, "GET", "/metrics", None).await.body;
    for expected in [
        "canopy_batch_running{instance=\"i0\"} 0",
        "canopy_kv_cache_bytes{instance=\"i0\"} 0",
        "canopy_prefix_cache_hits_total{instance=\"i0\"} 2",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    api.metrics.runner_event(&batch(1, 0, 1, 5, 20));
    let text = call(api.addr, "GET", "/metrics", None).await.body;
    for expected in [
        "canopy_batch_running{instance=\"i0\"} 1",
        "canopy_prefix_cache_hits_total{instance=\"i0\"} 3",
        "canopy_prefix_cache_reused_tokens_total{instance=\"i0\"} 35",
        "canopy_prefilled_tokens_total{instance=\"i0\"} 170",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    api.metrics.forget_instance("i0");
    let text = call(api.addr, "GET", "/metrics", None).await.body;
    assert!(!text.contains("canopy_batch_running{"), "{text}");
    api.stop().await;
}

#[tokio::test]
async fn state_and_actors_come_from_the_backend() {
    let api = start().await;
    let reply = call(api.addr, "GET", "/state", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["instances"][0]["status"], "Ready");
    let reply = call(api.addr, "GET", "/v1/actors", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["children"][0]["name"], "api");
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// The actor

#[tokio::test]
async fn a_taken_address_is_a_startup_error_naming_it() {
    let api = start().await;
    let args = ApiArgs {
        config: ApiConfig {
            addr: api.addr,
            ..config()
        },
        backend: Fake::new(),
        metrics: Metrics::new(),
    };
    let err = Actor::spawn(None, ApiActor, args)
        .await
        .expect_err("the address is taken");
    assert!(err.to_string().contains(&api.addr.to_string()), "{err}");
    api.stop().await;
}

#[tokio::test]
async fn stopping_the_actor_ends_open_streams_and_cancels_their_tasks() {
    let fake = Fake::new();
    let args = ApiArgs {
        config: ApiConfig {
            shutdown_timeout: Duration::from_millis(200),
            ..config()
        },
        backend: fake.clone(),
        metrics: Metrics::new(),
    };
    let (actor, handle) = Actor::spawn(None, ApiActor, args).await.expect("starts");
    let addr = ractor::call_t!(actor, ApiMsg::LocalAddr, 5_000).expect("local address");
    let (response, _conn) = send(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(chat_body("endless", true).to_string()),
    )
    .await;
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    actor.stop(None);
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .expect("the stream ends")
        .expect("a body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    assert_eq!(
        sse_json(&data).last().expect("events")["error"]["code"],
        "shutting_down"
    );
    tokio::time::timeout(STEP, handle)
        .await
        .expect("the actor stops")
        .expect("cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + STEP;
    while !fake.cancelled.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the task was never cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn stopping_the_actor_closes_the_listener() {
    let api = start().await;
    let addr = api.addr;
    assert_eq!(call(addr, "GET", "/health", None).await.status, 200);
    api.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens any more"
    );
}

/// A parent that reports the first child failure it sees.
struct Watcher;

#[derive(ractor_cluster::RactorMessage)]
struct WatcherMsg;

impl Actor for Watcher {
    type Msg = WatcherMsg;
    type State = Option<oneshot::Sender<String>>;
    type Arguments = oneshot::Sender<String>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        report: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(report))
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        report: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = event
            && let Some(report) = report.take()
        {
            let _ = report.send(err.to_string());
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_server_that_exits_by_itself_fails_the_actor() {
    let (report, failure) = oneshot::channel();
    let (watcher, watcher_handle) = Actor::spawn(None, Watcher, report)
        .await
        .expect("the watcher starts");
    let args = ApiArgs {
        config: config(),
        backend: Fake::new(),
        metrics: Metrics::new(),
    };
    let (api, api_handle) = Actor::spawn_linked(None, ApiActor, args, watcher.get_cell())
        .await
        .expect("the API actor starts");
    // What the server task sends when axum's server returns on its own.
    api.send_message(ApiMsg::ServerExited("the listener broke".to_string()))
        .expect("send");
    let failure = tokio::time::timeout(STEP, failure)
        .await
        .expect("a failure in time")
        .expect("a failure");
    assert!(failure.contains("stopped unexpectedly"), "{failure}");
    assert!(failure.contains("the listener broke"), "{failure}");
    tokio::time::timeout(STEP, api_handle)
        .await
        .expect("the API actor ends")
        .expect("joined");
    watcher.stop(None);
    let _ = watcher_handle.await;
}
