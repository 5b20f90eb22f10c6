//! POST /v1/chat/completions: the next assistant message of a conversation.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use philo_text::TextError;

use super::choices::Choices;
use super::error::ApiError;
use super::generation::Job;
use super::ids::{response_id, unix_now};
use super::json::ApiJson;
use super::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatInput, ChatLogprobs, ChatMessage, ChatTokenLogprob, ChunkChoice, Delta, Usage,
    MAX_CHAT_TOP_LOGPROBS,
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
    let mut settings = Settings::from_params(&params)?;
    settings.sampling.logprobs = logprobs(&input)?;
    let with_logprobs = settings.sampling.logprobs.is_some();
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
    let (stream, include_usage, n) = (settings.stream, settings.include_usage, settings.n);
    let job = Job {
        model: model.clone(),
        prompt,
        max_tokens,
        settings,
        endpoint: ENDPOINT,
        arrived,
    };
    let mut choices = Choices::start(&state, job, n)?;
    let chunks = ChatChunks {
        id: response_id("chatcmpl-"),
        created: unix_now(),
        model,
        with_logprobs,
    };
    if stream {
        return Ok(sse::respond(choices, chunks, include_usage));
    }
    let answers = choices.collect().await?;
    Ok(Json(ChatCompletion {
        id: chunks.id,
        object: "chat.completion",
        created: chunks.created,
        model: chunks.model,
        choices: answers
            .into_iter()
            .enumerate()
            .map(|(index, (content, logprobs, reason))| ChatChoice {
                index: index as u32,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                },
                logprobs: with_logprobs.then_some(ChatLogprobs { content: logprobs }),
                finish_reason: reason.into(),
            })
            .collect(),
        usage: choices.usage(),
    })
    .into_response())
}

/// How many alternatives `logprobs`/`top_logprobs` ask for: `None` without `logprobs: true`.
fn logprobs(input: &ChatInput) -> Result<Option<usize>, ApiError> {
    let top = input.top_logprobs;
    if let Some(top) = top.filter(|&n| n > MAX_CHAT_TOP_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("`top_logprobs` is {top} but must be in [0, {MAX_CHAT_TOP_LOGPROBS}]"),
        ));
    }
    match (input.logprobs == Some(true), top) {
        (true, top) => Ok(Some(top.unwrap_or(0) as usize)),
        (false, Some(_)) => Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`; set it too, or leave `top_logprobs` out",
        )),
        (false, None) => Ok(None),
    }
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
    /// Whether the request asked for log-probabilities.
    with_logprobs: bool,
}

impl ChatChunks {
    fn chunk(
        &self,
        index: usize,
        delta: Delta,
        finish_reason: Option<FinishReason>,
    ) -> ChatCompletionChunk {
        self.chunk_with(index, delta, Vec::new(), finish_reason)
    }

    fn chunk_with(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Vec<ChatTokenLogprob>,
        finish_reason: Option<FinishReason>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: index as u32,
                delta,
                logprobs: self
                    .with_logprobs
                    .then_some(ChatLogprobs { content: logprobs }),
                finish_reason: finish_reason.map(Into::into),
            }],
            usage: None,
        }
    }
}

impl ChunkFormat for ChatChunks {
    type Chunk = ChatCompletionChunk;

    fn opening(&self, index: usize) -> Option<ChatCompletionChunk> {
        // OpenAI opens every choice's stream with the role and empty content.
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        Some(self.chunk(index, delta, None))
    }

    fn text(
        &self,
        index: usize,
        text: String,
        logprobs: Vec<ChatTokenLogprob>,
    ) -> ChatCompletionChunk {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk_with(index, delta, logprobs, None)
    }

    fn finish(&self, index: usize, reason: FinishReason) -> ChatCompletionChunk {
        self.chunk(index, Delta::default(), Some(reason))
    }

    fn usage(&self, usage: Usage) -> ChatCompletionChunk {
        ChatCompletionChunk {
            choices: Vec::new(),
            usage: Some(usage),
            ..self.chunk(0, Delta::default(), None)
        }
    }
}
