//! A task's output as every answer format needs it: pieces of text, then one end (done or
//! failed), whatever the wire format (OpenAI's SSE chunks, OpenAI's JSON, Ollama's NDJSON).
//!
//! [`outputs`] owns the task's `TaskHandle` and does what every format shares: the metrics
//! of each chunk, the single transparent retry of a runner that died before producing
//! anything (see `task`), a stream that vanished without a final event, and the server's
//! `closing` token. Dropping the stream drops the handle, which cancels the task in the
//! runner: a client that disconnects stops its task whatever API it spoke.
//!
//! [`begin`] is the wait before a stream's first byte: a runner acknowledges a task before it
//! looks at the prompt, so a client error it finds then (a prompt longer than the context)
//! arrives as the first event. Waiting for that event up to one keep-alive interval lets such
//! an error be answered with its 400 status instead of inside a stream that already said 200.

use std::time::Duration;

use canopy_engine::tools::ParsedCall;
use canopy_proto::{FinishReason, TokenLogprob, Usage};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::task::{ChatTask, Timings};
use crate::runner::{TaskEvent, TaskHandle};

/// One thing a task produced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// A piece of generated text: non-empty, or carrying the log-probabilities of tokens
    /// that hold part of a character (its text comes with a later piece).
    Text {
        /// The text.
        text: String,
        /// One entry per token, when the request asked for log-probabilities.
        logprobs: Vec<TokenLogprob>,
    },
    /// The calls of tools the answer holds (see `tools`); only [`Output::Done`] follows.
    Calls(Vec<ParsedCall>),
    /// The task finished; nothing follows.
    Done {
        /// Why it ended.
        reason: FinishReason,
        /// Its token counts.
        usage: Usage,
        /// Where its time went.
        timings: Timings,
    },
    /// The task failed (after its retry, if one was allowed), vanished, or the server is
    /// closing; nothing follows.
    Failed(ApiError),
}

/// What a stream saw next.
enum Next {
    /// An event of its task.
    Task(TaskEvent),
    /// The server is closing open requests.
    Closing,
}

/// The task's next event (`None` once its stream ended), or the server closing.
async fn next_event(handle: &mut TaskHandle, closing: &CancellationToken) -> Option<Next> {
    tokio::select! {
        event = handle.next() => event.map(Next::Task),
        () = closing.cancelled() => Some(Next::Closing),
    }
}

/// Waits up to `wait` for the task's first event. A client error (4xx) among them is handed
/// back as `Err`, to be answered with its status; otherwise the event, if one came, is for
/// [`outputs`] to begin with.
pub(crate) async fn begin(
    handle: &mut TaskHandle,
    wait: Duration,
) -> Result<Option<TaskEvent>, ApiError> {
    let first = tokio::time::timeout(wait, handle.next())
        .await
        .ok()
        .flatten();
    if let Some(TaskEvent::Failed(err)) = &first {
        let api_err = ApiError::from_runner(err);
        if api_err.is_client_error() {
            return Err(api_err);
        }
    }
    Ok(first)
}

/// The task's output, ending with exactly one [`Output::Done`] or [`Output::Failed`]; `first`
/// is its first event if [`begin`] already took it from `handle`.
pub(crate) fn outputs(
    mut task: ChatTask,
    mut handle: TaskHandle,
    first: Option<TaskEvent>,
    closing: CancellationToken,
) -> impl Stream<Item = Output> + Send + 'static {
    async_stream::stream! {
        let mut first = first;
        loop {
            let next = match first.take() {
                Some(event) => Some(Next::Task(event)),
                None => next_event(&mut handle, &closing).await,
            };
            match next {
                Some(Next::Closing) => {
                    yield Output::Failed(ApiError::shutting_down());
                    break;
                }
                Some(Next::Task(TaskEvent::Chunk(chunk))) => {
                    task.on_chunk(&chunk);
                    // An empty chunk holds part of a character; its text comes later.
                    if !chunk.text.is_empty() || !chunk.logprobs.is_empty() {
                        yield Output::Text { text: chunk.text, logprobs: chunk.logprobs };
                    }
                }
                Some(Next::Task(TaskEvent::Done { finish_reason, usage })) => {
                    task.on_done(usage);
                    yield Output::Done { reason: finish_reason, usage, timings: task.timings() };
                    break;
                }
                Some(Next::Task(TaskEvent::Failed(err))) => {
                    let retried = tokio::select! {
                        retried = task.retry(err) => retried,
                        () = closing.cancelled() => Err(ApiError::shutting_down()),
                    };
                    match retried {
                        Ok(fresh) => handle = fresh,
                        Err(api_err) => {
                            yield Output::Failed(api_err);
                            break;
                        }
                    }
                }
                None => {
                    yield Output::Failed(ApiError::stream_vanished(task.model()));
                    break;
                }
            }
        }
    }
}

/// A finished task's whole output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Collected {
    /// The generated text.
    pub(crate) text: String,
    /// Its tokens' log-probabilities, when they were asked for.
    pub(crate) logprobs: Vec<TokenLogprob>,
    /// The calls of tools it holds (see `tools`).
    pub(crate) calls: Vec<ParsedCall>,
    /// Why it ended.
    pub(crate) reason: FinishReason,
    /// Its token counts.
    pub(crate) usage: Usage,
    /// Where its time went.
    pub(crate) timings: Timings,
}

/// Runs `outputs` to its end and joins its text (non-streamed answers).
pub(crate) async fn collect(outputs: impl Stream<Item = Output>) -> Result<Collected, ApiError> {
    let mut outputs = std::pin::pin!(outputs);
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut calls = Vec::new();
    while let Some(output) = outputs.next().await {
        match output {
            Output::Calls(more) => calls.extend(more),
            Output::Text {
                text: piece,
                logprobs: more,
            } => {
                text.push_str(&piece);
                logprobs.extend(more);
            }
            Output::Done {
                reason,
                usage,
                timings,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    calls,
                    reason,
                    usage,
                    timings,
                });
            }
            Output::Failed(err) => return Err(err),
        }
    }
    Err(ApiError::internal(
        "a task's output ended without an outcome",
    ))
}
