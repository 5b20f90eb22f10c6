//! One step of a serving engine: a batch of independent sequences, each feeding a chunk of new
//! tokens (a prompt chunk, or the one token being decoded) on top of what the paged KV cache
//! already holds for it, each with its own LoRA adapter or none.
//!
//! All tokens of the step run through the linear layers as one matrix; only attention is per
//! sequence: decoding sequences go together through the paged decode kernel, sequences' first
//! chunks together through one flash attention over the step's own keys (packed, a segment
//! each), and a later chunk gathers its sequence's blocks and runs flash attention with the
//! cached keys in front.

use std::ops::Range;

use candle_core::{DType, Tensor};
use philo_kernels::attention::{flash_attention, AttentionMask};
use philo_kernels::paged_attention::{paged_decode_attention, write_kv};
use philo_kernels::rope::qkv_rope;

use crate::decoder_layer::{AttentionCore, Projections};
use crate::error::{ModelError, Result};
use crate::lora_bank::LoraBank;
use crate::lora_linear::LoraLinear;
use crate::paged_kv_cache::PagedKvCache;
use crate::phi3::{Attention, Phi3};

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The new tokens (at least one).
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache; the new ones take positions past.. .
    pub past: usize,
    /// The sequence's blocks in order, covering at least past + tokens.len() positions.
    pub block_table: &'a [u32],
    /// [`LoraBank`] slot of the adapter, None for the base model.
    pub adapter: Option<usize>,
    /// Rotate with LongRoPE's long factors (decided once per sequence, from its longest length,
    /// so the cached keys never need recomputing).
    pub long_rope: bool,
}

/// How attention runs for a range of the step's token rows.
enum AttentionRun {
    /// Consecutive decoding sequences (one token each): one paged decode launch.
    Decode {
        rows: Range<usize>,
        tables: Tensor,
        lens: Tensor,
    },
    /// One sequence's chunk of several tokens over its `len` cached + new positions.
    Chunk {
        rows: Range<usize>,
        blocks: Tensor,
        len: usize,
    },
    /// Consecutive chunks of several tokens, each its sequence's first (nothing cached before
    /// it): one flash attention over the step's own keys and values, packed, each chunk a
    /// segment (`[1, rows]` u32 ids; None for one chunk), no gather from the cache.
    Fresh {
        rows: Range<usize>,
        segments: Option<Tensor>,
    },
}

/// The step's rows that use one adapter (None: every row does).
struct AdapterRows {
    slot: usize,
    rows: Option<Tensor>,
}

/// Everything the layers share in one step.
struct StepContext<'a> {
    cos: Tensor,
    sin: Tensor,
    slots: Tensor,
    runs: Vec<AttentionRun>,
    adapters: Vec<AdapterRows>,
    bank: &'a LoraBank,
}

impl Phi3 {
    /// Runs one engine step and returns the f32 logits `[chunks.len(), vocab]` of each chunk's
    /// last token. The chunks' keys/values are written into `cache` at their positions.
    pub fn forward_paged(
        &self,
        chunks: &[SeqChunk],
        cache: &mut PagedKvCache,
        bank: &LoraBank,
    ) -> Result<Tensor> {
        let ctx = self.step_context(chunks, cache, bank)?;
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (1, total), self.device())?;
        let mut attention = PagedAttention {
            ctx: &ctx,
            cache,
            rotary_dim: self.rotary().rotary_dim(),
            window: self.config().sliding_window.unwrap_or(usize::MAX),
        };
        let mut x = self.embed(&ids)?;
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (residual, mlp) = layer.forward(i, &x, pending.as_ref(), &mut attention, &ctx)?;
            x = residual;
            pending = Some(mlp);
        }
        let last_rows: Vec<u32> = chunks
            .iter()
            .scan(0u32, |end, c| {
                *end += c.tokens.len() as u32;
                Some(*end - 1)
            })
            .collect();
        let last_rows = Tensor::new(last_rows.as_slice(), self.device())?;
        let pick = |t: &Tensor| t.squeeze(0)?.index_select(&last_rows, 0);
        let x = pick(&x)?;
        let pending = pending.as_ref().map(pick).transpose()?;
        let hidden = self.norm.forward_after_add(&x, pending.as_ref())?.1;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }

    fn step_context<'a>(
        &self,
        chunks: &[SeqChunk],
        cache: &PagedKvCache,
        bank: &'a LoraBank,
    ) -> Result<StepContext<'a>> {
        let bs = cache.block_size();
        let dev = self.device();
        let (mut positions, mut long, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for (i, c) in chunks.iter().enumerate() {
            let len = c.past + c.tokens.len();
            if c.tokens.is_empty() || c.block_table.len() * bs < len {
                return Err(step_error(format!(
                    "chunk {i} has {} new tokens after {} cached, but its block table covers {} positions",
                    c.tokens.len(),
                    c.past,
                    c.block_table.len() * bs
                )));
            }
            if let Some(&b) = c
                .block_table
                .iter()
                .find(|&&b| b as usize >= cache.num_blocks())
            {
                return Err(step_error(format!(
                    "chunk {i} names block {b}, but the cache has {}",
                    cache.num_blocks()
                )));
            }
            if let Some(slot) = c.adapter.filter(|&s| !bank.contains(s)) {
                return Err(step_error(format!(
                    "chunk {i} names adapter slot {slot}, which is empty"
                )));
            }
            for p in c.past..len {
                positions.push(p as u32);
                long.push(c.long_rope);
                slots.push(c.block_table[p / bs] * bs as u32 + (p % bs) as u32);
            }
        }
        let total = positions.len();
        let half = self.rotary().rotary_dim() / 2;
        let (cos, sin) = self
            .rotary()
            .cos_sin_per_token(&positions, &long, self.dtype(), dev)?;

        let mut runs = Vec::new();
        let mut row = 0;
        let mut i = 0;
        while i < chunks.len() {
            if chunks[i].tokens.len() == 1 {
                // A run of consecutive decoding sequences.
                let start = i;
                while i < chunks.len() && chunks[i].tokens.len() == 1 {
                    i += 1;
                }
                let run = &chunks[start..i];
                let max_blocks = run.iter().map(|c| c.block_table.len()).max().unwrap_or(1);
                let mut tables = vec![0u32; run.len() * max_blocks];
                for (r, c) in run.iter().enumerate() {
                    tables[r * max_blocks..][..c.block_table.len()].copy_from_slice(c.block_table);
                }
                let lens: Vec<u32> = run.iter().map(|c| (c.past + 1) as u32).collect();
                runs.push(AttentionRun::Decode {
                    rows: row..row + run.len(),
                    tables: Tensor::from_vec(tables, (run.len(), max_blocks), dev)?,
                    lens: Tensor::from_vec(lens, run.len(), dev)?,
                });
                row += run.len();
            } else if chunks[i].past == 0 {
                // A run of sequences' first chunks: their keys are all in this step.
                let start = i;
                while i < chunks.len() && chunks[i].past == 0 && chunks[i].tokens.len() > 1 {
                    i += 1;
                }
                let run = &chunks[start..i];
                let n: usize = run.iter().map(|c| c.tokens.len()).sum();
                let segments = match run.len() {
                    1 => None,
                    _ => {
                        let ids: Vec<u32> = (1..=run.len() as u32)
                            .zip(run)
                            .flat_map(|(id, c)| std::iter::repeat_n(id, c.tokens.len()))
                            .collect();
                        Some(Tensor::from_vec(ids, (1, n), dev)?)
                    }
                };
                runs.push(AttentionRun::Fresh {
                    rows: row..row + n,
                    segments,
                });
                row += n;
            } else {
                let c = &chunks[i];
                let len = c.past + c.tokens.len();
                let blocks = c.block_table[..len.div_ceil(bs)].to_vec();
                runs.push(AttentionRun::Chunk {
                    rows: row..row + c.tokens.len(),
                    blocks: Tensor::new(blocks.as_slice(), dev)?,
                    len,
                });
                row += c.tokens.len();
                i += 1;
            }
        }

        let mut adapters = Vec::new();
        let mut used: Vec<usize> = chunks.iter().filter_map(|c| c.adapter).collect();
        used.sort_unstable();
        used.dedup();
        for slot in used {
            let rows: Vec<u32> = chunks
                .iter()
                .scan(0u32, |start, c| {
                    let r = *start..*start + c.tokens.len() as u32;
                    *start = r.end;
                    Some((c.adapter, r))
                })
                .filter(|(a, _)| *a == Some(slot))
                .flat_map(|(_, r)| r)
                .collect();
            let rows = (rows.len() != total)
                .then(|| Tensor::new(rows.as_slice(), dev))
                .transpose()?;
            adapters.push(AdapterRows { slot, rows });
        }

        Ok(StepContext {
            cos: cos.reshape((1, total, half))?,
            sin: sin.reshape((1, total, half))?,
            slots: Tensor::from_vec(slots, total, dev)?,
            runs,
            adapters,
            bank,
        })
    }
}

/// The serving step's attention core: the step's keys and values written into the paged
/// cache, then each run of rows attended its own way (see [`AttentionRun`]).
struct PagedAttention<'a> {
    ctx: &'a StepContext<'a>,
    cache: &'a PagedKvCache,
    rotary_dim: usize,
    window: usize,
}

impl AttentionCore for PagedAttention<'_> {
    fn attend(&mut self, layer: usize, heads: &Attention, qkv: &Tensor) -> Result<Tensor> {
        let shape = heads.qkv_shape(self.rotary_dim);
        let (h, kvh, d, window) = (shape.heads, shape.kv_heads, shape.head_dim, self.window);
        let ctx = self.ctx;
        let heads = qkv_rope(qkv, &ctx.cos, &ctx.sin, shape)?.squeeze(0)?;
        let (k_cache, v_cache) = (&self.cache.keys[layer], &self.cache.values[layer]);
        write_kv(k_cache, &heads.narrow(0, h, kvh)?, &ctx.slots)?;
        write_kv(v_cache, &heads.narrow(0, h + kvh, kvh)?, &ctx.slots)?;
        let q = heads.narrow(0, 0, h)?;
        let mut pieces = Vec::with_capacity(ctx.runs.len());
        for run in &ctx.runs {
            let piece = match run {
                AttentionRun::Decode { rows, tables, lens } => {
                    let q = q.narrow(1, rows.start, rows.len())?.contiguous()?;
                    paged_decode_attention(&q, k_cache, v_cache, tables, lens, window)?
                        .reshape((rows.len(), h * d))?
                }
                AttentionRun::Fresh { rows, segments } => {
                    let own = |at: usize, n: usize| -> Result<Tensor> {
                        Ok(heads
                            .narrow(0, at, n)?
                            .narrow(1, rows.start, rows.len())?
                            .unsqueeze(0)?
                            .contiguous()?)
                    };
                    let mask = AttentionMask {
                        window,
                        segments: segments.clone(),
                    };
                    flash_attention(&own(0, h)?, &own(h, kvh)?, &own(h + kvh, kvh)?, &mask)?
                        .reshape((rows.len(), h * d))?
                }
                AttentionRun::Chunk { rows, blocks, len } => {
                    let q = q.narrow(1, rows.start, rows.len())?.unsqueeze(0)?;
                    let k = gather(k_cache, blocks, *len)?;
                    let v = gather(v_cache, blocks, *len)?;
                    let mask = AttentionMask {
                        window,
                        segments: None,
                    };
                    flash_attention(&q.contiguous()?, &k, &v, &mask)?
                        .reshape((rows.len(), h * d))?
                }
            };
            pieces.push(piece);
        }
        Ok(Tensor::cat(&pieces, 0)?.unsqueeze(0)?)
    }
}

/// Every row through the base projection, each adapter's rows through its delta too.
impl Projections for StepContext<'_> {
    fn project(
        &self,
        layer: usize,
        module: &'static str,
        linear: &LoraLinear,
        x: &Tensor,
    ) -> Result<Tensor> {
        linear_with_adapters(linear, layer, module, x, self)
    }
}

fn step_error(message: String) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("forward_paged: {message}")))
}

/// The base layer for every row plus each adapter's delta on its own rows. `x` is `[1, T, in]`.
fn linear_with_adapters(
    linear: &LoraLinear,
    layer: usize,
    module: &'static str,
    x: &Tensor,
    ctx: &StepContext,
) -> Result<Tensor> {
    let mut y = linear.forward(x)?;
    for group in &ctx.adapters {
        let rows_x = x.squeeze(0)?;
        let rows_x = match &group.rows {
            Some(rows) => rows_x.index_select(rows, 0)?,
            None => rows_x,
        };
        let Some(delta) = ctx.bank.delta(group.slot, layer, module, &rows_x)? else {
            continue;
        };
        y = match &group.rows {
            Some(rows) => y.squeeze(0)?.index_add(rows, &delta, 0)?.unsqueeze(0)?,
            None => (y + delta.unsqueeze(0)?)?,
        };
    }
    Ok(y)
}

/// The first `len` positions of one sequence's keys (or values) from its `blocks`, contiguous
/// `[1, kv_heads, len, head_dim]` as flash attention takes them.
fn gather(cache: &Tensor, blocks: &Tensor, len: usize) -> Result<Tensor> {
    let (_, kvh, bs, d) = cache.dims4()?;
    let n = blocks.dim(0)?;
    Ok(cache
        .index_select(blocks, 0)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((1, kvh, n * bs, d))?
        .narrow(2, 0, len)?
        .contiguous()?)
}
