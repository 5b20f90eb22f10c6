//! What the HTTP layer hands the engine and what it gets back: one generation request, the
//! events of its stream, and the [`Backend`] the routes talk to.

use std::path::PathBuf;

use philo_generate::{SamplingParams, TokenLogprobs};

use crate::constraint::JsonConstraint;
use tokio::sync::mpsc::UnboundedReceiver;

/// One sequence to generate, already tokenized and validated by the HTTP layer.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The served model name: the base model's id or an adapter's name (see [`ModelInfo`]).
    pub model: String,
    /// Prompt token ids (chat template already applied for chat requests); never empty.
    pub prompt: Vec<u32>,
    /// Upper bound on generated tokens; prompt.len() + max_tokens fits the context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends (reason [`FinishReason::Stop`]) when one of these ids is sampled; the id
    /// itself is reported as a token too, so the HTTP layer decides whether to print it.
    pub stop_token_ids: Vec<u32>,
    /// Constrained output (`response_format`): every sampled token keeps the text a prefix of
    /// a document the constraint accepts.
    pub constraint: Option<JsonConstraint>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled.
    Stop,
    /// max_tokens (or the context) was reached.
    Length,
}

/// What the engine sends on a request's stream, in order: tokens, then exactly one
/// `Finished` or `Failed`. Dropping the receiver cancels the sequence and frees its KV blocks.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The number of prompt tokens served from shared prefix blocks is known (sent once, before
    /// the first token).
    Started {
        prompt_tokens: usize,
        cached_prompt_tokens: usize,
    },
    Token(SampledToken),
    Finished(FinishReason),
    Failed(String),
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Its log-probability and the most likely alternatives, when the request's
    /// `sampling.logprobs` asked for them.
    pub logprobs: Option<TokenLogprobs>,
}

impl From<u32> for SampledToken {
    fn from(id: u32) -> Self {
        SampledToken { id, logprobs: None }
    }
}

/// A request the engine refuses before queueing it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "the server is at capacity ({queued} requests waiting); retry after {retry_after_secs} s"
    )]
    QueueFull {
        queued: usize,
        retry_after_secs: u64,
    },
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context of {context} tokens")]
    ContextOverflow {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// One servable model: the base or an adapter on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    /// The base model's id for an adapter, None for the base itself.
    pub parent: Option<String>,
    /// Unix seconds when it was loaded.
    pub created: u64,
}

/// A snapshot of the engine's gauges and counters for /metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub queue_depth: usize,
    pub running_sequences: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_free: usize,
    pub kv_block_size: usize,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    pub cached_prompt_tokens_total: u64,
    pub preemptions_total: u64,
    pub steps_total: u64,
    /// Steps that ran the general forward (prompts too long to ride the decode step, or no
    /// decode step), not the decode kernels.
    pub general_steps_total: u64,
    /// Speculative decoding: tokens proposed, and those of them accepted.
    pub spec_proposed_tokens_total: u64,
    pub spec_accepted_tokens_total: u64,
}

/// The engine as the HTTP layer sees it. Implemented by the scheduler loop's handle.
pub trait Backend: Send + Sync + 'static {
    /// Queues a request; the receiver yields its events.
    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError>;
    /// The base model and every loaded adapter.
    fn models(&self) -> Vec<ModelInfo>;
    /// The context length (max_position_embeddings) requests must fit in.
    fn context_length(&self) -> usize;
    /// The number of token ids the model scores (`logit_bias` keys must be below it).
    fn vocab_size(&self) -> usize;
    /// Loads a PEFT adapter folder under `name` without a restart; the error is user-facing.
    fn load_adapter(
        &self,
        name: String,
        dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ModelInfo, String>> + Send>>;
    /// Unloads the adapter served as `name`: requests naming it are refused from now on, and
    /// its weights go once the requests already running with it have finished.
    fn unload_adapter(&self, name: &str) -> Result<(), UnloadError>;
    fn stats(&self) -> EngineStats;
    /// Stops admitting, lets running sequences finish (or end them after the grace period).
    fn shutdown(&self);
}

/// Why an adapter could not be unloaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnloadError {
    #[error("no adapter is loaded as `{0}`")]
    NotFound(String),
    #[error("`{0}` is the base model, which cannot be unloaded")]
    BaseModel(String),
}
