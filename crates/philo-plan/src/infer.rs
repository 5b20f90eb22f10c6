//! Memory and decode speed of generation and serving: the weights in their format, the KV
//! cache, and the activations of a prefill (whole prompt in `generate`, `--max-batch-tokens`
//! chunks in `serve`). Fitted to `philo bench prefill/decode` on the H200 (docs/plan.md).

use serde::Serialize;

use philo_model::DecodeStep;

use crate::gpu::GpuSpec;
use crate::shape::ModelShape;
use crate::train::BaseFormat;
use crate::{ALLOCATOR_RESERVE, CUDA_CONTEXT_BYTES, GIB, HEADROOM};

/// Prefill activations per token, in hidden-sized tensors of the compute dtype (fitted: a
/// 2,048-token bf16 prefill of Phi-3-mini peaks 0.36 GiB above its weights, 190 KB a token).
const PREFILL_HIDDEN_COPIES: f64 = 31.0;

/// Decode time model of the graph-captured decode step, fitted on the H200 (2026-12-04,
/// docs/plan.md). Up to the GEMV's rows (8) the weights stream at their
/// GEMV's efficiency (`gemv_fit`: the quantised GEMVs are latency-bound on the H200, so on a
/// GPU of less bandwidth the prediction errs low) and every row past the first costs its
/// staging; the LM head is read in the compute dtype. More rows of a dense base run cuBLASLt:
/// the weights at GEMM_WEIGHT_EFFICIENCY and GEMM_ROW_SECONDS a row. The KV cache is read at
/// KV_EFFICIENCY (the tensor-core attention, any context). Each layer's RoPE, attention launch
/// and norms are inside these fits.
const GEMM_WEIGHT_EFFICIENCY: f64 = 0.553;
const GEMM_ROW_SECONDS: f64 = 5.25e-6;
const KV_EFFICIENCY: f64 = 0.795;
/// More rows of a quantised base run the general forward, which dequantises each projection per
/// matmul (read the codes, write and read the dense copy) at DEQUANT_EFFICIENCY, launches
/// GENERAL_LAYER_SECONDS a layer and reads the cache at GENERAL_KV_EFFICIENCY; its GEMMs run at
/// GENERAL_GEMM_EFFICIENCY of the tensor peak (the earlier fit of the general forward).
const DEQUANT_EFFICIENCY: f64 = 0.47;
const GENERAL_LAYER_SECONDS: f64 = 53e-6;
const GENERAL_KV_EFFICIENCY: f64 = 0.3;
const GENERAL_GEMM_EFFICIENCY: f64 = 0.4;
/// Each sequence of a serving step costs SEQUENCE_SECONDS: sampling, bookkeeping and its share
/// of the prompts' prefill (fitted to `philo bench serve`, 128 + 128 tokens, 26 and 64
/// streams, with fresh prompts prefilled packed; refitted with cuBLASLt's timed algorithms).
const SEQUENCE_SECONDS: f64 = 33e-6;

/// A format's GEMV on the H200: the fraction of the bandwidth its weights stream at, one row,
/// and the seconds each further row adds (fitted to `bench decode --batch 1/2/4/8`).
fn gemv_fit(base: BaseFormat) -> (f64, f64) {
    match base {
        BaseFormat::Dense => (0.663, 72e-6),
        BaseFormat::Int8 => (0.383, 48.7e-6),
        BaseFormat::Int4 => (0.235, 53.3e-6),
        BaseFormat::Nf4 { .. } => (0.142, 766e-6),
    }
}

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

/// Who runs the decode step: `generate`/`chat` (one sequence, nothing else per step) or the
/// serving engine (sampling and bookkeeping per sequence, prompts prefilled between steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Generate,
    Serve,
}

/// Seconds of one decode step of `batch` sequences with `context` cached tokens each.
pub fn decode_step_seconds(
    shape: &ModelShape,
    base: BaseFormat,
    dtype_bytes: usize,
    batch: usize,
    context: usize,
    decoder: Decoder,
    gpu: &GpuSpec,
) -> f64 {
    let dt = dtype_bytes as f64;
    let bw = gpu.bandwidth_bytes_per_second;
    let projections = shape.projection_params() as f64;
    let head = (shape.embedding_params() / if shape.tied_embeddings { 1 } else { 2 }) as f64 * dt;
    // A row attends to its window's keys only.
    let attended = shape.sliding_window.map_or(context, |w| context.min(w));
    let kv_bytes = (batch * attended * shape.kv_bytes_per_token(dtype_bytes)) as f64;
    let per_sequence = match decoder {
        Decoder::Generate => 0.0,
        Decoder::Serve => SEQUENCE_SECONDS,
    };
    let (dense_efficiency, _) = gemv_fit(BaseFormat::Dense);
    // The rows the decode step runs through its GEMV (as many as an H200 stages).
    let gemv_rows = DecodeStep::MAX_GEMV_ROWS;
    let step = if batch <= gemv_rows {
        let (efficiency, row) = gemv_fit(base);
        projections * base.bytes_per_weight(dtype_bytes) / (efficiency * bw)
            + head / (dense_efficiency * bw)
            + batch.saturating_sub(1) as f64 * row
            + kv_bytes / (KV_EFFICIENCY * bw)
    } else if base == BaseFormat::Dense {
        (projections * dt + head) / (GEMM_WEIGHT_EFFICIENCY * bw)
            + batch as f64 * GEMM_ROW_SECONDS
            + kv_bytes / (KV_EFFICIENCY * bw)
    } else {
        projections * (base.bytes_per_weight(dtype_bytes) + 2.0 * dt) / (DEQUANT_EFFICIENCY * bw)
            + head / (dense_efficiency * bw)
            + batch as f64 * 2.0 * shape.total_params() as f64
                / (GENERAL_GEMM_EFFICIENCY * gpu.tensor_flops)
            + shape.layers as f64 * GENERAL_LAYER_SECONDS
            + kv_bytes / (GENERAL_KV_EFFICIENCY * bw)
    };
    step + batch as f64 * per_sequence
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
    let step = decode_step_seconds(shape, base, dtype_bytes, 1, mid, Decoder::Generate, gpu);
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
        Decoder::Serve,
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
    use philo_model::Phi3Config;

    fn assert_within_8_percent(predicted: f64, measured: f64, what: &str) {
        let error = predicted / measured - 1.0;
        assert!(
            error.abs() < 0.08,
            "{what}: predicted {predicted:.1} tokens/s, measured {measured} ({:+.1} %)",
            100.0 * error
        );
    }

    /// The decode model against `philo bench decode` on the H200 (2026-12-04, the tensor-core
    /// attention; random Phi-3-mini weights, greedy, `--batch B --seq P --new_tokens N`; the
    /// long contexts with the 128k config): tokens/s within 8 %.
    #[test]
    fn decode_speed_follows_the_h200_measurements() {
        let mini = ModelShape::from_config(&Phi3Config::phi3_mini_4k());
        let long = ModelShape {
            sliding_window: None,
            max_position_embeddings: 131_072,
            ..mini.clone()
        };
        let h200 = GpuSpec::parse("h200").unwrap();
        let nf4 = BaseFormat::Nf4 { double_quant: true };
        use BaseFormat::{Dense, Int4, Int8};
        for (shape, base, batch, prompt, new, measured) in [
            // Fitted at 422.6; the attention's loads before the wait (fourteenth session).
            (&mini, Dense, 1, 128, 256, 431.5),
            (&mini, Dense, 2, 128, 256, 798.8),
            (&mini, Dense, 4, 128, 256, 1_472.2),
            (&mini, Dense, 8, 128, 256, 2_647.3),
            // cuBLASLt's timed algorithms (fifteenth session).
            (&mini, Dense, 16, 128, 128, 4_993.2),
            (&mini, Dense, 64, 128, 128, 14_525.0),
            (&long, Dense, 1, 2048, 128, 387.5),
            (&long, Dense, 1, 16_384, 256, 249.4),
            (&long, Dense, 1, 32_768, 256, 175.2),
            (&mini, Int8, 1, 128, 256, 486.2),
            (&mini, Int8, 8, 128, 256, 3_097.3),
            (&mini, Int4, 1, 128, 256, 556.9),
            (&mini, Int4, 8, 128, 256, 3_398.3),
            (&mini, nf4, 1, 128, 256, 353.3),
            (&mini, nf4, 8, 128, 256, 954.7),
        ] {
            let mid = prompt + new / 2;
            let step = decode_step_seconds(shape, base, 2, batch, mid, Decoder::Generate, &h200);
            let what = format!("{base:?} batch {batch} prompt {prompt}");
            assert_within_8_percent(batch as f64 / step, measured, &what);
        }
    }

    /// `plan serve` against `philo bench serve --random --batch B` (128 + 128 tokens) on the
    /// H200 (2026-12-04): within 8 %.
    #[test]
    fn serve_speed_follows_the_h200_measurements() {
        let mini = ModelShape::from_config(&Phi3Config::phi3_mini_4k());
        let h200 = GpuSpec::parse("h200").unwrap();
        for (streams, measured) in [(26, 6_457.0), (64, 10_390.0)] {
            let setup = ServeSetup {
                base: BaseFormat::Dense,
                dtype_bytes: 2,
                max_batch: streams,
                max_batch_tokens: 8192,
                block_size: 16,
                kv_cache_gib: Some(20.0),
                gpu_memory_utilization: 0.9,
                context: 256,
            };
            let predicted = plan_serve(&mini, &setup, &h200).tokens_per_second;
            assert_within_8_percent(predicted, measured, &format!("{streams} streams"));
        }
    }

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
