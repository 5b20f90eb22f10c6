//! philo's own kernels. Each operation has a plain CPU reference (loops over f32, written to be
//! read, not to be fast) and, with the `cuda` feature, a CUDA kernel (`src/cuda/*.cu`, compiled
//! to PTX by build.rs) that the tests compare with it.
//!
//! The model uses the kernels on CUDA in bf16/f16; on the CPU it keeps its composed candle ops,
//! which match transformers in f32.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod decode;
pub mod decode_layers;
pub mod dequantize;
pub mod dropout;
pub mod gemm;
pub mod gemv;
pub mod lora;
pub mod nf4;
pub mod paged_attention;
pub mod profile;
pub mod rms_norm;
pub mod rope;
pub mod rows;
pub mod sampling;
pub mod swiglu;

#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod lt_gemm;

pub use candle_core::{Error, Result};

/// `t` `[rows, cols]` followed by `pad` zero columns (the CPU side of the kernels that leave
/// columns after each output row for the caller).
pub fn pad_columns(t: Tensor, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(t);
    }
    let zeros = Tensor::zeros((t.dim(0)?, pad), t.dtype(), t.device())?;
    Tensor::cat(&[&t, &zeros], 1)
}

/// A tensor's values as f32 on the host, row-major.
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// A tensor of `dtype` on `device` from host f32 values.
fn from_host(
    values: Vec<f32>,
    shape: &[usize],
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

use candle_core::Tensor;
