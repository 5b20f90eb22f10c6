//! RMSNorm over the last dimension (Phi3RMSNorm), its backward for the input, and a fused
//! residual-add + RMSNorm for inference.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

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

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "philo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("philo-rms-norm: CPU tensors go through rms_norm's reference path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::launch::*;
        use candle_core::backend::BackendStorage;
        let n = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / n;
        let dev = xs.device().clone();
        let slice = with_float_type!(xs.dtype(), T, {
            let x = contiguous::<T>(xs, xl)?;
            let w = contiguous::<T>(ws, wl)?;
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let f = typed_function(&dev, &RMS_NORM, "rms_norm", xs.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (n32, eps) = (n as i32, self.eps);
            b.arg(&x).arg(&w).arg(&out).arg(&n32).arg(&eps);
            let cfg = row_config(rows, n);
            unsafe { b.launch(cfg) }.w()?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(backward(x, w, grad, self.eps as f64)?), None))
    }
}

/// One block per row of `n`, with enough threads (a multiple of 32) to cover the row with a few
/// elements each.
#[cfg(feature = "cuda")]
fn row_config(rows: usize, n: usize) -> crate::launch::LaunchConfig {
    crate::launch::LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (
            (n.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

/// RMSNorm of `x` `[..., n]` with weight `w` `[n]`. On CUDA one fused kernel, with a backward
/// for `x`; on the CPU the reference (no backward).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cuda() {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let out = reference(&host_f32(x)?, &host_f32(w)?, eps as f32);
    from_host(out, x.dims(), x.dtype(), x.device())
}

/// dx of RMSNorm given dy (see [`reference_backward`]).
pub fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        use crate::launch::*;
        let dev = device(x)?;
        let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        return with_float_type!(x.dtype(), T, {
            let xv = contiguous::<T>(cuda(&xs)?, xl)?;
            let wv = contiguous::<T>(cuda(&ws)?, wl)?;
            let dv = contiguous::<T>(cuda(&ds)?, dl)?;
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let f = typed_function(&dev, &RMS_NORM, "rms_norm_backward", x.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (n32, eps) = (n as i32, eps as f32);
            b.arg(&xv).arg(&wv).arg(&dv).arg(&out).arg(&n32).arg(&eps);
            let cfg = row_config(rows, n);
            unsafe { b.launch(cfg) }.w()?;
            Ok(tensor(out, &dev, x.shape()))
        });
    }
    let out = reference_backward(&host_f32(x)?, &host_f32(w)?, &host_f32(dy)?, eps as f32);
    from_host(out, x.dims(), x.dtype(), x.device())
}

/// `sum = x + y` and `rms_norm(sum)` in one pass (inference: no backward).
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        use crate::launch::*;
        let dev = device(x)?;
        let (x, y, w) = (x.contiguous()?, y.contiguous()?, w.contiguous()?);
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        return with_float_type!(x.dtype(), T, {
            let xv = contiguous::<T>(cuda(&xs)?, xl)?;
            let yv = contiguous::<T>(cuda(&ys)?, yl)?;
            let wv = contiguous::<T>(cuda(&ws)?, wl)?;
            let sum = unsafe { dev.alloc::<T>(rows * n)? };
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let f = typed_function(&dev, &RMS_NORM, "add_rms_norm", x.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (n32, eps) = (n as i32, eps as f32);
            b.arg(&xv)
                .arg(&yv)
                .arg(&wv)
                .arg(&sum)
                .arg(&out)
                .arg(&n32)
                .arg(&eps);
            let cfg = row_config(rows, n);
            unsafe { b.launch(cfg) }.w()?;
            Ok((tensor(sum, &dev, x.shape()), tensor(out, &dev, x.shape())))
        });
    }
    let sum = (x + y)?;
    let normed = rms_norm(&sum, w, eps)?;
    Ok((sum, normed))
}
