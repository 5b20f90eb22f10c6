//! The trainable parameters of a LoRA fine-tune: A and B of every adapted layer, as candle `Var`s
//! whose storage the model's layers share, so an optimizer step is seen by the next forward.

use candle_core::{DType, Tensor, Var};
use philo_model::adapter::{lora_id, peft_name, AdapterConfig};
use philo_model::{Lora, Phi3};
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainError};

/// Refuses a LoRA dropout probability outside [0, 1) (at 1 every input would be dropped and
/// the kept ones scaled by infinity).
pub fn check_dropout(p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(TrainError::Config(format!(
            "--lora_dropout must be at least 0 and below 1, not {p}"
        )))
    }
}

/// One trainable matrix and its PEFT name.
pub struct LoraParam {
    /// PEFT's name, e.g. `base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight`.
    pub name: String,
    pub var: Var,
}

/// All trainable matrices, in a fixed order (layer, module, A then B).
pub struct LoraParams {
    pub params: Vec<LoraParam>,
    /// Per adapter: its id (`Lora::id`) and the indices of its A and B in `params`.
    pub adapters: Vec<(u64, usize, usize)>,
}

impl LoraParams {
    /// Adds fresh adapters to `model` as PEFT initialises them: A Kaiming-uniform
    /// (bound 1/sqrt(in_features)), B zero; masters in f32 on the model's device.
    pub fn init(model: &mut Phi3, config: &AdapterConfig, seed: u64) -> Result<Self> {
        check_dropout(config.lora_dropout)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = model.device().clone();
        for target in &config.target_modules {
            if !philo_model::adapter::TARGET_MODULES.contains(&target.as_str()) {
                return Err(TrainError::Config(format!(
                    "unknown target module `{target}`: choose from {:?}",
                    philo_model::adapter::TARGET_MODULES
                )));
            }
        }
        for (layer, module, linear) in model.linears_mut() {
            if !config.target_modules.iter().any(|t| t == module) {
                continue;
            }
            let (out, inp) = (linear.out_features(), linear.in_features());
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..config.r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            linear.lora = Some(Lora {
                a: Tensor::from_vec(a, (config.r, inp), &device)?,
                b: Tensor::zeros((out, config.r), DType::F32, &device)?,
                scale: config.scale(),
                dropout: config.lora_dropout,
                id: lora_id(layer, module),
            });
        }
        Self::from_model(model)
    }

    /// Makes the adapters already on `model` (e.g. loaded from a PEFT folder) trainable: their
    /// A and B become f32 `Var`s shared with the model.
    pub fn from_model(model: &mut Phi3) -> Result<Self> {
        let mut params = Vec::new();
        let mut adapters = Vec::new();
        for (layer, module, linear) in model.linears_mut() {
            if let Some(lora) = &mut linear.lora {
                adapters.push((lora.id, params.len(), params.len() + 1));
                let a = Var::from_tensor(&lora.a.to_dtype(DType::F32)?)?;
                let b = Var::from_tensor(&lora.b.to_dtype(DType::F32)?)?;
                lora.a = a.as_tensor().clone();
                lora.b = b.as_tensor().clone();
                params.push(LoraParam {
                    name: peft_name(layer, module, "A"),
                    var: a,
                });
                params.push(LoraParam {
                    name: peft_name(layer, module, "B"),
                    var: b,
                });
            }
        }
        if params.is_empty() {
            return Err(TrainError::Config(
                "no LoRA adapter on the model: nothing to train".into(),
            ));
        }
        Ok(LoraParams { params, adapters })
    }

    /// Total number of trainable values.
    pub fn count(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }
}
