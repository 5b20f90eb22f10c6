//! RMSNorm over the last dimension (Phi3RMSNorm), its backward for the input, and a fused
//! residual-add + RMSNorm for inference.

use candle_core::{Result, Tensor};

use crate::{from_host, host_f32};

/// Reference: each row of `x` (rows of `w.len()` values) → w · x / sqrt(mean(x²) + eps).
pub fn reference(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| w * v * inv));
    }
    out
}

/// Reference backward for `x`: dx = r·(w·dy) − x·r³·mean(x·w·dy), r = 1/sqrt(mean(x²) + eps).
pub fn reference_backward(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = Vec::with_capacity(x.len());
    for (row, drow) in x.chunks(n).zip(dy.chunks(n)) {
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / n as f32 + eps).sqrt();
        let xg = row
            .iter()
            .zip(w)
            .zip(drow)
            .map(|((x, w), d)| x * w * d)
            .sum::<f32>()
            / n as f32;
        out.extend(
            row.iter()
                .zip(w)
                .zip(drow)
                .map(|((x, w), d)| r * w * d - x * r * r * r * xg),
        );
    }
    out
}

/// RMSNorm of `x` `[..., n]` with weight `w` `[n]`. On CUDA one fused kernel; on the CPU the
/// reference.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let out = unsafe { x.empty_like()? };
        let n = w.elem_count();
        cuda::launch(cuda::Kind::Forward, &[&x, &w], &[&out], n, n, eps)?;
        return Ok(out);
    }
    let out = reference(&host_f32(x)?, &host_f32(w)?, eps as f32);
    from_host(out, x.dims(), x.dtype(), x.device())
}

/// [`rms_norm`] of `x` `[..., n]` as rows `[rows, n + pad]`: the norm in the first n columns
/// and `pad` columns after each row left for the caller (unset on CUDA, zero on the CPU).
pub fn rms_norm_padded(x: &Tensor, w: &Tensor, eps: f64, pad: usize) -> Result<Tensor> {
    let n = w.elem_count();
    let rows = x.elem_count() / n.max(1);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let out = unsafe { Tensor::empty((rows, n + pad), x.dtype(), x.device())? };
        cuda::launch(cuda::Kind::Forward, &[&x, &w], &[&out], n, n + pad, eps)?;
        return Ok(out);
    }
    crate::pad_columns(rms_norm(x, w, eps)?.reshape((rows, n))?, pad)
}

/// dx of RMSNorm given dy (see [`reference_backward`]), plus `add` when given: a gradient that
/// reaches x by another path (the residual connection), summed in the same pass. dy is shaped
/// like x, or `[rows, n]` with strided rows (read in place on CUDA); dx is shaped like x.
pub fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let n = w.elem_count();
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        // dy may be rows of a wider buffer (`[rows, n]` with a longer row stride): read in place.
        let (dy, dy_ld) = match dy.layout().stride() {
            [ld, 1] if dy.dims2()?.1 == n && *ld >= n => (dy.clone(), *ld),
            _ => (dy.contiguous()?, n),
        };
        let add = add.map(Tensor::contiguous).transpose()?;
        let dx = unsafe { x.empty_like()? };
        let mut inputs = vec![&x, &w, &dy];
        inputs.extend(add.as_ref());
        cuda::launch(cuda::Kind::Backward, &inputs, &[&dx], n, dy_ld, eps)?;
        return Ok(dx);
    }
    let dx = reference_backward(&host_f32(x)?, &host_f32(w)?, &host_f32(dy)?, eps as f32);
    let dx = from_host(dx, x.dims(), x.dtype(), x.device())?;
    match add {
        Some(add) => dx + add,
        None => Ok(dx),
    }
}

/// `sum = x + y` and `rms_norm(sum)` in one pass.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (sum, out) = add_rms_norm_padded(x, y, w, eps, 0)?;
        return Ok((sum, out.reshape(x.shape())?));
    }
    let sum = (x + y)?;
    let normed = rms_norm(&sum, w, eps)?;
    Ok((sum, normed))
}

/// [`add_rms_norm`] with the norm as rows `[rows, n + pad]` (see [`rms_norm_padded`]).
pub fn add_rms_norm_padded(
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    eps: f64,
    pad: usize,
) -> Result<(Tensor, Tensor)> {
    let n = w.elem_count();
    let rows = x.elem_count() / n.max(1);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (x, y, w) = (x.contiguous()?, y.contiguous()?, w.contiguous()?);
        let sum = unsafe { x.empty_like()? };
        let out = unsafe { Tensor::empty((rows, n + pad), x.dtype(), x.device())? };
        cuda::launch(
            cuda::Kind::AddForward,
            &[&x, &y, &w],
            &[&sum, &out],
            n,
            n + pad,
            eps,
        )?;
        return Ok((sum, out));
    }
    let (sum, normed) = add_rms_norm(x, y, w, eps)?;
    Ok((sum, crate::pad_columns(normed.reshape((rows, n))?, pad)?))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::launch::*;

    pub(super) enum Kind {
        /// x, w → out.
        Forward,
        /// x, y, w → sum, out.
        AddForward,
        /// x, w, dy[, add] → dx.
        Backward,
    }

    /// Runs the kernel of `kind` over rows of `n`, the forwards' normed rows (the backward's dy
    /// rows) `out_ld` apart:
    /// the vectorised kernel when rows are whole 16-byte pieces (n and out_ld multiples of 8,
    /// every tensor starting 16-byte aligned) and short enough for its registers, the scalar
    /// one otherwise.
    pub(super) fn launch(
        kind: Kind,
        inputs: &[&Tensor],
        outputs: &[&Tensor],
        n: usize,
        out_ld: usize,
        eps: f64,
    ) -> Result<()> {
        let x = inputs[0];
        let dev = device(x)?;
        let rows = x.elem_count() / n.max(1);
        let mut all = inputs.iter().chain(outputs);
        let aligned =
            all.all(|t| (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16));
        // 8-element pieces, VPT = 4 per thread, at most 1024 threads.
        let vector =
            aligned && n.is_multiple_of(8) && out_ld.is_multiple_of(8) && n <= 8 * 4 * 1024;
        let base = match kind {
            Kind::Forward => "rms_norm",
            Kind::AddForward => "add_rms_norm",
            Kind::Backward => "rms_norm_backward",
        };
        let name = if vector {
            format!("{base}_vec")
        } else {
            base.to_string()
        };
        let f = typed_function(&dev, &RMS_NORM, &name, x.dtype())?;
        let threads = if vector {
            (n / 8).div_ceil(4)
        } else {
            n.div_ceil(4)
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: ((threads.div_ceil(32) * 32).clamp(32, 1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut pointers = inputs
            .iter()
            .map(|t| address(t))
            .collect::<Result<Vec<_>>>()?;
        if let Kind::Backward = kind {
            // The optional residual gradient: a null pointer when absent.
            pointers.resize(4, 0);
        }
        for t in outputs {
            pointers.push(address(t)?);
        }
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        for p in &pointers {
            b.arg(p);
        }
        let (n32, ld32, eps) = (n as i32, out_ld as i32, eps as f32);
        b.arg(&n32).arg(&ld32).arg(&eps);
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
