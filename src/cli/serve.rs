//! `philo serve`: the arguments; the server is `philo::serve`.

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;
use philo::device::{default_dtype, parse_dtype, DeviceChoice};

use crate::{SpeculativeArgs, WeightArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// A model folder (Hugging Face layout) or a hub id such as microsoft/Phi-3-mini-4k-instruct.
    #[arg(long)]
    model: String,
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// A LoRA adapter served as its own model: NAME=DIR (a PEFT folder); repeatable. Clients pick
    /// it with "model": "NAME"; more can be loaded later with POST /v1/adapters.
    #[arg(long = "adapter", value_parser = philo::serve::parse_adapter)]
    adapters: Vec<(String, PathBuf)>,
    #[command(flatten)]
    weights: WeightArgs,
    /// Address to listen on; 127.0.0.1 keeps the server local. Use 0.0.0.0 to expose it.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (also read from PHILO_API_KEY).
    #[arg(long = "api-key", env = "PHILO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients send for the base model (default: the model folder's name, or the
    /// hub id).
    #[arg(long = "served-model-name")]
    served_model_name: Option<String>,
    /// Requests allowed to wait for a place in the batch; beyond it clients get 429.
    #[arg(long = "max-queue", default_value_t = 256)]
    max_queue: usize,
    /// Run every step through the general forward, op by op (as vLLM's --enforce-eager): no
    /// decode kernels or CUDA graphs, for comparing or working around them.
    #[arg(long = "enforce_eager", alias = "enforce-eager")]
    enforce_eager: bool,
    /// Speculative decoding (`--speculative ngram`, or `draft` with --draft_model DIR): while at
    /// most 4 sequences decode, each step also verifies up to --num_speculative_tokens tokens
    /// per sequence, copied from its prompt and output or decoded ahead by the draft model
    /// (which keeps one KV cache of the full context for each of 4 sequences); the output is
    /// unchanged.
    #[command(flatten)]
    speculation: SpeculativeArgs,
    #[command(flatten)]
    shape: ServeShapeArgs,
}

/// The flags of a server that set its memory (`serve` and `plan serve`).
#[derive(Args)]
pub struct ServeShapeArgs {
    /// Most sequences decoded together.
    #[arg(long = "max-batch", default_value_t = 128)]
    pub max_batch: usize,
    /// Most tokens one step computes (decode tokens plus prompt chunks): long prompts are
    /// prefilled in chunks of this size so running streams keep flowing.
    #[arg(long = "max-batch-tokens", default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Tokens per KV cache block.
    #[arg(long = "block-size", default_value_t = 16)]
    pub block_size: usize,
    /// Memory for the paged KV cache in GiB (default: on a GPU what --gpu_memory_utilization
    /// leaves after the weights; 1 on the CPU).
    #[arg(long = "kv-cache-gib", alias = "kv_cache_gib")]
    pub kv_cache_gib: Option<f64>,
    /// The share of the GPU's memory the server may fill (weights, workspace and KV cache), as
    /// vLLM's --gpu-memory-utilization.
    #[arg(
        long = "gpu_memory_utilization",
        alias = "gpu-memory-utilization",
        default_value_t = 0.9
    )]
    pub gpu_memory_utilization: f64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.shape.max_batch > 0 && args.shape.max_batch_tokens > 0 && args.shape.block_size > 0,
        "--max-batch, --max-batch-tokens and --block-size must be at least 1"
    );
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or_else(|| default_dtype(&device));
    let (speculative_tokens, draft_model) = args.speculation.serve_speculation()?;
    let options = philo::serve::ServeOptions {
        model: args.model,
        served_model_name: args.served_model_name,
        adapters: args.adapters,
        addr: std::net::SocketAddr::new(args.host, args.port),
        api_key: args.api_key,
        max_running: args.shape.max_batch,
        max_tokens_per_step: args.shape.max_batch_tokens,
        max_queue: args.max_queue,
        block_size: args.shape.block_size,
        kv_cache_gib: args.shape.kv_cache_gib,
        gpu_memory_utilization: args.shape.gpu_memory_utilization,
        quant: args.weights.quant(philo::quant::BaseQuant::None),
        enforce_eager: args.enforce_eager,
        speculative_tokens,
        draft_model,
    };
    philo::serve::run(options, dtype, &device)
}
