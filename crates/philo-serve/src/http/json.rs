//! Reading JSON request bodies, every failure answered in OpenAI's error format.
//!
//! axum's `Json` extractor answers bad bodies in plain text (and type errors with 422); OpenAI
//! clients expect a JSON error with status 400 that names the field at fault, so bodies are
//! parsed here with the field path tracked.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::openai::{ChatCompletionRequest, CompletionRequest, LoadAdapterRequest};

/// A request body type read from JSON.
pub trait FromJson: Sized {
    fn from_json(body: &[u8]) -> Result<Self, ApiError>;
}

/// Extracts a [`FromJson`] body; rejects a missing JSON content type with 415, a body over
/// axum's size limit with 413 and anything unreadable with 400.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: FromJson> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !has_json_content_type(request.headers()) {
            return Err(ApiError::client_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON: send the header `Content-Type: application/json`",
            ));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                ApiError::client_error(rejection.status(), rejection.body_text())
            })?;
        T::from_json(&body).map(ApiJson)
    }
}

fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    // `application/json` itself or a JSON-based type such as `application/merge-patch+json`.
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses `body` as one JSON object of type `T`; the error names the field at fault.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Checked up front because derived structs also accept a JSON array of their field values.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => {
            return Err(ApiError::bad_request(
                "the request body is empty; send a JSON object (see /openapi.json for its fields)",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "the body must be a JSON object (`{...}`); see /openapi.json for its fields",
            ))
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(describe)?;
    // Anything but whitespace after the value makes the body as malformed as a syntax error.
    deserializer.end().map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not valid JSON ({e}); send exactly one JSON object"
        ))
    })?;
    Ok(value)
}

fn describe(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data if path != "." => {
            ApiError::invalid_param(&path, format!("`{path}`: {inner}"))
        }
        serde_json::error::Category::Data => ApiError::bad_request(format!(
            "the body does not have the expected fields: {inner}"
        )),
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::bad_request(format!(
                "the body is not valid JSON ({inner}); send one JSON object"
            ))
        }
        serde_json::error::Category::Io => {
            ApiError::bad_request(format!("the body could not be read: {inner}"))
        }
    }
}

impl FromJson for ChatCompletionRequest {
    fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        Ok(ChatCompletionRequest {
            input: parse(body)?,
            params: parse(body)?,
        })
    }
}

impl FromJson for CompletionRequest {
    fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        Ok(CompletionRequest {
            input: parse(body)?,
            params: parse(body)?,
        })
    }
}

impl FromJson for LoadAdapterRequest {
    fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        parse(body)
    }
}
