//! The API's router: every route, the 404/405 fallbacks (in the shape of the API a path
//! belongs to: OpenAI's, Ollama's under `/api/`, Anthropic's under `/v1/messages`), the
//! guard (Host check and API key) and the metrics middleware.

use std::sync::Arc;

use axum::Router;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio_util::sync::CancellationToken;

use super::anthropic;
use super::backend::Backend;
use super::chat;
use super::completions;
use super::config::ApiConfig;
use super::dashboard;
use super::error::ApiError;
use super::events;
use super::guard;
use super::metrics::Metrics;
use super::models;
use super::observe;
use super::ollama;
use super::openapi;
use super::ops;
use super::state::AppState;

/// The API as an axum `Router`, ready to serve (the `ApiActor` serves it; embedding it
/// elsewhere works too). Cancelling `closing` ends every open request at once: chat
/// completions still waiting are answered 503, open streams get an error event and
/// `[DONE]`; use it when a graceful shutdown has waited long enough.
pub fn router(
    backend: Arc<dyn Backend>,
    metrics: Metrics,
    config: ApiConfig,
    closing: CancellationToken,
) -> Router {
    let state = AppState {
        backend,
        metrics,
        config: Arc::new(config),
        closing,
    };
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*model}", get(models::get))
        .route("/v1/actors", get(ops::actors))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/state", get(ops::state))
        .route("/v1/cluster/actors", get(ops::cluster_actors))
        .route("/v1/events", get(events::events))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/", get(dashboard::index))
        .route("/v1/dashboard", get(dashboard::dashboard))
        .route("/dashboard/login", post(dashboard::login))
        .route("/dashboard/assets/{name}", get(dashboard::asset))
        .route("/instances", post(ops::place))
        .route("/instances/{id}", delete(ops::delete_instance))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        // The guard (Host, API key) runs inside the metrics middleware, so refusals are
        // counted by status like any answer.
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

/// Whether `path` is one of Ollama's, whose errors are answered in Ollama's shape.
pub(crate) fn is_ollama_path(path: &str) -> bool {
    path.starts_with("/api/")
}

/// Whether `path` is Anthropic's Messages API (or below it), whose errors are answered in
/// Anthropic's shape.
pub(crate) fn is_anthropic_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// `err` in the error shape of the API that `path` belongs to.
pub(crate) fn error_for(path: &str, err: ApiError) -> Response {
    if is_ollama_path(path) {
        ollama::error_response(err)
    } else if is_anthropic_path(path) {
        anthropic::error_response(err)
    } else {
        err.into_response()
    }
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    error_for(
        uri.path(),
        ApiError::unknown_url(method.as_str(), uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_for(
        uri.path(),
        ApiError::method_not_allowed(method.as_str(), uri.path()),
    )
}
