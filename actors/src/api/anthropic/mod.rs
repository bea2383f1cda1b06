//! Anthropic's Messages API, `POST /v1/messages`, with Anthropic's field names and shapes, for
//! the tools that speak it (the `anthropic` clients, pointed at the node with `base_url`).
//!
//! Answers:
//!
//! - without `stream`: one `message` object, `{"id": "msg_...", "type": "message", "role":
//!   "assistant", "model", "content": [{"type": "text", "text"}], "stop_reason",
//!   "stop_sequence", "usage": {"input_tokens", "output_tokens"}}`;
//! - with `stream: true`: an SSE stream of named events, as Anthropic sends them:
//!   `message_start` (the message with empty content), `content_block_start` (index 0, an
//!   empty text block), `ping`, one `content_block_delta` (`text_delta`) per piece of
//!   text, `content_block_stop`; with tools, per call a `content_block_start` of a
//!   `tool_use` block (index 1, 2, ...; `input: {}`), one `content_block_delta`
//!   (`input_json_delta`) holding all its arguments and a `content_block_stop`; then
//!   `message_delta` (stop reason and token counts) and `message_stop`. While the task is silent, `ping` events (Anthropic's keep-alive) flow
//!   every keep-alive interval. The prompt's token count is known only at the end, so
//!   `message_start` reports 0 input tokens and `message_delta`'s usage carries both counts
//!   (Anthropic's clients take `input_tokens` from there).
//!
//! `stop_reason` is `end_turn`, `max_tokens`, `stop_sequence` (with the `stop_sequence`
//! that ended the answer) or `tool_use` (the answer made calls).
//!
//! A generation runs through the same machinery as the OpenAI and Ollama routes (`task`,
//! `output`): the single retry when a runner dies before any output (a stream has then sent
//! only its opening events), cancellation when the client disconnects, capacity (429), the
//! API key guard and the metrics middleware. As on the other routes, a stream first waits
//! up to one keep-alive interval for the task's first event, so that a client error the
//! runner finds (a prompt longer than the context) is answered with its 400 status; a
//! failure after the stream began is an `error` event, `{"type": "error", "error": {"type":
//! "api_error", "message"}}` (the type follows the status the failure would have had), and
//! the stream ends there, as Anthropic's do.
//!
//! Every error on `/v1/messages` (and any path below it) is Anthropic's `{"type": "error",
//! "error": {"type", "message"}}`, with the status the other routes use for the same failure
//! and the type Anthropic gives that status: 400 `invalid_request_error` (also 405, 408,
//! 415), 401 `authentication_error`, 403 `permission_error`, 404 `not_found_error` (an
//! unknown model), 413 `request_too_large`, 429 `rate_limit_error`, 500 and 502 `api_error`,
//! 503 `overloaded_error` (no Ready instance, shutting down). The API key may be sent as
//! `x-api-key: KEY`, as Anthropic's clients do, or as `Authorization: Bearer KEY` (the guard
//! takes either on every route); `anthropic-version` and `anthropic-beta` headers are
//! accepted and ignored. Bodies must be sent as `Content-Type: application/json` (415
//! otherwise), which Anthropic's clients do.
//!
//! `POST /v1/messages/count_tokens` answers `{"input_tokens": N}` for a request's `model`,
//! `messages`, `system`, `tools` and `tool_choice`: the prompt is rendered and tokenized by a
//! runner of the model, as a message request's would be (a task with a token budget of 0,
//! which ends before the model runs), so the count is the `input_tokens` that request would
//! report.
//!
//! What the fields mean and which are refused: see `request`.

mod request;
mod response;

/// Anthropic's error body, for the API's document.
pub(crate) type AnthropicErrorBody = response::ErrorBody<'static>;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Request, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::extract::OpenAiJson;
use super::output::{self, Output};
use super::state::AppState;
use super::task::ChatTask;
use super::tools;
use request::{CountTokensBody, MessagesBody, MessagesJob};
use response::{ErrorBody, Message, StreamEvent, message_id};

/// An error answered in Anthropic's shape.
#[derive(Debug)]
pub(crate) struct AnthropicError(pub(crate) ApiError);

impl From<ApiError> for AnthropicError {
    fn from(err: ApiError) -> Self {
        Self(err)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        self.0
            .response_with(ErrorBody::new(self.0.status(), self.0.message()))
    }
}

/// Answers `err` in Anthropic's shape (for the guard and the fallbacks on `/v1/messages`).
pub(crate) fn error_response(err: ApiError) -> Response {
    AnthropicError(err).into_response()
}

/// A 404 for a model nobody serves, said as Anthropic says it (`model: NAME`).
fn unknown_model(model: &str) -> AnthropicError {
    AnthropicError(ApiError::unknown_model(model).with_message(format!(
        "model: {model} (no instance of it is placed on this cluster; GET /v1/models lists \
         the models there are)"
    )))
}

/// A JSON body, with every rejection in Anthropic's error shape (the checks are
/// [`OpenAiJson`]'s: content type, size, time, syntax, shape).
pub(crate) struct AnthropicJson<T>(T);

impl<T: DeserializeOwned> FromRequest<AppState> for AnthropicJson<T> {
    type Rejection = AnthropicError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        OpenAiJson::<T>::from_request(req, state)
            .await
            .map(|OpenAiJson(body)| AnthropicJson(body))
            .map_err(AnthropicError)
    }
}

/// `POST /v1/messages`.
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "anthropic",
    request_body = request::MessagesBody,
    responses(
        (status = 200, description = "The message, or with `stream: true` its named SSE events",
         content(
             (response::Message = "application/json"),
             (String = "text/event-stream"),
         )),
        crate::api::openapi::AnthropicErrors,
    )
)]
pub(crate) async fn messages(
    State(state): State<AppState>,
    AnthropicJson(body): AnthropicJson<MessagesBody>,
) -> Result<Response, AnthropicError> {
    let received = Instant::now();
    let job = body.into_job(rand::random::<u64>)?;
    let closing = state.closing.clone();
    tokio::select! {
        response = answer(state, job, received) => response,
        () = closing.cancelled() => Err(AnthropicError(ApiError::shutting_down())),
    }
}

async fn answer(
    state: AppState,
    job: MessagesJob,
    received: Instant,
) -> Result<Response, AnthropicError> {
    let id = message_id();
    let model = job.model;
    tracing::debug!(%id, model = %model, stream = job.stream, "anthropic message");
    let stops = job.request.params.stop.clone();
    let (task, mut handle) = start(&state, &model, job.request, received).await?;
    let keepalive = state.config.keepalive;
    let names = job.tools.names();
    if job.stream {
        let first = output::begin(&mut handle, keepalive).await?;
        let outputs = output::outputs(task, handle, first, state.closing.clone());
        let outputs = tools::split_calls(outputs, names, job.max_calls);
        Ok(sse(events(id, model, stops, outputs), keepalive))
    } else {
        let outputs = output::outputs(task, handle, None, state.closing.clone());
        let done = output::collect(tools::split_calls(outputs, names, job.max_calls)).await?;
        let message = Message::finished(
            &id,
            &model,
            (&done.text, &done.calls),
            (done.reason, &stops),
            done.usage,
        );
        Ok(axum::Json(message).into_response())
    }
}

/// Submits `request` for `model`: its task and the task's handle, or the refusal in
/// Anthropic's shape.
async fn start(
    state: &AppState,
    model: &str,
    request: canopy_proto::GenerateRequest,
    received: Instant,
) -> Result<(ChatTask, crate::runner::TaskHandle), AnthropicError> {
    let mut task = ChatTask::new(state.clone(), model.to_string(), request, received);
    let handle = task.start().await.map_err(|err| match err.code() {
        Some("model_not_found") => unknown_model(model),
        _ => AnthropicError(err),
    })?;
    Ok((task, handle))
}

/// `POST /v1/messages/count_tokens`.
#[utoipa::path(
    post,
    path = "/v1/messages/count_tokens",
    tag = "anthropic",
    request_body = request::CountTokensBody,
    responses(
        (status = 200, description = "`{\"input_tokens\": N}`: the prompt's tokens as the \
         model's template and tokenizer make them", body = Object),
        crate::api::openapi::AnthropicErrors,
    )
)]
pub(crate) async fn count_tokens(
    State(state): State<AppState>,
    AnthropicJson(body): AnthropicJson<CountTokensBody>,
) -> Result<Response, AnthropicError> {
    let received = Instant::now();
    let job = body.into_job()?;
    let (task, handle) = start(&state, &job.model, job.request, received).await?;
    let closing = state.closing.clone();
    let done = tokio::select! {
        done = output::collect(output::outputs(task, handle, None, state.closing.clone())) => done?,
        () = closing.cancelled() => return Err(AnthropicError(ApiError::shutting_down())),
    };
    Ok(axum::Json(serde_json::json!({ "input_tokens": done.usage.prompt_tokens })).into_response())
}

/// An SSE response of `events`, with Anthropic's `ping` event as the keep-alive.
fn sse(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    keepalive: Duration,
) -> Response {
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(keepalive)
                .event(named(&StreamEvent::Ping)),
        )
        .into_response()
}

/// `event` as an SSE event named by its type.
fn named(event: &StreamEvent<'_>) -> Event {
    data_event(event.name(), event)
}

/// An SSE event `name` whose data is `value` as JSON.
fn data_event(name: &str, value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().event(name).data(json),
        Err(err) => error_event(&ApiError::internal(format!(
            "could not encode an event: {err}"
        ))),
    }
}

/// The `error` event of a stream that failed after it began.
fn error_event(err: &ApiError) -> Event {
    let body = ErrorBody::new(err.status(), err.message());
    let json = serde_json::to_string(&body).unwrap_or_else(|_| {
        // Serialising a struct of strings cannot fail; keep a valid event regardless.
        r#"{"type":"error","error":{"type":"api_error","message":"internal error"}}"#.to_string()
    });
    Event::default().event("error").data(json)
}

/// The events of a streamed answer (see the module's notes for their order).
fn events(
    id: String,
    model: String,
    stops: Vec<String>,
    outputs: impl Stream<Item = Output> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    async_stream::stream! {
        yield Ok(named(&StreamEvent::MessageStart { message: Message::started(&id, &model) }));
        yield Ok(named(&StreamEvent::block_start()));
        yield Ok(named(&StreamEvent::Ping));
        let (mut text_closed, mut called) = (false, false);
        for await output in outputs {
            match output {
                Output::Text { text, .. } if text.is_empty() => {}
                Output::Calls(calls) => {
                    if !text_closed {
                        yield Ok(named(&StreamEvent::ContentBlockStop { index: 0 }));
                        text_closed = true;
                    }
                    called = true;
                    for (call, index) in calls.iter().zip(1u32..) {
                        for event in StreamEvent::call(index, call) {
                            yield Ok(named(&event));
                        }
                    }
                }
                Output::Text { text, .. } => yield Ok(named(&StreamEvent::text(&text))),
                Output::Done { reason, usage, .. } => {
                    if !text_closed {
                        yield Ok(named(&StreamEvent::ContentBlockStop { index: 0 }));
                    }
                    yield Ok(named(&StreamEvent::finished(reason, called, &stops, usage)));
                    yield Ok(named(&StreamEvent::MessageStop));
                    break;
                }
                Output::Failed(err) => {
                    tracing::warn!(%id, model = %model, error = %err, "anthropic stream failed");
                    yield Ok(error_event(&err));
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;

    #[tokio::test]
    async fn errors_are_anthropic_shaped() {
        let response = unknown_model("nope").into_response();
        assert_eq!(response.status(), 404);
        let body = to_bytes(response.into_body(), 1 << 16).await.expect("body");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["type"], "error");
        assert_eq!(value["error"]["type"], "not_found_error");
        assert!(
            value["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("model: nope")),
            "{value}"
        );
        let busy = error_response(ApiError::shutting_down());
        assert_eq!(busy.status(), 503);
        assert!(busy.headers().contains_key("retry-after"));
    }
}
