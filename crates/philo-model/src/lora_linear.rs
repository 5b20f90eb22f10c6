//! The linear layers of Phi-3: a frozen base weight, optionally with a LoRA adapter on top,
//! y = x·Wᵀ + dropout(x)·Aᵀ·Bᵀ·scale.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::Result;

/// A low-rank adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in_features]`; during training this tensor is the storage of a `candle_core::Var`.
    pub a: Tensor,
    /// `[out_features, r]`.
    pub b: Tensor,
    /// alpha / r (rsLoRA: alpha / sqrt(r)).
    pub scale: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f32,
    /// Identifies this adapter within the model so its dropout masks are reproducible, also when
    /// a layer is recomputed for gradient checkpointing.
    pub id: u64,
}

/// Per-forward dropout settings: masks are drawn only when present (training).
#[derive(Debug, Clone, Copy)]
pub struct DropoutSeed(pub u64);

/// A frozen linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `[out_features, in_features]`, as PyTorch stores it.
    pub weight: Tensor,
    pub lora: Option<Lora>,
}

/// x · wᵀ for x of any leading shape.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    let rows = x.elem_count() / in_features;
    let y = x.reshape((rows, in_features))?.matmul(&w.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

impl LoraLinear {
    /// A layer without adapter.
    pub fn new(weight: Tensor) -> Self {
        LoraLinear { weight, lora: None }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// y = x·Wᵀ (+ the adapter's contribution); `dropout` is Some only while training.
    pub fn forward(&self, x: &Tensor, dropout: Option<DropoutSeed>) -> Result<Tensor> {
        let y = matmul_t(x, &self.weight)?;
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        let input = match dropout {
            Some(DropoutSeed(seed)) if lora.dropout > 0.0 => x.broadcast_mul(&dropout_mask(
                x,
                lora.dropout,
                seed ^ lora.id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )?)?,
            _ => x.clone(),
        };
        let down = matmul_t(&input, &lora.a.to_dtype(x.dtype())?)?;
        let up = matmul_t(&down, &lora.b.to_dtype(x.dtype())?)?;
        Ok((y + (up * lora.scale)?)?)
    }

    /// W + scale·B·A computed in f32, in the weight's dtype; the adapter is removed.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(lora) = self.lora.take() {
            let dtype = self.weight.dtype();
            let delta = (lora
                .b
                .to_dtype(DType::F32)?
                .matmul(&lora.a.to_dtype(DType::F32)?)?
                * lora.scale)?;
            self.weight = (self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
        }
        Ok(())
    }
}

/// Inverted-dropout mask (0 or 1/(1-p)) shaped like `x`, reproducible from `seed`.
fn dropout_mask(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    if x.device().is_cpu() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect();
        return Ok(Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(x.dtype())?);
    }
    // GPU: the device generator, seeded per mask.
    x.device().set_seed(seed)?;
    let uniform = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    Ok((uniform.ge(p as f64)?.to_dtype(DType::F32)? * keep as f64)?.to_dtype(x.dtype())?)
}
