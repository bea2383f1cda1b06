//! The operational endpoints: `/health`, `/ready`, `/metrics`, `/state`, `/v1/actors`,
//! `/v1/cluster/actors`, and placement: `POST /instances`, `DELETE /instances/{id}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use canopy_runtime::cluster::NodeId;
use canopy_runtime::introspect::ActorReport;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::ApiError;
use super::metrics;
use super::state::AppState;
use super::views::{ClusterActors, StateView};
use crate::placement::{MAX_WAIT_SECS, PlaceRequest, Placed};

/// `GET /health`: 200 while the process serves HTTP at all.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /ready`: 200 when an instance of some model is Ready, else 503.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"status\": \"ready\"}`", body = Object),
        (status = 503, description = "`{\"status\": \"not ready\"}`", body = Object),
        (status = 401, description = "A missing or wrong API key", body = super::error::ErrorBody<'static>),
        (status = 403, description = "A Host header the node does not answer", body = super::error::ErrorBody<'static>),
    )
)]
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
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Every metric", content_type = "text/plain", body = String),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .encode()
        .map_err(|err| ApiError::internal(format!("could not encode the metrics: {err}")))?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// `GET /state`: the node's instances and runners, as the backend describes them.
#[utoipa::path(
    get,
    path = "/state",
    tag = "operations",
    responses((status = 200, description = "The node's instances and runners", body = Object), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn state(State(state): State<AppState>) -> Json<StateView> {
    Json(state.backend.state().await)
}

/// `GET /v1/actors`: the live actor tree, as the backend describes it (`null` before the
/// node's supervisor is up).
#[utoipa::path(
    get,
    path = "/v1/actors",
    tag = "operations",
    responses(
        (status = 200, description = "The live actor tree (`null` before the node's supervisor \
         is up)", body = Option<Object>),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn actors(State(state): State<AppState>) -> Json<Option<ActorReport>> {
    Json(state.backend.actors().await)
}

/// `GET /v1/cluster/actors`: every node's actor tree (404 on a standalone node).
#[utoipa::path(
    get,
    path = "/v1/cluster/actors",
    tag = "operations",
    responses((status = 200, description = "Every node's actor tree", body = Object), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn cluster_actors(
    State(state): State<AppState>,
) -> Result<Json<ClusterActors>, ApiError> {
    match state.backend.cluster_actors() {
        Some(trees) => Ok(Json(trees.await)),
        None => Err(ApiError::unknown_url(
            "GET",
            "/v1/cluster/actors (this node runs standalone)",
        )),
    }
}

/// The body of `POST /instances`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlaceBody {
    /// A catalogue name or a path every chosen node can read.
    model: String,
    /// How many instances (default 1).
    #[serde(default = "one")]
    instances: usize,
    /// The node to place them on (default: the leader chooses).
    #[schema(value_type = Option<String>)]
    node: Option<NodeId>,
    /// How long to wait for them to be Ready, in seconds (default 300; 1 to 3600).
    #[serde(default = "default_wait")]
    wait: u64,
    /// The client's key for this placement: retrying with the same key never places twice.
    #[serde(default)]
    request_id: Option<String>,
}

fn one() -> usize {
    1
}

fn default_wait() -> u64 {
    300
}

impl From<PlaceBody> for PlaceRequest {
    fn from(body: PlaceBody) -> Self {
        PlaceRequest {
            model: body.model,
            instances: body.instances,
            node: body.node,
            wait_secs: body.wait.clamp(1, MAX_WAIT_SECS),
            request_id: body.request_id,
        }
    }
}

/// What `POST /instances` answers.
#[derive(Debug, Serialize)]
pub(crate) struct PlacedBody {
    /// The new instances and their nodes.
    instances: Vec<Placed>,
}

/// `POST /instances`: place instances of a model through the cluster's leader; answered
/// when they are Ready (201) or with why they could not be placed.
#[utoipa::path(
    post,
    path = "/instances",
    tag = "operations",
    request_body = PlaceBody,
    responses(
        (status = 201, description = "`{\"instances\": [...]}`: the new, Ready instances", body = Object),
        (status = 422, description = "A node could not start or load the model",
         body = super::error::ErrorBody<'static>),
        (status = 504, description = "Not Ready in time", body = super::error::ErrorBody<'static>),
        (status = 507, description = "No node has the memory", body = super::error::ErrorBody<'static>),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn place(
    State(state): State<AppState>,
    super::extract::OpenAiJson(body): super::extract::OpenAiJson<PlaceBody>,
) -> Result<(StatusCode, Json<PlacedBody>), ApiError> {
    let request = PlaceRequest::from(body);
    request.validate()?;
    let instances = state.backend.place(request).await?;
    Ok((StatusCode::CREATED, Json(PlacedBody { instances })))
}

/// `DELETE /instances/{id}`: remove an instance from the cluster.
#[utoipa::path(
    delete,
    path = "/instances/{id}",
    tag = "operations",
    params(("id" = String, Path, description = "The instance's id")),
    responses((status = 200, description = "`{\"deleted\": ID}`", body = Object), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn delete_instance(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.backend.delete_instance(id.clone()).await?;
    Ok(Json(json!({ "deleted": id })))
}
