//! Errors as the API answers them: OpenAI's `{"error": {message, type, param, code}}` shape
//! with a fitting HTTP status.
//!
//! Every failure a client can see goes through [`ApiError`], whether it is answered as a
//! JSON response or, on an SSE stream that has already begun, as a `data:` event. The
//! mapping from the node's errors:
//!
//! | cause | status | `type` / `code` |
//! |---|---|---|
//! | bad body, bad parameter | 400 | `invalid_request_error` / `invalid_json`, `missing_required_parameter`, `invalid_type`, `invalid_value` |
//! | unknown route / model | 404 | `invalid_request_error` / `unknown_url`, `model_not_found` |
//! | body over the limit | 413 | `invalid_request_error` / `request_too_large` |
//! | body not sent within the body timeout | 408 | `invalid_request_error` / `request_timeout` |
//! | a JSON endpoint's body without `Content-Type: application/json` | 415 | `invalid_request_error` / `unsupported_media_type` |
//! | no or a wrong API key (when the node has one) | 401 + `WWW-Authenticate: Bearer` | `invalid_request_error` / `invalid_api_key` |
//! | a `Host` header the node does not answer to | 403 | `invalid_request_error` / `forbidden_host` |
//! | more connections than the cap | 503 + `Retry-After` | `server_error` / `too_many_connections` |
//! | every instance at capacity ([`SubmitError::Busy`], [`RunnerError::QueueFull`]) | 429 + `Retry-After` | `rate_limit_error` / `server_busy` |
//! | the prompt does not fit the instance's context ([`RunnerError::TaskFailed`] of kind [`TaskErrorKind::ContextLengthExceeded`]) | 400 | `invalid_request_error` / `context_length_exceeded` (`param`: `messages`) |
//! | the runner found the request unusable ([`RunnerError::TaskFailed`] of kind [`TaskErrorKind::InvalidRequest`]) | 400 | `invalid_request_error` / `invalid_request` |
//! | runner reported any other task error ([`RunnerError::TaskFailed`]) | 500 | `server_error` / `task_failed` |
//! | runner died ([`RunnerError::RunnerFailed`]), its node left ([`RunnerError::PeerLost`]), its cross-node stream broke or went silent past its deadline ([`RunnerError::StreamLost`]), or the task stream vanished | 502 | `server_error` / `runner_failed` |
//! | no Ready instance, runner not ready, shutting down, supervisor gone | 503 + `Retry-After` | `server_error` / `no_ready_instance` |
//! | this API is shutting down and ends the request | 503 + `Retry-After` | `server_error` / `shutting_down` |
//!
//! The client's errors (400) are final: a task error is not a runner death, so it is never
//! retried and never counts as a runner failure. A stream whose task fails that way before
//! its first token is still answered with the 400 status (see `chat`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use canopy_proto::TaskErrorKind;

use super::backend::SubmitError;
use crate::placement::PlaceError;
use crate::runner::RunnerError;

/// Seconds a client is told to wait (`Retry-After`) after a 429 or 503.
const RETRY_AFTER_SECS: u64 = 1;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

/// The JSON body of an error: `{"error": {...}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiError)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiErrorObject)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn with_retry_after(mut self) -> Self {
        self.retry_after = Some(RETRY_AFTER_SECS);
        self
    }

    /// A 400 about the request as a whole (no single parameter to blame).
    pub(crate) fn invalid_body(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).with_code(code)
    }

    /// A 400 about one parameter (`param` is its JSON path, e.g. `messages[1].role`).
    pub(crate) fn invalid_param(
        param: impl Into<String>,
        message: impl Into<String>,
        code: &'static str,
    ) -> Self {
        Self::invalid_body(message, code).with_param(param)
    }

    /// A 413: the body is larger than `limit` bytes.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// A 408: the body did not arrive within `timeout`.
    pub(crate) fn body_timeout(timeout: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs_f64()
            ),
        )
        .with_code("request_timeout")
    }

    /// A 415: a JSON endpoint got a body of another content type (or none stated).
    pub(crate) fn not_json(got: Option<&str>) -> Self {
        let got = match got {
            Some(t) => format!("`{}`", shown(t, 100)),
            None => "no Content-Type".to_string(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "The request body must be sent with `Content-Type: application/json`, not \
                 {got}."
            ),
        )
        .with_code("unsupported_media_type")
    }

    /// A 401: no API key, or the wrong one (`presented` says which).
    pub(crate) fn unauthorized(presented: bool) -> Self {
        let message = if presented {
            "Incorrect API key provided. The key is the one the node was started with \
             (--api-key, CANOPY_API_KEY or --api-key-file)."
        } else {
            "You didn't provide an API key. Send it in the header `Authorization: Bearer \
             <key>` (or `x-api-key: <key>`); the key is the one the node was started with \
             (--api-key, CANOPY_API_KEY or --api-key-file)."
        };
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    /// A 403: the `Host` header names a host this node does not answer to (a DNS-rebinding
    /// page, or a name that needs `--allowed-host`).
    pub(crate) fn foreign_host(host: &str) -> Self {
        let shown = shown(host, 64);
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "This node does not answer to the host name `{}`: use its IP address or \
                 localhost, or start it with --allowed-host NAME.",
                shown.escape_default()
            ),
        )
        .with_code("forbidden_host")
    }

    /// A 503: the node serves as many connections as it may.
    pub(crate) fn too_many_connections(limit: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("The node is serving its limit of {limit} connections; retry shortly."),
        )
        .with_code("too_many_connections")
        .with_retry_after()
    }

    /// A 404 for a path nobody serves.
    pub(crate) fn unknown_url(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {method} {path}."),
        )
        .with_code("unknown_url")
    }

    /// A 405 for a known path asked with the wrong method.
    pub(crate) fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}."),
        )
        .with_code("method_not_allowed")
    }

    /// A 404 for a model that no instance serves.
    pub(crate) fn unknown_model(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{model}` does not exist: no instance of it is placed on this \
                 cluster. GET /v1/models lists the models that are."
            ),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// A 502: the task's stream ended without a final event.
    pub(crate) fn stream_vanished(model: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("The runner of model `{model}` went away without finishing the task."),
        )
        .with_code("runner_failed")
    }

    /// A 503: the server is shutting down and ends the request.
    pub(crate) fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server is shutting down; retry on another node or later.",
        )
        .with_code("shutting_down")
        .with_retry_after()
    }

    /// A 500 for a failure inside the API itself.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("internal_error")
    }

    /// The error a refused submission is answered with.
    pub(crate) fn from_submit(err: &SubmitError) -> Self {
        match err {
            SubmitError::UnknownModel(model) => Self::unknown_model(model),
            SubmitError::NoReadyInstance(model) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "No instance of model `{model}` is ready (it may be loading or \
                     restarting); try again shortly."
                ),
            )
            .with_code("no_ready_instance")
            .with_retry_after(),
            SubmitError::Busy(model) => Self::busy(format!(
                "Every instance of model `{model}` is at capacity; try again shortly."
            )),
            SubmitError::Runner(err) => Self::from_runner(err),
        }
    }

    /// The error a runner failure is answered with.
    pub(crate) fn from_runner(err: &RunnerError) -> Self {
        match err {
            RunnerError::QueueFull { .. } => Self::busy(format!("{err}; try again shortly.")),
            RunnerError::NotReady { .. }
            | RunnerError::ShuttingDown { .. }
            | RunnerError::SupervisorGone => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                err.to_string(),
            )
            .with_code("no_ready_instance")
            .with_retry_after(),
            RunnerError::RunnerFailed { .. }
            | RunnerError::PeerLost { .. }
            | RunnerError::StreamLost { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "server_error", err.to_string())
                    .with_code("runner_failed")
            }
            RunnerError::TaskFailed {
                kind: TaskErrorKind::ContextLengthExceeded,
                message,
                ..
            } => Self::invalid_param("messages", message.clone(), "context_length_exceeded"),
            RunnerError::TaskFailed {
                kind: TaskErrorKind::InvalidRequest,
                message,
                ..
            } => Self::invalid_body(message.clone(), "invalid_request"),
            RunnerError::TaskFailed {
                kind: TaskErrorKind::Internal,
                ..
            } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                err.to_string(),
            )
            .with_code("task_failed"),
        }
    }

    fn busy(message: String) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .with_code("server_busy")
            .with_retry_after()
    }

    /// The same error with another message.
    pub(crate) fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Appends a sentence to the message.
    pub(crate) fn context(mut self, more: impl std::fmt::Display) -> Self {
        self.message = format!("{} ({more})", self.message);
        self
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether the client's request is to blame (a 4xx).
    pub(crate) fn is_client_error(&self) -> bool {
        self.status.is_client_error()
    }

    /// The parameter blamed, if any.
    pub(crate) fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// The message.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The machine-readable code (`model_not_found`, ...), if any.
    pub(crate) fn code(&self) -> Option<&'static str> {
        self.code
    }

    /// Answers with this error's status and `Retry-After`, but `body` as the JSON body (for
    /// APIs with their own error shape, such as Ollama's `{"error": "..."}`).
    pub(crate) fn response_with(&self, body: impl Serialize) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "API error");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "API error");
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// The `{"error": {...}}` body.
    pub(crate) fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }

    /// The body as a JSON string (for SSE error events).
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| {
            // Serialising a struct of strings cannot fail; keep a valid event regardless.
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
                .to_string()
        })
    }
}

/// The first `max` characters of a client-supplied `text`, for a message.
fn shown(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response_with(self.body())
    }
}

/// The one mapping of placement errors to HTTP (`POST /instances`, `DELETE /instances/{id}`).
impl From<PlaceError> for ApiError {
    fn from(err: PlaceError) -> Self {
        let (status, code) = match &err {
            PlaceError::NoRoom { .. } => (StatusCode::INSUFFICIENT_STORAGE, "no_room"),
            PlaceError::UnknownNode(_) => (StatusCode::BAD_REQUEST, "unknown_node"),
            PlaceError::Failed { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "placement_failed"),
            PlaceError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            PlaceError::NoSuchInstance(_) => (StatusCode::NOT_FOUND, "no_such_instance"),
            PlaceError::NoLeader => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
            PlaceError::Standalone => (StatusCode::BAD_REQUEST, "standalone"),
            PlaceError::Unsupported => (StatusCode::BAD_REQUEST, "unsupported"),
            PlaceError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
        };
        let kind = if status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let api = Self::new(status, kind, err.to_string()).with_code(code);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            api.with_retry_after()
        } else {
            api
        }
    }
}
