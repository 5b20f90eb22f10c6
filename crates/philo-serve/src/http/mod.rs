//! The HTTP layer of `philo serve`: an OpenAI-compatible API over a [`Backend`].
//!
//! Routes:
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: generation, whole or streamed as
//!   server-sent events, in OpenAI's wire format;
//! - `GET /v1/models`, `GET /v1/models/{id}`: the base model and its loaded LoRA adapters;
//! - `POST /v1/adapters`: loads a PEFT adapter folder as a new model; `DELETE
//!   /v1/adapters/{name}` unloads one;
//! - `GET /health`, `GET /metrics` (Prometheus), `GET /openapi.json` (OpenAPI 3.1).
//!
//! A route validates the request, applies the chat template, tokenizes, and submits a
//! [`GenerationRequest`](crate::request::GenerationRequest) to the [`Backend`]; then it
//! detokenizes the engine's token events, applies `stop` strings, and answers. Every error is an
//! OpenAI error object. With an API key, the /v1 routes require `Authorization: Bearer <key>`;
//! the operational routes stay open.
//!
//! ```no_run
//! # async fn run(config: philo_serve::http::ServerConfig) -> anyhow::Result<()> {
//! use philo_serve::http::{serve, shutdown_signal, ServerState};
//!
//! let state = ServerState::new(config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! serve(listener, state, shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Backend`]: crate::request::Backend

mod auth;
mod chat;
mod choices;
mod completions;
mod error;
mod generation;
mod health;
mod ids;
mod json;
mod metrics;
mod models;
mod openai;
mod openapi;
mod params;
mod server;
mod sse;
mod state;
mod stop;

use axum::extract::Request;
use axum::http::Uri;
use axum::middleware;
use axum::routing::{delete, get, post};
use axum::Router;

pub use server::{serve, shutdown_signal};
pub use state::{ServerConfig, ServerState};

use error::ApiError;

/// All routes, with request metrics, API-key checks and OpenAI-style errors for unknown routes
/// and methods.
pub fn router(state: ServerState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/models", get(models::list_models))
        // Model ids may contain `/` (`microsoft/Phi-3-mini-4k-instruct`).
        .route("/v1/models/{*id}", get(models::retrieve_model))
        .route("/v1/adapters", post(models::load_adapter))
        .route("/v1/adapters/{*name}", delete(models::unload_adapter))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health::health))
        .route("/metrics", get(metrics::scrape))
        .route("/openapi.json", get(openapi::serve_document))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::count_requests,
        ))
        .with_state(state)
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::method_not_allowed(request.method().as_str(), request.uri().path())
}
