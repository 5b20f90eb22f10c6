//! Incremental decoding of one sequence through the KV cache.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use philo_model::{DecodeGraph, KvCache, Phi3};

use crate::error::{GenerateError, Result};
use crate::sampling::{Sampler, SamplingParams, TokenCounts};
use crate::speculative::{greedy_kept, Proposer, Speculation};

/// One sequence being generated: prompt + tokens so far, the cache, the sampler.
pub struct TokenStream<'m> {
    model: &'m Phi3,
    cache: KvCache,
    /// Prompt and generated tokens, including any a speculative step produced ahead of
    /// [`TokenStream::next_token`] handing them out.
    tokens: Vec<u32>,
    /// How many of `tokens` have been handed out (the prompt counts as handed out).
    handed: usize,
    prompt_len: usize,
    /// How many of `tokens` the cache holds.
    cached: usize,
    sampler: Sampler,
    /// The seed of the draws the GPU makes for this sequence (the request's, or a random one).
    gpu_seed: u64,
    /// How often each of the first `counted` tokens occurs: the penalties on the GPU (`tokens`
    /// only grows, so the counts catch up on the new ones when the GPU needs them).
    counts: TokenCounts,
    counted: usize,
    /// The GPU's graph-captured decode step, when [`TokenStream::use_decode_graph`] found one
    /// for the model; it holds its own KV cache and `cache` stays empty.
    graph: Option<DecodeGraph>,
    /// Speculation, when [`TokenStream::with_speculation`] or [`TokenStream::with_draft`]
    /// asked for it.
    speculation: Option<(Proposer<'m>, Speculation)>,
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
            handed: prompt.len(),
            tokens: prompt,
            cached: 0,
            gpu_seed: params.seed.unwrap_or_else(rand::random),
            counts: TokenCounts::default(),
            counted: 0,
            sampler: Sampler::new(params)?,
            graph: None,
            speculation: None,
        })
    }

    /// Speculates by prompt lookup (see [`crate::speculative`]), proposing at most
    /// `max_tokens` a step; the output is unchanged. On the decode graph the proposals are
    /// verified by its multi-row step ([`DecodeGraph::verify`]). Call before the first token.
    pub fn with_speculation(mut self, max_tokens: usize) -> Self {
        self.speculation = Some((Proposer::Ngram, Speculation::new(max_tokens)));
        self
    }

    /// Speculates with `draft` (a model with the same vocabulary, decoding greedily ahead),
    /// proposing at most `max_tokens` a step; the output is unchanged. Call before the first
    /// token.
    pub fn with_draft(mut self, draft: &'m Phi3, max_tokens: usize) -> Result<Self> {
        let (ours, theirs) = (self.model.config().vocab_size, draft.config().vocab_size);
        if ours != theirs {
            return Err(GenerateError::DraftVocabulary {
                model: ours,
                draft: theirs,
            });
        }
        self.speculation = Some((Proposer::draft(draft), Speculation::new(max_tokens)));
        Ok(self)
    }

    /// Tokens proposed and accepted by speculation so far.
    pub fn speculation_counts(&self) -> (usize, usize) {
        self.speculation
            .as_ref()
            .map_or((0, 0), |(_, s)| s.counts())
    }

    /// Speculation's verify steps so far.
    pub fn verify_steps(&self) -> usize {
        self.speculation
            .as_ref()
            .map_or(0, |(_, s)| s.verify_steps())
    }

    /// Decodes through a [`DecodeGraph`] where the model allows one (CUDA, bf16/f16, weights
    /// philo's kernels read; an attached adapter runs unmerged), with room for `max_new_tokens` more
    /// tokens; elsewhere, or past that room, the stream runs as before. Call before the first
    /// token.
    pub fn use_decode_graph(self, max_new_tokens: usize) -> Result<Self> {
        self.decode_graph(max_new_tokens, false)
    }

    /// [`TokenStream::use_decode_graph`] with the graph's decoder layers in one persistent
    /// kernel where it takes the model (`DecodeGraph::with_persistent_layers`; off by default
    /// until measured), else the launch-per-kernel graph.
    pub fn use_persistent_decode_graph(self, max_new_tokens: usize) -> Result<Self> {
        self.decode_graph(max_new_tokens, true)
    }

    fn decode_graph(mut self, max_new_tokens: usize, persistent: bool) -> Result<Self> {
        let context = self.model.config().max_position_embeddings;
        let capacity = (self.tokens.len() + max_new_tokens).min(context);
        self.graph = match persistent {
            true => DecodeGraph::with_persistent_layers(self.model, 1, capacity, true)?,
            false => DecodeGraph::new(self.model, 1, capacity, true)?,
        };
        if let (Some(_), Some((proposer, _))) = (&self.graph, self.speculation.as_mut()) {
            proposer.use_decode_graph(capacity)?;
        }
        Ok(self)
    }

    /// Runs the model on the tokens not yet cached, samples one token and appends it.
    ///
    /// LongRoPE: the first time the sequence outgrows original_max_position_embeddings the cached
    /// keys (rotated with the short factors) no longer match, so — as transformers does in
    /// `Phi3ForCausalLM.prepare_inputs_for_generation` — the cache is dropped and the whole
    /// sequence is recomputed with the long factors. That one step costs a full prefill.
    /// With speculation a step may produce several tokens: they are handed out one per call.
    pub fn next_token(&mut self) -> Result<u32> {
        if self.handed == self.tokens.len() {
            self.advance()?;
        }
        let token = self.tokens[self.handed];
        self.handed += 1;
        Ok(token)
    }

    /// Appends at least one token: a graph step, a verified speculation, or a plain step.
    fn advance(&mut self) -> Result<()> {
        if self
            .graph
            .as_ref()
            .is_some_and(|g| self.tokens.len() > g.capacity())
        {
            // Past the graph's room: the general path recomputes the sequence once.
            self.graph = None;
            self.cached = 0;
        }
        if let Some(proposal) = self.proposal()? {
            return match self.graph.is_some() {
                true => self.verify_on_graph(proposal),
                false => self.verify(proposal),
            };
        }
        if self.graph.is_some() {
            return self.next_token_on_graph();
        }
        let rotary = self.model.rotary();
        let last = self.tokens.len() - 1;
        if self.cached > 0 && rotary.switches_between(self.cached - 1, last) {
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
        Ok(())
    }

    /// Speculation's proposal for the next step, if it has one: only once the cache holds all
    /// but the last token, within the context (the graph's room, and as many tokens as its
    /// verify step takes), and never across LongRoPE's switch (that step recomputes the
    /// sequence instead).
    fn proposal(&mut self) -> Result<Option<Vec<u32>>> {
        let Some((proposer, speculation)) = self.speculation.as_mut() else {
            return Ok(None);
        };
        let last = self.tokens.len() - 1;
        if self.cached != last || last == 0 {
            return Ok(None);
        }
        let (context, most) = match &self.graph {
            Some(graph) => (graph.capacity(), graph.verify_rows() - 1),
            None => (self.model.config().max_position_embeddings, usize::MAX),
        };
        let room = context.saturating_sub(self.tokens.len() + 1).min(most);
        let mut proposal = match speculation.next_length(room) {
            0 => Vec::new(),
            k => proposer.propose(&self.tokens, k)?,
        };
        let rotary = self.model.rotary();
        // The cache holds positions up to last - 1: the verify step must not reach the long
        // factors from there (the plain step recomputes the sequence instead).
        let same_side = (1..=proposal.len())
            .take_while(|&i| !rotary.switches_between(last - 1, last + i))
            .count();
        proposal.truncate(same_side);
        Ok((!proposal.is_empty()).then_some(proposal))
    }

    /// One forward over the last token and `proposal`: keeps the proposed tokens the sampler
    /// accepts in order, then one token of the model's own (the correction of the first
    /// rejected one, or the next after all), and drops the rejected tokens' cache entries.
    fn verify(&mut self, proposal: Vec<u32>) -> Result<()> {
        let last = self.tokens.len() - 1;
        let mut ids = vec![self.tokens[last]];
        ids.extend(&proposal);
        let input = Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&input, None, Some(&mut self.cache))?;
        let rows = logits.squeeze(0)?.to_vec2::<f32>()?;
        let kept = self.accept(&proposal, rows.iter().map(Vec::as_slice));
        self.cache.truncate(last + 1 + kept)?;
        self.cached = last + 1 + kept;
        Ok(())
    }

    /// [`TokenStream::verify`] on the decode graph: one step of 1 + k rows of the sequence.
    /// Greedy settings compare the proposals with the argmax the GPU took per row (only the
    /// ids come back); anything else reads the rows' logits for the sampler's rule.
    fn verify_on_graph(&mut self, proposal: Vec<u32>) -> Result<()> {
        let graph = self.graph.as_mut().expect("checked by the caller");
        let last = self.tokens.len() - 1;
        let mut ids = vec![self.tokens[last]];
        ids.extend(&proposal);
        graph.verify(0, &ids)?;
        let params = self.sampler.params();
        let greedy = params.is_plain_greedy() && params.logprobs.is_none();
        let kept = if greedy {
            let best = graph.tokens()?;
            let emitted = greedy_kept(&proposal, &best);
            self.tokens.extend(emitted);
            self.record(proposal.len(), emitted.len() - 1)
        } else {
            let logits = graph.logits()?;
            let vocab = self.model.config().vocab_size;
            self.accept(&proposal, logits.chunks(vocab))
        };
        let graph = self.graph.as_mut().expect("checked above");
        graph.rewind(0, last + 1 + kept)?;
        self.cached = last + 1 + kept;
        Ok(())
    }

    /// Appends the proposed tokens the sampler accepts in order, given the model's logits after
    /// the last token and after each proposal (`rows`), then one token of the model's own;
    /// records the outcome and returns how many proposals were kept.
    fn accept<'r>(&mut self, proposal: &[u32], rows: impl Iterator<Item = &'r [f32]>) -> usize {
        let kept = self
            .sampler
            .verify_proposal(proposal, rows, &mut self.tokens);
        self.record(proposal.len(), kept)
    }

    /// Tells speculation that `kept` of `proposed` tokens were accepted; returns `kept`.
    fn record(&mut self, proposed: usize, kept: usize) -> usize {
        if let Some((_, s)) = self.speculation.as_mut() {
            s.record(proposed, kept);
        }
        kept
    }

    /// [`TokenStream::next_token`] on the decode graph: a prefill of the whole sequence at the
    /// start and at LongRoPE's switch, one graph step otherwise; a plain greedy choice is made
    /// on the GPU, anything else by the sampler on the step's logits.
    fn next_token_on_graph(&mut self) -> Result<()> {
        for &token in &self.tokens[self.counted..] {
            self.counts.push(token);
        }
        self.counted = self.tokens.len();
        let graph = self.graph.as_mut().expect("checked by the caller");
        let rotary = self.model.rotary();
        let last = self.tokens.len() - 1;
        let switches = self.cached > 0 && rotary.switches_between(self.cached - 1, last);
        // The GPU chooses where it can (the token alone comes back): greedy, or sampled (logit
        // bias and penalties applied there) when the graph samples and the settings need no
        // host-only step.
        let on_gpu = self
            .sampler
            .params()
            .gpu_sampling(
                self.gpu_seed,
                self.tokens.len() as u32,
                &self.counts,
                self.model.config().vocab_size,
            )
            .filter(|g| graph.samples() || g.is_argmax());
        let token = if self.cached == 0 || switches {
            let long = rotary.uses_long_factors(last);
            let logits = graph.prefill(self.model, 0, &self.tokens, long)?;
            self.sampler.sample(&logits, &self.tokens)
        } else if let Some(gpu) = on_gpu {
            graph.step_sampled(&[self.tokens[last]], &[gpu.row], &[&gpu.adjustments])?;
            graph.tokens()?[0]
        } else {
            graph.step(&[self.tokens[last]])?;
            self.sampler.sample(&graph.logits()?, &self.tokens)
        };
        self.cached = self.tokens.len();
        self.tokens.push(token);
        Ok(())
    }

    /// Prompt and generated tokens (those handed out).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens[..self.handed]
    }

    /// Generated tokens only (those handed out).
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..self.handed]
    }

    /// Whether another token fits in the model's context.
    pub fn has_room(&self) -> bool {
        self.handed < self.model.config().max_position_embeddings
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
    /// Speculation: tokens proposed and accepted (0, 0 without it).
    pub speculated: (usize, usize),
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
    /// Speculate, proposing at most this many tokens a step (None: off): by prompt lookup,
    /// or with `draft` when given.
    pub speculative_tokens: Option<usize>,
    /// The draft model of speculation (None: prompt lookup).
    pub draft: Option<std::sync::Arc<Phi3>>,
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
    if let Some(k) = options.speculative_tokens {
        stream = match options.draft.as_deref() {
            Some(draft) => stream.with_draft(draft, k)?,
            None => stream.with_speculation(k),
        };
    }
    let mut stream = stream.use_decode_graph(options.max_new_tokens)?;
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
        speculated: stream.speculation_counts(),
    })
}
