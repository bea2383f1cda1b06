//! The SSE answer of a streamed chat completion.
//!
//! Events, in order: a chunk with `delta.role = "assistant"`; one chunk per non-empty piece
//! of output; a chunk with the `finish_reason`; a usage chunk (no choices) if
//! `stream_options.include_usage` asked for one; then `data: [DONE]`. Keep-alive comments
//! (`: keep-alive`) flow every `keepalive` in between. If the task fails, the stream sends
//! `data: {"error": {...}}` (OpenAI's error shape) and then `data: [DONE]` as soon as the
//! failure arrives; a runner death before the first token is retried once first (see
//! `task` and `output`, which turns the task's events into the text and end every format
//! shares).
//!
//! The stream owns the task's `TaskHandle` (inside its `output` stream): when the client
//! disconnects, the server drops the stream, the handle's receiver with it, and the runner
//! supervisor cancels the task. When the API gives up waiting for open requests at shutdown
//! (its `closing` token), the stream ends with a `shutting_down` error event and `[DONE]`,
//! dropping the handle too.
//!
//! The SSE helpers here ([`json_event`], [`error_event`], [`sse`]) also serve the legacy
//! completions stream (`completions`).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;

use super::error::ApiError;
use super::output::Output;
use super::response::{ChatCompletionChunk, CompletionMeta};

/// The streamed answer of an accepted chat task, from its `outputs` (see `output`).
pub(crate) fn respond(
    meta: CompletionMeta,
    outputs: impl Stream<Item = Output> + Send + 'static,
    include_usage: bool,
    keepalive: Duration,
) -> Response {
    sse(events(meta, outputs, include_usage), keepalive)
}

/// An SSE response of `events`, with keep-alive comments every `keepalive`.
pub(crate) fn sse(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    keepalive: Duration,
) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}

/// An SSE `data:` event holding `value` as JSON.
pub(crate) fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(err) => error_event(&ApiError::internal(format!(
            "could not encode a chunk: {err}"
        ))),
    }
}

/// An SSE `data:` event holding `err` in OpenAI's error shape.
pub(crate) fn error_event(err: &ApiError) -> Event {
    Event::default().data(err.to_json())
}

/// The `data: [DONE]` event that ends every OpenAI stream.
pub(crate) fn done_event() -> Event {
    Event::default().data("[DONE]")
}

fn events(
    meta: CompletionMeta,
    outputs: impl Stream<Item = Output> + Send + 'static,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    async_stream::stream! {
        yield Ok(json_event(&ChatCompletionChunk::role(&meta, include_usage)));
        for await output in outputs {
            match output {
                Output::Text(text) => {
                    yield Ok(json_event(&ChatCompletionChunk::content(
                        &meta,
                        include_usage,
                        &text,
                    )));
                }
                Output::Done { reason, usage, .. } => {
                    yield Ok(json_event(&ChatCompletionChunk::finish(
                        &meta,
                        include_usage,
                        reason,
                    )));
                    if include_usage {
                        yield Ok(json_event(&ChatCompletionChunk::usage(&meta, usage)));
                    }
                    break;
                }
                Output::Failed(api_err) => {
                    tracing::warn!(id = %meta.id, error = %api_err, "stream failed");
                    yield Ok(error_event(&api_err));
                    break;
                }
            }
        }
        yield Ok(done_event());
    }
}
