//! One optimizer step, the same for `philo finetune` and `philo bench train`: the forward and
//! backward of every micro-batch of an accumulation window into f32 accumulators (the loss
//! normalised over the window's labelled tokens, so accumulation equals one big batch), then
//! gradient-norm clipping and the AdamW update. In f16 the step runs under dynamic loss
//! scaling (`backward::LossScaler`): a step whose gradients overflowed is skipped. In a
//! data-parallel run (`comm`) the window is this rank's share: the normaliser, the loss and
//! the gradients are summed over the ranks, so every rank takes the update of the whole window.

use candle_core::Tensor;
use philo_kernels::profile::time;
use philo_model::{DropoutSeed, Phi3};

use crate::adamw::{clip_grad_norm, AdamW};
use crate::backward::{accumulate, GradBuffers, MicroBatch, PassOptions, StepContext};
use crate::comm::Communicator;
use crate::error::{Result, TrainError};
use crate::lora_params::LoraParams;
use crate::loss::count_targets;

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Mean loss over the window's labelled tokens.
    pub loss: f64,
    /// Global L2 norm of the gradients before clipping (not finite for a skipped step).
    pub grad_norm: f64,
    /// f16 only: the gradients overflowed at this loss scale, the adapter was left as it was
    /// and the scale halved.
    pub skipped: bool,
}

/// How a step trains.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub lr: f64,
    pub max_grad_norm: Option<f64>,
    pub pass: PassOptions,
}

/// One micro-batch of a window and the seed of its dropout masks.
pub struct WindowBatch {
    pub batch: MicroBatch,
    pub dropout: DropoutSeed,
}

/// Trains one optimizer step on `window` (this rank's share of it, see the module docs).
/// Returns None (and changes nothing) when the whole window has no labelled token;
/// `TrainError::Diverged` when the loss or the gradient norm is not finite, before the adapter
/// is touched. Every rank calls it once per step, whatever its share holds.
pub fn train_step(
    model: &Phi3,
    params: &LoraParams,
    optimizer: &mut AdamW,
    window: &[WindowBatch],
    config: StepConfig,
    context: &mut StepContext,
    comm: &dyn Communicator,
) -> Result<Option<StepOutcome>> {
    let mut targets = [window
        .iter()
        .map(|w| count_targets(&w.batch.labels))
        .sum::<usize>() as f64];
    comm.all_reduce_sum(&mut targets)?;
    let normalizer = targets[0] as usize;
    if normalizer == 0 {
        return Ok(None);
    }
    let buffers = GradBuffers::zeros(params)?;
    let mut loss_sum = 0.0;
    for w in window {
        if count_targets(&w.batch.labels) == 0 {
            continue;
        }
        loss_sum += accumulate(
            model,
            &buffers,
            &w.batch,
            normalizer,
            Some(w.dropout),
            config.pass,
            context,
        )?;
    }
    let mut loss_sums = [loss_sum];
    comm.all_reduce_sum(&mut loss_sums)?;
    let loss = loss_sums[0] / normalizer as f64;
    if !loss.is_finite() {
        return Err(TrainError::Diverged(format!("the loss became {loss}")));
    }
    let grads: Vec<Tensor> = buffers.grads;
    comm.all_reduce_tensors(&grads)?;
    let device = model.device();
    let unscale = 1.0 / context.loss_scale();
    let (grad_norm, grad_scale) = time(device, "grad norm + clip", || {
        clip_grad_norm(&grads, config.max_grad_norm, unscale).map_err(candle_core::Error::wrap)
    })?;
    if let Some(scaler) = &mut context.scaler {
        scaler.update(grad_norm.is_finite());
        if !grad_norm.is_finite() {
            return Ok(Some(StepOutcome {
                loss,
                grad_norm,
                skipped: true,
            }));
        }
    }
    if !grad_norm.is_finite() {
        return Err(TrainError::Diverged(format!(
            "the gradient norm became {grad_norm}"
        )));
    }
    time(device, "adamw", || {
        optimizer
            .update(params, &grads, config.lr, grad_scale)
            .map_err(candle_core::Error::wrap)
    })?;
    context.profiler.lap("optimizer")?;
    context.profiler.report();
    philo_kernels::profile::report("training step")?;
    Ok(Some(StepOutcome {
        loss,
        grad_norm,
        skipped: false,
    }))
}
