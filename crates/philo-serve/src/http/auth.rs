//! `--api-key`: every /v1 route requires `Authorization: Bearer <key>`.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::ServerState;

/// Middleware rejecting requests without the server's API key with 401.
pub async fn require_api_key(
    State(state): State<ServerState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = state.api_key() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), key.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::unauthorized("the API key is wrong; send the server's --api-key")
            .into_response(),
        None => ApiError::unauthorized(
            "this server requires an API key; send the header `Authorization: Bearer <key>`",
        )
        .into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Compares without stopping at the first difference, so response times do not reveal how
/// much of a guessed key is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn keys_compare_exactly() {
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"key", b"kex"));
        assert!(!constant_time_eq(b"key", b"keys"));
    }
}
