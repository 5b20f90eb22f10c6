//! POST /v1/chat/completions: the next assistant message of a conversation.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use philo_text::TextError;

use super::error::ApiError;
use super::generation::{Generation, Job};
use super::ids::{response_id, unix_now};
use super::json::ApiJson;
use super::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatMessage, ChunkChoice, Delta, Usage,
};
use super::params::{max_tokens, Settings};
use super::sse::{self, ChunkFormat};
use super::state::ServerState;
use crate::request::FinishReason;

const ENDPOINT: &str = "/v1/chat/completions";

/// POST /v1/chat/completions.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer; with `stream: true`, server-sent events each carrying a ChatCompletionChunk, then `data: [DONE]`",
            content(
                (ChatCompletion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "A field is invalid, or the prompt and max_tokens do not fit the context", body = super::openai::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::openai::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::openai::ErrorResponse),
        (status = 413, description = "The body is too large", body = super::openai::ErrorResponse),
        (status = 415, description = "The body is not declared as JSON", body = super::openai::ErrorResponse),
        (status = 429, description = "The engine's queue is full; retry after `Retry-After` seconds", body = super::openai::ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 500, description = "The engine failed", body = super::openai::ErrorResponse),
        (status = 503, description = "The server is shutting down", body = super::openai::ErrorResponse),
    )
)]
pub async fn create_chat_completion(
    State(state): State<ServerState>,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let ChatCompletionRequest { input, params } = request;
    let settings = Settings::from_params(&params)?;
    let messages = conversation(&input.messages)?;
    let model = state.resolve_model(params.model.as_deref())?;
    let text = state
        .template()
        .render(&messages, true)
        .map_err(template_error)?;
    // The template writes BOS where the model wants one (as `philo chat` and transformers'
    // apply_chat_template do), so the tokenizer must not add another.
    let prompt = state
        .tokenizer()
        .encode(&text, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "the chat template turned the messages into an empty prompt; send at least one user message",
        ));
    }
    let (requested, param) = match input.max_completion_tokens {
        Some(n) => (Some(n), "max_completion_tokens"),
        None => (params.max_tokens, "max_tokens"),
    };
    let max_tokens = max_tokens(
        prompt.len(),
        requested,
        param,
        "messages",
        state.backend().context_length(),
    )?;
    let (stream, include_usage) = (settings.stream, settings.include_usage);
    let mut generation = Generation::start(
        &state,
        Job {
            model: model.clone(),
            prompt,
            max_tokens,
            settings,
            endpoint: ENDPOINT,
            arrived,
        },
    )?;
    let chunks = ChatChunks {
        id: response_id("chatcmpl-"),
        created: unix_now(),
        model,
    };
    if stream {
        return Ok(sse::respond(generation, chunks, include_usage));
    }
    let (content, reason) = generation.collect().await?;
    Ok(Json(ChatCompletion {
        id: chunks.id,
        object: "chat.completion",
        created: chunks.created,
        model: chunks.model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
            },
            finish_reason: reason.into(),
        }],
        usage: generation.usage(),
    })
    .into_response())
}

/// The messages in the form chat templates take.
fn conversation(messages: &[ChatMessage]) -> Result<Vec<philo_text::ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` is empty; send at least one message, e.g. {\"role\": \"user\", \"content\": \"Hello\"}",
        ));
    }
    Ok(messages
        .iter()
        .map(|m| philo_text::ChatMessage::new(m.role.as_str(), m.content.text()))
        .collect())
}

/// A template that refuses the conversation (`raise_exception`) is the client's to fix; any other
/// rendering failure is the server's template.
fn template_error(error: TextError) -> ApiError {
    match error {
        TextError::TemplateRaised { .. } => ApiError::invalid_param("messages", error.to_string()),
        _ => ApiError::internal(error.to_string()),
    }
}

/// The chunks of one streamed chat completion.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
}

impl ChatChunks {
    fn chunk(&self, delta: Delta, finish_reason: Option<FinishReason>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish_reason.map(Into::into),
            }],
            usage: None,
        }
    }
}

impl ChunkFormat for ChatChunks {
    type Chunk = ChatCompletionChunk;

    fn opening(&self) -> Option<ChatCompletionChunk> {
        // OpenAI opens every stream with the role and empty content.
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        Some(self.chunk(delta, None))
    }

    fn text(&self, text: String) -> ChatCompletionChunk {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk(delta, None)
    }

    fn finish(&self, reason: FinishReason) -> ChatCompletionChunk {
        self.chunk(Delta::default(), Some(reason))
    }

    fn usage(&self, usage: Usage) -> ChatCompletionChunk {
        ChatCompletionChunk {
            choices: Vec::new(),
            usage: Some(usage),
            ..self.chunk(Delta::default(), None)
        }
    }
}
