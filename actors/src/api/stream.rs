//! The SSE answer of a streamed chat completion.
//!
//! Events, in order: a chunk with `delta.role = "assistant"` per choice; one chunk per piece
//! of output (with its tokens' `logprobs` when asked for); with tools, one chunk whose
//! `delta.tool_calls` holds the answer's calls whole (see `tools`); a chunk with the
//! `finish_reason` (`tool_calls` after calls)
//! per choice; a usage chunk (no choices) if `stream_options.include_usage` asked for one;
//! then `data: [DONE]`. With several choices (`n`) their chunks interleave as their tokens
//! come, told apart by `index`. Keep-alive comments
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
use futures::{Stream, StreamExt};
use serde::Serialize;

use super::error::ApiError;
use super::output::Output;
use super::response::{ChatCompletionChunk, CompletionMeta, UsageBody};

/// What a chat stream's chunks carry besides the text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// A usage chunk at the end (and `usage: null` on the others).
    pub(crate) include_usage: bool,
    /// Each piece's tokens' log-probabilities.
    pub(crate) logprobs: bool,
}

/// The streamed answer of accepted chat tasks, from their `outputs` (see `output`), one per
/// choice in order.
pub(crate) fn respond<S>(
    meta: CompletionMeta,
    outputs: Vec<S>,
    shape: Shape,
    keepalive: Duration,
) -> Response
where
    S: Stream<Item = Output> + Send + 'static,
{
    sse(events(meta, outputs, shape), keepalive)
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

fn events<S>(
    meta: CompletionMeta,
    outputs: Vec<S>,
    shape: Shape,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static
where
    S: Stream<Item = Output> + Send + 'static,
{
    let include_usage = shape.include_usage;
    let choices = outputs.len();
    let merged = futures::stream::select_all(
        outputs
            .into_iter()
            .zip(0u32..)
            .map(|(outputs, index)| Box::pin(outputs.map(move |o| (index, o)))),
    );
    async_stream::stream! {
        for index in (0u32..).take(choices) {
            yield Ok(json_event(&ChatCompletionChunk::role(&meta, include_usage, index)));
        }
        let mut usage = UsageBody::default();
        let mut finished = 0;
        let mut failed = false;
        let mut called = vec![false; choices];
        for await (index, output) in merged {
            match output {
                Output::Calls(calls) => {
                    called[index as usize] = true;
                    yield Ok(json_event(&ChatCompletionChunk::calls(
                        &meta,
                        include_usage,
                        index,
                        &calls,
                    )));
                }
                Output::Text { text, logprobs } => {
                    yield Ok(json_event(&ChatCompletionChunk::content(
                        &meta,
                        include_usage,
                        index,
                        &text,
                        shape.logprobs.then_some(&logprobs[..]),
                    )));
                }
                Output::Done { reason, usage: used, .. } => {
                    usage = usage.add_choice(used, index == 0);
                    finished += 1;
                    yield Ok(json_event(&ChatCompletionChunk::finish(
                        &meta,
                        include_usage,
                        index,
                        reason,
                        called[index as usize],
                    )));
                    if finished == choices {
                        break;
                    }
                }
                Output::Failed(api_err) => {
                    tracing::warn!(id = %meta.id, index, error = %api_err, "stream failed");
                    yield Ok(error_event(&api_err));
                    failed = true;
                    break;
                }
            }
        }
        if include_usage && !failed {
            yield Ok(json_event(&ChatCompletionChunk::usage(&meta, usage)));
        }
        yield Ok(done_event());
    }
}
