//! Loss and LoRA gradients of one micro-batch, with or without gradient checkpointing.

use candle_core::{Tensor, Var};
use philo_model::{DropoutSeed, Phi3};

use crate::error::{Result, TrainError};
use crate::lora_params::LoraParams;
use crate::loss::{causal_lm_loss_sum, chunked_head_loss};

/// Labelled rows per chunk of the lean loss: 4,096 × 32,064 bf16 logits and their gradient are
/// about 0.5 GiB together.
const LOSS_CHUNK_ROWS: usize = 4096;

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
        let mut inputs = Vec::with_capacity(layers);
        let mut x = embedded;
        for i in 0..layers {
            inputs.push(x.clone());
            x = model.layer_forward(i, &x, &ctx)?.detach();
        }
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
        let mut upstream = store
            .get(last.as_tensor())
            .cloned()
            .ok_or_else(|| TrainError::Config("no gradient reached the last layer".into()))?;
        for i in (0..layers).rev() {
            let input = Var::from_tensor(&inputs[i])?;
            let out = model.layer_forward(i, input.as_tensor(), &ctx)?;
            // d(sum(out · g))/d(θ) = the chain rule with g = dL/d(out).
            let store = (out * &upstream)?.sum_all()?.backward()?;
            collect(&store)?;
            if i > 0 {
                upstream = store
                    .get(input.as_tensor())
                    .cloned()
                    .ok_or_else(|| TrainError::Config(format!("no gradient reached layer {i}")))?;
            }
        }
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
