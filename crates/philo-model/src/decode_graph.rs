//! Decoding a fixed set of sequences on the GPU (generate, chat, `bench decode`): a
//! [`DecodeStep`] over a paged KV cache of the graph's own, in which each row owns a fixed run of
//! blocks. One CUDA graph replays each step; per step the host writes the token ids and lengths
//! (a few bytes) and reads back the logits or the greedy token ids; nothing else crosses.
//!
//! Prompts are prefilled by [`Phi3::forward_paged`] into the same paged KV cache the graph
//! reads, so a sequence's keys and values never move. Weights are read in the format the model
//! holds them (dense, INT8, INT4, NF4); an adapter attached to the model unmerged (a quantised
//! base's, as `chat --use_4bit --adapter` loads it) runs beside the base weights through the
//! step's batched LoRA; a model with GGUF blocks keeps the general path ([`DecodeGraph::new`]
//! returns None).

use crate::adapter::Adapter;
use crate::decode_step::{DecodeRow, DecodeStep, LogitAdjustment, RowSampling};
use crate::error::{ModelError, Result};
use crate::lora_bank::LoraBank;
use crate::paged_forward::SeqChunk;
use crate::paged_kv_cache::PagedKvCache;
use crate::phi3::Phi3;

/// Tokens per block of the graph's paged KV cache.
const BLOCK_SIZE: usize = 16;

/// Most rows of one verify step ([`DecodeGraph::verify`]): the last token and 8 proposals.
pub const MAX_VERIFY_ROWS: usize = 9;

/// The graph-captured decode step of `rows` sequences, each with room for `capacity` tokens.
pub struct DecodeGraph {
    step: DecodeStep,
    cache: PagedKvCache,
    capacity: usize,
    /// The blocks each row owns (a fixed run of the graph's cache).
    tables: Vec<Vec<u32>>,
    lengths: Vec<usize>,
    /// Whether each row rotates with LongRoPE's long factors (as its last prefill decided).
    long_rope: Vec<bool>,
    /// The adapter every row runs with, unmerged (see [`DecodeGraph::set_adapter`]).
    bank: LoraBank,
    adapter: Option<usize>,
    /// The adapter is the one attached to the model: its prefills apply it themselves.
    attached: bool,
    /// Steps of every row run their decoder layers in the persistent kernel.
    persistent: bool,
}

fn err(message: String) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(message))
}

impl DecodeGraph {
    /// A decode graph for `model`, or None where it cannot run: not on CUDA, not bf16/f16,
    /// weights held as GGUF blocks or NF4 on the host, more rows of quantised weights than
    /// [`DecodeStep::gemv_rows`], or an attached adapter the step's LoRA kernels do not take
    /// (ranks past [`DecodeStep::MAX_RANK`]). An adapter attached to `model` runs unmerged on
    /// every row, from the step's own copy of its weights. `capture` false runs the same
    /// kernels launch by launch (for measuring what the graph saves).
    pub fn new(model: &Phi3, rows: usize, capacity: usize, capture: bool) -> Result<Option<Self>> {
        Self::build(model, rows, capacity, capture, false)
    }

    /// [`DecodeGraph::new`] with the decoder layers in one persistent kernel where it takes
    /// `rows` sequences (see [`DecodeGraph::set_persistent_layers`];
    /// [`DecodeGraph::persistent_layers`] says whether it did), else as `new` builds it: so
    /// that a quantised base also decodes 9 to 16 sequences, which the GEMV does not take.
    /// Turning the kernel off on such a graph makes its steps fail.
    pub fn with_persistent_layers(
        model: &Phi3,
        rows: usize,
        capacity: usize,
        capture: bool,
    ) -> Result<Option<Self>> {
        Self::build(model, rows, capacity, capture, true)
    }

    fn build(
        model: &Phi3,
        rows: usize,
        capacity: usize,
        capture: bool,
        persistent: bool,
    ) -> Result<Option<Self>> {
        if !model.device().is_cuda() || rows == 0 {
            return Ok(None);
        }
        let capacity = capacity.clamp(1, model.config().max_position_embeddings);
        let max_blocks = capacity.div_ceil(BLOCK_SIZE);
        let cache = PagedKvCache::new(
            model.config(),
            rows * max_blocks,
            BLOCK_SIZE,
            model.dtype(),
            model.device(),
        )?;
        // Room for a verify step's rows beside the sequences' own.
        let max_rows = rows.max(MAX_VERIFY_ROWS);
        // The step reads the base weights; an attached adapter goes into the graph's bank.
        let mut bank = LoraBank::new();
        let attached = bank.insert_attached(model)?;
        let base = attached.map(|_| {
            let mut base = model.clone();
            for (_, _, linear) in base.linears_mut() {
                linear.lora = None;
            }
            base
        });
        let Some(mut step) = DecodeStep::new(
            base.as_ref().unwrap_or(model),
            &cache,
            max_rows,
            capacity,
            capture,
        )?
        else {
            return Ok(None);
        };
        if let Some(slot) = attached {
            step.set_adapters(&bank)?;
            if !step.has_adapter(slot) {
                return Ok(None);
            }
        }
        let persistent = persistent && step.set_persistent_layers(true) >= rows;
        if !persistent {
            step.set_persistent_layers(false);
        }
        if !step.takes(rows) {
            return Ok(None);
        }
        let tables = (0..rows as u32)
            .map(|r| {
                let first = r * max_blocks as u32;
                (first..first + max_blocks as u32).collect()
            })
            .collect();
        Ok(Some(DecodeGraph {
            step,
            cache,
            capacity,
            tables,
            lengths: vec![0; rows],
            long_rope: vec![false; rows],
            bank,
            adapter: attached,
            attached: attached.is_some(),
            persistent,
        }))
    }

    /// Runs every row with `adapter`, unmerged (its products beside the base's, as `philo
    /// serve` runs a request that names one). The rows' caches were computed without it, so
    /// every row is emptied: prefill it again before the next step. A graph of a model with an
    /// adapter attached runs that one and refuses another; an adapter the step does not take
    /// is refused and the graph keeps the one it had.
    pub fn set_adapter(&mut self, model: &Phi3, adapter: &Adapter) -> Result<()> {
        if self.attached {
            return Err(err(
                "decode graph: the model has an adapter attached; build the graph from the base model to run another"
                    .into(),
            ));
        }
        let mut bank = LoraBank::new();
        let slot = bank.insert(adapter, model)?;
        self.step.set_adapters(&bank)?;
        if !self.step.has_adapter(slot) {
            self.step.set_adapters(&self.bank)?;
            return Err(err(format!(
                "decode graph: the decode step does not take this adapter (ranks up to {} in the model's dtype)",
                DecodeStep::MAX_RANK
            )));
        }
        self.bank = bank;
        self.adapter = Some(slot);
        self.lengths.fill(0);
        Ok(())
    }

    /// Runs steps (one sequence's, a verify step's, a few sequences') with every decoder layer in
    /// one persistent kernel when `on` (see [`DecodeStep::set_persistent_layers`]); returns the
    /// most rows a step runs it with (0: none).
    pub fn set_persistent_layers(&mut self, on: bool) -> usize {
        let most = self.step.set_persistent_layers(on);
        self.persistent = most >= self.rows();
        most
    }

    /// Whether steps of every row run their decoder layers in the persistent kernel.
    pub fn persistent_layers(&self) -> bool {
        self.persistent
    }

    /// Sequences the graph decodes together.
    fn rows(&self) -> usize {
        self.tables.len()
    }

    /// Tokens each sequence has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Prefills sequence `row` with `tokens` (its whole context so far; what the row held
    /// before is dropped) and returns the f32 logits of the last token. `long_rope` rotates
    /// with LongRoPE's long factors, as the model decides for the sequence's length.
    pub fn prefill(
        &mut self,
        model: &Phi3,
        row: usize,
        tokens: &[u32],
        long_rope: bool,
    ) -> Result<Vec<f32>> {
        if row >= self.rows() || tokens.is_empty() || tokens.len() > self.capacity {
            return Err(err(format!(
                "decode graph: prefill of {} tokens into row {row} (the graph has {} rows of {} tokens)",
                tokens.len(),
                self.rows(),
                self.capacity
            )));
        }
        let chunk = SeqChunk {
            tokens,
            past: 0,
            block_table: &self.tables[row],
            // An attached adapter applies in the model's own forward.
            adapter: self.adapter.filter(|_| !self.attached),
            long_rope,
        };
        let logits = model.forward_paged(&[chunk], &mut self.cache, &self.bank)?;
        self.lengths[row] = tokens.len();
        self.long_rope[row] = long_rope;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Feeds one token to every sequence (`tokens[row]`, appended after what the row holds)
    /// and runs the step; the results are read with [`DecodeGraph::logits`] or
    /// [`DecodeGraph::tokens`].
    pub fn step(&mut self, tokens: &[u32]) -> Result<()> {
        self.step_sampled(tokens, &vec![RowSampling::greedy(); tokens.len()], &[])
    }

    /// [`DecodeGraph::step`] with each row's next token chosen on the GPU as `sampling[row]`
    /// says, after `adjustments[row]` (its logit bias and penalties; an empty list: none for
    /// any row) — read it with [`DecodeGraph::tokens`]; where [`DecodeGraph::samples`] is false,
    /// the GPU gives the argmax of every row and takes no adjustments.
    pub fn step_sampled(
        &mut self,
        tokens: &[u32],
        sampling: &[RowSampling],
        adjustments: &[&[LogitAdjustment]],
    ) -> Result<()> {
        if tokens.len() != self.rows()
            || sampling.len() != self.rows()
            || !(adjustments.is_empty() || adjustments.len() == self.rows())
        {
            return Err(err(format!(
                "decode graph: {} tokens, {} sampling settings and {} adjustment lists for {} rows",
                tokens.len(),
                sampling.len(),
                adjustments.len(),
                self.rows()
            )));
        }
        if let Some(row) = self
            .lengths
            .iter()
            .position(|&l| l == 0 || l >= self.capacity)
        {
            return Err(err(format!(
                "decode graph: row {row} holds {} of {} tokens (prefill it first; a full row takes no more)",
                self.lengths[row], self.capacity
            )));
        }
        let rows: Vec<DecodeRow> = (0..self.rows())
            .map(|r| DecodeRow {
                token: tokens[r],
                len: self.lengths[r] + 1,
                long_rope: self.long_rope[r],
                block_table: &self.tables[r],
                sampling: sampling[r],
                adjustments: adjustments.get(r).copied().unwrap_or(&[]),
                adapter: self.adapter,
            })
            .collect();
        self.step.run(&rows)?;
        for l in &mut self.lengths {
            *l += 1;
        }
        Ok(())
    }

    /// Most tokens one [`DecodeGraph::verify`] takes (the last token and its proposals): up
    /// to [`MAX_VERIFY_ROWS`], as many rows as the step runs on the model's weights.
    pub fn verify_rows(&self) -> usize {
        (1..=MAX_VERIFY_ROWS)
            .rev()
            .find(|&n| self.step.takes(n))
            .unwrap_or(1)
    }

    /// Speculation's verify step for sequence `row`: `tokens` (its last token, then the
    /// proposals) are fed at the positions after what the row holds, each as a row of one step
    /// that attends to the row's cache up to its own position (every row's keys and values are
    /// written before any row attends). [`DecodeGraph::logits`] and [`DecodeGraph::tokens`]
    /// then hold one row per token: what the model predicts after each. The row keeps all of
    /// `tokens`; [`DecodeGraph::rewind`] drops those of rejected proposals.
    pub fn verify(&mut self, row: usize, tokens: &[u32]) -> Result<()> {
        let held = self.lengths.get(row).copied().unwrap_or(0);
        let most = self.verify_rows();
        if held == 0
            || tokens.is_empty()
            || tokens.len() > most
            || held + tokens.len() > self.capacity
        {
            return Err(err(format!(
                "decode graph: verify of {} tokens after {held} in row {row} (at most {most} tokens, rows of {})",
                tokens.len(),
                self.capacity
            )));
        }
        let rows: Vec<DecodeRow> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| DecodeRow {
                token,
                len: held + 1 + i,
                long_rope: self.long_rope[row],
                block_table: &self.tables[row],
                sampling: RowSampling::greedy(),
                adjustments: &[],
                adapter: self.adapter,
            })
            .collect();
        self.step.run(&rows)?;
        self.lengths[row] = held + tokens.len();
        Ok(())
    }

    /// Keeps the first `len` tokens of sequence `row` (at least one, at most what it holds):
    /// the cache slots past them are written again by the next step.
    pub fn rewind(&mut self, row: usize, len: usize) -> Result<()> {
        match self.lengths.get_mut(row) {
            Some(held) if len > 0 && len <= *held => {
                *held = len;
                Ok(())
            }
            _ => Err(err(format!(
                "decode graph: rewind of row {row} to {len} tokens (it holds {:?})",
                self.lengths.get(row)
            ))),
        }
    }

    /// The last step's f32 logits `[rows, vocab]`, row-major.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.step.logits()
    }

    /// The last step's token per row, chosen on the GPU: the argmax (lowest id on ties) after
    /// [`DecodeGraph::step`], as each row's settings say after [`DecodeGraph::step_sampled`].
    pub fn tokens(&self) -> Result<Vec<u32>> {
        self.step.tokens()
    }

    /// Whether the GPU samples (else it only takes the argmax; vocabularies above
    /// `philo_kernels::sampling::MAX_VOCAB`).
    pub fn samples(&self) -> bool {
        self.step.samples()
    }

    /// Tokens each row holds in its cache.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
}
