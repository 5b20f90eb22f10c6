//! One request running on the engine: its token events turned into text.
//!
//! A [`Generation`] owns the engine's event receiver, so dropping it (the client went away, the
//! handler future or the SSE body was dropped) cancels the sequence. It also lets go of the
//! receiver as soon as the answer is complete, e.g. when a stop string matched, so the engine
//! stops generating tokens nobody will read.

use std::collections::VecDeque;
use std::time::Instant;

use philo_generate::TokenLogprobs;
use philo_text::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::openai::{ChatTokenLogprob, PromptTokensDetails, TopLogprob, Usage};
use super::params::{ResponseFormat, Settings};
use super::state::ServerState;
use super::stop::{Scan, StopStrings};
use crate::request::{FinishReason, GenerationEvent, GenerationRequest, SampledToken};

/// The next thing a generation has to say.
#[derive(Debug, Clone)]
pub enum Step {
    /// More text of the answer, and the log-probabilities of the tokens received since the
    /// last step (when the request asked for them). The text is empty only when the step
    /// carries the last tokens' log-probabilities.
    Text(String, Vec<ChatTokenLogprob>),
    /// The answer is complete.
    Finished(FinishReason),
    /// The engine failed; the message is for the client.
    Failed(String),
}

/// What a route asks the engine to run.
#[derive(Clone)]
pub struct Job {
    pub model: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub settings: Settings,
    /// The route, for the request duration metric.
    pub endpoint: &'static str,
    /// When the HTTP request arrived, for the latency metrics.
    pub arrived: Instant,
}

/// A submitted request, read step by step.
pub struct Generation {
    state: ServerState,
    /// `None` once the answer is complete: dropping the receiver cancels the sequence.
    events: Option<UnboundedReceiver<GenerationEvent>>,
    decoder: StreamDecoder,
    stops: StopStrings,
    steps: VecDeque<Step>,
    prompt_tokens: usize,
    cached_prompt_tokens: usize,
    completion_tokens: usize,
    endpoint: &'static str,
    arrived: Instant,
    last_token_at: Option<Instant>,
    /// Log-probabilities of tokens not yet handed out with a step.
    logprobs: Vec<ChatTokenLogprob>,
    /// The token before the next one, if any: context for token texts.
    previous_id: Option<u32>,
}

impl Generation {
    /// Submits `job` to the engine.
    pub fn start(state: &ServerState, job: Job) -> Result<Self, ApiError> {
        let vocab = state.backend().vocab_size();
        if let Some(&(id, _)) = job
            .settings
            .sampling
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= vocab)
        {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!(
                    "`logit_bias` names token id {id}, but the model's vocabulary has {vocab} ids"
                ),
            ));
        }
        let constraint = match &job.settings.response_format {
            ResponseFormat::Text => None,
            ResponseFormat::Json(schema) => Some(
                state
                    .grammars()?
                    .json(schema.as_ref())
                    .map_err(|e| ApiError::invalid_param("response_format", e))?,
            ),
        };
        let prompt_tokens = job.prompt.len();
        let events = state.backend().submit(GenerationRequest {
            model: job.model,
            prompt: job.prompt,
            max_tokens: job.max_tokens,
            sampling: job.settings.sampling,
            stop_token_ids: state.stop_token_ids().to_vec(),
            constraint,
        })?;
        Ok(Generation {
            state: state.clone(),
            events: Some(events),
            decoder: StreamDecoder::new(state.tokenizer()),
            stops: StopStrings::new(job.settings.stop),
            steps: VecDeque::new(),
            prompt_tokens,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            endpoint: job.endpoint,
            arrived: job.arrived,
            last_token_at: None,
            logprobs: Vec::new(),
            // The text starts without context, as the decoder's does: a leading space of the
            // first token is not part of the answer.
            previous_id: None,
        })
    }

    /// The next step; `None` after [`Step::Finished`] or [`Step::Failed`].
    pub async fn next(&mut self) -> Option<Step> {
        loop {
            if let Some(step) = self.steps.pop_front() {
                return Some(step);
            }
            let event = self.events.as_mut()?.recv().await;
            match event {
                Some(GenerationEvent::Started {
                    cached_prompt_tokens,
                    ..
                }) => self.cached_prompt_tokens = cached_prompt_tokens,
                Some(GenerationEvent::Token(token)) => self.on_token(token),
                Some(GenerationEvent::Finished(reason)) => self.on_finished(reason),
                Some(GenerationEvent::Failed(message)) => self.fail(message),
                None => self.fail(
                    "the engine dropped the request without finishing it; see the server log"
                        .to_string(),
                ),
            }
        }
    }

    /// The token counts so far.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached_prompt_tokens,
            },
        }
    }

    fn on_token(&mut self, token: SampledToken) {
        let id = token.id;
        if let Some(logprobs) = token.logprobs {
            let entry = token_entry(self.state.tokenizer(), self.previous_id, id, &logprobs);
            self.logprobs.push(entry);
        }
        self.previous_id = Some(id);
        let now = Instant::now();
        let metrics = self.state.metrics();
        match self.last_token_at {
            None => metrics.observe_time_to_first_token((now - self.arrived).as_secs_f64()),
            Some(previous) => metrics.observe_inter_token_latency((now - previous).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        self.completion_tokens += 1;
        // The engine reports the stop token it sampled; it ends the answer but is not part of it.
        if self.state.stop_token_ids().contains(&id) {
            return;
        }
        match self.decoder.push(id) {
            Ok(Some(text)) => {
                self.scan(&text);
            }
            Ok(None) => {}
            Err(error) => self.fail(error.to_string()),
        }
    }

    fn on_finished(&mut self, reason: FinishReason) {
        match self.decoder.finish() {
            Ok(Some(text)) if self.scan(&text) => return,
            Ok(_) => {}
            Err(error) => return self.fail(error.to_string()),
        }
        let held = self.stops.finish();
        self.push_text(held);
        // Tokens whose text is not part of the answer (the stop token) still have theirs.
        self.push_text(String::new());
        self.end(Step::Finished(reason));
    }

    /// Checks new text for stop strings; returns whether one ended the answer.
    fn scan(&mut self, text: &str) -> bool {
        match self.stops.push(text) {
            Scan::Continue(safe) => {
                self.push_text(safe);
                false
            }
            Scan::Stopped(before) => {
                self.push_text(before);
                self.end(Step::Finished(FinishReason::Stop));
                true
            }
        }
    }

    /// Queues `text` with the log-probabilities gathered so far; nothing when both are empty.
    fn push_text(&mut self, text: String) {
        if !text.is_empty() || !self.logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.logprobs);
            self.steps.push_back(Step::Text(text, logprobs));
        }
    }

    fn fail(&mut self, message: String) {
        self.end(Step::Failed(message));
    }

    /// Queues the last step and drops the receiver, which cancels the sequence if the engine
    /// is still running it.
    fn end(&mut self, last: Step) {
        self.steps.push_back(last);
        self.events = None;
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.state
            .metrics()
            .observe_request_duration(self.endpoint, self.arrived.elapsed().as_secs_f64());
    }
}

/// The lowest log-probability reported: JSON has no `-inf` (vLLM uses the same floor).
const LOGPROB_FLOOR: f32 = -9999.0;

/// The wire entry of one generated token: its text and bytes, and those of the alternatives.
fn token_entry(
    tokenizer: &Tokenizer,
    previous: Option<u32>,
    id: u32,
    logprobs: &TokenLogprobs,
) -> ChatTokenLogprob {
    let context = TokenText::new(tokenizer, previous);
    let (token, bytes) = context.piece(id);
    ChatTokenLogprob {
        token,
        logprob: logprobs.logprob.max(LOGPROB_FLOOR),
        bytes,
        top_logprobs: logprobs
            .top
            .iter()
            .map(|&(alt, logprob)| {
                let (token, bytes) = context.piece(alt);
                TopLogprob {
                    token,
                    logprob: logprob.max(LOGPROB_FLOOR),
                    bytes,
                }
            })
            .collect(),
    }
}

/// Decodes single tokens as they read after the previous token.
///
/// SentencePiece decoders strip the leading space of what they decode, so a token decoded
/// alone loses it (`▁Paris` is `Paris`); decoded after the token before it, and taken as the
/// difference, it reads as it does in the text. Special tokens are kept (`<|end|>`), and a
/// byte-fallback token (`<0xE2>`) has its raw byte as `bytes`.
struct TokenText<'t> {
    tokenizer: &'t Tokenizer,
    /// The previous token and its text alone, when it is usable as context.
    context: Option<(u32, String)>,
}

impl<'t> TokenText<'t> {
    fn new(tokenizer: &'t Tokenizer, previous: Option<u32>) -> Self {
        // A byte-fallback token decodes to U+FFFD alone and may merge with the next byte.
        let context = previous
            .filter(|&id| byte_fallback(tokenizer, id).is_none())
            .and_then(|id| Some((id, tokenizer.decode(&[id], false).ok()?)));
        TokenText { tokenizer, context }
    }

    /// The text and bytes of token `id`.
    fn piece(&self, id: u32) -> (String, Vec<u8>) {
        if let Some(byte) = byte_fallback(self.tokenizer, id) {
            let text = String::from_utf8_lossy(&[byte]).into_owned();
            return (text, vec![byte]);
        }
        let alone = || self.tokenizer.decode(&[id], false).unwrap_or_default();
        let text = match &self.context {
            Some((previous, prefix)) => match self.tokenizer.decode(&[*previous, id], false) {
                Ok(both) if both.starts_with(prefix.as_str()) && both.len() > prefix.len() => {
                    both[prefix.len()..].to_string()
                }
                _ => alone(),
            },
            None => alone(),
        };
        let bytes = text.as_bytes().to_vec();
        (text, bytes)
    }
}

/// The byte of a byte-fallback token such as `<0xE2>`.
fn byte_fallback(tokenizer: &Tokenizer, id: u32) -> Option<u8> {
    let piece = tokenizer.id_to_token(id)?;
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
