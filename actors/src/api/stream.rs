//! The SSE answer of a streamed chat completion.
//!
//! Events, in order: a chunk with `delta.role = "assistant"`; one chunk per non-empty piece
//! of output; a chunk with the `finish_reason`; a usage chunk (no choices) if
//! `stream_options.include_usage` asked for one; then `data: [DONE]`. Keep-alive comments
//! (`: keep-alive`) flow every `keepalive` in between. If the task fails, the stream sends
//! `data: {"error": {...}}` (OpenAI's error shape) and then `data: [DONE]` as soon as the
//! failure arrives; a runner death before the first token is retried once first (see
//! `task`). The handler may already have taken the task's first event (it waits for it
//! briefly, so that a client error before the first token gets its HTTP status, see `chat`);
//! the stream then begins with that event.
//!
//! The stream owns the task's `TaskHandle`: when the client disconnects, the server drops
//! the stream, the handle's receiver with it, and the runner supervisor cancels the task.
//! When the API gives up waiting for open requests at shutdown (its `closing` token), the
//! stream ends with a `shutting_down` error event and `[DONE]`, dropping the handle too.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::response::{ChatCompletionChunk, CompletionMeta};
use super::task::ChatTask;
use crate::runner::{TaskEvent, TaskHandle};

/// The streamed answer of an accepted task; `first` is the task's first event if the
/// handler already took it from `handle`.
pub(crate) fn respond(
    meta: CompletionMeta,
    task: ChatTask,
    handle: TaskHandle,
    first: Option<TaskEvent>,
    include_usage: bool,
    keepalive: Duration,
    closing: CancellationToken,
) -> Response {
    Sse::new(events(meta, task, handle, first, include_usage, closing))
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}

/// An SSE `data:` event holding `value` as JSON.
fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(err) => error_event(&ApiError::internal(format!(
            "could not encode a chunk: {err}"
        ))),
    }
}

fn error_event(err: &ApiError) -> Event {
    Event::default().data(err.to_json())
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

fn events(
    meta: CompletionMeta,
    mut task: ChatTask,
    mut handle: TaskHandle,
    first: Option<TaskEvent>,
    include_usage: bool,
    closing: CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    async_stream::stream! {
        yield Ok(json_event(&ChatCompletionChunk::role(&meta, include_usage)));
        let mut first = first;
        loop {
            let next = match first.take() {
                Some(event) => Some(Next::Task(event)),
                None => next_event(&mut handle, &closing).await,
            };
            match next {
                Some(Next::Closing) => {
                    yield Ok(error_event(&ApiError::shutting_down()));
                    break;
                }
                Some(Next::Task(TaskEvent::Chunk(chunk))) => {
                    task.on_chunk(&chunk);
                    // An empty chunk holds part of a character; its text comes later.
                    if !chunk.text.is_empty() {
                        yield Ok(json_event(&ChatCompletionChunk::content(
                            &meta,
                            include_usage,
                            &chunk.text,
                        )));
                    }
                }
                Some(Next::Task(TaskEvent::Done { finish_reason, usage })) => {
                    task.on_done(usage);
                    yield Ok(json_event(&ChatCompletionChunk::finish(
                        &meta,
                        include_usage,
                        finish_reason,
                    )));
                    if include_usage {
                        yield Ok(json_event(&ChatCompletionChunk::usage(&meta, usage)));
                    }
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
                            tracing::warn!(id = %meta.id, error = %api_err, "stream failed");
                            yield Ok(error_event(&api_err));
                            break;
                        }
                    }
                }
                None => {
                    let api_err = ApiError::stream_vanished(task.model());
                    tracing::warn!(id = %meta.id, error = %api_err, "stream failed");
                    yield Ok(error_event(&api_err));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}
