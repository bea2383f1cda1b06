//! `POST /v1/chat/completions`: validates the request, submits its tasks (one per choice,
//! `n`; see `choices`), and answers with one JSON completion or, for `stream: true`, an SSE
//! stream (see `stream`). Usage counts the prompt once and every choice's completion.
//!
//! Errors before the task is accepted (bad body, unknown model, no Ready instance, capacity)
//! are answered with their HTTP status even for streams; the stream only begins once a
//! runner has acknowledged the task. A runner acknowledges a task before it looks at the
//! prompt, so the client's errors it finds then (a prompt longer than the context: 400
//! `context_length_exceeded`) arrive as the task's first event: before a stream begins, the
//! handler waits for that first event up to one keep-alive interval (until then a stream
//! would have sent nothing but its role chunk), and a client error among them is answered
//! with its 400 status, as OpenAI does. Any other first event, or none in time, and the
//! stream begins (with that event); a later error is an SSE error event.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::future::{join_all, try_join_all};

use super::choices::{self, Started};
use super::error::ApiError;
use super::extract::OpenAiJson;
use super::output;
use super::request::ChatCompletionRequest;
use super::response::{ChatChoice, ChatCompletion, CompletionMeta, UsageBody};
use super::state::AppState;
use super::stream;
use super::tools;

/// The handler.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = super::request::ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` its SSE chunks \
         (`chat.completion.chunk` objects, then `[DONE]`)",
         content(
             (super::response::ChatCompletion = "application/json"),
             (String = "text/event-stream"),
         )),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let closing = state.closing.clone();
    tokio::select! {
        response = answer(state, body) => response,
        () = closing.cancelled() => Err(ApiError::shutting_down()),
    }
}

async fn answer(state: AppState, body: ChatCompletionRequest) -> Result<Response, ApiError> {
    let received = Instant::now();
    let job = body.into_job(&state.config)?;
    let meta = CompletionMeta::new(&job.model);
    tracing::debug!(id = %meta.id, model = %job.model, stream = job.stream,
        choices = job.choices, "chat completion");
    let logprobs = job.request.params.logprobs.is_some();
    let names = job.tools.names();
    let started = choices::start(
        &state,
        &job.model,
        job.requests(),
        job.choices as usize,
        received,
    )
    .await?;
    if job.stream {
        let keepalive = state.config.keepalive;
        let firsts = join_all(started.into_iter().map(|mut s| async move {
            if s.first.is_none() {
                s.first = output::begin(&mut s.handle, keepalive).await?;
            }
            Ok::<_, ApiError>(s)
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        let outputs = firsts
            .into_iter()
            .map(|s| {
                tools::split_calls(
                    output::outputs(s.task, s.handle, s.first, state.closing.clone()),
                    names.clone(),
                    job.max_calls,
                )
            })
            .collect();
        Ok(stream::respond(
            meta,
            outputs,
            stream::Shape {
                include_usage: job.include_usage,
                logprobs,
            },
            keepalive,
        ))
    } else {
        let done = try_join_all(started.into_iter().map(|s: Started| {
            output::collect(tools::split_calls(
                output::outputs(s.task, s.handle, s.first, state.closing.clone()),
                names.clone(),
                job.max_calls,
            ))
        }))
        .await?;
        let mut usage = UsageBody::default();
        let choices = done
            .into_iter()
            .enumerate()
            .map(|(i, done)| {
                usage = usage.add_choice(done.usage, i == 0);
                ChatChoice {
                    text: done.text,
                    calls: done.calls,
                    reason: done.reason,
                    logprobs: logprobs.then_some(done.logprobs),
                }
            })
            .collect();
        Ok(Json(ChatCompletion::new(meta, choices, usage)).into_response())
    }
}
