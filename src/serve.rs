//! `philo serve`: loads a model and its adapters, sizes the paged KV cache, starts the engine
//! and the OpenAI-compatible HTTP server, and shuts both down on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};
use philo_model::{Adapter, PagedKvCache};
use philo_serve::engine::{DecodePath, EngineConfig, EngineHandle};
use philo_serve::http::{serve, shutdown_signal, ServerConfig, ServerState};
use philo_serve::request::Backend;

use crate::pipeline::Pipeline;

/// Everything `philo serve` is told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: String,
    /// The id clients send as `model` for the base (default: [`default_model_id`]).
    pub served_model_name: Option<String>,
    /// (name, folder) of each PEFT adapter to load at start.
    pub adapters: Vec<(String, PathBuf)>,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    pub max_running: usize,
    pub max_tokens_per_step: usize,
    pub max_queue: usize,
    pub block_size: usize,
    /// KV cache size; None: on a GPU what `gpu_memory_utilization` leaves after the weights
    /// and the step's workspace, 1 GiB on the CPU (never more than `max_running` sequences of
    /// the full context need).
    pub kv_cache_gib: Option<f64>,
    /// The share of the GPU's memory the server may bring it to (vLLM's
    /// `--gpu-memory-utilization`), when `kv_cache_gib` is not given.
    pub gpu_memory_utilization: f64,
    /// The base model's format (adapters run unmerged on top).
    pub quant: crate::quant::BaseQuant,
    /// Run every step through the general forward (no decode kernels or CUDA graphs).
    pub enforce_eager: bool,
    /// Speculative decoding, up to this many tokens a step (None: off; see
    /// `EngineConfig::speculative_tokens`): by prompt lookup, or with `draft_model`.
    pub speculative_tokens: Option<usize>,
    /// The draft model (folder or hub id) proposing when speculating; None: prompt lookup.
    pub draft_model: Option<String>,
}

/// The id clients use for the base model when `--served-model-name` is not given: a local
/// folder's own name (not its path, which would leak the server's file layout), a hub id as it
/// is.
pub fn default_model_id(spec: &str) -> String {
    let path = std::path::Path::new(spec);
    if path.is_dir() {
        let full = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(name) = full.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    spec.to_string()
}

/// Parses `NAME=DIR` of `--adapter`.
pub fn parse_adapter(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!(
            "`{arg}` is not NAME=DIR (for example --adapter pirate=out/pirate-adapter)"
        )),
    }
}

/// KV blocks for `options` on this model: `--kv-cache-gib`, or on a GPU what
/// `--gpu_memory_utilization` leaves beside the loaded weights and the step's workspace (1 GiB
/// on the CPU); never more than every running sequence at full context needs. Also says how
/// the size was chosen.
fn kv_blocks(pipeline: &Pipeline, options: &ServeOptions) -> anyhow::Result<(usize, String)> {
    let model = &pipeline.model;
    let (bytes, how) = match (
        options.kv_cache_gib,
        philo_model::memory::device_memory(model.device()),
    ) {
        (Some(gib), _) => (gib * philo_plan::GIB, "--kv-cache-gib".to_string()),
        (None, Some((free, total))) => {
            let shape = philo_plan::ModelShape::from_config(model.config());
            let setup = serve_setup(model, options);
            let workspace = philo_plan::infer::serve_workspace(&shape, &setup);
            let bytes = philo_plan::infer::kv_cache_for_utilization(
                total as f64,
                free as f64 - philo_plan::LIBRARY_BYTES,
                options.gpu_memory_utilization,
                workspace,
            );
            anyhow::ensure!(
                bytes > 0.0,
                "no GPU memory is left for the KV cache within --gpu_memory_utilization {}: {:.1} of {:.1} GiB are in use after loading the weights; raise it, quantise the base (--quant int8/int4/nf4) or give --kv-cache-gib",
                options.gpu_memory_utilization,
                (total - free) as f64 / philo_plan::GIB,
                total as f64 / philo_plan::GIB
            );
            (
                bytes,
                format!(
                    "--gpu_memory_utilization {}",
                    options.gpu_memory_utilization
                ),
            )
        }
        (None, None) => (philo_plan::GIB, "the CPU's default".to_string()),
    };
    let per_block =
        PagedKvCache::bytes_per_block(model.config(), options.block_size, model.dtype());
    let by_memory = bytes as usize / per_block;
    let context = model.config().max_position_embeddings;
    let by_need = options.max_running * context.div_ceil(options.block_size);
    let blocks = by_memory.min(by_need);
    let gib = (blocks * per_block) as f64 / philo_plan::GIB;
    let capped = if by_need < by_memory {
        format!(
            ", capped at {} sequences of {context} tokens",
            options.max_running
        )
    } else {
        String::new()
    };
    Ok((blocks, format!("{gib:.1} GiB from {how}{capped}")))
}

/// `options` as philo-plan's serving setup.
fn serve_setup(model: &philo_model::Phi3, options: &ServeOptions) -> philo_plan::infer::ServeSetup {
    philo_plan::ServeSetup {
        base: crate::plan::base_format(options.quant, true),
        dtype_bytes: model.dtype().size_in_bytes(),
        max_batch: options.max_running,
        max_batch_tokens: options.max_tokens_per_step,
        block_size: options.block_size,
        kv_cache_gib: None,
        gpu_memory_utilization: options.gpu_memory_utilization,
        context: model.config().max_position_embeddings,
    }
}

/// What to do when the KV cache does not fit: the cache that the free memory holds beside the
/// step's workspace, as philo plan computes it.
fn kv_cache_advice(model: &philo_model::Phi3, options: &ServeOptions) -> String {
    let Some((free, _)) = philo_model::memory::device_memory(model.device()) else {
        return "give a smaller --kv-cache-gib".to_string();
    };
    let shape = philo_plan::ModelShape::from_config(model.config());
    let setup = serve_setup(model, options);
    let fit = philo_plan::infer::kv_cache_that_fits(
        &shape,
        &setup,
        free as f64 - philo_plan::LIBRARY_BYTES,
    );
    format!(
        "{:.1} GiB were free after loading the weights: --kv-cache-gib {:.1} fits (or lower --max-batch-tokens)",
        free as f64 / philo_plan::GIB,
        (fit / philo_plan::GIB * 10.0).floor() / 10.0
    )
}

/// Runs the server until Ctrl-C or SIGTERM, then lets running requests finish.
pub fn run(options: ServeOptions, dtype: DType, device: &Device) -> anyhow::Result<()> {
    anyhow::ensure!(
        options.gpu_memory_utilization > 0.0 && options.gpu_memory_utilization <= 1.0,
        "--gpu_memory_utilization must be in (0, 1], not {}",
        options.gpu_memory_utilization
    );
    let weights = crate::pipeline::WeightOptions {
        quant: options.quant,
        merge_adapter: false,
    };
    let pipeline = Pipeline::load(&options.model, None, weights, dtype, device)?;
    let speculating = options.speculative_tokens.is_some();
    if speculating && (options.enforce_eager || !device.is_cuda()) {
        eprintln!(
            "philo serve: --speculative verifies on the GPU's decode step; with {} every step runs plain",
            if options.enforce_eager { "--enforce_eager" } else { "this device" }
        );
    }
    // Loaded (with its states) before the KV cache is sized, which then counts its memory.
    let draft = match &options.draft_model {
        Some(dir) if speculating && !options.enforce_eager && device.is_cuda() => {
            let draft = Pipeline::load(dir, None, weights, dtype, device)
                .with_context(|| format!("--draft_model {dir}"))?
                .model;
            let capacity = pipeline
                .model
                .config()
                .max_position_embeddings
                .min(draft.config().max_position_embeddings);
            let vocab = pipeline.model.config().vocab_size;
            let pool = philo_serve::draft::DraftPool::new(
                draft,
                philo_serve::draft::STATES,
                capacity,
                vocab,
            )
            .with_context(|| format!("--draft_model {dir}"))?;
            Some(pool)
        }
        _ => None,
    };
    let mut adapters = Vec::new();
    for (name, dir) in &options.adapters {
        let adapter =
            Adapter::load(dir).with_context(|| format!("--adapter {name}={}", dir.display()))?;
        adapters.push((name.clone(), adapter));
    }
    let (num_blocks, kv_size) = kv_blocks(&pipeline, &options)?;
    anyhow::ensure!(
        num_blocks > 0,
        "the KV cache ({kv_size}) holds no block of {} tokens; give it more memory",
        options.block_size
    );
    let model_id = options
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_id(&options.model));
    let config = EngineConfig {
        model_id: model_id.clone(),
        max_running: options.max_running,
        max_tokens_per_step: options.max_tokens_per_step,
        max_queue: options.max_queue,
        block_size: options.block_size,
        num_blocks,
        decode_path: if options.enforce_eager {
            DecodePath::Eager
        } else {
            DecodePath::Graph
        },
        speculative_tokens: options.speculative_tokens,
    };
    let Pipeline {
        model,
        tokenizer,
        template,
        stop_tokens,
        ..
    } = pipeline;
    let kv_advice = kv_cache_advice(&model, &options);
    let engine = Arc::new(
        EngineHandle::start_with_draft(model, config, adapters, draft).map_err(|e| {
            crate::oom::explain(
                e,
                &format!(
                    "allocating the KV cache ({num_blocks} blocks of {} tokens)",
                    options.block_size
                ),
                &kv_advice,
            )
        })?,
    );
    let state = ServerState::new(ServerConfig {
        backend: engine.clone(),
        tokenizer,
        template,
        stop_token_ids: stop_tokens,
        api_key: options.api_key.clone(),
        base_model: model_id.clone(),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .with_context(|| format!("cannot listen on {}", options.addr))?;
        eprintln!(
            "philo serve: `{model_id}` on http://{} ({} KV blocks of {} tokens: {kv_size}; batch up to {}, {} tokens per step){}",
            listener.local_addr()?,
            num_blocks,
            options.block_size,
            options.max_running,
            options.max_tokens_per_step,
            if options.api_key.is_some() { ", API key required" } else { "" }
        );
        serve(listener, state, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    engine.shutdown();
    engine.join();
    eprintln!("philo serve: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_model_id_is_the_folder_name_or_the_hub_id() {
        let dir = tempfile::TempDir::new().unwrap();
        let model = dir.path().join("my-phi3");
        std::fs::create_dir(&model).unwrap();
        assert_eq!(default_model_id(model.to_str().unwrap()), "my-phi3");
        let with_slash = format!("{}/", model.display());
        assert_eq!(default_model_id(&with_slash), "my-phi3");
        assert_eq!(
            default_model_id("microsoft/Phi-3-mini-4k-instruct"),
            "microsoft/Phi-3-mini-4k-instruct"
        );
    }
}
