//! Mean loss of a dataset's labelled tokens under a model: the trainer's evaluation and
//! `philo eval` (perplexity = exp(mean loss)).

use candle_core::DType;
use philo_model::Phi3;
use serde::Serialize;

use crate::data::RowDataset;
use crate::error::Result;
use crate::loss::{causal_lm_loss_sum, count_targets};

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean cross-entropy over the labelled tokens (nats).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Labelled tokens counted (after the shift by one).
    pub tokens: usize,
}

/// Runs `model` over `data` in batches of `batch_size` rows and averages the loss over every
/// labelled token (each token weighs the same, whatever its row). None when nothing is
/// labelled. `on_batch` is told how many rows are done after each batch.
pub fn evaluate(
    model: &Phi3,
    data: &RowDataset,
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Option<EvalResult>> {
    let mut sum = 0.0;
    let mut tokens = 0usize;
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut done = 0;
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = data.batch(chunk);
        let n = count_targets(&batch.labels);
        done += chunk.len();
        if n > 0 {
            let tensors = batch.to_tensors(model.device())?;
            let logits = model.forward(&tensors.input_ids, Some(&tensors.segment_ids), None)?;
            if let Some(loss) = causal_lm_loss_sum(&logits, &batch.labels)? {
                sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                tokens += n;
            }
        }
        on_batch(done);
    }
    Ok((tokens > 0).then(|| {
        let loss = sum / tokens as f64;
        EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens,
        }
    }))
}
