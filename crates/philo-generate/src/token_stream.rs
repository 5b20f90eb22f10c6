//! Incremental decoding of one sequence through the KV cache.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use philo_model::{KvCache, Phi3};

use crate::error::{GenerateError, Result};
use crate::sampling::{Sampler, SamplingParams};

/// One sequence being generated: prompt + tokens so far, the cache, the sampler.
pub struct TokenStream<'m> {
    model: &'m Phi3,
    cache: KvCache,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// How many of `tokens` the cache holds.
    cached: usize,
    sampler: Sampler,
}

impl<'m> TokenStream<'m> {
    /// Starts a sequence from `prompt`; nothing runs until [`TokenStream::next_token`].
    pub fn new(model: &'m Phi3, prompt: Vec<u32>, params: SamplingParams) -> Result<Self> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let context = model.config().max_position_embeddings;
        if prompt.len() >= context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt.len(),
                context,
            });
        }
        Ok(TokenStream {
            model,
            cache: model.new_cache(),
            prompt_len: prompt.len(),
            tokens: prompt,
            cached: 0,
            sampler: Sampler::new(params)?,
        })
    }

    /// Runs the model on the tokens not yet cached, samples one token and appends it.
    ///
    /// LongRoPE: the first time the sequence outgrows original_max_position_embeddings the cached
    /// keys (rotated with the short factors) no longer match, so — as transformers does in
    /// `Phi3ForCausalLM.prepare_inputs_for_generation` — the cache is dropped and the whole
    /// sequence is recomputed with the long factors. That one step costs a full prefill.
    pub fn next_token(&mut self) -> Result<u32> {
        let rotary = self.model.rotary();
        let last = self.tokens.len() - 1;
        if self.cached > 0
            && rotary.uses_long_factors(last)
            && !rotary.uses_long_factors(self.cached - 1)
        {
            self.cache.clear();
            self.cached = 0;
        }
        let new = &self.tokens[self.cached..];
        let input = Tensor::new(new, self.model.device())?.unsqueeze(0)?;
        let logits = self
            .model
            .forward_last(&input, None, Some(&mut self.cache))?;
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        self.cached = self.tokens.len();
        let token = self.sampler.sample(&logits, &self.tokens);
        self.tokens.push(token);
        Ok(token)
    }

    /// Prompt and generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Generated tokens only.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Whether another token fits in the model's context.
    pub fn has_room(&self) -> bool {
        self.tokens.len() < self.model.config().max_position_embeddings
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is not part of the output).
    Eos,
    /// `max_new_tokens` reached.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
}

/// What a generation produced and how fast.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Time to the first new token (prefill + first sample).
    pub prefill: Duration,
    /// Time of the remaining tokens.
    pub decode: Duration,
}

impl Generation {
    /// New tokens per second after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 {
            0.0
        } else {
            n as f64 / self.decode.as_secs_f64()
        }
    }
}

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation stops on any of these (Phi-3: 32000, 32001, 32007).
    pub stop_tokens: Vec<u32>,
    pub sampling: SamplingParams,
}

/// Generates from `prompt`, calling `on_token` with each new token (stop tokens excluded);
/// `on_token` returning `Break` cancels.
pub fn generate(
    model: &Phi3,
    prompt: Vec<u32>,
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    let prompt_tokens = prompt.len();
    let mut stream = TokenStream::new(model, prompt, options.sampling.clone())?;
    let start = Instant::now();
    let mut first_token_at = None;
    let mut tokens = Vec::new();
    let stop = loop {
        if tokens.len() >= options.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if !stream.has_room() {
            break StopReason::ContextFull;
        }
        let token = stream.next_token()?;
        first_token_at.get_or_insert_with(Instant::now);
        if options.stop_tokens.contains(&token) {
            break StopReason::Eos;
        }
        tokens.push(token);
        if on_token(token).is_break() {
            break StopReason::Cancelled;
        }
    };
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    Ok(Generation {
        tokens,
        stop,
        prompt_tokens,
        prefill: first - start,
        decode: end - first,
    })
}
