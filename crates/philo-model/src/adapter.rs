//! PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors, read, attached to a
//! model, and written back with PEFT's names
//! (`base_model.model.model.layers.N.self_attn.qkv_proj.lora_A.weight`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::lora_linear::Lora;
use crate::phi3::Phi3;
use crate::weights::SafetensorsStore;

/// The four fused projections of Phi-3 a LoRA can target.
pub const TARGET_MODULES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// adapter_config.json (the fields philo reads and writes; others are kept out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "lora")]
    pub peft_type: String,
    #[serde(default = "causal_lm")]
    pub task_type: String,
    #[serde(default = "no_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
}

fn lora() -> String {
    "LORA".into()
}
fn causal_lm() -> String {
    "CAUSAL_LM".into()
}
fn no_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// A LoRA of rank `r` on `target_modules`.
    pub fn new(
        r: usize,
        lora_alpha: f64,
        lora_dropout: f32,
        target_modules: Vec<String>,
        use_rslora: bool,
    ) -> Self {
        AdapterConfig {
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            use_rslora,
            base_model_name_or_path: None,
            peft_type: lora(),
            task_type: causal_lm(),
            bias: no_bias(),
            fan_in_fan_out: false,
            inference_mode: true,
        }
    }

    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Reads and checks adapter_config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|cause| ModelError::Json {
                path: path.to_path_buf(),
                cause,
            })?;
        if config.peft_type != "LORA" {
            return Err(ModelError::invalid(
                path,
                "peft_type",
                format!("`{}`: philo reads LORA adapters", config.peft_type),
            ));
        }
        if config.r == 0 {
            return Err(ModelError::invalid(path, "r", "must be greater than 0"));
        }
        if config.fan_in_fan_out {
            return Err(ModelError::invalid(
                path,
                "fan_in_fan_out",
                "true is for Conv1D models; Phi-3 adapters have it false",
            ));
        }
        Ok(config)
    }
}

/// One adapter's A and B for a (layer, fused module).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A PEFT adapter read from disk, its split q/k/v and gate/up parts fused.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    /// (layer, fused module name) → A `[r', in]`, B `[out, r']`.
    pub weights: HashMap<(usize, String), LoraPair>,
    pub dir: PathBuf,
}

/// PEFT's name of one LoRA matrix (`which` is "A" or "B").
pub fn peft_name(layer: usize, module: &str, which: &str) -> String {
    let block = if ["qkv_proj", "o_proj", "q_proj", "k_proj", "v_proj"].contains(&module) {
        "self_attn"
    } else {
        "mlp"
    };
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight")
}

/// Splits a PEFT tensor name into (layer, module, "A"/"B"); the optional adapter name segment
/// (`lora_A.default.weight`, as PEFT holds it in memory) is accepted.
fn parse_peft_name(name: &str) -> Option<(usize, String, String)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let parts: Vec<&str> = rest.split('.').collect();
    let lora_at = parts
        .iter()
        .position(|p| *p == "lora_A" || *p == "lora_B")?;
    if lora_at < 1 || parts.last() != Some(&"weight") {
        return None;
    }
    let module = parts[lora_at - 1].to_string();
    let which = parts[lora_at].trim_start_matches("lora_").to_string();
    Some((layer, module, which))
}

/// A, B of one split projection (q, k, v, gate or up) before fusing.
type SplitPart = (Tensor, Tensor);

/// How split modules fuse: the fused module and the order of its parts.
fn fused_of(module: &str) -> Option<(&'static str, usize, usize)> {
    match module {
        "q_proj" => Some(("qkv_proj", 0, 3)),
        "k_proj" => Some(("qkv_proj", 1, 3)),
        "v_proj" => Some(("qkv_proj", 2, 3)),
        "gate_proj" => Some(("gate_up_proj", 0, 2)),
        "up_proj" => Some(("gate_up_proj", 1, 2)),
        _ => None,
    }
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors` (tensors as f32 on
    /// the CPU). Split q/k/v (gate/up) adapters become one adapter of the fused projection with
    /// the A matrices stacked and a block-diagonal B, which is exactly their sum.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            return Err(ModelError::io(
                &config_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no adapter_config.json: --adapter must be a PEFT adapter folder",
                ),
            ));
        }
        let config = AdapterConfig::from_file(&config_path)?;
        let weights_path = dir.join("adapter_model.safetensors");
        let store = SafetensorsStore::open_files(std::slice::from_ref(&weights_path))?;
        let mut fused: HashMap<(usize, String), LoraPair> = HashMap::new();
        // (layer, fused module) → parts in order, each (A, B)
        let mut split: HashMap<(usize, &'static str), Vec<Option<SplitPart>>> = HashMap::new();
        let mut names: Vec<&str> = store.names().collect();
        names.sort();
        for name in names {
            let Some((layer, module, which)) = parse_peft_name(name) else {
                return Err(ModelError::invalid(
                    &weights_path,
                    name,
                    "not a PEFT LoRA weight of a Phi-3 layer",
                ));
            };
            if which != "A" {
                continue;
            }
            let a = store.load_raw(name)?.to_dtype(DType::F32)?;
            let b_name = name.replacen("lora_A", "lora_B", 1);
            let b = store
                .load_raw(&b_name)
                .map_err(|_| ModelError::MissingTensor {
                    name: b_name.clone(),
                    files: weights_path.display().to_string(),
                })?
                .to_dtype(DType::F32)?;
            match fused_of(&module) {
                None => {
                    fused.insert((layer, module), LoraPair { a, b });
                }
                Some((target, index, parts)) => {
                    let slots = split
                        .entry((layer, target))
                        .or_insert_with(|| vec![None; parts]);
                    slots[index] = Some((a, b));
                }
            }
        }
        for ((layer, target), parts) in split {
            let parts: Vec<(Tensor, Tensor)> = parts.into_iter().collect::<Option<_>>().ok_or_else(|| {
                ModelError::invalid(
                    &weights_path,
                    &format!("layer {layer} {target}"),
                    "has adapters for only some of its split projections (q/k/v or gate/up); philo fuses them and needs all",
                )
            })?;
            fused.insert((layer, target.to_string()), fuse(&parts)?);
        }
        Ok(Adapter {
            config,
            weights: fused,
            dir: dir.to_path_buf(),
        })
    }

    /// Puts the adapter on `model`'s layers (in the model's dtype and device). Shapes are checked
    /// first, so a mismatched adapter leaves the model untouched.
    pub fn attach(&self, model: &mut Phi3) -> Result<()> {
        let mut by_key = self.loras(model)?;
        for (layer, module, linear) in model.linears_mut() {
            if let Some(lora) = by_key.remove(&(layer, module)) {
                linear.lora = Some(lora);
            }
        }
        Ok(())
    }

    /// The adapter's LoRA of every (layer, module) it targets, in `model`'s dtype and on its
    /// device, after checking every shape against `model` (the model itself is not changed).
    pub fn loras(&self, model: &Phi3) -> Result<HashMap<(usize, &'static str), Lora>> {
        let (dtype, device) = (model.dtype(), model.device().clone());
        let weights_path = self.dir.join("adapter_model.safetensors");
        let layers = model.config().num_hidden_layers;
        let mut keys: Vec<&(usize, String)> = self.weights.keys().collect();
        keys.sort();
        for (layer, module) in keys {
            if *layer >= layers || !TARGET_MODULES.contains(&module.as_str()) {
                return Err(ModelError::invalid(
                    &weights_path,
                    &peft_name(*layer, module, "A"),
                    format!("the base model has {layers} layers and modules {TARGET_MODULES:?}: this adapter was trained for another model"),
                ));
            }
        }
        let mut by_key = HashMap::new();
        for (layer, module, linear) in model.linears() {
            let Some(pair) = self.weights.get(&(layer, module.to_string())) else {
                continue;
            };
            let (r_a, in_a) = pair.a.dims2()?;
            let (out_b, r_b) = pair.b.dims2()?;
            if in_a != linear.in_features() || out_b != linear.out_features() || r_a != r_b {
                return Err(ModelError::invalid(
                    &weights_path,
                    &peft_name(layer, module, "A"),
                    format!(
                        "lora_A is [{r_a}, {in_a}] and lora_B [{out_b}, {r_b}], but the base layer is [{}, {}] (out, in), so they must be [r, {}] and [{}, r]: this adapter was trained for another model",
                        linear.out_features(),
                        linear.in_features(),
                        linear.in_features(),
                        linear.out_features()
                    ),
                ));
            }
            by_key.insert(
                (layer, module),
                Lora {
                    a: to(&pair.a, dtype, &device)?,
                    b: to(&pair.b, dtype, &device)?,
                    scale: self.config.scale(),
                    dropout: self.config.lora_dropout,
                    id: lora_id(layer, module),
                },
            );
        }
        Ok(by_key)
    }
}

fn to(t: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// A stable number for (layer, module), used to seed that adapter's dropout.
pub fn lora_id(layer: usize, module: &str) -> u64 {
    let index = TARGET_MODULES
        .iter()
        .position(|m| *m == module)
        .unwrap_or(0);
    (layer as u64) * 8 + index as u64 + 1
}

/// Stacked A's and block-diagonal B: the fused adapter equals the sum of the parts.
fn fuse(parts: &[(Tensor, Tensor)]) -> Result<LoraPair> {
    let a = Tensor::cat(&parts.iter().map(|(a, _)| a).collect::<Vec<_>>(), 0)?;
    let total_rank = a.dim(0)?;
    let mut rows = Vec::new();
    let mut offset = 0;
    for (_, b) in parts {
        let (out, r) = b.dims2()?;
        let left = Tensor::zeros((out, offset), DType::F32, b.device())?;
        let right = Tensor::zeros((out, total_rank - offset - r), DType::F32, b.device())?;
        rows.push(Tensor::cat(&[&left, b, &right], 1)?);
        offset += r;
    }
    Ok(LoraPair {
        a,
        b: Tensor::cat(&rows, 0)?,
    })
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` for the LoRA layers of `model`
/// into `dir`, each file through a temporary file and a rename so a crash never leaves half a file.
pub fn save_adapter(dir: &Path, config: &AdapterConfig, model: &mut Phi3) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors = HashMap::new();
    for (layer, module, linear) in model.linears_mut() {
        if let Some(lora) = &linear.lora {
            let cpu = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            };
            tensors.insert(peft_name(layer, module, "A"), cpu(&lora.a)?);
            tensors.insert(peft_name(layer, module, "B"), cpu(&lora.b)?);
        }
    }
    let weights = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| ModelError::io(&weights, e))?;
    let text = serde_json::to_string_pretty(config).expect("config serialises");
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_round_trip() {
        for module in TARGET_MODULES {
            let name = peft_name(3, module, "A");
            assert_eq!(
                parse_peft_name(&name),
                Some((3, module.to_string(), "A".to_string()))
            );
        }
        assert_eq!(
            peft_name(0, "qkv_proj", "B"),
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"),
            Some((1, "down_proj".to_string(), "A".to_string()))
        );
        assert_eq!(parse_peft_name("model.layers.1.mlp.down_proj.weight"), None);
    }

    #[test]
    fn fused_split_adapter_equals_the_sum_of_parts() {
        let dev = Device::Cpu;
        let part = |seed: f64, out: usize| {
            let a = (Tensor::arange(0f32, 2.0 * 5.0, &dev)
                .unwrap()
                .reshape((2, 5))
                .unwrap()
                * seed)
                .unwrap();
            let b = (Tensor::arange(0f32, out as f32 * 2.0, &dev)
                .unwrap()
                .reshape((out, 2))
                .unwrap()
                * (seed + 1.0))
                .unwrap();
            (a, b)
        };
        let parts = vec![part(0.1, 3), part(-0.2, 4), part(0.3, 4)];
        let fused = fuse(&parts).unwrap();
        let delta = fused.b.matmul(&fused.a).unwrap();
        let expected = Tensor::cat(
            &parts
                .iter()
                .map(|(a, b)| b.matmul(a).unwrap())
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let diff = (delta - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
