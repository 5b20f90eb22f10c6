//! `philo merge`: fold a LoRA adapter into its base model and write a Hugging Face checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use philo_model::adapter::write_atomic;
use philo_model::{Adapter, ModelFiles, Phi3, Phi3Config, SafetensorsStore};

/// Shards of a written checkpoint stay below this size, as transformers' default (5 GB).
const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Files copied unchanged from the base model.
const COPIED: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// Loads `base` in f32 on the CPU, adds `adapter` (W + scale·B·A), writes `output` in `dtype`:
/// safetensors (sharded with an index above 5 GB), config.json, tokenizer and generation files.
/// Refuses an output folder that already holds a model, and checks the adapter against the base
/// before anything is written.
pub fn merge(base: &str, adapter_dir: &Path, output: &Path, dtype: DType) -> anyhow::Result<()> {
    for existing in [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ] {
        if output.join(existing).exists() {
            anyhow::bail!(
                "{}: already holds a model ({existing}); choose a new --output folder",
                output.display()
            );
        }
    }
    let files = ModelFiles::resolve(base)?;
    let config = Phi3Config::from_file(&files.config())?;
    let store = SafetensorsStore::open_dir(&files.dir)?;
    let mut model = Phi3::load(&config, &store, DType::F32, &Device::Cpu)?;
    let adapter = Adapter::load(adapter_dir)?;
    adapter.attach(&mut model)?;
    model.merge_lora()?;

    std::fs::create_dir_all(output)
        .with_context(|| format!("{}: cannot create", output.display()))?;
    let weights: Vec<(String, Tensor)> = model
        .named_weights()?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    write_shards(output, weights)?;
    let mut config_json = config.to_json();
    config_json["torch_dtype"] = dtype_name(dtype).into();
    write_atomic(
        &output.join("config.json"),
        serde_json::to_string_pretty(&config_json)?.as_bytes(),
    )?;
    for name in COPIED {
        if let Some(path) = files.optional(name) {
            std::fs::copy(&path, output.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json.
fn write_shards(output: &Path, weights: Vec<(String, Tensor)>) -> anyhow::Result<()> {
    let total: usize = weights
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    let mut shards: Vec<HashMap<String, Tensor>> = vec![HashMap::new()];
    let mut size = 0;
    for (name, tensor) in weights {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        if size + bytes > MAX_SHARD_BYTES && !shards.last().expect("one shard").is_empty() {
            shards.push(HashMap::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").insert(name, tensor);
    }
    if shards.len() == 1 {
        let path = output.join("model.safetensors");
        let tmp = output.join(".model.safetensors.tmp");
        candle_core::safetensors::save(&shards[0], &tmp)?;
        std::fs::rename(&tmp, &path)?;
        return Ok(());
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let tmp = output.join(format!(".{file}.tmp"));
        candle_core::safetensors::save(shard, &tmp)?;
        std::fs::rename(&tmp, output.join(&file))?;
        for name in shard.keys() {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(
        &output.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    Ok(())
}
