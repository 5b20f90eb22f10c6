//! One decode step of many sequences on the GPU as an explicit kernel sequence over buffers
//! allocated once, captured in a CUDA graph per (row count, adapters or not) on its second use
//! and replayed after (the first use launches the kernels one by one, so a shape used once, such
//! as a verify step of a length speculation tries once, costs no capture). Per step the host
//! writes each row's token, length, RoPE table choice, adapter, sampling settings and block table
//! (one copy; a second for the rows' logit bias and penalties, when any has them) and reads back
//! the tokens the GPU chose or the logits.
//!
//! The sequences' keys and values live in a [`PagedKvCache`] the caller owns: the serving
//! engine's pool, or [`crate::DecodeGraph`]'s own. Up to [`DecodeStep::gemv_rows`] rows go
//! through the fused GEMV (RMSNorm or SwiGLU on its input, the residual add in its epilogue, any
//! weight format); more rows go through cuBLASLt on a dense base (each shape's fastest
//! algorithm, timed when the step is built), with the input transform as its own kernel and the
//! residual added by the GEMM (beta = 1).

use crate::error::Result;
use crate::lora_bank::LoraBank;
use crate::paged_kv_cache::PagedKvCache;
use crate::phi3::Phi3;
pub use philo_kernels::sampling::{LogitAdjustment, RowSampling};

/// One sequence's part of a decode step.
#[derive(Debug, Clone, Copy)]
pub struct DecodeRow<'a> {
    /// The token fed this step.
    pub token: u32,
    /// Tokens of the sequence in the cache once this one is written (its position + 1).
    pub len: usize,
    /// Rotate with LongRoPE's long factors.
    pub long_rope: bool,
    /// The sequence's blocks in order, covering at least `len` positions.
    pub block_table: &'a [u32],
    /// How the row's next token is chosen on the GPU (see [`DecodeStep::tokens`]).
    pub sampling: RowSampling,
    /// The logit bias and penalties applied to the row's logits before it is sampled (distinct
    /// tokens below the vocabulary size); only where the step samples
    /// ([`DecodeStep::samples`]). [`DecodeStep::logits`] then gives the row's logits adjusted.
    pub adjustments: &'a [LogitAdjustment],
    /// The row's adapter: a [`LoraBank`] slot made known with [`DecodeStep::set_adapters`].
    pub adapter: Option<usize>,
}

/// The graph-captured decode step over a caller's paged KV cache.
pub struct DecodeStep {
    inner: imp::Inner,
}

impl DecodeStep {
    /// A decode step for `model` over `cache` (which must outlive it and keep its storage), for
    /// up to `max_rows` sequences of up to `max_len` tokens, or None where it cannot run: not on
    /// CUDA, not bf16/f16, an unmerged adapter, or weights the kernels do not read (GGUF blocks,
    /// NF4 held on the host). `capture` false runs the kernels launch by launch (profiles).
    pub fn new(
        model: &Phi3,
        cache: &PagedKvCache,
        max_rows: usize,
        max_len: usize,
        capture: bool,
    ) -> Result<Option<Self>> {
        Ok(imp::Inner::new(model, cache, max_rows, max_len, capture)?.map(|inner| Self { inner }))
    }

    /// Whether a step of `rows` sequences runs here: at most `max_rows`, and more than
    /// [`DecodeStep::gemv_rows`] only on a dense base, or in the persistent layers kernel (see
    /// [`DecodeStep::set_persistent_layers`]) while the step holds no adapters.
    pub fn takes(&self, rows: usize) -> bool {
        self.inner.takes(rows)
    }

    /// Most rows the fused GEMV takes on any GPU; [`DecodeStep::gemv_rows`] says how many on
    /// this one.
    pub const MAX_GEMV_ROWS: usize = philo_kernels::decode::MAX_ROWS;

    /// Most rows the fused GEMV takes: 8 where the GPU's shared memory holds 8 staged inputs
    /// of the MLP's width (as on the H200); past it a dense base multiplies with cuBLASLt. Up to
    /// there the GEMV is the faster on dense weights too (H200, one run: one sequence's verify
    /// step of 8 rows 1.22-1.23× a one-row step on it, 1.27× on cuBLAS; 8 sequences 2,708
    /// against 2,592 tokens/s).
    pub fn gemv_rows(&self) -> usize {
        self.inner.gemv_rows()
    }

    /// Most adapters the step holds at once.
    pub const MAX_ADAPTERS: usize = 32;

    /// Largest adapter rank (of a fused projection: q, k and v together) the step takes.
    pub const MAX_RANK: usize = 256;

    /// Makes the adapters of `bank` available to rows (the first [`DecodeStep::MAX_ADAPTERS`]
    /// loaded, of rank up to [`DecodeStep::MAX_RANK`]); call after every change to the bank.
    /// Rows of any other slot do not run here (see [`DecodeStep::has_adapter`]).
    pub fn set_adapters(&mut self, bank: &LoraBank) -> Result<()> {
        self.inner.set_adapters(bank)
    }

    /// Whether rows of adapter `slot` run here.
    pub fn has_adapter(&self, slot: usize) -> bool {
        self.inner.has_adapter(slot)
    }

    /// Runs one step: each row's token is written into the cache at position `len − 1` and its
    /// next-token logits computed; read them with [`DecodeStep::logits`], or the tokens chosen
    /// on the GPU with [`DecodeStep::tokens`].
    pub fn run(&mut self, rows: &[DecodeRow]) -> Result<()> {
        self.inner.run(rows)
    }

    /// The last step's f32 logits `[rows, vocab]`, row-major.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.inner.logits()
    }

    /// The last step's token per row, chosen on the GPU as the row's [`RowSampling`] says (the
    /// argmax, lowest id on ties, for greedy rows). Without GPU sampling (vocabularies above
    /// `philo_kernels::sampling::MAX_VOCAB`) every row gets its argmax: see
    /// [`DecodeStep::samples`].
    pub fn tokens(&self) -> Result<Vec<u32>> {
        self.inner.tokens()
    }

    /// Whether [`DecodeStep::tokens`] follows each row's sampling settings (else: the argmax).
    pub fn samples(&self) -> bool {
        self.inner.samples()
    }

    /// How the steps so far ran (graph replays, launch by launch, captures).
    pub fn runs(&self) -> StepRuns {
        self.inner.runs()
    }

    /// Runs steps without adapters of up to 16 rows (as many as the GPU's shared memory holds
    /// staged) with every decoder layer in one persistent kernel (`philo_kernels::decode_layers`)
    /// when `on`, else as a launch per kernel (the default); returns the most rows a step now
    /// runs it with (0: none) — on dense, INT8, INT4 or NF4 weights of whole 512-byte tiles, on
    /// a GPU whose blocks hold its rings.
    pub fn set_persistent_layers(&mut self, on: bool) -> usize {
        self.inner.set_persistent_layers(on)
    }
}

/// How a [`DecodeStep`]'s steps ran: a step whose (rows, adapters, adjustments) key has a
/// graph replays it; the key's first step runs launch by launch, its second is captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepRuns {
    /// Steps that replayed a captured graph.
    pub replayed: u64,
    /// Steps launched kernel by kernel (a key's first step, profiles, a failed capture).
    pub launched: u64,
    /// Graphs captured (each then replayed in the same step).
    pub captured: u64,
    /// Host time writing the steps' inputs to the GPU (rows' state, logit adjustments).
    pub upload: std::time::Duration,
    /// Host time launching the steps (capturing, replaying or launching their kernels).
    pub launch: std::time::Duration,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    /// Without CUDA there is no decode step: `new` returns None and no value exists.
    pub enum Inner {}

    impl Inner {
        pub fn new(
            _: &Phi3,
            _: &PagedKvCache,
            _: usize,
            _: usize,
            _: bool,
        ) -> Result<Option<Inner>> {
            Ok(None)
        }
        pub fn takes(&self, _: usize) -> bool {
            match *self {}
        }
        pub fn set_adapters(&mut self, _: &LoraBank) -> Result<()> {
            match *self {}
        }
        pub fn gemv_rows(&self) -> usize {
            match *self {}
        }
        pub fn has_adapter(&self, _: usize) -> bool {
            match *self {}
        }
        pub fn run(&mut self, _: &[DecodeRow]) -> Result<()> {
            match *self {}
        }
        pub fn logits(&self) -> Result<Vec<f32>> {
            match *self {}
        }
        pub fn tokens(&self) -> Result<Vec<u32>> {
            match *self {}
        }
        pub fn samples(&self) -> bool {
            match *self {}
        }
        pub fn runs(&self) -> StepRuns {
            match *self {}
        }
        pub fn set_persistent_layers(&mut self, _: bool) -> usize {
            match *self {}
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::error::ModelError;
    use crate::lora_linear::{BaseWeight, LoraLinear};
    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, DevicePtr};
    use candle_core::{CudaDevice, DType, Device, Tensor};
    use philo_kernels::decode::{
        lora_entry, Attention, AttentionKernel, BatchedLora, DecodeKernels, Gemv, GemvInput,
        GemvOutput, GemvWeight, RopeKv, MAX_ROWS,
    };
    use philo_kernels::decode_layers::{
        layer_words, DecodeLayers, LayerBuffers, LayerKernel, LayerShape,
    };
    use std::collections::{HashMap, HashSet};

    /// One launch of the step.
    enum Launch {
        Embed {
            table: u64,
            tokens: u64,
            x: u64,
            m: usize,
            hidden: usize,
        },
        /// A projection by the fused GEMV, named for profiles.
        Gemv(&'static str, Gemv),
        /// The GEMV's input transform on its own, before a GEMM or an adapter.
        Transform {
            x: u64,
            input: GemvInput,
            m: usize,
            k: usize,
            out: u64,
        },
        /// A projection by cuBLASLt on a dense weight, named for profiles.
        Gemm {
            name: &'static str,
            a: u64,
            m: usize,
            n: usize,
            k: usize,
            w: u64,
            output: GemvOutput,
        },
        /// The batched LoRA's first product of a projection (beside its base projection).
        LoraShrink(BatchedLora),
        /// The batched LoRA's second product, added to the base projection's output.
        LoraExpand(BatchedLora),
        /// Zeroes the first projection's LoRA scratch (each zeroes the next one's).
        Zero {
            at: u64,
            bytes: usize,
        },
        /// Logits from the compute dtype to f32.
        Widen {
            x: u64,
            out: u64,
            n: usize,
        },
        RopeKv(RopeKv),
        Attention(Attention),
        /// Every decoder layer in one persistent kernel (few rows).
        Layers(LayerKernel, DecodeLayers),
        Argmax {
            logits: u64,
            vocab: usize,
            out: u64,
            m: usize,
        },
        Sample {
            logits: u64,
            vocab: usize,
            params: u64,
            stride: usize,
            out: u64,
            m: usize,
        },
        /// The rows' logit bias and penalties, before `Sample`.
        Adjust {
            logits: u64,
            entries: u64,
            count: u64,
            max_entries: usize,
        },
    }

    impl Launch {
        /// The kernel's name in profiles.
        fn name(&self) -> &'static str {
            match self {
                Launch::Embed { .. } => "embed",
                Launch::Gemv(name, _) => name,
                Launch::Transform { .. } => "norm / swiglu",
                Launch::Gemm { name, .. } => name,
                Launch::LoraShrink(_) => "lora shrink",
                Launch::LoraExpand(_) => "lora expand",
                Launch::Zero { .. } => "zero lora scratch",
                Launch::Widen { .. } => "logits to f32",
                Launch::RopeKv(_) => "rope + kv write",
                Launch::Attention(_) => "attention",
                Launch::Layers(..) => "decoder layers (persistent)",
                Launch::Argmax { .. } => "argmax",
                Launch::Sample { .. } => "sample",
                Launch::Adjust { .. } => "logit adjustments",
            }
        }

        /// Runs the launch; `beside`: LoRA shrinks on the side stream (not when profiling,
        /// whose events time the device's stream).
        fn run(&self, k: &DecodeKernels, beside: bool) -> candle_core::Result<()> {
            match self {
                Launch::Embed {
                    table,
                    tokens,
                    x,
                    m,
                    hidden,
                } => k.embed(*table, *tokens, *x, *m, *hidden),
                Launch::Gemv(_, g) => k.gemv(g),
                Launch::Transform {
                    x,
                    input,
                    m,
                    k: cols,
                    out,
                } => k.transform_rows(*x, *input, *m, *cols, *out),
                Launch::Gemm {
                    a,
                    m,
                    n,
                    k: cols,
                    w,
                    output,
                    ..
                } => k.gemm(*a, *m, *n, *cols, *w, *output),
                Launch::LoraShrink(l) => k.lora_shrink(l, beside),
                Launch::LoraExpand(l) => k.lora_expand(l, beside),
                Launch::Zero { at, bytes } => k.zero(*at, *bytes),
                Launch::Widen { x, out, n } => k.widen(*x, *out, *n),
                Launch::RopeKv(a) => k.rope_write_kv(a),
                Launch::Attention(a) => k.attention(a),
                Launch::Layers(kernel, a) => kernel.launch(k, a),
                Launch::Argmax {
                    logits,
                    vocab,
                    out,
                    m,
                } => k.argmax(*logits, *vocab, *out, *m),
                Launch::Sample {
                    logits,
                    vocab,
                    params,
                    stride,
                    out,
                    m,
                } => k.sample(*logits, *vocab, *params, *stride, *out, *m),
                Launch::Adjust {
                    logits,
                    entries,
                    count,
                    max_entries,
                } => k.adjust(*logits, *entries, *count, *max_entries),
            }
        }
    }

    /// Where the gate_up GEMV does not write the SwiGLU itself (the FMA GEMV, e.g. NF4 rows
    /// that do not fit beside the tensor-core GEMV's tiles; a step with adapters on gate_up), the rows from which the SwiGLU runs as a kernel of its own before
    /// the down projection's GEMV, which then stages plain rows: staged by the GEMV, every block
    /// computes the SwiGLU of every row (at 8 rows of 8,192, 65,536 exponentials and 256 KB from
    /// L2 per block). Measured on an H200 with INT4 weights (before the fused output): from 5
    /// rows a verify step's cost fell from 1.43-1.50× a one-row step to 1.30-1.35×, and 8
    /// sequences decoded 12 % faster; up to 4 rows it was unchanged.
    const SWIGLU_APART_ROWS: usize = 5;

    /// A captured step: its rows, whether it runs adapters, whether it adjusts logits.
    type GraphKey = (usize, bool, bool);

    /// Where the block tables start in the state buffer, in rows of `max_rows` words.
    const TABLES_AT: usize = 4 + RowSampling::WORDS;

    /// The projections an adapter may target, in the order of the step's adapter table.
    const MODULES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

    /// A captured step. cudarc leaves `CudaGraph` without `Send` because it holds raw driver
    /// handles; they are not tied to a thread, and `CudaGraph::launch` binds the context to the
    /// calling thread first, so moving one to the thread that uses it (the serving engine's
    /// loop) is sound.
    struct Captured(CudaGraph);

    // SAFETY: see `Captured`; the graph is used by one thread at a time (no `Sync`).
    unsafe impl Send for Captured {}

    /// A projection's weight as the kernels read it.
    struct Projection {
        weight: GemvWeight,
        /// Address of the dense weight, for the GEMM of many rows.
        dense: Option<u64>,
    }

    struct LayerWeights {
        qkv: Projection,
        o: Projection,
        gate_up: Projection,
        down: Projection,
        input_norm: u64,
        post_norm: u64,
    }

    /// The device buffers of a step, sized for `max_rows`.
    struct Buffers {
        x: u64,
        /// A GEMM's or an adapter's transformed input (normed rows, or the SwiGLU of gate/up).
        staged: u64,
        qkv: u64,
        q: u64,
        attn: u64,
        gate_up: u64,
        /// The LM head's output in the compute dtype (the many-rows path), before widening.
        head_out: u64,
        partial: u64,
        counters: u64,
        /// `[tokens | lens | long_rows | adapter_rows | sampling settings (RowSampling::WORDS)]`
        /// of `max_rows` each, then the block tables `[max_rows, max_blocks]`.
        state: CudaSlice<u32>,
        logits: CudaSlice<f32>,
        next: CudaSlice<u32>,
        /// The batched LoRA's x·Aᵀ, f32 `[2, max_rows, MAX_RANK]`: projections take the halves
        /// in turn (each zeroes the other for the next).
        lora_t: u64,
        /// Adapter entries (`lora_entry`) `[layers, MODULES, MAX_ADAPTERS]`.
        lora_table: CudaSlice<u64>,
    }

    /// The persistent kernel of few-row steps' decoder layers, with its buffers.
    struct PersistentLayers {
        kernel: LayerKernel,
        /// The layers' table (`layer_words`), `[layers, LAYER_WORDS]`.
        table: CudaSlice<u64>,
        /// The attention's f32 partial results.
        partial: CudaSlice<f32>,
        /// The grid barrier's two counters.
        sync: CudaSlice<u32>,
        /// Whether steps of up to its rows run it (see `DecodeStep::set_persistent_layers`).
        on: bool,
    }

    pub struct Inner {
        kernels: DecodeKernels,
        device: CudaDevice,
        capture: bool,
        max_rows: usize,
        /// Most rows the fused GEMV takes (see `DecodeKernels::gemv_rows`).
        gemv_rows: usize,
        /// Every projection has dense weights: any row count runs (cuBLASLt past `gemv_rows`).
        dense: bool,
        max_len: usize,
        max_blocks: usize,
        block_size: usize,
        /// Blocks of the tensor-core attention kernel a multiprocessor holds, where it runs
        /// (the tiled kernel elsewhere).
        tc_blocks: Option<usize>,
        eps: f32,
        layers: Vec<LayerWeights>,
        head: Projection,
        final_norm: u64,
        embed: u64,
        /// cos/sin, short then long factors, `[max_len, rotary_dim / 2]`.
        tables: [u64; 4],
        caches: Vec<(u64, u64)>,
        buffers: Buffers,
        /// The persistent layers kernel, where the weights and GPU take it.
        persistent: Option<PersistentLayers>,
        /// The captured steps.
        graphs: HashMap<GraphKey, Captured>,
        /// The keys run once without a graph.
        seen: HashSet<GraphKey>,
        runs: StepRuns,
        /// The rows' logit adjustments: the entry count, then `LogitAdjustment::WORDS` words
        /// per entry, room for `adjust_capacity` (grown on demand, which drops the graphs that
        /// address it).
        adjust: Option<CudaSlice<u32>>,
        adjust_capacity: usize,
        /// Bank slot of each adapter table index.
        adapters: Vec<usize>,
        /// The adapters' weights the table points at.
        lora_kept: Vec<Tensor>,
        /// Row order of the last step on the device (rows of one adapter together): device row
        /// i is the caller's row `order[i]`.
        order: Vec<usize>,
        config: crate::config::Phi3Config,
        dtype: DType,
        rotary_dim: usize,
        /// Every tensor and weight a launch addresses, so none is freed under it.
        _kept: Vec<Tensor>,
        _weights: Vec<BaseWeight>,
    }

    fn err(message: String) -> ModelError {
        ModelError::Candle(candle_core::Error::Msg(message))
    }

    fn slice_addr<T>(s: &CudaSlice<T>, device: &CudaDevice) -> u64 {
        s.device_ptr(&device.cuda_stream()).0
    }

    /// The kernels' view of a base weight, or None for a format they do not read. The base is
    /// kept in `kept` so that its buffers outlive the graphs.
    fn projection(
        linear: &LoraLinear,
        dtype: DType,
        kept: &mut Vec<BaseWeight>,
    ) -> Result<Option<Projection>> {
        if linear.lora.is_some() {
            return Ok(None);
        }
        let (weight, dense) = match &linear.base {
            BaseWeight::Dense(w) if w.dtype() == dtype && w.is_contiguous() => {
                let view = GemvWeight::dense(w)?;
                let GemvWeight::Dense { w: address } = view else {
                    unreachable!("a dense view");
                };
                (view, Some(address))
            }
            BaseWeight::Int8(q) => (GemvWeight::int8(q)?, None),
            BaseWeight::Int4(q) => (GemvWeight::int4(q)?, None),
            BaseWeight::Nf4Device(q) => (GemvWeight::nf4(q)?, None),
            _ => return Ok(None),
        };
        kept.push(linear.base.clone());
        Ok(Some(Projection { weight, dense }))
    }

    /// The persistent layers kernel for `layers` with its buffers (off until asked for), or None
    /// where it does not run (see `LayerKernel::load`; every layer in one format).
    fn persistent_layers(
        layers: &[LayerWeights],
        caches: &[(u64, u64)],
        c: &crate::config::Phi3Config,
        rotary_dim: usize,
        block_size: usize,
        dtype: DType,
        device: &CudaDevice,
    ) -> Result<Option<PersistentLayers>> {
        let Some(first) = layers.first() else {
            return Ok(None);
        };
        let format = std::mem::discriminant(&first.qkv.weight);
        let mut words = Vec::new();
        for (l, &(k_cache, v_cache)) in layers.iter().zip(caches) {
            let buffers = LayerBuffers {
                qkv: l.qkv.weight,
                o: l.o.weight,
                gate_up: l.gate_up.weight,
                down: l.down.weight,
                input_norm: l.input_norm,
                post_norm: l.post_norm,
                k_cache,
                v_cache,
            };
            match layer_words(&buffers) {
                Some(w) if std::mem::discriminant(&l.qkv.weight) == format => words.extend(w),
                _ => return Ok(None),
            }
        }
        let shape = LayerShape {
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            rotary_dim,
            block_size,
            window: c.sliding_window.unwrap_or(usize::MAX),
            eps: c.rms_norm_eps as f32,
        };
        let Some(kernel) = LayerKernel::load(device, dtype, &first.qkv.weight, shape)? else {
            return Ok(None);
        };
        let mut table = device.alloc_zeros::<u64>(words.len())?;
        device
            .cuda_stream()
            .memcpy_htod(&words, &mut table)
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(PersistentLayers {
            partial: device.alloc_zeros::<f32>(kernel.partial_floats())?,
            sync: device.alloc_zeros::<u32>(2)?,
            kernel,
            table,
            on: false,
        }))
    }

    impl Inner {
        pub fn new(
            model: &Phi3,
            cache: &PagedKvCache,
            max_rows: usize,
            max_len: usize,
            capture: bool,
        ) -> Result<Option<Inner>> {
            let Device::Cuda(device) = model.device() else {
                return Ok(None);
            };
            // The kernels are bf16/f16 ones, as the model's fused path.
            if !model.uses_fused_kernels() || max_rows == 0 {
                return Ok(None);
            }
            let dtype = model.dtype();
            let c = model.config().clone();
            let mut weights = Vec::new();
            let mut layers = Vec::with_capacity(model.layers.len());
            let mut kept = Vec::new();
            let mut keep = |t: &Tensor| -> Result<u64> {
                kept.push(t.clone());
                Ok(philo_kernels::decode::address(t)?)
            };
            for layer in &model.layers {
                let mut p = |linear: &LoraLinear| projection(linear, dtype, &mut weights);
                let (Some(qkv), Some(o), Some(gate_up), Some(down)) = (
                    p(&layer.self_attn.qkv_proj)?,
                    p(&layer.self_attn.o_proj)?,
                    p(&layer.mlp.gate_up_proj)?,
                    p(&layer.mlp.down_proj)?,
                ) else {
                    return Ok(None);
                };
                layers.push(LayerWeights {
                    qkv,
                    o,
                    gate_up,
                    down,
                    input_norm: keep(&layer.input_layernorm.weight)?,
                    post_norm: keep(&layer.post_attention_layernorm.weight)?,
                });
            }
            let Some(head) = projection(&model.lm_head, dtype, &mut weights)? else {
                return Ok(None);
            };
            let final_norm = keep(&model.norm.weight)?;
            let embed = keep(&model.embed_tokens)?;

            let max_len = max_len.clamp(1, c.max_position_embeddings);
            let rotary = model.rotary();
            let dev = model.device();
            let positions: Vec<u32> = (0..max_len as u32).collect();
            let (cos_short, sin_short) = rotary.cos_sin(&positions, false, dtype, dev)?;
            let (cos_long, sin_long) = rotary.cos_sin(&positions, true, dtype, dev)?;
            let tables = [
                keep(&cos_short)?,
                keep(&sin_short)?,
                keep(&cos_long)?,
                keep(&sin_long)?,
            ];
            let mut caches = Vec::with_capacity(cache.keys.len());
            for (k, v) in cache.keys.iter().zip(&cache.values) {
                caches.push((keep(k)?, keep(v)?));
            }

            let kernels = DecodeKernels::load(device, dtype)?;
            let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
            let (hidden, inter) = (c.hidden_size, c.intermediate_size);
            let block_size = cache.block_size();
            let max_blocks = max_len.div_ceil(block_size);
            let sms = kernels.multiprocessors();
            let dense = head.dense.is_some()
                && layers.iter().all(|l| {
                    [&l.qkv, &l.o, &l.gate_up, &l.down]
                        .iter()
                        .all(|p| p.dense.is_some())
                });
            let gemv_rows = kernels.gemv_rows(hidden.max(inter).max(h * d));
            let tc_blocks = kernels.tensor_core_attention_blocks(d, block_size);
            let split_floats = (1..=max_rows)
                .map(|m| m * h * splits(m, max_len, h, sms, tc_blocks) * (d + 2))
                .max()
                .unwrap_or(0);
            let mut zeros =
                |n: usize, dtype: DType| -> Result<u64> { keep(&Tensor::zeros(n, dtype, dev)?) };
            let buffers = Buffers {
                x: zeros(max_rows * hidden, dtype)?,
                staged: zeros(max_rows * hidden.max(inter), dtype)?,
                qkv: zeros(max_rows * (h + 2 * kvh) * d, dtype)?,
                q: zeros(max_rows * h * d, dtype)?,
                attn: zeros(max_rows * h * d, dtype)?,
                gate_up: zeros(max_rows * 2 * inter, dtype)?,
                head_out: zeros(
                    if max_rows > gemv_rows {
                        max_rows * c.vocab_size
                    } else {
                        1
                    },
                    dtype,
                )?,
                partial: zeros(split_floats, DType::F32)?,
                counters: zeros(max_rows * h, DType::U32)?,
                state: device.alloc_zeros::<u32>(max_rows * (TABLES_AT + max_blocks))?,
                logits: device.alloc_zeros::<f32>(max_rows * c.vocab_size)?,
                next: device.alloc_zeros::<u32>(max_rows)?,
                lora_t: zeros(2 * max_rows * DecodeStep::MAX_RANK, DType::F32)?,
                lora_table: device.alloc_zeros::<u64>(
                    model.layers.len() * MODULES.len() * DecodeStep::MAX_ADAPTERS * 3,
                )?,
            };
            // Off by default and not yet run on every GPU: a failure to load it leaves the
            // launch-per-kernel step, which every step can run.
            let persistent = persistent_layers(
                &layers,
                &caches,
                &c,
                rotary.rotary_dim(),
                block_size,
                dtype,
                device,
            )
            .unwrap_or_else(|e| {
                eprintln!("warning: the persistent layers kernel did not load ({e}); decode steps run without it");
                None
            });
            let inner = Inner {
                persistent,
                kernels,
                device: device.clone(),
                capture,
                max_rows,
                gemv_rows,
                dense,
                max_len,
                max_blocks,
                block_size,
                tc_blocks,
                eps: c.rms_norm_eps as f32,
                layers,
                head,
                final_norm,
                embed,
                tables,
                caches,
                buffers,
                graphs: HashMap::new(),
                seen: HashSet::new(),
                runs: StepRuns::default(),
                adjust: None,
                adjust_capacity: 0,
                adapters: Vec::new(),
                lora_kept: Vec::new(),
                order: Vec::new(),
                rotary_dim: rotary.rotary_dim(),
                dtype,
                config: c,
                _kept: kept,
                _weights: weights,
            };
            inner.tune_gemms()?;
            Ok(Some(inner))
        }

        /// Times the GEMMs of every row count past the GEMV's (dense bases) now, so that no
        /// step pays for it: a step's first run would otherwise wait on the timing.
        fn tune_gemms(&self) -> Result<()> {
            if !self.dense {
                return Ok(());
            }
            for m in self.gemv_rows + 1..=self.max_rows {
                for launch in self.launches(m, false, false) {
                    if let Launch::Gemm {
                        a,
                        m,
                        n,
                        k,
                        w,
                        output,
                        ..
                    } = launch
                    {
                        self.kernels.tune_gemm(a, m, n, k, w, output)?;
                    }
                }
            }
            Ok(())
        }

        pub fn takes(&self, rows: usize) -> bool {
            (1..=self.max_rows).contains(&rows)
                && (rows <= self.gemv_rows || self.dense || rows <= self.persistent_rows())
        }

        /// Most rows of a step the persistent layers kernel runs (0: it is off). Past the
        /// GEMV's rows a quantised base has no other path, which adapters' rows do not take:
        /// none while the step holds adapters.
        fn persistent_rows(&self) -> usize {
            match &self.persistent {
                Some(p) if p.on && self.adapters.is_empty() => p.kernel.max_rows(),
                _ => 0,
            }
        }

        pub fn gemv_rows(&self) -> usize {
            self.gemv_rows
        }

        pub fn set_adapters(&mut self, bank: &LoraBank) -> Result<()> {
            let per_layer = MODULES.len() * DecodeStep::MAX_ADAPTERS * 3;
            let mut table = vec![0u64; self.layers.len() * per_layer];
            let (mut adapters, mut kept) = (Vec::new(), Vec::new());
            'slots: for slot in bank.loaded() {
                if adapters.len() == DecodeStep::MAX_ADAPTERS {
                    break;
                }
                let index = adapters.len();
                let mut entries = Vec::new();
                for layer in 0..self.layers.len() {
                    for (module_index, module) in MODULES.iter().enumerate() {
                        let at = ((layer * MODULES.len() + module_index)
                            * DecodeStep::MAX_ADAPTERS
                            + index)
                            * 3;
                        let Some((a, b)) = bank.weights(slot, layer, module) else {
                            continue;
                        };
                        let rank = a.dim(0)?;
                        if rank > DecodeStep::MAX_RANK
                            || a.dtype() != self.dtype
                            || b.dtype() != self.dtype
                            || !a.is_contiguous()
                            || !b.is_contiguous()
                        {
                            // Not for these kernels: its rows take the general path.
                            continue 'slots;
                        }
                        let a_address = philo_kernels::decode::address(a)?;
                        let b_address = philo_kernels::decode::address(b)?;
                        entries.push((at, lora_entry(a_address, b_address, rank)));
                        kept.extend([a.clone(), b.clone()]);
                    }
                }
                for (at, entry) in entries {
                    table[at..at + 3].copy_from_slice(&entry);
                }
                adapters.push(slot);
            }
            let stream = self.device.cuda_stream();
            stream
                .memcpy_htod(&table, &mut self.buffers.lora_table)
                .map_err(candle_core::Error::wrap)?;
            self.adapters = adapters;
            // The old weights are freed in stream order, after any step still reading them.
            self.lora_kept = kept;
            Ok(())
        }

        pub fn has_adapter(&self, slot: usize) -> bool {
            self.adapters.contains(&slot)
        }

        pub fn set_persistent_layers(&mut self, on: bool) -> usize {
            let Some(p) = &mut self.persistent else {
                return 0;
            };
            let max_rows = p.kernel.max_rows();
            if p.on != on {
                p.on = on;
                // Steps captured the other way.
                self.graphs.retain(|key, _| key.0 > max_rows);
                self.seen.retain(|key| key.0 > max_rows);
            }
            if on {
                max_rows.min(self.max_rows)
            } else {
                0
            }
        }

        /// The step's launches for `m` rows, with the batched LoRA of each projection when
        /// `lora`, the logit adjustments before sampling when `adjust`.
        fn launches(&self, m: usize, lora: bool, adjust: bool) -> Vec<Launch> {
            let c = &self.config;
            let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
            let (hidden, inter) = (c.hidden_size, c.intermediate_size);
            let b = &self.buffers;
            let state = slice_addr(&b.state, &self.device);
            let word = |i: usize| state + 4 * (i * self.max_rows) as u64;
            let (tokens, lens, long_rows, adapter_rows, params, tables) =
                (word(0), word(1), word(2), word(3), word(4), word(TABLES_AT));
            let lora_table = slice_addr(&b.lora_table, &self.device);
            let gemv_path = m <= self.gemv_rows;
            // The LoRA scratch halves: projection i reads half i % 2 and zeroes the other.
            let scratch_bytes = 4 * self.max_rows * DecodeStep::MAX_RANK;
            let scratch = |i: usize| b.lora_t + ((i % 2) * scratch_bytes) as u64;
            let lora_projections = std::cell::Cell::new(0);
            // One projection of `m` rows: the fused GEMV, or the input transform then cuBLASLt;
            // with `entries` (an adapter table), the batched LoRA of the same input: its first
            // product launched before the base (it runs beside it), its second after.
            let project = |launches: &mut Vec<Launch>,
                           name: &'static str,
                           x: u64,
                           input: GemvInput,
                           (n, k): (usize, usize),
                           p: &Projection,
                           output: GemvOutput,
                           entries: Option<u64>| {
                // `x` through the projection's input transform, on its own (into `staged`).
                let stage = |launches: &mut Vec<Launch>, x: u64, input: GemvInput| {
                    if input == GemvInput::Plain {
                        return x;
                    }
                    launches.push(Launch::Transform {
                        x,
                        input,
                        m,
                        k,
                        out: b.staged,
                    });
                    b.staged
                };
                // The LoRA's first product runs beside the base projection. On the GEMV path it
                // transforms its input itself, as the GEMV does; before cuBLASLt the input is
                // staged once, for both.
                let lora = entries.map(|entries| {
                    let y = match output {
                        GemvOutput::Store(y) | GemvOutput::AddTo(y) => y,
                        GemvOutput::F32(_) | GemvOutput::SwiGlu(_) => {
                            unreachable!(
                                "no adapter on the LM head or a GEMV with the SwiGLU output"
                            )
                        }
                    };
                    let i = lora_projections.get();
                    lora_projections.set(i + 1);
                    let (x, input) = match gemv_path {
                        true => (x, input),
                        false => (stage(launches, x, input), GemvInput::Plain),
                    };
                    let l = BatchedLora {
                        x,
                        input,
                        y,
                        m,
                        n,
                        k,
                        adapter_rows,
                        entries,
                        t: scratch(i),
                        t_next: scratch(i + 1),
                        max_rank: DecodeStep::MAX_RANK,
                    };
                    launches.push(Launch::LoraShrink(l));
                    l
                });
                let (x, input) = match &lora {
                    Some(l) => (l.x, l.input),
                    None => (x, input),
                };
                if gemv_path {
                    // Several rows' SwiGLU runs once, on its own: staged by the GEMV, every
                    // block would compute all of it.
                    let apart = m >= SWIGLU_APART_ROWS && input == GemvInput::SwiGlu;
                    let (gemv_x, gemv_input) = if apart {
                        (stage(launches, x, input), GemvInput::Plain)
                    } else {
                        (x, input)
                    };
                    launches.push(Launch::Gemv(
                        name,
                        Gemv {
                            x: gemv_x,
                            input: gemv_input,
                            m,
                            n,
                            k,
                            weight: p.weight,
                            output,
                        },
                    ));
                } else {
                    let a = stage(launches, x, input);
                    launches.push(Launch::Gemm {
                        name,
                        a,
                        m,
                        n,
                        k,
                        w: p.dense
                            .expect("takes() admits many rows only on dense weights"),
                        output,
                    });
                }
                if let Some(l) = lora {
                    launches.push(Launch::LoraExpand(l));
                }
            };
            // The adapter table of (layer, module), when the step runs adapters.
            let entries = |layer: usize, module: usize| {
                lora.then(|| {
                    let first = (layer * MODULES.len() + module) * DecodeStep::MAX_ADAPTERS;
                    lora_table + (8 * 3 * first) as u64
                })
            };
            let norm = |weight| GemvInput::RmsNorm {
                weight,
                eps: self.eps,
            };
            let mut launches = Vec::new();
            if lora {
                launches.push(Launch::Zero {
                    at: scratch(0),
                    bytes: 4 * m * DecodeStep::MAX_RANK,
                });
            }
            launches.push(Launch::Embed {
                table: self.embed,
                tokens,
                x: b.x,
                m,
                hidden,
            });
            let sms = self.kernels.multiprocessors();
            let splits = splits(m, self.max_len, h, sms, self.tc_blocks);
            let kernel = match self.tc_blocks {
                Some(_) => self.kernels.tensor_core_attention_kernel(d, m * h * splits),
                None => AttentionKernel::Tiled,
            };
            let qkv_shape = ((h + 2 * kvh) * d, hidden);
            let (o_shape, gu_shape, down_shape) =
                ((hidden, h * d), (2 * inter, hidden), (hidden, inter));
            // A step of few rows without adapters may run every layer in the persistent kernel;
            // else a launch per kernel, layer by layer.
            let persistent = self
                .persistent
                .as_ref()
                .filter(|p| p.on && m <= p.kernel.max_rows() && !lora);
            if let Some(p) = persistent {
                launches.push(Launch::Layers(
                    p.kernel.clone(),
                    DecodeLayers {
                        table: slice_addr(&p.table, &self.device),
                        layers: self.layers.len(),
                        x: b.x,
                        qkv: b.qkv,
                        h: b.gate_up,
                        partial: slice_addr(&p.partial, &self.device),
                        rope: self.tables,
                        lens,
                        long_rows,
                        tables,
                        max_blocks: self.max_blocks,
                        m,
                        sync: slice_addr(&p.sync, &self.device),
                    },
                ));
            }
            let launched_layers = if persistent.is_some() {
                0
            } else {
                self.layers.len()
            };
            for (i, (layer, &(k_cache, v_cache))) in self
                .layers
                .iter()
                .zip(&self.caches)
                .enumerate()
                .take(launched_layers)
            {
                let l = &mut launches;
                let store_qkv = GemvOutput::Store(b.qkv);
                let input_norm = norm(layer.input_norm);
                let qkv = &layer.qkv;
                project(
                    l,
                    "qkv",
                    b.x,
                    input_norm,
                    qkv_shape,
                    qkv,
                    store_qkv,
                    entries(i, 0),
                );
                l.push(Launch::RopeKv(RopeKv {
                    qkv: b.qkv,
                    cos_short: self.tables[0],
                    sin_short: self.tables[1],
                    cos_long: self.tables[2],
                    sin_long: self.tables[3],
                    long_rows,
                    lens,
                    tables,
                    max_blocks: self.max_blocks,
                    q_out: b.q,
                    k_cache,
                    v_cache,
                    m,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    rotary_dim: self.rotary_dim,
                    block_size: self.block_size,
                }));
                l.push(Launch::Attention(Attention {
                    q: b.q,
                    k_cache,
                    v_cache,
                    tables,
                    lens,
                    out: b.attn,
                    m,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    block_size: self.block_size,
                    max_blocks: self.max_blocks,
                    window: c.sliding_window.unwrap_or(usize::MAX),
                    splits,
                    kernel,
                    partial: b.partial,
                    counters: b.counters,
                }));
                let add_to_x = GemvOutput::AddTo(b.x);
                let plain = GemvInput::Plain;
                let o = &layer.o;
                project(
                    l,
                    "o_proj",
                    b.attn,
                    plain,
                    o_shape,
                    o,
                    add_to_x,
                    entries(i, 1),
                );
                let post_norm = norm(layer.post_norm);
                let gu = &layer.gate_up;
                let gu_entries = entries(i, 2);
                // Without an adapter on gate_up, its GEMV writes SwiGLU(gate, up) where the
                // tensor-core GEMV runs it, and the down projection stages plain rows (else
                // every down block computes every row's SwiGLU). A failed query of the GPU
                // only means the unfused pair.
                let fused = gemv_path
                    && gu_entries.is_none()
                    && self
                        .kernels
                        .takes_swiglu_output(&Gemv {
                            x: b.x,
                            input: post_norm,
                            m,
                            n: gu_shape.0,
                            k: gu_shape.1,
                            weight: gu.weight,
                            output: GemvOutput::SwiGlu(b.gate_up),
                        })
                        .unwrap_or(false);
                let (gu_output, down_input) = match fused {
                    true => (GemvOutput::SwiGlu(b.gate_up), GemvInput::Plain),
                    false => (GemvOutput::Store(b.gate_up), GemvInput::SwiGlu),
                };
                project(
                    l, "gate_up", b.x, post_norm, gu_shape, gu, gu_output, gu_entries,
                );
                let down = &layer.down;
                project(
                    l,
                    "down",
                    b.gate_up,
                    down_input,
                    down_shape,
                    down,
                    add_to_x,
                    entries(i, 3),
                );
            }
            let logits = slice_addr(&b.logits, &self.device);
            let head = (c.vocab_size, hidden);
            let final_norm = norm(self.final_norm);
            // Many rows: in the compute dtype, then widened (as the GEMV rounds its f32 logits).
            let head_output = if gemv_path {
                GemvOutput::F32(logits)
            } else {
                GemvOutput::Store(b.head_out)
            };
            let l = &mut launches;
            project(
                l,
                "lm_head",
                b.x,
                final_norm,
                head,
                &self.head,
                head_output,
                None,
            );
            if !gemv_path {
                launches.push(Launch::Widen {
                    x: b.head_out,
                    out: logits,
                    n: m * c.vocab_size,
                });
            }
            let out = slice_addr(&b.next, &self.device);
            if let (true, Some(entries)) = (adjust, &self.adjust) {
                let count = slice_addr(entries, &self.device);
                launches.push(Launch::Adjust {
                    logits,
                    entries: count + 4,
                    count,
                    max_entries: self.adjust_capacity,
                });
            }
            launches.push(if self.samples() {
                Launch::Sample {
                    logits,
                    vocab: c.vocab_size,
                    params,
                    stride: self.max_rows,
                    out,
                    m,
                }
            } else {
                Launch::Argmax {
                    logits,
                    vocab: c.vocab_size,
                    out,
                    m,
                }
            });
            launches
        }

        pub fn run(&mut self, rows: &[DecodeRow]) -> Result<()> {
            let m = rows.len();
            if !self.takes(m) {
                return Err(err(format!(
                    "decode step: {m} rows do not fit (at most {}; more than {} only on a dense base or in the persistent layers kernel)",
                    self.max_rows, self.gemv_rows
                )));
            }
            let started = std::time::Instant::now();
            let mut adapter_index = Vec::with_capacity(m);
            for (r, row) in rows.iter().enumerate() {
                let index = match row.adapter {
                    None => u32::MAX,
                    Some(slot) => match self.adapters.iter().position(|&s| s == slot) {
                        Some(i) => i as u32,
                        None => {
                            return Err(err(format!(
                                "decode step: row {r} names adapter slot {slot}, which the step does not hold"
                            )))
                        }
                    },
                };
                adapter_index.push(index);
            }
            // Rows of one adapter next to each other, so the LoRA kernels reuse its weights.
            let mut order: Vec<usize> = (0..m).collect();
            order.sort_by_key(|&r| adapter_index[r]);
            let lora = adapter_index.iter().any(|&a| a != u32::MAX);
            let mut state = vec![0u32; TABLES_AT * self.max_rows + m * self.max_blocks];
            for (d, &r) in order.iter().enumerate() {
                let row = &rows[r];
                let blocks = row.len.div_ceil(self.block_size);
                if row.len == 0 || row.len > self.max_len || row.block_table.len() < blocks {
                    return Err(err(format!(
                        "decode step: row {r} has {} tokens with {} blocks (at most {} tokens)",
                        row.len,
                        row.block_table.len(),
                        self.max_len
                    )));
                }
                state[d] = row.token;
                state[self.max_rows + d] = row.len as u32;
                state[2 * self.max_rows + d] = row.long_rope as u32;
                state[3 * self.max_rows + d] = adapter_index[r];
                row.sampling
                    .write(&mut state[4 * self.max_rows..], self.max_rows, d);
                let table = &row.block_table[..blocks.min(self.max_blocks)];
                state[TABLES_AT * self.max_rows + d * self.max_blocks..][..table.len()]
                    .copy_from_slice(table);
            }
            let stream = self.device.cuda_stream();
            let mut dst = self.buffers.state.slice_mut(0..state.len());
            stream
                .memcpy_htod(&state, &mut dst)
                .map_err(candle_core::Error::wrap)?;
            let adjust = self.write_adjustments(rows, &order)?;
            self.order = order;
            let uploaded = std::time::Instant::now();
            self.runs.upload += uploaded - started;
            let key = (m, lora, adjust);
            // A key's first step runs launch by launch (which also lets cuBLAS set itself up
            // outside a capture); its second is captured, then replayed.
            if self.capture && !self.graphs.contains_key(&key) && !self.seen.insert(key) {
                let launches = self.launches(m, lora, adjust);
                stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(candle_core::Error::wrap)?;
                let recorded = self.launch_all(&launches, false);
                let graph = stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(candle_core::Error::wrap)?;
                recorded?;
                if let Some(graph) = graph {
                    self.graphs.insert(key, Captured(graph));
                    self.runs.captured += 1;
                }
            }
            match self.graphs.get(&key) {
                Some(graph) => {
                    graph.0.launch().map_err(candle_core::Error::wrap)?;
                    self.runs.replayed += 1;
                }
                None => {
                    let launches = self.launches(m, lora, adjust);
                    self.launch_all(&launches, philo_kernels::profile::enabled())?;
                    self.runs.launched += 1;
                }
            }
            self.runs.launch += uploaded.elapsed();
            Ok(())
        }

        pub fn runs(&self) -> StepRuns {
            self.runs
        }

        /// Writes the rows' logit adjustments (device row d = caller's row `order[d]`) for the
        /// step's `Adjust` launch; false when no row has any. Growing the buffer drops the
        /// graphs that address the old one.
        fn write_adjustments(&mut self, rows: &[DecodeRow], order: &[usize]) -> Result<bool> {
            let entries: usize = rows.iter().map(|r| r.adjustments.len()).sum();
            if entries == 0 {
                return Ok(false);
            }
            let vocab = self.config.vocab_size;
            if !self.samples() {
                return Err(err(format!(
                    "decode step: logit adjustments need GPU sampling, which a vocabulary of {vocab} does not have"
                )));
            }
            const WORDS: usize = LogitAdjustment::WORDS;
            let mut words = Vec::with_capacity(1 + WORDS * entries);
            words.push(entries as u32);
            for (d, &r) in order.iter().enumerate() {
                for a in rows[r].adjustments {
                    if a.token as usize >= vocab {
                        return Err(err(format!(
                            "decode step: row {r} adjusts token {}, past the vocabulary of {vocab}",
                            a.token
                        )));
                    }
                    words.extend(a.words(d, vocab));
                }
            }
            if entries > self.adjust_capacity {
                let capacity = entries.next_power_of_two().max(1024);
                self.adjust = Some(self.device.alloc_zeros::<u32>(1 + WORDS * capacity)?);
                self.adjust_capacity = capacity;
                self.graphs.retain(|key, _| !key.2);
                self.seen.retain(|key| !key.2);
            }
            let buffer = self.adjust.as_mut().expect("allocated above");
            let mut dst = buffer.slice_mut(0..words.len());
            self.device
                .cuda_stream()
                .memcpy_htod(&words, &mut dst)
                .map_err(candle_core::Error::wrap)?;
            Ok(true)
        }

        /// Launches `launches` in order; with `profile`, each is timed (see
        /// `philo_kernels::profile`).
        fn launch_all(&self, launches: &[Launch], profile: bool) -> Result<()> {
            let device = Device::Cuda(self.device.clone());
            for launch in launches {
                if profile {
                    philo_kernels::profile::time(&device, launch.name(), || {
                        launch.run(&self.kernels, false)
                    })?;
                } else {
                    launch.run(&self.kernels, true)?;
                }
            }
            Ok(())
        }

        pub fn logits(&self) -> Result<Vec<f32>> {
            let vocab = self.config.vocab_size;
            let stream = self.device.cuda_stream();
            let device_rows = stream
                .clone_dtoh(&self.buffers.logits.slice(0..self.order.len() * vocab))
                .map_err(candle_core::Error::wrap)?;
            let mut out = vec![0f32; device_rows.len()];
            for (d, &r) in self.order.iter().enumerate() {
                out[r * vocab..(r + 1) * vocab]
                    .copy_from_slice(&device_rows[d * vocab..(d + 1) * vocab]);
            }
            Ok(out)
        }

        pub fn samples(&self) -> bool {
            self.config.vocab_size <= philo_kernels::sampling::MAX_VOCAB
        }

        pub fn tokens(&self) -> Result<Vec<u32>> {
            let stream = self.device.cuda_stream();
            let device_rows = stream
                .clone_dtoh(&self.buffers.next.slice(0..self.order.len()))
                .map_err(candle_core::Error::wrap)?;
            let mut out = vec![0u32; device_rows.len()];
            for (d, &r) in self.order.iter().enumerate() {
                out[r] = device_rows[d];
            }
            Ok(out)
        }
    }

    /// Blocks the attention splits each (row, head)'s keys over. The tensor-core kernel (which
    /// a multiprocessor holds `tc_blocks` of): one wave of blocks, so that none idles at the
    /// end (one sequence of 32 heads on the H200: 8 splits); at run time a row uses only as
    /// many as its length fills (see paged_attention.cu). The tiled kernel: up to
    /// [`MAX_ROWS`] rows about 128 positions a split at the full length (short contexts still
    /// fill the GPU), more rows only as many as give about eight blocks per multiprocessor.
    fn splits(
        m: usize,
        max_len: usize,
        heads: usize,
        sms: usize,
        tc_blocks: Option<usize>,
    ) -> usize {
        let by_len = max_len.div_ceil(128);
        let limit = match tc_blocks {
            Some(blocks) => blocks * sms / (m * heads),
            None if m <= MAX_ROWS => by_len,
            None => by_len.min((8 * sms).div_ceil(m * heads)),
        };
        limit.clamp(1, 32)
    }
}
