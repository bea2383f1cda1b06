//! `POST /v1/completions`: OpenAI's legacy completions. Each prompt becomes one task of raw
//! text (no chat template) for the same machinery as chat: submission with its single retry
//! (`task`), outputs and cancellation (`output`), capacity and error mapping (`error`).
//!
//! The tasks of a request's prompts are submitted together and run side by side (the
//! runner's batch takes them as any concurrent requests); each counts against capacity, so a
//! request with more prompts than the instances have room for is a 429 (the tasks already
//! submitted are cancelled). The answer waits for every choice; the first failure ends the
//! whole request and cancels the other tasks.
//!
//! A stream (`stream: true`) sends, per choice, the prompt first with `echo`, then a chunk
//! per piece of text, then a chunk with empty text and the `finish_reason`; choices
//! interleave as their tokens come, told apart by `index`. With
//! `stream_options.include_usage` every chunk carries `usage: null` and a last chunk with no
//! choices carries the usage of all prompts; then `data: [DONE]`. A failure after the stream
//! began is an SSE error event (OpenAI's error shape) followed by `[DONE]`. As for chat, the
//! handler waits up to one keep-alive interval for each task's first event, so that a client
//! error the runner finds first (a prompt longer than the context) is answered with its 400.

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::future::{join_all, try_join_all};
use futures::{Stream, StreamExt};

use super::completion_request::{CompletionJob, CompletionRequest};
use super::error::ApiError;
use super::extract::OpenAiJson;
use super::output::{self, Output};
use super::response::{CompletionMeta, TextChoice, TextCompletion, TextCompletionChunk, UsageBody};
use super::state::AppState;
use super::stream::{done_event, error_event, json_event, sse};
use super::task::ChatTask;
use crate::runner::TaskHandle;

/// The handler.
pub(crate) async fn completions(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let closing = state.closing.clone();
    tokio::select! {
        response = answer(state, body) => response,
        () = closing.cancelled() => Err(ApiError::shutting_down()),
    }
}

async fn answer(state: AppState, body: CompletionRequest) -> Result<Response, ApiError> {
    let received = Instant::now();
    let job = body.into_job(&state.config)?;
    let meta = CompletionMeta::text(&job.model);
    tracing::debug!(id = %meta.id, model = %job.model, prompts = job.prompts.len(),
        stream = job.stream, "completion");
    let mut started = start_all(&state, &job, received).await?;
    if job.stream {
        let wait = state.config.keepalive;
        let firsts = join_all(
            started
                .iter_mut()
                .map(|(_, handle)| output::begin(handle, wait)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        let outputs = started
            .into_iter()
            .zip(firsts)
            .map(|((task, handle), first)| {
                output::outputs(task, handle, first, state.closing.clone())
            })
            .collect();
        Ok(sse(events(meta, job, outputs), state.config.keepalive))
    } else {
        let done = try_join_all(started.into_iter().map(|(task, handle)| {
            output::collect(output::outputs(task, handle, None, state.closing.clone()))
        }))
        .await?;
        let mut usage = UsageBody::default();
        let choices = done
            .into_iter()
            .zip(&job.prompts)
            .map(|(done, prompt)| {
                usage = usage.add(done.usage);
                let text = if job.echo {
                    format!("{prompt}{}", done.text)
                } else {
                    done.text
                };
                TextChoice {
                    text,
                    reason: done.reason,
                }
            })
            .collect();
        Ok(Json(TextCompletion::new(meta, choices, usage)).into_response())
    }
}

/// Submits every prompt's task at once; the first refusal is the answer (dropping the
/// handles already had cancels their tasks).
async fn start_all(
    state: &AppState,
    job: &CompletionJob,
    received: Instant,
) -> Result<Vec<(ChatTask, TaskHandle)>, ApiError> {
    try_join_all((0..job.prompts.len()).map(|index| {
        let mut task = ChatTask::new(
            state.clone(),
            job.model.clone(),
            job.request(index),
            received,
        );
        async move {
            let handle = task.start().await?;
            Ok::<_, ApiError>((task, handle))
        }
    }))
    .await
}

fn events<S>(
    meta: CompletionMeta,
    job: CompletionJob,
    outputs: Vec<S>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static
where
    S: Stream<Item = Output> + Send + 'static,
{
    let include_usage = job.include_usage;
    let choices = outputs.len();
    let merged = futures::stream::select_all(
        outputs
            .into_iter()
            .zip(0u32..)
            .map(|(outputs, index)| Box::pin(outputs.map(move |o| (index, o)))),
    );
    async_stream::stream! {
        if job.echo {
            for (prompt, index) in job.prompts.iter().zip(0u32..) {
                if !prompt.is_empty() {
                    yield Ok(json_event(&TextCompletionChunk::piece(
                        &meta, include_usage, index, prompt, None,
                    )));
                }
            }
        }
        let mut usage = UsageBody::default();
        let mut finished = 0;
        let mut failed = false;
        for await (index, output) in merged {
            match output {
                Output::Text(text) => {
                    yield Ok(json_event(&TextCompletionChunk::piece(
                        &meta, include_usage, index, &text, None,
                    )));
                }
                Output::Done { reason, usage: used, .. } => {
                    usage = usage.add(used);
                    finished += 1;
                    yield Ok(json_event(&TextCompletionChunk::piece(
                        &meta, include_usage, index, "", Some(reason),
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
            yield Ok(json_event(&TextCompletionChunk::usage(&meta, usage)));
        }
        yield Ok(done_event());
    }
}
