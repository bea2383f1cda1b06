//! Ollama's API, with Ollama's field names, for the tools that speak it (the `ollama`
//! clients, editors and UIs pointed at `OLLAMA_HOST`).
//!
//! | route | answer |
//! |---|---|
//! | `POST /api/chat` | NDJSON stream of `{model, created_at, message, done}` objects (default), or one object with `stream: false` |
//! | `POST /api/generate` | the same with `response` instead of `message` |
//! | `GET /api/tags` | every model with a placed instance: name, model, modified_at, size, digest, details |
//! | `POST /api/show` | one model's details, model_info (GGUF metadata), template, capabilities |
//! | `GET /api/ps` | the models with a Ready instance |
//! | `GET /api/version` | Canopy's version |
//!
//! A generation runs through the same machinery as OpenAI's endpoints (`task`, `output`):
//! its single retry when a runner dies before any output, cancellation when the client
//! disconnects, capacity (429), the API key guard and the metrics middleware. The last
//! object of an answer has `done: true`, `done_reason` (`stop` or `length`) and Ollama's
//! counts and durations in nanoseconds: `total_duration` (from the request's arrival),
//! `load_duration` (until a runner acknowledged the task: models are always loaded, so this
//! is the time spent finding an instance and queueing), `prompt_eval_count`,
//! `prompt_eval_duration` (acknowledgement to first token), `eval_count`, `eval_duration`
//! (first token to the end).
//!
//! Every error on these routes is Ollama's `{"error": "message"}`, with the status the
//! OpenAI routes use for the same failure (400, 404 for an unknown model, 429, 502, 503).
//! A stream that fails after it began ends with an `{"error": "..."}` line, which Ollama's
//! clients raise. As on the OpenAI routes, a stream first waits up to one keep-alive
//! interval for the task's first event, so that a client error the runner finds (a prompt
//! longer than the context) is answered with its 400 status. Bodies must be sent as
//! `Content-Type: application/json` (415 otherwise), which Ollama's clients do.
//!
//! What the fields mean and which are refused: see `request`.

mod request;
mod response;

/// Ollama's error body, for the API's document.
pub(crate) type OllamaErrorBody = response::ErrorBody<'static>;

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use futures::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::extract::OpenAiJson;
use super::output::{self, Output};
use super::state::AppState;
use super::task::ChatTask;
use super::tools;
use request::{ChatBody, GenerateBody, OllamaJob, ShowBody};
use response::{
    ChatObject, ErrorBody, Final, GenerateObject, Piece, Running, RunningModel, Show, Tags,
    TagsModel, Version,
};

/// The content type of Ollama's streams.
const NDJSON: &str = "application/x-ndjson";

/// An error answered in Ollama's shape, `{"error": "message"}`.
#[derive(Debug)]
pub(crate) struct OllamaError(pub(crate) ApiError);

impl From<ApiError> for OllamaError {
    fn from(err: ApiError) -> Self {
        Self(err)
    }
}

/// A 404 for a model nobody serves, said as Ollama says it.
fn unknown_model(model: &str) -> OllamaError {
    OllamaError(ApiError::unknown_model(model).with_message(format!(
        "model \"{model}\" not found: no instance of it is placed (GET /api/tags lists the \
         models there are)"
    )))
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        self.0.response_with(ErrorBody {
            error: self.0.message(),
        })
    }
}

/// Answers `err` in Ollama's shape (for the guard and the fallbacks on `/api/` paths).
pub(crate) fn error_response(err: ApiError) -> Response {
    OllamaError(err).into_response()
}

/// A JSON body, with every rejection in Ollama's error shape (the checks are
/// [`OpenAiJson`]'s: content type, size, time, syntax).
pub(crate) struct OllamaJson<T>(T);

impl<T: DeserializeOwned> FromRequest<AppState> for OllamaJson<T> {
    type Rejection = OllamaError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        OpenAiJson::<T>::from_request(req, state)
            .await
            .map(|OpenAiJson(body)| OllamaJson(body))
            .map_err(OllamaError)
    }
}

/// `POST /api/chat`.
#[utoipa::path(
    post,
    path = "/api/chat",
    tag = "ollama",
    request_body = request::ChatBody,
    responses(
        (status = 200, description = "The answer (`stream: false`), or its objects one a line",
         content(
             (response::ChatObject = "application/json"),
             (String = "application/x-ndjson"),
         )),
        crate::api::openapi::OllamaErrors,
    )
)]
pub(crate) async fn chat(
    State(state): State<AppState>,
    OllamaJson(body): OllamaJson<ChatBody>,
) -> Result<Response, OllamaError> {
    let received = Instant::now();
    let job = body.into_job(&state.config)?;
    serve(state, job, Shape::Chat, received).await
}

/// `POST /api/generate`.
#[utoipa::path(
    post,
    path = "/api/generate",
    tag = "ollama",
    request_body = request::GenerateBody,
    responses(
        (status = 200, description = "The answer (`stream: false`), or its objects one a line",
         content(
             (response::GenerateObject = "application/json"),
             (String = "application/x-ndjson"),
         )),
        crate::api::openapi::OllamaErrors,
    )
)]
pub(crate) async fn generate(
    State(state): State<AppState>,
    OllamaJson(body): OllamaJson<GenerateBody>,
) -> Result<Response, OllamaError> {
    let received = Instant::now();
    let job = body.into_job(&state.config)?;
    serve(state, job, Shape::Generate, received).await
}

/// Which object an answer is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `/api/chat`: `message`.
    Chat,
    /// `/api/generate`: `response`.
    Generate,
}

impl Shape {
    /// One object as a JSON line.
    fn line(self, model: &str, text: &str, end: Option<Final>) -> Bytes {
        self.line_of(
            model,
            Piece {
                text,
                ..Piece::default()
            },
            end,
        )
    }

    /// One object of `piece` as a JSON line (calls of tools are a chat's only:
    /// `/api/generate` takes no tools).
    fn line_of(self, model: &str, piece: Piece<'_>, end: Option<Final>) -> Bytes {
        match self {
            Shape::Chat => json_line(&ChatObject::new(model, piece, end)),
            Shape::Generate => json_line(&GenerateObject::new(model, piece, end)),
        }
    }

    /// One object as a JSON response.
    fn object(self, model: &str, answer: Piece<'_>, end: Final) -> Response {
        let body = self.line_of(model, answer, Some(end));
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// `value` as one line of JSON.
fn json_line(value: &impl Serialize) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|err| {
        serde_json::to_vec(&ErrorBody {
            error: &format!("could not encode an object: {err}"),
        })
        .unwrap_or_default()
    });
    line.push(b'\n');
    Bytes::from(line)
}

/// The model id that serves `model`: itself, or without Ollama's `:latest` tag when only the
/// untagged name is placed.
fn resolve(state: &AppState, model: String) -> String {
    match model.strip_suffix(":latest") {
        Some(base) => {
            let models = state.backend.models();
            if !models.iter().any(|m| m.id == model) && models.iter().any(|m| m.id == base) {
                base.to_string()
            } else {
                model
            }
        }
        None => model,
    }
}

async fn serve(
    state: AppState,
    job: OllamaJob,
    shape: Shape,
    received: Instant,
) -> Result<Response, OllamaError> {
    let closing = state.closing.clone();
    tokio::select! {
        response = answer(state, job, shape, received) => response,
        () = closing.cancelled() => Err(OllamaError(ApiError::shutting_down())),
    }
}

async fn answer(
    state: AppState,
    job: OllamaJob,
    shape: Shape,
    received: Instant,
) -> Result<Response, OllamaError> {
    // The name the client used is the name it is answered with.
    let shown = job.model.clone();
    let model = resolve(&state, job.model);
    tracing::debug!(model = %model, stream = job.stream, ?shape, "ollama request");
    let Some(request) = job.request else {
        // Nothing to generate: Ollama's way of loading a model. Placed models are loaded
        // (or loading); an unknown one is a 404.
        if !state.backend.models().iter().any(|m| m.id == model) {
            return Err(unknown_model(&model));
        }
        let end = Final::loaded(received.elapsed());
        return Ok(if job.stream {
            ndjson(futures::stream::once(async move {
                Ok(shape.line(&shown, "", Some(end)))
            }))
        } else {
            shape.object(&shown, Piece::default(), end)
        });
    };
    let logprobs = request.params.logprobs.is_some();
    let mut task = ChatTask::new(state.clone(), model.clone(), request, received);
    let mut handle = task.start().await.map_err(|err| match err.code() {
        Some("model_not_found") => unknown_model(&model),
        _ => OllamaError(err),
    })?;
    let names = job.tools.names();
    if job.stream {
        let first = output::begin(&mut handle, state.config.keepalive).await?;
        let outputs = output::outputs(task, handle, first, state.closing.clone());
        let outputs = tools::split_calls(outputs, names, usize::MAX);
        Ok(ndjson(lines(shown, shape, logprobs, outputs)))
    } else {
        let outputs = output::outputs(task, handle, None, state.closing.clone());
        let done = output::collect(tools::split_calls(outputs, names, usize::MAX)).await?;
        let end = Final::finished(done.reason, done.usage, done.timings);
        let answer = Piece {
            text: &done.text,
            calls: &done.calls,
            logprobs: logprobs.then_some(&done.logprobs[..]),
        };
        Ok(shape.object(&shown, answer, end))
    }
}

/// An NDJSON streamed response of `lines`.
fn ndjson(lines: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static) -> Response {
    let mut response = Body::from_stream(lines).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    response
}

/// The lines of a streamed answer: one object per piece of text, the final object, or an
/// error line.
fn lines(
    model: String,
    shape: Shape,
    logprobs: bool,
    outputs: impl Stream<Item = Output> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    async_stream::stream! {
        for await output in outputs {
            match output {
                Output::Text { text, logprobs: entries } if text.is_empty() && entries.is_empty() => {}
                Output::Calls(calls) => {
                    let piece = Piece { calls: &calls, ..Piece::default() };
                    yield Ok(shape.line_of(&model, piece, None));
                }
                Output::Text { text, logprobs: entries } => {
                    let piece = Piece {
                        text: &text,
                        logprobs: logprobs.then_some(&entries[..]),
                        ..Piece::default()
                    };
                    yield Ok(shape.line_of(&model, piece, None));
                }
                Output::Done { reason, usage, timings } => {
                    let end = Final::finished(reason, usage, timings);
                    yield Ok(shape.line(&model, "", Some(end)));
                    break;
                }
                Output::Failed(err) => {
                    tracing::warn!(model = %model, error = %err, "ollama stream failed");
                    yield Ok(json_line(&ErrorBody { error: err.message() }));
                    break;
                }
            }
        }
    }
}

/// `GET /api/tags`.
#[utoipa::path(
    get,
    path = "/api/tags",
    tag = "ollama",
    responses((status = 200, body = response::Tags), crate::api::openapi::OllamaErrors)
)]
pub(crate) async fn tags(State(state): State<AppState>) -> Response {
    let details = all_details(&state).await;
    axum::Json(Tags {
        models: details.iter().map(TagsModel::from).collect(),
    })
    .into_response()
}

/// `GET /api/ps`.
#[utoipa::path(
    get,
    path = "/api/ps",
    tag = "ollama",
    responses((status = 200, body = response::Running), crate::api::openapi::OllamaErrors)
)]
pub(crate) async fn ps(State(state): State<AppState>) -> Response {
    let details = all_details(&state).await;
    axum::Json(Running {
        models: details
            .iter()
            .filter(|d| d.info.ready)
            .map(RunningModel::from)
            .collect(),
    })
    .into_response()
}

/// Every placed model's details.
async fn all_details(state: &AppState) -> Vec<super::backend::ModelDetails> {
    let ids: Vec<String> = state.backend.models().into_iter().map(|m| m.id).collect();
    join_all(ids.iter().map(|id| state.backend.model_details(id)))
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// `POST /api/show`.
#[utoipa::path(
    post,
    path = "/api/show",
    tag = "ollama",
    request_body = request::ShowBody,
    responses((status = 200, body = response::Show), crate::api::openapi::OllamaErrors)
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    OllamaJson(body): OllamaJson<ShowBody>,
) -> Result<Response, OllamaError> {
    let model = resolve(&state, body.into_model()?);
    match state.backend.model_details(&model).await {
        Some(details) => Ok(axum::Json(Show::from(&details)).into_response()),
        None => Err(unknown_model(&model)),
    }
}

/// `GET /api/version`.
#[utoipa::path(
    get,
    path = "/api/version",
    tag = "ollama",
    responses((status = 200, body = response::Version), crate::api::openapi::OllamaErrors)
)]
pub(crate) async fn version() -> Response {
    axum::Json(Version {
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_json_object_each() {
        let line = Shape::Chat.line("m", "Hi\nthere", None);
        let text = std::str::from_utf8(&line).expect("utf-8");
        assert!(text.ends_with('\n'));
        assert_eq!(
            text.matches('\n').count(),
            1,
            "a newline in content is escaped"
        );
        let value: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(value["message"]["content"], "Hi\nthere");
        assert_eq!(value["done"], false);
    }

    #[test]
    fn errors_are_ollama_shaped() {
        let err = unknown_model("nope");
        assert!(
            err.0.message().contains("\"nope\" not found"),
            "{}",
            err.0.message()
        );
        let response = err.into_response();
        assert_eq!(response.status(), 404);
    }
}
