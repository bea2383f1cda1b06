//! `GET /v1/models` and `GET /v1/models/{model}`: the models with a placed instance.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};

use super::error::ApiError;
use super::response::{ModelList, ModelObject};
use super::state::AppState;

/// `GET /v1/models`.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses((status = 200, body = ModelList), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList::new(state.backend.models()))
}

/// `GET /v1/models/{model}` (model ids may contain `/`).
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    params(("model" = String, Path, description = "The model's id (it may contain `/`)")),
    responses((status = 200, body = ModelObject), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelObject>, ApiError> {
    let Path(model) = model.map_err(|err| {
        ApiError::invalid_param(
            "model",
            format!("Invalid model in the path: {err}."),
            "invalid_value",
        )
    })?;
    state
        .backend
        .models()
        .into_iter()
        .find(|m| m.id == model)
        .map(|m| Json(ModelObject::from(m)))
        .ok_or_else(|| ApiError::unknown_model(&model))
}
