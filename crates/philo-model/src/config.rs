//! Phi-3 `config.json`, read in both layouts that exist in the wild:
//! the classic one of the published checkpoints (`rope_theta` and `rope_scaling` at top level) and
//! the one transformers 5 writes (`rope_parameters`, `dtype`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// How rotary position embeddings are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE with `theta`.
    None,
    /// LongRoPE (Phi-3-128k, Phi-3.5): per-frequency factors, the short list while the sequence
    /// fits in `original_max_position_embeddings`, the long list beyond it.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        /// Multiplies cos and sin: sqrt(1 + ln(max/orig) / ln(orig)) unless the config sets it.
        attention_factor: f64,
    },
}

/// Rotary embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Leading dimensions of each head that rotate (head_dim × partial_rotary_factor).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

/// The resolved Phi-3 configuration philo runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    /// A query sees itself and the previous `sliding_window - 1` keys.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in, as written (`torch_dtype` or `dtype`).
    pub saved_dtype: Option<String>,
}

/// config.json as written, before validation. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    sliding_window: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl Phi3Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used to name the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|cause| ModelError::Json {
            path: path.to_path_buf(),
            cause,
        })?;
        raw.resolve(path)
    }
}

fn required(value: Option<usize>, path: &Path, field: &str) -> Result<usize> {
    match value {
        Some(0) => Err(ModelError::invalid(path, field, "must be greater than 0")),
        Some(v) => Ok(v),
        None => Err(ModelError::invalid(path, field, "missing")),
    }
}

/// Token ids appear as a number, a list of numbers or null.
fn token_ids(value: &Option<Value>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| ModelError::invalid(path, field, format!("`{v}` is not a token id")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn factor_list(params: &Value, key: &str, path: &Path, field: &str) -> Result<Vec<f64>> {
    let field = format!("{field}.{key}");
    let list = params
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ModelError::invalid(path, &field, "missing list of numbers"))?;
    list.iter()
        .map(|v| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| {
                    ModelError::invalid(path, &field, format!("`{v}` is not a positive number"))
                })
        })
        .collect()
}

impl RawConfig {
    fn resolve(self, path: &Path) -> Result<Phi3Config> {
        match self.model_type.as_deref() {
            Some("phi3") | None => {}
            Some(other) => {
                return Err(ModelError::invalid(
                    path,
                    "model_type",
                    format!(
                        "`{other}` is not supported; philo runs Phi-3 models (model_type \"phi3\")"
                    ),
                ))
            }
        }
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::invalid(
                    path,
                    "hidden_act",
                    format!("`{act}` is not supported; Phi-3 uses silu"),
                ));
            }
        }
        let vocab_size = required(self.vocab_size, path, "vocab_size")?;
        let hidden_size = required(self.hidden_size, path, "hidden_size")?;
        let intermediate_size = required(self.intermediate_size, path, "intermediate_size")?;
        let num_hidden_layers = required(self.num_hidden_layers, path, "num_hidden_layers")?;
        let num_attention_heads = required(self.num_attention_heads, path, "num_attention_heads")?;
        let num_key_value_heads = required(
            Some(self.num_key_value_heads.unwrap_or(num_attention_heads)),
            path,
            "num_key_value_heads",
        )?;
        let max_position_embeddings = required(
            self.max_position_embeddings,
            path,
            "max_position_embeddings",
        )?;
        if hidden_size % num_attention_heads != 0 {
            return Err(ModelError::invalid(
                path,
                "hidden_size",
                format!(
                    "{hidden_size} is not divisible by num_attention_heads = {num_attention_heads}"
                ),
            ));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::invalid(
                path,
                "num_key_value_heads",
                format!("num_attention_heads = {num_attention_heads} is not a multiple of {num_key_value_heads}"),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;

        // transformers 5 moves the rope settings into `rope_parameters`; the classic layout keeps
        // theta and partial factor at top level and the scaling in `rope_scaling`.
        let (params, params_field) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p @ Value::Object(_)), _) => (Some(p.clone()), "rope_parameters"),
            (_, Some(s @ Value::Object(_))) => (Some(s.clone()), "rope_scaling"),
            _ => (None, "rope_scaling"),
        };
        let param_f64 = |key: &str| {
            params
                .as_ref()
                .and_then(|p| p.get(key))
                .and_then(Value::as_f64)
        };
        let theta = param_f64("rope_theta")
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let partial = param_f64("partial_rotary_factor")
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(ModelError::invalid(
                path,
                "partial_rotary_factor",
                format!("{partial} is not in (0, 1]"),
            ));
        }
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(ModelError::invalid(
                path,
                "partial_rotary_factor",
                format!(
                    "gives an odd or empty rotary dimension {rotary_dim} for head_dim {head_dim}"
                ),
            ));
        }
        let rope_type = params.as_ref().and_then(|p| {
            p.get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let scaling = match rope_type.as_deref() {
            None | Some("default") => RopeScaling::None,
            Some("longrope") | Some("su") => {
                let p = params.as_ref().expect("rope type comes from params");
                let short_factor = factor_list(p, "short_factor", path, params_field)?;
                let long_factor = factor_list(p, "long_factor", path, params_field)?;
                for (name, list) in [
                    ("short_factor", &short_factor),
                    ("long_factor", &long_factor),
                ] {
                    if list.len() != rotary_dim / 2 {
                        return Err(ModelError::invalid(
                            path,
                            &format!("{params_field}.{name}"),
                            format!(
                                "has {} entries, the model needs rotary_dim / 2 = {}",
                                list.len(),
                                rotary_dim / 2
                            ),
                        ));
                    }
                }
                let original = p
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
                    .or(self.original_max_position_embeddings)
                    .ok_or_else(|| {
                        ModelError::invalid(
                            path,
                            "original_max_position_embeddings",
                            "missing, LongRoPE needs it",
                        )
                    })?;
                let original = required(Some(original), path, "original_max_position_embeddings")?;
                let attention_factor = match param_f64("attention_factor") {
                    Some(f) => f,
                    None => {
                        let scale = max_position_embeddings as f64 / original as f64;
                        if scale <= 1.0 {
                            1.0
                        } else {
                            (1.0 + scale.ln() / (original as f64).ln()).sqrt()
                        }
                    }
                };
                RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            Some(other) => {
                return Err(ModelError::invalid(
                    path,
                    &format!("{params_field}.rope_type"),
                    format!(
                        "`{other}` is not supported; philo runs default and longrope (su) RoPE"
                    ),
                ))
            }
        };
        if let Some(0) = self.sliding_window {
            return Err(ModelError::invalid(
                path,
                "sliding_window",
                "must be greater than 0",
            ));
        }
        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-5);
        Ok(Phi3Config {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            max_position_embeddings,
            rope: RopeConfig {
                theta,
                rotary_dim,
                scaling,
            },
            sliding_window: self.sliding_window,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(&self.bos_token_id, path, "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(&self.eos_token_id, path, "eos_token_id")?,
            pad_token_id: token_ids(&self.pad_token_id, path, "pad_token_id")?
                .first()
                .copied(),
            saved_dtype: self.torch_dtype.or(self.dtype),
        })
    }
}

/// Token ids generation stops on, from `generation_config.json` (`eos_token_id`: a number or a list).
pub fn read_generation_eos(path: &Path) -> Result<Vec<u32>> {
    #[derive(Deserialize)]
    struct GenerationConfig {
        eos_token_id: Option<Value>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let raw: GenerationConfig = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
        path: path.to_path_buf(),
        cause,
    })?;
    token_ids(&raw.eos_token_id, path, "eos_token_id")
}

impl Phi3Config {
    /// The Phi-3-mini shape (3.8B) used for benchmarks: hidden 3072, 32 layers, 32 heads,
    /// head_dim 96, intermediate 8192, vocab 32064, 4k context.
    pub fn phi3_mini_4k() -> Self {
        Phi3Config {
            vocab_size: 32064,
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 96,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
            rope: RopeConfig {
                theta: 10_000.0,
                rotary_dim: 96,
                scaling: RopeScaling::None,
            },
            sliding_window: Some(2047),
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![32000],
            pad_token_id: Some(32000),
            saved_dtype: Some("bfloat16".into()),
        }
    }

    /// The config as classic-layout JSON (the layout of the published Phi-3 checkpoints). The
    /// LongRoPE attention factor is left out: readers derive it from the two lengths.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rope_scaling": null,
            "partial_rotary_factor": self.rope.rotary_dim as f64 / self.head_dim as f64,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.saved_dtype,
        });
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            ..
        } = &self.rope.scaling
        {
            v["original_max_position_embeddings"] = (*original_max_position_embeddings).into();
            v["rope_scaling"] = serde_json::json!({
                "type": "longrope",
                "short_factor": short_factor,
                "long_factor": long_factor,
            });
        }
        v
    }
}
