//! Cross-entropy with the gradient of its logits in one pass, for chunks of rows: training calls
//! it chunk by chunk, so full-batch f32 logits never exist.

use candle_core::{Result, Tensor};

use crate::{from_host, host_f32};

/// Reference: per row, loss = logsumexp(x) − x[target] and
/// grad = (softmax(x) − onehot(target)) · grad_scale, all in f32.
pub fn reference(logits: &[f32], targets: &[u32], grad_scale: f32) -> (Vec<f32>, Vec<f32>) {
    let v = logits.len() / targets.len().max(1);
    let mut loss = Vec::with_capacity(targets.len());
    let mut grad = Vec::with_capacity(logits.len());
    for (row, &target) in logits.chunks(v).zip(targets) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        loss.push(lse - row[target as usize]);
        grad.extend(row.iter().enumerate().map(|(i, x)| {
            ((x - lse).exp() - if i == target as usize { 1.0 } else { 0.0 }) * grad_scale
        }));
    }
    (loss, grad)
}

/// Losses `[rows]` (f32) and logit gradients `[rows, V]` (the logits' dtype) of `logits`
/// `[rows, V]` against `targets` `[rows]` (u32, each < V), the gradient scaled by `grad_scale`.
pub fn cross_entropy_with_grad(
    logits: &Tensor,
    targets: &Tensor,
    grad_scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (rows, v) = logits.dims2()?;
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        use crate::launch::*;
        let dev = device(logits)?;
        let x = logits.contiguous()?;
        let t = targets.to_dtype(candle_core::DType::U32)?.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ts, tl) = t.storage_and_layout();
        return with_float_type!(x.dtype(), T, {
            let xv = contiguous::<T>(cuda(&xs)?, xl)?;
            let tv = contiguous::<u32>(cuda(&ts)?, tl)?;
            let loss = unsafe { dev.alloc::<f32>(rows)? };
            let grad = unsafe { dev.alloc::<T>(rows * v)? };
            let f = typed_function(&dev, &CROSS_ENTROPY, "cross_entropy", x.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (v32, scale) = (v as i32, grad_scale as f32);
            b.arg(&xv)
                .arg(&tv)
                .arg(&loss)
                .arg(&grad)
                .arg(&v32)
                .arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok((tensor(loss, &dev, rows), tensor(grad, &dev, (rows, v))))
        });
    }
    let targets = targets
        .to_dtype(candle_core::DType::U32)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<u32>()?;
    let (loss, grad) = reference(&host_f32(logits)?, &targets, grad_scale as f32);
    Ok((
        from_host(loss, &[rows], candle_core::DType::F32, logits.device())?,
        from_host(grad, &[rows, v], logits.dtype(), logits.device())?,
    ))
}
