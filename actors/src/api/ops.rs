//! The operational endpoints: `/health`, `/ready`, `/metrics`, `/state`, `/v1/actors`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use super::metrics;
use super::state::AppState;

/// `GET /health`: 200 while the process serves HTTP at all.
pub(crate) async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /ready`: 200 when an instance of some model is Ready, else 503.
pub(crate) async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.backend.ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready" })),
        )
    }
}

/// `GET /metrics`: every metric, Prometheus text format.
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .encode()
        .map_err(|err| ApiError::internal(format!("could not encode the metrics: {err}")))?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// `GET /state`: the node's instances and runners, as the backend describes them.
pub(crate) async fn state(State(state): State<AppState>) -> Json<Value> {
    Json(state.backend.state().await)
}

/// `GET /v1/actors`: the live actor tree, as the backend describes it.
pub(crate) async fn actors(State(state): State<AppState>) -> Json<Value> {
    Json(state.backend.actors().await)
}
