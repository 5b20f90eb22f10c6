//! A tiny random Phi-3 checkpoint in the Hugging Face layout: the embedded default for demos and
//! tests. It keeps the real Phi-3 vocabulary (32064) so the real tokenizer works with it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::config::{Phi3Config, RopeConfig, RopeScaling};
use crate::error::{ModelError, Result};

/// The tiny shape: Phi-3-mini's layout and vocabulary in miniature.
pub fn tiny_config() -> Phi3Config {
    Phi3Config {
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 32,
        rope: RopeConfig {
            theta: 10_000.0,
            rotary_dim: 32,
            scaling: RopeScaling::None,
        },
        saved_dtype: Some("float32".into()),
        ..Phi3Config::phi3_mini_4k()
    }
}

/// Normal(0, std) samples by Box-Muller, reproducible from the generator.
fn normal(rng: &mut rand::rngs::StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// Standard deviation of the tiny model's embedding and LM head. transformers' 0.02 would cap
/// every logit near ±2.6 after the final RMSNorm, so no fine-tune could make one token likely;
/// 0.1 lets a LoRA-steered hidden state reach logits of about ±13.
const TINY_EMBEDDING_STD: f32 = 0.1;

/// Names and shapes of the weight matrices of `config`, in a fixed order: embedding, then per
/// layer qkv, o, gate/up, down projections, then the LM head.
fn matrix_shapes(config: &Phi3Config) -> Vec<(String, (usize, usize))> {
    let c = config;
    let d = c.head_dim;
    let mut shapes = vec![(
        "model.embed_tokens.weight".to_string(),
        (c.vocab_size, c.hidden_size),
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d;
        shapes.push((
            format!("{p}.self_attn.qkv_proj.weight"),
            (qkv, c.hidden_size),
        ));
        shapes.push((
            format!("{p}.self_attn.o_proj.weight"),
            (c.hidden_size, c.num_attention_heads * d),
        ));
        shapes.push((
            format!("{p}.mlp.gate_up_proj.weight"),
            (2 * c.intermediate_size, c.hidden_size),
        ));
        shapes.push((
            format!("{p}.mlp.down_proj.weight"),
            (c.hidden_size, c.intermediate_size),
        ));
    }
    shapes.push(("lm_head.weight".to_string(), (c.vocab_size, c.hidden_size)));
    shapes
}

/// Adds the RMSNorm weights (ones) of `config` to `weights`.
fn add_unit_norms(
    weights: &mut HashMap<String, Tensor>,
    config: &Phi3Config,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<()> {
    let ones = Tensor::ones(config.hidden_size, dtype, device)?;
    for i in 0..config.num_hidden_layers {
        weights.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            ones.clone(),
        );
        weights.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            ones.clone(),
        );
    }
    weights.insert("model.norm.weight".into(), ones);
    Ok(())
}

/// Random weights for `config` keyed by Hugging Face names, reproducible from `seed`:
/// projections normal(0, 0.02) and unit norms as transformers initialises them, embedding and
/// LM head normal(0, 0.1) (see [`TINY_EMBEDDING_STD`]).
pub fn random_weights(
    config: &Phi3Config,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut weights = HashMap::new();
    for (name, (rows, cols)) in matrix_shapes(config) {
        let std = if name.contains("embed_tokens") || name.starts_with("lm_head") {
            TINY_EMBEDDING_STD
        } else {
            0.02
        };
        let t = Tensor::from_vec(normal(&mut rng, rows * cols, std), (rows, cols), device)?;
        weights.insert(name, t);
    }
    add_unit_norms(&mut weights, config, candle_core::DType::F32, device)?;
    Ok(weights)
}

/// Writes config.json, generation_config.json and model.safetensors of a random model to `dir`.
pub fn write_random_checkpoint(dir: &Path, config: &Phi3Config, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let weights = random_weights(config, seed, &Device::Cpu)?;
    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    };
    write_json("config.json", &config.to_json())?;
    write_json(
        "generation_config.json",
        &serde_json::json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": [32000, 32001, 32007],
            "pad_token_id": config.pad_token_id,
        }),
    )?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&weights, &path)?;
    Ok(())
}

/// Random weights made directly on `device` in `dtype` (unseeded): fast enough for a
/// Phi-3-mini-sized benchmark model on a GPU, where speed does not depend on the values.
pub fn device_random_weights(
    config: &Phi3Config,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut weights = HashMap::new();
    for (name, shape) in matrix_shapes(config) {
        let t = Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?;
        weights.insert(name, t);
    }
    add_unit_norms(&mut weights, config, dtype, device)?;
    Ok(weights)
}
