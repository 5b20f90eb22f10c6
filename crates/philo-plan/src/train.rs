//! Peak GPU memory of a fine-tune, term by term, as philo's training step allocates it
//! (`philo_train::backward`): the frozen base, the adapters with their gradients and AdamW
//! state, the activations of the micro-batch and of one layer's row chunk, the gradient
//! checkpoints when they stay on the GPU, and the loss chunk. The terms follow the code's
//! tensor shapes; the few factors that depend on allocation order were fitted to the peaks
//! `philo bench train` measured on the H200 (docs/plan.md lists them beside the predictions).

use philo_train::backward::{rows_per_chunk, LOSS_CHUNK_ROWS};
use serde::Serialize;

use crate::shape::ModelShape;

/// How the frozen projections are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseFormat {
    /// The compute dtype.
    Dense,
    /// NF4 in blocks of 64; `double_quant` stores the block scales in 8 bits.
    Nf4 { double_quant: bool },
    /// Per-row INT8.
    Int8,
    /// INT4 in groups of 128.
    Int4,
}

impl BaseFormat {
    /// Bytes per weight with the scales, for a compute dtype of `dtype_bytes`.
    pub fn bytes_per_weight(self, dtype_bytes: usize) -> f64 {
        match self {
            BaseFormat::Dense => dtype_bytes as f64,
            // 4-bit codes; an f32 absmax per 64, or with double quantisation a u8 per 64 plus an
            // f32 scale per 256 blocks.
            BaseFormat::Nf4 { double_quant: true } => 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0),
            BaseFormat::Nf4 {
                double_quant: false,
            } => 0.5 + 4.0 / 64.0,
            BaseFormat::Int8 => 1.0,
            BaseFormat::Int4 => 0.5 + 4.0 / 128.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BaseFormat::Dense => "dense",
            BaseFormat::Nf4 { .. } => "nf4",
            BaseFormat::Int8 => "int8",
            BaseFormat::Int4 => "int4",
        }
    }
}

/// A fine-tune as `philo finetune` would run it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSetup {
    /// Rows per micro-batch.
    pub batch: usize,
    /// Tokens per row (`--max_seq_length`: the longest a batch can be).
    pub seq: usize,
    pub rank: usize,
    pub targets: Vec<String>,
    pub base: BaseFormat,
    /// Bytes of the compute dtype (2 for bf16/f16).
    pub dtype_bytes: usize,
    pub checkpointing: bool,
    /// Checkpoints in pinned host memory instead of on the GPU.
    pub offload: bool,
    /// With checkpointing, the last this many layers keep their saved state instead
    /// (`--uncheckpointed_layers`).
    pub uncheckpointed_layers: usize,
    /// LoRA dropout above 0 (the adapters keep a dropped-out copy of their input).
    pub dropout: bool,
}

impl TrainSetup {
    /// Layers of `shape` that keep only a checkpoint and are recomputed in the backward.
    pub fn recomputed_layers(&self, shape: &ModelShape) -> usize {
        if self.checkpointing {
            shape.layers.saturating_sub(self.uncheckpointed_layers)
        } else {
            0
        }
    }
}

/// Predicted peak memory, bytes, by what holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainMemory {
    /// Projections in their format, embeddings, LM head and norms in the compute dtype.
    pub base_weights: f64,
    /// One layer's projections dequantised for the pass running through it (quantised bases).
    pub dequantized_layer: f64,
    /// LoRA A and B, f32.
    pub lora_params: f64,
    /// Their f32 gradient accumulators.
    pub lora_grads: f64,
    /// AdamW's two f32 moments.
    pub optimizer_state: f64,
    /// Hidden states of the whole micro-batch alive at once (layer input and output, the
    /// upstream gradient, the checkpoint coming back from the host).
    pub batch_activations: f64,
    /// What one row chunk of a layer keeps for its backward, and the backward's own buffers.
    pub layer_activations: f64,
    /// Gradient checkpoints held on the GPU (none with offload), and the saved state of the
    /// layers that are not checkpointed (`--uncheckpointed_layers`, or all without
    /// checkpointing).
    pub checkpoints: f64,
    /// What the loss (the logits of one chunk and their gradient) needs beyond the layers'
    /// peak: 0 unless the loss is the step's widest moment.
    pub loss_chunk: f64,
    /// The step's small tensors.
    pub workspace: f64,
}

impl TrainMemory {
    /// What grows with the batch: everything but the weights and the adapters' state.
    pub fn activations(&self) -> f64 {
        self.batch_activations
            + self.layer_activations
            + self.checkpoints
            + self.loss_chunk
            + self.workspace
    }

    /// The GPU memory the process holds at the peak, as nvidia-smi shows it: the tensors, the
    /// allocator's reserve and the CUDA context.
    pub fn device_total(&self) -> f64 {
        self.total() + crate::ALLOCATOR_RESERVE * self.activations() + crate::CUDA_CONTEXT_BYTES
    }

    pub fn total(&self) -> f64 {
        self.base_weights
            + self.dequantized_layer
            + self.lora_params
            + self.lora_grads
            + self.optimizer_state
            + self.batch_activations
            + self.layer_activations
            + self.checkpoints
            + self.loss_chunk
            + self.workspace
    }

    /// The same terms in GiB.
    pub fn in_gib(&self) -> TrainMemory {
        let g = |bytes: f64| bytes / crate::GIB;
        TrainMemory {
            base_weights: g(self.base_weights),
            dequantized_layer: g(self.dequantized_layer),
            lora_params: g(self.lora_params),
            lora_grads: g(self.lora_grads),
            optimizer_state: g(self.optimizer_state),
            batch_activations: g(self.batch_activations),
            layer_activations: g(self.layer_activations),
            checkpoints: g(self.checkpoints),
            loss_chunk: g(self.loss_chunk),
            workspace: g(self.workspace),
        }
    }

    /// (name, value) in a fixed order, for reports.
    pub fn terms(&self) -> [(&'static str, f64); 10] {
        [
            ("base weights", self.base_weights),
            ("dequantised layer", self.dequantized_layer),
            ("LoRA parameters", self.lora_params),
            ("LoRA gradients", self.lora_grads),
            ("AdamW state", self.optimizer_state),
            ("batch activations", self.batch_activations),
            ("layer activations", self.layer_activations),
            ("layer state on GPU", self.checkpoints),
            ("loss chunk", self.loss_chunk),
            ("workspace", self.workspace),
        ]
    }
}

/// Hidden-sized tensors (in the compute dtype) per token of the micro-batch alive at the
/// backward's peak. Fitted: 15.0, i.e. 92 KB a token at Phi-3-mini's width (2026-12-03, four
/// configurations with gradient offload). The code holds the layer input and output, the
/// upstream gradient, the chunks' input gradients, f32 norm statistics, the allocator's blocks
/// not yet reused and, with offload, checkpoints in flight (see below).
const BATCH_HIDDEN_COPIES: f64 = 15.0;

/// Of those, what gradient offload holds on the GPU: the checkpoints (input, attention output
/// and residual: 3 copies a layer) of the two layers coming back, and about two layers' going
/// out while their copies are in flight. Fitted: 12 (the prediction without offload is 2.8 %
/// above the measurement).
const RETURNED_CHECKPOINT_COPIES: f64 = 12.0;

/// The layer chunk's peak over the widths the code keeps and the backward allocates (fitted:
/// the forward's transients and allocation order add the rest).
const LAYER_ACTIVATION_FACTOR: f64 = 1.403;

/// Hidden-sized tensors per token during the loss: the final norm's input and output, the
/// hidden gradient being accumulated and its update.
const LOSS_HIDDEN_COPIES: f64 = 5.0;

/// Bytes per logit of a loss chunk: the logits and their gradient in bf16.
const LOSS_BYTES_PER_LOGIT: f64 = 4.0;

/// Small tensors of a step (fitted: 11 MiB).
const WORKSPACE_BYTES: f64 = 11.0 * (1u64 << 20) as f64;

/// Predicted peak GPU memory of one training step of `setup` on a model of `shape`, as the
/// allocator counts it (tensors only: the CUDA context comes on top, see
/// [`crate::CUDA_CONTEXT_BYTES`]). Within 1 % of the 17 configurations it was fitted on, and
/// within 3.2 % of 10 others (docs/plan.md).
pub fn train_memory(shape: &ModelShape, setup: &TrainSetup) -> TrainMemory {
    let dt = setup.dtype_bytes as f64;
    let (h, inter) = (shape.hidden as f64, shape.intermediate as f64);
    let tokens = (setup.batch * setup.seq) as f64;
    let chunk_tokens = (rows_per_chunk(setup.batch, setup.seq) * setup.seq) as f64;
    let lora = shape.lora_params(setup.rank, &setup.targets) as f64;
    let adapters = shape
        .projections()
        .iter()
        .filter(|p| setup.targets.iter().any(|t| t == p.name))
        .count() as f64;
    let qkv_width = ((shape.heads + 2 * shape.kv_heads) * shape.head_dim) as f64;
    let lse_bytes = (shape.heads * 4) as f64;

    // Per token of a chunk, what the backward keeps (module docs of train_layer): the qkv
    // adapter's input, rotated q/k/v, the post-attention residual, the gate/up adapter's
    // input, gate/up, its SwiGLU (the down adapter's input), each adapter's rank-r down
    // projection, and with dropout the o adapter's own dropped-out input.
    let saved_width = h
        + qkv_width
        + h
        + h
        + 2.0 * inter
        + inter
        + adapters * setup.rank as f64
        + if setup.dropout { h } else { 0.0 };
    // The backward's widest moment: the SwiGLU's input gradient beside its output gradient,
    // and the gate/up adapter's input gradient.
    let backward_width = 3.0 * inter + h;

    let mut batch_copies = BATCH_HIDDEN_COPIES;
    let recomputed = setup.recomputed_layers(shape);
    // A layer that is not recomputed keeps its lean `LayerSaved` (exact widths, no fitted
    // factor): its input, the attention output and the residual, q/k/v, gate/up, o's down
    // projection and the logsumexp (the other adapters' inputs are derived again).
    let o_down = if setup.targets.iter().any(|t| t == "o_proj") {
        setup.rank as f64
    } else {
        0.0
    };
    let kept_width = 3.0 * h + qkv_width + 2.0 * inter + o_down;
    let kept = (shape.layers - recomputed) as f64 * tokens * (kept_width * dt + lse_bytes);
    let checkpoints = if recomputed == 0 || setup.offload {
        kept
    } else {
        batch_copies -= RETURNED_CHECKPOINT_COPIES;
        kept + recomputed as f64 * tokens * (3.0 * h * dt + lse_bytes)
    };
    let batch_activations = tokens * batch_copies * h * dt;
    let layer_activations =
        chunk_tokens * LAYER_ACTIVATION_FACTOR * (saved_width + backward_width) * dt;
    let loss_phase = tokens * LOSS_HIDDEN_COPIES * h * dt
        + tokens.min(LOSS_CHUNK_ROWS as f64) * shape.vocab as f64 * LOSS_BYTES_PER_LOGIT;
    let quantized = !matches!(setup.base, BaseFormat::Dense);
    TrainMemory {
        base_weights: shape.projection_params() as f64
            * setup.base.bytes_per_weight(setup.dtype_bytes)
            + (shape.embedding_params() + shape.norm_params()) as f64 * dt,
        dequantized_layer: if quantized {
            shape.layer_projection_params() as f64 * dt
        } else {
            0.0
        },
        lora_params: 4.0 * lora,
        lora_grads: 4.0 * lora,
        optimizer_state: 8.0 * lora,
        batch_activations,
        layer_activations,
        checkpoints,
        loss_chunk: (loss_phase - batch_activations - layer_activations).max(0.0),
        workspace: WORKSPACE_BYTES,
    }
}

/// Pinned host memory the gradient checkpoints of one micro-batch take with offload (0
/// without): every recomputed layer's input, attention output with its logsumexp, and
/// post-attention residual.
pub fn host_checkpoint_bytes(shape: &ModelShape, setup: &TrainSetup) -> f64 {
    if !setup.offload {
        return 0.0;
    }
    let dt = setup.dtype_bytes as f64;
    let per_token = 3.0 * shape.hidden as f64 * dt + (shape.heads * 4) as f64;
    setup.recomputed_layers(shape) as f64 * (setup.batch * setup.seq) as f64 * per_token
}
