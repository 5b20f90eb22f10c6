//! AdamW with PyTorch's semantics (decoupled weight decay, bias correction) and gradient-norm
//! clipping like `torch.nn.utils.clip_grad_norm_`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, TrainError};
use crate::lora_params::LoraParams;

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' Trainer defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state: first and second moments per parameter and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &LoraParams) -> Result<Self> {
        let zeros = |_: &_| -> Result<Vec<Tensor>> {
            params
                .params
                .iter()
                .map(|p| Ok(p.var.zeros_like()?))
                .collect()
        };
        Ok(AdamW {
            config,
            step: 0,
            m: zeros(&())?,
            v: zeros(&())?,
        })
    }

    /// One update with learning rate `lr`:
    /// p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
    /// p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
    pub fn update(&mut self, params: &LoraParams, grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, (param, grad)) in params.params.iter().zip(grads).enumerate() {
            let grad = grad.to_dtype(DType::F32)?;
            let mut p = param.var.as_tensor().clone();
            if c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            self.m[i] = ((&self.m[i] * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&self.m[i] / denom)? * (lr / bias1))?;
            param.var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// Saves moments and step (safetensors + the step in its metadata-free sibling JSON).
    pub fn save(&self, path: &Path, params: &LoraParams) -> Result<()> {
        let mut tensors = HashMap::new();
        for (i, p) in params.params.iter().enumerate() {
            tensors.insert(format!("m.{}", p.name), self.m[i].to_device(&Device::Cpu)?);
            tensors.insert(format!("v.{}", p.name), self.v[i].to_device(&Device::Cpu)?);
        }
        tensors.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &Device::Cpu)?,
        );
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Restores what [`AdamW::save`] wrote, for the same parameters.
    pub fn load(&mut self, path: &Path, params: &LoraParams) -> Result<()> {
        let mut tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| TrainError::File {
                path: path.to_path_buf(),
                message: format!("cannot read the optimizer state: {e}"),
            })?;
        let missing = |name: &str| TrainError::File {
            path: path.to_path_buf(),
            message: format!("optimizer state lacks `{name}`: it belongs to another run"),
        };
        let device = params
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(Device::Cpu);
        for (i, p) in params.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m), ("v", &mut self.v)] {
                let name = format!("{prefix}.{}", p.name);
                let t = tensors.remove(&name).ok_or_else(|| missing(&name))?;
                if t.dims() != p.var.dims() {
                    return Err(missing(&name));
                }
                slot[i] = t.to_device(&device)?;
            }
        }
        let step = tensors.remove("step").ok_or_else(|| missing("step"))?;
        self.step = step.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// Multiplies `grads` by `unscale` (1/loss scale, or 1) and scales them so their global L2 norm
/// is at most `max_norm` (torch: coefficient max_norm / (norm + 1e-6), capped at 1), in one
/// pass. Returns the norm of the unscaled gradients before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: Option<f64>, unscale: f64) -> Result<f64> {
    // Per-tensor sums of squares stay on the device; one transfer brings them all back.
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total: f64 = Tensor::stack(&sums, 0)?
        .to_vec1::<f32>()?
        .iter()
        .map(|&s| s as f64)
        .sum();
    let norm = total.sqrt() * unscale;
    let clip = match max_norm {
        Some(max_norm) => (max_norm / (norm + 1e-6)).min(1.0),
        None => 1.0,
    };
    let coef = clip * unscale;
    if norm.is_finite() && coef != 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
