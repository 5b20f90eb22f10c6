//! Memory and decode speed of generation and serving: the weights in their format, the KV
//! cache, and the activations of a prefill (whole prompt in `generate`, `--max-batch-tokens`
//! chunks in `serve`). Fitted to `philo bench prefill/decode` on the H200 (docs/plan.md).

use serde::Serialize;

use crate::gpu::GpuSpec;
use crate::shape::ModelShape;
use crate::train::BaseFormat;
use crate::{ALLOCATOR_RESERVE, CUDA_CONTEXT_BYTES, GIB, HEADROOM};

/// Prefill activations per token, in hidden-sized tensors of the compute dtype (fitted: a
/// 2,048-token bf16 prefill of Phi-3-mini peaks 0.36 GiB above its weights, 190 KB a token).
const PREFILL_HIDDEN_COPIES: f64 = 31.0;

/// Decode time model, fitted to bf16 and NF4 decoding of one sequence on the H200: the
/// weights stream at DECODE_WEIGHT_EFFICIENCY of the bandwidth; a quantised base is
/// dequantised per matmul (read the codes, write and read the dense copy) at
/// DEQUANT_EFFICIENCY; each layer costs DECODE_LAYER_SECONDS of launches; each cached token
/// costs its KV bytes at DECODE_KV_EFFICIENCY (philo's decode attention is not yet a
/// bandwidth-bound kernel).
const DECODE_WEIGHT_EFFICIENCY: f64 = 0.8;
const DEQUANT_EFFICIENCY: f64 = 0.47;
const DECODE_LAYER_SECONDS: f64 = 53e-6;
const DECODE_KV_EFFICIENCY: f64 = 0.034;
/// The serving engine's paged attention reads the cache at this fraction of the bandwidth,
/// and each sequence of a step costs SEQUENCE_SECONDS of sampling and bookkeeping (fitted to
/// `philo bench serve` on the H200).
const PAGED_KV_EFFICIENCY: f64 = 0.3;
const SEQUENCE_SECONDS: f64 = 20e-6;
/// Projection GEMMs of a batched decode step, as a fraction of the tensor peak.
const DECODE_GEMM_EFFICIENCY: f64 = 0.4;

/// What generation needs, bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferMemory {
    pub weights: f64,
    /// Keys and values of every cached token.
    pub kv_cache: f64,
    /// The widest prefill step's activations (and a quantised base's dequantised matrix).
    pub activations: f64,
}

impl InferMemory {
    pub fn total(&self) -> f64 {
        self.weights + self.kv_cache + self.activations
    }

    /// The process's GPU memory as nvidia-smi shows it (see [`crate::CUDA_CONTEXT_BYTES`]).
    pub fn device_total(&self) -> f64 {
        self.total() + ALLOCATOR_RESERVE * self.activations + CUDA_CONTEXT_BYTES
    }
}

/// Weights of `shape` with projections in `base` and the rest in the compute dtype.
pub fn weight_bytes(shape: &ModelShape, base: BaseFormat, dtype_bytes: usize) -> f64 {
    shape.projection_params() as f64 * base.bytes_per_weight(dtype_bytes)
        + (shape.embedding_params() + shape.norm_params()) as f64 * dtype_bytes as f64
}

/// Peak memory of generating up to `context` tokens for `batch` sequences after prefilling
/// `prefill_tokens` tokens in one step.
pub fn infer_memory(
    shape: &ModelShape,
    base: BaseFormat,
    dtype_bytes: usize,
    batch: usize,
    context: usize,
    prefill_tokens: usize,
) -> InferMemory {
    let dt = dtype_bytes as f64;
    let largest = shape
        .projections()
        .iter()
        .map(|p| p.params())
        .max()
        .unwrap_or(0) as f64;
    let dequantized = match base {
        BaseFormat::Dense => 0.0,
        _ => largest * dt,
    };
    InferMemory {
        weights: weight_bytes(shape, base, dtype_bytes),
        kv_cache: (batch * context * shape.kv_bytes_per_token(dtype_bytes)) as f64,
        activations: prefill_tokens as f64 * PREFILL_HIDDEN_COPIES * shape.hidden as f64 * dt
            + dequantized,
    }
}

/// Which KV cache a decode step reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    /// `generate`/`chat`: one contiguous cache per sequence.
    Contiguous,
    /// `serve`: the engine's block tables.
    Paged,
}

/// Seconds of one decode step of `batch` sequences with `context` cached tokens each.
pub fn decode_step_seconds(
    shape: &ModelShape,
    base: BaseFormat,
    dtype_bytes: usize,
    batch: usize,
    context: usize,
    layout: KvLayout,
    gpu: &GpuSpec,
) -> f64 {
    let dt = dtype_bytes as f64;
    let bw = gpu.bandwidth_bytes_per_second;
    let projections = shape.projection_params() as f64;
    let other = (shape.embedding_params() / if shape.tied_embeddings { 1 } else { 2 }) as f64 * dt;
    let weights = match base {
        BaseFormat::Dense => (projections * dt + other) / (DECODE_WEIGHT_EFFICIENCY * bw),
        format => {
            projections * (format.bytes_per_weight(dtype_bytes) + 2.0 * dt)
                / (DEQUANT_EFFICIENCY * bw)
                + other / (DECODE_WEIGHT_EFFICIENCY * bw)
        }
    };
    let kv_bytes = (batch * context * shape.kv_bytes_per_token(dtype_bytes)) as f64;
    let (kv, per_sequence) = match layout {
        KvLayout::Contiguous => (kv_bytes / (DECODE_KV_EFFICIENCY * bw), 0.0),
        KvLayout::Paged => (kv_bytes / (PAGED_KV_EFFICIENCY * bw), SEQUENCE_SECONDS),
    };
    let gemm = batch as f64 * 2.0 * shape.total_params() as f64
        / (DECODE_GEMM_EFFICIENCY * gpu.tensor_flops);
    weights + kv + gemm + batch as f64 * per_sequence + shape.layers as f64 * DECODE_LAYER_SECONDS
}

/// A generation planned on a GPU (`philo plan generate`).
#[derive(Debug, Clone, Serialize)]
pub struct GeneratePlan {
    pub gpu: String,
    pub gpu_memory_gib: f64,
    pub base: &'static str,
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// Predicted peak of the allocator (tensors).
    pub peak_gib: f64,
    pub cuda_context_gib: f64,
    /// The process's memory as nvidia-smi shows it.
    pub device_gib: f64,
    pub fits: bool,
    /// Mean decode speed over the generation.
    pub tokens_per_second: f64,
    /// The peak by what holds it, GiB.
    pub breakdown_gib: InferMemory,
}

/// Plans generating `max_new_tokens` after a `prompt_tokens` prompt, one sequence.
pub fn plan_generate(
    shape: &ModelShape,
    base: BaseFormat,
    dtype_bytes: usize,
    prompt_tokens: usize,
    max_new_tokens: usize,
    gpu: &GpuSpec,
) -> GeneratePlan {
    let context = prompt_tokens + max_new_tokens;
    let memory = infer_memory(shape, base, dtype_bytes, 1, context, prompt_tokens);
    // The step time grows linearly with the context: its mean is the midpoint's.
    let mid = prompt_tokens + max_new_tokens / 2;
    let step = decode_step_seconds(shape, base, dtype_bytes, 1, mid, KvLayout::Contiguous, gpu);
    GeneratePlan {
        gpu: gpu.name.clone(),
        gpu_memory_gib: gpu.memory_gib(),
        base: base.name(),
        prompt_tokens,
        max_new_tokens,
        peak_gib: memory.total() / GIB,
        cuda_context_gib: CUDA_CONTEXT_BYTES / GIB,
        device_gib: memory.device_total() / GIB,
        fits: memory.device_total() <= gpu.memory_bytes as f64,
        tokens_per_second: 1.0 / step,
        breakdown_gib: InferMemory {
            weights: memory.weights / GIB,
            kv_cache: memory.kv_cache / GIB,
            activations: memory.activations / GIB,
        },
    }
}

/// A server planned on a GPU (`philo plan serve`).
#[derive(Debug, Clone, Serialize)]
pub struct ServePlan {
    pub gpu: String,
    pub gpu_memory_gib: f64,
    pub base: &'static str,
    pub weights_gib: f64,
    /// Activations of the widest step (`--max-batch-tokens` prefill tokens) and the logits.
    pub workspace_gib: f64,
    /// The KV cache: `--kv-cache-gib`, or what `--gpu_memory_utilization` leaves.
    pub kv_cache_gib: f64,
    pub kv_tokens: usize,
    /// The largest KV cache that fits beside the weights with the headroom.
    pub max_kv_cache_gib: f64,
    pub max_kv_tokens: usize,
    /// Tokens a stream holds (prompt and answer).
    pub context: usize,
    /// Streams of `context` tokens the asked-for cache holds at once.
    pub streams: usize,
    /// Predicted peak of the allocator (tensors).
    pub peak_gib: f64,
    pub cuda_context_gib: f64,
    /// The process's memory as nvidia-smi shows it.
    pub device_gib: f64,
    pub fits: bool,
    /// Streams decoded together: min(streams, --max-batch).
    pub running: usize,
    /// Generated tokens per second with `running` streams at half their context.
    pub tokens_per_second: f64,
}

/// How `philo serve` is configured, for a plan.
#[derive(Debug, Clone)]
pub struct ServeSetup {
    pub base: BaseFormat,
    pub dtype_bytes: usize,
    pub max_batch: usize,
    pub max_batch_tokens: usize,
    pub block_size: usize,
    /// `--kv-cache-gib`; None: what `gpu_memory_utilization` leaves.
    pub kv_cache_gib: Option<f64>,
    pub gpu_memory_utilization: f64,
    pub context: usize,
}

/// The step workspace of `philo serve`: the activations of `--max-batch-tokens` prefill tokens
/// and the sampler's f32 logits and probabilities of every running sequence.
pub fn serve_workspace(shape: &ModelShape, setup: &ServeSetup) -> f64 {
    let prefill = infer_memory(
        shape,
        setup.base,
        setup.dtype_bytes,
        0,
        0,
        setup.max_batch_tokens,
    );
    prefill.activations + (setup.max_batch * shape.vocab * 8) as f64
}

/// The largest KV cache, bytes, that `free_bytes` (beside the loaded weights) hold with the step
/// workspace, the allocator's reserve and [`HEADROOM`].
pub fn kv_cache_that_fits(shape: &ModelShape, setup: &ServeSetup, free_bytes: f64) -> f64 {
    let workspace = serve_workspace(shape, setup);
    (free_bytes / (1.0 + HEADROOM) - workspace * (1.0 + ALLOCATOR_RESERVE)).max(0.0)
}

/// The KV cache, bytes, for `--gpu_memory_utilization`: the process may bring the GPU's use to
/// `utilization` × `total_bytes`; what is in use already (`total_bytes` − `free_bytes`: the
/// weights, the CUDA context, other processes) and the step's workspace with the allocator's
/// reserve come off; the rest holds the cache. 0 when nothing is left.
pub fn kv_cache_for_utilization(
    total_bytes: f64,
    free_bytes: f64,
    utilization: f64,
    workspace_bytes: f64,
) -> f64 {
    let in_use = total_bytes - free_bytes;
    (utilization * total_bytes - in_use - workspace_bytes * (1.0 + ALLOCATOR_RESERVE)).max(0.0)
}

/// Plans `philo serve` with `setup` on `gpu`.
pub fn plan_serve(shape: &ModelShape, setup: &ServeSetup, gpu: &GpuSpec) -> ServePlan {
    let dt = setup.dtype_bytes;
    let weights = weight_bytes(shape, setup.base, dt);
    let workspace = serve_workspace(shape, setup);
    let block_bytes = (setup.block_size.max(1) * shape.kv_bytes_per_token(dt)) as f64;
    let tokens_in = |bytes: f64| (bytes / block_bytes).floor().max(0.0) as usize * setup.block_size;
    let usable = gpu.memory_bytes as f64 - CUDA_CONTEXT_BYTES;
    let kv_bytes = match setup.kv_cache_gib {
        Some(gib) => gib * GIB,
        None => kv_cache_for_utilization(
            gpu.memory_bytes as f64,
            usable - weights,
            setup.gpu_memory_utilization,
            workspace,
        ),
    };
    let reserve = ALLOCATOR_RESERVE * workspace;
    let max_kv = kv_cache_that_fits(shape, setup, usable - weights);
    let kv_tokens = tokens_in(kv_bytes);
    let context = setup.context.max(1);
    let streams = kv_tokens / context;
    let running = streams.min(setup.max_batch).max(1);
    let step = decode_step_seconds(
        shape,
        setup.base,
        dt,
        running,
        context / 2,
        KvLayout::Paged,
        gpu,
    );
    let peak = weights + workspace + kv_bytes;
    ServePlan {
        gpu: gpu.name.clone(),
        gpu_memory_gib: gpu.memory_gib(),
        base: setup.base.name(),
        weights_gib: weights / GIB,
        workspace_gib: workspace / GIB,
        kv_cache_gib: kv_bytes / GIB,
        kv_tokens,
        max_kv_cache_gib: max_kv / GIB,
        max_kv_tokens: tokens_in(max_kv),
        context,
        streams,
        peak_gib: peak / GIB,
        cuda_context_gib: CUDA_CONTEXT_BYTES / GIB,
        device_gib: (peak + reserve + CUDA_CONTEXT_BYTES) / GIB,
        fits: peak + reserve <= usable,
        running,
        tokens_per_second: running as f64 / step,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kv_cache_takes_what_the_utilization_leaves() {
        let gib = GIB;
        // An H200 (140.4 GiB) after 7.5 GiB of weights and context, 0.9 utilisation, 1 GiB of
        // workspace: 126.36 − 7.5 − 1.19 GiB.
        let kv = kv_cache_for_utilization(140.4 * gib, 132.9 * gib, 0.9, gib);
        assert!((kv / gib - (0.9 * 140.4 - 7.5 - 1.19)).abs() < 1e-9);
        // Another process holding most of the GPU leaves nothing.
        assert_eq!(
            kv_cache_for_utilization(24.0 * gib, 2.0 * gib, 0.9, gib),
            0.0
        );
    }
}
