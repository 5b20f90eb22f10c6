//! `x · Wᵀ` with an NF4 weight matrix, dequantised on the fly into the compute dtype.
//!
//! QLoRA keeps the frozen base weights in NF4 and only materialises a full-precision copy for
//! the duration of one matmul. This is the portable path (dequantise on the host, then one
//! candle matmul); a fused CUDA kernel can replace it without changing the signature.

use candle_core::{DType, Tensor};

use crate::error::{QuantError, Result};
use crate::nf4::Nf4Tensor;

/// Computes `x · Wᵀ` in `dtype`: `x` has shape `[..., cols]`, the result `[..., rows]` on `x`'s
/// device. `x` is cast to `dtype` if needed; W is dequantised straight into `dtype` (no f32
/// copy for bf16/f16) and used transposed in place, without a transposed copy. Gradients flow
/// to `x` (and whatever produced it); W is a constant, as frozen base weights are.
pub fn dequantize_matmul(x: &Tensor, w: &Nf4Tensor, dtype: DType) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, cols) = w.shape();
    let shape_error = || QuantError::MatmulShape {
        shape: dims.to_vec(),
        rows,
        cols,
    };
    let (&k, batch_dims) = dims.split_last().ok_or_else(shape_error)?;
    if k != cols {
        return Err(shape_error());
    }
    let m: usize = batch_dims.iter().product();

    let weight = w.to_tensor(dtype, x.device())?;
    let x = if x.dtype() == dtype {
        x.clone()
    } else {
        x.to_dtype(dtype)?
    };
    // Fold all leading dimensions into one so a single 2-D matmul does the work.
    let y = x.reshape((m, k))?.matmul(&weight.t()?)?;
    let mut out_dims = batch_dims.to_vec();
    out_dims.push(rows);
    Ok(y.reshape(out_dims)?)
}
