//! Tokens per second, estimated from the work a step does and the GPU's peak throughput and
//! bandwidth. Each kind of work runs at its own fraction of the peak; the fractions were
//! fitted to what philo measured on the H200 (docs/plan.md) and are assumed to carry over to
//! other GPUs of the same generation or newer: a rough figure there, not a measurement.

use serde::Serialize;

use crate::gpu::GpuSpec;
use crate::shape::ModelShape;
use crate::train::{BaseFormat, TrainSetup};

/// The work of one optimizer micro-batch, in the units the time model weighs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainWork {
    /// Dense GEMM FLOPs: the projections (forward, recompute, input gradient) and the LM head.
    pub gemm_flops: f64,
    /// Flash-attention FLOPs (forward and backward; the recompute reuses the forward's).
    pub attention_flops: f64,
    /// Bytes moved by the memory-bound kernels: norms, RoPE, SwiGLU, dropout, the rank-r LoRA
    /// products, NF4 dequantisation and the optimizer.
    pub memory_bytes: f64,
    /// Layer passes times row chunks: each costs a fixed number of kernel launches.
    pub chunk_passes: f64,
}

/// The time model: seconds = gemm_flops / (GEMM_EFFICIENCY · peak) + attention_flops /
/// (ATTENTION_EFFICIENCY · peak) + memory_bytes / (MEMORY_EFFICIENCY · bandwidth) +
/// chunk_passes · CHUNK_PASS_SECONDS, fitted on the H200 to 18 `bench train` runs (within
/// 8 % of each, and of 10 runs outside the fit: docs/plan.md). The GEMM share absorbs what grows with the tokens alone (the rank-r LoRA
/// products, whose time hardly depends on r), so it reads lower than cuBLAS's own efficiency.
const GEMM_EFFICIENCY: f64 = 0.467;
const ATTENTION_EFFICIENCY: f64 = 0.187;
const MEMORY_EFFICIENCY: f64 = 0.624;
/// Host-side cost of a layer pass over one row chunk (its kernel launches), seconds.
const CHUNK_PASS_SECONDS: f64 = 515e-6;

/// The work of one micro-batch of `setup`.
pub fn train_work(shape: &ModelShape, setup: &TrainSetup) -> TrainWork {
    let tokens = (setup.batch * setup.seq) as f64;
    let layers = shape.layers as f64;
    let projections = shape.projection_params() as f64;
    let [_, o, _, down] = shape.projections().map(|p| layers * p.params() as f64);
    // The share of layers recomputed in the backward.
    let recomputed = setup.recomputed_layers(shape) as f64 / layers.max(1.0);
    // Forward 2N, the input gradient 2N; the recompute skips the o and down projections (the
    // checkpoint keeps the post-attention residual).
    let per_token = 4.0 * projections + recomputed * (2.0 * (projections - o - down));
    let head = 4.0 * (shape.vocab * shape.hidden) as f64;
    let gemm_flops = tokens * (per_token + head);
    // Forward 4·pairs·hidden (QKᵀ and PV), backward 2.5 times that.
    let attention_flops = setup.batch as f64
        * layers
        * 3.5
        * 4.0
        * shape.attended_pairs(setup.seq)
        * shape.hidden as f64;
    let dt = setup.dtype_bytes as f64;
    let (h, inter) = (shape.hidden as f64, shape.intermediate as f64);
    // Activations read or written by the memory-bound kernels, per token and layer pass: about
    // the widths the layer produces (hidden-sized tensors, q/k/v, gate/up, SwiGLU) once each.
    let qkv = ((shape.heads + 2 * shape.kv_heads) * shape.head_dim) as f64;
    let passes = 2.0 + recomputed;
    let activation_bytes = tokens * layers * passes * (6.0 * h + qkv + 3.0 * inter) * dt;
    let dequant_bytes = match setup.base {
        BaseFormat::Dense => 0.0,
        format => {
            let pass_count = 1.0 + recomputed;
            pass_count * projections * (format.bytes_per_weight(setup.dtype_bytes) + dt)
        }
    };
    let lora = shape.lora_params(setup.rank, &setup.targets) as f64;
    // AdamW reads the parameter, gradient and moments and writes three of them back, in f32.
    let optimizer_bytes = lora * 4.0 * 7.0;
    let chunks = (setup.batch as f64
        / philo_train::backward::rows_per_chunk(setup.batch, setup.seq) as f64)
        .ceil();
    TrainWork {
        gemm_flops,
        attention_flops,
        memory_bytes: activation_bytes + dequant_bytes + optimizer_bytes,
        chunk_passes: layers * chunks * passes,
    }
}

/// Seconds of one micro-batch of `work` on `gpu`.
pub fn train_seconds(work: &TrainWork, gpu: &GpuSpec) -> f64 {
    work.gemm_flops / (GEMM_EFFICIENCY * gpu.tensor_flops)
        + work.attention_flops / (ATTENTION_EFFICIENCY * gpu.tensor_flops)
        + work.memory_bytes / (MEMORY_EFFICIENCY * gpu.bandwidth_bytes_per_second)
        + work.chunk_passes * CHUNK_PASS_SECONDS
}
