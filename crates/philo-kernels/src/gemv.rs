//! x · Wᵀ for the few rows of a decoding step, where a general GEMM leaves bandwidth unused:
//! each weight row is streamed once by one warp.

use candle_core::{DType, Result, Tensor};

/// Most rows of x the kernel takes.
pub const MAX_ROWS: usize = 4;

/// Reference: `x` `[m, k]` · `w` `[n, k]`ᵀ in f32.
pub fn reference(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for xr in x.chunks(k) {
        out.extend(
            w.chunks(k)
                .map(|wr| xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>()),
        );
    }
    out
}

/// Whether [`gemv`] takes these operands: CUDA, bf16/f16, at most [`MAX_ROWS`] rows, k a multiple
/// of 8, no autograd on `x`.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    let k = w.dims().last().copied().unwrap_or(0);
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.dtype() == w.dtype()
        && x.elem_count() / k.max(1) <= MAX_ROWS
        && k % 8 == 0
        && !x.track_op()
}

/// `x` `[m, k]` · `w` `[n, k]`ᵀ → `[m, n]` (see [`applies`]).
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let (m, xk) = x.dims2()?;
    if xk != k || !applies(x, w) {
        candle_core::bail!(
            "gemv: operands x {:?} and w {:?} do not qualify",
            x.shape(),
            w.shape()
        );
    }
    #[cfg(feature = "cuda")]
    {
        use crate::launch::*;
        let dev = device(x)?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        with_float_type!(x.dtype(), T, {
            let xv = contiguous::<T>(cuda(&xs)?, xl)?;
            let wv = contiguous::<T>(cuda(&ws)?, wl)?;
            let out = unsafe { dev.alloc::<T>(m * n)? };
            let f = typed_function(&dev, &GEMV, "gemv", x.dtype())?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (m32, n32, k32) = (m as i32, n as i32, k as i32);
            b.arg(&xv).arg(&wv).arg(&out).arg(&m32).arg(&n32).arg(&k32);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.w()?;
            Ok(tensor(out, &dev, (m, n)))
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (m, n);
        candle_core::bail!("gemv needs the cuda feature")
    }
}
