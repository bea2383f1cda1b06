//! `POST /v1/completions`: OpenAI's legacy completions. Each prompt becomes one task of raw
//! text (no chat template) for the same machinery as chat: submission with its single retry
//! (`task`), outputs and cancellation (`output`), capacity and error mapping (`error`).
//!
//! Each prompt has `n` choices, each a task (see `choices`: the choices of a prompt share its
//! prefill; different prompts start side by side, and the runner's batch takes them as any
//! concurrent requests); each counts against capacity, so a request with more choices than
//! the instances have room for is a 429 (the tasks already submitted are cancelled). The
//! answer waits for every choice; the first failure ends the whole request and cancels the
//! other tasks. Usage counts each prompt once and every choice's completion.
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

use super::choices;
use super::completion_request::{CompletionJob, CompletionRequest};
use super::error::ApiError;
use super::extract::OpenAiJson;
use super::output::{self, Output};
use super::response::{
    CompletionMeta, TextChoice, TextCompletion, TextCompletionChunk, TextLogprobs, TextOffsets,
    UsageBody,
};
use super::state::AppState;
use super::stream::{done_event, error_event, json_event, sse};

/// The handler.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = super::completion_request::CompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` its SSE chunks",
         content(
             (super::response::TextCompletion = "application/json"),
             (String = "text/event-stream"),
         )),
        crate::api::openapi::OpenAiErrors,
    )
)]
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
        choices = job.choices, stream = job.stream, "completion");
    let requests = (0..job.total_choices()).map(|i| job.request(i)).collect();
    let started =
        choices::start(&state, &job.model, requests, job.choices as usize, received).await?;
    if job.stream {
        let wait = state.config.keepalive;
        let firsts = join_all(started.into_iter().map(|mut s| async move {
            if s.first.is_none() {
                s.first = output::begin(&mut s.handle, wait).await?;
            }
            Ok::<_, ApiError>(s)
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        let outputs = firsts
            .into_iter()
            .map(|s| output::outputs(s.task, s.handle, s.first, state.closing.clone()))
            .collect();
        Ok(sse(events(meta, job, outputs), state.config.keepalive))
    } else {
        let done = try_join_all(started.into_iter().map(|s| {
            output::collect(output::outputs(
                s.task,
                s.handle,
                s.first,
                state.closing.clone(),
            ))
        }))
        .await?;
        let logprobs = job.params.logprobs.is_some();
        let n = job.choices as usize;
        let mut usage = UsageBody::default();
        let choices = done
            .into_iter()
            .enumerate()
            .map(|(i, done)| {
                usage = usage.add_choice(done.usage, i.is_multiple_of(n));
                let logprobs = logprobs
                    .then(|| TextLogprobs::new(&done.logprobs, &mut TextOffsets::default()));
                let text = if job.echo {
                    format!("{}{}", job.prompt_of(i), done.text)
                } else {
                    done.text
                };
                TextChoice {
                    text,
                    reason: done.reason,
                    logprobs,
                }
            })
            .collect();
        Ok(Json(TextCompletion::new(meta, choices, usage)).into_response())
    }
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
    let logprobs = job.params.logprobs.is_some();
    let n = job.choices as usize;
    let choices = outputs.len();
    let mut offsets = vec![TextOffsets::default(); choices];
    let merged = futures::stream::select_all(
        outputs
            .into_iter()
            .zip(0u32..)
            .map(|(outputs, index)| Box::pin(outputs.map(move |o| (index, o)))),
    );
    async_stream::stream! {
        if job.echo {
            for index in 0..choices {
                let prompt = job.prompt_of(index);
                if !prompt.is_empty() {
                    yield Ok(json_event(&TextCompletionChunk::piece(
                        &meta, include_usage, index as u32, (prompt, None), None,
                    )));
                }
            }
        }
        let mut usage = UsageBody::default();
        let mut finished = 0;
        let mut failed = false;
        for await (index, output) in merged {
            match output {
                Output::Text { text, logprobs: entries } => {
                    let lp = logprobs.then(|| {
                        TextLogprobs::new(&entries, &mut offsets[index as usize])
                    });
                    yield Ok(json_event(&TextCompletionChunk::piece(
                        &meta, include_usage, index, (&text, lp), None,
                    )));
                }
                // Legacy completions take no tools, so their outputs hold no calls.
                Output::Calls(_) => {}
                Output::Done { reason, usage: used, .. } => {
                    usage = usage.add_choice(used, (index as usize).is_multiple_of(n));
                    finished += 1;
                    yield Ok(json_event(&TextCompletionChunk::piece(
                        &meta, include_usage, index, ("", None), Some(reason),
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
