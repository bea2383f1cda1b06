//! `POST /v1/chat/completions`: validates the request, submits its task, and answers with
//! one JSON completion or, for `stream: true`, an SSE stream (see `stream`).
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

use super::error::ApiError;
use super::extract::OpenAiJson;
use super::output;
use super::request::ChatCompletionRequest;
use super::response::{ChatCompletion, CompletionMeta};
use super::state::AppState;
use super::stream;
use super::task::ChatTask;

/// The handler.
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
    tracing::debug!(id = %meta.id, model = %job.model, stream = job.stream, "chat completion");
    let mut task = ChatTask::new(state.clone(), job.model, job.request, received);
    let mut handle = task.start().await?;
    if job.stream {
        let first = output::begin(&mut handle, state.config.keepalive).await?;
        let outputs = output::outputs(task, handle, first, state.closing.clone());
        Ok(stream::respond(
            meta,
            outputs,
            job.include_usage,
            state.config.keepalive,
        ))
    } else {
        let outputs = output::outputs(task, handle, None, state.closing.clone());
        let done = output::collect(outputs).await?;
        Ok(Json(ChatCompletion::new(
            meta,
            done.text,
            done.reason,
            done.usage,
        ))
        .into_response())
    }
}
