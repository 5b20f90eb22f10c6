//! Loss and LoRA gradients of one micro-batch, with or without gradient checkpointing.

use candle_core::{Tensor, Var};
use philo_model::{DropoutSeed, Phi3};

use crate::error::{Result, TrainError};
use crate::lora_params::LoraParams;
use crate::loss::{causal_lm_loss_sum, chunked_head_loss};

/// Labelled rows per chunk of the lean loss: 4,096 × 32,064 bf16 logits and their gradient are
/// about 0.5 GiB together.
const LOSS_CHUNK_ROWS: usize = 4096;

/// With `PHILO_PROFILE=1`, times the phases of each micro-batch (synchronising the device at
/// each boundary, which costs a little speed) and prints them to stderr.
struct PhaseClock {
    device: Option<candle_core::Device>,
    last: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    fn new(device: &candle_core::Device) -> Self {
        let on = std::env::var("PHILO_PROFILE").as_deref() == Ok("1");
        PhaseClock {
            device: on.then(|| device.clone()),
            last: std::time::Instant::now(),
            phases: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) -> Result<()> {
        if let Some(device) = &self.device {
            device.synchronize()?;
            let now = std::time::Instant::now();
            self.phases.push((phase, (now - self.last).as_secs_f64()));
            self.last = now;
        }
        Ok(())
    }

    fn report(&self) {
        if self.device.is_some() {
            let parts: Vec<String> = self
                .phases
                .iter()
                .map(|(p, t)| format!("{p} {:.3} s", t))
                .collect();
            eprintln!("[profile] {}", parts.join(", "));
        }
    }
}

/// Tokens per row chunk of a layer's forward and backward on the GPU (see `loss_and_grads`).
const CHUNK_TOKENS: usize = 8192;

/// One micro-batch on the model's device.
pub struct MicroBatch {
    /// `[batch, seq]` u32.
    pub input_ids: Tensor,
    /// `[batch, seq]` segment ids (0 padding, 1.. sample), or None for unpadded single samples.
    pub segments: Option<Tensor>,
    /// `[batch][seq]`, -100 where the loss does not count (not yet shifted).
    pub labels: Vec<Vec<i64>>,
}

/// Summed loss of a micro-batch and d(sum / normalizer)/d(param) for every LoRA parameter.
pub struct Gradients {
    /// Sum of the token losses (not divided).
    pub loss_sum: f64,
    /// Aligned with `LoraParams::params`.
    pub grads: Vec<Tensor>,
}

/// Forward and backward of `batch`. The gradient is of loss_sum / `normalizer` (the number of
/// labelled tokens of the whole accumulation window). With `checkpointing`, only each decoder
/// layer's input is kept during the forward; each layer is recomputed during the backward, so
/// activation memory is that of one layer.
pub fn loss_and_grads(
    model: &Phi3,
    params: &LoraParams,
    batch: &MicroBatch,
    normalizer: usize,
    checkpointing: bool,
    dropout: Option<DropoutSeed>,
) -> Result<Gradients> {
    let mut clock = PhaseClock::new(model.device());
    let ctx = model.context(&batch.input_ids, batch.segments.as_ref(), 0, dropout)?;
    let layers = model.config().num_hidden_layers;
    let embedded = model.embed(&batch.input_ids)?.detach();
    let scale = 1.0 / normalizer.max(1) as f64;
    let mut grads: Vec<Option<Tensor>> = vec![None; params.params.len()];
    let mut collect = |store: &candle_core::backprop::GradStore| {
        for (slot, param) in grads.iter_mut().zip(&params.params) {
            if let Some(g) = store.get(param.var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok::<(), candle_core::Error>(())
    };
    let no_loss = || TrainError::Config("the batch has no labelled token".into());

    let loss_sum = if checkpointing {
        // On the GPU a layer runs in row chunks of about CHUNK_TOKENS tokens: the activations a
        // layer's backward keeps shrink with the chunk, while the matmuls stay large. The same
        // chunks are used in the forward and the recomputation, so dropout masks agree.
        let (b, s) = batch.input_ids.dims2()?;
        let rows_per_chunk = if model.uses_fused_kernels() {
            (CHUNK_TOKENS / s).clamp(1, b)
        } else {
            b
        };
        let chunks: Vec<(usize, usize)> = (0..b)
            .step_by(rows_per_chunk)
            .map(|start| (start, rows_per_chunk.min(b - start)))
            .collect();
        // One chunk's context is the whole batch's: rows 0..b, dropout seed unchanged.
        let contexts = chunks
            .iter()
            .map(|&(start, len)| ctx.rows(start, len))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut inputs = Vec::with_capacity(layers);
        let mut x = embedded;
        for i in 0..layers {
            inputs.push(x.clone());
            let outs = chunks
                .iter()
                .enumerate()
                .map(|(c, &(start, len))| {
                    Ok(model
                        .layer_forward(i, &x.narrow(0, start, len)?, &contexts[c])?
                        .detach())
                })
                .collect::<Result<Vec<_>>>()?;
            x = Tensor::cat(&outs, 0)?;
        }
        clock.lap("forward")?;
        let last = Var::from_tensor(&x)?;
        let (loss_sum, store) = match model.lean_head_weight() {
            // Lean loss: logits chunk by chunk, their gradient in the same kernel.
            Some(head) => {
                let normed = model.norm.forward(last.as_tensor())?;
                let (loss_sum, d_normed) = chunked_head_loss(
                    &normed.detach(),
                    &head,
                    &batch.labels,
                    scale,
                    LOSS_CHUNK_ROWS,
                )?
                .ok_or_else(no_loss)?;
                let store = (normed * d_normed)?.sum_all()?.backward()?;
                (Tensor::new(loss_sum, x.device())?, store)
            }
            None => {
                let loss_sum = causal_lm_loss_sum(&model.head(last.as_tensor())?, &batch.labels)?
                    .ok_or_else(no_loss)?;
                let store = (&loss_sum * scale)?.backward()?;
                (loss_sum, store)
            }
        };
        collect(&store)?;
        clock.lap("head + loss")?;
        let mut upstream = store
            .get(last.as_tensor())
            .cloned()
            .ok_or_else(|| TrainError::Config("no gradient reached the last layer".into()))?;
        for i in (0..layers).rev() {
            let mut input_grads = Vec::with_capacity(chunks.len());
            for (c, &(start, len)) in chunks.iter().enumerate() {
                let input = Var::from_tensor(&inputs[i].narrow(0, start, len)?)?;
                let out = model.layer_forward(i, input.as_tensor(), &contexts[c])?;
                // d(sum(out · g))/d(θ) = the chain rule with g = dL/d(out).
                let store = (out * upstream.narrow(0, start, len)?)?
                    .sum_all()?
                    .backward()?;
                collect(&store)?;
                if i > 0 {
                    input_grads.push(store.get(input.as_tensor()).cloned().ok_or_else(|| {
                        TrainError::Config(format!("no gradient reached layer {i}"))
                    })?);
                }
            }
            if i > 0 {
                upstream = Tensor::cat(&input_grads, 0)?;
            }
        }
        clock.lap("recompute + backward")?;
        clock.report();
        loss_sum
    } else {
        let mut x = embedded;
        for i in 0..layers {
            x = model.layer_forward(i, &x, &ctx)?;
        }
        let loss_sum = causal_lm_loss_sum(&model.head(&x)?, &batch.labels)?.ok_or_else(no_loss)?;
        let store = (&loss_sum * scale)?.backward()?;
        collect(&store)?;
        loss_sum
    };
    let grads = grads
        .into_iter()
        .zip(&params.params)
        .map(|(g, p)| match g {
            Some(g) => Ok(g),
            None => Ok(p.var.zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Gradients {
        loss_sum: loss_sum
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?,
        grads,
    })
}
