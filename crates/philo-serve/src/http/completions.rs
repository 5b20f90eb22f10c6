//! POST /v1/completions: a continuation of a raw prompt (no chat template).

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::choices::Choices;
use super::error::ApiError;
use super::generation::Job;
use super::ids::{response_id, unix_now};
use super::json::ApiJson;
use super::openai::{
    ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt,
    Usage, MAX_COMPLETION_LOGPROBS,
};
use super::params::{max_tokens, Settings};
use super::sse::{self, ChunkFormat};
use super::state::ServerState;
use crate::request::FinishReason;

const ENDPOINT: &str = "/v1/completions";

/// POST /v1/completions.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The continuation; with `stream: true`, server-sent events each carrying a Completion, then `data: [DONE]`",
            content(
                (Completion = "application/json"),
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
pub async fn create_completion(
    State(state): State<ServerState>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let CompletionRequest { input, params } = request;
    let mut settings = Settings::from_params(&params)?;
    if let Some(n) = input.logprobs.filter(|&n| n > MAX_COMPLETION_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("`logprobs` is {n} but must be in [0, {MAX_COMPLETION_LOGPROBS}]"),
        ));
    }
    settings.sampling.logprobs = input.logprobs.map(|n| n as usize);
    let with_logprobs = input.logprobs.is_some();
    if input.echo == Some(true) {
        return Err(ApiError::invalid_param(
            "echo",
            "`echo: true` is not supported; prepend the prompt to the returned text yourself",
        ));
    }
    let text = match input.prompt {
        Prompt::Text(text) => text,
        Prompt::Batch(mut texts) if texts.len() == 1 => texts.remove(0),
        Prompt::Batch(texts) => {
            return Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "`prompt` is a list of {} strings but philo takes one prompt per request; send one request per prompt",
                    texts.len()
                ),
            ))
        }
    };
    let model = state.resolve_model(params.model.as_deref())?;
    // Tokenized like `philo generate` tokenizes its prompt.
    let prompt = state
        .tokenizer()
        .encode(&text, true)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "`prompt` is empty; give the text the model should continue",
        ));
    }
    let max_tokens = max_tokens(
        prompt.len(),
        params.max_tokens,
        "max_tokens",
        "prompt",
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
    let chunks = CompletionChunks {
        id: response_id("cmpl-"),
        created: unix_now(),
        model,
        with_logprobs,
        streamed_chars: (0..n).map(|_| Default::default()).collect(),
    };
    if stream {
        return Ok(sse::respond(choices, chunks, include_usage));
    }
    let answers = choices.collect().await?;
    let mut completion = chunks.completion(Vec::new());
    completion.choices = answers
        .into_iter()
        .enumerate()
        .map(|(index, (text, logprobs, reason))| {
            chunks.choice(index, text, logprobs, 0, Some(reason))
        })
        .collect();
    completion.usage = Some(choices.usage());
    Ok(Json(completion).into_response())
}

/// The answer, or the chunks of one streamed answer, of a completion request.
struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    /// Whether the request asked for log-probabilities.
    with_logprobs: bool,
    /// Characters of text already streamed, per choice: where its next chunk's text starts.
    streamed_chars: Vec<std::sync::atomic::AtomicUsize>,
}

impl CompletionChunks {
    /// A completion (or chunk) holding `choices`.
    fn completion(&self, choices: Vec<CompletionChoice>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
        }
    }

    /// Choice `index` of `text`, which starts `offset` characters into the choice.
    fn choice(
        &self,
        index: usize,
        text: String,
        logprobs: Vec<ChatTokenLogprob>,
        offset: usize,
        finish_reason: Option<FinishReason>,
    ) -> CompletionChoice {
        let logprobs = self
            .with_logprobs
            .then(|| legacy_logprobs(logprobs, offset));
        CompletionChoice {
            index: index as u32,
            text,
            logprobs,
            finish_reason: finish_reason.map(Into::into),
        }
    }
}

impl ChunkFormat for CompletionChunks {
    type Chunk = Completion;

    fn opening(&self, _index: usize) -> Option<Completion> {
        None
    }

    fn text(&self, index: usize, text: String, logprobs: Vec<ChatTokenLogprob>) -> Completion {
        let offset = self.streamed_chars[index]
            .fetch_add(text.chars().count(), std::sync::atomic::Ordering::Relaxed);
        self.completion(vec![self.choice(index, text, logprobs, offset, None)])
    }

    fn finish(&self, index: usize, reason: FinishReason) -> Completion {
        self.completion(vec![self.choice(
            index,
            String::new(),
            Vec::new(),
            0,
            Some(reason),
        )])
    }

    fn usage(&self, usage: Usage) -> Completion {
        Completion {
            usage: Some(usage),
            ..self.completion(Vec::new())
        }
    }
}

/// The tokens' log-probabilities in the legacy completions format; the first token's text
/// starts `offset` characters into the choice's text.
fn legacy_logprobs(tokens: Vec<ChatTokenLogprob>, offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for token in tokens {
        out.text_offset.push(at);
        at += token.token.chars().count();
        out.token_logprobs.push(token.logprob);
        // Most likely first: of two alternatives with the same text, the likelier stays.
        let mut top = std::collections::BTreeMap::new();
        for alternative in token.top_logprobs {
            top.entry(alternative.token).or_insert(alternative.logprob);
        }
        out.top_logprobs.push(top);
        out.tokens.push(token.token);
    }
    out
}
