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

    /// One update with learning rate `lr` from `grads` multiplied by `grad_scale` (the
    /// clipping coefficient and loss-scale inverse, see [`clip_grad_norm`]):
    /// p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
    /// p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
    /// On CUDA one kernel per parameter updates p, m and v in place; elsewhere its reference
    /// (`philo_kernels::adamw::reference`) does.
    pub fn update(
        &mut self,
        params: &LoraParams,
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let step = philo_kernels::adamw::AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
            grad_scale,
        };
        for (i, (param, grad)) in params.params.iter().zip(grads).enumerate() {
            let p = param.var.as_tensor();
            if philo_kernels::adamw::has_kernel(&[p, &self.m[i], &self.v[i], grad]) {
                philo_kernels::adamw::update_in_place(p, &self.m[i], &self.v[i], grad, &step)?;
                continue;
            }
            // Elsewhere (the CPU) the kernel's reference, on host copies.
            let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let (mut pv, mut mv, mut vv) = (host(p)?, host(&self.m[i])?, host(&self.v[i])?);
            philo_kernels::adamw::reference(&mut pv, &mut mv, &mut vv, &host(grad)?, &step);
            let back = |v: Vec<f32>| Tensor::from_vec(v, p.shape(), p.device());
            self.m[i] = back(mv)?;
            self.v[i] = back(vv)?;
            param.var.set(&back(pv)?)?;
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

/// The global L2 norm of `grads` times `unscale` (1/loss scale, or 1), and the factor the
/// optimizer applies to the gradients: `unscale` times the clipping coefficient that brings the
/// norm to at most `max_norm` (torch: max_norm / (norm + 1e-6), capped at 1). The gradients are
/// not rewritten. The norm is not finite when a gradient holds an inf or NaN.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: Option<f64>, unscale: f64) -> Result<(f64, f64)> {
    let norm = philo_kernels::adamw::sum_of_squares(grads)?.sqrt() * unscale;
    let clip = match max_norm {
        Some(max_norm) if norm.is_finite() => (max_norm / (norm + 1e-6)).min(1.0),
        _ => 1.0,
    };
    Ok((norm, clip * unscale))
}
