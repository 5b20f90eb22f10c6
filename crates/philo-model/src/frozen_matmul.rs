//! `x · Wᵀ` for a frozen weight W, as an autograd op whose backward computes only dL/dx.
//!
//! candle's own matmul backward also computes dL/dW (a GEMM as large as the forward) and keeps
//! a W-sized gradient even when W is a constant; with a frozen base — LoRA and QLoRA — that is
//! a quarter of the GEMM work of a training step and memory for nothing.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `[out_features, in_features]`.
    weight: Tensor,
}

impl FrozenMatmul {
    fn run<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (ws, wl) = self.weight.storage_and_layout();
        let w = pick(&ws).ok_or_else(|| {
            candle_core::Error::Msg("frozen matmul: weight on another device".into())
        })?;
        let n = self.weight.dim(0)?;
        let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "philo-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, |st| match st {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(s, l, |st| match st {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x` `[rows, in]` · `weight`ᵀ → `[rows, out]`, differentiable in `x` only.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(&weight.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.contiguous()?,
    })
}
