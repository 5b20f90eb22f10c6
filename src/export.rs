//! `philo export`: a model (with an adapter merged in) as a GGUF file for llama.cpp and Ollama.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use philo_gguf::{ExportInput, ExportSummary, ExportType};
use philo_model::{Adapter, ModelFiles, Phi3Config, SafetensorsStore};

/// What `philo export` was asked for.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// A model folder or hub id.
    pub model: String,
    /// A PEFT adapter folded into the weights first.
    pub adapter: Option<PathBuf>,
    pub quant: ExportType,
    pub output: PathBuf,
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// Writes the GGUF file (an existing file is never overwritten).
pub fn export(options: &ExportOptions) -> anyhow::Result<ExportSummary> {
    if options.output.exists() {
        anyhow::bail!(
            "{}: already exists; choose a new --output file",
            options.output.display()
        );
    }
    let files = ModelFiles::resolve(&options.model)?;
    let config = Phi3Config::from_file(&files.config())?;
    let tokenizer_path = files.optional("tokenizer.json").with_context(|| {
        format!(
            "{}: no tokenizer.json to put in the GGUF file",
            files.dir.display()
        )
    })?;
    let tokenizer = read_json(&tokenizer_path)?;
    let tokenizer_config = files
        .optional("tokenizer_config.json")
        .map(|p| read_json(&p))
        .transpose()?;
    let chat_template = tokenizer_config
        .as_ref()
        .and_then(|c| c["chat_template"].as_str())
        .map(str::to_string);
    let store = SafetensorsStore::open_dir(&files.dir)?;
    let adapter = options.adapter.as_deref().map(Adapter::load).transpose()?;
    let tensors = checkpoint_tensors(&config, &store);
    if let Some(adapter) = &adapter {
        check_adapter(adapter, &tensors)?;
    }
    // Each tensor in f32, its adapter's scale·B·A added: the merge loses nothing to rounding
    // before the export's own type.
    let load = |name: &str| -> philo_gguf::Result<candle_core::Tensor> {
        let shape = &tensors
            .iter()
            .find(|(n, _)| n == name)
            .expect("a listed tensor")
            .1;
        let weight = store.load(name, shape, DType::F32, &Device::Cpu)?;
        let Some(pair) = adapter.as_ref().and_then(|a| {
            let (layer, module) = layer_module(name)?;
            a.weights.get(&(layer, module.to_string()))
        }) else {
            return Ok(weight);
        };
        let scale = adapter.as_ref().map_or(1.0, |a| a.config.scale());
        let delta = pair
            .b
            .to_dtype(DType::F32)?
            .matmul(&pair.a.to_dtype(DType::F32)?)?;
        Ok((weight + (delta * scale)?)?)
    };
    let name = Path::new(&options.model)
        .file_name()
        .map_or(options.model.clone(), |n| n.to_string_lossy().to_string());
    let bar = ProgressBar::new(tensors.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    bar.set_message(format!("quantising to {}", options.quant.name()));
    let input = ExportInput {
        config: &config,
        tensors: tensors.clone(),
        load: &load,
        tokenizer: &tokenizer,
        tokenizer_config: tokenizer_config.as_ref(),
        chat_template,
        name,
    };
    let summary = philo_gguf::write_gguf(&options.output, input, options.quant, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(summary)
}

/// The checkpoint's tensors Phi-3 uses, with their shapes (the LM head only when it is its
/// own matrix).
fn checkpoint_tensors(config: &Phi3Config, store: &SafetensorsStore) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (config.hidden_size, config.head_dim);
    let qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, h],
    )];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.qkv_proj.weight"), vec![qkv, h]),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, config.num_attention_heads * d],
            ),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![2 * config.intermediate_size, h],
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![h, config.intermediate_size],
            ),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings || store.shape("lm_head.weight").is_some() {
        out.push(("lm_head.weight".to_string(), vec![config.vocab_size, h]));
    }
    out
}

/// `model.layers.N.<group>.<module>.weight` → (N, module).
fn layer_module(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?.rsplit('.').next()?;
    Some((layer.parse().ok()?, module))
}

/// Every LoRA pair of `adapter` belongs to one of `tensors` and has its shape.
fn check_adapter(adapter: &Adapter, tensors: &[(String, Vec<usize>)]) -> anyhow::Result<()> {
    for ((layer, module), pair) in &adapter.weights {
        let target = tensors
            .iter()
            .find(|(name, _)| layer_module(name) == Some((*layer, module.as_str())));
        let Some((name, shape)) = target else {
            anyhow::bail!(
                "{}: the adapter has {module} in layer {layer}, which the base model does not have; it was trained for another model",
                adapter.dir.display()
            );
        };
        let (a, b) = (pair.a.dims(), pair.b.dims());
        if a.len() != 2 || b.len() != 2 || a[1] != shape[1] || b[0] != shape[0] || a[0] != b[1] {
            anyhow::bail!(
                "{}: lora_A {a:?} and lora_B {b:?} do not fit {name} {shape:?}; the adapter was trained for another model",
                adapter.dir.display()
            );
        }
    }
    Ok(())
}
