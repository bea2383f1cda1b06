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
pub(crate) async fn state(State(state): State<AppState>) -> Json<StateView> {
    Json(state.backend.state().await)
}

/// `GET /v1/actors`: the live actor tree, as the backend describes it (`null` before the
/// node's supervisor is up).
pub(crate) async fn actors(State(state): State<AppState>) -> Json<Option<ActorReport>> {
    Json(state.backend.actors().await)
}

/// `GET /v1/cluster/actors`: every node's actor tree (404 on a standalone node).
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlaceBody {
    /// A catalogue name or a path every chosen node can read.
    model: String,
    /// How many instances (default 1).
    #[serde(default = "one")]
    instances: usize,
    /// The node to place them on (default: the leader chooses).
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
pub(crate) async fn delete_instance(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.backend.delete_instance(id.clone()).await?;
    Ok(Json(json!({ "deleted": id })))
}
