//! Planning philo's jobs on a GPU before running them: the peak memory of a fine-tune, a
//! generation or a server, broken down by what holds it; whether it fits a given GPU; the
//! largest batch that does; and the tokens per second to expect. The models follow philo's
//! own allocations and were fitted to measurements on an H200 (docs/plan.md).

pub mod finetune;
pub mod gpu;
pub mod infer;
pub mod shape;
pub mod speed;
pub mod train;

pub use finetune::{
    plan_finetune, BatchChoice, FinetunePlan, LayerChoice, MemoryLimits, SizeChoices,
};
pub use gpu::GpuSpec;
pub use infer::{plan_generate, plan_serve, GeneratePlan, ServePlan, ServeSetup};
pub use shape::ModelShape;
pub use train::{BaseFormat, TrainMemory, TrainSetup};

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// Device memory outside the allocator's count: the CUDA context (594 MiB on the H200 before
/// the first kernel) and the libraries and kernel modules loaded on first use (cuBLAS). Fitted
/// with the reserve below to nvidia-smi's memory.used of two fine-tunes on the H200 (micro-batch
/// 1 and 48 of 2,048 tokens: 1.04 and 2.41 GiB above the allocator's peak).
pub const CUDA_CONTEXT_BYTES: f64 = 0.9 * GIB;

/// The part of [`CUDA_CONTEXT_BYTES`] that appears only once kernels run: a batch sized from
/// the free memory before the model loads must leave it.
pub const LIBRARY_BYTES: f64 = 0.32 * GIB;

/// Memory the stream-ordered pool holds beyond what tensors use, as a fraction of the
/// activations (freed blocks not yet handed back, fragmentation).
pub const ALLOCATOR_RESERVE: f64 = 0.19;

/// Fraction of the usable memory a plan leaves free: predictions are within a few per cent,
/// and data batches vary.
pub const HEADROOM: f64 = 0.10;

/// What cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Gpu(String),
    #[error("{0}")]
    Setup(String),
}
