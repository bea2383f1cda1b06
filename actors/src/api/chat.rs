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

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::OpenAiJson;
use super::request::ChatCompletionRequest;
use super::response::{ChatCompletion, CompletionMeta};
use super::state::AppState;
use super::stream;
use super::task::ChatTask;
use crate::runner::{TaskEvent, TaskHandle};

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
        let first = first_event(&mut handle, state.config.keepalive).await;
        if let Some(TaskEvent::Failed(err)) = &first {
            let api_err = ApiError::from_runner(err);
            if api_err.is_client_error() {
                return Err(api_err);
            }
        }
        Ok(stream::respond(
            meta,
            task,
            handle,
            first,
            job.include_usage,
            state.config.keepalive,
            state.closing.clone(),
        ))
    } else {
        Ok(Json(complete(meta, task, handle).await?).into_response())
    }
}

/// The task's first event, if one comes within `wait` (`None`: none yet, or its stream
/// ended, which the stream then finds out by itself).
async fn first_event(handle: &mut TaskHandle, wait: Duration) -> Option<TaskEvent> {
    tokio::time::timeout(wait, handle.next())
        .await
        .ok()
        .flatten()
}

/// Collects a task's output into one completion, retrying once if its runner dies before
/// producing anything.
async fn complete(
    meta: CompletionMeta,
    mut task: ChatTask,
    mut handle: TaskHandle,
) -> Result<ChatCompletion, ApiError> {
    let mut content = String::new();
    loop {
        match handle.next().await {
            Some(TaskEvent::Chunk(chunk)) => {
                task.on_chunk(&chunk);
                content.push_str(&chunk.text);
            }
            Some(TaskEvent::Done {
                finish_reason,
                usage,
            }) => {
                task.on_done(usage);
                return Ok(ChatCompletion::new(meta, content, finish_reason, usage));
            }
            Some(TaskEvent::Failed(err)) => handle = task.retry(err).await?,
            None => return Err(ApiError::stream_vanished(task.model())),
        }
    }
}
