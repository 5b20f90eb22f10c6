//! Decoding on the GPU as one CUDA graph per step: up to four sequences advance one token each
//! through an explicit kernel sequence (`philo_kernels::decode`) over buffers allocated once,
//! captured on the first step and replayed after. Per step the host writes the token ids and
//! lengths (a few bytes) and reads back the logits or the greedy token ids; nothing else crosses.
//!
//! Prompts are prefilled by [`Phi3::forward_paged`] into the same paged KV cache the graph
//! reads, so a sequence's keys and values never move. Weights are read in the format the model
//! holds them (dense, INT8, INT4, NF4); a model with an unmerged adapter or GGUF blocks keeps the
//! general path ([`DecodeGraph::new`] returns None).

use crate::error::Result;
use crate::phi3::Phi3;

/// Tokens per block of the graph's paged KV cache.
#[cfg(feature = "cuda")]
const BLOCK_SIZE: usize = 16;

/// The graph-captured decode step of `rows` sequences, each with room for `capacity` tokens.
pub struct DecodeGraph {
    inner: imp::Inner,
}

impl DecodeGraph {
    /// Most sequences one graph decodes together.
    pub const MAX_ROWS: usize = philo_kernels::decode::MAX_ROWS;

    /// A decode graph for `model`, or None where it cannot run: not on CUDA, not bf16/f16, an
    /// unmerged adapter, weights held as GGUF blocks or NF4 on the host, or more than
    /// [`DecodeGraph::MAX_ROWS`] rows. `capture` false runs the same kernels launch by launch
    /// (for measuring what the graph saves).
    pub fn new(model: &Phi3, rows: usize, capacity: usize, capture: bool) -> Result<Option<Self>> {
        Ok(imp::Inner::new(model, rows, capacity, capture)?.map(|inner| DecodeGraph { inner }))
    }

    /// Tokens each sequence has room for.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Prefills sequence `row` with `tokens` (its whole context so far; what the row held
    /// before is dropped) and returns the f32 logits of the last token. `long_rope` rotates
    /// with LongRoPE's long factors, as the model decides for the sequence's length.
    pub fn prefill(
        &mut self,
        model: &Phi3,
        row: usize,
        tokens: &[u32],
        long_rope: bool,
    ) -> Result<Vec<f32>> {
        self.inner.prefill(model, row, tokens, long_rope)
    }

    /// Feeds one token to every sequence (`tokens[row]`, appended after what the row holds)
    /// and runs the step; the results are read with [`DecodeGraph::logits`] or
    /// [`DecodeGraph::greedy`].
    pub fn step(&mut self, tokens: &[u32]) -> Result<()> {
        self.inner.step(tokens)
    }

    /// The last step's f32 logits `[rows, vocab]`, row-major.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.inner.logits()
    }

    /// The last step's argmax per row (lowest id on ties), computed on the GPU.
    pub fn greedy(&self) -> Result<Vec<u32>> {
        self.inner.greedy()
    }

    /// Tokens each row holds in its cache.
    pub fn lengths(&self) -> &[usize] {
        self.inner.lengths()
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    /// Without CUDA there is no decode graph: `new` returns None and no value exists.
    pub enum Inner {}

    impl Inner {
        pub fn new(_: &Phi3, _: usize, _: usize, _: bool) -> Result<Option<Inner>> {
            Ok(None)
        }
        pub fn capacity(&self) -> usize {
            match *self {}
        }
        pub fn prefill(&mut self, _: &Phi3, _: usize, _: &[u32], _: bool) -> Result<Vec<f32>> {
            match *self {}
        }
        pub fn step(&mut self, _: &[u32]) -> Result<()> {
            match *self {}
        }
        pub fn logits(&self) -> Result<Vec<f32>> {
            match *self {}
        }
        pub fn greedy(&self) -> Result<Vec<u32>> {
            match *self {}
        }
        pub fn lengths(&self) -> &[usize] {
            match *self {}
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::error::ModelError;
    use crate::lora_bank::LoraBank;
    use crate::lora_linear::{BaseWeight, LoraLinear};
    use crate::paged_forward::SeqChunk;
    use crate::paged_kv_cache::PagedKvCache;
    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, DevicePtr};
    use candle_core::{CudaDevice, Device};
    use candle_core::{DType, Tensor};
    use philo_kernels::decode::{
        Attention, DecodeKernels, Gemv, GemvInput, GemvOutput, GemvWeight, RopeKv,
    };

    /// The tensors the graph's kernels address: kept alive with the graph.
    fn keep(tensors: &mut Vec<Tensor>, t: &Tensor) -> Tensor {
        tensors.push(t.clone());
        t.clone()
    }

    /// One launch of the step.
    enum Launch {
        Embed {
            table: u64,
            tokens: u64,
            x: u64,
            m: usize,
            hidden: usize,
        },
        /// A projection, named for profiles.
        Gemv(&'static str, Gemv),
        RopeKv(RopeKv),
        Attention(Attention),
        Argmax {
            logits: u64,
            vocab: usize,
            out: u64,
            m: usize,
        },
    }

    impl Launch {
        /// The kernel's name in profiles.
        fn name(&self) -> &'static str {
            match self {
                Launch::Embed { .. } => "embed",
                Launch::Gemv(name, _) => name,
                Launch::RopeKv(_) => "rope + kv write",
                Launch::Attention(_) => "attention",
                Launch::Argmax { .. } => "argmax",
            }
        }

        fn run(&self, k: &DecodeKernels) -> candle_core::Result<()> {
            match self {
                Launch::Embed {
                    table,
                    tokens,
                    x,
                    m,
                    hidden,
                } => k.embed(*table, *tokens, *x, *m, *hidden),
                Launch::Gemv(_, g) => k.gemv(g),
                Launch::RopeKv(a) => k.rope_write_kv(a),
                Launch::Attention(a) => k.attention(a),
                Launch::Argmax {
                    logits,
                    vocab,
                    out,
                    m,
                } => k.argmax(*logits, *vocab, *out, *m),
            }
        }
    }

    pub struct Inner {
        kernels: DecodeKernels,
        device: CudaDevice,
        launches: Vec<Launch>,
        capture: bool,
        graph: Option<CudaGraph>,
        rows: usize,
        capacity: usize,
        max_blocks: usize,
        cache: PagedKvCache,
        /// `[2, rows]`: the step's token ids, then each row's length with that token.
        state: CudaSlice<u32>,
        /// The greedy token of each row.
        next: CudaSlice<u32>,
        logits: CudaSlice<f32>,
        lengths: Vec<usize>,
        /// Every tensor and weight a launch addresses, so none is freed under it.
        _kept: Vec<Tensor>,
        _weights: Vec<BaseWeight>,
    }

    fn err(message: String) -> ModelError {
        ModelError::Candle(candle_core::Error::Msg(message))
    }

    fn addr(t: &Tensor) -> Result<u64> {
        Ok(philo_kernels::decode::address(t)?)
    }

    fn slice_addr<T>(s: &CudaSlice<T>, device: &CudaDevice) -> u64 {
        s.device_ptr(&device.cuda_stream()).0
    }

    /// The kernels' view of a base weight, or None for a format they do not read. The base is
    /// kept in `kept` so that its buffers outlive the graph.
    fn weight(
        linear: &LoraLinear,
        dtype: DType,
        kept: &mut Vec<BaseWeight>,
    ) -> Result<Option<GemvWeight>> {
        if linear.lora.is_some() {
            return Ok(None);
        }
        let view = match &linear.base {
            BaseWeight::Dense(w) if w.dtype() == dtype && w.is_contiguous() => {
                GemvWeight::dense(w)?
            }
            BaseWeight::Int8(q) => GemvWeight::int8(q)?,
            BaseWeight::Int4(q) => GemvWeight::int4(q)?,
            BaseWeight::Nf4Device(q) => GemvWeight::nf4(q)?,
            _ => return Ok(None),
        };
        kept.push(linear.base.clone());
        Ok(Some(view))
    }
    impl Inner {
        pub fn new(
            model: &Phi3,
            rows: usize,
            capacity: usize,
            capture: bool,
        ) -> Result<Option<Inner>> {
            let Device::Cuda(device) = model.device() else {
                return Ok(None);
            };
            // The kernels are bf16/f16 ones, as the model's fused path.
            if !model.uses_fused_kernels() || rows == 0 || rows > DecodeGraph::MAX_ROWS {
                return Ok(None);
            }
            let dtype = model.dtype();
            let c = model.config().clone();
            let (h, kvh, d, hidden) = (
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.hidden_size,
            );
            let inter = c.intermediate_size;
            let qkv_out = (h + 2 * kvh) * d;
            let capacity = capacity.clamp(1, c.max_position_embeddings);
            let max_blocks = capacity.div_ceil(BLOCK_SIZE);
            let dev = model.device();
            let mut kept = Vec::new();
            let mut launches = Vec::new();

            let cache = PagedKvCache::new(&c, rows * max_blocks, BLOCK_SIZE, dtype, dev)?;
            let state = device.alloc_zeros::<u32>(2 * rows)?;
            let (tokens, lens) = (
                slice_addr(&state, device),
                slice_addr(&state, device) + 4 * rows as u64,
            );
            let tables: Vec<u32> = (0..(rows * max_blocks) as u32).collect();
            let tables = keep(
                &mut kept,
                &Tensor::from_vec(tables, (rows, max_blocks), dev)?,
            );
            let x = keep(&mut kept, &Tensor::zeros((rows, hidden), dtype, dev)?);
            let qkv = keep(&mut kept, &Tensor::zeros((rows, qkv_out), dtype, dev)?);
            let q = keep(&mut kept, &Tensor::zeros((h, rows, d), dtype, dev)?);
            let attn = keep(&mut kept, &Tensor::zeros((rows, h * d), dtype, dev)?);
            let gate_up = keep(&mut kept, &Tensor::zeros((rows, 2 * inter), dtype, dev)?);
            let logits = device.alloc_zeros::<f32>(rows * c.vocab_size)?;
            let next = device.alloc_zeros::<u32>(rows)?;
            // Keys split over up to 32 blocks per (row, head), about 128 positions each at the
            // full capacity: short contexts still fill the GPU, long ones stay bandwidth-bound.
            let splits = capacity.div_ceil(128).clamp(1, 32);
            let partial = keep(
                &mut kept,
                &Tensor::zeros(rows * h * splits * (d + 2), DType::F32, dev)?,
            );
            let counters = keep(&mut kept, &Tensor::zeros(rows * h, DType::U32, dev)?);
            let rotary = model.rotary();
            let positions: Vec<u32> = (0..capacity as u32).collect();
            let (cos_short, sin_short) = rotary.cos_sin(&positions, false, dtype, dev)?;
            let (cos_long, sin_long) = rotary.cos_sin(&positions, true, dtype, dev)?;
            let original = rotary.long_factors_above().unwrap_or(usize::MAX);
            let (cos_short, sin_short) = (keep(&mut kept, &cos_short), keep(&mut kept, &sin_short));
            let (cos_long, sin_long) = (keep(&mut kept, &cos_long), keep(&mut kept, &sin_long));
            launches.push(Launch::Embed {
                table: addr(&keep(&mut kept, &model.embed_tokens))?,
                tokens,
                x: addr(&x)?,
                m: rows,
                hidden,
            });
            let eps = c.rms_norm_eps as f32;
            let mut weights = Vec::new();
            let gemv = |name, x: &Tensor, input, n, k, weight, output| -> Result<Launch> {
                Ok(Launch::Gemv(
                    name,
                    Gemv {
                        x: addr(x)?,
                        input,
                        m: rows,
                        n,
                        k,
                        weight,
                        output,
                    },
                ))
            };
            let mut norm = |t: &Tensor| -> Result<GemvInput> {
                Ok(GemvInput::RmsNorm {
                    weight: addr(&keep(&mut kept, t))?,
                    eps,
                })
            };
            for (i, layer) in model.layers.iter().enumerate() {
                let mut w = |linear: &LoraLinear| weight(linear, dtype, &mut weights);
                let (Some(w_qkv), Some(w_o), Some(w_gu), Some(w_down)) = (
                    w(&layer.self_attn.qkv_proj)?,
                    w(&layer.self_attn.o_proj)?,
                    w(&layer.mlp.gate_up_proj)?,
                    w(&layer.mlp.down_proj)?,
                ) else {
                    return Ok(None);
                };
                let input_norm = norm(&layer.input_layernorm.weight)?;
                let store_qkv = GemvOutput::Store(addr(&qkv)?);
                launches.push(gemv(
                    "qkv", &x, input_norm, qkv_out, hidden, w_qkv, store_qkv,
                )?);
                let (k_cache, v_cache) = (&cache.keys[i], &cache.values[i]);
                launches.push(Launch::RopeKv(RopeKv {
                    qkv: addr(&qkv)?,
                    cos_short: addr(&cos_short)?,
                    sin_short: addr(&sin_short)?,
                    cos_long: addr(&cos_long)?,
                    sin_long: addr(&sin_long)?,
                    original,
                    lens,
                    tables: addr(&tables)?,
                    max_blocks,
                    q_out: addr(&q)?,
                    k_cache: addr(k_cache)?,
                    v_cache: addr(v_cache)?,
                    m: rows,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    rotary_dim: rotary.rotary_dim(),
                    block_size: BLOCK_SIZE,
                }));
                launches.push(Launch::Attention(Attention {
                    q: addr(&q)?,
                    k_cache: addr(k_cache)?,
                    v_cache: addr(v_cache)?,
                    tables: addr(&tables)?,
                    lens,
                    out: addr(&attn)?,
                    m: rows,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: d,
                    block_size: BLOCK_SIZE,
                    max_blocks,
                    window: c.sliding_window.unwrap_or(usize::MAX),
                    splits,
                    partial: addr(&partial)?,
                    counters: addr(&counters)?,
                }));
                let add_to_x = GemvOutput::AddTo(addr(&x)?);
                let plain = GemvInput::Plain;
                launches.push(gemv("o_proj", &attn, plain, hidden, h * d, w_o, add_to_x)?);
                let post_norm = norm(&layer.post_attention_layernorm.weight)?;
                let store_gu = GemvOutput::Store(addr(&gate_up)?);
                launches.push(gemv(
                    "gate_up",
                    &x,
                    post_norm,
                    2 * inter,
                    hidden,
                    w_gu,
                    store_gu,
                )?);
                let swiglu = GemvInput::SwiGlu;
                launches.push(gemv(
                    "down", &gate_up, swiglu, hidden, inter, w_down, add_to_x,
                )?);
            }
            let Some(w_head) = weight(&model.lm_head, dtype, &mut weights)? else {
                return Ok(None);
            };
            let logits_out = GemvOutput::F32(slice_addr(&logits, device));
            let final_norm = norm(&model.norm.weight)?;
            let vocab = c.vocab_size;
            launches.push(gemv(
                "lm_head", &x, final_norm, vocab, hidden, w_head, logits_out,
            )?);
            launches.push(Launch::Argmax {
                logits: slice_addr(&logits, device),
                vocab: c.vocab_size,
                out: slice_addr(&next, device),
                m: rows,
            });
            Ok(Some(Inner {
                kernels: DecodeKernels::load(device, dtype)?,
                device: device.clone(),
                launches,
                capture,
                graph: None,
                rows,
                capacity,
                max_blocks,
                cache,
                state,
                next,
                logits,
                lengths: vec![0; rows],
                _kept: kept,
                _weights: weights,
            }))
        }

        pub fn capacity(&self) -> usize {
            self.capacity
        }

        pub fn lengths(&self) -> &[usize] {
            &self.lengths
        }

        pub fn prefill(
            &mut self,
            model: &Phi3,
            row: usize,
            tokens: &[u32],
            long_rope: bool,
        ) -> Result<Vec<f32>> {
            if row >= self.rows || tokens.is_empty() || tokens.len() > self.capacity {
                return Err(err(format!(
                    "decode graph: prefill of {} tokens into row {row} (the graph has {} rows of {} tokens)",
                    tokens.len(),
                    self.rows,
                    self.capacity
                )));
            }
            let first = (row * self.max_blocks) as u32;
            let table: Vec<u32> = (first..first + self.max_blocks as u32).collect();
            let chunk = SeqChunk {
                tokens,
                past: 0,
                block_table: &table,
                adapter: None,
                long_rope,
            };
            let logits = model.forward_paged(&[chunk], &mut self.cache, &LoraBank::new())?;
            self.lengths[row] = tokens.len();
            Ok(logits.flatten_all()?.to_vec1::<f32>()?)
        }

        pub fn step(&mut self, tokens: &[u32]) -> Result<()> {
            if tokens.len() != self.rows {
                return Err(err(format!(
                    "decode graph: {} tokens for {} rows",
                    tokens.len(),
                    self.rows
                )));
            }
            if let Some(row) = self
                .lengths
                .iter()
                .position(|&l| l == 0 || l >= self.capacity)
            {
                return Err(err(format!(
                    "decode graph: row {row} holds {} of {} tokens (prefill it first; a full row takes no more)",
                    self.lengths[row], self.capacity
                )));
            }
            let mut state = tokens.to_vec();
            state.extend(self.lengths.iter().map(|&l| l as u32 + 1));
            let stream = self.device.cuda_stream();
            stream
                .memcpy_htod(&state, &mut self.state)
                .map_err(candle_core::Error::wrap)?;
            if self.capture && self.graph.is_none() {
                stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(candle_core::Error::wrap)?;
                let recorded = self.launch_all(false);
                let graph = stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(candle_core::Error::wrap)?;
                recorded?;
                self.graph = graph;
            }
            match &self.graph {
                Some(graph) => graph.launch().map_err(candle_core::Error::wrap)?,
                None => self.launch_all(philo_kernels::profile::enabled())?,
            }
            for l in &mut self.lengths {
                *l += 1;
            }
            Ok(())
        }

        /// Launches the step's kernels in order; outside a capture with `PHILO_PROFILE=1`, each
        /// is timed (see `philo_kernels::profile`).
        fn launch_all(&self, profile: bool) -> Result<()> {
            let device = Device::Cuda(self.device.clone());
            for launch in &self.launches {
                if profile {
                    philo_kernels::profile::time(&device, launch.name(), || {
                        launch.run(&self.kernels)
                    })?;
                } else {
                    launch.run(&self.kernels)?;
                }
            }
            Ok(())
        }

        pub fn logits(&self) -> Result<Vec<f32>> {
            Ok(self.device.clone_dtoh(&self.logits)?)
        }

        pub fn greedy(&self) -> Result<Vec<u32>> {
            Ok(self.device.clone_dtoh(&self.next)?)
        }
    }
}
