//! Errors answered in OpenAI's JSON shape, so OpenAI clients raise their usual exceptions
//! (`BadRequestError`, `NotFoundError`, `RateLimitError`, ...) with philo's message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::openai::{ErrorBody, ErrorResponse};
use crate::request::SubmitError;

/// A failed request: the status and the OpenAI error object to send.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// Sent as `Retry-After` (seconds) with 429s.
    retry_after_secs: Option<u64>,
}

const INVALID_REQUEST: &str = "invalid_request_error";

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                message: message.into(),
                kind,
                param: None,
                code: None,
            },
            retry_after_secs: None,
        }
    }

    fn with_param(mut self, param: impl Into<String>) -> Self {
        self.body.param = Some(param.into());
        self
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.body.code = Some(code);
        self
    }

    /// A 400 about the request as a whole (an unreadable body, an empty prompt).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    /// A 400 about one field of the request.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    /// A 4xx the HTTP layer itself decided (body too large, wrong content type, bad path).
    pub fn client_error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, INVALID_REQUEST, message)
    }

    /// 404 for a `model` that is neither the base model nor a loaded adapter.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!("the model `{model}` does not exist; GET /v1/models lists the base model and the loaded adapters"),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 400 for a prompt that, with the tokens asked for, does not fit the context.
    pub fn context_length_exceeded(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_param(param, message).with_code("context_length_exceeded")
    }

    /// 409 for an adapter name already in use.
    pub fn name_taken(name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            INVALID_REQUEST,
            format!("a model named `{name}` is already loaded; choose another name"),
        )
        .with_param("name")
        .with_code("model_exists")
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    /// 404 for a path the server does not have.
    pub fn route_not_found(path: &str) -> Self {
        Self::client_error(
            StatusCode::NOT_FOUND,
            format!("there is no route {path}; GET /openapi.json lists the routes philo serves"),
        )
    }

    /// 405 for a known path called with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::client_error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} does not take {method} requests; the `Allow` header lists the methods it takes"),
        )
    }

    /// 503 while the server shuts down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down and takes no new requests; retry against another instance or after it restarts",
        )
        .with_code("shutting_down")
    }

    /// 500 for a failure on the server's side.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The error object, for error events inside a stream (where the status is already 200).
    pub fn into_body(self) -> ErrorResponse {
        ErrorResponse { error: self.body }
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        let message = error.to_string();
        match error {
            SubmitError::QueueFull {
                retry_after_secs, ..
            } => ApiError {
                retry_after_secs: Some(retry_after_secs),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .with_code("queue_full")
            },
            SubmitError::UnknownModel(model) => Self::model_not_found(&model),
            SubmitError::ContextOverflow { .. } => Self::context_length_exceeded(
                "max_tokens",
                format!("{message}; shorten the prompt or lower max_tokens"),
            ),
            SubmitError::ShuttingDown => Self::shutting_down(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let retry_after = self.retry_after_secs;
        let mut response = (status, Json(self.into_body())).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
