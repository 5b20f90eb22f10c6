//! Loss and LoRA gradients of one micro-batch through the hand-written decoder layer
//! (`philo_model::train_layer`), with or without gradient checkpointing.

use candle_core::{DType, Tensor};
use philo_model::{CheckpointState, DropoutSeed, LayerContext, LoraGrad, LoraGrads, Phi3};

use crate::error::{Result, TrainError};
use crate::lora_params::LoraParams;
use crate::loss::chunked_head_loss;
use crate::offload::{Checkpoints, OffloadPool};
use crate::profile::Profiler;
use philo_kernels::profile::time;

/// Labelled rows per chunk of the lean loss: 4,096 × 32,064 bf16 logits and their gradient are
/// about 0.5 GiB together.
pub const LOSS_CHUNK_ROWS: usize = 4096;

/// Tokens per row chunk of a layer's forward and backward on the GPU: the activations a
/// layer's backward keeps shrink with the chunk, while the matmuls stay large.
pub const CHUNK_TOKENS: usize = 8192;

/// Rows of a `[batch, seq]` micro-batch that one GPU row chunk holds.
pub fn rows_per_chunk(batch: usize, seq: usize) -> usize {
    (CHUNK_TOKENS / seq.max(1)).clamp(1, batch.max(1))
}

/// One micro-batch on the model's device.
pub struct MicroBatch {
    /// `[batch, seq]` u32.
    pub input_ids: Tensor,
    /// `[batch, seq]` segment ids (0 padding, 1.. sample), or None for unpadded single samples.
    pub segments: Option<Tensor>,
    /// `[batch][seq]`, -100 where the loss does not count (not yet shifted).
    pub labels: Vec<Vec<i64>>,
}

/// f32 gradient accumulators of every LoRA parameter, aligned with `LoraParams::params`; the
/// backward adds to them, so they sum over the micro-batches of an accumulation window.
pub struct GradBuffers {
    /// By adapter id, sharing storage with `grads`.
    by_adapter: LoraGrads,
    pub grads: Vec<Tensor>,
}

impl GradBuffers {
    /// Zeroed accumulators for `params`.
    pub fn zeros(params: &LoraParams) -> Result<Self> {
        let grads = params
            .params
            .iter()
            .map(|p| Ok(Tensor::zeros(p.var.shape(), DType::F32, p.var.device())?))
            .collect::<Result<Vec<_>>>()?;
        let by_adapter = params
            .adapters
            .iter()
            .map(|&(id, a, b)| {
                (
                    id,
                    LoraGrad {
                        a: grads[a].clone(),
                        b: grads[b].clone(),
                    },
                )
            })
            .collect();
        Ok(GradBuffers { by_adapter, grads })
    }
}

/// Summed loss of a micro-batch and d(sum / normalizer)/d(param) for every LoRA parameter.
pub struct Gradients {
    /// Sum of the token losses (not divided).
    pub loss_sum: f64,
    /// Aligned with `LoraParams::params`.
    pub grads: Vec<Tensor>,
}

/// Forward and backward of `batch` into fresh accumulators (see [`accumulate`]).
pub fn loss_and_grads(
    model: &Phi3,
    params: &LoraParams,
    batch: &MicroBatch,
    normalizer: usize,
    options: PassOptions,
    dropout: Option<DropoutSeed>,
) -> Result<Gradients> {
    let buffers = GradBuffers::zeros(params)?;
    let loss_sum = accumulate(
        model,
        &buffers,
        batch,
        normalizer,
        dropout,
        options,
        &mut StepContext::new(model.device(), model.dtype()),
    )?;
    Ok(Gradients {
        loss_sum,
        grads: buffers.grads,
    })
}

/// How a micro-batch's activations are kept for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassOptions {
    /// Keep only each decoder layer's checkpoint (its input, attention output and residual)
    /// and recompute the layer right before its backward, so activation memory is that of one
    /// layer's row chunk.
    pub checkpointing: bool,
    /// With checkpointing on a GPU: keep those checkpoints in pinned host memory (see
    /// [`crate::offload`]).
    pub offload: bool,
    /// With checkpointing: the last `uncheckpointed_layers` decoder layers keep what their
    /// backward needs instead, so they are not recomputed (faster, at a layer's state each).
    pub uncheckpointed_layers: usize,
}

impl PassOptions {
    /// Every layer checkpointed (its input kept on the device) and recomputed.
    pub const CHECKPOINTED: PassOptions = PassOptions {
        checkpointing: true,
        offload: false,
        uncheckpointed_layers: 0,
    };
    /// Every layer keeps what its backward needs.
    pub const KEEP_ALL: PassOptions = PassOptions {
        checkpointing: false,
        offload: false,
        uncheckpointed_layers: 0,
    };
}

/// What persists from one micro-batch to the next: the pinned buffers of gradient offload, the
/// loss scaler of f16 training and the phase profiler.
pub struct StepContext {
    pub pool: OffloadPool,
    /// Set when the model computes in f16 (see [`LossScaler`]).
    pub scaler: Option<LossScaler>,
    pub profiler: Profiler,
}

impl StepContext {
    /// For a model on `device` computing in `dtype`: f16 gets dynamic loss scaling. On CUDA the
    /// device's memory pool keeps freed memory from here on (`memory::keep_freed_memory`).
    pub fn new(device: &candle_core::Device, dtype: DType) -> Self {
        philo_model::memory::keep_freed_memory(device);
        StepContext {
            pool: OffloadPool::default(),
            scaler: (dtype == DType::F16).then(LossScaler::default),
            profiler: Profiler::from_env(device),
        }
    }

    /// The factor the loss's gradient is multiplied by (1 without a scaler).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale)
    }
}

/// Dynamic loss scaling for f16, with the rules and defaults of torch's GradScaler: gradients
/// flow multiplied by `scale` so small values survive f16; a step whose gradients overflowed is
/// skipped and the scale halved; after `growth_interval` good steps in a row it doubles.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: usize,
    good_steps: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler::new(65536.0)
    }
}

impl LossScaler {
    pub fn new(scale: f64) -> Self {
        LossScaler {
            scale,
            growth_interval: 2000,
            good_steps: 0,
        }
    }

    /// Records a step whose gradients were `finite` (or not) and adjusts the scale.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }
}

/// Forward and backward of `batch`: adds d(loss_sum / `normalizer`)/d(param) to `buffers`
/// (`normalizer` is the number of labelled tokens of the whole accumulation window) and returns
/// the summed loss.
pub fn accumulate(
    model: &Phi3,
    buffers: &GradBuffers,
    batch: &MicroBatch,
    normalizer: usize,
    dropout: Option<DropoutSeed>,
    options: PassOptions,
    step: &mut StepContext,
) -> Result<f64> {
    let layers = model.config().num_hidden_layers;
    // Layers below `recomputed_layers` are checkpointed; the rest keep their activations.
    let recomputed_layers = if options.checkpointing {
        layers.saturating_sub(options.uncheckpointed_layers)
    } else {
        0
    };
    let loss_scale = step.loss_scale();
    let profiler = &mut step.profiler;
    let ctx = model.context(&batch.input_ids, batch.segments.as_ref(), 0, dropout)?;
    let scale = loss_scale / normalizer.max(1) as f64;
    let (b, s) = batch.input_ids.dims2()?;
    // On the GPU a layer runs in row chunks of about CHUNK_TOKENS tokens. The same chunks are
    // used in the forward and the recomputation, so dropout masks agree.
    let chunk_rows = if model.device().is_cuda() {
        rows_per_chunk(b, s)
    } else {
        b
    };
    let chunks: Vec<(usize, usize)> = (0..b)
        .step_by(chunk_rows)
        .map(|start| (start, chunk_rows.min(b - start)))
        .collect();
    // One chunk's context is the whole batch's: rows start..start+len, dropout seed moved.
    let contexts = chunks
        .iter()
        .map(|&(start, len)| ctx.rows(start, len))
        .collect::<std::result::Result<Vec<LayerContext>, _>>()?;

    // The residual stream as row chunks: each layer writes its chunks' outputs separately and
    // the next layer reads them as they are (concatenating them cost 0.27 ms a layer).
    let mut x = row_chunks(&model.embed(&batch.input_ids)?, &chunks)?;
    let mut checkpoints = Checkpoints::new(
        model.device(),
        recomputed_layers > 0 && options.offload,
        &mut step.pool,
    )?;
    let mut saved = Vec::with_capacity(layers);
    for i in 0..layers {
        let checkpointing = i < recomputed_layers;
        let weights = model.layer_weights(i)?;
        let mut outs = Vec::with_capacity(chunks.len());
        let mut kept = Vec::with_capacity(chunks.len());
        // The checkpoint: the layer input's chunks, then each chunk's attention output,
        // logsumexp and post-attention residual.
        let mut states = Vec::with_capacity(3 * chunks.len());
        for (c, chunk) in x.iter().enumerate() {
            if checkpointing {
                let (out, state) = model.layer_forward_train(i, chunk, &contexts[c], &weights)?;
                outs.push(out);
                states.extend([state.attn, state.lse, state.residual]);
            } else {
                let (out, keep) = model.layer_forward_keep(i, chunk, &contexts[c], &weights)?;
                outs.push(out);
                kept.push(keep);
            }
        }
        let input = std::mem::replace(&mut x, outs);
        if checkpointing {
            checkpoints.push(i, input.into_iter().chain(states).collect())?;
        }
        saved.push(kept);
    }
    // The head reads the whole batch; the chunks are freed here.
    let x = if x.len() == 1 {
        x.swap_remove(0)
    } else {
        Tensor::cat(&std::mem::take(&mut x), 0)?
    };
    profiler.lap("forward")?;

    let head = model.head_weight().ok_or_else(|| {
        TrainError::Config(
            "the LM head carries an adapter: philo trains adapters on the decoder layers only"
                .into(),
        )
    })?;
    if recomputed_layers > 0 {
        checkpoints.prefetch(recomputed_layers - 1)?;
    }
    let device = model.device();
    let head_loss = time(device, "head + loss", || {
        let normed = model.norm.forward(&x).map_err(candle_core::Error::wrap)?;
        let out = chunked_head_loss(&normed, &head, &batch.labels, scale, LOSS_CHUNK_ROWS)
            .map_err(candle_core::Error::wrap)?;
        out.map(
            |(loss_sum, d_normed)| -> candle_core::Result<(f64, Tensor)> {
                let upstream = philo_kernels::rms_norm::backward(
                    &x,
                    &model.norm.weight,
                    &d_normed,
                    model.norm.eps,
                    None,
                )?;
                Ok((loss_sum, upstream))
            },
        )
        .transpose()
    })?;
    let (loss_sum, upstream) =
        head_loss.ok_or_else(|| TrainError::Data("the batch has no labelled token".into()))?;
    // Row chunks again, as the layers' backward produces them.
    let mut upstream = row_chunks(&upstream, &chunks)?;
    profiler.lap("head + loss")?;

    for i in (0..layers).rev() {
        let weights = model.layer_weights(i)?;
        let kept = saved.pop().unwrap_or_default();
        let checkpoint = if i < recomputed_layers {
            let tensors = checkpoints.take(i)?;
            if i > 0 {
                checkpoints.prefetch(i - 1)?;
            }
            tensors
        } else {
            Vec::new()
        };
        let mut input_grads = Vec::with_capacity(chunks.len());
        for c in 0..chunks.len() {
            let recomputed;
            let layer_saved = match kept.get(c) {
                Some(s) => s,
                None => {
                    let n = chunks.len();
                    let [input, attn, lse, residual] =
                        [c, n + 3 * c, n + 3 * c + 1, n + 3 * c + 2].map(|j| checkpoint.get(j));
                    let (Some(input), Some(attn), Some(lse), Some(residual)) =
                        (input, attn, lse, residual)
                    else {
                        return Err(TrainError::Internal(format!(
                            "layer {i} kept neither its checkpoint nor its state"
                        )));
                    };
                    let state = CheckpointState {
                        attn: attn.clone(),
                        lse: lse.clone(),
                        residual: residual.clone(),
                    };
                    recomputed = model.layer_recompute(i, input, &contexts[c], &weights, &state)?;
                    &recomputed
                }
            };
            input_grads.push(model.layer_backward(
                i,
                layer_saved,
                &upstream[c],
                &contexts[c],
                &weights,
                &buffers.by_adapter,
            )?);
        }
        upstream = input_grads;
    }
    profiler.lap("recompute + backward")?;
    Ok(loss_sum)
}

/// Views of `t`'s rows `start .. start + len` for each `(start, len)` of `chunks`.
fn row_chunks(t: &Tensor, chunks: &[(usize, usize)]) -> Result<Vec<Tensor>> {
    Ok(chunks
        .iter()
        .map(|&(start, len)| t.narrow(0, start, len))
        .collect::<candle_core::Result<Vec<_>>>()?)
}
