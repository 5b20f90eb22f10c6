//! Speculative decoding: a proposer guesses the next few tokens, and one forward of the model
//! over them keeps the longest prefix it agrees with (see [`crate::Sampler::accept_or_resample`]),
//! plus one token of its own. Outputs are those of plain decoding; only the number of forwards
//! changes. How many tokens to propose adapts to how many were kept.
//!
//! Proposers: prompt lookup (the tokens that followed the latest earlier occurrence of the
//! sequence's last few tokens) and a draft model (a smaller model with the same tokenizer,
//! decoding greedily ahead). Both make each proposal a deterministic function of the context,
//! which is what keeps `accept_or_resample`'s rule exact with sampling too.

use candle_core::Tensor;
use philo_model::{DecodeGraph, KvCache, Phi3};

use crate::error::Result;

/// The longest n-gram looked up, then shorter ones down to a single token.
const MAX_NGRAM: usize = 3;
/// Verify steps that keep nothing before drafting pauses.
const MISSES_BEFORE_PAUSE: usize = 4;
/// Plain steps the first pause lasts; each further pause without an accepted token in between
/// lasts twice as long, up to [`MAX_PAUSE_STEPS`] (on the H200 a draft that never agreed cost
/// 11 % with fixed pauses of 16).
const PAUSE_STEPS: usize = 16;
/// The longest pause.
const MAX_PAUSE_STEPS: usize = 256;

/// Up to `k` tokens that followed an earlier occurrence of the last n tokens of `tokens` (n from
/// 3 down to 1; the latest occurrence with k tokens after it, else the earliest), or none.
pub fn prompt_lookup(tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (1..=MAX_NGRAM).rev() {
        if len <= n || k == 0 {
            continue;
        }
        let pattern = &tokens[len - n..];
        // Occurrences that end before the last token, latest first: the latest with k tokens
        // after it, else the earliest (the longest continuation).
        let mut starts = (0..len - n).rev().filter(|&i| &tokens[i..i + n] == pattern);
        let mut earliest = None;
        for start in starts.by_ref() {
            if len - (start + n) >= k {
                return tokens[start + n..start + n + k].to_vec();
            }
            earliest = Some(start);
        }
        if let Some(start) = earliest {
            return tokens[start + n..].to_vec();
        }
    }
    Vec::new()
}

/// Where proposals come from.
pub enum Proposer<'m> {
    /// Prompt lookup ([`prompt_lookup`]).
    Ngram,
    /// A draft model decoding greedily ahead (its state boxed: it holds its own KV cache and
    /// graph).
    Draft {
        model: &'m Phi3,
        state: Box<DraftModel>,
    },
}

impl<'m> Proposer<'m> {
    /// Proposals from `model` decoding greedily ahead.
    pub fn draft(model: &'m Phi3) -> Self {
        Proposer::Draft {
            model,
            state: Box::new(DraftModel::new(model)),
        }
    }

    /// Drafts on a decode graph of sequences up to `capacity` tokens, where a draft model has
    /// one (see [`DraftModel::use_decode_graph`]); prompt lookup needs none.
    pub fn use_decode_graph(&mut self, capacity: usize) -> Result<()> {
        match self {
            Proposer::Ngram => Ok(()),
            Proposer::Draft { model, state } => state.use_decode_graph(model, capacity),
        }
    }

    /// Up to `k` tokens guessed to follow `tokens`.
    pub fn propose(&mut self, tokens: &[u32], k: usize) -> Result<Vec<u32>> {
        match self {
            Proposer::Ngram => Ok(prompt_lookup(tokens, k)),
            Proposer::Draft { model, state } => state.propose(model, tokens, k),
        }
    }
}

/// The state of a draft model following one sequence: its own KV cache, kept in step with the
/// sequence (after a verify step it drops what it had cached past the tokens the model kept).
/// The model itself is passed to each call, so one model can serve many states.
pub struct DraftModel {
    cache: KvCache,
    /// The draft's decode graph, once [`DraftModel::use_decode_graph`] found one (`cache` then
    /// stays empty).
    graph: Option<DecodeGraph>,
    /// The tokens whose K/V the cache (or the graph) holds.
    cached: Vec<u32>,
}

impl DraftModel {
    pub fn new(model: &Phi3) -> Self {
        DraftModel {
            cache: model.new_cache(),
            graph: None,
            cached: Vec::new(),
        }
    }

    /// Drafts on a [`DecodeGraph`] of `model` with room for sequences of `capacity` tokens,
    /// where the model has one (else it stays on the general path).
    pub fn use_decode_graph(&mut self, model: &Phi3, capacity: usize) -> Result<()> {
        self.graph = DecodeGraph::new(model, 1, capacity, true)?;
        self.cache.clear();
        self.cached.clear();
        Ok(())
    }

    /// `model`'s `k` greedy tokens after `tokens` (fewer where its context ends). Whatever
    /// this state holds of a prefix of `tokens` is reused; the rest is computed.
    pub fn propose(&mut self, model: &Phi3, tokens: &[u32], k: usize) -> Result<Vec<u32>> {
        let context = match &self.graph {
            Some(graph) => graph.capacity(),
            None => model.config().max_position_embeddings,
        };
        let k = k.min(context.saturating_sub(tokens.len()));
        if k == 0 || tokens.is_empty() {
            return Ok(Vec::new());
        }
        // LongRoPE rotates every position with the factors of the sequence's length: the
        // cache is recomputed when the length crosses the switch, and one proposal never
        // crosses it (the draft feeds its guesses 1 .. k-1 at the positions after the sequence).
        let rotary = model.rotary();
        let last = tokens.len() - 1;
        let k = 1
            + (1..k)
                .take_while(|&i| !rotary.switches_between(last, last + i))
                .count();
        // Keep the cached prefix the sequence still starts with, but recompute at least its
        // last token (its logits are not kept).
        let mut keep = self
            .cached
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(last);
        if keep > 0 && rotary.switches_between(keep - 1, last) {
            keep = 0;
        }
        if self.graph.is_some() {
            return self.propose_on_graph(model, tokens, k, keep);
        }
        if keep == 0 {
            self.cache.clear();
        } else {
            self.cache.truncate(keep)?;
        }
        self.cached.truncate(keep);
        let mut input = tokens[keep..].to_vec();
        let mut proposal = Vec::with_capacity(k);
        while proposal.len() < k {
            let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
            let logits = model
                .forward_last(&ids, None, Some(&mut self.cache))?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            self.cached.extend(&input);
            let token = argmax(&logits);
            proposal.push(token);
            input = vec![token];
        }
        Ok(proposal)
    }
}

impl DraftModel {
    /// [`DraftModel::propose`] on the draft's decode graph, keeping the first `keep` cached
    /// tokens: the tokens after them go in as one verify step where they fit (one or two after
    /// a verify step of the model), else the sequence is prefilled again; then one graph step
    /// per further token, the GPU's argmax alone coming back.
    fn propose_on_graph(
        &mut self,
        model: &Phi3,
        tokens: &[u32],
        k: usize,
        keep: usize,
    ) -> Result<Vec<u32>> {
        let graph = self.graph.as_mut().expect("checked by the caller");
        let last = tokens.len() - 1;
        let first = if keep > 0 && tokens.len() - keep <= graph.verify_rows() {
            graph.rewind(0, keep)?;
            graph.verify(0, &tokens[keep..])?;
            *graph.tokens()?.last().expect("one row per token fed")
        } else {
            let long = model.rotary().uses_long_factors(last);
            argmax(&graph.prefill(model, 0, tokens, long)?)
        };
        self.cached = tokens.to_vec();
        let mut proposal = vec![first];
        while proposal.len() < k {
            let token = proposal[proposal.len() - 1];
            graph.step(&[token])?;
            self.cached.push(token);
            proposal.push(graph.tokens()?[0]);
        }
        Ok(proposal)
    }
}

/// Greedy verification: the proposals that match the model's argmax after the token before
/// each (`argmax`, one more than proposals), then the model's own next token. Returns those
/// tokens; all but the last are kept proposals.
pub fn greedy_kept<'a>(proposal: &[u32], argmax: &'a [u32]) -> &'a [u32] {
    let kept = proposal
        .iter()
        .zip(argmax)
        .take_while(|(p, a)| p == a)
        .count();
    &argmax[..=kept]
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The adaptive state of one sequence's speculation: how many tokens to propose next, and
/// when to pause.
pub struct Speculation {
    max_tokens: usize,
    /// Tokens proposed next time.
    tokens: usize,
    misses: usize,
    paused_for: usize,
    /// How long the next pause lasts.
    next_pause: usize,
    proposed: usize,
    kept: usize,
    /// Verify steps run.
    verified: usize,
}

impl Speculation {
    /// Speculation proposing at most `max_tokens` a step.
    pub fn new(max_tokens: usize) -> Self {
        Speculation {
            max_tokens: max_tokens.max(1),
            tokens: max_tokens.max(1),
            misses: 0,
            paused_for: 0,
            next_pause: PAUSE_STEPS,
            proposed: 0,
            kept: 0,
            verified: 0,
        }
    }

    /// How many tokens to propose this step, at most `room`; 0 while paused (each call then
    /// counts one plain step).
    pub fn next_length(&mut self, room: usize) -> usize {
        if self.paused_for > 0 {
            self.paused_for -= 1;
            return 0;
        }
        self.tokens.min(room)
    }

    /// Records that `kept` of `proposed` tokens were accepted: all kept → propose one more next
    /// time (up to the maximum); none → halve; several verify steps in a row keeping nothing
    /// pause drafting, since each costs more than a plain step, for twice as long each time
    /// until a token is accepted again.
    pub fn record(&mut self, proposed: usize, kept: usize) {
        self.proposed += proposed;
        self.kept += kept;
        self.verified += 1;
        if kept == proposed {
            self.tokens = (self.tokens + 1).min(self.max_tokens);
        } else if kept == 0 {
            self.tokens = (self.tokens / 2).max(1);
        }
        if kept == 0 {
            self.misses += 1;
            if self.misses >= MISSES_BEFORE_PAUSE {
                self.misses = 0;
                self.paused_for = self.next_pause;
                self.next_pause = (self.next_pause * 2).min(MAX_PAUSE_STEPS);
            }
        } else {
            self.misses = 0;
            self.next_pause = PAUSE_STEPS;
        }
    }

    /// Proposed and accepted tokens so far.
    pub fn counts(&self) -> (usize, usize) {
        (self.proposed, self.kept)
    }

    /// Verify steps so far (each also adds one token of the model's own).
    pub fn verify_steps(&self) -> usize {
        self.verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_latest_longest_match() {
        // "1 2 3 4 | 9 2 3 5 | 2 3": the last two tokens (2 3) last occurred before 5.
        let tokens = [1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3];
        assert_eq!(prompt_lookup(&tokens, 2), vec![5, 7]);
        // A three-token match wins over a later two-token one.
        let tokens = [1, 2, 3, 8, 2, 3, 9, 1, 2, 3];
        assert_eq!(prompt_lookup(&tokens, 1), vec![8]);
        // The continuation stops at the end of the sequence.
        assert_eq!(prompt_lookup(&[4, 5, 4], 3), vec![5, 4]);
        assert!(prompt_lookup(&[1, 2, 3], 4).is_empty());
        assert!(prompt_lookup(&[7], 4).is_empty());
    }

    #[test]
    fn proposals_grow_shrink_and_pause() {
        let mut s = Speculation::new(4);
        let propose = |s: &mut Speculation, room| s.next_length(room);
        assert_eq!(propose(&mut s, 8), 4);
        s.record(4, 0);
        assert_eq!(propose(&mut s, 8), 2);
        s.record(2, 2);
        assert_eq!(propose(&mut s, 8), 3);
        assert_eq!(propose(&mut s, 1), 1, "room caps the proposal");
        for _ in 0..MISSES_BEFORE_PAUSE {
            s.record(1, 0);
        }
        for _ in 0..PAUSE_STEPS {
            assert_eq!(propose(&mut s, 8), 0);
        }
        assert_ne!(propose(&mut s, 8), 0);
        assert_eq!(s.counts(), (4 + 2 + MISSES_BEFORE_PAUSE, 2));
        // Missing again pauses twice as long; an accepted token resets the pause.
        for _ in 0..MISSES_BEFORE_PAUSE {
            s.record(1, 0);
        }
        for _ in 0..2 * PAUSE_STEPS {
            assert_eq!(propose(&mut s, 8), 0);
        }
        assert_ne!(propose(&mut s, 8), 0);
        s.record(1, 1);
        for _ in 0..MISSES_BEFORE_PAUSE {
            s.record(1, 0);
        }
        for _ in 0..PAUSE_STEPS {
            assert_eq!(propose(&mut s, 8), 0);
        }
        assert_ne!(propose(&mut s, 8), 0);
    }

    #[test]
    fn pauses_stop_growing_at_the_longest() {
        let mut s = Speculation::new(4);
        let mut pause = PAUSE_STEPS;
        for _ in 0..8 {
            for _ in 0..MISSES_BEFORE_PAUSE {
                s.record(1, 0);
            }
            let mut paused = 0;
            while s.next_length(8) == 0 {
                paused += 1;
            }
            assert_eq!(paused, pause);
            pause = (pause * 2).min(MAX_PAUSE_STEPS);
        }
    }
}
