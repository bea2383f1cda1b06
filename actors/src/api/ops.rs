//! The operational endpoints: `/health`, `/ready`, `/metrics`, `/state`, `/v1/actors`,
//! `/v1/cluster/actors`, and placement: `POST /instances`, `DELETE /instances/{id}`.

use axum::Json;
use axum::extract::{Path, State};
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

/// `GET /v1/cluster/actors`: every node's actor tree (404 on a standalone node).
pub(crate) async fn cluster_actors(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.backend.cluster_actors() {
        Some(trees) => Ok(Json(trees.await)),
        None => Err(ApiError::unknown_url(
            "GET",
            "/v1/cluster/actors (this node runs standalone)",
        )),
    }
}

/// `POST /instances`: place instances of a model through the cluster's leader; answered
/// when they are Ready (201) or with why they could not be placed.
pub(crate) async fn place(
    State(state): State<AppState>,
    super::extract::OpenAiJson(body): super::extract::OpenAiJson<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state
        .backend
        .place(body)
        .await
        .map(|placed| (StatusCode::CREATED, Json(placed)))
        .map_err(ApiError::placement)
}

/// `DELETE /instances/{id}`: remove an instance from the cluster.
pub(crate) async fn delete_instance(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .backend
        .delete_instance(id.clone())
        .await
        .map(|()| Json(json!({ "deleted": id })))
        .map_err(ApiError::placement)
}
