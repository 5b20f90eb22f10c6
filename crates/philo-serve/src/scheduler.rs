//! The bookkeeping of continuous batching: which sequences run in the next forward step, which
//! of their tokens are fed, and where their K/V lives in the paged cache.
//!
//! The engine loop drives it:
//! 1. [`Scheduler::add`] queues new sequences (between any two steps).
//! 2. [`Scheduler::schedule`] returns the [`StepPlan`] of one forward step.
//! 3. The engine runs that step, writing the K/V of every fed token into its slot of the
//!    block table, then calls [`Scheduler::append_token`] for every planned sequence with
//!    `samples == true` (or [`Scheduler::finish`] to end it, for instance when a stop token
//!    was sampled, its length was reached or its step failed) before calling `schedule` again.
//!
//! Sequences are served in arrival order: running sequences first (a decoding sequence gets
//! one token, a sequence still in prefill gets a chunk of its prompt), then waiting ones are
//! admitted while the batch size, the step's token budget and the free blocks allow. When a
//! running sequence needs a block and none is free, the latest-arriving other running
//! sequence that has not been planned in this step is preempted: its blocks are released and
//! it waits again, to recompute its prompt and the tokens it generated so far.

use std::collections::VecDeque;

use crate::block_allocator::{BlockAllocator, PrefixId};

/// Limits of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// The most sequences in the running batch (holding KV blocks).
    pub max_running: usize,
    /// The most tokens fed in one forward step: decode tokens plus prefill chunk tokens.
    pub max_tokens_per_step: usize,
    /// The most sequences waiting for admission; [`Scheduler::add`] refuses more.
    pub max_queue: usize,
    /// KV cache blocks.
    pub num_blocks: usize,
    /// Token slots per KV cache block.
    pub block_size: usize,
}

/// Why [`Scheduler::add`] refused a sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// `max_queue` sequences are waiting already; the caller may retry later.
    #[error("{queued} sequences are waiting already")]
    QueueFull { queued: usize },
    /// The sequence would need more KV blocks than the whole cache has, even alone.
    #[error("the sequence needs {needed} KV blocks but the cache has {num_blocks}")]
    TooLong { needed: usize, num_blocks: usize },
    /// An empty prompt or a `max_new_tokens` of 0: there is nothing to compute.
    #[error("the prompt is empty or max_new_tokens is 0")]
    Empty,
    /// The id belongs to a sequence that has not finished.
    #[error("sequence {0} exists already")]
    DuplicateId(u64),
}

/// What [`Scheduler::append_token`] says about a sequence after adding a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// It may generate more tokens.
    Running,
    /// It has generated `max_new_tokens` tokens; the caller ends it with
    /// [`Scheduler::finish`].
    LengthReached,
}

/// The work of one forward step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// The sequences of the batch; each id appears at most once.
    pub seqs: Vec<ScheduledSeq>,
}

/// One sequence's part of a forward step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: u64,
    /// Tokens to feed: a prefill chunk, or the last sampled token when decoding. Never empty.
    pub tokens: Vec<u32>,
    /// Tokens of the sequence already in the KV cache: `tokens[i]` sits at position `past + i`.
    pub past: usize,
    /// The sequence's blocks; position `p` lives in slot `p % block_size` of block
    /// `block_table[p / block_size]`. Covers exactly `past + tokens.len()` positions.
    pub block_table: Vec<u32>,
    /// The LoRA adapter the sequence runs with (`None`: the base model).
    pub adapter: Option<u32>,
    /// The chunk ends at the last known token: the engine samples the next token from its
    /// logits and hands it to [`Scheduler::append_token`].
    pub samples: bool,
}

/// One sequence's state.
#[derive(Debug)]
struct Sequence {
    id: u64,
    /// The prompt followed by the generated tokens. After a preemption all of it is
    /// recomputed, which is why the generated tokens live here too.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new_tokens: usize,
    adapter: Option<u32>,
    /// Position in arrival order: the scheduling priority (lower first).
    arrival: u64,
    /// Leading tokens whose K/V is in `blocks`, counting the ones of the plan returned last.
    cached: usize,
    /// Covers exactly `cached` positions while running; empty while waiting.
    blocks: Vec<u32>,
    /// Leading blocks that are shared prefix blocks or registered as such.
    registered: usize,
    /// The prefix id of block `registered - 1`: the parent of the next one to register.
    chain: Option<PrefixId>,
    /// Prompt tokens found in shared prefix blocks at the first admission.
    cached_prompt_tokens: Option<usize>,
    /// The last step it was planned in; 0 before the first.
    planned_step: u64,
    /// Proposed tokens at the end of `tokens` that the planned step verifies (see
    /// [`Scheduler::speculate`]); 0 outside such a step.
    speculated: usize,
}

impl Sequence {
    /// Tokens known but not yet in the cache.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cached
    }

    /// Plans its next `n` pending tokens in step `step`; its blocks cover them already.
    fn plan(&mut self, n: usize, step: u64) -> ScheduledSeq {
        let past = self.cached;
        self.cached += n;
        self.planned_step = step;
        ScheduledSeq {
            id: self.id,
            tokens: self.tokens[past..self.cached].to_vec(),
            past,
            block_table: self.blocks.clone(),
            adapter: self.adapter,
            samples: self.cached == self.tokens.len(),
        }
    }
}

/// The continuous-batching scheduler: owns the sequences and the KV block allocator.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    allocator: BlockAllocator,
    /// In arrival order (preempted sequences go back to their place, ahead of newer ones).
    waiting: VecDeque<Sequence>,
    /// In arrival order.
    running: Vec<Sequence>,
    next_arrival: u64,
    /// Steps scheduled so far; the current one while `schedule` runs.
    step: u64,
    preemptions: u64,
}

impl Scheduler {
    /// An empty scheduler over a KV cache of `config.num_blocks` blocks.
    ///
    /// # Panics
    /// When `block_size`, `max_running` or `max_tokens_per_step` is 0: nothing could ever be
    /// scheduled.
    pub fn new(config: SchedulerConfig) -> Scheduler {
        assert!(config.max_running > 0, "max_running must be at least 1");
        assert!(
            config.max_tokens_per_step > 0,
            "max_tokens_per_step must be at least 1"
        );
        Scheduler {
            allocator: BlockAllocator::new(config.num_blocks, config.block_size),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            step: 0,
            preemptions: 0,
        }
    }

    /// Queues sequence `id` to generate up to `max_new_tokens` tokens after `prompt` with
    /// `adapter`. It is refused when the queue holds `max_queue` sequences already, or when
    /// it could never fit the cache: the K/V of `prompt.len() + max_new_tokens - 1` positions
    /// (the last sampled token is never fed) must fit in `num_blocks` blocks.
    pub fn add(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        max_new_tokens: usize,
        adapter: Option<u32>,
    ) -> Result<(), AddError> {
        if prompt.is_empty() || max_new_tokens == 0 {
            return Err(AddError::Empty);
        }
        if self.get(id).is_some() {
            return Err(AddError::DuplicateId(id));
        }
        let needed = self.blocks_for(prompt.len() + max_new_tokens - 1);
        if needed > self.config.num_blocks {
            return Err(AddError::TooLong {
                needed,
                num_blocks: self.config.num_blocks,
            });
        }
        // Preempted sequences may push the queue past the bound: they were admitted already.
        if self.waiting.len() >= self.config.max_queue {
            return Err(AddError::QueueFull {
                queued: self.waiting.len(),
            });
        }
        self.next_arrival += 1;
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            max_new_tokens,
            adapter,
            arrival: self.next_arrival,
            cached: 0,
            blocks: Vec::new(),
            registered: 0,
            chain: None,
            cached_prompt_tokens: None,
            planned_step: 0,
            speculated: 0,
        });
        Ok(())
    }

    /// Plans the next forward step (see the module documentation for the policy). The plan is
    /// empty only when no sequence has anything to compute.
    pub fn schedule(&mut self) -> StepPlan {
        self.step += 1;
        self.register_computed_blocks();
        let mut budget = self.config.max_tokens_per_step;
        let mut plan = StepPlan::default();
        let preemptions_before = self.preemptions;
        let mut stalled = false;
        // Decoding sequences first, so that a long prefill never delays a token stream.
        for decode in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let pending = self.running[i].pending();
                // `pending == 0`: its sampled token has not been appended; nothing to feed.
                if pending > 0 && (pending == 1) == decode {
                    match self.make_room(i, pending.min(budget)) {
                        Some(n) => {
                            budget -= n;
                            plan.seqs.push(self.running[i].plan(n, self.step));
                        }
                        None => stalled = true,
                    }
                }
                i += 1;
            }
        }
        // Admitting while running sequences lack blocks would only cause more preemptions.
        if !stalled && self.preemptions == preemptions_before {
            self.admit(&mut budget, &mut plan);
        }
        plan
    }

    /// Speculative decoding: appends `proposal` (tokens guessed to follow) to the decode chunk
    /// `chunk` of the plan just returned, so that one step computes the K/V and logits of the
    /// last token and of each proposed one. As many proposed tokens are taken as the sequence
    /// may still generate beyond the step's own token and as free blocks hold (nobody is
    /// preempted for a guess); returns that number. After the step, the caller keeps the
    /// accepted ones with [`Scheduler::accept_speculation`] before appending the sampled
    /// token as usual.
    pub fn speculate(&mut self, chunk: &mut ScheduledSeq, proposal: &[u32]) -> usize {
        let bs = self.config.block_size;
        let free = self.allocator.num_free();
        let Some(seq) = self.running.iter_mut().find(|s| {
            s.id == chunk.id && s.planned_step == self.step && s.pending() == 0 && s.speculated == 0
        }) else {
            return 0;
        };
        if chunk.tokens.len() != 1 || chunk.past + 1 != seq.cached {
            return 0;
        }
        let generated = seq.tokens.len() - seq.prompt_len;
        let room = (seq.blocks.len() + free) * bs - seq.cached;
        let k = proposal
            .len()
            .min(seq.max_new_tokens.saturating_sub(generated + 1))
            .min(room);
        if k == 0 {
            return 0;
        }
        let needed = (seq.cached + k).div_ceil(bs) - seq.blocks.len();
        let Some(new) = self.allocator.allocate_n(needed) else {
            return 0;
        };
        seq.blocks.extend(new);
        seq.tokens.extend(&proposal[..k]);
        seq.cached += k;
        seq.speculated = k;
        chunk.tokens.extend(&proposal[..k]);
        chunk.block_table = seq.blocks.clone();
        k
    }

    /// Keeps the first `kept` tokens that [`Scheduler::speculate`] proposed for sequence `id`
    /// and drops the rest, with the blocks only they used (their K/V slots are written again
    /// later); the sequence then awaits its sampled token ([`Scheduler::append_token`]).
    /// Returns false when `id` has no proposal in flight.
    pub fn accept_speculation(&mut self, id: u64, kept: usize) -> bool {
        let bs = self.config.block_size;
        let Some(seq) = self
            .running
            .iter_mut()
            .find(|s| s.id == id && s.speculated > 0)
        else {
            return false;
        };
        let rejected = seq.speculated - kept.min(seq.speculated);
        seq.speculated = 0;
        let len = seq.tokens.len() - rejected;
        seq.tokens.truncate(len);
        seq.cached = len;
        let spare = seq.blocks.split_off(len.div_ceil(bs));
        self.release_blocks(&spare);
        true
    }

    /// Adds `token`, sampled from the logits of sequence `id`'s last planned chunk, to the
    /// sequence; it is fed in a later step. `None` (and the token dropped) when `id` does not
    /// await a token: unknown, finished, or its last chunk did not sample.
    pub fn append_token(&mut self, id: u64, token: u32) -> Option<SeqStatus> {
        // Only a planned chunk that reached the last known token leaves nothing pending, and
        // only running sequences have planned chunks.
        let seq = self
            .running
            .iter_mut()
            .find(|s| s.id == id && s.pending() == 0)?;
        seq.tokens.push(token);
        if seq.tokens.len() - seq.prompt_len >= seq.max_new_tokens {
            Some(SeqStatus::LengthReached)
        } else {
            Some(SeqStatus::Running)
        }
    }

    /// Ends sequence `id`, running or waiting, and releases its blocks. An unknown id is
    /// ignored.
    pub fn finish(&mut self, id: u64) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.release_blocks(&seq.blocks);
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            // A waiting sequence holds no blocks.
            self.waiting.remove(i);
        }
    }

    /// Ends every sequence (at shutdown) and returns their ids, running ones first.
    pub fn abort_all(&mut self) -> Vec<u64> {
        let ids: Vec<u64> = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.id)
            .collect();
        for seq in std::mem::take(&mut self.running) {
            self.release_blocks(&seq.blocks);
        }
        self.waiting.clear();
        ids
    }

    /// Sequences waiting for admission, preempted ones included.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences in the running batch.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// KV blocks held by sequences.
    pub fn blocks_used(&self) -> usize {
        self.allocator.num_used()
    }

    /// KV blocks free, counting those that only cache a prefix.
    pub fn blocks_free(&self) -> usize {
        self.allocator.num_free()
    }

    /// Token slots per KV block.
    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// Preemptions so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// How many prompt tokens of sequence `id` were served from shared prefix blocks when it
    /// was first admitted; `None` before that (or for an unknown id). A readmission after a
    /// preemption does not change it.
    pub fn cached_prompt_tokens(&self, id: u64) -> Option<usize> {
        self.get(id)?.cached_prompt_tokens
    }

    /// The tokens sequence `id` has generated so far; `None` for an unknown id.
    pub fn generated(&self, id: u64) -> Option<&[u32]> {
        let seq = self.get(id)?;
        Some(&seq.tokens[seq.prompt_len..])
    }

    fn get(&self, id: u64) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// Registers the blocks that the steps run so far have filled as shared prefix blocks.
    /// Done here rather than when planning because a block's K/V exists only once its step
    /// ran: `schedule` is called after the engine ran the previous plan (and finished any
    /// sequence whose step failed), so every block full up to `cached` holds its K/V now.
    fn register_computed_blocks(&mut self) {
        let block_size = self.config.block_size;
        for seq in &mut self.running {
            let full = seq.cached / block_size;
            for i in seq.registered..full {
                let tokens = &seq.tokens[i * block_size..(i + 1) * block_size];
                seq.chain = Some(self.allocator.register_full_block(
                    seq.blocks[i],
                    seq.chain,
                    tokens,
                    seq.adapter,
                ));
            }
            seq.registered = seq.registered.max(full);
        }
    }

    /// Gives `running[i]` blocks for up to `want` (≥ 1) more tokens, preempting later
    /// arrivals not planned in this step while no slot at all is free. Returns how many
    /// tokens it can feed, or `None` when it must sit this step out: only sequences that
    /// arrived before it (or are planned already) hold blocks, and they keep them.
    fn make_room(&mut self, i: usize, want: usize) -> Option<usize> {
        loop {
            let (cached, held) = (self.running[i].cached, self.running[i].blocks.len());
            // Slots left in its last block plus the free blocks; a smaller chunk than wanted
            // is better than preempting someone for it.
            let room = (held + self.allocator.num_free()) * self.config.block_size - cached;
            let n = want.min(room);
            if n > 0 {
                let needed = self.blocks_for(cached + n) - held;
                if let Some(new) = self.allocator.allocate_n(needed) {
                    self.running[i].blocks.extend(new);
                    return Some(n);
                }
            }
            // A planned sequence keeps its blocks: its chunk is in the plan already. (With
            // decodes planned before prefills this never excludes anyone, as a sequence in
            // prefill is always the newest running one; the check keeps plans sound anyway.)
            let victim = (i + 1..self.running.len())
                .rev()
                .find(|&j| self.running[j].planned_step != self.step)?;
            self.preempt(victim);
        }
    }

    /// Admits waiting sequences in arrival order while the batch size, the token budget and
    /// the free blocks allow, reusing their cached prefix blocks.
    fn admit(&mut self, budget: &mut usize, plan: &mut StepPlan) {
        while *budget > 0 && self.running.len() < self.config.max_running {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            // At least the last token is computed: its logits give the next token.
            let found =
                self.allocator
                    .lookup_prefix(&seq.tokens, seq.adapter, seq.tokens.len() - 1);
            let matched = found.blocks.len() * self.config.block_size;
            let n = (seq.tokens.len() - matched).min(*budget);
            let Some(new) = self.allocator.allocate_n(self.blocks_for(n)) else {
                // First come, first served: nobody overtakes the sequence at the front.
                self.release_blocks(&found.blocks);
                break;
            };
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            seq.registered = found.blocks.len();
            seq.chain = found.last;
            seq.blocks = found.blocks;
            seq.blocks.extend(new);
            seq.cached = matched;
            seq.cached_prompt_tokens
                .get_or_insert(matched.min(seq.prompt_len));
            *budget -= n;
            plan.seqs.push(seq.plan(n, self.step));
            let at = self.running.partition_point(|r| r.arrival < seq.arrival);
            self.running.insert(at, seq);
        }
    }

    /// Preempts `running[j]`: releases its blocks and puts it back in the queue, in arrival
    /// order, to recompute everything it has (its cached prefix blocks may survive).
    fn preempt(&mut self, j: usize) {
        let mut seq = self.running.remove(j);
        self.release_blocks(&seq.blocks);
        seq.blocks.clear();
        seq.cached = 0;
        seq.registered = 0;
        seq.chain = None;
        let at = self.waiting.partition_point(|w| w.arrival < seq.arrival);
        self.waiting.insert(at, seq);
        self.preemptions += 1;
    }

    /// Releases a sequence's blocks last first, so that the LRU eviction drops the tail of a
    /// cached prefix before its head (a block is unreachable without its parent).
    fn release_blocks(&mut self, blocks: &[u32]) {
        for &block in blocks.iter().rev() {
            self.allocator.release(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::hash::{DefaultHasher, Hash, Hasher};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The fake model's K/V at a position: a hash of the whole history up to it and the
    /// adapter. A sequence that reads anything but its own history through its block table
    /// computes other states, hence other tokens.
    fn kv_state(previous: u64, token: u32, adapter: Option<u32>) -> u64 {
        let mut hasher = DefaultHasher::new();
        (previous, token, adapter).hash(&mut hasher);
        hasher.finish()
    }

    /// The state before the first position.
    const START: u64 = 0x5eed;

    /// The fake model's sampled token after a position of state `state`.
    fn next_token(state: u64) -> u32 {
        (state % 1000) as u32
    }

    /// What a sequence generates run alone, without the scheduler; tokens below `stop_below`
    /// end it (the stop token included), like EOS.
    fn reference(
        prompt: &[u32],
        adapter: Option<u32>,
        max_new: usize,
        stop_below: u32,
    ) -> Vec<u32> {
        let mut state = prompt
            .iter()
            .fold(START, |state, &t| kv_state(state, t, adapter));
        let mut out = Vec::new();
        loop {
            let token = next_token(state);
            out.push(token);
            if out.len() == max_new || token < stop_below {
                return out;
            }
            state = kv_state(state, token, adapter);
        }
    }

    fn config(
        max_running: usize,
        max_tokens_per_step: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> SchedulerConfig {
        SchedulerConfig {
            max_running,
            max_tokens_per_step,
            max_queue: 1000,
            num_blocks,
            block_size,
        }
    }

    struct Request {
        prompt: Vec<u32>,
        adapter: Option<u32>,
        max_new: usize,
    }

    /// A fake engine around the scheduler: a slot-addressed KV cache of fake states, checks of
    /// every plan against what each sequence must be fed, and the scheduler's invariants
    /// after every `schedule`.
    struct Harness {
        sched: Scheduler,
        kv: Vec<Option<u64>>,
        stop_below: u32,
        requests: HashMap<u64, Request>,
        /// Prompt and generated tokens of every unfinished sequence.
        live: HashMap<u64, Vec<u32>>,
        /// Generated tokens of the sequences that ended by a stop token or their length.
        outputs: HashMap<u64, Vec<u32>>,
        /// Tokens fed to the fake model.
        computed: usize,
        /// Chunks that did not reach the end of their sequence (chunked prefill).
        partial_chunks: usize,
        /// Sequences seen in a plan; their first `past` is their cached prompt tokens.
        admitted: HashSet<u64>,
        shared_prompt_tokens: usize,
        /// Speculates: each decode chunk gets a proposal of a few tokens, some right, some
        /// wrong, drawn from this.
        speculate: Option<StdRng>,
        /// Proposed tokens the fake model accepted.
        accepted: usize,
    }

    impl Harness {
        fn new(config: SchedulerConfig, stop_below: u32) -> Harness {
            Harness {
                kv: vec![None; config.num_blocks * config.block_size],
                sched: Scheduler::new(config),
                stop_below,
                requests: HashMap::new(),
                live: HashMap::new(),
                outputs: HashMap::new(),
                computed: 0,
                partial_chunks: 0,
                admitted: HashSet::new(),
                shared_prompt_tokens: 0,
                speculate: None,
                accepted: 0,
            }
        }

        /// Up to 4 tokens guessed to follow sequence `id`'s history: a random number of the
        /// fake model's own, then possibly a wrong one.
        fn proposal(&mut self, id: u64) -> Vec<u32> {
            let Some(rng) = self.speculate.as_mut() else {
                return Vec::new();
            };
            let adapter = self.requests[&id].adapter;
            let mut state = self.live[&id]
                .iter()
                .fold(START, |state, &t| kv_state(state, t, adapter));
            let right = rng.random_range(0..=4);
            let mut proposal = Vec::new();
            for _ in 0..right {
                let token = next_token(state);
                proposal.push(token);
                state = kv_state(state, token, adapter);
            }
            if right < 4 && rng.random_bool(0.5) {
                proposal.push((next_token(state) + 1) % 1000);
            }
            proposal
        }

        fn add(
            &mut self,
            id: u64,
            prompt: &[u32],
            max_new: usize,
            adapter: Option<u32>,
        ) -> Result<(), AddError> {
            self.sched.add(id, prompt.to_vec(), max_new, adapter)?;
            self.live.insert(id, prompt.to_vec());
            self.requests.insert(
                id,
                Request {
                    prompt: prompt.to_vec(),
                    adapter,
                    max_new,
                },
            );
            Ok(())
        }

        fn cancel(&mut self, id: u64) {
            self.sched.finish(id);
            self.live.remove(&id);
        }

        /// One engine step: schedule, check, run the fake model, append or finish.
        fn step(&mut self) -> StepPlan {
            let mut plan = self.sched.schedule();
            let mut proposals: HashMap<u64, Vec<u32>> = HashMap::new();
            for s in &mut plan.seqs {
                if s.tokens.len() == 1 && s.samples {
                    let proposal = self.proposal(s.id);
                    let k = self.sched.speculate(s, &proposal);
                    assert!(k <= proposal.len());
                    if k > 0 {
                        proposals.insert(s.id, proposal[..k].to_vec());
                    }
                }
            }
            check_invariants(&self.sched);
            let config = &self.sched.config;
            let bs = config.block_size;
            assert!(plan.seqs.len() <= config.max_running);
            // Proposals ride on top of the budget (as they do on top of one decode row).
            let fed: usize = plan
                .seqs
                .iter()
                .map(|s| s.tokens.len() - proposals.get(&s.id).map_or(0, Vec::len))
                .sum();
            assert!(
                fed <= config.max_tokens_per_step,
                "{fed} tokens in one step"
            );
            assert!(!plan.seqs.is_empty() || self.live.is_empty(), "no progress");

            // Reads first, for every sequence; writes after. A slot that one sequence reads
            // and another writes in the same step would be caught by the refcount check or
            // by the reader finding another history in it.
            let mut ids = HashSet::new();
            let mut written = HashSet::new();
            let mut results = Vec::new();
            for s in &plan.seqs {
                assert!(ids.insert(s.id), "sequence {} planned twice", s.id);
                let proposed = proposals.get(&s.id).map_or(&[][..], Vec::as_slice);
                let history = &[&self.live[&s.id][..], proposed].concat();
                let adapter = self.requests[&s.id].adapter;
                let end = s.past + s.tokens.len();
                assert_eq!(s.adapter, adapter);
                assert!(!s.tokens.is_empty());
                assert_eq!(
                    s.tokens,
                    history[s.past..end],
                    "sequence {} fed other tokens",
                    s.id
                );
                assert_eq!(s.samples, end == history.len());
                assert_eq!(s.block_table.len(), end.div_ceil(bs));
                if self.admitted.insert(s.id) {
                    assert_eq!(self.sched.cached_prompt_tokens(s.id), Some(s.past));
                    self.shared_prompt_tokens += s.past;
                }
                if !s.samples {
                    self.partial_chunks += 1;
                }
                let slot = |p: usize| s.block_table[p / bs] as usize * bs + p % bs;
                let mut state = START;
                for (p, &token) in history[..s.past].iter().enumerate() {
                    state = kv_state(state, token, adapter);
                    assert_eq!(
                        self.kv[slot(p)],
                        Some(state),
                        "sequence {} position {p}",
                        s.id
                    );
                }
                let mut writes = Vec::new();
                let mut states = Vec::new();
                for (p, &token) in (s.past..end).zip(&s.tokens) {
                    state = kv_state(state, token, adapter);
                    states.push(state);
                    assert!(written.insert(slot(p)), "slot {} written twice", slot(p));
                    let block = s.block_table[p / bs];
                    assert_eq!(
                        self.sched.allocator.refcount(block),
                        1,
                        "write to shared block {block}"
                    );
                    writes.push((slot(p), state));
                }
                // The states after the last known token and after each proposed one.
                let sampled = s
                    .samples
                    .then(|| states[states.len() - 1 - proposed.len()..].to_vec());
                results.push((s.id, sampled, writes));
            }
            for (id, sampled, writes) in results {
                self.computed += writes.len();
                for (slot, state) in writes {
                    self.kv[slot] = Some(state);
                }
                let Some(states) = sampled else { continue };
                // Proposals are kept while each is the token the fake model samples before
                // it; then the model's own token follows.
                let proposed = proposals.remove(&id).unwrap_or_default();
                let kept = proposed
                    .iter()
                    .zip(&states)
                    .take_while(|(&p, &state)| p == next_token(state))
                    .count();
                if !proposed.is_empty() {
                    assert!(self.sched.accept_speculation(id, kept));
                }
                self.accepted += kept;
                let request = &self.requests[&id];
                let history = self.live.get_mut(&id).unwrap();
                history.extend(&proposed[..kept]);
                let generated = &history[request.prompt.len()..];
                assert_eq!(self.sched.generated(id), Some(generated));
                if let Some(i) = proposed[..kept].iter().position(|&t| t < self.stop_below) {
                    // A kept proposal ends the sequence (what follows it is dropped).
                    let end = history.len() - kept + i + 1;
                    history.truncate(end);
                    self.outputs
                        .insert(id, history[request.prompt.len()..].to_vec());
                    self.live.remove(&id);
                    self.sched.finish(id);
                    continue;
                }
                let token = next_token(states[kept]);
                let status = self
                    .sched
                    .append_token(id, token)
                    .expect("the sequence awaits a token");
                history.push(token);
                let generated = &history[request.prompt.len()..];
                assert_eq!(self.sched.generated(id), Some(generated));
                let length_reached = generated.len() == request.max_new;
                assert_eq!(status == SeqStatus::LengthReached, length_reached);
                if length_reached || token < self.stop_below {
                    self.outputs.insert(id, generated.to_vec());
                    self.live.remove(&id);
                    self.sched.finish(id);
                }
            }
            plan
        }

        fn run_to_end(&mut self) {
            for _ in 0..100_000 {
                if self.live.is_empty() {
                    return;
                }
                self.step();
            }
            panic!("the sequences never finished");
        }

        /// Every sequence that ended produced what it produces alone.
        fn assert_outputs_match_solo_runs(&self) {
            for (id, output) in &self.outputs {
                let r = &self.requests[id];
                assert_eq!(
                    output,
                    &reference(&r.prompt, r.adapter, r.max_new, self.stop_below),
                    "sequence {id}"
                );
            }
        }

        fn assert_drained(&self) {
            assert_eq!((self.sched.num_running(), self.sched.num_waiting()), (0, 0));
            assert_eq!(self.sched.blocks_used(), 0);
            assert_eq!(self.sched.blocks_free(), self.sched.config.num_blocks);
        }
    }

    /// Checks that every block is held by the sequences whose tables map it (and as often),
    /// and that a block mapped by several sequences is a read-only prefix block: full in
    /// each, at the same position, after the same tokens, under the same adapter.
    fn check_invariants(s: &Scheduler) {
        let bs = s.config.block_size;
        s.allocator.assert_consistent();
        assert!(s.running.len() <= s.config.max_running);
        assert!(s.running.windows(2).all(|w| w[0].arrival < w[1].arrival));
        assert!(s
            .waiting
            .iter()
            .zip(s.waiting.iter().skip(1))
            .all(|(a, b)| a.arrival < b.arrival));
        for seq in &s.waiting {
            assert!(
                seq.blocks.is_empty() && seq.cached == 0,
                "waiting sequence {} holds blocks",
                seq.id
            );
        }
        let mut holders: HashMap<u32, Vec<(&Sequence, usize)>> = HashMap::new();
        for seq in &s.running {
            assert!(seq.cached <= seq.tokens.len());
            assert_eq!(
                seq.blocks.len(),
                seq.cached.div_ceil(bs),
                "sequence {}",
                seq.id
            );
            for (i, &block) in seq.blocks.iter().enumerate() {
                holders.entry(block).or_default().push((seq, i));
            }
        }
        assert_eq!(s.allocator.num_used(), holders.len());
        for (&block, holders) in &holders {
            assert_eq!(
                s.allocator.refcount(block) as usize,
                holders.len(),
                "block {block}"
            );
            let (first, i) = holders[0];
            let end = (i + 1) * bs;
            for &(seq, j) in &holders[1..] {
                assert_eq!(j, i, "block {block} at two positions");
                assert!(
                    seq.cached >= end && first.cached >= end,
                    "shared block {block} is not full"
                );
                assert_eq!(
                    seq.adapter, first.adapter,
                    "block {block} shared across adapters"
                );
                assert_eq!(
                    seq.tokens[..end],
                    first.tokens[..end],
                    "block {block} shared by other prefixes"
                );
            }
        }
    }

    #[test]
    fn mixed_load_with_preemption_and_chunked_prefill_matches_solo_runs() {
        let mut h = Harness::new(config(4, 8, 14, 4), 20);
        let common: Vec<u32> = (100..109).collect();
        let requests: Vec<(usize, Vec<u32>, usize, Option<u32>)> = (0..24u32)
            .map(|k| {
                let len = 1 + (k as usize * 7) % 30;
                let mut prompt: Vec<u32> =
                    (0..len as u32).map(|t| (k * 53 + t * 11) % 1000).collect();
                if k % 3 == 0 && len > common.len() {
                    prompt[..common.len()].copy_from_slice(&common);
                }
                let arrival = 2 * k as usize / 3;
                (
                    arrival,
                    prompt,
                    4 + (k as usize * 5) % 17,
                    (k % 2 == 0).then_some(1),
                )
            })
            .collect();
        let mut step = 0;
        while step <= requests.last().unwrap().0 || !h.live.is_empty() {
            for (id, (arrival, prompt, max_new, adapter)) in requests.iter().enumerate() {
                if *arrival == step {
                    h.add(id as u64, prompt, *max_new, *adapter).unwrap();
                }
            }
            h.step();
            step += 1;
        }
        assert_eq!(h.outputs.len(), requests.len());
        h.assert_outputs_match_solo_runs();
        h.assert_drained();
        assert!(h.sched.preemptions() > 0, "the load was meant to preempt");
        assert!(h.partial_chunks > 0, "the load was meant to chunk prefills");
    }

    #[test]
    fn decoding_sequences_keep_streaming_during_a_long_prefill() {
        let mut h = Harness::new(config(4, 4, 64, 4), 0);
        h.add(1, &[1, 2], 40, None).unwrap();
        h.step();
        h.add(2, &(0..40).collect::<Vec<u32>>(), 4, None).unwrap();
        for chunk in 0..13 {
            let plan = h.step();
            let tokens: Vec<(u64, usize, usize)> = plan
                .seqs
                .iter()
                .map(|s| (s.id, s.past, s.tokens.len()))
                .collect();
            assert_eq!(tokens, [(1, 2 + chunk, 1), (2, 3 * chunk, 3)]);
        }
        let plan = h.step();
        assert_eq!(plan.seqs[1].tokens.len(), 1);
        assert!(plan.seqs[1].samples);
        h.run_to_end();
        h.assert_outputs_match_solo_runs();
        h.assert_drained();
    }

    #[test]
    fn preempts_the_latest_arrival_and_resumes_it_with_its_generated_tokens() {
        let mut h = Harness::new(config(4, 16, 4, 2), 0);
        // Sequence 1 needs 3 blocks in all, sequence 2 up to 4.
        h.add(1, &[1, 2, 3], 4, None).unwrap();
        h.add(2, &[4, 5, 6], 5, None).unwrap();
        assert_eq!(h.step().seqs.len(), 2);
        assert_eq!(h.sched.blocks_free(), 0);
        assert_eq!(h.step().seqs.len(), 2, "both fit their second block");
        // Sequence 1 needs a third block; 2 arrived later and gives its blocks up.
        let plan = h.step();
        assert_eq!(plan.seqs.iter().map(|s| s.id).collect::<Vec<_>>(), [1]);
        assert_eq!(h.sched.preemptions(), 1);
        assert_eq!(h.sched.waiting.front().map(|s| s.id), Some(2));
        assert_eq!(h.sched.generated(2).map(<[u32]>::len), Some(2));
        // Its tail block was released first and evicted; its head block survives in the cache.
        let resumed = loop {
            let plan = h.step();
            if let Some(s) = plan.seqs.iter().find(|s| s.id == 2) {
                break s.clone();
            }
        };
        assert_eq!(resumed.past, 2);
        assert_eq!(
            resumed.tokens.len(),
            3,
            "prompt token and two generated tokens recomputed"
        );
        assert!(resumed.samples);
        h.run_to_end();
        assert_eq!(h.outputs.len(), 2);
        h.assert_outputs_match_solo_runs();
        h.assert_drained();
        assert_eq!(h.sched.cached_prompt_tokens(2), None, "finished");
    }

    #[test]
    fn a_chunk_shrinks_to_the_free_room_and_the_newest_sequence_waits_or_yields() {
        let mut h = Harness::new(config(2, 8, 3, 4), 0);
        // 2 blocks for sequence 1, 3 for sequence 2: the cache has 3.
        h.add(1, &[1, 2], 5, None).unwrap();
        h.add(2, &(10..20).collect::<Vec<u32>>(), 1, None).unwrap();
        let chunks = |plan: &StepPlan| {
            plan.seqs
                .iter()
                .map(|s| (s.id, s.past, s.tokens.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(chunks(&h.step()), [(1, 0, 2), (2, 0, 6)]);
        assert_eq!(h.sched.blocks_free(), 0);
        // Two slots are left in sequence 2's last block: a chunk of 2 rather than 4.
        assert_eq!(chunks(&h.step()), [(1, 2, 1), (2, 6, 2)]);
        // No room at all and nobody newer to preempt: it sits the step out, keeping its blocks.
        assert_eq!(chunks(&h.step()), [(1, 3, 1)]);
        assert_eq!((h.sched.num_running(), h.sched.preemptions()), (2, 0));
        // Sequence 1 needs a block: the newer sequence 2 is preempted.
        assert_eq!(chunks(&h.step()), [(1, 4, 1)]);
        assert_eq!(
            (
                h.sched.num_running(),
                h.sched.num_waiting(),
                h.sched.preemptions()
            ),
            (1, 1, 1)
        );
        h.run_to_end();
        assert_eq!(h.outputs.len(), 2);
        h.assert_outputs_match_solo_runs();
        h.assert_drained();
    }

    #[test]
    fn a_shared_prompt_prefix_is_computed_once_per_adapter() {
        let mut h = Harness::new(config(8, 64, 64, 4), 0);
        let prompt: Vec<u32> = (0..22).map(|t| t * 3 + 1).collect();
        h.add(1, &prompt, 6, None).unwrap();
        h.step();
        h.step();
        let mut other = prompt.clone();
        other[5] = 999;
        h.add(2, &prompt, 6, None).unwrap();
        h.add(3, &prompt, 6, Some(7)).unwrap();
        h.add(4, &other, 6, None).unwrap();
        let computed = h.computed;
        let plan = h.step();
        let by_id = |id| plan.seqs.iter().find(|s| s.id == id).unwrap();
        assert_eq!((by_id(2).past, by_id(2).tokens.len()), (20, 2));
        assert_eq!(by_id(2).block_table[..5], by_id(1).block_table[..5]);
        assert_eq!(by_id(3).past, 0, "another adapter shares nothing");
        assert_eq!(by_id(4).past, 4, "only the blocks before the difference");
        assert_eq!(h.computed - computed, 1 + 2 + 22 + 18);
        assert_eq!(h.sched.cached_prompt_tokens(2), Some(20));
        assert_eq!(h.sched.cached_prompt_tokens(3), Some(0));
        h.run_to_end();
        // Finished sequences leave their blocks cached. A prompt of whole blocks reuses all
        // but the last, whose last token must be computed for its logits.
        h.add(5, &prompt, 6, None).unwrap();
        h.add(6, &prompt[..20], 6, Some(7)).unwrap();
        let plan = h.step();
        assert_eq!(
            plan.seqs.iter().map(|s| (s.id, s.past)).collect::<Vec<_>>(),
            [(5, 20), (6, 16)]
        );
        h.run_to_end();
        assert_eq!(h.outputs.len(), 6);
        h.assert_outputs_match_solo_runs();
        h.assert_drained();
    }

    #[test]
    fn add_refuses_a_full_queue_and_sequences_that_cannot_fit() {
        let mut sched = Scheduler::new(SchedulerConfig {
            max_queue: 2,
            ..config(1, 8, 4, 4)
        });
        assert_eq!(
            sched.add(1, vec![1; 10], 8, None),
            Err(AddError::TooLong {
                needed: 5,
                num_blocks: 4
            })
        );
        assert_eq!(sched.add(1, vec![1; 10], 7, None), Ok(()));
        assert_eq!(
            sched.add(1, vec![1], 1, None),
            Err(AddError::DuplicateId(1))
        );
        assert_eq!(sched.add(2, vec![], 1, None), Err(AddError::Empty));
        assert_eq!(sched.add(2, vec![1], 0, None), Err(AddError::Empty));
        assert_eq!(sched.add(2, vec![1], 1, None), Ok(()));
        assert_eq!(
            sched.add(3, vec![1], 1, None),
            Err(AddError::QueueFull { queued: 2 })
        );
        sched.schedule();
        assert_eq!((sched.num_running(), sched.num_waiting()), (1, 1));
        assert_eq!(sched.add(3, vec![1], 1, None), Ok(()));
    }

    #[test]
    fn cancelling_a_waiting_or_running_sequence_frees_its_blocks() {
        let mut sched = Scheduler::new(config(1, 4, 8, 4));
        for id in 1..=3 {
            sched.add(id, vec![7; 10], 4, None).unwrap();
        }
        let plan = sched.schedule();
        assert_eq!(plan.seqs.len(), 1);
        assert!(!plan.seqs[0].samples);
        assert_eq!(sched.append_token(1, 5), None, "its chunk did not sample");
        assert_eq!(
            (
                sched.num_running(),
                sched.num_waiting(),
                sched.blocks_used()
            ),
            (1, 2, 1)
        );
        sched.finish(2);
        assert_eq!((sched.num_running(), sched.num_waiting()), (1, 1));
        assert_eq!(sched.generated(2), None);
        sched.finish(1);
        assert_eq!((sched.num_running(), sched.blocks_used()), (0, 0));
        sched.finish(99);
        let plan = sched.schedule();
        assert_eq!(plan.seqs.iter().map(|s| s.id).collect::<Vec<_>>(), [3]);
        sched.schedule();
        let plan = sched.schedule();
        assert!(plan.seqs[0].samples);
        assert_eq!(sched.append_token(3, 5), Some(SeqStatus::Running));
        assert_eq!(
            sched.append_token(3, 5),
            None,
            "one token per sampled chunk"
        );
        assert_eq!(sched.generated(3), Some(&[5][..]));
        sched.finish(3);
        assert_eq!(
            (
                sched.num_running(),
                sched.num_waiting(),
                sched.blocks_used()
            ),
            (0, 0, 0)
        );
        assert!(sched.schedule().seqs.is_empty());
    }

    #[test]
    fn abort_all_ends_every_sequence() {
        let mut sched = Scheduler::new(config(2, 8, 8, 4));
        for id in 1..=4 {
            sched.add(id, vec![1; 6], 4, None).unwrap();
        }
        sched.schedule();
        assert_eq!(sched.abort_all(), [1, 2, 3, 4]);
        assert_eq!(
            (
                sched.num_running(),
                sched.num_waiting(),
                sched.blocks_used()
            ),
            (0, 0, 0)
        );
    }

    /// Random arrivals, cancellations and configurations; the invariants and the fake model's
    /// checks run at every step.
    #[test]
    fn random_loads_keep_every_slot_with_one_owner() {
        let (mut preemptions, mut shared, mut queue_full, mut cancelled) = (0, 0, 0, 0);
        let mut accepted = 0;
        for seed in 0..80 {
            let mut rng = StdRng::seed_from_u64(seed);
            let block_size = rng.random_range(1..=4);
            let config = SchedulerConfig {
                max_running: rng.random_range(1..=6),
                max_tokens_per_step: rng.random_range(1..=12),
                max_queue: rng.random_range(1..=8),
                num_blocks: rng.random_range(4..=24),
                block_size,
            };
            let mut h = Harness::new(config.clone(), 15);
            // Every second load speculates: proposals in flight, kept in part, rolled back.
            if seed % 2 == 1 {
                h.speculate = Some(StdRng::seed_from_u64(seed + 1000));
            }
            let families: Vec<Vec<u32>> = (0..3)
                .map(|_| {
                    (0..rng.random_range(0..=12))
                        .map(|_| rng.random_range(0..1000))
                        .collect()
                })
                .collect();
            let mut next_id = 0;
            for step in 0..300 {
                if step < 200 && rng.random_bool(0.4) {
                    for _ in 0..rng.random_range(1..=3) {
                        let mut prompt = families[rng.random_range(0..families.len())].clone();
                        for _ in 0..rng.random_range(usize::from(prompt.is_empty())..=10) {
                            prompt.push(rng.random_range(0..1000));
                        }
                        let adapter = [None, Some(0), Some(1)][rng.random_range(0..3)];
                        let max_new = rng.random_range(1..=12);
                        next_id += 1;
                        match h.add(next_id, &prompt, max_new, adapter) {
                            Ok(()) => {}
                            Err(AddError::QueueFull { queued }) => {
                                assert!(queued >= config.max_queue);
                                queue_full += 1;
                            }
                            Err(AddError::TooLong { needed, num_blocks }) => {
                                assert!(needed > num_blocks);
                                assert!(
                                    (prompt.len() + max_new - 1).div_ceil(block_size) > num_blocks
                                );
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                if rng.random_bool(0.08) && !h.live.is_empty() {
                    let mut ids: Vec<u64> = h.live.keys().copied().collect();
                    ids.sort_unstable();
                    h.cancel(ids[rng.random_range(0..ids.len())]);
                    cancelled += 1;
                }
                h.step();
            }
            h.run_to_end();
            h.assert_outputs_match_solo_runs();
            h.assert_drained();
            preemptions += h.sched.preemptions();
            shared += h.shared_prompt_tokens;
            accepted += h.accepted;
        }
        // The loads must exercise what they are meant to check.
        assert!(preemptions > 0 && shared > 0 && queue_full > 0 && cancelled > 0);
        assert!(accepted > 0);
    }
}
