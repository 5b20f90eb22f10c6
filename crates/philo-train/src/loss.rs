//! The causal language-modelling loss as transformers computes it.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Label of a position that does not count in the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Which logit rows count and their target ids, after the shift by one: position t predicts
/// label t + 1. Returns (row indices into the flattened `[batch·(seq-1)]` logits, targets).
pub fn shifted_targets(labels: &[Vec<i64>]) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let seq = labels.first().map_or(0, Vec::len);
    for (b, row) in labels.iter().enumerate() {
        for t in 0..seq.saturating_sub(1) {
            let label = row[t + 1];
            if label != IGNORE_INDEX {
                rows.push((b * (seq - 1) + t) as u32);
                targets.push(label as u32);
            }
        }
    }
    (rows, targets)
}

/// Summed cross-entropy over the labelled positions: logits `[batch, seq, vocab]` (any dtype;
/// computed in f32), labels `[batch][seq]` with -100 for ignored positions. None when no
/// position is labelled. Dividing by the number of labelled positions gives transformers' mean;
/// dividing by the count over all micro-batches of an accumulation window makes gradient
/// accumulation equal one big batch.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<Option<Tensor>> {
    let (b, s, v) = logits.dims3()?;
    let (rows, targets) = shifted_targets(labels);
    if rows.is_empty() {
        return Ok(None);
    }
    let device = logits.device();
    let shifted = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let picked = shifted.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
    // Half precision is widened for the softmax; f32 and f64 stay as they are.
    let picked = match picked.dtype() {
        DType::F16 | DType::BF16 => picked.to_dtype(DType::F32)?,
        _ => picked,
    };
    let log_probs = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let targets = Tensor::new(targets.as_slice(), device)?;
    let nll = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(Some((nll.sum_all()?.neg())?))
}

/// The LM-head loss without full-batch logits: `hidden` `[batch, seq, h]` (final-norm hidden
/// states, no autograd needed) times `head_weight` `[vocab, h]` is computed `chunk_rows`
/// labelled rows at a time; each chunk's logits give its losses and their gradient in one
/// kernel, and are then dropped. Returns the summed loss and d(loss_sum · `scale`)/d(hidden),
/// or None when no position is labelled.
pub fn chunked_head_loss(
    hidden: &Tensor,
    head_weight: &Tensor,
    labels: &[Vec<i64>],
    scale: f64,
    chunk_rows: usize,
) -> Result<Option<(f64, Tensor)>> {
    let (b, s, h) = hidden.dims3()?;
    let (rows, targets) = shifted_targets(labels);
    if rows.is_empty() {
        return Ok(None);
    }
    let device = hidden.device();
    // Row r of the shifted [batch·(seq−1)] view is hidden row (r / (seq−1))·seq + r % (seq−1).
    let hidden_rows: Vec<u32> = rows
        .iter()
        .map(|&r| (r as usize / (s - 1) * s + r as usize % (s - 1)) as u32)
        .collect();
    let flat = hidden.reshape((b * s, h))?;
    // Each labelled row's gradient is written once; the other rows stay 0.
    let d_hidden = Tensor::zeros((b * s, h), hidden.dtype(), device)?;
    let mut loss_sum = Tensor::zeros((), DType::F32, device)?;
    for (idx, tgt) in hidden_rows
        .chunks(chunk_rows.max(1))
        .zip(targets.chunks(chunk_rows.max(1)))
    {
        let picked = flat.index_select(&Tensor::new(idx, device)?, 0)?;
        let logits = picked.matmul(&head_weight.t()?)?;
        let (loss, grad) = philo_kernels::cross_entropy::cross_entropy_with_grad(
            &logits,
            &Tensor::new(tgt, device)?,
            scale,
        )?;
        loss_sum = loss_sum.add(&loss.sum_all()?)?;
        philo_kernels::rows::scatter_rows(&d_hidden, idx, &grad.matmul(head_weight)?)?;
    }
    let loss_sum = loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(Some((loss_sum, d_hidden.reshape((b, s, h))?)))
}

/// Number of labelled positions after the shift.
pub fn count_targets(labels: &[Vec<i64>]) -> usize {
    shifted_targets(labels).0.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn mean_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Option<f32> {
        let sum = causal_lm_loss_sum(logits, labels)
            .unwrap()?
            .to_scalar::<f32>()
            .unwrap();
        Some(sum / count_targets(labels) as f32)
    }

    #[test]
    fn loss_of_a_uniform_distribution_is_log_vocab() {
        let logits = Tensor::zeros((1, 4, 10), DType::F32, &Device::Cpu).unwrap();
        let value = mean_loss(&logits, &[vec![1, 2, -100, 3]]).unwrap();
        assert!((value - 10f32.ln()).abs() < 1e-6, "{value}");
    }

    #[test]
    fn shift_pairs_position_t_with_label_t_plus_one() {
        let (rows, targets) = shifted_targets(&[vec![-100, 5, -100, 7], vec![1, -100, 2, 3]]);
        assert_eq!(rows, vec![0, 2, 4, 5]);
        assert_eq!(targets, vec![5, 7, 2, 3]);
    }

    #[test]
    fn confident_correct_logits_give_small_loss() {
        let mut values = vec![0f32; 2 * 3];
        values[1] = 20.0; // position 0 predicts id 1
        let logits = Tensor::from_vec(values, (1, 2, 3), &Device::Cpu).unwrap();
        let loss = mean_loss(&logits, &[vec![0, 1]]).unwrap();
        assert!(loss < 1e-6, "{loss}");
        assert!(mean_loss(&logits, &[vec![0, -100]]).is_none());
    }
}
