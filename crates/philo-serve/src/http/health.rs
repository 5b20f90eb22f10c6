//! GET /health: whether the server takes requests, for load balancers and orchestrators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::openai::Health;
use super::state::ServerState;

/// GET /health.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The server takes requests", body = Health),
        (status = 503, description = "The server is shutting down", body = Health),
    )
)]
pub async fn health(State(state): State<ServerState>) -> (StatusCode, Json<Health>) {
    if state.is_shutting_down() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "shutting_down",
            }),
        )
    } else {
        (StatusCode::OK, Json(Health { status: "ok" }))
    }
}
