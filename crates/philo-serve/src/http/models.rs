//! The served models: GET /v1/models, GET /v1/models/{id}, POST /v1/adapters, which loads a
//! LoRA adapter as a new model without a restart, and DELETE /v1/adapters/{name}, which unloads
//! one.

use std::path::PathBuf;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::error::ApiError;
use super::json::ApiJson;
use super::openai::{DeletedModel, ErrorResponse, LoadAdapterRequest, Model, ModelList};
use super::state::ServerState;
use crate::request::UnloadError;

/// The longest adapter name accepted.
const MAX_NAME_LEN: usize = 128;

/// GET /v1/models.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, description = "The base model and every loaded adapter", body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    )
)]
pub async fn list_models(State(state): State<ServerState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .backend()
            .models()
            .into_iter()
            .map(Model::from)
            .collect(),
    })
}

/// GET /v1/models/{id}.
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "openai",
    params(("id" = String, Path, description = "The model's id; it may contain `/`")),
    responses(
        (status = 200, description = "The model", body = Model),
        (status = 400, description = "The path is not valid UTF-8", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such model", body = ErrorResponse),
    )
)]
pub async fn retrieve_model(
    State(state): State<ServerState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Model>, ApiError> {
    let Path(id) = id.map_err(|rejection| {
        ApiError::client_error(StatusCode::BAD_REQUEST, rejection.body_text())
    })?;
    state
        .backend()
        .models()
        .into_iter()
        .find(|info| info.id == id)
        .map(|info| Json(info.into()))
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// POST /v1/adapters.
#[utoipa::path(
    post,
    path = "/v1/adapters",
    tag = "philo",
    request_body = LoadAdapterRequest,
    responses(
        (status = 200, description = "The adapter is loaded and servable under its name", body = Model),
        (status = 400, description = "Invalid name, or the folder is not a loadable PEFT adapter", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 409, description = "The name is taken", body = ErrorResponse),
        (status = 413, description = "The body is too large", body = ErrorResponse),
        (status = 415, description = "The body is not declared as JSON", body = ErrorResponse),
    )
)]
pub async fn load_adapter(
    State(state): State<ServerState>,
    ApiJson(request): ApiJson<LoadAdapterRequest>,
) -> Result<Json<Model>, ApiError> {
    check_name(&request.name)?;
    if state
        .backend()
        .models()
        .iter()
        .any(|info| info.id == request.name)
    {
        return Err(ApiError::name_taken(&request.name));
    }
    let dir = PathBuf::from(&request.path);
    // One stat call, so not worth a blocking task; the engine reads the folder itself later.
    if !dir.is_dir() {
        return Err(ApiError::invalid_param(
            "path",
            format!(
                "`{}` is not a folder on the server; give the folder that holds adapter_config.json and adapter_model.safetensors",
                request.path
            ),
        ));
    }
    // The engine's message says what is wrong with the adapter (rank, target modules, files).
    let info = state
        .backend()
        .load_adapter(request.name, dir)
        .await
        .map_err(|message| ApiError::invalid_param("path", message))?;
    Ok(Json(info.into()))
}

/// DELETE /v1/adapters/{name}.
#[utoipa::path(
    delete,
    path = "/v1/adapters/{name}",
    tag = "philo",
    params(("name" = String, Path, description = "The adapter's name; it may contain `/`")),
    responses(
        (status = 200, description = "The adapter is no longer served; requests already running with it finish first", body = DeletedModel),
        (status = 400, description = "The name is the base model's, or the path is not valid UTF-8", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No adapter of that name", body = ErrorResponse),
    )
)]
pub async fn unload_adapter(
    State(state): State<ServerState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<DeletedModel>, ApiError> {
    let Path(name) = name.map_err(|rejection| {
        ApiError::client_error(StatusCode::BAD_REQUEST, rejection.body_text())
    })?;
    match state.backend().unload_adapter(&name) {
        Ok(()) => Ok(Json(DeletedModel {
            id: name,
            object: "model",
            deleted: true,
        })),
        Err(UnloadError::NotFound(_)) => Err(ApiError::model_not_found(&name)),
        Err(error @ UnloadError::BaseModel(_)) => {
            Err(ApiError::invalid_param("name", error.to_string()))
        }
    }
}

/// Names are used as `model` in requests and in URLs, so they keep to a plain alphabet; this is
/// the pattern the OpenAPI schema of [`LoadAdapterRequest`] declares.
fn check_name(name: &str) -> Result<(), ApiError> {
    let valid_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c));
    if valid_start && valid_rest && name.len() <= MAX_NAME_LEN {
        return Ok(());
    }
    Err(ApiError::invalid_param(
        "name",
        format!(
            "the adapter name `{name}` is invalid; use 1 to {MAX_NAME_LEN} letters, digits and `._:/-`, starting with a letter or digit"
        ),
    ))
}
